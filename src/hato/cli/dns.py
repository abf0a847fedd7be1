"""``hato dns``: the DNS records a relay server needs, and a check of what DNS publishes.

``hato dns records DOMAIN --ip IP`` prints what to add at the registrar, in zone-file
form and then in plain words for a web form: the MX, an A/AAAA record for the server's
host name, SPF (``v=spf1 ip4:… -all`` as in the guide), each DKIM selector's TXT (from
the keys ``hato dkim keygen`` wrote), DMARC, and the PTR the hosting provider must set.

It also prints our own MTA-STS record (``_mta-sts``; the policy itself is ``hato dns
mta-sts-policy``, or ``/.well-known/mta-sts.txt`` on Hato's HTTP listener), the
``_smtp._tls`` TLS-RPT record and, with HATO_TLS_CERT_FILE, the TLSA record of the
certificate with the advice for Let's Encrypt renewals.

``hato dns check DOMAIN`` asks DNS (HATO_DNS_SERVERS, or ``--dns-server``) for each of
them and prints one line per record: ``ok``, ``missing``, ``different`` or ``error``
(DNS did not answer), with the fix. The exit status is 1 when anything is not ok.

What the records say and how they are compared is :mod:`hato.records`; this module
reads the arguments and prints.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from hato.cli import friendly, main, make_settings, run, settings_options
from hato.config import Settings
from hato.dkim import check_domain
from hato.dns import Resolver
from hato.errors import ConfigError, DeliveryError
from hato.records import (
    OPTIONAL,
    Finding,
    IPAddress,
    activate_published,
    check_domain_records,
    local_dkim_records,
    mta_sts_policy,
    read_certificate_tlsa,
    records_text,
)


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


def _lines(finding: Finding) -> list[str]:
    out = [f"{finding.status:<9} {finding.kind:<5} {finding.name}: {finding.detail}"]
    if finding.fix:
        out.append(f"{'':<9} {'':<5} fix: {finding.fix}")
    return out


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
    dkim = local_dkim_records(key_dir, domain, selectors, now=time.time())
    missing = [s for s in selectors if s not in {r.selector for r in dkim}]
    if missing:
        raise ConfigError(
            f"no DKIM key for selector {missing[0]!r} of {domain} under {key_dir} "
            f"(hato dkim keygen --domain {domain} --selector {missing[0]})"
        )
    tlsa = read_certificate_tlsa(settings.tls_cert_file) if settings.tls_cert_file else None
    text = records_text(
        domain,
        host,
        _parse_ips(ips),
        dkim,
        key_dir,
        mta_sts=own_mta_sts_policy(settings),
        tlsrpt_rua=settings.effective_tlsrpt_rua(domain),
        tlsa=tlsa,
    )
    click.echo(text, nl=False)


def own_mta_sts_policy(settings: Settings) -> str:
    """Our MTA-STS policy from the settings: the relay's host name as the one MX."""
    return mta_sts_policy(
        [settings.hostname.lower().rstrip(".")], settings.mta_sts_mode, settings.mta_sts_max_age
    )


@dns.command("mta-sts-policy")
@settings_options
@click.option("--hostname", help="The server's host name, the MX target (HATO_HOSTNAME).")
@friendly
def mta_sts_policy_command(
    config_file: Path | None, data_dir: Path | None, queue_url: str | None, hostname: str | None
) -> None:
    """Print our MTA-STS policy: the file to serve as
    https://mta-sts.DOMAIN/.well-known/mta-sts.txt (hato dns mta-sts-policy > mta-sts.txt)."""
    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)
    host = _hostname(hostname, settings.hostname)
    text = mta_sts_policy([host], settings.mta_sts_mode, settings.mta_sts_max_age)
    click.echo(text, nl=False)


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
@click.option(
    "--envelope-domain",
    help="Domain of the envelope sender (MAIL FROM) of your mail, for DMARC's SPF "
    "alignment; default DOMAIN.",
)
@click.option(
    "--mta-sts-port",
    type=click.IntRange(1, 65535),
    default=443,
    show_default=True,
    help="Port of the MTA-STS policy fetch (tests).",
)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A CA to trust besides the system's for the MTA-STS policy fetch.",
)
@click.option(
    "--live",
    metavar="HOST:PORT",
    help="Also compare TLSA with the certificate the SMTP server at HOST:PORT presents "
    "after STARTTLS (e.g. the server's address:25).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
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
    envelope_domain: str | None,
    mta_sts_port: int,
    ca_file: Path | None,
    live: str | None,
    as_json: bool,
) -> None:
    """Ask DNS for DOMAIN's records and say which are ok, missing or different, with
    the fix for each: MX, A/AAAA, PTR and HELO, SPF (and its lookup count), every DKIM
    selector, DMARC and its alignment, MTA-STS (record, policy, MX match), TLS-RPT, and
    TLSA against the certificate in use. A pending DKIM key (hato dkim rotate) that DNS
    publishes becomes the signing key.

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
    dkim = local_dkim_records(settings.effective_dkim_dir, domain, selectors, now=time.time())
    resolver = Resolver(
        settings.dns_servers, timeout=min(timeout, 5.0), lifetime=timeout, cache=False
    )
    addresses = _parse_ips(ips)
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        verify = ssl.create_default_context()
        try:
            verify.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--ca-file {ca_file}: {exc}") from None
    tlsa = read_certificate_tlsa(settings.tls_cert_file) if settings.tls_cert_file else None
    live_at: tuple[str, int] | None = None
    if live is not None:
        live_host, sep, live_port = live.strip().rpartition(":")
        if not sep or not live_port.isdigit() or not 0 < int(live_port) < 65536:
            raise ConfigError(f"--live {live!r} is not HOST:PORT")
        live_at = (live_host.strip("[]"), int(live_port))
    findings = run(
        check_domain_records(
            resolver,
            domain,
            host,
            addresses,
            dkim,
            selectors,
            envelope_domain=envelope_domain,
            tlsa=tlsa,
            mta_sts_port=mta_sts_port,
            verify=verify,
            timeout=timeout,
            live=live_at,
        )
    )
    try:  # hato dkim rotate's next key signs once DNS publishes it
        changes = run(
            activate_published(resolver, settings.effective_dkim_dir, domain, now=time.time())
        )
    except DeliveryError:
        changes = []  # the DKIM finding above already says DNS did not answer
    bad = [f for f in findings if f.needs_attention]
    optional = [f for f in findings if f.status == OPTIONAL]
    counted = len(findings) - len(optional)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "domain": domain,
                    "hostname": host,
                    "servers": resolver.servers,
                    "ok": not bad,
                    "findings": [f.as_dict() for f in findings],
                    "dkim_changes": changes,
                },
                indent=2,
            )
        )
        if bad:
            raise SystemExit(1)
        return
    click.echo(f"; {domain} via {', '.join(resolver.servers)} (mail server {host})")
    for finding in findings:
        for line in _lines(finding):
            click.echo(line)
    for change in changes:
        click.echo(f"; dkim: {change}")
    if optional:
        click.echo(
            f"; not published (optional): {', '.join(f.kind for f in optional)}",
        )
    if bad:
        click.echo(f"{len(bad)} of {counted} record(s) need attention", err=True)
        raise SystemExit(1)
    click.echo(f"all {counted} record(s) ok")
