"""worker/core/fbank.py against kaldi-native-fbank, an independent Kaldi implementation."""

from __future__ import annotations

import math

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch

from worker.core.fbank import (
    LOG_FLOOR,
    kaldi_fbank,
    mel_filterbank,
    mel_scale,
    num_samples_for_frames,
)

RATE = 16000


def reference_fbank(waveform: np.ndarray, num_bins: int) -> np.ndarray:
    """kaldi-native-fbank with the options docs/design.md section 2 gives, (frames, num_bins)."""
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq, frame.dither, frame.window_type = RATE, 0.0, "hanning"
    frame.snip_edges, frame.remove_dc_offset, frame.preemph_coeff = True, True, 0.97
    frame.frame_length_ms, frame.frame_shift_ms, frame.round_to_power_of_two = 25, 10, True
    opts.use_energy, opts.use_power, opts.use_log_fbank = False, True, True
    opts.mel_opts.num_bins, opts.mel_opts.low_freq, opts.mel_opts.high_freq = num_bins, 20, 0
    online = knf.OnlineFbank(opts)
    online.accept_waveform(RATE, waveform.tolist())
    online.input_finished()
    return np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])


def chirp_with_noise(seconds: float = 2.0) -> np.ndarray:
    """A 100 Hz -> 7 kHz linear chirp plus white noise, float32 in [-1, 1]."""
    t = np.arange(round(seconds * RATE)) / RATE
    sweep = np.sin(2 * np.pi * (100 * t + (6900 / (2 * seconds)) * t**2))
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.5 * sweep + 0.05 * noise).astype(np.float32)


def speech_like(seconds: float = 2.0) -> np.ndarray:
    """Voiced syllables: a glottal pulse train (f0 100-180 Hz) through three formant
    resonances, a 4 Hz syllable envelope with pauses, and a faint noise floor."""
    n = round(seconds * RATE)
    t = np.arange(n) / RATE
    phase = np.cumsum(2 * np.pi * (140 + 40 * np.sin(2 * np.pi * 1.5 * t)) / RATE)
    pulses = (np.diff(np.floor(phase / (2 * np.pi)), prepend=0) > 0).astype(np.float64)
    h_t = np.arange(round(0.02 * RATE)) / RATE
    formants = sum(
        np.exp(-np.pi * bw * h_t) * np.sin(2 * np.pi * f * h_t)
        for f, bw in ((700, 80), (1220, 90), (2600, 120))
    )
    voiced = np.convolve(pulses, formants)[:n]
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    noise = 1e-3 * np.random.default_rng(1).standard_normal(n)
    signal = voiced * envelope / np.abs(voiced).max() * 0.8 + noise
    return signal.astype(np.float32)


@pytest.mark.parametrize("signal", [chirp_with_noise, speech_like])
def test_matches_kaldi_native_fbank_at_80_bins(signal):
    waveform = signal()
    ours = kaldi_fbank(torch.from_numpy(waveform), RATE, 80).numpy()
    reference = reference_fbank(waveform, 80)
    assert ours.shape == reference.shape == (198, 80)
    assert np.abs(ours - reference).max() < 1e-3


def test_128_bins_has_one_constant_floor_column_and_is_finite():
    fbank = kaldi_fbank(torch.from_numpy(chirp_with_noise()), RATE, 128)
    assert fbank.shape == (198, 128) and fbank.dtype == torch.float32
    assert torch.isfinite(fbank).all()
    floor = math.log(LOG_FLOOR)
    constant = [b for b in range(128) if torch.allclose(fbank[:, b], torch.tensor(floor))]
    assert constant == [3]


def test_filterbank_empty_row_and_nyquist_column():
    filters = mel_filterbank(RATE, 128, 512)
    assert filters.shape == (128, 257)
    empty = (filters.sum(dim=1) == 0).nonzero().flatten().tolist()
    assert empty == [3]
    assert (filters >= 0).all() and (filters <= 1).all()
    assert (filters[:, -1] == 0).all()
    assert mel_filterbank(RATE, 128, 512) is filters  # cached


@pytest.mark.parametrize(
    ("samples", "frames"), [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (16000, 98)]
)
def test_snip_edges_frame_count(samples, frames):
    assert kaldi_fbank(torch.zeros(samples), RATE, 40).shape == (frames, 40)


def test_num_samples_for_frames_is_the_fewest():
    needed = num_samples_for_frames(1024, RATE)
    assert needed == 164080
    assert kaldi_fbank(torch.zeros(needed), RATE, 40).shape[0] == 1024
    assert kaldi_fbank(torch.zeros(needed - 1), RATE, 40).shape[0] == 1023


def test_input_is_not_rescaled():
    """Doubling the waveform adds log 4 to every bin above the floor (power spectrum)."""
    waveform = torch.from_numpy(chirp_with_noise())
    difference = kaldi_fbank(2 * waveform, RATE, 80) - kaldi_fbank(waveform, RATE, 80)
    assert torch.allclose(difference, torch.full_like(difference, math.log(4)), atol=1e-4)


def test_sine_peaks_in_the_mel_bin_around_its_frequency():
    t = torch.arange(RATE) / RATE
    fbank = kaldi_fbank(0.5 * torch.sin(2 * math.pi * 2000 * t), RATE, 64)
    step = (mel_scale(RATE / 2) - mel_scale(20)) / 65
    centres = mel_scale(20) + step * torch.arange(1, 65)
    expected = (centres - mel_scale(2000)).abs().argmin().item()
    assert fbank.mean(dim=0).argmax().item() == expected


def test_rejects_multichannel_input():
    with pytest.raises(ValueError, match="1-D"):
        kaldi_fbank(torch.zeros(2, 16000))
