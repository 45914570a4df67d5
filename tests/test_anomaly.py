"""SAX anomaly detection: the transform against a by-hand reference, and detection quality on synthetic series."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from otel_llm.pipeline.anomaly import AnomalyMonitor, SaxDetector, gaussian_breakpoints

# Lin, Keogh et al. (2003), table of breakpoints
PAPER_BREAKPOINTS = {
    3: [-0.43, 0.43],
    4: [-0.67, 0.0, 0.67],
    8: [-1.15, -0.67, -0.32, 0.0, 0.32, 0.67, 1.15],
}


@pytest.mark.parametrize("alphabet", sorted(PAPER_BREAKPOINTS))
def test_breakpoints_are_the_published_gaussian_ones(alphabet):
    assert np.round(gaussian_breakpoints(alphabet), 2).tolist() == PAPER_BREAKPOINTS[alphabet]


def reference_mindist(residuals: list[float], baseline: int, window: int, segments: int, alphabet: int) -> float:
    """Mean over baseline words of the PAA-to-word MINDIST of z-normalised residuals, written out with loops."""
    base = residuals[:baseline]
    mean = sum(base) / baseline
    std = math.sqrt(sum((v - mean) ** 2 for v in base) / baseline)
    z = [v / std for v in residuals]
    width = window // segments
    cuts = [NormalDist().inv_cdf(i / alphabet) for i in range(1, alphabet)]

    def paa(values: list[float]) -> list[float]:
        return [sum(values[i * width:(i + 1) * width]) / width for i in range(segments)]

    def letter(value: float) -> int:
        return sum(1 for cut in cuts if value > cut)

    recent = paa(z[baseline:])
    total = 0.0
    starts = range(baseline - window + 1)
    for start in starts:
        word = [letter(v) for v in paa(z[start:start + window])]
        squared = 0.0
        for value, symbol in zip(recent, word):
            low = cuts[symbol - 1] if symbol > 0 else -math.inf
            high = cuts[symbol] if symbol < alphabet - 1 else math.inf
            gap = low - value if value < low else value - high if value > high else 0.0
            squared += gap * gap
        total += math.sqrt(window / segments) * math.sqrt(squared)
    return total / len(starts)


def reference_score(history: list[float], steps: list[int], baseline: int, window: int, segments: int,
                    alphabet: int) -> float:
    """The smaller of the score around the baseline mean and around the baseline's least-squares line."""
    mean = sum(history[:baseline]) / baseline
    centre = sum(steps[:baseline]) / baseline
    slope = (sum((t - centre) * (v - mean) for t, v in zip(steps[:baseline], history[:baseline]))
             / sum((t - centre) ** 2 for t in steps[:baseline]))
    flat = [v - mean for v in history]
    trend = [v - mean - slope * (t - centre) for t, v in zip(steps, history)]
    return min(reference_mindist(flat, baseline, window, segments, alphabet),
               reference_mindist(trend, baseline, window, segments, alphabet))


@pytest.mark.parametrize("shape", ["noise", "spike", "shift", "trend", "trend-break"])
def test_score_matches_the_reference(shape):
    rng = np.random.default_rng(7)
    history = rng.normal(3.0, 0.5, size=40)
    steps = list(range(0, 64, 2)) + list(range(64, 64 + 8 * 5, 5))  # the interval grew from 2 to 5
    if shape == "spike":
        history[-3] += 6.0
    elif shape == "shift":
        history[-6:] -= 2.0
    elif shape.startswith("trend"):
        history += 0.05 * np.array(steps)
        if shape == "trend-break":
            history[-8:] -= 0.1 * (np.array(steps[-8:]) - steps[-9])
    detector = SaxDetector(baseline=32, window=8, segments=4, alphabet=6, threshold=1.0)
    for step, value in zip(steps, history):
        detector.update(float(value), step)
    expected = reference_score(history.tolist(), steps, 32, 8, 4, 6)
    assert detector.score() == pytest.approx(expected, rel=1e-9)


def test_a_trend_that_continues_across_a_new_interval_is_not_an_anomaly_and_a_break_in_it_is():
    rng = np.random.default_rng(11)
    steps = list(range(100)) + list(range(100, 300, 10))  # every step, then every 10th
    detector = SaxDetector()
    flags = [step for step in steps if detector.update(10.0 - 0.05 * step + 0.1 * rng.normal(), step)[0]]
    assert flags == []
    broken = SaxDetector()
    flags = [step for step in steps
             if broken.update(10.0 - 0.05 * min(step, 150) + 0.1 * rng.normal(), step)[0]]  # falls, then stalls
    assert flags and 150 <= flags[0] <= 200


def test_no_score_until_the_history_is_full_and_non_finite_values_are_skipped():
    detector = SaxDetector(baseline=16, window=4, segments=2)
    for value in range(19):
        assert detector.update(float(value % 3)) == (False, None)
    assert detector.update(math.nan) == (False, None)
    flagged, score = detector.update(1.0)
    assert not flagged and score is not None


def test_a_lasting_shift_is_one_event_and_the_detector_rearms():
    rng = np.random.default_rng(3)
    series = np.concatenate([rng.normal(0, 1, 200), rng.normal(8, 1, 200), rng.normal(0, 1, 200)])
    detector = SaxDetector()
    flags = [step for step, value in enumerate(series) if detector.update(float(value))[0]]
    assert len(flags) == 2  # up at ~200, down at ~400
    assert 200 <= flags[0] <= 210 and 400 <= flags[1] <= 410


@pytest.mark.parametrize("kwargs", [dict(window=6, segments=4), dict(baseline=4, window=8), dict(threshold=0.0),
                                    dict(alphabet=1)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SaxDetector(**kwargs)


def test_monitor_tracks_series_by_attributes_skips_ignored_and_is_bounded():
    monitor = AnomalyMonitor(baseline=16, window=4, segments=2, ignored=("lr",), max_series=3)
    rng = np.random.default_rng(0)
    flagged = []
    for step in range(60):
        jump = 30.0 if step >= 40 else 0.0
        gauges = {
            "lr": (({}, float(rng.normal()) + jump),),
            "entropy": tuple(({"layer": str(k)}, float(rng.normal()) + (jump if k == 1 else 0.0)) for k in range(4)),
        }
        flagged += monitor.observe(step, gauges)
    assert [(a.signal, dict(a.attributes)) for a in flagged] == [("entropy", {"layer": "1"})]
    assert flagged[0].step in range(40, 44) and flagged[0].score > monitor.threshold


# -- detection quality --------------------------------------------------------------------------------------------
SERIES_LENGTH = 700
ONSETS = (200, 450)
DETECTION_DELAY = 12  # sampled steps after an anomaly (or after a drift's ramp) within which a flag counts


def unit_noise(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "white":
        return rng.normal(size=SERIES_LENGTH)
    shocks = rng.normal(size=SERIES_LENGTH)  # AR(1), phi 0.5, scaled back to unit variance
    values = np.zeros(SERIES_LENGTH)
    for i in range(1, SERIES_LENGTH):
        values[i] = 0.5 * values[i - 1] + shocks[i]
    return values * math.sqrt(1 - 0.25)


def synthetic_set(seed: int) -> list[tuple[str, np.ndarray, list[tuple[int, int]]]]:
    """(kind, series, [(onset, last step a flag may come)]) with the anomaly sizes in noise standard deviations.

    Spikes: one value 8..15 sigma off. Level shifts: 4..8 sigma, lasting. Drifts: a linear ramp to 6..10 sigma
    over 30..60 steps, then holding. Controls: noise only. Each series has its own level and scale.
    """
    rng = np.random.default_rng(seed)
    out = []
    for kind in ("spike", "shift", "drift", "none"):
        for noise in ("white", "ar1"):
            for _ in range(6):
                series, windows = unit_noise(rng, noise), []
                for onset in ONSETS if kind != "none" else ():
                    onset += int(rng.integers(0, 40))
                    sign = float(rng.choice([-1.0, 1.0]))
                    if kind == "spike":
                        series[onset] += sign * rng.uniform(8, 15)
                        windows.append((onset, onset + DETECTION_DELAY))
                    elif kind == "shift":
                        series[onset:] += sign * rng.uniform(4, 8)
                        windows.append((onset, onset + DETECTION_DELAY))
                    else:
                        size, ramp = rng.uniform(6, 10), int(rng.integers(30, 60))
                        series[onset:onset + ramp] += sign * size * np.arange(ramp) / ramp
                        series[onset + ramp:] += sign * size
                        windows.append((onset, onset + ramp + DETECTION_DELAY))
                level, scale = rng.uniform(-5, 5), 10 ** rng.uniform(-2, 1)
                out.append((kind, series * scale + level, windows))
    return out


def test_detector_finds_injected_anomalies_with_precision_and_recall():
    found: dict[str, int] = {}
    injected: dict[str, int] = {}
    false_alarms: dict[str, int] = {}
    for kind, series, windows in synthetic_set(seed=2026):
        detector = SaxDetector()  # the defaults a user gets
        hit = [False] * len(windows)
        for step, value in enumerate(series):
            if detector.update(float(value))[0]:
                matching = [k for k, (start, end) in enumerate(windows) if start <= step <= end]
                if matching:
                    hit[matching[0]] = True
                else:
                    false_alarms[kind] = false_alarms.get(kind, 0) + 1
        found[kind] = found.get(kind, 0) + sum(hit)
        injected[kind] = injected.get(kind, 0) + len(windows)
    true_flags = sum(found.values())
    precision = true_flags / (true_flags + sum(false_alarms.values()))
    recall = true_flags / sum(injected.values())
    table = "\n".join(f"{kind:6} found {found[kind]:2}/{injected[kind]:2}  false alarms {false_alarms.get(kind, 0)}"
                      for kind in injected)
    print(f"\n{table}\nprecision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.9 and recall >= 0.8, table
    assert false_alarms.get("none", 0) <= 2, table
