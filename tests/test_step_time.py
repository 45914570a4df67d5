"""Where the wall time goes: input wait, compute and checkpoint saves, against the test's own clock.

A DataLoader sleeps a known time per batch and the loop saves a checkpoint
mid-run; the test times each phase itself with perf_counter around the same
calls and compares the histograms' sums within 10%.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from otel_llm.catalog import TRAIN_LAST_STEP
from otel_llm.probes.peak_memory import peak_rss
from tests.models import GPT

VOCAB = 64
WAIT = 0.04


class SlowBatches(IterableDataset):
    """Batches that take WAIT seconds each to produce (a slow input pipeline)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(self.count):
            time.sleep(WAIT)
            yield torch.randint(0, VOCAB, (4, 16), generator=generator)


def test_input_wait_compute_and_checkpoint_split_the_step_within_ten_percent(harness, tmp_path):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, dim=64, layers=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    updated = []  # registered before the session's hook, so it runs first: the end of the update itself
    optimizer.register_step_post_hook(lambda *_: updated.append(time.perf_counter()))
    h = harness(model, optimizer, sampling_interval=4)
    big = torch.randn(8_000_000)  # ~32 MB: a save long enough to time
    waits, computes, saves, ends = [], [], [], []
    loader = iter(DataLoader(SlowBatches(12), batch_size=None))
    for step in range(12):
        started = time.perf_counter()
        idx = next(loader)
        fetched = time.perf_counter()
        if step:
            waits.append(fetched - started)
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
        ends.append(time.perf_counter())  # after otel_llm published the step: waiting for input starts
        computes.append(updated[-1] - fetched)
        if step == 5:  # a checkpoint between two steps: not input wait
            begun = time.perf_counter()
            torch.save({"model": model.state_dict(), "big": big}, tmp_path / "checkpoint.pt")
            saves.append(time.perf_counter() - begun)
    metrics = h.collect()
    wait, compute = metrics.histogram("llm.train.input_wait.duration"), metrics.histogram("llm.train.compute.duration")
    checkpoint = metrics.histogram("llm.train.checkpoint.duration")
    assert (wait.count, compute.count, checkpoint.count) == (11, 12, 1)
    assert wait.sum == pytest.approx(sum(waits), rel=0.1)
    assert compute.sum == pytest.approx(sum(computes), rel=0.1)
    assert checkpoint.sum == pytest.approx(saves[0], rel=0.1)
    # goodput of the last sampled step's window (steps 5..8, the save included): compute over wall time
    goodput = sum(computes[5:9]) / (ends[8] - ends[4])
    assert metrics.value("llm.train.goodput") == pytest.approx(goodput, rel=0.1)
    assert goodput < 0.9  # the sleeping loader really costs goodput


def test_nested_saves_are_one_checkpoint(harness, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "pretrained", safe_serialization=False)  # calls torch.save inside
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert h.collect().histogram("llm.train.checkpoint.duration").count == 2


def test_last_step_timestamp_is_the_unix_time_of_the_last_step_on_every_step(harness):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=100)  # only step 0 is sampled: the gauge must not wait for one
    for _ in range(5):
        idx = torch.randint(0, VOCAB, (2, 16))
        model(idx, idx)[1].backward()
        before = time.time()
        optimizer.step()
        after = time.time()
        optimizer.zero_grad()
    assert before <= h.collect().value(TRAIN_LAST_STEP) <= after


def test_peak_memory_is_the_window_peak_and_is_reset_at_each_sampled_step(harness):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    peaks = []
    for step in range(3):
        idx = torch.randint(0, VOCAB, (2, 16))
        loss = model(idx, idx)[1]
        if step == 1:  # 256 MB held for a moment inside step 1 only
            scratch = torch.ones(64 * 1024 * 1024)
            del scratch
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        peaks.append(h.collect().value("llm.memory.peak_allocated", llm_device="cpu"))
    resident = int(open("/proc/self/statm").read().split()[1]) * 4096  # independent: current RSS after the step
    assert peaks[1] >= resident + 200 * 2**20  # the 256 MB tensor is in step 1's peak
    assert peaks[2] < peaks[1] - 200 * 2**20  # and gone from step 2's: the peak was reset
    assert peak_rss() is not None
