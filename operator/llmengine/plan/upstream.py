"""TensorRT-LLM's own contract, as data: the options each entry point we drive defines, read off NVIDIA's public
1.x sources (repository, path and commit recorded per table), and checks of what we emit against them.

The tables live in ``llmengine/data/trtllm/*.json``; docs/trtllm-contract.md says where each came from. They hold
facts (names, types, choices, defaults), no upstream code. A flag, key or value missing from a table is one we
must not emit: the checks below report it, and the contract test runs them over every spec the planner accepts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DATA_PACKAGE = "llmengine.data"
DATA_DIR = "trtllm"


class UpstreamSource(BaseModel):
    """Where a table was read. `commit` is None only where the search index holds the text without its commit
    (`stored_id` then names the stored text and `note` bounds it by neighbouring commits)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    repository: str
    path: str
    commit: str | None = Field(pattern=r"^[0-9a-f]{40}$")
    stored_id: str | None = Field(default=None, alias="storedId")
    note: str = ""


class UpstreamOption(BaseModel):
    """One option as upstream defines it. `type` is int, float, str, bool, path, choice, switch (a flag without a
    value), dict, list or enum; `choices` lists the accepted spellings where upstream restricts them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    type: str
    aliases: list[str] = Field(default_factory=list)
    choices: list[Any] | None = None
    nullable: bool = False
    default: Any = None
    required: bool = False
    # extra_llm_api_options keys: shared, tensorrt-only or pytorch-only (rejected with the tensorrt backend).
    scope: str = ""
    line: int | None = None
    source: str | None = None
    notes: str = ""


class UpstreamTable(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    entry_point: str = Field(alias="entryPoint")
    kind: str
    sources: list[UpstreamSource]
    positionals: list[str] = Field(default_factory=list)
    options: list[UpstreamOption]

    def option(self, name: str) -> UpstreamOption | None:
        return next((o for o in self.options if o.name == name or name in o.aliases), None)


@cache
def tables() -> dict[str, UpstreamTable]:
    """Every table, by entry point name (trtllm-build, BuildConfig, PluginConfig, QuantConfig, trtllm-serve, ...)."""
    out: dict[str, UpstreamTable] = {}
    root = resources.files(DATA_PACKAGE).joinpath(DATA_DIR)
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        doc = json.loads(entry.read_text(encoding="utf-8"))
        for raw in doc["entryPoints"]:
            table = UpstreamTable.model_validate(raw)
            if table.entry_point in out:
                raise ValueError(f"{entry.name}: entry point {table.entry_point} is defined twice")
            out[table.entry_point] = table
    return out


def table(entry_point: str) -> UpstreamTable:
    try:
        return tables()[entry_point]
    except KeyError:
        raise KeyError(f"no upstream table for {entry_point}: known {', '.join(sorted(tables()))}") from None


def _value_problem(entry_point: str, opt: UpstreamOption, value: Any) -> str | None:
    kind = opt.type
    if value is None:
        return None if opt.nullable or opt.default is None else f"{entry_point}: {opt.name} may not be null"
    if opt.choices and kind not in ("switch", "bool"):
        spelled = value.value if hasattr(value, "value") else value
        if spelled not in opt.choices:
            return f"{entry_point}: {opt.name} accepts {opt.choices}, got {value!r}"
        return None
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "path": lambda v: isinstance(v, str) and v != "",
        "dict": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
    }.get(kind)
    if ok is not None and not ok(value):
        return f"{entry_point}: {opt.name} is a {kind}, got {value!r}"
    return None


def check_options(entry_point: str, values: Mapping[str, Any]) -> list[str]:
    """Problems with keyword options (a config object's fields, a function's keyword arguments, a YAML file's
    keys) we hand upstream: unknown names and values of the wrong type or outside the choices."""
    t = table(entry_point)
    problems: list[str] = []
    for name, value in values.items():
        opt = t.option(name)
        if opt is None:
            problems.append(f"{entry_point}: {name} is not defined upstream")
            continue
        p = _value_problem(entry_point, opt, value)
        if p:
            problems.append(p)
    return problems


def _parse_cli_value(opt: UpstreamOption, raw: str) -> Any:
    kind = opt.type
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        return raw
    return raw


def check_argv(entry_point: str, args: list[str]) -> list[str]:
    """Problems with a command line (arguments after the program) for a click/argparse entry point: unknown flags,
    a flag given twice, missing or mistyped values, stray or missing positionals."""
    t = table(entry_point)
    problems: list[str] = []
    seen: set[str] = set()
    positionals = 0
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-"):
            positionals += 1
            if positionals > len(t.positionals):
                problems.append(f"{entry_point}: unexpected positional argument {a!r}")
            i += 1
            continue
        opt = t.option(a)
        if opt is None:
            problems.append(f"{entry_point}: {a} is not defined upstream")
            i += 1
            continue
        if opt.name in seen:
            problems.append(f"{entry_point}: {a} given twice")
        seen.add(opt.name)
        if opt.type == "switch":
            i += 1
            continue
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            problems.append(f"{entry_point}: {a} needs a value")
            i += 1
            continue
        p = _value_problem(entry_point, opt, _parse_cli_value(opt, args[i + 1]))
        if p:
            problems.append(p)
        i += 2
    required = [o.name for o in t.options if o.required and o.name not in seen]
    problems += [f"{entry_point}: required option {name} missing" for name in required]
    if positionals < len(t.positionals):
        problems.append(f"{entry_point}: missing positional argument {t.positionals[positionals]}")
    return problems
