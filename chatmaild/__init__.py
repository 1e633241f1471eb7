"""chatmaild: the daemons that make Debian's Postfix and Dovecot a chatmail relay.

One package per program (ARCHITECTURE.md maps package -> process -> unit -> socket):
``dictd`` (chatmail-dict), ``filtermail``, ``web`` (chatmail-newemail), ``expire``
(the timers' programs), ``admin`` (chatmaild), ``relay`` (``make run`` and the
installed relay's setup); ``common`` is what they share.
"""
