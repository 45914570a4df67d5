"""DeepSpeed ZeRO 0-3 on CPU (gloo, 2 ranks): exported values equal one plain-torch process on the global batch.

The workers (tests/dist/deepspeed_worker.py) run real DeepSpeed with its CPU
accelerator; this process never imports it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_distributed import BIN, clean_env, finish, free_base_port, results, torchrun

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "deepspeed_worker.py"
GAUGES = ("llm.grad.norm", "llm.grad.sparsity", "llm.param.update_ratio", "llm.train.loss")
STEPS, TOKENS_PER_STEP = 3, 2 * 16

EXPECTED_WRAPPERS = {
    ("0", "fp32"): "AdamW", ("0", "bf16"): "FP16_UnfusedOptimizer", ("0", "fp16"): "FP16_UnfusedOptimizer",
    ("1", "fp32"): "DeepSpeedZeroOptimizer", ("1", "bf16"): "DeepSpeedZeroOptimizer",
    ("2", "fp32"): "DeepSpeedZeroOptimizer", ("2", "bf16"): "DeepSpeedZeroOptimizer",
    ("3", "fp32"): "DeepSpeedZeroOptimizer_Stage3", ("3", "bf16"): "DeepSpeedZeroOptimizer_Stage3",
}


def env() -> dict[str, str]:
    return clean_env(DS_ACCELERATOR="cpu", OTEL_LLM_SAMPLING_INTERVAL="1")


def relative(value: float, expected: float) -> float:
    return abs(value - expected) / max(abs(expected), 1e-12)


def check_steps(name: str, steps: list[dict], precision: str) -> None:
    """Every step's exported gauges against the reference, DeepSpeed's own norm and the counters."""
    # fp32 is exact up to summation order; bf16 trains a bf16 model against the fp32 reference
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    clipped = 0
    for index, step in enumerate(steps):
        exported, reference = step["exported"], step["reference"]
        for signal in GAUGES:
            assert exported[signal] is not None, (name, index, signal)
            if signal == "llm.grad.sparsity" and precision != "fp32":
                assert abs(exported[signal] - reference[signal]) <= 0.02, (name, index, signal, step)
            else:
                assert relative(exported[signal], reference[signal]) <= tolerance, (name, index, signal, step)
        # every coordinate is updated on exactly one rank (ZeRO) or identically on all (stage 0)
        assert abs(exported["llm.param.update_variance_ratio"]) <= 1e-12, (name, index, step)
        if step["deepspeed_norm"] is not None:  # the pre-clip norm DeepSpeed itself reports
            assert relative(exported["llm.grad.norm"], step["deepspeed_norm"]) <= 1e-6, (name, index, step)
        clipped += int(reference["clipped"])
        counters = step["counters"]
        assert counters["llm.train.steps"] == index + 1, (name, index, counters)
        assert counters["llm.train.tokens"] == (index + 1) * TOKENS_PER_STEP, (name, index, counters)
        assert (counters["llm.grad.clipped_steps"] or 0) == clipped, (name, index, counters)
        assert not counters["llm.train.skipped_steps"], (name, index, counters)


def test_every_stage_precision_and_param_grouping_exports_global_values_on_every_rank(tmp_path):
    finish(torchrun(2, str(WORKER), "matrix", "--out", str(tmp_path), env=env(), cwd=tmp_path), timeout=600)
    ranks = results(tmp_path, 2)
    runs = ranks[0]["runs"]
    assert len(runs) == 32 + (1 if ranks[0]["fp16"] else 0)
    assert sum(run["padding"] for run in ranks[1]["runs"].values()) > 0  # partitions with padding were covered
    for name, run in runs.items():
        stage, precision = name.split("-")[0].removeprefix("stage"), name.split("-")[-1]
        assert run["wrapper"] == EXPECTED_WRAPPERS[(stage, precision)], name
        for rank in ranks:
            check_steps(name, rank["runs"][name]["steps"], precision)
        for first, second in zip(runs[name]["steps"], ranks[1]["runs"][name]["steps"]):
            for signal in ("llm.grad.norm", "llm.grad.sparsity", "llm.param.update_ratio"):
                assert relative(first["exported"][signal], second["exported"][signal]) <= 1e-6, (name, signal)


def test_instrument_with_the_client_optimizer_after_initialize(tmp_path):
    finish(torchrun(2, str(WORKER), "client", "--out", str(tmp_path), env=env(), cwd=tmp_path), timeout=300)
    for rank in results(tmp_path, 2):
        for name, run in rank["runs"].items():
            check_steps(name, run["steps"], "fp32")


def launch(launcher: str, stage: int, out: Path, environment: dict[str, str]) -> subprocess.Popen:
    """The worker's zero_code mode with no otel_llm call, each rank under opentelemetry-instrument."""
    worker = [str(WORKER), "zero_code", "--stage", str(stage), "--out", str(out)]
    if launcher == "torchrun":  # torchrun starts `opentelemetry-instrument python worker.py` per rank
        return torchrun(2, "--no-python", str(BIN / "opentelemetry-instrument"), sys.executable, *worker,
                        env=environment, cwd=out)
    # `opentelemetry-instrument deepspeed ...`: the launcher processes are told apart and export nothing
    environment["PATH"] = f"{BIN}:{environment.get('PATH', '')}"
    return subprocess.Popen([str(BIN / "opentelemetry-instrument"), str(BIN / "deepspeed"), "--num_gpus", "2",
                             "--master_port", str(free_base_port(1)), *worker], env=environment, cwd=out,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize(("launcher", "stage"), [("torchrun", 1), ("torchrun", 3), ("deepspeed", 2)])
def test_zero_code_exports_global_values_on_every_rank(tmp_path, launcher, stage):
    base = free_base_port(2)
    environment = env()
    environment.update(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT=str(base),
                       OTEL_TRACES_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    finish(launch(launcher, stage, tmp_path, environment), timeout=300)
    for rank in results(tmp_path, 2):
        scraped, last = rank["scraped"], rank["steps"][-1]
        reference = last["reference"]
        assert relative(scraped["llm_grad_norm"], reference["llm.grad.norm"]) <= 1e-4
        assert relative(scraped["llm_grad_norm"], last["deepspeed_norm"]) <= 1e-6
        assert relative(scraped["llm_grad_sparsity"], reference["llm.grad.sparsity"]) <= 1e-4
        assert relative(scraped["llm_param_update_ratio"], reference["llm.param.update_ratio"]) <= 1e-4
        assert relative(scraped["llm_train_loss"], reference["llm.train.loss"]) <= 1e-4
        assert scraped["llm_train_steps_total"] == STEPS
        assert scraped["llm_train_tokens_total"] == STEPS * TOKENS_PER_STEP
        assert scraped["llm_grad_clipped_steps_total"] == sum(s["reference"]["clipped"] for s in rank["steps"])
        assert scraped["llm_activation_sparsity"] >= 0  # the layer stack was found (ZeRO-3: sizes in ds_numel)
        assert "llm_attention_logit_max" in scraped
        assert not rank["warnings"], rank["warnings"]


def test_a_skipped_update_is_counted_apart_and_not_as_a_step(tmp_path):
    finish(torchrun(2, str(WORKER), "overflow", "--out", str(tmp_path), env=env(), cwd=tmp_path), timeout=300)
    for rank in results(tmp_path, 2):
        assert rank["deepspeed_skipped"] == 1
        assert rank["counters"]["llm.train.skipped_steps"] == 1
        assert rank["counters"]["llm.train.steps"] == STEPS - 1
        assert rank["exported_norm"] == pytest.approx(rank["deepspeed_norm"], rel=1e-6)


def test_deepspeed_is_not_imported_by_otel_llm():
    code = ("import sys, torch, otel_llm; s = otel_llm.instrument(torch.nn.Linear(2, 2), "
            "torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), config=otel_llm.Config(exporters='none'));"
            "s.shutdown(); print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


def test_trainer_with_a_deepspeed_config_and_the_callback_exports_what_the_trainer_logs(tmp_path):
    """Trainer(deepspeed=ZeRO-2), clipping at a bound the norms cross, gradient accumulation 2, 2 ranks.

    The Trainer logs DeepSpeed's pre-clip norm and the mean of the ranks' losses; each
    rank exports that norm and its own loss (the update runs inside the last
    micro-batch's training_step: its loss still belongs to the step).
    """
    from tests.models import padded_rows

    base = free_base_port(2)
    environment = env()
    environment.update(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT=str(base),
                       HF_HUB_OFFLINE="1")
    finish(torchrun(2, str(ROOT / "tests" / "scripts" / "hf_deepspeed_train.py"), "--out", str(tmp_path),
                    "--stage", "2", env=environment, cwd=tmp_path), timeout=300)
    ranks = results(tmp_path, 2)
    logged = [entry for entry in ranks[0]["log"] if "grad_norm" in entry]
    assert len(logged) == 5 and all(len(rank["scrapes"]) == 5 for rank in ranks)
    assert 0 < sum(entry["grad_norm"] > 0.17 for entry in logged)
    for step, entry in enumerate(logged):
        for rank in ranks:
            scraped = rank["scrapes"][step]
            assert relative(scraped["llm_grad_norm"], entry["grad_norm"]) <= 1e-6, (step, scraped)
            assert scraped["llm_train_steps_total"] == step + 1
            assert scraped["llm_grad_clipped_steps_total"] == sum(e["grad_norm"] > 0.17 for e in logged[:step + 1])
        mean_loss = sum(rank["scrapes"][step]["llm_train_loss"] for rank in ranks) / 2
        assert relative(mean_loss, entry["loss"]) <= 1e-5, (step, entry)
    # 5 steps x 2 ranks x 2 micro-batches x 2 rows: every row of the dataset once
    tokens = sum(rank["scrapes"][-1]["llm_train_tokens_total"] for rank in ranks)
    assert tokens == sum(int(row["attention_mask"].sum()) for row in padded_rows(40, 64))


def test_the_deepspeed_example_runs_zero_3_with_two_param_groups_one_step_per_update(tmp_path):
    base = free_base_port(2)
    environment = env()
    environment.update(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT=str(base))
    output = finish(torchrun(2, str(ROOT / "examples" / "deepspeed_train.py"), "--stage", "3", "--steps", "12",
                             env=environment, cwd=tmp_path), timeout=300)
    for rank in (0, 1):
        assert f"rank {rank}: ZeRO-3 with DeepSpeedZeroOptimizer_Stage3; scrape http://127.0.0.1:{base + rank}" \
            in output, output[-3000:]
        assert f"rank {rank}: done, 12 steps" in output  # two param groups: still one step per update
