"""The one hardened open of untrusted media: the API's probe and the worker's decoder both use it.

Pure PyAV, no torch (the API imports it). An upload is bytes, or a file the caller opens; FFmpeg
gets a file object, never a path, and:

- **no protocol** (``protocol_whitelist=none``): a nested open (a playlist's segment, a concat
  list's file, ``subfile:``, ``tee:``, ``file:``, any URL) fails before anything is opened;
- **no demuxer that follows paths**: concat lists, HLS/DASH playlists and manifests, IMF,
  SDP, image sequences (``image2``), capture devices and the other demuxers that read no bytes
  of their own (``AVFMT_NOFILE``) are off the format whitelist, so FFmpeg refuses them right
  after probing, before their headers are read; :class:`RefusedFormat` names the demuxer.
  (FFmpeg does not probe an HLS playlist from a file object at all, and says so: refused as
  well. The PyAV wheel here has no DASH or IMF demuxer: such manifests are not media.)
- **no MOV data references** (``enable_drefs=0``, ``use_absolute_path=0``): a track whose
  samples live in another file is left without data instead;
- **bounded probing**: at most ``PROBE_BYTES`` read and ``ANALYZE_US`` of media analysed to
  find the streams, at most ``MAX_STREAMS`` streams created, and every decoder (also the ones
  FFmpeg runs while probing) refuses frames over ``max_pixels`` before allocating them.

The caller also checks each decoded frame (:func:`check_frame`): a header's size says nothing
about the frames that follow (a MOV of PNG frames may change size at every packet).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import traceback
from collections.abc import Iterator
from typing import TypeVar

import av
import av.logging

# demuxers that open other files or URLs, or read no bytes of the upload at all
REFUSED_FORMATS = frozenset(
    {"concat", "hls", "dash", "imf", "sdp", "webm_dash_manifest", "dvdvideo", "avisynth"}
    | {"vapoursynth", "lavfi", "image2", "rtp", "rtsp", "sap"}
)
PROBE_BYTES = 2 * 1024 * 1024  # FFmpeg's default is 5 MB
ANALYZE_US = 3_000_000  # microseconds of media analysed to find streams (default 5 s)
MAX_STREAMS = 64  # FFmpeg's default is 1,000; the API refuses more than 8 anyway
_NOT_ON_WHITELIST = "Format not on whitelist"
_HLS_NOT_PROBED = "Not detecting m3u8/hls"  # an HLS playlist read from a file object
# FFmpeg's av_image_check_size2: "Picture size WxH exceeds specified max pixel count N"
_PICTURE_SIZE = "Picture size "
_S = TypeVar("_S", bound=av.stream.Stream)


def _allowed_formats() -> str:
    """Every demuxer this FFmpeg has, less the refused ones and those reading no upload bytes."""
    allowed = []
    for name in sorted(av.formats_available):
        try:
            fmt = av.ContainerFormat(name, "r")
        except ValueError:  # a muxer only
            continue
        if not fmt.no_file and not set(fmt.name.split(",")) & REFUSED_FORMATS:
            allowed.append(name)
    return ",".join(allowed)


OPEN_OPTIONS = {
    "protocol_whitelist": "none",
    "format_whitelist": _allowed_formats(),
    "enable_drefs": "0",
    "use_absolute_path": "0",
    "probesize": str(PROBE_BYTES),
    "analyzeduration": str(ANALYZE_US),
    "max_streams": str(MAX_STREAMS),
}

# PyAV drops FFmpeg's log by default, which leaves errors without a reason and hides which
# demuxer a refused upload probed as. Keep errors (attached to exceptions, and captured per
# thread while opening); Python's "libav" logger stays as quiet as before. Repeats are not
# folded: PyAV would hand a folded repeat of an earlier upload's error to the next capture.
if av.logging.get_level() is None:
    av.logging.set_level(av.logging.ERROR)
    logging.getLogger("libav").setLevel(logging.CRITICAL)
av.logging.set_skip_repeated(False)


class RefusedFormat(ValueError):
    """The upload probes as a demuxer that follows paths or reads no bytes of its own."""

    code = "refused_format"

    def __init__(self, demuxer: str):
        super().__init__(
            f"the {demuxer} format is refused: it names other files or URLs to open "
            f"(playlists, concat lists, image sequences, references); send the media itself"
        )
        self.demuxer = demuxer


class NoDecoder(ValueError):
    """FFmpeg has no decoder for the codec of the stream a clip would be read from."""

    def __init__(self, kind: str):
        super().__init__(f"no decoder for the codec of the {kind} stream")


class StreamAppeared(ValueError):
    """A stream the header did not declare appeared while demuxing (FLV, MPEG-PS can add
    one); PyAV cannot index its packets (an IndexError inside its stream container)."""

    def __init__(self) -> None:
        super().__init__("a stream appeared after the header while demuxing (not supported)")


class FrameTooLarge(ValueError):
    """A decoded frame (or one the decoder refused to allocate) is over the pixel limit."""

    def __init__(self, size: str, max_pixels: int):
        super().__init__(f"a frame of {size} has more pixels than the limit of {max_pixels}")


Source = bytes | bytearray | str | os.PathLike


@contextlib.contextmanager
def open_media(
    data: Source, max_pixels: int, metadata_errors: str = "replace"
) -> Iterator[av.container.InputContainer]:
    """An input container over ``data`` (bytes, or the path of a file holding them), hardened
    as the module says; raises :class:`RefusedFormat` for a refused demuxer. Every video
    decoder of the container refuses frames over ``max_pixels``."""
    pixels = {"max_pixels": str(max_pixels)}
    with contextlib.ExitStack() as stack:
        if isinstance(data, bytes | bytearray):
            source: io.IOBase = io.BytesIO(data)
        else:
            source = stack.enter_context(open(data, "rb"))  # noqa: SIM115 (closed by the stack)
        with av.logging.Capture(local=True) as logs:
            try:
                container = av.open(
                    source,
                    "r",
                    options=pixels,  # the decoders FFmpeg runs to find stream parameters
                    container_options=OPEN_OPTIONS,
                    metadata_errors=metadata_errors,
                )
            except av.FFmpegError as exc:
                refused = _refused_demuxer(logs)
                if refused:
                    raise RefusedFormat(refused) from exc
                raise
        stack.enter_context(container)
        for _, _, text in logs:  # a decoder run while probing refused a frame: so do we
            too_large = _frame_too_large(text, max_pixels)
            if too_large is not None:
                raise too_large
        for stream in container.streams.video:
            if stream.codec_context is not None:
                stream.codec_context.options = {**stream.codec_context.options, **pixels}
        try:
            yield container
        except IndexError as exc:
            if not _in_pyav_streams(exc):
                raise
            raise StreamAppeared() from exc


def _refused_demuxer(logs: list[tuple[int, str, str]]) -> str | None:
    """The refused demuxer FFmpeg's log names while opening: one off the whitelist, or HLS
    (which FFmpeg does not even probe from a file object, saying so)."""
    for _, name, text in logs:
        if text.startswith(_NOT_ON_WHITELIST):
            return name or "probed"
        if _HLS_NOT_PROBED in text:
            return "hls"
    return None


def _in_pyav_streams(exc: IndexError) -> bool:
    """Whether ``exc`` was raised by PyAV's stream container (not by the caller's code)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.endswith(os.path.join("container", "streams.py"))


def video_streams(container: av.container.InputContainer) -> list[av.VideoStream]:
    """The real video streams: an attached picture (cover art of an audio file) is not video."""
    cover = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not s.disposition & cover]


def decodable(stream: _S) -> _S:
    """``stream``, if FFmpeg has a decoder for its codec; else :class:`NoDecoder` (a mangled or
    unknown codec id leaves the stream without a codec context)."""
    if stream.codec_context is None:
        raise NoDecoder(stream.type)
    return stream


def check_frame(frame: av.VideoFrame, max_pixels: int) -> None:
    """Refuse a decoded frame over ``max_pixels`` (:class:`FrameTooLarge`)."""
    if frame.width * frame.height > max_pixels:
        raise FrameTooLarge(f"{frame.width}x{frame.height}", max_pixels)


def refused_frame_size(exc: BaseException, max_pixels: int) -> FrameTooLarge | None:
    """The :class:`FrameTooLarge` behind a decoder error, when the decoder refused to allocate a
    frame over ``max_pixels`` (FFmpeg: "Picture size WxH is invalid"); else None."""
    log = getattr(exc, "log", None)  # FFmpeg's last error (PyAV attaches it)
    return _frame_too_large(log[2] if isinstance(log, tuple) else str(exc), max_pixels)


def _frame_too_large(text: str, max_pixels: int) -> FrameTooLarge | None:
    if _PICTURE_SIZE not in text or "max pixel" not in text:
        return None
    size = text.split(_PICTURE_SIZE, 1)[1].split(" ", 1)[0]
    return FrameTooLarge(size, max_pixels)
