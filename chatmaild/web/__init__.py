"""The chatmail-newemail process (``main``): the relay's web front door on port 443.

``server`` is the HTTPS server (asyncio, TLS on memory BIOs, h11) with
``limits`` (admission per client and in all, refusals logged once then
summarised); ``pages`` renders the home, info and privacy pages from
chatmail.ini (templates in ``templates/``), ``qr`` draws the invite QR code in a
child process and ``static`` serves an operator's own site from ``www_folder``.
"""
