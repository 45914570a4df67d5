"""How the anomaly detector does on real training runs: silent on healthy ones, fast on injected faults.

Records (once, into ``--cache``) the gauge series otel_llm exports at its default
sampling for four healthy CPU runs — the README demo, a nanoGPT-style char-level
model on the Lightning changelog, a tiny Llama fine-tune (warmup + cosine,
clipping) and a PEFT LoRA run of it — each with four seeds, each run again with
five faults (see :mod:`anomaly_runs`), and the demo for 1500 steps. Then replays every recording through the detector a
:class:`otel_llm.Config` builds (``--set anomaly_threshold=8`` tries a variant;
replaying takes seconds) and prints: events on the healthy runs; per fault
whether a sensible signal flagged it within ``--within`` sampled steps of its
onset, the delay and the signal; precision and recall.

    python benchmarks/anomaly_eval.py [--set FIELD=VALUE ...] [--events] [--rerecord]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from anomaly_runs import FAULTS, ROOT, Recording, load_or_record, long_runs, workloads  # noqa: E402

from otel_llm import Config  # noqa: E402
from otel_llm.pipeline.anomaly import make_monitor  # noqa: E402

__all__ = ["SENSIBLE", "Event", "main", "replay"]

_LOSS = {"llm.train.loss", "llm.loss.token_skewness", "llm.logits.z_loss"}
_GRADIENT = {"llm.grad.norm", "llm.grad.norm_decay_rate", "llm.grad.sparsity", "llm.param.update_ratio"}
_FORWARD = {"llm.attention.logit_max", "llm.attention.sink_ratio", "llm.attention.head_divergence_max",
            "llm.activation.sparsity", "llm.activation.outlier_ratio", "llm.lora.rank_activation_ratio"}
SENSIBLE = {
    "lr_x100": _GRADIENT | _LOSS | _FORWARD,  # the update blows up at once; the rest follows
    "random_tokens": _LOSS | _GRADIENT | _FORWARD,
    "weight_x10": _FORWARD | _LOSS | _GRADIENT,
    "nan_batch": _LOSS | _GRADIENT | _FORWARD,
    "shifted_labels": _LOSS | _GRADIENT,  # the forward pass is unchanged at the onset: only the targets moved
}
"""Signals whose flag means the detector saw the fault (not, say, memory pressure or the RoPE check)."""


@dataclass(frozen=True)
class Event:
    """One flag of a replay: where (sampled index and step), which series, how far over."""

    index: int
    step: int
    signal: str
    attributes: tuple[tuple[str, str], ...]
    score: float

    def label(self) -> str:
        attributes = ",".join(value for _, value in self.attributes)
        return self.signal.removeprefix("llm.") + (f"[{attributes}]" if attributes else "")


def replay(recording: Recording, config: Config) -> list[Event]:
    """Feed a recording through the detector ``config`` builds, as the exporter thread would."""
    monitor = make_monitor(config)
    if monitor is None:
        return []
    events = []
    for index, (step, points) in enumerate(zip(recording.steps, recording.points)):
        for anomaly in monitor.observe(step, points):
            events.append(Event(index, step, anomaly.signal, tuple(sorted(anomaly.attributes.items())),
                                anomaly.score))
    return events


@dataclass(frozen=True)
class Outcome:
    """A faulty run's replay: the first sensible flag within reach of the onset, and the flags before it."""

    delay: int | None
    signals: tuple[str, ...]
    early: int


def judge(recording: Recording, events: list[Event], within: int) -> Outcome:
    assert recording.fault is not None and recording.onset is not None
    onset_index = recording.steps.index(recording.onset)
    early = sum(1 for e in events if e.step < recording.onset)
    for index in range(onset_index, min(onset_index + within + 1, len(recording.steps))):
        hits = [e for e in events if e.index == index and e.signal in SENSIBLE[recording.fault]]
        if hits:
            return Outcome(index - onset_index, tuple(dict.fromkeys(e.label() for e in hits)), early)
    return Outcome(None, (), early)


def _describe(labels: list[str], limit: int = 4) -> str:
    counts = Counter(labels)
    shown = [f"{label}×{n}" if n > 1 else label for label, n in counts.most_common(limit)]
    return ", ".join(shown) + (f", +{len(counts) - limit} more" if len(counts) > limit else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "anomaly_eval")
    parser.add_argument("--rerecord", action="store_true", help="discard the cached recordings first")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a Config field for the detector variant, e.g. anomaly_threshold=8")
    parser.add_argument("--within", type=int, default=3, help="sampled steps after the onset a flag may take")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2, 3],
                        help="seeds of the four workloads (comma list; 0 is the runs as described)")
    parser.add_argument("--events", action="store_true", help="list every event of every run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.rerecord and args.cache.exists():
        shutil.rmtree(args.cache)
    overrides = dict(item.split("=", 1) for item in args.set)
    config = Config(exporters="none", **overrides)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    chosen = [w for seed in args.seeds for w in workloads(args.cache, seed)]
    runs = {(w.name, fault): load_or_record(w, fault, args.cache, log) for w in chosen for fault in (None, *FAULTS)}
    runs.update({(w.name, None): load_or_record(w, None, args.cache, log) for w in long_runs()})
    started = time.perf_counter()
    replays = {key: replay(recording, config) for key, recording in runs.items()}
    replay_seconds = time.perf_counter() - started
    names = [w.name for w in chosen]
    healthy = [name for name, fault in runs if fault is None]

    print(f"detector: {', '.join(f'{k}={v}' for k, v in overrides.items()) or 'default configuration'}")
    print("\nhealthy runs                 sampled  events  signals")
    false_alarms = 0
    for name in healthy:
        events = replays[name, None]
        false_alarms += len(events)
        print(f"  {name:26} {len(runs[name, None].steps):7}  {len(events):6}  {_describe([e.label() for e in events])}")

    print(f"\ninjected faults (flagged within {args.within} sampled steps of the onset on a sensible signal)")
    print(f"  {'run':16} {'fault':15} {'onset':>5}  {'flagged':7} {'delay':>5}  signal")
    detected = 0
    for name in names:
        for fault in FAULTS:
            recording = runs[name, fault]
            outcome = judge(recording, replays[name, fault], args.within)
            detected += outcome.delay is not None
            delay = "-" if outcome.delay is None else str(outcome.delay)
            early = f"  ({outcome.early} before the onset)" if outcome.early else ""
            print(f"  {name:16} {fault:15} {recording.onset:5}  {'yes' if outcome.delay is not None else 'NO':7} "
                  f"{delay:>5}  {_describe(list(outcome.signals), 3)}{early}")

    faults = len(names) * len(FAULTS)
    precision = detected / (detected + false_alarms) if detected + false_alarms else 1.0
    print(f"\nfaults flagged {detected}/{faults}; events on healthy runs {false_alarms}")
    print(f"precision {precision:.3f} (flagged faults / (flagged faults + healthy-run events)), "
          f"recall {detected / faults:.3f}")
    points = sum(len(series) for recording in runs.values() for step in recording.points for series in step.values())
    print(f"replay: {replay_seconds:.2f} s for {points} series values "
          f"({1e6 * replay_seconds / max(points, 1):.0f} µs each)")
    if args.events:
        for (name, fault), events in replays.items():
            for e in events:
                print(f"  {name} {fault or 'healthy'} step {e.step} (#{e.index}) {e.label()} score {e.score:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
