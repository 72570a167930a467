"""Attacks of the second security pass (issue 12), each reproduced, each refused.

The first pass (test_hardening.py) holds what already held; this module holds the findings
that did not: files left readable, temp names an attacker can plant, trust in proxies and Host
headers, slow clients, crafted backups, rate limits an attacker can step around.
"""

import os
import sqlite3
import stat

import pytest

import kokoa
from conftest import InProcessServer, make_config, run_cli


def mode(path):
    return stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)


@pytest.fixture
def loose_umask():
    """The umask most systems have (0022): files are 0644 unless the code says otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# Files: the database, its journals and every copy of it are private #########################

def test_the_database_and_its_wal_and_shm_are_private_whatever_the_umask(tmp_path, loose_umask):
    db_path = str(tmp_path / "kokoa.db")
    server = InProcessServer(make_config(db_path))
    db = kokoa.connect(db_path)         # held open: the last close removes -wal and -shm
    try:
        server.create_origin()
        for suffix in ("", "-wal", "-shm"):
            assert mode(db_path + suffix) == 0o600, suffix
    finally:
        db.close()
        server.close()


def test_an_older_install_s_database_files_are_made_private_when_opened(tmp_path, loose_umask):
    db_path = str(tmp_path / "kokoa.db")
    older = sqlite3.connect(db_path)        # as 0.1.0 left it: every file 0644
    older.execute("PRAGMA journal_mode = WAL")
    older.execute("CREATE TABLE t (x)")
    try:
        assert {mode(db_path + suffix) for suffix in ("", "-wal", "-shm")} == {0o644}
        kokoa.open_migrated(db_path)
        for suffix in ("", "-wal", "-shm"):
            assert mode(db_path + suffix) == 0o600, suffix
    finally:
        older.close()


def test_backups_and_the_copies_kept_beside_the_database_are_private(tmp_path, loose_umask):
    db_path = str(tmp_path / "kokoa.db")
    InProcessServer(make_config(db_path)).close()
    env = {"WIREGUARD_KEY_ENC_SECRET": os.urandom(32).hex()}
    assert run_cli("backup", "snap.db", "--db", db_path, cwd=tmp_path, env=env).returncode == 0
    result = run_cli("restore", "snap.db", "--db", db_path, "--force", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    [kept] = tmp_path.glob("kokoa.db.pre-restore-*")
    assert mode(tmp_path / "snap.db") == 0o600 and mode(kept) == 0o600
    assert mode(db_path) == 0o600
    # the copy made before a migration, from a database at schema v1
    old = str(tmp_path / "old.db")
    kokoa.migrate(kokoa.connect(old), kokoa.MIGRATIONS[:1])
    os.chmod(old, 0o644)
    kokoa.open_migrated(old, backup_first=True)
    [before_migration] = tmp_path.glob("old.db.bak-v1-*")
    assert mode(before_migration) == 0o600


def test_backup_does_not_write_through_a_planted_symlink(tmp_path):
    db_path = str(tmp_path / "kokoa.db")
    server = InProcessServer(make_config(db_path))
    server.create_origin()
    server.close()
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    # the temp names the old code used: .NAME.partial-PID, for every pid the copy might get
    for pid in range(os.getpid(), os.getpid() + 200):
        (tmp_path / f".snap.db.partial-{pid}").symlink_to(victim)
    result = run_cli("backup", "snap.db", "--db", db_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "keep me"
    copy = sqlite3.connect(tmp_path / "snap.db")
    assert copy.execute("SELECT name FROM origins").fetchall() == [("home",)]
    copy.close()


def test_a_copy_beside_the_database_refuses_a_planted_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    source = str(tmp_path / "kokoa.db")
    InProcessServer(make_config(source)).close()
    planted = tmp_path / "kokoa.db.bak-v1-20261201T000000Z"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        kokoa.backup_database(source, str(planted))
    assert victim.read_text() == "keep me"
