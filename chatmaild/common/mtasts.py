"""The relay's MTA-STS policy (RFC 8461): what https://mta-sts.<domain>/.well-known/
mta-sts.txt serves and the id its ``_mta-sts`` TXT record carries.

Senders that honour it deliver to us only over TLS with a certificate that verifies
for the MX name, and remember that for ``max_age``.  The id is derived from the
policy text, so it changes exactly when the policy does (senders then fetch again).
"""

from __future__ import annotations

import hashlib

from chatmaild.common.config import Config

PATH = "/.well-known/mta-sts.txt"
MAX_AGE = 604800  # a week: long enough to protect, short enough to change an MX


def applies(config: Config) -> bool:
    """An IP-only relay has no name to publish a policy under."""
    return not config.is_ip_domain


def policy_text(config: Config) -> str:
    mx = config.mail_domain
    return f"version: STSv1\r\nmode: enforce\r\nmx: {mx}\r\nmax_age: {MAX_AGE}\r\n"


def policy_id(config: Config) -> str:
    # RFC 8461 3.1: 1 to 32 alphanumerics
    return hashlib.sha256(policy_text(config).encode()).hexdigest()[:20]


def txt_record(config: Config) -> str:
    return f"v=STSv1; id={policy_id(config)}"
