"""Response models of every route, errors included (they document the OpenAPI page).

Routes that answer a ``JSONResponse`` themselves (several statuses, each its own shape) are
documented by these, not filtered through them; tests/service/test_schema.py checks that
real answers conform.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class QueryEmbedding(BaseModel):
    index: int = Field(description="the clip's position in the request")
    audio: list[float]
    video: list[float]


class QueryAnswer(BaseModel):
    """POST /embed: embeddings made by one published model; nothing was trained on."""

    model_version: str = Field(description='"G.N" of the published model (docs/versions.md)')
    step: int
    method: str
    dim: int
    count: int
    embeddings: list[QueryEmbedding]
    trained_on: bool = Field(False, description="always false: queries are never learned")
    served_by: str = Field(description="the embedder process that answered")
    batch_clips: int = Field(description="clips in the model call that embedded this request")


class ModelInfo(BaseModel):
    """A published weights-only snapshot that POST /embed?version= can pin."""

    version: str
    generation: int
    updates: int
    step: int
    method: str
    preset: str
    published_at: float
    monitor: dict = Field(
        default_factory=dict, description="the drift and forgetting summary when published"
    )


class ModelList(BaseModel):
    newest: str | None = Field(description="the version POST /embed uses when none is pinned")
    learner_version: str | None = Field(description="the learner's current version")
    models: list[ModelInfo] = Field(description="newest first")


class ClipDeleted(BaseModel):
    """DELETE /clips/{clip_id}: what was removed, and what could not be."""

    clip_id: str
    status: str = "deleted"
    state_was: str
    removed_from_queue: bool = Field(description="its stream entry was still there and is gone")
    in_flight: bool = Field(description="a learner had already read it when it was deleted")
    note: str


class SearchHit(BaseModel):
    clip_id: str = Field(description='a kept clip ("<upload>:<i>" for a window of an upload)')
    task: str
    score: float = Field(description="cosine similarity in the index's version's space")


class SearchAnswer(BaseModel):
    """GET and POST /search: nearest kept clips in one version's space."""

    version: str = Field(description='"G.N" of the index (and of the query\'s embedding)')
    direction: str = Field(description="a2v | v2a | a2a | v2v: query modality, gallery modality")
    k: int
    indexed: int = Field(description="clips in the index")
    search: str = Field(description="exact, or hnsw (approximate) for large indexes")
    hits: list[SearchHit] = Field(description="best first; clips deleted since are left out")


# ---- errors ---------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    """Why a request was refused; some carry more fields (a clip's ``index``, ``durable``)."""

    model_config = ConfigDict(extra="allow")
    code: str = Field(description="a stable name for the case, e.g. backlog_full, not_indexed")
    reason: str = Field(description="what happened and what to do, in words")


class ErrorBody(BaseModel):
    detail: ErrorDetail


class InvalidBody(BaseModel):
    """422: a parameter that breaks its pattern or bounds (FastAPI's list of issues), or an
    upload refused with a code (no_audio, too_many_clips, ...)."""

    detail: ErrorDetail | list[dict[str, Any]]


# ---- ingest and embeddings --------------------------------------------------------------------
class Ingested(BaseModel):
    """POST /ingest: 202 queued, or 200 duplicate (the same bytes are already held)."""

    clip_id: str = Field(description="sha256 of the bytes")
    status: str = Field(description="queued | duplicate")
    task: str
    purpose: str = Field(description="train | probe")
    queue_epoch: str | None = Field(None, description="pass to GET /embed?epoch= later")
    entry_id: str | None = Field(None, description="the stream entry (a queued clip)")
    state: str | None = Field(None, description="a duplicate's state now")
    windows: int | None = Field(None, description="a long upload: the windows it was cut into")
    span_s: float | None = None
    stride_s: float | None = None
    duration_s: float | None = None


class ClipAnswer(BaseModel):
    """GET /embed: a clip's or an upload's embeddings, progress or fate. ``status`` says which
    fields are there: ready (200), pending (202), unknown / other_version (404), dead /
    reset (410)."""

    model_config = ConfigDict(extra="allow")
    clip_id: str
    status: str = Field(description="ready | pending | unknown | other_version | dead | reset")
    state: str | None = Field(None, description="queued | embedded | learned | dead")
    model_version: str | None = None
    step: int | None = None
    method: str | None = None
    source: str | None = Field(None, description="index: from a `flava reembed` index")
    dim: int | None = None
    audio: list[float] | None = None
    video: list[float] | None = None
    reason: str | None = None
    windows: int | None = Field(None, description="an upload: its windows")
    windows_embedded: int | None = None
    windows_learned: int | None = None
    windows_dead: int | None = None
    versions: list[dict[str, Any]] | None = None
    pooled: dict[str, Any] | None = Field(None, description="one version's mean embedding")
    window_embeddings: list[dict[str, Any]] | None = None
    queue_epoch: str | None = None


class UploadDeleted(BaseModel):
    """DELETE /clips/{upload}: every window, its file and its backlog share removed."""

    model_config = ConfigDict(extra="allow")
    clip_id: str
    status: str = "deleted"
    state_was: str
    windows: int
    windows_removed_from_queue: int
    windows_in_flight: int
    note: str


# ---- health -----------------------------------------------------------------------------------
class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    """GET /readyz: 200 when ready, 503 with the same body when no learner heartbeat is fresh."""

    redis: str
    worker_heartbeat_age_s: float | None
    ready: bool
    model_version: str | None
    durable: bool
    checkpoint_error: str | None
    unacked: int


# ---- management (docs/operations.md) ----------------------------------------------------------
class Selection(BaseModel):
    on: bool
    since_step: int | None
    avm_accuracy_ema: float


class RollbackPending(BaseModel):
    id: str
    version: str | None
    requested_at: float


class ModelState(BaseModel):
    """GET /model: the learner as it last published itself, and what was asked of it."""

    version: str | None
    generation: int | None
    step: int | None
    method: str | None
    preset: str | None
    clips_learned: int | None
    updated_at: float | None
    worker_heartbeat_age_s: float | None
    selection: Selection | None = Field(description="FLAVA's patch-selection gate, if any")
    durable: bool
    checkpoint_error: str | None
    unacked: int
    durable_versions: list[str] = Field(description="what POST /model/rollback can go to")
    paused: bool = Field(description="as the worker last reported it")
    pause_requested: bool
    rollback_pending: RollbackPending | None
    last_rollback: dict[str, Any] | None


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    dead_at: float
    clip_id: str
    reason: str
    deliveries: int
    task: str
    purpose: str
    size: int
    upload: str | None = Field(None, description="a window: the upload it belongs to")
    start_s: float | None = None
    state: str | None = Field(description="the clip's state now")
    retryable: bool


class DeadLetters(BaseModel):
    total: int
    letters: list[DeadLetter] = Field(description="newest first")
    next: str | None = Field(description="pass as `before` for the next page")


class Requeued(BaseModel):
    clip_id: str
    status: str = "queued"
    entry_id: str


class PauseAnswer(BaseModel):
    pause_requested: bool
    paused: bool = Field(description="the worker's last report: it acts within one iteration")
    note: str


class RollbackAnswer(BaseModel):
    id: str
    version: str
    status: str = "requested"
    note: str
