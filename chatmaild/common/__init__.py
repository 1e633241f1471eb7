"""What several programs share: the configuration (``config``), the daemon runtime
(``service``: argv, logging, sockets, sd_notify, graceful stop), the account store
(``accounts``, ``accountlock``, ``shacrypt``), address rules (``addr``) and the
GCRA rate limiter (``ratelimit``).  No program lives here.
"""
