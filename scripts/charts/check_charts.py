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
     blocks for the metadata server and private ranges, names and ports lining up between
     pool, EPP, model servers, routes and gateways; a self-test plants one violation of each
     kind and requires the checks to catch it;
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
from policies import METADATA_RANGE, check_dra, check_network, check_pod_security, check_wiring  # noqa: E402

# helm renders and lints as if talking to this cluster version (Capabilities.KubeVersion).
HELM_KUBE = ["--kube-version", "v" + K8S_VERSION]
BASE_POOL = ["--set", "inferencePool.modelServers.matchLabels.app=switchyard-decode"]


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
             BASE_POOL + s("inferenceExtension.metricsDataSource.scheme=ftp"), "scheme must be http or https"),
    Negative("decode-server/bad-backend", "decode-server", s("backend=rocm"), "value must be one of 'cuda', 'cpu', 'sim'"),
    Negative("decode-server/no-weights", "decode-server", s("model.existingClaim="), "existingClaim is required"),
    Negative("decode-server/values-typo", "decode-server", s("backnd=sim"), "additional properties 'backnd' not allowed"),
    Negative("decode-server/zero-gpus", "decode-server", s("gpu.count=0"), "/gpu/count"),
    Negative("code-agent/values-typo", "code-agent", s("networkPolicy.allowInternetEgres=false"),
             "additional properties 'allowInternetEgres' not allowed"),
    Negative("inferencepool/nine-ports", "inferencepool",
             BASE_POOL + s(*[f"inferencePool.targetPorts[{i}].number={8000 + i}" for i in range(9)]), "targetPorts"),
    Negative("code-agent/no-gvisor", "code-agent", s("gvisor.runtimeClassName="), "runtimeClassName is required"),
]



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

    return [
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
        mutate(objs)
        inner = Report(quiet=True)
        for obj in objs:
            why = validate_object(obj, crds)
            if why:
                inner.fail(obj_id(obj), why)
        check_pod_security(objs, inner, render)
        check_dra(objs, inner, render, None)
        check_network(objs, inner, render)
        check_wiring(objs, inner, render, complete=False)
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
        check_network(objs, report, r.name)
        check_wiring(objs, report, r.name, complete=False)
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
    if opts.binary:
        check_epp_rejects(rendered_objs, report, opts.binary)

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
    check_kustomization(root / "deploy", deploy_objs, report, opts.kubectl)

    print(f"\n== summary: {report.passed} passed, {len(report.failures)} failed (rendered manifests in {out_dir})")
    for f in report.failures:
        print(f"  FAILED {f}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())

