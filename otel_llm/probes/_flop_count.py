"""One FLOP count of a model's step with torch's FlopCounterMode, leaving otel_llm's own arithmetic out.

A count spans a training forward, its loss and its backward. The probes' hooks
run inside that span (attention statistics do matmuls of their own), so
:func:`run_uncounted` subtracts what they add, and so is what activation
checkpointing recomputes during backward (model FLOPs, as MFU counts them, not
hardware FLOPs): the count is the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ModelCount", "run_uncounted"]

_active: ModelCount | None = None
"""The count in progress; at most one per process (one training loop)."""


def _counter_mode(failed: list[BaseException]) -> Any:
    """FlopCounterMode whose formulas never raise into the model's ops: a failure is kept in ``failed``.

    Also taught the CPU flash-attention kernel, which torch's formulas leave out (CUDA's SDPA kernels are in).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry  # only when a new shape is counted

    def safe(formula: Callable[..., int]) -> Callable[..., int]:
        def count(*args: Any, **kwargs: Any) -> int:
            try:
                return formula(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - inside the user's op call: the count is void instead
                failed.append(exc)
                return 0

        count._get_raw = True  # type: ignore[attr-defined]  # registry formulas already take tensors
        return count

    registry = dict(flop_registry)
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        registry[aten._scaled_dot_product_flash_attention_for_cpu] = \
            flop_registry[aten._scaled_dot_product_flash_attention]
        registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            flop_registry[aten._scaled_dot_product_flash_attention_backward]
    return FlopCounterMode(display=False, custom_mapping={op: safe(f) for op, f in registry.items()})


class ModelCount:
    """FlopCounterMode entered at a training forward and left at the next forward or at the step's end."""

    def __init__(self) -> None:
        self._failed: list[BaseException] = []
        self._mode = _counter_mode(self._failed)
        self._excluded = 0
        self._replaying = 0
        self._replay_start = 0
        self._hooks: list[Any] = []

    @staticmethod
    def busy() -> bool:
        """Whether a count is in progress (a second one must not nest in it)."""
        return _active is not None

    def start(self) -> None:
        global _active
        from torch.nn.modules import module

        self._mode.__enter__()
        _active = self
        self._hooks = [module.register_module_forward_pre_hook(self._enter_module),
                       module.register_module_forward_hook(self._leave_module, always_call=True)]

    def _enter_module(self, module: Any, args: Any) -> None:
        """A module's forward during backward is a checkpoint replay: its FLOPs were counted in the forward."""
        from otel_llm.probes._forward import in_backward

        if in_backward():
            if not self._replaying:
                self._replay_start = self.total()
            self._replaying += 1

    def _leave_module(self, module: Any, args: Any, output: Any) -> None:
        if self._replaying:
            self._replaying -= 1
            if not self._replaying:
                self.exclude(self.total() - self._replay_start)

    def stop(self) -> int:
        """Leave the mode; the FLOPs counted since :meth:`start`, otel_llm's hooks excluded.

        Raises the first error a FLOP formula met (an op it cannot handle), after leaving the mode.
        """
        global _active
        if _active is self:
            _active = None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._mode.__exit__(None, None, None)
        if self._failed:
            raise self._failed[0]
        return self.total() - self._excluded

    def total(self) -> int:
        return self._mode.get_total_flops()

    def exclude(self, flops: int) -> None:
        self._excluded += flops


def run_uncounted(hook: Callable[..., object], args: tuple[Any, ...]) -> None:
    """``hook(*args)``; while a count is in progress, the FLOPs it does are not the model's."""
    count = _active
    if count is None:
        hook(*args)
        return
    before = count.total()
    try:
        hook(*args)
    finally:
        count.exclude(count.total() - before)
