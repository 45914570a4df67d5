"""Real training runs for the anomaly evaluation: four healthy workloads, five injected faults, recorded series.

Each run trains on CPU with otel_llm at its default sampling and records, for
every sampled step, the gauge series the session exported (read from an
InMemoryMetricReader after the step), with NaN put back for the series a step's
``llm.telemetry.nonfinite`` count says went non-finite. That is what the
detector is fed, so :mod:`anomaly_eval` can score detector variants offline.

A faulty run is the healthy run (same seeds, same data) with one fault from
step ``onset``, the first sampled step at or after the workload's nominal onset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader

import otel_llm
from otel_llm.catalog import ATTR_SIGNAL, TELEMETRY_NONFINITE
from otel_llm.session import Instrumentation

__all__ = ["FAULTS", "Recording", "Workload", "long_runs", "load_or_record", "workloads"]

ROOT = Path(__file__).resolve().parents[1]
RECORDING_VERSION = 1
"""Bump when a workload or fault changes, so cached recordings are made again."""

FAULTS = ("lr_x100", "random_tokens", "weight_x10", "nan_batch", "shifted_labels")
"""lr x100 from the onset on; one batch of uniformly random tokens; one layer's MLP output weight x10; one batch
whose embeddings are NaN (the loop does not skip it, as plain loops and the HF Trainer do not); targets one token
further ahead from the onset on."""

Points = dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class Recording:
    """The gauge points of every sampled step of one run."""

    workload: str
    fault: str | None
    onset: int | None
    steps: list[int]
    points: list[Points]

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORDING_VERSION, "workload": self.workload, "fault": self.fault, "onset": self.onset,
                "steps": self.steps, "points": self.points}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recording:
        points = [{name: [(dict(attrs), float(value)) for attrs, value in series] for name, series in step.items()}
                  for step in data["points"]]
        return cls(data["workload"], data["fault"], data["onset"], list(data["steps"]), points)


# -- models ---------------------------------------------------------------------------------------------------------
class CharBlock(nn.Module):
    """nanoGPT's Block: pre-LayerNorm, causal SDPA attention with dropout, GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    """nanoGPT's GPT at a CPU size: learned positions, weight-tied head, dropout."""

    def __init__(self, vocab: int, block: int = 64, dim: int = 96, heads: int = 4, layers: int = 3,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(CharBlock(dim, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


# -- data ------------------------------------------------------------------------------------------------------------
def _package_text(module: str, *parts: str) -> str:
    """A text file installed with one of the project's dependencies (its docs or source)."""
    base = Path(__import__(module).__file__).parent  # type: ignore[arg-type]
    return base.joinpath(*parts).read_text(encoding="utf-8")


def _bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def _warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- workloads -------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A training run: model and optimizer, batches of ``length + 2`` tokens, how the model takes them."""

    name: str
    steps: int
    nominal_onset: int
    vocab: int
    length: int
    batch_size: int
    tokens: Callable[[], torch.Tensor]
    build: Callable[[], tuple[nn.Module, torch.optim.Optimizer, Callable[[int], float]]]
    hf: bool
    """Hugging Face causal LM: labels go in as ``labels=`` and the model shifts them."""
    layer_weight: Callable[[nn.Module], torch.Tensor]
    embedding: Callable[[nn.Module], nn.Module]
    clip: float = 1.0
    global_batches: bool = False
    """Draw batch starts from the global RNG (the demo does); otherwise from a generator seeded per step."""
    seed: int = 0

    def loss(self, model: nn.Module, tokens: torch.Tensor, shift: int) -> torch.Tensor:
        inputs = tokens[:, :self.length]
        targets = tokens[:, 1 + shift:self.length + 1 + shift]
        if self.hf:  # the model predicts labels[i + 1] at position i
            labels = torch.cat([torch.full_like(targets[:, :1], -100), targets[:, :-1]], dim=1)
            return model(input_ids=inputs, labels=labels).loss
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _demo() -> Workload:
    sys.path.insert(0, str(ROOT / "examples"))
    from train import TinyGPT  # the README demo's model, data and schedule

    def build() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], float]]:
        model = TinyGPT()
        return model, torch.optim.AdamW(model.parameters(), lr=3e-3), lambda s: min(1.0, (s + 1) / 50)

    def tokens() -> torch.Tensor:
        return torch.tensor([int(127 + 100 * math.sin(i / 7)) % 256 for i in range(20_000)])

    return Workload("demo", 300, 200, 256, 63, 8, tokens, build, hf=False,
                    layer_weight=lambda m: m.blocks[1].mlp[2].weight, embedding=lambda m: m.wte,
                    global_batches=True)


def _changelog() -> str:
    return _package_text("lightning", "pytorch", "CHANGELOG.md")


def _nanogpt() -> Workload:
    chars = sorted(set(_changelog()))

    def build() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], float]]:
        model = CharGPT(len(chars))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        return model, optimizer, _warmup_cosine(40, 400)

    def tokens() -> torch.Tensor:
        index = {c: i for i, c in enumerate(chars)}
        return torch.tensor([index[c] for c in _changelog()], dtype=torch.long)

    return Workload("nanogpt-char", 400, 300, len(chars), 64, 12, tokens, build, hf=False,
                    layer_weight=lambda m: m.h[1].mlp[2].weight, embedding=lambda m: m.wte)


def _pretrained_llama(cache: Path) -> nn.Module:
    """The tiny Llama after 300 steps on the Lightning changelog (bytes), cached: the fine-tunes start here.

    Made under its own seed, so every run starts from the same weights whichever made the cache.
    """
    model = _tiny_llama()
    path = cache / f"llama-base-v{RECORDING_VERSION}.pt"
    if not path.exists():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            base = _tiny_llama()
            data = _bytes(_changelog())
            optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
            generator = torch.Generator().manual_seed(1)
            for _ in range(300):
                starts = torch.randint(0, len(data) - 65, (8,), generator=generator)
                batch = torch.stack([data[s:s + 65] for s in starts])
                base(input_ids=batch, labels=batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), path)
    model.load_state_dict(torch.load(path))
    return model


def _module_source() -> torch.Tensor:
    return _bytes(_package_text("torch", "nn", "modules", "module.py"))


def _llama_finetune(cache: Path) -> Workload:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], float]]:
        model = _pretrained_llama(cache)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), _warmup_cosine(30, 300)

    return Workload("llama-finetune", 300, 200, 256, 64, 8, _module_source, build, hf=True,
                    layer_weight=lambda m: m.model.layers[1].mlp.down_proj.weight,
                    embedding=lambda m: m.model.embed_tokens)


def _lora(cache: Path) -> Workload:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], float]]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(_pretrained_llama(cache), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                    target_modules=["q_proj", "v_proj"]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=2e-3), _warmup_cosine(30, 300)

    return Workload("llama-lora", 300, 200, 256, 64, 8, _module_source, build, hf=True,
                    layer_weight=lambda m: m.base_model.model.model.layers[1].mlp.down_proj.weight,
                    embedding=lambda m: m.base_model.model.model.embed_tokens)


def workloads(cache: Path, seed: int = 0) -> list[Workload]:
    """The four workloads, in table order; another seed changes their initialisation and batches."""
    chosen = [_demo(), _nanogpt(), _llama_finetune(cache), _lora(cache)]
    return chosen if seed == 0 else [dataclasses.replace(w, name=f"{w.name}-seed{seed}", seed=seed) for w in chosen]


def long_runs() -> list[Workload]:
    """Healthy only: the demo for 1500 steps, long enough for the adaptive interval to double (10 to 20 at ~1100)."""
    return [dataclasses.replace(_demo(), name="demo-1500", steps=1500, nominal_onset=1500)]


# -- running and recording -------------------------------------------------------------------------------------------
class _SeriesReader:
    """Gauge points of the step just published, read the way an exporter reads them."""

    def __init__(self, session: Instrumentation, reader: InMemoryMetricReader) -> None:
        self._session, self._reader = session, reader
        self._nonfinite: dict[str, float] = {}
        self._seen: dict[str, list[dict[str, str]]] = {}

    def read(self) -> Points:
        self._session.flush()
        points: Points = {}
        nonfinite: dict[str, float] = {}
        data = self._reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == TELEMETRY_NONFINITE:
                        for point in metric.data.data_points:
                            nonfinite[str(point.attributes[ATTR_SIGNAL])] = float(point.value)
                    elif isinstance(metric.data, Gauge):
                        points[metric.name] = [(dict(p.attributes), float(p.value)) for p in metric.data.data_points]
        for signal, count in nonfinite.items():  # the series that went missing this step were NaN
            if count > self._nonfinite.get(signal, 0.0):
                present = points.setdefault(signal, [])
                present += [(attrs, math.nan) for attrs in self._seen.get(signal, [{}])
                            if all(attrs != other for other, _ in present)]
        self._nonfinite = nonfinite
        for signal, series in points.items():
            known = self._seen.setdefault(signal, [])
            known += [attrs for attrs, _ in series if attrs not in known]
        return points


@contextlib.contextmanager
def _nan_output(module: nn.Module) -> Iterator[None]:
    handle = module.register_forward_hook(lambda _module, _args, output: output * math.nan)
    try:
        yield
    finally:
        handle.remove()


def _onset(workload: Workload, steps: list[int]) -> int:
    return next(step for step in steps if step >= workload.nominal_onset)


def record(workload: Workload, fault: str | None, onset: int | None) -> Recording:
    """Train ``workload`` with ``fault`` from step ``onset`` and record the exported gauges of each sampled step."""
    torch.manual_seed(workload.seed)
    data = workload.tokens()
    model, optimizer, factor = workload.build()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    reader = InMemoryMetricReader()
    session = Instrumentation(model, optimizer, config=otel_llm.Config(exporters="none", anomaly_detection=False),
                              extra_readers=[reader])
    series = _SeriesReader(session, reader)
    recording = Recording(workload.name, fault, onset, [], [])
    span = workload.length + 2
    try:
        for step in range(workload.steps):
            seed = step + 1_000_003 * workload.seed
            generator = None if workload.global_batches else torch.Generator().manual_seed(seed)
            starts = torch.randint(0, len(data) - span, (workload.batch_size,), generator=generator)
            tokens = torch.stack([data[s:s + span] for s in starts])
            at_onset = fault is not None and step == onset
            after_onset = fault is not None and onset is not None and step >= onset
            if at_onset and fault == "random_tokens":
                tokens = torch.randint(0, workload.vocab, tokens.shape, generator=torch.Generator().manual_seed(7))
            if at_onset and fault == "lr_x100":
                schedule.base_lrs = [lr * 100 for lr in schedule.base_lrs]
                for group in optimizer.param_groups:
                    group["lr"] *= 100
            if at_onset and fault == "weight_x10":
                with torch.no_grad():
                    workload.layer_weight(model).mul_(10)
            sampled = session.sampled
            poisoned = _nan_output(workload.embedding(model)) if at_onset and fault == "nan_batch" \
                else contextlib.nullcontext()
            with poisoned:
                loss = workload.loss(model, tokens, shift=1 if after_onset and fault == "shifted_labels" else 0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), workload.clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if sampled:
                recording.steps.append(step)
                recording.points.append(series.read())
    finally:
        session.shutdown()
    return recording


def load_or_record(workload: Workload, fault: str | None, cache: Path, log: Callable[[str], None]) -> Recording:
    """The cached recording of (workload, fault), made first when missing or from an older harness."""
    path = cache / f"{workload.name}-{fault or 'healthy'}.json"
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("version") == RECORDING_VERSION:
            return Recording.from_json(data)
    onset = None
    if fault is not None:
        onset = _onset(workload, load_or_record(workload, None, cache, log).steps)
    log(f"recording {workload.name} {fault or 'healthy'} ({workload.steps} steps)")
    recording = record(workload, fault, onset)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recording.to_json()))
    return recording
