"""Worker settings, read from the environment with the ``FLAVA_`` prefix, and below it from the
config file at ``FLAVA_CONFIG`` (top level, ``[worker]`` / ``[embedder]``; contract/config.py)."""

from __future__ import annotations

import os
import socket
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from contract.config import FileSettings


def _default_consumer() -> str:
    # Stable across restarts of the same host/container, so own pending entries are found.
    return os.environ.get("HOSTNAME") or socket.gethostname()


class WorkerSettings(FileSettings):
    """Everything the learner process needs; ``FLAVA_METHOD=er`` etc. override each field."""

    model_config = SettingsConfigDict(env_prefix="FLAVA_", extra="ignore")
    config_table = "worker"

    environment: Literal["dev", "production"] = "dev"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "flava"
    consumer: str = Field(default_factory=_default_consumer)
    method: str = "flava"  # continual method: see worker.core.learner.LEARNERS
    preset: str = "tiny"  # model preset: tiny | small | base
    device: str = "auto"  # auto -> cuda when available, else cpu
    batch_size: int = 8
    block_ms: int = 1000  # XREADGROUP block time when the stream is empty
    claim_min_idle_ms: int = 120_000  # reclaim entries of consumers with no heartbeat this long
    max_deliveries: int = 5  # an entry delivered more often goes to the dead-letter stream
    # a dead-lettered clip's bytes stay this long (at most their ingest TTL) so that
    # POST /dead/{id}/retry can re-queue it; 0: deleted with the dead letter. Redis memory:
    # the bytes dead-lettered in the last hour, outside FLAVA_MAX_BACKLOG_BYTES
    dead_blob_ttl_s: int = 3600
    decode_processes: int = 2  # clips decode in this many processes, beside the update
    decode_timeout_s: float = 60.0  # a clip still decoding this long is dead-lettered
    decode_nice: int = 10  # decode processes yield the cores to the update (0: same priority)
    checkpoint_dir: str = "var/checkpoints"
    # uploads cut into windows keep their bytes here (written by the API: a shared volume)
    blob_dir: str = "var/blobs"
    # each clip's decoded inputs (fp16), kept for `flava reembed` and search indexes
    # (worker/inputs.py): "" keeps none; the oldest go past the bytes or the days
    inputs_dir: str = "var/inputs"
    inputs_max_bytes: int = 10 * 1024**3
    inputs_max_days: float = 30.0
    # checkpoints (worker/checkpointing.py): a clip is acked once one holds its update, after
    # `checkpoint_every` updates, `checkpoint_interval_s` seconds or an idle stream, whichever
    # comes first (and one at shutdown)
    checkpoint_every: int = 50
    checkpoint_interval_s: float = 15.0
    checkpoint_on_idle: bool = True
    keep_checkpoints: int = 3
    heartbeat_s: float = 5.0
    lease_ttl_s: float = 60.0  # one learner per group; after a crash another waits this long
    metrics_port: int = 0  # 0: no /metrics server
    seed: int = 0
    lr: float = 1e-4  # Adam lr of the backbone's online updates (the paper's)
    # contrastive weight of the online loss; None: the preset's (the paper's 0.1)
    nce_weight: float | None = None
    # weight of the distillation term toward the replayed clips' stored embeddings (DER, in
    # flava and derpp; 0 switches it off): the term that pulls the space toward where
    # earlier versions put the replayed clips (docs/compat.md measures what it does)
    der_alpha: float = Field(default=0.5, ge=0.0)
    max_steps: int = 0  # 0: run until stopped (tests and demos set a limit)
    # pretrained weights for a cold start (empty checkpoint dir): "builtin" (the package's
    # pretrained start for the preset, made by `flava pretrain`; from scratch when none is
    # shipped for it), "none" (from scratch), or a path to our checkpoint or a CAV-MAE /
    # STELLA state dict (see worker.warmstart)
    init_weights: str = "builtin"
    # where published embeddings come from: "pre_update" reuses FLAVA's no-grad all-token
    # pass (stamped with the pre-update version, ~1/6 the cost); "updated" re-embeds
    embed_with: Literal["pre_update", "updated"] = "pre_update"
    shutdown_grace_s: float = 60.0  # after SIGTERM: finish batch + checkpoint, else hard exit
    # drift and forgetting monitors (worker.monitoring)
    monitor_window: int = 64  # drift: clips in the reference window and in the recent window
    monitor_rereference: bool = False  # drift reference restarts when the train task changes
    # "drifted" (FlavaDrift) when nothing drifted: at most this often per test (permutation
    # test of MMD^2, alpha shared by the modalities); permutations per test
    monitor_drift_alpha: float = Field(default=0.01, gt=0.0, lt=1.0)
    monitor_drift_permutations: int = Field(default=999, ge=99)
    # Page-Hinkley on the drift z-score: tolerated rise, and lambda (worker/core/changepoint.py)
    monitor_change_delta: float = Field(default=1.0, ge=0.0)
    monitor_change_threshold: float = Field(default=40.0, gt=0.0)
    monitor_probes_per_window: int = 64  # held-out probe clips kept per window (float16)
    monitor_max_windows: int = 8  # windows tracked (bounds label cardinality); oldest dropped
    monitor_count_window: int = 500  # untagged training clips per count-based window
    monitor_every: int = 25  # steps between forgetting evaluations; 0 disables them
    monitor_recon: bool = True  # also measure probe reconstruction loss (one more pass)
    # cross-version R@1: current-version probe queries against the probes' embeddings this
    # many evaluations back ("1,2,4"; "" off; at most 4 lags, each 0..16; docs/compat.md)
    monitor_compat_lags: Annotated[tuple[int, ...], NoDecode] = (1, 2, 4)
    # published models for the embedders (worker/models.py): a weights-only snapshot every
    # `publish_every` updates (0: none) into `models_dir`, the newest `keep_models` kept
    models_dir: str = "var/models"
    publish_every: int = 50
    keep_models: int = 5

    @field_validator("monitor_compat_lags", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """The environment's form "1,2,4" -> (1, 2, 4); "" -> ()."""
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip())
        return value


def _default_embedder() -> str:
    return f"{_default_consumer()}-{os.getpid()}"  # several embedders may share a host


class EmbedderSettings(FileSettings):
    """The embedder process (worker/embedder.py): answers queries, never learns."""

    model_config = SettingsConfigDict(
        env_prefix="FLAVA_EMBEDDER_", extra="ignore", populate_by_name=True
    )
    config_table = "embedder"

    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias="FLAVA_REDIS_URL")
    key_prefix: str = Field("flava", validation_alias="FLAVA_KEY_PREFIX")
    models_dir: str = Field("var/models", validation_alias="FLAVA_MODELS_DIR")
    name: str = Field(default_factory=_default_embedder)
    device: str = "cpu"  # queries are small batches; "cuda" where a GPU is spare
    threads: int = 1  # torch threads: the learner keeps the other cores
    decode_threads: int = 2  # clips of a batch decode in this many threads
    max_batch: int = 32  # clips per model call
    max_wait_ms: int = 5  # after the first request, wait at most this long to fill a batch
    block_ms: int = 1000  # XREADGROUP block time when no query comes
    max_loaded: int = 4  # versions held in memory: the newest and recently pinned ones (LRU)
    reload_check_s: float = 1.0  # how often the newest published version is looked up
    claim_idle_ms: int = 5000  # take over queries another embedder left this long (it died)
    heartbeat_s: float = 2.0
    reply_ttl_s: int = 60  # a reply nobody reads expires
    metrics_port: int = 0
