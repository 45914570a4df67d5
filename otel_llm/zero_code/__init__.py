"""``opentelemetry-instrument python train.py``: the instrumentor and configurator entry points."""
