"""The probe interface, and what every probe hands to the pipeline.

Values stay device tensors until the session packs every probe's values of a
sampled step into one host transfer.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from otel_llm.catalog import family_signals
from otel_llm.probes._flop_count import run_uncounted
from otel_llm.probes.interception import Interception, Patch
from otel_llm.runtime.log_once import once

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["Counter", "Gauge", "Histogram", "Probe", "StepPlan", "StepValues", "is_compiled", "log_failure"]

_logger = logging.getLogger("otel_llm.probes")

Attributes = Mapping[str, str]


def log_failure(probe: str) -> None:
    """Log the exception being handled, once per probe name; the caller skips the step's values."""
    once(_logger, logging.WARNING, ("probe failed", probe), "otel_llm: probe %s failed and is skipped for this step",
         probe, exc_info=True)


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper or holds a module compiled in place."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(model, OptimizedModule) or any(
        getattr(module, "_compiled_call_impl", None) is not None for module in model.modules())


def _family_enabled(family: str, config: Config) -> bool:
    return not all(config.is_disabled(name) for name in family_signals(family))


class Gauge(NamedTuple):
    name: str
    attributes: Attributes
    value: torch.Tensor | float
    """A 0-d device tensor, or a number already on the host."""


class Histogram(NamedTuple):
    name: str
    attributes: Attributes
    values: torch.Tensor | np.ndarray
    """1-D measurements: on the device, or a float64 array already on the host (no transfer)."""
    keep: torch.Tensor | None
    """1-D bool: which measurements are real (None: all)."""


class Counter(NamedTuple):
    name: str
    attributes: Attributes
    value: torch.Tensor | int
    """An increment: a 0-d device tensor, or a host integer."""


@dataclass
class StepValues:
    """What probes measured in one step; non-finite values are counted in ``llm.telemetry.nonfinite``."""

    gauges: list[Gauge] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    counters: list[Counter] = field(default_factory=list)

    def gauge(self, name: str, value: torch.Tensor | float, attributes: Attributes | None = None) -> None:
        self.gauges.append(Gauge(name, attributes or {}, value))

    def histogram(self, name: str, values: torch.Tensor | np.ndarray, attributes: Attributes | None = None,
                  keep: torch.Tensor | None = None) -> None:
        self.histograms.append(Histogram(name, attributes or {}, values, keep))

    def count(self, name: str, value: torch.Tensor | int, attributes: Attributes | None = None) -> None:
        self.counters.append(Counter(name, attributes or {}, value))

    def extend(self, other: StepValues) -> None:
        self.gauges.extend(other.gauges)
        self.histograms.extend(other.histograms)
        self.counters.extend(other.counters)

    def first(self, name: str) -> torch.Tensor | float | None:
        """The first gauge value named ``name``, if any."""
        return next((gauge.value for gauge in self.gauges if gauge.name == name), None)


@dataclass(frozen=True)
class StepPlan:
    """What the optimizer pre-step knows about the step being finished and the next one."""

    step: int
    sampled: bool
    next_sampled: bool


class Probe:
    """One signal family: its hooks and listeners, and its values of each step.

    The session drives every probe through the same lifecycle:

    - :meth:`start` once, when the session starts (interceptor listeners, global hooks);
    - :meth:`attach` once the model is known (module hooks), :meth:`detach` at shutdown;
    - per step, :meth:`begin_step` before the forward pass with the sampling decision,
      :meth:`before_update` at optimizer pre-step on sampled steps and the steps just
      before them (gradients are final there), and :meth:`finish` after the update of
      a sampled step; :meth:`end_step` when an update completes, then :meth:`tally` on every
      step for probes that count every step;
    - :meth:`reset` drops a step's partial state after a failure.

    Hooks must only bookkeep on non-sampled steps, never synchronise host and
    device, and never raise into the training loop (see :meth:`guarded`).
    """

    name: ClassVar[str] = "probe"
    """Also the probe's catalog family: the signals it produces."""
    always: ClassVar[bool] = False
    """Built even when every signal of its family is disabled (its values steer the sampler or find the model)."""
    every_step: ClassVar[bool] = False
    """Whether :meth:`tally` has something to say on every step."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sampled = False
        self.host_seconds = 0.0
        """Host time this probe spent outside the optimizer hooks during the step (read by the session)."""
        self._handles: list[RemovableHandle] = []
        self._sampled_hooks: list[Callable[[], RemovableHandle]] = []
        self._sampled_handles: list[RemovableHandle] = []
        self.hooks_pinned = False
        """Sampled-step hooks stay registered: the model is compiled, and a hook set that changes
        with every sampled step would make it recompile (see :meth:`hook_sampled`)."""
        self._listening: list[tuple[Interception[Any], Any]] = []
        self._patches: list[Patch] = []

    @classmethod
    def wanted(cls, config: Config) -> bool:
        """Whether a session with ``config`` runs this probe."""
        return cls.always or _family_enabled(cls.name, config)

    def enabled(self, signal: str) -> bool:
        """Whether ``signal`` is exported (not in ``disabled_signals``)."""
        return not self.config.is_disabled(signal)

    def family_enabled(self) -> bool:
        """Whether any signal of this probe's family is exported."""
        return _family_enabled(self.name, self.config)

    # -- lifecycle ----------------------------------------------------------------
    def start(self, model_known: bool) -> None:
        """Install what does not need the model; ``model_known`` is False in zero-code discovery."""

    def attach(self, model: torch.nn.Module) -> None:
        """Install hooks on ``model``."""

    def detach(self) -> None:
        """Remove every hook, listener and patch this probe installed through :meth:`hook`,
        :meth:`listen` and :meth:`use`."""
        for interception, listener in self._listening:
            interception.remove_listener(listener)
        self._listening.clear()
        for patch in self._patches:
            patch.release()
        self._patches.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._remove_sampled_hooks()
        self._sampled_hooks.clear()
        self.reset()

    def hook(self, handle: RemovableHandle) -> None:
        """Keep ``handle`` so :meth:`detach` removes it."""
        self._handles.append(handle)

    def hook_sampled(self, register: Callable[[], RemovableHandle]) -> None:
        """Keep a module hook registered only during sampled steps: ``register()`` installs it.

        Unsampled steps then never call it (a module without hooks also takes
        PyTorch's fast call path). :meth:`begin_step` registers and removes them,
        except for a compiled model (:attr:`hooks_pinned`: set at attach for a compiled
        model, or when a hook first runs under compilation), where they stay.
        """
        self._sampled_hooks.append(register)
        if self.sampled:
            self._sampled_handles.append(register())

    def _remove_sampled_hooks(self) -> None:
        for handle in self._sampled_handles:
            handle.remove()
        self._sampled_handles.clear()

    def listen(self, interception: Interception[Any], listener: Any) -> None:
        """Deliver ``interception``'s calls to ``listener`` until :meth:`detach`."""
        interception.add_listener(listener)
        self._listening.append((interception, listener))

    def use(self, patch: Patch) -> None:
        """Keep an on-demand ``patch`` installed until :meth:`detach`."""
        patch.acquire()
        self._patches.append(patch)

    # -- per step -----------------------------------------------------------------
    def begin_step(self, sampled: bool) -> None:
        """Called before each step's forward pass with the sampling decision."""
        self.sampled = sampled
        if (sampled or self.hooks_pinned) and not self._sampled_handles:
            self._sampled_handles = [register() for register in self._sampled_hooks]
        elif not sampled and self._sampled_handles and not self.hooks_pinned:
            self._remove_sampled_hooks()

    def before_update(self, optimizer: torch.optim.Optimizer, plan: StepPlan) -> None:
        """Optimizer pre-step of a sampled step or of the step before one."""

    def finish(self, optimizer: torch.optim.Optimizer) -> StepValues:
        """The sampled step's values (after the update); also clears the step's state."""
        return StepValues()

    def end_step(self) -> None:
        """An optimizer update completed (every step, before its values are read); flushes never call it."""

    def tally(self) -> StepValues:
        """Values of the step just ended, sampled or not (probes with :attr:`every_step`).

        Counters may be device counts; histograms and gauges must be host values
        (NumPy arrays, numbers): a non-sampled step publishes them without a transfer.
        """
        return StepValues()

    def reset(self) -> None:
        """Drop the current step's partial state (after a failure)."""

    def guarded(self, hook: Callable[..., object]) -> Callable[..., None]:
        """``hook`` made safe to run inside the training loop's own call stack.

        Module hooks and interceptor listeners run where anything they raise would
        stop training. A failure is logged once, the step's partial values are
        dropped and the probe sits out the rest of the step (a half-measured step is
        never published); the next :meth:`begin_step` brings it back. The wrapper
        returns None, so a hook can never replace a module's inputs or output.
        While a FLOP count is in progress the hook's own FLOPs are left out of it.
        On sampled steps the hook's host time is added to :attr:`host_seconds`, the
        training thread's share of ``llm.telemetry.overhead`` (not under
        torch.compile tracing, where reading a clock would break the graph).
        """

        @functools.wraps(hook)
        def safe(*args: Any) -> None:
            if torch.compiler.is_compiling():
                self.hooks_pinned = True
            timed = self.sampled and not torch.compiler.is_compiling()
            started = time.perf_counter() if timed else 0.0
            try:
                run_uncounted(hook, args)
            except Exception:  # noqa: BLE001 - never raise into the training loop
                log_failure(self.name)
                self.reset()
                self.sampled = False
            if timed:
                self.host_seconds += time.perf_counter() - started

        return safe
