"""The relay's front door in a real browser: Debian's headless Chromium on a `make run` relay.

The home page's URL comes from the ready block `make run` prints; the page is
loaded phone-sized, a screenshot of it is saved in the test's directory and
its QR code read back with zbarimg; the invite link in the code gives
credentials that log in over IMAP, and so does the page's tap-to-open
``dclogin:`` link.  Every request the browser makes for the three pages is
recorded: all of them go to the relay.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from chatmaild.relay import client_tls_context
from tests.browser import Chromium, Visit
from tests.devrelay import DevRelay
from tests.sandbox import world_readable_tempdir

pytestmark = [pytest.mark.relay, pytest.mark.timeout(300)]

SETTINGS = {
    "delete_mails_after": "17",
    "delete_large_after": "3",
    "delete_inactive_users_after": "45",
    "privacy_mail": "privacy@chat.example",
    "privacy_postal": "Chat Example e.V., Beispielweg 1, 12345 Musterstadt",
}


def read_qr(png: Path) -> str:
    """The text of the one QR code in ``png`` (Debian's zbar-tools)."""
    out = subprocess.run(
        ["zbarimg", "--quiet", "--raw", "--nodbus", "-Sdisable", "-Sqrcode.enable", str(png)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.rstrip("\n")


def follow_invite(invite: str) -> dict:
    """What an app does with a DCACCOUNT: code: POST to its URL."""
    url = urllib.parse.urlsplit(invite.removeprefix("DCACCOUNT:"))
    conn = http.client.HTTPSConnection(url.netloc, context=client_tls_context(), timeout=30)
    try:
        conn.request("POST", url.path)
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


async def visit_all(browser: Chromium, urls: list[str]) -> list[Visit]:
    try:
        return [await browser.visit(url) for url in urls]
    finally:
        await browser.aclose()


def test_front_door_in_chromium(tmp_path, capsys):
    base = world_readable_tempdir("browser-")
    ini = base / "web.ini"
    ini.write_text("[params]\n" + "".join(f"{k} = {v}\n" for k, v in SETTINGS.items()))
    relay = DevRelay(base / "state", "--config", str(ini))
    browser = None
    try:
        [home] = [m[1] for line in relay.lines if (m := re.search(r"home page (\S+)", line))]
        port = relay.facts["ports"]["newemail"]
        assert home == f"https://127.0.0.1:{port}/"
        browser = Chromium(base / "chromium-profile")
        pages = [home, home + "info.html", home + "privacy.html"]
        home_visit, info, privacy = visits = asyncio.run(visit_all(browser, pages))
        browser.close()

        # the page rendered: a screenshot of it, and the QR code in it reads back
        shot = tmp_path / "home.png"
        shot.write_bytes(home_visit.screenshot)
        invite = read_qr(shot)
        with capsys.disabled():
            print(f"\nscreenshot of the home page: {shot}\nQR code in it: {invite}")
            for v in visits:
                print(f"  {v.url}: {len(v.requests)} request(s), {v.wire_bytes} bytes on the wire")
        assert invite == f"DCACCOUNT:https://127.0.0.1:{port}/new"
        assert any(invite in line for line in relay.lines)  # the invite `make run` prints
        assert "Chat on chat.example" in home_visit.text

        # following the invite, as the app does, gives credentials that log in
        creds = follow_invite(invite)
        relay.imap(creds["email"], creds["password"]).logout()
        # so does the page's tap-to-open link of a relay reached by IP: a ready account
        [tap] = [link for link in home_visit.links if link.startswith("dclogin:")]
        tap_addr, _, query = tap.removeprefix("dclogin:").partition("?")
        tap_params = urllib.parse.parse_qs(query)
        assert tap_params["ih"] == ["127.0.0.1"]
        assert tap_params["ip"] == [str(relay.facts["ports"]["imaps"])]
        relay.imap(urllib.parse.unquote(tap_addr), tap_params["p"][0]).logout()
    finally:
        if browser is not None:
            browser.close()
        rc = relay.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert rc == 0, relay.output

    # nothing was fetched from anywhere but the relay, and every page is one request
    for v in visits:
        assert [r.url for r in v.requests] == [v.url], v.requests
        assert all(r.status == 200 and r.mime_type == "text/html" for r in v.requests)

    # the info page has the configured numbers, the privacy page the configured contact
    assert "deleted from the relay 17 days after it arrived" in info.text
    assert "3 days after arrival" in info.text and "not logged in for 45 days" in info.text
    assert SETTINGS["privacy_mail"] in privacy.text and SETTINGS["privacy_postal"] in privacy.text
    assert "has not published privacy" not in privacy.text
    assert f"mailto:{SETTINGS['privacy_mail']}" in privacy.links
