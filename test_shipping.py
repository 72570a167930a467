"""Shipping: the container image and the systemd units, built and run for real.

The image: `podman build --isolation chroot --format docker` as root, on a private store that is
removed afterwards (nothing cached between runs, one build per run). Its base is the run's
`debian_tarball` (`podman import`) with a stand-in for the official python:slim image built on
it, given with `--from`; the Containerfile keeps its own FROM for users. `podman run` does not
work on these machines (crun cannot raise RLIMIT_NOFILE/NPROC without CAP_SYS_RESOURCE and
refuses the hybrid cgroup hierarchy), so the built image's root file system is mounted and run
as a container runs it: new mount and PID namespaces, the volume bind-mounted, /proc and a
minimal /dev, `chroot` as the image's USER into its WORKDIR with its ENV and CMD, all read from
`podman image inspect`.
"""

import base64
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

import kokoa
from conftest import (
    LOG_LINES,
    REPO,
    ApiClient,
    free_port,
    http_ok,
    remember_secret,
    require_tools,
    wait_until,
)


def containerfile():
    """[(INSTRUCTION, argument text)] with continuation lines joined."""
    text = (REPO / "Containerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def instructions(name):
    return [arg for instruction, arg in containerfile() if instruction == name]


def exec_form(arg):
    """The argument of an exec-form (JSON array) instruction."""
    return json.loads(arg)


def parse_env(args):
    env = {}
    for arg in args:
        for pair in shlex.split(arg):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def test_containerfile_is_small_pinned_and_non_root():
    [base] = instructions("FROM")
    assert re.fullmatch(r"\S+/python:3\.\d+\.\d+-slim-\w+", base), base
    copies = [source for arg in instructions("COPY") for source in arg.split()[:-1]]
    assert sorted(copies) == ["agent.sh", "dns.py", "install-edge.sh", "install-origin.sh",
                              "kokoa.py", "requirements.txt", "static/"]   # /install/*, DNS-01
    context = [line for line in (REPO / ".dockerignore").read_text().splitlines()
               if line and not line.startswith("#")]
    assert context == ["*", *(f"!{name}" for name in sorted(copies))]   # nothing else to copy
    order = [instruction for instruction, _ in containerfile()]
    assert order.index("USER") > max(i for i, name in enumerate(order) if name == "RUN")
    assert instructions("USER") == ["kokoa"]
    assert instructions("EXPOSE") == ["8080"]
    assert exec_form(instructions("VOLUME")[0]) == ["/data"]
    assert parse_env(instructions("ENV"))["KOKOA_LISTEN"] == "0.0.0.0:8080"
    assert any("/healthz" in arg for arg in instructions("HEALTHCHECK"))
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9-]+==[0-9.]+", line), line
    names = {line.split("==")[0] for line in (REPO / "requirements.txt").read_text()
             .splitlines() if "==" in line}
    assert names == {"cryptography", "waitress"}


# The image, built and run for real ##########################################################

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SECRET_NAMES = ("WIREGUARD_KEY_ENC_SECRET", "WIREGUARD_KEY_ENC_SECRET_OLD",
                "KOKOA_BOOTSTRAP_TOKEN", "KOKOA_ADMIN_PASSWORD")
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/]{40}")
DEBIAN_IMAGE = "localhost/kokoa-test-debian:bookworm"
PYTHON_IMAGE = "localhost/kokoa-test-python:slim"
KOKOA_IMAGE = "localhost/kokoa:test"

# Stands in for docker.io/library/python:*-slim-bookworm (which cannot be pulled here): Debian's
# Python 3.11 as a venv in /usr/local, so `python` and `pip` are on PATH and pip may install.
# Its pip trusts the system CA bundle (as Debian's pip does), which the build below replaces
# with this machine's for the RUN steps only.
PYTHON_BASE = f"""\
FROM scratch
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \\
 && python3 -m venv /usr/local \\
 && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8 PIP_CERT={CA_BUNDLE}
CMD ["python3"]
"""

# Run as PID 1 of new mount and PID namespaces: the volume, /proc and a minimal /dev as a
# container has them, then the image's user, working directory, environment and command.
NAMESPACE_SETUP = r"""
root=$1 volume=$2 target=$3 user=$4 workdir=$5; shift 5
mount --bind "$volume" "$root$target" &&
mount -t proc proc "$root/proc" &&
mount -t tmpfs -o mode=0755,nosuid,size=1m dev "$root/dev" || exit
for node in null zero full random urandom; do
  : >"$root/dev/$node" && mount --bind "/dev/$node" "$root/dev/$node" || exit
done
exec chroot --userspec="$user" "$root" /usr/bin/env -i -C "$workdir" "$@"
"""


class Podman:
    """podman on a private store under `base` (nothing shared with the machine's, nothing
    kept): chroot isolation and cgroupfs, as this machine allows."""

    def __init__(self, base):
        self.base = Path(base)
        self.prefix = ["podman", "--root", str(self.base / "storage"),
                       "--runroot", str(self.base / "run"), "--tmpdir", str(self.base / "tmp"),
                       "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs",
                       "--events-backend", "file"]

    def __call__(self, *args, timeout=120, check=True):
        result = subprocess.run([*self.prefix, *map(str, args)], capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, f"podman {args[0]}:\n{result.stderr[-4000:]}"
        return result

    def build(self, context, tag, base, mounts=()):
        """`podman build` as a user runs it, with the first FROM replaced by a local image."""
        return self("build", "--isolation", "chroot", "--format", "docker", "--pull=never",
                    "--from", base, *mounts, "--tag", tag,
                    "--file", Path(context) / "Containerfile", context, timeout=900)

    def close(self):
        """Unmount and remove every image, then the store itself; unmount what is left."""
        self("image", "unmount", "--all", check=False)
        self("rmi", "--all", "--force", check=False)
        self("system", "reset", "--force", check=False)
        for point in reversed(mounts_under(self.base)):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)


def mounts_under(path):
    """Mount points at or below `path` in this mount namespace."""
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [point for point in points if point == str(path) or point.startswith(f"{path}/")]


@dataclasses.dataclass
class BuiltImage:
    podman: Podman
    name: str
    root: Path                  # its root file system, mounted read-only
    config: dict                # `podman image inspect`'s "Config"
    healthcheck: dict           # ... and its "Healthcheck" (docker format only)
    decoys: list                # secrets planted in the build context
    base_layers: int            # how many of its layers the base image brought
    secrets_seen: set = dataclasses.field(default_factory=set)


def build_context(target):
    """The checkout as a build context, plus decoys a checkout may hold (kokoa.env, kokoa.db,
    a private key): .dockerignore and the COPY lines must keep them out of every layer."""
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".*_cache", "kokoa.env", "kokoa.db*"))
    decoys = [os.urandom(32).hex(), secrets.token_urlsafe(24), secrets.token_urlsafe(24)]
    (target / "kokoa.env").write_text(f"WIREGUARD_KEY_ENC_SECRET={decoys[0]}\n"
                                      f"KOKOA_ADMIN_PASSWORD={decoys[1]}\n")
    db = sqlite3.connect(target / "kokoa.db")
    db.execute("CREATE TABLE decoy (value TEXT)")
    db.execute("INSERT INTO decoy VALUES (?)", (decoys[2],))
    db.commit()
    db.close()
    key = base64.b64encode(os.urandom(48)).decode()
    (target / "backup-key.pem").write_text(f"-----BEGIN PRIVATE KEY-----\n{key}\n"
                                           "-----END PRIVATE KEY-----\n")
    return decoys


def build_mounts():
    """This machine's egress re-signs TLS with its own CA: the RUN steps see the machine's CA
    bundle through a bind mount, which never enters a layer (the scan checks)."""
    return ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if CA_BUNDLE.is_file() else []


@pytest.fixture(scope="module")
def image(debian_tarball, tmp_path_factory):
    """The Containerfile built once per run on the run's fresh Debian root, its file system
    mounted; the store is removed afterwards, also when the build fails."""
    require_tools("podman", "unshare", "chroot", "mount", "umount")
    work = tmp_path_factory.mktemp("container")
    podman = Podman(tempfile.mkdtemp(prefix="kokoa-podman-", dir="/tmp"))  # runroot: <= 50 chars
    try:
        started = time.monotonic()
        podman("import", "--change", 'CMD ["/bin/bash"]', debian_tarball, DEBIAN_IMAGE,
               timeout=300)
        (work / "python").mkdir()
        (work / "python" / "Containerfile").write_text(PYTHON_BASE)
        podman.build(work / "python", PYTHON_IMAGE, DEBIAN_IMAGE)
        based = time.monotonic()
        decoys = build_context(work / "context")
        podman.build(work / "context", KOKOA_IMAGE, PYTHON_IMAGE, build_mounts())
        print(f"\ncontainer: import + python base {based - started:.0f} s, "
              f"kokoa image {time.monotonic() - based:.0f} s")
        root = Path(podman("image", "mount", KOKOA_IMAGE).stdout.strip())
        [inspect] = json.loads(podman("image", "inspect", KOKOA_IMAGE).stdout)
        [base] = json.loads(podman("image", "inspect", PYTHON_IMAGE).stdout)
        remember_secret(*decoys)
        yield BuiltImage(podman, KOKOA_IMAGE, root, inspect["Config"],
                         inspect.get("Healthcheck") or {}, decoys,
                         len(base["RootFS"]["Layers"]))
    finally:
        podman.close()


def image_user(root, user):
    """(uid, gid, home) of the image's USER, from the image's own /etc/passwd."""
    name, _, group = user.partition(":")
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if name in (fields[0], fields[2]):
            assert not group, "USER with a group: not needed by this Containerfile"
            return int(fields[2]), int(fields[3]), fields[5]
    raise AssertionError(f"USER {user} is not in the image's /etc/passwd")


def new_volume(image, path):
    """A new named volume as podman makes one: a copy of the image's (empty) mount point
    directory, with its owner and mode."""
    [target] = image.config["Volumes"]
    info = (image.root / target.lstrip("/")).stat()
    path.mkdir()
    os.chown(path, info.st_uid, info.st_gid)
    path.chmod(stat.S_IMODE(info.st_mode))
    return path


class ChrootContainer:
    """The image's root file system run as its container would be (see NAMESPACE_SETUP)."""

    def __init__(self, image, volume, env=None):
        config = image.config
        self.image, self.volume = image, Path(volume)
        [self.target] = config["Volumes"]
        self.uid, self.gid, home = image_user(image.root, config["User"])
        self.env = {"HOME": home, **dict(item.split("=", 1) for item in config["Env"]),
                    **(env or {})}
        self.command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
        self.log_path = self.volume.parent / f"{self.volume.name}-{secrets.token_hex(4)}.log"
        self.proc = None

    def argv(self, command=None):
        return ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                "--kill-child", "--", "sh", "-c", NAMESPACE_SETUP, "sh", str(self.image.root),
                str(self.volume), self.target, f"{self.uid}:{self.gid}",
                self.image.config.get("WorkingDir") or "/",
                *(f"{key}={value}" for key, value in self.env.items()),
                *(command or self.command)]

    def run(self, command=None, timeout=60):
        """One command to its end, as `podman run --rm IMAGE COMMAND` (default: the CMD)."""
        result = subprocess.run(self.argv(command), capture_output=True, text=True,
                                timeout=timeout)
        LOG_LINES.extend((result.stdout + result.stderr).splitlines())
        return result

    def start(self):
        """The image's command in the background, as `podman run -d`."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        return self

    def pid1(self):
        """The host pid of the container's PID 1 (unshare's only child)."""
        def child():
            if self.proc.poll() is not None:
                raise AssertionError(f"the container exited:\n{self.output()}")
            path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            return path.read_text().split()
        return int(wait_until(child, timeout=10, what="the container's PID 1")[0])

    def wait_healthy(self, url):
        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"the container exited:\n{self.output()}")
            return http_ok(url + "/healthz")
        wait_until(healthy, timeout=60, what="the container's /healthz")

    def stop(self, timeout=15):
        """As `podman stop`: SIGTERM to PID 1, then (only after the timeout) SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc and self.proc.returncode
        with contextlib.suppress(ProcessLookupError, AssertionError):
            os.kill(self.pid1(), signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()        # --kill-child: its PID 1 dies with it, and the namespace
            self.proc.wait(timeout=timeout)
            return None
        finally:
            LOG_LINES.extend(self.output().splitlines())

    def output(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def process_ids(pid):
    """(real uid, effective uid, real gid, effective gid) of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    uids, gids = status["Uid"].split(), status["Gid"].split()
    return int(uids[0]), int(uids[1]), int(gids[0]), int(gids[1])


def test_podman_builds_a_non_root_image_with_healthcheck_and_volume(image):
    config = image.config
    uid, gid, home = image_user(image.root, config["User"])
    assert uid != 0 and gid != 0 and home == "/data"
    assert list(config["Volumes"]) == ["/data"] and config["WorkingDir"] == "/data"
    assert "8080/tcp" in config["ExposedPorts"]
    assert image.healthcheck["Test"][0] == "CMD" and config["StopSignal"] == "SIGTERM"
    assert "/healthz" in " ".join(image.healthcheck["Test"])
    assert not [item for item in config["Env"] if item.split("=", 1)[0] in SECRET_NAMES]
    assert sorted(p.name for p in (image.root / "app").iterdir()) == [
        "agent.sh", "dns.py", "install-edge.sh", "install-origin.sh", "kokoa.py",
        "requirements.txt", "static"]
    assert sorted(p.name for p in (image.root / "app/static").iterdir()) == sorted(
        p.name for p in (REPO / "static").iterdir())           # .dockerignore kept them
    data = image.root / "data"
    assert list(data.iterdir()) == [] and data.stat().st_uid == uid
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_image_inits_serves_as_non_root_and_keeps_its_volume(image, tmp_path):
    """First start on an empty volume: `init`, then serve as the image's user, healthy by the
    image's own HEALTHCHECK; writes through the API outlive a stop (SIGTERM, as podman stop)
    and a start on the same volume, and an edge's token goes on working."""
    volume = new_volume(image, tmp_path / "volume")
    port = free_port()
    url, env = f"http://127.0.0.1:{port}", {"KOKOA_LISTEN": f"127.0.0.1:{port}"}
    first, second = ChrootContainer(image, volume, env), ChrootContainer(image, volume, env)
    try:
        first.start()
        first.wait_healthy(url)
        assert process_ids(first.pid1()) == (first.uid, first.uid, first.gid, first.gid)
        health = image.healthcheck["Test"][1:]
        checked = first.run(health, timeout=30)
        assert checked.returncode == 0, checked.stderr
        with urllib.request.urlopen(f"{url}/install/agent.sh", timeout=10) as served:
            assert served.status == 200 and served.read().startswith(b"#!")   # COPY'd in
        values = kokoa.read_env_file(volume / "kokoa.env")
        info = (volume / "kokoa.env").stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (first.uid, 0o600)
        remember_secret(*(values[name] for name in SECRET_NAMES if values.get(name)))
        image.secrets_seen.update(values[name] for name in SECRET_NAMES if values.get(name))
        client = ApiClient(url, "admin", values["KOKOA_ADMIN_PASSWORD"],
                           values["KOKOA_BOOTSTRAP_TOKEN"])
        status, _, origin = client.request("POST", "/api/v1/origins",
                                           {"name": "home", "wg_ip": "10.8.0.2"})
        assert status == 201, origin
        status, _, made = client.request("POST", "/api/v1/routes", {
            "hostname": "app.example.com", "origin_id": origin["id"], "target_port": 8080})
        assert status == 201, made
        _, token = client.register_edge("edge-container")
        image.secrets_seen.add(token)
        status, headers, _ = client.request("GET", "/api/v1/edge-nodes/me/config", auth=token)
        assert status == 200
        assert first.stop() == 0, first.output()[-2000:]     # SIGTERM is not ignored

        second.start()
        second.wait_healthy(url)
        status, _, route = client.request("GET", f"/api/v1/routes/{made['id']}")
        assert status == 200 and route["hostname"] == "app.example.com"
        status, _, _ = client.request("GET", "/api/v1/edge-nodes/me/config", auth=token,
                                      headers={"If-None-Match": headers["ETag"]})
        assert status == 304
        assert second.stop() == 0
    finally:
        first.stop()
        second.stop()
    # A database whose kokoa.env is gone is refused with one line, never given a new key.
    (volume / "kokoa.env").rename(volume / "kokoa.env.aside")
    refused = ChrootContainer(image, volume, env).run(timeout=60)
    assert refused.returncode != 0 and "WIREGUARD_KEY_ENC_SECRET" in refused.stderr
    assert not (volume / "kokoa.env").exists()


def layer_problems(archive, values, base_layers):
    """What each layer of a `podman save` archive holds that no image may: a kokoa.env or
    database, any of `values`, and in the layers after the base's, a PEM private key (the
    base's libraries carry test keys: libgnutls does)."""
    needles = [value.encode() for value in values]
    problems = []
    with tarfile.open(archive) as outer:
        [manifest] = json.load(outer.extractfile("manifest.json"))
        for index, layer in enumerate(manifest["Layers"]):
            with tarfile.open(fileobj=outer.extractfile(layer), mode="r|*") as inner:
                for member in inner:
                    name = member.name.removeprefix("./")
                    base = name.rsplit("/", 1)[-1]
                    if base == "kokoa.env" or base.startswith("kokoa.db"):
                        problems.append(f"{layer}: {name}")
                    if member.isfile():
                        content = inner.extractfile(member).read()
                        problems.extend(f"{layer}: {name} holds {needle[:6]!r}..."
                                        for needle in needles if needle in content)
                        if index >= base_layers and PEM_PRIVATE_KEY.search(content):
                            problems.append(f"{layer}: {name} holds a private key")
    return problems


def test_no_secret_in_the_image_history_or_any_layer(image, tmp_path):
    """Neither the build context's decoys nor what `init` (or the API) generates at run time
    reach the image: not its history, not its environment, not a file in any layer."""
    volume = new_volume(image, tmp_path / "volume")
    made = ChrootContainer(image, volume).run(["python", "/app/kokoa.py", "init"])
    assert made.returncode == 0, made.stderr
    values = kokoa.read_env_file(volume / "kokoa.env")
    generated = [values[name] for name in SECRET_NAMES if values.get(name)]
    remember_secret(*generated)
    assert len(generated) == 3
    watched = {*image.decoys, *generated, *image.secrets_seen}
    history = image.podman("history", "--no-trunc", "--format", "{{.CreatedBy}}",
                           image.name).stdout
    assert not [value for value in watched if value in history]
    assert not re.search(r"(SECRET|TOKEN|PASSWORD)\w*=\S", history), history
    archive = tmp_path / "image.tar"
    image.podman("save", "--format", "docker-archive", "--output", archive, image.name,
                 timeout=300)
    try:
        assert layer_problems(archive, watched, image.base_layers) == []
    finally:
        archive.unlink()


@pytest.fixture
def unit_with_local_python(tmp_path):
    """contrib/kokoa.service with ExecStart's interpreter pointed at one that exists here."""
    text = (REPO / "contrib" / "kokoa.service").read_text()
    path = tmp_path / "kokoa.service"
    path.write_text(text.replace("/opt/kokoa/.venv/bin/python", os.path.realpath(sys.executable)))
    return path


def test_systemd_unit_verifies_and_is_hardened(unit_with_local_python):
    require_tools("systemd-analyze")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit_with_local_python)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                               str(unit_with_local_python)], capture_output=True, text=True,
                              timeout=60)
    level = re.search(r"Overall exposure level for kokoa.service: ([\d.]+)", security.stdout)
    assert level and float(level.group(1)) <= 2.0, security.stdout[-2000:]
    text = unit_with_local_python.read_text()
    for setting in ("DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=kokoa",
                    "NoNewPrivileges=yes"):
        assert setting in text


def test_agent_units_from_install_edge_verify(kokoa_server, tmp_path):
    """install-edge.sh writes the agent's .service + .timer; systemd accepts them."""
    require_tools("systemd-analyze", "jq", "curl", "openssl", "flock")
    root = tmp_path / "root"
    (root / "etc/nginx").mkdir(parents=True)
    (root / "etc/nginx/nginx.conf").write_text("events {}\nhttp {\n}\n")
    env = {"PATH": os.environ["PATH"], "KOKOA_BOOTSTRAP_TOKEN": kokoa_server.bootstrap_token,
           "WG_INTERFACE": "none"}
    result = subprocess.run(
        ["bash", str(REPO / "install-edge.sh"), "--root", str(root), "--no-packages",
         "--no-run", "--init", "systemd", "--control-plane", kokoa_server.url,
         "--email", "ops@example.com", "--name", "edge-units"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    units = root / "etc/systemd/system"
    service, timer = units / "kokoa-edge-agent.service", units / "kokoa-edge-agent.timer"
    verify = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "RandomizedDelaySec=" in timer.read_text()
    assert "--env-file" in service.read_text() and not (root / "etc/cron.d").exists()
    drop_in = (root / "etc/systemd/system/nginx.service.d/kokoa.conf").read_text()
    assert "ExecStartPre=-" in drop_in and drop_in.rstrip().endswith(" recover")
