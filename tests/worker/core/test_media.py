"""worker/core/media.py on real clips encoded with PyAV in several containers and codecs."""

from __future__ import annotations

import functools
import io
import math

import av
import numpy as np
import pytest
import torch

from contract.media_open import open_media
from tests.worker.core.media_fixtures import ClipSpec, encode_clip, frame_index_from_red
from worker.core.fbank import mel_scale
from worker.core.media import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Clip,
    MediaConfig,
    MediaError,
    MediaTooLarge,
    NoAudioStream,
    NoVideoStream,
    UndecodableMedia,
    _frame_tensor,
    _pick_frames,
    decode_clip,
    frame_times,
)

CFG = MediaConfig()
PADDING = -CFG.fbank_mean / CFG.fbank_std  # a zero-padded fbank frame after normalisation
SILENCE = (math.log(torch.finfo(torch.float32).eps) - CFG.fbank_mean) / CFG.fbank_std
CLIPS = {
    "mp4-h264-aac-stereo44k": ClipSpec(),
    "webm-vp9-opus-stereo48k": ClipSpec("webm", "libvpx-vp9", "libopus", sample_rate=48000),
    "mkv-mpeg4-mp3-stereo44k": ClipSpec("matroska", "mpeg4", "mp3"),
    "mkv-mpeg4-flac-5.1": ClipSpec("matroska", "mpeg4", "flac", layout="5.1"),
    "mov-mpeg4-aac-mono8k-1s": ClipSpec(
        "mov", "mpeg4", "aac", seconds=1.0, sample_rate=8000, layout="mono"
    ),
}
# keyframes every second, B-frames: decoding seeks mid-stream and reorders frames
LONG = ClipSpec(seconds=12.0, gop=10, preset="veryfast")

clip_bytes = functools.lru_cache(encode_clip)


@functools.lru_cache
def decoded(spec: ClipSpec) -> Clip:
    return decode_clip(clip_bytes(spec), CFG)


def source_indices(clip: Clip, fps: int, times: list[float]) -> list[int]:
    """Which encoded frame each decoded frame shows, read from its red level."""
    red = (clip.frames[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]).mean(dim=(1, 2)) * 255
    return [frame_index_from_red(r.item(), round(t * fps)) for r, t in zip(red, times, strict=True)]


def assert_nearest_frames(clip: Clip, fps: int, times: list[float]) -> None:
    for index, time in zip(source_indices(clip, fps, times), times, strict=True):
        assert abs(index - time * fps) <= 0.5 + 1e-6, (index, time)


def expected_mel_bin(freq_hz: float, bins: int = CFG.mel_bins, rate: int = CFG.sample_rate) -> int:
    step = (mel_scale(rate / 2) - mel_scale(20)) / (bins + 1)
    centres = mel_scale(20) + step * torch.arange(1, bins + 1)
    return int((centres - mel_scale(freq_hz)).abs().argmin())


@pytest.mark.parametrize("spec", CLIPS.values(), ids=CLIPS.keys())
def test_shapes_dtypes_and_duration(spec):
    clip = decoded(spec)
    assert clip.fbank.shape == (1024, 128) and clip.fbank.dtype == torch.float32
    assert clip.frames.shape == (4, 3, 224, 224) and clip.frames.dtype == torch.float32
    assert torch.isfinite(clip.fbank).all() and torch.isfinite(clip.frames).all()
    assert clip.duration_s == pytest.approx(spec.seconds, abs=0.05)


@pytest.mark.parametrize("spec", CLIPS.values(), ids=CLIPS.keys())
def test_frames_are_the_ones_nearest_the_window_times(spec):
    clip = decoded(spec)
    assert_nearest_frames(clip, spec.fps, frame_times(clip.duration_s, CFG))
    colours = clip.frames.mean(dim=(2, 3))
    assert (colours[1:, 0] - colours[:-1, 0]).abs().min() > 0.5  # each frame is another time


@pytest.mark.parametrize("spec", CLIPS.values(), ids=CLIPS.keys())
def test_tone_peaks_in_its_mel_bin(spec):
    fbank = decoded(spec).fbank
    voiced = round(spec.seconds * 100) - 5  # frames that hold the tone
    assert fbank[:voiced].mean(dim=0).argmax().item() == expected_mel_bin(spec.tone_hz)


def test_frame_times_centre_at_eval_and_whole_short_clip():
    assert frame_times(10.0, CFG) == [3.5, 4.5, 5.5, 6.5]
    assert frame_times(1.0, CFG) == [0.125, 0.375, 0.625, 0.875]


def test_frame_times_in_training_start_anywhere_in_the_clip():
    starts = [
        frame_times(10.0, CFG, train=True, generator=torch.Generator().manual_seed(s))[0]
        for s in range(40)
    ]
    assert min(starts) >= 0.5 and max(starts) <= 6.5
    assert max(starts) - min(starts) > 3.0


def test_short_clip_audio_is_padded_after_its_end():
    fbank = decoded(CLIPS["mov-mpeg4-aac-mono8k-1s"]).fbank
    assert torch.allclose(fbank[110:], torch.tensor(PADDING))
    assert not torch.isclose(fbank[:95], torch.tensor(PADDING)).all(dim=1).any()


@pytest.mark.parametrize("container", ["mp4", "matroska"])
def test_late_audio_starts_late_in_the_fbank(container):
    codec = "aac" if container == "mp4" else "flac"
    spec = ClipSpec(container, "libx264", codec, audio_offset_s=0.5)
    fbank = decode_clip(clip_bytes(spec), CFG).fbank
    assert torch.allclose(fbank[:45], torch.tensor(SILENCE), atol=1e-4)
    assert (fbank[52:190].max(dim=1).values > 0).all()


def test_long_clip_seeks_to_the_centre_window():
    data = clip_bytes(LONG)
    clip = decode_clip(data, CFG)
    times = frame_times(12.0, CFG)
    assert_nearest_frames(clip, LONG.fps, times)
    with open_media(data, CFG.max_pixels) as container:  # decoded from the start, no seek
        straight = _pick_frames(container, times, CFG.frame_size, seek=False)
    assert torch.equal(clip.frames, straight)


def test_eval_decoding_is_deterministic():
    data = clip_bytes(LONG)
    first, second = decode_clip(data, CFG), decode_clip(data, CFG)
    assert torch.equal(first.fbank, second.fbank) and torch.equal(first.frames, second.frames)


def test_training_windows_follow_the_generator():
    data = clip_bytes(LONG)

    def train(seed: int) -> Clip:
        return decode_clip(data, CFG, train=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(train(3).frames, train(3).frames)
    for seed in (0, 1):
        times = frame_times(12.0, CFG, train=True, generator=torch.Generator().manual_seed(seed))
        assert_nearest_frames(train(seed), LONG.fps, times)
    redness = {round(train(seed).frames[:, 0].mean().item(), 3) for seed in range(4)}
    assert len(redness) > 1  # different seeds, different windows


def test_smaller_config_sets_the_shapes():
    cfg = MediaConfig(audio_frames=128, mel_bins=64, num_frames=2, frame_size=32)
    clip = decode_clip(clip_bytes(CLIPS["mp4-h264-aac-stereo44k"]), cfg)
    assert clip.fbank.shape == (128, 64) and clip.frames.shape == (2, 3, 32, 32)


def test_frames_resize_the_shorter_side_and_crop_the_centre():
    rgb = np.full((40, 160, 3), (255, 0, 0), np.uint8)
    rgb[:, :40] = (0, 0, 255)  # the left quarter falls outside the centre crop
    frame = _frame_tensor(av.VideoFrame.from_ndarray(rgb, format="rgb24"), 32)
    pixels = frame * IMAGENET_STD + IMAGENET_MEAN
    assert frame.shape == (3, 32, 32)
    assert pixels[0].min() > 0.95 and pixels[2].max() < 0.05


def test_missing_streams_raise_named_errors():
    with pytest.raises(NoVideoStream):
        decode_clip(clip_bytes(ClipSpec(video_codec=None)), CFG)
    with pytest.raises(NoAudioStream):
        decode_clip(clip_bytes(ClipSpec(audio_codec=None)), CFG)


@pytest.mark.parametrize(
    "data",
    [b"", np.random.default_rng(0).bytes(4096), b"\x00" * 1000],
    ids=["empty", "random", "zeros"],
)
def test_garbage_is_undecodable(data):
    with pytest.raises(UndecodableMedia):
        decode_clip(data, CFG)


def test_truncated_mp4_is_undecodable():
    data = clip_bytes(CLIPS["mp4-h264-aac-stereo44k"])
    with pytest.raises(UndecodableMedia, match="FFmpeg cannot decode"):
        decode_clip(data[: len(data) // 2], CFG)


def test_limits_refuse_long_or_huge_media():
    data = clip_bytes(CLIPS["mp4-h264-aac-stereo44k"])
    with pytest.raises(MediaTooLarge, match="lasts"):
        decode_clip(data, MediaConfig(max_duration_s=1.0))
    with pytest.raises(MediaTooLarge, match="pixels"):
        decode_clip(data, MediaConfig(max_pixels=64 * 47))


def test_a_concat_list_cannot_read_local_files(tmp_path, monkeypatch):
    (tmp_path / "secret.mkv").write_bytes(clip_bytes(CLIPS["mkv-mpeg4-flac-5.1"]))
    monkeypatch.chdir(tmp_path)
    playlist = b"ffconcat version 1.0\nfile secret.mkv\n"
    with av.open(io.BytesIO(playlist)) as c:
        assert c.streams.video  # plain PyAV would follow the list to the local file
    with pytest.raises(UndecodableMedia):
        decode_clip(playlist, CFG)


def test_media_errors_are_value_errors():
    for error in (NoAudioStream, NoVideoStream, UndecodableMedia, MediaTooLarge):
        assert issubclass(error, MediaError) and issubclass(error, ValueError)


# -- the aligned window: audio and video of an example come from the same time span ----------

FLASH_AT = 10.0  # seconds: one white flash (FLASH_AT +- 0.6 s) and one click at FLASH_AT


@functools.lru_cache
def flash_click_clip(
    seconds: float = 20.0, fps: int = 10, rate: int = 16000, flash_at: float = FLASH_AT
) -> bytes:
    """A dark clip with a single flash and a single click at the same moment (MP4)."""
    from worker.core.synthetic import encode_mp4

    frames = np.full((round(seconds * fps), 32, 32, 3), 16, np.uint8)
    lit = np.abs(np.arange(len(frames)) / fps - flash_at) <= 0.6
    frames[lit] = 235
    audio = np.zeros(round(seconds * rate), np.float32)
    at = round(flash_at * rate)
    burst = np.random.default_rng(0).standard_normal(160).astype(np.float32)
    audio[at : at + 160] = 0.8 * burst * np.hanning(160).astype(np.float32)
    return encode_mp4(frames, audio, fps, rate)


def _click_frame(clip: Clip) -> int:
    """The fbank frame with the most energy (the click's), in the example's time."""
    return int(clip.fbank.sum(dim=1).argmax())


def _lit_frames(clip: Clip) -> list[int]:
    luma = (clip.frames * IMAGENET_STD + IMAGENET_MEAN).mean(dim=(1, 2, 3))
    return [i for i, v in enumerate(luma.tolist()) if v > 0.5]


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_flash_and_click_fall_in_the_same_example_at_every_preset(name):
    from worker.core.media import example_window
    from worker.core.model import preset

    cfg = preset(name).media()
    clip = decode_clip(flash_click_clip(), cfg)
    window = example_window(clip.duration_s, cfg)
    assert window.start_s <= FLASH_AT <= window.start_s + window.audio_s
    assert _lit_frames(clip), f"{name}: the flash is in no frame of the example"
    expected = (FLASH_AT - window.start_s) / 0.010
    assert abs(_click_frame(clip) - expected) <= 4, f"{name}: click off the example's time"


def test_training_windows_keep_audio_and_frames_together():
    """Random training spans: whenever a frame shows the flash, the click is in the audio
    at the flash's offset from the span start."""
    from worker.core.media import example_window
    from worker.core.model import preset

    cfg = preset("tiny").media()
    data, together = flash_click_clip(), 0
    for seed in range(8):
        clip = decode_clip(data, cfg, train=True, generator=torch.Generator().manual_seed(seed))
        window = example_window(
            clip.duration_s, cfg, train=True, generator=torch.Generator().manual_seed(seed)
        )
        end = window.start_s + window.audio_s
        assert all(window.start_s <= t <= end for t in window.frame_times)
        if _lit_frames(clip):
            together += 1
            expected = (FLASH_AT - window.start_s) / 0.010
            assert abs(_click_frame(clip) - expected) <= 4
    assert together >= 1  # the 20 s clip's random spans hit the flash at least once


def test_example_window_per_preset_spans():
    from worker.core.media import example_window
    from worker.core.model import preset

    spans = {n: example_window(30.0, preset(n).media()).audio_s for n in ("tiny", "small", "base")}
    assert spans == pytest.approx({"tiny": 2.56, "small": 5.12, "base": 10.24})
    short = example_window(1.0, preset("tiny").media())
    assert short.start_s == 0.0 and max(short.frame_times) < 1.0


# -- windows of a long upload: each decoded from a seek, audio and frames of the same span ----

LATE_FLASH = 47.0  # seconds into a 60 s upload: windows there are reached by seeking


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_the_window_holding_the_flash_holds_its_click_at_every_preset(name, tmp_path):
    """A 60 s upload cut into windows (contract.windows): the window whose span covers the
    flash shows it in a frame and hears the click at the flash's offset; windows that do not
    cover it show and hear neither. The file path and the bytes decode alike."""
    from contract.windows import span_s, window_starts
    from worker.core.model import preset

    cfg = preset(name).media()
    data = flash_click_clip(seconds=60.0, flash_at=LATE_FLASH)
    (tmp_path / "upload.mp4").write_bytes(data)
    starts = window_starts(60.0, span_s(name), span_s(name))
    assert len(starts) >= 5
    loud = decode_clip(data, cfg, start_s=LATE_FLASH - 1).fbank.max()
    for start in starts:
        clip = decode_clip(tmp_path / "upload.mp4", cfg, start_s=start)
        span = span_s(name)
        video = min(cfg.video_window_s, span)  # the frames' window, centred in the span at eval
        seen = start + (span - video) / 2 + 0.3 <= LATE_FLASH <= start + (span + video) / 2 - 0.3
        heard = start + 0.1 <= LATE_FLASH <= start + span - 0.1
        assert bool(_lit_frames(clip)) == seen, f"{name}: window at {start} s, flash"
        assert (clip.fbank.max() > 0.5 * loud) == heard, f"{name}: window at {start} s, click"
        if heard:
            expected = (LATE_FLASH - start) / 0.010
            assert abs(_click_frame(clip) - expected) <= 4, f"{name}: click off the window's time"
            assert torch.equal(clip.fbank, decode_clip(data, cfg, start_s=start).fbank)
    assert any(start <= LATE_FLASH <= start + span_s(name) for start in starts)


def test_a_window_after_a_seek_equals_one_decoded_from_the_start(monkeypatch):
    """The audio seek changes what is decoded, not the result."""
    from worker.core import media
    from worker.core.model import preset

    cfg = preset("tiny").media()
    data = flash_click_clip(seconds=60.0, flash_at=LATE_FLASH)
    sought = decode_clip(data, cfg, start_s=LATE_FLASH - 1.0)
    monkeypatch.setattr(media, "AUDIO_SEEK_MIN_S", math.inf)  # never seek
    straight = decode_clip(data, cfg, start_s=LATE_FLASH - 1.0)
    assert torch.allclose(sought.fbank, straight.fbank, atol=1e-4)
    assert torch.equal(sought.frames, straight.frames)
