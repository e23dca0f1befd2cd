"""The synthetic dataset, in trtllm-bench's own JSONL format."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmengine.api.bench import BenchDataset

# Token ids of synthetic prompts: above the low ids tokenizers reserve for special tokens, and below 32000, which
# the regular vocabulary of every common tokenizer covers (Llama 3 and Qwen put their special tokens far above).
LOW_TOKEN_ID = 1000
SAFE_VOCAB = 32000


@dataclass(frozen=True)
class DatasetStats:
    num_requests: int
    max_isl: int
    max_osl: int
    max_sequence_length: int
    avg_isl: float
    avg_osl: float


def token_range(vocab_size: int | None) -> tuple[int, int]:
    """[low, high) of the token ids synthetic prompts use, for a vocabulary of this size (None: unknown)."""
    high = min(vocab_size or SAFE_VOCAB, SAFE_VOCAB)
    low = min(LOW_TOKEN_ID, high // 2)
    return low, max(high, low + 1)


def sample_length(rng: random.Random, mean: int, maximum: int) -> int:
    """A normal draw around mean (3 standard deviations reach maximum), rounded and clipped to [1, maximum]."""
    stdev = (maximum - mean) / 3.0
    if stdev <= 0:
        return mean
    return max(1, min(maximum, round(rng.gauss(mean, stdev))))


def dataset_lines(dataset: BenchDataset, vocab_size: int | None = None) -> Iterator[tuple[str, int, int]]:
    """(JSONL line, prompt length, output length) per request; the same seed gives the same lines."""
    rng = random.Random(dataset.seed)
    ids = range(*token_range(vocab_size))
    for i in range(dataset.num_requests):
        isl = sample_length(rng, dataset.input_mean, dataset.input_max)
        osl = sample_length(rng, dataset.output_mean, dataset.output_max)
        # Exactly what trtllm-bench's prepare_dataset writes; EOS is disabled (--eos_id -1), so every request
        # generates output_tokens tokens.
        line = json.dumps(
            {"task_id": i, "input_ids": rng.choices(ids, k=isl), "output_tokens": osl}, separators=(",", ":")
        )
        yield line, isl, osl


def write_dataset(path: Path, dataset: BenchDataset, vocab_size: int | None = None) -> DatasetStats:
    n = max_isl = max_osl = max_seq = total_isl = total_osl = 0
    with open(path, "w") as f:
        for line, isl, osl in dataset_lines(dataset, vocab_size):
            f.write(line + "\n")
            n += 1
            max_isl, max_osl, max_seq = max(max_isl, isl), max(max_osl, osl), max(max_seq, isl + osl)
            total_isl += isl
            total_osl += osl
    return DatasetStats(n, max_isl, max_osl, max_seq, total_isl / max(n, 1), total_osl / max(n, 1))


def vocab_size(*config_files: Path) -> int | None:
    """vocab_size from the first config.json that has one (HF: top level or text_config; engine: pretrained)."""
    for path in config_files:
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(cfg, dict):
            continue
        for holder in (cfg, cfg.get("text_config"), cfg.get("pretrained_config")):
            if isinstance(holder, dict) and isinstance(holder.get("vocab_size"), int) and holder["vocab_size"] > 0:
                return int(holder["vocab_size"])
    return None
