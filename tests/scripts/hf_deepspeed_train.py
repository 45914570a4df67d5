"""A Hugging Face Trainer run with a DeepSpeed ZeRO config and the otel_llm callback, under torchrun.

Each rank scrapes its own Prometheus endpoint after every optimizer step and
writes the scrapes and the Trainer's log history to ``<out>/rank<k>.json``.
Usage: torchrun --nproc_per_node=2 hf_deepspeed_train.py --out DIR --stage N
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from otel_llm.integrations.transformers import OtelLlmCallback  # noqa: E402
from otel_llm.session import active  # noqa: E402
from tests.models import padded_rows, tiny_llama  # noqa: E402
from tests.support.scrape import scrape  # noqa: E402

VOCAB = 64


class Scrapes(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.scrapes: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        telemetry = active()
        assert telemetry is not None and telemetry.flush(5.0)
        self.scrapes.append({name: value for (name, labels), value in scrape(telemetry.prometheus_url).items()
                             if "le" not in dict(labels) and dict(labels).get("llm_param_group", "all") == "all"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": args.stage}, "steps_per_print": 10 ** 9}
    training = transformers.TrainingArguments(
        output_dir=str(args.out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5,
        learning_rate=1e-2, max_grad_norm=0.17, logging_steps=1, save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, report_to="none", deepspeed=zero)
    scrapes = Scrapes()
    trainer = transformers.Trainer(model=tiny_llama(VOCAB), args=training, train_dataset=padded_rows(40, VOCAB),
                                   callbacks=[OtelLlmCallback(), scrapes])
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    (args.out / f"rank{rank}.json").write_text(json.dumps({"log": trainer.state.log_history, "scrapes": scrapes.scrapes,
                                                           "optimizer": type(trainer.optimizer).__name__}))


if __name__ == "__main__":
    main()
