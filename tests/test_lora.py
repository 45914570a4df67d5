"""#14 LoRA rank activation ratio and the lora_a / lora_b groups of #2 equal references computed here.

The reference reads z = lora_A(dropout(x)) with the test's own hooks (PEFT) or
recomputes z = x @ lora_A.T from the owning module's input (bare-parameter
factors), takes sum over real tokens of z_j^2, and computes the effective rank
ratio in float64; gradient sparsity is read from the LoRA parameters' gradients
just before the optimizer step.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.conftest import rel_close
from tests.models import tiny_llama

peft = pytest.importorskip("peft")

VOCAB = 64


def llama_batch(seed: int, rows: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def peft_llama(r: int = 4, dropout: float = 0.1, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")):
    model = tiny_llama(VOCAB)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets))
    return peft.get_peft_model(model, config)


def ratio_of(square_sums: torch.Tensor) -> float:
    p = square_sums / square_sums.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum())) / square_sums.numel()


class LoraCapture:
    """z of every LoRA down-projection in every training forward, with the call's attention mask."""

    def __init__(self, model: nn.Module) -> None:
        self.z: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = defaultdict(list)
        self._mask: torch.Tensor | None = None
        model.register_forward_pre_hook(self._enter, with_kwargs=True)
        for name, module in model.named_modules():
            if name.rpartition(".")[0].endswith("lora_A") and isinstance(module, nn.Linear):  # PEFT ModuleDict
                module.register_forward_hook(self._output(name))
            elif isinstance(module, nn.Linear) and name.endswith(".lora_A"):  # a model's own factor module
                module.register_forward_hook(self._output(name))
            elif isinstance(getattr(module, "lora_A", None), nn.Parameter):  # bare (r, in_features) factor
                module.register_forward_pre_hook(self._input(name, module.lora_A))

    def _enter(self, module, args, kwargs) -> None:
        self._mask = kwargs.get("attention_mask")

    def _output(self, name: str) -> Callable:
        def hook(module, args, out):
            if module.training:
                self.z[name].append((out.detach().double().clone(), self._mask))

        return hook

    def _input(self, name: str, factor: torch.Tensor) -> Callable:
        def hook(module, args):
            if module.training:
                self.z[name].append(((args[0].detach().double() @ factor.detach().double().T), self._mask))

        return hook

    def clear(self) -> None:
        self.z.clear()

    def ratios_by_layer(self) -> dict[int, float]:
        per_layer: dict[int, list[float]] = defaultdict(list)
        for name, records in self.z.items():
            sums = sum((z.reshape(-1, z.shape[-1])[m.reshape(-1).bool()] if m is not None
                        else z.reshape(-1, z.shape[-1])).square().sum(dim=0) for z, m in records)
            layer = int(re.search(r"(?:layers|h)\.(\d+)\.", name).group(1))
            per_layer[layer].append(ratio_of(sums))
        return {layer: sum(values) / len(values) for layer, values in per_layer.items()}


def grad_sparsity(model: nn.Module, part: str) -> float:
    grads = [p.grad.detach().double().reshape(-1) for n, p in model.named_parameters()
             if part in n.split(".") and p.grad is not None]
    return float((torch.cat(grads).abs() <= 1e-5).double().mean())


def check_step(m, capture: LoraCapture, sparsity: dict[str, float]) -> None:
    expected = capture.ratios_by_layer()
    assert set(expected) == {0, 1}
    for layer, ratio in expected.items():
        assert 0 < ratio <= 1
        assert rel_close(m.value("llm.lora.rank_activation_ratio", llm_layer=str(layer)), ratio), (layer, ratio)
    for group, value in sparsity.items():
        assert rel_close(m.value("llm.grad.sparsity", llm_param_group=group), value), (group, value)


def test_peft_lora_trained_by_hand(harness):
    model = peft_llama()
    model.train()
    capture = LoraCapture(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    h = harness(model, optimizer, sampling_interval=1)
    seen = []
    for step in range(3):
        capture.clear()
        for micro in range(2):
            (model(**llama_batch(10 * step + micro)).loss / 2).backward()
        sparsity = {"lora_a": grad_sparsity(model, "lora_A"), "lora_b": grad_sparsity(model, "lora_B")}
        seen.append(sparsity["lora_a"])
        optimizer.step()
        optimizer.zero_grad()
        check_step(h.collect(), capture, sparsity)
    assert seen[0] == 1.0 and seen[-1] < 1.0  # lora_B starts at zero, so lora_A's first gradients are zero


def test_only_the_active_adapter_is_measured(harness):
    model = peft_llama(r=4)
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj"]))
    model.set_adapter("second")
    model.train()
    capture = LoraCapture(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    h = harness(model, optimizer, sampling_interval=1)
    for step in range(2):
        capture.clear()
        model(**llama_batch(step)).loss.backward()
        sparsity = {"lora_a": grad_sparsity(model, "lora_A"), "lora_b": grad_sparsity(model, "lora_B")}
        optimizer.step()
        optimizer.zero_grad()
        assert capture.z and all(".second" in name for name in capture.z)
        check_step(h.collect(), capture, sparsity)


class LoraLinear(nn.Linear):
    """loralib style: bare parameters lora_A (r, in) and lora_B (out, r), dropout before lora_A."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora_A.T @ self.lora_B.T


class LoraModules(nn.Module):
    """Low-rank factors as modules named lora_A / lora_B."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def test_plain_model_naming_its_factors(harness):
    from tests.models import GPT

    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    for block in model.transformer.h:
        block.attn.c_attn = LoraLinear(block.attn.c_attn, r=4)
        block.mlp.c_fc = LoraModules(block.mlp.c_fc, r=8)
    capture = LoraCapture(model)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-2)
    h = harness(model, optimizer, sampling_interval=1)
    for step in range(2):
        capture.clear()
        idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))
        model(idx, idx)[1].backward()
        sparsity = {"lora_a": grad_sparsity(model, "lora_A"), "lora_b": grad_sparsity(model, "lora_B")}
        optimizer.step()
        optimizer.zero_grad()
        assert len(capture.z) == 4  # two kinds of factor in each of two layers
        check_step(h.collect(), capture, sparsity)


def test_peft_lora_through_the_hf_trainer(harness, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = peft_llama(dropout=0.05)
    capture = LoraCapture(model)
    grads: dict[str, float] = {}

    def before_step(optimizer, args, kwargs):  # after the Trainer's clipping, as the optimizer sees them
        grads.update(lora_a=grad_sparsity(model, "lora_A"), lora_b=grad_sparsity(model, "lora_B"))

    handle = register_optimizer_step_pre_hook(before_step)
    data = [{k: v[row] for k, v in llama_batch(seed).items()} for seed in range(2) for row in range(2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    h = harness(model, None, sampling_interval=1)
    try:
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
    finally:
        handle.remove()
    check_step(h.collect(), capture, grads)
    assert sum(len(records) for records in capture.z.values()) == 2 * 6  # 2 micro-batches x 6 LoRA modules


@pytest.mark.parametrize("method", ["item", "tolist", "cpu", "__float__", "__bool__", "__int__", "numpy"])
def test_no_host_device_sync_from_hooks_on_non_sampled_steps(harness, monkeypatch, method):
    model = peft_llama()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    harness(model, optimizer, sampling_interval=6)

    def train(steps: int) -> None:
        for step in range(steps):
            model(**llama_batch(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    train(1)  # step 0 is sampled, attaches and publishes once
    calls = []
    original = getattr(torch.Tensor, method)

    def counting(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if os.sep + "otel_llm" + os.sep in caller and threading.current_thread() is threading.main_thread():
            calls.append((method, caller))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, method, counting)
    train(5)
    monkeypatch.undo()
    assert calls == []


def test_lora_probe_leaves_a_model_without_adapters_alone(harness):
    model = tiny_llama(VOCAB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    h = harness(model, optimizer, sampling_interval=1)
    model(**llama_batch(0)).loss.backward()
    optimizer.step()
    m = h.collect()
    assert "llm.lora.rank_activation_ratio" not in m.names()
    assert [dict(p.attributes) for p in m.points["llm.grad.sparsity"]] == [{"llm.param.group": "all"}]


def test_rank_ratio_extremes():
    """One active direction is rank 1 (ratio 1/r); equal energy in every direction saturates it (ratio 1)."""
    from otel_llm.probes.lora import rank_activation_ratio

    sums = torch.tensor([[5.0, 0, 0, 0], [2.0, 2.0, 2.0, 2.0], [0.0, 0, 0, 0]], dtype=torch.float64)
    ratios = rank_activation_ratio(sums, torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64))
    assert ratios.tolist() == pytest.approx([0.25, 1.0, 0.0])
