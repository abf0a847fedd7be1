"""The DNS records a mail domain publishes, and how to check them.

Besides its MX and the server's A/AAAA, a relay server's domain publishes the records
that let receivers trust its mail: SPF (RFC 7208), one DKIM key record per selector
(RFC 6376 3.6.1) and DMARC (RFC 7489); the PTR of each address is set by whoever owns
the address, not at the registrar. This module knows what each record should say and
how to compare it with what DNS publishes:

* builders: :func:`spf_record`, :func:`dmarc_record`, our own MTA-STS policy
  (:func:`mta_sts_policy`, RFC 8461) and its ``_mta-sts`` record
  (:func:`mta_sts_record`), the ``_smtp._tls`` TLS-RPT record (RFC 8460), the TLSA
  record of our certificate (:func:`tlsa_record`, DANE-EE 3 1 1), the zone-file lines
  (:func:`mx_line`, :func:`address_line`, :func:`txt_line`, :func:`ptr_line`) and
  :func:`records_text`, the advice ``hato dns records`` prints (a zone file, then the
  same in plain words for a registrar's web form);
* readers: :func:`spf_verdict` (do an SPF record's ``ip4``/``ip6`` terms pass an
  address) and :func:`dkim_tags` (the tags of a DKIM key record);
* the check: :func:`check_domain_records` asks a :class:`~hato.dns.Resolver` for every
  record and returns one :class:`Finding` per record, ``ok``, ``missing``, ``different``
  (each with its fix) or ``error`` (DNS did not answer).

Builders and readers are plain functions of their inputs, tested by tables without DNS.
The check is one async function over the resolver that runs one small check per kind of
record, so another record (MTA-STS, TLS-RPT, TLSA) is one builder and one check more.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hato.dkim import (
    DKIMRecord,
    activate_key,
    check_selector,
    dkim_txt_records,
    load_keys,
    pending_keys,
)
from hato.dns import Resolver
from hato.errors import ConfigError, DeliveryError
from hato.tlsrpt import TLSReportError, parse_tlsrpt_record, tlsrpt_record

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

OK = "ok"
MISSING = "missing"
DIFFERENT = "different"
ERROR = "error"
OPTIONAL = "optional"  # an optional record (MTA-STS, TLS-RPT, TLSA) not published

SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4
MTA_STS_MAX_POLICY = 64 * 1024  # RFC 8461 3.3: senders may refuse larger policies


# --- what to publish --------------------------------------------------------------------


def spf_record(ips: Sequence[IPAddress]) -> str:
    """``v=spf1 ip4:… ip6:… -all``; with no address, ``mx`` (the MX hosts may send)."""
    if not ips:
        return "v=spf1 mx -all"
    mechanisms = [f"ip{ip.version}:{ip}" for ip in ips]
    return "v=spf1 " + " ".join(mechanisms) + " -all"


def dmarc_record(domain: str) -> str:
    return f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"


def mta_sts_policy(mx: Sequence[str], mode: str, max_age: int) -> str:
    """Our MTA-STS policy file (RFC 8461 3.2), lines ending in CRLF."""
    lines = ["version: STSv1", f"mode: {mode}"]
    lines.extend(f"mx: {host}" for host in mx)
    lines.append(f"max_age: {max_age}")
    return "\r\n".join(lines) + "\r\n"


def mta_sts_id(policy: str) -> str:
    """The ``id`` of the ``_mta-sts`` record: from the policy's hash, so it changes
    exactly when the policy does (senders then fetch it again)."""
    return hashlib.sha256(policy.encode()).hexdigest()[:20]


def mta_sts_record(policy: str) -> str:
    return f"v=STSv1; id={mta_sts_id(policy)}"


def certificate_spki_sha256(pem: bytes) -> str:
    """SHA-256 of the first certificate's public key (SubjectPublicKeyInfo), in hex:
    the data of a ``3 1 1`` TLSA record (RFC 7671, RFC 7672 3.1.1). DER is taken too."""
    try:
        if pem.lstrip().startswith(b"-----"):
            cert = x509.load_pem_x509_certificate(pem)
        else:
            cert = x509.load_der_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a certificate: {exc}") from None
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def read_certificate_tlsa(path: Path) -> str:
    """``3 1 1 HEX`` for the certificate file ``path`` (HATO_TLS_CERT_FILE)."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    return tlsa_record(certificate_spki_sha256(pem))


async def live_certificate_spki_sha256(
    host: str, port: int, *, helo: str, timeout: float = 10.0
) -> str:
    """The ``3 1 1`` digest of the certificate the SMTP server at ``host:port`` presents
    after STARTTLS (not verified: only its key is wanted). :class:`ConfigError` when no
    certificate could be had."""
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        local_hostname=helo,
        timeout=timeout,
        start_tls=False,
        validate_certs=False,
    )
    try:
        await client.connect()
        await client.starttls(validate_certs=False)
        transport = client.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        raise ConfigError(
            f"no certificate from {host}:{port}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        client.close()
    if not der:
        raise ConfigError(f"no certificate from {host}:{port}")
    return certificate_spki_sha256(der)


def tlsa_record(digest: str) -> str:
    return f"3 1 1 {digest.lower()}"


def tlsa_name(hostname: str, port: int = 25) -> str:
    return f"_{port}._tcp.{hostname}"


def address_kind(ip: IPAddress) -> str:
    """``A`` or ``AAAA``."""
    return "A" if ip.version == 4 else "AAAA"


def mx_line(domain: str, hostname: str) -> str:
    return f"{domain}. IN MX 10 {hostname}."


def address_line(hostname: str, ip: IPAddress) -> str:
    return f"{hostname}. IN {address_kind(ip)} {ip}"


def txt_line(name: str, value: str) -> str:
    """A TXT record of one character-string (SPF and DMARC values fit in 255 bytes)."""
    quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name}. IN TXT {quoted}"


def ptr_line(ip: IPAddress, hostname: str) -> str:
    return f"{ip.reverse_pointer}. IN PTR {hostname}."


def local_dkim_records(
    dkim_dir: Path, domain: str, selectors: Sequence[str] = (), *, now: float | None = None
) -> list[DKIMRecord]:
    """The key records of ``domain`` under ``dkim_dir`` (``hato dkim keygen``'s keys),
    only those of ``selectors`` when any are given. With ``now``, a retired key whose
    grace period is over is left out (its record may go)."""
    records = [r for r in dkim_txt_records(dkim_dir) if r.domain == domain]
    if now is not None:
        expired = {
            key.selector
            for key, status in load_keys(dkim_dir)
            if key.domain == domain and (status.remove_after() or now + 1) <= now
        }
        records = [r for r in records if r.selector not in expired]
    if selectors:
        for selector in selectors:
            check_selector(selector)
        records = [r for r in records if r.selector in selectors]
    return records


def records_text(
    domain: str,
    hostname: str,
    ips: Sequence[IPAddress],
    dkim: Sequence[DKIMRecord],
    dkim_dir: Path,
    *,
    mta_sts: str | None = None,
    tlsrpt_rua: Sequence[str] = (),
    tlsa: str | None = None,
) -> str:
    """The whole output of ``hato dns records``. ``mta_sts`` is our MTA-STS policy text,
    ``tlsrpt_rua`` the addresses of ``_smtp._tls``, ``tlsa`` the ``3 1 1`` data of the
    current certificate (each left out when not given)."""
    spf, dmarc = spf_record(ips), dmarc_record(domain)
    zone = [
        f"; DNS records for {domain} (hato dns records). Add them at your DNS provider;",
        "; names end with a dot (absolute). Check them later with: hato dns check "
        + domain
        + "".join(f" --ip {ip}" for ip in ips),
        "",
        mx_line(domain, hostname),
    ]
    zone.extend(address_line(hostname, ip) for ip in ips)
    zone.append(txt_line(domain, spf))
    zone.extend(record.zone_line() for record in dkim)
    zone.append(txt_line(f"_dmarc.{domain}", dmarc))
    if mta_sts is not None:
        zone.append(txt_line(f"_mta-sts.{domain}", mta_sts_record(mta_sts)))
    if tlsrpt_rua:
        zone.append(txt_line(f"_smtp._tls.{domain}", tlsrpt_record(tlsrpt_rua)))
    if tlsa is not None:
        zone.append(f"{tlsa_name(hostname)}. IN TLSA {tlsa}")
    if not dkim:
        zone.append(
            f"; no DKIM key for {domain} under {dkim_dir}: make one with "
            f"hato dkim keygen --domain {domain} --selector SELECTOR"
        )
    zone.append("")
    if ips:
        zone.append(
            "; Reverse DNS is set by whoever owns the address (your VPS provider's panel), "
            "not at the registrar:"
        )
        zone.extend(ptr_line(ip, hostname) for ip in ips)
    else:
        zone.append("; give --ip ADDRESS to get the A/AAAA and PTR records of the server")

    words = [
        f'MX record: name "{domain}" (often written "@"), priority 10, value "{hostname}". '
        "Mail for the domain is delivered to this server."
    ]
    words.extend(
        f'{address_kind(ip)} record: name "{hostname}", value "{ip}" (skip it if the name '
        "already points there)."
        for ip in ips
    )
    words.append(
        f'SPF: a TXT record on "{domain}" with the value {spf} . Only one SPF record may '
        "exist: merge it into an existing one instead of adding a second."
    )
    words.extend(
        f'DKIM ({record.algorithm}): a TXT record named "{record.name}" with the value '
        f"{record.txt} . If the form limits a value to 255 characters, enter it as the "
        "quoted pieces of the zone line above."
        for record in dkim
    )
    if not dkim:
        words.append(
            f"DKIM: no key yet. Run hato dkim keygen --domain {domain} --selector SELECTOR, "
            "then run this command again."
        )
    words.append(
        f'DMARC: a TXT record named "_dmarc.{domain}" with the value {dmarc} . Reports go '
        f"to postmaster@{domain}; make sure that address exists (an alias will do)."
    )
    if mta_sts is not None:
        words.append(
            f'MTA-STS: a TXT record named "_mta-sts.{domain}" with the value '
            f"{mta_sts_record(mta_sts)} , and the policy (hato dns mta-sts-policy) served at "
            f"https://mta-sts.{domain}/.well-known/mta-sts.txt with a valid certificate for "
            f"mta-sts.{domain} (Hato's HTTP listener serves it, or place the file on your web "
            "server). The id changes whenever the policy does: update the record then. Start "
            "with mode testing, read the TLS reports, then switch HATO_MTA_STS_MODE to enforce."
        )
    if tlsrpt_rua:
        words.append(
            f'TLS-RPT: a TXT record named "_smtp._tls.{domain}" with the value '
            f"{tlsrpt_record(tlsrpt_rua)} . Other servers send daily reports about TLS to "
            "mail for your domain there; hato tls reports shows them."
        )
    if tlsa is not None:
        words.append(
            f'TLSA (DANE): a TLSA record named "{tlsa_name(hostname)}" with the value {tlsa} '
            "(it pins the public key of the current certificate; it helps only where the zone "
            "is DNSSEC-signed). Let's Encrypt renewals make a new key by default, which breaks "
            "the pin: either renew with the same key (certbot --reuse-key) or, before each "
            "renewal, publish the next key's TLSA record beside this one and remove the old "
            "one after the new certificate is in use."
        )
    words.extend(
        f'Reverse DNS (PTR): ask your hosting provider to set the name of {ip} to "{hostname}". '
        "Many receivers refuse mail from addresses without matching reverse DNS."
        for ip in ips
    )
    steps = ["", "In plain words:", ""]
    steps.extend(f"{n}. {text}" for n, text in enumerate(words, start=1))
    return "\n".join(zone + steps) + "\n"


# --- reading what DNS publishes ---------------------------------------------------------


def dkim_tags(txt: str) -> dict[str, str]:
    """The tags of a DKIM key record (whitespace inside values removed, RFC 6376 3.2)."""
    tags: dict[str, str] = {}
    for part in txt.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(value.split())
    return tags


def spf_verdict(record: str, ip: IPAddress) -> bool | None:
    """Whether the ``ip4``/``ip6`` mechanisms of an SPF record pass ``ip``; None when
    they do not but ``a``, ``mx``, ``include`` or ``redirect`` might (needs DNS)."""
    maybe = False
    for term in record.split()[1:]:
        qualifier = term[0] if term[0] in "+-~?" else "+"
        mechanism = term[1:] if term[0] in "+-~?" else term
        lower = mechanism.lower()
        if lower.startswith(("ip4:", "ip6:")):
            try:
                network = ipaddress.ip_network(mechanism[4:], strict=False)
            except ValueError:
                continue
            if network.version == ip.version and ip in network:
                return qualifier == "+"
        elif lower in ("a", "mx") or lower.startswith(
            ("a:", "a/", "mx:", "mx/", "include:", "redirect=", "exists:")
        ):
            maybe = True
        elif lower == "all":
            return False if not maybe else None
    return None if maybe else False


# --- the check --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One record's state: ``ok``, ``missing``, ``different`` or ``error``; ``fix`` says
    what to change when it is not ok."""

    status: str
    kind: str
    name: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def needs_attention(self) -> bool:
        """Wrong, missing or unknown; an optional record not published does not count."""
        return self.status not in (OK, OPTIONAL)

    def as_dict(self) -> dict[str, str]:
        return {
            "status": self.status,
            "kind": self.kind,
            "name": self.name,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class _Domain:
    """What the checks compare DNS with."""

    name: str
    hostname: str
    ips: Sequence[IPAddress]
    dkim: Sequence[DKIMRecord]
    selectors: Sequence[str]
    envelope_domain: str = ""
    tlsa: str | None = None  # "3 1 1 HEX" of the certificate in use
    live: tuple[str, int] | None = None  # where to ask the server for its certificate
    mta_sts_port: int = 443
    verify: ssl.SSLContext | bool = True
    timeout: float = 10.0


_Check = Callable[[Resolver, _Domain], Awaitable[list[Finding]]]


async def check_domain_records(
    resolver: Resolver,
    domain: str,
    hostname: str,
    ips: Sequence[IPAddress],
    dkim: Sequence[DKIMRecord],
    selectors: Sequence[str],
    *,
    envelope_domain: str | None = None,
    tlsa: str | None = None,
    mta_sts_port: int = 443,
    verify: ssl.SSLContext | bool = True,
    timeout: float = 10.0,
    live: tuple[str, int] | None = None,
) -> list[Finding]:
    """Ask DNS about every record :func:`records_text` advises, one finding per record.

    ``hostname`` is the mail server (the MX target and the name it says in HELO) and
    ``ips`` its public addresses; with none, the host name's addresses in DNS are taken
    as the server's. ``dkim`` are the local key records to compare with, ``selectors``
    the ones to look up (default: those of ``dkim``). ``envelope_domain`` is the domain
    of the envelope sender (default ``domain``), for DMARC's SPF alignment; ``tlsa``
    the ``3 1 1`` data of the certificate in use. The MTA-STS policy is fetched from
    ``https://mta-sts.DOMAIN:mta_sts_port/`` (its address from ``resolver``), its
    certificate checked with ``verify``. With ``live`` (host, port) the TLSA records are
    also compared with the certificate the server presents there after STARTTLS.
    """
    if not ips:
        try:
            published = await resolver.addresses(hostname)
        except DeliveryError as exc:
            return [Finding(ERROR, "A", hostname, f"DNS did not answer: {exc.reply}")]
        if not published:
            return [
                Finding(
                    MISSING,
                    "A",
                    hostname,
                    "the host name has no address in DNS",
                    f"add {hostname}. IN A <the server's address>, or give --ip",
                )
            ]
        ips = list(dict.fromkeys(ipaddress.ip_address(a) for a in published))
    site = _Domain(
        domain,
        hostname,
        ips,
        dkim,
        selectors,
        envelope_domain=(envelope_domain or domain).lower().rstrip("."),
        tlsa=tlsa,
        mta_sts_port=mta_sts_port,
        verify=verify,
        timeout=timeout,
        live=live,
    )
    checks: list[tuple[str, str, _Check]] = [
        ("MX", domain, _check_mx),
        ("A", hostname, _check_addresses),
        ("SPF", domain, _check_spf),
        ("DKIM", f"_domainkey.{domain}", _check_dkim),
        ("DMARC", f"_dmarc.{domain}", _check_dmarc),
        ("PTR", "in-addr.arpa", _check_ptr),
        ("MTA-STS", f"_mta-sts.{domain}", _check_mta_sts),
        ("TLS-RPT", f"_smtp._tls.{domain}", _check_tlsrpt),
        ("TLSA", tlsa_name(hostname), _check_tlsa),
    ]
    findings: list[Finding] = []
    for kind, name, check in checks:
        try:
            findings.extend(await check(resolver, site))
        except DeliveryError as exc:
            findings.append(Finding(ERROR, kind, name, f"DNS did not answer: {exc.reply}"))
    return findings


async def _check_mx(resolver: Resolver, site: _Domain) -> list[Finding]:
    domain, hostname = site.name, site.hostname
    records = await resolver.mx_records(domain)
    line = mx_line(domain, hostname)
    for preference, target in records:
        if target.rstrip(".") == hostname:
            return [Finding(OK, "MX", domain, f"MX {preference} {hostname}")]
    if not records:
        return [Finding(MISSING, "MX", domain, "no MX record", f"add {line}")]
    shown = ", ".join(f"{p} {t or '.'}" for p, t in records)
    return [Finding(DIFFERENT, "MX", domain, f"MX is {shown}, not {hostname}", f"set {line}")]


async def _check_addresses(resolver: Resolver, site: _Domain) -> list[Finding]:
    hostname = site.hostname
    published = {ipaddress.ip_address(a) for a in await resolver.addresses(hostname)}
    out = []
    for ip in site.ips:
        kind, line = address_kind(ip), address_line(hostname, ip)
        same_family = sorted((p for p in published if p.version == ip.version), key=str)
        if ip in published:
            out.append(Finding(OK, kind, hostname, str(ip)))
        elif not same_family:
            out.append(Finding(MISSING, kind, hostname, f"no {kind} record", f"add {line}"))
        else:
            shown = ", ".join(str(p) for p in same_family)
            out.append(Finding(DIFFERENT, kind, hostname, f"{kind} is {shown}", f"set {line}"))
    return out


async def _check_spf(resolver: Resolver, site: _Domain) -> list[Finding]:
    domain = site.name
    line = txt_line(domain, spf_record(site.ips))
    found = [t for t in await resolver.txt(domain) if t.lower().split(" ", 1)[0] == "v=spf1"]
    if not found:
        return [Finding(MISSING, "SPF", domain, "no SPF record", f"add {line}")]
    if len(found) > 1:
        detail = f"{len(found)} SPF records (receivers treat that as an error)"
        return [Finding(DIFFERENT, "SPF", domain, detail, f"keep one: {line}")]
    record = found[0]
    missing = [ip for ip in site.ips if spf_verdict(record, ip) is False]
    if missing:
        shown = ", ".join(str(ip) for ip in missing)
        return [
            Finding(DIFFERENT, "SPF", domain, f"{record!r} does not allow {shown}", f"set {line}")
        ]
    lookups = await spf_lookups(resolver, domain, record)
    if lookups > SPF_LOOKUP_LIMIT:
        detail = (
            f"{record!r} needs more than {SPF_LOOKUP_LIMIT} DNS lookups (include, a, mx, ptr, "
            "exists, redirect, counted through the includes); "
            f"receivers stop at {SPF_LOOKUP_LIMIT} and fail SPF (permerror)"
        )
        return [
            Finding(
                DIFFERENT,
                "SPF",
                domain,
                detail,
                f"flatten it: list this server as ip4:/ip6: ({line}) and drop includes you "
                "do not need",
            )
        ]
    unsure = [ip for ip in site.ips if spf_verdict(record, ip) is None]
    note = ""
    if unsure:
        shown = ", ".join(str(ip) for ip in unsure)
        note = f" (allows {shown} only via a/mx/include: not checked)"
    return [Finding(OK, "SPF", domain, record + note)]


async def _check_dkim(resolver: Resolver, site: _Domain) -> list[Finding]:
    domain = site.name
    out: list[Finding] = []
    local = {r.selector: r for r in site.dkim}
    for selector in site.selectors or sorted(local):
        name = f"{selector}._domainkey.{domain}"
        published = await resolver.txt(name)
        record = local.get(selector)
        if not published:
            fix = f"add {record.zone_line()}" if record else ""
            out.append(Finding(MISSING, "DKIM", name, "no TXT record", fix))
            continue
        tags = [dkim_tags(t) for t in published]
        if record is None:
            status = OK if any(t.get("p") for t in tags) else DIFFERENT
            out.append(Finding(status, "DKIM", name, "published (no local key to compare)"))
            continue
        want = dkim_tags(record.txt)
        algorithm = want.get("k", "rsa")
        if (
            len(published) == 1
            and tags[0].get("p") == want["p"]
            and tags[0].get("k", "rsa") == algorithm
        ):
            out.append(Finding(OK, "DKIM", name, f"{algorithm} key matches"))
            continue
        why = (
            f"{len(published)} TXT records (verifiers need exactly one)"
            if len(published) > 1
            else "the published key is not the key in use"
        )
        out.append(Finding(DIFFERENT, "DKIM", name, why, f"set {record.zone_line()}"))
    if not out:
        out.append(
            Finding(
                MISSING,
                "DKIM",
                domain,
                "no DKIM key to publish",
                f"hato dkim keygen --domain {domain} --selector SELECTOR, then hato dns records",
            )
        )
    return out


async def _check_dmarc(resolver: Resolver, site: _Domain) -> list[Finding]:
    name = f"_dmarc.{site.name}"
    line = txt_line(name, dmarc_record(site.name))
    found = [
        t for t in await resolver.txt(name) if t.replace(" ", "").lower().startswith("v=dmarc1")
    ]
    if not found:
        return [Finding(MISSING, "DMARC", name, "no DMARC record", f"add {line}")]
    if len(found) > 1:
        return [
            Finding(DIFFERENT, "DMARC", name, f"{len(found)} DMARC records", f"keep one: {line}")
        ]
    tags = dkim_tags(found[0])
    from_domain, envelope = site.name, site.envelope_domain or site.name
    dkim_ok = bool(site.dkim) and aligned(from_domain, from_domain, tags.get("adkim", "r"))
    spf_ok = aligned(envelope, from_domain, tags.get("aspf", "r"))
    if not dkim_ok and not spf_ok:
        return [
            Finding(
                DIFFERENT,
                "DMARC",
                name,
                f"{found[0]}: neither DKIM (no key for {from_domain}) nor SPF (envelope "
                f"domain {envelope}) aligns with the From domain {from_domain}",
                f"hato dkim keygen --domain {from_domain} --selector SELECTOR, or send with "
                f"an envelope sender @{from_domain}",
            )
        ]
    how = []
    if dkim_ok:
        how.append(f"DKIM d={from_domain}")
    if spf_ok:
        how.append(f"SPF envelope {envelope}")
    else:
        how.append(f"not SPF: envelope {envelope} is not aligned")
    return [
        Finding(
            OK,
            "DMARC",
            name,
            f"{found[0]} (aligned with From {from_domain}: " + ", ".join(how) + ")",
        )
    ]


def _organizational(domain: str) -> str:
    """An approximation of the organizational domain (RFC 7489 3.2) without the Public
    Suffix List: the last two labels, three under a two-letter second-level label
    (co.uk, com.au)."""
    labels = domain.lower().rstrip(".").split(".")
    if (
        len(labels) >= 3
        and len(labels[-1]) == 2
        and labels[-2] in ("co", "com", "net", "org", "ac", "gov", "ne", "or")
    ):
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """DMARC identifier alignment: strict ``s`` needs the same name, relaxed ``r`` the
    same organizational domain."""
    a, b = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode.strip().lower() == "s":
        return a == b
    return _organizational(a) == _organizational(b)


async def spf_lookups(resolver: Resolver, domain: str, record: str, *, depth: int = 0) -> int:
    """How many DNS-querying terms evaluating ``record`` takes, includes and redirects
    followed (RFC 7208 4.6.4); stops counting past the limit."""
    count = 0
    for term in record.split()[1:]:
        mechanism = term[1:] if term[:1] in "+-~?" else term
        lower = mechanism.lower()
        target = ""
        if lower.startswith("include:"):
            target = mechanism[8:]
        elif lower.startswith("redirect="):
            target = mechanism[9:]
        elif not (
            lower in ("a", "mx", "ptr")
            or lower.startswith(("a:", "a/", "mx:", "mx/", "ptr:", "exists:"))
        ):
            continue
        count += 1
        if target and depth < SPF_LOOKUP_LIMIT and count <= SPF_LOOKUP_LIMIT:
            nested = [
                t for t in await resolver.txt(target) if t.lower().split(" ", 1)[0] == "v=spf1"
            ]
            if len(nested) == 1:
                count += await spf_lookups(resolver, target, nested[0], depth=depth + 1)
        if count > SPF_LOOKUP_LIMIT:
            break
    return count


async def _check_ptr(resolver: Resolver, site: _Domain) -> list[Finding]:
    hostname = site.hostname
    out = []
    for ip in site.ips:
        name = ip.reverse_pointer
        names = [n.rstrip(".") for n in await resolver.ptr(str(ip))]
        fix = f"ask the provider of {ip} to set its reverse DNS to {hostname}"
        if hostname in names:
            out.append(Finding(OK, "PTR", name, f"{hostname} (the name this server says in HELO)"))
        elif not names:
            out.append(Finding(MISSING, "PTR", name, "no PTR record", fix))
        else:
            fix += f", or set HATO_HOSTNAME to {names[0]} if that name is yours (HELO and PTR must agree)"
            out.append(
                Finding(
                    DIFFERENT,
                    "PTR",
                    name,
                    f"PTR is {', '.join(names)}, but this server says HELO {hostname}",
                    fix,
                )
            )
    return out


# --- MTA-STS, TLS-RPT, TLSA: optional, but checked when published ---------------------


def parse_mta_sts_policy(text: str) -> dict[str, list[str]]:
    """The fields of an MTA-STS policy (RFC 8461 3.2): name → values (``mx`` repeats)."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: ``*.example.org`` matches one extra leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


async def fetch_mta_sts_policy(
    resolver: Resolver,
    domain: str,
    *,
    port: int = 443,
    verify: ssl.SSLContext | bool = True,
    timeout: float = 10.0,
) -> str:
    """GET ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (the address from
    ``resolver``, never the system's; no redirects; 64 KiB at most). Raises
    :class:`ConfigError` with what went wrong."""
    host = f"mta-sts.{domain}"
    addresses = await resolver.addresses(host)
    if not addresses:
        raise ConfigError(f"{host} has no address in DNS")
    errors = []
    for address in addresses:
        shown = f"[{address}]" if ":" in address else address
        url = f"https://{shown}:{port}/.well-known/mta-sts.txt"
        try:
            async with (
                httpx.AsyncClient(verify=verify, timeout=timeout, follow_redirects=False) as client,
                client.stream(
                    "GET", url, headers={"Host": host}, extensions={"sni_hostname": host}
                ) as response,
            ):
                if response.status_code != 200:
                    errors.append(f"{address}: HTTP {response.status_code}")
                    continue
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MTA_STS_MAX_POLICY:
                        raise ConfigError(f"policy at {host} is larger than 64 KiB")
                return body.decode("utf-8", "replace")
        except httpx.HTTPError as exc:
            errors.append(f"{address}: {type(exc).__name__}: {exc}")
    raise ConfigError(f"cannot fetch https://{host}/.well-known/mta-sts.txt: " + "; ".join(errors))


async def _check_mta_sts(resolver: Resolver, site: _Domain) -> list[Finding]:
    domain = site.name
    name = f"_mta-sts.{domain}"
    found = [t for t in await resolver.txt(name) if t.replace(" ", "").startswith("v=STSv1")]
    if not found:
        return [
            Finding(
                OPTIONAL,
                "MTA-STS",
                name,
                "no MTA-STS record (senders use TLS only opportunistically)",
                "publish the _mta-sts record of hato dns records and serve the policy "
                "(hato dns mta-sts-policy)",
            )
        ]
    if len(found) > 1:
        return [Finding(DIFFERENT, "MTA-STS", name, f"{len(found)} MTA-STS records", "keep one")]
    tags = dkim_tags(found[0].replace(" ", ""))
    if not tags.get("id") or not tags["id"].isalnum() or len(tags["id"]) > 32:
        return [
            Finding(
                DIFFERENT,
                "MTA-STS",
                name,
                f"{found[0]!r} has no valid id (1 to 32 letters and digits)",
                "set the record of hato dns records",
            )
        ]
    out = [Finding(OK, "MTA-STS", name, found[0])]
    policy_name = f"mta-sts.{domain}"
    try:
        text = await fetch_mta_sts_policy(
            resolver, domain, port=site.mta_sts_port, verify=site.verify, timeout=site.timeout
        )
    except ConfigError as exc:
        out.append(
            Finding(
                DIFFERENT,
                "MTA-STS",
                policy_name,
                f"policy fetch failed: {exc}",
                f"serve the policy at https://{policy_name}/.well-known/mta-sts.txt with a "
                f"certificate valid for {policy_name}",
            )
        )
        return out
    fields = parse_mta_sts_policy(text)
    problems = []
    if fields.get("version") != ["STSv1"]:
        problems.append("version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        problems.append(f"mode {mode!r} is not enforce, testing or none")
    max_age = (fields.get("max_age") or [""])[0]
    if not max_age.isdigit():
        problems.append("max_age is missing")
    patterns = fields.get("mx", [])
    mx_hosts = [t for _p, t in await resolver.mx_records(domain) if t]
    unmatched = [h for h in mx_hosts if not any(mx_matches(p, h) for p in patterns)]
    if unmatched:
        problems.append(f"MX {', '.join(unmatched)} not matched by mx: {', '.join(patterns)}")
    if not any(mx_matches(p, site.hostname) for p in patterns):
        problems.append(f"this server ({site.hostname}) is not among mx: {', '.join(patterns)}")
    if problems:
        out.append(
            Finding(
                DIFFERENT,
                "MTA-STS",
                policy_name,
                "policy: " + "; ".join(problems),
                "serve the policy of hato dns mta-sts-policy, then change the record's id",
            )
        )
    else:
        out.append(
            Finding(OK, "MTA-STS", policy_name, f"policy mode {mode}, mx {', '.join(patterns)}")
        )
    return out


async def _check_tlsrpt(resolver: Resolver, site: _Domain) -> list[Finding]:
    name = f"_smtp._tls.{site.name}"
    found = [t for t in await resolver.txt(name) if t.replace(" ", "").startswith("v=TLSRPTv1")]
    if not found:
        return [
            Finding(
                OPTIONAL,
                "TLS-RPT",
                name,
                "no TLS-RPT record (no reports about TLS to your mail)",
                "publish the _smtp._tls record of hato dns records",
            )
        ]
    if len(found) > 1:
        return [Finding(DIFFERENT, "TLS-RPT", name, f"{len(found)} TLS-RPT records", "keep one")]
    try:
        uris = parse_tlsrpt_record(found[0])
    except TLSReportError as exc:
        return [Finding(DIFFERENT, "TLS-RPT", name, str(exc), "set the record of hato dns records")]
    return [Finding(OK, "TLS-RPT", name, "reports to " + ", ".join(uris))]


async def _check_tlsa(resolver: Resolver, site: _Domain) -> list[Finding]:
    name = tlsa_name(site.hostname)
    published = await resolver.tlsa_records(name)
    line = f"{name}. IN TLSA {site.tlsa}" if site.tlsa else ""
    if not published:
        return [
            Finding(
                OPTIONAL,
                "TLSA",
                name,
                "no TLSA record (DANE; useful only in a DNSSEC-signed zone)",
                f"add {line}" if line else "set HATO_TLS_CERT_FILE, then hato dns records",
            )
        ]
    out: list[Finding] = []
    if site.live is not None:
        host, port = site.live
        where = f"{host}:{port}"
        try:
            digest = await live_certificate_spki_sha256(
                host, port, helo=site.hostname, timeout=site.timeout
            )
        except ConfigError as exc:
            out.append(Finding(ERROR, "TLSA", name, str(exc)))
        else:
            live_record = tlsa_record(digest)
            if live_record in published:
                out.append(
                    Finding(OK, "TLSA", name, f"{live_record} matches the certificate at {where}")
                )
            else:
                out.append(
                    Finding(
                        DIFFERENT,
                        "TLSA",
                        name,
                        f"no TLSA record matches the certificate the server presents at {where}: "
                        "DANE senders will not deliver",
                        f"add {name}. IN TLSA {live_record}",
                    )
                )
    if site.tlsa is None:
        if not out:
            out.append(
                Finding(
                    OK,
                    "TLSA",
                    name,
                    f"{len(published)} record(s) (no certificate here to compare)",
                )
            )
        return out
    if site.tlsa.lower() in published:
        out.append(Finding(OK, "TLSA", name, f"{site.tlsa} matches the current certificate"))
    else:
        out.append(
            Finding(
                DIFFERENT,
                "TLSA",
                name,
                "no TLSA record matches the current certificate: DANE senders will not deliver",
                f"add {line} (keep the old record until no certificate with its key is in use)",
            )
        )
    return out


# --- DKIM rotation: a pending key becomes active once DNS publishes it -------------------


async def activate_published(
    resolver: Resolver, dkim_dir: Path, domain: str, *, now: float
) -> list[str]:
    """Activate each pending key of ``domain`` whose record DNS publishes (exactly one
    TXT record with its key); the state changes, in words. DNS failures leave the key
    pending (raised as :class:`~hato.errors.DeliveryError`)."""
    changes: list[str] = []
    for key in pending_keys(dkim_dir, domain):
        published = [dkim_tags(t) for t in await resolver.txt(key.record.name)]
        want = dkim_tags(key.record.txt)
        if len(published) == 1 and published[0].get("p") == want.get("p"):
            changes.extend(activate_key(dkim_dir, domain, key.selector, now=now))
    return changes
