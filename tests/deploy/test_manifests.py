"""deploy/: every Kubernetes manifest against the Kubernetes schemas (kubernetes-validate, strict: an
unknown field fails), the custom resources against their published rules (crd_schemas.py), and the
cross-file facts the deployment depends on (names, ports, paths, settings)."""
from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shim.config import ENV_PREFIX, Settings
from tests.conftest import ROOT
from tests.deploy.crd_schemas import K8S_VERSION, crd_errors

DEPLOY = ROOT / "deploy"
CRD_KINDS = {("openfaas.com/v1", "Profile"), ("serving.knative.dev/v1", "Service")}
SOCKET_DIR = "/var/run/accelshim"
SERVICE_URL = "http://accelshim.accelshim.svc.cluster.local:8000"


def _documents() -> list[tuple[str, int, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            out.append((str(path.relative_to(DEPLOY)), i, doc))
    return out


DOCS = _documents()
K8S_DOCS = [(f, i, d) for f, i, d in DOCS if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
CRD_DOCS = [(f, i, d) for f, i, d in DOCS if (d["apiVersion"], d["kind"]) in CRD_KINDS]


def _one(kind: str, path: str) -> dict[str, Any]:
    return next(d for f, _, d in DOCS if f == path and d["kind"] == kind)


def _k8s_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'/'.join(map(str, exc.path))}: {exc.message}"
    return None


def test_every_manifest_is_found():
    kinds = {d["kind"] for _, _, d in DOCS}
    assert {"Namespace", "ConfigMap", "Secret", "DaemonSet", "Service", "Profile",
            "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"} <= kinds
    assert len(CRD_DOCS) == 3  # two Profiles, one Knative Service


@pytest.mark.parametrize("path, index, doc", K8S_DOCS, ids=[f"{f}#{i}" for f, i, _ in K8S_DOCS])
def test_kubernetes_manifest_is_valid(path: str, index: int, doc: dict[str, Any]):
    assert _k8s_errors(doc) is None


@pytest.mark.parametrize("path, index, doc", CRD_DOCS, ids=[f"{f}#{i}" for f, i, _ in CRD_DOCS])
def test_custom_resource_follows_its_published_rules(path: str, index: int, doc: dict[str, Any]):
    assert crd_errors(doc) == []


def test_the_validators_reject_what_the_api_server_would():
    """Both validators can fail: a typo in the DaemonSet, a Profile with volumes (a Profile has none),
    a Knative container setting PORT, two ports, a probe on another port, concurrency over 1000."""
    ds = copy.deepcopy(_one("DaemonSet", "kubernetes/daemonset.yaml"))
    ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    assert _k8s_errors(ds)
    ds = copy.deepcopy(_one("DaemonSet", "kubernetes/daemonset.yaml"))
    ds["spec"]["template"]["spec"]["tolerations"][0]["operator"] = 7
    assert _k8s_errors(ds)

    profile = copy.deepcopy(_one("Profile", "openfaas/profiles.yaml"))
    profile["spec"]["volumes"] = [{"name": "s", "hostPath": {"path": SOCKET_DIR}}]
    assert any("volumes" in e for e in crd_errors(profile))
    profile = copy.deepcopy(_one("Profile", "openfaas/profiles.yaml"))
    profile["spec"]["tolerations"][0]["efect"] = "NoSchedule"
    assert crd_errors(profile)

    ksvc = _one("Service", "knative/classify.yaml")
    for mutate in (lambda c, s: c["env"].append({"name": "PORT", "value": "9000"}),
                   lambda c, s: c["ports"].append({"name": "h2c", "containerPort": 9000}),
                   lambda c, s: c["ports"][0].update(name="http"),
                   lambda c, s: c["readinessProbe"]["httpGet"].update(port=9000),
                   lambda c, s: s.update(containerConcurrency=1001),
                   lambda c, s: s.update(volumes=[{"name": "sock", "hostPath": {"path": SOCKET_DIR}}])):
        bad = copy.deepcopy(ksvc)
        spec = bad["spec"]["template"]["spec"]
        mutate(spec["containers"][0], spec)
        assert crd_errors(bad), bad


def test_kustomization_lists_the_manifests_and_leaves_out_the_example_secret():
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "accelshim"
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}
    assert "REPLACE-ME" in (DEPLOY / "kubernetes" / "secret.example.yaml").read_text()


def test_daemonset_runs_the_shim_on_gpu_nodes():
    pod = _one("DaemonSet", "kubernetes/daemonset.yaml")["spec"]["template"]
    spec, shim = pod["spec"], pod["spec"]["containers"][0]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert shim["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert shim["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert shim["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8000",
                                              "prometheus.io/path": "/metrics"}
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert shim["securityContext"]["readOnlyRootFilesystem"] is True
    assert shim["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in shim["volumeMounts"]}
    assert volumes["socket-dir"]["hostPath"] == {"path": SOCKET_DIR, "type": "DirectoryOrCreate"}
    assert mounts["socket-dir"] == SOCKET_DIR
    assert volumes["tokens"]["secret"]["secretName"] == "accelshim-tokens"
    assert shim["args"][shim["args"].index("--tokens") + 1].startswith(mounts["tokens"] + "/")
    assert shim["args"][shim["args"].index("--state-dir") + 1] == mounts["state"]
    assert mounts["tmp"] == "/tmp"  # the only other writable path (CuPy's cache) on a read-only root
    assert shim["envFrom"] == [{"configMapRef": {"name": "accelshim-config"}}]


def test_configmap_holds_real_settings_that_agree_with_the_pod():
    data = _one("ConfigMap", "kubernetes/configmap.yaml")["data"]
    fields = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    assert set(data) <= fields, set(data) - fields  # a misspelt variable would be silently ignored
    shim = _one("DaemonSet", "kubernetes/daemonset.yaml")["spec"]["template"]["spec"]["containers"][0]
    tokens = shim["args"][shim["args"].index("--tokens") + 1]
    settings = Settings.from_env(data, tokens_file=tokens)  # validates: TCP off loopback needs tokens
    assert settings.unix_socket.startswith(SOCKET_DIR + "/") and settings.host == "0.0.0.0"
    ds = _one("DaemonSet", "kubernetes/daemonset.yaml")["spec"]["template"]["spec"]["containers"][0]
    assert ds["ports"][0]["containerPort"] == settings.port


def test_service_is_node_local_and_reaches_the_daemonset():
    svc, ds = _one("Service", "kubernetes/service.yaml"), _one("DaemonSet", "kubernetes/daemonset.yaml")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    name, namespace, port = svc["metadata"]["name"], svc["metadata"]["namespace"], svc["spec"]["ports"][0]["port"]
    assert SERVICE_URL == f"http://{name}.{namespace}.svc.cluster.local:{port}"


def test_openfaas_profiles_and_socket_policy():
    profiles = {d["metadata"]["name"]: d for f, _, d in DOCS if d["kind"] == "Profile"}
    gpu = profiles["accelshim"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert 10001 in gpu["podSecurityContext"]["supplementalGroups"]  # the socket's group
    assert profiles["accelshim-kata"]["spec"]["runtimeClassName"].startswith("kata")
    policy = _one("MutatingAdmissionPolicy", "openfaas/socket-mount-policy.yaml")
    expression = policy["spec"]["mutations"][0]["applyConfiguration"]["expression"]
    assert f'path: "{SOCKET_DIR}"' in expression and "readOnly: true" in expression
    assert "com.openfaas.profile" in policy["spec"]["matchConditions"][0]["expression"]


@pytest.mark.parametrize("name, url", [("stack.ce.yml", SERVICE_URL),
                                        ("stack.profiles.yml", f"unix://{SOCKET_DIR}/accel.sock")])
def test_openfaas_stacks(name: str, url: str):
    stack = yaml.safe_load((DEPLOY / "openfaas" / name).read_text())
    for fn in stack["functions"].values():
        assert (ROOT / fn["handler"]).is_dir(), fn["handler"]  # relative to the repository root
        assert fn["lang"] == "python3-accel" and "accel-token" in fn["secrets"]
        assert not any("gpu" in str(v).lower() for v in (fn.get("limits") or {}).values())
    first = next(iter(stack["functions"].values()))
    assert first["environment"]["ACCEL_SHIM_URL"] == url
    if name == "stack.ce.yml":
        # kept for older faas-netes CE releases; the current one ignores them (docs/deploy.md, CE placement)
        assert all(fn["constraints"] == ["nvidia.com/gpu.present=true"] for fn in stack["functions"].values())
    else:
        assert first["annotations"]["com.openfaas.profile"] == "accelshim"
    examples = yaml.safe_load((ROOT / "stack.yml").read_text())["functions"]
    assert {fn["handler"] for fn in examples.values()} <= {fn["handler"] for fn in stack["functions"].values()}


@pytest.mark.parametrize("path", ["stack.yml", "deploy/openfaas/stack.profiles.yml", "deploy/openfaas/stack.ce.yml"])
def test_a_function_on_the_socket_has_the_profile_that_mounts_it(path: str):
    """Without the ``accelshim`` Profile a function's pod has no socket directory: every call would
    fail. (The root stack.yml is what `faas-cli deploy` reads by default.)"""
    for name, fn in yaml.safe_load((ROOT / path).read_text())["functions"].items():
        on_socket = fn["environment"]["ACCEL_SHIM_URL"].startswith(f"unix://{SOCKET_DIR}/")
        profiles = [p.strip() for p in str((fn.get("annotations") or {}).get("com.openfaas.profile", "")).split(",")]
        assert on_socket == ("accelshim" in profiles and "accelshim-kata" not in profiles), name


def test_knative_classify_needs_no_gpu_and_finds_the_shim():
    ksvc = _one("Service", "knative/classify.yaml")
    spec = ksvc["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert {e["name"]: e["value"] for e in container["env"]}["ACCEL_SHIM_URL"] == SERVICE_URL
    # of-watchdog's readiness endpoint, which asks index.py too (ready_path in the template's Dockerfile)
    assert container["readinessProbe"]["httpGet"]["path"] == "/_/ready"
    assert container["ports"][0]["containerPort"] == 8080  # of-watchdog's port, Knative's default $PORT
    assert "nvidia.com/gpu" not in str(container["resources"])
    annotations = ksvc["spec"]["template"]["metadata"]["annotations"]
    assert {"autoscaling.knative.dev/min-scale", "autoscaling.knative.dev/max-scale"} <= set(annotations)
    # no more requests in the pod at once than index.py's waitress has threads for
    threads = int(re.search(r"threads: int = (\d+)", (ROOT / "template/python3-accel/index.py").read_text()).group(1))
    assert 0 < spec["containerConcurrency"] <= threads


@pytest.mark.parametrize("stack", ["stack.yml", "deploy/openfaas/stack.ce.yml", "deploy/openfaas/stack.profiles.yml"])
def test_every_function_of_every_stack_has_cpu_and_memory_limits_and_requests(stack):
    functions = yaml.safe_load((ROOT / stack).read_text())["functions"]
    for name, entry in functions.items():
        for key in ("limits", "requests"):
            assert set(entry.get(key) or {}) == {"memory", "cpu"}, f"{stack}: {name} has no {key}"
