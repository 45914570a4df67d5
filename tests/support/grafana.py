"""Grafana dashboard queries made runnable: template variables replaced by concrete values."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

__all__ = ["Query", "queries"]

_VARIABLE = re.compile(r"\$(__rate_interval|\w+)")


class Query(NamedTuple):
    """One panel target: the panel it belongs to and its PromQL with variables filled in."""

    panel: dict[str, Any]
    ref: str
    expr: str


def queries(dashboard: dict[str, Any], rate_interval: str = "1m", **variables: str) -> Iterator[Query]:
    """Every target of every panel; ``$x`` becomes ``variables[x]`` (All, i.e. ``.*``, when not given)."""
    values = {"__rate_interval": rate_interval, **variables}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            expr = _VARIABLE.sub(lambda m: values.get(m.group(1), ".*"), target["expr"])
            yield Query(panel, target["refId"], expr)
