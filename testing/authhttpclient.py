"""A blocking client for doveauth's HTTP socket, speaking like dovecot/auth.lua (tests, bench)."""

from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode("ascii"), keep_blank_values=True))


class AuthHttpClient:
    """One kept-alive connection; absolute-form targets like Dovecot's proxied client."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AuthHttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self) -> Response | None:
        """The next response, None if the server closed the connection first."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside a response body")
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(status, headers, body)

    def closed_by_server(self) -> bool:
        """Whether the server has closed the connection (EOF, nothing left to read)."""
        return not self.buffer and self.sock.recv(1) == b""

    def request(self, method: str, path: str, fields: dict[str, str] | None = None) -> Response:
        body = b""
        head = f"{method} http://doveauth{path} HTTP/1.1\r\nHost: doveauth\r\n"
        if fields is not None:
            body = urllib.parse.urlencode(fields, quote_via=urllib.parse.quote).encode("ascii")
            head += "Content-Type: application/x-www-form-urlencoded\r\n"
            head += f"Content-Length: {len(body)}\r\n"
        self.send_raw(head.encode("ascii") + b"\r\n" + body)
        response = self.read_response()
        if response is None:
            raise ConnectionError("doveauth closed the connection without answering")
        return response

    def passdb(self, user: str, password: str) -> dict[str, str]:
        return self._form(self.request("POST", "/passdb", {"user": user, "password": password}))

    def userdb(self, user: str) -> dict[str, str]:
        return self._form(self.request("POST", "/userdb", {"user": user}))

    def users(self) -> list[str]:
        response = self.request("GET", "/users")
        assert response.status == 200, response
        return response.body.decode().split()

    @staticmethod
    def _form(response: Response) -> dict[str, str]:
        assert response.status == 200, response
        return response.form()
