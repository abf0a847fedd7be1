"""The aliases file and local recipient resolution, as tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from hato.aliases import (
    ALIAS_LOOP,
    UNKNOWN_USER,
    Aliases,
    Expansion,
    LocalRecipients,
    Mailbox,
    load_aliases,
    parse_aliases,
)
from hato.errors import ConfigError

ALIASES = """\
# /etc/aliases as Debian ships it, and more
postmaster:    root
root: alice

sales: bob+sales,
       carol@example.org   # a continuation line
\tdave@elsewhere.test
team: sales, eve
info@example.org: alice
info: frank
self: self, ext@elsewhere.test
loop1: loop2
loop2: loop1
cycle: cycle2, keep
cycle2: cycle
Mixed.Case: Alice
"""

USERS = {("alice", "example.org"), ("bob", "example.org"), ("alice", "example.net")}


def user_exists(local: str, domain: str) -> bool:
    return (local, domain) in USERS


@pytest.fixture
def local() -> LocalRecipients:
    return LocalRecipients(
        ["Example.ORG", "example.net", "bücher.example"],
        parse_aliases(ALIASES),
        "+",
        user_exists=user_exists,
    )


def mb(user: str, domain: str = "example.org") -> Mailbox:
    return Mailbox(domain, user)


# --- parsing ----------------------------------------------------------------------------


def test_parse_the_familiar_form() -> None:
    aliases = parse_aliases(ALIASES)
    assert aliases.entries["postmaster"] == ("root",)
    assert aliases.entries["sales"] == ("bob+sales", "carol@example.org", "dave@elsewhere.test")
    assert aliases.entries["info@example.org"] == ("alice",)
    assert aliases.entries["mixed.case"] == ("alice",)
    assert len(aliases) == 12


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("  leading: continuation\n", ":1: continuation line without an entry"),
        ("noseparator target\n", ":1: expected 'name: target, target'"),
        ("a: b\na: c\n", ":2: alias 'a' is defined twice"),
        ("a:\n", ":1: alias 'a' has no target"),
        ("a: |/usr/bin/procmail\n", "no pipes, files or :include:"),
        ('a: "|/usr/bin/procmail"\n', "no pipes, files or :include:"),
        ("a: /var/mail/a\n", "no pipes, files or :include:"),
        ("a: :include:/etc/list\n", "no pipes, files or :include:"),
        ("a: bad@@address\n", "target 'bad@@address'"),
        ("a: x@[127.0.0.1]\n", "address literals"),
        ("a: ../etc\n", "not a valid local name"),
        ("a/b: c\n", "not a valid alias name"),
        ("\n\n# c\nx: y\n.hidden: y\n", ":5:"),
    ],
)
def test_parse_errors_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_aliases(text, "aliases")
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_load_aliases(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text("postmaster: root\n")
    assert load_aliases(path).entries == {"postmaster": ("root",)}
    assert load_aliases(None) == Aliases()
    with pytest.raises(ConfigError, match="does not exist"):
        load_aliases(tmp_path / "missing")
    path.write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_aliases(path)


# --- resolution -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # Users, in any case, with or without an extension.
        ("alice@example.org", Expansion((mb("alice"),))),
        ("ALICE@EXAMPLE.ORG", Expansion((mb("alice"),))),
        ("alice+news@example.org", Expansion((mb("alice"),))),
        ("alice@example.net", Expansion((mb("alice", "example.net"),))),
        ("bob@example.org", Expansion((mb("bob"),))),
        # Aliases: nested, through extensions, to other local domains and outside.
        ("root@example.org", Expansion((mb("alice"),))),
        ("postmaster@example.org", Expansion((mb("alice"),))),
        (
            "sales@example.org",
            Expansion((mb("bob"), mb("carol")), ("dave@elsewhere.test",)),
        ),
        (
            "team@example.org",
            Expansion((mb("bob"), mb("carol"), mb("eve")), ("dave@elsewhere.test",)),
        ),
        ("sales+q1@example.org", Expansion((mb("bob"), mb("carol")), ("dave@elsewhere.test",))),
        ("mixed.case@example.org", Expansion((mb("alice"),))),
        # A domain-specific alias wins over the bare one.
        ("info@example.org", Expansion((mb("alice"),))),
        ("info@example.net", Expansion((mb("frank", "example.net"),))),
        # Self reference delivers to its own Maildir; a cycle is cut where it repeats.
        ("self@example.org", Expansion((mb("self"),), ("ext@elsewhere.test",))),
        ("cycle@example.org", Expansion((mb("keep"),))),
        ("loop1@example.org", Expansion(error=ALIAS_LOOP)),
        # abuse and postmaster always exist.
        ("abuse@example.org", Expansion((mb("alice"),))),
        ("postmaster@example.net", Expansion((mb("alice", "example.net"),))),
        ("abuse@xn--bcher-kva.example", Expansion((mb("alice", "xn--bcher-kva.example"),))),
        # Unknown users, foreign domains, unsafe names.
        ("nobody@example.org", Expansion(error=UNKNOWN_USER)),
        ("alice@sub.example.org", Expansion(error=UNKNOWN_USER)),
        ("alice@elsewhere.test", Expansion(error=UNKNOWN_USER)),
        ("../alice@example.org", Expansion(error=UNKNOWN_USER)),
        ("+alice@example.org", Expansion(error=UNKNOWN_USER)),
        ("not-an-address", Expansion(error=UNKNOWN_USER)),
    ],
)
def test_expand(local: LocalRecipients, address: str, expected: Expansion) -> None:
    assert local.expand(address) == expected
    assert local.exists(address) is (expected.error != UNKNOWN_USER)


def test_postmaster_and_abuse_without_any_alias() -> None:
    bare = LocalRecipients(["example.org"])
    assert bare.expand("postmaster@example.org") == Expansion((mb("postmaster"),))
    assert bare.expand("abuse@example.org") == Expansion((mb("postmaster"),))
    assert bare.expand("Postmaster+x@Example.org") == Expansion((mb("postmaster"),))
    assert not bare.exists("root@example.org")


def test_configured_postmaster_target() -> None:
    to_user = LocalRecipients(["example.org"], postmaster="admin")
    assert to_user.expand("abuse@example.org") == Expansion((mb("admin"),))
    outside = LocalRecipients(["example.org"], postmaster="ops@elsewhere.test")
    assert outside.expand("postmaster@example.org") == Expansion((), ("ops@elsewhere.test",))
    with pytest.raises(ConfigError):
        LocalRecipients(["example.org"], postmaster="|/bin/sh")


def test_aliases_file_overrides_postmaster_target() -> None:
    local = LocalRecipients(["example.org"], parse_aliases("abuse: security\n"), postmaster="admin")
    assert local.expand("abuse@example.org") == Expansion((mb("security"),))
    assert local.expand("postmaster@example.org") == Expansion((mb("admin"),))


def test_recipient_delimiter_can_be_turned_off() -> None:
    local = LocalRecipients(["example.org"], user_exists=user_exists, recipient_delimiter="")
    assert local.expand("alice+tag@example.org").error == UNKNOWN_USER
    dash = LocalRecipients(["example.org"], user_exists=user_exists, recipient_delimiter="-")
    assert dash.expand("alice-tag@example.org") == Expansion((mb("alice"),))


def test_a_user_named_with_the_delimiter_wins_over_the_split() -> None:
    local = LocalRecipients(["example.org"], user_exists=lambda name, _d: name in ("bob+x", "bob"))
    assert local.expand("bob+x@example.org") == Expansion((mb("bob+x"),))


def test_deep_nesting_is_a_loop() -> None:
    chain = "".join(f"a{i}: a{i + 1}\n" for i in range(30))
    local = LocalRecipients(["example.org"], parse_aliases(chain))
    assert local.expand("a0@example.org").error == ALIAS_LOOP
    assert local.expand("a25@example.org") == Expansion((mb("a30"),))


def test_wide_aliases_stay_bounded() -> None:
    # Each level names the next twice: without de-duplication this would explode.
    text = "".join(f"w{i}: w{i + 1}, w{i + 1}+x, w{i + 1}@example.org\n" for i in range(9))
    local = LocalRecipients(["example.org"], parse_aliases(text))
    assert local.expand("w0@example.org") == Expansion((mb("w9"),))


def test_user_store_errors_propagate_from_exists() -> None:
    def broken(_local: str, _domain: str) -> bool:
        raise OSError("store unreadable")

    local = LocalRecipients(["example.org"], user_exists=broken)
    with pytest.raises(OSError):
        local.exists("alice@example.org")
