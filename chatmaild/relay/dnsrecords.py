"""The DNS records a relay needs, as a zone fragment, and a check of what DNS answers.

``records()`` is the single list: ``chatmaild setup`` prints it, ``chatmaild dns``
prints it as a BIND zone fragment, and ``chatmaild dns --check`` asks a resolver
for each record and says ok, missing or wrong (found / expected).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from chatmaild.common import mtasts
from chatmaild.common.config import LETSENCRYPT_DIRECTORY, Config

TTL = 3600


@dataclass(frozen=True)
class Record:
    name: str  # without the trailing dot
    rtype: str
    value: str  # presentation form; "" for A/AAAA: any address will do (not known here)
    why: str

    def zone_line(self) -> str:
        if not self.value:
            return f"; {self.name}. {TTL} IN {self.rtype} <this server's address>  ({self.why})"
        return f"{self.name}. {TTL} IN {self.rtype} {self.value}"


@dataclass(frozen=True)
class Finding:
    record: Record
    status: str  # "ok", "missing", "wrong"
    found: tuple[str, ...]


def _quoted(text: str) -> str:
    # TXT strings of at most 255 bytes each
    return " ".join(f'"{text[i : i + 255]}"' for i in range(0, len(text), 255)) or '""'


def records(config: Config, dkim_txt: str | None) -> list[Record]:
    bare = config.mail_domain.strip("[]")
    out = [
        Record(bare, "A", "", "IPv4 of this server; AAAA too if it has IPv6"),
        Record(bare, "MX", f"10 {bare}.", "mail for the domain comes here"),
        Record(bare, "TXT", _quoted("v=spf1 a ~all"), "SPF"),
        Record(f"_dmarc.{bare}", "TXT", _quoted("v=DMARC1;p=reject;adkim=s;aspf=s"), "DMARC"),
    ]
    if dkim_txt:
        name = f"{config.dkim_selector}._domainkey.{bare}"
        out.append(Record(name, "TXT", _quoted(dkim_txt), "DKIM key"))
    for service, port in (
        ("_submission._tcp", config.submission_port),
        ("_submissions._tcp", config.submissions_port),
        ("_imap._tcp", config.imap_port),
        ("_imaps._tcp", config.imaps_port),
    ):
        out.append(Record(f"{service}.{bare}", "SRV", f"0 1 {port} {bare}.", "client setup"))
    if mtasts.applies(config):
        out += [
            Record(f"mta-sts.{bare}", "CNAME", f"{bare}.", "MTA-STS policy host"),
            Record(f"_mta-sts.{bare}", "TXT", _quoted(mtasts.txt_record(config)), "MTA-STS"),
        ]
    if config.acme_email:
        rua = f"v=TLSRPTv1; rua=mailto:{config.acme_email}"
        out.append(Record(f"_smtp._tls.{bare}", "TXT", _quoted(rua), "TLS reports"))
    if config.acme_directory == LETSENCRYPT_DIRECTORY and not config.tls_external_cert_and_key:
        out.append(Record(bare, "CAA", '0 issue "letsencrypt.org"', "only our CA issues"))
    return out


def zone_text(config: Config, dkim_txt: str | None) -> str:
    bare = config.mail_domain.strip("[]")
    lines = [f"DNS records to publish for {bare}:"]
    return "\n".join(lines + [r.zone_line() for r in records(config, dkim_txt)])


def _normal(rtype: str, text: str) -> str:
    if rtype == "TXT":
        # the strings of one record joined, as receivers read them
        return "".join(shlex.split(text))
    return " ".join(text.lower().split())


def check(recs: list[Record], resolver: str | None = None, timeout: float = 5.0) -> list[Finding]:
    """Ask DNS (``resolver`` host[:port], else the system's) for every record."""
    import dns.exception
    import dns.resolver

    res = dns.resolver.Resolver(configure=resolver is None)
    if resolver is not None:
        host, _, port = resolver.rpartition(":") if resolver.count(":") == 1 else (resolver, "", "")
        res.nameservers = [host or resolver]
        if port:
            res.port = int(port)
    res.lifetime = timeout
    findings = []
    for rec in recs:
        try:
            answer = res.resolve(rec.name, rec.rtype, raise_on_no_answer=False)
            found = tuple(rdata.to_text() for rdata in answer)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            found = ()
        except dns.exception.Timeout:
            found = ("(no answer: timeout)",)
        if rec.rtype == "CNAME" and not found:
            # the policy host may have its own addresses instead of a CNAME
            try:
                mine = {r.to_text() for r in res.resolve(rec.value.rstrip("."), "A")}
                theirs = {r.to_text() for r in res.resolve(rec.name, "A")}
                if mine and mine == theirs:
                    findings.append(Finding(rec, "ok", tuple(sorted(theirs))))
                    continue
            except dns.exception.DNSException:
                pass
        if not found or found == ("(no answer: timeout)",):
            status = "missing"
        elif not rec.value:
            status = "ok"  # an address; which one only the operator knows
        elif _normal(rec.rtype, rec.value) in {_normal(rec.rtype, f) for f in found}:
            status = "ok"
        elif rec.rtype == "TXT" and rec.why == "SPF":
            spf = [f for f in found if _normal("TXT", f).startswith("v=spf1")]
            status = "wrong" if spf else "missing"
        elif rec.rtype == "TXT" and not any(
            _normal("TXT", f).split(";")[0] == _normal("TXT", rec.value).split(";")[0]
            for f in found
        ):
            status = "missing"  # other TXT records at that name, none of this kind
        else:
            status = "wrong"
        findings.append(Finding(rec, status, found))
    return findings


def report(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        r = f.record
        head = f"{f.status:7} {r.name} {r.rtype} ({r.why})"
        if f.status == "ok":
            lines.append(head)
        else:
            expected = r.value or "an address of this server"
            found = "; ".join(f.found) if f.found else "nothing"
            lines.append(f"{head}: found {found}; expected {expected}")
    return "\n".join(lines)
