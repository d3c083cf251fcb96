"""Each process parses only its own settings (chatmesh.runtime.settings.PROCESS_SETTINGS): it refuses a bad value
of a setting it reads, naming it, and another process's bad value does not stop it."""

import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from support.bad_settings import BAD_SETTINGS, EVERY_PROCESS, EVERY_SERVICE, bad_settings_of_others

from chatmesh.runtime.settings import (
    PROCESS_SETTINGS,
    DialogueSettings,
    GatewaySettings,
    ModelSettings,
    ProcessSettings,
    ServiceSettings,
)


@pytest.fixture(autouse=True)
def no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in os.environ:
        if variable.startswith(("CHATMESH_", "OPENAI_")):
            monkeypatch.delenv(variable)


@pytest.mark.parametrize("variable", BAD_SETTINGS)
@pytest.mark.parametrize("process", sorted(EVERY_PROCESS))
def test_a_process_refuses_a_bad_value_of_its_own_settings_only(
    monkeypatch: pytest.MonkeyPatch, process: str, variable: str
) -> None:
    value, readers = BAD_SETTINGS[variable]
    monkeypatch.setenv(variable, value)

    if process in readers:
        with pytest.raises(ValidationError) as refused:
            PROCESS_SETTINGS[process]()
        field = variable.removeprefix("CHATMESH_").lower()
        assert variable in str(refused.value) or field in str(refused.value)
    else:
        PROCESS_SETTINGS[process]()


@pytest.mark.parametrize("process", sorted(EVERY_PROCESS))
def test_a_process_parses_its_settings_despite_every_bad_value_of_the_others(
    monkeypatch: pytest.MonkeyPatch, process: str
) -> None:
    for variable, value in bad_settings_of_others(process).items():
        monkeypatch.setenv(variable, value)

    assert isinstance(PROCESS_SETTINGS[process](), ProcessSettings)


def test_the_gateway_does_not_parse_the_settings_of_the_model_client_or_of_modelsim() -> None:
    gateway = set(GatewaySettings.model_fields)
    assert not gateway & {"openai_api_key", "model_deployments_file", "embedding_model", "modelsim_deployments"}
    assert not gateway & set(DialogueSettings.model_fields) - set(ServiceSettings.model_fields)


def test_dialogue_safety_and_cache_share_the_model_clients_settings() -> None:
    for process in ("dialogue", "safety", "cache"):
        assert issubclass(PROCESS_SETTINGS[process], ModelSettings), process
    assert not issubclass(PROCESS_SETTINGS["gateway"], ModelSettings)
    assert not issubclass(PROCESS_SETTINGS["modelsim"], ServiceSettings)


def test_dialogue_reads_the_connection_age_of_its_grpc_transport() -> None:
    """A dialogue setting may depend on the transport's (e.g. its streams' lifetime on max connection age)."""
    assert DialogueSettings(grpc_max_connection_age_ms=60_000).grpc_max_connection_age_ms == 60_000


def test_the_provider_and_the_targets_are_read_from_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://llm.example/v1")
    monkeypatch.setenv("CHATMESH_DIALOGUE_TARGET", "dns:///dialogue:50052")
    monkeypatch.setenv("CHATMESH_CACHE_TARGET", "dns:///cache:50054")

    assert ModelSettings().model_endpoint() == ("https://llm.example/v1", "sk-test")
    assert GatewaySettings().dialogue_target == "dns:///dialogue:50052"
    assert DialogueSettings().cache_target == "dns:///cache:50054"
    assert DialogueSettings().safety_target == "127.0.0.1:50053"


def readme_settings_table() -> str:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    return readme.split("| variable | default | read by | meaning |\n|---|---|---|---|\n")[1].split("\n\n")[0]


def test_the_readme_documents_every_setting() -> None:
    documented = set(re.findall(r"`((?:CHATMESH|OPENAI)_[A-Z0-9_]+)`", readme_settings_table()))
    for settings in PROCESS_SETTINGS.values():
        for field, info in settings.model_fields.items():
            aliases = info.validation_alias.choices if info.validation_alias is not None else []
            variables = set(aliases) or {f"CHATMESH_{field.upper()}"}
            assert variables & documented, f"{field} has no row in the README's settings table"


def test_the_readme_says_which_processes_read_each_setting() -> None:
    table = readme_settings_table()
    named = {"all": sorted(EVERY_PROCESS), "services": sorted(EVERY_SERVICE)}
    for row in table.splitlines():
        variables, _, read_by, _ = row.strip("|").split(" | ", 3)
        for variable in re.findall(r"`((?:CHATMESH|OPENAI)_[A-Z0-9_]+)`", variables):
            field = variable.removeprefix("CHATMESH_").lower()
            readers = sorted(
                process for process, settings in PROCESS_SETTINGS.items() if field in settings.model_fields
            )
            assert named.get(read_by, sorted(read_by.split(", "))) == readers, variable
