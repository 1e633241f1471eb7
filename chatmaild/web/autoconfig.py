"""The mail client autoconfiguration file (Thunderbird's format, which the Delta Chat
core reads at ``https://<domain>/.well-known/autoconfig/mail/config-v1.1.xml``):
IMAP on the implicit-TLS, STARTTLS and web ports, SMTP likewise (README, "Port 443")."""

from __future__ import annotations

from xml.sax.saxutils import escape

from chatmaild.common.config import Config

PATH = "/.well-known/autoconfig/mail/config-v1.1.xml"
XML_TYPE = "application/xml"


def _server(direction: str, kind: str, host: str, port: int, socket_type: str) -> str:
    return (
        f'    <{direction} type="{kind}">\n'
        f"      <hostname>{escape(host)}</hostname>\n"
        f"      <port>{port}</port>\n"
        f"      <socketType>{socket_type}</socketType>\n"
        "      <authentication>password-cleartext</authentication>\n"
        "      <username>%EMAILADDRESS%</username>\n"
        f"    </{direction}>\n"
    )


def autoconfig_xml(config: Config) -> bytes:
    """Implicit TLS first, then STARTTLS, then port 443 (ALPN), for IMAP and SMTP."""
    domain = config.mail_domain
    host = domain.strip("[]")
    servers = [
        _server("incomingServer", "imap", host, config.imaps_port, "SSL"),
        _server("incomingServer", "imap", host, config.imap_port, "STARTTLS"),
        _server("incomingServer", "imap", host, config.newemail_port, "SSL"),
        _server("outgoingServer", "smtp", host, config.submissions_port, "SSL"),
        _server("outgoingServer", "smtp", host, config.submission_port, "STARTTLS"),
        _server("outgoingServer", "smtp", host, config.newemail_port, "SSL"),
    ]
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<clientConfig version="1.1">\n'
        f'  <emailProvider id="{escape(domain)}">\n'
        f"    <domain>{escape(domain)}</domain>\n"
        f"    <displayName>{escape(host)} chatmail</displayName>\n"
        + "".join(servers)
        + "  </emailProvider>\n</clientConfig>\n"
    )
    return text.encode()
