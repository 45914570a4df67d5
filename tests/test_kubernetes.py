"""The Kubernetes kit (collector_configs/kubernetes): it parses, validates and wires otel_llm up as documented.

Core kinds are validated with kubernetes-validate (strict: unknown fields fail)
against Kubernetes :data:`KUBERNETES`; the custom resources against the schemas
of tests/support/crds.py, which name the CRD versions targeted. Every file a
kustomization lists exists and parses; where ``kubectl`` is installed its
built-in kustomize renders every overlay too. The generated objects equal what
the CLI prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from otel_llm.config import options
from otel_llm.ops import dashboard, rules
from otel_llm.ops.kubernetes import DASHBOARD_KEY
from tests.support.crds import SCHEMAS
from tests.support.otelcol import check_collector_config

KIT = Path(__file__).resolve().parents[1] / "collector_configs" / "kubernetes"
OVERLAYS = sorted(p.parent for p in (KIT / "overlays").glob("*/kustomization.yaml"))
KUBERNETES = "1.30.0"
"""Validated against: native sidecar containers (init containers with restartPolicy Always) are on from 1.29."""
CORE = {("v1", "ConfigMap"), ("v1", "Service"), ("batch/v1", "Job"), ("v1", "PodTemplate")}
GENERATED = {"base/prometheusrule.yaml": ["rules", "--format", "prometheusrule"],
             "base/grafana-dashboard.yaml": ["dashboard", "--format", "configmap"]}
ENV = {field: env for field, env, _, _ in options()}


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not an object"
        assert doc["metadata"].get("name"), f"{path}: {doc['kind']} without a name"
    return docs


def listed(directory: Path) -> list[dict[str, Any]]:
    """The objects of a kustomization and of the kustomizations it lists, in order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, "plain resources only: no patches to render"
    objects = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory.relative_to(KIT)}/kustomization.yaml lists missing {resource}"
        objects += listed(path) if path.is_dir() else documents(path)
    return objects


def every_object() -> list[dict[str, Any]]:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for overlay in OVERLAYS:
        for obj in listed(overlay):
            seen[obj["kind"], obj["metadata"]["name"]] = obj
    return list(seen.values())


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Job":
        return [obj["spec"]["template"]]
    if obj["kind"] == "PyTorchJob":
        return [replica["template"] for replica in obj["spec"]["pytorchReplicaSpecs"].values()]
    return []


def first_error(exc: Exception) -> str:
    return str(exc).splitlines()[0]


# -- files, rendering, schemas ---------------------------------------------------------


def test_there_are_a_base_and_the_two_overlays():
    assert [p.name for p in OVERLAYS] == ["indexed-job-collector-sidecar", "pytorchjob-operator-sidecar"]
    assert {o["kind"] for o in listed(KIT / "base")} == {"PodMonitor", "PrometheusRule", "ConfigMap"}
    for overlay in OVERLAYS:
        assert yaml.safe_load((overlay / "kustomization.yaml").read_text())["resources"][0] == "../../base"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_kustomize_renders_exactly_the_listed_objects(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the listed files are checked above")
    rendered = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60,
                              check=False)
    assert rendered.returncode == 0, rendered.stderr
    objects = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, objects)) == sorted(map(key, listed(overlay)))
    assert sorted(objects, key=key) == sorted(listed(overlay), key=key)  # no field lost or changed


def test_core_kinds_validate_strictly_with_kubernetes_validate():
    checked = set()
    for obj in every_object():
        kind = (obj["apiVersion"], obj["kind"])
        targets = [obj] if kind in CORE else [
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{obj['metadata']['name']}-{i}"},
             "template": template} for i, template in enumerate(pod_templates(obj))]
        for target in targets:
            try:
                kubernetes_validate.validate(target, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {first_error(exc)}")
            checked.add(target["kind"])
    assert checked == {"ConfigMap", "Service", "Job", "PodTemplate"}


def test_custom_resources_validate_against_the_targeted_crd_schemas():
    checked = set()
    for obj in every_object():
        kind = (obj["apiVersion"], obj["kind"])
        if kind in CORE:
            continue
        assert kind in SCHEMAS, f"no schema for {kind}"
        try:
            jsonschema.validate(obj, SCHEMAS[kind])
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.absolute_path)}")
        checked.add(kind)
    assert checked == set(SCHEMAS)


def test_the_crd_schemas_reject_a_misspelt_field():
    pytorchjob = by_kind(every_object(), "PyTorchJob")
    broken = {**pytorchjob, "spec": {**pytorchjob["spec"], "nProcPerNode": "8"}}
    with pytest.raises(jsonschema.ValidationError, match="nProcPerNode"):
        jsonschema.validate(broken, SCHEMAS["kubeflow.org/v1", "PyTorchJob"])


@pytest.mark.parametrize("path", sorted(GENERATED))
def test_generated_objects_equal_the_cli_output(path):
    printed = subprocess.run([sys.executable, "-m", "otel_llm.cli", *GENERATED[path]], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    assert (KIT / path).read_text() == printed, (
        f"collector_configs/kubernetes/{path} is stale: run `otel-llm {' '.join(GENERATED[path])} > ...`")


def test_prometheusrule_holds_the_rules_and_the_configmap_the_dashboard():
    objects = listed(KIT / "base")
    assert by_kind(objects, "PrometheusRule")["spec"]["groups"] == rules.groups()
    configmap = by_kind(objects, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD_KEY]) == dashboard.dashboard()
    assert len(yaml.safe_dump(configmap)) < 256 * 1024, "kubectl apply keeps a copy in a 256 KiB annotation"


# -- the training pods -------------------------------------------------------------------


def jobs() -> list[dict[str, Any]]:
    return [o for o in every_object() if o["kind"] in ("Job", "PyTorchJob")]


def trainer(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in template["spec"]["containers"] if c["command"] == ["torchrun"]]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """Name -> value or the downward-API field path; each $(VAR) must name a variable defined before it."""
    env: dict[str, Any] = {}
    for var in container["env"]:
        value = var.get("value")
        if value is None:
            value = ("fieldRef", var["valueFrom"]["fieldRef"]["fieldPath"])
        else:
            for ref in re.findall(r"\$\((\w+)\)", value):
                assert ref in env, f"{var['name']} refers to {ref} before it is defined"
        env[var["name"]] = value
    return env


def test_both_job_kinds_run_torchrun_under_opentelemetry_instrument():
    assert {o["kind"] for o in jobs()} == {"Job", "PyTorchJob"}
    for obj in jobs():
        for template in pod_templates(obj):
            args = trainer(template)["args"]
            start = args.index("--no-python")
            assert args[start:] == ["--no-python", "opentelemetry-instrument", "python", "train.py"], args


def test_training_pods_set_the_otel_variables_with_downward_api_resource_attributes():
    for obj in jobs():
        for template in pod_templates(obj):
            env = env_of(trainer(template))
            assert env["POD_NAME"] == ("fieldRef", "metadata.name")
            assert env["POD_NAMESPACE"] == ("fieldRef", "metadata.namespace")
            assert env["NODE_NAME"] == ("fieldRef", "spec.nodeName")
            assert env["POD_IP"] == ("fieldRef", "status.podIP")
            attributes = dict(pair.split("=", 1) for pair in env["OTEL_RESOURCE_ATTRIBUTES"].split(","))
            assert attributes == {"k8s.pod.name": "$(POD_NAME)", "k8s.pod.uid": "$(POD_UID)",
                                  "k8s.namespace.name": "$(POD_NAMESPACE)", "k8s.node.name": "$(NODE_NAME)"}
            assert env["OTEL_SERVICE_NAME"] == "llm-train"
            assert env[ENV["exporters"]] == "prometheus,otlp"
            assert env[ENV["prometheus_host"]] == "$(POD_IP)", "the endpoint must bind the pod IP to be scraped"
            assert (env["OTEL_EXPORTER_OTLP_ENDPOINT"], env["OTEL_EXPORTER_OTLP_PROTOCOL"]) == (
                "http://localhost:4318", "http/protobuf")


def test_every_rank_port_is_declared_and_scraped_by_the_podmonitor():
    podmonitor = by_kind(every_object(), "PodMonitor")
    scraped = [e["port"] for e in podmonitor["spec"]["podMetricsEndpoints"]]
    for obj in jobs():
        for template in pod_templates(obj):
            container = trainer(template)
            (nproc,) = [int(a.split("=")[1]) for a in container["args"] if a.startswith("--nproc-per-node=")]
            base = int(env_of(container)[ENV["prometheus_port"]])
            ports = {p["name"]: p["containerPort"] for p in container["ports"] if p["name"].startswith("llm-rank-")}
            assert ports == {f"llm-rank-{k}": base + k for k in range(nproc)}, "local rank k serves on base + k"
            assert scraped == list(ports)
            labels = template["metadata"]["labels"]
            assert podmonitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
            assert podmonitor["spec"]["jobLabel"] in labels
            assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
    pytorchjob = by_kind(every_object(), "PyTorchJob")
    assert pytorchjob["spec"]["nprocPerNode"] == "8"
    assert all(trainer(t)["name"] == "pytorch" for t in pod_templates(pytorchjob)), "the operator needs 'pytorch'"


def test_operator_sidecar_is_injected_by_annotation_and_receives_on_localhost():
    objects = every_object()
    collector = by_kind(objects, "OpenTelemetryCollector")
    assert collector["spec"]["mode"] == "sidecar"
    for template in pod_templates(by_kind(objects, "PyTorchJob")):
        assert template["metadata"]["annotations"]["sidecar.opentelemetry.io/inject"] == collector["metadata"]["name"]
    check_collector_config(collector["spec"]["config"])
    protocols = collector["spec"]["config"]["receivers"]["otlp"]["protocols"]
    assert protocols == {"grpc": {"endpoint": "localhost:4317"}, "http": {"endpoint": "localhost:4318"}}


def test_plain_sidecar_is_a_native_sidecar_running_the_same_collector_config():
    objects = every_object()
    job = by_kind(objects, "Job")
    pod = job["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always", "a plain sidecar container would keep the Job from completing"
    (config_arg,) = sidecar["args"]
    config_path = Path(config_arg.removeprefix("--config="))
    (mount,) = sidecar["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert Path(mount["mountPath"]) == config_path.parent
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]
                    ["name"]]
    config = yaml.safe_load(configmap["data"][config_path.name])
    check_collector_config(config)
    assert config == by_kind(objects, "OpenTelemetryCollector")["spec"]["config"]
    assert job["spec"]["completionMode"] == "Indexed"
    container = trainer(job["spec"]["template"])
    assert env_of(container)["NODE_RANK"] == (
        "fieldRef", "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert "--node-rank=$(NODE_RANK)" in container["args"]
    service = by_kind(objects, "Service")
    assert (service["spec"]["clusterIP"], pod["subdomain"]) == ("None", service["metadata"]["name"])
    assert f"--master-addr={job['metadata']['name']}-0.{service['metadata']['name']}" in container["args"]
