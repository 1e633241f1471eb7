"""The relay's web front door, served by chatmail-newemail.

``pages`` renders the home, info and privacy pages from chatmail.ini
(templates in ``templates/``), ``qr`` draws the invite QR code and ``static``
serves an operator's own site from ``www_folder`` instead.
"""
