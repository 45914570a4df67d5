"""Optimizer wrappers: the torch optimizer inside is followed; an unknown wrapper is named once, never raised."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import otel_llm
from otel_llm.runtime import rank


class HomeGrownWrapper:
    """What a framework's optimizer wrapper looks like: not a torch optimizer, stepping one."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


def test_an_unknown_wrapper_is_named_once_and_its_torch_optimizer_followed(harness, caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    wrapper = HomeGrownWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with caplog.at_level(logging.INFO, logger="otel_llm"):
        h = harness(model, wrapper, sampling_interval=1)
        for _ in range(3):
            model(torch.randn(2, 4)).square().mean().backward()
            grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            wrapper.step()
            wrapper.zero_grad()
    named = [r for r in caplog.records if "HomeGrownWrapper" in r.getMessage()]
    assert len(named) == 1 and "as a plain one" in named[0].getMessage()
    m = h.collect()
    assert m.value("llm.train.steps") == 3
    assert m.value("llm.grad.norm") == pytest.approx(float(grads.norm()), rel=1e-6)


def test_something_that_wraps_no_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="wrapper of one"):
        otel_llm.instrument(torch.nn.Linear(2, 2), object())


@pytest.mark.parametrize(("orig_argv", "argv0", "launcher"), [
    (["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", "train.py"], "-m", True),
    (["python", "-m", "torch.distributed.run", "train.py"], "-m", True),
    (["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"], "/venv/bin/deepspeed", True),
    (["/venv/bin/python", "/venv/bin/torchrun", "train.py"], "/venv/bin/torchrun", True),
    (["python", "-u", "train.py", "--local_rank=0"], "train.py", False),
    (["python", "-m", "my_project.train"], "-m", False),
])
def test_launcher_processes_are_told_from_workers(monkeypatch, orig_argv, argv0, launcher):
    """At zero-code start (``site``) ``python -m x`` still has ``-m`` in sys.argv[0]: the command line decides."""
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", [argv0, *orig_argv[orig_argv.index(argv0) + 1:]] if argv0 in orig_argv
                        else [argv0])
    assert rank.is_launcher() is launcher
