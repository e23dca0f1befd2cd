"""`llmengine plan`: exit codes, output, and --against actions."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmengine.plan_cli import main


def engine(name: str, namespace: str = "ml", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "llmengine.io/v1alpha1",
        "kind": "LLMEngine",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {
                "source": {"huggingFace": {"repo": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f"}},
                "catalog": "llama-3.1-8b",
            },
            "build": {"maxBatchSize": 64, "maxInputLen": 2048, "maxSeqLen": 4096, "maxNumTokens": 8192},
            "target": {"gpu": "H100-80GB"},
        },
    }
    body["spec"].update(spec)
    return body


def write(path: Path, *docs: Any) -> str:
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    return str(path)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def test_valid_file_exits_0_and_skips_other_kinds(tmp_path: Path) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    f = write(tmp_path / "a.yaml", cm, engine("a"), None)
    rc, out, _ = run("-f", f)
    assert rc == 0
    assert "ml/a" in out and "valid" in out and "ConfigMap" not in out
    for part in ("engine:", "shapes:", "memory:", "identity:"):
        assert part in out


def test_invalid_engine_exits_1_and_lists_errors(tmp_path: Path) -> None:
    f = write(
        tmp_path / "a.yaml",
        engine("ok"),
        engine("bad", precision={"quantization": "fp8"}, target={"gpu": "A100-80GB"}),
    )
    rc, out, _ = run("-f", f)
    assert rc == 1
    assert "ml/bad" in out and "INVALID" in out
    assert "error:    spec.precision.quantization:" in out


def test_schema_error_exits_1(tmp_path: Path) -> None:
    bad = engine("typo")
    bad["spec"]["build"]["maxBatchSzie"] = 1
    rc, out, _ = run("-f", write(tmp_path / "a.yaml", bad))
    assert rc == 1 and "spec.build.maxBatchSzie" in out


@pytest.mark.parametrize(
    "setup",
    ["missing", "bad-yaml", "no-engines"],
)
def test_unreadable_input_exits_2(tmp_path: Path, setup: str) -> None:
    path = tmp_path / "x.yaml"
    if setup == "bad-yaml":
        path.write_text("a: [1, 2\n")
    elif setup == "no-engines":
        write(path, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    rc, _, err = run("-f", str(path))
    assert rc == 2 and err


def test_json_output(tmp_path: Path) -> None:
    f1 = write(tmp_path / "a.yaml", engine("a"))
    f2 = write(
        tmp_path / "b.yaml",
        engine(
            "b",
            traffic={"inputTokens": {"mean": 1000, "max": 2000}, "outputTokens": {"mean": 200, "max": 500}},
            build={},
        ),
    )
    rc, out, _ = run("-f", f1, "-f", f2, "-o", "json", "--compiler", "test")
    assert rc == 0
    docs = json.loads(out)
    assert [d["name"] for d in docs] == ["a", "b"]
    for d in docs:
        assert {"name", "namespace", "valid", "errors", "engineDigest", "build", "memory"} <= set(d)
        assert {"maxBatchSize", "maxInputLen", "maxSeqLen", "maxNumTokens"} <= set(d["build"])
        assert {"requiredBytesPerGpu", "availableBytesPerGpu", "fits"} <= set(d["memory"])
        assert "action" not in d
        assert d["engineInputs"]["compiler"] == "test"
    assert docs[1]["shapesFromTraffic"] and docs[1]["build"]["maxSeqLen"] == 2500


def test_json_errors_are_field_message_pairs(tmp_path: Path) -> None:
    f = write(tmp_path / "a.yaml", engine("a", parallelism={"tensor": 3}))
    rc, out, _ = run("-f", f, "-o", "json")
    assert rc == 1
    (doc,) = json.loads(out)
    assert doc["valid"] is False
    assert {"field": "spec.parallelism.tensor"}.items() <= doc["errors"][0].items()
    assert set(doc["errors"][0]) == {"field", "message"}


def test_against_file_actions(tmp_path: Path) -> None:
    old = write(
        tmp_path / "old.yaml",
        engine("same"),
        engine("scaled"),
        engine("bumped"),
        engine("gone"),
    )
    new = write(
        tmp_path / "new.yaml",
        engine("same", rebuildPolicy={"mode": "Auto"}),
        engine("scaled", serving={"replicas": 4}),
        engine(
            "bumped",
            model={
                "source": {"huggingFace": {"repo": "meta-llama/Llama-3.1-8B-Instruct", "revision": "fff"}},
                "catalog": "llama-3.1-8b",
            },
        ),
        engine("fresh"),
        engine("same", namespace="other"),
    )
    rc, out, _ = run("-f", new, "--against", old, "-o", "json")
    assert rc == 0
    actions = {(d["namespace"], d["name"]): d["action"] for d in json.loads(out)}
    assert actions == {
        ("ml", "same"): "nothing",
        ("ml", "scaled"): "rollout",
        ("ml", "bumped"): "rebuild",
        ("ml", "fresh"): "create",
        ("other", "same"): "create",
    }
    because = {(d["namespace"], d["name"]): d["because"] for d in json.loads(out)}
    # Each verdict names what moved, old -> new: the weights revision rebuilds, the replicas roll out.
    assert because[("ml", "bumped")] == ['model.source.huggingFace.revision: "0e9e39f" → "fff"']
    assert because[("ml", "scaled")] == ["serving.replicas: 1 → 4"]
    assert because[("ml", "same")] == [] and because[("ml", "fresh")] == []
    rc, text, _ = run("-f", new, "--against", old)
    assert "action:   rollout" in text and "because:  serving.replicas: 1 → 4" in text


def test_a_rebuild_names_the_effective_setting_not_the_spelling(tmp_path: Path) -> None:
    """An fp8ContextFmha written out as upstream forces it moves nothing; a shape change names the BuildConfig
    field."""
    cal = {"dataset": {"s3": {"uri": "s3://b/cal/"}}}
    precision = {"quantization": "fp8", "kvCacheDtype": "fp8", "calibration": cal}
    old = write(tmp_path / "old.yaml", engine("e", precision=precision))
    explicit = engine("e", precision=precision)
    explicit["spec"]["build"]["fp8ContextFmha"] = True
    same = write(tmp_path / "same.yaml", explicit)
    rc, out, _ = run("-f", same, "--against", old, "-o", "json")
    assert rc == 0 and json.loads(out)[0]["action"] == "nothing", out
    grown = engine("e", precision=precision)
    grown["spec"]["build"]["maxBatchSize"] = 2 * grown["spec"]["build"]["maxBatchSize"]
    rc, out, _ = run("-f", write(tmp_path / "grown.yaml", grown), "--against", old, "-o", "json")
    doc = json.loads(out)[0]
    assert doc["action"] == "rebuild"
    assert any(r.startswith("engine.build_config.max_batch_size: ") for r in doc["because"]), doc["because"]


def test_against_unreadable_file_exits_2(tmp_path: Path) -> None:
    f = write(tmp_path / "a.yaml", engine("a"))
    rc, _, err = run("-f", f, "--against", str(tmp_path / "nope.yaml"))
    assert rc == 2 and "nope.yaml" in err


def test_against_cluster_without_kubeconfig_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    f = write(tmp_path / "a.yaml", engine("a"))
    rc, _, err = run("-f", f, "--against", "cluster:nowhere")
    assert rc == 2 and "cluster:nowhere" in err


def test_against_cluster_without_the_client_library_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "kubernetes", None)  # installed without the [cluster] extra
    f = write(tmp_path / "a.yaml", engine("a"))
    rc, _, err = run("-f", f, "--against", "cluster")
    assert rc == 2 and "llmengine-operator[cluster]" in err


def test_against_cluster_reads_live_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmengine import plan_cli as cli

    live = engine("a")
    calls: list[tuple[str | None, str | None]] = []

    def fake_cluster(context: str | None, kwargs: dict[str, Any], kubeconfig: str | None = None) -> list[cli.Entry]:
        calls.append((context, kubeconfig))
        return [cli._entry(live, "cluster", kwargs)]

    monkeypatch.setattr(cli, "read_cluster", fake_cluster)
    f = write(tmp_path / "a.yaml", engine("a", serving={"replicas": 2}))
    rc, out, _ = run("-f", f, "--against", "cluster", "-o", "json")
    assert rc == 0 and calls == [(None, None)]
    assert json.loads(out)[0]["action"] == "rollout"
    # kubectl's flags: --context and --kubeconfig reach the cluster read; cluster:CTX still names a context.
    run("-f", f, "--against", "cluster", "--context", "prod", "--kubeconfig", "/k/config")
    run("-f", f, "--against", "cluster:staging")
    assert calls[1:] == [("prod", "/k/config"), ("staging", None)]


def test_a_manifest_without_a_namespace_is_compared_in_the_namespace_given(tmp_path: Path) -> None:
    live = engine("a", namespace="team-a")
    doc = engine("a", serving={"replicas": 2})
    del doc["metadata"]["namespace"]
    old, new = write(tmp_path / "old.yaml", live), write(tmp_path / "new.yaml", doc)
    _, out, _ = run("-f", new, "--against", old, "-o", "json")
    assert json.loads(out)[0]["action"] == "create"  # default/a is not team-a/a
    _, out, _ = run("-f", new, "--against", old, "-n", "team-a", "-o", "json")
    assert json.loads(out)[0]["action"] == "rollout" and json.loads(out)[0]["namespace"] == "team-a"


def test_directories_recursively_and_yaml_output(tmp_path: Path) -> None:
    (tmp_path / "team" / "deep").mkdir(parents=True)
    write(tmp_path / "team" / "a.yaml", engine("a"))
    write(tmp_path / "team" / "deep" / "b.yml", engine("b"))
    (tmp_path / "team" / "notes.txt").write_text("not a manifest")
    rc, out, _ = run("-f", str(tmp_path / "team"), "-o", "yaml")
    assert rc == 0 and [d["name"] for d in yaml.safe_load(out)] == ["a"]
    rc, out, _ = run("-f", str(tmp_path / "team"), "-R", "-o", "yaml")
    assert [d["name"] for d in yaml.safe_load(out)] == ["a", "b"]


def test_an_llmengine_with_a_mistyped_api_group_is_an_error_not_skipped(tmp_path: Path) -> None:
    typo = engine("typo")
    typo["apiVersion"] = "llmengine.example/v1alpha1"
    rc, out, _ = run("-f", write(tmp_path / "a.yaml", engine("ok"), typo), "-o", "json")
    docs = {d["name"]: d for d in json.loads(out)}
    assert rc == 1 and docs["ok"]["valid"] and not docs["typo"]["valid"]
    assert docs["typo"]["errors"][0]["field"] == "apiVersion"


def test_kubectl_plugin_runs_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmengine.cli import kubectl_main

    assert kubectl_main(["plan", "-f", write(tmp_path / "a.yaml", engine("a")), "-n", "ml", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["namespace"] == "ml"
    assert kubectl_main(["apply"]) == 2


def test_kind_list_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": [engine("a"), engine("b")]}
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(doc)))
    rc, out, _ = run("-f", "-", "-o", "json")
    assert rc == 0 and [d["name"] for d in json.loads(out)] == ["a", "b"]


def test_default_store_flag(tmp_path: Path) -> None:
    f = write(tmp_path / "a.yaml", engine("a"))
    assert run("-f", f, "--default-store", "s3://bucket/prefix")[0] == 0
    assert run("-f", f, "--default-store", "bucket")[0] == 2


def _live(**spec: Any) -> dict[str, Any]:
    obj = engine("llama", **spec)
    obj["status"] = {
        "traffic": {
            "requests": 1200,
            "windowSeconds": 900,
            "inputTokens": {"p50": 1500, "p99": 3000, "max": 3072},
            "outputTokens": {"p50": 200, "p99": 600, "max": 1024},
            "concurrency": {"p50": 20, "p99": 40, "max": 64},
            "rejectedTooLong": 2,
        },
        "envelope": {
            "maxInputLen": 2048,
            "maxSeqLen": 4096,
            "maxBatchSize": 64,
            "autoShapes": {"max_input_len": 3840},
            "recommendation": {"patch": '{"spec":{"build":{"maxInputLen":3840}}}'},
        },
        "conditions": [
            {"type": "EnvelopeExceeded", "status": "True", "reason": "TrafficExceedsEngine", "message": "maxInputLen"}
        ],
    }
    return obj


def test_against_a_running_resource_shows_observed_traffic_next_to_the_envelope(tmp_path: Path) -> None:
    new = write(tmp_path / "new.yaml", engine("llama"))
    live = write(tmp_path / "live.yaml", _live())
    code, out, _ = run("-f", new, "--against", live)
    assert code == 0
    assert "observed: 1200 requests over 900s; prompt p50/p99/max 1500/3000/3072 vs maxInputLen 2048" in out
    assert "in flight per pod 20/40/64 vs maxBatchSize 64" in out and "refused too long 2" in out
    assert "envelope: EnvelopeExceeded=True (TrafficExceedsEngine)" in out
    assert 'patch:    {"spec":{"build":{"maxInputLen":3840}}}' in out
    code, out, _ = run("-f", new, "--against", live, "-o", "json")
    (doc,) = json.loads(out)
    assert doc["observed"]["traffic"]["requests"] == 1200 and doc["observed"]["condition"]["status"] == "True"


def test_auto_raised_shapes_are_part_of_the_live_identity(tmp_path: Path) -> None:
    auto = {"rebuildPolicy": {"mode": "Auto"}}
    live = write(tmp_path / "live.yaml", _live(**auto))
    # The same spec with Auto: the live engine was built with maxInputLen 3840, and so is this plan.
    code, out, _ = run("-f", write(tmp_path / "same.yaml", engine("llama", **auto)), "--against", live, "-o", "json")
    assert code == 0
    (doc,) = json.loads(out)
    assert doc["action"] == "nothing" and doc["build"]["maxInputLen"] == 3840
    # Back to Manual: the spec's own shapes, another engine.
    code, out, _ = run("-f", write(tmp_path / "manual.yaml", engine("llama")), "--against", live, "-o", "json")
    assert code == 0
    (doc,) = json.loads(out)
    assert doc["action"] == "rebuild" and doc["build"]["maxInputLen"] == 2048


def test_chart_values_name_the_releases_as_helm_merges_them(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"images": {"trtllm": {"1.2.2": {"builder": "r/b:2", "server": "r/s:2"}}}}))
    for version, valid in (("1.2.1", True), ("1.2.2", True), ("1.2.3", False)):
        f = write(tmp_path / f"{version}.yaml", engine("e", trtllmVersion=version))
        _, out, _ = run("-f", f, "--chart-values", str(values), "-o", "json")
        doc = json.loads(out)[0]
        assert doc["valid"] is valid, (version, doc["errors"])
        if not valid:
            assert "configured: 1.2.1, 1.2.2" in doc["errors"][0]["message"]
