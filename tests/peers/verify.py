"""Independent verifiers for delivered mail: Mail::DKIM (perl), dkimpy and pyspf, against the test DNS.

Each verifier asks only the :class:`peers.dns.TestDNS` server it is given (``(host,
port)``): Mail::DKIM through a ``Net::DNS::Resolver`` set with
``Mail::DKIM::DNS::resolver``, dkimpy through its ``dnsfunc`` hook, pyspf through its
``DNSLookup`` hook for the time of one check; all three with a private dnspython or
Net::DNS resolver, so neither the system resolver nor its configuration is used or
changed.

Debian 12's libmail-dkim-perl knows no Ed25519 (it reports such signatures as
``invalid``), so the RSA signature is checked by Mail::DKIM and the Ed25519 one by
dkimpy; dkimpy can check both, one signature at a time.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from peers import missing, require_tool

DNSServer = tuple[str, int]

# Mail::DKIM reading the message on stdin; its DNS is never the network's: either the test
# DNS server (``--server HOST PORT``) or the TXT records given as ``NAME=TXT`` arguments.
# searchlist/defnames off: a name is asked as it is, never with a local domain appended.
_PERL_VERIFIER = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS;
if (@ARGV && $ARGV[0] eq '--server') {
    my (undef, $host, $port) = @ARGV;
    my $res = Net::DNS::Resolver->new(
        nameservers => [$host], port => $port, recurse => 1,
        searchlist => [], defnames => 0, dnsrch => 0,
        tcp_timeout => 10, udp_timeout => 10, retry => 2,
    );
    Mail::DKIM::DNS::resolver($res);
} else {
    my %records;
    for my $arg (@ARGV) { my ($name, $txt) = split /=/, $arg, 2; $records{lc $name} = $txt; }
    no warnings 'redefine';
    *Mail::DKIM::DNS::query = sub {
        my ($name, $type) = @_;
        my $txt = $records{lc $name};
        if (!defined $txt || uc $type ne 'TXT') { $@ = 'NXDOMAIN'; return; }
        $@ = 'NOERROR';
        return Net::DNS::RR->new(name => $name, type => 'TXT', txtdata => [unpack '(A255)*', $txt]);
    };
}
binmode STDIN;
my $dkim = Mail::DKIM::Verifier->new;
while (my $line = <STDIN>) { $line =~ s/\r?\n\z/\r\n/; $dkim->PRINT($line); }
$dkim->CLOSE;
printf "overall\t%s\t%s\n", $dkim->result, ($dkim->result_detail // '');
for my $sig ($dkim->signatures) {
    printf "signature\t%s\t%s\t%s\t%s\t%s\n", $sig->domain, $sig->selector,
        $sig->algorithm, $sig->result, ($sig->result_detail // '');
}
"""


@dataclass(frozen=True)
class SignatureResult:
    """One DKIM-Signature's verdict from one verifier."""

    verifier: str
    domain: str
    selector: str
    algorithm: str
    result: str  # "pass", "fail", "invalid", "none", ...
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.result == "pass"

    def __str__(self) -> str:
        # Mail::DKIM's detail already starts with the result: "invalid (unsupported ...)".
        verdict = self.detail if self.detail.startswith(self.result) else self.result
        if self.detail and not self.detail.startswith(self.result):
            verdict += f" ({self.detail})"
        return f"{self.verifier}: d={self.domain} s={self.selector} a={self.algorithm} -> {verdict}"


@dataclass(frozen=True)
class SPFResult:
    """pyspf's verdict for one (ip, sender, helo)."""

    ip: str
    sender: str
    helo: str
    result: str  # "pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"
    code: int
    explanation: str

    @property
    def passed(self) -> bool:
        return self.result == "pass"

    def __str__(self) -> str:
        return (
            f"pyspf: ip={self.ip} mailfrom={self.sender} helo={self.helo} "
            f"-> {self.result} ({self.code} {self.explanation})"
        )


def private_resolver(server: DNSServer, *, lifetime: float = 10.0) -> dns.resolver.Resolver:
    """A dnspython resolver that asks ``server`` only (no /etc/resolv.conf)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server[0]]
    resolver.port = server[1]
    resolver.timeout = min(lifetime, 3.0)
    resolver.lifetime = lifetime
    resolver.search = []
    resolver.use_search_by_default = False
    return resolver


def txt_lookup(server: DNSServer, name: str) -> list[bytes]:
    """Every TXT record of ``name`` (its character-strings joined), empty when none."""
    resolver = private_resolver(server)
    try:
        answer = resolver.resolve(dns.name.from_text(name), "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [b"".join(rdata.strings) for rdata in answer]


# --- DKIM: Mail::DKIM ---------------------------------------------------------------------


def mail_dkim_available() -> str:
    """perl's path; skip (fail under CI) when its Mail::DKIM is not installed."""
    perl = require_tool("perl", hint="apt-get install perl")
    probe = subprocess.run(
        [perl, "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        missing("Mail::DKIM is not installed (apt-get install libmail-dkim-perl)")
    return perl


def mail_dkim_version() -> str:
    proc = subprocess.run(
        [mail_dkim_available(), "-MMail::DKIM", "-e", "print $Mail::DKIM::VERSION"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout.strip() or "unknown"


def _run_mail_dkim(message: bytes, args: list[str]) -> tuple[str, list[SignatureResult]]:
    """Mail::DKIM::Verifier's overall result and every signature's verdict."""
    perl = mail_dkim_available()
    proc = subprocess.run(
        [perl, "-e", _PERL_VERIFIER, "--", *args],
        input=message,
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C"},
    )
    if proc.returncode != 0:
        raise AssertionError(f"Mail::DKIM verifier failed: {proc.stderr.decode(errors='replace')}")
    overall = ""
    results = []
    for line in proc.stdout.decode().splitlines():
        fields = line.split("\t")
        if fields[0] == "overall":
            overall = fields[1]
        elif fields[0] == "signature":
            _, domain, selector, algorithm, result, detail = fields
            results.append(
                SignatureResult("Mail::DKIM", domain, selector, algorithm, result, detail)
            )
    return overall, results


def verify_mail_dkim(message: bytes, server: DNSServer) -> list[SignatureResult]:
    """Every signature's verdict from Mail::DKIM::Verifier (libmail-dkim-perl)."""
    return _run_mail_dkim(message, ["--server", server[0], str(server[1])])[1]


def mail_dkim_lines(message: bytes, zone: dict[str, str]) -> list[str]:
    """Mail::DKIM's verdicts with ``zone`` (``{"sel._domainkey.example.org.": txt}``) as
    its only DNS: a line ``"domain selector algorithm detail"`` a signature (``detail``
    starts with the result: ``"pass"``, ``"fail (body has been altered)"``), then
    ``"result RESULT"`` for the message."""
    args = [f"{name.rstrip('.')}={txt}" for name, txt in zone.items()]
    overall, results = _run_mail_dkim(message, args)
    lines = [f"{r.domain} {r.selector} {r.algorithm} {r.detail or r.result}" for r in results]
    return [*lines, f"result {overall}"]


# --- DKIM: dkimpy -------------------------------------------------------------------------


def _signature_tags(value: bytes) -> dict[str, str]:
    unfolded = re.sub(rb"\s+", b"", value).decode("ascii", errors="replace")
    tags: dict[str, str] = {}
    for item in unfolded.split(";"):
        key, sep, val = item.partition("=")
        if sep:
            tags[key] = val
    return tags


def verify_dkimpy(message: bytes, server: DNSServer) -> list[SignatureResult]:
    """Every signature's verdict from dkimpy, each checked on its own (``verify(idx=i)``)."""
    import dkim

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        records = txt_lookup(server, text)
        return records[0] if records else None

    results = []
    checker = dkim.DKIM(message)
    signatures = [v for n, v in checker.headers if n.lower() == b"dkim-signature"]
    for idx, value in enumerate(signatures):
        tags = _signature_tags(value)
        detail = ""
        try:
            ok = bool(checker.verify(idx=idx, dnsfunc=dnsfunc))
        except dkim.DKIMException as exc:
            ok, detail = False, str(exc)
        results.append(
            SignatureResult(
                "dkimpy",
                tags.get("d", "?"),
                tags.get("s", "?"),
                tags.get("a", "?"),
                "pass" if ok else "fail",
                detail,
            )
        )
    return results


def dkimpy_verdicts(message: bytes, zone: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on each signature, ``zone`` (``{"sel._domainkey.example.org.":
    txt}``) its only DNS; a failure it raises for counts as ``False``."""
    import dkim

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        txt = zone.get(name.decode().lower())
        return txt.encode() if txt is not None else None

    checker = dkim.DKIM(message)
    count = sum(1 for name, _ in checker.headers if name.lower() == b"dkim-signature")
    verdicts = []
    for idx in range(count):
        try:
            verdicts.append(bool(checker.verify(idx=idx, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            verdicts.append(False)
    return verdicts


# --- SPF: pyspf ---------------------------------------------------------------------------


@contextlib.contextmanager
def _spf_dns(server: DNSServer) -> Iterator[Any]:
    """pyspf with its DNS hook pointed at ``server`` for the time of the block."""
    try:
        import spf
    except ImportError:
        missing("pyspf is not installed (pip install pyspf)")
        raise AssertionError("unreachable") from None
    resolver = private_resolver(server)

    def lookup(
        name: str, qtype: str, strict: bool = True, timeout: float = 20
    ) -> list[tuple[tuple[str, str], Any]]:
        # The same shapes as pyspf's own dnspython lookup, without its deprecated
        # module-level dns.resolver.query and the system resolver it would use.
        found: list[tuple[tuple[str, str], Any]] = []
        try:
            answer = resolver.resolve(name, qtype, search=False, lifetime=min(timeout, 10))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return found
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                found.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                found.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                found.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                found.append(((name, qtype), rdata.strings))
        return found

    saved = spf.DNSLookup
    spf.DNSLookup = lookup
    try:
        yield spf
    finally:
        spf.DNSLookup = saved


def check_spf(ip: str, sender: str, helo: str, server: DNSServer) -> SPFResult:
    """pyspf's ``check2``-style verdict for mail from ``sender`` sent by ``ip``."""
    with _spf_dns(server) as spf:
        query = spf.query(i=ip, s=sender, h=helo, timeout=20)
        result, code, explanation = query.check()
    return SPFResult(ip, sender, helo, str(result), int(code), str(explanation))


# --- the delivered message ----------------------------------------------------------------


def header_section(message: bytes) -> str:
    """The header section of ``message`` as text (unfolded lines kept as they are)."""
    normalized = message.replace(b"\r\n", b"\n")
    head, _, _ = normalized.partition(b"\n\n")
    return head.decode("utf-8", errors="replace")


def from_domain(message: bytes) -> str:
    """The domain of the (first) From: address, lower case."""
    for line in header_section(message).split("\n"):
        if line.lower().startswith("from:"):
            _, address = email.utils.parseaddr(line[5:].strip())
            return address.rpartition("@")[2].lower()
    return ""
