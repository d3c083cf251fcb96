"""modelsim as several deployments in one process, through the test cluster's support (issue 14)."""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from support.cluster import Cluster

MESSAGES = [{"role": "user", "content": "Tell me about the weather today"}]


@pytest.fixture(scope="module")
def sims() -> Iterator[Cluster]:
    with Cluster(
        processes=["modelsim"],
        modelsim_deployments=[{"error_500_rate": 0.0}, {"reply_tokens": 3, "unauthorized_keys": ["revoked"]}],
    ) as running:
        yield running


def chat(port: int, key: str = "test-key") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        method="POST",
        data=json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_each_deployment_answers_on_its_own_port_with_its_own_state(sims: Cluster) -> None:
    first, second = sims.modelsim_ports
    assert first == sims.processes["modelsim"].port and first != second
    sims.sim_faults_at(0, 429, count=1, retry_after=2, key="test-key")

    status, body = chat(first)
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    status, body = chat(second)
    assert (status, body["usage"]["completion_tokens"]) == (200, 3)
    assert chat(second, "revoked")[0] == 401
    assert chat(first, "revoked")[0] == 200

    stats = [sims.sim_stats_at(index) for index in (0, 1)]
    assert [(s["requests"], s["errors_injected"]) for s in stats] == [(2, 1), (2, 0)]
    assert stats[1]["requests_by_key"] == {"test-key": 1, "revoked": 1}
    assert sims.sim_config_at(1, hang_rate=0.5)["hang_rate"] == 0.5
    assert sims.sim_stats() == stats[0]
    for index in (0, 1):
        sims.sim_reset_at(index)
    assert [sims.sim_stats_at(index)["requests"] for index in (0, 1)] == [0, 0]


def test_modelsim_logs_one_listening_line_per_deployment(sims: Cluster) -> None:
    assert sims.processes["modelsim"].running
    log = sims.processes["modelsim"].log()
    listening = [json.loads(line) for line in log.splitlines() if '"event":"listening"' in line]
    assert sorted(event["port"] for event in listening) == sorted(sims.modelsim_ports)
