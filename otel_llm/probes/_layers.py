"""Which decoder layer a module belongs to, found from the model's structure.

Per-layer signals carry ``llm.layer``, the 0-based index of the decoder layer
in the model's stack of layers: the ``nn.ModuleList`` Hugging Face models keep
as ``model.layers`` / ``transformer.h`` / ``gpt_neox.layers``, or nanoGPT's
``transformer.h``. The stack is found without a table of architectures: it is
the container of same-class blocks holding the most parameters (the decoder
stack owns nearly all weights; per-layer lists such as MoE experts are nested
inside it and smaller). ``Config.layers_path`` names it explicitly for models
where that guess is wrong.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator

import torch.nn as nn

__all__ = ["LayerIndex", "find_layer_stack"]

_logger = logging.getLogger(__name__)


def _resolve(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The module at dotted ``path``, from the model itself or from a wrapper's inner model (e.g. PEFT)."""
    modules = dict(model.named_modules())
    if path in modules:
        return path, modules[path]
    matches = [name for name in modules if name.endswith("." + path)]
    if len(matches) != 1:
        found = "no module" if not matches else f"{len(matches)} modules ({', '.join(matches)})"
        raise ValueError(f"layers_path {path!r} matches {found} of {type(model).__name__}")
    return matches[0], modules[matches[0]]


def _is_stack(module: nn.Module) -> bool:
    """A ModuleList/Sequential of blocks of one class."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        return False
    return len({type(child) for child in module}) == 1


def _parameter_count(module: nn.Module) -> int:
    # parameters() already skips shared tensors; a ZeRO-3 parameter holds none locally, its size is ds_numel
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in module.parameters())


def find_layer_stack(model: nn.Module, path: str | None = None) -> tuple[str, nn.Module] | None:
    """(name, container) of the decoder layer stack, or None when the model has none.

    ``path`` (dotted attribute path such as ``model.layers``) overrides the search
    and raises ValueError when it does not name a non-empty ModuleList/Sequential.
    """
    if path:
        name, module = _resolve(model, path)
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            raise ValueError(f"layers_path {path!r} names a {type(module).__name__}, not a non-empty ModuleList")
        return name, module
    best: tuple[int, int, str, nn.Module] | None = None
    for name, module in model.named_modules():
        if not _is_stack(module):
            continue
        count = _parameter_count(module)
        if count == 0:
            continue
        key = (count, -name.count("."))
        if best is None or key > best[:2]:
            best = (*key, name, module)
    return (best[2], best[3]) if best is not None else None


class LayerIndex:
    """Maps any module inside the decoder stack to its layer index.

    Modules are held weakly so an index never keeps a model alive. A module
    shared by several layers belongs to the first.
    """

    def __init__(self, model: nn.Module, path: str | None = None) -> None:
        found = find_layer_stack(model, path)
        self.path: str | None = found[0] if found else None
        self._layers: list[weakref.ref[nn.Module]] = []
        self._index: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        if found is None:
            _logger.info("otel_llm: no decoder layer stack found in %s; set OTEL_LLM_LAYERS_PATH to name it",
                         type(model).__name__)
            return
        for index, layer in enumerate(found[1].children()):
            self._layers.append(weakref.ref(layer))
            for module in layer.modules():
                self._index.setdefault(module, index)

    def __len__(self) -> int:
        return len(self._layers)

    def layer_of(self, module: nn.Module) -> int | None:
        """The decoder layer index of ``module`` (a layer or any module inside one), else None."""
        return self._index.get(module)

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """(index, layer module) of every decoder layer still alive."""
        for index, ref in enumerate(self._layers):
            layer = ref()
            if layer is not None:
                yield index, layer
