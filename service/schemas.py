"""Response models of the query, model and delete routes (they document the OpenAPI page)."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
