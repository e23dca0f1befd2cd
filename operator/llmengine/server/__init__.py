"""`llmengine serve-engine`: download and verify a committed engine, check the GPUs, exec trtllm-serve."""
