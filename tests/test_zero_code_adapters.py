"""Zero-code end to end for #12-#14, the LoRA groups of #2 and #16.

Unmodified scripts run under ``opentelemetry-instrument`` (Prometheus reader
only): a PEFT LoRA fine-tuning loop must serve the activation and LoRA signals
per layer and the lora_a / lora_b gradient groups; a generation script that
reuses a prefilled prompt prefix must serve the KV-cache counters and hit ratio
the reference arithmetic predicts. Both scrapes must pass ``promtool check metrics``.
"""

from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Iterator

import pytest

from tests.support.backends import promtool_check_metrics, require_binary
from tests.support.zero_code import Scrape, TrainProcess, scrape_until

pytestmark = pytest.mark.slow

SCRIPTS = {"peft_lora": "peft_lora_train.py", "generate": "llama_generate.py"}
LORA_SERIES = {
    ("llm_activation_sparsity", "llm_layer"): {"0", "1"},
    ("llm_activation_outlier_ratio", "llm_layer"): {"0", "1"},
    ("llm_lora_rank_activation_ratio", "llm_layer"): {"0", "1"},
    ("llm_grad_sparsity", "llm_param_group"): {"all", "lora_a", "lora_b"},
}


def kv_updates() -> list[tuple[int, int]]:
    """(reused, added) per layer update of llama_generate.py: 2 layers, 2 rows, prefix 10, prompt 13, 5 tokens."""
    layers, rows, prefix, prompt, new = 2, 2, 10, 13, 5
    steps = [(0, prefix)]
    for _ in range(2):
        steps += [(prefix, prompt - prefix)] + [(prompt + i, 1) for i in range(new - 1)]
    return [(reused * rows, added * rows) for reused, added in steps for _ in range(layers)]


def start(script: str, workdir: pathlib.Path) -> TrainProcess:
    process = TrainProcess(SCRIPTS[script], workdir, {"OTEL_METRICS_EXPORTER": "prometheus"})
    process.start()
    return process


def wait_for_line(process: TrainProcess, marker: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while marker not in process.stdout_path.read_text(errors="replace"):
        if process.process is not None and process.process.poll() is not None:
            pytest.fail(f"{process.script} exited early{process.report()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{process.script} did not print {marker!r} within {timeout:.0f} s{process.report()}")
        time.sleep(0.1)


def labelled(result: Scrape, name: str, label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in result.samples.get(name, []) if label in labels}


@pytest.fixture
def run(tmp_path: pathlib.Path) -> Iterator:
    started: list[TrainProcess] = []

    def launch(script: str) -> TrainProcess:
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
        workdir = tmp_path / script
        workdir.mkdir()
        process = start(script, workdir)
        started.append(process)
        return process

    yield launch
    for process in started:
        process.kill()


def test_peft_lora_script_exports_activation_and_lora_signals(run) -> None:
    require_binary("promtool")
    process = run("peft_lora")
    process.wait_trained()

    def complete(result: Scrape) -> bool:
        return all(set(labelled(result, name, label)) >= wanted for (name, label), wanted in LORA_SERIES.items())

    result = scrape_until(process, complete, timeout=10.0)
    for (name, label), wanted in LORA_SERIES.items():
        values = labelled(result, name, label)
        assert set(values) >= wanted, f"{name}: {sorted(values)}{process.report()}"
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values.values()), (name, values)
    assert all(v > 0 for v in labelled(result, "llm_lora_rank_activation_ratio", "llm_layer").values())
    code, output = promtool_check_metrics(result.text)
    assert (code, output.strip()) == (0, ""), f"promtool check metrics:\n{output}"
    assert process.release_and_wait() == 0, process.report()
    stderr = process.stderr_path.read_text(errors="replace")
    assert "Traceback" not in stderr and "otel_llm: probe" not in stderr, process.report()


def test_generation_script_exports_kv_cache_reuse(run) -> None:
    require_binary("promtool")
    process = run("generate")
    wait_for_line(process, "generated")
    updates = kv_updates()
    hits = sum(r for r, _ in updates)
    lookups = sum(r + a for r, a in updates)
    window = updates[-64:]
    ratio = sum(r for r, _ in window) / sum(r + a for r, a in window)

    def counted(result: Scrape) -> bool:
        return [v for _, v in result.samples.get("llm_kv_cache_lookups_total", [])] == [lookups]

    result = scrape_until(process, counted, timeout=10.0)
    assert [v for _, v in result.samples.get("llm_kv_cache_hits_total", [])] == [hits], process.report()
    assert [v for _, v in result.samples.get("llm_kv_cache_lookups_total", [])] == [lookups], process.report()
    (observed,) = [v for _, v in result.samples["llm_kv_cache_hit_ratio"]]
    assert math.isclose(observed, ratio, rel_tol=1e-9), (observed, ratio)
    code, output = promtool_check_metrics(result.text)
    assert (code, output.strip()) == (0, ""), f"promtool check metrics:\n{output}"
    assert process.release_and_wait() == 0, process.report()
