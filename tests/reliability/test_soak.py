"""Hooks come and go without a trace, and a long run does not grow.

A thousand sessions attached to and removed from one LoRA Llama (every probe,
every wrapped function) leave no hook, no wrapper, no thread and no reference
behind; ten thousand training steps of a tiny model keep the process's
resident memory flat; the model is freed once the training loop lets go of it.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
import torch.nn.modules.module as module_globals
import torch.optim.optimizer as optimizer_globals

import otel_llm
from tests.models import GPT, padded_rows, tiny_lora_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CYCLES = 1000
STEPS = 10_000
WARM_UP = 1000
SOAK_INTERVAL = 50
RSS_EVERY = 500
MB = 1 << 20

MODULE_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
GLOBAL_HOOKS = [(module_globals, name) for name in ("_global_forward_hooks", "_global_forward_hooks_with_kwargs",
                                                    "_global_forward_hooks_always_called", "_global_forward_pre_hooks",
                                                    "_global_backward_hooks", "_global_backward_pre_hooks")]
GLOBAL_HOOKS += [(optimizer_globals, "_global_optimizer_pre_hooks"),
                 (optimizer_globals, "_global_optimizer_post_hooks")]


def hooks(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Counter[str]:
    """Every hook torch keeps for this model and optimizer, and the global ones, by where it is kept."""
    found: Counter[str] = Counter()
    for module in model.modules():
        for name in MODULE_HOOKS:
            found[f"module.{name}"] += len(getattr(module, name))
    for param in model.parameters():
        found["param._backward_hooks"] += len(param._backward_hooks or {})
        found["param._post_accumulate_grad_hooks"] += len(param._post_accumulate_grad_hooks or {})
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        found[f"optimizer.{name}"] += len(getattr(optimizer, name))
    for owner, name in GLOBAL_HOOKS:
        found[name] += len(getattr(owner, name))
    return +found  # drop the zero counts


def wrapped_functions() -> list[str]:
    """Functions torch and transformers call at run time whose code now lives in otel_llm."""
    import transformers.cache_utils as cache_utils
    import transformers.models.llama.modeling_llama as modeling_llama

    candidates: dict[str, Callable[..., object]] = {
        "F.cross_entropy": F.cross_entropy, "F.scaled_dot_product_attention": F.scaled_dot_product_attention,
        "F.softmax": F.softmax, "llama.eager_attention_forward": modeling_llama.eager_attention_forward,
        "Cache.update": cache_utils.Cache.update}
    return [name for name, function in candidates.items()
            if os.sep + "otel_llm" + os.sep in getattr(getattr(function, "__code__", None), "co_filename", "")]


def otel_llm_threads(settle_to: int | None = None) -> int:
    """Live threads otel_llm started; with ``settle_to``, first wait up to 2 s for closing ones to finish."""
    deadline = time.monotonic() + 2.0
    while True:
        alive = sum(thread.name.startswith("otel_llm") for thread in threading.enumerate())
        if settle_to is None or alive <= settle_to or time.monotonic() >= deadline:
            return alive
        time.sleep(0.01)


def rss() -> int:
    return psutil.Process().memory_info().rss


def lora_batch() -> dict[str, torch.Tensor]:
    rows = padded_rows(2)
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def test_a_thousand_sessions_on_one_model_leave_nothing_behind():
    model = tiny_lora_llama()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = lora_batch()
    before_hooks, before_threads = hooks(model, optimizer), otel_llm_threads()
    assert wrapped_functions() == []
    config = otel_llm.Config(exporters="none", sampling="fixed", sampling_interval=1)
    session_refs: list[weakref.ref[otel_llm.Instrumentation]] = []
    memory: list[int] = []
    for cycle in range(CYCLES):
        session = otel_llm.Instrumentation(model, optimizer, config=config)
        if cycle % 100 == 0:  # a sampled training step through every hook, and the control: hooks are seen
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            assert session.step == 1
            attached = hooks(model, optimizer)
            assert sum(attached.values()) > sum(before_hooks.values())
            assert wrapped_functions() == ["F.cross_entropy", "F.scaled_dot_product_attention", "F.softmax",
                                           "llama.eager_attention_forward", "Cache.update"]
            gc.collect()
            memory.append(rss())
        session.shutdown()
        session_refs.append(weakref.ref(session))
        del session
    gc.collect()
    leaked = {name: count - before_hooks[name] for name, count in hooks(model, optimizer).items()
              if count != before_hooks[name]}
    growth = (memory[-1] - memory[1]) / MB  # cycle 100 to cycle 900
    sessions_alive = sum(ref() is not None for ref in session_refs)
    threads_left = otel_llm_threads(settle_to=before_threads) - before_threads
    print(f"{CYCLES} sessions: hooks left {leaked}, wrapped {wrapped_functions()}, sessions alive {sessions_alive}, "
          f"threads left {threads_left}, RSS growth {growth:.1f} MB")
    assert leaked == {}
    assert wrapped_functions() == []
    assert sessions_alive == 0
    assert threads_left <= 0
    assert growth < 20

    model_ref = weakref.ref(model)
    del model, optimizer, batch
    gc.collect()
    assert model_ref() is None


def test_ten_thousand_steps_keep_memory_flat(harness):
    torch.manual_seed(0)
    model = GPT(vocab=32, block_size=8, dim=16, heads=2, layers=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    h = harness(model, optimizer, sampling="fixed", sampling_interval=SOAK_INTERVAL)
    g = torch.Generator().manual_seed(0)
    samples: list[tuple[int, int]] = []
    for step in range(STEPS):
        idx = torch.randint(0, 32, (2, 8), generator=g)
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % RSS_EVERY == 0:
            h.collect()  # the reader drains the SDK too, as an exporter would
            if step + 1 >= WARM_UP:
                gc.collect()
                samples.append((step + 1, rss()))
    steps, memory = np.array(samples, dtype=np.float64).T
    slope = np.polyfit(steps, memory / MB, 1)[0] * 1000
    growth = (memory.max() - memory[0]) / MB
    print(f"{STEPS} steps: RSS {memory[0] / MB:.0f} MB after warm-up, growth {growth:.1f} MB, "
          f"slope {slope:.3f} MB per 1000 steps")
    m = h.collect()
    assert m.value("llm.train.steps") == STEPS
    assert m.value("llm.telemetry.sampled_steps") == STEPS // SOAK_INTERVAL
    assert growth < 20
    assert slope < 1.0  # MB per 1000 steps: flat, allowing allocator noise

    h.session.shutdown()
    model_ref = weakref.ref(model)
    del model, optimizer, loss
    gc.collect()
    assert model_ref() is None
