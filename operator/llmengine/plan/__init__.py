"""Pure decisions about an LLMEngine: validation, engine identity, build shapes, memory fit. No I/O."""

from llmengine.api.v1alpha1 import FieldError
from llmengine.plan.catalog import CATALOG, ModelFacts
from llmengine.plan.gpus import GPU_CLASSES, GpuClass, MigProfile
from llmengine.plan.identity import engine_digest, identity_inputs, short_digest
from llmengine.plan.planner import Action, Plan, compare, make_plan, plan_object, serving_inputs
from llmengine.plan.sizing import MemoryEstimate

__all__ = [
    "CATALOG",
    "GPU_CLASSES",
    "Action",
    "FieldError",
    "GpuClass",
    "MemoryEstimate",
    "MigProfile",
    "ModelFacts",
    "Plan",
    "compare",
    "engine_digest",
    "identity_inputs",
    "make_plan",
    "plan_object",
    "serving_inputs",
    "short_digest",
]
