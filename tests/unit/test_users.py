"""The user store, its authenticator, sender ownership, the AUTH throttle, TLS reload and
the ``hato user`` / ``hato tls`` commands (run in-process with click's runner)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trustme
from argon2 import PasswordHasher
from click.testing import CliRunner

from hato import reply
from hato.cli import main
from hato.errors import ConfigError
from hato.smtp.auth import AuthThrottle
from hato.smtp.policy import Policy
from hato.smtp.tls import TLSContextProvider, self_signed_certificate
from hato.testing import FakeClock
from hato.users import (
    User,
    UserAuthenticator,
    UserError,
    UserStore,
    normalize_grant,
    normalize_name,
)

SRC = Path(__file__).resolve().parents[2] / "src"


class CountingHasher(PasswordHasher):
    """Cheap argon2id parameters (unit tests hash a lot); counts verifications and notes
    the thread they ran in."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified: list[str] = []
        self.threads: list[int] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified.append(str(hash))
        self.threads.append(threading.get_ident())
        return super().verify(hash, password)


@pytest.fixture
def hasher() -> CountingHasher:
    return CountingHasher()


@pytest.fixture
def store(tmp_path: Path, hasher: CountingHasher) -> UserStore:
    s = UserStore(tmp_path / "users.json", hasher=hasher)
    s.add("postfix@dbmx.net", "s3cret")
    return s


# Names and grants.


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("postfix@dbmx.net", "postfix@dbmx.net"),
        ("Postfix@DBMX.net", "postfix@dbmx.net"),
        (" alice ", "alice"),
        ("a.b+c@mail.example.org", "a.b+c@mail.example.org"),
        ("", None),
        ("a b@x.org", None),
        ("a@b@x.org", None),
        ("a@", None),
        ("@x.org", None),
        ("a@-x.org", None),
        ("a:b", None),
        ("a\0b", None),
        ("x" * 65, None),
    ],
)
def test_normalize_name(name: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(UserError):
            normalize_name(name)
    else:
        assert normalize_name(name) == expected


@pytest.mark.parametrize(
    ("grant", "expected"),
    [
        ("@Other.Example", "@other.example"),
        ("ops@other.example", "ops@other.example"),
        ("ops@other.example.", "ops@other.example"),
        ("other.example", None),
        ("ops@", None),
        ("a b@x.org", None),
        ("<a>@x.org", None),
    ],
)
def test_normalize_grant(grant: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(UserError):
            normalize_grant(grant)
    else:
        assert normalize_grant(grant) == expected


@pytest.mark.parametrize(
    ("user", "address", "owned"),
    [
        # The guide: postfix@dbmx.net sends as noreply@dbmx.net.
        (User("postfix@dbmx.net", "h"), "noreply@dbmx.net", True),
        (User("postfix@dbmx.net", "h"), "NoReply@DBMX.net", True),
        (User("postfix@dbmx.net", "h"), "postfix@dbmx.net", True),
        (User("postfix@dbmx.net", "h"), "noreply@other.example", False),
        (User("postfix@dbmx.net", "h"), "noreply@mail.dbmx.net", False),  # no subdomains
        (User("postfix@dbmx.net", "h"), "x@evil-dbmx.net", False),
        (User("postfix@dbmx.net", "h", ("@other.example",)), "a@other.example", True),
        (User("postfix@dbmx.net", "h", ("ops@other.example",)), "ops@other.example", True),
        (User("postfix@dbmx.net", "h", ("ops@other.example",)), "dev@other.example", False),
        (User("postfix@dbmx.net", "h", ("ops@dbmx.net",), only=True), "ops@dbmx.net", True),
        (User("postfix@dbmx.net", "h", ("ops@dbmx.net",), only=True), "noreply@dbmx.net", False),
        (User("app", "h"), "app@dbmx.net", False),  # a bare name owns nothing by default
        (User("app", "h", ("@dbmx.net",)), "app@dbmx.net", True),
    ],
)
def test_owns(user: User, address: str, owned: bool) -> None:
    assert user.owns(address) is owned


def test_user_repr_hides_hash() -> None:
    assert "argon" not in repr(User("a", "$argon2id$secret"))


# The store.


def test_file_is_private_atomic_and_readable_by_another_store(
    store: UserStore, tmp_path: Path, hasher: CountingHasher
) -> None:
    path = tmp_path / "users.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["version"] == 1
    entry = data["users"]["postfix@dbmx.net"]
    assert entry["hash"].startswith("$argon2id$")
    assert "s3cret" not in path.read_text()
    # Only the file and its lock: no temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".users.json.lock", "users.json"]
    other = UserStore(path, hasher=hasher).load()
    assert [u.name for u in other.users()] == ["postfix@dbmx.net"]


def test_add_passwd_senders_del(store: UserStore, hasher: CountingHasher) -> None:
    with pytest.raises(UserError, match="exists"):
        store.add("POSTFIX@dbmx.net", "x")
    old_hash = store.users()[0].password_hash
    store.set_password("postfix@dbmx.net", "n3w")
    assert store.users()[0].password_hash != old_hash
    assert store.verify("postfix@dbmx.net", "n3w") is not None
    assert store.verify("postfix@dbmx.net", "s3cret") is None

    user = store.set_senders("postfix@dbmx.net", allow=["@other.example"])
    assert user.owns("x@dbmx.net") and user.owns("x@other.example")
    user = store.set_senders("postfix@dbmx.net", only=["ops@dbmx.net"])
    assert user.only and user.allow == ("ops@dbmx.net",)
    assert not user.owns("x@dbmx.net")
    with pytest.raises(UserError, match="no sender"):
        store.set_senders("postfix@dbmx.net", revoke=["ops@dbmx.net"])
    user = store.set_senders("postfix@dbmx.net", reset=True)
    assert not user.only and user.allow == ()

    with pytest.raises(UserError, match="no such user"):
        store.set_password("nobody@dbmx.net", "x")
    with pytest.raises(UserError, match="--only"):
        store.add("x@y.org", "pw", only=True)
    store.remove("postfix@dbmx.net")
    assert len(store) == 0
    with pytest.raises(UserError, match="no such user"):
        store.remove("postfix@dbmx.net")


@pytest.mark.parametrize("password", ["", "a\nb", "a\0b", "x" * 1025])
def test_unusable_passwords_refused(store: UserStore, password: str) -> None:
    with pytest.raises(UserError):
        store.add("new@dbmx.net", password)


def test_refresh_picks_up_changes_and_survives_a_broken_file(
    store: UserStore, tmp_path: Path, hasher: CountingHasher
) -> None:
    server = UserStore(tmp_path / "users.json", hasher=hasher).load()
    assert server.refresh() is False  # unchanged
    store.add("new@dbmx.net", "pw")
    assert server.get("new@dbmx.net") is None  # snapshot until refreshed
    assert server.refresh() is True
    assert server.get("new@dbmx.net") is not None
    (tmp_path / "users.json").write_text("{not json")
    assert server.refresh() is False
    assert server.reload_errors == 1
    assert server.get("new@dbmx.net") is not None  # the previous users are kept
    with pytest.raises(ConfigError, match="not valid JSON"):
        UserStore(tmp_path / "users.json").load()


def test_missing_file_is_an_empty_store(tmp_path: Path) -> None:
    s = UserStore(tmp_path / "nowhere" / "users.json").load()
    assert len(s) == 0
    assert s.refresh() is False


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        '{"users": []}',
        '{"version": 9, "users": {}}',
        '{"users": {"a": {}}}',
        '{"users": {"a b": {"hash": "x"}}}',
        '{"users": {"a": {"hash": "x", "allow": "@x.org"}}}',
        '{"users": {"a": {"hash": "x", "allow": ["nodomain"]}}}',
    ],
)
def test_malformed_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "users.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=str(path)):
        UserStore(path).load()


def test_malformed_hash_refuses(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text('{"users": {"a@x.org": {"hash": "plaintext"}}}')
    assert UserStore(path).load().verify("a@x.org", "plaintext") is None


# The authenticator.


async def test_authenticator(store: UserStore, hasher: CountingHasher) -> None:
    auth = UserAuthenticator(store)
    assert await auth.authenticate("postfix@dbmx.net", "s3cret") == "postfix@dbmx.net"
    assert await auth.authenticate("Postfix@DBMX.NET", "s3cret") == "postfix@dbmx.net"
    assert await auth.authenticate("postfix@dbmx.net", "wrong") is None
    assert await auth.authenticate("postfix@dbmx.net", "s3cret" + "x" * 2000) is None
    # PLAIN authzid: empty or the user itself is fine; anything else is proxy auth.
    assert (
        await auth.authenticate("postfix@dbmx.net", "s3cret", authzid="postfix@dbmx.net")
        == "postfix@dbmx.net"
    )
    assert await auth.authenticate("postfix@dbmx.net", "s3cret", authzid="other@dbmx.net") is None
    assert await auth.authenticate("postfix@dbmx.net", "s3cret", authzid="bad name") is None
    # Never on the event loop's thread.
    assert threading.get_ident() not in hasher.threads


async def test_unknown_user_does_the_same_work(store: UserStore, hasher: CountingHasher) -> None:
    auth = UserAuthenticator(store)
    real = store.users()[0].password_hash
    hasher.verified.clear()
    assert await auth.authenticate("nobody@dbmx.net", "s3cret") is None
    assert await auth.authenticate("not a name", "s3cret") is None
    assert len(hasher.verified) == 2
    dummy = hasher.verified[0]
    assert dummy != real
    # The dummy has the same parameters as a real hash, so it costs the same.
    assert dummy.rsplit("$", 2)[0] == real.rsplit("$", 2)[0]


async def test_authenticator_sees_users_added_later(
    store: UserStore, tmp_path: Path, hasher: CountingHasher
) -> None:
    server = UserStore(tmp_path / "users.json", hasher=hasher).load()
    auth = UserAuthenticator(server)
    assert await auth.authenticate("late@dbmx.net", "pw") is None
    store.add("late@dbmx.net", "pw")
    assert await auth.authenticate("late@dbmx.net", "pw") == "late@dbmx.net"


async def test_verifications_are_bounded(store: UserStore) -> None:
    running = 0
    peak = 0
    lock = threading.Lock()
    original = store.verify

    def verify(name: str, password: str) -> User | None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return original(name, password)
        finally:
            with lock:
                running -= 1

    store.verify = verify  # type: ignore[method-assign]
    auth = UserAuthenticator(store, max_concurrent=2)
    results = await asyncio.wait_for(
        asyncio.gather(*(auth.authenticate("postfix@dbmx.net", "s3cret") for _ in range(8))), 30
    )
    assert results == ["postfix@dbmx.net"] * 8
    assert peak <= 2


# Sender ownership through the policy hook.


def test_policy_sender_hook(store: UserStore) -> None:
    policy = Policy(sender_allowed=store.sender_allowed)
    facts = policy.facts("192.0.2.1", tls=True)
    facts.user = "postfix@dbmx.net"
    assert policy.check_sender(facts, "noreply@dbmx.net", smtputf8=False) == "noreply@dbmx.net"
    assert policy.check_sender(facts, "x@other.example", smtputf8=False) == reply.SENDER_DENIED
    assert policy.check_sender(facts, "", smtputf8=False) == ""  # bounces stay possible
    facts.user = "deleted@dbmx.net"
    assert policy.check_sender(facts, "x@dbmx.net", smtputf8=False) == reply.SENDER_DENIED


# The throttle.


def test_throttle_delays_then_blocks_then_forgets() -> None:
    clock = FakeClock(1000.0)
    t = AuthThrottle(limit=4, window=60, base_delay=0.5, max_delay=1.5, clock=clock)
    assert not t.blocked("192.0.2.1")
    assert [t.failed("192.0.2.1") for _ in range(3)] == [0.5, 1.0, 1.5]
    assert not t.blocked("192.0.2.1")
    assert t.failed("192.0.2.1") is None
    assert t.blocked("192.0.2.1")
    assert not t.blocked("192.0.2.2")  # per client
    clock.now += 30
    assert t.blocked("192.0.2.1")
    clock.now += 31  # every failure has left the window
    assert not t.blocked("192.0.2.1")
    assert t.failures("192.0.2.1") == 0
    assert t.failed("192.0.2.1") == 0.5


def test_throttle_sliding_window() -> None:
    clock = FakeClock(1000.0)
    t = AuthThrottle(limit=2, window=10, base_delay=0, clock=clock)
    t.failed("192.0.2.1")
    clock.now += 8
    assert t.failed("192.0.2.1") is None
    clock.now += 3  # the first left the window, the second not yet
    assert not t.blocked("192.0.2.1")
    assert t.failures("192.0.2.1") == 1


def test_throttle_keys() -> None:
    clock = FakeClock(1000.0)
    t = AuthThrottle(limit=2, window=10, clock=clock)
    assert AuthThrottle.key("2001:db8::1") == AuthThrottle.key("2001:db8::ffff") == "2001:db8::/64"
    assert AuthThrottle.key("::ffff:192.0.2.1") == "192.0.2.1"
    assert AuthThrottle.key("fe80::1%eth0") == "fe80::/64"
    t.failed("2001:db8::1")
    t.failed("2001:db8::2")
    assert t.blocked("2001:db8::3")
    assert not t.blocked("2001:db8:0:1::1")


def test_throttle_is_bounded() -> None:
    clock = FakeClock(1000.0)
    t = AuthThrottle(limit=3, window=100, max_clients=10, clock=clock)
    for i in range(50):
        clock.now += 1
        t.failed(f"192.0.2.{i}")
    assert len(t._failures) <= 10
    assert t.failures("192.0.2.49") == 1  # the newest are kept
    with pytest.raises(ValueError):
        AuthThrottle(limit=0)


# TLS certificates.


def _write_pair(cert: bytes, key: bytes, directory: Path) -> tuple[Path, Path]:
    cert_file, key_file = directory / "fullchain.pem", directory / "privkey.pem"
    # New inodes, like a renewal by rename: mtimes may well stay within one tick.
    for path, data in ((key_file, key), (cert_file, cert)):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return cert_file, key_file


NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def test_self_signed_certificate_loads_and_verifies(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(["mail.dbmx.net", "127.0.0.1"], days=30, now=NOW)
    cert_file, key_file = _write_pair(cert, key, tmp_path)
    TLSContextProvider(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    assert client.verify_mode == ssl.CERT_REQUIRED
    from cryptography import x509

    parsed = x509.load_pem_x509_certificate(cert)
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.dbmx.net"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert parsed.not_valid_after_utc == NOW + datetime.timedelta(days=30)
    with pytest.raises(ConfigError):
        self_signed_certificate([], days=1, now=NOW)
    with pytest.raises(ConfigError):
        self_signed_certificate(["x"], days=0, now=NOW)


def test_provider_detects_renamed_files_and_reports(tmp_path: Path) -> None:
    notes: list[str] = []
    cert_file, key_file = _write_pair(
        *self_signed_certificate(["a.test"], days=1, now=NOW), tmp_path
    )
    provider = TLSContextProvider(cert_file, key_file, notify=notes.append)
    first = provider.context()
    _write_pair(*self_signed_certificate(["b.test"], days=1, now=NOW), tmp_path)
    second = provider.context()
    assert second is not first and provider.reloads == 1
    assert "reloaded" in notes[-1]
    # A certificate without its key: reported once, old context kept, not retried.
    cert_c, _key_c = self_signed_certificate(["c.test"], days=1, now=NOW)
    tmp = cert_file.with_suffix(".tmp")
    tmp.write_bytes(cert_c)
    os.replace(tmp, cert_file)
    assert provider.context() is second
    assert provider.context() is second
    assert provider.reload_errors == 1
    assert len([n for n in notes if "not reloaded" in n]) == 1
    provider.reload()  # SIGHUP: tried again, still broken
    assert provider.reload_errors == 2 and provider.context() is second


def test_provider_check_interval(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    cert_file, key_file = _write_pair(
        *self_signed_certificate(["a.test"], days=1, now=NOW), tmp_path
    )
    provider = TLSContextProvider(
        cert_file, key_file, check_interval=5, clock=clock, notify=lambda _: None
    )
    first = provider.context()
    _write_pair(*self_signed_certificate(["b.test"], days=1, now=NOW), tmp_path)
    clock.now += 1
    assert provider.context() is first
    clock.now += 5
    assert provider.context() is not first


def test_trustme_and_self_signed_agree_on_minimum_version(tmp_path: Path) -> None:
    cert = trustme.CA().issue_cert("x.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    ctx = TLSContextProvider(tmp_path / "c.pem", tmp_path / "k.pem").context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# The commands.


def run_cli(args: list[str], *, stdin: str = "") -> tuple[int, str, str]:
    result = CliRunner().invoke(main, args, input=stdin, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_user_commands(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    code, out, err = run_cli(
        ["user", "add", "postfix@dbmx.net", "--password-stdin", *data], stdin="s3cret\n"
    )
    assert code == 0, err
    assert "postfix@dbmx.net added" in out and "@dbmx.net" in out
    path = tmp_path / "users.json"
    assert UserStore(path).load().verify("postfix@dbmx.net", "s3cret") is not None

    code, out, err = run_cli(
        ["user", "add", "postfix@dbmx.net", "--password-stdin", *data], stdin="x\n"
    )
    assert code == 1 and err == "hato: user postfix@dbmx.net exists (use hato user passwd)\n"

    code, out, err = run_cli(
        ["user", "add", "app", "--password-stdin", "--only", "noreply@dbmx.net", *data],
        stdin="pw\r\n",
    )
    assert code == 0, err
    assert UserStore(path).load().verify("app", "pw") is not None  # CRLF stripped

    code, out, _ = run_cli(["user", "list", *data])
    assert out.splitlines() == [
        "app               sends as noreply@dbmx.net",
        "postfix@dbmx.net  sends as @dbmx.net",
    ]
    code, out, _ = run_cli(["user", "list", "--json", *data])
    assert [row["name"] for row in json.loads(out)] == ["app", "postfix@dbmx.net"]

    code, out, _ = run_cli(["user", "senders", "app", "--allow", "@other.example", *data])
    assert out == "app sends as noreply@dbmx.net, @other.example\n"

    code, out, err = run_cli(
        ["user", "passwd", "postfix@dbmx.net", "--password-stdin", *data], stdin="n3w\n"
    )
    assert code == 0, err
    assert UserStore(path).load().verify("postfix@dbmx.net", "n3w") is not None

    code, out, err = run_cli(["user", "del", "app", *data])
    assert code == 0 and out == "user app deleted\n"
    code, out, err = run_cli(["user", "del", "app", *data])
    assert (code, err) == (1, "hato: no such user: app\n")


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["user", "add", "bad name", "--password-stdin"], "x\n", "invalid user name"),
        (["user", "add", "a@x.org", "--password-stdin"], "\n", "empty password"),
        (["user", "add", "a@x.org", "--password-stdin", "--allow", "x.org"], "pw\n", "grant"),
        (["user", "add", "a@x.org"], "", "use --password-stdin"),  # no terminal
        (["user", "passwd", "nobody", "--password-stdin"], "x\n", "no such user"),
        (["user", "senders", "nobody"], "", "no such user"),
    ],
)
def test_user_command_errors_are_one_line(
    tmp_path: Path, args: list[str], stdin: str, message: str
) -> None:
    code, _out, err = run_cli([*args, "--data-dir", str(tmp_path)], stdin=stdin)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("hato: ") and message in err


def test_users_file_setting(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "u.json"
    code, _, err = run_cli(
        ["user", "add", "a@x.org", "--password-stdin", "--users-file", str(target)], stdin="p\n"
    )
    assert code == 0, err
    assert target.is_file()
    code, _, err = run_cli(["user", "list", "--users-file", str(tmp_path / "bad.json")])
    assert code == 0  # a missing file is an empty store
    (tmp_path / "bad.json").write_text("nope")
    code, _, err = run_cli(["user", "list", "--users-file", str(tmp_path / "bad.json")])
    assert code == 2 and err.count("\n") == 1


def test_password_prompt_asks_twice_on_a_terminal(tmp_path: Path) -> None:
    """The interactive path, on a real pseudo-terminal: hidden input, asked twice."""
    import pty

    leader, follower = pty.openpty()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(SRC),
        "HATO_DATA_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "hato", "user", "add", "tty@dbmx.net"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        cwd=tmp_path,
        start_new_session=True,  # no controlling tty: getpass falls back to stdin's pty
    )
    os.close(follower)
    seen = b""

    def expect(text: bytes) -> None:
        nonlocal seen
        deadline = 30.0
        import select
        import time

        end = time.monotonic() + deadline
        while text not in seen:
            left = end - time.monotonic()
            assert left > 0, f"did not see {text!r} in {seen!r}"
            ready, _, _ = select.select([leader], [], [], left)
            if ready:
                try:
                    chunk = os.read(leader, 1024)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                seen += chunk
        assert text in seen, seen

    try:
        expect(b"Password: ")
        os.write(leader, b"t0p-secret\n")
        expect(b"Password (again): ")
        os.write(leader, b"t0p-secret\n")
        expect(b"added")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    assert b"t0p-secret" not in seen  # never echoed
    assert UserStore(tmp_path / "users.json").load().verify("tty@dbmx.net", "t0p-secret")


def test_tls_self_signed_command(tmp_path: Path) -> None:
    code, out, err = run_cli(
        ["tls", "self-signed", "--hostname", "mail.dbmx.net", "--data-dir", str(tmp_path)]
    )
    assert code == 0, err
    cert_file, key_file = tmp_path / "tls" / "fullchain.pem", tmp_path / "tls" / "privkey.pem"
    assert out.splitlines() == [f"HATO_TLS_CERT_FILE={cert_file}", f"HATO_TLS_KEY_FILE={key_file}"]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    TLSContextProvider(cert_file, key_file)
    code, out, err = run_cli(["tls", "self-signed", "--hostname", "x", "--data-dir", str(tmp_path)])
    assert code == 2 and "use --force" in err and err.count("\n") == 1
    out_dir = tmp_path / "other"
    code, out, err = run_cli(
        ["tls", "self-signed", "--hostname", "x", "--out-dir", str(out_dir), "--days", "2"]
    )
    assert code == 0 and (out_dir / "fullchain.pem").is_file()
