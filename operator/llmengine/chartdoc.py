"""The chart's README.md, made from its commented values.yaml and its values.schema.json (`llmengine generate`).

values.yaml is written for this: a `# -- ` comment documents the key below it (continued by the `#` lines that
follow), a plain comment above a mapping introduces a group of keys, and a `# == ` line titles the top-level keys
from the next one on that belong to no group. Every value must be documented, itself or
through a documented parent (a free-form map such as `resources`), and declared in the schema: the generator refuses
a values.yaml where one is not, naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART_DIR = Path("charts/llmengine-operator")
README = CHART_DIR / "README.md"

_KEY = re.compile(r'^(?P<indent> *)(?P<key>"[^"]+"|[A-Za-z0-9_.-]+):(?: |$)')
_COMMENT = re.compile(r"^(?P<indent> *)#(?: (?P<text>.*))?$")


class ValuesDocError(ValueError):
    """values.yaml is not documented the way the README needs: a value without a comment, or not in the schema."""


@dataclass
class Key:
    path: tuple[str, ...]
    doc: str = ""  # from "# -- " comments: this key is a row of the values table
    group: str = ""  # from plain comments above it: this key starts a group of rows
    title: str = ""  # from a "# == " line above it: this key starts a titled run of top-level keys


@dataclass
class _Pending:
    doc: list[str] = field(default_factory=list)
    group: list[str] = field(default_factory=list)
    title: str = ""
    in_doc: bool = False


def parse(text: str) -> list[Key]:
    """The keys of values.yaml in order, each with its `# --` documentation and its group comment."""
    keys: list[Key] = []
    stack: list[tuple[int, str]] = []
    pending = _Pending()
    for line in text.splitlines():
        if not line.strip():
            pending = _Pending()  # a blank line ends a comment that belonged to nothing
            continue
        if m := _COMMENT.match(line):
            body = m.group("text") or ""
            if body.startswith("== "):
                pending.title = body[3:].strip()
            elif body.startswith("-- "):
                pending.doc, pending.in_doc = [body[3:]], True
            elif pending.in_doc:
                pending.doc.append(body)
            else:
                pending.group.append(body)
            continue
        m = _KEY.match(line)
        if m is None:
            continue  # a list item or a continuation: part of the value above
        indent, key = len(m.group("indent")), m.group("key").strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = tuple(k for _, k in stack)
        keys.append(Key(path, " ".join(pending.doc).strip(), " ".join(pending.group).strip(), pending.title))
        pending = _Pending()
    return keys


def _get(values: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        values = values[p]
    return values


def _leaves(values: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(values, Mapping) and values:
        for k, v in values.items():
            yield from _leaves(v, (*path, str(k)))
    else:
        yield path


def _schema_node(schema: Mapping[str, Any], path: tuple[str, ...]) -> Mapping[str, Any] | None:
    node: Mapping[str, Any] | None = schema
    for p in path:
        if node is None:
            return None
        props = node.get("properties") or {}
        if p in props:
            node = props[p]
        elif isinstance(node.get("additionalProperties"), Mapping):
            node = node["additionalProperties"]
        else:
            return None
    return node


def _type(node: Mapping[str, Any]) -> str:
    if "type" in node:
        t = node["type"]
        return " or ".join(t) if isinstance(t, list) else str(t)
    alternatives = node.get("oneOf") or node.get("anyOf") or []
    types = [_type(a) for a in alternatives]
    return " or ".join(dict.fromkeys(t for t in types if t)) or "any"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
    return f"`{_cell(text)}`"


def check(keys: list[Key], values: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Every value documented (itself or through a documented parent) and every documented key in the schema."""
    documented = {k.path for k in keys if k.doc}
    undocumented = [
        ".".join(leaf) for leaf in _leaves(values) if not any(leaf[:n] in documented for n in range(1, len(leaf) + 1))
    ]
    if undocumented:
        raise ValuesDocError("values without a '# -- ' comment (on them or a parent): " + ", ".join(undocumented))
    undeclared = [".".join(p) for p in sorted(documented) if _schema_node(schema, p) is None]
    if undeclared:
        raise ValuesDocError("values not declared in values.schema.json: " + ", ".join(undeclared))


def _sections(keys: list[Key]) -> list[tuple[str, str, list[Key]]]:
    """The documented keys cut into titled tables: one per group comment (the keys under it), and one per run of
    keys outside any group, titled by its `# == ` line or else by its keys' names."""
    sections: list[tuple[str | tuple[str, ...] | None, str, list[Key]]] = []
    for key in keys:
        under = sections[-1][0] if sections else None
        if key.group:
            sections.append((key.path, key.group, []))
        elif key.title:
            sections.append((key.title, "", []))
        elif not sections or (isinstance(under, tuple) and key.path[: len(under)] != under):
            sections.append((None, "", []))
        if key.doc:
            sections[-1][2].append(key)
    out = []
    for head, group, rows in sections:
        if not rows:
            continue
        if isinstance(head, tuple):
            title = ("###" if len(head) == 1 else "####") + f" `{'.'.join(head)}`"
        elif head:
            title = f"### {head}"
        else:
            title = "### " + ", ".join(dict.fromkeys(f"`{k.path[0]}`" for k in rows))
        out.append((title, group, rows))
    return out


def render(values_text: str, schema: Mapping[str, Any], chart: Mapping[str, Any]) -> str:
    keys = parse(values_text)
    values = yaml.safe_load(values_text)
    check(keys, values, schema)
    out = [
        "<!-- Generated by `llmengine generate` from values.yaml and values.schema.json. Do not edit. -->",
        f"# {chart['name']}",
        "",
        f"{chart['description']} Chart {chart['version']}, operator {chart['appVersion']}.",
        "",
        "```sh",
        f"helm install {chart['name']} charts/{chart['name']} -n llmengine-system --create-namespace -f values.yaml",
        f"kubectl -n llmengine-system rollout status deploy/{chart['name']}",
        f"helm test {chart['name']} -n llmengine-system",
        "```",
        "",
        "Installing and upgrading on a real cluster: [docs/install.md](../../docs/install.md). Argo CD and Flux: "
        "[docs/gitops.md](../../docs/gitops.md). Every value below is typed in `values.schema.json`: Helm refuses "
        "unknown or mistyped values.",
        "",
        "## Values",
    ]
    for heading, group, rows in _sections(keys):
        out += ["", heading]
        if group:
            out += ["", group]
        out += ["", "| Key | Type | Default | Description |", "|---|---|---|---|"]
        for key in rows:
            node = _schema_node(schema, key.path) or {}
            name = ".".join(f'"{p}"' if "." in p else p for p in key.path)
            out.append(f"| `{name}` | {_type(node)} | {_default(_get(values, key.path))} | {_cell(key.doc)} |")
    return "\n".join(out) + "\n"


def outputs(root: Path) -> dict[Path, str]:
    chart_dir = root / CHART_DIR
    text = render(
        (chart_dir / "values.yaml").read_text(),
        json.loads((chart_dir / "values.schema.json").read_text()),
        yaml.safe_load((chart_dir / "Chart.yaml").read_text()),
    )
    return {root / README: text}
