"""VERP return paths: signed tokens that name a queue id, and forgeries that name none."""

from __future__ import annotations

from pathlib import Path

import pytest

from hato.verp import Verp, load_secret, split_token

SECRET = b"0123456789abcdef0123456789abcdef"
QID = "0193A1B2C3D4E5F6A7B"


@pytest.fixture
def verp() -> Verp:
    return Verp(SECRET, ["example.com", "Bücher.example"])


def test_round_trip(verp: Verp) -> None:
    path = verp.return_path("app@example.com", QID)
    local, _, domain = path.rpartition("@")
    assert domain == "example.com"
    assert local.startswith("app+0193a1b2c3d4e5f6a7b.")
    assert verp.queue_id(path) == QID.lower()
    # MTAs that fold the case of a local part do not break it.
    assert verp.queue_id(path.upper().replace("EXAMPLE.COM", "example.com")) == QID.lower()


@pytest.mark.parametrize(
    ("sender", "why"),
    [
        ("", "the null sender"),
        ("app@elsewhere.example", "a foreign domain"),
        ("a" * 40 + "@example.com", "no room for the token in 64 octets"),
    ],
)
def test_left_alone(verp: Verp, sender: str, why: str) -> None:
    assert verp.return_path(sender, QID) == sender, why


def test_idn_domain_and_plus_in_local_part(verp: Verp) -> None:
    path = verp.return_path("news+de@xn--bcher-kva.example", QID)
    assert path.startswith("news+de+0193a1b2c3d4e5f6a7b.")
    assert split_token(path) is not None
    assert split_token(path)[0] == "news+de@xn--bcher-kva.example"  # type: ignore[index]
    assert verp.queue_id(path) == QID.lower()


def test_forged_and_foreign_tokens_match_nothing(verp: Verp) -> None:
    path = verp.return_path("app@example.com", QID)
    local, _, domain = path.rpartition("@")
    mac = local.rpartition(".")[2]
    flipped = ("1" if mac[0] != "1" else "2") + mac[1:]
    assert verp.queue_id(local.rpartition(".")[0] + "." + flipped + "@" + domain) is None
    # The same token for another queue id, another sender or another node's secret.
    assert verp.queue_id(path.replace("0193a1b2c3d4e5f6a7b", "0193a1b2c3d4e5f6a7c")) is None
    assert verp.queue_id(path.replace("app+", "ceo+")) is None
    assert Verp(b"another secret, 16+ bytes", ["example.com"]).queue_id(path) is None
    # Unsigned or not VERP at all.
    assert verp.queue_id("app+0193a1b2c3d4e5f6a7b@example.com") is None
    assert verp.queue_id("app@example.com") is None
    assert verp.queue_id("app+tag@example.com") is None
    # A valid token at a domain we do not serve.
    assert verp.queue_id(path.replace("@example.com", "@example.net")) is None


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError):
        Verp(b"short", ["example.com"])


def test_secret_made_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "data" / "verp.key"
    first = load_secret(path)
    assert len(first) == 64
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_secret(path) == first
