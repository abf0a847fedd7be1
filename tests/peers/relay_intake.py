"""The relay server's intake in-process, built the way ``hato serve`` builds it.

One user store, one authenticator and one AUTH throttle shared by an ``smtp``, a
``submission`` and a ``submissions`` listener on 127.0.0.1, with a certificate from
``self_signed_certificate``. 127.0.0.1 is *not* a trusted network (mynetworks is
192.0.2.0/24), so a local client plays a client on the internet. ``relay`` is a fixture:
import it into the test module that uses it.
"""

from __future__ import annotations

import datetime
import io
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from hato.maillog import MailLog
from hato.queue.memory import MemoryQueue
from hato.smtp.auth import AuthThrottle
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.server import SMTPListener, start_listener
from hato.smtp.tls import TLSContextProvider, self_signed_certificate
from hato.users import UserAuthenticator, UserStore

USER, PASSWORD = "postfix@dbmx.net", "guide-Secret-42"
UNTRUSTED = ("192.0.2.0/24",)


class RelayServer:
    """What app.py wires for the relay server role, in-process."""

    def __init__(
        self,
        directory: Path,
        *,
        sender_login_check: bool = True,
        throttle: AuthThrottle | None = None,
        mynetworks: Sequence[str] = UNTRUSTED,
    ) -> None:
        self.directory = directory
        self.logbuf = io.StringIO()
        self.log = MailLog(self.logbuf)
        self.queue = MemoryQueue()
        # Cheap argon2id parameters: this file authenticates many times.
        self.store = UserStore(
            directory / "users.json",
            hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1),
        )
        self.store.add(USER, PASSWORD)
        self.store.add("other@example.org", "other-pw")
        self.authenticator = UserAuthenticator(self.store)
        self.throttle = throttle or AuthThrottle(
            limit=4, window=60, base_delay=0.01, max_delay=0.05
        )
        self.mynetworks = tuple(mynetworks)
        cert, key = self_signed_certificate(
            ["localhost", "127.0.0.1"], days=1, now=datetime.datetime.now(datetime.UTC)
        )
        self.cert_file = directory / "fullchain.pem"
        self.cert_file.write_bytes(cert)
        (directory / "privkey.pem").write_bytes(key)
        self.tls = TLSContextProvider(self.cert_file, directory / "privkey.pem")
        self.sender_login_check = sender_login_check
        self.listeners: dict[ListenerRole, SMTPListener] = {}

    async def start(self) -> RelayServer:
        await self.queue.open()
        for role in ListenerRole:
            self.listeners[role] = await start_listener(
                ListenerConfig("127.0.0.1", 0, role),
                queue=self.queue,
                policy=Policy(
                    role=role,
                    mynetworks=parse_networks(self.mynetworks),
                    domains=["dbmx.net"],
                    sender_allowed=self.store.sender_allowed if self.sender_login_check else None,
                ),
                authenticator=self.authenticator,
                tls=self.tls,
                log=self.log,
                hostname="mail.dbmx.net",
                auth_throttle=self.throttle,
            )
        return self

    def port(self, role: ListenerRole) -> int:
        return self.listeners[role].port

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert_file))

    async def aclose(self) -> None:
        for listener in self.listeners.values():
            await listener.aclose(timeout=2)


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayServer]:
    server = await RelayServer(tmp_path).start()
    yield server
    await server.aclose()
