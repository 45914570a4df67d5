"""The README tables are the catalog's, and the CLI prints the catalog."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from otel_llm.catalog import CATALOG
from otel_llm.ops.docs import config_table, metric_table, peak_table, signal_guide, threshold_table
from otel_llm.ops.plan import scale_table
from otel_llm.ops.rules import alerts

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("marker, render", [("metric-table", metric_table), ("config-table", config_table),
                                            ("threshold-table", threshold_table), ("signal-guide", signal_guide),
                                            ("scale-table", scale_table), ("peak-table", peak_table)])
def test_readme_tables_match_the_code(marker, render):
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", text, re.S)
    assert match, f"README lacks the {marker} markers"
    assert match.group(1) == render(), f"README {marker} is stale: run `otel-llm docs ...` and paste it"


def test_signal_guide_has_an_entry_per_alert_and_a_line_per_threshold():
    guide = signal_guide()
    names = {alert.name for alert in alerts()}
    assert guide.count("#### ") == len(names) and all(f"(alert `{name}`)" in guide for name in names)
    thresholds = [t for spec in CATALOG for t in spec.thresholds]
    assert sum(guide.count(f"- **{severity}**: ") for severity in ("warning", "critical")) == len(thresholds)
    assert "- **What to do**: Device memory is nearly full" in guide
    assert run_cli("docs", "guide") == guide + "\n"


def test_readme_documents_every_environment_variable():
    import otel_llm.environment_variables as env

    text = README.read_text(encoding="utf-8")
    for name in env.__all__:
        assert f"`{name}`" in text, name


def run_cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "otel_llm.cli", *args], capture_output=True, text=True,
                            check=True, timeout=60)
    return result.stdout


def test_catalog_json_lists_every_metric_with_the_contract_keys():
    entries = json.loads(run_cli("catalog", "--format", "json"))
    assert [e["name"] for e in entries] == [s.name for s in CATALOG]
    for entry in entries:
        assert set(entry) == {"name", "instrument", "unit", "description", "attributes", "buckets"}
    loss_token = next(e for e in entries if e["name"] == "llm.loss.token")
    assert loss_token["instrument"] == "histogram"
    assert loss_token["buckets"] == [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16]


def test_catalog_table_has_one_row_per_metric():
    lines = run_cli("catalog").splitlines()
    assert lines[0].split() == ["name", "instrument", "unit", "attributes", "buckets"]
    assert [line.split()[0] for line in lines[1:]] == [s.name for s in CATALOG]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["llm.train.step.duration"][:2] == ["histogram", "s"]
    assert rows["llm.grad.sparsity"][:3] == ["observable_gauge", "-", "llm.param.group"]
    assert rows["llm.kv_cache.hit_ratio"][:2] == ["observable_gauge", "1"]
