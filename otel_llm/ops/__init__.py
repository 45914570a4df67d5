"""Operations artifacts derived from the catalog: Prometheus rules, a Grafana dashboard, their Kubernetes
objects, the README tables and the series plan.

Printed by ``otel-llm rules``, ``dashboard``, ``docs`` and ``plan``; checked-in copies live in
``collector_configs/``.
"""

__all__: list[str] = []
