#!/usr/bin/env bash
# Install the test dependencies (torch 2.13.0 CPU, transformers, peft, TRL, DeepSpeed, the OTel stack, mypy,
# Prometheus/promtool/VictoriaMetrics binaries), type-check the package and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
DS_BUILD_OPS=0 .venv/bin/python -m pip install --quiet -e ".[test]"
bash scripts/fetch_backends.sh
.venv/bin/python -m mypy
HF_HUB_OFFLINE=1 exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
