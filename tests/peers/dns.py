"""A test DNS: an authoritative server on loopback (UDP and TCP) serving zones the test writes.

Built on dnslib. Tests point Hato at it with ``HATO_DNS_SERVERS=127.0.0.1:PORT`` (or
``Resolver([dns.server])``), so no test ever asks the system resolver or a real name.

::

    with TestDNS() as dns:
        dns.mx("example.test", (10, "mx1.example.test"), (20, "mx2.example.test"))
        dns.a("mx1.example.test", "127.0.0.2")
        dns.null_mx("nomail.test")
        dns.servfail("broken.test")      # every query for the name answers SERVFAIL
        dns.drop("slow.test")            # no answer at all: the client times out
        dns.tlsa("_25._tcp.mx1.example.test", 3, 1, 1, digest)
        dns.signed("example.test")       # answers under it carry AD, as a validating
                                         # resolver's do for a DNSSEC-signed zone

A name with any record (of any type) exists: other types get NOERROR with no data;
unknown names get NXDOMAIN. Answers larger than 512 bytes over UDP are truncated, so
the client retries over TCP as it would with a real server (long DKIM TXT records).
Everything asked is kept in ``queries`` as ``(name, type)``.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
from collections.abc import Iterable
from typing import Any

from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RR, TLSA, TXT, A, DNSRecord
from dnslib.server import DNSError, DNSHandler, DNSLogger, DNSServer


class _Drop(DNSError):
    """Raised by the resolver to send no answer at all (dnslib logs DNSError and moves on)."""


class _Handler(DNSHandler):
    """Answers longer than 512 bytes over UDP are truncated (TC set), as a classic server
    does, so the client repeats the query over TCP. dnslib's own truncation drops the
    question section, which resolvers reject; this keeps it."""

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        packed: bytes = reply.pack()
        if self.protocol == "udp" and len(packed) > 512:
            truncated = request.reply()
            truncated.header.tc = 1
            packed = truncated.pack()
        return packed


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".") + "."


def _txt_chunks(text: str) -> list[bytes]:
    """One TXT value as character-strings of at most 255 bytes (RFC 1035 3.3.14)."""
    data = text.encode()
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


class _Zones:
    """The records and behaviours; the server threads read it under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, list[RR]] = {}
        self.servfail: set[str] = set()
        self.drop: set[str] = set()
        self.signed: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        reply.header.ad = 0  # dnslib copies the query's flags; AD is set below, or never
        qname = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((qname.rstrip("."), str(qtype)))
            if qname in self.drop:
                raise _Drop(f"dropping query for {qname}")
            if qname in self.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            records = self.records.get(qname)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for rr in records:
                if rr.rtype == request.q.qtype or (
                    rr.rtype == QTYPE.CNAME and request.q.qtype != QTYPE.CNAME
                ):
                    reply.add_answer(rr)
            reply.header.aa = 1
            if any(qname == z or qname.endswith("." + z) for z in self.signed):
                reply.header.ad = 1  # what a validating resolver says of a signed zone
        return reply


class TestDNS:
    """An authoritative DNS server on ``host`` (UDP and TCP on the same free port)."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._zones = _Zones()
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []

    # Lifecycle.

    def start(self) -> TestDNS:
        logger = DNSLogger("-request,-reply,-truncated,-error", prefix=False, logf=lambda _s: None)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        _UDPServer.address_family = family
        _TCPServer.address_family = family
        for _attempt in range(20):
            udp = DNSServer(
                self._zones,
                address=self.host,
                port=0,
                logger=logger,
                handler=_Handler,
                server=_UDPServer,
            )
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    self._zones,
                    address=self.host,
                    port=port,
                    tcp=True,
                    logger=logger,
                    handler=_Handler,
                    server=_TCPServer,
                )
            except OSError:
                udp.server.server_close()
                continue  # the TCP port of the same number is taken: pick another
            self.port = port
            self._servers = [udp, tcp]
            for server in self._servers:
                # A short poll interval keeps stop() quick (shutdown waits for one poll).
                thread = threading.Thread(
                    target=server.server.serve_forever,
                    kwargs={"poll_interval": 0.02},
                    daemon=True,
                    name=f"test-dns-{port}",
                )
                thread.start()
                self._threads.append(thread)
            return self
        raise RuntimeError("test DNS: no port free for both UDP and TCP")

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> TestDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def server(self) -> str:
        """This server as a ``HATO_DNS_SERVERS`` item: ``IP:PORT`` (``[v6]:PORT``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        with self._zones.lock:
            return list(self._zones.queries)

    # Zone data.

    def add(self, name: str, rr_type: str, rdata: Any, ttl: int = 60) -> None:
        """Add one record (dnslib rdata object) to ``name``."""
        key = _norm(name)
        rr = RR(key, getattr(QTYPE, rr_type), rdata=rdata, ttl=ttl)
        with self._zones.lock:
            self._zones.records.setdefault(key, []).append(rr)

    def mx(self, domain: str, *hosts: tuple[int, str]) -> None:
        for preference, host in hosts:
            self.add(domain, "MX", MX(_norm(host) if host != "." else ".", preference))

    def null_mx(self, domain: str) -> None:
        """RFC 7505: the single ``0 .`` record."""
        self.add(domain, "MX", MX(".", 0))

    def a(self, name: str, *addresses: str) -> None:
        for address in addresses:
            self.add(name, "A", A(address))

    def aaaa(self, name: str, *addresses: str) -> None:
        for address in addresses:
            self.add(name, "AAAA", AAAA(address))

    def txt(self, name: str, *values: str) -> None:
        for value in values:
            self.add(name, "TXT", TXT(_txt_chunks(value)))

    def tlsa(self, name: str, usage: int, selector: int, mtype: int, data: bytes | str) -> None:
        """A TLSA record (RFC 6698) at ``name`` (``_25._tcp.HOST``); ``data`` as bytes or
        hex, e.g. ``tlsa("_25._tcp.mx.example.test", 3, 1, 1, digest)``."""
        raw = bytes.fromhex(data) if isinstance(data, str) else data
        self.add(name, "TLSA", TLSA(usage, selector, mtype, raw))

    def signed(self, *zones: str) -> None:
        """Answers for names in ``zones`` (and below) carry the AD bit: this server then
        plays a validating resolver for a DNSSEC-signed zone."""
        with self._zones.lock:
            self._zones.signed.update(_norm(z) for z in zones)

    def unsigned(self, *zones: str) -> None:
        with self._zones.lock:
            self._zones.signed.difference_update(_norm(z) for z in zones)

    def ptr(self, ip: str, name: str) -> None:
        self.add(ipaddress.ip_address(ip).reverse_pointer, "PTR", PTR(_norm(name)))

    def exists(self, name: str) -> None:
        """Make ``name`` exist with no records (NOERROR/NODATA for every type)."""
        with self._zones.lock:
            self._zones.records.setdefault(_norm(name), [])

    def remove(self, name: str, rr_type: str | None = None) -> None:
        """Remove ``name``'s records (of one type, or all: the name then does not exist)."""
        key = _norm(name)
        with self._zones.lock:
            if rr_type is None:
                self._zones.records.pop(key, None)
            elif key in self._zones.records:
                code = getattr(QTYPE, rr_type)
                self._zones.records[key] = [r for r in self._zones.records[key] if r.rtype != code]

    def servfail(self, *names: str) -> None:
        with self._zones.lock:
            self._zones.servfail.update(_norm(n) for n in names)

    def drop(self, *names: str) -> None:
        with self._zones.lock:
            self._zones.drop.update(_norm(n) for n in names)

    def zone(self, records: Iterable[tuple[str, str, Any]]) -> None:
        """Several ``(name, type, rdata)`` at once."""
        for name, rr_type, rdata in records:
            self.add(name, rr_type, rdata)
