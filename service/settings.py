"""API settings, read from the environment with the ``FLAVA_`` prefix, and below it from the
config file at ``FLAVA_CONFIG`` (its top level and its ``[api]`` table; contract/config.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator
from pydantic_settings import SettingsConfigDict

from contract.config import FileSettings
from contract.windows import span_s
from contract.wire import IngestLimits
from service.probe import ProbeLimits


class ApiSettings(FileSettings):
    """Everything the API process needs; ``FLAVA_REDIS_URL`` etc. override each field."""

    model_config = SettingsConfigDict(env_prefix="FLAVA_", extra="ignore")
    config_table = "api"

    environment: Literal["dev", "production"] = "dev"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "flava"
    api_token: str | None = None  # when set, /ingest and /embed need "Bearer <token>"
    # off by default: /metrics (Prometheus then sends the token) and /openapi.json + /docs
    # need the token too
    metrics_auth: bool = False
    docs_auth: bool = False
    # a clip of one example travels through Redis (claim-check): at most this many bytes,
    # and the cap of any multipart body
    max_body_bytes: int = 64 * 1024 * 1024
    # an upload longer than one example is cut into windows (contract/windows.py) and kept
    # in a file in `blob_dir` (a volume the workers share): a raw body up to this many bytes.
    # 8 GiB holds 3 h of 1080p H.264 at 6 Mbit/s (8.1 GB) or of 720p at 4 Mbit/s (5.4 GB)
    max_upload_bytes: int = 8 * 1024**3
    max_duration_s: float = 3 * 3600.0
    blob_dir: str = "var/blobs"
    index_dir: str = "var/index"  # search indexes written by `flava reembed` (contract/index.py)
    inputs_dir: str = "var/inputs"  # the worker's kept inputs: DELETE /clips removes a clip's
    preset: str = "tiny"  # the learners' model preset (FLAVA_PRESET): sets the window span
    window_stride_s: float | None = None  # between windows' starts; None: the span (no overlap)
    max_width: int = 4096  # DCI 4K
    max_height: int = 2160
    max_streams: int = 8
    # a client that stalls holds a connection and its buffers: the body must keep coming
    body_idle_s: float = 10.0  # no byte of the body for this long: 408
    body_grace_s: float = 10.0  # then at least body_min_rate bytes/s on average, else 408
    body_min_rate: int = 16 * 1024
    # ... and so must the head: request line and headers within this (service/http_protocol.py)
    header_timeout_s: float = 10.0
    limit_concurrency: int = 1024  # connections `flava serve` holds at once (then 503)
    blob_ttl_s: int = 24 * 3600  # claim-check bytes expire if no worker ever takes them
    max_backlog: int = 2000  # accepted-but-unacked entries before /ingest answers 429
    # ... and their bytes: 2,000 x 64 MiB must not fill Redis (keep Redis's maxmemory above it)
    max_backlog_bytes: int = 1024**3
    retry_after_s: int = 5
    heartbeat_max_age_s: float = 30.0  # /readyz wants a worker heartbeat this fresh
    # POST /embed (query embeddings, answered by `flava embedder` processes through Redis)
    query_timeout_s: float = 10.0  # wait this long for an embedder's reply, then 503
    query_max_clips: int = 32  # clips in one request (multipart `file` parts)
    query_max_bytes: int = 32 * 1024 * 1024  # a request's body: its clips travel inside Redis
    query_max_pending: int = 256  # requests waiting for embedders before 503 embedders_busy
    embedder_max_age_s: float = 10.0  # an embedder heartbeat this fresh, else 503 no_embedder

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> ApiSettings:
        if self.environment == "production" and not self.api_token:
            raise ValueError("FLAVA_API_TOKEN must be set when FLAVA_ENVIRONMENT=production")
        if (self.metrics_auth or self.docs_auth) and not self.api_token:
            raise ValueError("FLAVA_METRICS_AUTH / FLAVA_DOCS_AUTH need FLAVA_API_TOKEN")
        span_s(self.preset)  # an unknown preset is refused at start, not at the first upload
        if self.header_timeout_s <= 0:
            raise ValueError("FLAVA_HEADER_TIMEOUT_S must be positive")
        if self.window_stride_s is not None and self.window_stride_s <= 0:
            raise ValueError("FLAVA_WINDOW_STRIDE_S must be positive")
        if self.max_upload_bytes < self.max_body_bytes:
            raise ValueError("FLAVA_MAX_UPLOAD_BYTES must be at least FLAVA_MAX_BODY_BYTES")
        if self.max_backlog_bytes < self.max_body_bytes:
            raise ValueError(
                "FLAVA_MAX_BACKLOG_BYTES must be at least FLAVA_MAX_BODY_BYTES "
                "(else a clip of the largest allowed size is refused forever)"
            )
        return self

    def window_grid(self) -> tuple[float, float]:
        """(span, stride) of the windows an upload is cut into."""
        span = span_s(self.preset)
        return span, self.window_stride_s or span

    def ingest_limits(self) -> IngestLimits:
        return IngestLimits(self.blob_ttl_s, self.max_backlog, self.max_backlog_bytes)

    def probe_limits(self) -> ProbeLimits:
        return ProbeLimits(
            max_duration_s=self.max_duration_s,
            max_width=self.max_width,
            max_height=self.max_height,
            max_streams=self.max_streams,
        )
