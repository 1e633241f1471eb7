"""Port 80: answers ACME HTTP-01 challenges, redirects everything else to HTTPS.

The certificate's CA asks ``http://<name>/.well-known/acme-challenge/<token>``
(RFC 8555 8.3); the ACME client (chatmail-acme, through dehydrated) writes the
answer into the challenge directory and removes it afterwards.  Nothing else is
served in plain text: every other GET or HEAD gets a redirect to the relay's
own https address, named from the config, never from the request's Host.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from chatmaild.common.config import ACME_CHALLENGE_DIR, Config
from chatmaild.web.server import Response

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
# RFC 8555 8.3: the token is base64url; anything else is no challenge of ours
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
MAX_ANSWER_BYTES = 4096  # a key authorization is about 90 bytes


def https_location(config: Config, path: str) -> str:
    """The relay's own https URL of ``path`` (mail_domain or the IP-only address)."""
    name = config.mail_domain.strip("[]")
    host = name if config.newemail_port == 443 else f"{name}:{config.newemail_port}"
    return f"https://{host}{urllib.parse.quote(path, safe='/-._~')}"


def _text(status: int, text: str, **headers: str) -> Response:
    return Response(status, {"Content-Type": "text/plain; charset=utf-8", **headers}, text.encode())


class PlainHttp:
    """The port-80 application: ``handle`` answers one request."""

    def __init__(self, config: Config, challenges: Path = ACME_CHALLENGE_DIR) -> None:
        self.config = config
        self.challenges = challenges

    async def handle(self, request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _text(405, "405: Method Not Allowed\n", Allow="GET,HEAD")
        if request.path.startswith(CHALLENGE_PREFIX):
            return self._challenge(request.path[len(CHALLENGE_PREFIX) :])
        return Response(301, {"Location": https_location(self.config, request.path)})

    def _challenge(self, token: str) -> Response:
        if not TOKEN_RE.fullmatch(token):
            return _text(404, "404: Not Found\n")
        try:
            with open(self.challenges / token, "rb") as f:
                answer = f.read(MAX_ANSWER_BYTES)
        except OSError:
            return _text(404, "404: Not Found\n")
        return Response(200, {"Content-Type": "application/octet-stream"}, answer)
