"""Independent attention references for the attention tests.

Forward pre-hooks on each layer's attention module capture its input; q, k and
v are then recomputed here from the module's weights in float64 (with the
model's own cos/sin for RoPE models), and the signals are computed from the
full softmax probabilities over the allowed keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Reference:
    """The exact signals of one layer over one or more calls."""

    entropies: np.ndarray  # per head
    divergence_max: float
    logit_max: float
    sink_ratio: float


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    bias = module.bias.double() if module.bias is not None else None
    return F.linear(x, module.weight.double(), bias)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def llama_like_qkv(attn: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Llama / Qwen2 / Mistral: q/k/v projections, rotate-half RoPE, K/V heads repeated to the query heads."""
    config = attn.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    x = hidden.double()
    q, k, v = (_heads(_linear(x, attn.q_proj), heads), _heads(_linear(x, attn.k_proj), kv_heads),
               _heads(_linear(x, attn.v_proj), kv_heads))
    cos, sin = cos.double()[:, None], sin.double()[:, None]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    repeat = heads // kv_heads
    return q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), q.shape[-1] ** -0.5


def fused_qkv(attn: torch.nn.Module, hidden: torch.Tensor, heads: int, transposed: bool):
    """GPT-2 (Conv1D, weight stored transposed) and nanoGPT (Linear): one projection split in three."""
    x = hidden.double()
    w, b = attn.c_attn.weight.double(), attn.c_attn.bias.double()
    qkv = x @ w + b if transposed else F.linear(x, w, b)
    q, k, v = (_heads(part, heads) for part in qkv.split(qkv.shape[-1] // 3, dim=-1))
    return q, k, v, q.shape[-1] ** -0.5


class Capture:
    """Records each attention module's input during forward; ``qkv()`` recomputes q, k, v per layer."""

    def __init__(self, arch: str, attention_modules: list[torch.nn.Module], heads: int) -> None:
        self.arch, self.heads = arch, heads
        self.inputs: list[tuple[torch.nn.Module, torch.Tensor, tuple | None]] = []
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in attention_modules]

    def _hook(self, module, args, kwargs):
        if torch._C._current_graph_task_id() != -1:
            return  # activation checkpointing replaying the forward inside backward
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rope = kwargs.get("position_embeddings")
        self.inputs.append((module, hidden.detach().clone(), tuple(t.detach() for t in rope) if rope else None))

    def qkv(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        with torch.no_grad():
            out = []
            for module, hidden, rope in self.inputs:
                if self.arch == "gpt2":
                    out.append(fused_qkv(module, hidden, self.heads, transposed=True))
                elif self.arch == "nanogpt":
                    out.append(fused_qkv(module, hidden, self.heads, transposed=False))
                else:
                    out.append(llama_like_qkv(module, hidden, *rope))
        self.inputs = []
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def causal_padding_mask(length: int, attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """allowed[b, 1, i, j]: key j is not later than query i and is not padding."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(batch, 1, length, length)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return allowed


def reference_signals(calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor]],
                      positions: list[int] | None = None, softcap: float | None = None) -> Reference:
    """Signals over ``calls`` of one layer: (q, k, v, scale, allowed or additive bias) in float64.

    ``allowed`` is boolean (True = may attend) or an additive float bias whose
    ``-inf`` entries mask; ``positions`` restricts the query rows.
    """
    entropy_sum = entropy_count = None
    logit_max, sink, sink_n = -math.inf, 0.0, 0
    outputs: list[torch.Tensor] = []
    for q, k, v, scale, mask in calls:
        logits = (q @ k.transpose(-1, -2)) * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if mask.dtype == torch.bool:
            allowed = mask.expand_as(logits)
        else:
            logits = logits + mask.double()
            allowed = torch.isfinite(mask).expand_as(logits)
        rows = list(range(q.shape[2])) if positions is None else positions
        logits, allowed = logits[:, :, rows], allowed[:, :, rows]
        valid = allowed.any(-1)
        probs = torch.zeros_like(logits)
        masked = logits.masked_fill(~allowed, -math.inf)
        probs[valid] = torch.softmax(masked[valid], dim=-1)
        ent = -(torch.where(probs > 0, probs * torch.log(probs), 0.0)).sum(-1)
        per_head_sum, per_head_n = (ent * valid).sum((0, 2)), valid.sum((0, 2)).double()
        entropy_sum = per_head_sum if entropy_sum is None else entropy_sum + per_head_sum
        entropy_count = per_head_n if entropy_count is None else entropy_count + per_head_n
        logit_max = max(logit_max, float(masked.max()))
        later = valid & (torch.tensor(rows) > 0)
        sink += float((probs[..., 0] * later).sum())
        sink_n += int(later.sum())
        outputs.append((probs @ v).transpose(0, 1).reshape(q.shape[1], -1))
    heads = torch.cat(outputs, dim=1)
    unit = heads / heads.norm(dim=1, keepdim=True)
    cosine = (unit @ unit.T).numpy()
    h = cosine.shape[0]
    if h < 3:
        divergence = 0.0
    else:
        divergence = max(float(np.var(np.delete(cosine[i], i))) for i in range(h))
    keep = (entropy_count > 0).numpy()
    return Reference((entropy_sum / entropy_count).numpy()[keep], divergence, logit_max,
                     sink / sink_n if sink_n else math.nan)
