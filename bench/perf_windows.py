"""Decode time per window of a long upload, against the ffmpeg CLI decoding the same span.

    python -m bench.perf_windows                      # 1-hour 1280x720 upload, preset tiny
    python -m bench.perf_windows --presets tiny,small
    python -m bench.perf_windows --minutes 5          # a shorter upload, for a quick look
    python -m bench.perf --only windows --out DIR     # the same rows in bench.perf's report

Issue 14 §3: decoding a window must stay at or under the ffmpeg CLI's time for the same
window. The upload is made once with PyAV and cached under bench/results/cache/: H.264 (x264
``ultrafast`` with CABAC and the deblocking filter switched back on, as a camera's High
profile stream has them; no B-frames), a fixed keyframe interval (3 s, no scene-cut
keyframes), 4 Mb/s, 25 fps; AAC 48 kHz stereo, 128 kb/s. The picture is a scrolling blocky
texture over a gradient with per-frame noise and a moving box, the sound tones plus noise,
so neither stream compresses to nothing.

For each preset, windows spread evenly over the upload (the first and the last included) out
of ``contract.windows.window_starts(duration, span, span)``, in one fresh process with torch
on one thread (as the worker's decode processes run, worker/decoding.py). Each window, each
repetition, one after the other in a rotating order (so load drifts hit every side alike):

- ours:        ``decode_clip(path, cfg, start_s=start)``: audio span after a seek, video from
               the keyframe before the first of the frame targets to the last one (4 frames
               converted, resized, normalised), fbank; FFmpeg's frame threads on (720p is
               over ``_THREADED_PIXELS``), as the worker runs it;
- ours 1 thread: the same with FFmpeg's decoder on one thread;
- ours bytes:  the same call on the upload's bytes in memory, not the path;
- ffmpeg:      ``ffmpeg -nostdin -ss START -t SPAN -i FILE -map 0:v:0 -map 0:a:0 -f null -``
               (default threads): a seek to the keyframe before START, every frame of both
               streams up to START + SPAN decoded; its wall time includes the process start
               and the probe, as the decode benchmark's reference does (bench/perf.py);
- ffmpeg -threads 1: the same with one decoder thread.

``-benchmark`` adds ffmpeg's own ``rtime`` (the transcode loop only: no process start, no
probe, no seek) to both ffmpeg rows: a lower bound of what the CLI spends decoding.

Position: the first window, the last one, and a window a whole number of keyframe intervals
after the first (the latest such: as far from its keyframe as the first is, so it decodes as
much video) are then timed in turn (ours and ffmpeg): a window an hour in must cost what the
first one does, i.e. the seek works. ``fallbacks`` counts decodes that abandoned their seek for
a decode from the start (docs/media.md). ``open_cost`` times one open of the upload (FFmpeg's
probe and, for an MP4, its whole sample index) and counts the opens of one decode_clip.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.perfkit import Comparison, Stats, in_fresh_process, machine_note, markdown

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "windows"
CACHE = Path(__file__).parent / "results" / "cache"
CONTENT_VERSION = 1  # bump when the generated picture or sound changes: a new cache file
FFMPEG_MISSING = (
    "the ffmpeg CLI is not on PATH: it is this benchmark's reference. "
    "Install it with `apt-get install -y ffmpeg`"
)
OURS = ("ours", "ours_t1", "ours_bytes")
CLI = ("cli", "cli_t1")


# ---------------------------------------------------------------------------------------
# the upload


@dataclass(frozen=True)
class UploadSpec:
    """A long H.264 + AAC MP4 like a camera's upload."""

    minutes: float = 60.0
    width: int = 1280
    height: int = 720
    fps: int = 25
    gop_s: float = 3.0  # keyframe interval (fixed, as cameras write it)
    video_bit_rate: int = 4_000_000
    sample_rate: int = 48_000
    audio_bit_rate: int = 128_000
    x264_preset: str = "ultrafast"

    @property
    def frames(self) -> int:
        return round(self.minutes * 60 * self.fps)

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    @property
    def gop(self) -> int:
        return max(1, round(self.gop_s * self.fps))

    def filename(self) -> str:
        return (
            f"upload-{self.minutes:g}min-{self.width}x{self.height}-{self.fps}fps-gop{self.gop}"
            f"-{self.video_bit_rate // 1000}k-{self.x264_preset}-v{CONTENT_VERSION}.mp4"
        )


class _Scene:
    """The picture (yuv420p planes) and sound of an upload, made second by second."""

    def __init__(self, spec: UploadSpec, seed: int = 0):
        if spec.width % 8 or spec.height % 8:
            raise ValueError(
                f"width and height must be multiples of 8, got {spec.width}x{spec.height}"
            )
        rng = np.random.default_rng(seed)
        w, h = spec.width, spec.height
        coarse = rng.integers(0, 256, (h // 8, 2 * w // 8), dtype=np.uint8)
        texture = np.kron(coarse, np.ones((8, 8), np.uint8))  # twice as wide: it scrolls
        yy, xx = np.mgrid[0:h, 0 : 2 * w]
        gradient = ((xx // 3 + yy // 3) % 256).astype(np.uint8)
        self.luma = (gradient >> 1) + (texture >> 2)  # <= 190
        self.noise = [rng.integers(0, 16, (h, w), dtype=np.uint8) for _ in range(7)]
        cy, cx = np.mgrid[0 : h // 2, 0 : w // 2]
        self.u = ((cx // 2 + cy) % 256).astype(np.uint8)
        self.v = ((cx - cy // 2) % 256).astype(np.uint8)
        self.spec, self.rng = spec, rng

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as the (H * 3 / 2, W) array of av.VideoFrame.from_ndarray's yuv420p."""
        spec, w, h = self.spec, self.spec.width, self.spec.height
        speed = 2 + (i // (60 * spec.fps)) % 4  # the scroll speed changes every minute
        shift = (i * speed) % w
        y = self.luma[:, shift : shift + w] + self.noise[i % len(self.noise)]
        box = h // 6  # a bright box on a Lissajous path
        top = int((h - box) * (0.5 + 0.5 * np.sin(i / 37)))
        left = int((w - box) * (0.5 + 0.5 * np.cos(i / 23)))
        y[top : top + box, left : left + box] = 235
        u = (self.u + np.uint8(i % 256)).reshape(h // 4, w)
        v = (self.v - np.uint8(i % 256)).reshape(h // 4, w)
        return np.concatenate([y, u, v])

    def sound(self, first: int, n: int) -> np.ndarray:
        """Samples [first, first + n) as (2, n) float32: a tone a second, and noise."""
        rate = self.spec.sample_rate
        t = (first + np.arange(n)) / rate
        hz = 220.0 * 2 ** ((first // rate) % 24 / 12)
        noise = self.rng.normal(0.0, 0.05, (2, n))
        left = 0.3 * np.sin(2 * np.pi * hz * t)
        right = 0.3 * np.sin(2 * np.pi * 1.5 * hz * t)
        return (np.stack([left, right]) + noise).astype(np.float32)


def make_upload(spec: UploadSpec, path: Path, progress: bool = True) -> Path:
    """Encode ``spec`` to ``path`` (written to a temporary name, then renamed)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    scene, fps, rate = _Scene(spec), spec.fps, spec.sample_rate
    # whole AAC frames (1024 samples), not past the video: the upload lasts spec.seconds
    audio_samples = int(spec.seconds * rate) // 1024 * 1024
    started = last_report = time.monotonic()
    with av.open(str(tmp), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = spec.width, spec.height, "yuv420p"
        video.bit_rate = spec.video_bit_rate
        video.options = {
            "preset": spec.x264_preset,
            "x264-params": f"keyint={spec.gop}:min-keyint={spec.gop}:scenecut=0:cabac=1:deblock=1",
        }
        audio = out.add_stream("aac", rate=rate, layout="stereo")
        audio.bit_rate = spec.audio_bit_rate
        audio.options = {"aac_coder": "fast"}
        seconds = -(-spec.frames // fps)
        for second in range(seconds):
            for i in range(second * fps, min(spec.frames, (second + 1) * fps)):
                frame = av.VideoFrame.from_ndarray(scene.frame(i), format="yuv420p")
                frame.pts = i
                out.mux(video.encode(frame))
            first = second * rate
            n = min(rate, audio_samples - first)
            if n > 0:
                sound = av.AudioFrame.from_ndarray(
                    scene.sound(first, n), format="fltp", layout="stereo"
                )
                sound.sample_rate, sound.pts = rate, first
                out.mux(audio.encode(sound))
            now = time.monotonic()
            if progress and (now - last_report > 30 or second == seconds - 1):
                last_report, done = now, (second + 1) / seconds
                eta = (now - started) * (1 - done) / done
                log.info(
                    "encoding %s: %5.1f%% (%d/%d s of media), %.0f s elapsed, ~%.0f s left",
                    path.name,
                    100 * done,
                    second + 1,
                    seconds,
                    now - started,
                    eta,
                )
        out.mux(video.encode(None))
        out.mux(audio.encode(None))
    tmp.rename(path)
    return path


def cached_upload(spec: UploadSpec, cache: Path = CACHE) -> Path:
    """The upload of ``spec`` in ``cache``, made the first time."""
    path = cache / spec.filename()
    if path.exists():
        log.info("upload: %s (cached)", path)
        return path
    log.info("making the upload %s (once; cached under %s)", path.name, cache)
    return make_upload(spec, path)


def keyframe_times(path: Path) -> list[float]:
    """Times (s) of the video stream's keyframes, from its packets (no decoding)."""
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        unit = float(video.time_base or 0)
        return [
            packet.pts * unit
            for packet in container.demux(video)
            if packet.pts is not None and packet.is_keyframe
        ]


def describe_upload(path: Path) -> dict[str, Any]:
    """Size, length, streams and keyframes of the upload."""
    import av

    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        info: dict[str, Any] = {
            "file": path.name,
            "size_mib": round(path.stat().st_size / 2**20, 1),
            "duration_s": container.duration / av.time_base if container.duration else None,
            "video": f"{video.codec_context.name} {video.codec_context.profile} "
            f"{video.codec_context.width}x{video.codec_context.height} {video.average_rate} fps",
            "audio": f"{audio.codec_context.name} {audio.codec_context.sample_rate} Hz "
            f"{audio.codec_context.layout.name}",
            "bit_rate_kbps": round(container.bit_rate / 1000) if container.bit_rate else None,
        }
    keys = keyframe_times(path)
    gaps = np.diff(keys)
    info["keyframes"] = len(keys)
    info["keyframe_interval_s"] = round(float(np.median(gaps)), 3) if gaps.size else None
    info["keyframe_interval_max_s"] = round(float(gaps.max()), 3) if gaps.size else None
    return info


def position_starts(starts: list[float], keyframe_interval_s: float | None) -> dict[str, float]:
    """The windows the position comparison times: the first, the last, and the latest start
    at the first's distance from its keyframe (a window's cost depends on how far its first
    frame target lies after the keyframe before it: a fixed keyframe interval makes the
    latest such start the fair "an hour in")."""
    out = {"first": starts[0], "last": starts[-1]}
    if keyframe_interval_s:
        laps = int((starts[-1] - starts[0]) // keyframe_interval_s)
        out["late"] = round(starts[0] + laps * keyframe_interval_s, 3)
    return out


def lead_s(start: float, preset: str, duration_s: float, keys: list[float]) -> dict[str, float]:
    """Seconds of video each side decodes for a window: ours from the keyframe before the
    first frame target to the last target, ffmpeg from the keyframe before START to its end."""
    import bisect

    from contract.windows import span_s
    from worker.core import media
    from worker.core.model import preset as model_preset

    cfg = model_preset(preset).media()
    times = media._window_at(start, duration_s, cfg, False, None).frame_times

    def key_before(t: float) -> float:
        return keys[max(0, bisect.bisect_right(keys, t) - 1)] if keys else 0.0

    return {
        "ours_video_s": round(times[-1] - key_before(times[0]), 3),
        "cli_video_s": round(start + span_s(preset) - key_before(start), 3),
    }


# ---------------------------------------------------------------------------------------
# measuring


def sample_starts(duration_s: float, span: float, n: int) -> list[float]:
    """``n`` window starts spread evenly over ``window_starts(duration_s, span, span)``, the
    first and the last included; all of them when there are fewer."""
    from contract.windows import window_starts

    starts = window_starts(duration_s, span, span)
    if len(starts) <= n:
        return starts
    picks = np.unique(np.linspace(0, len(starts) - 1, n).round().astype(int))
    return [starts[i] for i in picks]


def ffmpeg_args(
    binary: str, path: str, start: float, span: float, threads: int | None
) -> list[str]:
    """The CLI decoding the window's span of both streams, with -benchmark's rtime."""
    args = [binary, "-nostdin", "-hide_banner", "-nostats", "-benchmark"]
    if threads is not None:
        args += ["-threads", str(threads)]
    args += ["-ss", f"{start:.3f}", "-t", f"{span:.3f}", "-i", path]
    return args + ["-map", "0:v:0", "-map", "0:a:0", "-f", "null", "-"]


def time_ffmpeg(args: list[str]) -> tuple[float, float]:
    """(wall seconds of the command, ffmpeg's own rtime or nan)."""
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    match = re.search(r"rtime=([0-9.]+)s", done.stderr)
    return wall, float(match.group(1)) if match else float("nan")


def ffmpeg_version(binary: str) -> str:
    done = subprocess.run([binary, "-version"], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()[0]


@contextlib.contextmanager
def _one_decoder_thread() -> Iterator[None]:
    """decode_clip with FFmpeg's decoder on one thread, whatever the frame size."""
    from worker.core import media

    saved = media._THREADED_PIXELS
    media._THREADED_PIXELS = 1 << 62
    try:
        yield
    finally:
        media._THREADED_PIXELS = saved


class _Fallbacks(logging.Handler):
    """Counts decode_clip's debug records of a seek abandoned for a decode from the start."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1  # every debug record of worker.core.media is a seek given up

    @classmethod
    @contextlib.contextmanager
    def watching(cls) -> Iterator[_Fallbacks]:
        logger, handler = logging.getLogger("worker.core.media"), cls()
        level, propagate = logger.level, logger.propagate
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(handler)
        try:
            yield handler
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def _timers(
    path: str, preset: str, binary: str | None, with_bytes: bool
) -> dict[str, Callable[[float], tuple[float, float]]]:
    """name -> fn(start) -> (wall seconds, ffmpeg's rtime or nan), one per measured side."""
    from contract.windows import span_s
    from worker.core.media import decode_clip
    from worker.core.model import preset as model_preset

    cfg, span = model_preset(preset).media(), span_s(preset)
    data = Path(path).read_bytes() if with_bytes else None

    def ours(source: Any, one_thread: bool = False) -> Callable[[float], tuple[float, float]]:
        def run(start: float) -> tuple[float, float]:
            with _one_decoder_thread() if one_thread else contextlib.nullcontext():
                started = time.perf_counter()
                clip = decode_clip(source, cfg, start_s=start)
                wall = time.perf_counter() - started
            assert clip.fbank.shape[0] == cfg.audio_frames and len(clip.frames) == cfg.num_frames
            return wall, float("nan")

        return run

    timers = {"ours": ours(path), "ours_t1": ours(path, one_thread=True)}
    if data is not None:
        timers["ours_bytes"] = ours(data)
    if binary:
        timers["cli"] = lambda start: time_ffmpeg(ffmpeg_args(binary, path, start, span, None))
        timers["cli_t1"] = lambda start: time_ffmpeg(ffmpeg_args(binary, path, start, span, 1))
    return timers


def open_cost(path: str, preset: str, start: float, reps: int) -> tuple[int, list[float]]:
    """How many times one decode_clip opens the upload, and seconds per open (open_media:
    FFmpeg's probe and, for an MP4, its whole sample index)."""
    from worker.core import media
    from worker.core.model import preset as model_preset

    cfg, real, opens = model_preset(preset).media(), media.open_media, []

    def counting(*args: Any, **kwargs: Any) -> Any:
        opens.append(args[0])
        return real(*args, **kwargs)

    media.open_media = counting  # type: ignore[assignment]
    try:
        media.decode_clip(path, cfg, start_s=start)
    finally:
        media.open_media = real  # type: ignore[assignment]
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        with real(path, cfg.max_pixels):
            pass
        seconds.append(time.perf_counter() - started)
    return len(opens), seconds


def measure_windows(
    path: str,
    preset: str,
    starts: list[float],
    reps: int,
    positions: dict[str, float],
    position_reps: int,
    binary: str | None,
    with_bytes: bool = True,
) -> dict[str, Any]:
    """Every side on every window, ``reps`` times, interleaved; then the ``positions``
    windows (name -> start) in turn ``position_reps`` times (ours and the CLI). Seconds.

    Runs in the calling process: the benchmark calls it in a fresh one with torch on one
    thread (``init_decode_process``), as the worker decodes."""
    timers = _timers(path, preset, binary, with_bytes)
    names = list(timers)
    rows: list[dict[str, Any]] = []
    for start in starts:
        row: dict[str, Any] = {"start_s": start, "fallbacks": 0}
        row.update({name: [] for name in names})
        row.update({f"{name}_rtime": [] for name in names if name.startswith("cli")})
        rows.append(row)
    for fn in timers.values():  # warm-up: codecs, mel filters, the ffmpeg binary's pages
        fn(starts[0])
    opens, open_s = open_cost(path, preset, starts[-1], max(5, reps))
    with _Fallbacks.watching() as fallbacks:
        for rep in range(reps):
            order = range(len(starts)) if rep % 2 == 0 else reversed(range(len(starts)))
            for i in order:
                before, turn = fallbacks.count, (rep + i) % len(names)
                for name in names[turn:] + names[:turn]:
                    wall, rtime = timers[name](starts[i])
                    rows[i][name].append(wall)
                    if name.startswith("cli"):
                        rows[i][f"{name}_rtime"].append(rtime)
                rows[i]["fallbacks"] += fallbacks.count - before
        sides = [name for name in names if name in ("ours", "cli")]
        position: dict[str, dict[str, list[float]]] = {
            end: {name: [] for name in sides} for end in positions
        }
        ends = list(positions)
        for rep in range(position_reps):
            for end in ends if rep % 2 == 0 else ends[::-1]:
                for name in sides:
                    position[end][name].append(timers[name](positions[end])[0])
        total_fallbacks = fallbacks.count
    return {
        "preset": preset,
        "starts": starts,
        "sides": names,
        "rows": rows,
        "positions": positions,
        "position": position,
        "fallbacks": total_fallbacks,
        "opens_per_decode": opens,
        "open_s": open_s,
    }


# ---------------------------------------------------------------------------------------
# the comparisons


def _ms(samples: list[float]) -> list[float]:
    return [1000 * s for s in samples]


def _window_medians(rows: list[dict[str, Any]], side: str) -> list[float]:
    """Each window's median over its repetitions, in ms."""
    return [1000 * float(np.median(row[side])) for row in rows if row.get(side)]


def _stats(rows: list[dict[str, Any]], side: str) -> Stats | None:
    medians = _window_medians(rows, side)
    return Stats.of(medians, "ms") if medians else None


def _ratio_spread(rows: list[dict[str, Any]], ours: str, ref: str) -> Stats | None:
    ratios = [
        float(np.median(r[ours]) / np.median(r[ref])) for r in rows if r.get(ours) and r.get(ref)
    ]
    return Stats.of(ratios, "x") if ratios else None


def comparisons(result: dict[str, Any], upload: dict[str, Any]) -> list[Comparison]:
    """The report's rows for one preset's ``measure_windows`` result."""
    from contract.windows import span_s

    preset, rows = result["preset"], result["rows"]
    span, n = span_s(preset), len(rows)
    what = (
        f"one {span:g} s window of a {upload['duration_s'] / 60:.0f} min {upload['video']} "
        f"upload ({upload['size_mib']:.0f} MiB), {n} windows spread over it, preset {preset}"
    )
    decode = _against_ffmpeg(
        rows,
        (f"window-decode {preset}", what),
        ("ours", "decode_clip(path, start_s) in a decode process"),
        ("cli", "ffmpeg -ss START -t SPAN -i FILE -f null - (both streams, default threads)"),
    )
    if rows[0].get("ours_bytes"):
        decode.extra["decode_clip(bytes in memory, start_s)"] = _stats(rows, "ours_bytes")
    decode.extra["seeks abandoned for a decode from the start (all decodes)"] = result["fallbacks"]
    if "open_s" in result:
        decode.extra["opening the upload (open_media: probe + MP4 index), once"] = Stats.of(
            _ms(result["open_s"]), "ms"
        )
        decode.extra["opens per decode_clip"] = result["opens_per_decode"]
    decode.notes += [
        "stats are over the windows, each window's median of its repetitions; ratio = ours "
        "median / ffmpeg median.",
        "ffmpeg decodes every frame of the span (after its seek to the keyframe before START) "
        "and the audio; ours decodes the audio span after a seek and the video from the "
        "keyframe before the first frame target to the last one, converts 4 frames and "
        "computes the fbank. ffmpeg's wall time includes its process start and probe (its "
        "rtime row does not).",
    ]
    single = _against_ffmpeg(
        rows,
        (f"window-decode-1-thread {preset}", what + ", FFmpeg's decoder on one thread"),
        ("ours_t1", "decode_clip(path, start_s), 1 decoder thread"),
        ("cli_t1", "ffmpeg -threads 1 -ss START -t SPAN -i FILE -f null -"),
    )
    out = [decode, single]
    out.append(_position(result, what))
    if rows[0].get("ours_bytes"):
        in_memory = Comparison(
            f"window-bytes {preset}",
            what + ": the upload's bytes in memory vs its path",
            "decode_clip(bytes, start_s)",
            _stats(rows, "ours_bytes"),  # type: ignore[arg-type]
            "decode_clip(path, start_s)",
            _stats(rows, "ours"),
        )
        in_memory.notes.append(
            "bytes: a BytesIO over the whole upload, read once before the timings; path: the "
            "file opened by decode_clip (in the page cache after the first pass)."
        )
        out.append(in_memory)
    return out


def _against_ffmpeg(
    rows: list[dict[str, Any]],
    bench: tuple[str, str],
    ours: tuple[str, str],
    cli: tuple[str, str],
) -> Comparison:
    """(name, title), (side, label) of ours and of the CLI: a row with target <= 1.0."""
    (side, label), (ref_side, ref_label) = ours, cli
    ours_stats = _stats(rows, side)
    assert ours_stats is not None, f"no samples of {side}"
    ref = _stats(rows, ref_side)
    c = Comparison(*bench, label, ours_stats, ref_label, ref, target="<= 1.0")
    if ref is not None:
        c.extra["ratio per window, ours / ffmpeg"] = _ratio_spread(rows, side, ref_side)
        c.extra["ffmpeg's own rtime (no process start, probe or seek)"] = _stats(
            rows, f"{ref_side}_rtime"
        )
    return c


def _position(result: dict[str, Any], what: str) -> Comparison:
    """Ours an hour in vs the first window (same keyframe lead when known), and the trend."""
    pos, at, leads = result["position"], result["positions"], result.get("position_leads", {})
    late = "late" if "late" in pos else "last"

    def stats(end: str, side: str) -> Stats:
        return Stats.of(_ms(pos[end][side]), "ms")

    def label(end: str) -> str:
        lead = leads.get(end)
        return f"at {at[end]:g} s" + (f", {lead['ours_video_s']:g} s of video" if lead else "")

    c = Comparison(
        f"window-position {result['preset']}",
        what + f": a window {at[late] - at['first']:g} s later than the first, vs the first",
        f"ours, window {label(late)}",
        stats(late, "ours"),
        f"ours, first window {label('first')}",
        stats("first", "ours"),
    )
    if late != "last":
        c.extra[f"ours, last window {label('last')}"] = stats("last", "ours")
        c.extra["ours, last / first"] = f"{stats('last', 'ours').median / c.ref.median:.3g}"  # type: ignore[union-attr]
    if "cli" in pos["first"]:
        first = stats("first", "cli")
        for end in (late, "last") if late != "last" else (late,):
            c.extra[f"ffmpeg, {end} / first"] = f"{stats(end, 'cli').median / first.median:.3g}"
    c.extra.update(_trend(result["rows"]))
    c.notes += [
        "the windows timed in turn, ours then ffmpeg each; a seek that did not work would make "
        "a late window decode the upload up to it.",
        "a window's cost grows with the video it decodes: from the keyframe before its first "
        "frame target to the last target ('s of video'); the late window sits at the first "
        "one's distance from its keyframe (a whole number of keyframe intervals later), the "
        "last window of the grid need not.",
    ]
    return c


def _trend(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Least squares over the windows: ms ~ a + b * hours in + c * seconds of video decoded."""
    hours = np.array([r["start_s"] for r in rows]) / 3600
    ms = np.array(_window_medians(rows, "ours"))
    if len(rows) < 4 or np.ptp(hours) == 0:
        return {}
    columns = [np.ones_like(hours), hours]
    if all("ours_video_s" in r for r in rows):
        columns.append(np.array([r["ours_video_s"] for r in rows]))
    coef = np.linalg.lstsq(np.stack(columns, axis=1), ms, rcond=None)[0]
    out = {"ours, fit over the windows: position": f"{coef[1]:+.1f} ms per hour in"}
    if len(coef) == 3:
        out["ours, fit over the windows: video decoded"] = f"{coef[2]:+.1f} ms per s of video"
    return out


# ---------------------------------------------------------------------------------------
# the run and the report


@dataclass
class WindowsConfig:
    """What ``python -m bench.perf_windows`` measures."""

    minutes: float = 60.0  # the upload's length
    presets: tuple[str, ...] = ("tiny",)
    windows: int = 30  # windows sampled over the upload, per preset
    reps: int = 3  # timed passes over the sampled windows, every side
    position_reps: int = 10  # first/last window pairs
    with_bytes: bool = True  # also time decode_clip on the bytes in memory
    cache: str = str(CACHE)

    def upload(self) -> UploadSpec:
        return UploadSpec(minutes=self.minutes)


def ffmpeg_binary() -> str:
    """The ffmpeg CLI; RuntimeError naming the install command when it is missing."""
    binary = shutil.which("ffmpeg")
    if binary is None:
        raise RuntimeError(FFMPEG_MISSING)
    return binary


def run_windows(cfg: WindowsConfig) -> tuple[list[Comparison], dict[str, Any]]:
    """Make (or reuse) the upload, measure each preset in a fresh process: (rows, raw data)."""
    from contract.windows import span_s
    from worker.decoding import init_decode_process

    binary = ffmpeg_binary()
    path = cached_upload(cfg.upload(), Path(cfg.cache))
    upload, keys = describe_upload(path), keyframe_times(path)
    out: list[Comparison] = []
    raw: dict[str, Any] = {"upload": upload, "ffmpeg": ffmpeg_version(binary), "presets": {}}
    for preset in cfg.presets:
        starts = sample_starts(upload["duration_s"], span_s(preset), cfg.windows)
        log.info("preset %s: %d windows x %d reps", preset, len(starts), cfg.reps)
        positions = position_starts(starts, upload["keyframe_interval_s"])
        before = machine_note()
        args = (str(path), preset, starts, cfg.reps, positions, cfg.position_reps, binary)
        result = in_fresh_process(
            measure_windows, *args, cfg.with_bytes, initializer=init_decode_process
        )
        add_leads(result, upload["duration_s"], keys)
        result["machine"] = {"before": before, "after": machine_note()}
        raw["presets"][preset] = result
        out += comparisons(result, upload)
    return out, raw


def add_leads(result: dict[str, Any], duration_s: float, keys: list[float]) -> None:
    """Each window's seconds of video decoded (``lead_s``), into its row and its position."""
    preset = result["preset"]
    for row in result["rows"]:
        row.update(lead_s(row["start_s"], preset, duration_s, keys))
    result["position_leads"] = {
        end: lead_s(start, preset, duration_s, keys) for end, start in result["positions"].items()
    }


def bench_windows(cfg: WindowsConfig) -> list[Comparison]:
    """The rows for bench.perf's report."""
    return run_windows(cfg)[0]


TABLE_SIDES = {
    "ours": "ours",
    "ours_t1": "ours 1 thread",
    "ours_bytes": "ours bytes",
    "cli": "ffmpeg",
    "cli_t1": "ffmpeg -threads 1",
}


def window_table(result: dict[str, Any]) -> list[str]:
    """A markdown table: one line per window, medians over its repetitions (ms), and the
    seconds of video each side decodes (``lead_s``) when known."""
    sides = [side for side in TABLE_SIDES if side in result["sides"]]
    leads = all("ours_video_s" in row for row in result["rows"])
    ratios = "cli" in sides
    heads = ["start (s)"] + [f"{TABLE_SIDES[side]} (ms)" for side in sides]
    heads += ["ours / ffmpeg", "1 thread: ours / ffmpeg"] if ratios else []
    heads += ["video decoded, ours / ffmpeg (s)"] if leads else []
    heads += ["fallbacks"]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for row in result["rows"]:
        med = {side: 1000 * float(np.median(row[side])) for side in sides}
        cells = [f"{row['start_s']:g}"] + [f"{med[side]:.0f}" for side in sides]
        if ratios:
            cells += [f"{med['ours'] / med['cli']:.2f}", f"{med['ours_t1'] / med['cli_t1']:.2f}"]
        if leads:
            cells.append(f"{row['ours_video_s']:.2f} / {row['cli_video_s']:.2f}")
        lines.append("| " + " | ".join(cells + [str(row["fallbacks"])]) + " |")
    return lines


def write_report(
    out: Path, found: list[Comparison], raw: dict[str, Any], meta: dict[str, Any]
) -> None:
    """windows.md (summary, notes, one table per preset) and windows.json under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "upload": raw["upload"], "ffmpeg": raw["ffmpeg"]}
    body["comparisons"] = [c.as_dict() for c in found]
    body["presets"] = raw["presets"]
    (out / "windows.json").write_text(json.dumps(body, indent=2, default=str) + "\n")
    text = markdown(found, meta, "Decode time per window of a long upload", meta["command"])
    upload = [f"- {key}: {value}" for key, value in raw["upload"].items()]
    text += "\n## The upload\n\n" + "\n".join(upload) + f"\n- ffmpeg CLI: {raw['ffmpeg']}\n"
    if "decoder" in meta:
        text += f"- decode_clip's FFmpeg: {meta['decoder']}\n"
    for preset, result in raw["presets"].items():
        text += f"\n## Per window, preset {preset} (medians of {meta['config']['reps']} reps)\n\n"
        if "machine" in result:
            load = result["machine"]
            text += f"Machine before: {load['before']}; after: {load['after']}.\n\n"
        text += "\n".join(window_table(result)) + "\n"
    (out / "windows.md").write_text(text)


def _library_versions() -> str:
    import av

    lib = av.library_versions
    return f"PyAV {av.__version__}, libavcodec {'.'.join(map(str, lib['libavcodec']))}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=60.0, help="the upload's length (60)")
    p.add_argument("--presets", default="tiny", help="comma-separated: tiny,small,base")
    p.add_argument("--windows", type=int, default=30, help="windows sampled per preset")
    p.add_argument("--reps", type=int, default=3, help="timed passes over the windows")
    p.add_argument("--position-reps", type=int, default=10, help="first/last window pairs")
    p.add_argument("--no-bytes", action="store_true", help="skip decoding from bytes in memory")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if shutil.which("ffmpeg") is None:
        print(f"error: {FFMPEG_MISSING}", file=sys.stderr)
        return 2
    from flava.cli import idle_openmp_threads_sleep

    idle_openmp_threads_sleep()  # the fresh process runs torch as the worker's decoders do
    cfg = WindowsConfig(
        args.minutes,
        tuple(args.presets.split(",")),
        args.windows,
        args.reps,
        args.position_reps,
        not args.no_bytes,
        str(args.cache),
    )
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    found, raw = run_windows(cfg)
    command = "python -m bench.perf_windows" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    meta = {
        "command": command,
        "started": started,
        "wall_s": round(time.monotonic() - t0, 1),
        "machine": machine_note(),
        "decoder": _library_versions(),
        "config": {**asdict(cfg), "cache": os.path.relpath(cfg.cache)},
    }
    write_report(args.out, found, raw, meta)
    for c in found:
        ratio = "n/a" if c.ratio is None else f"{c.ratio:.3g}"
        log.info(
            "%-24s %s | %s | ratio %s",
            c.bench,
            c.ours.text(),
            c.ref.text() if c.ref else "-",
            ratio,
        )
    log.info("report: %s", args.out / "windows.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
