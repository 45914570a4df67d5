"""Scrape otel_llm's Prometheus endpoint: raw text (``fetch``, ``series``, ``sample``) or comparable samples."""

from __future__ import annotations

import math
import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Series = tuple[str, frozenset[tuple[str, str]]]

TIMING_SERIES = ("llm_train_step_duration_seconds", "llm_telemetry_overhead_seconds",
                 "llm_train_input_wait_duration_seconds", "llm_train_compute_duration_seconds",
                 "llm_train_checkpoint_duration_seconds")
"""Histograms of wall time: only their _count is the same in two runs of the same training."""
RANK_LABELS = ("llm_rank", "llm_world_size")
"""Labels every series carries."""
HOST_DEPENDENT = ("llm_memory_pressure", "llm_memory_peak_allocated_bytes", "llm_memory_peak_reserved_bytes",
                  "llm_train_goodput", "llm_train_mfu", "llm_train_last_step_timestamp_seconds",
                  "llm_train_step_slowest_seconds", "llm_train_step_fastest_seconds", "llm_train_step_skew_ratio")
"""Memory of the process and gauges of wall time: they differ between two runs in one process."""


def scrape(url: str) -> dict[Series, float]:
    """Every ``llm_*`` sample of one scrape, keyed by sample name and labels (less the constant scope labels)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("llm_"):
                labels = {k: v for k, v in sample.labels.items() if not k.startswith("otel_scope_")}
                samples[(sample.name, frozenset(labels.items()))] = sample.value
    return samples


def deterministic(samples: dict[Series, float]) -> dict[Series, float]:
    """The samples two runs of the same training must agree on: all but wall times and RSS."""
    kept = {}
    for (name, labels), value in samples.items():
        if name in HOST_DEPENDENT or (name.startswith(TIMING_SERIES) and not name.endswith("_count")):
            continue
        kept[(name, labels)] = value
    return kept


def mismatches(actual: dict[Series, float], expected: dict[Series, float], rel: float = 1e-5) -> list[str]:
    """Series missing on either side or with different values, as readable lines (empty when equal)."""
    lines = [f"missing {name}{dict(labels)}" for name, labels in expected.keys() - actual.keys()]
    lines += [f"unexpected {name}{dict(labels)}" for name, labels in actual.keys() - expected.keys()]
    for key in expected.keys() & actual.keys():
        a, e = actual[key], expected[key]
        if not (a == e or math.isclose(a, e, rel_tol=rel, abs_tol=1e-9)):
            lines.append(f"{key[0]}{dict(key[1])}: {a!r} != {e!r}")
    return sorted(lines)


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    """The one sample ``name`` with exactly ``labels`` besides the rank labels every series carries."""
    found = [v for (n, ls), v in samples.items()
             if n == name and {k: x for k, x in ls if k not in RANK_LABELS} == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def fetch(url: str, accept: str | None = None) -> tuple[str, str]:
    """GET ``url``; (Content-Type, body)."""
    headers = {"Accept": accept} if accept else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
        assert response.status == 200
        return response.headers["Content-Type"], response.read().decode("utf-8")


_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def series(body: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line of a text exposition."""
    out = []
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        name, _, labels = key.partition("{")
        out.append((name, dict(_LABEL.findall(labels)), float(value)))
    return out


def sample(body: str, name: str, **labels: str) -> float:
    matches = [value for n, lbls, value in series(body)
               if n == name and all(lbls.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return matches[0]
