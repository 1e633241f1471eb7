"""Realtime webxdc apps through our own iroh relay (issue 22), with the real core.

The relay's web process runs the iroh relay role (chatmail-iroh); ``iroh_relay``
advertises it as
``http://127.0.0.1:PORT`` (the core's iroh trusts only public CAs, so a test
relay's HTTPS cannot serve it; an ``http://`` URL it accepts).  Two Delta Chat
core accounts share a webxdc app, join its realtime channel and exchange data.
No other iroh relay is reachable from this machine; the relay counts the
packets it forwarded (the peers may go direct afterwards, but they meet here
first).  HTTPS /relay through the front door is spoken with our own client.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import zipfile

import pytest

from chatmaild.relay.ports import free_ports
from testing.dcclient import DCClients, securejoin
from testing.irohclient import IrohClient
from testing.processes import wait_listening
from tests.fixtures.relay import FULL, RelayPool

pytestmark = [pytest.mark.relay, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def relay():
    pool = RelayPool()
    port = free_ports(1)[0]
    try:
        overrides = {"iroh_relay_port": port, "iroh_relay": f"http://127.0.0.1:{port}"}
        yield pool(overrides, FULL)
    finally:
        pool.close()


@pytest.fixture(scope="module")
def dc(relay):
    c = DCClients(relay.state_dir.parent / f"dc-realtime-{relay.state_dir.name}")
    yield c
    c.close()


def webxdc(tmp_path) -> str:
    path = tmp_path / "realtime.xdc"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("manifest.toml", 'name = "realtime test"\n')
        z.writestr("index.html", "<!doctype html><title>realtime</title>")
    return str(path)


def forwarded(relay) -> int:
    """Packets chatmail-iroh forwarded, from its last count line (logged at its stop)."""
    text = (relay.log_dir / "newemail.log").read_text(errors="replace")
    counts = re.findall(r"forwarded (\d+) packets", text)
    return int(counts[-1]) if counts else 0


def test_two_cores_exchange_realtime_data_through_our_iroh_relay(relay, dc, tmp_path):
    ac1, ac2 = dc.account(relay), dc.account(relay)
    for ac in (ac1, ac2):
        assert ac.get_config("webxdc_realtime_enabled") == "1"
    securejoin(ac1, ac2)
    chat = ac1.create_chat(ac2)
    msg1 = chat.send_message(text="play", file=webxdc(tmp_path))
    msg2 = None
    deadline = time.monotonic() + 60
    while msg2 is None:
        event = ac2.wait_for_event()
        if event.kind == "IncomingMsg":
            candidate = ac2.get_message_by_id(event.msg_id)
            if candidate.get_snapshot().text == "play":
                msg2 = candidate
        assert time.monotonic() < deadline, "the webxdc app did not arrive"
    msg1.send_webxdc_realtime_advertisement()
    msg2.send_webxdc_realtime_advertisement()
    # the channel forms in the background: send until the other side hears it
    received = None
    deadline = time.monotonic() + 120
    while received is None:
        msg1.send_webxdc_realtime_data(b"hello over iroh")
        until = time.monotonic() + 2
        while time.monotonic() < until:
            try:
                event = ac2._rpc.get_queue(ac2.id).get(timeout=max(0.1, until - time.monotonic()))
            except Exception:  # queue.Empty
                continue
            if event.get("kind") == "WebxdcRealtimeData" and event.get("msgId") == msg2.id:
                received = bytes(event["data"])
                break
        assert time.monotonic() < deadline, "no realtime data arrived"
    assert received == b"hello over iroh"
    msg2.send_webxdc_realtime_data(b"and back")
    assert ac1.wait_for_realtime_data(msg1.id) == b"and back"
    proc = relay.proc_of("newemail")
    proc.terminate()  # it writes its last count line
    assert proc.wait(30) == 0
    relay.spawn("newemail")
    assert forwarded(relay) > 0, (relay.log_dir / "newemail.log").read_text()[-3000:]


def test_https_relay_goes_through_the_front_door(relay):
    """/relay on the web port: the upgrade and the frames pass to chatmail-iroh
    decrypted and back encrypted; the probes answer there too."""
    wait_listening(("127.0.0.1", relay.config.newemail_port))  # started again
    wait_listening(("127.0.0.1", relay.config.iroh_relay_port))
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    port = relay.config.newemail_port

    async def scenario():
        a = await IrohClient.connect("127.0.0.1", port, tls=tls, server_name=relay.mail_domain)
        b = await IrohClient.connect("127.0.0.1", port, tls=tls, server_name=relay.mail_domain)
        await asyncio.sleep(0.3)
        a.send(b.key, b"through 443")
        assert await b.packet() == (a.key, b"through 443")
        b.send(a.key, b"x" * 60_000)
        assert await a.packet() == (b.key, b"x" * 60_000)
        await a.close()
        await b.close()
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                             server_hostname=relay.mail_domain)  # fmt: skip
        w.write(f"GET /generate_204 HTTP/1.1\r\nHost: {relay.mail_domain}\r\n"
                "X-Tailscale-Challenge: ab12\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
        head = await r.read()
        assert head.startswith(b"HTTP/1.1 204 ") and b"response ab12" in head
        w.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
