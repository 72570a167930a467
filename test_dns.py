"""Tests for dns.py: rfc2136 against a real knotd, cloudflare against a local fake of API v4."""

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import dns
from conftest import REPO, free_port, require_tools, stop_process, wait_until

ZONE = "kokoa.test"
BIG_ZONE = "big.test"
BIG_ZONE_HOSTS = 5000
MANY_ADDRESSES = 40
ENV_VARS = sorted(dns.SETTINGS.values())


# Fixtures and helpers: Knot DNS #################################################################

def make_key(name, algorithm):
    """Generate a TSIG key with keymgr; return its secret (base64)."""
    out = subprocess.run(["keymgr", "-t", name, algorithm], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    first = out.splitlines()[0]          # "# hmac-sha256:NAME:SECRET"
    assert first.startswith(f"# {algorithm}:{name}:"), out
    return first.split(":", 2)[2]


def write_zones(zone_dir):
    """The small test zone, and a big one (multi-message AXFR, truncated UDP answers)."""
    head = ["$TTL 3600", "@ SOA ns1 hostmaster 1 3600 900 604800 300", "@ NS ns1",
            "ns1 A 192.0.2.53"]
    (zone_dir / f"{ZONE}.zone").write_text("\n".join([f"$ORIGIN {ZONE}."] + head) + "\n")
    big = [f"$ORIGIN {BIG_ZONE}."] + head
    big += [f"host-{i} A 10.0.{i // 256}.{i % 256}" for i in range(BIG_ZONE_HOSTS)]
    big += [f"many A 198.51.100.{i}" for i in range(1, MANY_ADDRESSES + 1)]
    (zone_dir / f"{BIG_ZONE}.zone").write_text("\n".join(big) + "\n")


def knot_conf(base, port, keys):
    """A knot.conf: keys `main` and `sha512` may update and transfer, `reader` only transfer."""
    key_lines = "".join(f"  - id: {name}\n    algorithm: {alg}\n    secret: {secret}\n"
                        for name, (alg, secret) in keys.items())
    return f"""server:
    rundir: "{base}/run"
    listen: 127.0.0.1@{port}
log:
  - target: stderr
    any: info
database:
    storage: "{base}/db"
key:
{key_lines}acl:
  - id: writers
    key: [kokoa-main, kokoa-sha512]
    action: [update, transfer]
  - id: readers
    key: kokoa-reader
    action: transfer
template:
  - id: default
    storage: "{base}/zones"
    file: "%s.zone"
    zonefile-sync: -1
zone:
  - domain: {ZONE}
    acl: [writers, readers]
  - domain: {BIG_ZONE}
    acl: [writers, readers]
"""


class Knot:
    """A running knotd and the facts tests need about it."""

    def __init__(self, base, port, keys, proc, log_path):
        self.base, self.port, self.keys, self.proc, self.log_path = (
            base, port, keys, proc, log_path)

    def env(self, key="kokoa-main", zone=ZONE):
        """Environment variables that point dns.py at this server with `key`."""
        algorithm, secret = self.keys[key]
        return {"KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_ZONE": zone,
                "KOKOA_DNS_SERVER": f"127.0.0.1:{self.port}", "KOKOA_DNS_TSIG_NAME": key,
                "KOKOA_DNS_TSIG_SECRET": secret, "KOKOA_DNS_TSIG_ALGORITHM": algorithm}

    def dig(self, name, rtype="A", *options):
        """Ask knotd with kdig (over TCP); return the sorted +short answer lines."""
        cmd = ["kdig", "@127.0.0.1", "-p", str(self.port), "+tcp", "+time=3", "+retry=0",
               "+short", *options, name, rtype]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True).stdout
        return sorted(line for line in out.splitlines() if line)

    def answer_ttls(self, name, rtype):
        """Return {address: ttl} of the answer, read with kdig."""
        cmd = ["kdig", "@127.0.0.1", "-p", str(self.port), "+tcp", "+time=3", "+retry=0",
               "+noall", "+answer", name, rtype]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True).stdout
        return {f[4]: int(f[1]) for f in (line.split() for line in out.splitlines()) if f}

    def serial(self, zone=ZONE):
        """The zone's SOA serial as kdig sees it."""
        return int(self.dig(zone, "SOA")[0].split()[2])

    def log(self):
        """Text knotd has logged so far."""
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    """A knotd on a free loopback port with two zones and three TSIG keys (module scope)."""
    require_tools("knotd", "kdig", "keymgr")
    base = tmp_path_factory.mktemp("knot")
    for sub in ("run", "db", "zones"):
        (base / sub).mkdir()
    write_zones(base / "zones")
    keys = {"kokoa-main": ("hmac-sha256", make_key("kokoa-main", "hmac-sha256")),
            "kokoa-sha512": ("hmac-sha512", make_key("kokoa-sha512", "hmac-sha512")),
            "kokoa-reader": ("hmac-sha256", make_key("kokoa-reader", "hmac-sha256"))}
    port = free_port()
    (base / "knot.conf").write_text(knot_conf(base, port, keys))
    log_path = base / "knotd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["knotd", "-c", str(base / "knot.conf")],
                                stdout=log, stderr=subprocess.STDOUT)
    server = Knot(base, port, keys, proc, log_path)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"knotd exited early:\n{server.log()}")
        try:
            return bool(server.dig(ZONE, "SOA")) and bool(server.dig(BIG_ZONE, "SOA"))
        except subprocess.SubprocessError:
            return False

    try:
        wait_until(ready, timeout=20, interval=0.1, what="knotd to serve the test zones")
        yield server
    finally:
        stop_process(proc)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No provider setting from the calling environment leaks into a test."""
    for variable in ENV_VARS:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Call dns.main() with an empty config file and the given env; return (rc, out, err)."""
    empty = tmp_path / "empty.conf"
    empty.write_text("")

    def run(*args, env=None, config=None):
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        rc = dns.main(["--config", str(config or empty), *args])
        out, err = capsys.readouterr()
        for name in env or {}:
            monkeypatch.delenv(name, raising=False)
        return rc, out, err

    return run


def one_line(text):
    """Assert `text` is exactly one non-empty line and return it."""
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].strip(), text
    return lines[0]


# rfc2136 against knotd ##########################################################################

def test_add_creates_a_and_aaaa_records_seen_by_kdig(knot, cli):
    rc, out, err = cli("add", "--name", "app", "--ip", "192.0.2.10", env=knot.env())
    assert rc == 0, err
    assert one_line(out) == "added A app.kokoa.test 192.0.2.10 (ttl 300)"
    rc, out, err = cli("add", "--name", "app.kokoa.test", "--ip", "2001:DB8::0:1", "--ttl", "60",
                       env=knot.env())
    assert rc == 0, err
    assert one_line(out) == "added AAAA app.kokoa.test 2001:db8::1 (ttl 60)"
    assert knot.dig("app.kokoa.test", "A") == ["192.0.2.10"]
    assert knot.dig("app.kokoa.test", "AAAA") == ["2001:db8::1"]
    assert knot.answer_ttls("app.kokoa.test", "AAAA") == {"2001:db8::1": 60}


def test_add_keeps_the_names_existing_addresses(knot, cli):
    for address in ("192.0.2.21", "192.0.2.22"):
        assert cli("add", "--name", "multi", "--ip", address, env=knot.env())[0] == 0
    assert knot.dig("multi.kokoa.test") == ["192.0.2.21", "192.0.2.22"]


def test_add_of_an_existing_record_is_a_noop_that_says_so(knot, cli):
    assert cli("add", "--name", "same", "--ip", "192.0.2.30", env=knot.env())[0] == 0
    serial = knot.serial()
    rc, out, err = cli("add", "--name", "same", "--ip", "192.0.2.30", env=knot.env())
    assert rc == 0, err
    assert one_line(out) == "A same.kokoa.test 192.0.2.30 already exists (ttl 300); nothing to do"
    assert knot.serial() == serial
    assert knot.dig("same.kokoa.test") == ["192.0.2.30"]


def test_apex_and_absolute_names_resolve_inside_the_zone(knot, cli):
    rc, out, _ = cli("add", "--name", "@", "--ip", "192.0.2.1", env=knot.env())
    assert (rc, out) == (0, "added A kokoa.test 192.0.2.1 (ttl 300)\n")
    rc, out, _ = cli("add", "--name", "Abs.Kokoa.Test.", "--ip", "192.0.2.2", env=knot.env())
    assert (rc, out) == (0, "added A abs.kokoa.test 192.0.2.2 (ttl 300)\n")
    assert knot.dig(ZONE, "A") == ["192.0.2.1"]
    assert knot.dig("abs.kokoa.test", "A") == ["192.0.2.2"]


@pytest.mark.parametrize("name, fqdn", [
    ("@", ZONE), (ZONE, ZONE), (f"{ZONE}.", ZONE), ("App", "app.kokoa.test"),
    ("app.kokoa.test", "app.kokoa.test"), ("app.kokoa.test.", "app.kokoa.test"),
    ("a.b-c", "a.b-c.kokoa.test"), ("b\u00fccher", "xn--bcher-kva.kokoa.test"),
])
def test_name_forms_resolve_inside_the_zone(knot, cli, name, fqdn):
    rc, out, err = cli("add", "--dry-run", "--name", name, "--ip", "192.0.2.200", env=knot.env())
    assert rc == 0, err
    assert out == f"would add A {fqdn} 192.0.2.200 (ttl 300)\n"


def test_add_with_another_ttl_warns_that_the_rrset_has_one_ttl(knot, cli):
    assert cli("add", "--name", "ttl", "--ip", "192.0.2.31", env=knot.env())[0] == 0
    rc, out, err = cli("add", "--name", "ttl", "--ip", "192.0.2.32", "--ttl", "60",
                       env=knot.env())
    assert rc == 0
    assert out == "added A ttl.kokoa.test 192.0.2.32 (ttl 60)\n"
    assert "RFC 2181" in one_line(err)
    assert sorted(knot.answer_ttls("ttl.kokoa.test", "A")) == ["192.0.2.31", "192.0.2.32"]


def test_remove_with_ip_removes_only_that_address(knot, cli):
    for address in ("192.0.2.41", "192.0.2.42", "2001:db8::41"):
        assert cli("add", "--name", "rm-one", "--ip", address, env=knot.env())[0] == 0
    rc, out, err = cli("remove", "--name", "rm-one", "--ip", "192.0.2.41", env=knot.env())
    assert rc == 0, err
    assert one_line(out) == "removed A rm-one.kokoa.test 192.0.2.41"
    assert knot.dig("rm-one.kokoa.test", "A") == ["192.0.2.42"]
    assert knot.dig("rm-one.kokoa.test", "AAAA") == ["2001:db8::41"]


def test_remove_without_ip_removes_every_address_of_the_name_only(knot, cli):
    for name, address in (("rm-all", "192.0.2.51"), ("rm-all", "2001:db8::51"),
                          ("rm-other", "192.0.2.52")):
        assert cli("add", "--name", name, "--ip", address, env=knot.env())[0] == 0
    rc, out, err = cli("remove", "--name", "rm-all", env=knot.env())
    assert rc == 0, err
    assert out.splitlines() == ["removed A rm-all.kokoa.test 192.0.2.51",
                                "removed AAAA rm-all.kokoa.test 2001:db8::51"]
    assert knot.dig("rm-all.kokoa.test", "A") == []
    assert knot.dig("rm-all.kokoa.test", "AAAA") == []
    assert knot.dig("rm-other.kokoa.test", "A") == ["192.0.2.52"]


def test_remove_of_a_missing_record_is_a_noop_that_says_so(knot, cli):
    serial = knot.serial()
    rc, out, _ = cli("remove", "--name", "nothing-here", env=knot.env())
    assert (rc, out) == (0, "nothing-here.kokoa.test has no A/AAAA records; nothing to do\n")
    rc, out, _ = cli("remove", "--name", "ns1", "--ip", "192.0.2.99", env=knot.env())
    assert (rc, out) == (0, "ns1.kokoa.test has no A record 192.0.2.99; nothing to do\n")
    assert knot.serial() == serial


def test_list_prints_a_table_and_json(knot, cli):
    assert cli("add", "--name", "listed", "--ip", "192.0.2.61", env=knot.env())[0] == 0
    assert cli("add", "--name", "listed", "--ip", "2001:db8::61", "--ttl", "120",
               env=knot.env())[0] == 0
    rc, out, err = cli("list", env=knot.env())
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["NAME", "TYPE", "TTL", "ADDRESS"]
    assert ["listed.kokoa.test", "A", "300", "192.0.2.61"] in rows
    assert ["listed.kokoa.test", "AAAA", "120", "2001:db8::61"] in rows
    assert ["ns1.kokoa.test", "A", "3600", "192.0.2.53"] in rows
    rc, out, err = cli("list", "--json", env=knot.env())
    assert rc == 0, err
    records = json.loads(out)
    assert {"name": "listed.kokoa.test", "type": "AAAA", "ttl": 120,
            "address": "2001:db8::61"} in records
    assert all(set(r) == {"name", "type", "ttl", "address"} for r in records)
    assert {r["type"] for r in records} == {"A", "AAAA"}


def test_list_verifies_a_multi_message_zone_transfer(knot, cli):
    rc, out, err = cli("list", "--json", env=knot.env(zone=BIG_ZONE))
    assert rc == 0, err
    records = json.loads(out)
    assert len(records) == BIG_ZONE_HOSTS + MANY_ADDRESSES + 1
    assert {"name": "host-4999.big.test", "type": "A", "ttl": 3600,
            "address": "10.0.19.135"} in records
    finished = re.findall(r"\[big\.test\.\] AXFR, outgoing.*finished.*?(\d+) messages", knot.log())
    assert finished and int(finished[-1]) > 1, knot.log()


def test_lookup_falls_back_to_tcp_when_the_udp_answer_is_truncated(knot, cli):
    udp = subprocess.run(["kdig", "@127.0.0.1", "-p", str(knot.port), "+notcp", "+noedns",
                          "+time=3", "+retry=0", "many.big.test", "A"],
                         capture_output=True, text=True, timeout=15).stdout
    assert re.search(r"Flags:[^;]*\btc\b", udp), udp
    last = f"198.51.100.{MANY_ADDRESSES}"
    rc, out, err = cli("add", "--name", "many", "--ip", last, env=knot.env(zone=BIG_ZONE))
    assert rc == 0, err
    assert "already exists" in out
    assert len(knot.dig("many.big.test", "A")) == MANY_ADDRESSES


def test_hmac_sha512_key_is_accepted(knot, cli):
    rc, out, err = cli("add", "--name", "sha512", "--ip", "192.0.2.71",
                       env=knot.env(key="kokoa-sha512"))
    assert rc == 0, err
    assert knot.dig("sha512.kokoa.test") == ["192.0.2.71"]


@pytest.mark.parametrize("change, expected", [
    ({"KOKOA_DNS_TSIG_SECRET": "c2VjcmV0IHRoYXQgdGhlIHNlcnZlciBkb2VzIG5vdCBrbm93IQ=="}, "BADSIG"),
    ({"KOKOA_DNS_TSIG_NAME": "no-such-key"}, "BADKEY"),
    ({"KOKOA_DNS_TSIG_ALGORITHM": "hmac-sha512"}, "BADKEY"),
])
def test_wrong_tsig_key_is_refused_with_one_clear_line(knot, cli, change, expected):
    serial = knot.serial()
    rc, out, err = cli("add", "--name", "badkey", "--ip", "192.0.2.81",
                       env={**knot.env(), **change})
    assert rc == 1
    assert out == ""
    assert expected in one_line(err)
    assert knot.dig("badkey.kokoa.test") == []
    assert knot.serial() == serial


def test_key_without_update_permission_is_refused(knot, cli):
    rc, _, err = cli("add", "--name", "reader", "--ip", "192.0.2.82",
                     env=knot.env(key="kokoa-reader"))
    assert rc == 1
    assert re.search(r"REFUSED|NOTAUTH", one_line(err)), err
    assert knot.dig("reader.kokoa.test") == []


@pytest.mark.parametrize("name", ["app.example.org.", "notkokoa.test.", "test.", "."])
def test_name_outside_the_zone_is_a_usage_error(knot, cli, name):
    rc, out, err = cli("add", "--name", name, "--ip", "192.0.2.90", env=knot.env())
    assert rc == 2
    assert out == ""
    assert one_line(err).startswith("dns.py: error: ")


@pytest.mark.parametrize("name", ["-bad", "bad-", "a..b", "under_score", "x" * 64, "", "sp ace",
                                  "a/b", ".lead", ("y" * 60 + ".") * 4 + "z"])
def test_invalid_names_are_refused_before_anything_is_sent(cli, name):
    env = {"KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_ZONE": ZONE,
           "KOKOA_DNS_SERVER": "127.0.0.1:9", "KOKOA_DNS_TSIG_NAME": "k",
           "KOKOA_DNS_TSIG_SECRET": "c2VjcmV0"}
    rc, out, err = cli("add", f"--name={name}", "--ip", "192.0.2.1", env=env)
    assert (rc, out) == (2, "")
    assert "invalid name" in one_line(err)


@pytest.mark.parametrize("address", ["192.0.2.300", "192.0.2", "010.0.0.1", "not-an-ip",
                                     "0.0.0.0", "::", "224.0.0.1", "fe80::1%eth0", "2001:db8::/64"])
def test_invalid_addresses_are_refused_before_anything_is_sent(cli, address):
    env = {"KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_ZONE": ZONE,
           "KOKOA_DNS_SERVER": "127.0.0.1:9", "KOKOA_DNS_TSIG_NAME": "k",
           "KOKOA_DNS_TSIG_SECRET": "c2VjcmV0"}
    for command in ("add", "remove"):
        rc, out, err = cli(command, "--name", "x", f"--ip={address}", env=env)
        assert (rc, out) == (2, "")
        assert "invalid address" in one_line(err)


def test_dry_run_changes_nothing(knot, cli):
    assert cli("add", "--name", "dry", "--ip", "192.0.2.101", env=knot.env())[0] == 0
    serial = knot.serial()
    rc, out, _ = cli("add", "--dry-run", "--name", "dry", "--ip", "192.0.2.102", env=knot.env())
    assert (rc, out) == (0, "would add A dry.kokoa.test 192.0.2.102 (ttl 300)\n")
    rc, out, _ = cli("remove", "--name", "dry", "--dry-run", env=knot.env())
    assert (rc, out) == (0, "would remove A dry.kokoa.test 192.0.2.101\n")
    assert knot.dig("dry.kokoa.test") == ["192.0.2.101"]
    assert knot.serial() == serial


def test_config_file_is_read_and_environment_variables_win(knot, cli, tmp_path):
    env = knot.env()
    config = tmp_path / "dns.conf"
    config.write_text("[dns]\nzone = wrong.test\nprovider = rfc2136\n"
                      f"server = {env['KOKOA_DNS_SERVER']}\ntsig_name = kokoa-main\n"
                      f"tsig_secret = {env['KOKOA_DNS_TSIG_SECRET']}\n")
    rc, out, err = cli("add", "--dry-run", "--name", "ini", "--ip", "192.0.2.111",
                       config=config, env={"KOKOA_DNS_ZONE": ZONE})
    assert rc == 0, err
    assert out == "would add A ini.kokoa.test 192.0.2.111 (ttl 300)\n"
    config.write_text(config.read_text().replace("wrong.test", ZONE))
    rc, out, err = cli("list", "--json", "--config", str(config))
    assert rc == 0, err
    assert {"name": "ns1.kokoa.test", "type": "A", "ttl": 3600,
            "address": "192.0.2.53"} in json.loads(out)


@pytest.mark.parametrize("env, expected", [
    ({}, "no zone configured"),
    ({"KOKOA_DNS_ZONE": ZONE}, "no provider configured"),
    ({"KOKOA_DNS_ZONE": ZONE, "KOKOA_DNS_PROVIDER": "bind"}, "unknown KOKOA_DNS_PROVIDER"),
    ({"KOKOA_DNS_ZONE": ZONE, "KOKOA_DNS_PROVIDER": "rfc2136"}, "KOKOA_DNS_SERVER"),
    ({"KOKOA_DNS_ZONE": ZONE, "KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_SERVER": "127.0.0.1",
      "KOKOA_DNS_TSIG_NAME": "k", "KOKOA_DNS_TSIG_SECRET": "not base64!"}, "base64"),
    ({"KOKOA_DNS_ZONE": ZONE, "KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_SERVER": "127.0.0.1",
      "KOKOA_DNS_TSIG_NAME": "k", "KOKOA_DNS_TSIG_SECRET": "c2VjcmV0",
      "KOKOA_DNS_TSIG_ALGORITHM": "hmac-sha3"}, "unknown KOKOA_DNS_TSIG_ALGORITHM"),
    ({"KOKOA_DNS_ZONE": ZONE, "KOKOA_DNS_PROVIDER": "cloudflare"}, "CLOUDFLARE_API_TOKEN"),
])
def test_incomplete_configuration_is_a_usage_error(cli, env, expected):
    rc, out, err = cli("list", env=env)
    assert (rc, out) == (2, "")
    assert expected in one_line(err)


def test_missing_explicit_config_file_is_a_usage_error(cli, tmp_path):
    rc, _, err = cli("list", config=tmp_path / "absent.conf")
    assert rc == 2
    assert "does not exist" in one_line(err)


def test_every_subcommand_has_help(capsys):
    for command in ("add", "remove", "list"):
        assert dns.main([command, "--help"]) == 0
        assert f"usage: dns.py {command}" in capsys.readouterr().out
    assert dns.main(["add", "--name", "x"]) == 2
    assert "--ip" in capsys.readouterr().err


def test_runs_as_a_script(knot):
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(knot.env())
    cmd = [sys.executable, str(REPO / "dns.py"), "--config", os.devnull]
    added = subprocess.run(cmd + ["add", "--name", "script", "--ip", "192.0.2.121"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert added.returncode == 0, added.stderr
    assert knot.dig("script.kokoa.test") == ["192.0.2.121"]
    bad = subprocess.run(cmd + ["add", "--name", "x.example.org.", "--ip", "192.0.2.1"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert one_line(bad.stderr) == ("dns.py: error: name 'x.example.org.' is outside the zone "
                                    "kokoa.test")


# rfc2136 against misbehaving servers ############################################################

def fake_dns_server(mode):
    """A UDP socket on 127.0.0.1 that never answers ("silent") or answers each query in `mode`:
    "unsigned" (header + question, no TSIG) or "echo" (the query itself, TSIG and all)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                query, peer = sock.recvfrom(65535)
            except socket.timeout:
                continue
            flags = int.from_bytes(query[2:4], "big") | 0x8000
            if mode == "echo":
                sock.sendto(query[:2] + flags.to_bytes(2, "big") + query[4:], peer)
            elif mode == "unsigned":
                end = query.index(b"\x00", 12) + 5
                header = query[:2] + flags.to_bytes(2, "big") + b"\x00\x01" + b"\x00" * 6
                sock.sendto(header + query[12:end], peer)

    thread = threading.Thread(target=serve, daemon=True)
    if mode != "silent":
        thread.start()
    return sock, stop, thread


@pytest.mark.parametrize("mode, expected", [
    ("silent", "did not answer within 0.4 s (timeout)"),
    ("unsigned", "without a TSIG signature"),
    ("echo", "does not verify (BADSIG)"),
])
def test_bad_server_answers_are_provider_errors(cli, mode, expected):
    sock, stop, thread = fake_dns_server(mode)
    env = {"KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_ZONE": ZONE, "KOKOA_DNS_TIMEOUT": "0.4",
           "KOKOA_DNS_SERVER": f"127.0.0.1:{sock.getsockname()[1]}",
           "KOKOA_DNS_TSIG_NAME": "kokoa-main", "KOKOA_DNS_TSIG_SECRET": "c2VjcmV0"}
    try:
        rc, out, err = cli("add", "--name", "app", "--ip", "192.0.2.1", env=env)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        sock.close()
    assert (rc, out) == (1, "")
    assert expected in one_line(err)


def wire_name(name):
    """Uncompressed wire form of an absolute name given without the trailing dot."""
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def wire_rr(name, rtype, rdata, rclass=1, ttl=300):
    """One resource record on the wire."""
    return wire_name(name) + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def sign_response(message, secret, prior_mac, first, now, unsigned=b""):
    """Append a hmac-sha256 TSIG by RFC 8945 4.3 and 5.3.1, independently of dns.py;
    `unsigned` is the messages sent since the prior MAC."""
    msg_id = message[:2]
    variables = (wire_name("kokoa-main") + struct.pack("!HI", 255, 0) + wire_name("hmac-sha256")
                 + struct.pack("!HIH", 0, now, 300))
    data = struct.pack("!H", len(prior_mac)) + prior_mac + unsigned + message
    data += variables + struct.pack("!HH", 0, 0) if first else struct.pack("!HIH", 0, now, 300)
    mac = hmac.new(secret, data, hashlib.sha256).digest()
    rdata = (wire_name("hmac-sha256") + struct.pack("!HIHH", 0, now, 300, len(mac)) + mac
             + msg_id + struct.pack("!HH", 0, 0))
    arcount = struct.unpack_from("!H", message, 10)[0] + 1
    signed = message[:10] + struct.pack("!H", arcount) + message[12:]
    return signed + wire_rr("kokoa-main", 250, rdata, rclass=255, ttl=0), mac


def axfr_envelopes(query, secret, mode):
    """Three AXFR messages; the middle one unsigned; `mode` spoils them on purpose."""
    parsed = dns.parse_message(query)
    request_mac = dns.parse_tsig_rdata(query, parsed.tsig)[3]
    soa = wire_rr(ZONE, 6, wire_name(f"ns1.{ZONE}") + wire_name(f"hostmaster.{ZONE}")
                  + struct.pack("!5I", 1, 3600, 900, 604800, 300))
    host = [wire_rr(f"h{i}.{ZONE}", 1, bytes([192, 0, 2, i])) for i in range(3)]
    question = query[12:query.index(b"\0", 12) + 5]
    header = query[:2] + struct.pack("!HHHHH", 0x8400, 1, 2, 0, 0)
    first = header + question + soa + host[0]
    middle = query[:2] + struct.pack("!HHHHH", 0x8400, 0, 1, 0, 0) + host[1]
    last = query[:2] + struct.pack("!HHHHH", 0x8400, 0, 2, 0, 0) + host[2] + soa
    now = int(time.time())
    first, mac = sign_response(first, secret, request_mac, True, now)
    if mode != "unsigned-last":
        last, _ = sign_response(last, secret, mac, False, now, unsigned=middle)
    if mode == "tampered":
        middle = middle[:-1] + b"\x63"
    return [first, middle, last]


def fake_axfr_server(secret, mode):
    """A TCP socket on 127.0.0.1 that answers one AXFR with axfr_envelopes()."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            length = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))[0]
            query = conn.recv(length, socket.MSG_WAITALL)
            for envelope in axfr_envelopes(query, secret, mode):
                conn.sendall(struct.pack("!H", len(envelope)) + envelope)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("mode, expected", [
    ("good", None),
    ("tampered", "does not verify (BADSIG)"),
    ("unsigned-last", "last message from the server was not signed"),
])
def test_transfer_with_unsigned_middle_message_is_verified_by_the_chain(cli, mode, expected):
    secret = os.urandom(32)
    listener, thread = fake_axfr_server(secret, mode)
    env = {"KOKOA_DNS_PROVIDER": "rfc2136", "KOKOA_DNS_ZONE": ZONE, "KOKOA_DNS_TIMEOUT": "5",
           "KOKOA_DNS_SERVER": f"127.0.0.1:{listener.getsockname()[1]}",
           "KOKOA_DNS_TSIG_NAME": "kokoa-main",
           "KOKOA_DNS_TSIG_SECRET": base64.b64encode(secret).decode()}
    try:
        rc, out, err = cli("list", "--json", env=env)
    finally:
        listener.close()
        thread.join(timeout=10)
    if expected is None:
        assert rc == 0, err
        assert [r["address"] for r in json.loads(out)] == ["192.0.2.0", "192.0.2.1", "192.0.2.2"]
    else:
        assert (rc, out) == (1, "")
        assert expected in one_line(err)


# cloudflare against a local fake of API v4 ######################################################

CF_TOKEN = "test-token-123"
CF_ZONE_ID = "023e105f4ecef8ad9ca31a8372d0c353"
CF_ZONE = "example.com"


class FakeCloudflare(ThreadingHTTPServer):
    """The few Cloudflare v4 endpoints dns.py uses, their envelopes and error shapes."""

    daemon_threads = True

    def __init__(self, page_size=100):
        super().__init__(("127.0.0.1", 0), CloudflareHandler)
        self.page_size = page_size
        self.records = {}
        self.requests = []
        self.lock = threading.Lock()

    def seed(self, rtype, name, content, ttl=300):
        """Add a record as if it had been created earlier; return its id."""
        rid = uuid.uuid4().hex
        self.records[rid] = {"id": rid, "zone_id": CF_ZONE_ID, "zone_name": CF_ZONE,
                             "type": rtype, "name": name, "content": content, "ttl": ttl,
                             "proxied": False, "proxiable": True}
        return rid

    def calls(self, method=None):
        """(method, path, query) of each request so far, optionally of one method."""
        return [(r["method"], r["path"], r["query"]) for r in self.requests
                if method in (None, r["method"])]


class CloudflareHandler(BaseHTTPRequestHandler):
    """Request handler of FakeCloudflare."""

    def log_message(self, *args):
        pass

    def send_json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def fail(self, status, code, message):
        self.send_json(status, {"success": False, "errors": [{"code": code, "message": message}],
                                "messages": [], "result": None})

    def ok(self, result, result_info=None):
        payload = {"success": True, "errors": [], "messages": [], "result": result}
        if result_info is not None:
            payload["result_info"] = result_info
        self.send_json(200, payload)

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        entry = {"method": self.command, "path": url.path,
                 "query": dict(urllib.parse.parse_qsl(url.query)),
                 "authorization": self.headers.get("Authorization"),
                 "content_type": self.headers.get("Content-Type"),
                 "body": json.loads(raw) if raw else None}
        with self.server.lock:
            self.server.requests.append(entry)
            self.route(url.path, entry)

    def do_GET(self):
        self.handle_any()

    def do_POST(self):
        self.handle_any()

    def do_DELETE(self):
        self.handle_any()

    def route(self, path, entry):
        if entry["authorization"] != f"Bearer {CF_TOKEN}":
            return self.fail(403, 10000, "Authentication error")
        if path == "/client/v4/zones" and self.command == "GET":
            zones = [{"id": CF_ZONE_ID, "name": CF_ZONE, "status": "active"}]
            found = [z for z in zones if entry["query"].get("name") in (None, z["name"])]
            return self.ok(found, {"page": 1, "per_page": 20, "count": len(found),
                                   "total_count": len(found), "total_pages": 1})
        match = re.fullmatch(r"/client/v4/zones/([^/]+)/dns_records(?:/([^/]+))?", path)
        if not match or match.group(1) != CF_ZONE_ID:
            return self.fail(404, 7003, "Could not route to " + path +
                             ", perhaps your object identifier is invalid?")
        rid = match.group(2)
        if self.command == "GET" and rid is None:
            return self.list_records(entry["query"])
        if self.command == "POST" and rid is None:
            return self.create_record(entry)
        if self.command == "DELETE" and rid is not None:
            if self.server.records.pop(rid, None) is None:
                return self.fail(404, 81044, "Record does not exist.")
            return self.ok({"id": rid})
        return self.fail(405, 10405, "Method not allowed")

    def list_records(self, query):
        found = [r for _, r in sorted(self.server.records.items())
                 if query.get("type") in (None, r["type"])
                 and query.get("name") in (None, r["name"])]
        per_page = min(int(query.get("per_page", 100)), self.server.page_size)
        page = int(query.get("page", 1))
        total_pages = max(1, -(-len(found) // per_page))
        chunk = found[(page - 1) * per_page:page * per_page]
        return self.ok(chunk, {"page": page, "per_page": per_page, "count": len(chunk),
                               "total_count": len(found), "total_pages": total_pages})

    def create_record(self, entry):
        body = entry["body"] or {}
        required = {"type", "name", "content"}
        if entry["content_type"] != "application/json" or not required <= set(body):
            return self.fail(400, 9207, "Request body is invalid.")
        if not isinstance(body.get("ttl"), int) or not (body["ttl"] == 1 or 60 <= body["ttl"]):
            return self.fail(400, 9021, "Invalid TTL. Must be between 60 and 86400 seconds, "
                                        "or 1 for Automatic.")
        if body["type"] == "TXT" and (not isinstance(body["content"], str)
                                      or len(body["content"]) > 2048):
            return self.fail(400, 9100, "DNS record content must be at most 2048 characters.")
        rid = self.server.seed(body["type"], body["name"], body["content"], body["ttl"])
        self.ok(self.server.records[rid])


@pytest.fixture
def cloudflare():
    """A FakeCloudflare on 127.0.0.1 served from a thread (function scope)."""
    server = FakeCloudflare()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/client/v4"
    server.env = {"KOKOA_DNS_PROVIDER": "cloudflare", "KOKOA_DNS_ZONE": CF_ZONE,
                  "CLOUDFLARE_API_TOKEN": CF_TOKEN, "KOKOA_CLOUDFLARE_API_URL": server.url}
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def lookup_calls(name):
    """The record lookups dns.py makes for `name`, by zone id."""
    path = f"/client/v4/zones/{CF_ZONE_ID}/dns_records"
    return [("GET", path, {"type": rtype, "name": name, "page": "1", "per_page": "100"})
            for rtype in ("A", "AAAA")]


def test_cloudflare_add_looks_up_the_zone_then_creates_the_record(cloudflare, cli):
    rc, out, err = cli("add", "--name", "app", "--ip", "192.0.2.10", env=cloudflare.env)
    assert rc == 0, err
    assert out == "added A app.example.com 192.0.2.10 (ttl 300)\n"
    assert cloudflare.calls() == [("GET", "/client/v4/zones", {"name": CF_ZONE}),
                                  *lookup_calls("app.example.com"),
                                  ("POST", f"/client/v4/zones/{CF_ZONE_ID}/dns_records", {})]
    assert all(r["authorization"] == f"Bearer {CF_TOKEN}" for r in cloudflare.requests)
    post = cloudflare.requests[-1]
    assert post["content_type"] == "application/json"
    assert post["body"] == {"type": "A", "name": "app.example.com", "content": "192.0.2.10",
                            "ttl": 300, "proxied": False}


def test_cloudflare_configured_zone_id_skips_the_lookup(cloudflare, cli):
    env = {**cloudflare.env, "CLOUDFLARE_ZONE_ID": CF_ZONE_ID}
    rc, _, err = cli("add", "--name", "@", "--ip", "2001:db8::1", "--ttl", "60", env=env)
    assert rc == 0, err
    assert cloudflare.calls() == [*lookup_calls(CF_ZONE),
                                  ("POST", f"/client/v4/zones/{CF_ZONE_ID}/dns_records", {})]
    assert cloudflare.requests[-1]["body"] == {"type": "AAAA", "name": CF_ZONE,
                                               "content": "2001:db8::1", "ttl": 60,
                                               "proxied": False}


def test_cloudflare_add_of_an_existing_record_is_a_noop(cloudflare, cli):
    cloudflare.seed("AAAA", "app.example.com", "2001:db8::10")
    rc, out, _ = cli("add", "--name", "app", "--ip", "2001:db8:0::10", env=cloudflare.env)
    assert rc == 0
    assert out == "AAAA app.example.com 2001:db8::10 already exists (ttl 300); nothing to do\n"
    assert cloudflare.calls("POST") == []


def test_cloudflare_list_follows_pagination(cloudflare, cli):
    cloudflare.page_size = 2
    for i in range(5):
        cloudflare.seed("A", f"h{i}.example.com", f"192.0.2.{i + 1}")
    cloudflare.seed("AAAA", "h0.example.com", "2001:db8::1", ttl=1)
    cloudflare.seed("CNAME", "www.example.com", "h0.example.com")
    rc, out, err = cli("list", "--json", env=cloudflare.env)
    assert rc == 0, err
    assert json.loads(out) == [
        {"name": "h0.example.com", "type": "A", "ttl": 300, "address": "192.0.2.1"},
        {"name": "h0.example.com", "type": "AAAA", "ttl": 1, "address": "2001:db8::1"},
    ] + [{"name": f"h{i}.example.com", "type": "A", "ttl": 300, "address": f"192.0.2.{i + 1}"}
         for i in range(1, 5)]
    pages = [(q["type"], q["page"]) for m, p, q in cloudflare.calls("GET") if "type" in q]
    assert pages == [("A", "1"), ("A", "2"), ("A", "3"), ("AAAA", "1")]


def test_cloudflare_remove_deletes_one_or_all_records_of_the_name(cloudflare, cli):
    keep = cloudflare.seed("A", "other.example.com", "192.0.2.9")
    one = cloudflare.seed("A", "app.example.com", "192.0.2.1")
    two = cloudflare.seed("A", "app.example.com", "192.0.2.2")
    six = cloudflare.seed("AAAA", "app.example.com", "2001:db8::2")
    env = {**cloudflare.env, "CLOUDFLARE_ZONE_ID": CF_ZONE_ID}
    rc, out, _ = cli("remove", "--name", "app", "--ip", "192.0.2.1", env=env)
    assert (rc, out) == (0, "removed A app.example.com 192.0.2.1\n")
    path = f"/client/v4/zones/{CF_ZONE_ID}/dns_records"
    assert cloudflare.calls("DELETE") == [("DELETE", f"{path}/{one}", {})]
    rc, out, _ = cli("remove", "--name", "app.example.com", env=env)
    assert rc == 0
    assert out.splitlines() == ["removed A app.example.com 192.0.2.2",
                                "removed AAAA app.example.com 2001:db8::2"]
    assert sorted(cloudflare.calls("DELETE")[1:]) == sorted(
        [("DELETE", f"{path}/{two}", {}), ("DELETE", f"{path}/{six}", {})])
    assert list(cloudflare.records) == [keep]


def test_cloudflare_dry_run_sends_no_change(cloudflare, cli):
    cloudflare.seed("A", "app.example.com", "192.0.2.1")
    assert cli("add", "--dry-run", "--name", "app", "--ip", "192.0.2.2",
               env=cloudflare.env)[1] == "would add A app.example.com 192.0.2.2 (ttl 300)\n"
    assert cli("remove", "--dry-run", "--name", "app",
               env=cloudflare.env)[1] == "would remove A app.example.com 192.0.2.1\n"
    assert cloudflare.calls("POST") == cloudflare.calls("DELETE") == []
    assert len(cloudflare.records) == 1


def test_cloudflare_api_error_is_shown_in_words(cloudflare, cli):
    env = {**cloudflare.env, "CLOUDFLARE_API_TOKEN": "wrong-token"}
    rc, out, err = cli("add", "--name", "app", "--ip", "192.0.2.1", env=env)
    assert (rc, out) == (1, "")
    assert one_line(err) == ("dns.py: error: Cloudflare API GET /zones failed with HTTP 403: "
                             "Authentication error (code 10000)")


def test_cloudflare_rejected_record_is_a_provider_error(cloudflare, cli):
    rc, _, err = cli("add", "--name", "app", "--ip", "192.0.2.1", "--ttl", "5",
                     env=cloudflare.env)
    assert rc == 1
    assert "Invalid TTL" in one_line(err) and "code 9021" in err


def test_cloudflare_unknown_zone_is_a_provider_error(cloudflare, cli):
    rc, _, err = cli("list", env={**cloudflare.env, "KOKOA_DNS_ZONE": "example.net"})
    assert rc == 1
    assert "no zone example.net" in one_line(err)


def test_cloudflare_unreachable_api_is_a_provider_error(cli):
    env = {"KOKOA_DNS_PROVIDER": "cloudflare", "KOKOA_DNS_ZONE": CF_ZONE,
           "CLOUDFLARE_API_TOKEN": CF_TOKEN,
           "KOKOA_CLOUDFLARE_API_URL": f"http://127.0.0.1:{free_port()}/client/v4"}
    rc, _, err = cli("list", env=env)
    assert rc == 1
    assert "cannot reach the Cloudflare API" in one_line(err)


# TXT records (DNS-01 challenges, issue 15) ##################################################

CHALLENGE = "gfj9Xq-Rr8cMAeD8sN7tZkHY2aBkW0tPq3vRhL5ZfYc"


def test_txt_add_and_remove_through_knot(knot, cli):
    rc, out, err = cli("add", "--name", "_acme-challenge.app", "--type", "TXT", "--value",
                       CHALLENGE, "--ttl", "60", env=knot.env())
    assert rc == 0, err
    assert out == f"added TXT _acme-challenge.app.{ZONE} {CHALLENGE} (ttl 60)\n"
    assert knot.dig(f"_acme-challenge.app.{ZONE}", "TXT") == [f'"{CHALLENGE}"']
    rc, out, _ = cli("add", "--name", "_acme-challenge.app", "--type", "txt", "--value",
                     CHALLENGE, env=knot.env())
    assert rc == 0 and "already exists; nothing to do" in out
    rc, out, _ = cli("add", "--name", "_acme-challenge.app", "--type", "TXT", "--value",
                     "second-value", env=knot.env())
    assert rc == 0 and len(knot.dig(f"_acme-challenge.app.{ZONE}", "TXT")) == 2
    rc, out, _ = cli("remove", "--name", "_acme-challenge.app", "--type", "TXT", "--value",
                     CHALLENGE, env=knot.env())
    assert rc == 0 and out == f"removed TXT _acme-challenge.app.{ZONE} {CHALLENGE}\n"
    assert knot.dig(f"_acme-challenge.app.{ZONE}", "TXT") == ['"second-value"']
    rc, out, _ = cli("remove", "--name", "_acme-challenge.app", "--type", "TXT",
                     env=knot.env())
    assert rc == 0 and knot.dig(f"_acme-challenge.app.{ZONE}", "TXT") == []
    rc, out, _ = cli("remove", "--name", "_acme-challenge.app", "--type", "TXT",
                     env=knot.env())
    assert rc == 0 and "nothing to do" in out


def test_txt_at_the_apex_and_a_plain_name(knot, cli):
    rc, _, err = cli("add", "--name", "_acme-challenge", "--type", "TXT", "--value", CHALLENGE,
                     env=knot.env())
    assert rc == 0, err
    assert knot.dig(f"_acme-challenge.{ZONE}", "TXT") == [f'"{CHALLENGE}"']
    assert cli("remove", "--name", "_acme-challenge", "--type", "TXT", env=knot.env())[0] == 0
    assert knot.dig(f"_acme-challenge.{ZONE}", "TXT") == []


@pytest.mark.parametrize("args, fragment", [
    (["add", "--name", "_acme-challenge.app", "--type", "TXT"], "needs --value"),
    (["add", "--name", "x", "--type", "TXT", "--value", "a b"], "invalid TXT value"),
    (["add", "--name", "x", "--type", "TXT", "--value", 'a"b'], "invalid TXT value"),
    (["add", "--name", "x", "--type", "TXT", "--value", "a\\b"], "invalid TXT value"),
    (["add", "--name", "x", "--type", "TXT", "--value", "v" * 256], "invalid TXT value"),
    (["add", "--name", "x", "--type", "TXT", "--value", "ü"], "invalid TXT value"),
    (["add", "--name", "_a_b.app", "--type", "TXT", "--value", "v"], "is not _ and"),
    (["add", "--name", "_acme.app", "--type", "TXT", "--value", "v", "--ip", "192.0.2.1"],
     "not --ip"),
    (["add", "--name", "_acme.other.test.", "--type", "TXT", "--value", "v"],
     "outside the zone"),
    (["add", "--name", "app", "--value", "v", "--ip", "192.0.2.1"], "--value is for"),
    (["add", "--name", "app"], "add needs --ip"),
    (["add", "--name", "app", "--type", "AAAA", "--ip", "192.0.2.1"], "not AAAA"),
])
def test_invalid_txt_arguments_are_refused_before_anything_is_sent(knot, cli, args, fragment):
    rc, out, err = cli(*args, env=knot.env())
    assert rc == 2 and out == ""
    assert fragment in one_line(err)


def test_cloudflare_txt_add_and_remove(cloudflare, cli):
    rc, out, err = cli("add", "--name", "_acme-challenge.app", "--type", "TXT", "--value",
                       CHALLENGE, "--ttl", "60", env=cloudflare.env)
    assert rc == 0, err
    [record] = cloudflare.records.values()
    assert (record["type"], record["name"], record["content"], record["ttl"]) == (
        "TXT", "_acme-challenge.app.example.com", CHALLENGE, 60)
    path = f"/client/v4/zones/{CF_ZONE_ID}/dns_records"
    assert ("GET", path, {"type": "TXT", "name": "_acme-challenge.app.example.com", "page": "1",
                          "per_page": "100"}) in cloudflare.calls()
    # The API may show a TXT content in quotes: the value is the same.
    cloudflare.seed("TXT", "_acme-challenge.app.example.com", '"other-value"')
    rc, out, _ = cli("add", "--name", "_acme-challenge.app", "--type", "TXT", "--value",
                     "other-value", env=cloudflare.env)
    assert rc == 0 and "already exists" in out
    rc, out, _ = cli("remove", "--name", "_acme-challenge.app", "--type", "TXT", "--value",
                     CHALLENGE, env=cloudflare.env)
    assert rc == 0 and out == f"removed TXT _acme-challenge.app.example.com {CHALLENGE}\n"
    assert [r["content"] for r in cloudflare.records.values()] == ['"other-value"']
    assert cli("remove", "--name", "_acme-challenge.app", "--type", "TXT",
               env=cloudflare.env)[0] == 0
    assert cloudflare.records == {}
