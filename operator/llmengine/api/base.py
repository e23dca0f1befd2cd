"""What every LLMEngine model shares: camelCase on the wire, unknown spec fields refused, CEL rules."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict


def cel(rule: str, message: str) -> JsonDict:
    """One x-kubernetes-validations entry: a rule the API server checks even when the operator is down."""
    return {"rule": rule, "message": message}


class SpecModel(BaseModel):
    """Base for spec objects: camelCase on the wire, unknown fields rejected (a typo is an error, not a no-op)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class StatusModel(BaseModel):
    """Base for status objects: written by the operator; unknown fields are ignored when reading."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
