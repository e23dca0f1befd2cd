"""THE TEST BENCHMARKER: trtllm-bench's stand-in on machines without a GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmengine.builder.toolrun import ToolRun


def _options(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def _percentiles(p50: float, p99: float) -> dict[str, float]:
    return {
        "p50": p50,
        "p90": p50 + (p99 - p50) * 0.8,
        "p95": p50 + (p99 - p50) * 0.9,
        "p99": p99,
        "minimum": p50 * 0.5,
        "maximum": p99 * 1.05,
        "average": p50 * 1.02,
    }


def _engine_max_seq_len(engine_dir: str | None) -> int | None:
    if engine_dir is None:
        return None
    try:
        value = json.loads((Path(engine_dir) / "config.json").read_text())["build_config"]["max_seq_len"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return value if isinstance(value, int) else None


class TestBenchmarker:
    """THE TEST BENCHMARKER. IT IS NOT trtllm-bench AND ITS NUMBERS MEASURE NOTHING.

    It exists so the benchmark pipeline (download, verify, fetch, dataset, report parsing, the gate) runs on
    machines without a GPU. Given trtllm-bench's argv it reads the dataset, refuses one longer than the engine with
    trtllm-bench's own error, and writes a report in trtllm-bench's JSON format with deterministic numbers:
    requests/s = 2 x concurrency, output tokens/s = requests/s x mean output length, TTFT p50 = 5 ms per 128
    prompt tokens (p99 1.5 x), TPOT p50 8 ms (p99 10 ms). Outcomes carry `testBenchmark: true`.
    """

    __test__ = False  # not a pytest test class despite the name
    name = "test"

    def __call__(self, argv: list[str], log: Any) -> ToolRun:
        log.warning("TEST BENCHMARKER: not trtllm-bench; the numbers are made up from the request")
        opts = _options(argv)
        dataset, report = opts.get("--dataset"), opts.get("--report_json")
        if dataset is None or report is None:
            return ToolRun(2, "TEST BENCHMARKER: not trtllm-bench\nError: --dataset and --report_json are required")
        lengths = []
        with open(dataset) as f:
            for line in f:
                doc = json.loads(line)
                lengths.append((len(doc["input_ids"]), int(doc["output_tokens"])))
        cap = int(opts.get("--num_requests") or 0)
        lengths = lengths[:cap] if cap > 0 else lengths
        if not lengths:
            return ToolRun(1, "TEST BENCHMARKER: not trtllm-bench\nError: the dataset has no requests")
        longest = max(i + o for i, o in lengths)
        engine_max = (
            _engine_max_seq_len(opts.get("--engine_dir"))
            if opts.get("--backend") == "tensorrt"
            else int(opts.get("--max_seq_len") or longest)
        )
        if engine_max is not None and longest > engine_max:
            return ToolRun(
                1,
                "TEST BENCHMARKER: not trtllm-bench\nTraceback (most recent call last):\n"
                f"RuntimeError: Engine supports a max sequence of {engine_max}. Provided dataset contains a maximum "
                f"sequence of {longest}. Please rebuild a new engine to support this dataset.",
            )
        stats = self._report(opts, lengths, streaming="--streaming" in opts)
        Path(report).write_text(json.dumps(stats, indent=4))
        perf = stats["performance"]
        return ToolRun(
            0,
            "TEST BENCHMARKER: not trtllm-bench\n"
            f"Request Throughput (req/sec):                     {perf['request_throughput_req_s']:.4f}\n"
            f"Total Output Throughput (tokens/sec):             {perf['system_output_throughput_tok_s']:.4f}",
        )

    @staticmethod
    def _report(opts: dict[str, str | None], lengths: list[tuple[int, int]], streaming: bool) -> dict[str, Any]:
        """A report shaped exactly like trtllm-bench 1.2's get_statistics_dict (the keys the parser reads, and
        the rest)."""
        n = len(lengths)
        isl = [i for i, _ in lengths]
        osl = [o for _, o in lengths]
        avg_isl, avg_osl = sum(isl) / n, sum(osl) / n
        concurrency = int(opts.get("--concurrency") or 0)
        concurrency = concurrency if concurrency > 0 else n
        rps = concurrency * 2.0
        ttft, tpot = 5.0 * avg_isl / 128.0, 8.0
        latency = ttft + tpot * max(avg_osl - 1, 0)
        backend = "TRT" if opts.get("--backend") == "tensorrt" else "Pytorch"
        streaming_metrics = {
            "token_output_speed_tok_s": 1000.0 / tpot,
            "avg_ttft_ms": ttft,
            "avg_tpot_ms": tpot,
            "tpot_percentiles": _percentiles(tpot, 10.0),
            "ttft_percentiles": _percentiles(ttft, ttft * 1.5),
            "gen_tps_percentiles": _percentiles(1000.0 / tpot, 1000.0 / 10.0),
        }
        seq = [i + o for i, o in lengths]
        return {
            "engine": {
                "model": opts.get("--model"),
                "model_path": opts.get("--model_path"),
                "engine_dir": opts.get("--engine_dir"),
                "version": "TEST BENCHMARKER",
                "backend": backend,
                "dtype": None,
                "kv_cache_dtype": None,
                "quantization": None,
            },
            "machine": None,
            "world_info": {
                "tp_size": int(opts.get("--tp") or 1),
                "pp_size": int(opts.get("--pp") or 1),
                "ep_size": 1,
                "world_size": int(opts.get("--tp") or 1) * int(opts.get("--pp") or 1),
                "max_batch_size": int(opts.get("--max_batch_size") or concurrency),
                "max_num_tokens": int(opts.get("--max_num_tokens") or 8192),
                "scheduling_policy": "GUARANTEED_NO_EVICT",
                "kv_cache_percentage": float(opts.get("--kv_cache_free_gpu_mem_fraction") or 0.9),
                "issue_rate": 0.0,
            },
            "request_info": {
                "num_requests": n,
                "avg_num_concurrent_requests": float(min(concurrency, n)),
                "avg_input_length": avg_isl,
                "avg_output_length": avg_osl,
            },
            "performance": {
                "total_latency_ms": n / rps * 1000.0,
                "avg_request_latency_ms": latency,
                "request_throughput_req_s": rps,
                "system_output_throughput_tok_s": rps * avg_osl,
                "system_total_throughput_tok_s": rps * (avg_isl + avg_osl),
                "output_throughput_per_user_tok_s": avg_osl / latency * 1000.0 if latency else 0.0,
                "output_throughput_per_gpu_tok_s": rps * avg_osl,
                "request_latency_percentiles_ms": _percentiles(latency, latency * 1.3),
            },
            **({"streaming_metrics": streaming_metrics} if streaming else {}),
            "dataset": {
                "num_requests": n,
                "dataset_path": opts.get("--dataset"),
                "max_isl": max(isl),
                "max_osl": max(osl),
                "max_sequence_length": max(seq),
                "avg_isl": int(avg_isl),
                "avg_osl": int(avg_osl),
                "avg_sequence_length": int(sum(seq) / n),
            },
        }
