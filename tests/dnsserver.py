"""A real authoritative DNS server on loopback for tests (dnslib, UDP and TCP on one port).

It fixes the stock dnslib ZoneResolver, which answers NXDOMAIN for an existing name that lacks
the asked type: here that is NOERROR/NODATA with the zone's SOA in the authority section, as a
real server answers, so "no MX -> use A" and negative-caching code can be tested for real.
"""

from __future__ import annotations

import errno
import threading
from types import TracebackType

from dnslib import QTYPE, RCODE, RR, DNSError, DNSLabel, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer

# Used when the zone text has no SOA covering a name: negative answers still need one
# (RFC 2308), and its MINIMUM (60 s) is what resolvers use as the negative TTL.
_DEFAULT_SOA = "{apex} 60 IN SOA ns.{apex} hostmaster.{apex} 1 3600 600 86400 60"


class _DropReply(DNSError):
    """Raised instead of answering: dnslib's handler catches DNSError and sends nothing."""


class _Handler(DNSHandler):
    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        if reply is None:
            raise _DropReply("dropped on purpose (timeout simulation)")
        return reply.pack()


class _FixedZoneResolver:
    """Answers from a list of RRs; NXDOMAIN only for absent names, NODATA otherwise."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[RR] = []
        self.servfail: set[DNSLabel] = set()
        self.timeout: set[DNSLabel] = set()
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord | None:
        qname, qtype = request.q.qname, request.q.qtype
        with self.lock:
            self.queries.append((str(qname).rstrip(".").lower(), QTYPE[qtype]))
            if qname in self.timeout:
                return None
            reply = request.reply()
            if qname in self.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            self._answer(reply, qname, qtype)
        return reply

    def _answer(self, reply: DNSRecord, qname: DNSLabel, qtype: int) -> None:
        name = qname
        for _ in range(8):  # follow in-zone CNAME chains, with a loop guard
            matches = [rr for rr in self.records if rr.rname == name]
            wanted = [rr for rr in matches if qtype in (rr.rtype, QTYPE.ANY)]
            cname = [rr for rr in matches if rr.rtype == QTYPE.CNAME]
            if wanted or not cname:
                break
            reply.add_answer(*cname)
            name = cname[0].rdata.label
        for rr in wanted:
            reply.add_answer(rr)
        if wanted or reply.rr:
            return
        if not self._exists(name):
            reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(self._soa_for(name))

    def _exists(self, name: DNSLabel) -> bool:
        # A name also exists when it only has children (an "empty non-terminal").
        return any(rr.rname == name or rr.rname.matchSuffix(name) for rr in self.records)

    def _soa_for(self, name: DNSLabel) -> RR:
        soas = [
            rr
            for rr in self.records
            if rr.rtype == QTYPE.SOA and (rr.rname == name or name.matchSuffix(rr.rname))
        ]
        if soas:
            return max(soas, key=lambda rr: len(rr.rname.label))
        apex = (name.label[-1].decode() if name.label else "") + "."
        return RR.fromZone(_DEFAULT_SOA.format(apex=apex))[0]


class DnsServer:
    """`with DnsServer(zone_text) as dns: ...` — serve zone_text on 127.0.0.1, UDP+TCP, one port."""

    def __init__(self, zone: str = "", host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._wanted_port = port
        self._resolver = _FixedZoneResolver()
        self._servers: list[DNSServer] = []
        self.port = 0
        if zone:
            self.add(zone)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(qname without trailing dot, lower case; qtype name) of every query seen, in order."""
        with self._resolver.lock:
            return list(self._resolver.queries)

    def clear_queries(self) -> None:
        with self._resolver.lock:
            self._resolver.queries.clear()

    def add(self, zone_text: str) -> None:
        """Add BIND-style records (absolute names, or relative to a `$ORIGIN` line)."""
        records = RR.fromZone(zone_text)
        with self._resolver.lock:
            self._resolver.records.extend(records)

    def remove(self, name: str) -> None:
        """Drop every record of `name` (to change a record: remove, then add)."""
        label = DNSLabel(name)
        with self._resolver.lock:
            self._resolver.records = [rr for rr in self._resolver.records if rr.rname != label]

    def servfail(self, name: str) -> None:
        with self._resolver.lock:
            self._resolver.servfail.add(DNSLabel(name))

    def timeout(self, name: str) -> None:
        """Never answer queries for this name (over UDP or TCP)."""
        with self._resolver.lock:
            self._resolver.timeout.add(DNSLabel(name))

    def start(self) -> DnsServer:
        if self._servers:
            return self
        for _ in range(50):
            servers = self._bind_pair()
            if servers:
                break
        else:
            raise OSError(errno.EADDRINUSE, "no free port for both UDP and TCP")
        self._servers = servers
        for server in servers:
            # a short poll interval makes stop() quick (the default 0.5 s adds up over a suite)
            server.thread = threading.Thread(
                target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
            )
            server.thread.start()
        return self

    def _bind_pair(self) -> list[DNSServer] | None:
        """UDP first (the kernel picks a port when port=0), then TCP on the same port."""
        logger = DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda _s: None)
        udp = DNSServer(self._resolver, self.host, self._wanted_port, False, logger, _Handler)
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(self._resolver, self.host, port, True, logger, _Handler)
        except OSError as exc:
            udp.server.server_close()
            if self._wanted_port or exc.errno != errno.EADDRINUSE:
                raise
            return None
        self.port = port
        return [udp, tcp]

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()
        self._servers = []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
