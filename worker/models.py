"""Published models: the weights-only snapshots that embedders load to answer queries.

Every ``every`` updates (``FLAVA_PUBLISH_EVERY``; and at the first update of each
generation) the learner copies the backbone's weights, the only part that embeds: no
optimizer, replay memory or alignment module, and a background thread writes them to
``{FLAVA_MODELS_DIR}/model-{G:06d}-{N:010d}.pt`` atomically (temp file, fsync, rename, fsync
the directory), then lists the version in ``{p}:models`` (:class:`contract.wire.ModelCard`).
It keeps the newest ``keep`` (``FLAVA_KEEP_MODELS``); older files and their listing go.

A published version "G.N" names the weights after update N of generation G
(docs/versions.md), and the file is durable on its own: an embedder can load it after any
crash. It is not a checkpoint (nothing to resume learning from), and it is usually not a
checkpointed version either: checkpoints are written every 50 updates or 15 s, snapshots
every K updates, independently.

Why a directory and not Redis: a snapshot is 11 MB (``tiny``) to 742 MB (``base``), times
``keep``; Redis holds everything in memory under a ``maxmemory`` sized for
the clip backlog with ``noeviction`` (docs/durability.md), so weights there would turn into
503s for ``/ingest``, would be rewritten into the append-only file, and a ``base`` snapshot
passes Redis's 512 MB value limit. Redis lists the versions; the files hold the weights.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
import torch

from contract import wire
from worker import telemetry
from worker.core.files import atomic_torch_save
from worker.core.learner import Learner
from worker.core.media import MediaConfig
from worker.core.model import AVMAE, preset

log = logging.getLogger(__name__)
FORMAT = 1
NAME = re.compile(r"^model-(\d{6})-(\d{10})\.pt$")


@dataclass(frozen=True)
class PublishConfig:
    """How often the learner publishes, how many it keeps, and where."""

    directory: str = "var/models"  # shared with the embedders (a volume)
    every: int = 50  # updates between snapshots; 0: publish nothing
    keep: int = 5  # newest snapshots kept: the versions a client can pin


def model_path(directory: str | Path, version: str) -> Path:
    v = wire.ModelVersion.parse(version)
    return Path(directory) / f"model-{v.generation:06d}-{v.updates:010d}.pt"


def published_versions(directory: str | Path) -> list[wire.ModelVersion]:
    """The snapshots in ``directory``, oldest first."""
    found = [NAME.match(p.name) for p in Path(directory).glob("model-*.pt")]
    return sorted(wire.ModelVersion(int(m[1]), int(m[2])) for m in found if m)


class ModelPublisher:
    """Writes a snapshot every ``cfg.every`` updates, off the training thread."""

    def __init__(
        self, cfg: PublishConfig, client: redis.Redis, keys: wire.Keys, method: str, preset: str
    ):
        self.cfg = cfg
        self.redis = client
        self.keys = keys
        self.method = method
        self.preset = preset
        self._last: wire.ModelVersion | None = None
        self._writing: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="publish")

    @classmethod
    def from_settings(cls, settings, client: redis.Redis) -> ModelPublisher:
        """From WorkerSettings (``models_dir``, ``publish_every``, ``keep_models``)."""
        cfg = PublishConfig(settings.models_dir, settings.publish_every, settings.keep_models)
        keys = wire.Keys(settings.key_prefix)
        return cls(cfg, client, keys, settings.method, settings.preset)

    def maybe_publish(self, learner: Learner, version: str, step: int) -> bool:
        """Publish the learner's weights as ``version`` if due and no write is in flight."""
        v = wire.ModelVersion.parse(version)
        if not self._due(v):
            return False
        if self._writing is not None and not self._writing.done():
            telemetry.MODELS_PUBLISHED.labels("skipped_busy").inc()
            return False
        weights = {
            k: t.detach().to("cpu", copy=True) for k, t in learner.model.state_dict().items()
        }
        card = wire.ModelCard(
            str(v), v.generation, v.updates, step, self.method, self.preset, time.time()
        )
        self._writing = self._pool.submit(self._write, card, weights)
        self._last = v
        return True

    def flush(self) -> None:
        """Wait for the snapshot in flight (tests, shutdown)."""
        if self._writing is not None:
            self._writing.result()

    def _due(self, v: wire.ModelVersion) -> bool:
        if self.cfg.every <= 0:
            return False
        last = self._last
        return (
            last is None
            or last.generation != v.generation
            or v.updates >= last.updates + self.cfg.every
        )

    def _write(self, card: wire.ModelCard, weights: dict[str, torch.Tensor]) -> None:
        try:
            path = model_path(self.cfg.directory, card.version)
            atomic_torch_save({"format": FORMAT, "card": asdict(card), "model": weights}, path)
            self._register(card)
            self._prune()
        except (OSError, redis.RedisError) as exc:
            telemetry.MODELS_PUBLISHED.labels("failed").inc()
            log.error("model %s not published: %r", card.version, exc, extra=_fields(card))
            return
        telemetry.MODELS_PUBLISHED.labels("written").inc()
        log.info("model %s published", card.version, extra=_fields(card))

    def _register(self, card: wire.ModelCard) -> None:
        """List the version, with the monitors' summary of that time (if the worker has one)."""
        summary = self.redis.get(self.keys.monitor)
        monitor = json.loads(summary) if summary else {}
        card = wire.ModelCard(**{**asdict(card), "monitor": monitor})
        self.redis.hset(self.keys.models, card.version, card.to_json())

    def _prune(self) -> None:
        """Keep the newest ``keep`` files; the listing follows the files."""
        versions = published_versions(self.cfg.directory)
        kept = {str(v) for v in versions[-self.cfg.keep :]}
        for v in versions[: -self.cfg.keep]:
            model_path(self.cfg.directory, str(v)).unlink(missing_ok=True)
        listed = {wire.as_text(x) for x in self.redis.hkeys(self.keys.models)}
        if listed - kept:
            self.redis.hdel(self.keys.models, *sorted(listed - kept))


def _fields(card: wire.ModelCard) -> dict[str, object]:
    """The log fields of a published model (contract/logs.py)."""
    return {"version": card.version, "step": card.step}


@dataclass(frozen=True)
class LoadedModel:
    """A published snapshot ready to embed with, and the decoding its inputs need."""

    model: AVMAE
    card: wire.ModelCard
    media: MediaConfig


def load_model(directory: str | Path, version: str, device: str = "cpu") -> LoadedModel:
    """Load the snapshot ``version``; FileNotFoundError if it is not (or no longer) there."""
    saved = torch.load(model_path(directory, version), map_location="cpu", weights_only=True)
    card = wire.ModelCard(**saved["card"])
    cfg = preset(card.preset)
    model = AVMAE(cfg)
    model.load_state_dict(saved["model"])
    return LoadedModel(model.to(device).eval(), card, cfg.media())
