"""What a user hands otel_llm from inside the loop never raises into it."""

from __future__ import annotations

import logging

import pytest
import torch

import otel_llm
from otel_llm.runtime.log_once import once
from tests.models import GPT


@pytest.mark.parametrize("bad", [torch.ones(2), "4.2", None, [1.0]], ids=["two-element", "string", "none", "list"])
def test_record_loss_with_a_wrong_value_is_dropped_with_one_warning_on_every_step(harness, caplog, bad):
    """Checked on unsampled steps too (interval 3), so the mistake shows at step 0, not as a crash at step 3."""
    once.forget()
    model = GPT(vocab=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling_interval=3)
    idx = torch.randint(0, 64, (2, 16))
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        for _ in range(4):
            _, loss = model(idx, idx)
            loss.backward()
            h.session.record_loss(bad)
            optimizer.step()
            optimizer.zero_grad()
    warnings = [r for r in caplog.records if "record_loss() takes a number" in r.getMessage()]
    assert len(warnings) == 1
    assert h.collect().value("llm.train.steps") == 4


def test_a_second_instrument_with_another_config_says_the_running_session_was_kept(caplog):
    first = otel_llm.instrument(config=otel_llm.Config(exporters="none"))
    try:
        with caplog.at_level(logging.WARNING, logger="otel_llm"):
            same = otel_llm.instrument(config=otel_llm.Config(exporters="none"))
            second = otel_llm.instrument(config=otel_llm.Config(exporters="none", sampling_interval=7))
        assert first is same is second
        assert second.config.sampling_interval != 7
        assert sum("returned unchanged" in r.getMessage() for r in caplog.records) == 1
    finally:
        first.shutdown()
