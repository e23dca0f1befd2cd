"""Architecture facts of the built-in models, as published in each model's config.json.

Parameter counts are the totals Hugging Face reports for the safetensors weights (for Mixtral, all experts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmengine.api.v1alpha1 import ArchitectureFacts


@dataclass(frozen=True)
class ModelFacts:
    """Resolved architecture facts: every optional fact filled in."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int | None
    parameter_count: int
    max_position_embeddings: int

    def as_dict(self) -> dict[str, int | str]:
        """camelCase facts, without unset ones: the identity input and the build request's modelFacts."""
        out: dict[str, int | str] = {}
        for key, value in asdict(self).items():
            if value is not None:
                head, *rest = key.split("_")
                out[head + "".join(p.title() for p in rest)] = value
        return out


@dataclass(frozen=True)
class CatalogModel:
    name: str
    hugging_face_repo: str
    facts: ModelFacts


def _llama(
    arch: str, layers: int, hidden: int, heads: int, kv: int, vocab: int, inter: int, params: int, ctx: int
) -> ModelFacts:
    return ModelFacts(arch, layers, hidden, heads, kv, hidden // heads, vocab, inter, params, ctx)


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        CatalogModel(
            "llama-2-7b",
            "meta-llama/Llama-2-7b-hf",
            _llama("LlamaForCausalLM", 32, 4096, 32, 32, 32000, 11008, 6_738_415_616, 4096),
        ),
        CatalogModel(
            "llama-3.1-8b",
            "meta-llama/Llama-3.1-8B-Instruct",
            _llama("LlamaForCausalLM", 32, 4096, 32, 8, 128256, 14336, 8_030_261_248, 131072),
        ),
        CatalogModel(
            "llama-3.1-70b",
            "meta-llama/Llama-3.1-70B-Instruct",
            _llama("LlamaForCausalLM", 80, 8192, 64, 8, 128256, 28672, 70_553_706_496, 131072),
        ),
        CatalogModel(
            "mistral-7b",
            "mistralai/Mistral-7B-v0.1",
            _llama("MistralForCausalLM", 32, 4096, 32, 8, 32000, 14336, 7_241_732_096, 32768),
        ),
        CatalogModel(
            "mixtral-8x7b",
            "mistralai/Mixtral-8x7B-v0.1",
            _llama("MixtralForCausalLM", 32, 4096, 32, 8, 32000, 14336, 46_702_792_704, 32768),
        ),
        CatalogModel(
            "qwen2.5-7b",
            "Qwen/Qwen2.5-7B-Instruct",
            _llama("Qwen2ForCausalLM", 28, 3584, 28, 4, 152064, 18944, 7_615_616_512, 32768),
        ),
        CatalogModel(
            "qwen2.5-72b",
            "Qwen/Qwen2.5-72B-Instruct",
            _llama("Qwen2ForCausalLM", 80, 8192, 64, 8, 152064, 29568, 72_706_203_648, 32768),
        ),
    ]
}


def lookup(name: str) -> CatalogModel | None:
    """Case-insensitive catalog lookup."""
    return CATALOG.get(name.strip().lower())


def resolve_facts(arch: ArchitectureFacts) -> ModelFacts:
    """Fill the optional facts: kv heads default to attention heads, head size to hidden / heads."""
    kv_heads = arch.num_key_value_heads or arch.num_attention_heads
    head_dim = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    return ModelFacts(
        architecture=arch.architecture,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=kv_heads,
        head_dim=max(head_dim, 1),
        vocab_size=arch.vocab_size,
        intermediate_size=arch.intermediate_size,
        parameter_count=arch.parameter_count,
        max_position_embeddings=arch.max_position_embeddings,
    )
