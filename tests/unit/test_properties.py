"""Bad input, property-based: random and malformed objects never crash, never log a traceback, and every
rejection names a field.

Two families of input: random JSON-like values (some shaped like an LLMEngine, with keys drawn from the API's own
field names so that validation goes deep), and the valid examples under examples/ broken by a few mutations
(dropped fields, wrong types, out-of-range numbers, unknown fields, huge or odd strings, nulls, wrong apiVersion
or kind). They go through the schema (parse_engine), the planner (plan_object) and the admission review. The
builder's documents get the same treatment: termination messages, build results, manifests and build requests.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import tempfile
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import structlog
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from llmengine.api import v1alpha1
from llmengine.api.artifacts import BuildRequest, BuildResult, Manifest, ManifestFile, StoreLocation
from llmengine.api.v1alpha1 import FieldError, InvalidEngine, field_path, parse_engine
from llmengine.builder.compiler import BuildFailure, check_request
from llmengine.builder.main import RESULT_LIMIT, fit_result, load_request
from llmengine.builder.main import run as run_builder
from llmengine.clients.store import EngineStore, IntegrityError, ManifestInvalid, StoreError, check_manifest_paths
from llmengine.plan import plan_object
from llmengine.reconcile.decide import failure_text
from llmengine.reconcile.views import JobView

try:
    from llmengine.plan import admission
except ImportError:  # added in parallel; the admission properties skip until it exists
    admission = None  # type: ignore[assignment]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_DOCS: list[dict[str, Any]] = [
    d for f in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)
]
DEFAULT_STORE = StoreLocation(bucket="operator-default")
DIGEST = "d" * 64
# Where a FieldError may point: a real top-level field, then a path below it. (The models also take Python names,
# so a document that says api_version gets its error there.)
FIELD = re.compile(r"^(apiVersion|api_version|kind|metadata|spec|status)([.\[]|$)")
# The planner's catch-all for its own bugs: random input must never reach it.
PLANNER_BUG = "could not plan this engine"


def examples(n: int) -> settings:
    """n examples, no per-example deadline (the first ones import and warm caches), big inputs welcome."""
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _aliases(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[str]:
    if model in seen:
        return set()
    seen.add(model)
    out: set[str] = set()
    for name, f in model.model_fields.items():
        out.add(f.alias or name)
        inner = v1alpha1._unwrap(f.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out |= _aliases(inner, seen)
    return out


# The API's own field names, so that random objects reach past the first unknown key.
VOCABULARY = sorted(_aliases(v1alpha1.LLMEngine, set()))


# ---------------------------------------------------------------------------------------------------------------
# Strategies

ODD_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\n\t",
        "null",
        "None",
        "true",
        "0",
        "-1",
        "1e999",
        "NaN",
        "\u202e\u200b",
        "é\u0301",
        "💥" * 3,
        "s3://",
        "s3:///",
        "../../etc/passwd",
        "A100-80GB ",
        "h100-80gb",
        "x" * 100_000,
        "1.2.1" * 1000,
    ]
)
ODD_NUMBERS = st.sampled_from(
    [
        0,
        -1,
        1,
        2,
        3,
        7,
        2**31,
        2**63 - 1,
        2**63,
        2**64,
        10**30,
        10**400,
        -(10**400),
        0.0,
        -0.0,
        0.5,
        1.5,
        -0.5,
        1e-300,
        1e308,
        math.inf,
        -math.inf,
        math.nan,
    ]
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | ODD_STRINGS | ODD_NUMBERS
KEYS = st.text(max_size=16) | st.sampled_from(VOCABULARY)
JSONISH = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=16,
)
# The strictly JSON subset, for documents that travel as bytes.
JSON_STRICT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=16), children, max_size=5),
    max_leaves=16,
)


@st.composite
def engine_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """A dict with LLMEngine's top-level keys (sometimes right) and random insides built from its vocabulary."""
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["apiVersion"] = draw(st.sampled_from([v1alpha1.API_VERSION, "llmengine.io/v1", "v1"]) | SCALARS)
    if draw(st.booleans()):
        out["kind"] = draw(st.sampled_from(["LLMEngine", "LLMEngines", "Deployment"]) | SCALARS)
    if draw(st.booleans()):
        out["metadata"] = draw(st.fixed_dictionaries({"name": SCALARS}) | JSONISH)
    if draw(st.integers(0, 9)):
        out["spec"] = draw(st.dictionaries(st.sampled_from(VOCABULARY), JSONISH, max_size=8) | JSONISH)
    if draw(st.integers(0, 3)) == 0:
        out["status"] = draw(JSONISH)
    return out


Path_ = tuple[str | int, ...]


def _nodes(doc: Any, at: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    yield at, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nodes(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nodes(v, (*at, i))


def _get(doc: Any, at: Path_) -> Any:
    for part in at:
        doc = doc[part]
    return doc


def _typo(key: str, draw: st.DrawFn) -> str:
    """A near miss of a real key: the kind of mistake a person makes."""
    variants = [key.lower(), key.upper(), key[:-1], key + "s", re.sub(r"([A-Z])", r"_\1", key).lower(), f" {key}"]
    return draw(st.sampled_from([v for v in variants if v != key] or ["x"]))


def _drop(draw: st.DrawFn, doc: dict[str, Any]) -> Path_:
    parents = [(at, n) for at, n in _nodes(doc) if isinstance(n, dict | list) and n]
    if not parents:
        return ()
    at, node = draw(st.sampled_from(parents))
    if isinstance(node, dict):
        key: str = draw(st.sampled_from(sorted(node)))
        del node[key]
        return (*at, key)
    index = draw(st.integers(0, len(node) - 1))
    del node[index]
    return (*at, index)


def _replace(draw: st.DrawFn, doc: dict[str, Any]) -> Path_:
    """A field gets a value of the wrong type, out of range, huge, odd unicode or null."""
    at = draw(st.sampled_from([at for at, _ in _nodes(doc) if at]))
    old = _get(doc, at)
    new = draw(
        st.one_of(
            ODD_NUMBERS,
            ODD_STRINGS,
            SCALARS,
            JSONISH,
            st.just([old]),
            st.just({"value": old}),
            st.just(str(old)),
            st.just(None),
        )
    )
    _get(doc, at[:-1])[at[-1]] = new
    return at


def _unknown(draw: st.DrawFn, doc: dict[str, Any]) -> Path_:
    """A key the schema does not know: a near miss of a real one, or anything at all."""
    at, node = draw(st.sampled_from([(at, n) for at, n in _nodes(doc) if isinstance(n, dict)]))
    key = draw(KEYS)
    near_miss = draw(st.booleans())
    if node and near_miss:
        key = _typo(draw(st.sampled_from(sorted(node))), draw)
    node[key] = draw(JSONISH)
    return (*at, key)


def _nulls(draw: st.DrawFn, doc: dict[str, Any]) -> Path_:
    """Every value below one object becomes null (as a bad templating tool leaves them)."""
    at, node = draw(st.sampled_from([(at, n) for at, n in _nodes(doc) if isinstance(n, dict) and n]))
    for k in node:
        node[k] = None
    return at


def _header(draw: st.DrawFn, doc: dict[str, Any]) -> Path_:
    key = draw(st.sampled_from(["apiVersion", "kind", "metadata", "spec"]))
    doc[key] = draw(
        st.sampled_from(["llmengine.io/v1", "llmengine.io/v1beta1", "LLMEngines", "llmengine", "", None, [], 7])
        | SCALARS
    )
    return (key,)


def _objects_with_model(doc: dict[str, Any]) -> list[tuple[Path_, dict[str, Any], type[BaseModel]]]:
    """The objects in doc that the schema has a model for, with that model."""
    out = []
    for at, node in _nodes(doc):
        model = v1alpha1._model_at(tuple(p for p in at if isinstance(p, str))) if isinstance(node, dict) else None
        if model is not None:
            out.append((at, node, model))
    return out


def _set_field(draw: st.DrawFn, doc: dict[str, Any]) -> Path_:
    """A field the schema knows, present in the example or not, gets an odd number, an odd string or anything."""
    at, node, model = draw(st.sampled_from(_objects_with_model(doc)))
    key = draw(st.sampled_from(sorted(f.alias or n for n, f in model.model_fields.items())))
    node[key] = draw(st.one_of(ODD_NUMBERS, ODD_NUMBERS, ODD_STRINGS, SCALARS, JSONISH))
    return (*at, key)


INTS = st.one_of(st.integers(0, 9), st.integers(1, 10**6), st.sampled_from([2**31, 2**63 - 1, 2**63, 10**30, 10**400]))
STRINGS_OF_NOTE = st.sampled_from(
    ["1g.10gb", "3g.20gb", "7g.80gb", "1g.24gb", "llama-3.1-70b", "mixtral-8x7b", "LLAMA-2-7B", "1.0", "0.9", "2.0"]
)


def _plausible(annotation: Any) -> st.SearchStrategy[Any]:
    """A value of the right type for a field: what slips past the schema and tests the planner's rules."""
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if getattr(annotation, "__origin__", None) is typing.Literal:
        return st.sampled_from(args)
    if args and getattr(annotation, "__origin__", None) not in (dict, list):
        return st.one_of(*(_plausible(a) for a in args))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return INTS
    if annotation is float:
        return st.floats(0.0, 2.0) | st.sampled_from([1e-9, 0.999999, 1e300])
    if annotation is str:
        return STRINGS_OF_NOTE | ODD_STRINGS | st.text(max_size=20)
    return st.nothing()


def _set_plausible(draw: st.DrawFn, doc: dict[str, Any]) -> Path_:
    at: Path_
    at, node, model = draw(st.sampled_from(_objects_with_model(doc)))
    fields = {f.alias or n: f.annotation for n, f in model.model_fields.items()}
    fields = {k: a for k, a in fields.items() if not _plausible(a).is_empty}
    if not fields:
        return at
    key = draw(st.sampled_from(sorted(fields)))
    node[key] = draw(_plausible(fields[key]))
    return (*at, key)


@st.composite
def plausible_engines(draw: st.DrawFn) -> dict[str, Any]:
    """Examples with a few fields set to values of the right type: mostly past the schema, into the planner."""
    doc: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(EXAMPLE_DOCS)))
    for _ in range(draw(st.integers(1, 5))):
        _set_plausible(draw, doc)
    return doc


Mutation = Callable[[st.DrawFn, dict[str, Any]], Path_]
MUTATIONS: list[Mutation] = [
    _drop,
    _drop,
    _replace,
    _replace,
    _set_field,
    _set_field,
    _set_field,
    _unknown,
    _nulls,
    _header,
]


@st.composite
def mutated_with_path(draw: st.DrawFn, docs: list[dict[str, Any]]) -> tuple[dict[str, Any], Path_]:
    """One mutation of one document, and the path it touched."""
    doc: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(docs)))
    return doc, draw(st.sampled_from(MUTATIONS))(draw, doc)


def mutated(docs: list[dict[str, Any]], most: int = 4) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def strategy(draw: st.DrawFn) -> dict[str, Any]:
        doc: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(docs)))
        for _ in range(draw(st.integers(1, most))):
            draw(st.sampled_from(MUTATIONS))(draw, doc)
        return doc

    return strategy()


MUTATED_ENGINES = mutated(EXAMPLE_DOCS)
ANY_OBJECT = st.one_of(JSONISH, engine_shaped(), MUTATED_ENGINES)


# ---------------------------------------------------------------------------------------------------------------
# Checks


@contextmanager
def no_tracebacks() -> Iterator[None]:
    """Fail when anything logged an exception, through the stdlib (Kopf, boto) or structlog (ours)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root, handler = logging.getLogger(), Keep(logging.DEBUG)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with structlog.testing.capture_logs() as events:
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    for r in records:
        assert not r.exc_info and "Traceback" not in r.getMessage(), f"logged a traceback: {r.getMessage()[:500]}"
    for e in events:
        assert not ({"exc_info", "exception"} & e.keys()), f"logged an exception: {e}"
        assert "Traceback" not in repr(e), f"logged a traceback: {repr(e)[:500]}"


def assert_names_field(e: FieldError) -> None:
    assert isinstance(e.field, str) and FIELD.match(e.field), f"error does not name a field: {e!r:.500}"
    assert isinstance(e.message, str) and e.message.strip(), f"error without a message: {e!r:.500}"


def check_parse(obj: Any) -> v1alpha1.LLMEngine | None:
    try:
        return parse_engine(obj)
    except InvalidEngine as exc:
        assert exc.errors, "InvalidEngine without errors"
        if not isinstance(obj, dict):
            assert [e.field for e in exc.errors] == ["(object)"]
            return None
        for e in exc.errors:
            assert_names_field(e)
        return None


def check_plan(obj: Any, compiler: str = "tensorrt-llm") -> Any:
    plan = plan_object(obj, compiler=compiler, default_store=DEFAULT_STORE)
    if plan.valid:
        assert not plan.errors and plan.build_request is not None
        assert re.fullmatch(r"[0-9a-f]{64}", plan.engine_digest)
        # What the operator mounts into the build Job must load in the builder.
        assert BuildRequest.model_validate_json(plan.build_request.to_json()) == plan.build_request
        return plan
    assert plan.errors and plan.build_request is None
    for e in plan.errors:
        if isinstance(obj, dict):
            assert_names_field(e)
        assert PLANNER_BUG not in e.message, f"the planner crashed on {e.field}: {e.message:.500}"
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Schema and planner


@examples(600)
@given(obj=st.one_of(JSONISH, engine_shaped()))
def test_random_objects_parse_or_name_the_field(obj: Any) -> None:
    with no_tracebacks():
        engine = check_parse(obj)
        plan = check_plan(obj)
    assert (engine is not None) or not plan.valid


@examples(1000)
@given(doc=MUTATED_ENGINES, compiler=st.sampled_from(["tensorrt-llm", "test"]))
def test_mutated_examples_parse_or_name_the_field(doc: dict[str, Any], compiler: str) -> None:
    with no_tracebacks():
        engine = check_parse(doc)
        plan = check_plan(doc, compiler)
        event(f"parsed={engine is not None} planned={plan.valid}")
        if plan.valid:
            # Planning is a pure function of the spec: a second look gives the same engine.
            assert check_plan(copy.deepcopy(doc), compiler).engine_digest == plan.engine_digest
    if engine is None:
        assert not plan.valid


@examples(1000)
@given(doc=plausible_engines(), compiler=st.sampled_from(["tensorrt-llm", "test"]))
def test_plausible_specs_plan_or_name_the_field(doc: dict[str, Any], compiler: str) -> None:
    """Values of the right type but any size or combination: the planner's own rules, never its crash guard."""
    with no_tracebacks():
        engine = check_parse(doc)
        plan = check_plan(doc, compiler)
    event(f"parsed={engine is not None} planned={plan.valid}")
    if engine is None:
        assert not plan.valid


def _related(a: str, b: str) -> bool:
    """One field path is the other, or lies below it."""
    short, long = sorted((a, b), key=len)
    return long == short or not short or long.startswith((short + ".", short + "["))


@examples(600)
@given(case=mutated_with_path(EXAMPLE_DOCS))
def test_schema_errors_point_at_the_mutated_field(case: tuple[dict[str, Any], Path_]) -> None:
    """One mutation of a valid example: every schema error is about the field touched, its parent or its children."""
    doc, at = case
    with no_tracebacks():
        try:
            parse_engine(doc)
        except InvalidEngine as exc:
            touched = field_path(at)
            for e in exc.errors:
                assert _related(e.field, touched), f"mutated {touched}, error on {e}"[:500]


# ---------------------------------------------------------------------------------------------------------------
# Admission

needs_admission = pytest.mark.skipif(admission is None, reason="llmengine.plan.admission does not exist yet")


@needs_admission
@examples(500)
@given(
    new=ANY_OBJECT.filter(lambda o: isinstance(o, dict)),
    old=st.none() | st.sampled_from(EXAMPLE_DOCS) | MUTATED_ENGINES,
    operation=st.sampled_from(["CREATE", "UPDATE", "UPDATE", "DELETE", "CONNECT"]),
)
def test_admission_review_never_crashes_and_names_fields(
    new: dict[str, Any], old: dict[str, Any] | None, operation: str
) -> None:
    with no_tracebacks():
        verdict = admission.review(new, old, operation, default_store=DEFAULT_STORE)
        plan = plan_object(copy.deepcopy(new), default_store=DEFAULT_STORE)
    assert isinstance(verdict.allowed, bool)
    assert all(isinstance(w, str) and w for w in verdict.warnings)
    if operation in ("DELETE", "CONNECT"):
        assert verdict.allowed
    if operation == "CREATE":
        assert verdict.allowed == plan.valid
    if not verdict.allowed:
        assert not plan.valid and verdict.message.strip()
        assert plan.errors[0].field in verdict.message, verdict.message[:500]
        for e in verdict.errors:
            assert_names_field(e)


@needs_admission
@examples(200)
@given(old=st.sampled_from(EXAMPLE_DOCS), data=st.data())
def test_admission_lets_metadata_changes_through(old: dict[str, Any], data: st.DataObject) -> None:
    """Labels, finalizers and Kopf's annotations never get stuck behind the webhook, whatever the spec."""
    new = copy.deepcopy(old)
    new["metadata"] = data.draw(JSONISH)
    with no_tracebacks():
        verdict = admission.review(new, old, "UPDATE", default_store=DEFAULT_STORE)
    assert verdict.allowed


# ---------------------------------------------------------------------------------------------------------------
# Build results and termination messages

RESULTS = st.fixed_dictionaries(
    {
        "engine_digest": st.text(max_size=70),
        "succeeded": st.booleans(),
        "stage": st.none() | st.sampled_from(["fetch", "compile", "verify", "upload", "validate", "internal"]),
        "reason": st.none() | st.text(max_size=40),
        "message": st.none() | st.text(max_size=200) | st.text(min_size=4000, max_size=9000),
        "permanent": st.booleans(),
        "engine_uri": st.none() | st.text(max_size=80),
        "total_bytes": st.none() | st.integers(0, 2**63),
        "build_seconds": st.none() | st.floats(0, 1e6),
        "test_build": st.booleans(),
    }
).map(BuildResult.model_validate)
VALID_RESULT = BuildResult(engine_digest=DIGEST, succeeded=False, stage="fetch", reason="NotFound", message="gone")


def _truncated(text: str) -> st.SearchStrategy[str]:
    return st.integers(0, max(0, len(text) - 1)).map(lambda n: text[:n])


RESULT_DICT = json.loads(VALID_RESULT.to_json())
TERMINATION_MESSAGES = st.one_of(
    st.none(),
    st.text(),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    JSON_STRICT.map(json.dumps),
    _truncated(VALID_RESULT.to_json()),
    mutated([RESULT_DICT]).map(lambda d: json.dumps(d, default=str)),
    st.integers(1, 5000).map(lambda n: "[" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n),
    st.just("Traceback (most recent call last):\n  File x\nValueError: boom\n"),
    RESULTS.map(lambda r: r.to_json()),
)


@examples(800)
@given(
    message=TERMINATION_MESSAGES,
    reason=st.none() | st.sampled_from(["BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy"]),
)
def test_termination_messages_never_crash_the_reconcile(message: str | None, reason: str | None) -> None:
    with no_tracebacks():
        result = BuildResult.parse(message)
        text, permanent = failure_text(JobView("j", DIGEST, 1, False, False, True, message, reason, None, None))
    assert result is None or isinstance(result, BuildResult)
    assert isinstance(text, str) and text.strip() and len(text) <= 1024
    assert isinstance(permanent, bool)
    assert permanent == bool(result is not None and not result.succeeded and result.permanent)


@examples(300)
@given(result=RESULTS)
def test_build_results_survive_the_termination_message(result: BuildResult) -> None:
    """Kubernetes keeps 4 KiB of a termination message: the builder fits its result into that, and it parses."""
    assume(len(result.model_copy(update={"message": None}).to_json().encode()) < RESULT_LIMIT - 64)
    text = fit_result(result)
    assert len(text.encode()) <= RESULT_LIMIT
    parsed = BuildResult.parse(text)
    assert parsed is not None
    assert parsed.model_copy(update={"message": result.message}) == result


# ---------------------------------------------------------------------------------------------------------------
# Store documents: manifests and build results


class _Body:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def read(self) -> bytes:
        return self.raw


class _OneObjectClient:
    """Just enough of an S3 client to serve one document."""

    meta = SimpleNamespace(endpoint_url="http://s3.test")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        return {"Body": _Body(self.raw)}


def _valid_manifest() -> Manifest:
    return Manifest.model_validate(
        {
            "engineDigest": DIGEST,
            "backend": "tensorrt",
            "tpSize": 1,
            "ppSize": 1,
            "shapes": {"maxBatchSize": 8, "maxInputLen": 512, "maxSeqLen": 1024, "maxNumTokens": 2048},
            "files": [
                {"path": "rank0.engine", "sha256": "a" * 64, "size": 10},
                {"path": "config.json", "sha256": "b" * 64, "size": 2},
            ],
            "provenance": {
                "builderImage": "img:1.2.1",
                "trtllmVersion": "1.2.1",
                "compiler": "test",
                "gpuClass": "H100-80GB",
                "sm": "9.0",
                "buildTime": "2026-01-01T00:00:00Z",
                "buildSeconds": 1.5,
            },
        }
    )


MANIFEST_JSON = _valid_manifest().to_json()


def documents(valid_json: str) -> st.SearchStrategy[bytes]:
    """Bytes that a store object might hold: garbage, other JSON, a cut-off or broken version of the real thing."""
    return st.one_of(
        st.binary(max_size=300),
        JSON_STRICT.map(lambda v: json.dumps(v).encode()),
        _truncated(valid_json).map(str.encode),
        mutated([json.loads(valid_json)]).map(lambda d: json.dumps(d, default=str).encode()),
        st.integers(1, 5000).map(lambda n: b"[" * n),
        st.just(valid_json.encode()),
    )


def _what_is_wrong(model: type[BaseModel], raw: bytes) -> str:
    """What an error about raw must mention: the first bad field, or (for the whole document) what is wrong."""
    try:
        model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = field_path(tuple(first["loc"]))
        return (where if where.isprintable() else repr(where)) or str(first["msg"]).split(":")[0]
    return ""


@examples(600)
@given(raw=documents(MANIFEST_JSON))
def test_malformed_manifests_are_a_broken_commit(raw: bytes) -> None:
    store = EngineStore(cast(Any, _OneObjectClient(raw)), StoreLocation(bucket="b"))
    with no_tracebacks():
        try:
            manifest = store.get_manifest(DIGEST)
        except ManifestInvalid as exc:
            text = str(exc)
            assert text.startswith(f"manifest at s3://b/engines/{DIGEST}/manifest.json is malformed")
            assert "\n" not in text and "(: " not in text
            assert _what_is_wrong(Manifest, raw) in text, text
            return
        except IntegrityError as exc:
            assert (DIGEST in str(exc) and "is for engine" in str(exc)) or "unexpected files prefix" in str(exc)
            return
        assert manifest is not None and manifest.engine_digest == DIGEST
        try:
            check_manifest_paths(manifest.files)
        except IntegrityError as exc:
            assert exc.path is not None and str(exc)


@examples(400)
@given(raw=documents(VALID_RESULT.to_json()))
def test_malformed_stored_results_say_what_is_wrong(raw: bytes) -> None:
    store = EngineStore(cast(Any, _OneObjectClient(raw)), StoreLocation(bucket="b"))
    with no_tracebacks():
        try:
            result = store.get_result(DIGEST)
        except StoreError as exc:
            text = str(exc)
            assert text.startswith(f"build result at s3://b/engines/{DIGEST}/build-result.json is malformed")
            assert "\n" not in text and "(: " not in text
            assert _what_is_wrong(BuildResult, raw) in text, text
            return
    assert isinstance(result, BuildResult)


@examples(300)
@given(
    files=st.lists(
        st.builds(
            ManifestFile,
            path=st.sampled_from(["a", "dir/b", "/abs", "../up", "a/../b", "./c", "a//b", "", "manifest.json"])
            | st.text(max_size=20),
            sha256=st.text(max_size=70),
            size=st.integers(),
        ),
        max_size=5,
    )
)
def test_manifest_paths_refuse_with_the_entry(files: list[ManifestFile]) -> None:
    try:
        check_manifest_paths(files)
    except IntegrityError as exc:
        assert exc.path is not None and exc.path in str(exc)
        return
    paths = [f.path for f in files]
    assert len(set(paths)) == len(paths)
    assert all(p and not p.startswith("/") and ".." not in p.split("/") for p in paths)


# ---------------------------------------------------------------------------------------------------------------
# Build requests, as the builder reads them


def _valid_request() -> BuildRequest:
    plan = plan_object(
        next(d for d in EXAMPLE_DOCS if d["metadata"]["name"] == "tiny-demo"),
        compiler="test",
        default_store=DEFAULT_STORE,
    )
    assert plan.build_request is not None
    return plan.build_request


REQUEST_JSON = _valid_request().to_json()


@examples(500)
@given(raw=documents(REQUEST_JSON))
def test_malformed_build_requests_fail_permanently_naming_the_field(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, no_tracebacks():
        path = Path(tmp) / "request.json"
        path.write_bytes(raw)
        try:
            check_request(load_request(path))
        except BuildFailure as exc:
            assert exc.stage == "validate" and exc.permanent and exc.message.strip()
            assert "\n" not in exc.message and ": : " not in exc.message
            if exc.reason == "InvalidRequest":
                assert _what_is_wrong(BuildRequest, raw) in exc.message, exc.message


@examples(100)
@given(
    raw=st.binary(max_size=100)
    | JSON_STRICT.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())
)
def test_builder_reports_garbage_requests_as_a_result(raw: bytes) -> None:
    """The builder never crashes on its input: a garbage request is a permanent, logged (not raised) failure."""
    with tempfile.TemporaryDirectory() as tmp, no_tracebacks():
        path = Path(tmp) / "request.json"
        path.write_bytes(raw)
        result = run_builder(path, Path(tmp) / "work")
    assert not result.succeeded and result.permanent and result.stage == "validate"
    assert result.message and len(fit_result(result).encode()) <= RESULT_LIMIT
