"""The web pages rendered from chatmail.ini, and the www_folder path rules (no server)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat

import pytest

from chatmaild.common.config import parse_params
from chatmaild.web import pages, static
from chatmaild.web.qr import QRCodes, drawn


def config(**params: str):
    return parse_params({"mail_domain": "chat.example", **params})


def text_of(page: pages.Page) -> str:
    return page.body.decode("utf-8")


# ---------------------------------------------------------------- pages


def test_home_page_shows_invite_qr_and_tap_link():
    invite = "DCACCOUNT:https://chat.example/new"
    html = text_of(pages.home_page(config(), invite, invite, drawn(invite)[0], by_ip=False))
    assert html.startswith("<!doctype html>") and '<html lang="en">' in html
    assert 'name="viewport"' in html
    [svg] = re.findall(r"<svg [^>]*>", html)
    assert 'role="img"' in svg and "viewBox" in svg
    assert f"<title>QR code: {invite}</title>" in html
    assert html.count(f'href="{invite}"') == 2  # the code itself and the button
    assert "<script" not in html and "http://" not in html
    assert "reached by its IP address" not in html


def test_home_page_by_ip_offers_the_ready_account():
    link = "dclogin:a@chat.example?p=x%26y&v=1&ih=127.0.0.1"
    invite = "DCACCOUNT:https://127.0.0.1:8443/new"
    html = text_of(pages.home_page(config(), invite, link, drawn(invite)[0], by_ip=True))
    assert 'href="dclogin:a@chat.example?p=x%26y&amp;v=1&amp;ih=127.0.0.1"' in html
    assert f'href="{invite}"' in html and "reached by its IP address" in html


def test_qr_codes_are_drawn_by_a_child_process():
    """The web process keeps the SVG text, never segno and what it imports."""
    import subprocess
    import sys

    invite = "DCACCOUNT:https://chat.example/new"
    probe = (
        "import sys\nfrom chatmaild.web.qr import QRCodes\nc = QRCodes()\n"
        f"c.draw_now([{invite!r}])\n"
        "print('segno' in sys.modules, 'hashlib' in sys.modules, len(c.codes[sys.argv[1]][1]))"
    )
    out = subprocess.run([sys.executable, "-c", probe, invite], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    assert out[:2] == ["False", "False"] and int(out[2]) > 1000
    codes = QRCodes()
    codes.draw_now([invite])
    inline, document = codes.codes[invite]
    assert (inline, document) == drawn(invite)
    assert document.startswith("<?xml") and f"<title>{invite}</title>" in document


def test_info_page_numbers_come_from_the_config():
    html = text_of(
        pages.info_page(
            config(
                delete_mails_after="17",
                delete_large_after="1",
                delete_inactive_users_after="45",
                max_mailbox_size="250M",
                max_message_size="31457280",
                max_user_send_per_minute="33",
                notification_url="https://push.example.net/notify",
            )
        )
    )
    assert "<strong>17 days</strong>" in html and "<strong>1 day</strong>" in html
    assert "<strong>45 days</strong>" in html and "<strong>250 MiB</strong>" in html
    assert "<strong>30 MiB</strong>" in html and "200 kB" in html
    assert "up to 33 messages a minute" in html and "<code>push.example.net</code>" in html


def test_privacy_page_with_contacts():
    html = text_of(
        pages.privacy_page(
            config(
                privacy_mail="privacy@chat.example",
                privacy_postal="Relay e.V.\nStreet 1\n12345 Town",
                privacy_supervisor="Data Protection Authority of Somewhere",
            )
        )
    )
    assert '<a href="mailto:privacy@chat.example">privacy@chat.example</a>' in html
    assert "Relay e.V.<br>Street 1<br>12345 Town" in html
    assert "Data Protection Authority of Somewhere" in html
    assert html.count("<em>not published</em>") == 1  # only privacy_pdo is unset
    assert "has not published privacy" not in html


def test_privacy_page_says_plainly_when_unset():
    html = text_of(pages.privacy_page(config()))
    assert "The operator of this relay has not published privacy" in html
    assert html.count("<em>not published</em>") == 4


def test_config_values_are_escaped():
    hostile = '<script>alert("x")</script>'
    html = text_of(
        pages.privacy_page(
            config(
                privacy_postal=hostile,
                privacy_pdo="a & b",
                privacy_mail='x@y.example"><script>',
            )
        )
    )
    assert "<script" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html and "a &amp; b" in html
    assert "mailto:" not in html  # not a plain address: shown as text only


def test_content_security_policy_admits_exactly_the_inline_style():
    html = text_of(pages.info_page(config()))
    [style] = re.findall(r"<style>(.*?)</style>", html, re.S)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    csp = pages.content_security_policy()
    assert f"style-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    assert "script-src" not in csp  # falls back to default-src 'none'


def test_sizes_and_days_in_words():
    assert pages.size(500 * 1024**2) == "500 MiB"
    assert pages.size(2 * 1024**3) == "2 GiB"
    assert pages.size(200000) == "200 kB"
    assert pages.size(1500000) == "1.5 MB"
    assert pages.size(999) == "999 bytes"
    assert pages.days(1) == "1 day" and pages.days(20) == "20 days"


def test_page_etag_follows_the_body():
    a, b = pages.info_page(config()), pages.info_page(config(delete_mails_after="3"))
    assert a.etag == pages.info_page(config()).etag != b.etag


# ---------------------------------------------------------------- www_folder


@pytest.mark.parametrize(
    "path",
    ["/../x", "/a/../../x", "/./x", "/.git/config", "/a/.htpasswd", "/x\0y", "/a\\..\\x", "x"],
)
def test_url_segments_refuse(path):
    assert static.url_segments(path) is None


def test_url_segments_accept():
    assert static.url_segments("/") == []
    assert static.url_segments("//a///b/") == ["a", "b"]
    assert static.url_segments("/.well-known/security.txt") == [".well-known", "security.txt"]
    assert static.url_segments("/a..b/c.d") == ["a..b", "c.d"]


@pytest.fixture
def site(tmp_path):
    """www/ with files, an inner and outer symlink, a FIFO, a device; secret.txt outside."""
    (tmp_path / "secret.txt").write_text("secret")
    www = tmp_path / "www"
    (www / "docs").mkdir(parents=True)
    (www / "index.html").write_text("home")
    (www / "docs" / "index.html").write_text("docs")
    (www / "docs" / "page.html").write_text("page")
    (www / "empty").mkdir()
    (www / "inner-link.html").symlink_to(www / "docs" / "page.html")
    (www / "outer-link.txt").symlink_to(tmp_path / "secret.txt")
    (www / "outer-dir").symlink_to(tmp_path)
    (www / "docs" / "up").symlink_to("..")
    os.mkfifo(www / "fifo")
    os.mknod(www / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return www


def test_lookup_serves_files_and_indexes(site):
    assert static.lookup(str(site), "/") == static.Found(str(site / "index.html"))
    assert static.lookup(str(site), "/docs/") == static.Found(str(site / "docs/index.html"))
    assert static.lookup(str(site), "/docs/page.html") == static.Found(str(site / "docs/page.html"))
    # a symlink that stays inside is followed, to its real path
    assert static.lookup(str(site), "/inner-link.html") == static.Found(
        str(site / "docs/page.html")
    )
    assert static.lookup(str(site), "/docs/up/index.html") == static.Found(str(site / "index.html"))
    assert static.lookup(str(site), "/docs") == static.Redirect("/docs/")


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/docs/../../secret.txt",
        "/outer-link.txt",
        "/outer-dir/secret.txt",
        "/docs/up/../secret.txt",
        "/fifo",
        "/null",
        "/empty/",  # a directory without index.html: no listing
        "/missing.html",
    ],
)
def test_lookup_refuses(site, path):
    assert static.lookup(str(site), path) is None


def test_lookup_redirect_cannot_leave_the_host(site):
    (site / "evil.example").mkdir()
    assert static.lookup(str(site), "//evil.example") == static.Redirect("/evil.example/")
    (site / "a b").mkdir()
    assert static.lookup(str(site), "/a b") == static.Redirect("/a%20b/")


def test_open_file_refuses_what_changed_into_a_fifo(site):
    found = static.lookup(str(site), "/docs/page.html")
    assert isinstance(found, static.Found)
    opened = static.open_file(found)
    assert opened is not None
    os.close(opened[0])
    os.unlink(found.path)
    os.mkfifo(found.path)
    assert static.open_file(found) is None


def test_content_types():
    assert static.content_type("/a/index.html") == "text/html"
    assert static.content_type("/a/s.css") == "text/css"
    assert static.content_type("/a/q.svg") == "image/svg+xml"
    assert static.content_type("/a/f.woff2") == "font/woff2"
    assert static.content_type("/a/page.html.gz") == "application/octet-stream"
    assert static.content_type("/a/noext") == "application/octet-stream"
