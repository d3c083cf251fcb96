"""A user's message as content parts, and image sizes read from their headers."""

import base64

import pytest
from support.images import gif, jpeg, png, webp

from chatmesh.dialogue.content import image_size, image_sizes, user_content
from chatmesh.v1 import chat_pb2


def inline(data: bytes, mime_type: str = "image/png", **fields) -> chat_pb2.Image:
    return chat_pb2.Image(inline=chat_pb2.InlineImage(data=data, mime_type=mime_type), **fields)


def test_a_message_without_images_is_its_text() -> None:
    assert user_content("hello") == "hello"
    assert user_content("hello", []) == "hello"


def test_images_follow_the_text_as_image_url_parts() -> None:
    data = png()
    images = [
        chat_pb2.Image(url="https://example.com/cat.png", detail=chat_pb2.IMAGE_DETAIL_LOW),
        inline(data, detail=chat_pb2.IMAGE_DETAIL_HIGH),
        chat_pb2.Image(url="https://example.com/dog.png"),
    ]

    assert user_content("what is this?", images) == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode(), "detail": "high"},
        },
        {"type": "image_url", "image_url": {"url": "https://example.com/dog.png", "detail": "auto"}},
    ]


def test_an_image_only_message_has_no_text_part() -> None:
    content = user_content("", [chat_pb2.Image(url="https://example.com/a.png", detail=chat_pb2.IMAGE_DETAIL_AUTO)])

    assert content == [{"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "auto"}}]


@pytest.mark.parametrize(
    ("data", "mime_type"),
    [
        (png(640, 480), "image/png"),
        (gif(640, 480), "image/gif"),
        (jpeg(640, 480), "image/jpeg"),
        (jpeg(640, 480, frame_marker=0xC2), "image/jpeg"),  # progressive
        (webp(640, 480, "VP8 "), "image/webp"),
        (webp(640, 480, "VP8L"), "image/webp"),
        (webp(640, 480, "VP8X"), "image/webp"),
    ],
)
def test_the_size_is_read_from_the_header(data: bytes, mime_type: str) -> None:
    assert image_size(data, mime_type) == (640, 480)


def test_large_sizes_are_read_whole() -> None:
    assert image_size(png(100_000, 3), "image/png") == (100_000, 3)
    assert image_size(webp(16_384, 16_383, "VP8L"), "image/webp") == (16_384, 16_383)
    assert image_size(webp(70_000, 2, "VP8X"), "image/webp") == (70_000, 2)


def test_jpeg_fill_bytes_and_standalone_markers_are_skipped() -> None:
    data = jpeg(7, 9)
    padded = data[:2] + b"\xff\xff\xff\xd0" + data[2:]

    assert image_size(padded, "image/jpeg") == (7, 9)


@pytest.mark.parametrize(
    ("data", "mime_type"),
    [
        (png(), "image/jpeg"),  # not the type it says
        (jpeg(), "image/png"),
        (png()[:20], "image/png"),  # cut short
        (jpeg()[:30], "image/jpeg"),
        (b"\xff\xd8\xff\xda\x00\x02", "image/jpeg"),  # a scan before any frame
        (b"", "image/gif"),
        (webp(kind="ALPH"), "image/webp"),
        (png(0, 3), "image/png"),  # no pixels
        (png(), "image/tiff"),  # not a type chatmesh takes
    ],
)
def test_an_unreadable_header_has_no_size(data: bytes, mime_type: str) -> None:
    assert image_size(data, mime_type) is None


def test_image_sizes_are_keyed_by_the_url_the_model_is_given() -> None:
    data = gif(30, 40)
    images = [inline(data, "image/gif"), chat_pb2.Image(url="https://example.com/a.png"), inline(b"junk")]

    assert image_sizes(images) == {"data:image/gif;base64," + base64.b64encode(data).decode(): (30, 40)}
