"""The invite QR code, drawn by segno (Debian's python3-segno)."""

from __future__ import annotations

import io

# modules of white around the code: the quiet zone scanners need
QUIET_ZONE = 4


def _code(text: str):
    import segno  # only the web daemon needs it, and only when it draws

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
