"""The home, info and privacy pages, rendered from chatmail.ini.

Templates are ``templates/*.html`` with ``$name`` placeholders
(:class:`string.Template`); every value is HTML-escaped unless it is
:class:`Markup`.  The style sheet is inlined, the QR code is inline SVG and
the favicon is empty, so a page is one request; the Content-Security-Policy
admits nothing else (no script, no other origin).
"""

from __future__ import annotations

import base64
import functools
import html
import string
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from chatmaild.common.config import Config

try:  # the builtin SHA-256: hashlib would load OpenSSL's whole hash table (2 MB on 13)
    from _sha2 import sha256  # type: ignore[import-not-found]  # Python 3.12+
except ImportError:  # Python 3.11
    from _sha256 import sha256  # type: ignore[import-not-found,no-redef]

TEMPLATES = Path(__file__).parent / "templates"

HTML_TYPE = "text/html"
PAGES = ("home", "info", "privacy")


class Markup(str):
    """Text that is already HTML: inserted into templates as it is."""


@functools.cache
def template_text(name: str) -> str:
    return (TEMPLATES / name).read_text("utf-8")


def render(name: str, **values: object) -> Markup:
    """Template ``name`` with ``values``: plain values escaped, Markup as it is."""
    safe = {k: v if isinstance(v, Markup) else html.escape(str(v)) for k, v in values.items()}
    return Markup(string.Template(template_text(name)).substitute(safe))


def style_sheet() -> str:
    return template_text("style.css").strip()


def content_security_policy() -> str:
    """Only the inline style sheet; no scripts, frames, forms or other origins."""
    digest = base64.b64encode(sha256(style_sheet().encode()).digest()).decode()
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


# ---------------------------------------------------------------- numbers as words


def days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def size(n: int) -> str:
    """A byte count for people: binary units when exact (500 MiB), else decimal (200 kB)."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n} bytes"


def public_name(config: Config) -> str:
    """The relay's name as people see it: its domain, or its IP without brackets."""
    return config.mail_domain.strip("[]")


# ---------------------------------------------------------------- pages


@dataclass(frozen=True)
class Page:
    body: bytes
    content_type: str = HTML_TYPE

    @functools.cached_property
    def etag(self) -> str:
        return '"' + sha256(self.body).hexdigest()[:32] + '"'


def page(config: Config, which: str, title: str, main: Markup) -> Page:
    current = {f"current_{p}": Markup(' aria-current="page"' if p == which else "") for p in PAGES}
    text = render(
        "base.html",
        title=title,
        domain=public_name(config),
        style=Markup(style_sheet()),
        main=main,
        **current,
    )
    return Page(text.encode("utf-8"))


def home_page(config: Config, invite: str, tap_link: str, qr: str, *, by_ip: bool) -> Page:
    """The invite QR code ``qr`` (inline ``<svg>``, web.qr) of ``invite`` and a button
    opening ``tap_link`` in the app.

    ``by_ip``: the relay is reached by IP address, and ``tap_link`` is a ready
    ``dclogin:`` account (an app cannot look such a relay up by name).
    """
    name = public_name(config)
    carrier = "the code and the button above carry" if invite == tap_link else (
        "the button above carries")  # fmt: skip
    main = render(
        "home.html",
        domain=name,
        invite=invite,
        tap_link=tap_link,
        qr=Markup(qr),
        ip_note=render("ip_note.html", carrier=carrier) if by_ip else Markup(""),
    )
    return page(config, "home", f"{name}: chatmail relay for Delta Chat", main)


def _config_numbers(config: Config) -> dict[str, str]:
    return {
        "inactive": days(config.delete_inactive_users_after),
        "mails_after": days(config.delete_mails_after),
        "large_after": days(config.delete_large_after),
        "large_size": size(config.large_message_size),
        "mailbox_size": size(config.max_mailbox_size),
        "message_size": size(config.max_message_size),
        "send_rate": str(config.max_user_send_per_minute),
        "send_burst": str(config.max_user_send_burst_size),
    }


def info_page(config: Config) -> Page:
    name = public_name(config)
    notify = urllib.parse.urlsplit(config.notification_url).hostname or "the notification service"
    main = render("info.html", domain=name, notification_host=notify, **_config_numbers(config))
    return page(config, "info", f"About {name}", main)


NOT_PUBLISHED = Markup("<em>not published</em>")


def _multiline(text: str) -> Markup:
    return Markup("<br>".join(html.escape(line.strip()) for line in text.splitlines()))


def _mail_link(addr: str) -> Markup:
    # only a plain address becomes a mailto: link; anything else is shown as text
    if "@" in addr and not any(c.isspace() or c in "<>\"'?&#%" for c in addr):
        quoted = html.escape(urllib.parse.quote(addr, safe="@.+-_"))
        return Markup(f'<a href="mailto:{quoted}">{html.escape(addr)}</a>')
    return _multiline(addr)


def privacy_page(config: Config) -> Page:
    name = public_name(config)
    contacts = (
        config.privacy_postal,
        config.privacy_mail,
        config.privacy_pdo,
        config.privacy_supervisor,
    )
    main = render(
        "privacy.html",
        domain=name,
        unset_note=render("privacy_unset.html") if not any(contacts) else Markup(""),
        postal=_multiline(config.privacy_postal) if config.privacy_postal else NOT_PUBLISHED,
        mail=_mail_link(config.privacy_mail) if config.privacy_mail else NOT_PUBLISHED,
        pdo=_multiline(config.privacy_pdo) if config.privacy_pdo else NOT_PUBLISHED,
        supervisor=(
            _multiline(config.privacy_supervisor) if config.privacy_supervisor else NOT_PUBLISHED
        ),
        **_config_numbers(config),
    )
    return page(config, "privacy", f"Privacy on {name}", main)
