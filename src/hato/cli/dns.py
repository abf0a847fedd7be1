"""``hato dns``: the DNS records a relay server needs, and a check of what DNS publishes.

``hato dns records DOMAIN --ip IP`` prints what to add at the registrar, in zone-file
form and then in plain words for a web form: the MX, an A/AAAA record for the server's
host name, SPF (``v=spf1 ip4:… -all`` as in the guide), each DKIM selector's TXT (from
the keys ``hato dkim keygen`` wrote), DMARC, and the PTR the hosting provider must set.

``hato dns check DOMAIN`` asks DNS (HATO_DNS_SERVERS, or ``--dns-server``) for each of
them and prints one line per record: ``ok``, ``missing``, ``different`` or ``error``
(DNS did not answer), with the fix. The exit status is 1 when anything is not ok.

The record texts and the comparisons are plain functions of their inputs, so they are
tested without DNS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from hato.cli import friendly, main, make_settings, run, settings_options
from hato.dkim import DKIMRecord, check_domain, check_selector, dkim_txt_records
from hato.dns import Resolver
from hato.errors import ConfigError, DeliveryError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- the records ------------------------------------------------------------------------


def spf_record(ips: Sequence[IPAddress]) -> str:
    """``v=spf1 ip4:… ip6:… -all``; with no address, ``mx`` (the MX hosts may send)."""
    if not ips:
        return "v=spf1 mx -all"
    mechanisms = [f"ip{ip.version}:{ip}" for ip in ips]
    return "v=spf1 " + " ".join(mechanisms) + " -all"


def dmarc_record(domain: str) -> str:
    return f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
        f"{domain}. IN MX 10 {hostname}.",
    ]
    for ip in ips:
        zone.append(f"{hostname}. IN {'A' if ip.version == 4 else 'AAAA'} {ip}")
    zone.append(f"{domain}. IN TXT {_quoted(spf)}")
    zone.extend(record.zone_line() for record in dkim)
    zone.append(f"_dmarc.{domain}. IN TXT {_quoted(dmarc)}")
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
        zone.extend(f"{ip.reverse_pointer}. IN PTR {hostname}." for ip in ips)
    else:
        zone.append("; give --ip ADDRESS to get the A/AAAA and PTR records of the server")

    steps = ["", "In plain words:", ""]
    n = 0

    def step(text: str) -> None:
        nonlocal n
        n += 1
        steps.append(f"{n}. {text}")

    step(
        f'MX record: name "{domain}" (often written "@"), priority 10, value "{hostname}". '
        "Mail for the domain is delivered to this server."
    )
    for ip in ips:
        kind = "A" if ip.version == 4 else "AAAA"
        step(
            f'{kind} record: name "{hostname}", value "{ip}" (skip it if the name already '
            "points there)."
        )
    step(
        f'SPF: a TXT record on "{domain}" with the value {spf} . Only one SPF record may '
        "exist: merge it into an existing one instead of adding a second."
    )
    for record in dkim:
        step(
            f'DKIM ({record.algorithm}): a TXT record named "{record.name}" with the value '
            f"{record.txt} . If the form limits a value to 255 characters, enter it as the "
            "quoted pieces of the zone line above."
        )
    if not dkim:
        step(
            f"DKIM: no key yet. Run hato dkim keygen --domain {domain} --selector SELECTOR, "
            "then run this command again."
        )
    step(
        f'DMARC: a TXT record named "_dmarc.{domain}" with the value {dmarc} . Reports go '
        f"to postmaster@{domain}; make sure that address exists (an alias will do)."
    )
    if ips:
        for ip in ips:
            step(
                f'Reverse DNS (PTR): ask your hosting provider to set the name of {ip} to "{hostname}". '
                "Many receivers refuse mail from addresses without matching reverse DNS."
            )
    return "\n".join(zone + steps) + "\n"


# --- the check --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One record's state: ``ok``, ``missing``, ``different`` or ``error``."""

    status: str
    kind: str
    name: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def lines(self) -> list[str]:
        out = [f"{self.status:<9} {self.kind:<5} {self.name}: {self.detail}"]
        if self.fix:
            out.append(f"{'':<9} {'':<5} fix: {self.fix}")
        return out


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


async def check_domain_records(
    resolver: Resolver,
    domain: str,
    hostname: str,
    ips: Sequence[IPAddress],
    dkim: Sequence[DKIMRecord],
    selectors: Sequence[str],
) -> list[Finding]:
    """Ask DNS about every record ``hato dns records`` prints."""
    findings: list[Finding] = []

    async def guarded(kind: str, name: str, check: Callable[[], Awaitable[list[Finding]]]) -> None:
        try:
            findings.extend(await check())
        except DeliveryError as exc:
            findings.append(Finding("error", kind, name, f"DNS did not answer: {exc.reply}"))

    async def mx() -> list[Finding]:
        records = await resolver.mx_records(domain)
        line = f"{domain}. IN MX 10 {hostname}."
        targets = [target.rstrip(".") for _, target in records]
        if hostname in targets:
            pref = next(p for p, t in records if t.rstrip(".") == hostname)
            return [Finding("ok", "MX", domain, f"MX {pref} {hostname}")]
        if not records:
            return [Finding("missing", "MX", domain, "no MX record", f"add {line}")]
        shown = ", ".join(f"{p} {t or '.'}" for p, t in records)
        return [Finding("different", "MX", domain, f"MX is {shown}, not {hostname}", f"set {line}")]

    async def addresses() -> list[Finding]:
        published = {ipaddress.ip_address(a) for a in await resolver.addresses(hostname)}
        out = []
        for ip in ips:
            kind = "A" if ip.version == 4 else "AAAA"
            line = f"{hostname}. IN {kind} {ip}"
            if ip in published:
                out.append(Finding("ok", kind, hostname, str(ip)))
            elif not any(p.version == ip.version for p in published):
                out.append(Finding("missing", kind, hostname, f"no {kind} record", f"add {line}"))
            else:
                shown = ", ".join(
                    str(p) for p in sorted(published, key=str) if p.version == ip.version
                )
                out.append(
                    Finding("different", kind, hostname, f"{kind} is {shown}", f"set {line}")
                )
        return out

    async def spf() -> list[Finding]:
        expected = spf_record(ips)
        line = f"{domain}. IN TXT {_quoted(expected)}"
        found = [t for t in await resolver.txt(domain) if t.lower().split(" ", 1)[0] == "v=spf1"]
        if not found:
            return [Finding("missing", "SPF", domain, "no SPF record", f"add {line}")]
        if len(found) > 1:
            return [
                Finding(
                    "different",
                    "SPF",
                    domain,
                    f"{len(found)} SPF records (receivers treat that as an error)",
                    f"keep one: {line}",
                )
            ]
        record = found[0]
        missing = [ip for ip in ips if spf_verdict(record, ip) is False]
        unsure = [ip for ip in ips if spf_verdict(record, ip) is None]
        if missing:
            shown = ", ".join(str(ip) for ip in missing)
            return [
                Finding(
                    "different", "SPF", domain, f"{record!r} does not allow {shown}", f"set {line}"
                )
            ]
        note = ""
        if unsure:
            note = (
                " (allows "
                + ", ".join(str(ip) for ip in unsure)
                + " only via a/mx/include: not checked)"
            )
        return [Finding("ok", "SPF", domain, record + note)]

    async def dkim_check() -> list[Finding]:
        out: list[Finding] = []
        local = {r.selector: r for r in dkim}
        for selector in selectors or sorted(local):
            name = f"{selector}._domainkey.{domain}"
            published = await resolver.txt(name)
            record = local.get(selector)
            fix = f"add {record.zone_line()}" if record else ""
            if not published:
                out.append(Finding("missing", "DKIM", name, "no TXT record", fix))
                continue
            tags = [dkim_tags(t) for t in published]
            if record is None:
                status = "ok" if any(t.get("p") for t in tags) else "different"
                out.append(Finding(status, "DKIM", name, "published (no local key to compare)"))
                continue
            want = dkim_tags(record.txt)
            if (
                len(published) == 1
                and tags[0].get("p") == want["p"]
                and tags[0].get("k", "rsa") == want.get("k", "rsa")
            ):
                out.append(Finding("ok", "DKIM", name, f"{want.get('k', 'rsa')} key matches"))
            else:
                why = (
                    f"{len(published)} TXT records (verifiers need exactly one)"
                    if len(published) > 1
                    else "the published key is not the key in use"
                )
                out.append(Finding("different", "DKIM", name, why, f"set {record.zone_line()}"))
        if not out:
            out.append(
                Finding(
                    "missing",
                    "DKIM",
                    domain,
                    "no DKIM key to publish",
                    f"hato dkim keygen --domain {domain} --selector SELECTOR, then hato dns records",
                )
            )
        return out

    async def dmarc() -> list[Finding]:
        name = f"_dmarc.{domain}"
        line = f"{name}. IN TXT {_quoted(dmarc_record(domain))}"
        found = [
            t for t in await resolver.txt(name) if t.replace(" ", "").lower().startswith("v=dmarc1")
        ]
        if not found:
            return [Finding("missing", "DMARC", name, "no DMARC record", f"add {line}")]
        if len(found) > 1:
            return [
                Finding(
                    "different", "DMARC", name, f"{len(found)} DMARC records", f"keep one: {line}"
                )
            ]
        return [Finding("ok", "DMARC", name, found[0])]

    async def ptr() -> list[Finding]:
        out = []
        for ip in ips:
            name = ip.reverse_pointer
            names = [n.rstrip(".") for n in await resolver.ptr(str(ip))]
            fix = f"ask the provider of {ip} to set its reverse DNS to {hostname}"
            if hostname in names:
                out.append(Finding("ok", "PTR", name, hostname))
            elif not names:
                out.append(Finding("missing", "PTR", name, "no PTR record", fix))
            else:
                out.append(Finding("different", "PTR", name, f"PTR is {', '.join(names)}", fix))
        return out

    await guarded("MX", domain, mx)
    if ips:
        await guarded("A", hostname, addresses)
    await guarded("SPF", domain, spf)
    await guarded("DKIM", f"_domainkey.{domain}", dkim_check)
    await guarded("DMARC", f"_dmarc.{domain}", dmarc)
    if ips:
        await guarded("PTR", "in-addr.arpa", ptr)
    return findings


# --- the commands -----------------------------------------------------------------------


def _parse_ips(values: Sequence[str]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for value in values:
        try:
            ip = ipaddress.ip_address(value.strip().strip("[]"))
        except ValueError:
            raise ConfigError(f"--ip {value!r} is not an IP address") from None
        if ip not in out:
            out.append(ip)
    return out


def _local_dkim(dkim_dir: Path, domain: str, selectors: Sequence[str]) -> list[DKIMRecord]:
    records = [r for r in dkim_txt_records(dkim_dir) if r.domain == domain]
    if selectors:
        for selector in selectors:
            check_selector(selector)
        records = [r for r in records if r.selector in selectors]
    return records


def _hostname(value: str | None, settings_hostname: str) -> str:
    name = (value or settings_hostname).strip().lower().rstrip(".")
    if "." not in name:
        raise ConfigError(
            f"host name {name!r} is not fully qualified: set HATO_HOSTNAME or --hostname "
            "(the name the MX record points to, e.g. mail.example.org)"
        )
    return check_domain(name)


@main.group()
def dns() -> None:
    """DNS records for the relay server: print them, check them."""


_common = [
    click.argument("domain"),
    click.option("--ip", "ips", multiple=True, help="The server's public address; repeatable."),
    click.option(
        "--selector", "selectors", multiple=True, help="DKIM selector(s); default: all keys."
    ),
    click.option("--hostname", help="The server's host name, the MX target (HATO_HOSTNAME)."),
    click.option(
        "--dkim-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="DKIM key directory (HATO_DKIM_DIR).",
    ),
]


def _with_common(func: Callable[..., object]) -> Callable[..., object]:
    for decorator in reversed(_common):
        func = decorator(func)
    return func


@dns.command("records")
@settings_options
@_with_common
@friendly
def records(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    domain: str,
    ips: tuple[str, ...],
    selectors: tuple[str, ...],
    hostname: str | None,
    dkim_dir: Path | None,
) -> None:
    """Print the records to add at the registrar for DOMAIN."""
    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url, dkim_dir=dkim_dir)
    domain = check_domain(domain)
    host = _hostname(hostname, settings.hostname)
    key_dir = settings.effective_dkim_dir
    dkim = _local_dkim(key_dir, domain, selectors)
    missing = [s for s in selectors if s not in {r.selector for r in dkim}]
    if missing:
        raise ConfigError(
            f"no DKIM key for selector {missing[0]!r} of {domain} under {key_dir} "
            f"(hato dkim keygen --domain {domain} --selector {missing[0]})"
        )
    click.echo(records_text(domain, host, _parse_ips(ips), dkim, key_dir), nl=False)


@dns.command("check")
@settings_options
@_with_common
@click.option(
    "--dns-server",
    "dns_servers",
    multiple=True,
    help="Resolver IP[:PORT] to ask; repeatable (default HATO_DNS_SERVERS, else the system's).",
)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per lookup.")
@friendly
def check(
    config_file: Path | None,
    data_dir: Path | None,
    queue_url: str | None,
    domain: str,
    ips: tuple[str, ...],
    selectors: tuple[str, ...],
    hostname: str | None,
    dkim_dir: Path | None,
    dns_servers: tuple[str, ...],
    timeout: float,
) -> None:
    """Ask DNS for DOMAIN's records and say which are ok, missing or different.

    Without --ip, the addresses of the host name in DNS are taken as the server's.
    """
    settings = make_settings(
        config_file,
        data_dir=data_dir,
        queue_url=queue_url,
        dkim_dir=dkim_dir,
        dns_servers=list(dns_servers) or None,
    )
    domain = check_domain(domain)
    host = _hostname(hostname, settings.hostname)
    dkim = _local_dkim(settings.effective_dkim_dir, domain, selectors)
    resolver = Resolver(
        settings.dns_servers, timeout=min(timeout, 5.0), lifetime=timeout, cache=False
    )
    addresses = _parse_ips(ips)

    async def go() -> list[Finding]:
        found = list(addresses)
        if not found:
            try:
                found = _parse_ips(await resolver.addresses(host))
            except DeliveryError as exc:
                return [Finding("error", "A", host, f"DNS did not answer: {exc.reply}")]
            if not found:
                return [
                    Finding(
                        "missing",
                        "A",
                        host,
                        "the host name has no address in DNS",
                        f"add {host}. IN A <the server's address>, or give --ip",
                    )
                ]
        return await check_domain_records(resolver, domain, host, found, dkim, selectors)

    findings = run(go())
    click.echo(f"; {domain} via {', '.join(resolver.servers)} (mail server {host})")
    for finding in findings:
        for line in finding.lines():
            click.echo(line)
    bad = [f for f in findings if not f.ok]
    if bad:
        click.echo(f"{len(bad)} of {len(findings)} record(s) need attention", err=True)
        raise SystemExit(1)
    click.echo(f"all {len(findings)} record(s) ok")
