"""Two line-echo roles in one process, for testing the multi-role runtime.

    python -m testing.roledaemons --config INI --dir DIR [--hold] [ROLE ...]

Role ``role-a`` listens on DIR/role-a.sock, ``role-b`` on DIR/role-b.sock; each
answers a line with ``<role>: <line>``.  The line ``boom`` makes the handler
raise (the runtime must close that connection only).  With ``--hold``,
role-b's start waits until DIR/go exists, so a test can see the process
before every role listens.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from chatmaild.common.service import Daemon, Endpoint, run_daemons


class EchoRole(Daemon):
    name = "role"

    def endpoint(self) -> Endpoint:
        return Endpoint.unix(str(Path(self.args.dir) / f"{self.name}.sock"))

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while line := await reader.readline():
            text = line.decode().strip()
            if text == "boom":
                raise RuntimeError(f"{self.name}: handler failure requested by the test")
            self.log.info("answered %s", text)
            writer.write(f"{self.name}: {text}\n".encode())
            await writer.drain()


class RoleA(EchoRole):
    name = "role-a"


class RoleB(EchoRole):
    name = "role-b"

    async def start(self) -> None:
        go = Path(self.args.dir) / "go"
        while self.args.hold and not go.exists():
            await asyncio.sleep(0.02)


ROLES = {"role-a": RoleA, "role-b": RoleB}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("roles", nargs="*")


def roles_of(args: argparse.Namespace) -> list[type[Daemon]]:
    unknown = [r for r in args.roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r}")
    return [ROLES[r] for r in args.roles or ROLES]


def main(argv: list[str] | None = None) -> int:
    return run_daemons("roledaemons", roles_of, __doc__, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
