"""The Redis contract between the API and the worker: key names, stream fields, scripts.

Both processes import this module and nothing else about Redis layout, so the wire
format cannot drift between them. It imports neither torch nor FastAPI.

Layout (prefix ``flava`` by default):

- ``{p}:clips``            stream of claim-check entries (fields: :class:`ClipEntry`)
- ``{p}:dead``             dead-letter stream (entry fields + ``reason`` + ``deliveries``)
- ``{p}:blob:{id}``        the clip's bytes, with a TTL (claim-check); an upload cut into
                           windows keeps its bytes in a file instead (``blob_dir/{id}``)
- ``{p}:clip:{id}``        hash: ``state`` (queued | embedded | learned | probed | dead),
                           ``entry_id``, ``task``, ``purpose``, ``received_at``, ``reason``,
                           ``trained`` (deliveries that ended in an update, see PUBLISH)
- ``{p}:clip:{up}``        an upload cut into windows (contract/windows.py): ``state``
                           (queued, then learned | probed | dead once every window settled),
                           ``windows``, ``windows_left``, ``windows_learned``, ``windows_dead``,
                           ``span_s``, ``stride_s``, ``duration_s``, ``size``, ``task``, ...
- ``{p}:clip:{up}:{i}``    window ``i`` of upload ``up``: a clip of its own (state, entry, ...)
- ``{p}:emb:{id}``         hash: ``audio``/``video`` (float32 little-endian bytes), ``dim``,
                           ``model_version`` ("G.N", docs/versions.md), ``step``, ``method``,
                           ``written_at``
- ``{p}:backlog``          integer: entries accepted and not yet acked (backpressure)
- ``{p}:backlog:bytes``    integer: the bytes of those entries (backpressure by size)
- ``{p}:epoch``            string: "<id>@<created unix s>", this queue's identity; a Redis
                           that lost its data gets a new one (:class:`QueueEpoch`)
- ``{p}:model``            hash: ``version`` ("G.N"), ``generation``, ``step``, ``method``,
                           ``updated_at``, ``durable_version``, ``checkpoint_error``
- ``{p}:lease``            string: the consumer that holds the learner lease (TTL)
- ``{p}:workers``          sorted set: consumer name -> last heartbeat (unix seconds)
- ``{p}:monitor``          string: JSON summary of the worker's drift and forgetting monitors
- ``{p}:models``           hash: version "G.N" -> JSON :class:`ModelCard`, the published
                           weights-only snapshots embedders can load (weights on disk, not here)
- ``{p}:queries``          stream of query requests (:class:`QueryRequest`), consumer group
                           ``embedders``; an entry is acked and deleted once answered
- ``{p}:reply:{request}``  list: the one :class:`QueryReply` to a query, with a TTL (BLPOP)
- ``{p}:embedders``        sorted set: embedder name -> last heartbeat (unix seconds)
- ``{p}:control``          hash: what an operator asked of the learner (POST /model/pause,
                           /resume, /rollback): ``paused`` ("1" | "0"), ``paused_at``,
                           ``rollback_id``/``rollback_version``/``rollback_requested_at``
                           while a rollback waits, ``rollback_result`` (JSON, the last one's
                           outcome). The worker reads it every iteration (:class:`Control`)
- ``{p}:deleted``          sorted set: clip id -> when DELETE /clips removed it; search leaves
                           these out of the indexes made before (contract/index.py: tombstones)

A clip is published (embedding written, state ``embedded``) right after the update that
included it, and acked (state ``learned``) only once that update is in a durable checkpoint
(docs/versions.md): a crash re-delivers exactly the clips not yet checkpointed.

Clip ids are the sha256 of the bytes, so a re-POST of the same clip is recognised.
Every multi-key change happens inside one Lua script, so a crash never leaves an
entry acked without its embedding, nor a clip marked queued without a stream entry.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
import time
from dataclasses import asdict, dataclass, field

GROUP = "learners"
QUERY_GROUP = "embedders"  # embedder processes share the query stream through this group
PURPOSES = ("train", "probe")  # probe clips are embedded but never trained on
SETTLED_STATES = ("learned", "probed", "dead")  # a clip's or an upload's final states
TASK_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
CLIP_ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")  # sha256 of the bytes: a clip or an upload
WINDOW_ID_PATTERN = re.compile(r"^[0-9a-f]{64}:[0-9]{1,7}$")  # "{upload}:{window index}"
VERSION_PATTERN = re.compile(r"^[0-9]{1,9}\.[0-9]{1,15}$")  # "G.N" (docs/versions.md)


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (tests and several deployments use distinct prefixes)."""

    prefix: str = "flava"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:clips"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def backlog(self) -> str:
        return f"{self.prefix}:backlog"

    @property
    def backlog_bytes(self) -> str:
        # the ack scripts derive it as backlog .. ':bytes', so their KEYS stay as they are
        return f"{self.backlog}:bytes"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    @property
    def model(self) -> str:
        return f"{self.prefix}:model"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def monitor(self) -> str:
        return f"{self.prefix}:monitor"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:lease"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def queries(self) -> str:
        return f"{self.prefix}:queries"

    @property
    def deleted(self) -> str:
        return f"{self.prefix}:deleted"

    @property
    def embedders(self) -> str:
        return f"{self.prefix}:embedders"

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{request_id}"

    def blob(self, clip_id: str) -> str:
        return f"{self.prefix}:blob:{clip_id}"

    def clip(self, clip_id: str) -> str:
        return f"{self.prefix}:clip:{clip_id}"

    def embedding(self, clip_id: str) -> str:
        return f"{self.prefix}:emb:{clip_id}"


@dataclass(frozen=True)
class ClipEntry:
    """The fields of one stream entry; the bytes themselves live at ``Keys.blob``."""

    clip_id: str  # a clip's sha256, or "{upload}:{window}" for a window of an upload
    size: int
    content_type: str
    task: str = ""
    purpose: str = "train"
    received_at: float = field(default_factory=time.time)
    upload: str = ""  # a window's upload (its bytes are the file ``blob_dir/{upload}``)
    start_s: float = -1.0  # a window's span start, s from the upload's start

    def to_fields(self) -> dict[str, str]:
        fields = {k: str(v) for k, v in asdict(self).items()}
        if not self.upload:  # a plain clip's entry stays as it always was
            del fields["upload"], fields["start_s"]
        return fields

    @classmethod
    def from_fields(cls, fields: dict) -> ClipEntry:
        f = {_text(k): _text(v) for k, v in fields.items()}
        return cls(
            clip_id=f["clip_id"],
            size=int(f["size"]),
            content_type=f.get("content_type", ""),
            task=f.get("task", ""),
            purpose=f.get("purpose", "train"),
            received_at=float(f.get("received_at", 0.0)),
            upload=f.get("upload", ""),
            start_s=float(f.get("start_s", -1.0)),
        )

    @property
    def window(self) -> bool:
        return bool(self.upload)


def window_id(upload_id: str, index: int) -> str:
    """The clip id of window ``index`` of an upload."""
    return f"{upload_id}:{index}"


@dataclass(frozen=True)
class Embedding:
    """A clip's embeddings as the worker wrote them, stamped with the model that made them."""

    audio: list[float]
    video: list[float]
    model_version: str  # "G.N": generation, updates (docs/versions.md)
    step: int
    method: str
    written_at: float

    def to_fields(self) -> dict[str, bytes | str]:
        return {
            "audio": pack_vector(self.audio),
            "video": pack_vector(self.video),
            "dim": str(len(self.audio)),
            "model_version": str(self.model_version),
            "step": str(self.step),
            "method": self.method,
            "written_at": repr(self.written_at),
        }

    @classmethod
    def from_fields(cls, fields: dict) -> Embedding:
        f = {_text(k): v for k, v in fields.items()}
        return cls(
            audio=unpack_vector(f["audio"]),
            video=unpack_vector(f["video"]),
            model_version=str(ModelVersion.parse(_text(f["model_version"]))),
            step=int(_text(f["step"])),
            method=_text(f.get("method", b"")),
            written_at=float(_text(f["written_at"])),
        )


@dataclass(frozen=True, order=True)
class ModelVersion:
    """A weight state's name "G.N" (docs/versions.md): generation G, N updates applied.

    Ordered by (G, N): a larger version was made later. A bare integer (written before
    generations existed) reads as generation 0."""

    generation: int
    updates: int

    def __str__(self) -> str:
        return f"{self.generation}.{self.updates}"

    @classmethod
    def parse(cls, text: str | int) -> ModelVersion:
        parts = str(text).strip().split(".")
        if len(parts) == 1:
            parts = ["0", parts[0]]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"model version {text!r} is not G.N (two non-negative integers)")
        return cls(int(parts[0]), int(parts[1]))


def pack_vector(values) -> bytes:
    """Float vector -> float32 little-endian bytes (accepts lists and numpy arrays)."""
    values = list(map(float, values))
    return struct.pack(f"<{len(values)}f", *values)


def unpack_vector(data: bytes) -> list[float]:
    """float32 little-endian bytes -> list of floats."""
    if len(data) % 4:
        raise ValueError(f"embedding blob of {len(data)} bytes is not a float32 vector")
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def as_text(value) -> str:
    """A Redis reply (bytes) or a str as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


_text = as_text


@dataclass(frozen=True)
class QueueEpoch:
    """The queue's identity, stored at ``Keys.epoch`` and created (SET NX) by whichever process
    first needs it. A Redis that lost its data has lost this key too, so the next process
    creates a new one: a client that holds the old id learns its clip vanished in a reset."""

    id: str  # 16 hex characters, random
    created_at: float  # unix seconds

    @classmethod
    def new(cls) -> QueueEpoch:
        return cls(secrets.token_hex(8), time.time())

    def encode(self) -> str:
        return f"{self.id}@{self.created_at:.3f}"

    @classmethod
    def decode(cls, value: str | bytes) -> QueueEpoch:
        epoch_id, _, created = _text(value).partition("@")
        return cls(epoch_id, float(created or 0.0))


EPOCH_PATTERN = re.compile(r"^[0-9a-f]{16}$")

# KEYS: clip, blob, stream, backlog, backlog_bytes, epoch.
# ARGV: blob, ttl_s, max_backlog, max_backlog_bytes, new epoch, then entry fields.
# Returns {outcome, detail, epoch}: {"queued", entry_id} | {"duplicate", state} |
# {"full", backlog} | {"full_bytes", backlog bytes}; epoch is "" if none exists yet.
# Only reads come before the first write, so a refused write (OOM, READONLY) changes nothing.
# A dead-lettered clip is accepted again (its old hash dropped); any other state is a duplicate.
INGEST_SCRIPT = """
local epoch = redis.call('GET', KEYS[6]) or ''
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'dead' then return {'duplicate', state, epoch} end
local backlog = tonumber(redis.call('GET', KEYS[4]) or '0')
if backlog >= tonumber(ARGV[3]) then return {'full', tostring(backlog), epoch} end
local bytes = tonumber(redis.call('GET', KEYS[5]) or '0')
if bytes + #ARGV[1] > tonumber(ARGV[4]) then return {'full_bytes', tostring(bytes), epoch} end
if epoch == '' then
  epoch = ARGV[5]
  redis.call('SET', KEYS[6], epoch)
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[3], '*', unpack(fields))
if state then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry_id', id, unpack(fields))
redis.call('INCR', KEYS[4])
redis.call('INCRBY', KEYS[5], #ARGV[1])
return {'queued', id, epoch}
"""


@dataclass(frozen=True)
class IngestLimits:
    """The INGEST script's limits (the API's settings; tests pass their own)."""

    blob_ttl_s: int
    max_backlog: int  # entries accepted and not yet acked
    max_backlog_bytes: int  # their bytes


def ingest_call(
    keys: Keys, entry: ClipEntry, blob: bytes, limits: IngestLimits
) -> tuple[list[str], list]:
    """(KEYS, ARGV) of INGEST_SCRIPT for one clip, so no caller orders them by hand."""
    cid = entry.clip_id
    script_keys = [
        keys.clip(cid),
        keys.blob(cid),
        keys.stream,
        keys.backlog,
        keys.backlog_bytes,
        keys.epoch,
    ]
    args = [blob, limits.blob_ttl_s, limits.max_backlog, limits.max_backlog_bytes]
    return script_keys, [*args, QueueEpoch.new().encode(), *flatten(entry.to_fields())]


# KEYS: upload, stream, backlog, epoch.
# ARGV: max_backlog, new epoch, clip key prefix ("{p}:clip:"), embedding key prefix, upload
# id, the upload's fields (as "n", then n name/value pairs), the entry fields every window
# shares (as "m", then m pairs), then each window's start (s).
# Returns {outcome, detail, epoch}: {"queued", windows} | {"duplicate", state} | {"full", backlog}.
# The windows count toward the backlog; an upload is admitted while the backlog is under its
# limit, however many windows it brings (else a long one could never get in). The bytes are
# in a file, so they do not count toward the backlog's bytes. A dead upload is accepted again.
INGEST_UPLOAD_SCRIPT = """
local epoch = redis.call('GET', KEYS[4]) or ''
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'dead' then return {'duplicate', state, epoch} end
local backlog = tonumber(redis.call('GET', KEYS[3]) or '0')
if backlog >= tonumber(ARGV[1]) then return {'full', tostring(backlog), epoch} end
if epoch == '' then
  epoch = ARGV[2]
  redis.call('SET', KEYS[4], epoch)
end
local clip, emb, up = ARGV[3], ARGV[4], ARGV[5]
local i = 6
local own = {}
for k = 1, 2 * tonumber(ARGV[i]) do own[k] = ARGV[i + k] end
i = i + 2 * tonumber(ARGV[i]) + 1
local shared = {}
for k = 1, 2 * tonumber(ARGV[i]) do shared[k] = ARGV[i + k] end
i = i + 2 * tonumber(ARGV[i]) + 1
local windows = #ARGV - i + 1
if state then
  local old = tonumber(redis.call('HGET', KEYS[1], 'windows') or '0')
  for w = 0, old - 1 do redis.call('DEL', clip .. up .. ':' .. w, emb .. up .. ':' .. w) end
  redis.call('DEL', KEYS[1])
end
for w = 0, windows - 1 do
  local cid = up .. ':' .. w
  local start = ARGV[i + w]
  local id = redis.call('XADD', KEYS[2], '*', 'clip_id', cid, 'start_s', start, unpack(shared))
  redis.call('HSET', clip .. cid, 'state', 'queued', 'entry_id', id, 'start_s', start,
             unpack(shared))
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'windows', windows, 'windows_left', windows,
           'windows_learned', 0, 'windows_dead', 0, unpack(own))
redis.call('INCRBY', KEYS[3], windows)
return {'queued', tostring(windows), epoch}
"""


@dataclass(frozen=True)
class Upload:
    """An upload cut into windows, as the API admits it (its bytes already in the file)."""

    upload_id: str  # sha256 of the bytes
    size: int
    content_type: str
    duration_s: float
    span_s: float
    stride_s: float
    starts: list[float]  # each window's span start (contract.windows.window_starts)
    task: str = ""
    purpose: str = "train"
    received_at: float = field(default_factory=time.time)

    def upload_fields(self) -> dict[str, str]:
        keys = ("size", "content_type", "duration_s", "span_s", "stride_s", "task", "purpose")
        fields = {k: str(getattr(self, k)) for k in keys}
        return {**fields, "received_at": repr(self.received_at), "upload": self.upload_id}

    def window_fields(self) -> dict[str, str]:
        """The fields every window's entry shares (``clip_id`` and ``start_s`` are its own)."""
        entry = ClipEntry("", 0, self.content_type, self.task, self.purpose, self.received_at)
        fields = {**entry.to_fields(), "upload": self.upload_id}
        del fields["clip_id"]
        return fields


def ingest_upload_call(keys: Keys, upload: Upload, max_backlog: int) -> tuple[list[str], list]:
    """(KEYS, ARGV) of INGEST_UPLOAD_SCRIPT."""
    uid = upload.upload_id
    script_keys = [keys.clip(uid), keys.stream, keys.backlog, keys.epoch]
    head = [max_backlog, QueueEpoch.new().encode(), keys.clip(""), keys.embedding(""), uid]
    own, shared = upload.upload_fields(), upload.window_fields()
    return script_keys, [
        *head,
        len(own),
        *flatten(own),
        len(shared),
        *flatten(shared),
        *(f"{start:.3f}" for start in upload.starts),
    ]


# KEYS: clip, embedding. ARGV: emb fields.
# Publishes a trained (or probed) clip's embedding before its update is durable: state
# ``embedded``, ``trained`` +1 (deliveries that ended in an update do not count as failures).
# Returns -1 and writes nothing if the clip is unknown (Redis lost its data meanwhile).
PUBLISH_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[2], unpack(ARGV))
redis.call('HSET', KEYS[1], 'state', 'embedded')
return redis.call('HINCRBY', KEYS[1], 'trained', 1)
"""

# A window's ack or dead letter also counts it on its upload's hash (KEYS: upload; ARGV:
# counter, the window's final state). Returns 2 when that was the upload's last window: its
# state becomes final (learned | probed, or dead when no window was) and the caller removes
# the upload's file. Shared by ACK_SCRIPT and DEAD_LETTER_SCRIPT (``settle_window``).
_SETTLE_WINDOW = """
local function settle_window(upload, counter, state)
  if not upload or upload == '' or redis.call('EXISTS', upload) == 0 then return 1 end
  redis.call('HINCRBY', upload, counter, 1)
  if redis.call('HINCRBY', upload, 'windows_left', -1) > 0 then return 1 end
  local learned = tonumber(redis.call('HGET', upload, 'windows_learned') or '0')
  local final = 'dead'
  if learned > 0 then final = state end
  redis.call('HSET', upload, 'state', final)
  return 2
end
"""

# KEYS: stream, clip, backlog, blob, upload ("" key for a plain clip).
# ARGV: group, entry_id, state, deliveries.
# Sets the clip's final state (learned | probed, or a duplicate's own state), then acks;
# returns 1 if this call acked (2: and it was its upload's last window, see _SETTLE_WINDOW).
# An unknown clip (Redis lost its data) gets no state written.
ACK_SCRIPT = (
    _SETTLE_WINDOW
    + """
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'state', ARGV[3], 'deliveries', ARGV[4])
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  redis.call('DECR', KEYS[3])
  local left = redis.call('DECRBY', KEYS[3] .. ':bytes', redis.call('HGET', KEYS[2], 'size') or 0)
  if left < 0 then redis.call('SET', KEYS[3] .. ':bytes', 0) end
  redis.call('XDEL', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[4])
  return settle_window(KEYS[5], 'windows_learned', ARGV[3])
end
return acked
"""
)

# KEYS: stream, dead, clip, backlog, blob, upload ("" key for a plain clip).
# ARGV: group, entry_id, reason, deliveries, dead blob ttl_s, fields.
# The dead letter is written before the ack; returns 1 if this call acked (2: and it was its
# upload's last window). The clip's state is written only if it still has one (DELETE
# removed it: no ghost ``dead`` hash). A plain clip's bytes are kept ``dead blob ttl_s``
# more (at most; 0: deleted now) so POST /dead/{id}/retry can re-queue it (RETRY_SCRIPT).
DEAD_LETTER_SCRIPT = (
    _SETTLE_WINDOW
    + """
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', 'entry_id', ARGV[2], 'reason', ARGV[3],
           'deliveries', ARGV[4], unpack(fields))
if redis.call('EXISTS', KEYS[3]) == 1 then  -- a deleted clip stays deleted
  redis.call('HSET', KEYS[3], 'state', 'dead', 'reason', ARGV[3])
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  redis.call('DECR', KEYS[4])
  local left = redis.call('DECRBY', KEYS[4] .. ':bytes', redis.call('HGET', KEYS[3], 'size') or 0)
  if left < 0 then redis.call('SET', KEYS[4] .. ':bytes', 0) end
  redis.call('XDEL', KEYS[1], ARGV[2])
  local keep = tonumber(ARGV[5])
  local ttl = redis.call('TTL', KEYS[5])
  if keep <= 0 then
    redis.call('DEL', KEYS[5])
  elseif ttl == -1 or ttl > keep then
    redis.call('EXPIRE', KEYS[5], keep)
  end
  return settle_window(KEYS[6], 'windows_dead', 'dead')
end
return acked
"""
)


def flatten(fields: dict) -> list:
    """{"a": 1, "b": 2} -> ["a", 1, "b", 2] (script ARGV order)."""
    return [x for pair in fields.items() for x in pair]


# ---- deleting a clip -------------------------------------------------------------------

# KEYS: clip, blob, embedding, stream, backlog. ARGV: learners' group.
# Removes the clip's hash, bytes and embedding. A clip not yet acked (queued or embedded) also
# loses its stream entry (XDEL), leaves the learners' pending list (XACK, so the learner's own
# ack or dead letter of it later is a no-op and releases nothing twice) and releases its
# backlog count and bytes here. Returns {state before ('' if unknown), entry removed 0|1,
# in flight 0|1 (a learner had read the entry: it may still train on the clip it holds)}.
DELETE_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('DEL', KEYS[2], KEYS[3])
  return {'', 0, 0}
end
local removed, in_flight = 0, 0
if state == 'queued' or state == 'embedded' then
  local entry = redis.call('HGET', KEYS[1], 'entry_id')
  local size = redis.call('HGET', KEYS[1], 'size') or 0
  if entry then
    local ok, pending = pcall(redis.call, 'XPENDING', KEYS[4], ARGV[1], entry, entry, 1)
    if ok and #pending > 0 then in_flight = 1 end
  end
  -- the counters first: an OOM Redis refuses them before anything else changed
  if redis.call('DECR', KEYS[5]) < 0 then redis.call('SET', KEYS[5], 0) end
  if redis.call('DECRBY', KEYS[5] .. ':bytes', size) < 0 then
    redis.call('SET', KEYS[5] .. ':bytes', 0)
  end
  if entry then
    pcall(redis.call, 'XACK', KEYS[4], ARGV[1], entry)  -- no group yet: nothing read it
    removed = redis.call('XDEL', KEYS[4], entry)
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {state, removed, in_flight}
"""


def delete_call(keys: Keys, clip_id: str) -> tuple[list[str], list]:
    """(KEYS, ARGV) of DELETE_SCRIPT for one clip."""
    script_keys = [
        keys.clip(clip_id),
        keys.blob(clip_id),
        keys.embedding(clip_id),
        keys.stream,
        keys.backlog,
    ]
    return script_keys, [GROUP]


# ---- published models and queries ------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """A published weights-only snapshot as ``{p}:models`` lists it (weights on disk)."""

    version: str  # "G.N"
    generation: int
    updates: int
    step: int  # updates attempted (skipped ones included) when it was published
    method: str
    preset: str
    published_at: float
    monitor: dict = field(default_factory=dict)  # the monitors' summary at that time

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        return cls(**json.loads(text))


def newest_version(versions) -> str | None:
    """The largest of some "G.N" names (bytes or str), by (G, N); None if there are none."""
    parsed = [ModelVersion.parse(_text(v)) for v in versions]
    return str(max(parsed)) if parsed else None


@dataclass(frozen=True)
class QueryRequest:
    """Clips to embed without learning, as the API adds them to ``{p}:queries``.

    The clips travel inside the entry (a query is answered in seconds, then deleted), so no
    claim-check blob can outlive it."""

    request_id: str  # 32 hex characters; the reply goes to ``Keys.reply(request_id)``
    clips: list[bytes]
    version: str = ""  # "G.N" pinned, or "" for the newest published
    deadline: float = 0.0  # unix s: the API stops waiting then; later, nobody reads a reply

    @classmethod
    def new(cls, clips: list[bytes], version: str, timeout_s: float) -> QueryRequest:
        return cls(secrets.token_hex(16), clips, version, time.time() + timeout_s)

    def to_fields(self) -> dict[str, bytes | str]:
        fields: dict[str, bytes | str] = {
            "request_id": self.request_id,
            "version": self.version,
            "deadline": repr(self.deadline),
            "count": str(len(self.clips)),
        }
        fields.update({f"clip:{i}": clip for i, clip in enumerate(self.clips)})
        return fields

    @classmethod
    def from_fields(cls, fields: dict) -> QueryRequest:
        f = {_text(k): v for k, v in fields.items()}
        count = int(_text(f["count"]))
        return cls(
            request_id=_text(f["request_id"]),
            clips=[f[f"clip:{i}"] for i in range(count)],
            version=_text(f.get("version", b"")),
            deadline=float(_text(f["deadline"])),
        )


@dataclass(frozen=True)
class QueryReply:
    """An embedder's answer: one (audio, video) pair per clip, or an error code and reason.

    Codes: ``undecodable`` (a clip the embedder cannot decode; ``index`` says which),
    ``version_unknown`` (pinned version not published, or pruned), ``no_model``."""

    status: str  # "ok" | "error"
    model_version: str = ""
    step: int = 0
    method: str = ""
    audio: list[list[float]] = field(default_factory=list)
    video: list[list[float]] = field(default_factory=list)
    code: str = ""
    reason: str = ""
    index: int = -1  # the failing clip of an ``undecodable`` error
    served_by: str = ""  # the embedder
    batch_clips: int = 0  # clips in the model call that made these embeddings
    call: int = 0  # that model call's number in the embedder (batching is visible)

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str | bytes) -> QueryReply:
        return cls(**json.loads(text))


# ---- operator control: pause, resume, rollback ------------------------------------------


@dataclass(frozen=True)
class Control:
    """``{p}:control`` as the worker reads it each iteration (one HGETALL)."""

    paused: bool = False
    rollback_id: str = ""  # a rollback waiting for the worker ("" if none)
    rollback_version: str = ""  # "G.N" of the durable checkpoint to go back to

    @classmethod
    def from_fields(cls, fields: dict) -> Control:
        f = {_text(k): _text(v) for k, v in fields.items()}
        return cls(f.get("paused") == "1", f.get("rollback_id", ""), f.get("rollback_version", ""))


# KEYS: control. ARGV: request id, version "G.N", requested at (unix s).
# Returns {"requested", id} or {"busy", the waiting request's id}: one rollback at a time.
REQUEST_ROLLBACK_SCRIPT = """
local waiting = redis.call('HGET', KEYS[1], 'rollback_id')
if waiting then return {'busy', waiting} end
redis.call('HSET', KEYS[1], 'rollback_id', ARGV[1], 'rollback_version', ARGV[2],
           'rollback_requested_at', ARGV[3])
return {'requested', ARGV[1]}
"""

# KEYS: control. ARGV: request id, result (JSON). The request leaves the hash only if it is
# still the one answered; the result is written either way.
FINISH_ROLLBACK_SCRIPT = """
if redis.call('HGET', KEYS[1], 'rollback_id') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'rollback_id', 'rollback_version', 'rollback_requested_at')
end
redis.call('HSET', KEYS[1], 'rollback_result', ARGV[2])
return 1
"""


# ---- dead letters: retry ----------------------------------------------------------------

# KEYS: clip, blob, stream, backlog, upload ("" key for a plain clip).
# ARGV: clip id, blob ttl_s (restored on the bytes), max_backlog, max_backlog_bytes.
# Re-queues a dead clip as INGEST would, from the fields its hash kept, if its bytes are
# still there: a plain clip's blob (kept DEAD_BLOB_TTL after its dead letter), a window's
# upload not yet settled (the worker removes the upload's file only once every window has).
# Returns {outcome, detail}: {"queued", entry_id} | {"unknown", ""} | {"not_dead", state} |
# {"bytes_gone", why} | {"full", backlog} | {"full_bytes", backlog bytes}.
RETRY_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'unknown', ''} end
if state ~= 'dead' then return {'not_dead', state} end
local window = KEYS[5] ~= ''
if window then
  local left = tonumber(redis.call('HGET', KEYS[5], 'windows_left') or '0')
  if left <= 0 then return {'bytes_gone', 'upload_settled'} end
elseif redis.call('EXISTS', KEYS[2]) == 0 then
  return {'bytes_gone', 'blob_expired'}
end
local backlog = tonumber(redis.call('GET', KEYS[4]) or '0')
if backlog >= tonumber(ARGV[3]) then return {'full', tostring(backlog)} end
local size = tonumber(redis.call('HGET', KEYS[1], 'size') or '0')
local bytes = tonumber(redis.call('GET', KEYS[4] .. ':bytes') or '0')
if not window and bytes + size > tonumber(ARGV[4]) then
  return {'full_bytes', tostring(bytes)}
end
local fields = {'clip_id', ARGV[1]}
for _, name in ipairs({'size', 'content_type', 'task', 'purpose', 'received_at', 'upload',
                       'start_s'}) do
  local value = redis.call('HGET', KEYS[1], name)
  if value then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
local id = redis.call('XADD', KEYS[3], '*', unpack(fields))
redis.call('HDEL', KEYS[1], 'reason', 'trained', 'deliveries')
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry_id', id)
redis.call('INCR', KEYS[4])
if window then
  redis.call('HINCRBY', KEYS[5], 'windows_dead', -1)
  redis.call('HINCRBY', KEYS[5], 'windows_left', 1)
else
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('INCRBY', KEYS[4] .. ':bytes', size)
end
return {'queued', id}
"""


def retry_call(keys: Keys, clip_id: str, limits: IngestLimits) -> tuple[list[str], list]:
    """(KEYS, ARGV) of RETRY_SCRIPT for a plain clip or a window ``{upload}:{i}``."""
    upload = clip_id.partition(":")[0] if WINDOW_ID_PATTERN.match(clip_id) else ""
    script_keys = [
        keys.clip(clip_id),
        keys.blob(clip_id),
        keys.stream,
        keys.backlog,
        keys.clip(upload) if upload else "",
    ]
    return script_keys, [clip_id, limits.blob_ttl_s, limits.max_backlog, limits.max_backlog_bytes]


def dead_at(entry_id: str) -> float:
    """When a dead letter was written (unix s): the ms part of its stream id."""
    return int(_text(entry_id).partition("-")[0]) / 1000
