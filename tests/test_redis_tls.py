"""TLS to Redis: the `ssl_*` options of a `rediss://` or `rediss+cluster://` URL, checked when
the settings load, and a Redis Cluster that speaks only TLS (started here, with certificates
of a CA made for the test) under a real `collab serve` node: verified with the URL's CA, and
refused, with the reason in the log, without it or with another CA.
"""

from __future__ import annotations

import re
import ssl
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError

from collab.settings import Settings
from realtime.redis_client import redis_client, redis_cluster_client
from realtime.redis_tls import split_tls
from tests.certificates import CertificateAuthority, Issued
from tests.helpers import eventually
from tests.processes import ServerProcess
from tests.redis_cluster import ClusterTls, RedisClusterProcesses
from tests.test_cluster_e2e import join_on, presence_of, start_nodes, stop_nodes
from tests.wsclient import Client, guest

# --- the URL's options, for a single Redis and a cluster alike -------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


def with_query(url: str, **query: str) -> str:
    return f"{url}?{urlencode(query, safe='/')}"


@pytest.mark.parametrize(
    "base", ["rediss://redis.internal:6380/0", "rediss+cluster://10.0.0.1:7000"]
)
def test_tls_verifies_by_default_and_takes_the_same_options_on_both_schemes(
    base: str, ca: CertificateAuthority
) -> None:
    assert split_tls(base)[1] == {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    client_cert = ca.issue("client-a", server=False)
    url = with_query(
        base,
        ssl_ca_certs=str(ca.cert),
        ssl_certfile=str(client_cert.cert),
        ssl_keyfile=str(client_cert.key),
        ssl_check_hostname="false",
        ssl_min_version="TLSv1_3",
        ssl_include_verify_flags="VERIFY_X509_STRICT",
    )
    rest, options = split_tls(url)
    assert rest == base
    assert options == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
        "ssl_ca_certs": str(ca.cert),
        "ssl_certfile": str(client_cert.cert),
        "ssl_keyfile": str(client_cert.key),
        "ssl_min_version": ssl.TLSVersion.TLSv1_3,
        "ssl_include_verify_flags": [ssl.VerifyFlags.VERIFY_X509_STRICT],
    }


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("rediss+cluster://h:7000?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe': must be one of"),
        ("rediss://h:6380?ssl_check_hostname=flase", "ssl_check_hostname='flase': not true"),
        ("rediss+cluster://h:7000?ssl_ca_certs=/no/such/ca.pem", "ssl_ca_certs='/no/such/ca.pem'"),
        ("rediss://h:6380?ssl_ca_cert=/etc/ca.pem", "unknown TLS option 'ssl_ca_cert'"),
        ("rediss+cluster://h:7000?ssl_min_version=TLSv9", "ssl_min_version='TLSv9'"),
        ("rediss://h:6380?ssl_include_verify_flags=STRICT", "'STRICT' is not an ssl.VerifyFlags"),
        ("redis+cluster://h:7000?ssl_cert_reqs=required", "use rediss:// or rediss+cluster://"),
        ("redis://h:6379?ssl_cert_reqs=required", "not redis:// (which connects without TLS)"),
        ("rediss+cluster://h:7000?ssl_password=x", "ssl_password is not supported on a Redis Cl"),
        ("rediss+cluster://h:7000/?db=1", "takes only TLS options (ssl_...), not 'db'"),
        ("rediss://h:6380?ssl_cert_reqs=none&ssl_cert_reqs=none", "ssl_cert_reqs is given twice"),
        ("rediss://h:6380?ssl_keyfile=/etc/hostname", "ssl_keyfile needs ssl_certfile"),
    ],
)
def test_a_wrong_option_is_refused_when_the_settings_load_naming_it(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        split_tls(url)
    with pytest.raises(ValidationError) as invalid:
        Settings(broker_url=url)
    assert "broker_url" in str(invalid.value) and error in str(invalid.value)


# --- a Redis Cluster that speaks only TLS ------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """Three masters, no replicas (enough to spread rooms over shards, and quick to make)."""
    folder = tmp_path_factory.mktemp("redis-cluster-tls")
    cluster = RedisClusterProcesses(folder, replicas=0, tls=ClusterTls.make(folder))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def readiness(node: ServerProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{node.url}/readyz", timeout=5)
    return response.status_code, response.json()["checks"]


def client_certificate(tls: ClusterTls) -> dict[str, str]:
    return {"ssl_certfile": str(tls.client.cert), "ssl_keyfile": str(tls.client.key)}


@pytest.fixture(scope="module")
def tls_nodes(
    tls_cluster: RedisClusterProcesses,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
) -> Iterator[dict[str, ServerProcess]]:
    """`collab serve` nodes on the TLS cluster, started at once (a start costs seconds):
    "verified" has the cluster's CA in its URL, "no-ca" only the system's CAs."""
    assert tls_cluster.tls is not None
    seeds = tls_cluster.url.partition("?")[0]
    urls = {
        "verified": tls_cluster.url,
        "no-ca": with_query(seeds, **client_certificate(tls_cluster.tls)),
    }
    folder = tmp_path_factory.mktemp("tls-nodes")
    for name in urls:
        (folder / name).mkdir()
    with ThreadPoolExecutor(len(urls)) as pool:
        started = {
            name: pool.submit(start_nodes, folder / name, sqlite_template, url, [name])
            for name, url in urls.items()
        }
    nodes = {name: future.result()[0] for name, future in started.items()}
    try:
        yield nodes
    finally:
        stop_nodes(list(nodes.values()))


@pytest.mark.redis_cluster
@pytest.mark.parametrize("verified", [True, False])
async def test_a_single_redis_url_takes_the_same_options(
    tls_cluster: RedisClusterProcesses, verified: bool
) -> None:
    """`rediss://` through the same parser, to one of the cluster's nodes as to a single
    Redis: it answers with the CA given, and fails verification without it."""
    tls = tls_cluster.tls
    assert tls is not None
    options = tls.client_options() if verified else client_certificate(tls)
    url = with_query(f"rediss://127.0.0.1:{tls_cluster.ports[0]}/0", **options)
    client = redis_client(url, timeout=5)
    try:
        if verified:
            assert await client.ping()
        else:
            with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.ping()
    finally:
        await client.aclose()


@pytest.mark.redis_cluster
async def test_a_node_on_a_tls_cluster_verified_with_the_urls_ca_works_end_to_end(
    tls_cluster: RedisClusterProcesses, tls_nodes: dict[str, ServerProcess]
) -> None:
    """`collab serve` on `rediss+cluster://...?ssl_ca_certs=...&ssl_certfile=...`: ready,
    sign-in counts and tickets work, and in rooms on every shard its members get messages
    with offsets, and presence."""
    node = tls_nodes["verified"]
    assert readiness(node) == (200, {"database": True, "broker": True, "persistence": True})
    (ann_token, ann_id), (bob_token, bob_id) = guest(node.url, "ann"), guest(node.url, "bob")
    # Sign-in attempts are counted on the cluster (503 if they could not be), and connection
    # tickets are kept there.
    form = {"username": "nobody", "password": "x"}
    failed = httpx.post(f"{node.url}/auth/token", data=form, timeout=30)  # hashing under load
    assert failed.status_code == 401
    bearer = {"Authorization": f"Bearer {ann_token}"}
    ticket = httpx.post(f"{node.url}/auth/ws-ticket", headers=bearer).json()["ticket"]
    by_ticket = await Client.connect(node.ws_url, None, path=f"/ws/chat?ticket={ticket}")
    assert by_ticket.welcome["user"]["id"] == ann_id, by_ticket.welcome
    rooms: set[str] = set()
    while len({tls_cluster.master_of(f"collab:{{{room}}}:ps:0") for room in rooms}) < 3:
        rooms.add(f"tls-{uuid.uuid4().hex[:8]}")
    for room in rooms:
        ann, joined = await join_on(node, ann_token, room)
        bob, _ = await join_on(node, bob_token, room)
        acks = [
            await bob.request({"type": "publish", "room": room, "body": {"n": n}}) for n in range(3)
        ]
        assert [(ack["type"], ack["offset"]) for ack in acks] == [
            ("ack", 1),
            ("ack", 2),
            ("ack", 3),
        ]
        for member in (ann, bob):
            messages = await member.messages(room, 3)
            assert [m["offset"] for m in messages] == [1, 2, 3]
            assert [m["body"]["n"] for m in messages] == [0, 1, 2]
            assert {m["epoch"] for m in messages} == {joined["epoch"]}
        assert await presence_of(ann, room) == {ann_id: 1, bob_id: 1}


@pytest.mark.redis_cluster
async def test_a_node_without_the_clusters_ca_is_not_ready_and_says_why(
    tls_nodes: dict[str, ServerProcess],
) -> None:
    """Without the cluster's CA (the system's CAs do not know it): the node starts but is not
    ready, its log names the verification failure, and a join is answered `unavailable`."""
    node = tls_nodes["no-ca"]

    async def says_why() -> bool:
        return "CERTIFICATE_VERIFY_FAILED" in node.log()

    await eventually(says_why, 10, "the log names the verification failure")
    status, checks = readiness(node)
    assert status == 503 and checks["broker"] is False
    client = await Client.connect(node.ws_url, guest(node.url, "ann")[0])
    reply = await client.request({"type": "join", "room": "tls-refused"})
    assert reply["type"] == "error" and reply["code"] == "unavailable", reply


async def first_error(url: str) -> str:
    """What a cluster client of `url` raises on its first command ("" when it works)."""
    client = redis_cluster_client(url, timeout=5)
    try:
        await client.set(f"tls-{uuid.uuid4().hex}", 1, ex=5)
        return ""
    except Exception as exc:
        return str(exc)
    finally:
        await client.aclose()


@pytest.mark.redis_cluster
async def test_a_certificate_of_another_ca_is_refused(
    tls_cluster: RedisClusterProcesses, tmp_path: Path
) -> None:
    tls = tls_cluster.tls
    assert tls is not None
    seeds = tls_cluster.url.partition("?")[0]
    other_ca = CertificateAuthority(tmp_path, "another-ca")
    other = with_query(seeds, ssl_ca_certs=str(other_ca.cert), **client_certificate(tls))
    assert "CERTIFICATE_VERIFY_FAILED" in await first_error(other)


@pytest.mark.redis_cluster
async def test_the_certificates_must_name_the_addresses_the_cluster_announces(
    tls_cluster: RedisClusterProcesses,
) -> None:
    """Nodes whose certificates name them by DNS name only: a client seeded by that name is
    sent to the IPs CLUSTER SLOTS announces, and fails the hostname check there; with
    `ssl_check_hostname=false` it connects (the chain is still verified)."""
    tls = tls_cluster.tls
    assert tls is not None
    by_name = tls.authority.issue("redis-node-by-name", dns=("localhost",))
    by_name_url = with_query(
        f"rediss+cluster://localhost:{tls_cluster.ports[0]}", **tls.client_options()
    )

    def serve(issued: Issued) -> None:
        for port in tls_cluster.ports:  # Redis reloads its TLS files on CONFIG SET
            # Not checking the name: while the by-name certificate is served, it has none.
            client = tls_cluster.node_client(port, ssl_check_hostname=False)
            client.execute_command(
                "CONFIG", "SET", "tls-cert-file", str(issued.cert), "tls-key-file", str(issued.key)
            )
            client.close()

    serve(by_name)
    try:
        error = await first_error(by_name_url)
        assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in error
        assert await first_error(by_name_url + "&ssl_check_hostname=false") == ""
    finally:
        serve(tls.node)
    assert await first_error(tls_cluster.url) == ""
