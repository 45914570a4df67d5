"""A learning rate blown up mid-run: anomaly events for the gradient signals, sampling back at its minimum.

Real pieces only: a tiny GPT trained in-process, the default adaptive policy and SAX
detector (growth shortened so the interval has room to fall), scraped over HTTP.
"""

from __future__ import annotations

import logging

import pytest
import torch

import otel_llm
from tests.models import GPT
from tests.support.backends import free_port
from tests.support.scrape import scrape

pytestmark = pytest.mark.slow

BLOW_UP_STEP = 200
STEPS = 320
MIN_INTERVAL = 10


def anomaly_events(samples: dict) -> dict[str, float]:
    return {dict(labels)["llm_signal"]: value for (name, labels), value in samples.items()
            if name == "llm_anomaly_events_total"}


def gauge(samples: dict, name: str) -> float:
    (found,) = [value for (n, _), value in samples.items() if n == name]
    return found


def test_blown_up_learning_rate_raises_anomalies_and_tightens_sampling(sessions, caplog):
    torch.manual_seed(0)
    model = GPT(vocab=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = otel_llm.Config(exporters="prometheus", prometheus_port=free_port(), sampling="adaptive",
                             sampling_warmup=100, sampling_min_interval=MIN_INTERVAL,
                             sampling_growth_steps=20, sampling_max_interval=80,
                             anomaly_baseline=32)  # judged from the 40th sample: before the blow-up
    session = otel_llm.Instrumentation(model, optimizer, config=config)
    sessions.append(session)
    intervals: list[int] = []
    before = tightened = None
    with caplog.at_level(logging.WARNING, logger="otel_llm"):
        for step in range(STEPS):
            if step == BLOW_UP_STEP:
                session.flush()
                before = scrape(session.prometheus_url)
                for group in optimizer.param_groups:
                    group["lr"] *= 1000
            idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
            _, loss = model(idx, idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            intervals.append(session.sampling_interval)
            if step > BLOW_UP_STEP and tightened is None and intervals[-1] == MIN_INTERVAL:
                session.flush()
                tightened = scrape(session.prometheus_url)
    session.flush()
    after = scrape(session.prometheus_url)

    assert intervals[:19] == [1] * 19 and intervals[105] == MIN_INTERVAL  # dense warm-up, then the minimum
    assert gauge(before, "llm_telemetry_sampling_interval") > MIN_INTERVAL  # it had grown before the blow-up
    assert tightened is not None, intervals[BLOW_UP_STEP:]
    assert gauge(tightened, "llm_telemetry_sampling_interval") == MIN_INTERVAL
    rose = {signal: count - anomaly_events(before).get(signal, 0.0) for signal, count in anomaly_events(after).items()}
    gradient_signals = {s for s, increase in rose.items() if increase > 0 and s.startswith(("llm.grad.", "llm.param."))}
    assert "llm.grad.norm" in gradient_signals, rose
    warnings = [r.getMessage() for r in caplog.records if "anomaly in llm.grad.norm" in r.getMessage()]
    assert any(f"at step {s}" in w for w in warnings for s in range(BLOW_UP_STEP, STEPS)), warnings
