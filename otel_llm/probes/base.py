"""What every probe hands to the session, and the interface of probes that hook a model.

Values stay device tensors until the session packs every probe's values of a
sampled step into one host transfer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from otel_llm.config import Config

__all__ = ["ModelProbe", "StepValues", "log_failure"]

_logger = logging.getLogger("otel_llm.probes")
_failed: set[str] = set()


def log_failure(probe: str) -> None:
    """Log the exception being handled, once per probe name; the caller skips the step's values."""
    if probe not in _failed:
        _failed.add(probe)
        _logger.warning("otel_llm: probe %s failed and is skipped for this step", probe, exc_info=True)

Attributes = Mapping[str, str]


@dataclass
class StepValues:
    """Device values of one sampled step.

    ``gauges``: (name, attributes, 0-d tensor). ``histograms``: (name, attributes,
    1-D tensor of measurements, optional 1-D bool tensor of which entries are real).
    Non-finite values are counted in ``llm.telemetry.nonfinite`` instead of exported.
    """

    gauges: list[tuple[str, Attributes, torch.Tensor]] = field(default_factory=list)
    histograms: list[tuple[str, Attributes, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    def gauge(self, name: str, value: torch.Tensor, attributes: Attributes | None = None) -> None:
        self.gauges.append((name, attributes or {}, value))

    def histogram(self, name: str, values: torch.Tensor, attributes: Attributes | None = None,
                  keep: torch.Tensor | None = None) -> None:
        self.histograms.append((name, attributes or {}, values, keep))

    def extend(self, other: StepValues) -> None:
        self.gauges.extend(other.gauges)
        self.histograms.extend(other.histograms)


class ModelProbe:
    """A probe that hooks a model's modules; the session drives it step by step.

    Hooks must only bookkeep on non-sampled steps, never synchronise host and
    device, and never raise into the forward/backward pass.
    """

    name = "probe"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sampled = False

    def attach(self, model: torch.nn.Module) -> None:
        """Install hooks on ``model`` (called once the model is known)."""

    def detach(self) -> None:
        """Remove every hook :meth:`attach` installed."""

    def param_families(self) -> dict[str, list[torch.Tensor]]:
        """Named subsets of the attached model's parameters, each its own ``llm.grad.sparsity`` group."""
        return {}

    def begin_step(self, sampled: bool) -> None:
        """Called before each step's forward pass with the sampling decision."""
        self.sampled = sampled

    def finish(self) -> StepValues:
        """The sampled step's device values; also clears the step's state."""
        return StepValues()

    def reset(self) -> None:
        """Drop the current step's partial state (after a failure)."""

    def guarded(self, hook: Callable[..., object]) -> Callable[..., None]:
        """``hook`` made safe to run inside the model's forward pass.

        Module hooks and attention listeners run in the training loop's own call
        stack, so anything they raise would stop training. A failure is logged
        once, the step's partial values are dropped and the probe sits out the
        rest of the step (a half-measured step is never published); the next
        :meth:`begin_step` brings it back. The wrapper returns None, so a hook
        can never replace a module's inputs or output.
        """

        @functools.wraps(hook)
        def safe(*args: Any) -> None:
            try:
                hook(*args)
            except Exception:  # noqa: BLE001 - never raise into the forward pass
                log_failure(self.name)
                self.reset()
                self.sampled = False

        return safe
