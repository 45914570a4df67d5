"""#12 activation sparsity and #13 outlier ratio equal references computed here, on the same step.

The test captures the MLP output projection's input and each decoder layer's
output with its own hooks (paths written out per architecture below, not taken
from otel_llm) and computes both signals in float64 over the step's real
tokens (padding excluded, every micro-batch included).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import rel_close
from tests.models import GPT

VOCAB = 64

# architecture -> (decoder layer list, MLP output projection inside a layer)
PATHS = {
    "nanogpt": ("transformer.h", "mlp.c_proj"),
    "llama": ("model.layers", "mlp.down_proj"),
    "mistral": ("model.layers", "mlp.down_proj"),
    "qwen2": ("model.layers", "mlp.down_proj"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "opt": ("model.decoder.layers", "fc2"),
}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "nanogpt":
        return GPT(vocab=VOCAB)
    import transformers as tf

    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = {
        "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **common),
        "opt": lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **common),
    }[arch]()
    return tf.AutoModelForCausalLM.from_config(config)


def batch(arch: str, seed: int) -> tuple[dict, torch.Tensor | None]:
    """A training batch and its token mask (None: every position is a token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    if arch == "nanogpt":
        return {"idx": ids, "targets": ids}, None
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}, mask


def loss_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out[1] if isinstance(out, tuple) else out.loss


class Capture:
    """The test's own hooks: MLP projection inputs and layer outputs of every training forward, per layer."""

    def __init__(self, model: nn.Module, arch: str) -> None:
        layers_path, mlp_path = PATHS[arch]
        self.mlp: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.out: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.masks: list[torch.Tensor | None] = []
        for i, layer in enumerate(model.get_submodule(layers_path)):
            layer.get_submodule(mlp_path).register_forward_hook(self._recorder(self.mlp[i], lambda args, out: args[0]))
            layer.register_forward_hook(self._recorder(self.out[i], lambda args, out: out))

    @staticmethod
    def _recorder(into: list[torch.Tensor], pick):
        def hook(module, args, out):
            if module.training:  # evaluation passes are not part of a training step
                value = pick(args, out)
                into.append((value[0] if isinstance(value, tuple) else value).detach().double().clone())

        return hook

    def clear(self) -> None:
        for records in (*self.mlp.values(), *self.out.values()):
            records.clear()
        self.masks.clear()

    @staticmethod
    def _tokens(tensors: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor:
        rows = [t.reshape(-1, t.shape[-1])[m.reshape(-1).bool()] if m is not None else t.reshape(-1, t.shape[-1])
                for t, m in zip(tensors, masks)]
        return torch.cat(rows)

    def sparsity(self, layer: int, threshold: float) -> float:
        x = self._tokens(self.mlp[layer], self.masks)
        return float((x.abs() <= threshold).double().mean())

    def outlier_ratio(self, layer: int, threshold: float) -> float:
        h = self._tokens(self.out[layer], self.masks)
        return float((h.abs().amax(dim=0) >= threshold).double().mean())


def median_thresholds(model: nn.Module, arch: str) -> tuple[float, float]:
    """Thresholds that make both signals non-trivial on this model (medians of a dry run)."""
    capture = Capture(model, arch)
    inputs, mask = batch(arch, seed=99)
    capture.masks.append(mask)
    with torch.no_grad():
        loss_of(model, inputs)  # in training mode: the capture hooks record it
    x = Capture._tokens(capture.mlp[0], capture.masks)
    h = Capture._tokens(capture.out[0], capture.masks)
    return float(x.abs().median()), float(h.abs().amax(dim=0).median())


@pytest.mark.parametrize("arch", list(PATHS))
def test_values_equal_reference_for_every_architecture(harness, arch):
    if arch != "nanogpt":
        pytest.importorskip("transformers")
    model = build(arch)
    model.train()
    sparse_at, outlier_at = median_thresholds(model, arch)
    capture = Capture(model, arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1, activation_sparsity_threshold=sparse_at,
                activation_outlier_threshold=outlier_at)
    for step in range(2):
        capture.clear()
        for micro in range(2):  # gradient accumulation: both micro-batches are the step's tokens
            inputs, mask = batch(arch, seed=10 * step + micro)
            capture.masks.append(mask)
            (loss_of(model, inputs) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        m = h.collect()
        for layer in range(2):
            sparsity = capture.sparsity(layer, sparse_at)
            outliers = capture.outlier_ratio(layer, outlier_at)
            assert 0 < sparsity < 1 and 0 < outliers < 1, (sparsity, outliers)  # the comparison means something
            assert rel_close(m.value("llm.activation.sparsity", llm_layer=str(layer)), sparsity), (arch, step, layer)
            assert rel_close(m.value("llm.activation.outlier_ratio", llm_layer=str(layer)), outliers), \
                (arch, step, layer)


def test_default_thresholds_find_planted_outliers_and_skip_eval_passes(harness):
    model = GPT(vocab=VOCAB)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias[:3] = 10.0  # three hidden dims far above 6.0 from layer 0 on
    capture = Capture(model, "nanogpt")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1)
    inputs, mask = batch("nanogpt", seed=5)
    capture.masks.append(mask)
    loss_of(model, inputs).backward()
    model.eval()
    with torch.no_grad():  # an evaluation pass inside the step is not part of the step's activations
        model(torch.randint(0, VOCAB, (2, 8)))
    model.train()
    optimizer.step()
    m = h.collect()
    for layer in range(2):
        assert capture.outlier_ratio(layer, 6.0) == pytest.approx(3 / 32)
        assert rel_close(m.value("llm.activation.outlier_ratio", llm_layer=str(layer)), 3 / 32)
        sparsity = capture.sparsity(layer, 1e-3)
        assert sparsity > 0
        assert rel_close(m.value("llm.activation.sparsity", llm_layer=str(layer)), sparsity)


def test_only_sampled_steps_are_measured(harness):
    model = GPT(vocab=VOCAB)
    capture = Capture(model, "nanogpt")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    h = harness(model, optimizer, sampling_interval=2)
    for step in range(3):
        capture.clear()
        inputs, mask = batch("nanogpt", seed=step)
        capture.masks.append(mask)
        loss_of(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad()
    m = h.collect()  # step 2 only: nothing of step 1 leaks in
    for layer in range(2):
        assert rel_close(m.value("llm.activation.sparsity", llm_layer=str(layer)), capture.sparsity(layer, 1e-3))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_forward_once(harness, reentrant):
    pytest.importorskip("transformers")
    model = build("llama")
    twin = build("llama")  # same seed, same weights, no checkpointing: the reference
    model.train()
    twin.train()
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; older: gradient_checkpointing_*
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    sparse_at, outlier_at = median_thresholds(twin, "llama")
    capture = Capture(twin, "llama")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    h = harness(model, optimizer, sampling_interval=1, activation_sparsity_threshold=sparse_at,
                activation_outlier_threshold=outlier_at)
    inputs, mask = batch("llama", seed=7)
    capture.masks.append(mask)
    loss_of(model, inputs).backward()
    loss_of(twin, inputs)
    optimizer.step()
    m = h.collect()
    for layer in range(2):
        assert rel_close(m.value("llm.activation.sparsity", llm_layer=str(layer)), capture.sparsity(layer, sparse_at))
        assert rel_close(m.value("llm.activation.outlier_ratio", llm_layer=str(layer)),
                         capture.outlier_ratio(layer, outlier_at))


class Feedforward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, 2 * dim)
        self.w2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)))


class Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = Feedforward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class UnusualNet(nn.Module):
    """A decoder stack whose MLP output projection has a name otel_llm does not know (ffn.w2)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList([Layer(dim) for _ in range(2)])
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), idx.flatten())


def test_override_names_the_mlp_projection_of_an_unknown_model(harness, caplog):
    torch.manual_seed(0)
    model = UnusualNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.set_level(logging.INFO, logger="otel_llm")
    h = harness(model, optimizer, sampling_interval=1)
    idx = torch.randint(0, VOCAB, (2, 8))
    model(idx).backward()
    optimizer.step()
    m = h.collect()
    assert "llm.activation.sparsity" not in m.names()
    assert "llm.activation.outlier_ratio" in m.names()  # the layers themselves were found
    hints = [r for r in caplog.records if "OTEL_LLM_MLP_OUTPUT_PATH" in r.getMessage()]
    assert len(hints) == 1 and hints[0].levelno == logging.INFO
    h.session.shutdown()

    inputs: dict[int, list[torch.Tensor]] = defaultdict(list)
    for i, block in enumerate(model.blocks):
        block.ffn.w2.register_forward_hook(lambda mod, args, out, i=i: inputs[i].append(args[0].detach().double()))
    h = harness(model, optimizer, sampling_interval=1, mlp_output_path="ffn.w2")
    model(idx).backward()
    optimizer.step()
    m = h.collect()
    for layer in range(2):
        expected = float((inputs[layer][-1].abs() <= 1e-3).double().mean())
        assert 0.2 < expected < 0.8  # ReLU makes exact zeros
        assert rel_close(m.value("llm.activation.sparsity", llm_layer=str(layer)), expected)


def test_model_without_decoder_layers_exports_nothing_and_says_so_once(harness, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.set_level(logging.INFO, logger="otel_llm")
    h = harness(model, optimizer, sampling_interval=1)
    for _ in range(2):
        idx = torch.randint(0, VOCAB, (2, 8))
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    m = h.collect()
    assert m.value("llm.train.steps") == 2
    assert not {n for n in m.names() if n.startswith(("llm.activation.", "llm.lora."))}
    hints = [r for r in caplog.records if "llm.activation.*" in r.getMessage()]
    assert len(hints) == 1 and "OTEL_LLM_LAYERS_PATH" in hints[0].getMessage()
    assert hints[0].levelno == logging.INFO
