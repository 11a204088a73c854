"""contract/windows.py: the window grid and the spans the API shares with the presets."""

from __future__ import annotations

import pytest

from contract.windows import SPAN_S, span_s, window_starts
from worker.core.media import FBANK_SHIFT_S
from worker.core.model import preset


@pytest.mark.parametrize("name", sorted(SPAN_S))
def test_the_api_spans_are_the_presets_example_spans(name):
    assert span_s(name) == pytest.approx(preset(name).media().audio_frames * FBANK_SHIFT_S)


def test_an_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        span_s("huge")


def test_short_uploads_are_one_example_and_long_ones_a_centred_grid():
    assert window_starts(5.12, 2.56, 2.56) == []  # span + stride: still one example
    assert window_starts(None, 2.56, 2.56) == []  # unknown length: one example
    assert window_starts(10.0, 2.56, 2.56) == [1.16, 3.72, 6.28]
    hour = window_starts(3600.0, 2.56, 2.56)
    assert len(hour) == 1406 and hour[0] == pytest.approx(3600.0 - hour[-1] - 2.56, abs=1e-3)
    overlapping = window_starts(10.0, 2.56, 1.0)
    assert len(overlapping) == 8 and overlapping[1] - overlapping[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        window_starts(10.0, 2.56, 0.0)
