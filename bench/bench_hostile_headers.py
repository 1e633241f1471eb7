"""CPU cost of hostile header sections (issue 14, item 4), in-process.

A message without an empty line is all header.  Before the header section
was bounded, a 29 MB one (``From: x`` + ``X: y`` lines) cost 13.9 s of CPU in
the MIME parse and another 13.8 s in dkimpy's header parse when its
recipients took cleartext (Debian 12, 2 cores); now it is refused with
``552 5.3.4`` after at most ``MAX_HEADER_SECTION`` bytes.  Printed: process
CPU time of the filters' classification (and of dkimpy's header parse where
the message gets that far) for that message, for the largest header section
allowed, and for an ordinary encrypted message of the same 29 MB.
"""

from __future__ import annotations

import time

from chatmaild.filtermail import dkim
from chatmaild.filtermail.common import classify
from chatmaild.filtermail.headers import MAX_HEADER_SECTION, HeaderError
from testing import mails

SENDER = "remote@other.example"
RCPTS = ["alice0001@chat.example"]
SIZE = 29 * 10**6


def _cpu(message: bytes) -> tuple[float, str]:
    start = time.process_time()
    try:
        result = classify(message, False, SENDER, RCPTS)
    except HeaderError as e:
        return time.process_time() - start, e.reply[:9]
    dkim._parse_headers(message[: result.header_end])  # what DKIM verification parses
    return time.process_time() - start, "classified"


def main() -> None:
    field = b"X: y\r\n"
    head = f"From: <{SENDER}>\r\n".encode()
    cases = {
        "no_empty_line_29mb": head + field * (SIZE // len(field)),
        "largest_header_section": head
        + field * ((MAX_HEADER_SECTION - len(head)) // len(field))
        + b"\r\nbody\r\n",
        "encrypted_29mb": mails.encrypted_message(SENDER, RCPTS, size=SIZE),
    }
    for name, message in cases.items():
        cpu, outcome = _cpu(message)
        print(f"hostile_headers_cpu_{name}: {cpu * 1000:.0f} ms ({outcome})")


if __name__ == "__main__":
    main()
