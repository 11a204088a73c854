"""Prometheus metrics of the worker process (module constants: defined once per process)."""

from prometheus_client import Counter, Gauge, Histogram

CLIPS = Counter("flava_worker_clips_total", "Clips the worker finished, by outcome", ["outcome"])
STEPS = Counter("flava_train_steps_total", "Online updates, by result", ["result"])
STEP_SECONDS = Histogram(
    "flava_train_step_seconds",
    "Time of one online update (forward, backward, optimizer)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SECONDS = Histogram(
    "flava_batch_seconds",
    "Time from reading a batch to acking it (decode, update, embed, write)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DECODE_SECONDS = Histogram(
    "flava_decode_seconds",
    "Time to decode one clip into fbank + frames",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
LOSS = Gauge("flava_loss", "Last value of each loss term", ["term"])
TOKENS_KEPT = Gauge("flava_tokens_kept", "Tokens kept per clip by the selection", ["modality"])
FRACTION_EXCLUDED = Gauge(
    "flava_excluded_ratio", "Fraction of candidate tokens excluded by correlation"
)
AVM_ACCURACY = Gauge("flava_avm_accuracy_ratio", "AVM matching accuracy on the last batch")
MEMORY_FILL = Gauge("flava_replay_memory_clips", "Clips held in the replay memory")
MEMORY_BYTES = Gauge("flava_replay_memory_bytes", "Bytes held by the replay memory")
MODEL_VERSION = Gauge("flava_model_version", "Version of the model the worker publishes")
BACKLOG = Gauge("flava_worker_backlog_clips", "Clips accepted and not yet acked (worker view)")
PENDING = Gauge("flava_pending_clips", "Entries delivered to a consumer and not yet acked")
DEAD_LETTERS = Gauge("flava_worker_dead_letter_clips", "Entries in the dead-letter stream")
HEARTBEAT = Gauge("flava_worker_heartbeat_timestamp_seconds", "Unix time of the last heartbeat")
REDIS_ERRORS = Counter("flava_worker_redis_errors_total", "Redis errors the worker retried")
