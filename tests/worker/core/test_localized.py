"""Tests for the localized tasks: determinism, splits, the shared rule in the rendered media,
the token masks against decoded MP4s, and the task drift."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from worker.core.localized import (
    LOCALIZED_SHAPES,
    LOCALIZED_TIMBRES,
    LocalizedConfig,
    SceneSpec,
    hue_to_pitch,
    localized_stream,
    make_scene_clip,
    pitch_to_hue,
    render_scene,
    scene_factors,
    scene_masks,
    scene_objects,
    scene_specs,
    task_names,
    task_style,
)
from worker.core.media import IMAGENET_MEAN, IMAGENET_STD, decode_clip, example_window
from worker.core.model import preset
from worker.core.synthetic import shape_mask

CFG = LocalizedConfig()
MEDIA = preset("tiny").media()
PATCH = 16
SMALL = LocalizedConfig(seconds=1.0, size=64, num_tasks=2)  # quick clips for the stream


def _specs(task: int, n: int = 1, split: str = "train") -> list[SceneSpec]:
    return scene_specs(CFG, task, n, seed=0, split=split)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation, value in [0, 1] of uint8 RGB pixels (..., 3)."""
    x = rgb.astype(np.float64) / 255.0
    top, low = x.max(axis=-1), x.min(axis=-1)
    span = np.where(top > low, top - low, 1.0)
    r, g, b = (x[..., i] for i in range(3))
    hue = np.select(
        [top == r, top == g], [(g - b) / span, 2.0 + (b - r) / span], 4.0 + (r - g) / span
    )
    saturation = np.where(top > 0, (top - low) / np.where(top > 0, top, 1.0), 0.0)
    return (hue / 6.0) % 1.0, saturation, top


def _hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    d = np.abs(a - b) % 1.0
    return np.minimum(d, 1.0 - d)


def _object_pixels(frames: np.ndarray, box: tuple[int, int, int], shape: str) -> np.ndarray:
    """(T, n, 3) pixels fully inside an object's shape."""
    x, y, size = box
    inside = shape_mask(shape, size)[:, :, 0] >= 0.99
    return frames[:, y : y + size, x : x + size][:, inside]


def _spectrum(audio: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies, magnitudes) of a Hann-windowed FFT."""
    mags = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return np.fft.rfftfreq(audio.size, 1.0 / rate), mags


def _dominant_hz(audio: np.ndarray) -> float:
    freqs, mags = _spectrum(audio, CFG.sample_rate)
    return float(freqs[mags.argmax()])


def _visual_hue(frames: np.ndarray, box: tuple[int, int, int], shape: str) -> float:
    """Circular mean hue of an object's pixels over all frames."""
    hue, _, _ = _hsv(_object_pixels(frames, box, shape))
    angle = np.angle(np.exp(2j * np.pi * hue).mean())
    return float(angle / (2 * np.pi) % 1.0)


def _decoded_rgb(data: bytes) -> np.ndarray:
    """(T, S, S, 3) uint8 frames of an MP4 as the tiny model sees them."""
    clip = decode_clip(data, MEDIA)
    rgb = (clip.frames * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --- determinism, identity and splits --------------------------------------------------------


def test_same_spec_gives_identical_bytes_and_other_seeds_differ():
    spec, other = _specs(1, 2)
    first = make_scene_clip(spec, CFG)
    assert make_scene_clip(SceneSpec(spec.task, spec.seed, spec.split), CFG) == first
    assert make_scene_clip(other, CFG) != first
    frames_a, audio_a = render_scene(spec, CFG)
    frames_b, audio_b = render_scene(other, CFG)
    assert not np.array_equal(frames_a, frames_b)
    assert frames_a.shape == (CFG.num_frames, CFG.size, CFG.size, 3)
    assert audio_a.shape == audio_b.shape == (CFG.num_samples,)
    assert audio_a.dtype == np.float32 and np.abs(audio_a).max() <= 1.0


def test_splits_and_pretraining_never_share_seeds():
    seeds = {}
    for task, split in itertools.product(range(-1, CFG.num_tasks), ("train", "heldout")):
        specs = scene_specs(CFG, task, 50, seed=3, split=split)
        assert all(s.task == task and s.split == split for s in specs)
        seeds.setdefault((task < 0, split), set()).update(s.seed for s in specs)
    for a, b in itertools.combinations(seeds.values(), 2):
        assert not a & b
    ids = {s.clip_id for s in _specs(0, 20) + _specs(0, 20, "heldout") + _specs(-1, 20)}
    assert len(ids) == 60


def test_bad_configs_and_specs_are_refused():
    with pytest.raises(ValueError):
        LocalizedConfig(size=33)
    with pytest.raises(ValueError):
        LocalizedConfig(pitch_high=2000.0)
    with pytest.raises(ValueError):
        scene_specs(CFG, CFG.num_tasks, 1, 0, "train")
    with pytest.raises(ValueError):
        scene_specs(CFG, 0, 1, 0, "test")
    with pytest.raises(ValueError):
        SceneSpec(-2, 0)


# --- the shared rule -------------------------------------------------------------------------


def test_hue_maps_monotonically_onto_two_octaves_of_pitch():
    hues = np.linspace(0.0, CFG.hue_span, 50, endpoint=False)
    pitches = [hue_to_pitch(CFG, h) for h in hues]
    assert np.all(np.diff(pitches) > 0)
    assert pitches[0] == pytest.approx(CFG.pitch_low)
    assert hue_to_pitch(CFG, CFG.hue_span) == pytest.approx(CFG.pitch_high)
    assert all(pitch_to_hue(CFG, p) == pytest.approx(h) for h, p in zip(hues, pitches, strict=True))


def test_same_hue_gives_same_pitch_across_tasks_and_splits():
    by_hue = {}
    for task in range(-1, CFG.num_tasks):
        for spec in _specs(task, 5) + _specs(task, 5, "heldout"):
            f = scene_factors(spec, CFG)
            assert f["pitch_hz"] == pytest.approx(hue_to_pitch(CFG, f["hue"]))
            assert by_hue.setdefault(round(f["hue"], 12), f["pitch_hz"]) == f["pitch_hz"]
    # hues come in levels: several clips share one, and every level sounds the same pitch
    assert 4 < len(by_hue) <= CFG.hue_levels


def test_hue_levels_are_level_centres_inside_each_task_band():
    from worker.core.localized import snap_hue, task_style

    width = CFG.hue_span / CFG.hue_levels
    for task in range(CFG.num_tasks):
        lo, hi = task_style(CFG, task).hue_band
        for spec in _specs(task, 6):
            hue = scene_factors(spec, CFG)["hue"]
            assert lo < hue < hi
            assert (hue / width - 0.5) == pytest.approx(round(hue / width - 0.5))
    continuous = LocalizedConfig(hue_levels=0)
    assert snap_hue(continuous, 0.1234) == 0.1234
    with pytest.raises(ValueError):
        LocalizedConfig(hue_levels=10)  # not a multiple of num_tasks: levels straddle bands


@pytest.mark.parametrize("task", [-1, 0, 2, 3])
def test_audio_pitch_and_partials_follow_hue_and_shape(task):
    spec = _specs(task)[0]
    f = scene_factors(spec, CFG)
    _, audio = render_scene(spec, CFG)
    assert _dominant_hz(audio) == pytest.approx(f["pitch_hz"], rel=0.02)
    freqs, mags = _spectrum(audio, CFG.sample_rate)
    near = [np.abs(freqs - k * f["pitch_hz"]) < 0.02 * f["pitch_hz"] for k in range(1, 8)]
    partials = np.array([mags[m].max() for m in near]) / mags[near[0]].max()
    timbre = np.zeros(7)
    amps = LOCALIZED_TIMBRES[f["timbre"]]
    timbre[: len(amps)] = amps
    assert f["timbre"] == LOCALIZED_SHAPES.index(f["shape"])
    np.testing.assert_allclose(partials, timbre, atol=0.1)


def test_video_hue_predicts_audio_pitch_and_a_shuffled_pairing_breaks_it():
    specs = [_specs(0)[0], _specs(3)[0]]
    media = [render_scene(s, CFG) for s in specs]
    seen = []
    for spec, (frames, _) in zip(specs, media, strict=True):
        f = scene_factors(spec, CFG)
        seen.append(hue_to_pitch(CFG, _visual_hue(frames, f["box"], f["shape"])))
    heard = [_dominant_hz(audio) for _, audio in media]
    for own in range(2):
        assert seen[own] == pytest.approx(heard[own], rel=0.03)
        assert abs(seen[own] / heard[1 - own] - 1.0) > 0.3  # audio of the other clip


def test_object_brightness_follows_the_audio_envelope_and_distractors_do_not():
    for spec in _specs(-1, 2) + _specs(1, 2):
        frames, audio = render_scene(spec, CFG)
        starts = (np.arange(CFG.num_frames) / CFG.fps * CFG.sample_rate).astype(int)
        half = CFG.sample_rate // 20
        rms = [np.sqrt(np.mean(audio[max(0, s - half) : s + half] ** 2)) for s in starts]
        f = scene_factors(spec, CFG)
        objects = [(f["box"], f["shape"])] + [(d["box"], d["shape"]) for d in f["distractors"]]
        corr = []
        for box, shape in objects:
            _, _, value = _hsv(_object_pixels(frames, box, shape))
            corr.append(np.corrcoef(value.mean(axis=1), rms)[0, 1])
        assert corr[0] > 0.5
        assert all(np.nan_to_num(c) < corr[0] for c in corr[1:])


# --- scenes and the task drift ---------------------------------------------------------------


def test_distractors_differ_in_shape_hue_place_and_timing():
    for spec in _specs(-1, 10) + _specs(2, 10):
        objects = scene_objects(spec, CFG)
        assert len(objects) == 1 + CFG.num_distractors
        assert len({o.shape for o in objects}) == len(objects)
        for a, b in itertools.combinations(objects, 2):
            hue_gap = min(abs(a.hue - b.hue), 1 - abs(a.hue - b.hue))
            assert hue_gap >= CFG.hue_gap
            apart_x = a.x + a.size <= b.x or b.x + b.size <= a.x
            assert apart_x or a.y + a.size <= b.y or b.y + b.size <= a.y
        lo, hi = CFG.object_frac
        assert lo * CFG.size - 1 <= objects[0].size <= hi * CFG.size + 1
        assert CFG.events[0] <= len(objects[0].events) <= CFG.events[1]
        for d in objects[1:]:
            assert d.events and all(
                abs(t - s) >= CFG.distractor_gap - 1e-9 for t in d.events for s in objects[0].events
            )


def test_task_hue_bands_are_disjoint_and_pretraining_covers_them_all():
    bands = [task_style(CFG, k).hue_band for k in range(CFG.num_tasks)]
    for (_, hi), (lo, _) in itertools.pairwise(bands):
        assert hi <= lo
    assert bands[0][0] == 0.0 and bands[-1][1] == pytest.approx(CFG.hue_span)
    for k, (lo, hi) in enumerate(bands):
        style = task_style(CFG, k)
        for spec in _specs(k, 20):
            f = scene_factors(spec, CFG)
            assert lo <= f["hue"] < hi and f["shape"] in style.shapes
    pre = [scene_factors(s, CFG) for s in _specs(-1, 60)]
    hit = {next(k for k, (lo, hi) in enumerate(bands) if lo <= f["hue"] < hi) for f in pre}
    assert hit == set(range(CFG.num_tasks))
    assert {f["shape"] for f in pre} == set(LOCALIZED_SHAPES)
    backgrounds = {task_style(CFG, k).background for k in range(-1, CFG.num_tasks)}
    assert len(backgrounds) == CFG.num_tasks + 1
    assert len(set(task_names(CFG))) == CFG.num_tasks


def test_stream_visits_tasks_in_order_with_training_clips():
    out = list(localized_stream(SMALL, clips_per_task=2, seed=1))
    assert [s.task for s, _ in out] == [0, 0, 1, 1]
    assert all(s.split == "train" for s, _ in out)
    spec, data = out[-1]
    assert data == make_scene_clip(spec, SMALL)


# --- token masks against the decoded MP4 -----------------------------------------------------


@pytest.fixture(scope="module")
def decoded():
    """(spec, masks, decoded clip, decoded uint8 frames) for scenes of pretraining and tasks."""
    out = []
    for spec in _specs(-1, 2) + _specs(1) + _specs(3):
        data = make_scene_clip(spec, CFG)
        masks = scene_masks(spec, CFG, MEDIA, PATCH)
        out.append((spec, masks, decode_clip(data, MEDIA), _decoded_rgb(data)))
    return out


def test_masks_have_the_model_token_shapes(decoded):
    grid = MEDIA.frame_size // PATCH
    for _, masks, _, _ in decoded:
        assert masks.object_v.shape == masks.distractor_v.shape == (MEDIA.num_frames * grid**2,)
        assert masks.object_a.shape == (MEDIA.audio_frames // PATCH * MEDIA.mel_bins // PATCH,)
        assert all(m.dtype == torch.bool for m in (masks.object_v, masks.distractor_v))
        per_frame = masks.object_v.reshape(MEDIA.num_frames, -1).sum(dim=1)
        assert per_frame.min() >= 4  # at least 2 x 2 patches
        assert not (masks.object_v & masks.distractor_v).any()
        assert masks.distractor_v.any() and masks.object_a.any()


def test_video_masks_hold_the_sounding_hue_of_the_decoded_frames(decoded):
    g = MEDIA.frame_size // PATCH
    for spec, masks, _, rgb in decoded:
        hue, sat, _ = _hsv(rgb)
        match = (_hue_distance(hue, scene_factors(spec, CFG)["hue"]) < 0.04) & (sat > 0.4)
        tokens = match.reshape(-1, g, PATCH, g, PATCH).mean(axis=(2, 4)).reshape(-1)
        on_object = tokens[masks.object_v.numpy()].mean()
        assert on_object > 0.25
        assert on_object > 4 * tokens[masks.distractor_v.numpy()].mean()
        assert on_object > 4 * tokens[~(masks.object_v | masks.distractor_v).numpy()].mean()


def test_audio_masks_mark_loud_pitch_columns_of_the_decoded_fbank(decoded):
    f_tokens = MEDIA.mel_bins // PATCH
    for spec, masks, clip, _ in decoded:
        pitch = scene_factors(spec, CFG)["pitch_hz"]
        # the fbank bin nearest the fundamental: Kaldi mel, 20 Hz to Nyquist
        mel = 1127.0 * np.log1p(np.array([20.0, pitch, MEDIA.sample_rate / 2]) / 700.0)
        centre = round((mel[1] - mel[0]) / ((mel[2] - mel[0]) / (MEDIA.mel_bins + 1))) - 1
        band = clip.fbank[:, centre - 1 : centre + 2].mean(dim=1)  # (audio_frames,)
        energy = band.reshape(-1, PATCH).mean(dim=1)  # per token time column
        grid = masks.object_a.reshape(-1, f_tokens)
        loud = grid.any(dim=1)
        assert grid[:, centre // PATCH][loud].all()  # the fundamental's row is marked
        assert loud.any() and not loud.all()
        assert energy[loud].mean() > energy[~loud].mean() + 0.2


@pytest.mark.parametrize("audio_frames", [256, 128])
def test_audio_mask_columns_follow_the_decoder_window(audio_frames):
    media = dataclasses.replace(MEDIA, audio_frames=audio_frames)
    start = example_window(CFG.seconds, media).start_s
    for spec in _specs(0, 3):
        loud = scene_masks(spec, CFG, media, PATCH).object_a.reshape(-1, 8).any(dim=1)
        events = np.array(scene_factors(spec, CFG)["events"])
        begins = start + 0.16 * np.arange(loud.numel())
        for column, begin in enumerate(begins):
            onset_inside = ((events >= begin - 0.1) & (events < begin + 0.04)).any()
            near = ((events > begin - 0.6) & (events < begin + 0.16)).any()
            assert not onset_inside or loud[column]  # an event starting here makes it loud
            assert near or not loud[column]  # long after (or before) every event it is quiet
