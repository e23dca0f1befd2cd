"""API layer: pydantic models for the LLMEngine resource and the documents exchanged with Jobs."""

from llmengine.api.v1alpha1 import FieldError, InvalidEngine, LLMEngine, LLMEngineSpec, LLMEngineStatus, parse_engine

__all__ = ["FieldError", "InvalidEngine", "LLMEngine", "LLMEngineSpec", "LLMEngineStatus", "parse_engine"]
