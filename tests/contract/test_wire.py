"""The wire format both processes share."""

import pytest

from contract import wire


def test_embedding_round_trip_keeps_float32_values():
    emb = wire.Embedding([0.1, -2.5, 3.0], [1.0, 0.0, -1.0], 7, 9, "flava", 12.25)
    back = wire.Embedding.from_fields(
        {
            k.encode(): (v if isinstance(v, bytes) else v.encode())
            for k, v in emb.to_fields().items()
        }
    )
    assert back.audio == pytest.approx([0.1, -2.5, 3.0], abs=1e-7)
    assert (back.video, back.model_version, back.step, back.method) == (
        [1.0, 0.0, -1.0],
        7,
        9,
        "flava",
    )


def test_unpack_refuses_partial_floats():
    with pytest.raises(ValueError, match="float32"):
        wire.unpack_vector(b"abcde")


def test_clip_entry_round_trip():
    entry = wire.ClipEntry("a" * 64, 123, "video/mp4", "seg-2", "probe", 5.5)
    fields = {k.encode(): v.encode() for k, v in entry.to_fields().items()}
    assert wire.ClipEntry.from_fields(fields) == entry


def test_keys_are_namespaced_by_prefix():
    keys = wire.Keys("p1")
    assert {keys.stream, keys.dead, keys.blob("x"), keys.embedding("x")} == {
        "p1:clips",
        "p1:dead",
        "p1:blob:x",
        "p1:emb:x",
    }
