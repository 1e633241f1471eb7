"""A tiny authoritative DNS server on loopback: DKIM keys of local relays.

It answers TXT (and A and MX) queries from an in-memory table, so filtermail's DKIM
key lookups can be pointed at it with ``dns_resolver = 127.0.0.1:PORT``.
Names can be made to fail: ``"timeout"`` (the query is silently dropped) or
``"servfail"``.  Unknown names get NXDOMAIN.  UDP only; runs in a thread.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _name(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


class LoopbackDNS:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()
        self.txt: dict[dns.name.Name, list[str]] = {}
        self.a: dict[dns.name.Name, list[str]] = {}
        self.mx: dict[dns.name.Name, list[tuple[int, str]]] = {}
        self.failures: dict[dns.name.Name, str] = {}
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopback-dns", daemon=True)

    @property
    def address(self) -> str:
        """The ``dns_resolver`` config value pointing at this server."""
        return f"{self.host}:{self.port}"

    def set_txt(self, name: str, *values: str) -> None:
        self.txt[_name(name)] = list(values)
        self.failures.pop(_name(name), None)

    def set_a(self, name: str, *addresses: str) -> None:
        """``name`` resolves to these IPv4 addresses (and has no AAAA: an empty answer)."""
        self.a[_name(name)] = list(addresses)

    def set_mx(self, name: str, *records: tuple[int, str]) -> None:
        """``name`` has these MX records (preference, exchange; exchange "." is a null MX)."""
        self.mx[_name(name)] = list(records)

    def remove(self, name: str) -> None:
        self.a.pop(_name(name), None)
        self.mx.pop(_name(name), None)
        self.txt.pop(_name(name), None)
        self.failures.pop(_name(name), None)

    def fail(self, name: str, how: str) -> None:
        """Make queries for ``name`` time out (``"timeout"``) or get SERVFAIL."""
        assert how in ("timeout", "servfail")
        self.failures[_name(name)] = how

    def start(self) -> LoopbackDNS:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> LoopbackDNS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wire, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(wire)
            except Exception:
                continue
            response = self._answer(query)
            if response is not None:
                try:
                    self.sock.sendto(response.to_wire(max_size=65535), addr)
                except OSError:
                    pass

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        self.queries.append(question.name.to_text())
        failure = self.failures.get(question.name)
        if failure == "timeout":
            return None
        if failure == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        records = self.mx.get(question.name)
        if records is not None:
            if question.rdtype == dns.rdatatype.MX:
                texts = [f"{pref} {_name(host) if host != '.' else '.'}" for pref, host in records]
                rrset = dns.rrset.from_text_list(question.name, 300, "IN", "MX", texts)
                response.answer.append(rrset)
            return response  # other types: the name exists, no records of them
        addresses = self.a.get(question.name)
        if addresses is not None and question.rdtype != dns.rdatatype.TXT:
            if question.rdtype == dns.rdatatype.A:
                rrset = dns.rrset.from_text_list(question.name, 300, "IN", "A", addresses)
                response.answer.append(rrset)
            return response  # other types: the name exists, no records of them
        values = self.txt.get(question.name)
        if values is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        if question.rdtype == dns.rdatatype.TXT:
            texts = []
            for value in values:
                # one TXT record of <=255 byte strings
                chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
                texts.append(" ".join(f'"{c}"' for c in chunks))
            rrset = dns.rrset.from_text_list(question.name, 300, "IN", "TXT", texts)
            response.answer.append(rrset)
        return response
