"""Attacks of the second security pass (issue 12), each reproduced, each refused.

The first pass (test_hardening.py) holds what already held; this module holds the findings
that did not: files left readable, temp names an attacker can plant, trust in proxies and Host
headers, slow clients, crafted backups, rate limits an attacker can step around.
"""

import ipaddress
import json
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

import kokoa
from conftest import (
    InProcessServer,
    basic_auth,
    edited_backup,
    make_config,
    run_cli,
    send_json,
    send_request,
    wg_keypair,
)


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
    older = sqlite3.connect(db_path, isolation_level=None)   # as 0.1.0 left it: all 0644
    older.execute("PRAGMA journal_mode = WAL")
    for statement in kokoa.MIGRATIONS[0]:
        older.execute(statement)
    older.execute("PRAGMA user_version = 1")
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


# Requests: the Host a browser was tricked into, the proxy in front, the client behind it ######

def call(server, method, path, headers=None, body=None, source="127.0.0.1"):
    """One raw request: (status, parsed JSON error or None)."""
    status, _, answer = send_json(server, method, path, headers, body, source)
    return status, answer["error"] if answer and "error" in answer else answer


@pytest.fixture
def open_server(tmp_path):
    """A control plane with no admin password: its admin answers loopback clients only."""
    server = InProcessServer(make_config(tmp_path / "k.db", admin_password=""))
    yield server
    server.close()


def proxied_server(tmp_path, **overrides):
    """A control plane behind a trusted proxy at 127.0.0.1 (as the README's proxy lines)."""
    return InProcessServer(make_config(tmp_path / "k.db",
                                       trusted_proxy=ipaddress.ip_address("127.0.0.1"),
                                       **overrides))


def test_a_page_that_rebinds_its_name_to_loopback_gets_421_and_writes_nothing(open_server):
    port = open_server.url.rsplit(":", 1)[1]
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}", ""):
        status, error = call(open_server, "GET", "/api/v1/origins", {"Host": host})
        assert status == 421 and error["code"] == "misdirected_request", host
        status, error = call(open_server, "POST", "/api/v1/enrollment-keys", {"Host": host},
                             {"uses": 1})
        assert status == 421, host
    assert open_server.rows("SELECT * FROM enrollment_keys") == []
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST."):
        assert call(open_server, "GET", "/api/v1/origins", {"Host": host})[0] == 200, host


def test_the_public_url_s_host_is_answered_and_a_foreign_origin_may_not_write(tmp_path):
    url, host = kokoa.parse_public_url("https://Kokoa.Example.com/")
    assert (url, host) == ("https://kokoa.example.com", "kokoa.example.com")
    server = InProcessServer(make_config(tmp_path / "k.db", public_url=url, public_host=host))
    auth = basic_auth(server.admin_user, server.admin_password)
    try:
        for name in ("kokoa.example.com", "kokoa.example.com:443", "KOKOA.example.com."):
            assert call(server, "GET", "/api/v1/origins",
                        {"Host": name, "Authorization": auth})[0] == 200, name
        assert call(server, "GET", "/api/v1/origins",
                    {"Host": "other.example.com", "Authorization": auth})[0] == 421
        for origin, want in (("https://kokoa.example.com", 201), ("http://localhost:8080", 201),
                             ("https://attacker.example", 403), ("null", 403)):
            status, _ = call(server, "POST", "/api/v1/enrollment-keys",
                             {"Host": host, "Authorization": auth, "Origin": origin}, {"uses": 1})
            assert status == want, origin
        assert len(server.rows("SELECT * FROM enrollment_keys")) == 2
    finally:
        server.close()


@pytest.mark.parametrize("url", ["kokoa.example.com", "ftp://kokoa.example.com",
                                 "https://kokoa.example.com/admin", "https://u:p@kokoa.example.com",
                                 "https://kokoa.example.com:99999", "https://bad_name.example"])
def test_serve_refuses_a_public_url_it_could_not_match(tmp_path, url):
    env = {"WIREGUARD_KEY_ENC_SECRET": os.urandom(32).hex(), "KOKOA_PUBLIC_URL": url}
    result = run_cli("serve", "--listen", "127.0.0.1:1", cwd=tmp_path, env=env, timeout=30)
    assert result.returncode == 2 and "KOKOA_PUBLIC_URL" in result.stderr


def test_through_an_untrusted_proxy_no_client_is_loopback(open_server):
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    assert call(open_server, "GET", "/api/v1/origins", forwarded)[0] == 401
    assert call(open_server, "GET", "/metrics", forwarded)[0] == 401
    assert call(open_server, "GET", "/metrics", {"Forwarded": "for=203.0.113.7"})[0] == 401
    assert call(open_server, "GET", "/metrics", {"X-Real-IP": "203.0.113.7"})[0] == 401
    assert call(open_server, "GET", "/metrics")[0] == 200


def test_a_client_claiming_loopback_through_a_trusted_proxy_is_not_loopback(tmp_path):
    # the password-less mode is refused behind a proxy; even if it were not, no proxied
    # request (here through a proxy that passes the client's header on) counts as loopback
    server = proxied_server(tmp_path, admin_password="")
    try:
        for chain in ("127.0.0.1", "::1", "203.0.113.9, 127.0.0.1"):
            assert call(server, "GET", "/api/v1/origins", {"X-Forwarded-For": chain})[0] == 401
            assert call(server, "GET", "/metrics", {"X-Forwarded-For": chain})[0] == 401
        assert call(server, "GET", "/metrics")[0] == 401       # the proxy's own request too
    finally:
        server.close()
    env = {"WIREGUARD_KEY_ENC_SECRET": os.urandom(32).hex(), "KOKOA_TRUSTED_PROXY": "127.0.0.1"}
    result = run_cli("serve", "--listen", "127.0.0.1:1", cwd=tmp_path, env=env, timeout=30)
    assert result.returncode == 2 and "KOKOA_ADMIN_PASSWORD" in result.stderr


@pytest.mark.parametrize("chain", ["203.0.113.5, not-an-ip", "203.0.113.5,", "unknown",
                                   "203.0.113.5:4711", "[2001:db8::1]", "_hidden"])
def test_a_last_hop_that_is_not_an_ip_address_is_refused(tmp_path, chain):
    server = proxied_server(tmp_path)
    try:
        status, error = call(server, "GET", "/healthz", {"X-Forwarded-For": chain})
        assert status == 400 and error["field"] == "X-Forwarded-For"
    finally:
        server.close()


def test_behind_the_trusted_proxy_failures_count_per_client_and_the_peer_is_logged(
        tmp_path, caplog):
    server = proxied_server(tmp_path)
    wrong = {"bootstrap_token": "wrong", "name": "x"}
    try:
        statuses = [call(server, "POST", "/api/v1/edge-nodes/register",
                         {"X-Forwarded-For": "127.0.0.1, 203.0.113.5"}, wrong)[0]
                    for _ in range(kokoa.AUTH_FAILURE_LIMIT + 1)]
        assert statuses == [401] * kokoa.AUTH_FAILURE_LIMIT + [429]
        assert call(server, "POST", "/api/v1/edge-nodes/register",
                    {"X-Forwarded-For": "203.0.113.6"}, wrong)[0] == 401
    finally:
        server.close()
    lines = [record.access for record in caplog.records if hasattr(record, "access")]
    assert {(line["client"], line["peer"]) for line in lines} == {
        ("203.0.113.5", "127.0.0.1"), ("203.0.113.6", "127.0.0.1")}


# Rate limits: per credential kind, per IPv6 /64, and slower for everyone under attack #########

def test_bad_node_tokens_do_not_lock_the_admin_out(tmp_path):
    server = InProcessServer(make_config(tmp_path / "k.db"))
    try:
        for _ in range(kokoa.AUTH_FAILURE_LIMIT + 1):
            status, _ = call(server, "GET", "/api/v1/edge-nodes/me/config",
                             {"Authorization": "Bearer wrong"})
        assert status == 429
        admin = {"Authorization": basic_auth(server.admin_user, server.admin_password)}
        assert call(server, "GET", "/api/v1/origins", admin)[0] == 200
        assert call(server, "POST", "/api/v1/edge-nodes/register", body={
            "bootstrap_token": server.bootstrap_token, "name": "e1"})[0] == 201
    finally:
        server.close()


def test_the_addresses_of_one_ipv6_64_share_one_limit(tmp_path):
    server = proxied_server(tmp_path)
    wrong = {"Authorization": basic_auth("admin", "guess")}
    try:
        statuses = [call(server, "GET", "/api/v1/origins",
                         {**wrong, "X-Forwarded-For": f"2001:db8:1:2::{i:x}"})[0]
                    for i in range(1, 46)]
        assert statuses.count(401) == kokoa.AUTH_FAILURE_LIMIT and statuses[-1] == 429
        # another subscriber's /64, and IPv4 clients, are not held back
        assert call(server, "GET", "/api/v1/origins",
                    {**wrong, "X-Forwarded-For": "2001:db8:1:3::1"})[0] == 401
    finally:
        server.close()
    assert kokoa.rate_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert kokoa.rate_key("::ffff:203.0.113.9") == "203.0.113.9"
    assert kokoa.rate_key("203.0.113.9") == "203.0.113.9"


def test_admin_guesses_from_many_addresses_are_slowed_down_for_everyone(tmp_path):
    server = proxied_server(tmp_path)
    wrong = {"Authorization": basic_auth("admin", "guess")}
    right = {"Authorization": basic_auth(server.admin_user, server.admin_password)}
    try:
        started = time.monotonic()
        statuses = [call(server, "GET", "/api/v1/origins",
                         {**wrong, "X-Forwarded-For": f"198.51.100.{i}"})[0]
                    for i in range(1, 101)]
        elapsed = time.monotonic() - started
        # every guess that was tried is a 401: past the threshold, at most one a second
        tried = statuses.count(401)
        assert tried <= kokoa.ADMIN_SLOWDOWN_FAILURES + elapsed / kokoa.ADMIN_SLOWDOWN_INTERVAL + 1
        assert statuses.count(429) == 100 - tried > 0
        # the admin still gets in, by waiting as Retry-After says (at most a few tries)
        for _ in range(5):
            status, headers, _ = send_request(server.url, "GET", "/api/v1/origins",
                                              headers={**right, "X-Forwarded-For": "192.0.2.1"})
            if status != 429:
                break
            time.sleep(int(headers["Retry-After"]))
        assert status == 200
    finally:
        server.close()


# Restore: a crafted backup neither runs code on origins nor brings its own triggers ##########

PRE_UP = "edge.example.com:51820\nPreUp = touch /tmp/kokoa-pwned"


def crafted_backup(tmp_path, *statements):
    """A real backup of a control plane with an origin and an edge, then edited by hand."""
    db_path = str(tmp_path / "live.db")
    server = InProcessServer(make_config(db_path))
    origin = server.create_origin()
    server.register_edge("edge1", wg_public_key=wg_keypair()[1], wg_ip="10.8.0.10")
    server.close()
    return db_path, edited_backup(db_path, tmp_path / "crafted.db", *statements), origin


@pytest.mark.parametrize("statement, named", [
    (f"UPDATE edge_nodes SET wg_endpoint = '{PRE_UP}'", "wg_endpoint"),
    ("UPDATE origins SET wg_ip = '1.1.1.1'", "wg_ip"),
    ("UPDATE origins SET name = 'home' || char(10) || 'PostUp = id'", "name"),
    ("UPDATE edge_nodes SET wg_public_key = 'x' || substr(wg_public_key, 2, 42) || char(10)",
     "wg_public_key"),
    ("INSERT INTO routes (id, hostname, origin_id, target_port) SELECT "
     "'8f0e1c1e-0000-4000-8000-000000000001', 'a.example.com;', id, 80 FROM origins",
     "hostname"),
    ("INSERT INTO settings (key, value) VALUES ('shell', '\"id\"')", "shell"),
    ("CREATE TRIGGER keep AFTER INSERT ON routes BEGIN "
     f"UPDATE edge_nodes SET wg_endpoint = '{PRE_UP}'; END", "extra trigger keep"),
    ("CREATE VIEW v AS SELECT 1", "extra view v"),
    ("CREATE INDEX quiet ON routes (target_port)", "extra index quiet"),
])
def test_restore_refuses_a_crafted_backup_and_changes_nothing(tmp_path, statement, named):
    db_path, backup, _ = crafted_backup(tmp_path, statement)
    before = Path(db_path).read_bytes()
    result = run_cli("restore", str(backup), "--db", db_path, "--force", cwd=tmp_path)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "nothing was restored" in result.stderr
    assert Path(db_path).read_bytes() == before
    assert not list(tmp_path.glob("live.db.pre-restore-*"))


def test_an_untouched_backup_of_every_kind_of_row_restores(tmp_path):
    db_path, backup, _ = crafted_backup(tmp_path)
    result = run_cli("restore", str(backup), "--db", db_path, "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_serve_refuses_a_database_that_carries_a_trigger_of_its_own(tmp_path):
    db_path, _, _ = crafted_backup(tmp_path)
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("CREATE TRIGGER keep AFTER INSERT ON routes BEGIN "
               f"UPDATE edge_nodes SET wg_endpoint = '{PRE_UP}'; END")
    db.close()
    env = {"WIREGUARD_KEY_ENC_SECRET": os.urandom(32).hex()}
    for command in (["serve", "--listen", "127.0.0.1:1"], ["migrate"]):
        result = run_cli(*command, "--db", db_path, cwd=tmp_path, env=env, timeout=30)
        assert result.returncode == 2 and "extra trigger keep" in result.stderr, command


def test_wireguard_conf_refuses_a_value_that_bypassed_the_api(tmp_path):
    db_path = str(tmp_path / "k.db")
    server = InProcessServer(make_config(db_path))
    try:
        origin = server.create_origin()
        server.register_edge("edge1", wg_public_key=wg_keypair()[1], wg_ip="10.8.0.10")
        path = f"/api/v1/origins/{origin['id']}/wireguard.conf"
        status, _, good = server.request("GET", path)
        assert status == 200 and b"[Peer]" in good
        db = sqlite3.connect(db_path, isolation_level=None)
        db.execute("UPDATE edge_nodes SET wg_endpoint = ?", (PRE_UP,))
        db.close()
        status, _, body = server.request("GET", path)
        assert status == 500 and b"PreUp" not in body
    finally:
        server.close()


# Origins hold a token of their own, never the admin password ################################

def test_an_origin_token_reads_its_own_wireguard_conf_and_nothing_else(tmp_path):
    server = InProcessServer(make_config(tmp_path / "k.db"))
    try:
        home = server.create_origin("home", "10.8.0.2")
        office = server.create_origin("office", "10.8.0.3")
        _, edge_token = server.register_edge("edge1", wg_public_key=wg_keypair()[1],
                                             wg_ip="10.8.0.10")
        status, _, issued = server.request("POST", f"/api/v1/origins/{home['id']}/token", {})
        assert status == 201 and issued["token"].startswith("kokoa-ot-")
        token = issued["token"]
        # hashed at rest, never shown again
        [(stored,)] = server.rows("SELECT token_hash FROM origins WHERE id = ?", (home["id"],))
        assert stored == kokoa.hash_token(token)
        _, _, listed = server.request("GET", "/api/v1/origins")
        assert token not in json.dumps(listed)
        assert [o["has_token"] for o in listed["origins"]] == [True, False]
        # it opens this origin's config, the same bytes the admin gets
        status, _, mine = server.request("GET", "/api/v1/origins/me/wireguard.conf", auth=token)
        _, _, admin_copy = server.request("GET", f"/api/v1/origins/{home['id']}/wireguard.conf")
        assert status == 200 and mine == admin_copy and b"Address = 10.8.0.2/32" in mine
        # and nothing else: not the other origin's, no admin route, no edge route
        for path in (f"/api/v1/origins/{office['id']}/wireguard.conf", "/api/v1/origins",
                     "/api/v1/edge-nodes/me/config"):
            status, _, _ = send_request(server.url, "GET", path, headers={
                "Authorization": f"Bearer {token}"}, source="127.0.0.9")
            assert status == 401, path
        # an edge token or the admin password does not act as an origin token
        assert server.request("GET", "/api/v1/origins/me/wireguard.conf",
                              auth=edge_token)[0] == 401
        assert server.request("GET", "/api/v1/origins/me/wireguard.conf")[0] == 401
        # a new token replaces the old one; revoking ends it
        _, _, again = server.request("POST", f"/api/v1/origins/{home['id']}/token", {})
        assert server.request("GET", "/api/v1/origins/me/wireguard.conf", auth=token)[0] == 401
        assert server.request("GET", "/api/v1/origins/me/wireguard.conf",
                              auth=again["token"])[0] == 200
        assert server.request("DELETE", f"/api/v1/origins/{home['id']}/token")[0] == 204
        assert server.request("GET", "/api/v1/origins/me/wireguard.conf",
                              auth=again["token"])[0] == 401
        assert server.request("POST", "/api/v1/origins/not-an-id/token", {})[0] == 404
    finally:
        server.close()


def test_wireguard_conf_names_the_tunnel_network_for_install_origin(tmp_path):
    network = ipaddress.ip_network("10.77.0.0/24")
    server = InProcessServer(make_config(tmp_path / "k.db", wg_network=network))
    try:
        origin = server.create_origin("home", None)
        _, _, conf = server.request("GET", f"/api/v1/origins/{origin['id']}/wireguard.conf")
        assert b"\n# kokoa-wg-network: 10.77.0.0/24\n" in conf
    finally:
        server.close()
