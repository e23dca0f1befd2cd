"""`llmengine plan`: validate LLMEngine manifests offline and say what applying them would do.

Exit status: 0 when every LLMEngine is valid, 1 when any is invalid, 2 when input cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from llmengine import GROUP, KIND, PLURAL, VERSION
from llmengine.api.artifacts import StoreLocation, first_problem
from llmengine.api.config import DEFAULT_TRTLLM_VERSION, ImageCatalog
from llmengine.api.v1alpha1 import FieldError, InvalidEngine, LLMEngine, LLMEngineStatus, parse_engine
from llmengine.plan import envelope
from llmengine.plan.gpus import GIB
from llmengine.plan.identity import shapes_dict
from llmengine.plan.planner import COMPILERS, Plan, compare, differences, invalid_plan, make_plan

# Stands in for the operator's default store when a manifest has no spec.store: the store never changes the
# engine identity, so an offline plan only needs to know that one will exist.
OPERATOR_DEFAULT_STORE = StoreLocation(bucket="operator-default-store")


class InputError(Exception):
    """A file or cluster that cannot be read."""


@dataclass(frozen=True)
class Entry:
    """One LLMEngine document: its identity in the cluster, the parsed engine (if it parsed) and its plan."""

    namespace: str
    name: str
    source: str
    engine: LLMEngine | None
    plan: Plan
    status: dict[str, Any] | None = None  # a live object's status (read from the cluster)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name


# ---------------------------------------------------------------------------------------------------------------
# reading


def _documents(text: str, source: str) -> Iterator[Any]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML: {exc}") from None
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            yield from doc["items"]
        elif doc is not None:
            yield doc


def _is_engine(doc: Any) -> bool:
    """An LLMEngine document, whatever its apiVersion says (a mistyped group is reported, not skipped)."""
    return isinstance(doc, dict) and doc.get("kind") == KIND


def _wrong_api_version(doc: dict[str, Any]) -> FieldError | None:
    api_version = str(doc.get("apiVersion") or "")
    if api_version in ("", f"{GROUP}/{VERSION}"):
        return None
    return FieldError(
        "apiVersion",
        f"{api_version!r} is not {GROUP}/{VERSION}: the API server would refuse this document (no such kind in "
        "that group); fix apiVersion",
    )


def auto_floor(engine: LLMEngine | None, status: Mapping[str, Any] | None) -> dict[str, int] | None:
    """Shapes a live object's rebuildPolicy Auto raised (status.envelope.autoShapes): part of its identity."""
    if engine is None or not status:
        return None
    try:
        parsed = LLMEngineStatus.model_validate(dict(status))
    except ValueError:  # a status we can not read raised nothing we can use
        return None
    return envelope.shape_floor(engine.spec, parsed)


def _entry(
    doc: dict[str, Any],
    source: str,
    plan_kwargs: dict[str, Any],
    live_status: Mapping[str, Any] | None = None,
    namespace: str = "default",
) -> Entry:
    md = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(md, dict)
    namespace, name = str(md.get("namespace") or namespace), str(md.get("name") or "")
    status = doc.get("status") if isinstance(doc.get("status"), dict) else None
    wrong = _wrong_api_version(doc)
    if wrong is not None:
        return Entry(namespace, name, source, None, invalid_plan([wrong]), status)
    try:
        engine: LLMEngine | None = parse_engine(doc)
    except InvalidEngine as exc:
        return Entry(namespace, name, source, None, invalid_plan(exc.errors), status)
    assert engine is not None
    floor = auto_floor(engine, status if live_status is None else live_status)
    return Entry(namespace, name, source, engine, make_plan(engine, **plan_kwargs, shape_floor=floor), status)


def _replan(entry: Entry, live: Entry, plan_kwargs: dict[str, Any]) -> Entry:
    floor = auto_floor(entry.engine, live.status)
    if entry.engine is None or floor is None:
        return entry
    return Entry(
        entry.namespace,
        entry.name,
        entry.source,
        entry.engine,
        make_plan(entry.engine, **plan_kwargs, shape_floor=floor),
    )


MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def manifest_paths(path: str, recursive: bool) -> list[str]:
    """A file as given; a directory's manifests (*.yaml, *.yml, *.json), its subdirectories too with -R."""
    if path == "-" or not os.path.isdir(path):
        return [path]
    root = Path(path)
    found = root.rglob("*") if recursive else root.glob("*")
    return sorted(str(p) for p in found if p.is_file() and p.suffix in MANIFEST_SUFFIXES)


def read_file(
    path: str, plan_kwargs: dict[str, Any], stdin: TextIO | None = None, namespace: str = "default"
) -> list[Entry]:
    try:
        if path == "-":
            text = (stdin or sys.stdin).read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    return [_entry(doc, path, plan_kwargs, namespace=namespace) for doc in _documents(text, path) if _is_engine(doc)]


def read_cluster(context: str | None, plan_kwargs: dict[str, Any], kubeconfig: str | None = None) -> list[Entry]:
    """Live LLMEngines of every namespace, through the kubeconfig (--kubeconfig or KUBECONFIG, optional context)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise InputError(
            "--against cluster reads live LLMEngines through the kubernetes client library: "
            "pip install 'llmengine-operator[cluster]'"
        ) from None
    try:
        load_kube_config: Any = config.load_kube_config  # untyped in the client library
        load_kube_config(config_file=kubeconfig, context=context)
        listing = client.CustomObjectsApi().list_cluster_custom_object(GROUP, VERSION, PLURAL)
    except Exception as exc:  # no kubeconfig, unreachable server, missing CRD: all mean "cannot read"
        raise InputError(f"cluster{':' + context if context else ''}: {exc}") from None
    items = listing.get("items", []) if isinstance(listing, dict) else []
    return [_entry(doc, "cluster", plan_kwargs) for doc in items if isinstance(doc, dict)]


# ---------------------------------------------------------------------------------------------------------------
# output


def _gib(value: int) -> str:
    return f"{value / GIB:.1f}"


def _observed(live: Entry | None) -> dict[str, Any]:
    """A running resource's observed traffic next to its built envelope (status.traffic, status.envelope)."""
    st = live.status if live is not None else None
    if not st or not (st.get("traffic") or st.get("envelope")):
        return {}
    cond = next((c for c in st.get("conditions") or [] if c.get("type") == "EnvelopeExceeded"), None)
    return {"traffic": st.get("traffic"), "envelope": st.get("envelope"), "condition": cond}


def _observed_text(obs: Mapping[str, Any]) -> list[str]:
    t, env = obs.get("traffic") or {}, obs.get("envelope") or {}

    def st(key: str) -> str:
        d = t.get(key) or {}
        return "/".join(str(d.get(k, "-")) for k in ("p50", "p99", "max"))

    lines = []
    if t:
        lines.append(
            f"  observed: {t.get('requests', 0)} requests over {t.get('windowSeconds', 0):g}s; prompt p50/p99/max "
            f"{st('inputTokens')} vs maxInputLen {env.get('maxInputLen', '-')}; output {st('outputTokens')}, "
            f"maxSeqLen {env.get('maxSeqLen', '-')}; in flight per pod {st('concurrency')} vs maxBatchSize "
            f"{env.get('maxBatchSize', '-')}; refused too long {t.get('rejectedTooLong', 0)}; queue p90 "
            f"{t.get('queueP90Seconds', '-')}s"
        )
    c = obs.get("condition")
    if c:
        lines.append(f"  envelope: EnvelopeExceeded={c.get('status')} ({c.get('reason')}): {c.get('message', '')}")
    rec = env.get("recommendation") or {}
    if rec.get("patch"):
        lines.append(f"  patch:    {rec['patch']}")
    if env.get("autoShapes"):
        lines.append(f"  auto:     {env['autoShapes']} (rebuildPolicy Auto, since {env.get('lastAutoRebuild', '-')})")
    return lines


def to_json(
    entry: Entry,
    action: str | None,
    with_action: bool,
    observed: dict[str, Any] | None = None,
    reasons: list[str] | None = None,
) -> dict[str, Any]:
    p = entry.plan
    m = p.memory
    out: dict[str, Any] = {
        "name": entry.name,
        "namespace": entry.namespace,
        "source": entry.source,
        "valid": p.valid,
        "errors": [{"field": e.field, "message": e.message} for e in p.errors],
        "warnings": list(p.warnings),
        "engineDigest": p.engine_digest,
        "shortDigest": p.short_digest,
        "build": shapes_dict(p.shapes),
        "shapesFromTraffic": p.shapes_from_traffic,
        "memory": {
            "requiredBytesPerGpu": m.required_bytes_per_gpu,
            "availableBytesPerGpu": m.available_bytes_per_gpu,
            "fits": m.fits,
            "weightsBytes": m.weights_bytes,
            "activationBytes": m.activation_bytes,
            "runtimeBytes": m.runtime_bytes,
            "minKvBytes": m.min_kv_bytes,
            "kvBytesPerToken": m.kv_bytes_per_token,
            "kvBytesPerTokenPerGpu": m.kv_bytes_per_token_per_gpu,
        },
        "gpu": {
            "class": p.gpu.name,
            "sm": p.gpu.sm,
            "migProfile": p.mig_profile,
            "resource": p.gpu_resource,
            "count": p.gpu_count,
        },
        "runtimeArgs": list(p.runtime_args),
        "engineInputs": p.engine_inputs,
    }
    if with_action:
        out["action"] = action
        out["because"] = list(reasons or [])
    if observed:
        out["observed"] = observed
    return out


def to_text(
    entry: Entry,
    action: str | None,
    with_action: bool,
    observed: dict[str, Any] | None = None,
    reasons: list[str] | None = None,
) -> str:
    p = entry.plan
    verdict = "valid" if p.valid else f"INVALID ({len(p.errors)} error{'s' if len(p.errors) != 1 else ''})"
    lines = [f"{entry.namespace}/{entry.name or '<no name>'} ({entry.source}): {verdict}"]
    if with_action:
        lines.append(f"  action:   {action or '-'}")
        lines += [f"  because:  {r}" for r in reasons or []]
    for e in p.errors:
        lines.append(f"  error:    {e.field}: {e.message}")
    for w in p.warnings:
        lines.append(f"  warning:  {w}")
    if p.engine_digest:
        lines.append(f"  engine:   {p.short_digest}  sha256:{p.engine_digest}")
    if p.gpu.name != "unknown":
        where = f"{p.gpu.name}/{p.mig_profile}" if p.mig_profile else f"{p.gpu.name} x{p.gpu_count}"
        lines.append(f"  gpu:      {where} (SM {p.gpu.sm}, {p.gpu_resource})")
    if p.shapes.max_seq_len:
        s = p.shapes
        origin = "derived from spec.traffic" if p.shapes_from_traffic else "from spec.build"
        lines.append(
            f"  shapes:   maxBatchSize={s.max_batch_size} maxInputLen={s.max_input_len} maxSeqLen={s.max_seq_len} "
            f"maxNumTokens={s.max_num_tokens} maxBeamWidth={s.max_beam_width} ({origin})"
        )
    m = p.memory
    if m.available_bytes_per_gpu:
        lines.append(
            f"  memory:   {_gib(m.required_bytes_per_gpu)} of {_gib(m.available_bytes_per_gpu)} GiB per GPU "
            f"({'fits' if m.fits else 'does NOT fit'}): weights {_gib(m.weights_bytes)}, activations "
            f"{_gib(m.activation_bytes)}, runtime {_gib(m.runtime_bytes)}, minimum KV {_gib(m.min_kv_bytes)} "
            f"at {m.kv_bytes_per_token_per_gpu} B/token/GPU ({m.kv_bytes_per_token} B/token whole model)"
        )
    if p.engine_inputs and p.engine is not None:
        inputs, ec = p.engine_inputs, p.engine
        q = ec.quantization
        lines.append(
            f"  identity: {inputs['backend']} {inputs['trtllmVersion']} {ec.dtype}/{q.quant_algo or 'no quant'}/"
            f"kv:{q.kv_cache_quant_algo or 'auto'} tp{ec.mapping.tp_size}pp{ec.mapping.pp_size} "
            f"{inputs['gpu']['class']} SM {inputs['gpu']['sm']} compiler {inputs['compiler']}"
        )
        if ec.build_config is not None:
            b, pl = ec.build_config, ec.build_config.plugin_config
            on = {True: "on", False: "off"}
            lines.append(
                f"  engine:   {b.kv_cache_type.lower()} KV cache, context FMHA {on[pl.context_fmha]}, paged context "
                f"FMHA {on[pl.use_paged_context_fmha]}, FP8 context FMHA {on[pl.use_fp8_context_fmha]}, "
                f"gemm plugin {pl.gemm_plugin or 'off'}, opt tokens {b.opt_num_tokens}"
            )
    lines += _observed_text(observed or {})
    return "\n".join(lines)


def reasons_for(entry: Entry, old: Entry | None) -> list[str]:
    """The settings behind a rebuild or rollout verdict, `path: old → new`."""
    if old is None or entry.engine is None or old.engine is None:
        return []
    return differences(old.plan, entry.plan, old.engine, entry.engine)


def action_for(entry: Entry, old: Entry | None) -> str | None:
    if old is None:
        return "create"
    if entry.engine is None:
        return None
    if old.engine is None:
        return "rebuild"
    return compare(old.plan, entry.plan, old.engine, entry.engine)


# ---------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmengine plan",
        description="Validate LLMEngine manifests offline and say what applying them would do.",
        epilog="Exit status: 0 all valid, 1 some invalid, 2 input unreadable.",
    )
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="manifest file or directory (repeatable; - = stdin)"
    )
    p.add_argument("-R", "--recursive", action="store_true", help="read the directories given with -f recursively")
    p.add_argument(
        "-n", "--namespace", default="default", help="namespace of manifests that name none (as kubectl apply -n)"
    )
    p.add_argument("--context", default=None, help="kubeconfig context for --against cluster")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file for --against cluster (default: KUBECONFIG)")
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    p.add_argument(
        "--against",
        metavar="FILE|cluster[:CONTEXT]",
        help="compare with the LLMEngines of another file or of the live cluster: rebuild, rollout, nothing, create",
    )
    p.add_argument("--compiler", choices=COMPILERS, default="tensorrt-llm")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node of the target pool")
    p.add_argument(
        "--chart-values",
        metavar="FILE",
        help="the operator's Helm values file: TensorRT-LLM releases and images as installed (images.trtllm, "
        "images.defaultTrtllmVersion); default: the chart's defaults",
    )
    p.add_argument(
        "--default-store",
        metavar="s3://BUCKET[/PREFIX]",
        help="the operator's default store, for manifests without spec.store",
    )
    return p


def _store_from_uri(uri: str) -> StoreLocation:
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise InputError(f"--default-store {uri!r}: expected s3://BUCKET[/PREFIX]")
    bucket, _, prefix = uri[5:].partition("/")
    return StoreLocation(bucket=bucket, prefix=prefix.strip("/") or "engines")


def _images_from_values(path: str) -> ImageCatalog:
    """The image catalog a Helm values file installs (the chart's defaults where the file is silent)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"--chart-values {path}: {exc}") from None
    images = values.get("images") if isinstance(values, dict) else None
    if not isinstance(images, dict):
        return ImageCatalog()
    # Helm deep-merges a values file over the chart's own values: releases the file does not name keep theirs.
    versions: dict[str, Any] = {v: p.model_dump() for v, p in ImageCatalog().versions.items()}
    given = images.get("trtllm")
    if isinstance(given, dict):
        for version, pair in given.items():
            versions[str(version)] = {**versions.get(str(version), {}), **(pair if isinstance(pair, dict) else {})}
    try:
        return ImageCatalog.model_validate(
            {
                "default_version": str(images.get("defaultTrtllmVersion") or DEFAULT_TRTLLM_VERSION),
                "versions": versions,
            }
        )
    except ValidationError as exc:
        raise InputError(f"--chart-values {path}: images: {first_problem(exc)}") from None


def main(argv: list[str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    args = _parser().parse_args(argv)
    try:
        store = _store_from_uri(args.default_store) if args.default_store else OPERATOR_DEFAULT_STORE
        kwargs: dict[str, Any] = {
            "compiler": args.compiler,
            "default_store": store,
            "gpus_per_node": args.gpus_per_node,
            "images": _images_from_values(args.chart_values) if args.chart_values else None,
        }
        paths = [p for given in args.filename for p in manifest_paths(given, args.recursive)]
        entries = [e for path in paths for e in read_file(path, kwargs, namespace=args.namespace)]
        against: dict[tuple[str, str], Entry] | None = None
        if args.against:
            target: str = args.against
            if target == "cluster" or target.startswith("cluster:"):
                olds = read_cluster(target.partition(":")[2] or args.context, kwargs, args.kubeconfig)
            else:
                olds = read_file(target, kwargs, namespace=args.namespace)
            against = {e.key: e for e in olds}
            # Shapes Auto raised on a live object are part of its identity: plan the files with them too.
            entries = [
                _replan(e, against[e.key], kwargs) if e.key in against and against[e.key].status else e for e in entries
            ]
    except InputError as exc:
        print(f"llmengine plan: {exc}", file=err)
        return 2
    if not entries:
        print(f"llmengine plan: no {KIND} resources in {', '.join(args.filename)}", file=err)
        return 2

    with_action = against is not None
    actions = [action_for(e, against.get(e.key)) if against is not None else None for e in entries]
    observed = [_observed(against.get(e.key)) if against is not None else {} for e in entries]
    reasons = [reasons_for(e, against.get(e.key)) if against is not None else [] for e in entries]
    rows = list(zip(entries, actions, observed, reasons, strict=True))
    if args.output in ("json", "yaml"):
        docs = [to_json(e, a, with_action, o, r) for e, a, o, r in rows]
        if args.output == "json":
            print(json.dumps(docs, indent=2, sort_keys=True), file=out)
        else:
            print(yaml.safe_dump(docs, sort_keys=True, allow_unicode=True), file=out, end="")
    else:
        print("\n\n".join(to_text(e, a, with_action, o, r) for e, a, o, r in rows), file=out)
    return 0 if all(e.plan.valid for e in entries) else 1
