"""Statistics computed inside the caller's autocast region stay exact.

The model trains under CPU bf16 autocast, so the q/k/v, the LoRA inputs and
the logits the probes see are bf16 (or come from bf16 matmuls). The
references are float64 recomputations from those same tensors, captured
here with the test's own hooks; a probe statistic that itself ran in bf16
would miss them by ~1e-3 relative, the tolerance here is 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tests.attention_reference import causal_padding_mask, reference_signals
from tests.conftest import rel_close
from tests.models import GPT
from tests.test_lora import LoraLinear, ratio_of

VOCAB, LENGTH, HEADS = 64, 16, 4
EXACT = 1e-5


class Recorder:
    """Each attention's fused q/k/v projection output, each LoRA layer's input, and the logits, as computed."""

    def __init__(self, model: GPT) -> None:
        self.qkv: list[torch.Tensor] = []
        self.lora_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.logits: torch.Tensor | None = None
        for block in model.transformer.h:
            block.attn.c_attn.register_forward_hook(lambda m, a, out: self.qkv.append(out.detach()))
            block.mlp.c_fc.register_forward_pre_hook(self._record_lora_input)
        model.lm_head.register_forward_hook(lambda m, a, out: setattr(self, "logits", out.detach()))

    def _record_lora_input(self, module: LoraLinear, args: tuple[torch.Tensor]) -> None:
        self.lora_inputs.append((args[0].detach(), module.lora_A.detach().clone()))

    def clear(self) -> None:
        self.qkv.clear()
        self.lora_inputs.clear()


def attention_reference(fused: torch.Tensor):
    b, t, width = fused.shape
    q, k, v = (part.double().view(b, t, HEADS, -1).transpose(1, 2) for part in fused.split(width // 3, dim=-1))
    return reference_signals([(q, k, v, q.shape[-1] ** -0.5, causal_padding_mask(t, None, b))])


def test_probe_statistics_under_bf16_autocast_match_float64_references(harness):
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB)
    for block in model.transformer.h:
        block.mlp.c_fc = LoraLinear(block.mlp.c_fc, r=8)
        nn.init.normal_(block.mlp.c_fc.lora_B, std=0.02)
    recorder = Recorder(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    entropy_sums = [0.0, 0.0]  # the histogram is cumulative
    for step in range(2):
        recorder.clear()
        idx = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        m = h.collect()

        assert all(t.dtype == torch.bfloat16 for t in recorder.qkv)
        assert recorder.logits is not None and recorder.logits.dtype == torch.bfloat16
        for layer, fused in enumerate(recorder.qkv):
            ref = attention_reference(fused)
            attrs = {"llm_layer": str(layer)}
            assert rel_close(m.value("llm.attention.logit_max", **attrs), ref.logit_max, rel=EXACT)
            assert rel_close(m.value("llm.attention.sink_ratio", **attrs), ref.sink_ratio, rel=EXACT)
            assert rel_close(m.value("llm.attention.head_divergence_max", **attrs), ref.divergence_max,
                             rel=EXACT, abs_tol=1e-9)
            (entropy,) = [point for point in m.points["llm.attention.head_entropy"]
                          if point.attributes == {"llm.layer": str(layer)}]
            entropy_sums[layer] += float(ref.entropies.sum())
            assert rel_close(entropy.sum, entropy_sums[layer], rel=EXACT)

        for layer, (x, factor) in enumerate(recorder.lora_inputs):
            z = x.double().reshape(-1, x.shape[-1]) @ factor.double().T
            expected = ratio_of(z.square().sum(dim=0))
            assert rel_close(m.value("llm.lora.rank_activation_ratio", llm_layer=str(layer)), expected, rel=EXACT)
        lse = torch.logsumexp(recorder.logits.double().reshape(-1, VOCAB), dim=-1)
        assert rel_close(m.value("llm.logits.z_loss"), float(lse.square().mean()), rel=EXACT)
