"""DKIM: keys on disk, TXT records, signing verified by dkimpy and by Mail::DKIM (Perl)."""

from __future__ import annotations

import email
import email.policy
import os
import re
import stat
from pathlib import Path

import pytest

from hato.dkim import (
    DKIMRecord,
    DKIMSigner,
    SigningError,
    dkim_txt_records,
    from_domains,
    generate_key,
    load_signers,
    split_txt,
)
from hato.errors import ConfigError
from peers.verify import dkimpy_verdicts, mail_dkim_lines

MESSAGE = (
    b"Received: from app (app [10.0.0.2]) by relay; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: =?utf-8?b?5bCP6bOl?= <noreply@Example.ORG>\r\n"
    b"To: Someone <someone@example.net>\r\n"
    b"Cc: other@example.net\r\n"
    b"Subject: Welcome,\r\n"
    b"  folded subject line\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"List-Unsubscribe: <https://example.org/u>\r\n"
    b"\r\n"
    b"Hello \xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81\xa1\xe3\x81\xaf\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\tdot tab\r\n"
    b"trailing spaces   \r\n"
    b"\r\n"
    b"\r\n"
)
# MESSAGE without its 8-bit line: signing leaves it byte for byte as it is.
ASCII_MESSAGE = MESSAGE.replace(
    b"Hello \xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81\xa1\xe3\x81\xaf\r\n", b"Hello\r\n"
)


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dkim")
    generate_key("example.org", "rsa1", "rsa", directory=directory)
    generate_key("example.org", "ed1", "ed25519", directory=directory)
    generate_key("other.example", "sel", "rsa", directory=directory, bits=1024)
    return directory


@pytest.fixture(scope="module")
def signer(keydir: Path) -> DKIMSigner:
    return load_signers(keydir)


@pytest.fixture(scope="module")
def zone(keydir: Path) -> dict[str, str]:
    return {f"{r.name}.": r.txt for r in dkim_txt_records(keydir)}


def signatures(data: bytes) -> list[bytes]:
    """The DKIM-Signature fields (unfolded) at the top of ``data``."""
    head = data.split(b"\r\n\r\n", 1)[0]
    fields = re.split(rb"\r\n(?![ \t])", head)
    return [f for f in fields if f.lower().startswith(b"dkim-signature:")]


def tag(field: bytes, name: bytes) -> bytes:
    m = re.search(rb"[;:\s]" + name + rb"=([^;]*)", field)
    assert m is not None, field
    return re.sub(rb"\s+", b"", m.group(1))


# --- signing ----------------------------------------------------------------------------


def test_rsa_and_ed25519_sign_one_message_and_both_verify(
    signer: DKIMSigner, zone: dict[str, str]
) -> None:
    signed = signer.sign(MESSAGE)
    sigs = signatures(signed)
    assert [tag(s, b"a") for s in sigs] == [b"rsa-sha256", b"ed25519-sha256"]
    assert [tag(s, b"s") for s in sigs] == [b"rsa1", b"ed1"]
    assert all(tag(s, b"d") == b"example.org" for s in sigs)
    assert all(tag(s, b"c") == b"relaxed/relaxed" for s in sigs)
    assert dkimpy_verdicts(signed, zone) == [True, True]


def test_message_is_unchanged_below_the_signatures(signer: DKIMSigner) -> None:
    signed = signer.sign(ASCII_MESSAGE)
    assert signed.endswith(ASCII_MESSAGE)
    prefix = signed[: -len(ASCII_MESSAGE)]
    assert prefix.startswith(b"DKIM-Signature: ")
    # CRLF only, every line of the signatures folded with CRLF + whitespace.
    assert b"\n" not in prefix.replace(b"\r\n", b"")
    assert prefix.endswith(b"\r\n")
    assert len(signatures(signed)) == 2


def test_usual_headers_are_signed_and_from_is_oversigned(signer: DKIMSigner) -> None:
    sig = signatures(signer.sign(MESSAGE))[0]
    signed = tag(sig, b"h").lower().split(b":")
    assert signed.count(b"from") == 2
    for name in (
        b"to",
        b"cc",
        b"subject",
        b"date",
        b"message-id",
        b"mime-version",
        b"content-type",
        b"content-transfer-encoding",
        b"list-unsubscribe",
    ):
        assert name in signed
    assert b"received" not in signed


def test_an_added_from_header_breaks_the_signature(
    signer: DKIMSigner, zone: dict[str, str]
) -> None:
    signed = signer.sign(MESSAGE)
    head, body = signed.split(b"\r\n\r\n", 1)
    forged = head + b"\r\nFrom: attacker@evil.test\r\n\r\n" + body
    assert dkimpy_verdicts(forged, zone) == [False, False]


def test_a_changed_body_breaks_the_signature(signer: DKIMSigner, zone: dict[str, str]) -> None:
    signed = signer.sign(MESSAGE)
    assert dkimpy_verdicts(signed.replace(b"Hello", b"Hallo"), zone) == [False, False]


def test_relaxed_canonicalisation_survives_refolding(
    signer: DKIMSigner, zone: dict[str, str]
) -> None:
    signed = signer.sign(MESSAGE)
    refolded = signed.replace(b"Subject: Welcome,\r\n  folded", b"Subject:   Welcome,   folded")
    refolded = refolded.replace(b"trailing spaces   \r\n", b"trailing spaces\r\n")
    assert dkimpy_verdicts(refolded, zone) == [True, True]


def test_domain_without_keys_is_returned_unchanged(signer: DKIMSigner) -> None:
    message = MESSAGE.replace(b"noreply@Example.ORG", b"noreply@sub.example.org")
    assert signer.sign(message) is message
    assert (
        signer.sign(b"From: a@nokeys.test\r\n\r\nbody\r\n")
        == b"From: a@nokeys.test\r\n\r\nbody\r\n"
    )


def test_an_empty_signer_changes_nothing() -> None:
    assert DKIMSigner().sign(MESSAGE) is MESSAGE
    assert not DKIMSigner()


@pytest.mark.parametrize(
    "message",
    [
        b"To: a@example.net\r\n\r\nno From\r\n",
        b"From: a@example.org\r\nFrom: b@example.org\r\n\r\ntwo From fields\r\n",
        b"Subject: only a body\r\n",
        b"",
    ],
)
def test_messages_without_one_from_are_not_signed(signer: DKIMSigner, message: bytes) -> None:
    assert signer.sign(message) == message


def test_from_in_the_body_does_not_count(signer: DKIMSigner) -> None:
    message = b"Subject: x\r\n\r\nFrom: a@example.org\r\n"
    assert signer.sign(message) == message


@pytest.mark.parametrize(
    ("header", "domains"),
    [
        (b"From: a@example.org", ["example.org"]),
        (b"FROM: A <A@EXAMPLE.ORG.>", ["example.org"]),
        (b'From: "Doe, John" <j@example.org>', ["example.org"]),
        (b"From: (comment) a@example.org (Name)", ["example.org"]),
        (b"From: Name\r\n <a@example.org>", ["example.org"]),
        (b"From: a@example.org, b@other.example", ["example.org", "other.example"]),
        (b"From: a@b\xc3\xbccher.example", ["xn--bcher-kva.example"]),
        (b"From: undisclosed-recipients:;", []),
    ],
)
def test_from_domains(header: bytes, domains: list[str]) -> None:
    assert from_domains(header + b"\r\nTo: x@y.test\r\n\r\nbody\r\n") == domains


def test_every_from_domain_with_keys_signs(signer: DKIMSigner, zone: dict[str, str]) -> None:
    message = b"From: a@example.org, b@other.example\r\nSubject: two authors\r\n\r\nhi\r\n"
    signed = signer.sign(message)
    assert [tag(s, b"d") for s in signatures(signed)] == [
        b"example.org",
        b"example.org",
        b"other.example",
    ]
    assert dkimpy_verdicts(signed, zone) == [True, True, True]


def test_idn_from_domain_signs_with_the_a_label(tmp_path: Path) -> None:
    record = generate_key("bücher.example", "s", "ed25519", directory=tmp_path)
    assert record.domain == "xn--bcher-kva.example"
    signed = load_signers(tmp_path).sign(b"From: a@b\xc3\xbccher.example\r\n\r\nhi\r\n")
    assert dkimpy_verdicts(signed, {f"{record.name}.": record.txt}) == [True]


def test_lf_only_message_keeps_its_line_endings(signer: DKIMSigner, zone: dict[str, str]) -> None:
    message = ASCII_MESSAGE.replace(b"\r\n", b"\n")
    signed = signer.sign(message)
    assert signed.endswith(message)
    assert dkimpy_verdicts(signed, zone) == [True, True]


def test_an_8bit_body_is_converted_to_7bit_before_signing(
    signer: DKIMSigner, zone: dict[str, str]
) -> None:
    signed = signer.sign(MESSAGE)
    assert signed.isascii()
    got = email.message_from_bytes(signed, policy=email.policy.default)
    sent = email.message_from_bytes(MESSAGE, policy=email.policy.default)
    assert got["Content-Transfer-Encoding"] == "quoted-printable"
    assert got.get_content() == sent.get_content()
    assert dkimpy_verdicts(signed, zone) == [True, True]
    assert "example.org rsa1 rsa-sha256 pass" in mail_dkim_lines(signed, zone)


def test_an_8bit_message_that_cannot_be_converted_is_signed_as_it_is(
    signer: DKIMSigner, zone: dict[str, str]
) -> None:
    message = MESSAGE.replace(b"Cc: other@example.net", "Cc: jörg@example.net".encode())
    signed = signer.sign(message)
    assert signed.endswith(message)
    assert dkimpy_verdicts(signed, zone) == [True, True]


def test_malformed_header_section_is_a_signing_error(signer: DKIMSigner) -> None:
    with pytest.raises(SigningError):
        signer.sign(b"From: a@example.org\r\nthis is not a header\r\n\r\nbody\r\n")


def test_signing_is_fast_enough(signer: DKIMSigner) -> None:
    import time

    start = time.perf_counter()
    for _ in range(20):
        signer.sign(MESSAGE)
    per_message = (time.perf_counter() - start) / 20
    assert per_message < 0.25, per_message


# --- Mail::DKIM, an independent verifier ------------------------------------------------


def test_mail_dkim_passes_the_rsa_signature(signer: DKIMSigner, zone: dict[str, str]) -> None:
    lines = mail_dkim_lines(signer.sign(MESSAGE), zone)
    assert "example.org rsa1 rsa-sha256 pass" in lines, lines
    assert lines[-1] == "result pass"


def test_mail_dkim_fails_a_tampered_message(signer: DKIMSigner, zone: dict[str, str]) -> None:
    signed = signer.sign(MESSAGE).replace(b"Hello", b"Hallo")
    lines = mail_dkim_lines(signed, zone)
    rsa = next(line for line in lines if " rsa-sha256 " in line)
    assert rsa.startswith("example.org rsa1 rsa-sha256 fail"), lines


def test_mail_dkim_passes_a_1024_bit_key_and_lf_stored_message(
    signer: DKIMSigner, zone: dict[str, str]
) -> None:
    message = b"From: x@other.example\r\nSubject: s\r\n\r\n.\r\n..\r\n\xff\xfe\r\n"
    stored = signer.sign(message).replace(b"\r\n", b"\n")  # as a Maildir keeps it
    assert "other.example sel rsa-sha256 pass" in mail_dkim_lines(stored, zone)


# --- keys and records -------------------------------------------------------------------


def test_keygen_writes_0600_pem_in_the_layout(tmp_path: Path) -> None:
    record = generate_key("Example.ORG", "mail", directory=tmp_path / "dkim")
    path = tmp_path / "dkim" / "example.org" / "mail.rsa.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert record == ("example.org", "mail", record.txt)
    assert record.txt.startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")  # 2048
    ed = generate_key("example.org", "ed", "ed25519", directory=tmp_path / "dkim")
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", ed.txt)
    assert (
        (tmp_path / "dkim" / "example.org" / "ed.ed25519.key")
        .read_bytes()
        .startswith(b"-----BEGIN PRIVATE KEY-----\n")
    )
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_keygen_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = generate_key("example.org", "s", directory=tmp_path)
    with pytest.raises(ConfigError, match="exists"):
        generate_key("example.org", "s", directory=tmp_path)
    assert load_signers(tmp_path).keys[0].record == first
    second = generate_key("example.org", "s", directory=tmp_path, force=True)
    assert second != first
    assert load_signers(tmp_path).keys[0].record == second


def test_one_selector_cannot_have_both_kinds(tmp_path: Path) -> None:
    generate_key("example.org", "s", "rsa", directory=tmp_path)
    with pytest.raises(ConfigError, match="another selector"):
        generate_key("example.org", "s", "ed25519", directory=tmp_path)


@pytest.mark.parametrize(
    ("domain", "selector", "algorithm", "bits"),
    [
        ("example.org", "../etc", "rsa", 2048),
        ("example.org", "a/b", "rsa", 2048),
        ("example.org", ".hidden", "rsa", 2048),
        ("example.org", "", "rsa", 2048),
        ("../x", "s", "rsa", 2048),
        ("localhost", "s", "rsa", 2048),
        ("[127.0.0.1]", "s", "rsa", 2048),
        ("example.org", "s", "dsa", 2048),
        ("example.org", "s", "rsa", 512),
    ],
)
def test_keygen_rejects_bad_names(
    tmp_path: Path, domain: str, selector: str, algorithm: str, bits: int
) -> None:
    with pytest.raises(ConfigError):
        generate_key(domain, selector, algorithm, directory=tmp_path, bits=bits)
    assert not any(tmp_path.rglob("*.key"))


def test_txt_strings_are_at_most_255_bytes(tmp_path: Path) -> None:
    record = generate_key("example.org", "big", directory=tmp_path, bits=4096)
    strings = record.strings()
    assert strings[0] == "v=DKIM1; k=rsa; "
    assert len(strings) >= 4
    assert all(len(s.encode()) <= 255 for s in strings)
    assert "".join(strings) == record.txt
    line = record.zone_line()
    assert line.startswith('big._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; " "p=')
    assert line.endswith('" )')
    assert split_txt("v=DKIM1; p=") == ["v=DKIM1; ", "p="]


def test_dkim_txt_records_lists_every_key(keydir: Path) -> None:
    records = dkim_txt_records(keydir)
    assert [(d, s) for d, s, _ in records] == [
        ("example.org", "rsa1"),
        ("example.org", "ed1"),
        ("other.example", "sel"),
    ]
    assert all(isinstance(r, DKIMRecord) for r in records)
    assert [r.algorithm for r in records] == ["rsa", "ed25519", "rsa"]
    assert records[0].name == "rsa1._domainkey.example.org"


# --- start-up errors --------------------------------------------------------------------


def test_missing_directory_means_no_keys(tmp_path: Path) -> None:
    assert load_signers(tmp_path / "nothing").keys == ()
    assert dkim_txt_records(tmp_path / "nothing") == []


def one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def test_dangling_key_link_is_a_missing_key(tmp_path: Path) -> None:
    (tmp_path / "example.org").mkdir()
    (tmp_path / "example.org" / "s.rsa.key").symlink_to(tmp_path / "gone.pem")
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "missing" in one_line(exc)


def test_unreadable_key_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate_key("example.org", "s", directory=tmp_path)
    key = tmp_path / "example.org" / "s.rsa.key"
    key.chmod(0)
    if os.geteuid() == 0:
        # root reads any file whatever its mode: make the read fail as it would for hato.
        read_bytes = Path.read_bytes

        def refuse(self: Path) -> bytes:
            if self == key:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "s.rsa.key is not readable by this user" in one_line(exc)


def test_key_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "example.org" / "s.rsa.key").mkdir(parents=True)
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "not a regular file" in one_line(exc)


def test_garbage_key_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "example.org").mkdir()
    (tmp_path / "example.org" / "s.rsa.key").write_bytes(b"not a key\n")
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "s.rsa.key" in one_line(exc)


def test_key_of_the_wrong_kind_is_a_config_error(tmp_path: Path) -> None:
    generate_key("example.org", "s", "ed25519", directory=tmp_path)
    os.rename(tmp_path / "example.org" / "s.ed25519.key", tmp_path / "example.org" / "s.rsa.key")
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "not an RSA key" in one_line(exc)


@pytest.mark.parametrize(
    "name", ["s.key", "s.rsa.pem", "s.txt", "README", "s.dsa.key", "a b.rsa.key"]
)
def test_a_stray_file_in_a_domain_directory_is_a_config_error(tmp_path: Path, name: str) -> None:
    generate_key("example.org", "s", directory=tmp_path)
    (tmp_path / "example.org" / name).write_text("x")
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "unexpected file" in one_line(exc) or "not valid" in one_line(exc)


def test_a_stray_file_at_the_top_is_a_config_error(tmp_path: Path) -> None:
    generate_key("example.org", "s", directory=tmp_path)
    (tmp_path / "example.org.rsa.key").write_text("x")
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "unexpected file" in one_line(exc)


def test_a_directory_not_named_after_a_domain_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "Example.ORG").mkdir()
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "should be named example.org" in one_line(exc)


def test_an_empty_domain_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "example.org").mkdir()
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "holds no key" in one_line(exc)


def test_two_kinds_for_one_selector_on_disk_is_a_config_error(tmp_path: Path) -> None:
    generate_key("example.org", "s", "rsa", directory=tmp_path)
    generate_key("example.org", "t", "ed25519", directory=tmp_path)
    os.rename(
        tmp_path / "example.org" / "t.ed25519.key", tmp_path / "example.org" / "s.ed25519.key"
    )
    with pytest.raises(ConfigError) as exc:
        load_signers(tmp_path)
    assert "two keys" in one_line(exc)


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    generate_key("example.org", "s", directory=tmp_path)
    (tmp_path / ".keep").write_text("")
    (tmp_path / "example.org" / ".s.rsa.key.123.tmp").write_text("left by a crash")
    assert len(load_signers(tmp_path).keys) == 1


def test_key_material_is_not_in_repr(signer: DKIMSigner) -> None:
    assert "PRIVATE" not in repr(signer) and "BEGIN" not in repr(signer.keys[0])


def test_signing_can_be_limited_to_the_submitters_domains(
    signer: DKIMSigner, zone: dict[str, str]
) -> None:
    message = b"From: a@example.org, b@other.example\r\n\r\nhi\r\n"
    only_other = signer.sign(message, domains={"other.example"})
    assert [tag(s, b"d") for s in signatures(only_other)] == [b"other.example"]
    assert signer.sign(message, domains=set()) is message
    assert signer.sign(MESSAGE, domains=frozenset({"other.example"})) is MESSAGE
