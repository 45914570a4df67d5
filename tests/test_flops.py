"""FLOPs executed and MFU, checked against the matmul count of the model's shapes written out here.

The reference counts 2 FLOPs per multiply-add of every matmul a transformer
runs: 6 x (matmul weights) x tokens for the projections forward and backward,
and per layer 4 x batch x sequence^2 x hidden for the attention scores and
values forward, three times over with backward (eager attention, the math SDPA
kernel) or 3.5 times (SDPA's flash kernel, whose backward recomputes the
scores: torch's own formula).
"""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from otel_llm.probes._peak_flops import peak_flops
from otel_llm.probes.flops import analytic_flops
from otel_llm.runtime.log_once import once
from tests.models import GPT, tiny_llama

VOCAB = 64


def tiny_gpt2(attention: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      attn_implementation=attention, bos_token_id=0, eos_token_id=0))


def matmul_weights(model: torch.nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))


def reference_flops(model, batch: int, sequence: int, layers: int, hidden: int, attention_factor: float) -> int:
    tokens = batch * sequence
    return 6 * matmul_weights(model) * tokens + int(attention_factor * 4 * batch * sequence**2 * hidden * layers)


def train(model, optimizer, shapes, sleep: float = 0.0):
    generator = torch.Generator().manual_seed(1)
    for batch, sequence in shapes:
        time.sleep(sleep)
        ids = torch.randint(0, VOCAB, (batch, sequence), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("make, factor", [(lambda: tiny_gpt2("eager"), 3.0), (lambda: tiny_gpt2("sdpa"), 3.0),
                                          (tiny_llama, 3.5)], ids=["gpt2-eager", "gpt2-sdpa", "llama-sdpa"])
def test_flops_equal_the_matmul_count_of_gpt2_and_llama_shapes(harness, make, factor):
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)  # every probe runs: their own matmuls must not count
    train(model, optimizer, [(2, 12)] * 3)
    expected = 3 * reference_flops(model, 2, 12, layers=2, hidden=32, attention_factor=factor)
    assert h.collect().value("llm.train.flops", llm_flops_method="counted") == expected
    # the fallback estimate (parameters outside embeddings, eager attention) is within 10% of the count
    estimate = analytic_flops(model, 2, 12)
    assert abs(estimate - expected / 3) <= 0.1 * expected / 3


def test_each_input_shape_is_counted_once(harness, monkeypatch):
    entered = []
    real_enter = FlopCounterMode.__enter__

    def spy(self):  # records the call, then runs the real counter
        entered.append(self)
        return real_enter(self)

    monkeypatch.setattr(FlopCounterMode, "__enter__", spy)
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=2)
    train(model, optimizer, [(2, 12), (2, 12), (3, 8), (2, 12), (3, 8)])
    assert len(entered) == 2
    expected = (3 * reference_flops(model, 2, 12, 2, 32, 3.5) + 2 * reference_flops(model, 3, 8, 2, 32, 3.5))
    assert h.collect().value("llm.train.flops", llm_flops_method="counted") == expected


def test_gradient_accumulation_counts_every_micro_batch(harness):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    for _ in range(2):
        for _micro in range(3):
            idx = torch.randint(0, VOCAB, (2, 16))
            model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    per_micro_batch = 6 * matmul_weights(model) * 32 + int(3.5 * 4 * 2 * 16**2 * 32 * 2)  # nanoGPT: SDPA causal
    assert h.collect().value("llm.train.flops", llm_flops_method="counted") == 6 * per_micro_batch


def test_counting_flops_leaves_training_bitwise_identical(harness):
    def run(instrumented: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = GPT(vocab=VOCAB)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if instrumented:
            harness(model, optimizer, sampling_interval=1)
        generator = torch.Generator().manual_seed(3)
        for batch in (2, 2, 3):  # two shapes: two counted steps
            idx = torch.randint(0, VOCAB, (batch, 16), generator=generator)
            model(idx, idx)[1].backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    plain, counted = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, counted))


def test_mfu_is_achieved_flops_over_peak_as_computed_by_hand(harness):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=3, peak_flops=2e9)
    ends = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):  # sampled: 0, 3, 6; the window 3 -> 6 holds no count
        time.sleep(0.03)
        ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
        optimizer.zero_grad()
    achieved = 3 * reference_flops(model, 2, 12, 2, 32, 3.5) / (ends[6] - ends[3])
    mfu = h.collect().value("llm.train.mfu")
    assert mfu == pytest.approx(achieved / 2e9, rel=0.1)


def test_no_mfu_series_without_a_peak(harness, caplog):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    once.forget()  # the line is once per process: earlier tests may have said it
    with caplog.at_level(logging.INFO, logger="otel_llm"):
        train(model, optimizer, [(2, 12)] * 3)
    metrics = h.collect()
    assert "llm.train.mfu" not in metrics.names() and "llm.train.flops" in metrics.names()
    assert [r.getMessage() for r in caplog.records if "peak FLOP/s" in r.getMessage()] == [
        "otel_llm: no peak FLOP/s known for cpu in fp32; set OTEL_LLM_PEAK_FLOPS (per device) to export llm.train.mfu"]


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12), ("NVIDIA H100 PCIe", "bf16", 756.5e12),
    ("NVIDIA H100 NVL", "fp16", 835.5e12), ("NVIDIA H200", "bf16", 989.4e12), ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100-PCIE-40GB", "tf32", 156e12), ("NVIDIA L4", "bf16", 121e12), ("Tesla V100-SXM2-16GB", "bf16", None),
    ("NVIDIA GeForce RTX 9090", "bf16", None), ("cpu", "fp32", None)])
def test_peak_table_by_device_name_and_dtype(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


@torch.library.custom_op("otel_llm_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


_double.register_autograd(lambda ctx, grad: grad * 2)


@register_flop_formula(torch.ops.otel_llm_test.double)
def _broken_formula(*args, **kwargs) -> int:
    raise RuntimeError("a FLOP formula that cannot handle its op")


class _DoublingGPT(GPT):
    """nanoGPT whose embeddings pass through an op whose FLOP formula raises."""

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = torch.ops.otel_llm_test.double(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def test_a_failing_count_falls_back_to_the_analytic_estimate_with_one_line(harness, caplog):
    torch.manual_seed(0)
    model = _DoublingGPT(vocab=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    once.forget()
    with caplog.at_level(logging.INFO, logger="otel_llm"):
        for _ in range(3):
            idx = torch.randint(0, VOCAB, (2, 16))
            model(idx, idx)[1].backward()
            optimizer.step()
            optimizer.zero_grad()
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    outside = sum(p.numel() for p in model.parameters()) - embeddings  # no config: no attention term
    metrics = h.collect()
    assert metrics.value("llm.train.flops", llm_flops_method="analytic") == 3 * 6 * outside * 32
    assert "counted" not in {p.attributes.get("llm.flops.method") for p in metrics.points["llm.train.flops"]}
    lines = [r.getMessage() for r in caplog.records if "analytic" in r.getMessage()]
    assert lines == ["otel_llm: FlopCounterMode failed; llm.train.flops uses the analytic estimate 6 x parameters "
                     "x tokens + attention (llm.flops.method=analytic)"]
