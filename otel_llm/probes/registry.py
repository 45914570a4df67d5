"""Every probe a session runs, built from the configuration, and driven as one.

Adding a probe: a module with a :class:`~otel_llm.probes.base.Probe` subclass
whose ``name`` is its catalog family, and one line in :data:`PROBES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import torch

from otel_llm.probes.activations import ActivationProbe
from otel_llm.probes.attention import AttentionProbe
from otel_llm.probes.base import Probe, StepPlan, StepValues, is_compiled, log_failure
from otel_llm.probes.flops import FlopProbe
from otel_llm.probes.kv_cache import KvCacheListener, KvCacheProbe
from otel_llm.probes.lora import LoraProbe
from otel_llm.probes.loss import LossProbe
from otel_llm.probes.memory import MemoryProbe
from otel_llm.probes.optimizer import OptimizerProbe
from otel_llm.probes.peak_memory import PeakMemoryProbe
from otel_llm.probes.rope import RopeProbe
from otel_llm.probes.step_time import StepTimeProbe
from otel_llm.probes.tokens import TokenProbe

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["PROBES", "Probes", "build_probes"]

P = TypeVar("P", bound=Probe)

PROBES: tuple[type[Probe], ...] = (OptimizerProbe, LossProbe, AttentionProbe, RopeProbe, ActivationProbe, LoraProbe,
                                   MemoryProbe, PeakMemoryProbe, KvCacheProbe, TokenProbe, FlopProbe, StepTimeProbe)
"""In the order their values are published."""


def build_probes(config: Config, record_kv_cache: KvCacheListener) -> Probes:
    """One probe per family the config does not entirely disable (and the ones the pipeline always needs)."""
    probes: list[Probe] = []
    for cls in PROBES:
        if not cls.wanted(config):
            continue
        probes.append(KvCacheProbe(config, record_kv_cache) if cls is KvCacheProbe else cls(config))
    return Probes(probes)


class Probes:
    """Runs each lifecycle step on every probe; a probe that raises is logged once and sits the step out."""

    def __init__(self, probes: list[Probe]) -> None:
        self._all = probes
        self._counting = [probe for probe in probes if probe.every_step]

    def __iter__(self) -> Iterator[Probe]:
        return iter(self._all)

    def get(self, cls: type[P]) -> P | None:
        """The running probe of class ``cls``, if the config asked for it."""
        return next((probe for probe in self._all if isinstance(probe, cls)), None)

    def named(self, name: str) -> Probe | None:
        return next((probe for probe in self._all if probe.name == name), None)

    def start(self, model: torch.nn.Module | None, sampled: bool, adopt: Callable[[torch.nn.Module], None]) -> None:
        """Start every probe; without ``model``, ``adopt`` is called with the model once it first trains."""
        for probe in self._all:
            self._run(probe, lambda p: p.start(model is not None))
        if model is not None:
            self.attach(model, sampled)
            return
        self.begin_step(sampled)
        tokens = self.get(TokenProbe)
        if tokens is not None:
            tokens.discover(adopt)

    def attach(self, model: torch.nn.Module, sampled: bool) -> None:
        """Hook ``model``; a probe that cannot read this model is detached and left out."""
        compiled = is_compiled(model)
        for probe in self._all:
            probe.hooks_pinned = probe.hooks_pinned or compiled
            try:
                probe.attach(model)
                probe.begin_step(sampled)
            except Exception:  # noqa: BLE001 - an unfamiliar model must not stop training
                log_failure(probe.name)
                probe.detach()

    def detach(self) -> None:
        for probe in self._all:
            probe.detach()

    def begin_step(self, sampled: bool) -> None:
        for probe in self._all:
            probe.begin_step(sampled)

    def before_update(self, optimizer: torch.optim.Optimizer, plan: StepPlan) -> None:
        for probe in self._all:
            self._run(probe, lambda p: p.before_update(optimizer, plan))

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """Every probe's values of the sampled step, then the every-step counters."""
        values = StepValues()
        for probe in self._all:
            values.extend(self._run(probe, lambda p: p.finish(optimizer)) or StepValues())
        values.extend(self.tally())
        return values

    def end_step(self) -> None:
        """An update completed: probes close their per-step accounting (before finish or tally reads it)."""
        for probe in self._all:
            self._run(probe, lambda p: p.end_step())

    def tally(self) -> StepValues:
        values = StepValues()
        for probe in self._counting:
            values.extend(self._run(probe, lambda p: p.tally()) or StepValues())
        return values

    def take_host_seconds(self) -> float:
        """Host time the probes spent in the training loop's calls since the last take."""
        total = 0.0
        for probe in self._all:
            total, probe.host_seconds = total + probe.host_seconds, 0.0
        return total

    @staticmethod
    def _run(probe: P, action: Callable[[P], StepValues | None]) -> StepValues | None:
        try:
            return action(probe)
        except Exception:  # noqa: BLE001 - never raise into the training loop
            log_failure(probe.name)
            probe.reset()
            return None
