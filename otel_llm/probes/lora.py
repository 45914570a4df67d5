"""LoRA probe: signal #14 (rank activation ratio per decoder layer) and the LoRA groups of #2.

A LoRA module's down-projection output z = lora_A(x) has r columns. Over the
step's tokens, p_j = E[z_j^2] / sum_k E[z_k^2]; the effective rank is
exp(-sum_j p_j ln p_j) and the ratio is effective rank / r, averaged over the
layer's LoRA modules (0 when z is identically zero).

Where the factor is a module (PEFT's ``lora_A`` ModuleDict of Linear layers,
or a model's own ``lora_A`` Linear), its output is read as the forward computed
it: for PEFT that is lora_A(lora_dropout(x)), dropout included, so the signal
describes what the adapter was trained on and costs no extra matmul. PEFT runs
only the active adapters, so only those are measured. Where ``lora_A`` is a
bare parameter (loralib style, shape (r, in_features)), z = x @ lora_A.T is
computed from the owning module's input, without the dropout the model applies
inside its forward. Embedding LoRA (``lora_embedding_A``) and convolution
factors are left out of #14; all factors are in the gradient groups.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from otel_llm.catalog import ATTR_LAYER, LORA_RANK_ACTIVATION_RATIO
from otel_llm.config import Config
from otel_llm.probes._forward import TokenMask, first_tensor, in_step_forward, layer_index
from otel_llm.probes._measuring import measuring
from otel_llm.probes.base import Probe, StepValues

__all__ = ["LoraProbe", "lora_param_families", "rank_activation_ratio"]

_A_NAMES = frozenset({"lora_A", "lora_embedding_A"})
_B_NAMES = frozenset({"lora_B", "lora_embedding_B"})


def lora_param_families(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """LoRA factor parameters by gradient group: ``lora_a`` and ``lora_b`` (only the non-empty ones)."""
    families: dict[str, list[torch.Tensor]] = {"lora_a": [], "lora_b": []}
    for name, param in model.named_parameters():
        parts = set(name.split("."))
        if parts & _A_NAMES:
            families["lora_a"].append(param)
        elif parts & _B_NAMES:
            families["lora_b"].append(param)
    return {group: params for group, params in families.items() if params}


def rank_activation_ratio(square_sums: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Effective rank / r per row of ``square_sums`` (rows zero-padded to a common width).

    Row i holds sum over tokens of z_j^2 for module i; E[.] cancels in p_j.
    """
    totals = square_sums.sum(dim=1, keepdim=True)
    p = square_sums / totals.clamp_min(torch.finfo(square_sums.dtype).tiny)
    effective = torch.exp(-torch.special.xlogy(p, p).sum(dim=1))
    return torch.where(totals.squeeze(1) > 0, effective / ranks, torch.zeros_like(effective))


@dataclass(frozen=True)
class _Factor:
    """One LoRA down-projection: the module to hook, how to read z, its layer and rank."""

    module: torch.nn.Module
    parameter: torch.Tensor | None  # set for bare-parameter factors, z = x @ parameter.T
    layer: int
    rank: int


def _factors(model: torch.nn.Module, layer_of: Callable[[torch.nn.Module], int | None]) -> Iterator[_Factor]:
    for owner in model.modules():
        factor = getattr(owner, "lora_A", None)
        layer = layer_of(owner)
        if factor is None or layer is None:
            continue
        if isinstance(factor, torch.nn.ModuleDict):
            for child in factor.values():
                if isinstance(child, torch.nn.Linear):
                    yield _Factor(child, None, layer, child.out_features)
        elif isinstance(factor, torch.nn.Linear):
            yield _Factor(factor, None, layer, factor.out_features)
        elif isinstance(factor, torch.Tensor) and factor.dim() == 2:
            yield _Factor(owner, factor, layer, factor.shape[0])


class LoraProbe(Probe):
    """Per-layer LoRA rank activation ratio of sampled steps."""

    name = "lora"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._mask = TokenMask()
        self._factors: list[_Factor] = []
        self._sums: dict[int, torch.Tensor] = {}

    def attach(self, model: torch.nn.Module) -> None:
        if not lora_param_families(model):
            return
        index = layer_index(model, self.config.layers_path)
        if index is None:
            return
        self._factors = list(_factors(model, index.layer_of))
        for slot, factor in enumerate(self._factors):
            if factor.parameter is None:
                self.hook_sampled(functools.partial(factor.module.register_forward_hook,
                                                    self.guarded(self._on_output(slot))))
            else:
                self.hook_sampled(functools.partial(factor.module.register_forward_pre_hook,
                                                    self.guarded(self._on_input(slot)), with_kwargs=True))
        if self._sampled_hooks:
            self.hook_sampled(self._mask.hook(model))

    def detach(self) -> None:
        self._mask.clear()
        self._factors = []
        super().detach()

    # -- hooks --------------------------------------------------------------
    def _add(self, slot: int, z: torch.Tensor) -> None:
        """Fold sum over tokens of z_j^2 into the slot's accumulator."""
        squares = z.double().square()
        keep = self._mask.positions(z)
        if keep is not None:
            squares.masked_fill_(~keep, 0)
        sums = squares.reshape(-1, squares.shape[-1]).sum(dim=0)
        previous = self._sums.get(slot)
        self._sums[slot] = sums if previous is None else previous + sums

    def _on_output(self, slot: int) -> Callable[..., None]:
        rank = self._factors[slot].rank

        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.sampled or not in_step_forward(module):
                return
            z = first_tensor(output)
            if z is not None and z.is_floating_point() and z.dim() >= 2 and z.shape[-1] == rank:
                with measuring():
                    self._add(slot, z.detach())

        return hook

    def _on_input(self, slot: int) -> Callable[..., None]:
        factor = self._factors[slot].parameter
        assert factor is not None

        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.sampled or not in_step_forward(module):
                return
            x = first_tensor(args) if args else first_tensor(tuple(kwargs.values()))
            if x is not None and x.is_floating_point() and x.dim() >= 2 and x.shape[-1] == factor.shape[1]:
                with measuring():
                    self._add(slot, x.detach().float() @ factor.detach().float().T)

        return hook

    # -- step ---------------------------------------------------------------
    def begin_step(self, sampled: bool) -> None:
        super().begin_step(sampled)
        self._mask.clear()
        self._sums = {}

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        values = StepValues()
        sums, self._sums = self._sums, {}
        if not sums:
            return values
        slots = sorted(sums, key=lambda slot: (self._factors[slot].layer, slot))  # each layer's rows contiguous
        width = max(self._factors[slot].rank for slot in slots)
        square_sums = torch.stack([F.pad(sums[slot], (0, width - sums[slot].numel())) for slot in slots])
        ranks = torch.tensor([float(self._factors[slot].rank) for slot in slots], dtype=torch.float64,
                             device=square_sums.device)
        ratios = rank_activation_ratio(square_sums, ranks)
        start = 0
        for layer, members in itertools.groupby(slots, key=lambda slot: self._factors[slot].layer):
            count = len(list(members))
            values.gauge(LORA_RANK_ACTIVATION_RATIO, ratios[start:start + count].mean(), {ATTR_LAYER: str(layer)})
            start += count
        return values

    def reset(self) -> None:
        self._sums = {}
