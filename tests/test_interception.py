"""The one patching mechanism: reference counting, other people's wrappers, modules imported later."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from otel_llm.probes.interception import Interception
from tests.models import GPT
from tests.support.receivers import GrpcMetricsReceiver
from tests.support.zero_code import INSTRUMENT, SCRIPTS, VENV_BIN, clean_env


def record_calls(call, listeners, args, kwargs):
    result = call(*args, **kwargs)
    for listener in listeners:
        listener(args)
    return result


def module_with(function) -> types.ModuleType:
    module = types.ModuleType("toy")
    module.function = function
    return module


def test_the_patch_is_installed_with_the_first_listener_and_restored_with_the_last():
    def double(x):
        return 2 * x

    toy = module_with(double)
    family = Interception("toy")
    family.patch(toy, "function", record_calls)
    first, second = [], []
    family.add_listener(first.append)
    family.add_listener(second.append)
    assert toy.function is not double and toy.function.__wrapped__ is double
    assert toy.function(3) == 6
    family.remove_listener(first.append)
    assert toy.function(4) == 8 and toy.function is not double
    family.remove_listener(second.append)
    assert toy.function is double
    assert first == [(3,)] and second == [(3,), (4,)]


def test_a_wrapper_installed_before_ours_stays_in_the_chain():
    def base(x):
        return x + 1

    toy = module_with(base)
    theirs_calls = []

    def theirs(x):
        theirs_calls.append(x)
        return base(x)

    toy.function = theirs  # e.g. a profiler or the script's own shim, installed after import
    family = Interception("toy")
    family.patch(toy, "function", record_calls)
    seen = []
    family.add_listener(seen.append)
    assert toy.function(1) == 2
    assert theirs_calls == [1] and seen == [(1,)]
    family.remove_listener(seen.append)
    assert toy.function is theirs


def test_a_wrapper_installed_over_ours_is_left_alone_and_ours_is_not_stacked_twice():
    def base(x):
        return x * 10

    toy = module_with(base)
    family = Interception("toy")
    family.patch(toy, "function", record_calls)
    seen = []
    family.add_listener(seen.append)
    ours = toy.function

    def theirs(x):
        return ours(x)

    theirs.__wrapped__ = ours  # what functools.wraps records
    toy.function = theirs
    family.remove_listener(seen.append)
    assert toy.function is theirs  # not torn out from under them
    assert toy.function(2) == 20 and seen == []  # ours is a pass-through without listeners
    family.add_listener(seen.append)
    assert toy.function is theirs  # found in their chain, not wrapped again
    assert toy.function(3) == 30 and seen == [(3,)]  # delivered once
    family.remove_listener(seen.append)


def test_a_class_of_a_module_imported_later_is_patched_on_import(tmp_path, monkeypatch):
    (tmp_path / "late_module_for_otel_llm.py").write_text(
        "class Cache:\n    def update(self, x):\n        return x + 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "late_module_for_otel_llm" not in sys.modules
    family = Interception("late")
    family.patch("late_module_for_otel_llm:Cache", "update", record_calls)
    seen = []
    family.add_listener(seen.append)
    try:
        import late_module_for_otel_llm

        cache = late_module_for_otel_llm.Cache()
        assert cache.update(1) == 101
        assert len(seen) == 1 and seen[0][1] == 1
    finally:
        family.remove_listener(seen.append)
        sys.modules.pop("late_module_for_otel_llm", None)
    assert late_module_for_otel_llm.Cache.update.__name__ == "update"
    assert not hasattr(late_module_for_otel_llm.Cache.update, "__wrapped__")


def test_a_scripts_own_attention_wrapper_keeps_running_under_a_session(harness):
    """A wrapper the script put on F.scaled_dot_product_attention before instrumenting keeps being called."""
    torch_sdpa = F.scaled_dot_product_attention
    calls = []

    def scripts_sdpa(*args, **kwargs):
        calls.append(1)
        return torch_sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = scripts_sdpa
    try:
        torch.manual_seed(0)
        model = GPT(vocab=64, block_size=16, heads=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        h = harness(model, optimizer, sampling_interval=1)
        idx = torch.randint(0, 64, (2, 16))
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        assert len(calls) == len(model.transformer.h)  # one call per layer, through our wrapper and theirs
        assert h.collect().value("llm.attention.logit_max", llm_layer="0") > 0
        h.session.shutdown()
        assert F.scaled_dot_product_attention is scripts_sdpa
    finally:
        F.scaled_dot_product_attention = torch_sdpa


def run_wrapping_script(order: str, zero_code: bool, receiver: GrpcMetricsReceiver | None) -> dict:
    """tests/scripts/wrapped_functions_train.py in a subprocess; its RESULT line."""
    env = {**clean_env(), "WRAP_ORDER": order, "TRAIN_STEPS": "6"}
    if receiver is not None:
        env.update(OTEL_METRICS_EXPORTER="otlp", OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="grpc",
                   OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=receiver.url, OTEL_EXPORTER_OTLP_METRICS_INSECURE="true",
                   OTEL_LLM_SAMPLING="fixed", OTEL_LLM_SAMPLING_INTERVAL="1")
    command = [str(VENV_BIN / "python"), str(SCRIPTS / "wrapped_functions_train.py")]
    result = subprocess.run([str(INSTRUMENT), *command] if zero_code else command, env=env, capture_output=True,
                            text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def uninstrumented_wrapping_run() -> dict:
    return run_wrapping_script("plain", zero_code=False, receiver=None)


@pytest.mark.slow
@pytest.mark.parametrize(("order", "zero_code"), [("plain", True), ("instrument-first", False),
                                                  ("wrap-first", False)],
                         ids=["zero-code", "instrument-then-wrap", "wrap-then-instrument"])
def test_a_scripts_own_wrappers_run_as_often_and_training_is_bitwise_identical(uninstrumented_wrapping_run, order,
                                                                               zero_code):
    """Whichever of the script and otel_llm wraps first, the script's wrappers (one of which changes
    the attention output) run exactly as often as without otel_llm, every loss and final parameter is
    bitwise the same, and otel_llm still measures attention and the loss through them."""
    with GrpcMetricsReceiver() as receiver:
        run = run_wrapping_script(order, zero_code, receiver)
        assert receiver.wait_for(["llm.attention.logit_max", "llm.loss.token", "llm.grad.norm"]), \
            sorted(receiver.metric_names())
    assert uninstrumented_wrapping_run["calls"] == {"sdpa": 6 * 2, "cross_entropy": 6}  # 2 layers, 6 steps
    assert run == uninstrumented_wrapping_run
