"""Operations artifacts derived from the catalog: Prometheus rules and a Grafana dashboard.

Printed by ``otel-llm rules`` and ``otel-llm dashboard``; checked-in copies live in
``collector_configs/``.
"""

__all__: list[str] = []
