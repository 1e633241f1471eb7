"""In-memory dict daemon for testing the dict protocol server and the service runtime.

Runs the real :class:`~chatmaild.dictd.proxy.DictDaemon` machinery on a socket
(``--listen`` is required) with a store held in memory.  Keys with special
prefixes drive failure paths:

    shared/fail/...     lookup raises (the server answers F and keeps serving)
    shared/slow/SECS    lookup sleeps SECS seconds, then answers "slept"
    shared/list/...     lookup answers the stored value split on commas (multi-value O)
    shared/user         lookup answers the user the request carried ("" if none)

Iterating yields every stored key below the first path, in key order; a
commit with a change to ``shared/fail`` raises, one to ``shared/refuse``
answers F.
"""

from __future__ import annotations

import asyncio

from chatmaild.common.service import Endpoint, run_daemon
from chatmaild.dictd.proxy import DictDaemon, Transaction


class MemDictDaemon(DictDaemon):
    name = "memdict"

    def __init__(self, config, args=None) -> None:
        super().__init__(config, args)
        self.store: dict[str, str] = {}

    def endpoint(self) -> Endpoint:
        raise SystemExit("memdict: --listen is required")

    async def lookup(self, key: str, user: str | None):
        if key.startswith("shared/fail/"):
            raise RuntimeError("lookup failure requested by the test")
        if key.startswith("shared/slow/"):
            await asyncio.sleep(float(key.rsplit("/", 1)[1]))
            return "slept"
        if key == "shared/user":
            return user or ""
        if key.startswith("shared/list/"):
            value = self.store.get(key)
            return value.split(",") if value is not None else None
        return self.store.get(key)

    async def iterate(self, flags, max_rows, paths, user):
        prefix = paths[0] if paths else ""
        for key in sorted(self.store):
            if key.startswith(prefix):
                await asyncio.sleep(0)
                yield key, self.store[key]

    async def commit(self, txn: Transaction) -> bool:
        for change in txn.changes:
            if change.key == "shared/fail":
                raise RuntimeError("commit failure requested by the test")
            if change.key == "shared/refuse":
                return False
        for change in txn.changes:
            if change.op == "set":
                self.store[change.key] = str(change.value)
            elif change.op == "unset":
                self.store.pop(change.key, None)
            else:
                self.store[change.key] = str(int(self.store.get(change.key, "0")) + change.value)
        return True


def main(argv: list[str] | None = None) -> int:
    return run_daemon(MemDictDaemon, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
