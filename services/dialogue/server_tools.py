"""Server-side tools: functions the model may call that dialogue runs itself, as a request enables them by name
(ChatOptions.server_tools). They are the built-in `current_time` and `knowledge_search`, and the operator's HTTP
endpoints, declared in the YAML file `CHATMESH_TOOLS_FILE`:

    tools:
      - name: order_status              # ^[a-zA-Z0-9_-]{1,64}$, unique, not a built-in's name
        description: Looks up an order's status by its number.
        url: http://orders.internal:8080/v1/status   # http or https
        allowed_hosts: [orders.internal]            # required; the url's host must be on it
        timeout_seconds: 3                           # optional; default tool_timeout_seconds
        parameters: {type: object, properties: {order_id: {type: string}}, required: [order_id]}
        headers_from_env: {Authorization: ORDERS_API_AUTHORIZATION}   # optional: header -> env var of its value

The file is read and checked once, at start; a bad file stops the process with every problem named by its tool
and field, e.g. `tools[0] (order_status).headers_from_env.Authorization: environment variable
ORDERS_API_AUTHORIZATION is not set`. `parameters` is a JSON Schema (Draft 2020-12) of an object; without it,
the tool takes no arguments.

A call's arguments must be a JSON object that fits the tool's schema, else the tool is not run. An HTTP tool is
a POST of the arguments as JSON to its url, with its headers; redirects are followed to the hosts of
`allowed_hosts` only (never from https to http), at most 3 of them. A 2xx answer's body (UTF-8) is the result.
Every failure is a result too, marked as an error, whose text tells the model what went wrong: refused
arguments, a non-2xx status (with the start of the body), a timeout, an unreachable endpoint, a redirect
elsewhere, or a body longer than tool_max_result_chars.

The built-in `current_time` takes an optional IANA `timezone` (UTC when omitted) and answers
`{"timezone": ..., "time": <ISO 8601 with offset, to the second>, "weekday": ..., "unix": ...}`.

The built-in `knowledge_search` takes a `query` and an optional `k` (the most passages; knowledge_top_k when
omitted) and searches the knowledge bases of the turn. The search itself is the turn's: dialogue hands `run_all` a
`KnowledgeSearch` for the turn's knowledge bases (None for a turn without any, which makes the call an error
result saying so), within the tool timeout like an HTTP tool.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
import zoneinfo
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatmesh.dialogue import metrics
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import ConfigurationError, DialogueSettings

log = get_logger(__name__)

CURRENT_TIME = "current_time"
KNOWLEDGE_SEARCH = "knowledge_search"
# The most passages a knowledge_search call may ask for (CHATMESH_KNOWLEDGE_TOP_K's bound).
MAX_SEARCH_PASSAGES = 50
MAX_QUERY_CHARS = 2000
NO_KNOWLEDGE_BASES = (
    "this turn has no knowledge bases to search: its request names none, and its tenant has no default ones"
)
MAX_REDIRECTS = 3
# What a non-2xx answer's result quotes of its body, in characters.
ERROR_BODY_CHARS = 200
# The label of a call of a name that is no server-side tool's (the model's own invention), so that the
# metric's label stays bounded by the tools file.
UNKNOWN_TOOL = "other"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class ToolsFileError(ConfigurationError):
    """The tools file is unusable; the message names the file and every bad tool and field."""


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What the model is told of a call: the tool's result, or (is_error) what went wrong."""

    content: str
    is_error: bool


# A turn's knowledge_search: (query, k) -> the call's outcome. It must not raise for the store's failures.
KnowledgeSearch = Callable[[str, int], Awaitable[ToolOutcome]]


class ToolCallLike(Protocol):
    """A tool call as the model made it (a ModelToolCall, a StoredToolCall or a chat_pb2.ToolCall)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def arguments(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an operator's tool is called. `headers` hold values read from the environment: never logged."""

    url: str
    allowed_hosts: frozenset[str]
    headers: Mapping[str, str]

    def __repr__(self) -> str:  # never the headers' values
        return f"Endpoint({self.url!r}, headers={sorted(self.headers)})"


@dataclass(frozen=True, slots=True)
class ServerTool:
    """A tool chatmesh runs: a built-in one (endpoint None) or an operator's HTTP endpoint."""

    name: str
    description: str
    # The JSON Schema of the arguments, an object's.
    parameters: dict[str, Any]
    timeout_seconds: float
    endpoint: Endpoint | None = None
    validator: jsonschema.Draft202012Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built once: validating a call's arguments then costs no schema compilation.
        object.__setattr__(self, "validator", jsonschema.Draft202012Validator(self.parameters))

    def definition(self) -> dict[str, Any]:
        """The tool as an entry of OpenAI's `tools`."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


_CURRENT_TIME_PARAMETERS = {
    "type": "object",
    "properties": {
        "timezone": {
            "type": "string",
            "description": "An IANA time zone such as Europe/Paris or Asia/Shanghai; UTC when omitted",
        }
    },
    "additionalProperties": False,
}


def _knowledge_search_parameters(default_k: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_QUERY_CHARS,
                "description": "What to look for: a question, or the words the passages would use",
            },
            "k": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_SEARCH_PASSAGES,
                "description": f"The most passages to return; {default_k} when omitted",
            },
        },
        "required": ["query"],
        "additionalProperties": False,
    }


def built_in_tools(settings: DialogueSettings) -> list[ServerTool]:
    return [
        ServerTool(
            name=CURRENT_TIME,
            description="The current date and time in a time zone, with the day of the week.",
            parameters=_CURRENT_TIME_PARAMETERS,
            timeout_seconds=settings.tool_timeout_seconds,
        ),
        ServerTool(
            name=KNOWLEDGE_SEARCH,
            description="Searches the knowledge bases of this conversation (the operator's documents) for passages "
            "that answer a query; returns them numbered, to cite by number.",
            parameters=_knowledge_search_parameters(settings.knowledge_top_k),
            timeout_seconds=settings.tool_timeout_seconds,
        ),
    ]


# The file.

_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
# RFC 9110's token, the characters of a header name.
_HEADER_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
_ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = Field(min_length=1, max_length=1024)
    url: str = Field(min_length=1)
    allowed_hosts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    timeout_seconds: float | None = Field(default=None, gt=0)
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    headers_from_env: dict[
        Annotated[str, Field(pattern=_HEADER_PATTERN)], Annotated[str, Field(pattern=_ENV_PATTERN)]
    ] = {}


class ToolsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: list[ToolSpec]


def parse_tools(
    document: Any, settings: DialogueSettings, environ: Mapping[str, str], source: str = "tools file"
) -> list[ServerTool]:
    """The operator's tools of a tools file's parsed YAML. Raises ToolsFileError naming every bad tool and field."""
    if not isinstance(document, dict):
        raise ToolsFileError(f"{source}: must be a mapping with a `tools:` list (see chatmesh.dialogue.server_tools)")
    try:
        spec = ToolsFile.model_validate(document)
    except ValidationError as error:
        problems = [f"{_location(problem['loc'], document)}: {problem['msg']}" for problem in error.errors()]
        raise ToolsFileError(_report(source, problems)) from None

    problems: list[str] = []
    seen: dict[str, str] = {tool.name: "a built-in tool" for tool in built_in_tools(settings)}
    tools = []
    for index, tool in enumerate(spec.tools):
        where = f"tools[{index}] ({tool.name})"
        if tool.name in seen:
            problems.append(f"{where}.name: {tool.name!r} is already the name of {seen[tool.name]}")
        else:
            seen[tool.name] = f"tools[{index}]"
        allowed_hosts = frozenset(host.lower() for host in tool.allowed_hosts)
        url_problem = _url_problem(tool.url, allowed_hosts)
        if url_problem:
            problems.append(f"{where}.url: {url_problem}")
        schema_problem = _schema_problem(tool.parameters)
        if schema_problem:
            problems.append(f"{where}.parameters: {schema_problem}")
        headers = {}
        for header, variable in tool.headers_from_env.items():
            value = environ.get(variable, "").strip()
            if not value:
                problems.append(f"{where}.headers_from_env.{header}: environment variable {variable} is not set")
            elif "\r" in value or "\n" in value:
                problems.append(
                    f"{where}.headers_from_env.{header}: environment variable {variable} holds a line break"
                )
            headers[header] = value
        tools.append(
            ServerTool(
                name=tool.name,
                description=tool.description,
                parameters=tool.parameters,
                timeout_seconds=tool.timeout_seconds or settings.tool_timeout_seconds,
                endpoint=Endpoint(tool.url, allowed_hosts, headers),
            )
        )
    if problems:
        raise ToolsFileError(_report(source, problems))
    return tools


def _url_problem(url: str, allowed_hosts: frozenset[str]) -> str | None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as error:
        return f"is not a valid URL ({error})"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http:// or https:// URL with a host"
    if host not in allowed_hosts:
        return f"its host {host} is not on allowed_hosts"
    return None


def _schema_problem(schema: dict[str, Any]) -> str | None:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        path = "".join(f"[{part!r}]" for part in error.absolute_path)
        return f"is not a valid JSON Schema (Draft 2020-12): {path or 'the schema'}: {error.message}"
    if schema.get("type") != "object":
        return 'must be the schema of an object ("type": "object")'
    return None


def _location(loc: tuple[int | str, ...], document: Any) -> str:
    """`tools[1] (order_status).url` for pydantic's ("tools", 1, "url"): the tool's name when it has one."""
    text = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            if loc[:position] == ("tools",):
                name = _raw_name(document, part)
                if name:
                    text += f" ({name})"
        elif part == "[key]":  # a dict key that failed its pattern: the key is the part before
            text += " (the name)"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _raw_name(document: Any, index: int) -> str | None:
    try:
        name = document["tools"][index]["name"]
    except (TypeError, KeyError, IndexError):
        return None
    return name if isinstance(name, str) else None


def _report(source: str, problems: list[str]) -> str:
    return f"{source}: " + "; ".join(problems)


# Running them.


class ServerTools:
    """The server-side tools of a dialogue process, and the HTTP session they are called through (close() it)."""

    def __init__(self, settings: DialogueSettings, tools: Iterable[ServerTool] = ()) -> None:
        """The built-in tools and `tools` (an operator's, e.g. from parse_tools)."""
        every = [*built_in_tools(settings), *tools]
        self._tools = {tool.name: tool for tool in every}
        if len(self._tools) != len(every):
            raise ValueError("server-side tools need distinct names")
        self._max_result_chars = settings.tool_max_result_chars
        self._default_passages = settings.knowledge_top_k
        # Made on the first HTTP call, inside the event loop.
        self._session: aiohttp.ClientSession | None = None
        metrics.server_tools_declared(self._tools)

    @classmethod
    def load(cls, settings: DialogueSettings, environ: Mapping[str, str] | None = None) -> ServerTools:
        """The built-in tools and those of `settings.tools_file` (none without it). Raises ToolsFileError."""
        tools: list[ServerTool] = []
        if settings.tools_file:
            path = Path(settings.tools_file)
            try:
                document = yaml.safe_load(path.read_text())
            except OSError as error:
                raise ToolsFileError(f"{path}: cannot be read ({error.strerror or error})") from None
            except yaml.YAMLError as error:
                raise ToolsFileError(f"{path}: not valid YAML ({error})") from None
            tools = parse_tools(document, settings, os.environ if environ is None else environ, source=str(path))
        server_tools = cls(settings, tools)
        log.info("server_tools_loaded", extra={"tools": server_tools.names()})
        return server_tools

    def names(self) -> list[str]:
        """Every tool's name: the built-in ones, then the file's in its order."""
        return list(self._tools)

    def get(self, name: str) -> ServerTool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def definitions(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """The OpenAI `tools` entries of these tools, in that order. Raises KeyError for a name of none."""
        return [self._tools[name].definition() for name in names]

    async def run_all(
        self, calls: Sequence[ToolCallLike], deadline: float, *, knowledge: KnowledgeSearch | None = None
    ) -> list[ToolOutcome]:
        """Runs the calls concurrently; their outcomes in the calls' order. `knowledge` searches the turn's
        knowledge bases (None: it has none)."""
        return list(
            await asyncio.gather(
                *(self.run(call.id, call.name, call.arguments, deadline, knowledge=knowledge) for call in calls)
            )
        )

    async def run(
        self, call_id: str, name: str, arguments: str, deadline: float, *, knowledge: KnowledgeSearch | None = None
    ) -> ToolOutcome:
        """Runs one call, within min(the tool's timeout, what is left until `deadline`, a loop.time()). A tool's
        failure is never raised: it is an outcome with is_error set, which tells the model what went wrong."""
        started = time.perf_counter()
        tool = self._tools.get(name)
        if tool is None:
            outcome, kind = ToolOutcome(f"there is no server-side tool named {name!r}", True), "error"
        else:
            outcome, kind = await self._run(tool, arguments, deadline, knowledge)
        seconds = time.perf_counter() - started
        label = name if tool is not None else UNKNOWN_TOOL
        metrics.server_tool_call(label, kind, seconds)
        log.info(
            "server_tool_call",
            extra={"tool": label, "call_id": call_id, "outcome": kind, "duration_ms": round(seconds * 1000, 1)},
        )
        return outcome

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _run(
        self, tool: ServerTool, arguments: str, deadline: float, knowledge: KnowledgeSearch | None
    ) -> tuple[ToolOutcome, str]:
        """The call's outcome and its metric outcome (one of metrics.SERVER_TOOL_OUTCOMES)."""
        parsed, problem = _parse_arguments(tool, arguments)
        if problem:
            return ToolOutcome(problem, True), "invalid_arguments"
        if tool.name == CURRENT_TIME:
            return _current_time(parsed)
        if tool.name == KNOWLEDGE_SEARCH and knowledge is None:
            return ToolOutcome(NO_KNOWLEDGE_BASES, True), "error"
        timeout = min(tool.timeout_seconds, deadline - asyncio.get_running_loop().time())
        if timeout <= 0:
            return ToolOutcome("the turn's deadline passed before the tool could run", True), "timeout"
        try:
            async with asyncio.timeout(timeout):
                if tool.endpoint is None:  # knowledge_search: current_time has answered above
                    assert knowledge is not None
                    outcome = await knowledge(parsed["query"], parsed.get("k", self._default_passages))
                    return outcome, "error" if outcome.is_error else "ok"
                return await self._post(tool.endpoint, parsed)
        except TimeoutError:
            return ToolOutcome(f"the tool did not answer within {round(timeout, 2):g} s", True), "timeout"
        except aiohttp.ClientError as error:
            return ToolOutcome(f"the tool could not be reached ({_describe(error)})", True), "error"
        except Exception as error:  # a surprise must fail this call alone, not the calls beside it or the turn
            log.warning("server_tool_failed", extra={"tool": tool.name, "error": type(error).__name__})
            return ToolOutcome("the tool failed", True), "error"

    async def _post(self, endpoint: Endpoint, arguments: dict[str, Any]) -> tuple[ToolOutcome, str]:
        if self._session is None:
            # No cookie jar: cookies one call was given must not reach another tenant's call. No timeout of its
            # own: each call's asyncio.timeout bounds it.
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None)
            )
        method, url, body = "POST", endpoint.url, json.dumps(arguments).encode()
        headers = {**endpoint.headers, "Content-Type": "application/json"}
        # Redirects by hand, so that each hop's host is checked before it is called.
        for _ in range(MAX_REDIRECTS + 1):
            async with self._session.request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if response.status not in _REDIRECTS:
                    return await self._answer(response)
                location = response.headers.get("Location")
                if not location:
                    return ToolOutcome(f"HTTP {response.status} without a Location to go to", True), "error"
                target = urljoin(str(response.url), location)
                problem = _redirect_problem(url, target, endpoint.allowed_hosts)
                if problem:
                    return ToolOutcome(problem, True), "error"
                # As browsers do: 303, and 301 or 302 after a POST, go on with a GET; 307 and 308 repeat the POST.
                if response.status in (301, 302, 303):
                    method, body = "GET", None
                url = target
        return ToolOutcome(f"the tool's endpoint redirected more than {MAX_REDIRECTS} times", True), "error"

    async def _answer(self, response: aiohttp.ClientResponse) -> tuple[ToolOutcome, str]:
        if not 200 <= response.status < 300:
            start, _ = await _read_at_most(response.content, 4 * ERROR_BODY_CHARS)
            quoted = start.decode("utf-8", errors="replace")[:ERROR_BODY_CHARS]
            status = f"HTTP {response.status}"
            return ToolOutcome(f"{status}: {quoted}" if quoted else status, True), "error"
        # A UTF-8 character takes at most 4 bytes: a body of more than 4 x the limit in bytes is too long for sure.
        body, whole = await _read_at_most(response.content, 4 * self._max_result_chars)
        text = body.decode("utf-8", errors="replace")
        if not whole or len(text) > self._max_result_chars:
            return (
                ToolOutcome(f"the tool's result was too long (more than {self._max_result_chars} characters)", True),
                "error",
            )
        return ToolOutcome(text, False), "ok"


def _parse_arguments(tool: ServerTool, arguments: str) -> tuple[dict[str, Any], str | None]:
    """The arguments as an object that fits the tool's schema, or why they are refused."""
    # Some models send nothing at all, rather than {}, for a call without arguments.
    if not arguments.strip():
        arguments = "{}"
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        return {}, "the arguments are not valid JSON: send a JSON object"
    if not isinstance(parsed, dict):
        return {}, "the arguments must be a JSON object"
    try:
        errors = sorted(tool.validator.iter_errors(parsed), key=lambda error: list(map(str, error.absolute_path)))
    except RecursionError:
        return {}, "the arguments are nested too deeply"
    if errors:
        problems = [f"{_argument_path(error.absolute_path)}: {_short(error.message)}" for error in errors[:5]]
        return {}, "the arguments do not fit the tool's parameters: " + "; ".join(problems)
    return parsed, None


def _argument_path(path: Iterable[Any]) -> str:
    text = "arguments"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _redirect_problem(source: str, target: str, allowed_hosts: frozenset[str]) -> str | None:
    try:
        parts = urlsplit(target)
        host = parts.hostname
    except ValueError:
        return "the tool's endpoint redirected to a Location that is not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return "the tool's endpoint redirected to a URL that is not http or https"
    if host not in allowed_hosts:
        return f"the tool's endpoint redirected to {host}, which is not on the tool's allowed_hosts"
    # The headers may carry credentials: never in plaintext once the endpoint asked for TLS.
    if urlsplit(source).scheme == "https" and parts.scheme == "http":
        return "the tool's endpoint redirected from https to plain http"
    return None


async def _read_at_most(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of a body, and whether that is the whole of it; never more than limit + 1 is read."""
    data = bytearray()
    while len(data) <= limit:
        chunk = await content.read(limit + 1 - len(data))
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data[:limit]), False


def _describe(error: aiohttp.ClientError) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        reason = error.os_error.strerror or type(error.os_error).__name__
        return f"cannot connect to {error.host}:{error.port}: {reason}"
    return type(error).__name__


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@functools.cache
def _time_zones() -> frozenset[str]:
    # Looked up in this set rather than by ZoneInfo alone, which would take any model-made text as a file path.
    return frozenset(zoneinfo.available_timezones())


def _current_time(arguments: dict[str, Any]) -> tuple[ToolOutcome, str]:
    name = arguments.get("timezone", "UTC")
    if name not in _time_zones():
        return ToolOutcome(f"unknown time zone {name!r}: use an IANA name such as Europe/Paris", True), "error"
    now = datetime.now(zoneinfo.ZoneInfo(name)).replace(microsecond=0)
    result = {
        "timezone": name,
        "time": now.isoformat(),
        "weekday": _WEEKDAYS[now.weekday()],
        "unix": int(now.timestamp()),
    }
    return ToolOutcome(json.dumps(result), False), "ok"
