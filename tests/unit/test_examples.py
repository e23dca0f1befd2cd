"""Every example under examples/ is a complete LLMEngine that plans valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmengine.api.artifacts import StoreLocation
from llmengine.api.v1alpha1 import parse_engine
from llmengine.plan import plan_object

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.glob("*.yaml"))
DEFAULT_STORE = StoreLocation(bucket="operator-default")


def test_the_documented_examples_exist() -> None:
    assert {f.name for f in FILES} >= {
        "llama2-7b-fp16-tp2-a100.yaml",
        "llama3.1-8b-fp8-h100.yaml",
        "mistral-7b-int4awq-mig.yaml",
        "traffic-profile.yaml",
        "pytorch-backend.yaml",
        "tiny-demo.yaml",
    }


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_example_plans_valid(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and all(d["kind"] == "LLMEngine" for d in docs)
    for doc in docs:
        parse_engine(doc)
        for compiler in ("tensorrt-llm", "test"):
            plan = plan_object(doc, compiler=compiler, default_store=DEFAULT_STORE)
            assert plan.valid, f"{path.name}: {plan.errors}"
            assert plan.build_request is not None and plan.memory.fits


def _load(name: str) -> dict[str, object]:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(doc, dict)
    return doc


def test_tiny_demo_uses_the_operator_default_store() -> None:
    doc = _load("tiny-demo.yaml")
    engine = parse_engine(doc)
    assert engine.spec.store is None and engine.spec.model.architecture is not None
    plan = plan_object(doc, compiler="test", default_store=DEFAULT_STORE)
    assert plan.build_request is not None and plan.build_request.store == DEFAULT_STORE
    assert not plan_object(doc, compiler="test").valid  # and nothing else to fall back on


def test_examples_exercise_what_their_names_say() -> None:
    llama2 = plan_object(_load("llama2-7b-fp16-tp2-a100.yaml"))
    assert (llama2.gpu.name, llama2.gpu_count, llama2.build_request and llama2.build_request.dtype) == (
        "A100-80GB",
        2,
        "float16",
    )
    fp8 = parse_engine(_load("llama3.1-8b-fp8-h100.yaml")).spec
    assert fp8.precision.quantization == "fp8" and fp8.build.fp8_context_fmha and fp8.target.gpu == "H100-80GB"
    mig = plan_object(_load("mistral-7b-int4awq-mig.yaml"))
    assert mig.gpu_resource == "nvidia.com/mig-3g.20gb" and mig.gpu.name == "A100-40GB"
    traffic = plan_object(_load("traffic-profile.yaml"))
    assert traffic.shapes_from_traffic and traffic.gpu.name in ("L40S", "H100-80GB")
    pytorch = parse_engine(_load("pytorch-backend.yaml")).spec
    assert pytorch.backend == "pytorch"
