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
     claim wiring, gVisor placement of sandboxes, egress blocks for the metadata server and
     private ranges;
  4. the EPP arguments rendered by the inferencepool chart are accepted by the real binary
     (`switchyard epp <args> --check-config`, with the rendered ConfigMap as --config-text) and
     the decode server's flags are all known to `switchyard serve`.

Exits non-zero when anything fails; prints one line per check and a summary.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.34.0"
BASE_POOL = ["--set", "inferencePool.modelServers.matchLabels.app=switchyard-decode"]
PRIVATE_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
METADATA_RANGE = "169.254.0.0/16"
GVISOR_KEY = "sandbox.gke.io/runtime"
GPU_CLASS = "gpu.nvidia.com"
GPU_PRODUCT = "NVIDIA L4"
# Pod-bearing kinds and where their pod template lives.
POD_PATHS = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "SandboxTemplate": ("spec", "podTemplate"),
    "Sandbox": ("spec", "podTemplate"),
}
RBAC_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass
class Render:
    """One `helm template` run and the policies that apply to its output."""

    name: str
    chart: str
    sets: list[str]
    gpu: bool | None = None  # decode-server: claim + toleration expected (True) or absent (False)
    epp_check: bool = True  # run the binary on the EPP args
    serve_check: bool = True  # check decode-server flags against `switchyard serve --help`


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
    Render("inferencepool/gke", "inferencepool", BASE_POOL + s("provider.name=gke")),
    Render("inferencepool/istio", "inferencepool", BASE_POOL + s("provider.name=istio")),
    Render("inferencepool/gke-monitoring", "inferencepool",
           BASE_POOL + s("provider.name=gke", "inferenceExtension.monitoring.prometheus.enabled=true",
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
    Render("decode-server/gke", "decode-server", s("provider.name=gke"), gpu=True),
    Render("decode-server/istio", "decode-server", s("provider.name=istio"), gpu=True),
    Render("decode-server/sim", "decode-server", s("backend=sim"), gpu=False),
    Render("decode-server/tp2-hpa", "decode-server",
           s("gpu.count=2", "autoscaling.enabled=true"), gpu=True),
    Render("decode-server/sim-hpa-external", "decode-server",
           s("backend=sim", "autoscaling.enabled=true", "autoscaling.metric.type=External",
             "monitoring.podMonitoring.enabled=false"), gpu=False),
    Render("code-agent/default", "code-agent", []),
    Render("code-agent/gke", "code-agent", s("provider.name=gke")),
    Render("code-agent/istio", "code-agent", s("provider.name=istio")),
    Render("code-agent/no-internet", "code-agent",
           s("networkPolicy.allowInternetEgress=false", "networkPolicy.dnsExtraCIDRs[0]=169.254.20.10/32")),
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
             BASE_POOL + s("inferenceExtension.metricsDataSource.scheme=ftp"), "scheme must be http or https"),
    Negative("decode-server/bad-backend", "decode-server", s("backend=rocm"), "backend must be cuda, cpu or sim"),
    Negative("decode-server/no-weights", "decode-server", s("model.existingClaim="), "existingClaim is required"),
    Negative("decode-server/values-typo", "decode-server", s("backnd=sim"), "additional properties 'backnd' not allowed"),
    Negative("decode-server/zero-gpus", "decode-server", s("gpu.count=0"), "/gpu/count"),
    Negative("code-agent/values-typo", "code-agent", s("networkPolicy.allowInternetEgres=false"),
             "additional properties 'allowInternetEgres' not allowed"),
    Negative("inferencepool/nine-ports", "inferencepool",
             BASE_POOL + s(*[f"inferencePool.targetPorts[{i}].number={8000 + i}" for i in range(9)]), "targetPorts"),
    Negative("code-agent/no-gvisor", "code-agent", s("gvisor.runtimeClassName="), "runtimeClassName is required"),
]


class Report:
    def __init__(self, quiet: bool = False) -> None:
        self.failures: list[str] = []
        self.passed = 0
        self.quiet = quiet

    def ok(self, what: str) -> None:
        self.passed += 1
        if not self.quiet:
            print(f"  ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failures.append(f"{what}: {why}")
        if not self.quiet:
            print(f"  FAIL  {what}: {why}")


# ---------------------------------------------------------------------------------------------
# Loading


def load_docs(text: str, source: str) -> list[tuple[str, dict]]:
    out = []
    for i, doc in enumerate(yaml.safe_load_all(text)):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"{source}: document {i} is not a mapping")
        out.append((source, doc))
    return out


def obj_id(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


def dig(obj: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(p)
    return obj


# ---------------------------------------------------------------------------------------------
# Schema validation


def strictify(schema: Any) -> Any:
    """Reject unknown fields like the API server's strict field validation (structural schemas)."""
    if isinstance(schema, dict):
        out = {k: strictify(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        # OpenAPI `nullable` has no JSON-schema keyword; widen the type instead.
        if out.get("nullable") and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(schema, list):
        return [strictify(x) for x in schema]
    return schema


class CrdSchemas:
    def __init__(self, dirs: Iterable[Path]) -> None:
        self.schemas: dict[tuple[str, str, str], dict] = {}
        self.sources: list[Path] = []
        for d in dirs:
            for f in sorted(d.glob("*.yaml")):
                self.sources.append(f)
                for _, crd in load_docs(f.read_text(), str(f)):
                    if crd.get("kind") != "CustomResourceDefinition":
                        continue
                    group = crd["spec"]["group"]
                    kind = crd["spec"]["names"]["kind"]
                    for v in crd["spec"]["versions"]:
                        if v.get("served", True):
                            schema = strictify(v["schema"]["openAPIV3Schema"])
                            self.schemas[(group, v["name"], kind)] = schema

    def lookup(self, api_version: str, kind: str) -> dict | None:
        group, _, version = api_version.rpartition("/")
        return self.schemas.get((group, version, kind))


def validate_object(obj: dict, crds: CrdSchemas) -> str | None:
    """Returns None when valid, else the reason."""
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not api_version or not kind:
        return "apiVersion and kind are required"
    name_problem = check_metadata(obj)
    if name_problem:
        return name_problem
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return None
    except kubernetes_validate.SchemaNotFoundError:
        pass
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        return f"Kubernetes {K8S_VERSION} schema: {e.message} at /{path}"
    schema = crds.lookup(api_version, kind)
    if schema is None:
        return f"no schema for {api_version} {kind} (neither built in nor a vendored CRD)"
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = "/".join(str(p) for p in e.absolute_path)
        return f"CRD schema {api_version} {kind}: {e.message} at /{path}"
    return None


def check_metadata(obj: dict) -> str | None:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return "metadata.name is required"
    kind = obj.get("kind")
    if kind in RBAC_KINDS:
        # RBAC names are path segments: anything but '/', '%', '.' and '..'.
        if "/" in name or "%" in name or name in (".", ".."):
            return f"invalid RBAC name {name!r}"
    elif kind == "Service":
        if len(name) > 63 or not DNS_LABEL_1035.match(name):
            return f"Service name {name!r} is not a DNS-1035 label"
    elif len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        return f"name {name!r} is not a DNS subdomain"
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            return f"label {key}={value!r} is not a valid label value"
    return None


# ---------------------------------------------------------------------------------------------
# Policies


def pod_templates(objs: list[dict]) -> list[tuple[dict, dict]]:
    out = []
    for obj in objs:
        path = POD_PATHS.get(obj.get("kind"))
        if path is None:
            if obj.get("kind") == "Pod":
                out.append((obj, obj))
            continue
        tmpl = dig(obj, *path)
        if isinstance(tmpl, dict):
            out.append((obj, tmpl))
    return out


def rbac_subjects(objs: list[dict]) -> set[tuple[str, str]]:
    """(namespace, service account) pairs bound by some RoleBinding/ClusterRoleBinding."""
    bound = set()
    for obj in objs:
        if obj.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        for subj in obj.get("subjects") or []:
            if subj.get("kind") == "ServiceAccount":
                ns = subj.get("namespace") or dig(obj, "metadata", "namespace") or ""
                bound.add((ns, subj.get("name")))
    return bound


def check_pod_security(objs: list[dict], report: Report, where: str) -> None:
    bound = rbac_subjects(objs)
    accounts = {
        (dig(o, "metadata", "namespace") or "", dig(o, "metadata", "name")): o
        for o in objs
        if o.get("kind") == "ServiceAccount"
    }
    for owner, tmpl in pod_templates(objs):
        what = f"{where} {obj_id(owner)} pod security"
        spec = tmpl.get("spec") or {}
        psc = spec.get("securityContext") or {}
        problems = []
        containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
        if not containers:
            problems.append("no containers")
        for c in containers:
            csc = c.get("securityContext") or {}
            cname = c.get("name")
            if not (csc.get("runAsNonRoot") is True or psc.get("runAsNonRoot") is True):
                problems.append(f"{cname}: runAsNonRoot not set")
            if csc.get("runAsUser") == 0 or (psc.get("runAsUser") == 0 and "runAsUser" not in csc):
                problems.append(f"{cname}: runs as uid 0")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cname}: allowPrivilegeEscalation is not false")
            if csc.get("privileged"):
                problems.append(f"{cname}: privileged")
            if "ALL" not in (dig(csc, "capabilities", "drop") or []):
                problems.append(f"{cname}: capabilities do not drop ALL")
            if dig(csc, "capabilities", "add"):
                problems.append(f"{cname}: adds capabilities")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cname}: readOnlyRootFilesystem is not true")
            seccomp = dig(csc, "seccompProfile", "type") or dig(psc, "seccompProfile", "type")
            if seccomp != "RuntimeDefault":
                problems.append(f"{cname}: seccompProfile is {seccomp!r}, not RuntimeDefault")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(kind) or {}):
                        problems.append(f"{cname}: no {kind}.{r}")
            # A read-only root needs writable scratch: some emptyDir must be mounted.
            empty_dirs = {v.get("name") for v in spec.get("volumes") or [] if "emptyDir" in v}
            if not any(m.get("name") in empty_dirs and not m.get("readOnly") for m in c.get("volumeMounts") or []):
                problems.append(f"{cname}: no writable emptyDir scratch mounted")
        # A service-account token only where the account is granted API access.
        ns = dig(owner, "metadata", "namespace") or ""
        sa = spec.get("serviceAccountName") or "default"
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            account = accounts.get((ns, sa))
            automount = account.get("automountServiceAccountToken") if account else None
        if automount is not False and (ns, sa) not in bound:
            problems.append(f"mounts a service-account token for {sa!r}, which no RoleBinding grants anything")
        if problems:
            report.fail(what, "; ".join(problems))
        else:
            report.ok(what)


def check_dra(objs: list[dict], report: Report, where: str, expect_gpu: bool | None) -> None:
    templates = {dig(o, "metadata", "name"): o for o in objs if o.get("kind") == "ResourceClaimTemplate"}
    for name, t in templates.items():
        what = f"{where} ResourceClaimTemplate/{name} requests {GPU_PRODUCT}"
        problems = []
        requests = dig(t, "spec", "spec", "devices", "requests") or []
        if not requests:
            problems.append("no device requests")
        for r in requests:
            ex = r.get("exactly") or {}
            if ex.get("deviceClassName") != GPU_CLASS:
                problems.append(f"deviceClassName {ex.get('deviceClassName')!r} != {GPU_CLASS}")
            if not isinstance(ex.get("count"), int) or ex.get("count") < 1:
                problems.append("count must be a positive integer")
            exprs = [dig(sel, "cel", "expression") or "" for sel in ex.get("selectors") or []]
            want = f'device.attributes["{GPU_CLASS}"].productName == "{GPU_PRODUCT}"'
            if want not in exprs:
                problems.append(f"no CEL selector {want!r} (got {exprs})")
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)

    used_templates = set()
    gpu_pods = 0
    for owner, tmpl in pod_templates(objs):
        spec = tmpl.get("spec") or {}
        claims = spec.get("resourceClaims") or []
        if not claims:
            continue
        gpu_pods += 1
        what = f"{where} {obj_id(owner)} DRA claim wiring"
        problems = []
        pod_claims = {}
        for c in claims:
            tname = c.get("resourceClaimTemplateName")
            if tname is None and c.get("resourceClaimName") is None:
                problems.append(f"claim {c.get('name')!r} names neither a template nor a claim")
            if tname is not None and tname not in templates:
                problems.append(f"claim {c.get('name')!r} -> template {tname!r} not rendered")
            used_templates.add(tname)
            pod_claims[c.get("name")] = tname
        used = set()
        for ctr in spec.get("containers") or []:
            for cc in dig(ctr, "resources", "claims") or []:
                if cc.get("name") not in pod_claims:
                    problems.append(f"container {ctr.get('name')!r} uses unknown claim {cc.get('name')!r}")
                used.add(cc.get("name"))
        for unused in set(pod_claims) - used:
            problems.append(f"pod claim {unused!r} is used by no container")
        tolerations = spec.get("tolerations") or []
        if not any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists" and t.get("effect") == "NoSchedule"
                   for t in tolerations):
            problems.append("no nvidia.com/gpu NoSchedule toleration")
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)
    for name in set(templates) - used_templates:
        report.fail(f"{where} ResourceClaimTemplate/{name}", "not used by any pod")
    if expect_gpu is True and gpu_pods == 0:
        report.fail(f"{where} GPU", "expected pods with DRA GPU claims, found none")
    if expect_gpu is False:
        what = f"{where} no GPU claim, template or toleration"
        problems = []
        if templates:
            problems.append("ResourceClaimTemplate rendered")
        if gpu_pods:
            problems.append("pods claim devices")
        for owner, tmpl in pod_templates(objs):
            if any(t.get("key") == "nvidia.com/gpu" for t in dig(tmpl, "spec", "tolerations") or []):
                problems.append(f"{obj_id(owner)} tolerates GPU nodes")
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)


def egress_problems(rules: list[dict]) -> list[str]:
    """Every egress destination that could reach the metadata server or a private range must
    carve them out; a rule with no `to` allows everything and is rejected."""
    problems = []
    blocked = [ipaddress.ip_network(c) for c in PRIVATE_RANGES + [METADATA_RANGE]]
    for i, rule in enumerate(rules or []):
        peers = rule.get("to")
        if not peers:
            problems.append(f"egress rule {i} has no destination (allows all)")
            continue
        ports = {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports") or []}
        dns_only = bool(ports) and all(port == 53 for _, port in ports)
        for peer in peers:
            block = peer.get("ipBlock")
            if not block:
                continue
            net = ipaddress.ip_network(block["cidr"], strict=False)
            excepts = [ipaddress.ip_network(e, strict=False) for e in block.get("except") or []]
            for b in blocked:
                if not net.overlaps(b):
                    continue
                if any(b.subnet_of(e) for e in excepts if e.version == b.version):
                    continue
                # A resolver address (NodeLocal DNSCache, 169.254.20.10) may be allowed on port
                # 53 only; the metadata server itself never.
                if dns_only and net.prefixlen == 32 and net != ipaddress.ip_network("169.254.169.254/32"):
                    continue
                problems.append(f"egress rule {i} to {net} does not exclude {b}")
    return problems


def check_network(objs: list[dict], report: Report, where: str) -> None:
    sandbox_templates = [o for o in objs if o.get("kind") == "SandboxTemplate"]
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    for p in policies:
        what = f"{where} {obj_id(p)} egress blocks metadata server and private ranges"
        problems = egress_problems(dig(p, "spec", "egress") or [])
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)
    for t in sandbox_templates:
        what = f"{where} {obj_id(t)} isolation"
        problems = []
        spec = dig(t, "spec", "podTemplate", "spec") or {}
        if spec.get("runtimeClassName") != "gvisor":
            problems.append(f"runtimeClassName {spec.get('runtimeClassName')!r} != gvisor")
        if (spec.get("nodeSelector") or {}).get(GVISOR_KEY) != "gvisor":
            problems.append(f"no nodeSelector {GVISOR_KEY}=gvisor")
        if not any(x.get("key") == GVISOR_KEY and x.get("value") == "gvisor" and x.get("effect") == "NoSchedule"
                   for x in spec.get("tolerations") or []):
            problems.append(f"no {GVISOR_KEY}=gvisor:NoSchedule toleration")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append("automountServiceAccountToken is not false")
        for c in spec.get("containers") or []:
            if "ephemeral-storage" not in (dig(c, "resources", "limits") or {}):
                problems.append(f"{c.get('name')}: no ephemeral-storage limit")
        if dig(t, "spec", "networkPolicyManagement") == "Unmanaged" and not policies:
            problems.append("network policy unmanaged and none rendered")
        problems += egress_problems(dig(t, "spec", "networkPolicy", "egress") or [])
        # A default-deny policy must select the sandbox pods (both directions).
        labels = dig(t, "spec", "podTemplate", "metadata", "labels") or {}
        deny = [
            p for p in policies
            if set((dig(p, "spec", "podSelector", "matchLabels") or {}).items()) <= set(labels.items())
            and {"Ingress", "Egress"} <= set(dig(p, "spec", "policyTypes") or [])
            and dig(p, "spec", "podSelector", "matchLabels")
        ]
        if policies and not deny:
            problems.append("no NetworkPolicy with Ingress+Egress selects the sandbox pods")
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)


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
        env = dict(os.environ, NAMESPACE="check", POD_NAME="check-0")
        try:
            r = subprocess.run([str(binary), "epp", *args, "--check-config"], capture_output=True, text=True,
                               timeout=60, env=env)
        except subprocess.TimeoutExpired:
            report.fail(what, "did not exit within 60 s (is --check-config implemented?)")
            continue
        if r.returncode != 0:
            lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()] or lines[-3:]
            report.fail(what, f"exit {r.returncode}: {' | '.join(errors[:3])}")
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

    def runc_sandbox(objs):
        _find(objs, "SandboxTemplate")["spec"]["podTemplate"]["spec"]["runtimeClassName"] = "runc"

    def no_limits(objs):
        c = _find(objs, "Deployment", "router")["spec"]["template"]["spec"]["containers"][0]
        del c["resources"]["limits"]

    return [
        ("unknown field in a Deployment", "code-agent/default", unknown_field, "'bogusField' was unexpected"),
        ("bad enum in a CRD field", "code-agent/default", crd_enum, "is not one of"),
        ("unknown field deep in a CRD", "code-agent/default", crd_unknown_nested, "'bogus' was unexpected"),
        ("InferencePool without ports", "inferencepool/default", pool_no_ports, "should be non-empty"),
        ("writable root filesystem", "decode-server/default", writable_root, "readOnlyRootFilesystem is not true"),
        ("token without RBAC", "decode-server/default", token_without_rbac, "no RoleBinding grants"),
        ("metadata server reachable", "code-agent/default", metadata_open, "does not exclude 169.254.0.0/16"),
        ("claim name mismatch", "decode-server/default", claim_mismatch, "uses unknown claim 'gpus'"),
        ("claim not for an L4", "decode-server/default", wrong_gpu, "no CEL selector"),
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
        mutate(objs)
        inner = Report(quiet=True)
        for obj in objs:
            why = validate_object(obj, crds)
            if why:
                inner.fail(obj_id(obj), why)
        check_pod_security(objs, inner, render)
        check_dra(objs, inner, render, None)
        check_network(objs, inner, render)
        if any(expect in f for f in inner.failures):
            report.ok(what)
        else:
            report.fail(what, f"no failure mentioning {expect!r} (got {inner.failures[:2]})")


# ---------------------------------------------------------------------------------------------
# Main


def helm(helm_bin: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--helm", type=Path, required=True)
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
        lint = helm(opts.helm, "lint", "--strict", chart, *r.sets)
        if lint.returncode != 0:
            report.fail(f"{r.name} helm lint --strict", (lint.stdout + lint.stderr).strip()[-600:])
            continue
        report.ok(f"{r.name} helm lint --strict")
        tpl = helm(opts.helm, "template", "switchyard-pool" if r.chart == "inferencepool" else r.chart.replace("/", "-"),
                   chart, "--namespace", "switchyard", *r.sets)
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
        check_network(objs, report, r.name)
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

    print("== checker self-test")
    self_test(rendered_objs, crds, report)

    print("== renders that must fail")
    for n in NEGATIVE:
        tpl = helm(opts.helm, "template", "neg", str(root / "charts" / n.chart), *n.sets)
        what = f"{n.name} fails with {n.expect!r}"
        if tpl.returncode == 0:
            report.fail(what, "rendered successfully")
        elif n.expect not in tpl.stderr:
            report.fail(what, f"failed with another error: {tpl.stderr.strip()[-300:]}")
        else:
            report.ok(what)

    print("== deploy/ manifests")
    deploy_objs: list[dict] = []
    files = sorted(p for p in (root / "deploy").rglob("*.yaml") if "envoy" not in p.relative_to(root / "deploy").parts)
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

    print(f"\n== summary: {report.passed} passed, {len(report.failures)} failed (rendered manifests in {out_dir})")
    for f in report.failures:
        print(f"  FAILED {f}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
