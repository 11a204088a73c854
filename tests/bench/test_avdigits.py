"""AV-Digits building blocks that need no installed recordings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.avdigits import (
    SPLITS,
    ImageAugment,
    MissingRecordings,
    change_speed,
    find_recordings,
    pitch_shift,
    render_digit,
    split_images,
    token_mask,
)


def test_missing_recordings_name_the_packages_to_install(tmp_path):
    (tmp_path / "en_US_f_Allison" / "digits").mkdir(parents=True)
    (tmp_path / "en_US_f_Allison" / "digits" / "0.gsm").write_bytes(b"x")
    with pytest.raises(MissingRecordings) as err:
        find_recordings(("en", "fr"), tmp_path)
    text = str(err.value)
    assert "en (digits [1, 2, 3, 4, 5, 6, 7, 8, 9])" in text
    assert "fr (digits [0, 1" in text
    assert "apt-get install -y asterisk-core-sounds-en-gsm asterisk-core-sounds-fr-gsm" in text


def test_find_recordings_maps_language_and_digit_to_the_file(tmp_path):
    digits = tmp_path / "it_IT_m_Carlo" / "digits"
    digits.mkdir(parents=True)
    for d in range(10):
        (digits / f"{d}.gsm").write_bytes(b"x")
    found = find_recordings(("it",), tmp_path)
    assert found["it"][7] == digits / "7.gsm"


def _dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(wave.size)))
    return float(np.fft.rfftfreq(wave.size, 1 / rate)[spectrum.argmax()])


def test_pitch_shift_moves_a_tone_and_keeps_its_length():
    rate = 16000
    tone = np.sin(2 * np.pi * 440.0 * np.arange(rate) / rate).astype(np.float32)
    up = pitch_shift(tone, 3.0)
    assert abs(up.size - tone.size) < 0.02 * tone.size
    assert _dominant_hz(up, rate) == pytest.approx(440.0 * 2 ** (3 / 12), rel=0.02)


def test_change_speed_shortens_and_raises():
    rate = 16000
    tone = np.sin(2 * np.pi * 300.0 * np.arange(rate) / rate).astype(np.float32)
    fast = change_speed(tone, 1.25)
    assert fast.size == round(rate / 1.25)
    assert _dominant_hz(fast, rate) == pytest.approx(375.0, rel=0.02)


def test_token_mask_follows_the_model_token_order():
    alpha = torch.zeros(2, 32, 32)  # 2 frames, 2 x 2 patches of 16
    alpha[1, 16:, :16] = 1.0  # frame 1, row 1, col 0
    mask = token_mask(alpha, patch=16)
    assert mask.tolist() == [False] * 4 + [False, False, True, False]


def test_image_splits_are_disjoint_and_cover_each_digit():
    labels = np.repeat(np.arange(10), 30)
    split = split_images(labels, seed=0)
    for d in range(10):
        parts = [set(split[s][d].tolist()) for s in SPLITS]
        assert set.union(*parts) == set(np.flatnonzero(labels == d).tolist())
        assert sum(len(p) for p in parts) == 30


def test_render_digit_draws_the_ink_where_the_alpha_is():
    image = np.zeros((8, 8), np.float32)
    image[2:6, 3:5] = 1.0
    frames, alpha = render_digit(np.random.default_rng(0), image, ImageAugment(), 4, 64)
    assert frames.shape == (4, 3, 64, 64) and frames.dtype == torch.uint8
    assert alpha.shape == (4, 64, 64) and 0 <= alpha.min() and alpha.max() <= 1
    assert alpha.sum() > 0
    ink = frames.float().mean(1)[alpha > 0.9].mean()
    back = frames.float().mean(1)[alpha < 0.01].mean()
    assert abs(float(ink - back)) > 10  # the digit stands out from its background
