"""Data-plane benchmark: requests/s through a Kokoa edge vs. a hand-written proxy vs. direct.

Builds the end-to-end world of netlab.World (network namespaces, wireguard-go, the real
control plane, the real agent writing the edge's nginx config, pebble issuing the certificate),
adds a small nginx serving a static file on origin A's WireGuard address, routes
app.example.test to it, and measures the same path "/" three ways with wrk:

  kokoa    client ns -> edge nginx :443 with the config agent.sh generated (TLS with the
           pebble certificate, map $host -> upstream with keepalive) -> WireGuard -> origin
  hand     client ns -> a second nginx in the edge ns, :8443, with a minimal hand-written proxy
           config (same certificate and TLS settings, same main config and worker count,
           upstream + keepalive)
  direct   edge ns -> origin wg_ip:port over the tunnel, plain HTTP, no nginx on the edge

Then (unless --upload-mib 0) uploads: a file of --upload-mib MiB sent with curl -T to netlab's
workload origin (which hashes the body as it arrives) through the edge, over HTTP/1.1 and
HTTP/2, and from the edge namespace directly over the tunnel; target edge / direct >= 0.8.

Runs are interleaved (one of each per round, order rotated) after a warm-up; prints every
run, the medians and the ratios kokoa / hand (target >= 0.95), kokoa / direct, hand / direct.
This machine is shared and everything (wrk, both wireguard-go, three nginx) competes for the
same cores, so req/s drifts between runs; two steadier figures are printed next to it: the
median of per-round kokoa/hand ratios, and the edge nginx workers' CPU time per request
(/proc utime+stime over the run / requests), which compares the two configs' own cost.
Exit status 0 if the target is met without errors, 1 if not, 2 on a setup error or abort.
The client resolves app.example.test through /etc/netns/<client ns>/hosts (removed at exit).

Usage: python3 bench/dataplane.py [--runs 3] [--duration 5] [--threads 2] [--connections 32]
                                  [--body-bytes 1024] [--upload-mib 100] [--upload-runs 3]
                                  [--timeout 600] [--show-config]
Needs root and the e2e tools (see netlab.TOOLS) plus wrk. Not part of the test run.
Everything lives in namespaces it creates on 198.18.0.0/24 and 10.8.0.0/24; processes are
stopped by pid and namespaces deleted at the end, also on failure, Ctrl-C, SIGTERM or timeout.
"""

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from netlab import TOOLS, WorkloadOrigin, World, upload_speed, write_random_file  # noqa: E402

HOST = "app.example.test"
UPLOAD_HOST = "upload.example.test"
ORIGIN_PORT = 8090          # World's python services use 8080-8082 on the origins
UPLOAD_PORT = 8091
HAND_PORT = 8443
CLK_TCK = os.sysconf("SC_CLK_TCK")

# What a careful operator writes by hand for one site behind one origin, with the TLS settings
# of the Kokoa edge (Mozilla's intermediate suites).
CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"))
HAND_SERVER = """upstream origin {{
    server {address}:{port};
    keepalive 64;
}}
server {{
    listen {port_tls} ssl;
    server_name {host};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {ciphers};
    ssl_prefer_server_ciphers on;
    ssl_session_cache shared:hand:10m;
    ssl_session_timeout 1d;
    ssl_session_tickets off;
    location / {{
        proxy_pass http://origin;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }}
}}
"""


class AbortError(Exception):
    """SIGTERM or the global time limit."""


class BenchWorld(World):
    """netlab.World plus an nginx origin, a hand-written edge nginx and client name lookup."""

    def build_bench(self, body_bytes, upload_mib):
        self.build()
        origin_ip = self.origin_a["wg_ip"]
        self.body = ("kokoa dataplane bench " + "x" * body_bytes)[:body_bytes]
        docroot = self.dir / "origin-docroot"
        docroot.mkdir()
        (docroot / "index.html").write_text(self.body + "\n")
        self.origin_nginx = self.static_origin("nginx-origin", "origin-a", origin_ip,
                                               ORIGIN_PORT, docroot)
        self.client_resolves(HOST)
        self.route(HOST, self.origin_a, ORIGIN_PORT)
        run = self.agent_once()
        if f"certificate for {HOST} obtained" not in run.stdout:
            raise RuntimeError(f"agent did not obtain the certificate:\n{run.stdout}")
        self.client_until(HOST, self.body)
        live = self.dir / "letsencrypt/live" / HOST
        self.hand_nginx = self.extra_nginx_in("nginx-hand", "edge", HAND_SERVER.format(
            address=origin_ip, port=ORIGIN_PORT, port_tls=HAND_PORT, host=HOST, ciphers=CIPHERS,
            cert=live / "fullchain.pem", key=live / "privkey.pem"))
        self.edges = {"kokoa": self.nginx, "hand": self.hand_nginx}
        self.urls = {
            "kokoa": ("client", f"https://{HOST}/"),
            "hand": ("client", f"https://{HOST}:{HAND_PORT}/"),
            "direct": ("edge", f"http://{origin_ip}:{ORIGIN_PORT}/"),
        }
        for name, (host, url) in self.urls.items():
            body = self.lab.run(host, "curl", "-sSfk", "--max-time", "5", url).stdout.strip()
            if body != self.body:
                raise RuntimeError(f"{name}: {url} answered {body[:80]!r}")
        if upload_mib:
            self._upload_origin(origin_ip, upload_mib)
        return self

    def _upload_origin(self, origin_ip, upload_mib):
        """netlab's workload origin (it hashes what it receives) behind UPLOAD_HOST, and a
        file of `upload_mib` MiB of random bytes to send it."""
        self.workload = WorkloadOrigin(self.lab, "origin-a", origin_ip, UPLOAD_PORT, self.dir)
        self.workload.start()
        self.route(UPLOAD_HOST, self.origin_a, UPLOAD_PORT)
        run = self.agent_once()
        if f"certificate for {UPLOAD_HOST} obtained" not in run.stdout:
            raise RuntimeError(f"agent did not obtain the certificate:\n{run.stdout}")
        self.upload_file = self.dir / "upload.bin"
        write_random_file(self.upload_file, upload_mib << 20)
        self.upload_urls = {
            "edge h1": ("client", f"https://{UPLOAD_HOST}/upload", "--http1.1"),
            "edge h2": ("client", f"https://{UPLOAD_HOST}/upload", "--http2"),
            "direct": ("edge", f"{self.workload.url}/upload", "--http1.1"),
        }

    def upload(self, name):
        """MiB/s of one upload of upload_file by way of `name` (see upload_urls)."""
        host, url, version = self.upload_urls[name]
        result = self.lab.run(
            host, "curl", "-sS", "--max-time", "300", version, "--cacert", str(self.pebble.root),
            "--resolve", f"{UPLOAD_HOST}:443:{self.lab.address('edge')}",
            "-T", str(self.upload_file), "-w", "\n%{speed_upload}", url,
            check=False, timeout=320)
        answer, speed = upload_speed(result)
        if answer["bytes"] != self.upload_file.stat().st_size:
            raise RuntimeError(f"{name}: the origin received {answer['bytes']} bytes")
        return speed

    def stop_workload(self):
        if getattr(self, "workload", None) is not None:
            self.workload.stop()


def cpu_ticks(pids):
    """utime + stime (clock ticks) of the given processes, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def wrk(world, name, args, duration):
    """One wrk run for setup `name`: req/s, errors, non-2xx, origin connections, and the edge
    nginx workers' CPU time per request (µs; none for direct): robust to other load here."""
    host, url = world.urls[name]
    edge = world.edges.get(name)
    workers = edge.workers() if edge else set()
    before = world.accepted_connections(world.origin_a["wg_ip"], ORIGIN_PORT)
    ticks = cpu_ticks(workers)
    result = world.lab.run(host, "wrk", f"-t{args.threads}", f"-c{args.connections}",
                           f"-d{duration}s", "--timeout", "5s", url,
                           timeout=duration + 30)
    ticks = cpu_ticks(workers) - ticks
    accepts = (world.accepted_connections(world.origin_a["wg_ip"], ORIGIN_PORT)
               - before - 1)                            # minus the stub_status request itself
    out = result.stdout
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    if not rps or not requests:
        raise RuntimeError(f"wrk printed no Requests/sec for {name}:\n{out}{result.stderr}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    cpu_us = ticks * 1e6 / CLK_TCK / int(requests.group(1)) if edge else None
    return {"rps": float(rps.group(1)),
            "errors": sum(int(n) for n in errors.groups()) if errors else 0,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "accepts": accepts, "cpu_us": cpu_us}


def show_config(world):
    print("=== Kokoa edge config (generated by agent.sh) ===")
    for path in sorted(Path(world.agent_env["CONFIG_DIR"]).rglob("*.conf")):
        print(f"--- {path.relative_to(world.dir)}")
        print(path.read_text().rstrip())
    print(f"--- main: {world.nginx.conf_path.relative_to(world.dir)} (both edge nginx)")
    print(world.nginx.conf_path.read_text().rstrip())
    print("=== hand-written ===")
    print((world.hand_nginx.config_dir / "site.conf").read_text().rstrip())
    print()


LABELS = {
    "kokoa": "kokoa   client -> edge :443 (agent's config) -> wg -> origin",
    "hand": "hand    client -> edge :8443 (hand-written) -> wg -> origin",
    "direct": "direct  edge ns -> wg -> origin (no edge nginx)",
}


def measure(world, args):
    order = ["kokoa", "hand", "direct"]
    for name in order:                          # warm-up: TLS sessions, upstream keepalive
        wrk(world, name, args, 2)
    results = {name: [] for name in order}
    for round_ in range(args.runs):
        rotated = order[round_ % 3:] + order[:round_ % 3]
        for name in rotated:
            run = wrk(world, name, args, args.duration)
            results[name].append(run)
            cpu = f"{run['cpu_us']:6.1f}" if run["cpu_us"] is not None else "     -"
            print(f"  round {round_ + 1} {name:<6} {run['rps']:>8.0f} req/s"
                  f"  edge nginx CPU {cpu} us/req  errors {run['errors']}"
                  f"  non-2xx {run['non2xx']}  origin conns {run['accepts']}", flush=True)
    return results


def measure_uploads(world, args):
    """Interleaved uploads through the edge (HTTP/1.1 and HTTP/2) and directly over the
    tunnel; prints each and the ratios; True if edge / direct >= 0.8 for both."""
    order = list(world.upload_urls)
    speeds = {name: [] for name in order}
    for round_ in range(args.upload_runs):
        for name in order[round_ % 3:] + order[:round_ % 3]:
            speeds[name].append(world.upload(name))
            print(f"  upload round {round_ + 1} {name:<8} {speeds[name][-1]:7.1f} MiB/s",
                  flush=True)
    med = {name: statistics.median(runs) for name, runs in speeds.items()}
    print()
    print(f"upload of {args.upload_mib} MiB, {args.upload_runs} interleaved runs each "
          "(the origin hashes the body as it arrives)")
    ok = True
    for name in ("edge h1", "edge h2"):
        ratio = med[name] / med["direct"]
        ok = ok and ratio >= 0.8
        print(f"{name} / direct  {ratio:.3f}   ({med[name]:.1f} / {med['direct']:.1f} MiB/s; "
              f"target >= 0.8: {'OK' if ratio >= 0.8 else 'BELOW TARGET'})")
    return ok


def report(results, args):
    med = {name: statistics.median(r["rps"] for r in runs) for name, runs in results.items()}
    print()
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
          f"{args.runs} interleaved runs each, body {args.body_bytes} B, path /")
    print(f"{'setup':<60} {'median req/s':>12} {'nginx us/req':>12}  runs (req/s)")
    for name, runs in results.items():
        listed = " ".join(f"{r['rps']:.0f}" for r in runs)
        bad = sum(r["errors"] + r["non2xx"] for r in runs)
        flag = f"  ({bad} errors/non-2xx)" if bad else ""
        cpu = (f"{statistics.median(r['cpu_us'] for r in runs):12.1f}"
               if runs[0]["cpu_us"] is not None else f"{'-':>12}")
        print(f"{LABELS[name]:<60} {med[name]:>12.0f} {cpu}  {listed}{flag}")
    print()
    paired = statistics.median(k["rps"] / h["rps"]
                               for k, h in zip(results["kokoa"], results["hand"], strict=True))
    ratio = med["kokoa"] / med["hand"]
    cpu_ratio = (statistics.median(r["cpu_us"] for r in results["hand"])
                 / statistics.median(r["cpu_us"] for r in results["kokoa"]))
    verdict = "OK" if ratio >= 0.95 else "BELOW TARGET"
    print(f"kokoa / hand    {ratio:.3f}   (target >= 0.95: {verdict})")
    print(f"  same round    {paired:.3f}   (median of per-round ratios)")
    print(f"  nginx CPU     {cpu_ratio:.3f}   (hand us/req / kokoa us/req: 1 = same cost)")
    print(f"kokoa / direct  {med['kokoa'] / med['direct']:.3f}")
    print(f"hand / direct   {med['hand'] / med['direct']:.3f}")
    errors = any(r["errors"] or r["non2xx"] for runs in results.values() for r in runs)
    return ratio >= 0.95 and not errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--upload-mib", type=int, default=100,
                        help="size of the upload measured (0: no upload measurement)")
    parser.add_argument("--upload-runs", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600,
                        help="give up (and clean up) after this many seconds")
    parser.add_argument("--show-config", action="store_true")
    args = parser.parse_args()
    missing = [tool for tool in (*TOOLS, "wrk") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)}")

    def interrupt(signum, _frame):
        raise AbortError(f"signal {signal.Signals(signum).name}" if signum != signal.SIGALRM
                          else f"time limit of {args.timeout}s")
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(args.timeout)

    workdir = Path(tempfile.mkdtemp(prefix="kokoa-dataplane-", dir="/tmp"))
    workdir.chmod(0o755)                    # nginx workers (nobody) read the docroot
    world = None
    try:
        world = BenchWorld(workdir)
        print("building the world (control plane, edge, origins, tunnels, certificate)...",
              flush=True)
        world.build_bench(args.body_bytes, args.upload_mib)
        if args.show_config:
            show_config(world)
        ok = report(measure(world, args), args)
        if args.upload_mib:
            ok = measure_uploads(world, args) and ok
    except AbortError as exc:
        print(f"aborted: {type(exc).__name__}: {exc}", file=sys.stderr)
        ok = None
    except Exception:
        traceback.print_exc()
        ok = None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)        # a second Ctrl-C must not skip this
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if world is not None:
            world.stop_workload()
            world.close()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(2 if ok is None else 0 if ok else 1)


if __name__ == "__main__":
    main()
