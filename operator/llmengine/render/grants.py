"""The engine grant Secret: presigned read URLs for the engines an LLMEngine serves, kept in its namespace for its
benchmark and serving pods, which hold no store credentials (default store, isolated access)."""

from __future__ import annotations

from typing import Any

from llmengine.api.artifacts import EngineGrant
from llmengine.api.v1alpha1 import LLMEngine
from llmengine.render import common as c

KEY = c.GRANT_KEY
FILE = c.GRANT_FILE


def secret_name(engine_name: str) -> str:
    return f"{c.serving_name(engine_name)[:57].rstrip('-')}-grant"


def secret(engine: LLMEngine, grant: EngineGrant) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(engine.name),
            "namespace": engine.namespace,
            "labels": {**c.base_labels("grant"), c.ENGINE_LABEL: engine.name},
            "ownerReferences": [c.owner_reference(engine, controller=True)],
        },
        "stringData": {KEY: grant.to_json()},
    }
