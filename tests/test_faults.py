"""otel_llm never alters training: results and the global RNG are bitwise identical without it.

NaN/Inf storms, failing probes and host-device syncs are covered by
tests/reliability/test_training_faults.py.
"""

from __future__ import annotations

import torch

from tests.models import GPT

VOCAB = 64


def train(model, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (2, 16), generator=g)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def test_training_results_are_bitwise_identical_with_and_without_instrumentation(harness):
    def run(instrumented: bool):
        torch.manual_seed(0)
        model = GPT(vocab=VOCAB)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if instrumented:
            harness(model, optimizer, sampling="fixed", sampling_interval=1)
        losses = train(model, optimizer, steps=4)
        return losses, [p.detach().clone() for p in model.parameters()], torch.rand(3)

    bare_losses, bare_params, bare_rng = run(False)
    inst_losses, inst_params, inst_rng = run(True)
    assert all(torch.equal(a, b) for a, b in zip(bare_losses, inst_losses))
    assert all(torch.equal(a, b) for a, b in zip(bare_params, inst_params))
    assert torch.equal(bare_rng, inst_rng)  # the global RNG stream is untouched
