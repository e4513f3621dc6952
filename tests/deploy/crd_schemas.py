"""JSON schemas of the two custom resources in deploy/, written from their published field rules, with the
Kubernetes core types they embed taken from kubernetes-validate's strict schemas (so a typo inside a
toleration or a probe fails as it would in the API server).

- OpenFaaS ``Profile`` (``openfaas.com/v1``): faas-netes ``artifacts/crds/openfaas.com_profiles.yaml`` and
  the OpenFaaS Profiles reference: ``spec`` holds only these pod options, nothing else (no volumes);
  Profiles live in the ``openfaas`` namespace.
- Knative ``Service`` (``serving.knative.dev/v1``): the Knative Serving API specification (Service,
  RevisionTemplateSpec, RevisionSpec, Container) and the runtime contract: one container, at most one
  port named ``http1`` or ``h2c``, the queue-proxy's ports reserved, ``PORT`` and ``K_*`` set by the
  platform, ``containerConcurrency`` 0..1000, volumes limited to secret/configMap/projected/emptyDir
  (hostPath and the pod options marked below need a ``config-features`` flag).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

K8S_VERSION = "1.36.0"
_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s."


def core(name: str) -> dict[str, str]:
    """A $ref to a Kubernetes type, e.g. ``core("api.core.v1.Toleration")``."""
    return {"$ref": _DEFS + name}


_DNS_LABEL = {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_INT_STRING = {"type": "string", "pattern": r"^[0-9]+$"}

PROFILE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://accelshim.test/crd/openfaas-profile.json",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "openfaas.com/v1"},
        "kind": {"const": "Profile"},
        "metadata": {"type": "object", "required": ["name", "namespace"],
                     "properties": {"name": _DNS_LABEL, "namespace": {"const": "openfaas"}}},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "affinity": core("api.core.v1.Affinity"),
                "dnsConfig": core("api.core.v1.PodDNSConfig"),
                "dnsPolicy": {"enum": ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"]},
                "podSecurityContext": core("api.core.v1.PodSecurityContext"),
                "priorityClassName": {"type": "string"},
                "resources": core("api.core.v1.ResourceRequirements"),
                "runtimeClassName": _DNS_LABEL,
                "strategy": {"type": "object", "properties": {"type": {"const": "Recreate"}},
                             "additionalProperties": False},
                "tolerations": {"type": "array", "items": core("api.core.v1.Toleration")},
                "topologySpreadConstraints": {"type": "array", "items": core("api.core.v1.TopologySpreadConstraint")},
            },
        },
    },
}

_RESERVED_PORTS = [8012, 8013, 8022, 9090, 9091]  # queue-proxy
_RESERVED_ENV = ["PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"]
_AUTOSCALING = {
    "autoscaling.knative.dev/class": {"enum": ["kpa.autoscaling.knative.dev", "hpa.autoscaling.knative.dev"]},
    "autoscaling.knative.dev/metric": {"enum": ["concurrency", "rps", "cpu", "memory"]},
    "autoscaling.knative.dev/target": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    "autoscaling.knative.dev/target-utilization-percentage": _INT_STRING,
    "autoscaling.knative.dev/min-scale": _INT_STRING,
    "autoscaling.knative.dev/max-scale": _INT_STRING,
    "autoscaling.knative.dev/initial-scale": _INT_STRING,
    "autoscaling.knative.dev/scale-down-delay": {"type": "string"},
    "autoscaling.knative.dev/window": {"type": "string", "pattern": r"^[0-9]+(s|m)$"},
}
_INT = {"type": "integer", "minimum": 0}
# core/v1 Probe, except that Knative fills in the port of httpGet / tcpSocket (the serving port)
_PROBE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "httpGet": {"type": "object", "additionalProperties": False, "required": ["path"],
                    "properties": {"path": {"type": "string"}, "port": {"type": ["integer", "string"]},
                                   "host": {"type": "string"}, "scheme": {"enum": ["HTTP", "HTTPS"]},
                                   "httpHeaders": {"type": "array", "items": core("api.core.v1.HTTPHeader")}}},
        "tcpSocket": {"type": "object", "additionalProperties": False,
                      "properties": {"port": {"type": ["integer", "string"]}, "host": {"type": "string"}}},
        "exec": core("api.core.v1.ExecAction"),
        "grpc": core("api.core.v1.GRPCAction"),
        **{k: _INT for k in ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "successThreshold",
                             "failureThreshold", "terminationGracePeriodSeconds")},
    },
}
_CONTAINER = {
    "type": "object",
    "required": ["image"],
    "additionalProperties": False,
    "properties": {
        "name": _DNS_LABEL,
        "image": {"type": "string", "minLength": 1},
        "args": {"type": "array", "items": {"type": "string"}},
        "command": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": {"allOf": [core("api.core.v1.EnvVar"),
                                                      {"properties": {"name": {"not": {"enum": _RESERVED_ENV}}}}]}},
        "envFrom": {"type": "array", "items": core("api.core.v1.EnvFromSource")},
        "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
        "livenessProbe": _PROBE,
        "readinessProbe": _PROBE,
        "startupProbe": _PROBE,
        "ports": {"type": "array", "maxItems": 1, "items": {
            "type": "object", "required": ["containerPort"], "additionalProperties": False,
            "properties": {"name": {"enum": ["http1", "h2c"]}, "protocol": {"const": "TCP"},
                           "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535,
                                             "not": {"enum": _RESERVED_PORTS}}}}},
        "resources": core("api.core.v1.ResourceRequirements"),
        "securityContext": core("api.core.v1.SecurityContext"),
        "terminationMessagePath": {"type": "string"},
        "terminationMessagePolicy": {"enum": ["File", "FallbackToLogsOnError"]},
        "volumeMounts": {"type": "array", "items": core("api.core.v1.VolumeMount")},
        "workingDir": {"type": "string"},
    },
}
_VOLUME = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": _DNS_LABEL, "secret": core("api.core.v1.SecretVolumeSource"),
                   "configMap": core("api.core.v1.ConfigMapVolumeSource"),
                   "projected": core("api.core.v1.ProjectedVolumeSource"),
                   "emptyDir": core("api.core.v1.EmptyDirVolumeSource")},
}
KNATIVE_SERVICE: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://accelshim.test/crd/knative-service.json",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.knative.dev/v1"},
        "kind": {"const": "Service"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": _DNS_LABEL, "namespace": _DNS_LABEL,
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object", "required": ["template"], "additionalProperties": False,
            "properties": {
                "template": {
                    "type": "object", "required": ["spec"], "additionalProperties": False,
                    "properties": {
                        "metadata": {"type": "object", "properties": {
                            "name": {"type": "string"},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "properties": _AUTOSCALING,
                                            "additionalProperties": {"type": "string"}}}},
                        "spec": {
                            "type": "object", "required": ["containers"], "additionalProperties": False,
                            "properties": {
                                "containers": {"type": "array", "minItems": 1, "maxItems": 1, "items": _CONTAINER},
                                "volumes": {"type": "array", "items": _VOLUME},
                                "timeoutSeconds": {"type": "integer", "minimum": 0},
                                "containerConcurrency": {"type": "integer", "minimum": 0, "maximum": 1000},
                                "serviceAccountName": {"type": "string"},
                                "imagePullSecrets": {"type": "array",
                                                     "items": core("api.core.v1.LocalObjectReference")},
                                "enableServiceLinks": {"type": "boolean"},
                                # behind config-features flags (kubernetes.podspec-*)
                                "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                                "tolerations": {"type": "array", "items": core("api.core.v1.Toleration")},
                                "affinity": core("api.core.v1.Affinity"),
                                "runtimeClassName": _DNS_LABEL,
                                "securityContext": core("api.core.v1.PodSecurityContext"),
                                "priorityClassName": {"type": "string"},
                            },
                        },
                    },
                },
                "traffic": {"type": "array", "items": {
                    "type": "object", "required": ["percent"], "additionalProperties": False,
                    "properties": {"revisionName": {"type": "string"}, "latestRevision": {"type": "boolean"},
                                   "tag": {"type": "string"},
                                   "percent": {"type": "integer", "minimum": 0, "maximum": 100}}}},
            },
        },
    },
}

SCHEMAS = {("openfaas.com/v1", "Profile"): PROFILE, ("serving.knative.dev/v1", "Service"): KNATIVE_SERVICE}


@lru_cache(maxsize=1)
def _registry() -> Registry:
    path = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
            / "_definitions.json")
    definitions = json.loads(path.read_text())
    return Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every violation of the published rules by ``doc`` (an OpenFaaS Profile or a Knative Service)."""
    schema = SCHEMAS[(doc.get("apiVersion"), doc.get("kind"))]
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
    if doc["kind"] == "Service" and not errors:
        errors += _knative_probe_ports(doc)
    return errors


def _knative_probe_ports(doc: dict[str, Any]) -> list[str]:
    """Knative sends probes to the serving port: a probe may name no port, or that same port."""
    out = []
    for c in doc["spec"]["template"]["spec"]["containers"]:
        serving = (c.get("ports") or [{"containerPort": 8080}])[0]["containerPort"]
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            for action in ("httpGet", "tcpSocket", "grpc"):
                port = ((c.get(kind) or {}).get(action) or {}).get("port")
                if port is not None and port != serving:
                    out.append(f"{kind}.{action}.port {port} is not the serving port {serving}")
    return out
