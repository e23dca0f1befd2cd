"""Operator settings, read from the environment (the Helm chart sets them from values)."""

from __future__ import annotations

import json
import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmengine.api.artifacts import StoreLocation
from llmengine.api.pods import OperandPods

DEFAULT_TRTLLM_VERSION = "1.2.1"
# PromQL label matchers as written inside braces: name, operator, double-quoted value; comma-separated (or none).
_MATCHER = r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*'
LABEL_MATCHERS = re.compile(rf"^({_MATCHER}(,{_MATCHER})*,?\s*)?$")
DEFAULT_BUILDER_IMAGE = f"ghcr.io/llmengine/llmengine-builder:0.1.0-trtllm{DEFAULT_TRTLLM_VERSION}"
DEFAULT_SERVER_IMAGE = f"ghcr.io/llmengine/llmengine-server:0.1.0-trtllm{DEFAULT_TRTLLM_VERSION}"
DEFAULT_ENGINE_CACHE_BUDGET = 200 * 1024**3
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
_FACTORS = (
    {"": 1} | {u: 1000**i for i, u in enumerate("kMGTPE", 1)} | {u + "i": 1024**i for i, u in enumerate("KMGTPE", 1)}
)


def quantity_bytes(value: object) -> int:
    """Bytes of a Kubernetes quantity ("200Gi", "500G", 1073741824); ValueError naming the value otherwise."""
    if isinstance(value, int):
        return value
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(f"{value!r} is not a byte quantity (e.g. 200Gi, 500G or a number of bytes)")
    return int(float(m.group(1)) * _FACTORS[m.group(2) or ""])


class ImagePair(BaseModel):
    """The builder and server images made from one TensorRT-LLM release: an engine only loads with the release
    that built it, so both come from the same base."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    builder: str = Field(min_length=1)
    server: str = Field(min_length=1)


class ImageCatalog(BaseModel):
    """TensorRT-LLM versions engines may name (spec.trtllmVersion) and the images that build and serve each.

    The version a spec names selects the pair; a version with no pair is refused at admission with the list of
    configured ones. The chart fills this from `images.trtllm` and `images.defaultTrtllmVersion`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_version: str = DEFAULT_TRTLLM_VERSION
    versions: dict[str, ImagePair] = Field(
        default_factory=lambda: {
            DEFAULT_TRTLLM_VERSION: ImagePair(builder=DEFAULT_BUILDER_IMAGE, server=DEFAULT_SERVER_IMAGE)
        }
    )

    @model_validator(mode="after")
    def _default_is_configured(self) -> ImageCatalog:
        if self.default_version not in self.versions:
            raise ValueError(
                f"default TensorRT-LLM version {self.default_version} has no images: configured "
                f"{', '.join(sorted(self.versions)) or 'none'}"
            )
        return self

    def resolve(self, version: str) -> ImagePair | None:
        return self.versions.get(version)

    def configured(self) -> str:
        return ", ".join(sorted(self.versions))


class OperatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    images: ImageCatalog = Field(default_factory=ImageCatalog)
    image_pull_policy: str = "IfNotPresent"
    # "test" swaps TensorRT-LLM for the test compiler (local clusters and tests only); it changes engine identity.
    compiler: Literal["tensorrt-llm", "test"] = "tensorrt-llm"
    test_engine_bytes: int | None = None
    default_store: StoreLocation | None = None
    # Name of a Secret (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) expected in an engine's namespace when the
    # engine uses the default store without its own credentials reference.
    default_store_secret: str | None = None
    # How the pods of default-store engines reach the store. "isolated": builds run in build_namespace (the
    # operator's) with default_store_secret there, and benchmark and serving pods read their engine through
    # presigned URLs in a Secret per engine, valid grant_seconds; no store key enters an engine's namespace.
    # "engineNamespace": builds run in the engine's namespace and every pod reads default_store_secret there.
    store_access: Literal["isolated", "engineNamespace"] = "engineNamespace"
    build_namespace: str | None = None
    # SigV4 presigned URLs last at most 7 days; the operator renews a grant once half of this has passed.
    grant_seconds: int = Field(default=12 * 3600, ge=600, le=7 * 24 * 3600)
    build_concurrency_per_pool: int = Field(default=2, ge=1)
    build_active_deadline_seconds: int = 4 * 3600
    build_ttl_seconds_after_finished: int = 24 * 3600
    build_max_attempts: int = Field(default=5, ge=1)
    build_backoff_base_seconds: float = 30.0
    build_backoff_max_seconds: float = 3600.0
    build_cpu: str = "8"
    build_memory: str = "64Gi"
    resync_seconds: float = 60.0
    metrics_port: int = 8080
    health_port: int = 8081
    json_logs: bool = True
    # Kopf peering (several replicas): a peer without a keep-alive for this long is gone; takeover is within it.
    peering_lifetime_seconds: int = Field(default=60, ge=5)
    # Traffic-aware rebuilds: "pods" scrapes each ready serving pod's metering endpoint; "prometheus" reads the same
    # counters from a Prometheus server that scrapes them (one PromQL query per interval for every engine); "off"
    # observes nothing.
    traffic_source: Literal["pods", "prometheus", "off"] = "pods"
    # Where a pod's metrics are: {pod_ip}, {port} (spec.serving.port), {namespace}, {pod} are filled in.
    traffic_url_template: str = "http://{pod_ip}:{port}/llmengine/metrics"
    traffic_scrape_timeout_seconds: float = Field(default=3.0, gt=0)
    # At most one scrape of an engine's pods per interval, however often its passes run (each status write, Job or
    # Deployment event wakes a pass).
    traffic_scrape_interval_seconds: float = Field(default=15.0, ge=0)
    # traffic.source prometheus: the server's base URL (the one /api/v1/query is under), extra label matchers for a
    # Prometheus that sees more than this cluster (`cluster="a"`), the query's timeout, and files (mounted from a
    # Secret and a ConfigMap) with a bearer token and the CA certificates that sign the server's.
    traffic_prometheus_url: str | None = Field(default=None, pattern=r"^https?://")
    traffic_prometheus_selector: str = ""
    traffic_prometheus_timeout_seconds: float = Field(default=10.0, gt=0)
    traffic_prometheus_bearer_token_file: str | None = None
    traffic_prometheus_ca_file: str | None = None
    # Defaults of the build, benchmark and serving pods (the chart's enginePods); each engine's spec.pods merges
    # over them (plan/pods.py).
    engine_pods: OperandPods = Field(default_factory=OperandPods)
    # A PEM file of the CA certificates the operator's own store client trusts (the chart mounts enginePods.caBundle
    # from the release namespace and names it here); unset: the system's trust (or AWS_CA_BUNDLE).
    ca_bundle: str | None = None
    # The node-local engine cache (docs/store.md): a directory on each node, mounted into the serving pods as a
    # hostPath, where pods on one node share verified engine copies; None: off. Render-only: never part of an
    # engine's identity (turning it on or off rolls the serving pods, nothing rebuilds).
    engine_cache_host_path: str | None = None
    # Bytes the cache may hold on a node (env: a quantity such as 200Gi); least recently used copies not in use go.
    engine_cache_size_budget: int = Field(default=DEFAULT_ENGINE_CACHE_BUDGET, gt=0)

    @field_validator("engine_cache_host_path")
    @classmethod
    def _absolute_host_path(cls, value: str | None) -> str | None:
        if value and not value.startswith("/"):
            raise ValueError(f"engine cache hostPath {value!r} must be an absolute path on the node")
        return value or None

    @field_validator("engine_cache_size_budget", mode="before")
    @classmethod
    def _budget_bytes(cls, value: object) -> int:
        return quantity_bytes(value)

    @model_validator(mode="after")
    def _isolated_builds_have_a_namespace(self) -> OperatorConfig:
        if self.store_access == "isolated" and not self.build_namespace:
            raise ValueError("store access 'isolated' needs LLMENGINE_BUILD_NAMESPACE (the operator's namespace)")
        return self

    @model_validator(mode="after")
    def _prometheus_source_is_reachable(self) -> OperatorConfig:
        if self.traffic_source == "prometheus" and not self.traffic_prometheus_url:
            raise ValueError(
                "traffic source 'prometheus' needs LLMENGINE_TRAFFIC_PROMETHEUS_URL (traffic.prometheus.url)"
            )
        if not LABEL_MATCHERS.match(self.traffic_prometheus_selector):
            raise ValueError(
                f"LLMENGINE_TRAFFIC_PROMETHEUS_SELECTOR (traffic.prometheus.selector) is not PromQL label matchers: "
                f'{self.traffic_prometheus_selector!r}; write them as name="value", comma-separated'
            )
        return self

    @property
    def isolated(self) -> bool:
        """Default-store engines build in the operator's namespace and serve through presigned URLs."""
        return self.store_access == "isolated" and self.default_store is not None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        e = dict(os.environ if env is None else env)
        kw: dict[str, object] = {}
        for field in cls.model_fields:
            key = "LLMENGINE_" + field.upper()
            if key in e and e[key] != "":
                kw[field] = e[key]
        bucket = e.get("LLMENGINE_STORE_BUCKET")
        if bucket:
            kw["default_store"] = StoreLocation(
                bucket=bucket,
                prefix=e.get("LLMENGINE_STORE_PREFIX", "engines"),
                endpoint=e.get("LLMENGINE_STORE_ENDPOINT") or None,
                region=e.get("LLMENGINE_STORE_REGION", "us-east-1"),
            )
        if e.get("LLMENGINE_STORE_SECRET"):
            kw["default_store_secret"] = e["LLMENGINE_STORE_SECRET"]
        kw["images"] = images_from_env(e)
        kw["engine_pods"] = engine_pods_from_env(e)
        if "json_logs" in kw:
            kw["json_logs"] = str(kw["json_logs"]).lower() in ("1", "true", "yes")
        return cls.model_validate(kw)


def images_from_env(env: dict[str, str]) -> ImageCatalog:
    """LLMENGINE_IMAGES (JSON: version -> {builder, server}) and LLMENGINE_DEFAULT_TRTLLM_VERSION; without
    LLMENGINE_IMAGES, LLMENGINE_BUILDER_IMAGE / LLMENGINE_SERVER_IMAGE name the default version's pair."""
    default = env.get("LLMENGINE_DEFAULT_TRTLLM_VERSION") or DEFAULT_TRTLLM_VERSION
    raw = env.get("LLMENGINE_IMAGES")
    if raw:
        try:
            table = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"LLMENGINE_IMAGES is not JSON: {exc}") from exc
        return ImageCatalog.model_validate({"default_version": default, "versions": table})
    pair = ImagePair(
        builder=env.get("LLMENGINE_BUILDER_IMAGE") or DEFAULT_BUILDER_IMAGE,
        server=env.get("LLMENGINE_SERVER_IMAGE") or DEFAULT_SERVER_IMAGE,
    )
    return ImageCatalog(default_version=default, versions={default: pair})


def engine_pods_from_env(env: dict[str, str]) -> OperandPods:
    """LLMENGINE_ENGINE_PODS: JSON of the pod defaults, shaped like an LLMEngine's spec.pods."""
    raw = env.get("LLMENGINE_ENGINE_PODS")
    if not raw:
        return OperandPods()
    try:
        return OperandPods.model_validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise ValueError(f"LLMENGINE_ENGINE_PODS is not JSON: {exc}") from exc
