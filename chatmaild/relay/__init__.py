"""Postfix + Dovecot + chatmaild daemons as one relay, from one set of templates.

``render`` turns chatmail.ini into the Postfix/Dovecot configuration for any
layout; ``system`` applies it to an installed relay (``chatmaild setup``).
``stack.Relay`` runs a complete relay in a state directory (``make run``,
tests), with its parts: ``ports`` (picked and held), ``processes`` (spawned and
supervised), ``readiness`` (every socket answers), ``peers`` (other local
relays), ``dns`` (their DKIM keys), ``staging`` (a copy the daemons' user can run).
"""

from chatmaild.relay.render import ALL_COMPONENTS, Layout, TemplateError, render_all, render_text
from chatmaild.relay.stack import Relay, RelayError, available_components, client_tls_context

__all__ = [
    "ALL_COMPONENTS",
    "Layout",
    "Relay",
    "RelayError",
    "TemplateError",
    "available_components",
    "client_tls_context",
    "render_all",
    "render_text",
]
