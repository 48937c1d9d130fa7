"""The operator tools' question to the registry (edge_agent/registry_probe.py): against
the real registry (anonymous, and behind Docker's token authentication), and against
local servers that answer garbage, huge heads, a huge token, or nothing at all. Every
one of those ends in an UNKNOWN answer within the timeout, never an exception."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol.errors import ConfigError
from edge_agent.registry_probe import (
    ProbeSettings,
    Verdict,
    _Probe,
    _Unknown,
    load_probe_settings,
    locate,
    precheck,
    probe,
)
from tests.support import free_port
from tests.support.device import publish
from tests.support.tokenauth import TokenAuthRegistry

FAST = ProbeSettings(timeout_s=2.0)


@pytest.fixture
def repo_with_1_0(unique_repo: str) -> str:
    publish(unique_repo, "1.0", "1.0 probe")
    return unique_repo


def test_an_existing_tag_exists_and_a_mistyped_one_is_missing(repo_with_1_0: str) -> None:
    assert probe(repo_with_1_0, "1.0", FAST).verdict is Verdict.EXISTS
    missing = probe(repo_with_1_0, "9.9", FAST)
    assert missing.verdict is Verdict.MISSING and missing.reason == ""
    assert probe(f"{repo_with_1_0}-nothing-here", "1.0", FAST).verdict is Verdict.MISSING
    found = precheck("9.9", [repo_with_1_0, repo_with_1_0], FAST, who="device d")
    assert [c.repository for c in found.missing] == [repo_with_1_0]  # asked once
    assert "tag 9.9 does not exist in " + repo_with_1_0 in found.refusal("use --force")
    assert "FALLBACK_TAG" in found.refusal("use --force")


def test_a_registry_behind_token_auth_is_asked_with_the_credentials(
    repo_with_1_0: str, tmp_path: Path
) -> None:
    with TokenAuthRegistry(username="ops", password="pw-123") as front:
        repo = f"{front.address}/{repo_with_1_0.split('/', 1)[1]}"
        password = tmp_path / "password"
        password.write_text("pw-123\n")
        settings = load_probe_settings({"REGISTRY_USERNAME": "ops",
                                        "REGISTRY_PASSWORD_FILE": str(password),
                                        "REGISTRY_HOST": front.address})
        assert probe(repo, "1.0", settings).verdict is Verdict.EXISTS
        assert probe(repo, "9.9", settings).verdict is Verdict.MISSING
        # pull is all it asks for, whatever the challenge names
        assert {r.scope for r in front.token_requests} == {
            f"repository:{repo_with_1_0.split('/', 1)[1]}:pull"}
        # without credentials, or with credentials for another registry: a warning,
        # and the credentials never leave for a registry they are not for
        anonymous = probe(repo, "9.9", FAST)
        assert anonymous.verdict is Verdict.UNKNOWN
        assert "credentials" in anonymous.reason and "REGISTRY_USERNAME" in anonymous.reason
        elsewhere = ProbeSettings(timeout_s=2.0, username="ops", password="pw-123",
                                  credentials_for="127.0.0.1:1")
        before = len(front.token_requests)
        assert probe(repo, "1.0", elsewhere).verdict is Verdict.UNKNOWN
        assert all(r.user is None for r in front.token_requests[before:])


def test_an_unreachable_registry_is_unknown_with_the_url() -> None:
    port = free_port()
    answer = probe(f"127.0.0.1:{port}/acme/app", "1.0", FAST)
    assert answer.verdict is Verdict.UNKNOWN
    assert answer.reason.startswith(f"http://127.0.0.1:{port}/v2/acme/app: unreachable")
    found = precheck("1.0", [f"127.0.0.1:{port}/acme/app"], FAST, who="device d")
    assert found.missing == ()
    assert len(found.warnings) == 1 and "could not ask the registry" in found.warnings[0]


def test_no_repository_known_or_check_off() -> None:
    found = precheck("1.0", [], FAST, who="the devices of group g")
    assert found.warnings == ("the registry was not asked whether tag 1.0 exists: the "
                              "devices of group g reported no image repository yet",)
    off = precheck("1.0", ["127.0.0.1:1/x"], ProbeSettings(enabled=False), who="x")
    assert off.checks == () and off.warnings == ()


# -- hostile registries -----------------------------------------------------------------
Behaviour = Callable[[socket.socket], None]


@contextmanager
def hostile_server(behaviour: Behaviour) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that treats each connection with ``behaviour``."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=handle, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                conn.recv(65536)
                behaviour(conn)
            except OSError:
                pass

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        server.close()
        acceptor.join(5)
        for thread in threads:
            thread.join(12)


def garbage(conn: socket.socket) -> None:
    conn.sendall(b"\x00\xffnot http at all\r\n\r\n" * 10)


def huge_head(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for i in range(200):  # far more header lines than anyone should read
        conn.sendall(f"X-Junk-{i}: ".encode() + b"a" * 1000 + b"\r\n")
    conn.sendall(b"\r\n")


def endless_line(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Long: ")
    for _ in range(100):
        conn.sendall(b"b" * 10_000)


def silent(conn: socket.socket) -> None:
    time.sleep(8)


def drip(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for _ in range(80):  # a byte now and then: no single read ever times out
        conn.sendall(b"X")
        time.sleep(0.1)


def odd_status(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")


def bearer_to_huge_token(address: list[str]) -> Behaviour:
    """401 with a Bearer challenge whose realm answers 1 MB of JSON."""
    def behaviour(conn: socket.socket) -> None:
        challenge = f'Bearer realm="http://{address[0]}/token",service="x"'
        conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nWWW-Authenticate: "
                     + challenge.encode() + b"\r\nConnection: close\r\n\r\n")
    return behaviour


@pytest.mark.parametrize("behaviour", [garbage, huge_head, endless_line, silent, drip,
                                       odd_status], ids=lambda b: b.__name__)
def test_a_hostile_registry_gives_unknown_within_the_timeout(behaviour: Behaviour) -> None:
    with hostile_server(behaviour) as address:
        started = time.monotonic()
        answer = probe(f"{address}/acme/app", "1.0", ProbeSettings(timeout_s=1.5))
        took = time.monotonic() - started
    assert answer.verdict is Verdict.UNKNOWN, answer
    assert answer.reason.startswith(f"http://{address}/v2/acme/app: ")
    assert len(answer.reason) < 400
    assert took < 1.5 + 1.0  # the deadline holds, whatever the server does (with margin)


def test_a_head_cut_off_by_the_deadline_is_no_answer() -> None:
    # The deadline ends a read by shutting the socket down; http.client then takes the end
    # of input for the end of the head, and a dripped "200 OK" read as an answer would say
    # the tag exists (seen under load: the worker answered just after the deadline).
    with hostile_server(drip) as address:
        question = _Probe(locate(f"{address}/acme/app"), ProbeSettings(timeout_s=5))
        deadline = threading.Timer(0.5, question.expire)
        deadline.start()
        with pytest.raises(_Unknown, match="no answer within 5 s"):
            question.request(f"http://{address}/v2/acme/app/manifests/1.0", "HEAD", {})
        deadline.join()


def test_a_token_service_that_answers_too_much_is_unknown() -> None:
    def token_service(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
                     b'{"token": "' + b"t" * 1_000_000 + b'"}')

    with hostile_server(token_service) as token_address:
        address: list[str] = [token_address]
        with hostile_server(bearer_to_huge_token(address)) as registry:
            answer = probe(f"{registry}/acme/app", "1.0", FAST)
    assert answer.verdict is Verdict.UNKNOWN
    assert "token service sent an unreadable answer" in answer.reason


# -- names and settings -------------------------------------------------------------------
def test_repositories_are_located_as_docker_does() -> None:
    assert locate("nginx").base_url == "https://registry-1.docker.io"
    assert locate("nginx").name == "library/nginx"
    assert locate("acme/app").name == "acme/app"
    assert locate("localhost:5000/a/b:1.0").base_url == "http://localhost:5000"
    assert locate("127.0.0.1:5000/a@sha256:" + "0" * 64).name == "a"
    assert locate("10.1.2.3:5000/a").base_url == "https://10.1.2.3:5000"
    assert locate("10.1.2.3:5000/a", frozenset({"10.1.2.3:5000"})).base_url == \
        "http://10.1.2.3:5000"


@given(st.text(max_size=300))
def test_a_device_named_repository_that_is_no_name_reaches_no_url(text: str) -> None:
    """A device chooses its state's ``image``: anything but a repository name is refused
    before a connection is made (the ports below are closed anyway)."""
    repository = f"127.0.0.1:1/{text}"
    answer = probe(repository, "1.0", ProbeSettings(timeout_s=0.5))
    assert answer.verdict is Verdict.UNKNOWN


def test_settings_are_checked(tmp_path: Path) -> None:
    assert load_probe_settings({}) == ProbeSettings()
    assert load_probe_settings({"REGISTRY_CHECK": "false"}).enabled is False
    settings = load_probe_settings({"REGISTRY_CHECK_TIMEOUT": "2.5",
                                    "REGISTRY_INSECURE": "10.0.0.5:5000, Reg.lan"})
    assert settings.timeout_s == 2.5 and settings.insecure == {"10.0.0.5:5000", "reg.lan"}
    for env, variable in [({"REGISTRY_CHECK": "maybe"}, "REGISTRY_CHECK"),
                          ({"REGISTRY_CHECK_TIMEOUT": "0"}, "REGISTRY_CHECK_TIMEOUT"),
                          ({"REGISTRY_INSECURE": "http://x"}, "REGISTRY_INSECURE"),
                          ({"REGISTRY_USERNAME": "u"}, "REGISTRY_USERNAME"),
                          ({"REGISTRY_PASSWORD_FILE": str(tmp_path / "none")},
                           "REGISTRY_PASSWORD_FILE")]:
        with pytest.raises(ConfigError, match=variable):
            load_probe_settings(env)
    password = tmp_path / "pw"
    password.write_text("secret")
    settings = load_probe_settings({"REGISTRY_USERNAME": "u", "REGISTRY_HOST": "reg:5000",
                                    "REGISTRY_PASSWORD_FILE": str(password)})
    assert settings.password == "secret" and "secret" not in repr(settings)
