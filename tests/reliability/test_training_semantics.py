"""What a step measures does not change with how the step is run.

Activation checkpointing replays forwards during backward, gradient
accumulation spreads a step over micro-batches, torch.compile traces the hooks
into a graph: each run is compared with the plain run of the same model and
batches (one statistic per module per step, equal values), or with a float64
reference on the accumulated gradient, and torch.compile keeps the graph whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tests.attention_reference import Capture, causal_padding_mask, reference_signals
from tests.conftest import Metrics, rel_close
from tests.models import GPT, padded_rows, tiny_lora_llama

VOCAB = 64
LENGTH = 16
BATCH = 2
HEADS = 4
LAYERS = 2
TIMING = {"llm.train.step.duration", "llm.telemetry.overhead", "llm.memory.pressure", "llm.memory.peak_allocated",
          "llm.memory.peak_reserved", "llm.train.input_wait.duration", "llm.train.compute.duration",
          "llm.train.checkpoint.duration", "llm.train.goodput", "llm.train.mfu", "llm.train.last_step.timestamp",
          "llm.train.step.slowest", "llm.train.step.fastest", "llm.train.step.skew_ratio"}
"""Signals of wall time and process memory: never equal across two runs."""


def gpt_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g), torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)


def exported(metrics: Metrics) -> dict[tuple[str, frozenset], Any]:
    """Every exported point but timing: gauge/counter values, histogram (count, sum, bucket counts)."""
    values: dict[tuple[str, frozenset], Any] = {}
    for name, points in metrics.points.items():
        if name in TIMING:
            continue
        for point in points:
            key = (name, frozenset(point.attributes.items()))
            values[key] = (point.count, point.sum, tuple(point.bucket_counts)) if hasattr(point, "count") \
                else point.value
    return values


def assert_same_export(actual: dict, expected: dict, rel: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, tuple):
            count, total, buckets = actual[key]
            assert (count, buckets) == (value[0], value[2]), key
            assert rel_close(total, value[1], rel=rel), key
        else:
            assert rel_close(actual[key], value, rel=rel), key


def entropy_counts(metrics: Metrics) -> dict[str, int]:
    return {p.attributes["llm.layer"]: p.count for p in metrics.points["llm.attention.head_entropy"]}


# -- activation checkpointing -------------------------------------------------------------------


class CheckpointedGPT(GPT):
    """nanoGPT that can run every block, its hooks included, under torch.utils.checkpoint."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__(vocab=VOCAB, block_size=LENGTH, heads=HEADS, layers=LAYERS)
        self.use_reentrant = use_reentrant
        self.checkpointing = False

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = checkpoint(block, x, use_reentrant=self.use_reentrant) if self.checkpointing else block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


class Checkpointable:
    """A model, its loss on batch i, and a switch for activation checkpointing."""

    def __init__(self, model: torch.nn.Module, loss_at: Callable[[int], torch.Tensor],
                 checkpointing: Callable[[bool], None]) -> None:
        self.model, self.loss_at, self.checkpointing = model, loss_at, checkpointing


def gpt_model(use_reentrant: bool) -> Checkpointable:
    torch.manual_seed(0)
    model = CheckpointedGPT(use_reentrant)
    return Checkpointable(model, lambda i: model(*gpt_batch(i))[1],
                          lambda on: setattr(model, "checkpointing", on))


def lora_llama_model(use_reentrant: bool) -> Checkpointable:
    model = tiny_lora_llama(VOCAB)
    model.train()
    model.enable_input_require_grads()  # frozen embeddings: reentrant checkpointing needs an input with grad
    rows = padded_rows(4 * BATCH)

    def loss_at(i: int) -> torch.Tensor:
        pair = rows[BATCH * i:BATCH * (i + 1)]
        return model(**{key: torch.stack([row[key] for row in pair]) for key in pair[0]}).loss

    def checkpointing(on: bool) -> None:
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:
            model.activation_checkpointing_disable()

    return Checkpointable(model, loss_at, checkpointing)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("build", [gpt_model, lora_llama_model], ids=["gpt", "lora-llama"])
def test_activation_checkpointing_measures_each_module_once_per_step(harness, build, use_reentrant):
    """Every exported point of a checkpointed run equals the plain run's: the replays add nothing.

    Each step has two micro-batches and only the first is checkpointed: a replay
    measured again would weigh that micro-batch twice in every per-layer mean
    and ratio, which an exact repetition of a whole step would hide.
    """
    runs = []
    for checkpointed in (False, True):
        run = build(use_reentrant)
        optimizer = torch.optim.SGD([p for p in run.model.parameters() if p.requires_grad], lr=0.05)
        h = harness(run.model, optimizer, sampling="fixed", sampling_interval=1)
        collected = []
        for step in range(2):
            for micro in range(2):
                run.checkpointing(checkpointed and micro == 0)
                run.loss_at(2 * step + micro).backward()
            optimizer.step()
            optimizer.zero_grad()
            collected.append(h.collect())
        h.session.shutdown()
        runs.append(collected)
    for plain, checkpointed in zip(*runs):
        assert_same_export(exported(checkpointed), exported(plain))
    final = runs[1][-1]
    assert entropy_counts(final) == {str(layer): 2 * HEADS for layer in range(LAYERS)}  # one per head per step
    assert {"llm.activation.sparsity", "llm.attention.sink_ratio", "llm.grad.norm"} <= final.names()


# -- gradient accumulation -----------------------------------------------------------------------

MICRO_BATCHES = 4
ACCUMULATED_STEPS = 5
ACCUMULATION_INTERVAL = 2
SPARSITY_THRESHOLD = 1e-4


def test_gradient_accumulation_measures_the_accumulated_step(harness):
    """k micro-batches make one step; its signals are those of the accumulated gradient and update."""
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, block_size=LENGTH, heads=HEADS, layers=LAYERS)
    capture = Capture("nanogpt", [block.attn for block in model.transformer.h], HEADS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling="fixed", sampling_interval=ACCUMULATION_INTERVAL,
                grad_sparsity_threshold=SPARSITY_THRESHOLD)
    norms: list[float] = []
    for step in range(ACCUMULATED_STEPS):
        losses, logits = [], []
        for micro in range(MICRO_BATCHES):
            idx, targets = gpt_batch(100 * step + micro)
            out, loss = model(idx, targets)
            (loss / MICRO_BATCHES).backward()
            losses.append(float(loss.detach()))
            logits.append(out.detach().double())
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        norms.append(float(grads.norm()))
        calls = capture.qkv()  # q, k, v from the weights the forwards used
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        optimizer.step()
        optimizer.zero_grad()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        if step % ACCUMULATION_INTERVAL:
            continue
        m = h.collect()
        assert m.value("llm.train.steps") == step + 1
        assert m.value("llm.train.tokens") == (step + 1) * MICRO_BATCHES * BATCH * LENGTH
        assert rel_close(m.value("llm.grad.norm"), norms[-1])
        assert rel_close(m.value("llm.grad.sparsity", llm_param_group="all"),
                         float((grads.abs() <= SPARSITY_THRESHOLD).double().mean()))
        assert rel_close(m.value("llm.param.update_ratio"), float((after - before).norm() / before.norm()))
        assert rel_close(m.value("llm.train.loss"), sum(losses) / MICRO_BATCHES)
        assert rel_close(m.value("llm.logits.z_loss"), float(torch.cat(
            [torch.logsumexp(out, -1).reshape(-1) for out in logits]).square().mean()))
        if step:  # the decay rate compares consecutive accumulated steps, the previous one not sampled
            assert rel_close(m.value("llm.grad.norm_decay_rate"), (norms[-2] - norms[-1]) / (norms[-2] + 1e-8),
                             abs_tol=1e-6)
        allowed = causal_padding_mask(LENGTH, None, BATCH)
        for layer in range(LAYERS):  # one statistic per layer over all micro-batches' queries
            reference = reference_signals([(q, k, v, scale, allowed) for q, k, v, scale in calls[layer::LAYERS]])
            assert rel_close(m.value("llm.attention.logit_max", llm_layer=str(layer)), reference.logit_max)
            assert rel_close(m.value("llm.attention.sink_ratio", llm_layer=str(layer)), reference.sink_ratio)
    sampled = len(range(0, ACCUMULATED_STEPS, ACCUMULATION_INTERVAL))
    assert m.value("llm.telemetry.sampled_steps") == sampled
    assert entropy_counts(m) == {str(layer): sampled * HEADS for layer in range(LAYERS)}  # not per micro-batch
    assert m.histogram("llm.loss.token").count == sampled * MICRO_BATCHES * BATCH * LENGTH


# -- torch.compile -----------------------------------------------------------------------------

COMPILED_STEPS = 4


def train_compiled(harness, instrumented: bool, compiled: bool) -> tuple[list[torch.Tensor], Metrics | None, dict]:
    """Losses, the final export and dynamo's counters of a few steps, from a fresh dynamo; sampled and
    non-sampled steps alternate."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, block_size=LENGTH, heads=HEADS, layers=LAYERS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run = torch.compile(model, backend="eager") if compiled else model
    h = harness(run, optimizer, sampling="fixed", sampling_interval=2) if instrumented else None
    losses = []
    for step in range(COMPILED_STEPS):
        _, loss = run(*gpt_batch(step))  # the loss inside the compiled forward, as Hugging Face models compute it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    metrics = None
    if h is not None:
        metrics = h.collect()
        h.session.shutdown()
    stats = {"graph_breaks": dict(counters["graph_break"]), "unique_graphs": counters["stats"]["unique_graphs"]}
    return losses, metrics, stats


@pytest.fixture
def dynamo_reset_after() -> Iterator[None]:
    """Dynamo's caches would keep this test's models alive."""
    yield
    torch._dynamo.reset()


def test_torch_compile_keeps_the_graph_whole_and_the_values(harness, dynamo_reset_after):
    bare_losses, _, bare = train_compiled(harness, instrumented=False, compiled=True)
    losses, compiled, instrumented = train_compiled(harness, instrumented=True, compiled=True)
    _, eager, _ = train_compiled(harness, instrumented=True, compiled=False)
    print(f"graph breaks: bare {bare}, instrumented {instrumented}")
    assert sum(instrumented["graph_breaks"].values()) == sum(bare["graph_breaks"].values()) == 0, \
        list(instrumented["graph_breaks"])
    assert instrumented["unique_graphs"] <= 2 * bare["unique_graphs"]  # a sampled and a non-sampled variant
    assert all(torch.equal(a, b) for a, b in zip(losses, bare_losses))
    assert compiled is not None and eager is not None
    assert_same_export(exported(compiled), exported(eager), rel=1e-5)  # the traced hooks measured the same
    assert {"llm.attention.logit_max", "llm.activation.sparsity", "llm.loss.token"} <= compiled.names()
