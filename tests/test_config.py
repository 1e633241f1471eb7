"""chatmail.ini parsing: defaults, every error path, and the `chatmaild config` output."""

from __future__ import annotations

import configparser
import logging
import subprocess
import sys

import pytest

from chatmaild.admin.main import render_config
from chatmaild.common.config import (
    Config,
    ConfigError,
    config_fields,
    format_size,
    parse_params,
    parse_size,
    parse_size_mb,
    read_config,
    write_config,
)


def ini(tmp_path, text: str):
    path = tmp_path / "chatmail.ini"
    path.write_text(text)
    return path


def test_iroh_relay_and_appversions_unset_empty_and_set(tmp_path):
    from chatmaild.dictd.appversions import PACKAGED_PATH

    unset = read_config(ini(tmp_path, "[params]\nmail_domain = chat.example.org\n"))
    assert unset.iroh_relay == ""  # none: no iroh relay of ours runs behind the domain
    assert unset.appversions_path == str(PACKAGED_PATH)
    assert PACKAGED_PATH.is_file()
    empty = read_config(
        ini(tmp_path, "[params]\nmail_domain = 1.2.3.4\niroh_relay =\nappversions_path =\n")
    )
    assert empty.iroh_relay == "" and empty.appversions_path == ""
    named = read_config(
        ini(tmp_path, "[params]\nmail_domain = x.org\niroh_relay = https://i.x.org\n")
    )
    assert named.iroh_relay == "https://i.x.org"
    with pytest.raises(ConfigError, match="appversions_path = 'rel/a.json' is invalid"):
        read_config(ini(tmp_path, "[params]\nmail_domain = x.org\nappversions_path = rel/a.json\n"))


def test_minimal_config_gets_defaults(tmp_path):
    config = read_config(ini(tmp_path, "[params]\nmail_domain = chat.example.org\n"))
    assert config.mail_domain == "chat.example.org"
    assert config.mailboxes_dir == "/home/vmail/mail/chat.example.org"
    assert config.notification_dir == "/home/vmail/mail/chat.example.org/pending_notifications"
    assert config.username_min_length == 9
    assert config.password_min_length == 9
    assert config.max_mailbox_size == 500 * 1024**2
    assert config.max_message_size == 31457280
    assert config.min_free_disk_space == 1024**3
    assert config.doveauth_socket == "/run/doveauth/doveauth.socket"
    assert config.tls_external_cert_and_key is None
    assert config.is_ip_domain is False
    assert config.unknown_keys == ()


def test_values_are_typed(tmp_path):
    config = read_config(
        ini(
            tmp_path,
            "[params]\nmail_domain = Chat.Example.ORG.\nmax_load_1m = 2.5\n"
            "disable_ipv6 = yes\nsubmission_port = 2525\nmax_mailbox_size = 2G\n"
            "tls_external_cert_and_key = /etc/c.pem /etc/k.pem\nmailboxes_dir = /srv/mail\n",
        )
    )
    assert config.mail_domain == "chat.example.org"  # lower case, trailing dot dropped
    assert config.max_load_1m == 2.5
    assert config.disable_ipv6 is True
    assert config.submission_port == 2525
    assert config.max_mailbox_size_mb == 2048
    assert config.tls_external_cert_and_key == ("/etc/c.pem", "/etc/k.pem")
    assert config.mailboxes_dir == "/srv/mail"
    assert config.notification_dir == "/srv/mail/pending_notifications"


@pytest.mark.parametrize("raw", ["1.2.3.4", "[1.2.3.4]"])
def test_ipv4_mail_domain_becomes_bracketed(tmp_path, raw):
    config = read_config(ini(tmp_path, f"[params]\nmail_domain = {raw}\n"))
    assert config.mail_domain == "[1.2.3.4]"
    assert config.is_ip_domain
    assert config.mailboxes_dir == "/home/vmail/mail/1.2.3.4"


# ---------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_config(tmp_path / "nope.ini")


def test_unreadable_path_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        read_config(tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "chatmail.ini"
    path.write_bytes(b"[params]\nmail_domain = \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        read_config(path)


@pytest.mark.parametrize(
    "text",
    [
        "mail_domain = x.org\n",  # no section header
        "[params\nmail_domain = x.org\n",  # broken header
        "[params]\nmail_domain = a.org\nmail_domain = b.org\n",  # duplicate key
        "[params]\n[params]\n",  # duplicate section
        "[params]\n  indented continuation without key\n",
    ],
)
def test_malformed_ini(tmp_path, text):
    with pytest.raises(ConfigError, match="malformed ini"):
        read_config(ini(tmp_path, text))


def test_missing_section(tmp_path):
    with pytest.raises(ConfigError, match=r"missing section \[params\]"):
        read_config(ini(tmp_path, "[other]\nmail_domain = x.org\n"))


def test_missing_mail_domain(tmp_path):
    with pytest.raises(ConfigError, match="required key mail_domain is missing"):
        read_config(ini(tmp_path, "[params]\nmax_load_1m = 3\n"))


# ---------------------------------------------------------------- value errors

BAD_VALUES = [
    ("mail_domain", "localhost", "fully qualified domain name"),
    ("mail_domain", "exa mple.org", "fully qualified domain name"),
    ("mail_domain", "-bad.example.org", "fully qualified domain name"),
    ("mail_domain", "", "fully qualified domain name"),
    ("username_min_length", "abc", "whole number"),
    ("username_min_length", "0", "whole number in 1..64"),
    ("username_max_length", "65", "whole number in 1..64"),
    ("password_min_length", "-1", "whole number in 1..1024"),
    ("max_user_send_per_minute", "1.5", "whole number"),
    ("submission_port", "0", "whole number in 1..65535"),
    ("smtp_port", "70000", "whole number in 1..65535"),
    ("max_mailbox_size", "lots", "size like"),
    ("max_message_size", "12X", "size like"),
    ("min_free_disk_space", "1T2", "size like"),
    ("max_load_1m", "high", "number such as"),
    ("max_load_1m", "0", "greater than 0"),
    ("disable_ipv6", "maybe", "boolean"),
    ("imap_rawlog", "2", "boolean"),
    ("mailboxes_dir", "relative/path", "absolute path"),
    ("doveauth_socket", "run/x.sock", "absolute path"),
    ("vmail_user", "Bad User", "system user name"),
    ("filtermail_smtp_socket", "filtermail/outgoing.sock", "absolute path"),
    ("tls_external_cert_and_key", "/only/one", "two absolute paths"),
    ("tls_external_cert_and_key", "rel/c rel/k", "two absolute paths"),
    ("notification_url", "ftp://x", "http:// or https:// URL"),
    ("iroh_relay", "not a url", "http:// or https:// URL"),
    ("passthrough_senders", "@example.org", "is not an e-mail address"),
    ("passthrough_senders", "a@b.example nobody", "'nobody' is not an e-mail address"),
    ("passthrough_recipients", "nobody", "neither an e-mail address nor @domain"),
    ("passthrough_recipients", "@", "neither an e-mail address nor @domain"),
    ("passthrough_recipients", "@bad..example", "neither an e-mail address nor @domain"),
]


@pytest.mark.parametrize("key,value,allowed", BAD_VALUES)
def test_bad_value_names_key_value_and_allowed(tmp_path, key, value, allowed):
    domain = "" if key == "mail_domain" else "mail_domain = x.example.org\n"
    path = ini(tmp_path, f"[params]\n{domain}{key} = {value}\n")
    with pytest.raises(ConfigError) as excinfo:
        read_config(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert f"{key} = {value.strip()!r}" in message
    assert allowed in message


def test_every_key_has_parser_and_doc():
    for f in config_fields():
        assert callable(f.metadata["parse"]), f.name
        assert f.metadata["doc"].strip(), f.name


def test_min_length_greater_than_max(tmp_path):
    path = ini(
        tmp_path,
        "[params]\nmail_domain = x.example.org\nusername_min_length = 10\n"
        "username_max_length = 5\n",
    )
    with pytest.raises(ConfigError) as excinfo:
        read_config(path)
    message = str(excinfo.value)
    assert "username_min_length = 10" in message
    assert "username_max_length = 5" in message
    assert "min <= max" in message


def test_unknown_keys_warn_once(tmp_path, caplog):
    path = ini(
        tmp_path,
        "[params]\nmail_domain = x.example.org\nfrobnicate = 1\nzeta = 2\n"
        "filtermail_http_port_incoming = 10082\n",  # a reference key we accept silently
    )
    with caplog.at_level(logging.WARNING, logger="chatmaild.common.config"):
        config = read_config(path)
    assert config.unknown_keys == ("frobnicate", "zeta")
    warnings = [r for r in caplog.records if r.name == "chatmaild.common.config"]
    assert len(warnings) == 1
    assert "frobnicate, zeta" in warnings[0].getMessage()


def test_old_port_keys_are_accepted_with_one_warning(tmp_path, caplog):
    """The filter path's loopback ports became UNIX sockets; a chatmail.ini
    naming the ports (the reference's, or an older one of ours) still loads."""
    path = ini(
        tmp_path,
        "[params]\nmail_domain = x.example.org\nfiltermail_smtp_port = 10080\n"
        "postfix_reinject_port_incoming = 10026\nfiltermail_host = 127.0.0.1\n"
        "filtermail_milter_port = not even a number\n",
    )
    with caplog.at_level(logging.WARNING, logger="chatmaild.common.config"):
        config = read_config(path)
    assert config.unknown_keys == ()
    assert config.filtermail_smtp_socket == "/var/spool/postfix/filtermail/outgoing.sock"
    assert config.postfix_reinject_socket_incoming == "/var/spool/postfix/public/reinject_incoming"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "chatmaild.common.config"]
    assert "no longer used" in warning
    assert "filtermail_smtp_port (see filtermail_smtp_socket)" in warning
    assert "postfix_reinject_port_incoming (see postfix_reinject_socket_incoming)" in warning
    assert "filtermail_host" in warning and "filtermail_milter_port" in warning
    rendered = render_config(config)  # `chatmaild config`: no such key, one comment
    assert "\nfiltermail_smtp_port =" not in rendered and "# no longer used" in rendered


def test_unknown_keys_warning_can_be_suppressed(tmp_path, caplog):
    path = ini(tmp_path, "[params]\nmail_domain = x.example.org\nfrobnicate = 1\n")
    with caplog.at_level(logging.WARNING, logger="chatmaild.common.config"):
        read_config(path, warn_unknown=False)
    assert not [r for r in caplog.records if r.name == "chatmaild.common.config"]


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("31457280", 31457280),
        ("500M", 500 * 1024**2),
        ("500m", 500 * 1024**2),
        ("2G", 2 * 1024**3),
        ("100MB", 100 * 1024**2),
        ("64KiB", 64 * 1024),
        (" 1 T ", 1024**4),
        ("0", 0),
    ],
)
def test_parse_size(raw, expected):
    assert parse_size(raw) == expected


@pytest.mark.parametrize("raw", ["", "M", "1.5G", "-1", "10 MiBs", "1e6"])
def test_parse_size_rejects(raw):
    with pytest.raises(ValueError, match="size like"):
        parse_size(raw)


@pytest.mark.parametrize(
    "raw,expected", [("200", 200 * 1024**2), ("200M", 200 * 1024**2), ("1G", 1024**3)]
)
def test_parse_size_mb_bare_number_means_megabytes(raw, expected):
    assert parse_size_mb(raw) == expected


@pytest.mark.parametrize("n", [0, 1, 1000, 1024, 200 * 1024**2, 31457280, 1024**3 + 1])
def test_format_size_reads_back(n):
    assert parse_size(format_size(n)) == n
    assert parse_size_mb(format_size(n)) == n


# ---------------------------------------------------------------- round trip and output


def test_write_config_then_read(tmp_path):
    path = write_config(tmp_path / "c.ini", mail_domain="x.example.org", disable_ipv6=True)
    config = read_config(path)
    assert config.disable_ipv6 is True


def test_rendered_config_is_valid_ini_and_reads_back_equal(tmp_path):
    original = read_config(
        ini(
            tmp_path,
            "[params]\nmail_domain = x.example.org\nmax_mailbox_size = 1G\n"
            "tls_external_cert_and_key = /c /k\nimap_compress = on\n",
        )
    )
    text = render_config(original)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    assert parser.get("params", "mail_domain") == "x.example.org"
    again = parse_params(dict(parser.items("params")))
    assert again == original
    for f in config_fields():
        assert f"# {f.metadata['doc']}\n{f.name} = " in text


def test_chatmaild_config_command(tmp_path):
    path = ini(tmp_path, "[params]\nmail_domain = x.example.org\n")
    out = subprocess.run(
        [sys.executable, "-m", "chatmaild.admin.main", "--config", str(path), "config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "mail_domain = x.example.org" in out
    assert "max_mailbox_size = 500M" in out
    assert "min_free_disk_space = 1G" in out
    single = subprocess.run(
        [sys.executable, "-m", "chatmaild.admin.main", "-c", str(path), "config", "max_load_1m"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert single.strip() == "5.0"


def test_bad_config_exits_78_with_message(tmp_path):
    path = ini(tmp_path, "[params]\nmail_domain = x.example.org\nmax_load_1m = x\n")
    proc = subprocess.run(
        [sys.executable, "-m", "chatmaild.dictd.doveauth", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 78
    assert "max_load_1m = 'x' is invalid" in proc.stderr


def test_config_is_frozen():
    config = Config(mail_domain="x.example.org")
    with pytest.raises(AttributeError):
        config.mail_domain = "y.example.org"  # type: ignore[misc]


def test_passthrough_lists(tmp_path):
    config = read_config(ini(tmp_path, "[params]\nmail_domain = x.example.org\n"))
    assert config.passthrough_senders == () and config.passthrough_recipients == ()
    config = read_config(
        ini(
            tmp_path,
            "[params]\nmail_domain = x.example.org\n"
            "passthrough_senders = Echo@X.example.org,bot@x.example.org\n"
            "passthrough_recipients = xstore@testrun.org @Example.ORG\n"
            "    privacy@[192.0.2.1]\n",
        )
    )
    assert config.passthrough_senders == ("echo@x.example.org", "bot@x.example.org")
    assert config.passthrough_recipients == (
        "xstore@testrun.org",
        "@example.org",
        "privacy@[192.0.2.1]",
    )
    assert config.unknown_keys == ()
    items = {key: value for key, value, _ in config.as_ini_items()}
    assert items["passthrough_recipients"] == "xstore@testrun.org @example.org privacy@[192.0.2.1]"
