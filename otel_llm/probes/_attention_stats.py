"""Attention statistics of one layer, recomputed from q and k on a subsample of queries.

Everything stays on the device as running sums, so several calls per layer
(gradient accumulation micro-batches) combine exactly: entropy and sink ratio
are sums over counts, the logit max is a running max, and the head-output Gram
matrix adds up, which is the same as flattening all calls' outputs together.
Probabilities are the softmax before dropout; nothing here touches the RNG.
"""

from __future__ import annotations

import functools
import math

import torch

from otel_llm.probes._attention_calls import AttentionCall, ScoresCall

__all__ = ["LayerStatistics", "query_positions"]

_MASKED = -1e30
"""Logit given to masked keys: exp() underflows to exactly 0 in float32, and 0 * _MASKED is 0 (not NaN)."""

_CHUNK_LOGITS = 1 << 24
"""Most logits materialised at once (64 MiB in float32): long contexts are processed a few sequences at a time."""


def query_positions(length: int, wanted: int, device: torch.device) -> torch.Tensor:
    """``min(length, wanted)`` evenly spaced positions in ``[0, length)``, always including the last."""
    count = min(length, wanted)
    if count == length:
        return torch.arange(length, device=device)
    spaced = torch.linspace(0, length - 1, count, device=device, dtype=torch.float64).round().long()
    return (length - 1 - spaced).flip(0)


@functools.lru_cache(maxsize=32)
def _unmasked_rows(query_len: int, key_len: int, wanted: int, causal: bool, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """Sampled positions, the additive causal bias (None without one), which positions are past 0 and
    how many, for a call with no explicit mask.

    They depend only on the call's shape, so they are made once per shape (on the host, then moved), not
    per layer call. Every row of such a call has a key to attend (a causal query sees at least key 0).
    """
    host = query_positions(query_len, wanted, torch.device("cpu"))
    positions = host.to(device)
    later = positions > 0
    later_rows = int((host > 0).sum())
    if not causal:
        return positions, None, later, later_rows
    allowed = positions[:, None] >= torch.arange(key_len, device=device)[None, :]  # SDPA's causal: top-left
    return positions, _additive(allowed, None), later, later_rows


def _check_layout(*tensors: torch.Tensor) -> None:
    """(batch, heads, length, dim) only: other layouts SDPA broadcasts are not read."""
    for tensor in tensors:
        if tensor.is_nested or tensor.dim() != 4:
            raise ValueError(f"unsupported attention tensor layout {tuple(tensor.shape)}")


def _batch_chunks(call: AttentionCall, queries: int) -> list[AttentionCall]:
    """``call`` split along the batch so each part has at most ``_CHUNK_LOGITS`` sampled logits."""
    batch, heads = call.query.shape[0], call.query.shape[1]
    per_sequence = heads * min(queries, call.query.shape[2]) * call.key.shape[2]
    step = max(1, _CHUNK_LOGITS // max(1, per_sequence))
    if step >= batch:
        return [call]
    mask = call.attn_mask
    split_mask = mask is not None and mask.dim() == 4 and mask.shape[0] == batch
    return [AttentionCall(call.query[start:start + step], call.key[start:start + step],
                          call.value[start:start + step],
                          mask[start:start + step] if split_mask else mask,  # type: ignore[index]
                          call.is_causal, call.scale, call.softcap)
            for start in range(0, batch, step)]


def _allowed_and_bias(call: AttentionCall, positions: torch.Tensor, query_len: int, key_len: int
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Which keys each sampled query may attend (broadcastable to B,H,n,K) and the additive bias."""
    allowed: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    if call.is_causal:  # SDPA's causal mask is aligned top-left
        allowed = positions[:, None] >= torch.arange(key_len, device=positions.device)[None, :]
    mask = call.attn_mask
    if mask is not None:
        if mask.dim() < 2 or mask.shape[-1] not in (1, key_len) or mask.shape[-2] not in (1, query_len):
            raise ValueError(f"unsupported attention mask layout {tuple(mask.shape)}")
        if mask.shape[-2] == query_len and query_len > 1:
            mask = mask.index_select(-2, positions)
        if mask.dtype == torch.bool:
            allowed = mask if allowed is None else allowed & mask
        else:
            floor = torch.finfo(mask.dtype).min
            keep = mask > floor  # transformers and most code mask with the dtype's minimum or -inf
            allowed = keep if allowed is None else allowed & keep
            bias = mask.float()
    return allowed, bias


def _additive(allowed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The call's bias with masked keys at ``_MASKED``, at the (small) shape of the mask, not of the logits.

    Added in place to the logits it costs one pass where a broadcast masked_fill costs several.
    """
    return torch.where(allowed, 0.0 if bias is None else bias, _MASKED)


class LayerStatistics:
    """Running sums behind the four per-layer attention signals."""

    def __init__(self, heads: int, device: torch.device) -> None:
        self.heads = heads
        self.entropy_sum = torch.zeros(heads, device=device)
        self.entropy_count = torch.zeros(heads, device=device)
        self.logit_max = torch.full((), -math.inf, device=device)
        self.sink_sum = torch.zeros((), device=device)
        self.sink_count = torch.zeros((), device=device)
        self.gram = torch.zeros(heads, heads, device=device)
        self.has_outputs = False  # scores-only calls (explicit softmax) cannot give head outputs

    def add(self, call: AttentionCall, max_queries: int) -> None:
        """Fold one call into the sums; ValueError for layouts it does not understand."""
        _check_layout(call.query, call.key, call.value)
        for part in _batch_chunks(call, max_queries):
            self._add(part, max_queries)

    def _add(self, call: AttentionCall, max_queries: int) -> None:
        query, key, value = call.query, call.key, call.value
        batch, heads, query_len, dim = query.shape
        kv_heads, key_len = key.shape[1], key.shape[2]
        if heads != self.heads or heads % kv_heads or value.shape[1] != kv_heads or value.shape[2] != key_len:
            raise ValueError(f"unsupported head layout q{tuple(query.shape)} k{tuple(key.shape)}")
        additive: torch.Tensor | None
        if call.attn_mask is None:
            positions, additive, later, later_rows = _unmasked_rows(query_len, key_len, max_queries,
                                                                    call.is_causal, query.device)
            allowed = None
        else:
            positions = query_positions(query_len, max_queries, query.device)
            allowed, bias = _allowed_and_bias(call, positions, query_len, key_len)
            additive = bias if allowed is None else _additive(allowed, bias)
            later, later_rows = positions > 0, 0  # counted on the device from the rows the mask leaves
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(dim)
        # Query head h reads K/V head h // (heads / kv_heads): stacking each group's queries lets one batched
        # matmul per K/V head serve them all, without repeating K or V.
        # the scale goes on the sampled queries (a quarter of the logits' elements at 64 queries x 256 keys)
        sampled = query if positions.numel() == query_len else query.index_select(2, positions)
        # reshape, not view: the product keeps a transposed query's strides
        sampled = (sampled.to(torch.float32) * scale).reshape(batch, kv_heads, -1, dim)
        logits = (sampled @ key.float().transpose(-1, -2)).view(batch, heads, -1, key_len)
        if call.softcap is not None:
            logits = torch.tanh(logits / call.softcap).mul_(call.softcap)
        if additive is not None:
            logits.add_(additive)
        valid = None if allowed is None else allowed.any(-1).expand(logits.shape[:-1])
        probs = self._fold(logits, valid, later, later_rows)
        outputs = probs.view(batch, kv_heads, -1, key_len) @ value.float()
        outputs = outputs.view(batch, heads, -1, outputs.shape[-1])
        if valid is not None:
            outputs = outputs * valid[..., None]
        per_head = outputs.transpose(0, 1).reshape(heads, -1)
        self.gram += per_head @ per_head.T
        self.has_outputs = True

    def add_scores(self, call: ScoresCall, max_queries: int) -> None:
        """Fold softmax input scores (B, H, queries, keys); -inf or the dtype's minimum marks masked keys."""
        scores = call.scores
        if scores.is_nested or scores.dim() != 4 or scores.shape[1] != self.heads:
            raise ValueError(f"unsupported attention score layout {tuple(scores.shape)}")
        positions = query_positions(scores.shape[2], max_queries, scores.device)
        sampled = scores.index_select(2, positions)
        allowed = sampled > torch.finfo(scores.dtype).min
        self._fold(sampled.float().masked_fill_(~allowed, _MASKED), allowed.any(-1), positions > 0, 0)

    def _fold(self, logits: torch.Tensor, valid: torch.Tensor | None, later: torch.Tensor, later_rows: int
              ) -> torch.Tensor:
        """Add entropy, logit max and sink terms of (B, H, n, K) logits; returns the probabilities.

        Masked keys hold ``_MASKED`` (huge and negative, not -inf) so every row stays finite; rows with
        no key to attend are then excluded by ``valid`` (B, H, n), None when every row has one (then
        ``later_rows``, known on the host, is how many sampled positions ``later`` marks as past 0). One
        softmax serves every term: with m the row's max logit, log-sum-exp = m - log(max p) (the largest
        probability is exp(m - lse)), so the entropy lse - sum(p * logit) needs no second (log-)softmax.
        """
        batch, heads, rows = logits.shape[:3]
        probs = torch.softmax(logits, dim=-1)
        row_max = logits.amax(-1)
        entropy = (row_max - torch.linalg.vecdot(probs, logits)).sub_(probs.amax(-1).log_())
        if valid is None:
            self.entropy_sum += entropy.sum((0, 2))
            self.entropy_count += batch * rows
            self.logit_max = torch.maximum(self.logit_max, row_max.amax())
            self.sink_sum += (probs[..., 0] * later).sum()
            self.sink_count += batch * heads * later_rows
            return probs
        self.entropy_sum += (entropy * valid).sum((0, 2))
        self.entropy_count += valid.sum((0, 2))
        self.logit_max = torch.maximum(self.logit_max, torch.where(valid, row_max, -math.inf).amax())
        counted = valid & later
        self.sink_sum += (probs[..., 0] * counted).sum()
        self.sink_count += counted.sum()
        return probs

    def entropy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean entropy per head over its sampled queries, and which heads saw any."""
        return self.entropy_sum / self.entropy_count.clamp_min(1), self.entropy_count > 0

    def sink_ratio(self) -> torch.Tensor:
        return self.sink_sum / self.sink_count

    def divergence_max(self) -> torch.Tensor:
        """Max over heads of the (population) variance of its cosine similarity to the other heads."""
        heads = self.heads
        if heads < 3:
            return torch.zeros((), device=self.gram.device)
        gram = self.gram.double()
        norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-30)
        cosine = gram / (norms[:, None] * norms[None, :])
        off = ~torch.eye(heads, dtype=torch.bool, device=gram.device)
        mean = (cosine * off).sum(1, keepdim=True) / (heads - 1)
        variance = (((cosine - mean) ** 2) * off).sum(1) / (heads - 1)
        return variance.amax()
