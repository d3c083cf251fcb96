"""SafetyService over real processes: safety → modelsim (moderations), keyword lists on disk."""

# Full-width letters and punctuation are what these tests are about.
# ruff: noqa: RUF001

import asyncio
import json
import os
import signal
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.cluster import Cluster, ServiceProcess
from support.ports import free_port
from support.safety import another_safety, poll_log, safety_stub

from chatmesh.v1 import safety_pb2, safety_pb2_grpc

CALL_TIMEOUT = 30
POLLS = 400  # at most 400 polls 50 ms apart (20 s) for a change on disk to take effect
POLL_SECONDS = 0.05

KEYWORDS = "fruit\tforbidden fruit\ncn\t演示屏蔽词\n"
KEYWORD = safety_pb2.SCREEN_SOURCE_KEYWORD
MODERATION = safety_pb2.SCREEN_SOURCE_MODERATION


def write_list(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


@pytest.fixture(scope="module")
def keywords_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keywords") / "list.txt"
    write_list(path, KEYWORDS)
    return path


@pytest.fixture(scope="module")
def cluster(keywords_file: Path) -> Iterator[Cluster]:
    """modelsim and safety only; safety moderates input (not output: these tests are about the keyword lists'
    stream) and polls its list every 0.1 s."""
    with Cluster(
        processes=("modelsim", "safety"),
        env={
            "CHATMESH_SAFETY_KEYWORDS": str(keywords_file),
            "CHATMESH_SAFETY_KEYWORDS_RELOAD_SECONDS": "0.1",
            "CHATMESH_SAFETY_MODERATION": "on",
            "CHATMESH_SAFETY_MODERATE_OUTPUT": "false",
        },
    ) as running:
        yield running


@pytest.fixture
def sim(cluster: Cluster) -> Iterator[Cluster]:
    cluster.sim_reset()
    yield cluster
    cluster.sim_reset()
    cluster.sim_config(moderation_flag_words=["simflag"])


@pytest.fixture
async def safety(sim: Cluster) -> AsyncIterator[safety_pb2_grpc.SafetyServiceStub]:
    async with safety_stub(sim.safety_target) as stub:
        yield stub


async def screen_input(stub: safety_pb2_grpc.SafetyServiceStub, text: str) -> safety_pb2.Verdict:
    response = await stub.ScreenInput(
        safety_pb2.ScreenInputRequest(text=text, request_id="req-1"), timeout=CALL_TIMEOUT
    )
    return response.verdict


async def test_health_is_serving_and_reflection_lists_the_safety_service(cluster: Cluster):
    async with grpc.aio.insecure_channel(cluster.safety_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "chatmesh.v1.SafetyService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT
        )
        listed = {service.name async for response in responses for service in response.list_services_response.service}
    assert {"chatmesh.v1.SafetyService", "grpc.health.v1.Health"} <= listed


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("tell me about the forbidden fruit", "fruit"),
        ("ＦＯＲＢＩＤＤＥＮ　ＦＲＵＩＴ", "fruit"),
        ("FoRbIdDeN fRuIt", "fruit"),
        ("f o r b i d d e n  f r u i t", "fruit"),
        ("for\u200bbidden\u200b fruit", "fruit"),
        ("这是演示屏蔽词", "cn"),
        ("演 示\u200b屏，蔽 词", "cn"),
    ],
)
async def test_a_listed_term_blocks_the_input_without_asking_the_moderation_endpoint(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub, text: str, category: str
):
    verdict = await screen_input(safety, text)

    assert verdict.blocked and list(verdict.categories) == [category] and verdict.source == KEYWORD
    assert sim.sim_stats()["moderation_requests"] == 0


async def test_tool_texts_are_screened_by_the_keyword_lists_alone(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub
):
    """Tool arguments and results: every text is screened, the verdict names every category that matched, and
    the moderation endpoint is not asked (even about a text it would flag)."""
    clean = await safety.ScreenTool(
        safety_pb2.ScreenToolRequest(texts=['{"city": "Paris"}', "simflag 12 °C"], request_id="req-1"),
        timeout=CALL_TIMEOUT,
    )
    blocked = await safety.ScreenTool(
        safety_pb2.ScreenToolRequest(texts=['{"q": "ok"}', "ＦＯＲＢＩＤＤＥＮ fruit", "演示屏蔽词"], request_id="r2"),
        timeout=CALL_TIMEOUT,
    )

    assert not clean.verdict.blocked
    assert blocked.verdict.blocked and list(blocked.verdict.categories) == ["cn", "fruit"]
    assert blocked.verdict.source == KEYWORD
    assert sim.sim_stats()["moderation_requests"] == 0


async def test_a_clean_input_passes_both_screens(sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub):
    verdict = await screen_input(safety, "what fruit is in season?")

    assert not verdict.blocked and not verdict.categories
    stats = sim.sim_stats()
    assert stats["moderation_requests"] == 1 and stats["requests"] == 0


async def test_the_moderation_endpoint_blocks_what_it_flags(sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub):
    sim.sim_config(moderation_flag_words=["unkind words"])

    verdict = await screen_input(safety, "some UNKIND words")

    assert verdict.blocked and list(verdict.categories) == ["harassment"] and verdict.source == MODERATION


async def test_a_failing_moderation_endpoint_fails_closed(sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub):
    sim.sim_faults(500, count=100, endpoint="moderations")

    verdict = await screen_input(safety, "an innocent question")

    assert verdict.blocked and list(verdict.categories) == ["moderation_unavailable"] and verdict.source == MODERATION
    assert sim.sim_stats()["moderation_errors_injected"] == 4  # every attempt failed


async def test_an_unreachable_moderation_endpoint_fails_closed_or_open_as_set(sim: Cluster, tmp_path: Path):
    unreachable = {"OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1", "CHATMESH_MODEL_MAX_ATTEMPTS": "2"}
    async with another_safety(sim, tmp_path, **unreachable) as closed:
        verdict = await screen_input(closed, "an innocent question")
        assert verdict.blocked and list(verdict.categories) == ["moderation_unavailable"]
        assert (await screen_input(closed, "the forbidden fruit")).source == KEYWORD
    async with another_safety(sim, tmp_path, CHATMESH_SAFETY_MODERATION_FAIL_OPEN="true", **unreachable) as opened:
        assert not (await screen_input(opened, "an innocent question")).blocked
        assert (await screen_input(opened, "the forbidden fruit")).blocked


async def test_output_is_cleared_as_it_arrives_without_waiting_for_more(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub
):
    call = safety.ScreenOutput(timeout=CALL_TIMEOUT)
    await call.write(safety_pb2.ScreenOutputRequest(text="Apples are ", request_id="req-2"))
    assert (await call.read()).cleared_chars == len("Apples are ")
    await call.write(safety_pb2.ScreenOutputRequest(text="a fruit, forb"))
    # Everything but the text that could begin a listed term.
    assert (await call.read()).cleared_chars == len("Apples are a fruit, ")
    await call.write(safety_pb2.ScreenOutputRequest(text="idding nothing.", final=True))
    last = await call.read()
    assert last.complete and last.cleared_chars == len("Apples are a fruit, forbidding nothing.")
    assert not last.HasField("verdict")
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_a_term_split_across_deltas_is_blocked_before_any_of_it_is_cleared(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub
):
    reply = ["Sure! ", "Here is the forbi", "dden fr", "uit you asked for."]
    term_start = "".join(reply).index("forbidden")
    call = safety.ScreenOutput(timeout=CALL_TIMEOUT)
    for delta in reply:  # pipelined: nothing waits for an answer before sending the next delta
        await call.write(safety_pb2.ScreenOutputRequest(text=delta))
    await call.done_writing()

    responses = [response async for response in call]

    assert all(response.cleared_chars <= term_start for response in responses)
    last = responses[-1]
    assert last.verdict.blocked and list(last.verdict.categories) == ["fruit"] and last.verdict.source == KEYWORD
    assert not any(response.complete for response in responses)
    assert await call.code() == grpc.StatusCode.OK


async def test_a_long_clean_reply_sent_without_waiting_is_cleared_whole(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub
):
    deltas = [f" word{index} 演示" for index in range(300)]
    call = safety.ScreenOutput(timeout=CALL_TIMEOUT)
    for delta in deltas:
        await call.write(safety_pb2.ScreenOutputRequest(text=delta))
    await call.write(safety_pb2.ScreenOutputRequest(final=True))

    responses = [response async for response in call]

    cleared = [response.cleared_chars for response in responses]
    # Non-decreasing, and no answer that moves nothing except the last, which says the reply is complete.
    assert cleared == sorted(cleared) and len(set(cleared[:-1])) == len(cleared) - 1
    assert responses[-1].complete and cleared[-1] == len("".join(deltas))


async def test_on_sigterm_an_open_output_stream_finishes_and_the_process_exits_0(sim: Cluster, tmp_path: Path):
    port = free_port()
    ports = {"CHATMESH_SAFETY_PORT": str(port), "CHATMESH_SAFETY_METRICS_PORT": str(free_port())}
    process = ServiceProcess("safety", port, {**sim.env, **ports}, tmp_path)
    process.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = safety_pb2_grpc.SafetyServiceStub(channel).ScreenOutput(timeout=CALL_TIMEOUT)
            await call.write(safety_pb2.ScreenOutputRequest(text="Hello "))
            assert (await call.read()).cleared_chars == len("Hello ")

            process.signal(signal.SIGTERM)
            # The log, not a health check: a new connection to a draining server can hang past the grace.
            await poll_log(process, "draining")
            await call.write(safety_pb2.ScreenOutputRequest(text="world", final=True))
            last = await call.read()
            assert last.complete and last.cleared_chars == len("Hello world")
        assert process.wait() == 0
    finally:
        process.stop()


async def test_a_keyword_file_changed_on_disk_takes_effect_without_a_restart(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub, keywords_file: Path
):
    assert not (await screen_input(safety, "a blue banana")).blocked
    try:
        write_list(keywords_file, KEYWORDS + "odd\tblue banana\n")
        verdict = await poll_until(lambda v: v.blocked, safety, "a blue banana")
        assert list(verdict.categories) == ["odd"] and verdict.source == KEYWORD

        # A broken list is refused and logged, and the one before it stays in force.
        write_list(keywords_file, "odd\tblue banana\nthis line has no tab\n")
        await poll_log(sim.processes["safety"], "keywords_reload_failed")
        assert (await screen_input(safety, "a blue banana")).blocked
        assert (await screen_input(safety, "the forbidden fruit")).blocked
    finally:
        write_list(keywords_file, KEYWORDS)
        await poll_until(lambda v: not v.blocked, safety, "a blue banana")


async def poll_until(
    done: Callable[[safety_pb2.Verdict], bool], stub: safety_pb2_grpc.SafetyServiceStub, text: str
) -> safety_pb2.Verdict:
    for _ in range(POLLS):
        verdict = await screen_input(stub, text)
        if done(verdict):
            return verdict
        await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"the keyword list did not change within {POLLS} polls")


PHONE = safety_pb2.PII_KIND_PHONE
EMAIL = safety_pb2.PII_KIND_EMAIL
CN_ID = safety_pb2.PII_KIND_CN_ID
CARD = safety_pb2.PII_KIND_PAYMENT_CARD
IP_ADDRESS = safety_pb2.PII_KIND_IP_ADDRESS


def pii_found(cluster: Cluster, stage: str, kind: str) -> float:
    """chatmesh_safety_pii_found_total of the cluster's safety process."""
    port = cluster.processes["safety"].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CALL_TIMEOUT) as page:
        metrics = page.read().decode()
    prefix = f'chatmesh_safety_pii_found_total{{kind="{kind}",stage="{stage}"}} '
    return next((float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix)), 0.0)


async def test_screen_input_gives_the_spans_of_personal_information_in_the_text_as_it_was_written(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub
):
    """The default policy: e-mail addresses, phone numbers, ID numbers and payment cards are reported, IP addresses
    left; spans are code points of the text as sent, full-width, separated and zero-width forms included."""
    text = (
        "我是张三，电话１３８－００１３－８０００，备用1 3 9 1234 5678，邮箱zhang\u200b@example.com，"
        "身份证11010519491231002X，卡号4111 1111 1111 1111，登录IP 192.168.1.1"
    )
    phones_before = await asyncio.to_thread(pii_found, sim, "input", "phone")

    response = await safety.ScreenInput(
        safety_pb2.ScreenInputRequest(text=text, request_id="pii-1"), timeout=CALL_TIMEOUT
    )

    assert not response.verdict.blocked
    assert [(span.kind, text[span.start : span.end]) for span in response.pii] == [
        (PHONE, "１３８－００１３－８０００"),
        (PHONE, "1 3 9 1234 5678"),
        (EMAIL, "zhang\u200b@example.com"),
        (CN_ID, "11010519491231002X"),
        (CARD, "4111 1111 1111 1111"),
    ]
    assert await asyncio.to_thread(pii_found, sim, "input", "phone") == phones_before + 2


async def test_a_blocked_input_has_its_spans_too_and_a_clean_one_has_none(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub
):
    blocked = await safety.ScreenInput(
        safety_pb2.ScreenInputRequest(text="the forbidden fruit, call 13800138000"), timeout=CALL_TIMEOUT
    )
    clean = await safety.ScreenInput(
        safety_pb2.ScreenInputRequest(text="order 20261203183000 of 2026-12-03, v1.2.3.4"), timeout=CALL_TIMEOUT
    )

    assert blocked.verdict.blocked
    assert [(span.kind, span.start, span.end) for span in blocked.pii] == [(PHONE, 26, 37)]
    assert not clean.verdict.blocked and not clean.pii


async def test_screen_output_gives_the_whole_replys_spans_on_its_complete_response(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub
):
    """The reply arrives in pieces that split the phone number and the e-mail address; only the complete response
    carries spans, positions in the whole reply."""
    deltas = [
        "Sure! Call ",
        "+86 138",
        " 0013 ",
        "8000 or write to ",
        "ada@exa",
        "mple.com",
        " (ID ",
        "1101011990",
        "03071233).",
    ]
    reply = "".join(deltas)
    call = safety.ScreenOutput(timeout=CALL_TIMEOUT)
    for delta in deltas:
        await call.write(safety_pb2.ScreenOutputRequest(text=delta, request_id="pii-2"))
    await call.write(safety_pb2.ScreenOutputRequest(final=True))

    responses = [response async for response in call]

    last = responses[-1]
    assert last.complete and last.cleared_chars == len(reply)
    assert [(span.kind, reply[span.start : span.end]) for span in last.pii] == [
        (PHONE, "+86 138 0013 8000"),
        (EMAIL, "ada@example.com"),
        (CN_ID, "110101199003071233"),
    ]
    assert not any(response.pii for response in responses[:-1])


async def test_only_the_kinds_the_policy_does_not_leave_are_reported(sim: Cluster, tmp_path: Path):
    text = "ada@example.com, 13800138000, 192.168.1.1"
    request = safety_pb2.ScreenInputRequest(text=text)
    ip_only = json.dumps({"ip_address": "model", "email": "leave"})  # the kinds left out are left too
    async with another_safety(sim, tmp_path / "ip", CHATMESH_PII_POLICY=ip_only) as stub:
        response = await stub.ScreenInput(request, timeout=CALL_TIMEOUT)
        assert [(span.kind, text[span.start : span.end]) for span in response.pii] == [(IP_ADDRESS, "192.168.1.1")]
        call = stub.ScreenOutput(timeout=CALL_TIMEOUT)
        await call.write(safety_pb2.ScreenOutputRequest(text=text, final=True))
        assert [len((await call.read()).pii)] == [1]
    nothing = json.dumps(dict.fromkeys(("email", "phone", "cn_id", "payment_card", "ip_address"), "leave"))
    async with another_safety(sim, tmp_path / "leave", CHATMESH_PII_POLICY=nothing) as stub:
        assert not (await stub.ScreenInput(request, timeout=CALL_TIMEOUT)).pii
