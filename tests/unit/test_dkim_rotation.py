"""DKIM key states and rotation: pending, active, retired; only active keys sign."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from hato.dkim import (
    STATE_FILE,
    DKIMKeys,
    activate_key,
    generate_key,
    load_keys,
    load_signers,
    next_selector,
    read_states,
    rotate_key,
)
from hato.errors import ConfigError

NOW = 1_700_000_000.0  # 2023-11-14
MSG = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello\r\n"


def states(directory: Path) -> dict[str, str]:
    return {k.selector: st.state.value for k, st in load_keys(directory)}


def test_keys_from_before_rotation_are_active(tmp_path: Path) -> None:
    generate_key("example.org", "old", "rsa", directory=tmp_path, bits=1024)
    assert states(tmp_path) == {"old": "active"}
    assert [k.selector for k in load_signers(tmp_path).keys] == ["old"]
    assert not (tmp_path / "example.org" / STATE_FILE).exists()


@pytest.mark.parametrize(
    ("taken", "algorithm", "selector"),
    [
        (set(), "rsa", "rsa20231114"),
        (set(), "ed25519", "ed20231114"),
        ({"rsa20231114"}, "rsa", "rsa20231114-2"),
        ({"rsa20231114", "rsa20231114-2"}, "rsa", "rsa20231114-3"),
    ],
)
def test_next_selector_is_date_based(taken: set[str], algorithm: str, selector: str) -> None:
    assert next_selector(taken, algorithm, datetime.date(2023, 11, 14)) == selector


def test_rotation_pending_then_active_then_retired(tmp_path: Path) -> None:
    generate_key("example.org", "old", "rsa", directory=tmp_path, bits=1024)
    [record] = rotate_key(tmp_path, "example.org", now=NOW, bits=1024)
    assert record.selector == "rsa20231114"
    assert record.name == "rsa20231114._domainkey.example.org"
    assert states(tmp_path) == {"old": "active", "rsa20231114": "pending"}
    # The pending key is published but does not sign yet.
    signed = load_signers(tmp_path).sign(MSG)
    assert b"s=old;" in signed and b"s=rsa20231114" not in signed
    with pytest.raises(ConfigError, match=r"rotation of example\.org's rsa key is under way"):
        rotate_key(tmp_path, "example.org", now=NOW)

    changes = activate_key(tmp_path, "example.org", "rsa20231114", now=NOW + 3600)
    assert changes[0] == "example.org selector rsa20231114: pending -> active (signs from now on)"
    assert "old: active -> retired" in changes[1]
    assert "until at least 2023-11-21" in changes[1]
    assert states(tmp_path) == {"old": "retired", "rsa20231114": "active"}
    signed = load_signers(tmp_path).sign(MSG)
    assert b"s=rsa20231114;" in signed and b"s=old;" not in signed
    status = read_states(tmp_path, "example.org")["old"]
    assert status.remove_after() == NOW + 3600 + 7 * 86400
    # Activating again changes nothing.
    assert activate_key(tmp_path, "example.org", "rsa20231114", now=NOW + 7200) == []


def test_rotation_renews_each_algorithm_in_use_and_only_its_own(tmp_path: Path) -> None:
    generate_key("example.org", "r1", "rsa", directory=tmp_path, bits=1024)
    generate_key("example.org", "e1", "ed25519", directory=tmp_path)
    records = rotate_key(tmp_path, "example.org", now=NOW, bits=1024)
    assert sorted(r.selector for r in records) == ["ed20231114", "rsa20231114"]
    activate_key(tmp_path, "example.org", "ed20231114", now=NOW)
    assert states(tmp_path) == {
        "r1": "active",
        "e1": "retired",
        "rsa20231114": "pending",
        "ed20231114": "active",
    }
    with pytest.raises(ConfigError, match="--selector names one key"):
        rotate_key(tmp_path, "example.org", now=NOW, selector="x", algorithm=None)


def test_first_rotation_of_a_domain_without_keys_makes_an_rsa_key(tmp_path: Path) -> None:
    [record] = rotate_key(tmp_path, "new.example", now=NOW, selector="s1", bits=1024)
    assert record.algorithm == "rsa" and record.selector == "s1"
    assert states(tmp_path) == {"s1": "pending"}
    assert not load_signers(tmp_path)


def test_signer_follows_state_changes(tmp_path: Path) -> None:
    generate_key("example.org", "old", "rsa", directory=tmp_path, bits=1024)
    keys = DKIMKeys(tmp_path)
    assert not keys.refresh()
    rotate_key(tmp_path, "example.org", now=NOW, bits=1024)
    assert keys.refresh()
    assert keys.pending_domains() == ["example.org"]
    assert [k.selector for k in keys.signer.keys] == ["old"]
    activate_key(tmp_path, "example.org", "rsa20231114", now=NOW)
    assert keys.refresh()
    assert [k.selector for k in keys.signer.keys] == ["rsa20231114"]
    assert keys.pending_domains() == []


def test_malformed_state_file_is_a_config_error(tmp_path: Path) -> None:
    generate_key("example.org", "old", "rsa", directory=tmp_path, bits=1024)
    (tmp_path / "example.org" / STATE_FILE).write_text(json.dumps({"old": {"state": "gone"}}))
    with pytest.raises(ConfigError, match="malformed"):
        load_signers(tmp_path)
