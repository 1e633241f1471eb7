"""The housekeeping programs, run by timers and by Dovecot: ``main`` is
chatmail-expire (daily expiry of old mail and inactive accounts), ``quota`` is
chatmail-quota-expire (Dovecot's quota_warning), ``fsreport`` is chatmail-fsreport
(storage and activity report); ``maildir`` scans mailboxes for all three.
"""
