"""docs/argocd-health.lua run the way Argo CD runs a custom health check: the object as the global `obj`, the
script's return value the health."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "argocd-health.lua"


def health(obj: dict[str, Any]) -> dict[str, str]:
    from lupa import LuaRuntime

    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPT.read_text())
    return {"status": str(hs["status"]), "message": str(hs["message"] or "")}
