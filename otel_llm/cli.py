"""The ``otel-llm`` command: inspect the metric catalog and print the operations kit built from it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from otel_llm.catalog import CATALOG
from otel_llm.config import Config
from otel_llm.ops import dashboard, kubernetes, plan, rules
from otel_llm.ops.docs import config_table, metric_table, peak_table, signal_guide, threshold_table

__all__ = ["main"]


def _table() -> str:
    header = ("name", "instrument", "unit", "attributes", "buckets")
    rows = [header] + [
        (s.name, s.instrument, s.unit or "-", ",".join(s.attributes) or "-",
         ",".join(f"{b:g}" for b in s.buckets) if s.buckets else "-") for s in CATALOG]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otel-llm", description="otel_llm: LLM training signals as OTel metrics")
    commands = parser.add_subparsers(dest="command", required=True)
    catalog = commands.add_parser("catalog", help="print the metric catalog")
    catalog.add_argument("--format", choices=("table", "json", "markdown"), default="table")
    docs = commands.add_parser("docs", help="print a README section rendered from the code")
    docs.add_argument("table", choices=("metrics", "thresholds", "config", "guide", "scale", "peaks"))
    planned = commands.add_parser("plan", help="print the series a training job will export, per metric and in total")
    for option, help_text in (("--layers", "decoder layers"), ("--heads", "attention heads per layer"),
                              ("--ranks", "data-parallel ranks (world size)")):
        planned.add_argument(option, type=int, required=True, help=help_text)
    planned.add_argument("--lora", action="store_true", help="LoRA adapters on the decoder layers")
    planned.add_argument("--param-groups", type=int, default=1, help="optimizer param groups (default 1)")
    planned.add_argument("--export-ranks", choices=("all", "zero"), default="all",
                         help="which ranks export (OTEL_LLM_EXPORT_RANKS; default all)")
    planned.add_argument("--disable", default="", metavar="PATTERNS",
                         help="signals left out (OTEL_LLM_DISABLED_SIGNALS: comma list, fnmatch patterns)")
    for name, help_text, formats in (
            ("rules", "print Prometheus recording and alerting rules", ("prometheus", "prometheusrule")),
            ("dashboard", "print the Grafana dashboard", ("json", "configmap"))):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--format", choices=formats, default=formats[0],
                             help=f"{formats[0]} (default) or the Kubernetes object ({formats[1]})")
        # series names no longer depend on the path: the old switch is accepted and ignored
        command.add_argument("--naming", choices=("scrape", "otlp"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if getattr(args, "naming", None):
        print("otel-llm: --naming is ignored: series names are the same on every path", file=sys.stderr)
    if args.command == "plan":
        try:
            config = Config(export_ranks=args.export_ranks, disabled_signals=args.disable)
            shape = plan.Shape(args.layers, args.heads, args.ranks, args.lora, args.param_groups)
        except ValueError as exc:
            parser.error(str(exc))
        print(plan.render(plan.plan(shape, config), config))
    elif args.command == "rules":
        print(rules.render() if args.format == "prometheus" else kubernetes.prometheus_rule(), end="")
    elif args.command == "dashboard":
        print(dashboard.render() if args.format == "json" else kubernetes.dashboard_configmap(), end="")
    elif args.command == "catalog":
        if args.format == "json":
            print(json.dumps([spec.to_json() for spec in CATALOG], indent=2))
        elif args.format == "markdown":
            print(metric_table())
        else:
            print(_table())
    else:
        print({"metrics": metric_table, "thresholds": threshold_table, "config": config_table,
               "guide": signal_guide, "scale": plan.scale_table, "peaks": peak_table}[args.table]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
