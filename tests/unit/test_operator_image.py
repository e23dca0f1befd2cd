"""The operator as the tests and benchmarks run it is the operator as its image runs it: the same malloc settings, the
same slim botocore data."""

from __future__ import annotations

import re
from pathlib import Path

from llmengine.clients.store import slimdata
from llmengine.dev.harness import OPERATOR_IMAGE_MALLOC, operator_command

DOCKERFILE = Path(__file__).resolve().parents[2] / "operator-image" / "Dockerfile"


def test_the_harness_runs_the_operator_with_the_images_malloc_settings() -> None:
    text = DOCKERFILE.read_text()
    image = dict(re.findall(r"\b(MALLOC_[A-Z_]+)=(\S+)", text))
    assert image and image == OPERATOR_IMAGE_MALLOC
    _, env = operator_command("/nonexistent/kubeconfig", ["ns"])
    assert {k: env[k] for k in image} == image


def test_the_image_and_the_harness_give_the_operator_slim_botocore_data() -> None:
    text = DOCKERFILE.read_text()
    named = re.findall(rf"\b{slimdata.ENV}=(\S+)", text)
    written = re.findall(r"llmengine slim-botocore-data (\S+)", text)
    assert named and named == written, "the image must write the data where LLMENGINE_BOTOCORE_DATA points"
    _, env = operator_command("/nonexistent/kubeconfig", ["ns"])
    assert slimdata.usable(env) == Path(env[slimdata.ENV])
