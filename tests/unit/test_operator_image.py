"""The operator as the tests and benchmarks run it is the operator as its image runs it: the same malloc settings."""

from __future__ import annotations

import re
from pathlib import Path

from llmengine.dev.harness import OPERATOR_IMAGE_MALLOC, operator_command

DOCKERFILE = Path(__file__).resolve().parents[2] / "operator-image" / "Dockerfile"


def test_the_harness_runs_the_operator_with_the_images_malloc_settings() -> None:
    text = DOCKERFILE.read_text()
    image = dict(re.findall(r"\b(MALLOC_[A-Z_]+)=(\S+)", text))
    assert image and image == OPERATOR_IMAGE_MALLOC
    _, env = operator_command("/nonexistent/kubeconfig", ["ns"])
    assert {k: env[k] for k in image} == image
