"""Session failures as TLS-RPT result types (RFC 8460 §4.3), and the TLSResult value."""

from __future__ import annotations

import pytest

from hato import tlsrpt_types as rpt
from hato.delivery.mx import _result_type
from hato.delivery.session import FailureKind, SessionFailure
from hato.reply import Reply

RELAY = "mx[192.0.2.1]:25"


@pytest.mark.parametrize(
    ("reply", "kind", "tls_error", "expected"),
    [
        (
            Reply(454, "4.7.4", "TLS is required, but was not offered"),
            FailureKind.ANSWERED,
            "",
            rpt.STARTTLS_NOT_SUPPORTED,
        ),
        (
            Reply(454, "4.7.5", "x"),
            FailureKind.HANDSHAKE,
            "Hostname mismatch, certificate is not valid for 'mx'.",
            rpt.CERTIFICATE_HOST_MISMATCH,
        ),
        (
            Reply(454, "4.7.5", "x"),
            FailureKind.HANDSHAKE,
            "certificate has expired",
            rpt.CERTIFICATE_EXPIRED,
        ),
        (
            Reply(454, "4.7.5", "x"),
            FailureKind.HANDSHAKE,
            "self-signed certificate in certificate chain",
            rpt.CERTIFICATE_NOT_TRUSTED,
        ),
        (
            Reply(454, "4.7.5", "x"),
            FailureKind.HANDSHAKE,
            "unable to get local issuer certificate",
            rpt.CERTIFICATE_NOT_TRUSTED,
        ),
        (
            Reply(454, "4.7.5", "x"),
            FailureKind.ANSWERED,
            "DANE: the server's certificate matches none of the TLSA records",
            rpt.VALIDATION_FAILURE,
        ),
        (
            Reply(454, "4.7.5", "x"),
            FailureKind.ANSWERED,
            "DANE: the server's certificate does not name mx (DANE-TA)",
            rpt.CERTIFICATE_HOST_MISMATCH,
        ),
        (Reply(454, "4.7.5", "x"), FailureKind.HANDSHAKE, "", rpt.VALIDATION_FAILURE),
        (
            Reply(451, "4.4.1", "connect to mx: Connection refused"),
            FailureKind.UNREACHABLE,
            "",
            None,
        ),
        (Reply(451, "4.4.0", "host mx said: 554 go away"), FailureKind.ANSWERED, "", None),
    ],
)
def test_result_types(
    reply: Reply, kind: FailureKind, tls_error: str, expected: str | None
) -> None:
    assert _result_type(SessionFailure(reply, RELAY, kind, tls_error=tls_error)) == expected


def test_every_result_type_is_rfc_8460s_or_success() -> None:
    assert rpt.SUCCESS not in rpt.RESULT_TYPES and len(set(rpt.RESULT_TYPES)) == 11
    result = rpt.TLSResult("example.com", "sts", "mx.example.com", rpt.SUCCESS, 0.0)
    assert result.success and not rpt.TLSResult("d", "tlsa", "m", rpt.TLSA_INVALID, 0.0).success
    rpt.NullTLSReporter().record(result)  # drops it
    collecting = rpt.CollectingTLSReporter()
    collecting.record(result)
    assert collecting.results == [result]
