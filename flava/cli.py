"""The ``flava`` command: serve, worker, embedder, embed, models, status, dead, reembed,
search, demo, push, bench.

Each subcommand imports only what it needs, so ``flava serve`` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from flava.procs import idle_openmp_threads_sleep  # before any subcommand imports torch

# The pyproject.toml extra that brings what each command imports beyond the base dependencies
# (the others need only those): the API image has no torch, the worker image no FastAPI.
EXTRAS = {
    "serve": "api",
    "worker": "worker",
    "embedder": "worker",
    "reembed": "worker",
    "pretrain": "worker",
    "demo": "demo",
    "bench": "dev",
}
OUR_PACKAGES = frozenset({"contract", "service", "worker", "flava", "bench"})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    idle_openmp_threads_sleep()
    if not _configure_logs(args):
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    from contract.redact import install as redact_logs

    redact_logs()  # no password (FLAVA_REDIS_URL) or token in any log line of the process
    try:
        return args.run(args) or 0
    except ModuleNotFoundError as exc:
        if not _installable(exc.name):
            raise
        print(_missing_extra(args.command, exc.name), file=sys.stderr)
        return 2


def _installable(module: str | None) -> bool:
    """Whether ``module`` is a third-party one, which an extra of ours brings."""
    top = (module or "").split(".")[0]
    return bool(top) and top not in sys.stdlib_module_names and top not in OUR_PACKAGES


def _missing_extra(command: str, module: str) -> str:
    extra = EXTRAS.get(command)
    spec = f"flava-stream[{extra}]" if extra else "flava-stream"
    return (
        f"flava {command}: the module {module!r} is not installed; "
        f"this command needs the {extra or 'base'} dependencies: pip install '{spec}'"
    )


def _configure_logs(args: argparse.Namespace) -> bool:
    """JSON lines or text (contract/logs.py): the flags, else FLAVA_LOG_*, else the config file.
    Sets args.log_level / args.log_format to what was chosen; False if the file is unusable."""
    from contract.logs import LogSettings, configure

    given = {"level": args.log_level, "format": args.log_format}
    try:
        settings = LogSettings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:  # a missing or malformed FLAVA_CONFIG, or a bad value
        print(f"flava: {exc}", file=sys.stderr)
        return False
    args.log_level = settings.level
    args.log_format = configure(settings.level, settings.format)
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flava", description=__doc__)
    p.add_argument("--log-level", default=None, help="default: FLAVA_LOG_LEVEL, else info")
    p.add_argument(
        "--log-format",
        choices=("auto", "json", "text"),
        default=None,
        help="JSON lines or text; auto: text at a terminal (default: FLAVA_LOG_FORMAT, else auto)",
    )
    sub = p.add_subparsers(required=True, metavar="COMMAND", dest="command")

    serve = sub.add_parser("serve", help="run the HTTP API (settings from FLAVA_* env)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (uvicorn workers); /metrics adds up all of them",
    )
    serve.set_defaults(run=_serve)

    worker = sub.add_parser("worker", help="run the online learner (settings from FLAVA_* env)")
    worker.add_argument(
        "--nproc", type=int, default=1, help="ranks of one learner (torchrun; docs/distributed.md)"
    )
    worker.add_argument("--max-restarts", type=int, default=10, help="torchrun's, with --nproc")
    worker.set_defaults(run=_worker)

    embedder = sub.add_parser(
        "embedder", help="answer POST /embed from published models (settings from FLAVA_* env)"
    )
    embedder.set_defaults(run=_embedder)

    config = sub.add_parser("config", help="the settings (FLAVA_CONFIG file + FLAVA_* env)")
    config_sub = config.add_subparsers(required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="every process's effective settings, masked")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_config_show)

    embed = sub.add_parser("embed", help="embed clip files without learning them (POST /embed)")
    embed.add_argument("files", nargs="+", type=Path)
    embed.add_argument("--version", default=None, help='pin a published model "G.N"')
    _client_arguments(embed)
    embed.set_defaults(run=_embed)

    models = sub.add_parser("models", help="list the published models (GET /models)")
    _client_arguments(models)
    models.set_defaults(run=_models)

    status = sub.add_parser(
        "status", help="the learner's state (GET /model, /monitor); pause, resume, roll back"
    )
    status.add_argument("action", nargs="?", choices=("pause", "resume", "rollback"))
    status.add_argument("--version", default=None, help='rollback: the durable "G.N" to go to')
    _client_arguments(status)
    status.set_defaults(run=_status)

    dead = sub.add_parser("dead", help="dead letters with reasons (GET /dead); --retry CLIP")
    dead.add_argument("--limit", type=int, default=20)
    dead.add_argument("--retry", nargs="+", default=[], metavar="CLIP_ID")
    dead.add_argument("--json", action="store_true", help="the page as JSON")
    _client_arguments(dead)
    dead.set_defaults(run=_dead)

    reembed = sub.add_parser(
        "reembed",
        help="embed the kept clips with one published version and write its search index",
    )
    reembed.add_argument("--version", default=None, help='"G.N" (default: newest published)')
    reembed.add_argument("--task", default=None, help="only the clips of this task")
    reembed.add_argument("--batch", type=int, default=32)
    reembed.add_argument(
        "--follow",
        action="store_true",
        help="keep running: append clips that land, re-index a newer version now and then",
    )
    reembed.add_argument("--interval", type=float, default=10.0, help="--follow: s between looks")
    reembed.add_argument(
        "--refresh", type=float, default=3600.0, help="--follow: s before a newer version's pass"
    )
    reembed.add_argument("--keep", type=int, default=2, help="--follow: version indexes kept")
    reembed.set_defaults(run=_reembed)

    search = sub.add_parser("search", help="nearest kept clips (GET or POST /search)")
    target = search.add_mutually_exclusive_group(required=True)
    target.add_argument("file", nargs="?", type=Path, help="a query clip (POST /search)")
    target.add_argument("--clip-id", help="a kept clip as the query (GET /search)")
    search.add_argument("--direction", default="a2v", choices=["a2v", "v2a", "a2a", "v2v"])
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--version", default=None, help='an indexed "G.N" (default: newest)')
    _client_arguments(search)
    search.set_defaults(run=_search)

    demo = sub.add_parser("demo", help="the whole service on an embedded Redis, end to end")
    demo.add_argument("--segments", type=int, default=3)
    demo.add_argument("--clips-per-segment", type=int, default=96)
    demo.add_argument("--probes-per-segment", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0, help="the stream's clips")
    demo.add_argument("--report-json", type=Path, default=None, help="write the report here")
    demo.add_argument("--method", default=None, help="continual method (default: worker's)")
    demo.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    demo.set_defaults(run=_demo)

    pre = sub.add_parser(
        "pretrain", help="make the pretrained start (backbone, then AVM); resumable"
    )
    _pretrain_arguments(pre)
    pre.set_defaults(run=_pretrain)

    push = sub.add_parser("push", help="POST clip files, or a generated stream, to /ingest")
    push.add_argument("files", nargs="*", type=Path)
    _client_arguments(push)
    push.add_argument("--task", default=None)
    push.add_argument("--synthetic", type=int, default=0, help="generate N clips per segment")
    push.set_defaults(run=_push)

    bench = sub.add_parser("bench", help="benchmarks (run from the repository root)")
    benches = bench.add_subparsers(required=True, metavar="BENCHMARK")
    continual = benches.add_parser(
        "continual", help="every continual method side by side (bench/continual/)"
    )
    continual.add_argument("--mode", choices=("quick", "full"), default="quick")
    continual.add_argument("options", nargs=argparse.REMAINDER, help="see bench.continual -h")
    continual.set_defaults(run=_bench_continual)
    perf = benches.add_parser("perf", help="performance side by side (bench/perf.py)")
    perf.add_argument("options", nargs=argparse.REMAINDER, help="see bench.perf -h")
    perf.set_defaults(run=_bench_perf)
    return p


def _client_arguments(p: argparse.ArgumentParser) -> None:
    from os import environ

    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--token",
        default=environ.get("FLAVA_API_TOKEN") or None,
        help="the API's bearer token (default: $FLAVA_API_TOKEN)",
    )


def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    from flava.pretrain import PretrainJob

    d = PretrainJob()
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--steps", type=int, default=d.steps, help="backbone updates")
    p.add_argument("--avm-steps", type=int, default=d.avm_steps, help="AVM updates")
    p.add_argument("--train-clips", type=int, default=d.train_clips)
    p.add_argument("--heldout-clips", type=int, default=d.heldout_clips)
    p.add_argument("--unseen-per-task", type=int, default=d.unseen_per_task)
    p.add_argument("--seed", type=int, default=d.seed, help="model init and batch orders")
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--workers", type=int, default=d.workers, help="decode processes")
    p.add_argument("--out", type=Path, default=d.out, help="default: the package's builtin/")
    p.add_argument("--work-dir", type=Path, default=d.work_dir, help="data + resumable state")


def _pretrain(args) -> int:
    from flava.pretrain import PretrainJob, run_pretrain

    job = PretrainJob(
        preset=args.preset,
        steps=args.steps,
        avm_steps=args.avm_steps,
        train_clips=args.train_clips,
        heldout_clips=args.heldout_clips,
        unseen_per_task=args.unseen_per_task,
        seed=args.seed,
        data_seed=args.data_seed,
        workers=args.workers,
        out=args.out,
        work_dir=args.work_dir,
    )
    return run_pretrain(job, sys.argv[2:] if sys.argv[1:2] == ["pretrain"] else None)


def _serve(args) -> int:
    import uvicorn

    from contract.logs import uvicorn_log_config
    from service.http_protocol import server_options
    from service.metrics_dir import metrics_dir
    from service.settings import ApiSettings

    options = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level.lower(),
        "log_config": uvicorn_log_config(args.log_level, args.log_format),
    }
    try:  # refused before anything listens: production without a token, limits that clash
        settings = ApiSettings()
    except ValueError as exc:  # pydantic's ValidationError
        print(f"flava serve: {exc}", file=sys.stderr)
        return 2
    # past limit_concurrency connections uvicorn answers 503 at once; slow heads and stalled
    # bodies are cut (408)
    options.update(server_options(settings))
    # N processes share their metrics through files (prometheus_client's multiprocess mode):
    # the directory is set before any of them imports prometheus_client (service.app does)
    with metrics_dir(args.workers):
        if args.workers > 1:  # uvicorn starts each process from an import string
            uvicorn.run("service.app:create_app", factory=True, workers=args.workers, **options)
        else:
            from service.app import create_app

            uvicorn.run(create_app(), **options)
    return 0


def _worker(args) -> int:
    if args.nproc > 1:  # this process becomes torchrun, which starts `flava worker` N times
        if importlib.util.find_spec("torch") is None:  # not after the exec: a plain error then
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        os.execv(sys.executable, torchrun_argv(args.nproc, args.max_restarts))
    from worker.main import run_worker

    run_worker()
    return 0


def torchrun_argv(nproc: int, max_restarts: int) -> list[str]:
    """One machine's rank group: a restart of every rank after any rank fails."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    group = ["--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts)]
    return [*launcher, *group, "-m", "flava", "worker"]


def _config_show(args) -> int:
    from flava.config_show import show

    return show(args.json)


def _embedder(args) -> int:
    from worker.embedder import run_embedder

    run_embedder()
    return 0


def _embed(args) -> int:
    from flava.query import embed_files

    return embed_files(args.url, args.token, args.files, args.version)


def _models(args) -> int:
    from flava.query import print_models

    return print_models(args.url, args.token)


def _status(args) -> int:
    from flava.ops import status

    if (args.action == "rollback") != (args.version is not None):
        sys.stderr.write("flava status: --version goes with rollback, and only with it\n")
        return 2
    return status(args.url, args.token, args.action, args.version)


def _dead(args) -> int:
    from flava.ops import dead

    return dead(args.url, args.token, args.limit, args.retry, args.json)


def _reembed(args) -> int:
    """Settings as the worker's (FLAVA_MODELS_DIR, FLAVA_INPUTS_DIR) and FLAVA_INDEX_DIR."""
    from flava.push import Progress
    from service.settings import ApiSettings
    from worker.inputs import InputStore
    from worker.reembed import reembed
    from worker.settings import WorkerSettings

    worker, api = WorkerSettings(), ApiSettings()
    if args.follow:
        return _follow(args, worker.models_dir, worker.inputs_dir, api.index_dir)
    total = sum(1 for _ in InputStore(Path(worker.inputs_dir))._files())
    bar, done = Progress("reembed", total), 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        bar.update(done)

    result = reembed(
        worker.models_dir,
        worker.inputs_dir,
        api.index_dir,
        args.version,
        args.task,
        args.batch,
        progress,
    )
    bar.close()
    print(
        f"version {result.version}: {result.count} clips indexed in {result.seconds:.1f} s "
        f"-> {result.path}"
    )
    return 0


def _follow(args, models_dir: str, inputs_dir: str, index_dir: str) -> int:
    """flava reembed --follow until SIGTERM / SIGINT."""
    import signal
    import threading

    from worker.reembed import FollowConfig, Follower

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cfg = FollowConfig(args.interval, args.refresh, args.keep, args.batch)
    Follower(models_dir, inputs_dir, index_dir, cfg).run(stop)
    return 0


def _search(args) -> int:
    from flava.query import search

    return search(
        args.url, args.token, args.file, args.clip_id, args.direction, args.k, args.version
    )


def _demo(args) -> int:
    from flava.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        segments=args.segments,
        clips_per_segment=args.clips_per_segment,
        probes_per_segment=args.probes_per_segment,
        method=args.method,
        workdir=args.workdir,
        seed=args.seed,
        report_json=args.report_json,
    )
    return run_demo(cfg)


def _push(args) -> int:
    from flava.push import push_files, push_synthetic

    if args.synthetic:
        return push_synthetic(args.url, args.token, args.synthetic)
    if not args.files:
        print("flava push: give clip files or --synthetic N", file=sys.stderr)
        return 2
    return push_files(args.url, args.token, args.files, args.task)


def _bench_continual(args) -> int:
    from bench.continual import main as continual_main

    return continual_main(["--mode", args.mode, "--log-level", args.log_level, *args.options])


def _bench_perf(args) -> int:
    from bench.perf import main as perf_main

    return perf_main(args.options)


if __name__ == "__main__":
    sys.exit(main())
