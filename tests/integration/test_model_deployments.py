"""Model deployments through the whole cluster: two modelsim deployments named in a deployments file, a model
that falls back to another, and keys that get refused."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.cluster import Cluster, ServiceProcess

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

KEYS = {"PRIMARY_KEY_1": "sk-primary-1", "PRIMARY_KEY_2": "sk-primary-2", "BACKUP_KEY": "sk-backup"}
CALL_SECONDS = 20.0


def write_deployments(path: Path, ports: list[int]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "models": {
                    "gpt-4o-mini": {
                        "fallback_model": "gpt-4o",
                        "deployments": [
                            {
                                "name": "primary",
                                "base_url": f"http://127.0.0.1:{ports[0]}/v1",
                                "keys": [{"env": "PRIMARY_KEY_1"}, {"env": "PRIMARY_KEY_2"}],
                            }
                        ],
                    },
                    "gpt-4o": {
                        "deployments": [
                            {
                                "name": "backup",
                                "base_url": f"http://127.0.0.1:{ports[1]}/v1",
                                "keys": [{"env": "BACKUP_KEY"}],
                            }
                        ]
                    },
                },
                "breaker": {"window": 10, "min_calls": 3, "failure_rate": 0.5, "open_seconds": 60},
            }
        ),
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """This module's cluster: gpt-4o-mini on deployment 0 (two keys), falling back to gpt-4o on deployment 1."""
    running = Cluster(modelsim_deployments=[{}, {}], env=KEYS)
    path = write_deployments(tmp_path_factory.mktemp("deployments") / "deployments.yaml", running.modelsim_ports)
    running.env["CHATMESH_MODEL_DEPLOYMENTS_FILE"] = str(path)
    with running:
        yield running


def request(message: str) -> chat_pb2.ChatRequest:
    # Above the cache's bound: every turn reaches a model.
    options = chat_pb2.ChatOptions(model="gpt-4o-mini", temperature=0.9)
    return chat_pb2.ChatRequest(user_id="deployments-user", message=message, options=options)


async def test_calls_spread_over_a_deployments_keys_and_a_refused_key_is_retired(
    cluster: Cluster, chat: chat_pb2_grpc.ChatServiceStub
) -> None:
    for index in range(2):
        cluster.sim_reset_at(index)
    cluster.sim_config_at(0, unauthorized_keys=[KEYS["PRIMARY_KEY_2"]])

    replies = [await chat.Chat(request(f"spread {n}"), timeout=CALL_SECONDS) for n in range(6)]

    assert {reply.model for reply in replies} == {"gpt-4o-mini"}
    by_key = cluster.sim_stats_at(0)["requests_by_key"]
    # The refused key was tried once, then retired; the other carried every call.
    assert by_key[KEYS["PRIMARY_KEY_2"]] == 1 and by_key[KEYS["PRIMARY_KEY_1"]] == 6
    log = cluster.processes["dialogue"].log()
    assert '"event":"model_key_retired"' in log.replace(" ", "") and KEYS["PRIMARY_KEY_2"] not in log


async def test_a_model_refused_everywhere_falls_back_and_started_names_the_model_that_answered(
    cluster: Cluster, chat: chat_pb2_grpc.ChatServiceStub
) -> None:
    cluster.sim_config_at(0, error_500_rate=1.0, unauthorized_keys=[])
    try:
        events = [event async for event in chat.StreamChat(request("fall back"), timeout=CALL_SECONDS)]
    finally:
        cluster.sim_config_at(0, error_500_rate=0.0)

    assert events[0].started.model == "gpt-4o"
    assert events[-1].completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert cluster.sim_stats_at(1)["requests"] >= 1


def test_a_bad_deployments_file_stops_dialogue_at_start_naming_the_entry(cluster: Cluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"models": {"gpt-4o-mini": {"deployments": [{"name": "x", "base_url": "http://a/v1"}]}}}),
        encoding="utf-8",
    )
    env = {
        **cluster.env,
        "CHATMESH_MODEL_DEPLOYMENTS_FILE": str(bad),
        "CHATMESH_DIALOGUE_PORT": "0",
        "CHATMESH_DIALOGUE_METRICS_PORT": "0",
    }
    dialogue = ServiceProcess("dialogue-bad", 0, env, tmp_path, command="dialogue")
    with pytest.raises(RuntimeError, match=r"exited with") as failed:
        dialogue.start()
    assert "models.gpt-4o-mini.deployments[0]" in str(failed.value)
    assert dialogue.stop() not in (None, 0)


async def test_the_cluster_still_answers_after_the_faults(chat: chat_pb2_grpc.ChatServiceStub) -> None:
    reply = await chat.Chat(request("still here"), timeout=CALL_SECONDS)
    assert reply.text and reply.model == "gpt-4o-mini"
