"""Table tests for the intake policy: relay rule, sender domains, AUTH and MAIL gates."""

from __future__ import annotations

import pytest

from hato import reply
from hato.errors import ConfigError
from hato.reply import Reply
from hato.smtp.policy import (
    ListenerConfig,
    ListenerRole,
    Policy,
    SessionFacts,
    literal_address,
    parse_networks,
    split_source_route,
)

OURS = Policy(domains=["Example.ORG.", "example.net"], mynetworks=parse_networks(["10.0.0.0/8"]))
UNTRUSTED = OURS.facts("192.0.2.1")
TRUSTED = OURS.facts("10.1.2.3")
AUTHED = SessionFacts(client_ip="192.0.2.1", tls=True, user="alice")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("user@example.org", "user@example.org"),
        ("User@EXAMPLE.org", "User@example.org"),
        ("user@example.net", "user@example.net"),
        ("postmaster", "postmaster@example.org"),
        ("POSTMASTER", "postmaster@example.org"),
        ('"quoted user"@example.org', '"quoted user"@example.org'),
        ("victim@evil.example", reply.RELAY_DENIED),
        ("victim%evil.example@example.org", reply.RELAY_DENIED),
        ("evil.example!victim@example.org", reply.RELAY_DENIED),
        ('"victim@evil.example"@example.org', reply.RELAY_DENIED),
        ('"victim%evil.example"@example.org', reply.RELAY_DENIED),
        ('"evil!victim"@example.org', reply.RELAY_DENIED),
        ("@example.org:victim@evil.example", reply.RELAY_DENIED),
        ("@a,@b:user@example.org", reply.RELAY_DENIED),
        ("victim@[192.0.2.7]", reply.RELAY_DENIED),
        ("victim@[IPv6:2001:db8::1]", reply.RELAY_DENIED),
        ("victim@evil.example.", reply.BAD_ADDRESS),
        ("user@example.org.", reply.BAD_ADDRESS),
        ("victim@evil.example@example.org", reply.BAD_ADDRESS),
        ("victim", reply.NEED_FQDN),
        ("", reply.BAD_ADDRESS),
        ("user@sub.example.org", reply.RELAY_DENIED),
        ("user@example.org.evil.example", reply.RELAY_DENIED),
        ("user@xn--exmple-cua.org", reply.RELAY_DENIED),
        ("a" * 65 + "@example.org", reply.BAD_ADDRESS),
    ],
)
def test_relay_rule_for_untrusted_sessions(path: str, expected: Reply | str) -> None:
    assert OURS.check_recipient(UNTRUSTED, path, smtputf8=False) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("victim@evil.example", "victim@evil.example"),
        ("a%b@evil.example", "a%b@evil.example"),
        ("@relay.example:z@evil.example", "z@evil.example"),
        ("victim@[192.0.2.7]", "victim@[192.0.2.7]"),
        ("nobody", reply.NEED_FQDN),
        ("bad@@x", reply.BAD_ADDRESS),
    ],
)
@pytest.mark.parametrize("facts", [TRUSTED, AUTHED], ids=["trusted", "authenticated"])
def test_trusted_or_authenticated_may_relay(
    facts: SessionFacts, path: str, expected: Reply | str
) -> None:
    assert OURS.check_recipient(facts, path, smtputf8=False) == expected


def test_without_own_domains_nothing_is_accepted_from_untrusted() -> None:
    policy = Policy()
    facts = policy.facts("192.0.2.1")
    assert policy.check_recipient(facts, "postmaster", smtputf8=False) == reply.NEED_FQDN
    assert policy.check_recipient(facts, "a@example.org", smtputf8=False) == reply.RELAY_DENIED


def test_utf8_recipients_need_smtputf8() -> None:
    policy = Policy(domains=["例え.jp"])
    facts = policy.facts("192.0.2.1")
    assert policy.check_recipient(facts, "田中@例え.jp", smtputf8=False) == reply.BAD_ADDRESS
    assert policy.check_recipient(facts, "田中@例え.jp", smtputf8=True) == "田中@例え.jp"


@pytest.mark.parametrize(
    ("allowed", "path", "expected"),
    [
        ((), "a@anything.example", "a@anything.example"),
        ((), "", ""),
        (("example.com",), "a@example.com", "a@example.com"),
        (("example.com",), "a@EXAMPLE.com", "a@example.com"),
        (("Example.com.",), "a@example.com", "a@example.com"),
        (("example.com",), "a@sub.example.com", reply.SENDER_DOMAIN_DENIED),
        (("example.com",), "a@example.net", reply.SENDER_DOMAIN_DENIED),
        (("example.com",), "", ""),
        (("example.com",), "@route:a@example.com", "a@example.com"),
        (("example.com",), "unqualified", reply.BAD_SENDER_ADDRESS),
        (("example.com",), "a@example.com.", reply.BAD_SENDER_ADDRESS),
    ],
)
def test_allowed_sender_domains(allowed: tuple[str, ...], path: str, expected: Reply | str) -> None:
    policy = Policy(allowed_sender_domains=allowed)
    assert policy.check_sender(policy.facts("127.0.0.1"), path, smtputf8=False) == expected


def test_sender_allowed_hook_applies_to_authenticated_users_only() -> None:
    calls: list[tuple[str, str]] = []

    def owns(user: str, address: str) -> bool:
        calls.append((user, address))
        return address == f"{user}@example.com"

    policy = Policy(sender_allowed=owns)
    assert policy.check_sender(AUTHED, "alice@example.com", smtputf8=False) == "alice@example.com"
    assert policy.check_sender(AUTHED, "bob@example.com", smtputf8=False) == reply.SENDER_DENIED
    assert policy.check_sender(UNTRUSTED, "bob@example.com", smtputf8=False) == "bob@example.com"
    assert calls == [("alice", "alice@example.com"), ("alice", "bob@example.com")]


@pytest.mark.parametrize(
    ("role", "plaintext", "ip", "tls", "permitted"),
    [
        (ListenerRole.SMTP, False, "127.0.0.1", False, False),
        (ListenerRole.SMTP, True, "127.0.0.1", False, True),
        (ListenerRole.SMTP, True, "::1", False, True),
        (ListenerRole.SMTP, True, "::ffff:127.0.0.1", False, True),
        (ListenerRole.SMTP, True, "192.0.2.1", False, False),
        (ListenerRole.SMTP, False, "192.0.2.1", True, True),
        (ListenerRole.SUBMISSION, True, "127.0.0.1", False, False),
        (ListenerRole.SUBMISSION, False, "192.0.2.1", True, True),
        (ListenerRole.SUBMISSIONS, True, "127.0.0.1", False, False),
        (ListenerRole.SUBMISSIONS, False, "192.0.2.1", True, True),
    ],
)
def test_auth_permitted(
    role: ListenerRole, plaintext: bool, ip: str, tls: bool, permitted: bool
) -> None:
    policy = Policy(role=role, allow_plaintext_auth=plaintext)
    assert policy.auth_permitted(policy.facts(ip, tls=tls)) is permitted


@pytest.mark.parametrize(
    ("role", "tls", "user", "expected"),
    [
        (ListenerRole.SMTP, False, "", None),
        (ListenerRole.SUBMISSION, False, "", reply.TLS_REQUIRED),
        (ListenerRole.SUBMISSION, True, "", reply.AUTH_REQUIRED),
        (ListenerRole.SUBMISSION, True, "alice", None),
        (ListenerRole.SUBMISSIONS, True, "", reply.AUTH_REQUIRED),
        (ListenerRole.SUBMISSIONS, True, "alice", None),
    ],
)
def test_mail_permitted(role: ListenerRole, tls: bool, user: str, expected: Reply | None) -> None:
    policy = Policy(role=role, mynetworks=parse_networks(["0.0.0.0/0"]))
    facts = policy.facts("192.0.2.1", tls=tls)
    facts.user = user
    assert policy.mail_permitted(facts) == expected


def test_trusted_networks_parse_postfix_forms() -> None:
    nets = parse_networks(["127.0.0.0/8", " [::1]/128 ", "10.1.2.3", "", "[2001:db8::]/32"])
    assert [str(n) for n in nets] == ["127.0.0.0/8", "::1/128", "10.1.2.3/32", "2001:db8::/32"]
    policy = Policy(mynetworks=nets)
    assert policy.is_trusted("127.8.9.1")
    assert policy.is_trusted("::1")
    assert policy.is_trusted("::ffff:127.0.0.1")
    assert policy.is_trusted("2001:db8::42")
    assert not policy.is_trusted("10.1.2.4")
    assert not policy.is_trusted("not an ip")
    with pytest.raises(ConfigError, match="mynetworks"):
        parse_networks(["10.0.0.0/33"])


def test_split_source_route() -> None:
    assert split_source_route("@a,@b:x@y") == ("@a,@b", "x@y")
    assert split_source_route("x@y") == ("", "x@y")
    assert split_source_route("@nocolon") == ("", "@nocolon")


def test_listener_config() -> None:
    assert ListenerConfig("0.0.0.0", 465, ListenerRole.SUBMISSIONS).implicit_tls
    assert not ListenerConfig().implicit_tls
    assert ListenerConfig().port == 2525


# Address literals at RCPT: refused when delivery would refuse them.

MX = Policy(domains=["example.org"], mynetworks=parse_networks(["10.0.0.0/8"]), route="mx")


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("[ipv6:::1]", "::1"),
        ("[IPv6:::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("[300.1.1.1]", None),
        ("[1.2.3]", None),
        ("[010.0.0.1]", None),  # octal or decimal? neither
        ("[::1]", None),  # IPv6 needs its tag
        ("[IPv6:192.0.2.1]", None),
        ("[IPv6:fe80::1%eth0]", None),
        ("[IPv6:not-an-address]", None),
        ("[x-tag:whatever]", None),
        ("[]", None),
        ("[IPv6:]", None),
        ("example.org", None),
    ],
)
def test_literal_address(domain: str, expected: str | None) -> None:
    ip = literal_address(domain)
    assert (str(ip) if ip is not None else None) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("x@[127.0.0.1]", reply.PRIVATE_ADDRESS_LITERAL),
        ("x@[IPv6:::1]", reply.PRIVATE_ADDRESS_LITERAL),
        ("x@[10.0.0.5]", reply.PRIVATE_ADDRESS_LITERAL),
        ("x@[169.254.1.1]", reply.PRIVATE_ADDRESS_LITERAL),
        ("x@[0.0.0.0]", reply.PRIVATE_ADDRESS_LITERAL),
        ("x@[IPv6:::ffff:10.0.0.5]", reply.PRIVATE_ADDRESS_LITERAL),
        ("x@[198.51.100.7]", reply.PRIVATE_ADDRESS_LITERAL),  # documentation space
        ("x@[1.1.1.1]", "x@[1.1.1.1]"),
        ("x@[IPv6:2606:4700::1111]", "x@[ipv6:2606:4700::1111]"),
        ("x@[300.1.1.1]", reply.BAD_ADDRESS_LITERAL),
        ("x@[::1]", reply.BAD_ADDRESS_LITERAL),
        ("x@127.0.0.1", reply.BAD_ADDRESS_LITERAL),
        ("x@10.0.0.5", reply.BAD_ADDRESS_LITERAL),
        ("x@0x7f.1", reply.BAD_ADDRESS_LITERAL),
        ("x@1.2.3.4.5", reply.BAD_ADDRESS_LITERAL),
        ("x@example.com", "x@example.com"),
        ("x@123abc.example", "x@123abc.example"),
    ],
)
@pytest.mark.parametrize("facts", [MX.facts("10.1.2.3"), AUTHED], ids=["trusted", "authenticated"])
def test_literals_on_the_mx_route(facts: SessionFacts, path: str, expected: Reply | str) -> None:
    assert MX.check_recipient(facts, path, smtputf8=False) == expected


@pytest.mark.parametrize(
    ("policy", "path", "expected"),
    [
        # HATO_ALLOW_PRIVATE_MX: the MX courier would deliver there, so RCPT takes it.
        (Policy(route="mx", allow_private_mx=True), "x@[127.0.0.1]", "x@[127.0.0.1]"),
        # Through a relay host, or held: the literal is the next hop's business.
        (Policy(route="relay"), "x@[127.0.0.1]", "x@[127.0.0.1]"),
        (Policy(route="hold"), "x@[IPv6:::1]", "x@[ipv6:::1]"),
        # Invalid literals are refused on every route.
        (Policy(route="relay"), "x@[300.1.1.1]", reply.BAD_ADDRESS_LITERAL),
        (Policy(route="hold"), "x@127.0.0.1", reply.BAD_ADDRESS_LITERAL),
        (Policy(route="mx", allow_private_mx=True), "x@[::1]", reply.BAD_ADDRESS_LITERAL),
    ],
)
def test_literals_by_route(policy: Policy, path: str, expected: Reply | str) -> None:
    assert policy.check_recipient(AUTHED, path, smtputf8=False) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # Untrusted sessions keep their relay refusal for any valid literal...
        ("victim@[198.51.100.7]", reply.RELAY_DENIED),
        ("victim@[127.0.0.1]", reply.RELAY_DENIED),
        # ...and get the syntax error for an invalid one, like everyone.
        ("victim@[300.1.1.1]", reply.BAD_ADDRESS_LITERAL),
        ("victim@127.0.0.1", reply.BAD_ADDRESS_LITERAL),
    ],
)
def test_literals_from_untrusted_sessions(path: str, expected: Reply | str) -> None:
    assert MX.check_recipient(MX.facts("192.0.2.1"), path, smtputf8=False) == expected
