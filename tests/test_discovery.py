"""Zero-code discovery: the model is adopted as it enters its first training forward, checkpointing or not.

Sessions here get neither model nor optimizer, as under ``opentelemetry-instrument``.
Activation checkpointing re-runs blocks (reentrant: inside a no-grad first pass and
again in backward; non-reentrant: in backward), which must neither be adopted as the
model nor counted twice. Step 0 must be as complete as any later step. References:
the test's own hooks on an identical twin model without checkpointing
(tests/test_activations.py), run under ``no_grad`` so it is never the one adopted.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.utils.checkpoint

from tests.conftest import rel_close
from tests.test_activations import Capture, batch, build, loss_of, median_thresholds

CHECKPOINTING = ["none", "hf-reentrant", "hf-non-reentrant", "torch-reentrant", "torch-non-reentrant"]


def enable_checkpointing(model: torch.nn.Module, how: str) -> None:
    if how == "none":
        return
    kind, _, mode = how.partition("-")
    reentrant = mode == "reentrant"
    if kind == "hf":
        kwargs = {"use_reentrant": reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    for block in model.transformer.h:  # a script calling torch.utils.checkpoint in its own forward
        forward = block.forward
        block.forward = lambda x, forward=forward: torch.utils.checkpoint.checkpoint(forward, x,
                                                                                     use_reentrant=reentrant)


@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
def test_the_model_is_adopted_at_its_first_training_forward(harness, checkpointing):
    arch = "llama" if checkpointing.startswith("hf") or checkpointing == "none" else "nanogpt"
    if arch == "llama":
        pytest.importorskip("transformers")
    model, twin = build(arch), build(arch)  # same seed, same weights
    model.train()
    twin.train()
    enable_checkpointing(model, checkpointing)
    sparse_at, outlier_at = median_thresholds(twin, arch)
    capture = Capture(twin, arch)
    h = harness(sampling_interval=1, activation_sparsity_threshold=sparse_at,
                activation_outlier_threshold=outlier_at)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = 0
    for step in range(3):
        capture.clear()
        for micro in range(2):
            inputs, mask = batch(arch, seed=10 * step + micro)
            (loss_of(model, inputs) / 2).backward()
            with torch.no_grad():
                loss_of(twin, inputs)
            capture.masks.append(mask)
            tokens += int(mask.sum()) if mask is not None else inputs["idx"].numel()
        optimizer.step()
        optimizer.zero_grad()
        twin.load_state_dict(model.state_dict())
        m = h.collect()
        for layer in range(2):  # step 0 included: the probes were attached before its forward ran
            assert rel_close(m.value("llm.activation.sparsity", llm_layer=str(layer)),
                             capture.sparsity(layer, sparse_at)), (step, layer)
            assert rel_close(m.value("llm.activation.outlier_ratio", llm_layer=str(layer)),
                             capture.outlier_ratio(layer, outlier_at)), (step, layer)
        layers = {point.attributes["llm.layer"] for point in m.points["llm.attention.logit_max"]}
        assert layers == {"0", "1"}, layers
        assert m.value("llm.train.tokens") == tokens
        assert m.value("llm.train.steps") == step + 1


def test_eval_and_frozen_forwards_before_training_are_not_adopted(harness):
    """nanoGPT estimates the loss (eval, no_grad) before its first step; a frozen teacher trains nothing."""
    teacher, model = build("nanogpt"), build("nanogpt")
    teacher.requires_grad_(False)
    h = harness(sampling_interval=1)
    idx = torch.randint(0, 64, (2, 16))
    model.eval()
    with torch.no_grad():
        loss_of(model, {"idx": idx, "targets": idx})
    model.train()
    loss_of(teacher, {"idx": idx, "targets": idx})
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_of(model, {"idx": idx, "targets": idx}).backward()
    optimizer.step()
    assert h.session._model() is model
    assert h.collect().value("llm.train.tokens") == idx.numel()


def test_a_step_without_any_training_forward_says_why_model_signals_are_missing(harness, caplog):
    h = harness(sampling_interval=1)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with caplog.at_level(logging.INFO, logger="otel_llm"):
        (weight * 2).sum().backward()
        optimizer.step()
    assert h.collect().value("llm.grad.norm") == pytest.approx(2 * 3 ** 0.5)
    assert sum("no model was seen training" in r.getMessage() for r in caplog.records) == 1
