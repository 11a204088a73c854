"""Tests for the synthetic drifting stream: determinism, real MP4s, drift, locality, sound."""

import io
import itertools

import av
import numpy as np
import pytest

from worker.core.synthetic import (
    BACKGROUNDS,
    SHAPES,
    ClipSpec,
    StreamConfig,
    class_pitch,
    clip_tracks,
    drifting_stream,
    encode_mp4,
    make_clip,
    render_audio,
    render_background,
    render_clip,
    render_video,
    segment_classes,
    segment_specs,
    segment_style,
    shape_mask,
)

CFG = StreamConfig()
SMALL = StreamConfig(seconds=1.0, size=64)  # quick clips where length and size do not matter


def _decode(data: bytes) -> tuple[dict, np.ndarray, np.ndarray]:
    """(stream info, frames (T, H, W, 3) uint8, audio (N,) float32) of MP4 bytes."""
    with av.open(io.BytesIO(data)) as container:
        info = {
            "types": sorted(s.type for s in container.streams),
            "video_codec": container.streams.video[0].codec_context.name,
            "rate": container.streams.audio[0].rate,
            "duration": container.duration / av.time_base,
        }
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(io.BytesIO(data)) as container:
        chunks = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    return info, frames, np.concatenate(chunks)


def _first_spec(cfg: StreamConfig, segment: int = 0, seed: int = 0) -> ClipSpec:
    return segment_specs(cfg, segment, 1, seed)[0]


# --- determinism and encoding ----------------------------------------------------------------


def test_same_spec_gives_identical_bytes_and_other_seeds_differ():
    spec = _first_spec(CFG)
    first = make_clip(spec, CFG)
    assert make_clip(ClipSpec(spec.segment, spec.label, spec.seed), CFG) == first
    other = ClipSpec(spec.segment, spec.label, spec.seed + 2)
    assert make_clip(other, CFG) != first
    frames_a, audio_a = render_clip(spec, CFG)
    frames_b, audio_b = render_clip(other, CFG)
    assert not np.array_equal(frames_a, frames_b)
    assert not np.allclose(audio_a, audio_b)


def test_mp4_decodes_to_the_configured_duration_size_and_streams():
    info, frames, audio = _decode(make_clip(_first_spec(CFG), CFG))
    assert info["types"] == ["audio", "video"]
    assert info["video_codec"] == "h264"
    assert frames.shape == (CFG.num_frames, CFG.size, CFG.size, 3)
    assert info["rate"] == CFG.sample_rate
    # AAC adds priming and pads its last frame of 1024 samples.
    assert CFG.num_samples <= audio.size <= CFG.num_samples + 2048
    assert abs(info["duration"] - CFG.seconds) < 0.2


def test_decoded_media_resemble_the_rendered_media():
    spec = _first_spec(CFG)
    frames, audio = render_clip(spec, CFG)
    _, decoded_frames, decoded_audio = _decode(make_clip(spec, CFG))
    video_error = np.abs(decoded_frames.astype(np.float32) - frames).mean()
    assert video_error < 12.0
    spectrum = np.abs(np.fft.rfft(audio))
    decoded_spectrum = np.abs(np.fft.rfft(decoded_audio[: audio.size]))
    assert np.argmax(decoded_spectrum) == pytest.approx(np.argmax(spectrum), abs=3)


@pytest.mark.parametrize("codec", ["mpeg4", "no-such-encoder"])
def test_mpeg4_encodes_and_stands_in_for_a_missing_encoder(codec):
    frames, audio = render_clip(_first_spec(SMALL), SMALL)
    info, decoded, _ = _decode(encode_mp4(frames, audio, SMALL.fps, SMALL.sample_rate, codec))
    assert info["video_codec"] == "mpeg4"
    assert decoded.shape == frames.shape


def test_encode_rejects_frames_of_the_wrong_layout():
    audio = np.zeros(16000, dtype=np.float32)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((4, 32, 32, 3), np.float32), audio, 10, 16000)


def test_config_refuses_odd_frame_size_and_too_many_classes_per_segment():
    with pytest.raises(ValueError, match="even"):
        StreamConfig(size=127)
    with pytest.raises(ValueError, match="classes_per_segment"):
        StreamConfig(num_classes=4, classes_per_segment=5)


# --- segments, specs and the stream ----------------------------------------------------------


def test_segments_activate_different_classes_and_cover_all():
    sets = [frozenset(segment_classes(CFG, s)) for s in range(CFG.num_segments)]
    assert all(len(s) == CFG.classes_per_segment for s in sets)
    assert len(set(sets)) == CFG.num_segments
    assert set().union(*sets) == set(range(CFG.num_classes))


def test_consecutive_segments_change_background_and_noise():
    styles = [segment_style(CFG, s) for s in range(CFG.num_segments)]
    for a, b in itertools.pairwise(styles):
        assert a.background != b.background
        assert (a.video_noise, a.snr_db) != (b.video_noise, b.snr_db)
    with pytest.raises(ValueError, match="segment"):
        segment_style(CFG, CFG.num_segments)


def test_train_and_heldout_specs_never_share_a_seed():
    train = {s.seed for seg in range(CFG.num_segments) for s in segment_specs(CFG, seg, 200, 7)}
    held = {
        s.seed
        for seg in range(CFG.num_segments)
        for s in segment_specs(CFG, seg, 200, 7, split="heldout")
    }
    assert len(train) == len(held) == 200 * CFG.num_segments
    assert not train & held


def test_specs_are_repeatable_and_balanced_over_the_segment_classes():
    specs = segment_specs(CFG, 3, 40, seed=1)
    assert specs == segment_specs(CFG, 3, 40, seed=1)
    labels = [s.label for s in specs]
    counts = {c: labels.count(c) for c in segment_classes(CFG, 3)}
    assert set(counts.values()) == {40 // CFG.classes_per_segment}
    assert labels != list(np.resize(segment_classes(CFG, 3), 40))  # shuffled


def test_drifting_stream_visits_segments_in_order_with_mp4_clips():
    stream = list(drifting_stream(SMALL, clips_per_segment=2, seed=3))
    segments = [spec.segment for spec, _ in stream]
    assert segments == sorted(segments) == [s for s in range(SMALL.num_segments) for _ in (0, 1)]
    for spec, data in stream:
        assert spec.label in segment_classes(SMALL, spec.segment)
        assert data[4:8] == b"ftyp"
    assert len({spec.clip_id for spec, _ in stream}) == len(stream)


def test_second_object_is_another_active_class_and_sounds():
    cfg = StreamConfig(second_object_prob=1.0, snr_db=(40.0,))
    spec = _first_spec(cfg)
    assert spec.label2 in segment_classes(cfg, 0) and spec.label2 != spec.label
    assert sum(t.sounding for t in clip_tracks(spec, cfg)) == 2
    _, audio = render_clip(spec, cfg)
    peaks = _spectral_peaks(audio, cfg.sample_rate, 2)
    for label in (spec.label, spec.label2):
        assert min(abs(peaks - class_pitch(cfg, label))) < 0.03 * class_pitch(cfg, label)


# --- the picture: shapes and locality ------------------------------------------------------


def test_shapes_are_distinct_and_fill_part_of_their_box():
    masks = {s: shape_mask(s, 28)[:, :, 0] > 0.5 for s in SHAPES}
    for mask in masks.values():
        assert 0.15 < mask.mean() < 0.9
    for a, b in itertools.combinations(SHAPES, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.85, (a, b)


def _changed_pixels(cfg: StreamConfig, spec: ClipSpec) -> np.ndarray:
    """(T, H, W) bool: pixels that differ from the static background (noise switched off)."""
    frames = render_video(spec, cfg, clip_tracks(spec, cfg)).astype(np.int16)
    background = np.median(frames, axis=0)
    return np.abs(frames - background).max(axis=-1) > 8


def _box_masks(cfg: StreamConfig, spec: ClipSpec) -> np.ndarray:
    """(T, H, W) bool: union of every object's box at every frame."""
    return np.any([_track_boxes(cfg, track) for track in clip_tracks(spec, cfg)], axis=0)


@pytest.mark.parametrize("distractor_prob", [0.0, 1.0])
def test_objects_occupy_a_small_local_region(distractor_prob):
    cfg = StreamConfig(video_noise=(0.0,), distractor_prob=distractor_prob)
    for spec in segment_specs(cfg, 1, 4, seed=5):
        changed, boxes = _changed_pixels(cfg, spec), _box_masks(cfg, spec)
        assert changed.mean() < 0.1
        assert changed[~boxes].mean() < 0.002  # nothing changes outside the objects' boxes
        assert changed.any(axis=(1, 2)).all()  # the object is visible in every frame


def _track_boxes(cfg: StreamConfig, track) -> np.ndarray:
    """(T, H, W) bool: one object's box at every frame."""
    boxes = np.zeros((cfg.num_frames, cfg.size, cfg.size), dtype=bool)
    for t, (x, y) in enumerate(track.positions):
        boxes[t, y : y + track.size, x : x + track.size] = True
    return boxes


def test_object_is_saturated_and_the_silent_distractor_is_grey():
    cfg = StreamConfig(video_noise=(0.0,), distractor_prob=1.0)
    for spec in segment_specs(cfg, 2, 4, seed=6):
        frames, _ = render_clip(spec, cfg)
        chroma = frames.max(axis=-1).astype(int) - frames.min(axis=-1)
        track, distractor = clip_tracks(spec, cfg)
        assert track.sounding and distractor.label == -1 and not distractor.sounding
        changed = _changed_pixels(cfg, spec)
        own, other = _track_boxes(cfg, track), _track_boxes(cfg, distractor)
        assert np.median(chroma[changed & own & ~other]) > 100
        assert chroma[changed & other & ~own].max() < 70  # muted background blended with grey


def test_bounce_times_are_when_the_object_touches_an_edge():
    spans, checked = [], 0
    for spec in segment_specs(CFG, 0, 8, seed=2):
        for track in clip_tracks(spec, CFG):
            span = CFG.size - track.size
            spans.append(len(track.bounce_times))
            for tb in track.bounce_times:
                t = min(round(tb * CFG.fps), CFG.num_frames - 1)
                step = abs(t / CFG.fps - tb) * CFG.speed[1] * CFG.size + 1
                near_edge = np.minimum(track.positions[t], span - track.positions[t])
                assert near_edge.min() <= step
                checked += 1
    assert checked >= 8 and min(spans) >= 1


# --- the sound: pitch and onsets -------------------------------------------------------------


def _spectral_peaks(audio: np.ndarray, sample_rate: int, k: int) -> np.ndarray:
    """Frequencies (Hz) of the k strongest, well separated spectral peaks."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    freqs = np.fft.rfftfreq(audio.size, 1.0 / sample_rate)
    peaks = []
    for _ in range(k):
        i = int(np.argmax(spectrum))
        peaks.append(freqs[i])
        spectrum[np.abs(freqs - freqs[i]) < 40.0] = 0.0
    return np.array(peaks)


def test_dominant_frequency_is_the_class_pitch():
    for label in range(CFG.num_classes):
        segment = next(s for s in range(CFG.num_segments) if label in segment_classes(CFG, s))
        spec = ClipSpec(segment, label, seed=100 + label)
        audio = render_audio(spec, CFG, clip_tracks(spec, CFG))
        pitch = class_pitch(CFG, label)
        peak = _spectral_peaks(audio, CFG.sample_rate, 1)[0]
        assert abs(peak - pitch) <= CFG.pitch_jitter * pitch + 1.0, (label, peak, pitch)


def test_class_pitches_are_a_semitone_or_more_apart():
    pitches = [class_pitch(CFG, c) for c in range(CFG.num_classes)]
    ratios = np.diff(np.log2(pitches)) * 12
    assert (ratios >= 1.0).all()


def _rms(audio: np.ndarray, start: float, stop: float, sample_rate: int) -> float:
    window = audio[max(0, int(start * sample_rate)) : int(stop * sample_rate)]
    return float(np.sqrt(np.mean(window**2)))


def test_bounces_are_onsets_in_the_audio_envelope():
    cfg = StreamConfig(snr_db=(30.0,), distractor_prob=0.0)
    checked = 0
    for spec in segment_specs(cfg, 0, 8, seed=4):
        (track,) = clip_tracks(spec, cfg)
        audio = render_audio(spec, cfg, [track])
        previous = -1.0
        for tb in track.bounce_times:
            if tb - previous > 0.25 and tb > 0.05:  # a clean onset, not a decaying one
                before = _rms(audio, tb - 0.03, tb, cfg.sample_rate)
                after = _rms(audio, tb + 0.005, tb + 0.035, cfg.sample_rate)
                assert after > 2.5 * before, (spec, tb)
                checked += 1
            previous = tb
    assert checked >= 12


def test_audio_is_mono_float_in_range_and_loudness_varies():
    peaks = []
    for spec in segment_specs(CFG, 2, 4, seed=9):
        _, audio = render_clip(spec, CFG)
        assert audio.shape == (CFG.num_samples,) and audio.dtype == np.float32
        peaks.append(np.abs(audio).max())
    assert max(peaks) <= 1.0
    assert np.ptp(peaks) > 0.02


# --- learnability ---------------------------------------------------------------------------


def _audio_features(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(48,) log band energies over log-spaced bands from 100 Hz to 4 kHz."""
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1.0 / sample_rate)
    edges = np.geomspace(100.0, 4000.0, 49)
    band = np.digitize(freqs, edges) - 1
    ok = (band >= 0) & (band < 48)
    return np.log(np.bincount(band[ok], power[ok], minlength=48) + 1e-3)


def _video_features(frames: np.ndarray) -> np.ndarray:
    """(64,) RGB histogram (4 levels per channel) over all pixels of all frames."""
    q = frames.reshape(-1, 3) // 64
    return np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / len(q)


def _features(cfg: StreamConfig, split: str, n: int) -> tuple[np.ndarray, np.ndarray, list]:
    specs = [s for seg in range(cfg.num_segments) for s in segment_specs(cfg, seg, n, 0, split)]
    media = [render_clip(s, cfg) for s in specs]
    audio = np.stack([_audio_features(a, cfg.sample_rate) for _, a in media])
    video = np.stack([_video_features(f) for f, _ in media])
    return audio, video, [s.label for s in specs]


def _standardise(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (x - ref.mean(0)) / (ref.std(0) + 1e-6)


def test_a_linear_map_learns_which_sound_goes_with_which_object():
    """Ridge regression from generic audio features to generic video features, fit on train
    clips, retrieves a held-out clip's video of the right class far above chance."""
    cfg = StreamConfig(seconds=2.0, size=96)
    a_tr, v_tr, _ = _features(cfg, "train", 16)
    a_te, v_te, labels = _features(cfg, "heldout", 8)
    x, y = _standardise(a_tr, a_tr), _standardise(v_tr, v_tr)
    w = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ y)
    pred = _standardise(a_te, a_tr) @ w
    target = _standardise(v_te, v_tr)
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    retrieved = np.argmax(pred @ target.T, axis=1)
    accuracy = np.mean([labels[j] == labels[i] for i, j in enumerate(retrieved)])
    chance = 1.0 / cfg.classes_per_segment  # the most a per-segment guess could reach
    assert accuracy > 2 * chance


@pytest.mark.parametrize("style", BACKGROUNDS)
def test_background_styles_are_textured_muted_and_seeded(style):
    first = render_background(np.random.default_rng(0), style, 64)
    assert first.shape == (64, 64, 3) and first.dtype == np.float32
    assert np.array_equal(first, render_background(np.random.default_rng(0), style, 64))
    assert not np.array_equal(first, render_background(np.random.default_rng(1), style, 64))
    assert first.min() >= 0.0 and first.max() <= 255.0
    chroma = first.max(axis=-1) - first.min(axis=-1)
    assert chroma.max() < 70  # muted, so the saturated object stands out
