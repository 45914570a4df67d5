"""Callbacks for training frameworks; each module imports its framework only when it is imported itself.

* :mod:`otel_llm.integrations.transformers`: ``OtelLlmCallback`` for the Hugging Face
  Trainer (also ``TrainingArguments(report_to="otel_llm")``), extra ``otel-llm[hf]``;
* :mod:`otel_llm.integrations.lightning`: ``OtelLlmCallback`` for ``lightning.pytorch``,
  extra ``otel-llm[lightning]``.
"""

__all__: list[str] = []
