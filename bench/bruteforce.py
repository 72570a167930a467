"""Password guessing against a protected route: how many guesses per second does nginx check?

Builds an edge as test_access.py does (a private nginx on loopback, agent.sh fed by the
control-plane double, an origin in a namespace), protects one route with a password, then runs
an attacker: --threads keep-alive HTTPS connections from one address, each sending requests with
a wrong password as fast as the edge answers, for --seconds. A 401 is a guess nginx checked; a
429 is one refused by the limit before any check. Prints, per second and in all, the guesses
checked and refused, and whether a second address still logs in meanwhile.

Usage: python bench/bruteforce.py [--threads 16] [--seconds 20]
Needs root (a network namespace for the origin). Every process started is stopped by pid.
"""

import argparse
import base64
import http.client
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from netlab import (  # noqa: E402
    Backend,
    BackendNet,
    ControlPlaneDouble,
    Edge,
    access_policy,
    make_payload,
    sha512_crypt,
)

HOST = "app.example.com"


CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CONTEXT.check_hostname = False
CONTEXT.verify_mode = ssl.CERT_NONE                  # the edge's fallback certificate


class EdgeConnection(http.client.HTTPSConnection):
    """HTTPS to the edge on 127.0.0.1 with SNI HOST."""

    def connect(self):
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = CONTEXT.wrap_socket(raw, server_hostname=HOST)


def attacker(port, deadline, results, lock):
    """Guess over one keep-alive connection until `deadline`; count codes per second."""
    guess = 0
    conn = None
    while time.monotonic() < deadline:
        if conn is None:
            conn = EdgeConnection(HOST, port, timeout=10)
        guess += 1
        token = base64.b64encode(f"alice:guess-{guess}".encode()).decode()
        try:
            conn.request("GET", "/", headers={"Authorization": "Basic " + token})
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = None
            continue
        with lock:
            results[int(time.monotonic())][response.status] += 1
        if response.getheader("Connection", "").lower() == "close":
            conn.close()
            conn = None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="kokoa-bruteforce-", dir="/tmp"))
    root.chmod(0o755)
    net = BackendNet().start()
    origin = Backend("origin", net)
    double = ControlPlaneDouble()
    edge = Edge(root, double.url)
    edge.nginx.start()
    try:
        policy = access_policy(users=[("alice", sha512_crypt("the right password"))])
        double.payload = make_payload({HOST: {"upstream": origin.addr, "max_body_size": 0,
                                              "buffering": True, "hsts": True,
                                              "access": policy}}, schema=2)
        edge.once()
        results = defaultdict(Counter)
        lock = threading.Lock()
        start = time.monotonic()
        threads = [threading.Thread(target=attacker, args=(edge.https_port,
                                                           start + args.seconds, results, lock))
                   for _ in range(args.threads)]
        for thread in threads:
            thread.start()
        time.sleep(args.seconds / 2)
        legit = edge.get(HOST, "/", tls=True, extra=["--interface", "127.0.0.9", "-u",
                                                     "alice:the right password"])[0]
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        total = Counter()
        print("second  checked(401)  refused(429)  other")
        for second in range(int(start), max(results) + 1):
            counts = results[second]
            total.update(counts)
            other = sum(v for k, v in counts.items() if k not in (401, 429))
            print(f"{second - int(start):6d}  {counts[401]:12d}  {counts[429]:12d}  {other:5d}")
        print(f"in all: {total[401]} guesses checked, {total[429]} refused with 429 in "
              f"{elapsed:.1f} s by {args.threads} connections: {total[401] / elapsed:.1f} "
              f"checked guesses/s ({(total[401] + total[429]) / elapsed:.0f} requests/s)")
        print(f"another address logging in meanwhile: HTTP {legit}")
    finally:
        edge.nginx.stop()
        double.close()
        origin.close()
        net.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
