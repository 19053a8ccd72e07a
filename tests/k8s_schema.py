"""The Kubeflow CRDs' OpenAPI schemas, cut down to what launch/k8s/ uses, and a small validator
for them (jsonschema is not in the venv; this covers what the CRDs' structural schemas use).

The excerpts in tests/k8s_schemas/ were made with
`python -m tests.k8s_schema CRD.yaml launch/k8s/MANIFEST.yaml OUT.json "SOURCE"` from the CRDs
named in each file's `source`. Cut: every `description` and CEL rule, and the schema of each
field that our manifests do not set (its name stays: a field that the CRD does not have is
still an error, as under `kubectl apply --validate=strict`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

KEEP = ("type", "required", "enum", "minimum", "maximum", "maxLength", "minLength", "format",
        "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "anyOf")


def merged(values: list[Any]) -> Any:
    """The union of several list items' fields, for cutting the schema of their items."""
    dicts = [v for v in values if isinstance(v, dict)]
    if not dicts:
        return values[0] if values else None
    return {key: merged([d[key] for d in dicts if key in d]) for d in dicts for key in d}


def cut(schema: dict, used: Any) -> dict:
    """`schema` with only what `used` (a manifest's value at this place) needs."""
    out = {key: schema[key] for key in KEEP if key in schema}
    if "properties" in schema:
        fields = used if isinstance(used, dict) else {}
        out["properties"] = {name: cut(sub, fields[name]) if name in fields else {}
                             for name, sub in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        values = list(used.values()) if isinstance(used, dict) else []
        out["additionalProperties"] = cut(schema["additionalProperties"], merged(values))
    if "items" in schema:
        out["items"] = cut(schema["items"], merged(used if isinstance(used, list) else []))
    return out


def validate(schema: dict, value: Any, where: str = "") -> list[str]:
    """The places where `value` breaks `schema` (empty: it matches)."""
    if not schema:  # a field our manifests do not set: its schema was cut
        return []
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, int | str) else [f"{where}: not an int or a string"]
    wrong = _type_error(schema.get("type"), value)
    if wrong:
        return [f"{where}: {wrong}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    if "minimum" in schema and value < schema["minimum"]:
        return [f"{where}: {value} is below {schema['minimum']}"]
    if isinstance(value, list):
        return [e for i, item in enumerate(value)
                for e in validate(schema.get("items", {}), item, f"{where}[{i}]")]
    if not isinstance(value, dict):
        return []
    errors = [f"{where}.{name}: required" for name in schema.get("required", [])
              if name not in value]
    known = schema.get("properties")
    for name, item in value.items():
        if known is not None and name in known:
            errors += validate(known[name], item, f"{where}.{name}")
        elif isinstance(schema.get("additionalProperties"), dict):
            errors += validate(schema["additionalProperties"], item, f"{where}.{name}")
        elif known is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            errors.append(f"{where}.{name}: unknown field")
    return errors


def _type_error(kind: str | None, value: Any) -> str:
    python = {"object": dict, "array": list, "string": str, "boolean": bool,
              "integer": int, "number": int | float}.get(kind or "")
    if python is None:
        return ""
    if isinstance(value, bool) and kind in ("integer", "number"):
        return f"{value!r} is not an {kind}"
    return "" if isinstance(value, python) else f"{value!r} is not of type {kind}"


def crd_schema(crd: dict, version: str) -> dict:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(version)


def main(crd_path: str, manifest_path: str, out_path: str, source: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    manifest = yaml.safe_load(Path(manifest_path).read_text())
    version = manifest["apiVersion"].split("/")[1]
    excerpt = {"source": source, "group": crd["spec"]["group"], "version": version,
               "kind": crd["spec"]["names"]["kind"],
               "schema": cut(crd_schema(crd, version), manifest)}
    Path(out_path).write_text(json.dumps(excerpt, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:5])
