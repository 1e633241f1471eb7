"""The probes an iroh relay answers besides /relay, shared with the HTTPS front
door (which answers them itself): no imports beyond the standard library."""

from __future__ import annotations

CHALLENGE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def probe_204_headers(headers: dict[str, str]) -> dict[str, str]:
    """/generate_204's answer echoes a well-formed challenge (as iroh's relay does)."""
    challenge = headers.get("x-tailscale-challenge", "")
    if 0 < len(challenge) < 64 and set(challenge) <= CHALLENGE_CHARS:
        return {"X-Tailscale-Response": f"response {challenge}"}
    return {}
