"""Every exported signal equals an independent reference computed here, on the same step.

References use plain torch/numpy in float64 from the model's outputs, gradients
and parameters, never the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from otel_llm.catalog import LOSS_TOKEN_BUCKETS, STEP_DURATION_BUCKETS
from tests.conftest import rel_close
from tests.models import GPT, tiny_llama

VOCAB = 64


def reference_token_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> np.ndarray:
    flat = logits.detach().double().reshape(-1, logits.shape[-1])
    labels = targets.reshape(-1)
    keep = labels != ignore_index
    logp = torch.log_softmax(flat[keep], dim=-1)
    return (-logp.gather(1, labels[keep, None]).squeeze(1)).numpy()


def reference_z_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> float:
    flat = logits.detach().double().reshape(-1, logits.shape[-1])
    keep = targets.reshape(-1) != ignore_index
    return float((torch.logsumexp(flat[keep], dim=-1) ** 2).mean())


def skewness(x: np.ndarray) -> float:
    centred = x - x.mean()
    m2, m3 = (centred**2).mean(), (centred**3).mean()
    return 0.0 if m2 == 0 else float(m3 / m2**1.5)


def bucket_counts(values: np.ndarray, bounds: tuple[float, ...]) -> list[int]:
    """OTel explicit buckets: (-inf, b0], (b0, b1], ..., (bn, +inf)."""
    edges = [-math.inf, *bounds, math.inf]
    return [int(((values > lo) & (values <= hi)).sum()) for lo, hi in zip(edges, edges[1:])]


def grads_and_params(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [p.grad.detach().double().clone() for p in params if p.grad is not None], \
        [p.detach().double().clone() for p in params]


def global_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t**2).sum()) for t in tensors))


def rss_fraction() -> float:
    import os

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages / os.sysconf("SC_PHYS_PAGES")


def gpt_batch(step: int) -> tuple[dict, torch.Tensor, int]:
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randint(0, VOCAB, (3, 16), generator=g)
    targets = torch.randint(0, VOCAB, (3, 16), generator=g)
    targets[0, :3] = -1  # ignored positions
    return {"idx": idx, "targets": targets}, targets, idx.numel()


def llama_batch(step: int) -> tuple[dict, torch.Tensor, int]:
    g = torch.Generator().manual_seed(200 + step)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, shifted, int(mask.sum())


def run_forward(model, batch):
    out = model(**batch)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out.logits, out.loss


@pytest.mark.parametrize("arch", ["nanogpt", "llama"])
def test_every_signal_matches_reference_with_interval_one(harness, arch):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB) if arch == "nanogpt" else tiny_llama(VOCAB)
    make_batch = gpt_batch if arch == "nanogpt" else llama_batch
    ignore = -1 if arch == "nanogpt" else -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    h = harness(model, optimizer, sampling_interval=1)

    all_token_losses: list[np.ndarray] = []
    previous_norm = None
    total_tokens = 0
    for step in range(4):
        batch, targets, tokens = make_batch(step)
        total_tokens += tokens
        logits, loss = run_forward(model, batch)
        loss.backward()
        grads, before = grads_and_params(model)
        norm = global_norm(grads)
        all_grad = torch.cat([g.reshape(-1) for g in grads])
        sparsity = float((all_grad.abs() <= 1e-5).double().mean())
        optimizer.step()
        _, after = grads_and_params(model)
        update_ratio = global_norm([a - b for a, b in zip(after, before)]) / global_norm(before)
        optimizer.zero_grad()
        token_losses = reference_token_losses(logits, targets, ignore)
        all_token_losses.append(token_losses)

        m = h.collect()
        assert rel_close(m.value("llm.train.loss"), float(loss.detach()))
        assert rel_close(m.value("llm.grad.norm"), norm)
        assert rel_close(m.value("llm.grad.sparsity", llm_param_group="all"), sparsity)
        assert rel_close(m.value("llm.param.update_ratio"), update_ratio)
        assert m.value("llm.param.update_variance_ratio") == 0.0
        assert rel_close(m.value("llm.loss.token_skewness"), skewness(token_losses))
        assert rel_close(m.value("llm.logits.z_loss"), reference_z_loss(logits, targets, ignore))
        assert m.value("llm.train.learning_rate", llm_param_group="0") == pytest.approx(3e-3)
        assert m.value("llm.train.steps") == step + 1
        assert m.value("llm.telemetry.sampled_steps") == step + 1
        assert m.value("llm.train.tokens") == total_tokens
        assert m.value("llm.telemetry.sampling_interval") == 1
        assert rel_close(m.value("llm.memory.pressure", llm_device="cpu"), rss_fraction(), rel=0.05)
        if previous_norm is None:
            assert "llm.grad.norm_decay_rate" not in m.names()
        else:
            expected = (previous_norm - norm) / (previous_norm + 1e-8)
            assert rel_close(m.value("llm.grad.norm_decay_rate"), expected, abs_tol=1e-6)
        previous_norm = norm

        seen = np.concatenate(all_token_losses)
        hist = m.histogram("llm.loss.token")
        assert list(hist.explicit_bounds) == list(LOSS_TOKEN_BUCKETS)
        assert list(hist.bucket_counts) == bucket_counts(seen, LOSS_TOKEN_BUCKETS)
        assert rel_close(hist.sum, float(seen.sum()))
        if step == 0:
            assert "llm.train.step.duration" not in m.names()  # needs two step boundaries
        else:
            duration = m.histogram("llm.train.step.duration")
            assert duration.count == step and list(duration.explicit_bounds) == list(STEP_DURATION_BUCKETS)
        assert m.histogram("llm.telemetry.overhead").count == step + 1


def test_fixed_interval_samples_every_nth_step_and_decay_uses_consecutive_steps(harness):
    torch.manual_seed(1)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    h = harness(model, optimizer, sampling_interval=3)
    norms = []
    for step in range(7):
        batch, _, _ = gpt_batch(step)
        _, loss = run_forward(model, batch)
        loss.backward()
        norms.append(global_norm(grads_and_params(model)[0]))
        optimizer.step()
        optimizer.zero_grad()
        if step == 3:
            m = h.collect()
            assert rel_close(m.value("llm.grad.norm"), norms[3])
            assert rel_close(m.value("llm.grad.norm_decay_rate"), (norms[2] - norms[3]) / (norms[2] + 1e-8),
                             abs_tol=1e-6)
    m = h.collect()
    assert m.value("llm.telemetry.sampled_steps") == 3  # steps 0, 3, 6
    assert m.value("llm.train.steps") == 7
    assert rel_close(m.value("llm.grad.norm"), norms[6])
    assert m.value("llm.telemetry.sampling_interval") == 3
    assert m.histogram("llm.train.step.duration").count == 6


def test_gradient_accumulation_counts_every_micro_batch(harness):
    torch.manual_seed(2)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    losses, token_losses, tokens = [], [], 0
    for micro in range(2):
        batch, targets, n = gpt_batch(10 + micro)
        logits, loss = run_forward(model, batch)
        (loss / 2).backward()
        losses.append(float(loss.detach()))
        token_losses.append(reference_token_losses(logits, targets, -1))
        tokens += n
    norm = global_norm(grads_and_params(model)[0])
    optimizer.step()
    m = h.collect()
    seen = np.concatenate(token_losses)
    assert rel_close(m.value("llm.train.loss"), float(np.mean(losses)))
    assert m.histogram("llm.loss.token").count == seen.size
    assert rel_close(m.value("llm.loss.token_skewness"), skewness(seen))
    assert m.value("llm.train.tokens") == tokens
    assert m.value("llm.train.steps") == 1
    assert rel_close(m.value("llm.grad.norm"), norm)


def test_token_histogram_is_subsampled_to_the_configured_bound(harness):
    torch.manual_seed(3)
    model = GPT(vocab=VOCAB, block_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling_interval=1, token_loss_samples=100)
    idx = torch.randint(0, VOCAB, (8, 64))
    logits, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    m = h.collect()
    reference = reference_token_losses(logits, idx, -1)
    hist = m.histogram("llm.loss.token")
    assert hist.count == 100
    # a uniform subsample: its mean is within a few standard errors of the full mean
    assert abs(hist.sum / 100 - reference.mean()) < 4 * reference.std() / math.sqrt(100)
    # skewness is over all valid tokens, not the subsample
    assert rel_close(m.value("llm.loss.token_skewness"), skewness(reference))


def test_manual_loss_overrides_and_plain_loss_functions_are_seen(harness):
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    h = harness(model, optimizer, sampling_interval=1)
    idx = torch.randint(0, VOCAB, (2, 8))
    logits = model(idx)
    loss = torch.nn.CrossEntropyLoss(reduction="sum")(logits.view(-1, VOCAB), idx.view(-1))
    loss.backward()
    optimizer.step()
    m = h.collect()
    assert rel_close(m.value("llm.train.loss"), float(loss.detach()) / idx.numel())
    assert m.histogram("llm.loss.token").count == idx.numel()

    logits = model(idx)
    loss = F.cross_entropy(logits.view(-1, VOCAB), idx.view(-1))
    h.session.record_loss(1.25)
    loss.backward()
    optimizer.step()
    assert h.collect().value("llm.train.loss") == 1.25


def test_overhead_includes_the_host_time_of_forward_hooks(harness, monkeypatch):
    """Each attention call of a sampled step is made to take at least 20 ms inside the probe's hook:
    the step's overhead must include all of it (a lower bound that holds on any machine)."""
    import time

    from otel_llm.probes._attention_stats import LayerStatistics

    add = LayerStatistics.add

    def slow_add(self, *args, **kwargs):
        time.sleep(0.02)
        return add(self, *args, **kwargs)

    monkeypatch.setattr(LayerStatistics, "add", slow_add)
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    h = harness(model, optimizer, sampling_interval=1)
    idx = torch.randint(0, VOCAB, (2, 16))
    for _ in range(2):
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    overhead = h.collect().histogram("llm.telemetry.overhead")
    assert overhead.count == 2
    assert overhead.sum >= 2 * len(model.transformer.h) * 0.02
