"""llmengine-operator: the lifecycle of TensorRT-LLM inference engines on Kubernetes."""

__version__ = "0.1.0"

GROUP = "llmengine.io"
VERSION = "v1alpha1"
PLURAL = "llmengines"
KIND = "LLMEngine"
# Prefix for every label and annotation the operator writes.
PREFIX = "llmengine.io"
