"""From instruments to the outside: the MeterProvider, catalog Views, the Prometheus endpoint, OTLP."""
