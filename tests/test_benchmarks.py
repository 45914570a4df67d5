"""The overhead benchmarks run end to end (their timings are printed for people, never asserted here)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import overhead  # noqa: E402
import probe_cost  # noqa: E402


def _rows(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        numbers = [float(c) for c in cells[1:] if re.fullmatch(r"[-+]?\d+(\.\d+)?", c)]
        if line.startswith("|") and numbers:
            rows[cells[0]] = numbers
    return rows


def test_the_overhead_table_has_every_variant_and_the_whole_run_composition(capsys):
    assert overhead.main(["--workload", "nanogpt", "--blocks", "1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    expected = {name for name in overhead.VARIANTS if not name.startswith("wandb") or overhead._has_wandb()}
    assert expected | {"otel_llm default, whole 2000-step run*"} == set(rows)
    assert rows["bare"][1] == 1.0 and all(values[0] > 0 for values in rows.values())
    sampled = overhead.sampled_steps_of_default_run(overhead.RUN_STEPS)
    assert f"composed: {sampled} sampled steps" in out
    if not overhead._has_wandb():
        assert "wandb is not installed" in out


def test_the_default_run_samples_its_warm_up_then_every_minimum_interval():
    # independent count of the documented schedule: floor(20 (t + 1) / 200) >= 1 in warm-up, then 20,
    # doubling after every 1000 steps past warm-up (quiet losses)
    step, sampled = 0, 0
    while step < 2000:
        sampled += 1
        if step + 1 < 200:
            interval = max(1, 20 * (step + 1) // 200)
        else:
            interval = min(20 * 2 ** ((step - 200) // 1000), 100)
        step += interval
    assert overhead.sampled_steps_of_default_run(2000) == sampled


def test_the_per_probe_table_names_every_family(capsys):
    assert probe_cost.main(["--workload", "nanogpt", "--blocks", "1", "--steps", "2"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(probe_cost.FAMILIES) <= set(rows)
