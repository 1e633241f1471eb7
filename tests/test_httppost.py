"""The notifier's HTTP POST client against a scripted loopback server."""

from __future__ import annotations

import asyncio

import pytest

from chatmaild.common.httppost import MAX_HEAD, HTTPError, PostClient


class Server:
    """Answers each request with the next scripted bytes (default: 200, keep-alive)."""

    def __init__(self, answers: list[bytes] | None = None, close_after: bool = False) -> None:
        self.answers = list(answers or [])
        self.close_after = close_after
        self.connections = 0
        self.bodies: list[bytes] = []
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.bodies.append(await reader.readexactly(length))
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                await asyncio.sleep(self.delay)
                self.in_flight -= 1
                answer = self.answers.pop(0) if self.answers else None
                writer.write(answer or b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/notify"

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_posts_reuse_one_connection_and_report_the_status():
    async def go() -> None:
        server = Server([b"HTTP/1.1 410 Gone\r\nContent-Length: 0\r\n\r\n"])
        async with server as url:
            client = PostClient(url, limit=2, timeout=5)
            assert await client.post(b"tok1") == 410
            assert await client.post(b"tok2") == 200
            await client.close()
        assert server.bodies == [b"tok1", b"tok2"]
        assert server.connections == 1

    run(go())


def test_a_connection_the_server_closed_while_idle_is_replaced():
    async def go() -> None:
        server = Server(close_after=True)  # "Connection: close" not said, but done
        async with server as url:
            client = PostClient(url, limit=1, timeout=5)
            for n in range(3):
                await asyncio.sleep(0.05)  # the close has arrived before the next post
                assert await client.post(b"t%d" % n) == 200
            await client.close()
        assert server.connections == 3 and server.bodies == [b"t0", b"t1", b"t2"]

    run(go())


def test_chunked_and_unframed_bodies():
    async def go() -> None:
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        unframed = b"HTTP/1.0 202 Accepted\r\n\r\nqueued"
        server = Server([chunked, unframed], close_after=False)
        async with server as url:
            client = PostClient(url, limit=1, timeout=5)
            assert await client.post(b"a") == 200
            server.close_after = True  # the unframed body ends with the connection
            assert await client.post(b"b") == 202
            await client.close()

    run(go())


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP 220 hello\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * MAX_HEAD + b"\r\n\r\n",
    ],
)
def test_garbage_answers_are_errors(answer):
    async def go() -> None:
        async with Server([answer], close_after=True) as url:
            client = PostClient(url, limit=1, timeout=5)
            with pytest.raises((HTTPError, ValueError)):
                await client.post(b"x")
            await client.close()

    run(go())


def test_timeout_and_concurrency_limit():
    async def go() -> None:
        stuck = Server()
        stuck.delay = 5
        async with stuck as url:
            slow = PostClient(url, limit=1, timeout=0.05)
            with pytest.raises(TimeoutError):
                await slow.post(b"late")
            await slow.close()
        server = Server()
        server.delay = 0.1
        async with server as url:
            client = PostClient(url, limit=2, timeout=10)
            results = await asyncio.gather(*(client.post(b"%d" % n) for n in range(6)))
            await client.close()
        assert results == [200] * 6
        assert server.max_in_flight == 2

    run(go())


def test_only_http_urls():
    with pytest.raises(ValueError):
        PostClient("ftp://example.org/x", limit=1, timeout=1)


def test_header_fields_with_cr_or_lf_are_refused():
    """A field value that could end the field (and add one of its own) is not sent."""
    client = PostClient("http://127.0.0.1:9/x", limit=1, timeout=5)
    for value in ("a\r\nX-Evil: 1", "a\nb", "a\rb"):
        with pytest.raises(ValueError, match="CR or LF"):
            asyncio.run(client.exchange(b"", (("X-MAIL-TO", value),)))
