"""Nothing the training loop feeds in, and no failing probe, reaches the loop or the SDK.

A NaN/Inf storm is counted in ``llm.telemetry.nonfinite`` exactly as often as a
float64 reference computed here says a signal came out non-finite, and the SDK
never sees one of those values. A probe that raises is logged once and sits out
the step; the other probes keep exporting. On non-sampled steps no hook reads
a device value on the training thread.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import torch

from otel_llm.catalog import (
    ATTENTION_HEAD_DIVERGENCE_MAX,
    ATTENTION_HEAD_ENTROPY,
    ATTENTION_LOGIT_MAX,
    ATTENTION_SINK_RATIO,
    GRAD_NORM,
    GRAD_NORM_DECAY_RATE,
    GRAD_SPARSITY,
    LOGITS_Z_LOSS,
    LOSS_TOKEN,
    LOSS_TOKEN_SKEWNESS,
    PARAM_UPDATE_RATIO,
    TRAIN_LOSS,
)
from otel_llm.pipeline.publisher import Publisher
from otel_llm.probes.activations import ActivationProbe
from otel_llm.probes.attention import AttentionProbe
from otel_llm.probes.loss import LossProbe
from otel_llm.probes.optimizer import OptimizerProbe
from otel_llm.runtime.log_once import once
from tests.attention_reference import Capture
from tests.conftest import Harness, rel_close
from tests.models import GPT, padded_rows, tiny_lora_llama

VOCAB = 64
LENGTH = 16
BATCH = 2
HEADS = 4
STORM_STEPS = 1000
STORM_INTERVAL = 4
GRAD_THRESHOLD = 1e-5


@pytest.fixture(autouse=True)
def fresh_failure_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe failures are logged once per process; each test starts as a fresh process would."""
    monkeypatch.setattr(once, "_seen", set())


def gpt_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g), torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)


# -- the storm schedule: which steps are poisoned, and how ------------------------------------


def nan_logit(step: int) -> bool:
    return step % 3 == 1


def inf_logit(step: int) -> bool:
    return step % 13 == 6


def inf_grad(step: int) -> bool:
    return step % 7 == 3


def nan_hidden(step: int) -> bool:
    return step % 11 == 5


def activation_probe_raises(step: int) -> bool:
    return step % 50 == 20


class StepClock:
    """The training loop's step, for hooks and patches that poison particular steps."""

    step = 0


def poison_logits(logits: torch.Tensor, step: int) -> torch.Tensor:
    """A NaN or +Inf logit in one token row, as a constant added inside the graph."""
    bias = torch.zeros_like(logits)
    if nan_logit(step):
        bias[0, 0, 0] = math.nan
    if inf_logit(step):
        bias[1, 2, 3] = math.inf
    return logits + bias


def poison_positions(clock: StepClock) -> Callable[..., torch.Tensor | None]:
    """Forward hook on the position embedding: NaN at position 0, so every layer's attention input is NaN."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not nan_hidden(clock.step):
            return None
        bias = torch.zeros_like(output)
        bias[0, 0] = math.nan
        return output + bias

    return hook


# -- the float64 reference: which signals a step makes non-finite -----------------------------


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    flat = logits.detach().double().reshape(-1, VOCAB)
    return (-torch.log_softmax(flat, dim=-1).gather(1, targets.reshape(-1, 1)).squeeze(1)).numpy()


def skewness(x: np.ndarray) -> float:
    centred = x - x.mean()
    m2, m3 = (centred**2).mean(), (centred**3).mean()
    return 0.0 if m2 == 0 else float(m3 / m2**1.5)


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def update_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((after - before).norm() / before.norm())


def attention_signals(capture: Capture) -> dict[str, list[float]]:
    """The four attention signals of every layer in float64, NaN propagating as IEEE arithmetic does."""
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    off_diagonal = ~torch.eye(HEADS, dtype=torch.bool)
    values: dict[str, list[float]] = {ATTENTION_HEAD_ENTROPY: [], ATTENTION_HEAD_DIVERGENCE_MAX: [],
                                      ATTENTION_LOGIT_MAX: [], ATTENTION_SINK_RATIO: []}
    for q, k, v, scale in capture.qkv():
        logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~causal, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        heads = (probs @ v).transpose(0, 1).reshape(HEADS, -1)
        unit = heads / heads.norm(dim=1, keepdim=True)
        cosine = (unit @ unit.T)[off_diagonal].view(HEADS, HEADS - 1)
        values[ATTENTION_HEAD_ENTROPY] += torch.special.entr(probs).sum(-1).mean((0, 2)).tolist()
        values[ATTENTION_HEAD_DIVERGENCE_MAX].append(float(cosine.var(dim=1, unbiased=False).amax()))
        values[ATTENTION_LOGIT_MAX].append(float(logits.amax()))
        values[ATTENTION_SINK_RATIO].append(float(probs[:, :, 1:, 0].mean()))
    return values


def sampled_step_reference(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, grads: torch.Tensor,
                           norms: list[float], capture: Capture) -> dict[str, list[float]]:
    """What a sampled step exports up to its update, in float64, from the step's own tensors."""
    losses = token_losses(logits, targets)
    reference = {
        TRAIN_LOSS: [float(loss.detach())],
        LOSS_TOKEN: losses.tolist(),
        LOSS_TOKEN_SKEWNESS: [skewness(losses)],
        LOGITS_Z_LOSS: [float(torch.logsumexp(logits.detach().double(), -1).square().mean())],
        GRAD_NORM: [norms[-1]],
        GRAD_SPARSITY: [float((grads.abs() <= GRAD_THRESHOLD).double().mean())],
        **attention_signals(capture),
    }
    if len(norms) > 1:
        reference[GRAD_NORM_DECAY_RATE] = [(norms[-2] - norms[-1]) / (norms[-2] + 1e-8)]
    return reference


def nonfinite_signals(values: dict[str, list[float]]) -> set[str]:
    return {name for name, numbers in values.items() if not all(math.isfinite(v) for v in numbers)}


def probe_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "otel_llm.probes"]


def assert_no_nonfinite_point(metrics: Any) -> None:
    for name, points in metrics.points.items():
        for point in points:
            number = point.value if hasattr(point, "value") else point.sum
            assert math.isfinite(number), f"{name} exported {number}"


ACTIVATIONS = {"llm.activation.sparsity", "llm.activation.outlier_ratio"}


def check_mid_storm(h: Harness, step: int) -> None:
    """The raising probe sits its step out and is back on the next sampled one; no NaN/Inf is ever exported."""
    if step == 20:  # sampled, and the activation probe raised
        m = h.collect()
        assert not ACTIVATIONS & m.names()
        assert {"llm.grad.norm", "llm.attention.logit_max"} <= m.names()
    elif step == 20 + STORM_INTERVAL or step % 100 == 1:
        m = h.collect()
        assert_no_nonfinite_point(m)
        assert step != 20 + STORM_INTERVAL or ACTIVATIONS <= m.names()


def test_nan_inf_storm_is_counted_exactly_and_never_reaches_the_sdk(harness, caplog, monkeypatch):
    """1,000 steps: NaN logits every 3rd, +Inf logits every 13th, +Inf gradients every 7th and NaN hidden states
    every 11th step; the activation probe raises on steps 20, 70, 120, ... (it runs on sampled steps only).
    A poisoned update is undone, as a loss-scaling loop would skip it."""
    clock = StepClock()
    original_layer = ActivationProbe._layer

    def layer_failing_on_schedule(self: ActivationProbe, position: int) -> Any:
        if activation_probe_raises(clock.step):
            raise RuntimeError("activation probe failure")
        return original_layer(self, position)

    monkeypatch.setattr(ActivationProbe, "_layer", layer_failing_on_schedule)
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, block_size=LENGTH, heads=HEADS)
    model.transformer.wpe.register_forward_hook(poison_positions(clock))
    capture = Capture("nanogpt", [block.attn for block in model.transformer.h], HEADS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    h = harness(model, optimizer, sampling="fixed", sampling_interval=STORM_INTERVAL,
                grad_sparsity_threshold=GRAD_THRESHOLD)
    caplog.set_level(logging.WARNING)

    expected: Counter[str] = Counter()
    norms: list[float] = []
    finite_token_losses = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STORM_STEPS):
            clock.step = step
            sampled = step % STORM_INTERVAL == 0
            idx, targets = gpt_batch(step)
            logits, _ = model(idx)
            logits = poison_logits(logits, step)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
            loss.backward()
            if inf_grad(step):
                model.lm_head.weight.grad[0, 0] = math.inf
            grads = flat(p.grad for p in model.parameters())
            norms.append(float(grads.norm()))
            before = flat(model.parameters())
            if sampled:
                reference = sampled_step_reference(logits, targets, loss, grads, norms, capture)
                finite_token_losses += sum(math.isfinite(v) for v in reference[LOSS_TOKEN])
            capture.inputs.clear()
            optimizer.step()
            after = flat(model.parameters())
            if sampled:
                reference[PARAM_UPDATE_RATIO] = [update_ratio(before, after)]
                expected.update(nonfinite_signals(reference))
            if not torch.isfinite(after).all():
                with torch.no_grad():
                    torch.nn.utils.vector_to_parameters(before.float(), model.parameters())
            optimizer.zero_grad()
            check_mid_storm(h, step)

    assert h.session.step == STORM_STEPS
    m = h.collect()
    assert_no_nonfinite_point(m)
    nonfinite = {point.attributes["llm.signal"]: point.value for point in m.points["llm.telemetry.nonfinite"]}
    print(f"llm.telemetry.nonfinite: {dict(sorted(nonfinite.items()))}; reference {dict(sorted(expected.items()))}")
    assert nonfinite == dict(expected)
    sampled_steps = range(0, STORM_STEPS, STORM_INTERVAL)  # the schedule tells the same story as the reference
    poisoned_loss = [s for s in sampled_steps if nan_logit(s) or inf_logit(s) or nan_hidden(s)]
    assert expected[TRAIN_LOSS] == len(poisoned_loss) > 0
    assert expected[GRAD_NORM] == len([s for s in sampled_steps if s in poisoned_loss or inf_grad(s)])
    assert expected[ATTENTION_LOGIT_MAX] == len([s for s in sampled_steps if nan_hidden(s)]) > 0
    assert m.value("llm.train.steps") == STORM_STEPS
    assert m.value("llm.telemetry.sampled_steps") == STORM_STEPS // STORM_INTERVAL
    assert m.histogram("llm.loss.token").count == finite_token_losses  # the finite tokens of poisoned steps too
    assert rel_close(m.value("llm.grad.norm"), norms[sampled_steps[-1]])
    for layer, logit_max in enumerate(reference[ATTENTION_LOGIT_MAX]):
        assert rel_close(m.value("llm.attention.logit_max", llm_layer=str(layer)), logit_max)
    assert probe_failures(caplog) == ["otel_llm: probe activations failed and is skipped for this step"]
    assert [r for r in caplog.records if r.name.startswith("opentelemetry")] == []
    assert [w for w in caught if "opentelemetry" in w.filename] == []

    # control: the same capture sees the SDK's warning when a NaN does reach it
    h.session.meter_provider.get_meter("control").create_histogram("control").record(math.nan)
    assert [r.name for r in caplog.records if r.name.startswith("opentelemetry")] != []


# -- a raising probe: one log line, the rest keeps exporting -----------------------------------


def train_gpt(model: GPT, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        idx, targets = gpt_batch(step)
        _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("boom")


RAISING = [  # (class, method, probe name in the log, signal it takes away, signal that stays)
    (LossProbe, "on_call", "loss", "llm.loss.token", "llm.grad.norm"),
    (LossProbe, "finish", "loss", "llm.train.loss", "llm.attention.logit_max"),
    (OptimizerProbe, "before_update", "optimizer", "llm.grad.norm", "llm.train.loss"),
    (OptimizerProbe, "finish", "optimizer", "llm.param.update_ratio", "llm.activation.sparsity"),
    (ActivationProbe, "_layer", "activations", "llm.activation.outlier_ratio", "llm.attention.sink_ratio"),
    (AttentionProbe, "_on_call", "attention", "llm.attention.logit_max", "llm.activation.sparsity"),
    (AttentionProbe, "finish", "attention", "llm.attention.head_entropy", "llm.loss.token"),
]


@pytest.mark.parametrize(("owner", "method", "probe", "gone", "kept"), RAISING,
                         ids=[f"{owner.__name__}.{method}" for owner, method, *_ in RAISING])
def test_a_raising_probe_logs_once_and_the_rest_keeps_exporting(harness, caplog, monkeypatch, owner, method, probe,
                                                                 gone, kept):
    monkeypatch.setattr(owner, method, boom)
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, block_size=LENGTH, heads=HEADS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling="fixed", sampling_interval=1)
    caplog.set_level(logging.WARNING, logger="otel_llm")
    train_gpt(model, optimizer, steps=4)  # raises on every sampled step, often several times per step
    m = h.collect()
    assert probe_failures(caplog) == [f"otel_llm: probe {probe} failed and is skipped for this step"]
    assert m.value("llm.train.steps") == 4
    assert gone not in m.names()
    assert kept in m.names()


def test_a_failing_exporter_thread_logs_once_and_training_goes_on(harness, caplog, monkeypatch):
    monkeypatch.setattr(Publisher, "_record", boom)
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, block_size=LENGTH, heads=HEADS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling="fixed", sampling_interval=1)
    caplog.set_level(logging.WARNING, logger="otel_llm")
    train_gpt(model, optimizer, steps=5)
    h.collect()
    assert h.session.step == 5
    assert [r.getMessage() for r in caplog.records if r.name == "otel_llm.pipeline.publisher"] == [
        "otel_llm: failed to record step telemetry"]


# -- host-device synchronisation budget --------------------------------------------------------

SYNC_METHODS = ("item", "tolist", "cpu", "__float__", "__bool__", "__int__", "numpy")
SYNC_INTERVAL = 4


class SyncCounter:
    """Patches every host-reading Tensor method to record calls made from otel_llm code on the training thread.

    torch's own optimizers call ``.item()``; only otel_llm's calls count.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._patch = pytest.MonkeyPatch()
        for method in SYNC_METHODS:
            self._patch.setattr(torch.Tensor, method, self._counting(method, getattr(torch.Tensor, method)))

    def _counting(self, method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        calls = self.calls

        def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code
            on_training_thread = threading.current_thread() is threading.main_thread()
            if on_training_thread and os.sep + "otel_llm" + os.sep in caller.co_filename:
                calls.append((method, f"{os.path.basename(caller.co_filename)}:{caller.co_name}"))
            return original(tensor, *args, **kwargs)

        return counting

    def undo(self) -> None:
        self._patch.undo()


Setup = tuple[torch.nn.Module, Callable[[int], torch.Tensor], set[str]]
"""A model, its loss at a step, and the model signals its probes must export."""


def gpt_setup() -> Setup:
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, block_size=LENGTH, heads=HEADS)

    def loss_at(step: int) -> torch.Tensor:
        idx, targets = gpt_batch(step)
        return model(idx, targets)[1]

    return model, loss_at, {"llm.attention.logit_max", "llm.activation.sparsity"}


def lora_llama_setup() -> Setup:
    model = tiny_lora_llama(VOCAB)
    model.train()
    rows = padded_rows(2 * (SYNC_INTERVAL + 1), VOCAB)

    def loss_at(step: int) -> torch.Tensor:
        pair = rows[2 * step:2 * step + 2]
        return model(**{key: torch.stack([row[key] for row in pair]) for key in pair[0]}).loss

    return model, loss_at, {"llm.attention.logit_max", "llm.activation.sparsity", "llm.lora.rank_activation_ratio",
                            "llm.rope.angle_deviation"}


@pytest.mark.parametrize("setup", [gpt_setup, lora_llama_setup], ids=["gpt", "lora-llama"])
def test_no_host_device_sync_on_non_sampled_steps(harness, setup):
    """Every probe on (attention, RoPE, activations, LoRA, loss, tokens from a mask): the non-sampled steps
    read nothing from the device, and a sampled step reads once."""
    model, loss_at, signals = setup()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    h = harness(model, optimizer, sampling="fixed", sampling_interval=SYNC_INTERVAL)
    per_step: list[list[tuple[str, str]]] = []
    for step in range(SYNC_INTERVAL + 1):  # steps 0 and SYNC_INTERVAL are sampled
        counter = SyncCounter()
        loss_at(step).backward()
        optimizer.step()
        optimizer.zero_grad()
        counter.undo()
        per_step.append(counter.calls)
    assert per_step[1:SYNC_INTERVAL] == [[]] * (SYNC_INTERVAL - 1)
    # the single transfer of a sampled step (step 0 also converts thresholds to the activations' dtype once)
    assert per_step[SYNC_INTERVAL] == [("cpu", "transfer.py:transfer"), ("numpy", "transfer.py:transfer")]
    m = h.collect()
    assert m.value("llm.train.steps") == SYNC_INTERVAL + 1
    assert signals <= m.names()
