"""The invite QR code, drawn by segno (Debian's python3-segno), in a child process.

The web process draws a handful of codes in its life (one per name or address
of the relay) but would keep what segno imports for good: segno pulls in
urllib.request, http.client, the email parser and OpenSSL's hash table, 3 to
4 MB of RSS on Debian 13 (README, "Memory").  So ``python3 -m chatmaild.web.qr
TEXT ...`` draws them and exits, and :class:`QRCodes` keeps only the SVG text.

An IP-only relay is the exception: its code is a ``dclogin:`` account, new on
every visit, so its web process draws in place (:func:`page_svg`, about 5 ms)
and carries segno for good.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections import OrderedDict

# modules of white around the code: the quiet zone scanners need
QUIET_ZONE = 4
# codes kept: a relay has one invite per name or address it is reached by
KEEP = 16


def _code(text: str):
    import segno  # only the drawing process needs it

    # error level M at least; segno raises it further when that costs no size
    return segno.make(text, error="m", micro=False)


def qr_svg_inline(text: str, title: str) -> str:
    """``<svg>`` element for an HTML page: scales with CSS, dark on white in any theme."""
    return _code(text).svg_inline(
        scale=1,
        border=QUIET_ZONE,
        dark="#000",
        light="#fff",
        omitsize=True,
        svgclass="qr",
        lineclass=None,
        title=title,
    )


def qr_svg_document(text: str, title: str, scale: int = 8) -> bytes:
    """A standalone SVG file of the code, ``scale`` pixels per module."""
    out = io.BytesIO()
    _code(text).save(
        out, kind="svg", scale=scale, border=QUIET_ZONE, dark="#000", light="#fff", title=title
    )
    return out.getvalue()


def page_svg(text: str) -> str:
    """The inline ``<svg>`` of ``text`` for a page, announced as an image."""
    inline = qr_svg_inline(text, title=f"QR code: {text}")
    return inline.replace("<svg ", '<svg role="img" ', 1)


def drawn(text: str) -> tuple[str, str]:
    """(inline ``<svg>`` for a page, standalone SVG document) of an invite."""
    return page_svg(text), qr_svg_document(text, title=text).decode()


def _command(texts: list[str]) -> list[str]:
    # the same interpreter and sys.path (PYTHONPATH of a staged copy is inherited)
    return [sys.executable, "-m", __name__, *texts]


def _parse(out: bytes, texts: list[str]) -> dict[str, tuple[str, str]]:
    pairs = json.loads(out)
    return {t: (inline, doc) for t, (inline, doc) in zip(texts, pairs, strict=True)}


class QRCodes:
    """The codes drawn so far (at most KEEP, the least recently used dropped)."""

    def __init__(self) -> None:
        self.codes: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._drawing = asyncio.Lock()

    def _keep(self, new: dict[str, tuple[str, str]]) -> None:
        self.codes.update(new)
        while len(self.codes) > KEEP:
            self.codes.popitem(last=False)

    def draw_now(self, texts: list[str]) -> None:
        """Draw at start (blocking: nothing is served yet)."""
        missing = [t for t in texts if t not in self.codes]
        if missing:
            out = subprocess.run(_command(missing), capture_output=True, check=True).stdout
            self._keep(_parse(out, missing))

    async def get(self, text: str) -> tuple[str, str]:
        """The code of ``text``, drawn by a child process the first time (one at a time)."""
        if text not in self.codes:
            async with self._drawing:
                if text not in self.codes:
                    proc = await asyncio.create_subprocess_exec(
                        *_command([text]), stdout=subprocess.PIPE, stderr=subprocess.PIPE
                    )
                    out, err = await proc.communicate()
                    if proc.returncode != 0:
                        raise RuntimeError(f"drawing a QR code failed: {err.decode()[-500:]}")
                    self._keep(_parse(out, [text]))
        self.codes.move_to_end(text)
        return self.codes[text]


def main(argv: list[str]) -> int:
    json.dump([drawn(text) for text in argv], sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
