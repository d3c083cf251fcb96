"""A user's message as the model reads it: its text, and its images as OpenAI image content parts.

An image goes to the model as its https URL, which the provider fetches, or inline as a `data:` URL of its
base64 bytes. `image_size` reads an inline image's width and height from its header (PNG, JPEG, WebP, GIF),
for counting its tokens by OpenAI's image rule; a small parser of the formats' headers, since no imaging
library is a dependency and the size is all that is needed.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from chatmesh.v1 import chat_pb2

_DETAILS = {
    chat_pb2.IMAGE_DETAIL_UNSPECIFIED: "auto",
    chat_pb2.IMAGE_DETAIL_AUTO: "auto",
    chat_pb2.IMAGE_DETAIL_LOW: "low",
    chat_pb2.IMAGE_DETAIL_HIGH: "high",
}


def image_detail(image: chat_pb2.Image) -> str:
    """ "auto", "low" or "high", as OpenAI names the detail of an image part."""
    return _DETAILS.get(image.detail, "auto")


def image_url(image: chat_pb2.Image) -> str:
    """The URL the model is given: the image's own https URL, or a `data:<mime>;base64,<bytes>` URL."""
    if image.WhichOneof("source") == "inline":
        encoded = base64.b64encode(image.inline.data).decode("ascii")
        return f"data:{image.inline.mime_type};base64,{encoded}"
    return image.url


def image_part(image: chat_pb2.Image) -> dict[str, Any]:
    """`{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`."""
    return {"type": "image_url", "image_url": {"url": image_url(image), "detail": image_detail(image)}}


def user_content(text: str, images: Iterable[chat_pb2.Image] = ()) -> str | list[dict[str, Any]]:
    """A user message's `content`: the text itself when there are no images; else content parts, the text
    first (left out when empty: an image-only message) and then one image part per image, in order."""
    parts = [image_part(image) for image in images]
    if not parts:
        return text
    return ([{"type": "text", "text": text}] if text else []) + parts


def image_sizes(images: Iterable[chat_pb2.Image]) -> dict[str, tuple[int, int]]:
    """(width, height) of the inline images whose header says, keyed by the URL their part carries (the key
    TokenCounter.count_messages takes). A URL's image is not fetched: its size is unknown."""
    sizes: dict[str, tuple[int, int]] = {}
    for image in images:
        if image.WhichOneof("source") == "inline":
            size = image_size(image.inline.data, image.inline.mime_type)
            if size is not None:
                sizes[image_url(image)] = size
    return sizes


def image_size(data: bytes, mime_type: str) -> tuple[int, int] | None:
    """(width, height) in pixels from the header of a PNG, JPEG, WebP or GIF image; None when the bytes are
    not an image of that type, or its header is cut short or malformed."""
    reader = _READERS.get(mime_type)
    if reader is None:
        return None
    try:
        size = reader(data)
    except (struct.error, IndexError, ValueError):
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _png_size(data: bytes) -> tuple[int, int] | None:
    # The signature, then the IHDR chunk (length, type, width, height, ...), which must come first.
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _gif_size(data: bytes) -> tuple[int, int] | None:
    # The logical screen descriptor follows the 6-byte signature.
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        return None
    width, height = struct.unpack("<HH", data[6:10])
    return width, height


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: a key frame's start code, then 14-bit width and height
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: a signature byte, then width - 1 and height - 1 in 14 bits each
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the canvas's width - 1 and height - 1 in 24 bits each
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


# Start-of-frame markers, whose segment holds the image's size: every SOFn but DHT (C4), JPG (C8) and DAC (CC).
_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # Segments (0xFF, marker, 2-byte length that counts itself, payload) from SOI until a start of frame.
    if data[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill bytes before a marker
            offset += 1
            continue
        if marker in _JPEG_STANDALONE:
            offset += 2
            continue
        if marker in (0xD9, 0xDA):  # the image ended, or its scan began, with no frame header
            return None
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
            return width, height
        if length < 2:
            return None
        offset += 2 + length
    return None


_READERS: Mapping[str, Any] = {
    "image/png": _png_size,
    "image/jpeg": _jpeg_size,
    "image/webp": _webp_size,
    "image/gif": _gif_size,
}
