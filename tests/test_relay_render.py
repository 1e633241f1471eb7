"""Production rendering (`chatmaild render`) and the systemd units the package installs."""

from __future__ import annotations

import configparser
import pwd
import subprocess
from pathlib import Path

import pytest

from chatmaild.admin.main import main as chatmaild_main
from chatmaild.common.config import FILTERMAIL_SOCKET_DIR, parse_params, read_config
from chatmaild.relay import system
from chatmaild.relay.dovecotversion import UnsupportedDovecot, installed_series, series_of
from chatmaild.relay.render import Layout, render_all

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"


@pytest.fixture
def rendered(tmp_path):
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=chat.example.org", "-keyout", str(tls / "key.pem"),
         "-out", str(tls / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    ini = tmp_path / "chatmail.ini"
    ini.write_text(
        "[params]\nmail_domain = chat.example.org\n"
        f"tls_external_cert_and_key = {tls}/cert.pem {tls}/key.pem\n"
    )
    root = tmp_path / "root"
    assert chatmaild_main(["--config", str(ini), "render", "--root", str(root)]) == 0
    return root


def test_postfix_accepts_rendered_config(rendered):
    pdir = rendered / "etc/chatmail/postfix"
    res = subprocess.run(["postconf", "-c", str(pdir), "-n"], capture_output=True, text=True)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    main = dict(line.split(" = ", 1) for line in res.stdout.splitlines() if " = " in line)
    assert main["mydestination"] == "chat.example.org"
    assert main["queue_directory"] == "/var/spool/postfix"
    # production delivers to the world through filtermail transport (HTTPS, then SMTP)
    assert main["default_transport"] == "mxdeliv:unix:filtermail/transport.sock"
    assert main["mxdeliv_destination_concurrency_limit"] == "64"
    assert main["inet_interfaces"] == "all"
    res = subprocess.run(["postconf", "-c", str(pdir), "-M"], capture_output=True, text=True)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    services = [line.split()[0] for line in res.stdout.splitlines()]
    for svc in ("25", "587", "465", "reinject", "reinject_incoming", "authclean", "mxdeliv"):
        assert svc in services
    # the filter path has no TCP port: every hop is a UNIX socket (public/ for re-injection)
    reinject = [line.split()[:3] for line in res.stdout.splitlines() if "reinject" in line]
    assert reinject == [["reinject", "unix", "n"], ["reinject_incoming", "unix", "n"]]
    master = (pdir / "master.cf").read_text()
    assert "smtpd_proxy_filter=unix:filtermail/outgoing.sock" in master
    assert "smtpd_proxy_filter=unix:filtermail/incoming.sock" in master
    assert main["non_smtpd_milters"] == "unix:filtermail/milter.sock"


def test_sending_over_https_off_leaves_remote_mail_to_postfix(tmp_path):
    ini = tmp_path / "chatmail.ini"
    ini.write_text("[params]\nmail_domain = chat.example.org\nmxdeliv_send = no\n")
    root = tmp_path / "root"
    assert chatmaild_main(["--config", str(ini), "render", "--root", str(root)]) == 0
    res = subprocess.run(["postconf", "-c", str(root / "etc/chatmail/postfix"), "-h",
                          "default_transport", "relay_transport"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert res.stdout.split() == ["smtp", "smtp"]


def test_reinjection_socket_must_be_where_postfix_creates_it(tmp_path, capsys):
    ini = tmp_path / "chatmail.ini"
    ini.write_text(
        "[params]\nmail_domain = chat.example.org\n"
        "postfix_reinject_socket = /run/chatmail/reinject\n"
    )
    assert chatmaild_main(["--config", str(ini), "render", "--root", str(tmp_path / "r")]) == 78
    err = capsys.readouterr().err
    assert "postfix_reinject_socket = /run/chatmail/reinject is invalid" in err
    assert "/var/spool/postfix/public/NAME" in err


# what doveconf -n must show of the production config, per Dovecot series
DOVECOT_EXPECTED = {
    "2.3": [
        "imap_capability = +XDELTAPUSH XCHATMAIL",
        "mail_attribute_dict = proxy:/run/chatmail-metadata/metadata.socket:metadata",
        "args = /etc/chatmail/dovecot/auth.conf",
    ],
    "2.4": [
        "XDELTAPUSH = yes",
        "XCHATMAIL = yes",
        "lua_file = /etc/chatmail/dovecot/auth.lua",
        "socket_path = /run/doveauth/doveauth-http.socket",
        "socket_path = /run/chatmail-metadata/metadata.socket",
        "socket_path = /run/chatmail-lastlogin/lastlogin.socket",
        "lmtp_user_concurrency_limit = unlimited",
    ],
}


def test_dovecot_accepts_rendered_config(rendered):
    conf = rendered / "etc/chatmail/dovecot/dovecot.conf"
    res = subprocess.run(["doveconf", "-c", str(conf), "-n"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "/usr/bin/chatmail-quota-expire" in res.stdout
    for line in DOVECOT_EXPECTED[installed_series()]:
        assert line in res.stdout, line
    if installed_series() == "2.3":
        assert "proxy:/run/doveauth/doveauth.socket:auth" in (conf.parent / "auth.conf").read_text()
    # an lmtp process is replaced after 500 connections: what it keeps stays bounded
    lmtp = res.stdout.split("service lmtp {", 1)[1].split("\n}\n", 1)[0]
    count = "service_count" if installed_series() == "2.3" else "restart_request_count"
    assert f"  {count} = 500\n" in lmtp, lmtp
    # and about as many of them as Postfix's deliveries at once: each idle one
    # is woken by every new connection
    main_cf = (rendered / "etc/chatmail/postfix/main.cf").read_text()
    assert "\nlmtp_destination_concurrency_limit = 4\n" in main_cf


def test_dovecot_counts_metrics_only_when_metrics_are_on(rendered, tmp_path):
    """metrics_address set: the stats service answers HTTP on a socket of vmail's alone,
    and the metrics Dovecot counts are ones the installed Dovecot accepts."""
    conf = rendered / "etc/chatmail/dovecot/dovecot.conf"
    assert "stats_writer_socket_path = \n" in conf.read_text()  # off: nothing counted
    assert "metric " not in conf.read_text()
    ini = tmp_path / "chatmail.ini"
    ini.write_text(ini.read_text() + "metrics_address = 127.0.0.1:9390\n")
    root = tmp_path / "metrics"
    assert chatmaild_main(["--config", str(ini), "render", "--root", str(root)]) == 0
    conf = root / "etc/chatmail/dovecot/dovecot.conf"
    res = subprocess.run(["doveconf", "-c", str(conf), "-n"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "stats_writer_socket_path" not in out  # Dovecot's default: processes report
    listener = out.split("service stats {", 1)[1].split("\n}\n", 1)[0]
    assert "unix_listener http {" in listener and "mode = 0600" in listener
    assert f"user = {read_config(ini).vmail_user}" in listener
    if installed_series() != "2.3":
        assert "type = http" in listener
    for name in ("auth_success", "auth_failure", "imap_command", "mail_delivery",
                 "imap_hibernated", "imap_unhibernated"):  # fmt: skip
        assert f"metric {name} {{" in out, name


@pytest.mark.parametrize("series", ["2.3", "2.4"])
def test_each_dovecot_series_gets_its_own_files(tmp_path, series):
    ini = tmp_path / "chatmail.ini"
    ini.write_text("[params]\nmail_domain = chat.example.org\n")
    config = read_config(ini)
    layout = Layout.production(config).with_(
        dovecot_series=series, nodelay_so=Path("/var/lib/chatmaild/dovecot_nodelay.so")
    )
    written = render_all(config, layout, prefix=tmp_path / "root")
    dovecot = {p.name for p in written if p.parent.name == "dovecot"}
    conf = (tmp_path / "root/etc/chatmail/dovecot/dovecot.conf").read_text()
    # mail access for vmail's uid only; a system uid below Dovecot's default 500 included
    uid = pwd.getpwnam(config.vmail_user).pw_uid
    assert f"\nfirst_valid_uid = {uid}\nlast_valid_uid = {uid}\n" in conf
    if series == "2.3":
        assert dovecot == {"dovecot.conf", "auth.conf", "push_notification.lua"}
        assert "driver = dict" in conf
        assert "import_environment = TZ " in conf
        assert "LD_PRELOAD=/var/lib/chatmaild/dovecot_nodelay.so" in conf
    else:
        assert dovecot == {"dovecot.conf", "auth.lua", "push_notification.lua"}
        # 2.4 refuses a configuration that does not start with these
        assert conf.splitlines()[:2] == [
            "dovecot_config_version = 2.4.0",
            "dovecot_storage_version = 2.4.0",
        ]
        block = conf.split("import_environment {", 1)[1].split("\n}\n", 1)[0]
        assert "  LD_PRELOAD = /var/lib/chatmaild/dovecot_nodelay.so" in block.splitlines()
        for gone in ("mail_location", "plugin {", "driver = dict", "checkpassword", "%u"):
            assert gone not in conf, gone


def test_unsupported_dovecot_is_refused():
    for version in ("2.2.36", "2.5.0", None):
        with pytest.raises(UnsupportedDovecot):
            series_of(version)
    assert series_of("2.3.19.1") == "2.3"
    assert series_of("2.4.1-4") == "2.4"


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read(path)
    return parser


@pytest.mark.parametrize(
    "unit",
    [
        "chatmail-dict.service",
        "filtermail.service",
    ],
)
def test_daemon_units(unit):
    svc = _unit(SYSTEMD / unit)["Service"]
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "always"
    assert svc["User"] == "vmail"
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict"
    assert svc["PrivateTmp"] == "yes"
    exe = svc["ExecStart"].split()[0]
    assert exe.startswith("/usr/bin/")  # where the package's console scripts are
    # the console script the unit runs is one this package declares
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\n{Path(exe).name} = "' in pyproject


def test_filtermail_unit_writes_only_its_socket_directory():
    svc = _unit(SYSTEMD / "filtermail.service")["Service"]
    assert svc.get("SupplementaryGroups") == "postdrop"  # enters public/ to re-inject
    # its socket directory, and its counters' file (metrics_dir's default)
    assert svc["ReadWritePaths"].split() == [FILTERMAIL_SOCKET_DIR, "-/var/lib/chatmaild/metrics"]
    # one process serves the four roles, each on its own socket
    assert svc["ExecStart"].split()[-4:] == ["outgoing", "incoming", "milter", "transport"]
    # no capability at all: the web port is chatmail-newemail's
    assert "AmbientCapabilities" not in svc and svc["CapabilityBoundingSet"] == ""
    assert svc["ProtectHome"] == "yes"  # no mail store


def test_newemail_unit_is_a_process_of_its_own_with_port_443_only():
    svc = _unit(SYSTEMD / "chatmail-newemail.service")["Service"]
    assert svc["ExecStart"].split()[0] == "/usr/bin/chatmail-newemail"
    assert svc["AmbientCapabilities"] == svc["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert "SupplementaryGroups" not in svc and "ReadWritePaths" not in svc  # writes nothing
    assert svc["ProtectHome"] == svc["NoNewPrivileges"] == "yes" and svc["Type"] == "notify"
    # mail first when the CPU is short
    assert int(svc["Nice"]) > 0 and int(svc["CPUWeight"]) < 100
    # its connection limit fits its descriptors (a socket and a file each)
    from chatmaild.common.config import Config

    limit = Config.__dataclass_fields__["web_max_connections"].default
    assert int(svc["LimitNOFILE"]) >= 2 * limit + 64


def test_dict_unit_serves_the_three_dicts_on_the_socket_units_sockets():
    unit = _unit(SYSTEMD / "chatmail-dict.service")
    svc = unit["Service"]
    assert svc["ExecStart"].split()[-3:] == ["doveauth", "lastlogin", "metadata"]
    assert unit["Unit"]["Requires"] == "chatmail-dict.socket"
    assert "RuntimeDirectory" not in svc and svc["UMask"] == "0077"
    # systemd holds the sockets open across restarts; only vmail may connect
    sock = _unit(SYSTEMD / "chatmail-dict.socket")["Socket"]
    config = parse_params({"mail_domain": "chat.example.org"})
    listen = _listen("chatmail-dict.socket")
    assert listen == system.socket_paths(config, "chatmail-dict.socket")
    owner = (sock["SocketUser"], sock["SocketGroup"], sock["SocketMode"])
    assert owner == ("vmail", "vmail", "0600")
    assert sock["Service"] == "chatmail-dict.service"
    assert svc["ReadWritePaths"].split() == ["/home/vmail", "-/var/lib/chatmaild/metrics"]
    assert "SupplementaryGroups" not in svc and svc["CapabilityBoundingSet"] == ""


def _listen(unit: str) -> list[str]:
    text = (SYSTEMD / unit).read_text()
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ListenStream=")]


def test_filtermail_serves_on_the_socket_units_sockets_for_postfix_only():
    unit = _unit(SYSTEMD / "filtermail.service")
    assert unit["Unit"]["Requires"] == "filtermail.socket"
    sock = _unit(SYSTEMD / "filtermail.socket")["Socket"]
    config = parse_params({"mail_domain": "chat.example.org"})
    assert _listen("filtermail.socket") == system.socket_paths(config, "filtermail.socket")
    # Postfix's processes (group postfix) connect, as to the ones filtermail binds
    from chatmaild.filtermail.main import POSTFIX_CLIENT_MODE

    assert (sock["SocketUser"], sock["SocketGroup"]) == ("vmail", "postfix")
    assert int(sock["SocketMode"], 8) == POSTFIX_CLIENT_MODE
    assert sock["Service"] == "filtermail.service"


@pytest.mark.parametrize("name", ["chatmail-expire", "chatmail-fsreport", "chatmail-acme"])
def test_timers(name):
    timer = _unit(SYSTEMD / f"{name}.timer")
    assert timer["Timer"]["OnCalendar"]
    assert _unit(SYSTEMD / f"{name}.service")["Service"]["Type"] == "oneshot"


def test_acme_unit_writes_only_the_certificate_and_its_state():
    from chatmaild.common.config import ACME_STATE_DIR

    svc = _unit(SYSTEMD / "chatmail-acme.service")["Service"]
    assert svc["ExecStart"].split()[0] == "/usr/bin/chatmail-acme"
    assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
    assert svc["ReadWritePaths"].split() == ["-/etc/chatmail/tls", f"-{ACME_STATE_DIR.parent}"]
    # the web process reloads its certificate on SIGHUP, as chatmail-acme asks systemd to
    web = _unit(SYSTEMD / "chatmail-newemail.service")["Service"]
    assert web["ExecReload"] == '/bin/sh -c "kill -HUP ${MAINPID}"'
