"""Where ``llm.train.loss`` comes from when the loss never goes through ``F.cross_entropy``.

A model with a fused (hand-written) loss head returns a Hugging Face
``ModelOutput``: the exported loss is the mean of the model's own losses over
the step's micro-batches, the loss-shape family is absent, and one info line
says why. A loss the loop records itself still wins.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from tests.conftest import rel_close

transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402

VOCAB = 32


class FusedHeadModel(nn.Module):
    """Cross-entropy written out (logsumexp minus the target logit), as fused kernels compute it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> CausalLMOutput:
        logits = self.head(self.embed(input_ids)).flatten(0, 1)
        per_token = torch.logsumexp(logits, dim=-1) - logits.gather(1, labels.reshape(-1, 1)).squeeze(1)
        return CausalLMOutput(loss=per_token.mean())


@pytest.mark.parametrize("discovered", [False, True], ids=["explicit", "discovered"])
def test_a_fused_loss_is_read_from_the_model_output(harness, caplog, discovered):
    torch.manual_seed(0)
    model = FusedHeadModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    h = harness(sampling_interval=1) if discovered else harness(model, optimizer, sampling_interval=1)
    with caplog.at_level(logging.INFO, logger="otel_llm"):
        for step in range(2):
            losses = []
            for micro in range(2):
                ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(10 * step + micro))
                loss = model(input_ids=ids, labels=ids).loss
                (loss / 2).backward()
                losses.append(float(loss))
            optimizer.step()
            optimizer.zero_grad()
            m = h.collect()
            assert rel_close(m.value("llm.train.loss"), sum(losses) / 2, rel=1e-6)
            assert not {"llm.loss.token", "llm.loss.token_skewness", "llm.logits.z_loss"} & m.names()
    assert sum("not computed through torch.nn.functional.cross_entropy" in r.getMessage()
               for r in caplog.records) == 1


def test_a_recorded_loss_wins_over_the_model_output(harness):
    model = FusedHeadModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    h = harness(model, optimizer, sampling_interval=1)
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    h.session.record_loss(1.25)
    optimizer.step()
    assert h.collect().value("llm.train.loss") == 1.25
