"""Loading rendered manifests and validating them strictly: built-in kinds against the
Kubernetes OpenAPI schemas (kubernetes-validate), custom resources against CRD schemas, and
object names/labels against the API server's syntax rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.34.0"
RBAC_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class Report:
    """Collects check outcomes; prints one line per check unless quiet."""

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


