"""The DNS records a mail domain publishes, and how to check them.

Besides its MX and the server's A/AAAA, a relay server's domain publishes the records
that let receivers trust its mail: SPF (RFC 7208), one DKIM key record per selector
(RFC 6376 3.6.1) and DMARC (RFC 7489); the PTR of each address is set by whoever owns
the address, not at the registrar. This module knows what each record should say and
how to compare it with what DNS publishes:

* builders: :func:`spf_record`, :func:`dmarc_record`, the zone-file lines
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

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hato.dkim import DKIMRecord, activate_key, check_selector, dkim_txt_records, pending_keys
from hato.dns import Resolver
from hato.errors import DeliveryError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

OK = "ok"
MISSING = "missing"
DIFFERENT = "different"
ERROR = "error"


# --- what to publish --------------------------------------------------------------------


def spf_record(ips: Sequence[IPAddress]) -> str:
    """``v=spf1 ip4:… ip6:… -all``; with no address, ``mx`` (the MX hosts may send)."""
    if not ips:
        return "v=spf1 mx -all"
    mechanisms = [f"ip{ip.version}:{ip}" for ip in ips]
    return "v=spf1 " + " ".join(mechanisms) + " -all"


def dmarc_record(domain: str) -> str:
    return f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"


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
    dkim_dir: Path, domain: str, selectors: Sequence[str] = ()
) -> list[DKIMRecord]:
    """The key records of ``domain`` under ``dkim_dir`` (``hato dkim keygen``'s keys),
    only those of ``selectors`` when any are given."""
    records = [r for r in dkim_txt_records(dkim_dir) if r.domain == domain]
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
) -> str:
    """The whole output of ``hato dns records``."""
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


@dataclass(frozen=True, slots=True)
class _Domain:
    """What the checks compare DNS with."""

    name: str
    hostname: str
    ips: Sequence[IPAddress]
    dkim: Sequence[DKIMRecord]
    selectors: Sequence[str]


_Check = Callable[[Resolver, _Domain], Awaitable[list[Finding]]]


async def check_domain_records(
    resolver: Resolver,
    domain: str,
    hostname: str,
    ips: Sequence[IPAddress],
    dkim: Sequence[DKIMRecord],
    selectors: Sequence[str],
) -> list[Finding]:
    """Ask DNS about every record :func:`records_text` advises, one finding per record.

    ``hostname`` is the mail server (the MX target) and ``ips`` its public addresses;
    with none, the host name's addresses in DNS are taken as the server's. ``dkim`` are
    the local key records to compare with, ``selectors`` the ones to look up (default:
    those of ``dkim``).
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
    site = _Domain(domain, hostname, ips, dkim, selectors)
    checks: list[tuple[str, str, _Check]] = [
        ("MX", domain, _check_mx),
        ("A", hostname, _check_addresses),
        ("SPF", domain, _check_spf),
        ("DKIM", f"_domainkey.{domain}", _check_dkim),
        ("DMARC", f"_dmarc.{domain}", _check_dmarc),
        ("PTR", "in-addr.arpa", _check_ptr),
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
    return [Finding(OK, "DMARC", name, found[0])]


async def _check_ptr(resolver: Resolver, site: _Domain) -> list[Finding]:
    hostname = site.hostname
    out = []
    for ip in site.ips:
        name = ip.reverse_pointer
        names = [n.rstrip(".") for n in await resolver.ptr(str(ip))]
        fix = f"ask the provider of {ip} to set its reverse DNS to {hostname}"
        if hostname in names:
            out.append(Finding(OK, "PTR", name, hostname))
        elif not names:
            out.append(Finding(MISSING, "PTR", name, "no PTR record", fix))
        else:
            out.append(Finding(DIFFERENT, "PTR", name, f"PTR is {', '.join(names)}", fix))
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
