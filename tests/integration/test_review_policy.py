"""The review policy over real processes: two safety replicas and modelsim, review cases in a real Redis.

What users rely on: a category blocks, blocks and opens a case, or lets the text out and opens a case, whether a
keyword list or the moderation endpoint (with its thresholds) found it; a case holds the turn and a redacted
excerpt; replies are moderated in windows and nothing of a window is released before it is cleared; terms that
review decisions add are enforced by every replica without a restart; the policy version says what a verdict was
given under; and a replica killed with calls in flight neither loses nor duplicates a case."""

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from support.cluster import Cluster
from support.redis_server import RedisServer
from support.safety import another_safety, poll_log, safety_process, safety_stub

from chatmesh.review.store import RedisReviewStore, ReviewStore
from chatmesh.v1 import chat_pb2, review_pb2, safety_pb2, safety_pb2_grpc

CALL_TIMEOUT = 30
POLLS = 200  # a change to take effect: at most 200 polls 50 ms apart (10 s; the reload interval is 0.2 s)
POLL_SECONDS = 0.05

KEYWORDS = "weapons\tforbidden fruit\nfraud\twire the money\nspam\tbuy followers\n"
POLICY = (
    '{"fraud": "block_and_review", "spam": "allow_and_review", "violence": "block_and_review", '
    '"harassment": "allow_and_review"}'
)
WINDOW = 40
# modelsim's scores: "grim" is under the endpoint's own flag but over our violence threshold (0.25), "faint"
# under both; "hateful" is flagged by the endpoint in a category the policy does not name.
WORD_SCORES = {"grim": {"violence": 0.3}, "faint": {"violence": 0.2}, "hateful": {"hate": 0.8}}

KEYWORD = safety_pb2.SCREEN_SOURCE_KEYWORD
MODERATION = safety_pb2.SCREEN_SOURCE_MODERATION
BLOCK_AND_REVIEW = review_pb2.REVIEW_ACTION_BLOCK_AND_REVIEW
ALLOW_AND_REVIEW = review_pb2.REVIEW_ACTION_ALLOW_AND_REVIEW
INPUT = chat_pb2.ContentFilter.STAGE_INPUT
OUTPUT = chat_pb2.ContentFilter.STAGE_OUTPUT
TOOL = chat_pb2.ContentFilter.STAGE_TOOL
# What the excerpts of these texts show of the personal information in them.
PERSONAL = "Hi, I am jane.doe@example.com, call +44 20 7946 0958."
REDACTED = "Hi, I am [EMAIL], call [PHONE]."


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
def cluster(keywords_file: Path, module_redis: RedisServer) -> Iterator[Cluster]:
    """modelsim and two safety replicas sharing one Redis; moderation of input and output (windows of 40
    characters), a violence threshold of 0.25, and lists and added terms looked at every 0.2 s."""
    with Cluster(
        processes=("modelsim", "safety"),
        replicas={"safety": 2},
        redis_url=module_redis.url,
        env={
            "CHATMESH_SAFETY_KEYWORDS": str(keywords_file),
            "CHATMESH_SAFETY_KEYWORDS_RELOAD_SECONDS": "0.2",
            "CHATMESH_SAFETY_MODERATION": "on",
            "CHATMESH_SAFETY_MODERATION_THRESHOLDS": '{"violence": 0.25}',
            "CHATMESH_SAFETY_MODERATE_OUTPUT": "true",
            "CHATMESH_SAFETY_OUTPUT_MODERATION_WINDOW_CHARS": str(WINDOW),
            "CHATMESH_REVIEW_POLICY": POLICY,
        },
    ) as running:
        yield running


@pytest.fixture
def sim(cluster: Cluster) -> Iterator[Cluster]:
    cluster.sim_reset()
    cluster.sim_config(moderation_word_scores=WORD_SCORES)
    yield cluster
    cluster.sim_reset()
    cluster.sim_config(moderation_word_scores={})


@pytest.fixture
async def store(module_redis: RedisServer) -> AsyncIterator[ReviewStore]:
    """The store the replicas write to, as the gateway reads it."""
    review_store = RedisReviewStore.from_url(module_redis.url, retention_seconds=3600)
    try:
        yield review_store
    finally:
        await review_store.close()


@pytest.fixture
async def replicas(sim: Cluster) -> AsyncIterator[list[safety_pb2_grpc.SafetyServiceStub]]:
    ports = [sim.processes[name].port for name in ("safety", "safety-2")]
    async with safety_stub(f"127.0.0.1:{ports[0]}") as first, safety_stub(f"127.0.0.1:{ports[1]}") as second:
        yield [first, second]


@pytest.fixture
def safety(replicas: list[safety_pb2_grpc.SafetyServiceStub]) -> safety_pb2_grpc.SafetyServiceStub:
    return replicas[0]


@pytest.fixture
def tenant() -> str:
    """A tenant of the test's own, so that its cases are the only ones listed for it."""
    return f"t-{uuid.uuid4().hex[:12]}"


def turn(tenant: str, request_id: str | None = None) -> safety_pb2.TurnRef:
    return safety_pb2.TurnRef(
        tenant=tenant, user_id="user-1", conversation_id="conv-1", request_id=request_id or uuid.uuid4().hex
    )


async def screen_input(
    stub: safety_pb2_grpc.SafetyServiceStub, text: str, ref: safety_pb2.TurnRef
) -> safety_pb2.Verdict:
    request = safety_pb2.ScreenInputRequest(text=text, request_id=ref.request_id, turn=ref)
    return (await stub.ScreenInput(request, timeout=CALL_TIMEOUT)).verdict


async def screen_output(
    stub: safety_pb2_grpc.SafetyServiceStub, pieces: list[str], ref: safety_pb2.TurnRef
) -> list[safety_pb2.ScreenOutputResponse]:
    """Sends the reply's pieces without waiting for answers, then the final marker; all the answers."""
    call = stub.ScreenOutput(timeout=CALL_TIMEOUT)
    await call.write(safety_pb2.ScreenOutputRequest(text=pieces[0], request_id=ref.request_id, turn=ref))
    for piece in pieces[1:]:
        await call.write(safety_pb2.ScreenOutputRequest(text=piece))
    await call.write(safety_pb2.ScreenOutputRequest(final=True))
    responses = [response async for response in call]
    assert await call.code() == grpc.StatusCode.OK
    return responses


async def cases_of(store: ReviewStore, tenant: str) -> list[review_pb2.ReviewCase]:
    """Every case of the tenant (bounded: at most 20 pages)."""
    cases: list[review_pb2.ReviewCase] = []
    token = ""
    for _ in range(20):
        page, token = await store.list(tenant=tenant, page_size=200, page_token=token)
        cases += page
        if not token:
            return cases
    raise AssertionError("more than 20 pages of cases")


async def poll_until(
    done: Callable[[safety_pb2.Verdict], bool], stub: safety_pb2_grpc.SafetyServiceStub, text: str, tenant: str
) -> safety_pb2.Verdict:
    for _ in range(POLLS):
        verdict = await screen_input(stub, text, turn(tenant))
        if done(verdict):
            return verdict
        await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"the verdict did not change within {POLLS} polls")


@pytest.mark.parametrize(
    ("phrase", "category", "blocked", "action"),
    [
        ("the forbidden fruit", "weapons", True, None),  # not named by the policy: blocks, no case
        ("wire the money", "fraud", True, BLOCK_AND_REVIEW),
        ("buy followers", "spam", False, ALLOW_AND_REVIEW),
    ],
)
async def test_a_listed_term_blocks_reviews_or_is_let_out_for_review_as_the_policy_says(
    safety: safety_pb2_grpc.SafetyServiceStub,
    store: ReviewStore,
    tenant: str,
    phrase: str,
    category: str,
    blocked: bool,
    action: int | None,
):
    ref = turn(tenant)

    verdict = await screen_input(safety, f"{PERSONAL} Please {phrase} today.", ref)

    assert verdict.blocked is blocked and list(verdict.categories) == [category] and verdict.source == KEYWORD
    assert len(verdict.policy_version) == 16
    if action is None:
        assert verdict.review_case_id == "" and await cases_of(store, tenant) == []
        return
    case = await store.get(verdict.review_case_id)
    assert case is not None and case.turn == ref and case.stage == INPUT
    assert list(case.categories) == [category] and case.source == KEYWORD and case.action == action
    assert case.state == review_pb2.CASE_STATE_OPEN
    assert case.excerpt == f"{REDACTED} Please {phrase} today."


@pytest.mark.parametrize(
    ("word", "categories", "blocked", "action"),
    [
        ("grim", ["violence"], True, BLOCK_AND_REVIEW),  # at our threshold, though the endpoint does not flag it
        ("simflag", ["harassment"], False, ALLOW_AND_REVIEW),  # flagged by the endpoint, let out for review
        ("hateful", ["hate"], True, None),  # flagged, not named by the policy: blocks
        ("faint", [], False, None),  # under the threshold
    ],
)
async def test_the_moderation_endpoints_categories_follow_the_thresholds_and_the_policy(
    safety: safety_pb2_grpc.SafetyServiceStub,
    store: ReviewStore,
    tenant: str,
    word: str,
    categories: list[str],
    blocked: bool,
    action: int | None,
):
    ref = turn(tenant)

    verdict = await screen_input(safety, f"{PERSONAL} Something {word} here.", ref)

    assert verdict.blocked is blocked and list(verdict.categories) == categories
    assert verdict.source == (MODERATION if categories else safety_pb2.SCREEN_SOURCE_UNSPECIFIED)
    if action is None:
        assert verdict.review_case_id == "" and await cases_of(store, tenant) == []
        return
    case = await store.get(verdict.review_case_id)
    assert case is not None and case.turn == ref and case.source == MODERATION and case.action == action
    assert case.excerpt == f"{REDACTED} Something {word} here."


async def test_a_tool_text_let_out_for_review_opens_a_case_at_the_tool_stage(
    safety: safety_pb2_grpc.SafetyServiceStub, store: ReviewStore, tenant: str
):
    ref = turn(tenant)
    request = safety_pb2.ScreenToolRequest(
        texts=['{"city": "Paris"}', "ok, buy followers here"], request_id=ref.request_id, turn=ref
    )

    verdict = (await safety.ScreenTool(request, timeout=CALL_TIMEOUT)).verdict

    assert not verdict.blocked and list(verdict.categories) == ["spam"] and verdict.review_case_id
    case = await store.get(verdict.review_case_id)
    assert case is not None and case.stage == TOOL and case.excerpt == "ok, buy followers here"


async def test_a_clean_reply_is_cleared_window_by_window(sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub):
    reply = "".join(f"item {index:02} is fine. " for index in range(5))  # 90 characters
    pieces = [reply[start : start + 7] for start in range(0, len(reply), 7)]

    responses = await screen_output(safety, pieces, turn("t-clean"))

    cleared = [response.cleared_chars for response in responses]
    # Only whole windows are cleared until the reply ends; then the rest.
    assert all(count % WINDOW == 0 for count in cleared[:-1]) and cleared == sorted(cleared)
    last = responses[-1]
    assert last.complete and last.cleared_chars == len(reply) and len(last.policy_version) == 16
    assert not last.review_case_id
    moderated = [request["input"] for request in sim.sim("GET", "/sim/moderations")["requests"]]
    assert moderated == [reply[:40], reply[40:80], reply[80:]]


async def test_a_flagged_word_in_the_second_window_blocks_the_reply_before_any_of_that_window_is_cleared(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub, store: ReviewStore, tenant: str
):
    first_window = "A calm opening sentence, forty chars...."
    assert len(first_window) == WINDOW
    reply = first_window + f" then a grim turn; mail {PERSONAL[9:29]} please, and more text after it."
    pieces = [reply[start : start + 9] for start in range(0, len(reply), 9)]
    ref = turn(tenant)

    responses = await screen_output(safety, pieces, ref)

    assert all(response.cleared_chars <= WINDOW for response in responses)
    last = responses[-1]
    assert last.verdict.blocked and list(last.verdict.categories) == ["violence"] and last.verdict.source == MODERATION
    assert last.review_case_id and last.review_case_id == last.verdict.review_case_id
    assert last.policy_version and not any(response.complete for response in responses)
    case = await store.get(last.review_case_id)
    assert case is not None and case.stage == OUTPUT and case.turn == ref and case.action == BLOCK_AND_REVIEW
    # Around the window that matched (here all of the reply that had arrived when it was judged, however much of
    # the third window that was: it is short), redacted.
    assert case.excerpt.startswith(f"{first_window} then a grim turn; mail [EMAIL]")
    assert PERSONAL[9:29] not in case.excerpt


async def test_a_listed_term_let_out_for_review_lets_the_whole_reply_out_and_opens_a_case(
    sim: Cluster, safety: safety_pb2_grpc.SafetyServiceStub, store: ReviewStore, tenant: str
):
    reply = "You could buy followers, but it is not worth it."
    ref = turn(tenant)

    responses = await screen_output(safety, [reply[:14], reply[14:]], ref)

    last = responses[-1]
    assert last.complete and last.cleared_chars == len(reply) and last.review_case_id
    case = await store.get(last.review_case_id)
    assert case is not None and case.stage == OUTPUT and case.source == KEYWORD and case.action == ALLOW_AND_REVIEW
    assert case.excerpt == reply


async def test_a_failing_moderation_endpoint_blocks_a_reply_or_lets_it_out_as_set(sim: Cluster, tmp_path: Path):
    sim.sim_faults(500, count=1000, endpoint="moderations")
    reply = ["Nothing wrong ", "with this reply."]

    async with another_safety(sim, tmp_path / "closed", CHATMESH_MODEL_MAX_ATTEMPTS="1") as closed:
        last = (await screen_output(closed, reply, turn("t-closed")))[-1]
        assert last.verdict.blocked and list(last.verdict.categories) == ["moderation_unavailable"]
        assert last.cleared_chars == 0 and not last.review_case_id
    opened_env = {"CHATMESH_MODEL_MAX_ATTEMPTS": "1", "CHATMESH_SAFETY_MODERATION_FAIL_OPEN": "true"}
    async with another_safety(sim, tmp_path / "open", **opened_env) as opened:
        last = (await screen_output(opened, reply, turn("t-open")))[-1]
        assert last.complete and last.cleared_chars == len("".join(reply))


async def test_a_term_a_decision_adds_is_enforced_by_every_replica_and_changes_the_policy_version(
    replicas: list[safety_pb2_grpc.SafetyServiceStub], store: ReviewStore, tenant: str
):
    text = "send me the gift card codes"
    before = [await screen_input(stub, text, turn(tenant)) for stub in replicas]
    assert not any(verdict.blocked for verdict in before) and before[0].policy_version == before[1].policy_version
    term = review_pb2.KeywordTerm(category="fraud", term="Gift Card Codes")

    await store.add_term(term)
    try:
        for stub in replicas:
            verdict = await poll_until(lambda v: v.blocked, stub, text, tenant)
            # "fraud" is block_and_review: the added term opens cases like the lists' terms.
            assert list(verdict.categories) == ["fraud"] and verdict.review_case_id
            assert verdict.policy_version != before[0].policy_version
    finally:
        await store.remove_term(term)
    after = [await poll_until(lambda v: not v.blocked, stub, text, tenant) for stub in replicas]

    # The same lists and policy again: the same version.
    assert [verdict.policy_version for verdict in after] == [before[0].policy_version] * 2


async def test_a_changed_keyword_file_changes_the_policy_version(
    replicas: list[safety_pb2_grpc.SafetyServiceStub], keywords_file: Path, tenant: str
):
    version = (await screen_input(replicas[0], "hello", turn(tenant))).policy_version
    try:
        write_list(keywords_file, KEYWORDS + "drink\tgreen tea\n")
        for stub in replicas:
            changed = await poll_until(lambda v: v.policy_version != version, stub, "hello", tenant)
            assert (await screen_input(stub, "green tea", turn(tenant))).blocked
            assert (await screen_input(stub, "hello", turn(tenant))).policy_version == changed.policy_version
    finally:
        write_list(keywords_file, KEYWORDS)
        for stub in replicas:
            await poll_until(lambda v: v.policy_version == version, stub, "hello", tenant)


async def test_without_redis_the_added_terms_stay_and_verdicts_stand_without_cases(
    sim: Cluster, tmp_path: Path, tenant: str
):
    redis_server = RedisServer.start()
    try:
        own_store = RedisReviewStore.from_url(redis_server.url, retention_seconds=3600)
        await own_store.add_term(review_pb2.KeywordTerm(category="fraud", term="gift card codes"))
        await own_store.close()
        async with (
            safety_process(sim, tmp_path, CHATMESH_REDIS_URL=redis_server.url) as process,
            safety_stub(f"127.0.0.1:{process.port}") as stub,
        ):
            assert (await screen_input(stub, "the gift card codes", turn(tenant))).review_case_id

            redis_server.stop()
            await poll_log(process, "review_terms_unreadable")

            added = await screen_input(stub, "the gift card codes", turn(tenant))
            assert added.blocked and list(added.categories) == ["fraud"] and not added.review_case_id
            let_out = await screen_input(stub, "buy followers", turn(tenant))
            assert not let_out.blocked and list(let_out.categories) == ["spam"] and not let_out.review_case_id
            failure = await poll_log(process, "review_case_failed")
            assert failure["stage"] == "input" and failure["request_id"]
    finally:
        redis_server.stop()


async def test_two_replicas_never_lose_or_duplicate_a_case_when_one_is_killed_with_calls_in_flight(
    sim: Cluster, store: ReviewStore, tmp_path: Path, tenant: str
):
    calls = 300
    refs = [turn(tenant, f"req-{index:03}") for index in range(calls)]
    case_ids: dict[str, str] = {}
    failed: list[safety_pb2.TurnRef] = []
    async with (
        safety_process(sim, tmp_path / "survivor") as survivor_process,
        safety_process(sim, tmp_path / "victim") as victim_process,
        safety_stub(f"127.0.0.1:{survivor_process.port}") as survivor,
        safety_stub(f"127.0.0.1:{victim_process.port}") as victim,
    ):

        async def call(index: int) -> None:
            ref = refs[index]
            stub = victim if index % 2 else survivor
            try:
                verdict = await screen_input(stub, f"{PERSONAL} Now wire the money, #{index}.", ref)
            except grpc.aio.AioRpcError as error:
                assert stub is victim and error.code() == grpc.StatusCode.UNAVAILABLE
                failed.append(ref)
                return
            assert verdict.blocked and verdict.review_case_id
            case_ids[ref.request_id] = verdict.review_case_id
            if len(case_ids) == 20:
                victim_process.kill()  # SIGKILL, with most calls still in flight or not sent

        await asyncio.gather(*(call(index) for index in range(calls)))
        assert failed, "the kill came after every call had its answer"
        # The caller retries what failed on the other replica; a case the victim opened before dying is found.
        for ref in failed:
            verdict = await screen_input(survivor, f"{PERSONAL} Now wire the money, again.", ref)
            assert verdict.blocked and verdict.review_case_id
            case_ids[ref.request_id] = verdict.review_case_id
        # A retry of a call that had its answer gives the same case.
        answered = next(ref for ref in refs if ref not in failed)
        assert (await screen_input(survivor, "wire the money", answered)).review_case_id == case_ids[
            answered.request_id
        ]

    cases = await cases_of(store, tenant)
    assert len(case_ids) == calls
    assert sorted(case.turn.request_id for case in cases) == sorted(case_ids)  # one case per request, no more
    assert {case.turn.request_id: case.id for case in cases} == case_ids
