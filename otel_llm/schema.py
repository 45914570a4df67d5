"""User-declared metrics: the ``OTEL_LLM_SCHEMA`` YAML file and runtime registration.

A schema file lets a team add its own metrics beside the built-in catalog with
the same guarantees (legal names, explicit buckets, bounded attributes)::

    metrics:
      - name: llm.custom.reward
        instrument: gauge          # counter | up_down_counter | histogram | gauge
        unit: ""                   # the default; "1" only on names ending in ratio (see catalog)
        description: Mean reward of the step.
        attributes: [llm.custom.env]
        buckets: [0.1, 0.5, 1.0]   # histograms only

Every rule violation raises :class:`SchemaError` at start-up naming the file,
the entry and the rule, so a broken schema never half-loads. A user metric may
not take a name anything else in the exposition has: the built-in catalog,
``target_info``, the process and platform collectors of prometheus_client's
registry (``process_*``, ``python_*``), or a suffix OpenMetrics gives a family's
samples (``_total``, ``_bucket``, ...): two families of one name fail
``promtool check metrics`` and every OpenMetrics parser.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from otel_llm.catalog import CATALOG, MetricSpec, prometheus_name

__all__ = ["MAX_SCHEMA_BYTES", "RESERVED_FAMILIES", "RESERVED_PREFIXES", "SCHEMA_INSTRUMENTS", "SchemaError",
           "builtin_names", "load_schema", "validate_spec"]

SCHEMA_INSTRUMENTS = ("counter", "up_down_counter", "histogram", "gauge")
"""Instrument kinds a user metric may declare (all recorded synchronously)."""

_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*(\.[a-zA-Z0-9_]+)*$")
_RESERVED_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_info", "_gsum", "_gcount")
RESERVED_FAMILIES = {"target": "target_info (the resource)"}
"""Families the endpoint always serves besides the catalog, with what serves them."""
RESERVED_PREFIXES = {"process_": "the process collector", "python_": "the platform and GC collectors"}
"""Family prefixes of prometheus_client's default collectors, served on the same endpoint."""
MAX_SCHEMA_BYTES = 1 << 20
"""A schema file is read whole: a path naming a huge file must not take the training job's memory."""
_KEYS = {"name", "instrument", "unit", "description", "attributes", "buckets"}


class SchemaError(ValueError):
    """A user metric declaration breaks a rule; the message names file, entry and rule."""


def _fail(source: str, entry: str, rule: str) -> SchemaError:
    return SchemaError(f"otel_llm schema {source}: entry {entry}: {rule}")


def _family(series_name: str) -> str:
    """The OpenMetrics family of a series name: counters drop their ``_total``."""
    return series_name[:-len("_total")] if series_name.endswith("_total") else series_name


def validate_spec(raw: Mapping[str, Any], *, source: str = "<register>", entry: str = "",
                  taken: Mapping[str, str] | None = None) -> MetricSpec:
    """Turn one declaration into a :class:`MetricSpec`, or raise :class:`SchemaError`."""
    if not isinstance(raw, Mapping):
        raise _fail(source, entry or repr(raw), "each entry must be a mapping with at least name and instrument")
    name = raw.get("name")
    label = entry or repr(name)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _fail(source, label, f"unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 255:
        raise _fail(source, label, f"name {name!r} is not a legal OpenMetrics name "
                                   "(letters, digits and underscores, dot-separated, not starting with a digit)")
    if name.replace(".", "_").endswith(_RESERVED_SUFFIXES):
        raise _fail(source, label, f"name {name!r} ends with a suffix OpenMetrics reserves "
                                   f"({', '.join(_RESERVED_SUFFIXES)})")
    instrument = raw.get("instrument")
    if instrument not in SCHEMA_INSTRUMENTS:
        raise _fail(source, label, f"unknown instrument {instrument!r}; use one of {', '.join(SCHEMA_INSTRUMENTS)}")
    unit = raw.get("unit", "")
    if isinstance(unit, int) and not isinstance(unit, bool):
        unit = str(unit)
    if not isinstance(unit, str):
        hint = " (quote it: unit: \"{token}\" - unquoted, YAML reads {token} as a mapping)" \
            if isinstance(unit, Mapping) else ""
        raise _fail(source, label, f"unit must be a string, got {unit!r}{hint}")
    description = str(raw.get("description", "")).strip() or f"User metric {name}."  # HELP must not be empty
    attributes = raw.get("attributes", []) or []
    if not isinstance(attributes, Sequence) or isinstance(attributes, str):
        raise _fail(source, label, "attributes must be a list of attribute keys")
    for key in attributes:
        if not isinstance(key, str) or not _NAME.match(key):
            raise _fail(source, label, f"attribute key {key!r} is not a legal label name")
    buckets = raw.get("buckets")
    if buckets is not None:
        if instrument != "histogram":
            raise _fail(source, label, "buckets are only allowed on histograms")
        if not isinstance(buckets, Sequence) or isinstance(buckets, str) or not buckets:
            raise _fail(source, label, "buckets must be a non-empty list of numbers")
        try:
            values = [float(b) for b in buckets]
        except (TypeError, ValueError):
            raise _fail(source, label, f"buckets must be numbers, got {list(buckets)!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise _fail(source, label, f"buckets must be finite, got {list(buckets)!r}")
        if any(low >= high for low, high in zip(values, values[1:])):
            raise _fail(source, label, f"buckets must be strictly increasing, got {list(buckets)!r}")
        buckets = tuple(values)
    series = prometheus_name(name, unit, instrument)
    stem = series.removesuffix("_total") if instrument == "counter" else series
    if stem.endswith(_RESERVED_SUFFIXES):
        raise _fail(source, label, f"name {name!r} with unit {unit!r} is exported as {series!r}, which ends with a "
                                   f"suffix OpenMetrics reserves ({', '.join(_RESERVED_SUFFIXES)})")
    family = _family(series)
    if family in RESERVED_FAMILIES:
        raise _fail(source, label, f"name {name!r} is exported as family {family!r}, which the endpoint already "
                                   f"serves as {RESERVED_FAMILIES[family]}")
    for prefix, owner in RESERVED_PREFIXES.items():
        if family.startswith(prefix):
            raise _fail(source, label, f"name {name!r} is exported as {series!r}; names starting with {prefix!r} "
                                       f"belong to {owner} on the same endpoint")
    for other, other_prom in (taken or {}).items():
        if name == other or family == _family(other_prom):
            raise _fail(source, label, f"name {name!r} clashes with {other!r} (same Prometheus family)")
    return MetricSpec(name, instrument, unit, description, tuple(attributes), buckets)


def builtin_names() -> dict[str, str]:
    """Catalog names mapped to their Prometheus series names, the names a user metric may not take."""
    return {spec.name: prometheus_name(spec.name, spec.unit, spec.instrument) for spec in CATALOG}


def load_schema(path: str | Path) -> tuple[MetricSpec, ...]:
    """Parse and validate a schema file; raise :class:`SchemaError` on the first broken rule."""
    import yaml

    source = str(path)
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_SCHEMA_BYTES + 1)
    except OSError as exc:
        raise SchemaError(f"otel_llm schema {source}: cannot read the file ({exc.strerror or exc})") from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"otel_llm schema {source}: larger than {MAX_SCHEMA_BYTES} bytes; not a schema file")
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SchemaError(f"otel_llm schema {source}: not UTF-8 text (byte {exc.start}); not a schema file") from None
    except yaml.YAMLError as exc:
        raise SchemaError(f"otel_llm schema {source}: not valid YAML ({exc})") from None
    if document is None:
        return ()
    if not isinstance(document, Mapping) or not isinstance(document.get("metrics", []), list):
        raise SchemaError(f"otel_llm schema {source}: the top level must be a mapping with a 'metrics' list")
    taken = builtin_names()
    specs: list[MetricSpec] = []
    for index, raw in enumerate(document.get("metrics") or []):
        name = raw.get("name") if isinstance(raw, Mapping) else None
        entry = f"#{index} ({name})" if name else f"#{index}"
        spec = validate_spec(raw, source=source, entry=entry, taken=taken)
        taken[spec.name] = prometheus_name(spec.name, spec.unit, spec.instrument)
        specs.append(spec)
    return tuple(specs)
