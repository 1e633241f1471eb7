"""The relay stack: Postfix + Dovecot + chatmaild daemons, from one set of templates.

``Relay`` runs a complete relay in a state directory (``make run``, tests);
``render`` turns chatmail.ini into the Postfix/Dovecot configuration for any
layout, production included.
"""

from .render import ALL_COMPONENTS, Layout, TemplateError, render_all, render_text
from .stack import Relay, RelayError, available_components, client_tls_context

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
