"""The guide's own front end in front of Hato: Postfix as the local relay.

    smtplib ──> Postfix (relayhost = [127.0.0.1]:587-of-Hato, smtp_sasl_password_maps,
        smtp_tls_security_level = encrypt) ──> Hato relay server ──> Postfix MX ──> Maildir

So an operator can swap the guide's relay server for Hato and keep the docker container.
"""

from __future__ import annotations

import email.utils
import smtplib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from peers.dns import TestDNS
from peers.postfix import PostfixInstance
from peers.postfix_mx import PostfixMX, sasl_relay
from peers.verify import verify_dkimpy

if TYPE_CHECKING:  # both conftest modules are named conftest: import types only
    from conftest import RelayServer

SENDER = "noreply@dbmx.net"
RECIPIENT = "someone@example.net"


@pytest.fixture
def postfix_local_relay(
    request: pytest.FixtureRequest, relay_server: RelayServer
) -> Iterator[PostfixInstance]:
    from conftest import attach_log  # either conftest's: the e2e one hands on to the root's

    instance = sasl_relay(relay_server.submission, relay_server.user, relay_server.password)
    attach_log(request, "postfix (local relay)", instance.log)
    try:
        instance.start()
        yield instance
    finally:
        instance.cleanup()


def test_postfix_local_relay_to_hato_relay_server(
    postfix_local_relay: PostfixInstance,
    relay_server: RelayServer,
    postfix_mx: PostfixMX,
    dns_server: TestDNS,
) -> None:
    message = (
        f"From: {SENDER}\r\n"
        f"To: {RECIPIENT}\r\n"
        "Subject: via the guide's Postfix container\r\n"
        f"Date: {email.utils.formatdate()}\r\n"
        "Message-ID: <postfix-front-1@dbmx.net>\r\n"
        "\r\n"
        "test1\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", postfix_local_relay.port("smtp"), timeout=30) as client:
        client.ehlo("web.app.internal")
        assert client.sendmail(SENDER, [RECIPIENT], message) == {}

    [delivered] = postfix_mx.wait_for(RECIPIENT, timeout=60)
    assert delivered.message["Message-ID"] == "<postfix-front-1@dbmx.net>"
    received = delivered.headers("Received")
    # Postfix MX <- Hato relay server (authenticated) <- Postfix local relay <- the client.
    assert "by mx.example.net (Postfix)" in received[0], received
    assert "by relay.dbmx.net (Hato) with ESMTPSA" in received[1], received
    assert "(Postfix)" in received[2], received

    # Postfix logged in over TLS with the guide's credentials and saw Hato accept.
    log = postfix_local_relay.log()
    assert (
        "status=sent" in log
        and f"relay=127.0.0.1[127.0.0.1]:{relay_server.port('submission')}" in log
    ), log
    assert "TLS connection established to 127.0.0.1" in log, log
    assert f"sasl_username={relay_server.user}" in relay_server.serve.log

    # The relay server signed it on the way: both signatures verify at the MX.
    results = verify_dkimpy(delivered.crlf, ("127.0.0.1", dns_server.port))
    assert sorted(r.algorithm for r in results) == ["ed25519-sha256", "rsa-sha256"], results
    assert all(r.passed for r in results), results
