"""The DiffusionDeployment status: what the controller writes (`diffusion_operator.status` and
`cache_status` build it with these types) and the CRD's status schema (tools/gen_crd.py)."""

from __future__ import annotations

from typing import Literal

from diffusion_runtime.contract.lines import CompileCacheResult, ModelSource
from pydantic import BaseModel, ConfigDict, Field


class _Status(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, frozen=True)


class Condition(_Status):
    """A condition."""

    type: str = Field(description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(None, description="CamelCase reason.")
    message: str | None = Field(None, description="Human-readable detail.")
    last_transition_time: str | None = Field(
        None,
        alias="lastTransitionTime",
        description="When status last changed.",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        None, alias="observedGeneration", description="Generation the condition was computed from."
    )


ModelCachePhase = Literal["Pending", "Downloading", "Ready", "Failed"]


class ModelCacheStatus(_Status):
    """The model cache (spec.model.cache): phase from the download Job, bytes from its progress lines."""

    phase: ModelCachePhase = Field(
        description="Pending (claim or Job not started), Downloading, Ready (complete and verified) or Failed "
        "(the Job ran out of retries)."
    )
    claim_name: str | None = Field(None, alias="claimName", description="The cache's PersistentVolumeClaim.")
    job_name: str | None = Field(None, alias="jobName", description="The download Job.")
    path: str | None = Field(None, description="Where the pods find the model (model.uri in runtime.yaml).")
    bytes_done: int | None = Field(
        None, alias="bytesDone", description="Bytes of the pipeline's files on the volume."
    )
    bytes_total: int | None = Field(None, alias="bytesTotal", description="Bytes of the pipeline's files.")
    files_done: int | None = Field(None, alias="filesDone", description="Files complete.")
    files_total: int | None = Field(None, alias="filesTotal", description="Files to download.")
    commit: str | None = Field(None, description="The commit the revision resolved to.")
    download_seconds: float | None = Field(
        None, alias="downloadSeconds", description="Duration of the download that completed the cache."
    )
    failed_attempts: int | None = Field(
        None, alias="failedAttempts", description="Download pods that failed."
    )
    message: str | None = Field(None, description="The last error, or where the download stands.")


class StartRecord(_Status):
    """One pod's start, as its runtime reported it (the `diffusion-runtime ready:` line of its log)."""

    pod: str = Field(description="The pod.")
    seconds: float = Field(
        ge=0, description="From the runtime process's start (the container's) to the runtime turning ready."
    )
    at: str = Field(description="When it turned ready.", json_schema_extra={"format": "date-time"})
    model: ModelSource = Field(
        description="downloaded (this pod fetched it from the Hub) or local (a model cache volume, a complete "
        "earlier download, a folder)."
    )
    compile: bool = Field(description="Whether the pod ran torch.compile (spec.compile).")
    compile_cache: CompileCacheResult = Field(
        alias="compileCache",
        description="The compile-artifact cache lookup: hit (artifacts restored), miss, corrupt, error, or off "
        "(no spec.compileCache, or no compile).",
    )
    download_seconds: float = Field(ge=0, alias="downloadSeconds", description="Fetching the model.")
    load_seconds: float = Field(ge=0, alias="loadSeconds", description="Loading it from local files.")
    warmup_seconds: float = Field(ge=0, alias="warmupSeconds", description="The warmup generations.")
    compile_seconds: float = Field(
        ge=0, alias="compileSeconds", description="torch.compile, within the warmup."
    )


class StartupStatus(_Status):
    """The newest cold and the newest warm start of the pods, from their runtimes' start lines."""

    last_cold: StartRecord | None = Field(
        None,
        alias="lastCold",
        description="A start that fetched the model from the Hub or ran torch.compile without a compile-cache hit.",
    )
    last_warm: StartRecord | None = Field(
        None,
        alias="lastWarm",
        description="A start with the model from local files and, with compile, the artifacts from the compile cache.",
    )


class RollbackStatus(_Status):
    """The last automatic rollback (controller/rollback.py): a new revision's pods failed while the previous
    revision had served, so the previous revision's rendered configuration was restored."""

    active: bool = Field(
        description="True while the restored configuration is held (the spec is still the one that failed); "
        "false once the spec changed and the operator rolls it out."
    )
    failed_spec_hash: str = Field(
        alias="failedSpecHash",
        description="Hash of the spec whose revision failed (not retried while unchanged).",
    )
    failed_generation: int = Field(alias="failedGeneration", description="Its metadata.generation.")
    failed_revision: str = Field(
        alias="failedRevision",
        description="Hash of the rendered configuration (ConfigMap + Deployment) that failed.",
    )
    failed_pod_hashes: list[str] = Field(
        alias="failedPodHashes",
        description="pod-template-hash of the failing pods (never blamed on a later revision).",
    )
    restored_revision: str = Field(
        alias="restoredRevision", description="Hash of the configuration restored."
    )
    restored_generation: int = Field(
        alias="restoredGeneration", description="The metadata.generation whose configuration was restored."
    )
    reason: str = Field(
        description="Why the pods failed (the Ready condition's reason, e.g. QualityGateFailed)."
    )
    message: str = Field(
        description="The failing pod and its own words (the gate's figures, the termination message)."
    )
    at: str = Field(
        description="When the configuration was restored.", json_schema_extra={"format": "date-time"}
    )


class QueueStatus(_Status):
    """The shared work queue (spec.queue): its demand and the front door."""

    demand: int | None = Field(
        None,
        ge=0,
        description="Jobs waiting + running in the queue (the front door's diffusion_queue_demand, as the HPA "
        "reads it from the custom metrics API); absent while no metrics adapter serves it.",
    )
    front_door: str | None = Field(
        None, alias="frontDoor", description="Ready/desired front-door pods (the API behind status.endpoint)."
    )
    scaled_to_zero: bool | None = Field(
        None,
        alias="scaledToZero",
        description="No runtime pod runs: requests wait in the queue and the first one wakes the deployment "
        "(autoscaling.minReplicas 0).",
    )


class DiffusionDeploymentStatus(_Status):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(
        None, alias="observedGeneration", description="The metadata.generation this status describes."
    )
    replicas: int | None = Field(None, description="Pods of the owned Deployment.")
    ready_replicas: int | None = Field(
        None, alias="readyReplicas", description="Ready pods (Ready means model loaded and warmed up)."
    )
    updated_replicas: int | None = Field(
        None, alias="updatedReplicas", description="Pods running the current configuration."
    )
    ready: str | None = Field(None, description="readyReplicas/desired, for printing.")
    selector: str | None = Field(None, description="Label selector of the pods (scale subresource).")
    endpoint: str | None = Field(
        None,
        description="In-cluster URL of the API: the front door's Service with spec.queue, else the pods'.",
    )
    config_hash: str | None = Field(
        None, alias="configHash", description="Hash of the rendered configuration; a change rolls the pods."
    )
    cache_tag: str | None = Field(
        None,
        alias="cacheTag",
        description="cache-dit's summary tag of the cache config (as cache_dit.strify).",
    )
    model_cache: ModelCacheStatus | None = Field(None, alias="modelCache")
    queue: QueueStatus | None = None
    startup: StartupStatus | None = None
    rollback: RollbackStatus | None = None
    conditions: list[Condition] | None = Field(
        None,
        description="Ready, Progressing, ConfigValid, Synced (children applied), QualityGate and RolledBack, per the Kubernetes API conventions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
