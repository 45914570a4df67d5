"""One series name per catalog metric on every path.

otel_llm's endpoint is the real Prometheus reader of the OpenTelemetry SDK; the
Collector and Prometheus 3's OTLP receiver are the upstream algorithm written
out in tests/support/naming.py. (VictoriaMetrics, the third OTLP path, is the
real binary in test_ops_backends.py.) Every catalog metric is checked, so a
metric added with a unit that splits its name fails here, with the rule.
"""

from __future__ import annotations

from otel_llm.catalog import CATALOG, MetricSpec, prometheus_name, unit_rule_broken
from otel_llm.ops.promql import series_name
from tests.support.naming import OTLP_KIND, exposed_names, series_names, translated_name


def test_every_catalog_unit_follows_the_rule():
    broken = [reason for spec in CATALOG if (reason := unit_rule_broken(spec))]
    assert not broken, "\n".join(broken)


def test_scrape_collector_and_prometheus3_name_every_catalog_metric_alike():
    expected = {spec.name: series_names(spec, series_name(spec)) for spec in CATALOG}
    translated = {spec.name: series_names(spec, translated_name(spec.name, spec.unit, OTLP_KIND[spec.instrument]))
                  for spec in CATALOG}
    assert translated == expected
    assert exposed_names(CATALOG) == set().union(*expected.values())


def test_the_rule_explains_a_unit_that_would_split_a_name():
    loss = MetricSpec("llm.train.loss", "observable_gauge", "1", "")
    assert "declare DIMENSIONLESS" in (unit_rule_broken(loss) or "")
    assert translated_name(loss.name, loss.unit, "gauge") == "llm_train_loss_ratio"
    assert prometheus_name(loss.name, loss.unit, loss.instrument) == "llm_train_loss"
    moved = MetricSpec("llm.ratio.max", "observable_gauge", "1", "")
    assert unit_rule_broken(moved) and translated_name(moved.name, "1", "gauge") == "llm_max_ratio"
    seconds = MetricSpec("llm.seconds.idle", "observable_gauge", "s", "")
    assert unit_rule_broken(seconds) and translated_name(seconds.name, "s", "gauge") == "llm_seconds_idle"
    total = MetricSpec("llm.total.tokens", "counter", "{token}", "")
    assert unit_rule_broken(total) and translated_name(total.name, total.unit, "monotonic_sum") == "llm_tokens_total"
    assert translated_name("llm.rope.angle_deviation", "rad", "gauge") == "llm_rope_angle_deviation_rad"
    assert translated_name("llm.kv_cache.hit_ratio", "1", "gauge") == "llm_kv_cache_hit_ratio"
