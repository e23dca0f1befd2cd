"""What the install pages tell a platform engineer to type exists.

Every chart value they name resolves in values.schema.json, which is what Helm checks values against (and which
test_chartdoc keeps in step with values.yaml): the `--set`, `--set-json` and `--set-string` keys of each command that
installs, upgrades or renders this chart, every values file they show (a YAML block opening with a `# values….yaml`
or `# chart values` comment), the values of the Argo CD Application and Flux HelmRelease in gitops.md, and the names
in install.md's tables of values. Every `-f FILE` of those commands is a values file one of the pages shows. Every
LLMEngine they show, and every fragment of a spec (a block opening with `# spec`), plans valid. A YAML block that
looks like chart values but is not marked as either fails, so that no values block goes unchecked.

And the upgrade check in upgrade.md compares like with like: `llmengine plan` on the live objects gives the digest
the running operator wrote when nothing changes, and a different one exactly when the builder image does.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmengine import plan_cli
from llmengine.api.artifacts import StoreLocation
from llmengine.api.config import ImageCatalog, ImagePair
from llmengine.api.v1alpha1 import LLMEngineStatus, parse_engine
from llmengine.plan import plan_object
from llmengine.plan.envelope import shape_floor

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "llmengine-operator"
PAGES = [
    "README.md",
    "docs/install.md",
    "docs/airgap.md",
    "docs/multitenancy.md",
    "docs/sizing.md",
    "docs/upgrade.md",
    "docs/gitops.md",
]
VALUES_MARK = re.compile(r"^#\s*(values[\w.-]*\.ya?ml|chart values)\b")
SPEC_MARK = re.compile(r"^#\s*spec\b")
HELM_VERBS = {"install", "upgrade", "template"}
CHART_REF = "charts/llmengine-operator"
DEFAULT_STORE = StoreLocation(bucket="operator-default")


def _schema() -> dict[str, Any]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert isinstance(schema, dict)
    return schema


def _defaults() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(values, dict)
    return values


# ---------------------------------------------------------------------------------------------------------------
# reading the pages


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def first_comment(self) -> str:
        for line in self.body.splitlines():
            if line.strip():
                return line.strip()
        return ""


def fenced_blocks(page: str, text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        blocks.append(Block(page, start + 1, lang, "\n".join(body)))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^\s*```\w*\s*$.*?^\s*```\s*$", "", text, flags=re.S | re.M)


def shell_commands(body: str) -> Iterator[list[str]]:
    """The commands of a shell block as argument lists: continuation lines joined, quotes spanning lines kept."""
    pending = ""
    for line in body.splitlines():
        pending += line + "\n"
        stripped = pending.rstrip()
        if stripped.endswith("\\"):
            pending = stripped[:-1] + " "
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        pending = ""
        if words:
            yield words


def is_chart_command(words: list[str]) -> bool:
    return len(words) > 2 and words[0] == "helm" and words[1] in HELM_VERBS and CHART_REF in words


def set_flags(words: list[str]) -> Iterator[tuple[str, str]]:
    """(flag, argument) of every --set, --set-json and --set-string, in both spellings."""
    for i, word in enumerate(words):
        for flag in ("--set", "--set-json", "--set-string"):
            if word == flag and i + 1 < len(words):
                yield flag, words[i + 1]
            elif word.startswith(flag + "="):
                yield flag, word[len(flag) + 1 :]


def _helm_scalar(text: str) -> Any:
    """A --set value as Helm types it: true/false, an integer, null, else a string."""
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    return text


def _nest(path: str, value: Any) -> dict[str, Any]:
    keys = [re.sub(r"\[\d+\]$", "", k).replace("\\.", ".") for k in re.split(r"(?<!\\)\.", path)]
    out: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        out = {key: out}
    return out


def set_values(flag: str, argument: str) -> list[dict[str, Any]]:
    """The values one flag sets, each as a nested mapping."""
    if flag == "--set-json":
        path, _, raw = argument.partition("=")
        return [_nest(path, json.loads(raw))]
    out = []
    for item in re.split(r"(?<!\\),", argument):
        path, _, raw = item.partition("=")
        out.append(_nest(path, raw if flag == "--set-string" else _helm_scalar(raw)))
    return out


def _load_yaml(block: Block) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(block.body) if d is not None]
    except yaml.YAMLError:
        return []


# ---------------------------------------------------------------------------------------------------------------
# checking values against the schema


def _deref(node: Mapping[str, Any], schema: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in node:
        ref = str(node["$ref"])
        assert ref.startswith("#/definitions/"), ref
        node = schema["definitions"][ref.rsplit("/", 1)[1]]
    return node


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _type_ok(value: Any, node: Mapping[str, Any]) -> bool:
    wanted = node.get("type")
    if wanted is None:
        return True
    names = wanted if isinstance(wanted, list) else [wanted]
    if value is None:
        return "null" in names
    if isinstance(value, bool):
        return "boolean" in names
    return any(isinstance(value, _JSON_TYPES.get(n, ())) for n in names)


def problems(value: Any, node: Mapping[str, Any], schema: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[str]:
    """What Helm's schema check would refuse in `value`: unknown keys and wrong types, by path."""
    node = _deref(node, schema)
    alternatives = node.get("oneOf") or node.get("anyOf")
    if alternatives:
        found = [problems(value, alt, schema, path) for alt in alternatives]
        return min(found, key=len)
    here = ".".join(path) or "(root)"
    if value is None:  # Helm drops a key set to null before it validates
        return []
    if not _type_ok(value, node):
        return [f"{here}: {type(value).__name__} where the schema wants {node.get('type')}"]
    out: list[str] = []
    if isinstance(value, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties", True)
        for key, item in value.items():
            sub = (*path, str(key))
            if key in props:
                out += problems(item, props[key], schema, sub)
            elif isinstance(extra, Mapping):
                out += problems(item, extra, schema, sub)
            elif extra is False:
                out.append(f"{'.'.join(sub)}: not a value of the chart")
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for i, item in enumerate(value):
            out += problems(item, node["items"], schema, (*path, f"[{i}]"))
    return out


def declared(path: list[str], schema: Mapping[str, Any]) -> bool:
    """A dotted value name (`store.bucket`, `enginePods.*`) is one the schema declares."""
    node: Mapping[str, Any] = schema
    for key in path:
        if key == "*":
            return True
        node = _deref(node, schema)
        props = node.get("properties") or {}
        extra = node.get("additionalProperties", True)
        if key in props:
            node = props[key]
        elif isinstance(extra, Mapping):
            node = extra
        else:
            return False
    return True


def test_the_checker_refuses_what_helm_would() -> None:
    schema = _schema()
    assert problems({"store": {"bucket": "b", "credentialsSecret": "s"}}, schema, schema) == []
    assert problems({"store": {"buckets": "b"}}, schema, schema) == ["store.buckets: not a value of the chart"]
    assert problems({"enginePods": {"imagePullSecrets": [{"nam": "x"}]}}, schema, schema)
    assert problems({"build": {"maxAttempts": "five"}}, schema, schema)
    assert problems({"images": {"trtllm": {"1.2.1": None}}}, schema, schema) == []  # a removal
    assert problems({"resources": {"requests": {"cpu": "500m"}}}, schema, schema) == []
    assert declared(["webhook", "certificate", "source"], schema)
    assert not declared(["webhook", "certificate", "sauce"], schema)


def test_set_flags_are_read_as_helm_reads_them() -> None:
    body = """helm install x charts/llmengine-operator -n ns \\
  --set store.bucket=b,crds.install=false --set=replicaCount=2 \\
  --set-json 'images.trtllm={"1.2.1": {"builder": "r/b:1",
                              "server": "r/s:1"}}'
helm install gpu-operator nvidia/gpu-operator --set mig.strategy=mixed"""
    commands = list(shell_commands(body))
    assert [is_chart_command(c) for c in commands] == [True, False]
    found = [v for f, a in set_flags(commands[0]) for v in set_values(f, a)]
    assert found == [
        {"store": {"bucket": "b"}},
        {"crds": {"install": False}},
        {"replicaCount": 2},
        {"images": {"trtllm": {"1.2.1": {"builder": "r/b:1", "server": "r/s:1"}}}},
    ]


# ---------------------------------------------------------------------------------------------------------------
# the pages


def _pages() -> dict[str, str]:
    return {p: (ROOT / p).read_text() for p in PAGES}


def _helm_commands() -> Iterator[tuple[str, list[str]]]:
    for page, text in _pages().items():
        for block in fenced_blocks(page, text):
            if block.lang in ("sh", "bash", "shell", "console", ""):
                for words in shell_commands(block.body):
                    if is_chart_command(words):
                        yield block.where, words


def _inline_sets() -> Iterator[tuple[str, list[str]]]:
    for page, text in _pages().items():
        for span in re.findall(r"`([^`\n]*--set[^`\n]*)`", prose(text)):
            yield page, shlex.split(span)


def _values_blocks() -> Iterator[tuple[str, Any]]:
    for page, text in _pages().items():
        for block in fenced_blocks(page, text):
            if block.lang == "yaml" and VALUES_MARK.match(block.first_comment):
                docs = _load_yaml(block)
                assert len(docs) == 1 and isinstance(docs[0], dict), f"{block.where}: values that do not parse"
                yield block.where, docs[0]


def _gitops_values() -> Iterator[tuple[str, Any]]:
    text = _pages()["docs/gitops.md"]
    for block in fenced_blocks("docs/gitops.md", text):
        if block.lang != "yaml":
            continue
        for doc in _load_yaml(block):
            if not isinstance(doc, dict):
                continue
            spec = doc.get("spec") or {}
            if doc.get("kind") == "Application" and CHART_REF in str((spec.get("source") or {}).get("path")):
                yield block.where, spec["source"]["helm"]["valuesObject"]
            if doc.get("kind") == "HelmRelease" and "llmengine-operator" in str(spec.get("chart")):
                yield block.where, spec["values"]


def test_the_pages_show_chart_values_in_every_form_checked() -> None:
    """The extraction finds what it is meant to: a guard against a silently empty check."""
    assert any("docs/install.md" in w for w, _ in _helm_commands())
    assert any("README.md" in w for w, _ in _helm_commands())
    assert {w.split(":")[0] for w, _ in _values_blocks()} >= {"docs/install.md", "docs/airgap.md", "docs/sizing.md"}
    assert len(list(_gitops_values())) == 2
    assert list(_inline_sets())


def test_every_set_flag_names_a_chart_value() -> None:
    schema = _schema()
    commands = [*_helm_commands(), *_inline_sets()]
    found = [(where, v) for where, words in commands for f, a in set_flags(words) for v in set_values(f, a)]
    assert found
    wrong = [f"{where}: {p}" for where, v in found for p in problems(v, schema, schema)]
    assert not wrong, "\n".join(wrong)


def test_every_values_file_holds_chart_values_only() -> None:
    schema, defaults = _schema(), _defaults()
    shown = [*_values_blocks(), *_gitops_values()]
    wrong = [f"{where}: {p}" for where, v in shown for p in problems(v, schema, schema)]
    wrong += [f"{where}: {k} is not in values.yaml" for where, v in shown for k in v if k not in defaults]
    assert not wrong, "\n".join(wrong)


def test_every_values_file_a_command_reads_is_shown() -> None:
    shown: set[str] = set()
    for page, text in _pages().items():
        for block in fenced_blocks(page, text):
            m = VALUES_MARK.match(block.first_comment) if block.lang == "yaml" else None
            if m and m.group(1).endswith((".yaml", ".yml")):
                shown.add(m.group(1))
    read = {
        (where, words[i + 1])
        for where, words in _helm_commands()
        for i, w in enumerate(words)
        if w in ("-f", "--values") and i + 1 < len(words)
    }
    assert read
    missing = sorted(f"{where}: -f {name}" for where, name in read if name not in shown)
    assert not missing, "values files no page shows:\n" + "\n".join(missing)


def test_no_values_block_goes_unmarked() -> None:
    top = set(_defaults())
    unmarked = []
    for page, text in _pages().items():
        for block in fenced_blocks(page, text):
            if block.lang != "yaml" or VALUES_MARK.match(block.first_comment) or SPEC_MARK.match(block.first_comment):
                continue
            for doc in _load_yaml(block):
                if isinstance(doc, dict) and "apiVersion" not in doc and set(doc) & top:
                    unmarked.append(f"{block.where}: {sorted(set(doc) & top)}")
    assert not unmarked, (
        "YAML blocks with chart value keys: open them with '# chart values' (or '# values-NAME.yaml') to have them "
        "checked, or '# spec ...' when they are part of an LLMEngine spec:\n" + "\n".join(unmarked)
    )


def test_every_value_named_in_install_md_tables_is_declared() -> None:
    schema = _schema()
    text = (ROOT / "docs/install.md").read_text()
    names: list[tuple[int, list[str]]] = []
    in_values_table = False
    for n, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            in_values_table = False
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "value":
            in_values_table = True
            continue
        if not in_values_table or set(cells[0]) <= {"-", ":", " "}:
            continue
        previous: list[str] = []
        for name in re.findall(r"`([A-Za-z][\w.*]*)`", cells[0]):
            path = name.split(".")
            if len(path) == 1 and previous and not declared(path, schema):
                path = [*previous[:-1], name]  # `store.bucket` / `prefix`: a sibling of the name before
            names.append((n, path))
            previous = path
    assert len(names) > 20
    wrong = [f"docs/install.md:{n}: {'.'.join(p)}" for n, p in names if not declared(p, schema)]
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------------------
# LLMEngines on the pages

MINIMAL_SPEC: dict[str, Any] = {
    "model": {"source": {"huggingFace": {"repo": "org/model", "revision": "0123abc"}}, "catalog": "llama-3.1-8b"},
    "target": {"gpu": "H100-80GB"},
}


def _engines() -> Iterator[tuple[str, dict[str, Any]]]:
    for page, text in _pages().items():
        for block in fenced_blocks(page, text):
            if block.lang != "yaml":
                continue
            if SPEC_MARK.match(block.first_comment):
                for doc in _load_yaml(block):
                    spec = {**copy.deepcopy(MINIMAL_SPEC), **doc}
                    yield (
                        block.where,
                        {
                            "apiVersion": "llmengine.io/v1alpha1",
                            "kind": "LLMEngine",
                            "metadata": {"name": "fragment", "namespace": "docs"},
                            "spec": spec,
                        },
                    )
                continue
            for doc in _load_yaml(block):
                if isinstance(doc, dict) and doc.get("kind") == "LLMEngine":
                    yield block.where, doc


def test_every_llmengine_on_the_pages_plans_valid() -> None:
    engines = list(_engines())
    assert {w.split(":")[0] for w, _ in engines} >= {"README.md", "docs/airgap.md", "docs/multitenancy.md"}
    wrong = []
    for where, doc in engines:
        plan = plan_object(doc, default_store=DEFAULT_STORE)
        wrong += [f"{where}: {e}" for e in plan.errors]
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------------------
# upgrade.md: which engines will this upgrade rebuild?


def _catalog(builder: str, server: str) -> ImageCatalog:
    return ImageCatalog(default_version="1.2.1", versions={"1.2.1": ImagePair(builder=builder, server=server)})


def _live(images: ImageCatalog) -> dict[str, Any]:
    """Live objects as `kubectl get llme -A -o yaml` lists them, with the digest the operator wrote."""
    auto = {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {"name": "auto", "namespace": "team-b"},
        "spec": {
            **copy.deepcopy(MINIMAL_SPEC),
            "build": {"maxInputLen": 512, "maxSeqLen": 1024},
            "rebuildPolicy": {"mode": "Auto"},
        },
        "status": {"envelope": {"autoShapes": {"maxInputLen": 1280, "maxSeqLen": 1792}}},
    }
    plain = yaml.safe_load((ROOT / "examples" / "llama3.1-8b-fp8-h100.yaml").read_text())
    plain["metadata"]["namespace"] = "team-a"
    items = [plain, auto]
    for item in items:
        spec = parse_engine(item).spec
        status = LLMEngineStatus.model_validate(item.get("status") or {})
        floor = shape_floor(spec, status)
        digest = plan_object(item, default_store=DEFAULT_STORE, images=images, shape_floor=floor).engine_digest
        item.setdefault("status", {})["desiredEngine"] = {"digest": digest, "short": digest[:12]}
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _after(tmp_path: Path, live: dict[str, Any], builder: str, server: str) -> dict[str, str]:
    (tmp_path / "live.yaml").write_text(yaml.safe_dump(live))
    values = {"images": {"trtllm": {"1.2.1": {"builder": builder, "server": server}}}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    out = io.StringIO()
    rc = plan_cli.main(
        ["-f", str(tmp_path / "live.yaml"), "--chart-values", str(tmp_path / "values.yaml"), "-o", "json"], out
    )
    assert rc == 0
    return {f"{e['namespace']}/{e['name']}": e["engineDigest"] for e in json.loads(out.getvalue())}


@pytest.mark.parametrize(
    ("builder", "server", "rebuilt"),
    [
        ("reg/builder:1", "reg/server:1", set()),
        ("reg/builder:1", "reg/server:2", set()),  # a new server image rolls pods out, rebuilds nothing
        ("reg/builder:2", "reg/server:1", {"team-a/llama31-8b-fp8", "team-b/auto"}),
    ],
)
def test_the_upgrade_check_finds_exactly_the_engines_a_new_builder_rebuilds(
    tmp_path: Path, builder: str, server: str, rebuilt: set[str]
) -> None:
    live = _live(_catalog("reg/builder:1", "reg/server:1"))
    before = {
        f"{i['metadata']['namespace']}/{i['metadata']['name']}": i["status"]["desiredEngine"]["digest"]
        for i in live["items"]
    }
    after = _after(tmp_path, live, builder, server)
    assert set(after) == set(before)
    assert {k for k in before if before[k] != after[k]} == rebuilt
