#!/usr/bin/env python3
"""Renders, validates and policy-checks Switchyard's Helm charts and plain manifests.

Run by scripts/check-charts.sh (which installs helm and this script's Python packages first):

  1. `helm lint --strict` and `helm template` for every chart and value set in RENDERS, and the
     renders that must fail (NEGATIVE) fail with the expected message;
  2. every rendered object, every file in deploy/ (except deploy/envoy/) and every chart CRD is
     validated in strict mode: built-in kinds against the Kubernetes 1.34 OpenAPI schemas
     (kubernetes-validate), custom resources against the CRD schemas in charts/*/crds and
     scripts/charts/crds (unknown fields rejected, as the API server's strict field validation
     does);
  3. policy assertions: hardened pods, service-account tokens only where RBAC is granted, DRA
     claim wiring (and tensor parallelism = claimed GPUs), gVisor placement of sandboxes, egress
     blocks for the metadata server, private and reserved ranges and the cluster's own ranges,
     ingress NetworkPolicies of the EPP and decode servers (named ports and peers, never
     everyone), least-privilege RBAC (no `/metrics` for identities that run pods, the lease by
     name) and a ResourceQuota on SandboxClaims, names and ports lining up between pool, EPP,
     model servers, routes and gateways; a self-test plants one violation of each kind and
     requires the checks to catch it;
  4. the EPP arguments rendered by the inferencepool chart are accepted by the real binary
     (`switchyard epp <args> --check-config`, with the rendered ConfigMap as --config-text),
     broken ones are refused, and the decode server's flags are all known to `switchyard serve`;
  5. `kubectl kustomize deploy/` yields exactly the objects of the files in deploy/.

Exits non-zero when anything fails; prints one line per check and a summary.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from manifests import K8S_VERSION, CrdSchemas, Report, dig, load_docs, obj_id, validate_object  # noqa: E402
from policies import (  # noqa: E402
    METADATA_RANGE,
    check_dra,
    check_network,
    check_pod_security,
    check_rbac,
    check_wiring,
)

# helm renders and lints as if talking to this cluster version (Capabilities.KubeVersion).
HELM_KUBE = ["--kube-version", "v" + K8S_VERSION]
BASE_POOL = ["--set", "inferencePool.modelServers.matchLabels.app=switchyard-decode"]
# GKE renders need the region's proxy-only subnet for the NetworkPolicies (GKE docs' example range).
GKE_PROXY = ["--set", "networkPolicy.gkeProxyOnlySubnetCIDRs[0]=10.129.0.0/23"]
CLUSTER_RANGES = ("34.118.224.0/20", "100.72.0.0/14")


@dataclass
class Render:
    """One `helm template` run and the policies that apply to its output."""

    name: str
    chart: str
    sets: list[str]
    gpu: bool | None = None  # decode-server: claim + toleration expected (True) or absent (False)
    epp_check: bool = True  # run the binary on the EPP args
    serve_check: bool = True  # check decode-server flags against `switchyard serve --help`
    blocked: tuple[str, ...] = ()  # the cluster's own ranges the sandbox egress must exclude


@dataclass
class Negative:
    """A render that must fail, with a fragment of the expected error."""

    name: str
    chart: str
    sets: list[str]
    expect: str


def s(*pairs: str) -> list[str]:
    out: list[str] = []
    for p in pairs:
        out += ["--set", p]
    return out


RENDERS = [
    Render("inferencepool/default", "inferencepool", BASE_POOL),
    Render("inferencepool/gke", "inferencepool", BASE_POOL + GKE_PROXY + s("provider.name=gke")),
    Render("inferencepool/istio", "inferencepool", BASE_POOL + s("provider.name=istio")),
    Render("inferencepool/gke-monitoring", "inferencepool",
           BASE_POOL + GKE_PROXY + s("provider.name=gke", "inferenceExtension.monitoring.prometheus.enabled=true",
                                     "provider.gke.autopilot=true")),
    Render("inferencepool/prometheus", "inferencepool",
           BASE_POOL + s("inferenceExtension.monitoring.prometheus.enabled=true")),
    Render("inferencepool/ha-objectives-route", "inferencepool",
           BASE_POOL + s("inferenceExtension.replicas=3", "experimentalHttpRoute.enabled=true",
                         "experimentalHttpRoute.baseModel=qwen2.5-coder-7b",
                         "inferenceObjectives[0].name=interactive", "inferenceObjectives[0].priority=5",
                         "inferenceObjectives[1].name=batch", "inferenceObjectives[1].priority=-1",
                         "inferenceExtension.monitoring.prometheus.auth.enabled=false",
                         "inferenceExtension.flags.v=3")),
    Render("inferencepool/sglang-custom-scrape", "inferencepool",
           BASE_POOL + s("inferencePool.modelServerType=sglang", "inferencePool.parser=openai-parser",
                         "inferenceExtension.metricsDataSource.path=/prometheus/metrics",
                         "inferenceExtension.extProcPort=9102", "inferenceExtension.metricsPort=9190")),
    Render("inferencepool/custom-config", "inferencepool",
           BASE_POOL + ["--set-string", "inferenceExtension.pluginsConfigFile=prefix-only.yaml",
                        "--set-string", "inferenceExtension.pluginsCustomConfig.prefix-only\\.yaml="
                        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
                        "plugins:\n- type: prefix-cache-scorer\n"]),
    Render("decode-server/default", "decode-server", [], gpu=True),
    Render("decode-server/gke", "decode-server", GKE_PROXY + s("provider.name=gke"), gpu=True),
    Render("decode-server/istio-no-monitoring", "decode-server",
           s("provider.name=istio", "monitoring.podMonitoring.enabled=false"), gpu=True),
    Render("decode-server/istio", "decode-server", s("provider.name=istio"), gpu=True),
    Render("decode-server/sim", "decode-server", s("backend=sim"), gpu=False),
    Render("decode-server/tp2-hpa", "decode-server",
           s("gpu.count=2", "autoscaling.enabled=true"), gpu=True),
    Render("decode-server/sim-hpa-external", "decode-server",
           s("backend=sim", "autoscaling.enabled=true", "autoscaling.metric.type=External",
             "monitoring.podMonitoring.enabled=false"), gpu=False),
    Render("body-based-routing/default", "body-based-routing", []),
    Render("body-based-routing/adapters", "body-based-routing",
           s("bbr.adapters[0].name=llama", "bbr.adapters[0].baseModel=meta-llama/Llama-3.1-8B-Instruct",
             "bbr.adapters[0].adapters[0]=sql-lora", "bbr.adapters[0].adapters[1]=chat-lora",
             "bbr.networkPolicy.gatewayNamespaceLabels.kubernetes\\.io/metadata\\.name=gateways")),
    Render("code-agent/default", "code-agent", []),
    Render("code-agent/gke", "code-agent", s("provider.name=gke")),
    Render("code-agent/istio", "code-agent", s("provider.name=istio")),
    Render("code-agent/no-internet", "code-agent",
           s("networkPolicy.allowInternetEgress=false", "networkPolicy.dnsExtraCIDRs[0]=169.254.20.10/32")),
    Render("code-agent/cluster-ranges", "code-agent",
           s(*[f"networkPolicy.clusterCIDRs[{i}]={c}" for i, c in enumerate(CLUSTER_RANGES)]),
           blocked=CLUSTER_RANGES),
]

# Renders that succeed but whose EPP arguments the binary must refuse (see check_epp_rejects).
BAD_CONFIG = ("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
              "plugins:\n- type: no-such-scorer\n")
RENDERS += [
    Render("inferencepool/bad-plugin", "inferencepool",
           BASE_POOL + ["--set-string", "inferenceExtension.pluginsConfigFile=bad.yaml",
                        "--set-string", "inferenceExtension.pluginsCustomConfig.bad\\.yaml=" + BAD_CONFIG],
           epp_check=False),
    Render("inferencepool/unknown-flag", "inferencepool",
           BASE_POOL + s("inferenceExtension.flags.no-such-flag=1"), epp_check=False),
]
BINARY_NEGATIVE = [
    ("inferencepool/bad-plugin", "no-such-scorer"),
    ("inferencepool/unknown-flag", "--no-such-flag"),
]

NEGATIVE = [
    Negative("inferencepool/no-selector", "inferencepool", [],
             "inferencePool.modelServers.matchLabels is required"),
    Negative("inferencepool/bad-provider", "inferencepool", BASE_POOL + s("provider.name=aws"),
             "provider.name must be one of"),
    Negative("inferencepool/sidecar", "inferencepool", BASE_POOL + s("inferenceExtension.sidecar.enabled=true"),
             "sidecar is not supported"),
    Negative("inferencepool/grpc", "inferencepool", BASE_POOL + s("inferencePool.modelServerProtocol=grpc"),
             "modelServerProtocol must be http"),
    Negative("inferencepool/missing-config", "inferencepool",
             BASE_POOL + s("inferenceExtension.pluginsConfigFile=custom.yaml"),
             "neither default-plugins.yaml nor a key of pluginsCustomConfig"),
    Negative("inferencepool/bad-scrape-scheme", "inferencepool",
             BASE_POOL + s("inferenceExtension.metricsDataSource.scheme=https"), "scheme must be http: the Switchyard EPP scrapes over plain HTTP"),
    Negative("body-based-routing/bad-plugin", "body-based-routing", s("bbr.plugins[0].type=model-router",
             "bbr.plugins[0].name=m"), "body-field-to-header"),
    Negative("decode-server/bad-backend", "decode-server", s("backend=rocm"), "value must be one of 'cuda', 'cpu', 'sim'"),
    Negative("decode-server/no-weights", "decode-server", s("model.existingClaim="), "existingClaim is required"),
    Negative("decode-server/values-typo", "decode-server", s("backnd=sim"), "additional properties 'backnd' not allowed"),
    Negative("decode-server/zero-gpus", "decode-server", s("gpu.count=0"), "/gpu/count"),
    Negative("code-agent/values-typo", "code-agent", s("networkPolicy.allowInternetEgres=false"),
             "additional properties 'allowInternetEgres' not allowed"),
    Negative("inferencepool/nine-ports", "inferencepool",
             BASE_POOL + s(*[f"inferencePool.targetPorts[{i}].number={8000 + i}" for i in range(9)]), "targetPorts"),
    Negative("code-agent/no-gvisor", "code-agent", s("gvisor.runtimeClassName="), "runtimeClassName is required"),
    Negative("inferencepool/gke-no-proxy-subnet", "inferencepool", BASE_POOL + s("provider.name=gke"),
             "networkPolicy.gkeProxyOnlySubnetCIDRs is required with provider gke"),
    Negative("decode-server/gke-no-proxy-subnet", "decode-server", s("provider.name=gke"),
             "networkPolicy.gkeProxyOnlySubnetCIDRs is required with provider gke"),
    Negative("code-agent/zero-claims", "code-agent", s("sandbox.maxClaims=0"), "/sandbox/maxClaims"),
]
RENDER_BLOCKED = {r.name: list(r.blocked) for r in RENDERS}



# ---------------------------------------------------------------------------------------------
# The binary


def epp_invocations(objs: list[dict]) -> list[tuple[str, list[str]]]:
    configmaps = {dig(o, "metadata", "name"): o for o in objs if o.get("kind") == "ConfigMap"}
    out = []
    for obj in objs:
        if obj.get("kind") != "Deployment":
            continue
        spec = dig(obj, "spec", "template", "spec") or {}
        for c in spec.get("containers") or []:
            if (c.get("command") or [])[-1:] != ["epp"]:
                continue
            args = list(c.get("args") or [])
            if "--config-file" in args:
                i = args.index("--config-file")
                path = args[i + 1]
                del args[i:i + 2]
                # Resolve /config/<key> through the volume to the rendered ConfigMap.
                mount = next((m for m in c.get("volumeMounts") or [] if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
                if mount is None:
                    raise ValueError(f"{obj_id(obj)}: --config-file {path} is on no volume")
                vol = next(v for v in spec.get("volumes") or [] if v.get("name") == mount["name"])
                cm = configmaps.get(dig(vol, "configMap", "name"))
                key = path[len(mount["mountPath"].rstrip("/")) + 1:]
                text = dig(cm, "data", key) if cm else None
                if text is None:
                    raise ValueError(f"{obj_id(obj)}: --config-file {path}: ConfigMap key {key!r} not rendered")
                args += ["--config-text", text]
            out.append((obj_id(obj), args))
    return out


def run_check_config(binary: Path, args: list[str]) -> subprocess.CompletedProcess | None:
    env = dict(os.environ, NAMESPACE="check", POD_NAME="check-0", RUST_BACKTRACE="0")
    try:
        return subprocess.run([str(binary), "epp", *args, "--check-config"], capture_output=True, text=True,
                              timeout=60, env=env)
    except subprocess.TimeoutExpired:
        return None


def error_summary(r: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    if "Stack backtrace:" in lines:
        lines = lines[: lines.index("Stack backtrace:")]
    return " | ".join(lines[:4])


def check_epp_rejects(rendered: dict[str, list[dict]], report: Report, binary: Path) -> None:
    """The binary check has teeth: broken configs and unknown flags are refused."""
    for name, expect in BINARY_NEGATIVE:
        what = f"{name}: `switchyard epp --check-config` refuses it ({expect!r})"
        objs = rendered.get(name)
        if objs is None:
            report.fail(what, "render unavailable")
            continue
        invocations = epp_invocations(objs)
        if not invocations:
            report.fail(what, "no EPP container rendered")
            continue
        r = run_check_config(binary, invocations[0][1])
        if r is None:
            report.fail(what, "did not exit within 60 s")
        elif r.returncode == 0:
            report.fail(what, "accepted")
        elif expect not in r.stderr + r.stdout:
            report.fail(what, f"refused for another reason: {error_summary(r)}")
        else:
            report.ok(what)


def check_epp_args(objs: list[dict], report: Report, where: str, binary: Path) -> None:
    try:
        invocations = epp_invocations(objs)
    except (ValueError, StopIteration) as e:
        report.fail(f"{where} EPP args", str(e))
        return
    if not invocations:
        report.fail(f"{where} EPP args", "no EPP container rendered")
    for ident, args in invocations:
        what = f"{where} {ident} args accepted by `switchyard epp --check-config`"
        r = run_check_config(binary, args)
        if r is None:
            report.fail(what, "did not exit within 60 s (is --check-config implemented?)")
            continue
        if r.returncode != 0:
            report.fail(what, f"exit {r.returncode}: {error_summary(r)}")
        else:
            report.ok(what)


_serve_flags: set[str] | None = None


def serve_flags(binary: Path) -> set[str]:
    global _serve_flags
    if _serve_flags is None:
        r = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, timeout=60)
        _serve_flags = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", r.stdout))
    return _serve_flags


def check_serve_args(objs: list[dict], report: Report, where: str, binary: Path) -> None:
    known = serve_flags(binary)
    for obj in objs:
        if obj.get("kind") != "Deployment":
            continue
        for c in dig(obj, "spec", "template", "spec", "containers") or []:
            if (c.get("command") or [])[-1:] != ["serve"]:
                continue
            what = f"{where} {obj_id(obj)} flags known to `switchyard serve`"
            flags = [a.split("=", 1)[0] for a in c.get("args") or [] if a.startswith("--")]
            unknown = [f for f in flags if f not in known]
            report.fail(what, f"unknown flags {unknown}") if unknown else report.ok(what)


# ---------------------------------------------------------------------------------------------
# Self-test: each check must catch a known violation (a checker that passes everything is a bug)


def _find(objs: list[dict], kind: str, suffix: str = "") -> dict:
    return next(o for o in objs if o.get("kind") == kind and dig(o, "metadata", "name").endswith(suffix))


def _mutations() -> list[tuple[str, str, Any, str]]:
    """(name, render, mutate(objs) -> None, fragment the failure must contain)."""

    def unknown_field(objs):
        _find(objs, "Deployment")["spec"]["template"]["spec"]["bogusField"] = 1

    def crd_enum(objs):
        _find(objs, "SandboxTemplate")["spec"]["networkPolicyManagement"] = "Sometimes"

    def crd_unknown_nested(objs):
        _find(objs, "SandboxTemplate")["spec"]["podTemplate"]["spec"]["containers"][0]["bogus"] = 1

    def pool_no_ports(objs):
        _find(objs, "InferencePool")["spec"]["targetPorts"] = []

    def writable_root(objs):
        c = _find(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        c["securityContext"]["readOnlyRootFilesystem"] = False

    def token_without_rbac(objs):
        _find(objs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] = True

    def metadata_open(objs):
        rule = _find(objs, "NetworkPolicy", "sandbox-allow")["spec"]["egress"][1]
        rule["to"][0]["ipBlock"]["except"].remove(METADATA_RANGE)

    def claim_mismatch(objs):
        c = _find(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        c["resources"]["claims"][0]["name"] = "gpus"

    def wrong_gpu(objs):
        req = _find(objs, "ResourceClaimTemplate")["spec"]["spec"]["devices"]["requests"][0]
        req["exactly"]["selectors"][0]["cel"]["expression"] = 'device.driver == "gpu.nvidia.com"'

    def tp_mismatch(objs):
        req = _find(objs, "ResourceClaimTemplate")["spec"]["spec"]["devices"]["requests"][0]
        req["exactly"]["count"] = 4

    def runc_sandbox(objs):
        _find(objs, "SandboxTemplate")["spec"]["podTemplate"]["spec"]["runtimeClassName"] = "runc"

    def no_limits(objs):
        c = _find(objs, "Deployment", "router")["spec"]["template"]["spec"]["containers"][0]
        del c["resources"]["limits"]

    def wrong_pool_name(objs):
        c = _find(objs, "Deployment", "-epp")["spec"]["template"]["spec"]["containers"][0]
        c["args"][c["args"].index("--pool-name") + 1] = "other-pool"

    # --- pod security: each hardening setting removed on its own --------------------------------
    def decode_pod(objs):
        return _find(objs, "Deployment")["spec"]["template"]["spec"]

    def root_allowed(objs):
        spec = decode_pod(objs)
        spec["securityContext"].pop("runAsNonRoot")
        spec["containers"][0]["securityContext"].pop("runAsNonRoot")

    def uid_zero(objs):
        decode_pod(objs)["containers"][0]["securityContext"]["runAsUser"] = 0

    def escalation(objs):
        decode_pod(objs)["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True

    def caps_not_dropped(objs):
        decode_pod(objs)["containers"][0]["securityContext"]["capabilities"]["drop"] = ["NET_RAW"]

    def caps_added(objs):
        decode_pod(objs)["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]

    def seccomp_unconfined(objs):
        spec = decode_pod(objs)
        spec["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
        spec["containers"][0]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}

    # --- GPU claim ------------------------------------------------------------------------------
    def wrong_device_class(objs):
        req = _find(objs, "ResourceClaimTemplate")["spec"]["spec"]["devices"]["requests"][0]
        req["exactly"]["deviceClassName"] = "gpu.example.com"

    def no_gpu_toleration(objs):
        decode_pod(objs)["tolerations"] = []

    # --- wiring (deploy/ holds the whole stack, so every reference must resolve) ---------------
    def epp_service_port(objs):
        svc = _find(objs, "Service", "-epp")
        for port in svc["spec"]["ports"]:
            if port["name"] == "grpc-ext-proc":
                port["port"] = 9102

    def epp_service_selector(objs):
        _find(objs, "Service", "-epp")["spec"]["selector"] = {"inferencepool": "someone-else"}

    def target_port(objs):
        _find(objs, "InferencePool")["spec"]["targetPorts"] = [{"number": 8001}]

    def route_parent(objs):
        _find(objs, "HTTPRoute")["spec"]["parentRefs"][0]["name"] = "no-such-gateway"

    def route_backend(objs):
        _find(objs, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]["name"] = "no-such-pool"

    # --- network --------------------------------------------------------------------------------
    def allow_all_egress(objs):
        _find(objs, "NetworkPolicy", "sandbox-allow")["spec"]["egress"].append({})

    def sandbox_anywhere(objs):
        spec = _find(objs, "SandboxTemplate")["spec"]["podTemplate"]["spec"]
        spec.pop("nodeSelector")

    def sandbox_no_gvisor_toleration(objs):
        _find(objs, "SandboxTemplate")["spec"]["podTemplate"]["spec"]["tolerations"] = []

    # --- RBAC, quota and ingress (issue 11 item 9) -----------------------------------------------
    def epp_reads_metrics(objs):
        role = next(o for o in objs if o.get("kind") == "ClusterRole" and not dig(o, "metadata", "name").endswith("-metrics-reader"))
        role["rules"].append({"nonResourceURLs": ["/metrics"], "verbs": ["get"]})

    def lease_any_name(objs):
        role = _find(objs, "Role", "-leader-election")
        next(r for r in role["rules"] if r.get("resourceNames")).pop("resourceNames")

    def lease_other_name(objs):
        role = _find(objs, "Role", "-leader-election")
        next(r for r in role["rules"] if r.get("resourceNames"))["resourceNames"] = ["epp-lease"]

    def no_claim_quota(objs):
        objs.remove(_find(objs, "ResourceQuota"))

    def epp_open_to_all(objs):
        _find(objs, "NetworkPolicy", "-epp")["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]

    def epp_no_policy(objs):
        objs.remove(_find(objs, "NetworkPolicy", "-epp"))

    def epp_ext_proc_closed(objs):
        rule = _find(objs, "NetworkPolicy", "-epp")["spec"]["ingress"][0]
        rule["ports"] = [p for p in rule["ports"] if p["port"] != 9002]

    def decode_any_source(objs):
        _find(objs, "NetworkPolicy")["spec"]["ingress"][0].pop("from")

    def decode_any_port(objs):
        _find(objs, "NetworkPolicy")["spec"]["ingress"][0].pop("ports")

    def cgnat_open(objs):
        rule = _find(objs, "NetworkPolicy", "sandbox-allow")["spec"]["egress"][1]
        rule["to"][0]["ipBlock"]["except"].remove("100.64.0.0/10")

    def cluster_range_open(objs):
        rule = _find(objs, "SandboxTemplate")["spec"]["networkPolicy"]["egress"][1]
        rule["to"][0]["ipBlock"]["except"].remove(CLUSTER_RANGES[0])

    return [
        ("EPP granted /metrics itself", "inferencepool/default", epp_reads_metrics,
         "grants ['/metrics'] to ['switchyard-pool-epp'], which run pods"),
        ("lease rule without resourceNames", "inferencepool/ha-objectives-route", lease_any_name,
         "on every lease (no resourceNames)"),
        ("lease rule naming another lease", "inferencepool/ha-objectives-route", lease_other_name,
         "names lease 'epp-lease', but the EPP elects on"),
        ("SandboxClaims without a quota", "code-agent/default", no_claim_quota,
         "create SandboxClaims with no ResourceQuota"),
        ("ext_proc open to every pod", "inferencepool/default", epp_open_to_all,
         "admits every pod in every namespace"),
        ("EPP without a NetworkPolicy", "inferencepool/default", epp_no_policy, "no Ingress NetworkPolicy selects"),
        ("ext_proc port closed to the gateway", "inferencepool/default", epp_ext_proc_closed,
         "ext_proc port 9002 is open to no peer"),
        ("decode servers open to every source", "decode-server/default", decode_any_source,
         "has no `from` (allows every source)"),
        ("decode servers open on every port", "decode-server/default", decode_any_port,
         "has no ports (allows every port)"),
        ("CGNAT range reachable from sandboxes", "code-agent/default", cgnat_open,
         "does not exclude 100.64.0.0/10"),
        ("cluster range reachable from sandboxes", "code-agent/cluster-ranges", cluster_range_open,
         f"does not exclude {CLUSTER_RANGES[0]}"),
        ("runAsNonRoot unset", "decode-server/default", root_allowed, "runAsNonRoot not set"),
        ("uid 0", "decode-server/default", uid_zero, "runs as uid 0"),
        ("privilege escalation", "decode-server/default", escalation, "allowPrivilegeEscalation is not false"),
        ("capabilities not dropped", "decode-server/default", caps_not_dropped, "capabilities do not drop ALL"),
        ("capability added", "decode-server/default", caps_added, "adds capabilities"),
        ("seccomp unconfined", "decode-server/default", seccomp_unconfined,
         "seccompProfile is 'Unconfined', not RuntimeDefault"),
        ("claim with another device class", "decode-server/default", wrong_device_class,
         "deviceClassName 'gpu.example.com' != gpu.nvidia.com"),
        ("GPU pod without the GPU toleration", "decode-server/default", no_gpu_toleration,
         "no nvidia.com/gpu NoSchedule toleration"),
        ("EPP Service port != endpointPickerRef port", "deploy/", epp_service_port,
         "Service 'switchyard-pool-epp' has no port 9002"),
        ("EPP Service selecting no pods", "deploy/", epp_service_selector,
         "Service 'switchyard-pool-epp' selects no pods"),
        ("model servers not on the target port", "deploy/", target_port,
         "does not listen on target port 8001"),
        ("HTTPRoute to a missing Gateway", "deploy/", route_parent, "parent Gateway 'no-such-gateway' not rendered"),
        ("HTTPRoute to a missing InferencePool", "deploy/", route_backend,
         "backend InferencePool 'no-such-pool' not rendered"),
        ("allow-all egress rule", "code-agent/default", allow_all_egress, "has no destination (allows all)"),
        ("sandbox off the gVisor nodes", "code-agent/default", sandbox_anywhere,
         "no nodeSelector sandbox.gke.io/runtime=gvisor"),
        ("sandbox without the gVisor toleration", "code-agent/default", sandbox_no_gvisor_toleration,
         "no sandbox.gke.io/runtime=gvisor:NoSchedule toleration"),
        ("EPP watching another pool", "inferencepool/default", wrong_pool_name, "--pool-name is 'other-pool'"),
        ("unknown field in a Deployment", "code-agent/default", unknown_field, "'bogusField' was unexpected"),
        ("bad enum in a CRD field", "code-agent/default", crd_enum, "is not one of"),
        ("unknown field deep in a CRD", "code-agent/default", crd_unknown_nested, "'bogus' was unexpected"),
        ("InferencePool without ports", "inferencepool/default", pool_no_ports, "should be non-empty"),
        ("writable root filesystem", "decode-server/default", writable_root, "readOnlyRootFilesystem is not true"),
        ("token without RBAC", "decode-server/default", token_without_rbac, "no RoleBinding grants"),
        ("metadata server reachable", "code-agent/default", metadata_open, "does not exclude 169.254.0.0/16"),
        ("claim name mismatch", "decode-server/default", claim_mismatch, "uses unknown claim 'gpus'"),
        ("claim not for an L4", "decode-server/default", wrong_gpu, "no CEL selector"),
        ("tensor parallelism != claimed GPUs", "decode-server/tp2-hpa", tp_mismatch,
         "--tensor-parallel-size 2 but the pod claims 4 devices"),
        ("sandbox outside gVisor", "code-agent/default", runc_sandbox, "!= gvisor"),
        ("no resource limits", "code-agent/default", no_limits, "no limits.cpu"),
    ]


def self_test(rendered: dict[str, list[dict]], crds: CrdSchemas, report: Report) -> None:
    import copy

    for name, render, mutate, expect in _mutations():
        what = f"self-test: {name} is caught"
        if render not in rendered:
            report.fail(what, f"render {render} unavailable")
            continue
        objs = copy.deepcopy(rendered[render])
        try:
            mutate(objs)
        except (KeyError, IndexError, StopIteration, ValueError) as e:
            # The render no longer has what the mutation changes: the checks on the real render
            # report why; the self-test cannot run this case.
            report.fail(what, f"could not plant the violation in {render}: {type(e).__name__} {e}")
            continue
        inner = Report(quiet=True)
        for obj in objs:
            why = validate_object(obj, crds)
            if why:
                inner.fail(obj_id(obj), why)
        check_pod_security(objs, inner, render)
        check_dra(objs, inner, render, None)
        check_network(objs, inner, render, RENDER_BLOCKED.get(render, []))
        check_wiring(objs, inner, render, complete=render == "deploy/")
        check_rbac(objs, inner, render)
        if any(expect in f for f in inner.failures):
            report.ok(what)
        else:
            report.fail(what, f"no failure mentioning {expect!r} (got {inner.failures[:2]})")


# ---------------------------------------------------------------------------------------------
# Main


def check_kustomization(deploy: Path, objs: list[dict], report: Report, kubectl: Path | None) -> None:
    """`kubectl apply -k deploy/` must install exactly the objects of the files in deploy/."""
    what = "deploy/kustomization.yaml lists every manifest"
    if kubectl is None:
        report.fail(what, "no kubectl given")
        return
    r = subprocess.run([str(kubectl), "kustomize", str(deploy)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        report.fail(what, r.stderr.strip()[-300:])
        return
    built = sorted(obj_id(d) for _, d in load_docs(r.stdout, "kustomize"))
    files = sorted(obj_id(o) for o in objs)
    if built != files:
        missing = sorted(set(files) - set(built))
        extra = sorted(set(built) - set(files))
        report.fail(what, f"not in the kustomization: {missing}; only in it: {extra}")
    else:
        report.ok(f"{what} ({len(built)} objects)")


def helm(helm_bin: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--helm", type=Path, required=True)
    ap.add_argument("--kubectl", type=Path, help="kubectl for `kubectl kustomize deploy/`")
    ap.add_argument("--binary", type=Path, help="switchyard binary; without it the binary checks fail")
    ap.add_argument("--out", type=Path, help="keep rendered manifests here")
    opts = ap.parse_args()
    root = opts.root
    report = Report()
    out_dir = opts.out or Path(tempfile.mkdtemp(prefix="switchyard-charts-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    crds = CrdSchemas([*sorted((root / "charts").glob("*/crds")), root / "scripts/charts/crds"])
    print(f"== CRD schemas: {len(crds.schemas)} kinds from {len(crds.sources)} files")
    for f in crds.sources:
        for src, doc in load_docs(f.read_text(), str(f.relative_to(root))):
            why = validate_object(doc, crds)
            report.fail(f"{src} {obj_id(doc)}", why) if why else report.ok(f"{src} {obj_id(doc)}")

    print("== helm lint --strict / helm template")
    rendered_objs: dict[str, list[dict]] = {}
    for r in RENDERS:
        chart = str(root / "charts" / r.chart)
        lint = helm(opts.helm, "lint", "--strict", *HELM_KUBE, chart, *r.sets)
        if lint.returncode != 0:
            report.fail(f"{r.name} helm lint --strict", (lint.stdout + lint.stderr).strip()[-600:])
            continue
        report.ok(f"{r.name} helm lint --strict")
        tpl = helm(opts.helm, "template", "switchyard-pool" if r.chart == "inferencepool" else r.chart.replace("/", "-"),
                   chart, "--namespace", "switchyard", *HELM_KUBE, *r.sets)
        if tpl.returncode != 0:
            report.fail(f"{r.name} helm template", tpl.stderr.strip()[-600:])
            continue
        rendered = out_dir / (r.name.replace("/", "__") + ".yaml")
        rendered.write_text(tpl.stdout)
        objs = [d for _, d in load_docs(tpl.stdout, r.name)]
        rendered_objs[r.name] = objs
        report.ok(f"{r.name} helm template ({len(objs)} objects)")
        for obj in objs:
            why = validate_object(obj, crds)
            report.fail(f"{r.name} {obj_id(obj)} schema", why) if why else report.ok(f"{r.name} {obj_id(obj)} schema")
        check_pod_security(objs, report, r.name)
        check_dra(objs, report, r.name, r.gpu)
        check_network(objs, report, r.name, list(r.blocked))
        check_wiring(objs, report, r.name, complete=False)
        check_rbac(objs, report, r.name)
        if r.chart == "inferencepool" and r.epp_check:
            if opts.binary:
                check_epp_args(objs, report, r.name, opts.binary)
            else:
                report.fail(f"{r.name} EPP args", "no switchyard binary given")
        if r.chart == "decode-server" and r.serve_check:
            if opts.binary:
                check_serve_args(objs, report, r.name, opts.binary)
            else:
                report.fail(f"{r.name} serve flags", "no switchyard binary given")

    print("== renders that must fail")
    for n in NEGATIVE:
        tpl = helm(opts.helm, "template", "neg", str(root / "charts" / n.chart), *HELM_KUBE, *n.sets)
        what = f"{n.name} fails with {n.expect!r}"
        if tpl.returncode == 0:
            report.fail(what, "rendered successfully")
        elif n.expect not in tpl.stderr:
            report.fail(what, f"failed with another error: {tpl.stderr.strip()[-300:]}")
        else:
            report.ok(what)

    print("== deploy/ manifests")
    deploy_objs: list[dict] = []
    files = sorted(
        p for p in (root / "deploy").rglob("*.yaml")
        if "envoy" not in p.relative_to(root / "deploy").parts and p.name != "kustomization.yaml"
    )
    if not files:
        report.fail("deploy/", "no manifests found")
    for f in files:
        rel = str(f.relative_to(root))
        try:
            docs = load_docs(f.read_text(), rel)
        except (yaml.YAMLError, ValueError) as e:
            report.fail(rel, f"not YAML: {e}")
            continue
        for _, obj in docs:
            why = validate_object(obj, crds)
            report.fail(f"{rel} {obj_id(obj)}", why) if why else report.ok(f"{rel} {obj_id(obj)}")
            deploy_objs.append(obj)
    check_pod_security(deploy_objs, report, "deploy/")
    check_dra(deploy_objs, report, "deploy/", None)
    check_network(deploy_objs, report, "deploy/")
    check_wiring(deploy_objs, report, "deploy/", complete=True)
    check_rbac(deploy_objs, report, "deploy/")
    check_kustomization(root / "deploy", deploy_objs, report, opts.kubectl)

    print("== checker self-test")
    self_test({**rendered_objs, "deploy/": deploy_objs}, crds, report)
    if opts.binary:
        check_epp_rejects(rendered_objs, report, opts.binary)

    print(f"\n== summary: {report.passed} passed, {len(report.failures)} failed (rendered manifests in {out_dir})")
    for f in report.failures:
        print(f"  FAILED {f}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())

