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
SELECTION_ACTIVE = Gauge(
    "flava_selection_active", "1 when FLAVA's importance-based selection drove the last step"
)
AVM_ACCURACY = Gauge("flava_avm_accuracy_ratio", "AVM matching accuracy on the last batch")
MEMORY_FILL = Gauge("flava_replay_memory_clips", "Clips held in the replay memory")
MEMORY_BYTES = Gauge("flava_replay_memory_bytes", "Bytes held by the replay memory")
MODEL_VERSION = Gauge(
    "flava_model_version", "Updates (N of the version G.N) of the model the worker publishes"
)
GENERATION = Gauge("flava_model_generation", "Generation (G of G.N) the worker publishes")
BACKLOG = Gauge("flava_worker_backlog_clips", "Clips accepted and not yet acked (worker view)")
PENDING = Gauge("flava_pending_clips", "Entries delivered to a consumer and not yet acked")
DEAD_LETTERS = Gauge("flava_worker_dead_letter_clips", "Entries in the dead-letter stream")
HEARTBEAT = Gauge("flava_worker_heartbeat_timestamp_seconds", "Unix time of the last heartbeat")
REDIS_ERRORS = Counter("flava_worker_redis_errors_total", "Redis errors the worker retried")
QUEUE_RESETS = Counter(
    "flava_queue_resets_total", "Times the consumer group was gone (Redis lost its data)"
)

# ---- durability (worker.checkpointing): an ack means the clip is in a durable checkpoint
CHECKPOINTS = Counter("flava_checkpoints_total", "Checkpoint writes, by result", ["result"])
CHECKPOINT_SECONDS = Histogram(
    "flava_checkpoint_write_seconds",
    "Time to write one checkpoint (off the training thread)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CHECKPOINT_SNAPSHOT_SECONDS = Histogram(
    "flava_checkpoint_snapshot_seconds",
    "Training-thread time to snapshot the state for a checkpoint",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
CHECKPOINT_FAILING = Gauge(
    "flava_checkpoint_failing", "1 while checkpoints cannot be written (acks have stopped)"
)
CHECKPOINT_FALLBACKS = Counter(
    "flava_checkpoint_fallbacks_total", "Unreadable newest checkpoints skipped on restore"
)
DURABLE_VERSION = Gauge("flava_durable_updates", "Updates (N of G.N) in the newest checkpoint")
UNACKED = Gauge("flava_unacked_clips", "Clips published and waiting for a durable checkpoint")
LEARNED_SECONDS = Histogram(
    "flava_ingest_to_learned_seconds",
    "Time from a clip's ingest to its ack (its update durable)",
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 300),
)

# ---- drift and forgetting monitors (worker.monitoring); window label = task tag, bounded
DRIFT_MMD2 = Gauge(
    "flava_drift_mmd2",
    "Unbiased MMD^2 (RBF, median bandwidth) of recent vs reference embeddings",
    ["modality"],
)
DRIFT_MEAN_SHIFT = Gauge(
    "flava_drift_mean_shift",
    "Distance between recent and reference mean embeddings, in standard deviations",
    ["modality"],
)
DRIFT_MMD2_THRESHOLD = Gauge(
    "flava_drift_mmd2_threshold",
    "MMD^2 above which the permutation test says drifted (false-alarm rate "
    "FLAVA_MONITOR_DRIFT_ALPHA over the modalities); +Inf: unreachable",
    ["modality"],
)
DRIFT_PVALUE = Gauge(
    "flava_drift_pvalue", "Permutation p-value of the MMD^2 of recent vs reference", ["modality"]
)
DRIFT_ZSCORE = Gauge(
    "flava_drift_zscore",
    "MMD^2 in standard deviations of its permutation null (the change-point test's series)",
    ["modality"],
)
DRIFT_CHANGE_POINTS = Counter(
    "flava_drift_change_points_total",
    "Rises of the drift z-score signalled by the Page-Hinkley test",
    ["modality"],
)
DRIFT_LAST_CHANGE = Gauge(
    "flava_drift_last_change_point_timestamp_seconds",
    "Unix time of the last drift change point (0: none yet)",
    ["modality"],
)
DRIFT_INPUT_ZSCORE = Gauge(
    "flava_drift_input_zscore",
    "Recent minus reference mean of an input statistic, in reference standard deviations",
    ["input"],
)
DRIFT_WINDOW_CLIPS = Gauge(
    "flava_drift_window_clips", "Clips held by the drift monitor's windows", ["kind"]
)
INPUT_LOUDNESS = Gauge(
    "flava_input_loudness", "Mean normalised log-mel fbank value of recent training clips"
)
INPUT_BRIGHTNESS = Gauge(
    "flava_input_brightness", "Mean frame pixel (0 to 1) of recent training clips"
)
PROBE_CLIPS = Gauge("flava_probe_clips", "Held-out probe clips kept per window", ["window"])
PROBE_RECALL = Gauge(
    "flava_probe_recall_ratio",
    "Retrieval recall at k on a window's held-out probes (k=avg: mean of R@1/5/10)",
    ["window", "direction", "k"],
)
PROBE_RECALL_AVG = Gauge(
    "flava_probe_recall_avg_ratio",
    "Probe recall averaged over windows, the one being learned excluded",
    ["direction", "k"],
)
PROBE_RECON_LOSS = Gauge(
    "flava_probe_reconstruction_loss",
    "Masked reconstruction MSE (audio + video, fixed masks) on a window's probes",
    ["window"],
)
FORGETTING = Gauge(
    "flava_forgetting_ratio",
    "Best-so-far minus current probe recall of a window",
    ["window", "direction", "k"],
)
FORGETTING_AVG = Gauge(
    "flava_forgetting_avg_ratio",
    "Forgetting averaged over windows, the one being learned excluded",
    ["direction", "k"],
)
# cross-version retrieval (compatible spaces): lag = evaluations back, a few (bounded)
CROSS_VERSION_RECALL = Gauge(
    "flava_cross_version_recall_ratio",
    "R@1 of a window's probes embedded by the current version against the same probes "
    "embedded by the version `lag` forgetting evaluations earlier",
    ["window", "direction", "lag"],
)
CROSS_VERSION_RELATIVE = Gauge(
    "flava_cross_version_relative_ratio",
    "Cross-version R@1 over same-version R@1 on the same probes (NaN: same-version R@1 is 0)",
    ["window", "direction", "lag"],
)
CROSS_VERSION_UPDATES = Gauge(
    "flava_cross_version_updates",
    "Updates between the current version and the one `lag` evaluations earlier",
    ["window", "lag"],
)
MONITOR_WINDOWS = Gauge("flava_monitor_windows", "Probe windows the forgetting monitor tracks")
MONITOR_EVALUATIONS = Counter(
    "flava_monitor_evaluations_total", "Forgetting evaluations over every window's probes"
)
MONITOR_SECONDS = Histogram(
    "flava_monitor_eval_seconds",
    "Time of one forgetting evaluation (re-embed every window's probes)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MODELS_PUBLISHED = Counter(
    "flava_models_published_total",
    "Weights-only snapshots for the embedders, by result (written, skipped_busy, failed)",
    ["result"],
)
# the embedder process (worker/embedder.py)
QUERY_REQUESTS = Counter(
    "flava_embedder_requests_total", "Query requests an embedder answered, by outcome", ["outcome"]
)
QUERY_BATCH_CLIPS = Histogram(
    "flava_embedder_batch_clips",
    "Clips in one model call of an embedder (dynamic batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
QUERY_SECONDS = Histogram(
    "flava_embedder_call_seconds",
    "Time of one embedder model call (decoded inputs to embeddings)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EMBEDDER_MODELS = Gauge("flava_embedder_loaded_models", "Model versions an embedder holds")
