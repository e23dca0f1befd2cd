"""The dev cluster fixtures (real control plane with RBAC, kwok GPU nodes, S3, pod runner) for the chart tests."""

from tests.integration.conftest import *  # noqa: F403
