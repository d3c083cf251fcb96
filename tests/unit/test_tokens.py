"""Token counting: each model's tiktoken encoding, read from the files that ship in the package and verified by
SHA-256, never downloaded; an estimate with a margin for models with no known encoding; chat messages by OpenAI's
cookbook rule and images by OpenAI's image rule; long counts off the event loop."""

import ast
import hashlib
import inspect
import pickle
import shutil
import socket
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from chatmesh.dialogue import tokens
from chatmesh.dialogue.tokens import (
    DEFAULT_MODEL_ENCODINGS,
    ENCODINGS_DIR,
    SHIPPED_ENCODINGS,
    EncodingFileError,
    TokenCounter,
    estimate_tokens,
    image_tokens,
    load_encoding,
)

# The SHA-256 of the shipped files: what tiktoken 0.14.0 expects (tiktoken_ext/openai_public.py).
EXPECTED_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

ENGLISH = (
    "The context sent to the model is the system prompt, then the conversation's summary, then as many of the "
    "newest messages as fit the model's context size minus the reply's max_tokens and a margin. Tokens are "
    "counted with tiktoken, using the model's encoding; a model with no known encoding uses an estimate."
)
CHINESE = (
    "发送给模型的上下文依次是系统提示、对话摘要，以及在模型上下文长度减去回复的最大令牌数和余量之后，"  # noqa: RUF001 (Chinese punctuation)
    "能够容纳的最新消息。令牌数使用模型自己的编码来计算；没有已知编码的模型使用带余量的估算值。"  # noqa: RUF001
)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    counter = TokenCounter()
    counter.preload()
    return counter


# ---- the encodings: the shipped files, tiktoken's definitions, no network ----


@pytest.mark.parametrize("name", SHIPPED_ENCODINGS)
def test_the_shipped_files_are_the_ones_tiktoken_expects(name: str) -> None:
    data = (ENCODINGS_DIR / f"{name}.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == EXPECTED_SHA256[name]


@pytest.mark.parametrize("name", SHIPPED_ENCODINGS)
def test_tiktoken_still_builds_its_encodings_the_way_chatmesh_relies_on(name: str) -> None:
    """chatmesh runs tiktoken's own constructor with its `load_tiktoken_bpe` global replaced: an internal of
    tiktoken. This fails when a tiktoken release changes it (the name, the call, the file, or the hash)."""
    constructor = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]
    assert constructor.__globals__["load_tiktoken_bpe"] is tiktoken.load.load_tiktoken_bpe
    calls = []

    def record(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        calls.append((blobpath, expected_hash))
        return {}

    replaced = types.FunctionType(constructor.__code__, {**constructor.__globals__, "load_tiktoken_bpe": record})
    parameters = replaced()

    assert calls == [(f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken", EXPECTED_SHA256[name])]
    assert parameters["name"] == name
    assert set(parameters) <= {"name", "pat_str", "mergeable_ranks", "special_tokens", "explicit_n_vocab"}
    assert "<|endoftext|>" in parameters["special_tokens"]
    assert tokens._constructor(name) is constructor


def test_a_tiktoken_constructor_that_reaches_anything_else_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def downloads() -> dict:
        return {"mergeable_ranks": tiktoken.load.read_file_cached("https://example.invalid/o200k_base.tiktoken")}

    monkeypatch.setitem(tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS, "o200k_base", downloads)
    with pytest.raises(RuntimeError, match="builds o200k_base differently"):
        load_encoding("o200k_base")


def test_encodings_load_with_the_network_and_tiktokens_downloader_impossible(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def impossible(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the network or tiktoken's downloader was used: {args}")

    for name in ("read_file", "read_file_cached", "load_tiktoken_bpe"):
        monkeypatch.setattr(tiktoken.load, name, impossible)
    monkeypatch.setattr(tiktoken_ext.openai_public, "load_tiktoken_bpe", impossible)
    monkeypatch.setattr(socket.socket, "connect", impossible)
    monkeypatch.setattr(socket, "create_connection", impossible)
    monkeypatch.setattr(socket, "getaddrinfo", impossible)
    monkeypatch.setitem(sys.modules, "requests", None)
    monkeypatch.setitem(sys.modules, "blobfile", None)
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    fresh = TokenCounter()
    assert fresh.count_text("gpt-4o", "hello world") == 2
    assert fresh.count_text("gpt-4", "hello world") == 2
    assert not cache.exists()


def test_a_corrupted_encoding_file_is_refused_by_its_hash(tmp_path: Path) -> None:
    for name in SHIPPED_ENCODINGS:
        shutil.copy(ENCODINGS_DIR / f"{name}.tiktoken", tmp_path)
    corrupted = tmp_path / "o200k_base.tiktoken"
    data = bytearray(corrupted.read_bytes())
    data[1000] ^= 0x01
    corrupted.write_bytes(bytes(data))

    with pytest.raises(EncodingFileError, match=r"o200k_base\.tiktoken is refused: its SHA-256 is [0-9a-f]{64}"):
        load_encoding("o200k_base", tmp_path)
    with pytest.raises(EncodingFileError, match=EXPECTED_SHA256["o200k_base"]):
        TokenCounter(encodings_dir=tmp_path).count_text("gpt-4o", "hello")
    # The intact copy loads from the same folder.
    assert load_encoding("cl100k_base", tmp_path).encode_ordinary("hello world") == [15339, 1917]


def test_a_missing_encoding_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EncodingFileError, match=r"cl100k_base\.tiktoken cannot be read"):
        load_encoding("cl100k_base", tmp_path)


# ---- the ranks dict that tiktoken keeps and chatmesh drops ----

SAMPLES = (
    ENGLISH,
    CHINESE,
    "def f(x):\n\treturn x  **  2   # 🙂🚀 naïve café, Ελληνικά, русский, العربية, हिन्दी\r\n\n\n",
    "<|endoftext|> and <|endofprompt|> as plain text, then 1234567890 and \u200b\u00a0 spaces",
    "".join(chr(code) for code in range(32, 3000, 7)),
)


def _reference_encoding(name: str) -> tiktoken.Encoding:
    """The encoding as tiktoken builds it (keeping its ranks dict), from the shipped file."""
    constructor = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]

    def from_shipped_file(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        return tokens._read_ranks(ENCODINGS_DIR / f"{name}.tiktoken", expected_hash)

    globals_ = {**constructor.__globals__, "load_tiktoken_bpe": from_shipped_file}
    return tiktoken.Encoding(**types.FunctionType(constructor.__code__, globals_)())


def test_tiktoken_uses_its_ranks_dict_only_to_pickle_an_encoding() -> None:
    """`load_encoding` drops `Encoding._mergeable_ranks`, a private attribute of tiktoken, to save its memory. This
    fails when a tiktoken release renames it or reads it anywhere but where an encoding is built and pickled."""
    ranks = {b"a": 0, b"b": 1, b"ab": 2}
    assert tiktoken.Encoding("t", pat_str=r"\w+", mergeable_ranks=ranks, special_tokens={})._mergeable_ranks is ranks
    source = ast.parse(textwrap.dedent(inspect.getsource(tiktoken.Encoding)))
    readers = {
        function.name
        for function in ast.walk(source)
        if isinstance(function, ast.FunctionDef)
        and any(isinstance(node, ast.Attribute) and node.attr == "_mergeable_ranks" for node in ast.walk(function))
    }
    assert readers == {"__init__", "__getstate__"}


@pytest.mark.parametrize("name", SHIPPED_ENCODINGS)
def test_a_loaded_encoding_keeps_no_python_copy_of_its_ranks(name: str) -> None:
    encoding = load_encoding(name)
    assert not hasattr(encoding, "_mergeable_ranks")
    with pytest.raises(AttributeError):
        pickle.dumps(encoding)


@pytest.mark.parametrize("name", SHIPPED_ENCODINGS)
def test_an_encoding_without_its_ranks_dict_encodes_and_decodes_exactly_as_tiktoken_does(name: str) -> None:
    loaded, reference = load_encoding(name), _reference_encoding(name)
    assert loaded.n_vocab == reference.n_vocab
    for sample in SAMPLES:
        assert loaded.encode_ordinary(sample) == reference.encode_ordinary(sample)
        encoded = reference.encode(sample, allowed_special="all")
        assert loaded.encode(sample, allowed_special="all") == encoded
        assert loaded.decode(encoded) == reference.decode(encoded) == sample
    assert loaded.token_byte_values() == reference.token_byte_values()
    every_ordinary_token = range(len(reference.token_byte_values()))
    assert loaded.decode_tokens_bytes(every_ordinary_token) == reference.decode_tokens_bytes(every_ordinary_token)


def test_only_the_shipped_encodings_can_be_named() -> None:
    with pytest.raises(ValueError, match="p50k_base"):
        TokenCounter({"text-davinci-003": "p50k_base"})
    with pytest.raises(ValueError, match="unknown encoding"):
        load_encoding("o200k_harmony")


def test_each_encoding_is_loaded_once_however_many_threads_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real_load = tokens.load_encoding

    def counted(name: str, directory: Path) -> tiktoken.Encoding:
        loads.append(name)
        return real_load(name, directory)

    monkeypatch.setattr(tokens, "load_encoding", counted)
    fresh = TokenCounter()
    counts = []
    threads = [
        threading.Thread(target=lambda: counts.append(fresh.count_text("gpt-4o", "hello world"))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert loads == ["o200k_base"]
    assert counts == [2] * 8


# ---- which encoding a model uses ----


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.1-nano-2025-04-14", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o1-mini-2024-09-12", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::9abcDEF", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
    ],
)
def test_a_model_uses_the_encoding_of_its_longest_matching_prefix(model: str, encoding: str) -> None:
    assert TokenCounter().encoding_for(model) == encoding


@pytest.mark.parametrize("model", ["claude-3-5-sonnet", "llama-3.1-70b", "mistral-large", "", "GPT-4O"])
def test_a_model_with_no_matching_prefix_has_no_encoding(model: str) -> None:
    assert TokenCounter().encoding_for(model) is None


def test_the_table_is_a_parameter_with_the_default_table_as_default() -> None:
    table = {**DEFAULT_MODEL_ENCODINGS, "acme-chat": "cl100k_base", "gpt-4o-legacy": "cl100k_base"}
    counter = TokenCounter(table)
    assert counter.encoding_for("acme-chat-v2") == "cl100k_base"
    assert counter.encoding_for("gpt-4o-legacy-1") == "cl100k_base"
    assert counter.encoding_for("gpt-4o-mini") == "o200k_base"
    assert TokenCounter().encoding_for("acme-chat-v2") is None


# ---- counting text ----


@pytest.mark.parametrize(
    ("text", "o200k", "cl100k"),
    [
        ("hello world", 2, 2),
        ("Hello, world!", 4, 4),
        ("The quick brown fox jumps over the lazy dog.", 10, 10),
        ("你好，世界！今天天气很好。", 9, 16),  # noqa: RUF001
        # Special-token strings in a message are ordinary text, never an error.
        ("<|endoftext|>", 7, 7),
        ("", 0, 0),
    ],
)
def test_known_token_counts_in_both_encodings(counter: TokenCounter, text: str, o200k: int, cl100k: int) -> None:
    assert counter.count_text("gpt-4o-mini", text) == o200k
    assert counter.count_text("gpt-4", text) == cl100k


@pytest.mark.parametrize(("text", "estimate"), [("", 0), ("abc", 2), ("hello world", 5), ("你好", 3), ("x" * 300, 110)])
def test_the_estimate_is_utf8_bytes_over_3_plus_10_percent_rounded_up(text: str, estimate: int) -> None:
    assert estimate_tokens(text) == estimate


def test_a_model_with_no_known_encoding_is_estimated_never_an_error(counter: TokenCounter) -> None:
    assert counter.count_text("some-local-model", ENGLISH) == estimate_tokens(ENGLISH)
    assert counter.count_messages("some-local-model", [{"role": "user", "content": "hello world"}]) == (
        3 + estimate_tokens("user") + estimate_tokens("hello world") + 3
    )


@pytest.mark.parametrize("sample", [ENGLISH, CHINESE], ids=["english", "chinese"])
def test_the_estimate_is_no_less_than_the_real_count(counter: TokenCounter, sample: str) -> None:
    assert estimate_tokens(sample) >= counter.count_text("gpt-4o", sample)
    assert estimate_tokens(sample) >= counter.count_text("gpt-4", sample)


# ---- chat messages ----


def test_chat_messages_count_by_the_cookbook_rule(counter: TokenCounter) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "name": "alice", "content": "hello world"},
        {"role": "assistant", "content": "Hi! How can I help?"},
    ]
    encoding = counter.encoding("o200k_base")
    per_message = [3 + sum(len(encoding.encode(value)) for value in message.values()) for message in messages]
    by_formula = sum(per_message) + 1 + 3  # 1 for the name, 3 priming the reply

    assert counter.count_messages("gpt-4o", messages) == by_formula == 32
    assert counter.count_messages("gpt-4o", []) == 3


def test_text_parts_count_their_text_like_string_content(counter: TokenCounter) -> None:
    as_string = [{"role": "user", "content": "hello world again"}]
    as_parts = [
        {"role": "user", "content": [{"type": "text", "text": "hello world"}, {"type": "text", "text": " again"}]}
    ]
    assert counter.count_messages("gpt-4o", as_parts) == counter.count_messages("gpt-4o", as_string)


def test_image_parts_count_by_openais_image_rule(counter: TokenCounter) -> None:
    def turn(detail: str, url: str = "https://example.com/cat.png") -> list[dict]:
        image = {"type": "image_url", "image_url": {"url": url, "detail": detail}}
        return [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]

    text_only = counter.count_messages("gpt-4o", [{"role": "user", "content": "what is this?"}])
    sizes = {"https://example.com/cat.png": (1024, 1024)}

    assert counter.count_messages("gpt-4o", turn("high"), sizes) == text_only + 765
    assert counter.count_messages("gpt-4o", turn("auto"), sizes) == text_only + 765
    assert counter.count_messages("gpt-4o", turn("low"), sizes) == text_only + 85
    # An image whose size is unknown costs the most its detail can: high detail at 768 x 2048, 8 tiles.
    assert counter.count_messages("gpt-4o", turn("high", "https://example.com/other.png"), sizes) == text_only + 1445
    assert counter.count_messages("gpt-4o", turn("low", "https://example.com/other.png")) == text_only + 85
    # gpt-4o-mini counts the same tiles at its own rates.
    mini_text_only = counter.count_messages("gpt-4o-mini", [{"role": "user", "content": "what is this?"}])
    assert counter.count_messages("gpt-4o-mini", turn("high"), sizes) == mini_text_only + 2833 + 4 * 5667
    assert counter.count_messages("gpt-4o-mini", turn("high", "https://example.com/other.png")) == (
        mini_text_only + 2833 + 8 * 5667
    )


@pytest.mark.parametrize(
    ("width", "height", "detail", "expected"),
    [
        (1024, 1024, "high", 765),  # scaled to 768 x 768: 4 tiles
        (2048, 4096, "high", 1105),  # to 1024 x 2048, then 768 x 1536: 6 tiles
        (4096, 8192, "low", 85),
        (1024, 1024, "auto", 765),  # auto counts as high
        (768, 2048, "high", 1445),  # the most: 8 tiles
        (10000, 100, "high", 85 + 170 * 4),  # to 2048 x 20: 4 x 1 tiles
        (512, 512, "high", 255),  # one tile, no scaling
        (100, 100, "high", 255),  # small images are not scaled up
    ],
)
def test_image_tokens(width: int, height: int, detail: str, expected: int) -> None:
    assert image_tokens(width, height, detail) == expected


def test_an_image_of_no_pixels_is_an_error() -> None:
    with pytest.raises(ValueError):
        image_tokens(0, 100, "high")


# ---- off the event loop ----


async def test_long_messages_are_counted_in_a_worker_thread_and_short_ones_inline(
    counter: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = []
    real_count = counter.count_messages

    def recorded(*args: object) -> int:
        threads.append(threading.get_ident())
        return real_count(*args)

    monkeypatch.setattr(counter, "count_messages", recorded)
    short = [{"role": "user", "content": "hello world"}]
    long = [{"role": "user", "content": "hello world " * 1500}]  # 18,000 characters, over 16 KiB

    assert await counter.count_messages_off_loop("gpt-4o", short) == real_count("gpt-4o", short)
    assert await counter.count_messages_off_loop("gpt-4o", long) == real_count("gpt-4o", long)
    loop_thread = threading.get_ident()
    assert threads[0] == loop_thread
    assert threads[1] != loop_thread
