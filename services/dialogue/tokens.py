"""Token counts for the context window: tiktoken with the model's encoding, read from files in the package.

- **Which encoding.** A table of model-name prefixes (`DEFAULT_MODEL_ENCODINGS`; the longest matching prefix
  wins, and a fine-tuned model's `ft:` is dropped first): o200k_base for gpt-4o, gpt-4.1, gpt-4.5, gpt-5 and the
  o1/o3/o4 reasoning models, cl100k_base for gpt-4, gpt-3.5-turbo and the embedding models.
- **Where the encodings come from.** tiktoken's wheel has none; on first use it downloads them (and caches them
  under `TIKTOKEN_CACHE_DIR` or the temporary directory). chatmesh never lets it: cl100k_base and o200k_base ship
  in `chatmesh/dialogue/encodings/` (see the README there) and are read from that folder only, and each file's
  SHA-256 must be the hash tiktoken itself expects for it, or it is refused (`EncodingFileError`). The pattern,
  special tokens and expected hash are tiktoken's own (`tiktoken_ext.openai_public`): its constructor runs with
  its file loader replaced by one that reads this folder (`load_encoding`). No network, no cache directory, no
  environment variable is involved.
- **A model with no known encoding** is never an error: its text is estimated (`estimate_tokens`) as its UTF-8
  bytes / 3, plus 10 %, rounded up. It over-estimates because these tokenizers spend fewer tokens than that:
  about 4.5 bytes a token on English in both encodings (the estimate is about 1.7 times the real count), and
  on Chinese (3 bytes a character) about 4 in o200k_base and 3 in cl100k_base, whose 3-bytes-a-token matches
  the division and whose occasional 2-token characters the 10 % covers (on the tests' samples: English 113 vs
  65 / 64, Chinese 103 vs 66 / 97). Text denser in tokens than that (single letters between spaces, runs of
  punctuation, emoji, very short Chinese snippets in cl100k_base) can exceed it; the window's margin is for that.
- **Chat messages** count as in OpenAI's cookbook: 3 tokens per message, each value's tokens, 1 more for a
  `name`, and 3 for priming the reply. Image parts count by OpenAI's image rule (`image_tokens`).
- **Off the event loop.** Encoding holds the thread that runs it for milliseconds on long text;
  `count_messages_off_loop` runs long counts (over `OFF_LOOP_TEXT_CHARS` characters) in a worker thread and
  short ones inline.

A `TokenCounter` is built once per process: it loads each encoding once, on first use or at `preload()`, and is
safe to use from any thread.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tiktoken
import tiktoken_ext.openai_public

ENCODINGS_DIR = Path(__file__).resolve().with_name("encodings")
# The encodings that ship in ENCODINGS_DIR, as `<name>.tiktoken`.
SHIPPED_ENCODINGS = ("cl100k_base", "o200k_base")

# Model-name prefix → encoding name; the longest prefix that matches wins. Settings (model_encodings) add to it.
DEFAULT_MODEL_ENCODINGS: Mapping[str, str] = MappingProxyType(
    {
        "gpt-4o": "o200k_base",  # gpt-4o, gpt-4o-mini, gpt-4o-2024-08-06, ...
        "chatgpt-4o": "o200k_base",
        "gpt-4.1": "o200k_base",
        "gpt-4.5": "o200k_base",
        "gpt-5": "o200k_base",
        "o1": "o200k_base",
        "o3": "o200k_base",
        "o4": "o200k_base",
        "gpt-4": "cl100k_base",  # gpt-4, gpt-4-turbo, gpt-4-0613, gpt-4-32k, ...
        "gpt-3.5-turbo": "cl100k_base",
        "gpt-35-turbo": "cl100k_base",  # Azure's deployment name
        "text-embedding-3-": "cl100k_base",
        "text-embedding-ada-002": "cl100k_base",
    }
)

# OpenAI's cookbook rule for chat messages (gpt-3.5-turbo-0613 onward, gpt-4, gpt-4o).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# Messages with more text than this (characters) are counted in a worker thread by count_messages_off_loop.
OFF_LOOP_TEXT_CHARS = 16 * 1024

# The estimate for models with no known encoding: UTF-8 bytes / 3, + 10 %, rounded up.
ESTIMATE_BYTES_PER_TOKEN = 3
ESTIMATE_MARGIN_PERCENT = 10

# OpenAI's image rule, per model family: (base tokens, tokens per 512 px tile). Longest prefix wins; "" is the
# default (gpt-4o, gpt-4.1, gpt-4.5; an over-estimate for o1, o3 and gpt-5, which charge less). gpt-4o-mini
# counts the same tiles at a higher rate.
DEFAULT_IMAGE_TILE_TOKENS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "": (85, 170),
        "gpt-4o-mini": (2833, 5667),
    }
)
IMAGE_FIT_SIDE = 2048
IMAGE_SHORT_SIDE = 768
IMAGE_TILE_SIDE = 512
# The most tiles a high-detail image can take: its short side is at most 768 px (2 tiles) and its long side at
# most 2048 px (4 tiles). Image parts whose size is unknown count this many.
IMAGE_MAX_TILES = math.ceil(IMAGE_SHORT_SIDE / IMAGE_TILE_SIDE) * math.ceil(IMAGE_FIT_SIDE / IMAGE_TILE_SIDE)

Message = Mapping[str, Any]


class EncodingFileError(ValueError):
    """An encoding file that is missing, or whose SHA-256 is not the one tiktoken expects: it is not used."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_ranks(path: Path, expected_hash: str | None) -> dict[bytes, int]:
    """A `.tiktoken` file's ranks (one `base64-token rank` per line, tiktoken's format), after its hash is checked."""
    if not expected_hash:
        raise EncodingFileError(f"{path}: tiktoken gives no expected SHA-256 for it, so it cannot be verified")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EncodingFileError(f"encoding file {path} cannot be read: {error}") from error
    actual_hash = _sha256(data)
    if actual_hash != expected_hash:
        raise EncodingFileError(
            f"encoding file {path} is refused: its SHA-256 is {actual_hash}, but tiktoken {tiktoken.__version__} "
            f"expects {expected_hash} (a corrupt file, or one for another tiktoken version)"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _constructor(name: str) -> Callable[[], dict[str, Any]]:
    """tiktoken's constructor for `name`, checked to do nothing but call `load_tiktoken_bpe` and use constants.

    It is run with that one global replaced (see `load_encoding`). Should a tiktoken release make a constructor
    reach anything else (a download helper, another constructor), this refuses it rather than let it touch the
    network; tests/unit/test_tokens.py fails on the same change.
    """
    if name not in SHIPPED_ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; chatmesh ships {', '.join(SHIPPED_ENCODINGS)}")
    constructor = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS.get(name)
    code = getattr(constructor, "__code__", None)
    if constructor is None or code is None:
        raise RuntimeError(f"tiktoken {tiktoken.__version__} has no constructor for {name}")
    reached = {
        global_name
        for global_name in code.co_names
        if global_name in constructor.__globals__ and not isinstance(constructor.__globals__[global_name], str)
    }
    nested = any(isinstance(const, types.CodeType) for const in code.co_consts)
    if reached != {"load_tiktoken_bpe"} or nested or constructor.__closure__:
        raise RuntimeError(
            f"tiktoken {tiktoken.__version__} builds {name} differently (it reaches {sorted(reached)}); "
            "chatmesh.dialogue.tokens must be updated for it"
        )
    return constructor


def load_encoding(name: str, directory: Path = ENCODINGS_DIR) -> tiktoken.Encoding:
    """The encoding `name` (one of SHIPPED_ENCODINGS) from `directory/<name>.tiktoken`, verified by SHA-256.

    tiktoken's own constructor (`tiktoken_ext.openai_public`) supplies the pattern, the special tokens and the
    expected hash; it runs as a copy whose `load_tiktoken_bpe` reads `directory` instead of downloading.
    Raises EncodingFileError for a missing or mismatching file.
    """
    constructor = _constructor(name)
    loaded: list[str] = []

    def load_from_directory(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        file_name = blobpath.rsplit("/", 1)[-1]
        if file_name != f"{name}.tiktoken":
            raise RuntimeError(f"tiktoken's constructor for {name} asks for {blobpath}, not {name}.tiktoken")
        loaded.append(file_name)
        return _read_ranks(Path(directory) / file_name, expected_hash)

    isolated = types.FunctionType(
        constructor.__code__,
        {**constructor.__globals__, "load_tiktoken_bpe": load_from_directory},
        constructor.__name__,
        constructor.__defaults__,
    )
    parameters = isolated()
    if len(loaded) != 1:
        raise RuntimeError(f"tiktoken's constructor for {name} loaded {len(loaded)} files, not 1")
    encoding = tiktoken.Encoding(**parameters)
    # tiktoken keeps the ranks it was given as a Python dict (about 30 MiB for o200k_base) only to pickle the
    # encoding; its Rust core encodes and decodes from its own copy. chatmesh never pickles an encoding, so the
    # dict is dropped (tests/unit/test_tokens.py fails if a tiktoken release starts using it otherwise).
    del encoding._mergeable_ranks
    return encoding


def estimate_tokens(text: str) -> int:
    """The token estimate for a model with no known encoding: UTF-8 bytes / 3, + 10 %, rounded up."""
    scaled = len(text.encode("utf-8")) * (100 + ESTIMATE_MARGIN_PERCENT)
    return -(-scaled // (ESTIMATE_BYTES_PER_TOKEN * 100))


def image_tokens(
    width: int, height: int, detail: str = "auto", *, base_tokens: int = 85, tile_tokens: int = 170
) -> int:
    """OpenAI's image token rule. `low` detail costs `base_tokens`. `high` and `auto` (counted as high): the image
    is scaled down to fit 2048 x 2048, then down so its shortest side is 768 px (small images are not scaled up),
    and costs `tile_tokens` per 512 px tile it covers plus `base_tokens`. 1024 x 1024 → 765, 2048 x 4096 → 1105."""
    if width <= 0 or height <= 0:
        raise ValueError(f"an image of {width} x {height} px")
    if detail == "low":
        return base_tokens
    scale = min(1.0, IMAGE_FIT_SIDE / max(width, height))
    scale *= min(1.0, IMAGE_SHORT_SIDE / (min(width, height) * scale))
    tiles = math.ceil(width * scale / IMAGE_TILE_SIDE - 1e-9) * math.ceil(height * scale / IMAGE_TILE_SIDE - 1e-9)
    return base_tokens + tile_tokens * tiles


def context_tokens(table: Mapping[str, int], default: int, model: str) -> int:
    """A model's context size: the entry of `table` with the longest prefix of `model`, else `default`."""
    found = _longest_prefix(_by_length(table), model)
    return default if found is None else found


def _longest_prefix(table: Sequence[tuple[str, Any]], name: str) -> Any:
    for prefix, value in table:
        if name.startswith(prefix):
            return value
    return None


def _by_length(table: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(table.items(), key=lambda item: len(item[0]), reverse=True)


def _model_name(model: str) -> str:
    return model.removeprefix("ft:")


def text_size(messages: Sequence[Message]) -> int:
    """The characters of text in `messages` (string values and text parts): what decides counting off the loop."""
    size = 0
    for message in messages:
        for value in message.values():
            if isinstance(value, str):
                size += len(value)
            elif isinstance(value, list):
                size += sum(len(part.get("text") or "") for part in value if isinstance(part, Mapping))
    return size


class TokenCounter:
    """Counts tokens per model. Build one per process; each encoding is loaded once, when first needed (or at
    `preload()`), and every method is safe to call from any thread.

    `model_encodings` maps model-name prefixes to encoding names (longest prefix wins; each must be one of
    SHIPPED_ENCODINGS, checked here so that a bad setting fails at start). `image_tile_tokens` maps prefixes to
    OpenAI's (base, per tile) image token rates.
    """

    def __init__(
        self,
        model_encodings: Mapping[str, str] = DEFAULT_MODEL_ENCODINGS,
        *,
        encodings_dir: Path = ENCODINGS_DIR,
        image_tile_tokens: Mapping[str, tuple[int, int]] = DEFAULT_IMAGE_TILE_TOKENS,
    ) -> None:
        unknown = sorted({name for name in model_encodings.values() if name not in SHIPPED_ENCODINGS})
        if unknown:
            raise ValueError(f"model encodings name {unknown}; chatmesh ships {', '.join(SHIPPED_ENCODINGS)}")
        self._model_encodings = _by_length(model_encodings)
        self._image_tile_tokens = _by_length({"": (85, 170), **image_tile_tokens})
        self._encodings_dir = Path(encodings_dir)
        self._encodings: dict[str, tiktoken.Encoding] = {}
        self._lock = threading.Lock()

    def encoding_for(self, model: str) -> str | None:
        """The encoding name for `model`, or None when no prefix in the table matches."""
        return _longest_prefix(self._model_encodings, _model_name(model))

    def encoding(self, name: str) -> tiktoken.Encoding:
        """The loaded encoding `name`, loading it from the encodings folder the first time."""
        encoding = self._encodings.get(name)
        if encoding is None:
            with self._lock:
                encoding = self._encodings.get(name)
                if encoding is None:
                    encoding = load_encoding(name, self._encodings_dir)
                    self._encodings[name] = encoding
        return encoding

    def preload(self, models: Sequence[str] | None = None) -> None:
        """Loads the encodings of `models` (None: every encoding the table names) now, about half a second
        each, so that no request waits for them. Each takes 25 to 35 MiB of memory."""
        names = {name for _, name in self._model_encodings} if models is None else set(map(self.encoding_for, models))
        for name in sorted(name for name in names if name is not None):
            self.encoding(name)

    def loaded(self, model: str) -> bool:
        """Whether counting for `model` needs no encoding to be loaded first."""
        name = self.encoding_for(model)
        return name is None or name in self._encodings

    def count_text(self, model: str, text: str) -> int:
        """The tokens of `text` for `model`; special-token strings in it count as ordinary text. The estimate
        (`estimate_tokens`) when the model has no known encoding."""
        name = self.encoding_for(model)
        if name is None:
            return estimate_tokens(text)
        return len(self.encoding(name).encode_ordinary(text))

    def image_part_tokens(self, model: str, image_url: Mapping[str, Any], size: tuple[int, int] | None = None) -> int:
        """An `image_url` part's tokens: by `image_tokens` when its (width, height) is known, else the most an
        image of its detail can cost for the model's family (high detail, 768 x 2048 px: 8 tiles)."""
        base_tokens, tile_tokens = _longest_prefix(self._image_tile_tokens, _model_name(model)) or (85, 170)
        detail = str(image_url.get("detail") or "auto")
        if size is not None:
            return image_tokens(*size, detail, base_tokens=base_tokens, tile_tokens=tile_tokens)
        if detail == "low":
            return base_tokens
        return base_tokens + tile_tokens * IMAGE_MAX_TILES

    def _count_value(self, model: str, value: Any, image_sizes: Mapping[str, tuple[int, int]]) -> int:
        if value is None:
            return 0
        if isinstance(value, str):
            return self.count_text(model, value)
        if isinstance(value, list):
            total = 0
            for part in value:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text":
                    total += self.count_text(model, part.get("text") or "")
                elif kind == "image_url":
                    image_url = part.get("image_url") or {}
                    total += self.image_part_tokens(model, image_url, image_sizes.get(image_url.get("url", "")))
                else:
                    total += self.count_text(model, json.dumps(part, separators=(",", ":"), ensure_ascii=False))
            return total
        # Anything else (tool calls, say): its compact JSON, which is no less than what the model reads of it.
        return self.count_text(model, json.dumps(value, separators=(",", ":"), ensure_ascii=False))

    def count_messages(
        self, model: str, messages: Sequence[Message], image_sizes: Mapping[str, tuple[int, int]] | None = None
    ) -> int:
        """The prompt tokens of chat `messages` for `model`, by OpenAI's cookbook rule: 3 per message, the tokens of
        each of its values (role, content, name, ...), 1 more for a `name`, and 3 priming the reply.

        `content` may be a string or a list of parts: `{"type": "text", "text": ...}` counts its text,
        `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}` counts by OpenAI's image rule, with the
        image's (width, height) from `image_sizes` (keyed by URL) when known, else the most it can cost.
        """
        sizes = image_sizes or {}
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                total += self._count_value(model, value, sizes)
                if key == "name":
                    total += TOKENS_PER_NAME
        return total

    async def count_messages_off_loop(
        self,
        model: str,
        messages: Sequence[Message],
        image_sizes: Mapping[str, tuple[int, int]] | None = None,
        *,
        threshold: int = OFF_LOOP_TEXT_CHARS,
    ) -> int:
        """`count_messages`, in a worker thread when the messages hold more than `threshold` characters of text
        (encoding them would hold the event loop for milliseconds), inline otherwise."""
        if text_size(messages) > threshold:
            return await asyncio.to_thread(self.count_messages, model, messages, image_sizes)
        return self.count_messages(model, messages, image_sizes)
