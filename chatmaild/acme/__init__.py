"""chatmail-acme: the relay's certificate from an ACME CA (Let's Encrypt by default).

``certificate`` is the pure part (what a certificate covers, when it is due);
``tlsdir`` swaps the served certificate atomically; ``dehydrated`` runs Debian's
ACME client; ``main`` decides, retries with back-off and reloads the servers.
"""
