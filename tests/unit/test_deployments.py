"""The deployments file: what a good one resolves to, and bad ones failing at start with the entry named."""

from pathlib import Path

import pytest
import yaml

from chatmesh.model.deployments import (
    ANY_MODEL,
    DeploymentsError,
    load_deployments,
    parse_deployments,
)
from chatmesh.runtime.settings import ModelSettings

ENV = {"OPENAI_KEY_1": "sk-one", "OPENAI_KEY_2": "sk-two", "VLLM_KEY": "v"}


def good(tmp_path: Path) -> dict:
    secret = tmp_path / "secret"
    secret.write_text("sk-from-file\n")
    return {
        "models": {
            "gpt-4o-mini": {
                "fallback_model": "gpt-4o",
                "deployments": [
                    {
                        "name": "openai-a",
                        "base_url": "https://api.openai.com/v1",
                        "keys": [{"env": "OPENAI_KEY_1"}, {"file": str(secret)}],
                        "price_usd_per_million": [0.15, 0.6],
                        "weight": 2,
                    },
                    {
                        "name": "vllm",
                        "base_url": "http://vllm:8000/v1/",
                        "model": "llama",
                        "keys": [{"env": "VLLM_KEY"}],
                        "first_token_timeout_seconds": 3,
                    },
                ],
            },
            "gpt-4o": {
                "deployments": [{"name": "openai-b", "base_url": "https://x/v1", "keys": [{"env": "OPENAI_KEY_2"}]}]
            },
        },
        "breaker": {"window": 10, "min_calls": 3},
    }


def parse(document: object, **settings: object):
    return parse_deployments(document, ModelSettings(**settings), ENV)


def test_a_good_file_resolves_keys_names_and_defaults(tmp_path: Path):
    deployments = parse(good(tmp_path), model_first_token_timeout_seconds=7)

    mini = deployments.route("gpt-4o-mini")
    assert mini is not None and mini.fallback_model == "gpt-4o"
    openai_a, vllm = mini.deployments
    assert openai_a.keys == ("sk-one", "sk-from-file")
    assert openai_a.upstream_model == "gpt-4o-mini" and openai_a.weight == 2
    assert openai_a.price_usd_per_million == (0.15, 0.6) and openai_a.first_token_timeout_seconds == 7
    assert vllm.upstream_model == "llama" and vllm.base_url == "http://vllm:8000/v1"
    assert vllm.first_token_timeout_seconds == 3 and vllm.price_usd_per_million is None
    assert deployments.breaker.window == 10 and deployments.breaker.open_seconds == 10
    assert deployments.route("unknown") is None
    assert "sk-one" not in repr(openai_a)


def test_a_star_entry_serves_the_other_models_under_their_own_name():
    deployments = parse(
        {"models": {"*": {"deployments": [{"name": "d", "base_url": "http://h/v1", "keys": [{"env": "VLLM_KEY"}]}]}}}
    )
    route = deployments.route("anything")
    assert route is not None and route.name == ANY_MODEL and route.deployments[0].upstream_model is None


def test_without_a_file_one_default_deployment_serves_every_model():
    deployments = load_deployments(ModelSettings(OPENAI_API_KEY="sk-x", OPENAI_BASE_URL="http://h/v1"))
    route = deployments.route("gpt-4o-mini")
    assert route is not None and not deployments.from_file
    (deployment,) = route.deployments
    assert (deployment.name, deployment.base_url, deployment.keys) == ("default", "http://h/v1", ("sk-x",))


def test_a_file_is_read_from_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "deployments.yaml"
    path.write_text(yaml.safe_dump(good(tmp_path), sort_keys=False))
    deployments = load_deployments(ModelSettings(model_deployments_file=str(path)))
    assert deployments.from_file and [d.name for d in deployments.deployments()] == ["openai-a", "vllm", "openai-b"]


def test_an_unreadable_file_is_named(tmp_path: Path):
    with pytest.raises(DeploymentsError, match="cannot be read"):
        load_deployments(ModelSettings(model_deployments_file=str(tmp_path / "missing.yaml")))


def broken(tmp_path: Path, change) -> dict:
    document = good(tmp_path)
    change(document)
    return document


def _mini(document: dict) -> list:
    return document["models"]["gpt-4o-mini"]["deployments"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: _mini(d)[0].update(region="eu"), r"models\.gpt-4o-mini\.deployments\[0\]\.region: Extra inputs"),
        (lambda d: d.update(extra=1), r"extra: Extra inputs"),
        (lambda d: d["breaker"].update(windows=3), r"breaker\.windows: Extra inputs"),
        (
            lambda d: _mini(d)[1]["keys"].append({"env": "OPENAI_KEY_9"}),
            r"models\.gpt-4o-mini\.deployments\[1\]\.keys\[1\]: environment variable OPENAI_KEY_9 is not set",
        ),
        (
            lambda d: _mini(d)[1]["keys"].__setitem__(0, {"file": "/nonexistent/key"}),
            r"models\.gpt-4o-mini\.deployments\[1\]\.keys\[0\]: key file /nonexistent/key cannot be read",
        ),
        (
            lambda d: _mini(d)[1]["keys"].__setitem__(0, {"value": "sk-literal"}),
            r"models\.gpt-4o-mini\.deployments\[1\]\.keys\[0\]\.value: Extra inputs",
        ),
        (
            lambda d: _mini(d)[1].update(keys=[]),
            r"models\.gpt-4o-mini\.deployments\[1\]\.keys: List should have at least 1",
        ),
        (
            lambda d: d["models"]["gpt-4o"].update(deployments=[]),
            r"models\.gpt-4o\.deployments: List should have at least 1",
        ),
        (
            lambda d: _mini(d)[1].update(name="openai-a"),
            r"models\.gpt-4o-mini\.deployments\[1\]\.name: 'openai-a' is already the name of "
            r"models\.gpt-4o-mini\.deployments\[0\]",
        ),
        (
            lambda d: d["models"]["gpt-4o"]["deployments"][0].update(name="vllm"),
            r"models\.gpt-4o\.deployments\[0\]\.name: 'vllm' is already",
        ),
        (
            lambda d: d["models"]["gpt-4o-mini"].update(fallback_model="gpt-5"),
            r"models\.gpt-4o-mini\.fallback_model: 'gpt-5' is not a model of the file",
        ),
        (
            lambda d: d["models"]["gpt-4o"].update(fallback_model="gpt-4o-mini"),
            r"models\.gpt-4o\.fallback_model: falls back in a cycle \(gpt-4o -> gpt-4o-mini -> gpt-4o\)",
        ),
        (
            lambda d: _mini(d)[0].update(weight=0),
            r"models\.gpt-4o-mini\.deployments\[0\]\.weight: Input should be greater than 0",
        ),
    ],
)
def test_a_bad_file_fails_naming_the_entry(tmp_path: Path, change, message: str):
    with pytest.raises(DeploymentsError, match=message):
        parse(broken(tmp_path, change))


def test_every_problem_is_reported_at_once(tmp_path: Path):
    def two_problems(document: dict) -> None:
        _mini(document)[0]["keys"] = [{"env": "MISSING_A"}]
        _mini(document)[1]["keys"] = [{"env": "MISSING_B"}]

    with pytest.raises(DeploymentsError) as failure:
        parse(broken(tmp_path, two_problems))
    assert "MISSING_A" in str(failure.value) and "MISSING_B" in str(failure.value)
