"""Account store: layout, atomic writes, locking under concurrency, flags, listing."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from chatmaild.common.accounts import (
    DAY,
    FLAG_DISABLED,
    FLAG_ENFORCE_E2EE,
    AccountStore,
    atomic_write,
    hash_password,
    verify_password,
)
from chatmaild.common.addr import AddressError
from chatmaild.common.config import Config

DOMAIN = "example.org"


@pytest.fixture
def store(tmp_path) -> AccountStore:
    config = Config(
        mail_domain=DOMAIN,
        mailboxes_dir=str(tmp_path / "mail"),
        nocreate_file=str(tmp_path / "nocreate"),
        username_min_length=3,
        username_max_length=20,
    )
    return AccountStore(config)


def leftovers(root: Path) -> list[str]:
    """Temp files of atomic writes and half-deleted accounts anywhere below root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            if ".tmp-" in name or name.startswith(".deleting-"):
                found.append(os.path.join(dirpath, name))
    return found


def test_hash_and_verify():
    stored = hash_password("correct horse")
    assert stored.startswith("{SHA512-CRYPT}$6$")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horsE", stored)
    assert not verify_password("correct horse", "{PLAIN}correct horse")
    assert hash_password("same") != hash_password("same")  # salted


def test_a_creation_answers_only_once_password_and_directory_entry_are_synced(store, monkeypatch):
    """Durability: the password file's data and its name in the account directory are
    fsynced before create() returns (the rename comes first, so one journal commit
    carries both)."""
    synced: list[tuple[tuple[int, int], bool]] = []  # (device, inode), password named yet
    real_fsync = os.fsync

    def recording_fsync(fd):
        st = os.fstat(fd)
        home = store.root / f"durable@{DOMAIN}"
        synced.append(((st.st_dev, st.st_ino), (home / "password").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    account = store.create(f"durable@{DOMAIN}", "durable-password").account
    monkeypatch.undo()
    pw, home = account.password_path.stat(), account.home.stat()
    inodes = {ino for ino, _ in synced}
    assert (pw.st_dev, pw.st_ino) in inodes
    assert (home.st_dev, home.st_ino) in inodes
    # the directory's fsync came after the rename, so it covers the name
    assert all(named for ino, named in synced if ino == (home.st_dev, home.st_ino))


def test_create_layout(store):
    result = store.create(f"Alice@{DOMAIN}", "s3cret-password")
    assert result.created
    account = result.account
    assert account.addr == f"alice@{DOMAIN}"
    assert account.home == store.root / f"alice@{DOMAIN}"
    assert account.password_path.read_text().startswith("{SHA512-CRYPT}$6$")
    assert verify_password("s3cret-password", account.password_hash())
    assert stat.S_IMODE(account.password_path.stat().st_mode) == 0o600
    assert account.enforces_e2ee_incoming
    assert (account.home / FLAG_ENFORCE_E2EE).exists()
    assert not account.is_disabled
    assert store.lookup(f"alice@{DOMAIN}") == account
    assert leftovers(store.root) == []


def test_create_existing_keeps_the_first_password(store):
    first = store.create(f"bob@{DOMAIN}", "first-password").account.password_hash()
    again = store.create(f"BOB@{DOMAIN}", "other-password")
    assert not again.created
    assert again.account.password_hash() == first


def test_create_refuses_invalid_address(store):
    with pytest.raises(AddressError):
        store.create(f"../x@{DOMAIN}", "password123")
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_empty_password_file_means_no_account(store, caplog):
    account = store.account(f"empty@{DOMAIN}")
    account.home.mkdir(parents=True)
    account.password_path.write_text("")
    assert account.password_hash() is None
    assert store.lookup(account.addr) is None
    assert "empty password file" in caplog.text
    # creation repairs it
    assert store.create(account.addr, "password123").created
    assert verify_password("password123", account.password_hash())


def test_creation_refusal_rules(store):
    assert store.creation_refusal(f"carol@{DOMAIN}", "long-enough") is None
    assert "shorter than 9" in store.creation_refusal(f"carol@{DOMAIN}", "short")
    assert "invalid address" in store.creation_refusal(f"ca@{DOMAIN}", "long-enough")
    assert "invalid address" in store.creation_refusal("carol@elsewhere.org", "long-enough")
    assert "invalid address" in store.creation_refusal(f"ca rol@{DOMAIN}", "long-enough")
    store.set_registration_blocked(True)
    assert store.registration_blocked
    assert "registration blocked" in store.creation_refusal(f"carol@{DOMAIN}", "long-enough")
    store.set_registration_blocked(False)
    assert not store.registration_blocked
    store.set_registration_blocked(False)  # idempotent
    assert store.creation_refusal(f"carol@{DOMAIN}", "long-enough") is None


def test_last_login_has_day_granularity(store):
    account = store.create(f"dave@{DOMAIN}", "password123").account
    now = 1_700_000_000 + 12345
    assert account.set_last_login(now) is True
    assert account.last_login() == now // DAY * DAY
    # the same day again does not touch the disk
    assert account.set_last_login(now + 60) is False
    assert account.set_last_login(now + DAY) is True
    assert account.last_login() == (now + DAY) // DAY * DAY


def test_set_password_is_not_a_login(store):
    account = store.create(f"erin@{DOMAIN}", "password123").account
    account.set_last_login(1_600_000_000)
    before = account.last_login()
    store.set_password(account.addr, "new-password")
    assert verify_password("new-password", account.password_hash())
    assert account.last_login() == before


def test_flags(store):
    account = store.create(f"frank@{DOMAIN}", "password123").account
    account.set_flag(FLAG_DISABLED, True)
    assert account.is_disabled
    account.set_flag(FLAG_DISABLED, False)
    account.set_flag(FLAG_DISABLED, False)
    assert not account.is_disabled
    account.set_flag(FLAG_ENFORCE_E2EE, False)
    assert not account.enforces_e2ee_incoming


def test_delete(store):
    account = store.create(f"gina@{DOMAIN}", "password123").account
    (account.home / "cur").mkdir()
    (account.home / "cur" / "msg").write_text("x")
    assert store.delete(f"GINA@{DOMAIN}")
    assert not account.home.exists()
    assert store.delete(account.addr) is False
    assert leftovers(store.root) == []
    # the address can be registered again
    assert store.create(account.addr, "password456").created


def test_delete_does_not_follow_symlinks(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    store.root.mkdir(parents=True)
    (store.root / f"link@{DOMAIN}").symlink_to(outside)
    assert store.delete(f"link@{DOMAIN}") is False
    assert (outside / "precious").read_text() == "keep"


def test_iter_addresses(store, tmp_path):
    for name in ("zed", "amy", "mike"):
        store.create(f"{name}@{DOMAIN}", "password123")
    (store.root / "pending_notifications").mkdir()
    (store.root / ".deleting-x").mkdir()
    (store.root / f"file@{DOMAIN}").write_text("not a dir")
    (store.root / f"sym@{DOMAIN}").symlink_to(tmp_path)
    assert list(store.iter_addresses()) == [f"amy@{DOMAIN}", f"mike@{DOMAIN}", f"zed@{DOMAIN}"]


def test_iter_addresses_without_root(store):
    assert list(store.iter_addresses()) == []


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_atomic_write_failure_leaves_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "f"
    atomic_write(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_readers_never_see_a_partial_password_file(store):
    """A reader racing a rewriter sees the old or the new hash, never half."""
    account = store.create(f"race@{DOMAIN}", "password-0").account
    hashes = {hash_password(f"password-{i}") for i in range(5)}
    stop = threading.Event()
    seen: set[str] = set()

    def reader():
        while not stop.is_set():
            value = account.password_hash()
            assert value is not None
            seen.add(value)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for stored in hashes:
        atomic_write(account.password_path, stored.encode())
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    valid = hashes | {hash for hash in seen if verify_password("password-0", hash)}
    assert seen <= valid


# ---------------------------------------------------------------- concurrency


def test_200_threads_create_one_account(store):
    addr = f"popular@{DOMAIN}"
    barrier = threading.Barrier(200)
    results: list[tuple[bool, str]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        result = store.create(addr, f"password-{i:03d}")
        stored = result.account.password_hash()
        with lock:
            results.append((result.created, stored))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200
    assert sum(created for created, _ in results) == 1
    hashes = {stored for _, stored in results}
    assert len(hashes) == 1
    (final,) = hashes
    assert store.account(addr).password_hash() == final
    winners = [i for i in range(200) if verify_password(f"password-{i:03d}", final)]
    assert len(winners) == 1
    assert leftovers(store.root) == []


def _create_in_process(root, addr, i, start, queue):
    config = Config(mail_domain=DOMAIN, mailboxes_dir=root)
    store = AccountStore(config)
    start.wait()
    result = store.create(addr, f"password-{i:03d}")
    queue.put((result.created, result.account.password_hash()))


def test_200_processes_create_one_account(store):
    addr = f"crowd@{DOMAIN}"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_create_in_process, args=(str(store.root), addr, i, start, queue))
        for i in range(200)
    ]
    for p in procs:
        p.start()
    start.set()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum(created for created, _ in results) == 1
    assert len({stored for _, stored in results}) == 1
    assert store.account(addr).password_hash() == results[0][1]
    assert leftovers(store.root) == []
    # the lock is a flock on the directory: no lock file
    assert sorted(os.listdir(store.account(addr).home)) == [FLAG_ENFORCE_E2EE, "password"]


def test_the_dict_roles_of_one_process_share_one_account_store(store, tmp_path):
    """chatmail-dict runs doveauth, metadata and lastlogin in one process: one cache
    of account objects (about 1 KB each, 4,096 at most), not three."""
    from chatmaild.dictd.auth import AuthService
    from chatmaild.dictd.lastlogin import LastLoginDaemon
    from chatmaild.dictd.tokens import TokenStore

    config = store.config
    shared = AccountStore.shared(config)
    assert TokenStore(config).accounts is shared
    assert AuthService(config).store is shared
    assert LastLoginDaemon(config).accounts is shared
    other = Config(mail_domain=DOMAIN, mailboxes_dir=str(tmp_path / "other"))
    assert AccountStore.shared(other) is not shared
