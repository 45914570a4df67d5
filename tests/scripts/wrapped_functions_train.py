"""A training script that wraps torch functions otel_llm also wraps, as profilers and kernel shims do.

Its own ``F.scaled_dot_product_attention`` wrapper counts calls and changes the
output (scales it by 0.5); its ``F.cross_entropy`` wrapper counts calls. At the
end it prints one ``RESULT`` JSON line: call counts, every step's loss and a
digest of the final parameters, so runs with and without otel_llm can be
compared bit for bit. ``WRAP_ORDER`` says when it wraps, relative to otel_llm:

* ``plain`` (default): no otel_llm import (bare, or zero code under
  ``opentelemetry-instrument``, where otel_llm is installed before the script runs);
* ``instrument-first``: ``otel_llm.instrument(model, optimizer)``, then the wrappers;
* ``wrap-first``: the wrappers, then ``otel_llm.instrument(model, optimizer)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import torch
import torch.nn.functional as F
from nanogpt_train import GPT

calls: Counter[str] = Counter()


def wrap_functions() -> None:
    sdpa, cross_entropy = F.scaled_dot_product_attention, F.cross_entropy

    def scripts_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs) * 0.5

    def scripts_cross_entropy(*args, **kwargs):
        calls["cross_entropy"] += 1
        return cross_entropy(*args, **kwargs)

    F.scaled_dot_product_attention = scripts_sdpa
    F.cross_entropy = scripts_cross_entropy


def main() -> None:
    order = os.environ.get("WRAP_ORDER", "plain")
    steps = int(os.environ.get("TRAIN_STEPS", "6"))
    torch.manual_seed(0)
    model = GPT(vocab=64, block_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if order == "instrument-first":
        import otel_llm

        otel_llm.instrument(model, optimizer)
    wrap_functions()
    if order == "wrap-first":
        import otel_llm

        otel_llm.instrument(model, optimizer)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (4, 16))
        _, loss = model(idx, torch.roll(idx, -1, dims=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item().hex())
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    print("RESULT " + json.dumps({"calls": dict(calls), "losses": losses, "params": digest.hexdigest()}), flush=True)


if __name__ == "__main__":
    main()
