"""DANE's pure parts: matching a certificate chain against TLSA records (RFC 7672 §3)."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hato.delivery.dane import TLSALookup, TLSARecord, check_chain, matches, name_matches, tlsa_name

NOW = datetime.datetime.now(datetime.UTC)
CA = trustme.CA()
OTHER_CA = trustme.CA()
CHILD = CA.create_child_ca()
LEAF = CA.issue_cert("mx1.example.test")
CHILD_LEAF = CHILD.issue_cert("mx1.example.test")
WRONG_NAME = CA.issue_cert("mx2.example.test")
EXPIRED = CA.issue_cert(
    "mx1.example.test",
    not_before=NOW - datetime.timedelta(days=30),
    not_after=NOW - datetime.timedelta(days=1),
)
STRANGER = OTHER_CA.issue_cert("mx1.example.test")


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def chain_of(leaf: trustme.LeafCert) -> list[bytes]:
    return [der(b.bytes()) for b in leaf.cert_chain_pems]


def spki(cert_der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def record(usage: int, selector: int, mtype: int, cert_der: bytes) -> TLSARecord:
    data = cert_der if selector == 0 else spki(cert_der)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TLSARecord(usage, selector, mtype, data)


LEAF_DER = chain_of(LEAF)[0]
CA_DER = der(CA.cert_pem.bytes())
CHILD_DER = chain_of(CHILD_LEAF)[1]


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_server_certificate_by_every_selector_and_type(
    selector: int, mtype: int
) -> None:
    rec = record(3, selector, mtype, LEAF_DER)
    assert matches(rec, LEAF_DER)
    assert check_chain([rec], chain_of(LEAF), "mx1.example.test", NOW) is None
    assert check_chain([rec], chain_of(STRANGER), "mx1.example.test", NOW) is not None


def test_dane_ee_checks_neither_name_nor_dates() -> None:
    for leaf in (WRONG_NAME, EXPIRED):
        leaf_der = chain_of(leaf)[0]
        assert (
            check_chain([record(3, 1, 1, leaf_der)], chain_of(leaf), "mx1.example.test", NOW)
            is None
        )


@pytest.mark.parametrize(
    ("records", "leaf", "host", "ok"),
    [
        ([record(2, 1, 1, CA_DER)], "child-chain", "mx1.example.test", True),  # root matched
        ([record(2, 0, 2, CHILD_DER)], "child-chain", "mx1.example.test", True),  # intermediate
        ([record(2, 1, 1, CA_DER)], "child-chain", "mx2.example.test", False),  # name checked
        (
            [record(2, 1, 1, der(OTHER_CA.cert_pem.bytes()))],
            "child-chain",
            "mx1.example.test",
            False,
        ),
        ([record(2, 1, 1, CA_DER)], "stranger+ca", "mx1.example.test", False),  # not issued by it
        ([record(2, 1, 1, CA_DER)], "expired+ca", "mx1.example.test", False),
        (
            [record(0, 1, 1, CA_DER), record(1, 1, 1, LEAF_DER)],
            "leaf+ca",
            "mx1.example.test",
            False,
        ),
        ([record(2, 1, 1, CA_DER)], "leaf+ca", "mx1.example.test", True),
        (
            [TLSARecord(3, 1, 9, b"x"), record(3, 1, 1, LEAF_DER)],
            "leaf+ca",
            "mx1.example.test",
            True,
        ),
        ([TLSARecord(3, 1, 1, b"\0" * 32)], "leaf+ca", "mx1.example.test", False),
        ([], "leaf+ca", "mx1.example.test", False),
    ],
)
def test_dane_ta_and_unusable_records(
    records: list[TLSARecord], leaf: str, host: str, ok: bool
) -> None:
    chains = {
        # The leaf, the child CA that signed it and the root that signed the child.
        "child-chain": [*chain_of(CHILD_LEAF), CA_DER],
        # A stranger's certificate followed by our CA: the CA is there, but did not sign it.
        "stranger+ca": [chain_of(STRANGER)[0], CA_DER],
        "expired+ca": [chain_of(EXPIRED)[0], CA_DER],
        "leaf+ca": [LEAF_DER, CA_DER],
    }
    assert (check_chain(records, chains[leaf], host, NOW) is None) is ok


def test_no_certificate_at_all() -> None:
    assert check_chain([record(3, 1, 1, LEAF_DER)], [], "mx1.example.test", NOW) is not None


@pytest.mark.parametrize(
    ("names", "host", "ok"),
    [
        (["mx1.example.test"], "MX1.example.test.", True),
        (["*.example.test"], "mx1.example.test", True),
        (["*.example.test"], "a.mx1.example.test", False),
        (["other.test"], "mx1.example.test", False),
    ],
)
def test_name_matching(names: list[str], host: str, ok: bool) -> None:
    assert name_matches(names, host) is ok


def test_records_apply_only_when_validated() -> None:
    rec = record(3, 1, 1, LEAF_DER)
    assert TLSALookup((rec,), True).applies
    assert not TLSALookup((rec,), False).applies
    assert not TLSALookup((), True).applies
    assert tlsa_name("MX1.Example.test.") == "_25._tcp.mx1.example.test"
    assert str(TLSARecord(3, 1, 1, b"\xab\xcd")) == "3 1 1 abcd"
