"""What the MX courier tells TLS reporting (RFC 8460) about each delivery attempt.

The MX courier emits one :class:`TLSResult` per attempt at an MX host (and one per
policy failure decided before any connection) to a :class:`TLSReporter` that
:mod:`hato.app` passes in. The default reporter drops them; the TLS-RPT aggregator
counts them per policy domain and day and writes the RFC 8460 §4.4 report.

This module is a leaf: values and a protocol, no imports from the rest of Hato, so the
courier and the reporter can both depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, Protocol

PolicyType = Literal["sts", "tlsa", "no-policy-found"]
POLICY_TYPES: tuple[str, ...] = ("sts", "tlsa", "no-policy-found")

# RFC 8460 §4.3: the result types. "success" is ours (a successful session is counted in
# the report's summary, not listed as a failure).
SUCCESS: Final = "success"
STARTTLS_NOT_SUPPORTED: Final = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH: Final = "certificate-host-mismatch"
CERTIFICATE_EXPIRED: Final = "certificate-expired"
CERTIFICATE_NOT_TRUSTED: Final = "certificate-not-trusted"
VALIDATION_FAILURE: Final = "validation-failure"
TLSA_INVALID: Final = "tlsa-invalid"
DNSSEC_INVALID: Final = "dnssec-invalid"
DANE_REQUIRED: Final = "dane-required"
STS_POLICY_FETCH_ERROR: Final = "sts-policy-fetch-error"
STS_POLICY_INVALID: Final = "sts-policy-invalid"
STS_WEBPKI_INVALID: Final = "sts-webpki-invalid"

# The failure types (a report's failure-details); SUCCESS is not one of them.
RESULT_TYPES: tuple[str, ...] = (
    STARTTLS_NOT_SUPPORTED,
    CERTIFICATE_HOST_MISMATCH,
    CERTIFICATE_EXPIRED,
    CERTIFICATE_NOT_TRUSTED,
    VALIDATION_FAILURE,
    TLSA_INVALID,
    DNSSEC_INVALID,
    DANE_REQUIRED,
    STS_POLICY_FETCH_ERROR,
    STS_POLICY_INVALID,
    STS_WEBPKI_INVALID,
)


@dataclass(frozen=True, slots=True)
class TLSResult:
    """One attempt's TLS outcome under one policy.

    ``policy_domain`` is the recipient domain whose policy applied (where TLS-RPT's
    ``_smtp._tls`` record is looked up); ``policy_type`` RFC 8460's ``sts``, ``tlsa`` or
    ``no-policy-found``; ``policy_strings`` the policy as the report lists it (the lines
    of the MTA-STS policy, or each TLSA record in presentation form); ``mx_host`` the MX
    name tried (``mx_host_patterns`` the ``mx:`` lines of an MTA-STS policy);
    ``sending_ip`` our address on the connection and ``receiving_ip`` the MX's (empty
    when no connection was made). ``result_type`` is ``success`` or a failure type of
    RFC 8460 §4.3 (the constants of this module); ``failure_reason`` a human-readable
    reason (the report's ``failure-reason-code``). ``tls_policy`` is Hato's name for
    the rule that decided (``dane``, ``mta-sts-enforce``, ``mta-sts-testing``,
    ``operator``, ``opportunistic``, ``none``) and ``time`` the attempt's Unix time.
    """

    policy_domain: str
    policy_type: PolicyType
    mx_host: str
    result_type: str
    time: float
    policy_strings: tuple[str, ...] = ()
    mx_host_patterns: tuple[str, ...] = ()
    sending_ip: str = ""
    receiving_ip: str = ""
    failure_reason: str = ""
    tls_policy: str = ""
    receiving_mx_helo: str = ""

    def __post_init__(self) -> None:
        if self.policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type {self.policy_type!r} is not one of {POLICY_TYPES}")
        if self.result_type != SUCCESS and self.result_type not in RESULT_TYPES:
            raise ValueError(f"result_type {self.result_type!r} is not an RFC 8460 result type")

    @property
    def success(self) -> bool:
        return self.result_type == SUCCESS


class TLSReporter(Protocol):
    """Receives every :class:`TLSResult`; must not block or raise (it runs inline with
    delivery)."""

    def record(self, result: TLSResult) -> None: ...


class NullTLSReporter:
    """The default: TLS results go nowhere."""

    def record(self, result: TLSResult) -> None:
        return None


class CollectingTLSReporter:
    """Keeps every result in a list (tests, ``hato`` diagnostics)."""

    def __init__(self) -> None:
        self.results: list[TLSResult] = []

    def record(self, result: TLSResult) -> None:
        self.results.append(result)
