"""Configuration: one dataclass field per option, filled from the environment.

Explicit arguments win, then environment variables, then defaults. Explicit
values are validated in ``__post_init__`` and raise :class:`ValueError`; a bad
environment value is logged once and replaced by the default, because a typo in
a job spec must not stop a training run.

Each option's name, default and help text live once, in its field here;
:mod:`otel_llm.environment_variables` only names the variables.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from opentelemetry.environment_variables import OTEL_LOGS_EXPORTER, OTEL_METRICS_EXPORTER
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_PROMETHEUS_HOST,
    OTEL_EXPORTER_PROMETHEUS_PORT,
    OTEL_METRIC_EXPORT_INTERVAL,
    OTEL_METRIC_EXPORT_TIMEOUT,
    OTEL_SERVICE_NAME,
)

from otel_llm import environment_variables as env
from otel_llm.catalog import CATALOG
from otel_llm.runtime.log_once import LogOnce

__all__ = ["Config", "EXPORTERS", "GUARDS", "MAX_PORT", "MAX_SECONDS", "Source", "environment_value"]

_logger = logging.getLogger(__name__)
_bad_environment = LogOnce()
"""Each bad (variable, value) is reported once, however many Configs read it."""

EXPORTERS = ("prometheus", "otlp")
"""Readers ``OTEL_METRICS_EXPORTER`` can select (``none`` selects neither)."""

GUARDS = ("skip_nonfinite", "lr_backoff", "clip_on_rebound")
"""The guards ``OTEL_LLM_GUARDS`` can enable (see :mod:`otel_llm.guards`)."""

MAX_PORT = 65535
MAX_SECONDS = 3600.0
"""Upper bound of every timeout: longer waits overflow neither threads nor sockets, and no shutdown needs an hour."""
MAX_STEPS = 10**9
MAX_INTERVAL = 10**6
MAX_ANOMALY_HISTORY = 1024
"""Bound of the anomaly baseline and window: the detector's 1024 series then hold at most 2 x 2048 values each."""

Source = Literal["explicit", "environment", "default"]
"""Where a :class:`Config` value came from: an argument, its environment variable, or the built-in default."""


def _shown(raw: object) -> str:
    """``raw`` for a log line or an error, cut short: a megabyte of job-spec value must not become a log line."""
    try:
        text = repr(raw)
    except ValueError:  # an int past Python's digit limit for str()
        return "an integer too long to print"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _int_value(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {_shown(value)}")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:  # also a numeral too long for int(): it is past every bound anyway
            raise ValueError(f"{name} must be an integer, got {_shown(value)}") from None
    if isinstance(value, int):
        return value
    raise ValueError(f"{name} must be an integer, got {_shown(value)}")


def _at_least(minimum: int, at_most: int) -> Callable[[Any, str], int]:
    """An integer in [minimum, at_most]: the upper bound keeps a typo like 1e23 from hanging or exhausting memory."""
    def parse(value: Any, name: str) -> int:
        number = _int_value(value, name)
        if number < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {number}")
        if number > at_most:
            raise ValueError(f"{name} must be <= {at_most}, got {_shown(number)}")
        return number

    return parse


def _port(value: Any, name: str) -> int:
    number = _int_value(value, name)
    if not 0 <= number <= MAX_PORT:
        raise ValueError(f"{name} must be a TCP port 0..{MAX_PORT}, got {_shown(number)}")
    return number


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {_shown(value)}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {_shown(value)}")
    return number


def _at_most(limit: float, parse: Callable[[Any, str], float]) -> Callable[[Any, str], float]:
    """``parse`` with an upper bound (timeouts past it overflow the thread and socket waits)."""
    def bounded(value: Any, name: str) -> float:
        number = parse(value, name)
        if number > limit:
            raise ValueError(f"{name} must be <= {limit:g}, got {_shown(value)}")
        return number

    return bounded


def _non_negative_float(value: Any, name: str) -> float:
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number >= 0:
            return number
    raise ValueError(f"{name} must be a finite number >= 0, got {_shown(value)}")


def _optional_positive_float(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _positive_float(value, name)
def _finite_float(value: Any, name: str) -> float:
    """Any finite number, negative included (a decay-rate threshold)."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    raise ValueError(f"{name} must be a finite number, got {_shown(value)}")


def _fraction(value: Any, name: str) -> float:
    number = _positive_float(value, name)
    if number > 1:
        raise ValueError(f"{name} must be in (0, 1], got {_shown(value)}")
    return number


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {_shown(value)}")


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def parse(value: Any, name: str) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {_shown(value)}")
        return text

    return parse


def _items(value: Any) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, Iterable):
        return [str(item).strip() for item in value if str(item).strip()]
    raise ValueError(f"expected a comma-separated string or a list, got {_shown(value)}")


def _signals(value: Any, name: str) -> tuple[str, ...]:
    known = [spec.name for spec in CATALOG]
    items = _items(value)
    for item in items:
        if not fnmatch.filter(known, item):
            raise ValueError(f"{name}: {item!r} matches no catalog signal (see `otel-llm catalog`)")
    return tuple(items)


def _guards(value: Any, name: str) -> tuple[str, ...]:
    items = [item.lower() for item in _items(value)]
    if items == ["none"]:
        return ()
    unknown = [item for item in items if item not in GUARDS]
    if unknown:
        raise ValueError(f"{name} must be a comma list of {', '.join(GUARDS)} (or none), got {_shown(value)}")
    return tuple(dict.fromkeys(items))


def _exporters(value: Any, name: str) -> tuple[str, ...]:
    items = [item.lower() for item in _items(value)]
    if items == ["none"] or (not items and not isinstance(value, str)):
        return ()
    unknown = [item for item in items if item not in EXPORTERS]
    if unknown or not items:
        raise ValueError(f"{name} must be a comma list of {', '.join(EXPORTERS)} or 'none', got {_shown(value)}")
    return tuple(dict.fromkeys(items))


def _log_exporters(value: Any, name: str) -> tuple[str, ...]:
    items = [item.lower() for item in _items(value)]
    if not items or items == ["none"]:
        return ()
    known = {entry.name for entry in entry_points(group="opentelemetry_logs_exporter")}
    unknown = [item for item in items if item not in known]
    if unknown:
        raise ValueError(f"{name}: {', '.join(unknown)} names no installed logs exporter "
                         f"(installed: {', '.join(sorted(known))}, or none)")
    return tuple(dict.fromkeys(items))


def _optional_path(value: Any, name: str) -> str | None:
    if value is None or str(value).strip() == "":
        return None
    return str(value)


def _text(value: Any, name: str) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError(f"{name} must not be empty")
    return text


_HOST_NAME = re.compile(r"^[A-Za-z0-9._:%-]{1,253}$")


def _host(value: Any, name: str) -> str:
    """A host name or IP address to bind; ``[::1]`` is taken as ``::1`` (brackets belong in URLs only)."""
    text = _text(value, name)
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not _HOST_NAME.match(text):
        raise ValueError(f"{name} must be a host name or IP address, got {_shown(value)}")
    return text


def environment_value(variable: str, parse: Callable[[Any, str], Any], default: Any) -> tuple[Any, Source]:
    """``variable`` parsed, or ``default`` when it is unset or bad; a bad value is logged once.

    The one way otel_llm reads a variable, its own or a standard one: the line
    names the variable, the value and what is used instead, because a typo in a
    job spec must not stop a training run.
    """
    raw = os.environ.get(variable)
    if raw is None or raw.strip() == "":
        return default, "default"
    try:
        return parse(raw, variable), "environment"
    except ValueError as exc:
        _bad_environment(_logger, logging.WARNING, (variable, raw),
                         "otel_llm: ignoring %s=%s (%s); using %r instead", variable, _shown(raw), exc, default)
        return default, "default"


@dataclass(frozen=True)
class _Filled:
    """A value a field's default factory supplied, tagged with its source so no later check has to guess it."""

    value: Any
    source: Source


def _option(env_var: str, parse: Callable[[Any, str], Any], default: Any, help: str) -> Any:
    """A dataclass field whose default comes from ``env_var`` when that is set and valid."""

    def from_env() -> _Filled:
        return _Filled(*environment_value(env_var, parse, default))

    return field(default_factory=from_env, metadata={"env": env_var, "parse": parse,
                                                     "default": default, "help": help})


@dataclass(frozen=True)
class Config:
    """All otel_llm options. Unset fields come from the environment variable named in each field.

    :meth:`source` tells where each value came from. ``dataclasses.replace``
    passes every field, so all values of its result are explicit.
    """

    if TYPE_CHECKING:  # set in __post_init__, not a field: equality and repr leave it out
        _sources: ClassVar[dict[str, Source]]

    sampling: str = _option(
        env.OTEL_LLM_SAMPLING, _choice("adaptive", "fixed"), "adaptive",
        "Sampling policy: `adaptive` (see \"Adaptive sampling\") or `fixed` (every `sampling_interval` steps).")
    sampling_interval: int = _option(
        env.OTEL_LLM_SAMPLING_INTERVAL, _at_least(1, MAX_INTERVAL), 10,
        "Fixed policy: compute the expensive signals every N optimizer steps.")
    sampling_warmup: int = _option(
        env.OTEL_LLM_SAMPLING_WARMUP, _at_least(0, MAX_STEPS), 200,
        "Adaptive: warm-up steps: every step for the first 2N/`sampling_min_interval`, then an interval "
        "growing linearly to `sampling_min_interval`.")
    sampling_min_interval: int = _option(
        env.OTEL_LLM_SAMPLING_MIN_INTERVAL, _at_least(1, MAX_INTERVAL), 20,
        "Adaptive: interval after warm-up and right after a loss spike, non-finite value or anomaly.")
    sampling_max_interval: int = _option(
        env.OTEL_LLM_SAMPLING_MAX_INTERVAL, _at_least(1, MAX_INTERVAL), 100,
        "Adaptive: the interval never exceeds this.")
    sampling_growth_steps: int = _option(
        env.OTEL_LLM_SAMPLING_GROWTH_STEPS, _at_least(1, MAX_STEPS), 1000,
        "Adaptive: the interval doubles after every N steps without trouble.")
    sampling_loss_window: int = _option(
        env.OTEL_LLM_SAMPLING_LOSS_WINDOW, _at_least(2, 10_000), 20,
        "Adaptive: sampled losses behind the spike and plateau tests.")
    sampling_spike_sigma: float = _option(
        env.OTEL_LLM_SAMPLING_SPIKE_SIGMA, _positive_float, 4.0,
        "Adaptive: a loss this many standard deviations (at least 1% of the mean) above the window mean "
        "is a spike.")
    sampling_plateau_tolerance: float = _option(
        env.OTEL_LLM_SAMPLING_PLATEAU_TOLERANCE, _non_negative_float, 0.01,
        "Adaptive: a full window whose std is below this fraction of its mean is a plateau (interval x2).")
    sampling_memory_limit: float = _option(
        env.OTEL_LLM_SAMPLING_MEMORY_LIMIT, _fraction, 0.85,
        "Adaptive: `llm.memory.pressure` above this doubles the interval.")
    anomaly_detection: bool = _option(
        env.OTEL_LLM_ANOMALY_DETECTION, _flag, True,
        "Run the anomaly detector on the gauge signals (`llm.anomaly.events`, one log record per event).")
    anomaly_baseline: int = _option(
        env.OTEL_LLM_ANOMALY_BASELINE, _at_least(2, MAX_ANOMALY_HISTORY), 64,
        "Anomaly: sampled values per signal in the baseline.")
    anomaly_window: int = _option(
        env.OTEL_LLM_ANOMALY_WINDOW, _at_least(1, MAX_ANOMALY_HISTORY), 8,
        "Anomaly: sampled values in the recent window and behind each jump forecast (at most the baseline).")
    anomaly_segments: int = _option(
        env.OTEL_LLM_ANOMALY_SEGMENTS, _at_least(1, MAX_ANOMALY_HISTORY), 8,
        "Anomaly: PAA segments per window (must divide the window).")
    anomaly_alphabet: int = _option(
        env.OTEL_LLM_ANOMALY_ALPHABET, _at_least(2, 256), 8,
        "Anomaly: SAX alphabet size (Gaussian breakpoints).")
    anomaly_threshold: float = _option(
        env.OTEL_LLM_ANOMALY_THRESHOLD, _positive_float, 6.5,
        "Anomaly: a score (SAX distance or jump, see \"Anomaly detection\") above this flags the series.")
    guards: tuple[str, ...] = _option(
        env.OTEL_LLM_GUARDS, _guards, (),
        "Guards that act on training (comma list of `skip_nonfinite`, `lr_backoff`, `clip_on_rebound`; see "
        "\"Guards\"); none by default.")
    guard_lr_backoff_threshold: float = _option(
        env.OTEL_LLM_GUARD_LR_BACKOFF_THRESHOLD, _finite_float, 0.8,
        "lr_backoff: a sampled `llm.grad.norm_decay_rate` above this counts towards a backoff.")
    guard_lr_backoff_patience: int = _option(
        env.OTEL_LLM_GUARD_LR_BACKOFF_PATIENCE, _at_least(1, MAX_STEPS), 3,
        "lr_backoff: consecutive sampled steps above the threshold that trigger it (K).")
    guard_lr_backoff_factor: float = _option(
        env.OTEL_LLM_GUARD_LR_BACKOFF_FACTOR, _fraction, 0.95,
        "lr_backoff: every param group's learning rate (and its scheduler's base rate) is multiplied by this.")
    guard_lr_backoff_cooldown: int = _option(
        env.OTEL_LLM_GUARD_LR_BACKOFF_COOLDOWN, _at_least(0, MAX_STEPS), 50,
        "lr_backoff: optimizer steps after a backoff during which sampled steps are not counted.")
    guard_lr_backoff_floor: float = _option(
        env.OTEL_LLM_GUARD_LR_BACKOFF_FLOOR, _fraction, 0.1,
        "lr_backoff: the product of all backoffs never goes below this fraction of the rate.")
    guard_clip_threshold: float = _option(
        env.OTEL_LLM_GUARD_CLIP_THRESHOLD, _finite_float, -0.1,
        "clip_on_rebound: a sampled `llm.grad.norm_decay_rate` below this counts towards clipping.")
    guard_clip_patience: int = _option(
        env.OTEL_LLM_GUARD_CLIP_PATIENCE, _at_least(1, MAX_STEPS), 3,
        "clip_on_rebound: consecutive sampled steps below the threshold that trigger it (K).")
    guard_clip_steps: int = _option(
        env.OTEL_LLM_GUARD_CLIP_STEPS, _at_least(1, MAX_STEPS), 100,
        "clip_on_rebound: optimizer steps clipped after a trigger (M).")
    guard_clip_max_norm: float = _option(
        env.OTEL_LLM_GUARD_CLIP_MAX_NORM, _positive_float, 1.0,
        "clip_on_rebound: the max L2 norm the gradients are clipped to.")
    disabled_signals: tuple[str, ...] = _option(
        env.OTEL_LLM_DISABLED_SIGNALS, _signals, (),
        "Catalog signals (comma list, fnmatch patterns) neither computed nor exported.")
    schema_path: str | None = _option(
        env.OTEL_LLM_SCHEMA, _optional_path, None,
        "YAML file declaring extra user metrics for `record()`.")
    grad_sparsity_threshold: float = _option(
        env.OTEL_LLM_GRAD_SPARSITY_THRESHOLD, _non_negative_float, 1e-5,
        "abs(grad) at or below this counts as zero in `llm.grad.sparsity`.")
    token_loss_samples: int = _option(
        env.OTEL_LLM_TOKEN_LOSS_SAMPLES, _at_least(1, 512), 128,
        "Most per-token losses recorded into `llm.loss.token` per sampled step (each is one histogram record on "
        "the exporter thread, ~5 us of CPU; up to 512).")
    update_sample_size: int = _option(
        env.OTEL_LLM_UPDATE_SAMPLE_SIZE, _at_least(1, 2**22), 65536,
        "Coordinates in the shared sample behind `llm.param.update_variance_ratio`.")
    update_sample_seed: int = _option(
        env.OTEL_LLM_UPDATE_SAMPLE_SEED, _at_least(0, 2**64 - 1), 0,
        "Seed of that coordinate sample (equal on every rank).")
    step_memory_fraction: float = _option(
        env.OTEL_LLM_STEP_MEMORY_FRACTION, _fraction, 0.1,
        "Extra memory a sampled step's gradient and update statistics may hold, as a fraction of the trainable "
        "parameters' bytes (plus `step_memory_floor_mib`); past it the update ratio is estimated (see "
        "\"Memory of a sampled step\").")
    step_memory_floor_mib: int = _option(
        env.OTEL_LLM_STEP_MEMORY_FLOOR_MIB, _at_least(0, 2**20), 64,
        "MiB added to that budget: models whose parameter copy fits it get the exact update ratio.")
    attention_queries: int = _option(
        env.OTEL_LLM_ATTENTION_QUERIES, _at_least(1, 65_536), 64,
        "Query positions per attention call behind the attention signals (the last is always one).")
    layers_path: str | None = _option(
        env.OTEL_LLM_LAYERS_PATH, _optional_path, None,
        "Dotted path of the decoder layer ModuleList (e.g. `model.layers`); found automatically if unset.")
    mlp_output_path: str | None = _option(
        env.OTEL_LLM_MLP_OUTPUT_PATH, _optional_path, None,
        "Path of the MLP output projection inside each decoder layer (e.g. `mlp.down_proj`); found automatically "
        "if unset.")
    activation_sparsity_threshold: float = _option(
        env.OTEL_LLM_ACTIVATION_SPARSITY_THRESHOLD, _non_negative_float, 1e-3,
        "abs(activation) at or below this counts as zero in `llm.activation.sparsity`.")
    activation_outlier_threshold: float = _option(
        env.OTEL_LLM_ACTIVATION_OUTLIER_THRESHOLD, _positive_float, 6.0,
        "A hidden dimension whose max abs reaches this is an outlier in `llm.activation.outlier_ratio`.")
    peak_flops: float | None = _option(
        env.OTEL_LLM_PEAK_FLOPS, _optional_positive_float, None,
        "Peak FLOP/s of one device for `llm.train.mfu` (e.g. `989e12`); unset: the accelerator table (see "
        "\"Throughput and goodput\"), and no MFU on devices it does not list.")
    shutdown_timeout: float = _option(
        env.OTEL_LLM_SHUTDOWN_TIMEOUT, _at_most(MAX_SECONDS, _positive_float), 2.0,
        "Upper bound in seconds on `shutdown()` and flushes.")
    exporters: tuple[str, ...] = _option(
        OTEL_METRICS_EXPORTER, _exporters, EXPORTERS,
        "Readers: `prometheus`, `otlp`, both (comma list) or `none`.")
    logs_exporters: tuple[str, ...] = _option(
        OTEL_LOGS_EXPORTER, _log_exporters, (),
        "Exporters of the anomaly log records (`otlp`, `otlp_proto_http`, `console`, ... comma list); unset or "
        "`none`: no records, as the SDK defines it.")
    prometheus_host: str = _option(
        OTEL_EXPORTER_PROMETHEUS_HOST, _host, "127.0.0.1",
        "Address the Prometheus endpoint binds (loopback unless set).")
    prometheus_port: int = _option(
        OTEL_EXPORTER_PROMETHEUS_PORT, _port, 9464,
        "Base port of the Prometheus endpoint; local rank k serves on base + k.")
    export_interval_ms: int = _option(
        OTEL_METRIC_EXPORT_INTERVAL, _at_least(1, 86_400_000), 60000,
        "Milliseconds between OTLP pushes.")
    export_timeout_ms: int = _option(
        OTEL_METRIC_EXPORT_TIMEOUT, _at_least(1, 3_600_000), 30000,
        "Milliseconds one OTLP push (collection and export) may take.")
    service_name: str = _option(
        OTEL_SERVICE_NAME, _text, "otel-llm-training",
        "`service.name` resource attribute.")
    export_ranks: str = _option(
        env.OTEL_LLM_EXPORT_RANKS, _choice("all", "zero"), "all",
        "Which data-parallel ranks export: `all`, or `zero` (rank 0 only; the others still compute).")

    def __post_init__(self) -> None:
        sources: dict[str, Source] = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, _Filled):
                value, sources[spec.name] = value.value, value.source
            else:
                value, sources[spec.name] = spec.metadata["parse"](value, spec.name), "explicit"
            object.__setattr__(self, spec.name, value)
        # not a field, so ==, hash and repr ignore it
        object.__setattr__(self, "_sources", sources)
        self._require(("sampling_min_interval", "sampling_max_interval"),
                      self.sampling_max_interval >= self.sampling_min_interval, "the maximum must be >= the minimum")
        self._require(("anomaly_window", "anomaly_baseline"), self.anomaly_window <= self.anomaly_baseline,
                      "the window must not be longer than the baseline")
        self._require(("anomaly_segments", "anomaly_window"), self.anomaly_window % self.anomaly_segments == 0,
                      "the segments must divide the window")

    def _require(self, names: tuple[str, ...], holds: bool, rule: str) -> None:
        """Cross-field rule: any explicit value raises; otherwise the environment's values warn and fall back."""
        if holds:
            return
        specs = [spec for spec in fields(self) if spec.name in names]
        described = ", ".join(f"{spec.name}={getattr(self, spec.name)!r}" for spec in specs)
        if any(self._sources[spec.name] == "explicit" for spec in specs):
            raise ValueError(f"{described}: {rule}")
        from_env = [spec.metadata["env"] for spec in specs if self._sources[spec.name] == "environment"]
        _logger.warning("otel_llm: ignoring %s (%s: %s); using the defaults", ", ".join(from_env), described, rule)
        for spec in specs:
            object.__setattr__(self, spec.name, spec.metadata["default"])
            self._sources[spec.name] = "default"

    def source(self, name: str) -> Source:
        """Where field ``name``'s value came from, e.g. to tell a job-spec setting from one in code."""
        return self._sources[name]

    def is_disabled(self, name: str) -> bool:
        """True when ``name`` matches one of :attr:`disabled_signals`."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.disabled_signals)


def options() -> list[tuple[str, str, Any, str]]:
    """(field, environment variable, default, help) for every option, for docs."""
    return [(spec.name, spec.metadata["env"], spec.metadata["default"], spec.metadata["help"])
            for spec in fields(Config)]
