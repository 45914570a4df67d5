"""The loss recomputation of a sampled step costs a few chunks of memory, whatever the vocabulary.

bf16 logits of 2,048 tokens over GPT-2's 50,257-entry vocabulary are 196 MiB;
upcasting them in chunks of 8,192 rows added 792 MiB at the peak. The probe's
call runs in a process of its own, where the peak resident size before it is
the size of the logits, so ``ru_maxrss`` after it is the recomputation's peak
(CPU tensors are not seen by tracemalloc, and large ones go straight to mmap).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_llm.probes.loss import RECOMPUTE_CHUNK_BYTES

pytestmark = pytest.mark.timeout(120)

TOKENS, VOCAB = 2048, 50257
MiB = 2**20

SCRIPT = """
import json, resource, sys
import torch
import torch.nn.functional as F
from otel_llm.config import Config
from otel_llm.probes.loss import LossProbe, bind_cross_entropy

torch.set_num_threads(1)
tokens, vocab = int(sys.argv[1]), int(sys.argv[2])
probe = LossProbe(Config(exporters="none"))
warm = torch.randn(4, vocab, dtype=torch.bfloat16)  # first calls load kernels: not the recomputation's cost
probe.on_call(*bind_cross_entropy(warm, torch.zeros(4, dtype=torch.long)), torch.tensor(0.0))
probe.reset()
generator = torch.Generator().manual_seed(0)
logits = torch.empty(tokens, vocab, dtype=torch.bfloat16).normal_(generator=generator)  # no float32 copy
target = torch.randint(0, vocab, (tokens,), generator=generator)
target[::7] = -100
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
probe.on_call(*bind_cross_entropy(logits, target), torch.tensor(0.0))
extra = peak() - before
losses, valid = probe._losses[0], probe._valid[0]
reference = F.cross_entropy(logits.float(), target, reduction="none")
print(json.dumps({"extra": extra, "logits": logits.numel() * 2, "valid": int(valid.sum()),
                  "expected_valid": int((target != -100).sum()),
                  "error": float((losses - reference)[valid].abs().max())}))
"""


def test_recomputing_the_loss_of_bf16_logits_over_a_large_vocabulary_adds_a_few_chunks_at_most(tmp_path):
    script = tmp_path / "recompute.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]  # the checkout under test, whatever is installed
    result = subprocess.run([sys.executable, str(script), str(TOKENS), str(VOCAB)], capture_output=True, text=True,
                            timeout=100, check=False, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    print(f"logits {measured['logits'] / MiB:.0f} MiB; recomputation peak +{measured['extra'] / MiB:.0f} MiB "
          f"(chunks of {RECOMPUTE_CHUNK_BYTES / MiB:.0f} MiB)")
    assert measured["extra"] <= 3 * RECOMPUTE_CHUNK_BYTES + 16 * MiB
    assert measured["extra"] < measured["logits"]  # less than the logits themselves, let alone their float32 copy
    assert measured["valid"] == measured["expected_valid"]
    assert measured["error"] < 1e-4  # every chunk recomputed: the per-token losses are cross_entropy's
