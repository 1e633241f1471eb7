"""filtermail: the OpenPGP-only before-queue SMTP filter.

``pgp`` and ``mime`` hold the pure checks (no I/O); the daemon lives in ``main``.
"""
