"""JSON schemas for the custom resources of collector_configs/kubernetes, written from the CRDs they target.

kubernetes-validate knows the core kinds only. These schemas hold the fields
(and their types) of the CRD versions below that the kit uses, and the objects
they nest; ``additionalProperties: false`` wherever a misspelt key would
otherwise be silently ignored by the API server's pruning.

* ``PyTorchJob`` ``kubeflow.org/v1``: Kubeflow Training Operator v1.7-v1.8
  (``nprocPerNode`` is a string there; each replica's ``template`` is a core
  PodTemplateSpec, validated separately with kubernetes-validate);
* ``OpenTelemetryCollector`` ``opentelemetry.io/v1beta1``: OpenTelemetry
  Operator v0.97+ (``config`` is a structured object, not the string of v1alpha1);
* ``PodMonitor`` and ``PrometheusRule`` ``monitoring.coreos.com/v1``:
  Prometheus Operator v0.65+.
"""

from __future__ import annotations

from typing import Any

_STRING: dict[str, Any] = {"type": "string"}
_STRINGS: dict[str, Any] = {"type": "array", "items": _STRING}
_LABELS: dict[str, Any] = {"type": "object", "additionalProperties": _STRING}
_DURATION: dict[str, Any] = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_METADATA: dict[str, Any] = {
    "type": "object", "required": ["name"],
    "properties": {"name": _STRING, "namespace": _STRING, "labels": _LABELS, "annotations": _LABELS},
}
_RESOURCE_LIST: dict[str, Any] = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
_RESOURCES: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": {"requests": _RESOURCE_LIST, "limits": _RESOURCE_LIST}}


def _kind(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _METADATA,
                           "spec": spec}}


_REPLICA = {
    "type": "object", "required": ["template"], "additionalProperties": False,
    "properties": {"replicas": {"type": "integer", "minimum": 0},
                   "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                   "template": {"type": "object"}},
}
PYTORCHJOB = _kind("kubeflow.org/v1", "PyTorchJob", {
    "type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False,
    "properties": {
        "nprocPerNode": _STRING,
        "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
            "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
            "backoffLimit": {"type": "integer", "minimum": 0},
            "ttlSecondsAfterFinished": {"type": "integer"},
            "activeDeadlineSeconds": {"type": "integer"},
            "suspend": {"type": "boolean"}}},
        "elasticPolicy": {"type": "object"},
        "pytorchReplicaSpecs": {"type": "object", "minProperties": 1, "additionalProperties": False,
                                "properties": {"Master": _REPLICA, "Worker": _REPLICA}},
    },
})

OPENTELEMETRYCOLLECTOR = _kind("opentelemetry.io/v1beta1", "OpenTelemetryCollector", {
    "type": "object", "required": ["config"], "additionalProperties": False,
    "properties": {
        "mode": {"enum": ["daemonset", "deployment", "sidecar", "statefulset"]},
        "image": _STRING,
        "resources": _RESOURCES,
        "env": {"type": "array", "items": {"type": "object"}},
        "args": {"type": "object", "additionalProperties": _STRING},
        "config": {"type": "object", "required": ["receivers", "exporters", "service"],
                   "additionalProperties": False, "properties": {
                       **{kind: {"type": "object"} for kind in
                          ("receivers", "processors", "exporters", "connectors", "extensions")},
                       "service": {"type": "object", "required": ["pipelines"]}}},
    },
})

PODMONITOR = _kind("monitoring.coreos.com/v1", "PodMonitor", {
    "type": "object", "required": ["selector", "podMetricsEndpoints"], "additionalProperties": False,
    "properties": {
        "jobLabel": _STRING,
        "podTargetLabels": _STRINGS,
        "namespaceSelector": {"type": "object", "additionalProperties": False,
                              "properties": {"any": {"type": "boolean"}, "matchNames": _STRINGS}},
        "selector": {"type": "object", "additionalProperties": False,
                     "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}}},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"port": _STRING, "path": _STRING, "scheme": {"enum": ["http", "https"]},
                           "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                           "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}}}},
    },
})

_RULE = {
    "type": "object", "required": ["expr"], "additionalProperties": False,
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
    "properties": {"record": _STRING, "alert": _STRING, "expr": {"type": ["string", "integer"]},
                   "for": _DURATION, "labels": _LABELS, "annotations": _LABELS},
}
PROMETHEUSRULE = _kind("monitoring.coreos.com/v1", "PrometheusRule", {
    "type": "object", "additionalProperties": False,
    "properties": {"groups": {"type": "array", "items": {
        "type": "object", "required": ["name", "rules"], "additionalProperties": False,
        "properties": {"name": _STRING, "interval": _DURATION, "rules": {"type": "array", "items": _RULE}}}}},
})

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("kubeflow.org/v1", "PyTorchJob"): PYTORCHJOB,
    ("opentelemetry.io/v1beta1", "OpenTelemetryCollector"): OPENTELEMETRYCOLLECTOR,
    ("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUSRULE,
}
"""Schema of each custom (apiVersion, kind) the kit ships."""
