"""Signal #15: the rotary angle error equals a numpy float64 reference on the module's own cos/sin.

The reference calls the model's rotary module directly with the step's inputs
and compares atan2(sin, cos) with position * inv_freq, in numpy float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import rel_close

VOCAB = 64
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "rope_theta": 10000.0},
}


def llama(rope: str, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         rope_parameters=ROPE[rope])
    return LlamaForCausalLM(config).to(dtype)


def reference_deviation(rotary, hidden: torch.Tensor, positions: torch.Tensor) -> float:
    with torch.no_grad():
        cos, sin = rotary(hidden, positions)
    emitted = np.arctan2(sin.double().numpy(), cos.double().numpy())
    exact = positions.numpy().astype(np.float64)[..., None] * rotary.inv_freq.double().numpy()
    exact = np.concatenate([exact, exact], axis=-1)
    return float(np.abs((emitted - exact + math.pi) % (2 * math.pi) - math.pi).max())


def train_step(harness, model, positions: torch.Tensor) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    h = harness(model, optimizer, sampling_interval=1)
    ids = torch.randint(0, VOCAB, positions.shape, generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, position_ids=positions, labels=ids).loss.backward()
    optimizer.step()
    return h.collect().value("llm.rope.angle_deviation")


@pytest.mark.parametrize("rope", list(ROPE))
def test_float32_short_positions_are_exact_to_a_microradian(harness, rope):
    model = llama(rope)
    positions = torch.arange(24).expand(2, 24)
    value = train_step(harness, model, positions)
    hidden = torch.zeros(2, 24, 32)
    expected = reference_deviation(model.model.rotary_emb, hidden, positions)
    assert rel_close(value, expected, rel=1e-6, abs_tol=1e-12)
    assert 0 < value <= 1e-6


def test_scaled_variants_use_the_modules_own_frequencies():
    base = llama("default").model.rotary_emb.inv_freq
    assert torch.allclose(llama("linear").model.rotary_emb.inv_freq, base / 2)
    assert not torch.allclose(llama("llama3").model.rotary_emb.inv_freq, base)
    assert llama("yarn").model.rotary_emb.attention_scaling > 1  # cos/sin scaled: the angle is unchanged


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_bfloat16_at_long_positions_shows_the_precision_loss(harness, rope):
    model = llama(rope, torch.bfloat16)
    positions = (4000 + torch.arange(16)).expand(2, 16)
    value = train_step(harness, model, positions)
    hidden = torch.zeros(2, 16, 32, dtype=torch.bfloat16)
    expected = reference_deviation(model.model.rotary_emb, hidden, positions)
    assert rel_close(value, expected, rel=1e-6)
    assert value > 1e-3  # bfloat16 cos/sin carry ~3 significant digits: thousands of times the float32 error


def test_max_over_the_steps_calls(harness):
    """Two forwards in one step (gradient accumulation): the gauge is the larger deviation."""
    model = llama("default")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    h = harness(model, optimizer, sampling_interval=1)
    short, long = torch.arange(8).expand(1, 8), (3000 + torch.arange(8)).expand(1, 8)
    for positions in (short, long):
        ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, position_ids=positions, labels=ids).loss.backward()
    optimizer.step()
    rotary, hidden = model.model.rotary_emb, torch.zeros(1, 8, 32)
    expected = max(reference_deviation(rotary, hidden, p) for p in (short, long))
    assert expected > reference_deviation(rotary, hidden, short)
    assert rel_close(h.collect().value("llm.rope.angle_deviation"), expected, rel=1e-6)


def test_dynamic_scaling_is_compared_with_the_frequencies_it_switched_to(harness):
    """Past max_position_embeddings, dynamic NTK rescales inv_freq inside forward; the probe reads it after."""
    model = llama("dynamic")
    positions = (9000 + torch.arange(16)).expand(1, 16)
    value = train_step(harness, model, positions)
    rotary = model.model.rotary_emb
    assert not torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    assert rel_close(value, reference_deviation(rotary, torch.zeros(1, 16, 32), positions), rel=1e-6)
    assert value < 1e-3  # float32: only rounding, no frequency mismatch
