"""deploy/Dockerfile, read with dockerfile-parse (no container engine runs here): one multi-stage image for every
process, a pinned slim Python 3.11 base, a numeric non-root user, no compilers in the final stage, nothing
fetched by URL, the wheel installed with the lock's runtime versions; and a .dockerignore that keeps the build
context to what the Dockerfile copies."""

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from chatmesh.cli import PROCESSES
from chatmesh.runtime.settings import GatewaySettings, ProcessSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|cc|make|build-essential|python3?-dev|libc6?-dev|musl-dev|rustc|cargo)\b")


@pytest.fixture(scope="module")
def parser() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE))


def stages(parser: DockerfileParser) -> list[list[dict[str, Any]]]:
    """The instructions of each stage, FROM first."""
    found: list[list[dict[str, Any]]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            found.append([])
        if found and instruction["instruction"] != "COMMENT":
            found[-1].append(instruction)
    return found


def instructions(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_multi_stage_from_a_pinned_slim_python_311(parser: DockerfileParser) -> None:
    all_stages = stages(parser)
    assert len(all_stages) >= 2
    for image in parser.parent_images:
        # An exact patch release of Python 3.11, slim; a digest may follow. Never `latest` or a floating tag.
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image), image
    names = [shlex.split(stage[0]["value"]) for stage in all_stages]
    assert all(len(words) == 3 and words[1].upper() == "AS" for words in names), names


def test_the_final_stage_runs_as_a_numeric_non_root_user(parser: DockerfileParser) -> None:
    final = stages(parser)[-1]
    users = instructions(final, "USER")
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or (gid.isdigit() and int(gid) > 0)), users[-1]
    # Nothing runs after the user is set, so nothing in the image needs root at run time.
    kinds = [i["instruction"] for i in final]
    assert "RUN" not in kinds[kinds.index("USER") :]


def test_no_compilers_in_the_final_stage_and_nothing_fetched_by_url(parser: DockerfileParser) -> None:
    final = stages(parser)[-1]
    for command in instructions(final, "RUN"):
        assert not COMPILERS.search(command), command
        assert "apt-get install" not in command and "apk add" not in command, command
    # The final stage takes only the built virtual environment from the build stage.
    copies = instructions(final, "COPY")
    assert copies == ["--from=build /opt/chatmesh /opt/chatmesh"]
    for instruction in parser.structure:
        assert instruction["instruction"] != "ADD", "use COPY; ADD fetches URLs and unpacks archives"
        if instruction["instruction"] in ("RUN", "COPY"):
            assert not re.search(r"\b(curl|wget)\b", instruction["value"]), instruction["value"]
    # Kubernetes probes the gRPC health service; a Docker HEALTHCHECK would only duplicate them.
    assert not any(i["instruction"] == "HEALTHCHECK" for i in parser.structure)


def test_the_wheel_is_installed_with_the_locked_runtime_versions_and_binary_wheels_only(
    parser: DockerfileParser,
) -> None:
    build = stages(parser)[0]
    (run,) = instructions(build, "RUN")
    assert "pip wheel --no-deps" in run
    install = run[run.index("install") :]
    assert "--constraint requirements.lock" in install and "--only-binary=:all:" in install
    assert "/dist/chatmesh-*.whl" in install
    # Not the lock itself (-r), which holds the test and lint tools too.
    assert "-r requirements.lock" not in run and "--requirement" not in run


def test_the_command_picks_the_process_and_the_image_is_read_only_friendly(parser: DockerfileParser) -> None:
    final = stages(parser)[-1]
    assert instructions(final, "ENTRYPOINT") == ['["chatmesh"]']
    (command,) = instructions(final, "CMD")
    assert re.fullmatch(r'\["(\w+)"\]', command) and command[2:-2] in PROCESSES
    env = parser.envs
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["CHATMESH_BIND_HOST"] == "0.0.0.0"
    # Listening on every address, an image run by hand never serves unauthenticated.
    assert env["CHATMESH_AUTH"] == "required"
    assert GatewaySettings(auth=env["CHATMESH_AUTH"]).auth == "required"
    assert env["TMPDIR"] == "/tmp" and env["HOME"] == "/tmp"
    assert env["PATH"].startswith("/opt/chatmesh/bin:")
    defaults = ProcessSettings()
    exposed = {int(port) for value in instructions(final, "EXPOSE") for port in value.split()}
    assert {
        defaults.gateway_port,
        defaults.dialogue_port,
        defaults.safety_port,
        defaults.cache_port,
        defaults.modelsim_port,
    } <= exposed


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching pattern wins)."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            matched = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            matched = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if matched:
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_dockerfile_copies(parser: DockerfileParser) -> None:
    sources = [
        source
        for stage in stages(parser)
        for value in instructions(stage, "COPY")
        if not value.startswith("--from")
        for source in shlex.split(value)[:-1]
    ]
    assert sources
    for source in sources:
        assert not dockerignore_excludes(source.rstrip("/")), source
    for needed in ("services/cli.py", "services/safety/default_keywords.txt", "services/v1/chat_pb2.py"):
        assert not dockerignore_excludes(needed), needed
    for unwanted in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/conftest.py",
        "bench/run.py",
        "services/__pycache__/cli.pyc",
    ):
        assert dockerignore_excludes(unwanted), unwanted
