"""Multi-rank runs under torchrun with gloo on CPU: global values, rank-aware export, no port clash."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.receivers import GrpcMetricsReceiver

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER = ROOT / "tests" / "dist" / "worker.py"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OTEL_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONPATH")}
    env.update(extra)
    return env


def free_base_port(count: int) -> int:
    """A base port with ``count`` consecutive free ports after it."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            held = []
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no run of free ports")


def torchrun(nproc: int, *argv: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--master_port",
                             str(free_base_port(1)), *argv], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"torchrun did not finish:\n{output[-4000:]}") from None
    assert process.returncode == 0, output[-4000:]
    return output


def results(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_ddp_update_variance_ratio_is_zero_in_sync_and_matches_reference_when_perturbed(tmp_path):
    finish(torchrun(2, str(WORKER), "ddp", "--out", str(tmp_path), env=clean_env(), cwd=tmp_path))
    for rank in results(tmp_path, 2):
        in_sync, perturbed = rank["steps"][:2], rank["steps"][2:]
        assert all(s["exported"] < 1e-10 for s in in_sync)
        for s in perturbed:
            assert s["exported"] > 1e-3
            assert abs(s["exported"] - s["reference"]) <= 1e-4 * s["reference"]


def test_fsdp2_values_are_global_not_per_shard(tmp_path):
    finish(torchrun(2, str(WORKER), "fsdp", "--out", str(tmp_path), env=clean_env(), cwd=tmp_path))
    for rank in results(tmp_path, 2):
        for step in rank["steps"]:
            for name, expected in step["reference"].items():
                assert abs(step["exported"][name] - expected) <= 1e-4 * abs(expected), (name, step)


def test_a_dead_rank_does_not_hang_the_others_in_a_telemetry_collective(tmp_path):
    process = torchrun(2, str(WORKER), "dies", "--out", str(tmp_path), env=clean_env(), cwd=tmp_path)
    finish(process, timeout=90)
    survivor = json.loads((tmp_path / "rank0.json").read_text())
    assert survivor["steps"] == 3  # the step completed; the failed collective was logged, not raised
    assert survivor["last_step_seconds"] < 25  # bounded by the group's own timeout (20 s), never forever


def test_adaptive_sampling_takes_the_same_steps_on_every_rank(tmp_path):
    finish(torchrun(2, str(WORKER), "adaptive", "--out", str(tmp_path), "--steps", "150", env=clean_env(),
                    cwd=tmp_path))
    first, second = results(tmp_path, 2)
    assert first["losses"] != second["losses"]  # the ranks really see different losses
    assert first["sampled"] == second["sampled"]
    sampled = first["sampled"]
    assert sampled[:7] == list(range(7))  # dense warm-up (intervals floor(3 (t + 1) / 10) >= 1)
    # rank 1's spike (steps 60..89) tightened both ranks: the gap after the first sampled step in it is the minimum
    inside = [s for s in sampled if 60 <= s < 90]
    assert inside and inside[1] - inside[0] == 3, sampled
    gaps_before = [b - a for a, b in zip(sampled, sampled[1:]) if 10 <= a < 60]
    assert max(gaps_before) > 3, sampled  # the interval had grown before the spike


def test_a_rank_that_sleeps_each_step_is_the_slowest_in_the_agreement(tmp_path):
    finish(torchrun(2, str(WORKER), "slow", "--out", str(tmp_path), "--steps", "31", env=clean_env(), cwd=tmp_path))
    fast, slow = results(tmp_path, 2)
    assert fast["sampled"] == slow["sampled"] == [0, 10, 20, 30]
    window = slice(21, 31)  # the last sampled step's window: steps 21..30
    fast_mean = sum(fast["busy"][window]) / 10
    slow_mean = sum(slow["busy"][window]) / 10
    gauges = fast["gauges"]  # rank 0 exports the agreed values
    assert gauges["llm.train.step.slowest"] == pytest.approx(slow_mean, rel=0.1)
    assert gauges["llm.train.step.fastest"] == pytest.approx(fast_mean, rel=0.1, abs=0.003)
    assert gauges["llm.train.step.skew_ratio"] == pytest.approx(
        gauges["llm.train.step.slowest"] / gauges["llm.train.step.fastest"] - 1)
    assert gauges["llm.train.step.skew_ratio"] > 0.2  # the skew alert's bound
    assert "llm.train.step.slowest" not in slow["gauges"]  # one rank exports what every rank knows


def scrape_until(url: str, pattern: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            if re.search(pattern, body, re.M):
                return body
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never matched {pattern!r}; last body tail:\n{body[-2000:]}")


def steps_sample(body: str) -> tuple[str, float]:
    match = re.search(r'^llm_train_steps_total\{([^}]*)\} (\S+)$', body, re.M)
    assert match, body[-2000:]
    return match.group(1), float(match.group(2))


@pytest.mark.parametrize("policy", ["all", "zero"])
def test_three_ranks_export_on_both_readers_without_port_clash(tmp_path, policy):
    base = free_base_port(3)
    with GrpcMetricsReceiver() as receiver:
        env = clean_env(OTEL_EXPORTER_PROMETHEUS_PORT=str(base), OTEL_LLM_SAMPLING="adaptive",
                        OTEL_LLM_EXPORT_RANKS=policy, OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=receiver.url,
                        OTEL_EXPORTER_OTLP_METRICS_INSECURE="true", OTEL_METRIC_EXPORT_INTERVAL="500")
        process = torchrun(3, str(WORKER), "export", "--out", str(tmp_path), "--steps", "200", env=env,
                           cwd=tmp_path)
        try:
            exporting = range(3) if policy == "all" else range(1)
            for local_rank in exporting:
                body = scrape_until(f"http://127.0.0.1:{base + local_rank}/metrics",
                                    r"^llm_train_steps_total\{.*\} 200\.0$", timeout=90)
                labels, value = steps_sample(body)
                assert f'llm_rank="{local_rank}"' in labels and 'llm_world_size="3"' in labels
            for local_rank in set(range(3)) - set(exporting):
                with pytest.raises(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{base + local_rank}/metrics", timeout=2)
        finally:
            (tmp_path / "release").touch()
            output = finish(process)
        assert "Traceback" not in output, output[-4000:]
        ranks = {attrs.get("llm.rank") for attrs in receiver.resource_attributes()}
        assert ranks == set(exporting)
        for rank in results(tmp_path, 3):
            assert rank["steps"] == 200


def test_zero_code_torchrun_exports_every_rank(tmp_path):
    base = free_base_port(2)
    hold = tmp_path / "hold"
    with GrpcMetricsReceiver() as receiver:
        env = clean_env(OTEL_METRICS_EXPORTER="prometheus,otlp", OTEL_EXPORTER_PROMETHEUS_PORT=str(base),
                        OTEL_LLM_SAMPLING_INTERVAL="5", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=receiver.url,
                        OTEL_EXPORTER_OTLP_METRICS_INSECURE="true", OTEL_METRIC_EXPORT_INTERVAL="500",
                        TRAIN_STEPS="30", TRAIN_HOLD_FILE=str(hold))
        process = subprocess.Popen(
            [str(BIN / "opentelemetry-instrument"), str(BIN / "torchrun"), "--nproc_per_node=2", "--master_port",
             str(free_base_port(1)), str(ROOT / "tests" / "scripts" / "ddp_train.py")],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for local_rank in range(2):
                body = scrape_until(f"http://127.0.0.1:{base + local_rank}/metrics",
                                    r"^llm_train_steps_total\{.*\} 30\.0$", timeout=90)
                assert f'llm_rank="{local_rank}"' in steps_sample(body)[0]
                assert re.search(r"^llm_grad_norm\{", body, re.M)
        finally:
            hold.touch()
            output = finish(process)
        assert "cannot serve Prometheus" not in output, output[-4000:]
        assert {attrs.get("llm.rank") for attrs in receiver.resource_attributes()} == {0, 1}


def test_ddp_example_runs_under_torchrun(tmp_path):
    env = clean_env(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_PORT=str(free_base_port(2)))
    output = finish(torchrun(2, str(ROOT / "examples" / "ddp_train.py"), "--steps", "20", env=env, cwd=tmp_path))
    assert "rank 0: scrape http://127.0.0.1:" in output and "rank 1: scrape http://127.0.0.1:" in output
