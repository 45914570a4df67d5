"""Anomaly detection: both halves of the score against by-hand references, the catalog profiles, non-finite
values, and detection quality on synthetic series."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from otel_llm import Config
from otel_llm.catalog import CATALOG, AnomalyProfile, by_name
from otel_llm.pipeline.anomaly import GENERIC, AnomalyMonitor, SaxDetector, catalog_profiles, make_monitor
from otel_llm.pipeline.sax import gaussian_breakpoints

# Lin, Keogh et al. (2003), table of breakpoints
PAPER_BREAKPOINTS = {
    3: [-0.43, 0.43],
    4: [-0.67, 0.0, 0.67],
    8: [-1.15, -0.67, -0.32, 0.0, 0.32, 0.67, 1.15],
}


@pytest.mark.parametrize("alphabet", sorted(PAPER_BREAKPOINTS))
def test_breakpoints_are_the_published_gaussian_ones(alphabet):
    assert np.round(gaussian_breakpoints(alphabet), 2).tolist() == PAPER_BREAKPOINTS[alphabet]


def reference_mindist(residuals: list[float], baseline: int, window: int, segments: int, alphabet: int,
                      floor: float) -> float:
    """Mean over baseline words of the PAA-to-word MINDIST of residuals z-normalised by max(std, floor), by loops."""
    base = residuals[:baseline]
    mean = sum(base) / baseline
    std = max(math.sqrt(sum((v - mean) ** 2 for v in base) / baseline), floor)
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


def residuals_from_line(history: list[float], axis: list[float], baseline: int) -> list[float]:
    """Residuals from the least-squares line of the baseline's values over ``axis``."""
    mean = sum(history[:baseline]) / baseline
    centre = sum(axis[:baseline]) / baseline
    slope = (sum((t - centre) * (v - mean) for t, v in zip(axis[:baseline], history[:baseline]))
             / sum((t - centre) ** 2 for t in axis[:baseline]))
    return [v - mean - slope * (t - centre) for t, v in zip(axis, history)]


def reference_shape(history: list[float], steps: list[int], baseline: int, window: int, segments: int,
                    alphabet: int, floor: float = 0.0) -> float:
    """The smallest distance around the baseline mean, its line over steps and its line over log(1 + step)."""
    mean = sum(history[:baseline]) / baseline
    explained = [[v - mean for v in history], residuals_from_line(history, [float(t) for t in steps], baseline),
                 residuals_from_line(history, [math.log(1 + t) for t in steps], baseline)]
    return min(reference_mindist(r, baseline, window, segments, alphabet, floor) for r in explained)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def mad_sigma(values: list[float]) -> float:
    centre = median(values)
    return 1.4826 * median([abs(v - centre) for v in values])


def line_at(values: list[float], axis: list[float], at: float) -> float:
    """The least-squares line of ``values`` over ``axis``, evaluated at ``at``."""
    mean, centre = sum(values) / len(values), sum(axis) / len(axis)
    slope = sum((t - centre) * (v - mean) for t, v in zip(axis, values)) / sum((t - centre) ** 2 for t in axis)
    return mean + slope * (at - centre)


def reference_jump(history: list[float], steps: list[int], window: int, kept: int, floor: float) -> float | None:
    """The last value's error against the line through the ``window`` values before it, over the spread of the
    ``kept`` errors before it: the larger MAD of all of them and of the last ``window`` made over at least the
    current interval; None with fewer than ``window`` such errors."""
    errors = [(steps[i] - steps[i - 1],
               history[i] - line_at(history[i - window:i], [float(t) for t in steps[i - window:i]], steps[i]))
              for i in range(window, len(history))]
    *earlier, (interval, last) = errors
    earlier = earlier[-kept:]
    matched = [e for gap, e in earlier if gap >= interval]
    if len(matched) < window:
        return None
    spread = max(mad_sigma([e for _, e in earlier]), mad_sigma(matched[-window:]), floor)
    return abs(last) / spread


def series_with_new_interval(shape: str) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(7)
    steps = list(range(0, 64, 2)) + list(range(64, 64 + 14 * 5, 5))  # the interval grew from 2 to 5
    history = rng.normal(3.0, 0.5, size=len(steps))
    if shape == "spike":
        history[-3] += 6.0
    elif shape == "shift":
        history[-6:] -= 2.0
    elif shape == "jump":
        history[-1] += 4.0
    elif shape.startswith("trend"):
        history += 0.05 * np.array(steps)
        if shape == "trend-break":
            history[-8:] -= 0.1 * (np.array(steps[-8:]) - steps[-9])
    return history, steps


@pytest.mark.parametrize("floor", [0.0, 1.5])
@pytest.mark.parametrize("shape", ["noise", "spike", "shift", "jump", "trend", "trend-break"])
def test_both_scores_match_the_references(shape, floor):
    history, steps = series_with_new_interval(shape)
    profile = AnomalyProfile(log=False, spread_floor=floor, jump_floor=floor)
    detector = SaxDetector(baseline=32, window=8, segments=4, alphabet=6, threshold=1.0, profile=profile)
    for step, value in zip(steps, history):
        detector.update(float(value), step)
    values = history.tolist()
    tail = values[-40:], steps[-40:]  # the history the detector keeps
    assert detector.shape_score() == pytest.approx(reference_shape(*tail, 32, 8, 4, 6, floor), rel=1e-9)
    expected_jump = reference_jump(values, steps, window=8, kept=16, floor=floor)
    assert expected_jump is not None  # 14 values at the new interval: 8 errors to judge the last one by
    assert detector.jump_score() == pytest.approx(expected_jump, rel=1e-9)
    assert detector.score() == pytest.approx(max(detector.shape_score(), expected_jump), rel=1e-9)


def test_the_jump_score_waits_for_errors_at_the_current_interval():
    rng = np.random.default_rng(5)
    detector = SaxDetector(baseline=32, window=8)
    steps = list(range(60)) + [60 + 10 * k for k in range(1, 12)]  # every step, then every 10th
    judged = []
    for step in steps:
        detector.update(float(rng.normal()), step)
        judged.append(detector.jump_score() is not None)
    first_sparse = 60
    assert not any(judged[:16]) and all(judged[16:first_sparse])  # eight earlier errors from the 17th value on
    assert judged[first_sparse:first_sparse + 8] == [False] * 8 and all(judged[first_sparse + 8:])


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


def test_no_score_until_the_history_is_full():
    detector = SaxDetector(baseline=16, window=4, segments=2)
    for value in range(19):
        assert detector.update(float(value % 3)) == (False, None)
    flagged, score = detector.update(1.0)
    assert not flagged and score is not None


def test_a_non_finite_value_after_finite_ones_is_one_event_until_the_series_calms_down():
    assert SaxDetector().update(math.nan) == (False, None)  # nothing to compare with yet
    rng = np.random.default_rng(2)
    detector = SaxDetector()
    events = []
    series = [*rng.normal(1.0, 0.1, 100), math.nan, math.inf, math.nan, *rng.normal(1.0, 0.1, 100), math.nan]
    for step, value in enumerate(series):
        flagged, score = detector.update(float(value), step)
        if flagged:
            events.append((step, score))
    assert events == [(100, math.inf), (203, math.inf)]


def test_a_log_profile_judges_log_values_and_skips_non_positive_ones():
    rng = np.random.default_rng(4)
    values = np.exp(rng.normal(0.0, 0.3, 120) + np.linspace(0, 2, 120))
    values[-1] *= 30  # a factor 30 blow-up
    logged = SaxDetector(profile=AnomalyProfile(log=True, spread_floor=0.0, jump_floor=0.0))
    reference = SaxDetector()
    for step, value in enumerate(values):
        if step == 50:
            assert logged.update(0.0, step) == (False, None) and logged.update(-1.0, step) == (False, None)
        got, expected = logged.update(float(value), step), reference.update(math.log(value), step)
        assert got[0] == expected[0]
        assert got[1] is None if expected[1] is None else got[1] == pytest.approx(expected[1], rel=1e-12)
    assert got[0] and got[1] > 6.5


def test_floors_keep_a_small_move_of_a_constant_series_from_flagging():
    generic = SaxDetector()
    floored = SaxDetector(profile=AnomalyProfile(log=False, spread_floor=0.05, jump_floor=0.03))
    for step in range(78):
        generic.update(0.0, step)
        floored.update(0.0, step)
    outlier = 1 / 64  # one hidden dimension of 64 crosses the outlier threshold
    assert generic.update(outlier, 78)[0]  # zero spread: any move is "infinitely" far
    flagged, score = floored.update(outlier, 78)
    assert not flagged and score == pytest.approx((1 / 64) / 0.03)  # the jump over its floor
    flagged, score = floored.update(0.5, 79)  # half the dimensions: a real change
    assert flagged and score > 10


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


def test_monitor_judges_profiled_signals_per_attribute_set_and_is_bounded():
    monitor = AnomalyMonitor(profiles={"entropy": GENERIC}, baseline=16, window=4, segments=2, max_series=3)
    rng = np.random.default_rng(0)
    flagged = []
    for step in range(60):
        jump = 30.0 if step >= 40 else 0.0
        gauges = {
            "lr": (({}, float(rng.normal()) + jump),),  # no profile: not judged
            "entropy": tuple(({"layer": str(k)}, float(rng.normal()) + (jump if k == 1 else 0.0)) for k in range(4)),
        }
        flagged += monitor.observe(step, gauges)
    assert [(a.signal, dict(a.attributes)) for a in flagged] == [("entropy", {"layer": "1"})]
    assert flagged[0].step in range(40, 44) and flagged[0].score > monitor.threshold
    assert len(monitor._detectors) == 3  # the fourth layer found the monitor full


def test_the_default_monitor_judges_every_profiled_catalog_gauge_and_nothing_schedule_driven():
    profiles = catalog_profiles()
    assert set(profiles) == {spec.name for spec in CATALOG if spec.anomaly is not None}
    assert {"llm.train.learning_rate", "llm.memory.pressure", "llm.telemetry.sampling_interval"}.isdisjoint(profiles)
    assert all(spec.instrument == "observable_gauge" for spec in CATALOG if spec.anomaly is not None)
    assert by_name("llm.grad.norm").anomaly.log and not by_name("llm.grad.sparsity").anomaly.log
    assert make_monitor(Config(anomaly_detection=False)) is None
    assert make_monitor(Config(disabled_signals="llm.anomaly.events")) is None
    monitor = make_monitor(Config(anomaly_threshold=9.0))
    assert monitor is not None and monitor.threshold == 9.0 and monitor._profiles == profiles

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
    assert precision >= 0.95 and recall >= 0.9, table
    assert false_alarms.get("none", 0) <= 2, table
