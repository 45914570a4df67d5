"""torchrun worker for the DeepSpeed tests (CPU accelerator, gloo, 2 ranks).

Every configuration trains the same tiny GPT under DeepSpeed and, beside it in
the same process, a plain-torch replica on the global batch (both ranks'
micro-batches, one process, no DeepSpeed): the reference. Each rank writes what
otel_llm exported and the reference values per step to ``<out>/rank<k>.json``.

Modes:
  matrix      stages 0-3 x one/two param groups x clipping on/off x fp32/bf16 (+ fp16 at stage 0 where the CPU
              accelerator supports it), instrument(engine, engine_optimizer) with an in-memory reader;
  client      instrument(model, client_optimizer) after deepspeed.initialize, ZeRO-2 and ZeRO-3, two groups;
  zero_code   no otel_llm call at all (run under opentelemetry-instrument): values scraped from the rank's own
              Prometheus endpoint at the end;
  overflow    ZeRO-2 with a non-finite gradient at step 1: DeepSpeed skips that update.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist.worker import gauges as exported  # noqa: E402
from tests.models import GPT  # noqa: E402

VOCAB = 67
STEPS = 3
LR = 1e-2
THRESHOLD = 1e-5
SIGNALS = ("llm.grad.norm", "llm.grad.sparsity", "llm.param.update_ratio", "llm.param.update_variance_ratio",
           "llm.train.loss")


def tiny_gpt() -> GPT:
    """Odd tensor sizes (width 31, vocab 67): the last rank's flat partitions carry padding."""
    torch.manual_seed(0)
    return GPT(vocab=VOCAB, dim=31, heads=1)


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1000 * step + rank))


def param_groups(model: torch.nn.Module, groups: int) -> list[dict[str, Any]]:
    if groups == 1:
        return [{"params": list(model.parameters()), "weight_decay": 0.1}]
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def ds_config(stage: int, precision: str, clip: float) -> dict[str, Any]:
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                              "gradient_clipping": clip, "zero_optimization": {"stage": stage},
                              "steps_per_print": 10 ** 9}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000}
    return config


def manual_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy without F.cross_entropy, so the reference's losses are not the run's."""
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1)
    return -logp.gather(1, targets.reshape(-1, 1)).mean()


class Reference:
    """The same model trained by plain torch on the global batch, one process.

    Its losses and clipping are written out here: F.cross_entropy and clip_grad_norm_
    calls in this process would be seen as the run's own. DeepSpeed's stage-0
    fp16/bf16 optimizers take one zero-gradient step at initialisation (AdamW's
    step count and weight decay move): the reference takes it too.
    """

    def __init__(self, groups: int, clip: float, initial_zero_step: bool = False) -> None:
        self.model = tiny_gpt()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, groups), lr=LR)
        self.clip = clip
        if initial_zero_step:
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def local_loss(self, idx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(manual_cross_entropy(self.model(idx)[0], idx))

    def step(self, step: int, world: int) -> dict[str, float]:
        idx = torch.cat([batch(step, r) for r in range(world)])
        manual_cross_entropy(self.model(idx)[0], idx).backward()
        params = list(self.model.parameters())
        norm = float(torch.cat([p.grad.reshape(-1).double() for p in params]).norm())
        if self.clip > 0:
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(min(1.0, self.clip / (norm + 1e-6)))
        grads = torch.cat([p.grad.reshape(-1).double() for p in params])
        before = torch.cat([p.detach().reshape(-1).double() for p in params])
        self.optimizer.step()
        self.optimizer.zero_grad()
        after = torch.cat([p.detach().reshape(-1).double() for p in params])
        return {"llm.grad.norm": norm, "llm.grad.sparsity": float((grads.abs() <= THRESHOLD).double().mean()),
                "llm.param.update_ratio": float((after - before).norm() / before.norm()),
                "llm.param.update_variance_ratio": 0.0, "clipped": float(self.clip > 0 and norm + 1e-6 > self.clip)}


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def train(engine: Any, reference: Reference, rank: int, world: int, flush: Any) -> list[dict[str, Any]]:
    steps = []
    for step in range(STEPS):
        idx = batch(step, rank)
        local_reference_loss = reference.local_loss(idx)
        _, loss = engine(idx, idx)
        engine.backward(loss)
        engine.step()
        expected = reference.step(step, world)
        expected["llm.train.loss"] = local_reference_loss
        values = flush()
        steps.append({"exported": {k: values.get(k) for k in SIGNALS},
                      "counters": {k: values.get(k) for k in ("llm.train.steps", "llm.train.tokens",
                                                             "llm.grad.clipped_steps", "llm.train.skipped_steps")},
                      "deepspeed_norm": _number(engine.get_global_grad_norm()),
                      "reference": expected})
    return steps


def fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def padded(optimizer: Any, layout: Any) -> int:
    """Elements of this rank's flat partitions that hold no parameter."""
    if layout is None:
        return 0
    flats = (getattr(optimizer, "single_partition_of_fp32_groups", None)
             or getattr(optimizer, "fp32_partitioned_groups_flat", None) or [])
    return sum(flat.numel() - sum(length for _, length in layout.segments[id(flat)]) for flat in flats)


def run_matrix(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    import deepspeed
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import otel_llm
    from otel_llm.probes._deepspeed import partitions

    configs = [(stage, groups, clip, precision) for stage in (0, 1, 2, 3) for groups in (1, 2)
               for clip in (0.0, 0.5) for precision in ("fp32", "bf16")]
    if fp16_supported():
        configs += [(0, 2, 0.5, "fp16")]
    runs = {}
    for stage, groups, clip, precision in configs:
        model = tiny_gpt()
        client = torch.optim.AdamW(param_groups(model, groups), lr=LR)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client,
                                                       config=ds_config(stage, precision, clip))
        reader = InMemoryMetricReader()
        session = otel_llm.Instrumentation(engine, optimizer, extra_readers=[reader],
                                           config=otel_llm.Config(sampling_interval=1, exporters="none"))

        def flush(session: Any = session, reader: Any = reader) -> dict[str, float]:
            session.flush(5.0)
            return exported(reader)

        reference = Reference(groups, clip, initial_zero_step=type(optimizer).__name__ == "FP16_UnfusedOptimizer")
        layout = partitions(optimizer)
        runs[f"stage{stage}-groups{groups}-clip{clip}-{precision}"] = {
            "wrapper": type(optimizer).__name__, "steps": train(engine, reference, rank, world, flush),
            "padding": padded(optimizer, layout)}
        session.shutdown()
        engine.destroy()
    return {"runs": runs, "fp16": fp16_supported()}


def run_client(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """instrument(model, client_optimizer) after initialize: the engine's wrapper is found through its steps."""
    import deepspeed
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import otel_llm

    runs = {}
    for stage in (2, 3):
        model = tiny_gpt()
        client = torch.optim.AdamW(param_groups(model, 2), lr=LR)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds_config(stage, "fp32", 0.5))
        reader = InMemoryMetricReader()
        session = otel_llm.Instrumentation(model, client, extra_readers=[reader],
                                           config=otel_llm.Config(sampling_interval=1, exporters="none"))

        def flush(session: Any = session, reader: Any = reader) -> dict[str, float]:
            session.flush(5.0)
            return exported(reader)

        runs[f"stage{stage}"] = {"steps": train(engine, Reference(2, 0.5), rank, world, flush)}
        session.shutdown()
        engine.destroy()
    return {"runs": runs}


def scrape(url: str) -> dict[str, float]:
    """The rank's own Prometheus endpoint: the last value of each unlabelled or param-group "all" series."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in body.splitlines():
        match = re.match(r'^([a-z_]+)(\{[^}]*\})? (\S+)$', line)
        if match and (match.group(2) is None or 'llm_param_group="all"' in match.group(2)
                      or "llm_param_group" not in match.group(2)):
            values.setdefault(match.group(1), float(match.group(3)))
    return values


def run_zero_code(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """No otel_llm call: opentelemetry-instrument started the session; one scrape after the last step."""
    import deepspeed

    stage = args.stage
    model = tiny_gpt()
    client = torch.optim.AdamW(param_groups(model, 2), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds_config(stage, "fp32", 0.5))
    from otel_llm.session import active

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("otel_llm").addHandler(handler)
    session = active()
    assert session is not None and session.prometheus_url is not None, "zero code started no session"
    url = session.prometheus_url

    def flush() -> dict[str, float]:
        return {}

    steps = train(engine, Reference(2, 0.5), rank, world, flush)
    session.flush(5.0)
    return {"steps": steps, "scraped": scrape(url), "warnings": warnings}


def run_overflow(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    """ZeRO-2 fp32: a non-finite gradient at step 1 makes DeepSpeed skip that update (its overflow path)."""
    import deepspeed
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import otel_llm

    model = tiny_gpt()
    client = torch.optim.AdamW(param_groups(model, 2), lr=LR)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds_config(2, "fp32", 0.5))
    reader = InMemoryMetricReader()
    session = otel_llm.Instrumentation(engine, optimizer, extra_readers=[reader],
                                       config=otel_llm.Config(sampling_interval=1, exporters="none"))
    for step in range(STEPS):
        idx = batch(step, rank)
        _, loss = engine(idx, idx)
        engine.backward(loss * float("nan") if step == 1 else loss)
        engine.step()
    session.flush(5.0)
    values = exported(reader)
    session.shutdown()
    return {"deepspeed_skipped": engine.skipped_steps, "deepspeed_norm": _number(engine.get_global_grad_norm()),
            "exported_norm": values.get("llm.grad.norm"),
            "counters": {k: values.get(k) for k in ("llm.train.steps", "llm.train.skipped_steps")}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("matrix", "client", "zero_code", "overflow"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    modes = {"matrix": run_matrix, "client": run_client, "zero_code": run_zero_code, "overflow": run_overflow}
    result = modes[args.mode](args, rank, world)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
