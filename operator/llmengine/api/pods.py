"""What a platform team shapes on the pods the operator runs (build, benchmark and serving pods): registry pull
secrets, runtime and priority class, service account, extra labels, annotations, environment and volumes, an HTTP
proxy and a private CA bundle.

The same model carries the chart's defaults (OperatorConfig.engine_pods, from the `enginePods` value) and each
engine's spec.pods; plan/pods.py merges them. Nothing here enters the engine identity: a change rolls out the
serving pods and applies to the next build, never rebuilds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from llmengine.api.base import SpecModel, cel

# Volumes and mount paths the operator's own pods use; user volumes and mounts may not take them.
CA_VOLUME = "llmengine-ca"
CA_DIR = "/etc/llmengine/ca"
CA_FILE = "ca.crt"
CA_PATH = f"{CA_DIR}/{CA_FILE}"
ENGINE_CACHE_VOLUME = "engine-cache"  # the node-local engine cache of serving pods (render/cache.py)
ENGINE_CACHE_DIR = "/engine-cache"
OPERATOR_VOLUMES = frozenset(
    {"request", "work", "tmp", "shm", "engine", "engine-grant", CA_VOLUME, ENGINE_CACHE_VOLUME}
)
OPERATOR_MOUNT_PATHS = frozenset({"/work", "/tmp", "/engine", "/dev/shm", ENGINE_CACHE_DIR})
OPERATOR_MOUNT_ROOT = "/etc/llmengine"  # request files and the CA bundle live below it
# Variables a CA bundle sets, each pointing at the mounted file: boto3 (the store), requests (huggingface_hub
# before 1.0, transformers), and OpenSSL's default for Python's ssl, httpx (huggingface_hub 1.x) and curl.
CA_ENV = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


# ---------------------------------------------------------------------------------------------------------------
# environment


class KeyRef(SpecModel):
    """A key of a ConfigMap or Secret in the LLMEngine's namespace."""

    name: str = Field(min_length=1, description="Name of the ConfigMap or Secret, in the LLMEngine's namespace.")
    key: str = Field(min_length=1, description="The key.")


class EnvKeyRef(KeyRef):
    """A key of a ConfigMap or Secret in the LLMEngine's namespace (core/v1 ConfigMapKeySelector, SecretKeySelector)."""

    optional: bool | None = Field(default=None, description="Start the pod even when the object or key is missing.")


class FieldRef(SpecModel):
    """A field of the pod (core/v1 ObjectFieldSelector), e.g. metadata.name or status.podIP."""

    field_path: str = Field(min_length=1, description="Path of the field, e.g. metadata.namespace.")
    api_version: str | None = Field(default=None, description="Version of the schema fieldPath is written in (v1).")


class ResourceFieldRef(SpecModel):
    """A resource limit or request of a container (core/v1 ResourceFieldSelector)."""

    resource: str = Field(min_length=1, description="e.g. limits.memory or requests.cpu.")
    container_name: str | None = Field(default=None, description="Container; default the one the variable is in.")
    divisor: int | str | None = Field(default=None, description="Unit the value is expressed in, e.g. 1Mi.")


class EnvVarSource(SpecModel):
    """Where a variable's value comes from: exactly one of configMapKeyRef, secretKeyRef, fieldRef or
    resourceFieldRef (core/v1 EnvVarSource). Secrets stay in their Secret: the pod reads them, nothing copies them."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) + "
                    "(has(self.fieldRef) ? 1 : 0) + (has(self.resourceFieldRef) ? 1 : 0) == 1",
                    "valueFrom: set exactly one of configMapKeyRef, secretKeyRef, fieldRef or resourceFieldRef",
                )
            ]
        }
    )

    config_map_key_ref: EnvKeyRef | None = Field(default=None, description="A key of a ConfigMap.")
    secret_key_ref: EnvKeyRef | None = Field(default=None, description="A key of a Secret.")
    field_ref: FieldRef | None = Field(default=None, description="A field of the pod.")
    resource_field_ref: ResourceFieldRef | None = Field(default=None, description="A container's resource.")

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        given = [self.config_map_key_ref, self.secret_key_ref, self.field_ref, self.resource_field_ref]
        if sum(x is not None for x in given) != 1:
            raise ValueError("set exactly one of configMapKeyRef, secretKeyRef, fieldRef or resourceFieldRef")
        return self


class EnvVar(SpecModel):
    """An environment variable (core/v1 EnvVar): a value, or valueFrom a ConfigMap, Secret or pod field."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.valueFrom) && has(self.value) && size(self.value) > 0)",
                    "env: set value or valueFrom, not both",
                )
            ]
        }
    )

    name: str = Field(min_length=1, description="Variable name.")
    value: str = Field(default="", description="Variable value. Leave it out with valueFrom.")
    value_from: EnvVarSource | None = Field(
        default=None, description="Take the value from a ConfigMap or Secret key, or a field of the pod."
    )

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value_from is not None and self.value:
            raise ValueError(f"{self.name}: set value or valueFrom, not both")
        return self

    def container_env(self) -> dict[str, Any]:
        """The core/v1 EnvVar of a container: a plain one as written, one from a source without the empty value
        the API server defaults."""
        if self.value_from is None:
            return self.model_dump(by_alias=True, exclude_unset=True)
        source = self.value_from.model_dump(by_alias=True, exclude_none=True)
        return {"name": self.name, "valueFrom": source}


class ObjectRef(SpecModel):
    """A ConfigMap or Secret by name, in the LLMEngine's namespace."""

    name: str = Field(min_length=1, description="Name, in the LLMEngine's namespace.")
    optional: bool | None = Field(default=None, description="Start the pod even when it is missing.")


class EnvFromSource(SpecModel):
    """Every key of a ConfigMap or a Secret as variables (core/v1 EnvFromSource): exactly one of the two."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "(has(self.configMapRef) ? 1 : 0) + (has(self.secretRef) ? 1 : 0) == 1",
                    "envFrom: set exactly one of configMapRef or secretRef",
                )
            ]
        }
    )

    prefix: str | None = Field(default=None, description="Prepended to every key's variable name.")
    config_map_ref: ObjectRef | None = Field(default=None, description="A ConfigMap.")
    secret_ref: ObjectRef | None = Field(default=None, description="A Secret.")

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvFromSource:
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("set exactly one of configMapRef or secretRef")
        return self

    def container_env_from(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------------------------
# volumes


class Volume(BaseModel):
    """A core/v1 Volume: a name and one source (configMap, secret, persistentVolumeClaim, csi, ...)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"!(self.name in {sorted(OPERATOR_VOLUMES)})",
                    f"volumes: the names {', '.join(sorted(OPERATOR_VOLUMES))} are the operator's: set another name",
                )
            ]
        },
    )

    name: str = Field(min_length=1, description="Volume name, unique in the pod; volumeMounts refer to it.")

    @model_validator(mode="after")
    def _not_the_operators(self) -> Volume:
        if self.name in OPERATOR_VOLUMES:
            taken = ", ".join(sorted(OPERATOR_VOLUMES))
            raise ValueError(f"volume name {self.name!r} is the operator's own ({taken}): choose another")
        return self

    def pod_volume(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class VolumeMount(SpecModel):
    """Where a volume appears in every container of the pods (core/v1 VolumeMount)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"!(self.mountPath in {sorted(OPERATOR_MOUNT_PATHS)}) && self.mountPath != '{OPERATOR_MOUNT_ROOT}'"
                    f" && !self.mountPath.startsWith('{OPERATOR_MOUNT_ROOT}/')",
                    f"volumeMounts: /work, /tmp, /engine, /dev/shm and {OPERATOR_MOUNT_ROOT}/... are the operator's: "
                    "set another mountPath",
                )
            ]
        }
    )

    name: str = Field(min_length=1, description="Name of a volume in volumes.")
    mount_path: str = Field(
        min_length=1,
        pattern=r"^/",
        description=(
            "Absolute path in the containers. /work, /tmp, /engine, /dev/shm and /etc/llmengine (and below) are "
            "the operator's."
        ),
    )
    read_only: bool | None = Field(default=None, description="Mount read-only.")
    sub_path: str | None = Field(default=None, description="Mount this path inside the volume instead of its root.")
    sub_path_expr: str | None = Field(
        default=None, description="Like subPath, with $(VAR) references to the container's environment expanded."
    )

    @model_validator(mode="after")
    def _not_the_operators(self) -> VolumeMount:
        path = self.mount_path.rstrip("/") or "/"
        if path in OPERATOR_MOUNT_PATHS or path == OPERATOR_MOUNT_ROOT or path.startswith(OPERATOR_MOUNT_ROOT + "/"):
            raise ValueError(
                f"mountPath {self.mount_path} is the operator's (/work, /tmp, /engine, /dev/shm, "
                f"{OPERATOR_MOUNT_ROOT}/...): choose another"
            )
        return self

    def container_mount(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------------------------
# network: proxy and private CA


class Proxy(SpecModel):
    """An HTTP(S) proxy for the pods' outbound connections."""

    http_proxy: str | None = Field(default=None, description="Proxy URL for http:// requests.")
    https_proxy: str | None = Field(default=None, description="Proxy URL for https:// requests (the store, the Hub).")
    no_proxy: str | None = Field(
        default=None,
        description=(
            "Comma-separated hosts, domains (.example.com) and addresses reached directly: list in-cluster "
            "services (.svc, .cluster.local) and an in-cluster store endpoint here."
        ),
    )

    def env(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        given = (("HTTP_PROXY", self.http_proxy), ("HTTPS_PROXY", self.https_proxy), ("NO_PROXY", self.no_proxy))
        for name, value in given:
            if value:
                out += [{"name": name, "value": value}, {"name": name.lower(), "value": value}]
        return out


class CaBundle(SpecModel):
    """PEM certificates to trust: a key of a ConfigMap or of a Secret, exactly one of the two."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "(has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) == 1",
                    "caBundle: set exactly one of configMapKeyRef or secretKeyRef",
                )
            ]
        }
    )

    config_map_key_ref: KeyRef | None = Field(default=None, description="A ConfigMap key holding the PEM bundle.")
    secret_key_ref: KeyRef | None = Field(default=None, description="A Secret key holding the PEM bundle.")

    @model_validator(mode="after")
    def _exactly_one(self) -> CaBundle:
        if (self.config_map_key_ref is None) == (self.secret_key_ref is None):
            raise ValueError("set exactly one of configMapKeyRef or secretKeyRef")
        return self

    def pod_volume(self) -> dict[str, Any]:
        """The volume that puts the bundle's key at ca.crt, whatever the key is called."""
        if self.config_map_key_ref is not None:
            ref = self.config_map_key_ref
            return {"name": CA_VOLUME, "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": CA_FILE}]}}
        assert self.secret_key_ref is not None
        ref = self.secret_key_ref
        return {"name": CA_VOLUME, "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": CA_FILE}]}}

    @staticmethod
    def mount() -> dict[str, Any]:
        return {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True}

    @staticmethod
    def env() -> list[dict[str, str]]:
        return [{"name": name, "value": CA_PATH} for name in CA_ENV]


# ---------------------------------------------------------------------------------------------------------------
# the pods


class LocalObjectReference(SpecModel):
    name: str = Field(min_length=1, description="Name, in the LLMEngine's namespace.")


class PodSettings(SpecModel):
    """Settings of the pods the operator runs for an engine. None of them changes the engine: a change rolls out
    the serving pods and applies to the next build and benchmark. Merged over the operator's defaults (the chart's
    enginePods): a value set here replaces the default; labels, annotations, env, imagePullSecrets, volumes and
    volumeMounts merge by key (name, or mountPath), an entry here replacing the default's of the same key;
    envFrom entries add up."""

    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None,
        description="Secrets (kubernetes.io/dockerconfigjson, in the LLMEngine's namespace) to pull the builder "
        "and server images with, e.g. [{name: regcred}].",
    )
    runtime_class_name: str | None = Field(
        default=None, description="RuntimeClass of the pods, e.g. nvidia where the GPU runtime is not the default."
    )
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the pods.")
    service_account_name: str | None = Field(
        default=None,
        description="ServiceAccount the pods run as, in the LLMEngine's namespace (e.g. one with a cloud identity "
        "for the store). Default: the namespace's default account, its token not mounted.",
    )
    automount_service_account_token: bool | None = Field(
        default=None,
        description="Mount the ServiceAccount's API token into the pods. Default false: they never call the "
        "Kubernetes API.",
    )
    labels: dict[str, str] | None = Field(
        default=None,
        description="Extra labels on the pods. The operator's own labels (app.kubernetes.io/*, "
        "llmengine.io/*) keep their values.",
    )
    annotations: dict[str, str] | None = Field(default=None, description="Extra annotations on the pods.")
    env: list[EnvVar] | None = Field(
        default=None,
        description="Environment of every container in the pods: a value, or valueFrom a ConfigMap, Secret or pod "
        "field. A variable the operator sets itself (store, token, proxy, CA bundle) keeps the operator's value.",
    )
    env_from: list[EnvFromSource] | None = Field(
        default=None, description="Every key of a ConfigMap or Secret as environment of every container."
    )
    volumes: list[Volume] | None = Field(
        default=None,
        description=(
            "Extra volumes for the pods, as core/v1 Volume objects (a name and one source: configMap, secret, "
            "persistentVolumeClaim, csi, ...); mount them with volumeMounts. The names request, work, tmp, shm, "
            "engine, engine-grant and llmengine-ca are the operator's."
        ),
    )
    volume_mounts: list[VolumeMount] | None = Field(
        default=None, description="Where the extra volumes appear, in every container of the pods."
    )
    proxy: Proxy | None = Field(
        default=None,
        description=(
            "An HTTP(S) proxy for outbound connections (the store, the Hugging Face Hub or a mirror), set as "
            "HTTP_PROXY, HTTPS_PROXY and NO_PROXY and their lower-case forms in every container. Fields merge "
            "one by one over the defaults'."
        ),
    )
    ca_bundle: CaBundle | None = Field(
        default=None,
        description=(
            "PEM certificates the pods trust for TLS (an on-premises S3 endpoint, a Hugging Face mirror, a "
            "TLS-inspecting proxy): a ConfigMap key (as trust-manager writes one) or a Secret key in the "
            "LLMEngine's namespace. Mounted at /etc/llmengine/ca/ca.crt and named by AWS_CA_BUNDLE (the store "
            "client), REQUESTS_CA_BUNDLE and SSL_CERT_FILE (the Hugging Face download, Python's ssl, httpx, curl). "
            "It replaces the default trust: when the pods also reach public endpoints (huggingface.co, AWS S3), "
            "include the public roots (trust-manager: useDefaultCAs)."
        ),
    )


class OperandPods(PodSettings):
    """Settings of the pods the operator runs for this engine (see the fields), and under build and serving of
    one kind of pod only. Order of precedence, lowest first: the chart's enginePods, its enginePods.build or
    enginePods.serving, this object, its build or serving. A build Job shared by several LLMEngines of one
    identity runs with the settings of the engine that started it."""

    build: PodSettings | None = Field(
        default=None, description="Settings of the build and benchmark Job pods only, over the ones above."
    )
    serving: PodSettings | None = Field(
        default=None, description="Settings of the serving pods only, over the ones above."
    )
