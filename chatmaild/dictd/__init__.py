"""The chatmail-dict process (``main``): the roles Dovecot asks over its dict protocol
(``proxy``: the shared protocol base), each also a program of its own:

- ``doveauth`` (``auth``: account creation and login rules, ``syslimits``: load,
  memory and disk checks first; ``authhttp``: the HTTP passdb/userdb of Dovecot
  2.4's Lua);
- ``lastlogin``: the last-login dict;
- ``metadata``: IMAP METADATA (``tokens``: push device tokens; ``appversions``),
  with the persistent push notifier (``push``, over ``chatmaild.common.httppost``).
"""
