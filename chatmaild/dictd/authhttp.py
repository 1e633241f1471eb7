"""doveauth's HTTP responder, asked by Dovecot 2.4's Lua passdb/userdb (dovecot/auth.lua).

A small, strict HTTP/1.1 dialect on a UNIX socket that only the vmail user can
reach (Dovecot's auth worker runs as vmail)::

    POST /passdb   user=U&password=P    lookup; creates the account when the rules allow
    POST /userdb   user=U               lookup, never creates
    GET  /users                         every account, one address per line

Request bodies are ``application/x-www-form-urlencoded`` with exactly the
fields shown.  A ``200`` answer is form-encoded too: ``result=ok`` plus the
fields for Dovecot (passdb: ``password`` hash, userdb: ``home``, ``uid``,
``gid``; both: ``user`` when the canonical address differs from the one
asked), or ``result=unknown`` (no such account, creation refused, disabled).
Userdb answers never carry the password hash.

Anything else is not an answer: a malformed request gets a 4xx status and the
connection is closed, a failure inside doveauth a 500; the Lua side turns every
non-200 into a temporary failure, never into "wrong password".

Sizes are bounded (request head 8 KiB, 32 header fields, body 4 KiB);
connections are kept alive between requests (HTTP/1.1).
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from chatmaild.common.service import Daemon

MAX_HEAD = 8 * 1024
MAX_HEADERS = 32
MAX_BODY = 4 * 1024
BODY_TIMEOUT = 10.0  # a started request must arrive completely within this
IDLE_TIMEOUT = 600.0  # a kept-alive connection may wait this long for its next request

FORM_TYPE = "application/x-www-form-urlencoded"
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(r"(?:https?://[^/?#\s]*)?(/[^?#\s]*)(?:\?[^#\s]*)?")

# route -> (method, form fields it takes)
ROUTES: dict[str, tuple[str, frozenset[str]]] = {
    "/passdb": ("POST", frozenset({"user", "password"})),
    "/userdb": ("POST", frozenset({"user"})),
    "/users": ("GET", frozenset()),
}

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request that gets this status (and a closed connection) instead of an answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str
    keep_alive: bool
    content_length: int
    content_type: str | None


# ---------------------------------------------------------------- pure wire logic


def parse_head(head: bytes) -> RequestHead:
    """Request line and header fields (``head`` ends with the empty line); raise HttpError."""
    if len(head) > MAX_HEAD:
        raise HttpError(431, "request head too large")
    if not head.endswith(b"\r\n\r\n"):
        raise HttpError(400, "request head not terminated by CRLF CRLF")
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise HttpError(400, "malformed request line")
    method, raw_target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505 if version.startswith(b"HTTP/") else 400, "unsupported HTTP version")
    try:
        target = _TARGET.fullmatch(raw_target.decode("ascii"))
    except UnicodeDecodeError:
        target = None
    if target is None:
        raise HttpError(400, "malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise HttpError(400, "malformed header field")
        name = name.lower()
        if name in fields and name in (b"content-length", b"content-type", b"host"):
            raise HttpError(400, f"repeated {name.decode()} header field")
        fields[name] = value.strip(b" \t")
    if b"transfer-encoding" in fields:
        raise HttpError(501, "transfer codings are not supported")
    length_text = fields.get(b"content-length", b"0")
    if not length_text.isdigit() or len(length_text) > 9:
        raise HttpError(400, "malformed Content-Length")
    length = int(length_text)
    if length > MAX_BODY:
        raise HttpError(413, f"body over {MAX_BODY} bytes")
    connection = {t.strip().lower() for t in fields.get(b"connection", b"").split(b",")}
    if version == b"HTTP/1.1":
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection
    content_type = fields.get(b"content-type")
    return RequestHead(
        method=method.decode("ascii"),
        path=target.group(1),
        keep_alive=keep_alive,
        content_length=length,
        content_type=(
            content_type.split(b";")[0].strip().lower().decode("latin-1")
            if content_type is not None
            else None
        ),
    )


def parse_form(body: bytes, expected: frozenset[str]) -> dict[str, str]:
    """Exactly the ``expected`` fields, each once, from a form-encoded body.

    Values are UTF-8; other bytes are kept as surrogate escapes, as the dict
    responder does, so both hand the same strings to the account rules.
    """
    try:
        text = body.decode("ascii")
        pairs = urllib.parse.parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            encoding="utf-8",
            errors="surrogateescape",
            max_num_fields=len(expected) + 1,
        )
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "malformed form body") from None
    fields = dict(pairs)
    if len(fields) != len(pairs) or set(fields) != expected:
        raise HttpError(400, f"form fields must be exactly: {', '.join(sorted(expected))}")
    if any("\0" in value for value in fields.values()):
        raise HttpError(400, "NUL in a form field")
    return fields


def check_route(head: RequestHead) -> frozenset[str]:
    """The form fields the route takes; HttpError for an unknown path or wrong method."""
    route = ROUTES.get(head.path)
    if route is None:
        raise HttpError(404, f"no such resource {head.path[:64]!r}")
    method, expected = route
    if head.method != method:
        raise HttpError(405, f"{head.path} takes {method}")
    if expected and head.content_type != FORM_TYPE:
        raise HttpError(415, f"{head.path} takes {FORM_TYPE}")
    return expected


def encode_form(fields: dict[str, str]) -> bytes:
    return urllib.parse.urlencode(fields, quote_via=urllib.parse.quote).encode("ascii")


def encode_response(
    status: int, body: bytes, *, keep_alive: bool, content_type: str = "text/plain"
) -> bytes:
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def passdb_answer(fields: dict[str, str] | None) -> dict[str, str]:
    """What Dovecot's passdb needs from AuthService's fields (or result=unknown)."""
    if fields is None:
        return {"result": "unknown"}
    answer = {"result": "ok", "password": fields["password"]}
    if "user" in fields:
        answer["user"] = fields["user"]
    return answer


def userdb_answer(fields: dict[str, str] | None) -> dict[str, str]:
    """Home and ids for Dovecot's userdb (never the password hash)."""
    if fields is None:
        return {"result": "unknown"}
    answer = {"result": "ok", "home": fields["home"], "uid": fields["uid"], "gid": fields["gid"]}
    if "user" in fields:
        answer["user"] = fields["user"]
    return answer


# ---------------------------------------------------------------- the responder


PassdbLookup = Callable[[str, str], Awaitable["dict[str, str] | None"]]
UserdbLookup = Callable[[str], "dict[str, str] | None"]
ListUsers = Callable[[], Awaitable[Iterable[str]]]


class AuthHttpResponder(Daemon):
    """Serves the routes above on one socket with the lookups doveauth hands in.

    A Daemon so that :class:`chatmaild.common.service.Server` runs it (connection
    bookkeeping, graceful stop) next to doveauth's dict socket.
    """

    name = "doveauth"
    stream_limit = MAX_HEAD

    def __init__(
        self, config, passdb: PassdbLookup, userdb: UserdbLookup, users: ListUsers
    ) -> None:
        super().__init__(config)
        self.passdb = passdb
        self.userdb = userdb
        self.users = users

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while not self.stopping.is_set():
            keep_alive = False
            try:
                head = await self._read_head(reader)
                if head is None:
                    return
                request = parse_head(head)
                expected = check_route(request)
                if request.content_length and not expected:
                    raise HttpError(400, f"{request.path} takes no body")
                body = await asyncio.wait_for(
                    reader.readexactly(request.content_length), BODY_TIMEOUT
                )
                form = parse_form(body, expected) if expected else {}
                keep_alive = request.keep_alive
                with self.request():
                    status, answer = await self._answer(request.path, form)
            except HttpError as e:
                self.log.warning("bad HTTP request: %s", e)
                status, answer = e.status, f"{e}\n".encode()
            except (TimeoutError, asyncio.IncompleteReadError):
                return  # the client went away or stalled mid-request: nobody to answer
            writer.write(encode_response(status, answer, keep_alive=keep_alive))
            await writer.drain()
            if not keep_alive:
                return

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request head, None at a clean EOF between requests."""
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise HttpError(400, "connection closed inside the request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise HttpError(431, "request head too large") from None
        except TimeoutError:
            return None

    async def _answer(self, path: str, form: dict[str, str]) -> tuple[int, bytes]:
        try:
            if path == "/passdb":
                return 200, encode_form(
                    passdb_answer(await self.passdb(form["user"], form["password"]))
                )
            if path == "/userdb":
                return 200, encode_form(userdb_answer(self.userdb(form["user"])))
            return 200, "".join(f"{addr}\n" for addr in await self.users()).encode()
        except Exception:
            # the store failed (disk, permissions): Dovecot must answer "temporary failure"
            self.log.exception("lookup failed; answered 500")
            return 500, b"internal error\n"
