"""How many series a training job exports, from the catalog and the Views, before it runs (``otel-llm plan``).

Per rank, a metric has one attribute set per combination of its attributes'
values (:func:`attribute_values`); the Views keep only catalog attributes and
drop disabled signals. On the scrape path an attribute set is one series, a
histogram's is one per bucket plus ``+Inf``, ``_sum`` and ``_count``; each
endpoint adds ``target_info`` and prometheus_client's runtime series. On the
OTLP path an attribute set is one data-point stream, a histogram's included; a
backend that translates OTLP to Prometheus names stores it as the scrape's
series. Every exporting rank has its own series (``llm_rank``), so totals are
per-rank counts times the exporting ranks.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Final

from otel_llm.catalog import (
    ATTR_DEVICE,
    ATTR_FLOPS_METHOD,
    ATTR_LAYER,
    ATTR_PARAM_GROUP,
    ATTR_SIGNAL,
    CATALOG,
    GRAD_SPARSITY,
    GUARD_ACTIONS,
    MEMORY_PEAK_RESERVED,
    TRAIN_CHECKPOINT,
    TRAIN_LEARNING_RATE,
    TRAIN_MFU,
    TRAIN_SKIPPED_STEPS,
    MetricSpec,
)
from otel_llm.config import Config
from otel_llm.ops.promql import series_name

__all__ = ["RUNTIME_SERIES", "SCALE_SHAPES", "Plan", "Row", "Shape", "attribute_values", "plan", "render",
           "scale_table"]

RUNTIME_SERIES: Final = 16
"""prometheus_client's default collectors on each endpoint on Linux CPython: process_* (6), python_gc_* (9),
python_info (1)."""
SCALE_SHAPES: Final = (("8B", 32, 32), ("70B", 80, 64), ("405B", 126, 128))
"""(model, decoder layers, attention heads) of the Llama 3 shapes in the README's "At scale" table."""
SCALE_RANKS: Final = (8, 256, 1024)

_ABSENT_IN_TRAINING: Final = ("kv_cache",)
"""Families that appear only when a KV cache is used (generation, serving), never in a training step."""
_ONLY_ON_FAULTS: Final = (TRAIN_SKIPPED_STEPS, GUARD_ACTIONS)
"""Series that appear only once something went wrong (an update skipped, a guard acting): not in the plan."""
_RUN_DEPENDENT: Final = (TRAIN_MFU, TRAIN_CHECKPOINT, MEMORY_PEAK_RESERVED)
"""Series that depend on the hardware and the script, not the shape: MFU (a known peak FLOP/s), checkpoint
saves (a save), reserved bytes (CUDA). Not in the plan: at most three series more per rank."""


@dataclass(frozen=True)
class Shape:
    """What decides the series count: the model, the job's data-parallel ranks, its optimizer."""

    layers: int
    heads: int
    ranks: int
    lora: bool = False
    param_groups: int = 1

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "ranks", "param_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Row:
    """One metric's count on one rank."""

    spec: MetricSpec
    attribute_sets: int
    scrape: int
    otlp: int


@dataclass(frozen=True)
class Plan:
    """Per-rank rows and the number of ranks that export them."""

    shape: Shape
    rows: tuple[Row, ...]
    exporting_ranks: int
    event_bound: int
    """Most series each event counter (nonfinite, anomaly) can grow to per rank: one per signal it can name."""

    @property
    def scrape_per_rank(self) -> int:
        return sum(row.scrape for row in self.rows) + 1 + RUNTIME_SERIES

    @property
    def otlp_per_rank(self) -> int:
        return sum(row.otlp for row in self.rows)

    @property
    def scrape_total(self) -> int:
        return self.scrape_per_rank * self.exporting_ranks

    @property
    def otlp_total(self) -> int:
        return self.otlp_per_rank * self.exporting_ranks


def attribute_values(spec: MetricSpec, attribute: str, shape: Shape) -> int:
    """How many values ``attribute`` of ``spec`` takes on one rank of a healthy run of ``shape``.

    Raises ValueError for an attribute the plan does not know, so a new one cannot be counted as 1 silently.
    """
    if attribute == ATTR_LAYER:
        return shape.layers
    if attribute == ATTR_DEVICE:
        return 1  # one accelerator (or the CPU) per rank
    if attribute == ATTR_FLOPS_METHOD:
        return 1  # counted, or analytic where counting failed
    if attribute == ATTR_SIGNAL:
        return 0  # event counters: a series appears with the first event of a signal
    if (spec.name, attribute) == (GRAD_SPARSITY, ATTR_PARAM_GROUP):
        return 3 if shape.lora else 1  # all, and lora_a / lora_b with LoRA
    if (spec.name, attribute) == (TRAIN_LEARNING_RATE, ATTR_PARAM_GROUP):
        return shape.param_groups
    raise ValueError(f"otel-llm plan does not know how many values {attribute} of {spec.name} takes")


def _attribute_sets(spec: MetricSpec, shape: Shape) -> int:
    if (spec.family in _ABSENT_IN_TRAINING or spec.name in _ONLY_ON_FAULTS or spec.name in _RUN_DEPENDENT
            or (spec.family == "lora" and not shape.lora)):
        return 0
    sets = 1
    for attribute in spec.attributes:
        sets *= attribute_values(spec, attribute, shape)
    return sets


def plan(shape: Shape, config: Config) -> Plan:
    """The series of a training job of ``shape`` under ``config`` (disabled signals, exporting ranks)."""
    rows = []
    for spec in CATALOG:
        sets = 0 if config.is_disabled(spec.name) else _attribute_sets(spec, shape)
        per_set = len(spec.buckets) + 3 if spec.instrument == "histogram" and spec.buckets is not None else 1
        rows.append(Row(spec, sets, sets * per_set, sets))
    bound = sum(1 for spec in CATALOG if spec.instrument != "counter" and not config.is_disabled(spec.name))
    return Plan(shape, tuple(rows), shape.ranks if config.export_ranks == "all" else 1, bound)


def _n(count: int) -> str:
    return f"{count:,}"


def render(result: Plan, config: Config) -> str:
    """The plan as a table with totals, then what the counts leave out and what reduces them."""
    shape = result.shape
    header = ("series", "sets/rank", "scrape/rank", "OTLP/rank", "scrape total", "OTLP total")
    rows = [(series_name(r.spec), _n(r.attribute_sets), _n(r.scrape), _n(r.otlp),
             _n(r.scrape * result.exporting_ranks), _n(r.otlp * result.exporting_ranks))
            for r in result.rows if r.attribute_sets]
    rows.append(("target_info", "1", "1", "0", _n(result.exporting_ranks), "0"))
    rows.append(("process_*, python_* (prometheus_client)", "-", _n(RUNTIME_SERIES), "0",
                 _n(RUNTIME_SERIES * result.exporting_ranks), "0"))
    rows.append(("total", "", _n(result.scrape_per_rank), _n(result.otlp_per_rank), _n(result.scrape_total),
                 _n(result.otlp_total)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    table = ["  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip()
             for row in (header, *rows)]
    exporting = "all ranks export" if config.export_ranks == "all" else "rank 0 exports"
    title = (f"otel_llm series plan: {shape.layers} layers, {shape.heads} heads, {_n(shape.ranks)} ranks "
             f"({exporting}), {'LoRA' if shape.lora else 'no LoRA'}, {shape.param_groups} param group(s)")
    lines = []
    translated = result.scrape_total - (1 + RUNTIME_SERIES) * result.exporting_ranks
    lines.append(f"OTLP translated to Prometheus names (Collector, VictoriaMetrics, Prometheus 3) is stored as "
                 f"{_n(translated)} series: a histogram stream becomes its buckets + 3 (Prometheus 3 and the "
                 "Collector add a target_info per rank).")
    lines.append(f"Attention entropy: {_n(shape.layers * shape.heads)} observations (layers x heads) per sampled "
                 "step go into the per-layer histograms; heads add no series.")
    lines.append(f"Not counted: llm_kv_cache_* (a KV cache only), and the event counters llm_telemetry_nonfinite_"
                 f"total and llm_anomaly_events_total, which gain a series per signal that goes NaN/Inf or "
                 f"anomalous (at most {result.event_bound} each per rank).")
    if config.export_ranks == "all" and shape.ranks > 1:
        zero = plan(shape, Config(export_ranks="zero", disabled_signals=config.disabled_signals))
        lines.append(f"Reduce: --export-ranks zero (OTEL_LLM_EXPORT_RANKS=zero) exports {_n(zero.scrape_total)} "
                     f"scrape / {_n(zero.otlp_total)} OTLP series, rank 0's only.")
    for family in ("llm.attention.*", "llm.activation.*"):
        fewer = plan(shape, Config(export_ranks=config.export_ranks,
                                   disabled_signals=(*config.disabled_signals, family)))
        if fewer.scrape_total < result.scrape_total:
            lines.append(f"Reduce: disabling {family} (OTEL_LLM_DISABLED_SIGNALS) saves "
                         f"{_n(result.scrape_total - fewer.scrape_total)} scrape / "
                         f"{_n(result.otlp_total - fewer.otlp_total)} OTLP series.")
    lines.append("Sampling (OTEL_LLM_SAMPLING_*) changes how often values change, not how many series there are.")
    notes = [textwrap.fill(line, 110, subsequent_indent="  ") for line in lines]
    return "\n".join([title, "", *table, "", *notes])


def scale_table() -> str:
    """Markdown: series of full-parameter training of the Llama shapes on 8, 256 and 1,024 ranks."""
    rows = ["| model | layers | ranks | scrape series | OTLP streams | scrape, rank 0 only "
            "| per rank (scrape / OTLP) |", "|---|---|---|---|---|---|---|"]
    for model, layers, heads in SCALE_SHAPES:
        for ranks in SCALE_RANKS:
            shape = Shape(layers=layers, heads=heads, ranks=ranks)
            every = plan(shape, Config(export_ranks="all", disabled_signals=()))
            zero = plan(shape, Config(export_ranks="zero", disabled_signals=()))
            rows.append(f"| {model} | {layers} | {_n(ranks)} | {_n(every.scrape_total)} | {_n(every.otlp_total)} "
                        f"| {_n(zero.scrape_total)} | {_n(every.scrape_per_rank)} / {_n(every.otlp_per_rank)} |")
    return "\n".join(rows)
