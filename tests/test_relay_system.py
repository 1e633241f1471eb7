"""``chatmaild setup``'s decisions (pure parts) and what the package is made of.

The setup itself runs in booted Debian 12 and 13 machines: tests/test_deb.py.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

from chatmaild.common.config import parse_params
from chatmaild.relay import system
from chatmaild.relay.postconf import (
    MasterEntry,
    conflicting_services,
    inet_port,
    main_changes,
    master_changes,
    parse_main,
    parse_master,
)
from chatmaild.relay.system import dns_records, unit_dropins

ROOT = Path(__file__).resolve().parents[1]

DEBIAN_MASTER = """\
smtp       inet  n       -       y       -       -       smtpd
pickup     unix  n       -       y       60      1       pickup
#submission inet n       -       y       -       -       smtpd
maildrop   unix  -       n       n       -       -       pipe argv=/usr/bin/maildrop -d ${recipient}
"""
OURS_MASTER = """\
25         inet  n       -       n       -       -       smtpd -o smtpd_tls_security_level=encrypt
587        inet  n       -       n       -       1000    smtpd -o smtpd_recipient_restrictions=
reinject   unix  n       -       n       -       100     smtpd -o syslog_name=postfix/reinject
pickup     unix  n       -       n       60      1       pickup
"""


def test_postconf_output_is_parsed():
    main = parse_main("myhostname = a.example\nalias_maps =\nrelayhost = \nx = a = b\n")
    assert main == {"myhostname": "a.example", "alias_maps": "", "relayhost": "", "x": "a = b"}
    entries = parse_master(DEBIAN_MASTER)
    assert [e.key for e in entries] == ["smtp/inet", "pickup/unix", "maildrop/unix"]
    assert entries[2].line.endswith("-d ${recipient}")


def test_ports_of_service_names():
    assert inet_port("25") == 25
    assert inet_port("smtp") == 25
    assert inet_port("submissions") == 465
    assert inet_port("127.0.0.1:2525") == 2525
    assert inet_port("no-such-service-name") is None


def test_the_admins_listener_on_our_port_is_commented_out_not_others():
    current, ours = parse_master(DEBIAN_MASTER), parse_master(OURS_MASTER)
    # Debian's "smtp inet" would bind port 25 next to our "25 inet"
    assert conflicting_services(current, ours) == ["smtp/inet"]
    # a service of the same name and type is replaced, not commented out
    assert conflicting_services([MasterEntry("25", "inet", "25 inet n - y - - smtpd")], ours) == []


def test_only_what_differs_is_changed():
    assert main_changes({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": ""}) == ["b=3", "c="]
    # what `postconf -c /etc/chatmail/postfix -n` adds by itself stays out of main.cf
    assert main_changes({}, {"config_directory": "/etc/chatmail/postfix"}) == []
    current, ours = parse_master(DEBIAN_MASTER), parse_master(OURS_MASTER)
    changes = master_changes(current, ours)
    assert [c.split("=", 1)[0] for c in changes] == [
        "25/inet",
        "587/inet",
        "reinject/unix",
        "pickup/unix",
    ]
    assert master_changes(ours, ours) == []


def _config(**params: str):
    return parse_params({"mail_domain": "chat.example.org", **params})


def test_default_paths_need_no_unit_dropins():
    assert unit_dropins(_config()) == {}


def test_units_follow_a_moved_store_and_socket():
    dropins = unit_dropins(
        _config(
            mailboxes_dir="/srv/mail/chat.example.org",
            doveauth_socket="/run/chatmail-auth/doveauth.socket",
            filtermail_smtp_socket="/var/spool/postfix/chatmail/outgoing.sock",
        )
    )
    dicts = dropins["chatmail-dict.service"]
    assert "ReadWritePaths=/srv/mail/chat.example.org\n" in dicts
    assert "/run" not in dicts  # its sockets are chatmail-dict.socket's
    # the socket unit listens on the moved socket instead, and on the others as before
    sockets = dropins["chatmail-dict.socket"].splitlines()
    assert sockets[sockets.index("[Socket]") :] == [
        "[Socket]",
        "ListenStream=",
        "ListenStream=/run/chatmail-auth/doveauth.socket",
        "ListenStream=/run/doveauth/doveauth-http.socket",
        "ListenStream=/run/chatmail-lastlogin/lastlogin.socket",
        "ListenStream=/run/chatmail-metadata/metadata.socket",
    ]
    assert "ReadWritePaths=/srv/mail/chat.example.org\n" in dropins["chatmail-expire.service"]
    filters = dropins["filtermail.service"]
    assert filters.count("ReadWritePaths=") == 1  # the incoming and milter sockets stayed
    assert "ReadWritePaths=/var/spool/postfix/chatmail\n" in filters
    listen = [x for x in dropins["filtermail.socket"].splitlines() if x.startswith("Listen")]
    assert listen[:3] == [
        "ListenStream=",
        "ListenStream=/var/spool/postfix/chatmail/outgoing.sock",
        "ListenStream=/var/spool/postfix/filtermail/incoming.sock",
    ]
    assert dicts.startswith("# written by `chatmaild setup`")


def test_dns_records_name_the_domain_and_dkim():
    text = dns_records(_config(), "v=DKIM1; k=rsa; p=AAAA")
    assert "chat.example.org. 3600 IN MX 10 chat.example.org." in text
    assert "_dmarc.chat.example.org." in text
    assert 'opendkim._domainkey.chat.example.org. 3600 IN TXT "v=DKIM1; k=rsa; p=AAAA"' in text
    assert "_submissions._tcp.chat.example.org. 3600 IN SRV 0 1 465 chat.example.org." in text
    # MTA-STS: the policy host and the policy's id, which changes when the policy does
    assert "mta-sts.chat.example.org. 3600 IN CNAME chat.example.org." in text
    sts = next(line for line in text.splitlines() if line.startswith("_mta-sts."))
    assert '"v=STSv1; id=' in sts
    other = dataclasses.replace(_config(), mail_domain="other.example.org")
    assert sts.split("id=")[1] not in dns_records(other, "")
    assert 'chat.example.org. 3600 IN CAA 0 issue "letsencrypt.org"' in text


def _control_depends() -> str:
    text = (ROOT / "debian/control").read_text()
    return (
        text.split("\nPackage: chatmaild\n", 1)[1]
        .split("\nDepends:", 1)[1]
        .split("\nRecommends:")[0]
    )


def test_package_depends_on_what_the_relay_runs_on():
    """debian/control + pyproject (${python3:Depends}) + debian/rules (per release)
    cover scripts/packages.sh's RUNTIME_PACKAGES on both releases, and nothing else."""
    runtime = {}
    for release in ("bookworm", "trixie"):
        list_them = f"VERSION_CODENAME={release}; . /dev/stdin; echo ${{RUNTIME_PACKAGES[*]}}"
        out = subprocess.run(
            ["bash", "-c", list_them],
            input=(ROOT / "scripts/packages.sh").read_text().replace(". /etc/os-release", ""),
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        runtime[release] = set(out)
    control = set(re.findall(r"^\s*([a-z0-9][a-z0-9.+-]+)", _control_depends(), re.M))
    pyproject = (ROOT / "pyproject.toml").read_text()
    rules = (ROOT / "debian/rules").read_text()
    debian_names = {  # PyPI name -> Debian package (dh_python3 maps them)
        "dkimpy": "python3-dkim", "systemd-python": "python3-systemd",
        "crypt-r": "python3-crypt-r",
    }  # fmt: skip
    deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    python = set()
    for name in re.findall(r'^\s*"([A-Za-z0-9_-]+)', deps, re.M):
        python.add(debian_names.get(name, f"python3-{name.lower()}"))
    both = control | python - {"python3-crypt-r"} | {"python3"}
    assert runtime["bookworm"] - {"python3"} <= both, runtime["bookworm"] - both
    trixie_only = runtime["trixie"] - runtime["bookworm"]
    assert trixie_only == {"python3-crypt-r", "dovecot-auth-lua"}
    assert "RELEASE_DEPENDS := dovecot-auth-lua" in rules
    assert "crypt-r" in deps and "python_version >= '3.13'" in deps
    assert "aiosmtpd" not in deps  # measured out (bench/bench_aiosmtpd.py)


def test_versions_agree():
    changelog = (ROOT / "debian/changelog").read_text().splitlines()[0]
    version = re.search(r"\(([^)]+)\)", changelog).group(1)
    assert f'version = "{version}"' in (ROOT / "pyproject.toml").read_text()


def test_package_ships_the_units_and_no_test_code():
    rules = (ROOT / "debian/rules").read_text()
    install_units = (
        "install -m 0644 systemd/*.service systemd/*.socket systemd/*.timer"
        " debian/chatmaild/$(UNIT_DIR)/"
    )
    assert install_units in rules
    assert not (ROOT / "chatmaild" / "testing").exists()
    for unit in (ROOT / "systemd").glob("*.service"):
        text = unit.read_text()
        assert "/usr/local" not in text, unit
        exe = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
        assert exe.startswith("/usr/bin/"), unit
        assert f"Documentation=man:{Path(exe).name}(1)" in text, unit


def test_postfix_supervision_goes_where_the_master_runs(tmp_path):
    bookworm, trixie = tmp_path / "12", tmp_path / "13"
    bookworm.mkdir()
    trixie.mkdir()
    (bookworm / "postfix.service").write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    (trixie / "postfix.service").write_text("[Service]\nType=forking\nExecStart=postfix x\n")
    assert not system.postfix_runs_in_main_unit((bookworm,))
    assert system.postfix_runs_in_main_unit((tmp_path / "none", trixie))
    assert "Restart=always" in system.POSTFIX_SUPERVISION
