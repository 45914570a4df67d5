"""What a sampled step costs the device: kernels that do not grow with the model's depth, and bounded memory.

Kernel launches are counted as the aten operations a TorchDispatchMode sees (on this
CPU-only machine, the proxy for GPU launches). Memory is the peak of the bytes the
step's operations allocate and have not yet freed, from the torch profiler's memory
events (what ``torch.cuda.max_memory_allocated`` measures on a GPU, which this machine
lacks).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from otel_llm.probes import _tensor_stats
from tests.models import GPT, tiny_llama

ONLY_OPTIMIZER = "llm.loss.*,llm.logits.*,llm.attention.*,llm.rope.*,llm.activation.*,llm.lora.*,llm.memory.*"


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += 1
        return func(*args, **(kwargs or {}))


def _backward(model: GPT, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (2, 16), generator=generator)
    model(idx, idx)[1].backward()


def _ops_in_step(model: GPT, optimizer: torch.optim.Optimizer, seed: int) -> int:
    _backward(model, seed)
    with CountOps() as counter:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return counter.count


def _statistics_ops(layers: int, harness) -> int:  # noqa: ANN001
    """Operations a sampled step's optimizer statistics add to ``optimizer.step()``."""
    torch.manual_seed(0)
    model = GPT(layers=layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    bare = [_ops_in_step(model, optimizer, seed) for seed in range(3)]
    h = harness(model, optimizer, sampling_interval=1, disabled_signals=ONLY_OPTIMIZER)
    instrumented = [_ops_in_step(model, optimizer, seed) for seed in range(3, 6)]
    h.session.shutdown()
    assert len(set(bare[1:])) == 1 and len(set(instrumented[1:])) == 1, (bare, instrumented)  # after state init
    return instrumented[-1] - bare[-1]


def test_optimizer_statistics_launch_as_many_kernels_for_32_layers_as_for_4(harness, monkeypatch) -> None:  # noqa: ANN001
    # The multi-tensor path is the one accelerators run; this machine has none, so CPU tensors are made to take it
    # (on CPU the statistics loop over tensors on purpose: no launches to save, fewer passes over memory).
    monkeypatch.setattr(_tensor_stats, "PER_TENSOR_DEVICES", frozenset())
    shallow, deep = _statistics_ops(4, harness), _statistics_ops(32, harness)
    assert len(list(GPT(layers=32).parameters())) > 6 * len(list(GPT(layers=4).parameters()))
    assert shallow == deep, (shallow, deep)
    assert 0 < shallow < len(list(GPT(layers=32).parameters())), shallow  # not one kernel per tensor


def _allocated_peak(run) -> int:  # noqa: ANN001
    """Peak bytes allocated and not yet freed while ``run()`` runs, relative to its start."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        run()
    live = peak = 0
    events = [e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


class Wide(torch.nn.Module):
    """Sixteen 512x512 layers: the trainable parameters (16 MiB) dominate a batch-4 step's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(512, 512) for _ in range(16)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


def _step_peak(model: Wide, optimizer: torch.optim.Optimizer, seed: int) -> int:
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(seed))

    def step() -> None:
        model(x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _allocated_peak(step)


def test_a_sampled_step_holds_at_most_a_tenth_of_the_parameters_bytes(harness) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = Wide()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # no optimizer state: the parameters dominate
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bare = max(_step_peak(model, optimizer, seed) for seed in range(3))
    h = harness(model, optimizer, sampling_interval=1, step_memory_floor_mib=0)
    instrumented = max(_step_peak(model, optimizer, seed) for seed in range(3, 6))
    h.session.shutdown()
    extra = instrumented - bare
    assert extra <= 0.1 * param_bytes + 64 * 1024, (extra, param_bytes)
    # the exact path (a whole copy) is what the budget prevents
    exact = harness(model, optimizer, sampling_interval=1, step_memory_fraction=1.0, step_memory_floor_mib=0)
    copied = max(_step_peak(model, optimizer, seed) for seed in range(6, 8))
    exact.session.shutdown()
    assert copied - bare >= 0.9 * param_bytes


def _update_ratios(budget: dict[str, float], steps: int = 4) -> tuple[list[float], list[float]]:
    """(exported, exact) update ratios of a small Llama trained with AdamW; exact from a plain copy."""
    from tests.conftest import Harness

    model = tiny_llama(vocab=256, layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    h = Harness(model, optimizer, sampling_interval=1, **budget)
    exported, exact = [], []
    try:
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            ids = torch.randint(0, 256, (2, 32), generator=generator)
            model(input_ids=ids, labels=ids).loss.backward()
            before = [p.detach().double().clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            delta = sum(float((p.detach().double() - b).square().sum()) for p, b in zip(model.parameters(), before))
            weight = sum(float(b.square().sum()) for b in before)
            exact.append(math.sqrt(delta / weight))
            exported.append(h.collect().value("llm.param.update_ratio"))
    finally:
        h.session.shutdown()
    return exported, exact


def test_the_update_ratio_is_exact_when_the_copy_fits_the_budget() -> None:
    exported, exact = _update_ratios({})
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(exported, exact)), (exported, exact)


@pytest.mark.parametrize("fraction", [0.1, 0.02])
def test_past_the_budget_the_update_ratio_is_estimated_within_its_stated_error(fraction: float) -> None:
    exported, exact = _update_ratios({"step_memory_fraction": fraction, "step_memory_floor_mib": 0})
    elements = sum(p.numel() for p in tiny_llama(vocab=256, layers=2).parameters())
    sampled = elements * fraction
    # the README's bound: relative standard error ~ cv(delta^2) / (2 sqrt(n)); 4 sigma with cv 2
    bound = 4 * 2 / (2 * math.sqrt(sampled))
    errors = [abs(a - b) / b for a, b in zip(exported, exact)]
    assert max(errors) <= bound, (errors, bound)
    assert max(errors) > 0  # a sample, not the exact copy
