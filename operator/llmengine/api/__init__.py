"""API layer: pydantic models for the LLMEngine resource and the documents exchanged with Jobs."""
