"""A cluster as the Helm chart runs it: TLS at the gateway, mutual TLS between every process, Redis over
TLS with a username and password, plaintext health ports, and a region.

Certificates are made here (trustme) and mounted the way Kubernetes mounts a Secret, so that rotating them
is one atomic swap of files that the running processes pick up without a restart.
"""

import json
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis
from support.certificates import LOOPBACK_NAMES, TestPki, expired
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

REGION = "eu-west"
# How often the processes' channels look for rotated client certificates, here.
RELOAD_SECONDS = 0.2
CALL_SECONDS = 10.0
INTERNAL = ("dialogue", "safety", "cache")


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki()


@pytest.fixture(scope="module")
def tls_redis(pki: TestPki) -> Iterator[RedisServer]:
    server = RedisServer.start(tls=pki.internal)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def secure(pki: TestPki, tls_redis: RedisServer) -> Iterator[Cluster]:
    with Cluster(
        redis_url=tls_redis.url,
        pki=pki,
        env={
            "CHATMESH_REDIS_USERNAME": RedisServer.USERNAME,
            "CHATMESH_REDIS_PASSWORD": RedisServer.PASSWORD,
            "CHATMESH_REDIS_TLS_CA_FILE": pki.internal.ca,
            "CHATMESH_TLS_RELOAD_SECONDS": str(RELOAD_SECONDS),
            "CHATMESH_REGION": REGION,
        },
    ) as running:
        yield running


@pytest.fixture
async def chat(secure: Cluster, pki: TestPki) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    credentials = grpc.ssl_channel_credentials(pki.public_ca_pem())
    async with grpc.aio.secure_channel(secure.gateway_target, credentials) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def handshake(
    port: int,
    ca: str,
    *,
    client_files: tuple[str, str] | None = None,
    version: ssl.TLSVersion | None = None,
) -> tuple[str, bytes]:
    """A TLS handshake with a process's port, as an HTTP/2 client: (TLS version, the server's certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    if client_files is not None:
        context.load_cert_chain(*client_files)
    if version is not None:
        # Let OpenSSL offer the old versions at all, so that refusing them is the server's doing.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=CALL_SECONDS) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        peer = connection.getpeercert(binary_form=True)
        assert peer is not None and connection.selected_alpn_protocol() == "h2"
        return str(connection.version()), peer


async def health_over(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of a health check made over a new connection with `credentials` (None: plaintext)."""
    channel = grpc.aio.insecure_channel(target) if credentials is None else grpc.aio.secure_channel(target, credentials)
    async with channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_SECONDS)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def internal_target(secure: Cluster, name: str) -> str:
    return f"127.0.0.1:{secure.processes[name].port}"


def internal_credentials(pki: TestPki, cert: bytes | None, key: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.internal_ca.cert_pem.bytes(), private_key=key, certificate_chain=cert
    )


def pids(cluster: Cluster) -> dict[str, int | None]:
    return {name: process.pid for name, process in cluster.processes.items()}


def wait_for_log(cluster: Cluster, name: str, event: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        events = [
            json.loads(line).get("event") for line in cluster.processes[name].log().splitlines() if line.startswith("{")
        ]
        if events.count(event) >= count:
            return
        assert time.monotonic() < deadline, f"{name} logged {event!r} {events.count(event)} times, not {count}"
        time.sleep(0.05)


async def test_a_conversation_runs_end_to_end_with_every_hop_encrypted_and_is_kept_in_redis_over_tls(
    secure: Cluster, chat: chat_pb2_grpc.ChatServiceStub, tls_redis: RedisServer
) -> None:
    first = await chat.Chat(chat_pb2.ChatRequest(user_id="ana", message="hello over TLS"), timeout=CALL_SECONDS)
    assert first.text and first.conversation_id.startswith(f"{REGION}.")
    second = await chat.Chat(
        chat_pb2.ChatRequest(user_id="ana", conversation_id=first.conversation_id, message="and again"),
        timeout=CALL_SECONDS,
    )
    assert second.text

    history = await chat.GetConversation(
        chat_pb2.GetConversationRequest(user_id="ana", conversation_id=first.conversation_id), timeout=CALL_SECONDS
    )
    assert [message.content for message in history.conversation.messages if message.role == chat_pb2.ROLE_USER] == [
        "hello over TLS",
        "and again",
    ]
    client = Redis.from_url(tls_redis.url, **tls_redis.client_options())
    try:
        assert await client.keys(f"*{first.conversation_id}*")
    finally:
        await client.aclose()


def test_every_process_logs_how_its_port_is_secured(secure: Cluster) -> None:
    transports = {}
    for name in ("gateway", *INTERNAL):
        lines = [json.loads(line) for line in secure.processes[name].log().splitlines() if line.startswith("{")]
        transports[name] = next(line["transport"] for line in lines if line.get("event") == "listening")
    assert transports == {"gateway": "tls", "dialogue": "mutual_tls", "safety": "mutual_tls", "cache": "mutual_tls"}


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("name", ["gateway", *INTERNAL])
@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        (ssl.TLSVersion.TLSv1, False),
        (ssl.TLSVersion.TLSv1_1, False),
        (ssl.TLSVersion.TLSv1_2, True),
        (ssl.TLSVersion.TLSv1_3, True),
    ],
    ids=["TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3"],
)
def test_only_tls_1_2_and_1_3_are_accepted(
    secure: Cluster, pki: TestPki, name: str, version: ssl.TLSVersion, accepted: bool
) -> None:
    port = secure.processes[name].port
    client_files = None if name == "gateway" else (pki.internal.cert, pki.internal.key)
    ca = pki.public.ca if name == "gateway" else pki.internal.ca
    if accepted:
        assert handshake(port, ca, client_files=client_files, version=version)[0] == version.name.replace("_", ".")
    else:
        # The server closes the connection on the old version's hello (no "protocol version" is shared).
        with pytest.raises((ssl.SSLError, ConnectionError)):
            handshake(port, ca, client_files=client_files, version=version)


@pytest.mark.parametrize("name", ["gateway", *INTERNAL])
async def test_a_plaintext_client_is_refused_on_every_grpc_port(secure: Cluster, name: str) -> None:
    assert await health_over(f"127.0.0.1:{secure.processes[name].port}", None) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("name", INTERNAL)
async def test_internal_ports_serve_only_clients_with_a_current_certificate_from_the_internal_ca(
    secure: Cluster, pki: TestPki, name: str
) -> None:
    target = internal_target(secure, name)
    valid = pki.internal_ca.issue_cert(*LOOPBACK_NAMES)
    other_ca = pki.public_ca.issue_cert(*LOOPBACK_NAMES)
    stale = expired(pki.internal_ca)

    def presenting(leaf: trustme.LeafCert) -> grpc.ChannelCredentials:
        return internal_credentials(pki, leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())

    assert await health_over(target, presenting(valid)) == grpc.StatusCode.OK
    assert await health_over(target, internal_credentials(pki, None, None)) == grpc.StatusCode.UNAVAILABLE
    assert await health_over(target, presenting(other_ca)) == grpc.StatusCode.UNAVAILABLE
    assert await health_over(target, presenting(stale)) == grpc.StatusCode.UNAVAILABLE


async def test_a_server_whose_certificate_does_not_name_the_host_dialled_is_refused(
    secure: Cluster, pki: TestPki
) -> None:
    channel = grpc.aio.secure_channel(
        secure.gateway_target,
        grpc.ssl_channel_credentials(pki.public_ca_pem()),
        options=[("grpc.ssl_target_name_override", "chat.other.example")],
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat_pb2_grpc.ChatServiceStub(channel).Chat(
                chat_pb2.ChatRequest(user_id="ana", message="hi"), timeout=CALL_SECONDS
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Hostname Verification" in (refused.value.details() or "")


async def test_rotated_certificates_are_used_on_new_connections_without_a_restart(
    secure: Cluster, pki: TestPki, chat: chat_pb2_grpc.ChatServiceStub
) -> None:
    before = pids(secure)
    reloads = {name: secure.processes[name].log().count('"tls_channel_reloaded"') for name in ("gateway", "dialogue")}
    old_public = handshake(secure.processes["gateway"].port, pki.public.ca)[1]

    pki.public.write(pki.public_ca.issue_cert(*LOOPBACK_NAMES), pki.public_ca)
    pki.internal.write(pki.internal_ca.issue_cert(*LOOPBACK_NAMES), pki.internal_ca)

    served = handshake(secure.processes["gateway"].port, pki.public.ca)[1]
    assert served == pki.public.served_by() != old_public
    for name in INTERNAL:
        client_files = (pki.internal.cert, pki.internal.key)
        assert handshake(secure.processes[name].port, pki.internal.ca, client_files=client_files)[1] == (
            pki.internal.served_by()
        )
    # Channels to dialogue, safety and cache present the new client certificate from the next check on.
    for name in ("gateway", "dialogue"):
        wait_for_log(secure, name, "tls_channel_reloaded", reloads[name] + 1)
    reply = await chat.Chat(
        chat_pb2.ChatRequest(user_id="ana", message=f"after rotation {uuid.uuid4()}"), timeout=CALL_SECONDS
    )
    assert reply.text
    assert pids(secure) == before and all(process.running for process in secure.processes.values())


async def test_an_expired_server_certificate_is_refused_by_new_clients(secure: Cluster, pki: TestPki) -> None:
    pki.public.write(expired(pki.public_ca), pki.public_ca)
    try:
        code = await health_over(secure.gateway_target, grpc.ssl_channel_credentials(pki.public_ca_pem()))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        pki.public.write(pki.public_ca.issue_cert(*LOOPBACK_NAMES), pki.public_ca)
    assert await health_over(secure.gateway_target, grpc.ssl_channel_credentials(pki.public_ca_pem())) == (
        grpc.StatusCode.OK
    )


@pytest.mark.parametrize("name", ["gateway", *INTERNAL])
async def test_the_health_port_is_plaintext_and_serves_health_alone(secure: Cluster, name: str) -> None:
    target = f"127.0.0.1:{secure.processes[name].health_port}"
    assert await health_over(target, None) == grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await chat_pb2_grpc.ChatServiceStub(channel).GetUsage(chat_pb2.GetUsageRequest(), timeout=CALL_SECONDS)
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "call",
    [
        lambda stub, cid: stub.Chat(chat_pb2.ChatRequest(user_id="ana", conversation_id=cid, message="hi")),
        lambda stub, cid: stub.GetConversation(chat_pb2.GetConversationRequest(user_id="ana", conversation_id=cid)),
        lambda stub, cid: stub.DeleteConversation(
            chat_pb2.DeleteConversationRequest(user_id="ana", conversation_id=cid)
        ),
    ],
    ids=["Chat", "GetConversation", "DeleteConversation"],
)
async def test_a_conversation_of_another_region_is_refused_naming_its_home(
    secure: Cluster, chat: chat_pb2_grpc.ChatServiceStub, call: object
) -> None:
    conversation_id = f"us-east.{uuid.uuid4().hex}"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(chat, conversation_id)  # type: ignore[operator]
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lives in region us-east" in (refused.value.details() or "")
    assert f"this is region {REGION}" in (refused.value.details() or "")


async def test_ids_without_a_region_are_looked_up_where_they_land(chat: chat_pb2_grpc.ChatServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await chat.GetConversation(
            chat_pb2.GetConversationRequest(user_id="ana", conversation_id=uuid.uuid4().hex), timeout=CALL_SECONDS
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
