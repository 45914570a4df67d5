"""Zero-code end to end: unmodified training scripts under ``opentelemetry-instrument``.

Each run is a real subprocess ``<venv>/bin/opentelemetry-instrument <venv>/bin/python
tests/scripts/<script>.py`` with the Prometheus and OTLP readers on. The script
holds after training (``TRAIN_HOLD_FILE``) so the live Prometheus endpoint can be
scraped; dropping the hold file lets it exit, which must push the final OTLP
values. OTLP goes over HTTP into VictoriaMetrics and over gRPC into an in-test
receiver; both must see the same metric names.

Runs are shared between the tests that read them (one subprocess per script and
protocol per module), and started lazily, so ``-k`` selections run only what
they need.
"""

from __future__ import annotations

import math
import pathlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from tests.support.backends import VictoriaMetrics, promtool_check_metrics, require_binary
from tests.support.receivers import GrpcMetricsReceiver
from tests.support.zero_code import (
    INSTRUMENT,
    SAMPLING_INTERVAL,
    TRAIN_STEPS,
    VENV_BIN,
    Scrape,
    TrainProcess,
    scrape,
    scrape_until,
)

pytestmark = pytest.mark.slow

OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0"

# Every metric a plain single-process CPU run makes real, and the series name the
# Prometheus endpoint must give it (histograms: the _bucket series).
EXPECTED: dict[str, str] = {
    "llm.train.loss": "llm_train_loss",
    "llm.train.steps": "llm_train_steps_total",
    "llm.train.tokens": "llm_train_tokens_total",
    "llm.train.step.duration": "llm_train_step_duration_seconds_bucket",
    "llm.train.learning_rate": "llm_train_learning_rate",
    "llm.grad.norm": "llm_grad_norm",
    "llm.grad.norm_decay_rate": "llm_grad_norm_decay_rate",
    "llm.grad.sparsity": "llm_grad_sparsity",
    "llm.param.update_ratio": "llm_param_update_ratio",
    "llm.param.update_variance_ratio": "llm_param_update_variance_ratio",
    "llm.loss.token": "llm_loss_token_bucket",
    "llm.loss.token_skewness": "llm_loss_token_skewness",
    "llm.logits.z_loss": "llm_logits_z_loss",
    "llm.attention.head_entropy": "llm_attention_head_entropy_bucket",
    "llm.attention.head_divergence_max": "llm_attention_head_divergence_max",
    "llm.attention.logit_max": "llm_attention_logit_max",
    "llm.attention.sink_ratio": "llm_attention_sink_ratio",
    "llm.memory.pressure": "llm_memory_pressure",
    "llm.telemetry.sampled_steps": "llm_telemetry_sampled_steps_total",
    "llm.telemetry.sampling_interval": "llm_telemetry_sampling_interval",
    "llm.telemetry.overhead": "llm_telemetry_overhead_seconds_bucket",
}
HISTOGRAMS = ("llm.train.step.duration", "llm.loss.token", "llm.telemetry.overhead", "llm.attention.head_entropy")

SCRIPT_FILES = {"nanogpt": "nanogpt_train.py", "llama": "llama_train.py"}
PROTOCOLS = ("http", "grpc")


def steps_total(result: Scrape) -> float | None:
    values = [value for _, value in result.samples.get("llm_train_steps_total", [])]
    return values[0] if len(values) == 1 else None


def all_series_present(result: Scrape) -> bool:
    return all(result.samples.get(name) for name in EXPECTED.values())


# --- runs, shared between tests ----------------------------------------------------------------


@dataclass
class RunResult:
    script: str
    protocol: str
    prometheus: Scrape
    openmetrics: Scrape
    otlp_names: set[str] = field(repr=False)
    final_steps: float | None
    resources: list[dict[str, Any]] = field(repr=False)
    exit_code: int
    stderr: str = field(repr=False)
    trained_after: float
    exit_after: float
    wall: float


def vm_otel_names(names: set[str]) -> set[str]:
    """VictoriaMetrics without Prometheus naming keeps the dots but splits histograms into
    ``<name>_bucket``/``_count``/``_sum``; fold those back into the OTel name."""
    histograms = {name[: -len("_bucket")] for name in names if name.endswith("_bucket")}
    parts = {h + suffix for h in histograms for suffix in ("_bucket", "_count", "_sum")}
    return (names - parts) | histograms


def grpc_final_steps(receiver: GrpcMetricsReceiver) -> float | None:
    metrics = receiver.metrics("llm.train.steps")
    if not metrics:
        return None
    assert all(m.sum.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
               for m in metrics), "llm.train.steps should be exported as a cumulative sum"
    return float(receiver.points("llm.train.steps")[-1].value)


def _scrape_live(process: TrainProcess) -> tuple[Scrape, Scrape]:
    """The finished-training Prometheus scrape and one OpenMetrics scrape, while it holds."""
    process.wait_trained()
    # Publication is asynchronous; give the exporter thread a moment to catch up with the end.
    prometheus = scrape_until(process, lambda s: all_series_present(s) and steps_total(s) == TRAIN_STEPS,
                              timeout=5.0)
    openmetrics = scrape(process.scrape_url, accept=OPENMETRICS_ACCEPT)
    return prometheus, openmetrics


def execute_run(script: str, protocol: str, workdir: pathlib.Path) -> RunResult:
    started = time.monotonic()
    if protocol == "http":
        with VictoriaMetrics(prometheus_naming=False) as vm:
            process = TrainProcess(SCRIPT_FILES[script], workdir, {
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": vm.otlp_http_endpoint,
            })
            try:
                process.start()
                prometheus, openmetrics = _scrape_live(process)
                code = process.release_and_wait()
            finally:
                process.kill()
            wanted = {n if n not in HISTOGRAMS else n + "_bucket" for n in EXPECTED}
            vm.wait_for(wanted, timeout=10)
            names = vm_otel_names(vm.metric_names())
            final = vm.query('last_over_time({__name__="llm.train.steps"}[10m])')
            final_steps = float(final[0]["value"][1]) if len(final) == 1 else None
            resources: list[dict[str, Any]] = []
    else:
        with GrpcMetricsReceiver() as receiver:
            process = TrainProcess(SCRIPT_FILES[script], workdir, {
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.url,
                "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true",
            })
            try:
                process.start()
                prometheus, openmetrics = _scrape_live(process)
                code = process.release_and_wait()
            finally:
                process.kill()
            # The final push happens before the process exits; nothing more is coming.
            names = receiver.metric_names()
            final_steps = grpc_final_steps(receiver)
            resources = receiver.resource_attributes()
    return RunResult(script, protocol, prometheus, openmetrics, names, final_steps, resources, code,
                     process.stderr_path.read_text(errors="replace"), process.trained_after,
                     process.exit_after, time.monotonic() - started)


class Runs:
    """Each (script, protocol) run happens once per module, when a test first needs it."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self._done: dict[tuple[str, str], RunResult | str] = {}

    def get(self, script: str, protocol: str) -> RunResult:
        if script == "llama":
            pytest.importorskip("transformers")
        key = (script, protocol)
        if key not in self._done:
            workdir = self.root / f"{script}-{protocol}"
            workdir.mkdir()
            try:
                self._done[key] = execute_run(script, protocol, workdir)
            except pytest.fail.Exception as exc:
                self._done[key] = str(exc)
            except Exception as exc:  # noqa: BLE001 - recorded once, reported by every test using it
                self._done[key] = f"{type(exc).__name__}: {exc}"
        result = self._done[key]
        if isinstance(result, str):
            pytest.fail(f"run {script}/{protocol} failed: {result}")
        return result


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    with tempfile.TemporaryDirectory(prefix="otel_llm_zero_code_") as root:
        yield Runs(pathlib.Path(root))


@pytest.fixture(scope="module", autouse=True)
def _instrument_command() -> None:
    if not INSTRUMENT.is_file():
        pytest.fail(f"{INSTRUMENT} is missing: opentelemetry-instrumentation is not installed in this venv")


def _context(run: RunResult) -> str:
    return f"\n--- {run.script}/{run.protocol} stderr tail:\n" + "\n".join(run.stderr.splitlines()[-40:])


# --- Prometheus ----------------------------------------------------------------------------------

SCRIPT_PROTOCOL = [pytest.param(s, p, id=f"{s}-{p}") for s in SCRIPT_FILES for p in PROTOCOLS]


def check_prometheus_series(result: Scrape, context: str) -> None:
    missing = [name for name in EXPECTED.values() if not result.samples.get(name)]
    assert not missing, f"series missing from the scrape: {missing}{context}"
    for name in EXPECTED.values():
        for labels, value in result.samples[name]:
            assert math.isfinite(value), f"{name}{labels} = {value}{context}"
            assert labels.get("llm_rank") == "0", f"{name}{labels} lacks llm_rank=\"0\"{context}"


@pytest.mark.parametrize(("script", "protocol"), SCRIPT_PROTOCOL)
def test_prometheus_serves_every_signal(runs: Runs, script: str, protocol: str) -> None:
    run = runs.get(script, protocol)
    check_prometheus_series(run.prometheus, _context(run))
    interval = run.prometheus.samples["llm_telemetry_sampling_interval"][0][1]
    assert interval == SAMPLING_INTERVAL


@pytest.mark.parametrize(("script", "protocol"), SCRIPT_PROTOCOL)
def test_prometheus_step_count_is_complete_after_training(runs: Runs, script: str, protocol: str) -> None:
    """Once the loop has finished (the script holds), the counter shows every step taken."""
    run = runs.get(script, protocol)
    total = steps_total(run.prometheus)
    assert total == TRAIN_STEPS, (
        f"llm_train_steps_total = {total} after {TRAIN_STEPS} finished steps "
        f"(sampling interval {SAMPLING_INTERVAL}){_context(run)}")


@pytest.mark.parametrize(("script", "protocol"), SCRIPT_PROTOCOL)
def test_promtool_accepts_scrape(runs: Runs, script: str, protocol: str) -> None:
    require_binary("promtool")
    run = runs.get(script, protocol)
    code, output = promtool_check_metrics(run.prometheus.text)
    assert (code, output.strip()) == (0, ""), f"promtool check metrics:\n{output}"


@pytest.mark.parametrize(("script", "protocol"), SCRIPT_PROTOCOL)
def test_openmetrics_negotiated(runs: Runs, script: str, protocol: str) -> None:
    run = runs.get(script, protocol)
    negotiated = run.openmetrics
    assert negotiated.content_type.startswith("application/openmetrics-text"), negotiated.content_type
    assert negotiated.text.endswith("# EOF\n"), negotiated.text[-200:]
    names = {s.name for family in parse_openmetrics(negotiated.text) for s in family.samples}
    # OpenMetrics counters expose <name>_total samples, histograms <name>_bucket: same names as above.
    assert set(EXPECTED.values()) <= names, sorted(set(EXPECTED.values()) - names)


# --- OTLP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("script", "protocol"), SCRIPT_PROTOCOL)
def test_otlp_receives_every_signal(runs: Runs, script: str, protocol: str) -> None:
    run = runs.get(script, protocol)
    assert run.exit_code == 0, f"exit code {run.exit_code}{_context(run)}"
    missing = sorted(set(EXPECTED) - run.otlp_names)
    assert not missing, f"OTLP/{protocol} never delivered {missing}; got {sorted(run.otlp_names)}{_context(run)}"


@pytest.mark.parametrize("script", list(SCRIPT_FILES))
def test_otlp_http_and_grpc_deliver_the_same_names(runs: Runs, script: str) -> None:
    via_http = runs.get(script, "http").otlp_names
    via_grpc = runs.get(script, "grpc").otlp_names
    assert via_http == via_grpc, (f"only over HTTP (VictoriaMetrics): {sorted(via_http - via_grpc)}; "
                                  f"only over gRPC: {sorted(via_grpc - via_http)}")


@pytest.mark.parametrize(("script", "protocol"), SCRIPT_PROTOCOL)
def test_otlp_final_push_at_exit(runs: Runs, script: str, protocol: str) -> None:
    """Exiting pushes the last values (bounded), so the backend ends at the full step count."""
    run = runs.get(script, protocol)
    final = run.final_steps
    assert final == TRAIN_STEPS, f"final llm.train.steps over {protocol}: {final}{_context(run)}"
    # The exit flush is bounded by OTEL_LLM_SHUTDOWN_TIMEOUT (2 s); allow interpreter teardown on top.
    assert run.exit_after < 10.0, f"exit took {run.exit_after:.1f} s after release{_context(run)}"


@pytest.mark.parametrize("script", list(SCRIPT_FILES))
def test_otlp_grpc_resource(runs: Runs, script: str) -> None:
    run = runs.get(script, "grpc")
    assert run.resources, "no ResourceMetrics received"
    for attributes in run.resources:
        assert attributes.get("llm.rank") == 0, attributes
        assert attributes.get("llm.world_size") == 1, attributes
        assert attributes.get("service.name"), attributes


@pytest.mark.parametrize(("script", "protocol"), SCRIPT_PROTOCOL)
def test_no_errors_logged(runs: Runs, script: str, protocol: str) -> None:
    run = runs.get(script, protocol)
    for marker in ("Traceback", "Failed to auto initialize", "otel_llm: probe", "did not finish within"):
        assert marker not in run.stderr, f"{marker!r} in stderr{_context(run)}"


# --- with opentelemetry-distro installed as well ------------------------------------------------

DISTRO_REQUIREMENT = "opentelemetry-distro==0.66b1"


@pytest.fixture(scope="session")
def opentelemetry_distro() -> Iterator[pathlib.Path]:
    """opentelemetry-distro installed into a folder of its own (never into the venv)."""
    with tempfile.TemporaryDirectory(prefix="otel_llm_distro_") as target:
        result = subprocess.run(
            [str(VENV_BIN / "pip"), "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--target", target, DISTRO_REQUIREMENT],
            capture_output=True, text=True, timeout=180, check=False)
        if result.returncode != 0:
            pytest.fail(f"pip could not install {DISTRO_REQUIREMENT}:\n{result.stdout}\n{result.stderr}")
        yield pathlib.Path(target)


def test_with_opentelemetry_distro_first(opentelemetry_distro: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """opentelemetry-distro's distro and configurator are found before otel_llm's: the SDK
    configurator then owns the global provider (and its own Prometheus reader on the same
    port), and otel_llm must still serve its metrics, lint-clean, on that endpoint."""
    require_binary("promtool")
    with GrpcMetricsReceiver() as receiver:
        process = TrainProcess(SCRIPT_FILES["nanogpt"], tmp_path, {
            "PYTHONPATH": str(opentelemetry_distro),
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.url,
            "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true",
        })
        try:
            process.start()
            prometheus, _ = _scrape_live(process)
            code = process.release_and_wait()
        finally:
            process.kill()
        stderr = process.stderr_path.read_text(errors="replace")
        context = process.report()
        assert "Configuration of otel_llm not loaded, configurator already loaded" in stderr, (
            f"opentelemetry-distro's configurator was not the one loaded; the test did not "
            f"exercise the distro-first order{context}")
        check_prometheus_series(prometheus, context)
        promtool_code, output = promtool_check_metrics(prometheus.text)
        assert (promtool_code, output.strip()) == (0, ""), f"promtool check metrics:\n{output}"
        assert code == 0, f"exit code {code}{context}"
        missing = sorted(set(EXPECTED) - receiver.metric_names())
        assert not missing, f"OTLP/gRPC never delivered {missing}{context}"
