"""Shared fixtures. Cluster fixtures live in tests/integration/conftest.py; S3 alone is here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmengine.dev import proc
from llmengine.dev.s3 import S3Endpoint, start_s3


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A real S3 server (versitygw) on a free loopback port, for the whole session."""
    state: Path = tmp_path_factory.mktemp("s3")
    ep, p = start_s3(state)
    try:
        yield ep
    finally:
        proc.stop_pid(p.pid)


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> str:
    """A fresh, empty bucket per test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_endpoint.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_client(s3_endpoint: S3Endpoint) -> Any:
    return s3_endpoint.client()
