"""Real Delta Chat core clients (deltachat-rpc-server) against local relays.

Shared by the end-to-end tests and ``bench_relay``.  Accounts are configured
from ``dclogin:`` links that name 127.0.0.1 and the relay's implicit-TLS ports
(``ic=3``: the relay's certificate is self-signed), so the core does no DNS.
"""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltachat_rpc_client import DeltaChat, Rpc
from deltachat_rpc_client.account import Account

from chatmaild.web.main import dclogin_url


def rpc_server_path() -> str:
    return str(Path(sys.executable).parent / "deltachat-rpc-server")


def relay_dclogin(relay: Any, addr: str, password: str, port443: bool = False) -> str:
    """``port443``: IMAP and SMTP both through the web port (the relay's 443), as for
    a client whose network lets only 443 out; the core asks for ALPN imap / smtp
    there (on any port but 993 / 465)."""
    web = int(relay.ports["newemail"])
    return dclogin_url(
        addr,
        password,
        imap_host=relay.host,
        imap_port=web if port443 else int(relay.ports["imaps"]),
        smtp_host=relay.host,
        smtp_port=web if port443 else int(relay.ports["submissions"]),
    )


class DCClients:
    """One deltachat-rpc-server process holding any number of accounts."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr = open(workdir / "rpc-server.log", "ab")  # noqa: SIM115 (closed in close())
        self.rpc = Rpc(
            accounts_dir=str(workdir / "accounts"),
            rpc_server_path=rpc_server_path(),
            stderr=self.stderr,
        )
        self.rpc.start()
        self.dc = DeltaChat(self.rpc)

    def account(
        self,
        relay: Any,
        creds: tuple[str, str] | None = None,
        name: str = "",
        port443: bool = False,
    ) -> Account:
        """A configured, online account on ``relay`` (fresh credentials unless given);
        ``port443``: reaching IMAP and SMTP through the web port only."""
        addr, password = creds or relay.new_credentials()
        acc = self.dc.add_account()
        if name:
            acc.set_config("displayname", name)
        acc.add_transport_from_qr(relay_dclogin(relay, addr, password, port443))
        acc.bring_online()
        acc.addr = addr  # type: ignore[attr-defined]  # transport accounts have no "addr" config
        return acc

    def close(self) -> None:
        try:
            self.dc.stop_io()
        except Exception:  # the server may already be gone; closing must go on
            pass
        self.rpc.close()
        self.stderr.close()


def wait_event(acc: Account, match: Callable[[dict], bool], timeout: float = 60) -> dict:
    """The next event of ``acc`` that ``match`` accepts (others are dropped)."""
    events = acc._rpc.get_queue(acc.id)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"account {acc.id}: no matching event within {timeout} s")
        try:
            event = events.get(timeout=left)
        except queue.Empty:
            continue
        if match(event):
            return event


def wait_incoming(acc: Account, timeout: float = 60) -> Any:
    """The next incoming message (a Message) of ``acc``."""
    event = wait_event(acc, lambda e: e["kind"] == "IncomingMsg", timeout)
    return acc.get_message_by_id(event["msgId"])


def wait_incoming_text(acc: Account, text: str, timeout: float = 60) -> Any:
    """The incoming message of ``acc`` whose text is ``text``."""
    deadline = time.monotonic() + timeout
    while True:
        msg = wait_incoming(acc, max(0.1, deadline - time.monotonic()))
        snap = msg.get_snapshot()
        if snap.text == text:
            return snap


def securejoin(inviter: Account, joiner: Account, timeout: float = 60) -> None:
    """Verified contact both ways (the core then encrypts everything)."""
    qr = inviter.get_qr_code()
    joiner.secure_join(qr)
    wait_event(
        inviter,
        lambda e: e["kind"] == "SecurejoinInviterProgress" and e["progress"] == 1000,
        timeout,
    )
    wait_event(
        joiner,
        lambda e: e["kind"] == "SecurejoinJoinerProgress" and e["progress"] == 1000,
        timeout,
    )
