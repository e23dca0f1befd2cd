"""`llmengine build-engine`: fetch a model, compile it (TensorRT-LLM or the test compiler), verify, commit."""
