"""Policy assertions over a set of rendered objects: hardened pods, service-account tokens only
where RBAC grants something, DRA GPU claim wiring, gVisor placement of sandboxes, egress blocks
for the metadata server and private/reserved ranges, ingress NetworkPolicies of the EPP and the
decode servers, least-privilege RBAC (no `/metrics` for pod identities, leases by name) and a
quota on what the agent may create."""

from __future__ import annotations

import ipaddress

from manifests import Report, dig, obj_id

PRIVATE_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
# Shared address space (CGNAT; GKE pod/service ranges), "this network", benchmarking, class E.
RESERVED_RANGES = ["100.64.0.0/10", "0.0.0.0/8", "198.18.0.0/15", "240.0.0.0/4"]
METADATA_RANGE = "169.254.0.0/16"
SANDBOX_CLAIMS_QUOTA = "count/sandboxclaims.extensions.agents.x-k8s.io"
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
        # Tensor parallelism must span exactly the GPUs the pod claims.
        devices = sum(
            int(dig(r, "exactly", "count") or 1)
            for t in pod_claims.values() if t in templates
            for r in dig(templates[t], "spec", "spec", "devices", "requests") or []
        )
        for ctr in spec.get("containers") or []:
            args = ctr.get("args") or []
            if "--tensor-parallel-size" in args[:-1]:
                tp = args[args.index("--tensor-parallel-size") + 1]
                if str(tp) != str(devices):
                    problems.append(f"--tensor-parallel-size {tp} but the pod claims {devices} devices")
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


def egress_problems(rules: list[dict], extra_blocked: list[str] = ()) -> list[str]:
    """Every egress destination that could reach the metadata server, a private or reserved
    range, or one of `extra_blocked` (the cluster's own ranges) must carve them out; a rule with
    no `to` allows everything and is rejected."""
    problems = []
    blocked = [ipaddress.ip_network(c) for c in PRIVATE_RANGES + RESERVED_RANGES + [METADATA_RANGE, *extra_blocked]]
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


def check_network(objs: list[dict], report: Report, where: str, extra_blocked: list[str] = ()) -> None:
    sandbox_templates = [o for o in objs if o.get("kind") == "SandboxTemplate"]
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    check_ingress(objs, policies, report, where)
    for p in policies:
        what = f"{where} {obj_id(p)} egress blocks metadata server, private and reserved ranges"
        problems = egress_problems(dig(p, "spec", "egress") or [], extra_blocked)
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
        problems += egress_problems(dig(t, "spec", "networkPolicy", "egress") or [], extra_blocked)
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


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_wiring(objs: list[dict], report: Report, where: str, complete: bool) -> None:
    """Names and ports that must line up between objects: InferencePool -> EPP Service ->
    EPP pods (whose --pool-name/--pool-namespace name the pool), pool selector -> model-server
    pods listening on every target port, HTTPRoute -> Gateway and InferencePool. `complete`:
    the set holds the whole stack (deploy/), so every reference must resolve inside it."""
    services = {dig(o, "metadata", "name"): o for o in objs if o.get("kind") == "Service"}
    pools = {dig(o, "metadata", "name"): o for o in objs if o.get("kind") == "InferencePool"}
    gateways = {dig(o, "metadata", "name") for o in objs if o.get("kind") == "Gateway"}
    pods = pod_templates(objs)
    for name, pool in pools.items():
        what = f"{where} InferencePool/{name} wiring"
        problems = []
        ref = dig(pool, "spec", "endpointPickerRef") or {}
        svc = services.get(ref.get("name"))
        if svc is None:
            problems.append(f"endpointPickerRef Service {ref.get('name')!r} not rendered")
        else:
            port = dig(ref, "port", "number")
            if not any(p.get("port") == port for p in dig(svc, "spec", "ports") or []):
                problems.append(f"Service {ref.get('name')!r} has no port {port}")
            epps = [(o, t) for o, t in pods if _selects(dig(svc, "spec", "selector") or {},
                                                      dig(t, "metadata", "labels") or {})]
            if not epps:
                problems.append(f"Service {ref.get('name')!r} selects no pods")
            for owner, tmpl in epps:
                for c in dig(tmpl, "spec", "containers") or []:
                    args = c.get("args") or []
                    for flag, want in (("--pool-name", name),
                                       ("--pool-namespace", dig(pool, "metadata", "namespace"))):
                        got = args[args.index(flag) + 1] if flag in args[:-1] else None
                        if got != want:
                            problems.append(f"{obj_id(owner)} {flag} is {got!r}, pool is {want!r}")
        selector = dig(pool, "spec", "selector", "matchLabels") or {}
        servers = [(o, t) for o, t in pods if _selects(selector, dig(t, "metadata", "labels") or {})]
        if complete and not servers:
            problems.append(f"selector {selector} matches no model-server pods")
        for owner, tmpl in servers:
            ports = {p.get("containerPort") for c in dig(tmpl, "spec", "containers") or []
                     for p in c.get("ports") or []}
            for tp in dig(pool, "spec", "targetPorts") or []:
                if tp.get("number") not in ports:
                    problems.append(f"{obj_id(owner)} does not listen on target port {tp.get('number')}")
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)
    for route in (o for o in objs if o.get("kind") == "HTTPRoute"):
        what = f"{where} {obj_id(route)} references"
        problems = []
        for parent in dig(route, "spec", "parentRefs") or []:
            if parent.get("kind", "Gateway") == "Gateway" and (complete or gateways) \
                    and parent.get("name") not in gateways:
                problems.append(f"parent Gateway {parent.get('name')!r} not rendered")
        for rule in dig(route, "spec", "rules") or []:
            for b in rule.get("backendRefs") or []:
                if b.get("kind") == "InferencePool" and (complete or pools) and b.get("name") not in pools:
                    problems.append(f"backend InferencePool {b.get('name')!r} not rendered")
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)


def _serves(tmpl: dict, subcommand: str) -> bool:
    return any((c.get("command") or [])[-1:] == [subcommand] for c in dig(tmpl, "spec", "containers") or [])


def _open_peer(peer: dict) -> str | None:
    """Why a NetworkPolicyPeer admits everyone (in the cluster or in the namespace), or None."""
    block = peer.get("ipBlock")
    if block:
        return "an ipBlock /0" if ipaddress.ip_network(block["cidr"], strict=False).prefixlen == 0 else None
    ns, pods = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns is not None and not ns and not pods:
        return "every pod in every namespace"
    if ns is None and pods is not None and not pods:
        return "every pod in the namespace"
    if ns is None and pods is None:
        return "an empty peer"
    return None


def check_ingress(objs: list[dict], policies: list[dict], report: Report, where: str) -> None:
    """The EPP (`switchyard epp`: ext_proc steers routing) and the decode servers (`switchyard
    serve`) are selected by an Ingress NetworkPolicy whose every rule names its ports and its
    peers, none of them everyone; the EPP's ext_proc port is open to some peer."""
    for owner, tmpl in pod_templates(objs):
        role = "EPP" if _serves(tmpl, "epp") else "decode server" if _serves(tmpl, "serve") else None
        if role is None:
            continue
        what = f"{where} {obj_id(owner)} ingress limited by NetworkPolicy ({role})"
        ns = dig(owner, "metadata", "namespace")
        labels = dig(tmpl, "metadata", "labels") or {}
        selecting = [
            p for p in policies
            if dig(p, "metadata", "namespace") == ns
            and "Ingress" in (dig(p, "spec", "policyTypes") or [])
            and set((dig(p, "spec", "podSelector", "matchLabels") or {}).items()) <= set(labels.items())
        ]
        problems = []
        if not selecting:
            problems.append("no Ingress NetworkPolicy selects its pods")
        open_ports = set()
        for p in selecting:
            for i, rule in enumerate(dig(p, "spec", "ingress") or []):
                peers = rule.get("from")
                if not peers:
                    problems.append(f"{obj_id(p)} ingress rule {i} has no `from` (allows every source)")
                if not rule.get("ports"):
                    problems.append(f"{obj_id(p)} ingress rule {i} has no ports (allows every port)")
                for peer in peers or []:
                    why = _open_peer(peer)
                    if why:
                        problems.append(f"{obj_id(p)} ingress rule {i} admits {why}")
                open_ports |= {port.get("port") for port in rule.get("ports") or []}
        if role == "EPP" and selecting:
            for c in dig(tmpl, "spec", "containers") or []:
                args = c.get("args") or []
                grpc = int(args[args.index("--grpc-port") + 1]) if "--grpc-port" in args[:-1] else 9002
                if grpc not in open_ports:
                    problems.append(f"ext_proc port {grpc} is open to no peer (the gateway cannot reach it)")
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)


def _bindings(objs: list[dict]) -> list[tuple[dict, set[tuple[str, str]]]]:
    """(Role or ClusterRole, the service accounts it is bound to) for roles in `objs`."""
    roles = {(o.get("kind"), dig(o, "metadata", "namespace") or "", dig(o, "metadata", "name")): o
             for o in objs if o.get("kind") in ("Role", "ClusterRole")}
    out: dict[tuple, set] = {}
    for b in objs:
        if b.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        ref = b.get("roleRef") or {}
        ns = "" if ref.get("kind") == "ClusterRole" else dig(b, "metadata", "namespace") or ""
        key = (ref.get("kind"), ns, ref.get("name"))
        for subj in b.get("subjects") or []:
            if subj.get("kind") == "ServiceAccount":
                out.setdefault(key, set()).add((subj.get("namespace") or dig(b, "metadata", "namespace") or "",
                                                subj.get("name")))
    return [(roles[k], sas) for k, sas in out.items() if k in roles]


def check_rbac(objs: list[dict], report: Report, where: str) -> None:
    """Least privilege: an identity that runs pods is never granted `/metrics` (only the token of
    a pod-less reader account is); lease rules name their lease (only `create` cannot), and it is
    the lease the EPP of this set elects on; an account that may create SandboxClaims is bounded
    by a ResourceQuota on them in its namespace."""
    runs_pods = {(dig(o, "metadata", "namespace") or "", dig(t, "spec", "serviceAccountName") or "default")
                 for o, t in pod_templates(objs)}
    leases = set()
    for o, t in pod_templates(objs):
        for c in dig(t, "spec", "containers") or []:
            args = c.get("args") or []
            if (c.get("command") or [])[-1:] == ["epp"] and "--pool-name" in args[:-1]:
                ns = args[args.index("--pool-namespace") + 1] if "--pool-namespace" in args[:-1] else dig(o, "metadata", "namespace")
                leases.add(f"epp-{ns}-{args[args.index('--pool-name') + 1]}.gateway-api-inference-extension.sigs.k8s.io")
    quotas = {(dig(q, "metadata", "namespace") or "") for q in objs
              if q.get("kind") == "ResourceQuota" and SANDBOX_CLAIMS_QUOTA in (dig(q, "spec", "hard") or {})}
    for role, accounts in _bindings(objs):
        what = f"{where} {obj_id(role)} least privilege"
        problems = []
        for i, rule in enumerate(role.get("rules") or []):
            urls = rule.get("nonResourceURLs") or []
            pod_accounts = sorted(a for a in accounts if a in runs_pods)
            if ("/metrics" in urls or "*" in urls) and pod_accounts:
                problems.append(f"rule {i} grants {urls} to {[a[1] for a in pod_accounts]}, which run pods")
            resources = rule.get("resources") or []
            verbs = set(rule.get("verbs") or [])
            if "leases" in resources or "*" in resources:
                if verbs - {"create"} and not rule.get("resourceNames"):
                    problems.append(f"rule {i} grants {sorted(verbs)} on every lease (no resourceNames)")
                for name in rule.get("resourceNames") or []:
                    if leases and name not in leases:
                        problems.append(f"rule {i} names lease {name!r}, but the EPP elects on {sorted(leases)}")
            if "sandboxclaims" in resources and "create" in verbs:
                for ns, _ in accounts:
                    if ns not in quotas:
                        problems.append(f"rule {i} lets {ns}/{[a[1] for a in accounts]} create SandboxClaims "
                                        f"with no ResourceQuota on {SANDBOX_CLAIMS_QUOTA} in {ns!r}")
        report.fail(what, "; ".join(problems)) if problems else report.ok(what)
