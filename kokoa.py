"""Kokoa control plane: desired state for a fleet of nginx + WireGuard edges.

Edges pull their config (an nginx `map $host`, the hostnames to certify, the WireGuard peers)
from this WSGI app with a bearer token; operators manage origins and routes through the JSON
API and the static web UI. The control plane is never in the data path.

Usage:
    python3 kokoa.py init                  write kokoa.env with fresh secrets (never overwrites)
    python3 kokoa.py serve [--listen HOST:PORT] [--db PATH] [--env-file FILE]
    python3 kokoa.py migrate [--db PATH]   create or upgrade the database schema
    python3 kokoa.py backup PATH           consistent online copy of the database
    python3 kokoa.py restore PATH          replace the database with a backup (--force)
    python3 kokoa.py rotate-key            re-encrypt secrets from the old key to the current one

Environment (real variables win over kokoa.env):
    KOKOA_DB                      database path (default ./kokoa.db)
    KOKOA_LISTEN                  HOST:PORT to serve on (default 127.0.0.1:8080)
    KOKOA_LOG_LEVEL               DEBUG, INFO (default), WARNING, ERROR
    WIREGUARD_KEY_ENC_SECRET      32-byte key (64 hex, or base64) encrypting WireGuard keys
    WIREGUARD_KEY_ENC_SECRET_OLD  the previous key, read by rotate-key (and to read old rows)
    KOKOA_BOOTSTRAP_TOKEN         token with which edges register
    KOKOA_ADMIN_USER              admin user name for HTTP Basic and the login (default admin)
    KOKOA_ADMIN_PASSWORD          admin password; unset or empty: admin API on loopback only
    KOKOA_WG_NETWORK              the tunnel network (CIDR) every wg_ip lies in; addresses are
                                  assigned from it (unset: private addresses only)
    KOKOA_TRUSTED_PROXY           address of a reverse proxy in front of serve: its last
                                  X-Forwarded-For entry becomes the client address
    KOKOA_ALERT_RETRY_DELAYS      s before each retry of an alert webhook (default 1,5,25)
    KOKOA_ALERT_TIMEOUT           s an alert webhook may take to connect and per read (5)
    KOKOA_CERT_CLAIM_SECONDS      how long an edge's claim to issue a certificate lasts (900)
    KOKOA_CERT_BACKOFF_SECONDS    the fleet's first wait after a failed issuance (300), doubling
    KOKOA_CERT_RENEW_BEFORE_SECONDS  renew this long before a certificate expires (30 days)
    KOKOA_DNS_*, CLOUDFLARE_*     the DNS provider of dns.py, for DNS-01 (wildcard routes)
"""

__version__ = "0.2.0"

import argparse
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import heapq
import hmac
import http.client
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import shlex
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("kokoa")


# Configuration & constants ###################################################################

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_DB = "kokoa.db"
DEFAULT_ENV_FILE = "kokoa.env"
MAX_BODY_BYTES = 1024 * 1024
STATIC_DIR = Path(__file__).resolve().parent / "static"
AUTH_FAILURE_LIMIT = 10           # failed attempts per client address (IPv6: per /64) ...
AUTH_FAILURE_WINDOW = 60.0        # ... per this many seconds, counted per credential kind
ADMIN_SLOWDOWN_FAILURES = 30      # this many admin failures in the window from anywhere ...
ADMIN_SLOWDOWN_INTERVAL = 1.0     # ... and admin logins are tried at most once a second
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
FORWARDING_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
LAST_SEEN_FLUSH_SECONDS = 30.0    # how stale the stored last_seen of an edge may get
TOKEN_CACHE_SECONDS = 60.0
EDGE_STALE_SECONDS = 300.0        # an edge that has not polled for this long is stale
# Idle connections each nginx worker keeps per upstream. Schema 2 keeps as many as one HTTP/2
# client may have streams at once (nginx's http2_max_concurrent_streams), so that a browser's
# burst reuses its tunnel connections; schema 1's map stays as 0.1.0 rendered it.
UPSTREAM_KEEPALIVE = {1: 32, 2: 128, 3: 128}
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")
LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
DEFAULT_SETTINGS = {"acme_staging": False}
# Python's idna codec is IDNA2003: it maps these to other letters where browsers (UTS #46,
# non-transitional) keep them, so the name would be another domain. (The other two
# deviations, ZWJ and ZWNJ, are format characters: check_text refuses them.)
IDNA_DEVIATIONS = {"\u00df": "ß (sharp s)", "\u03c2": "ς (final sigma)"}
CERT_STATUSES = ("valid", "pending", "failed")
DEFAULT_WG_NETWORK = "10.8.0.0/24"
# Without KOKOA_WG_NETWORK (an install from before 0.2), wg_ip must be one of these.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(net) for net in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))
SCHEMAS = (1, 2, 3)               # edge payload schemas this control plane can send
NGINX_MAP_GENERATOR = "kokoa 0.1.0"   # the map grammar, not the release: an upgrade of the
                                      # control plane must not change every edge's payload
VERSION_RE = re.compile(r"[0-9]{1,4}(\.[0-9]{1,4}){0,3}([.+-][A-Za-z0-9.+-]{0,40})?")
AGENT_HEADER_RE = re.compile(
    r"\s*(?P<version>[A-Za-z0-9.+-]{1,60})\s*;\s*schema\s*=\s*"
    r"(?P<schemas>[0-9]{1,4}(\s*,\s*[0-9]{1,4}){0,31})\s*")
# Access policies (issue 14): the patterns both sides check, before anything reaches a file.
USERNAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
# nginx checks a password on every request, in the worker, so the cost of a hash is capped:
# rounds=100000 of SHA-512-crypt or bcrypt cost 12 is already a quarter-second or so per request.
SHA512_CRYPT_RE = re.compile(r"\$6\$(rounds=([1-9][0-9]{3,4}|100000)\$)?[./0-9A-Za-z]{1,16}"
                             r"\$[./0-9A-Za-z]{86}")
BCRYPT_RE = re.compile(r"\$2[by]\$(0[4-9]|1[0-2])\$[./0-9A-Za-z]{53}")
URI_PATH_RE = re.compile(r"/[A-Za-z0-9._~/-]{0,200}")
SIGNIN_URL_RE = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]{1,253})(?P<port>:[0-9]{1,5})?"
    r"(?P<rest>[/?][A-Za-z0-9._~/?=&%:+-]*)?", re.IGNORECASE)
POLICY_LIST_LIMITS = {"users": 100, "allow": 256, "deny": 256, "bypass_paths": 32}
PASSWORD_MIN_LENGTH = 8
PASSWORD_MAX_LENGTH = 1024
PASSWORD_MAX_BYTES = 511            # crypt(3) of the edges (libxcrypt) refuses longer passphrases
SHA512_CRYPT_ROUNDS = 5000
# Health and alerts (issue 16)
DEFAULT_POLL_INTERVAL = 30        # s between an edge's polls, when its agent never said
STALE_POLLS, OFFLINE_POLLS = 3, 10      # an edge that missed this many polls is stale, offline
STALE_MIN_SECONDS, OFFLINE_MIN_SECONDS = 10, 30     # ... but never sooner (a run takes time)
CERT_EXPIRING_DAYS = 14
HANDSHAKE_OLD_SECONDS = 180       # WireGuard's REJECT_AFTER_TIME: older, the tunnel is down
ERROR_RATE_MIN_REQUESTS = 10      # at least this many requests in a report, and ...
ERROR_RATE_DEGRADED = 0.05        # ... this share of 5xx / upstream errors: degraded
HEALTH_LIMITS = {"origins": 1024, "hosts": 10000, "ports": 64}
ALERT_EVENTS = ("edge_offline", "edge_apply_failed", "certificate_failing",
                "certificate_expiring", "origin_down", "site_down")
ALERT_FORMATS = ("json", "slack", "discord", "ntfy")
ALERT_DELIVERIES_KEPT = 200       # per target
ALERT_QUEUE_SIZE = 1000
ALERT_RETRY_DELAYS = (1.0, 5.0, 25.0)   # s before each retry (KOKOA_ALERT_RETRY_DELAYS)
ALERT_TIMEOUT = 5.0               # s to connect, and per read (KOKOA_ALERT_TIMEOUT)
HEALTH_TICK_SECONDS = 5.0         # the health evaluator runs at least this often
CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Admin sessions (issue 16): the UI's login. Only the SHA-256 of a cookie is stored.
SESSION_IDLE_SECONDS = 12 * 3600
SESSION_MAX_SECONDS = 7 * 86400
SESSION_LIMIT = 32                # sessions at once; a login past it ends the least recently used
SESSION_TOUCH_SECONDS = 60.0      # how stale a session's stored last use may get
SESSION_COOKIE = "kokoa_session"                  # over plain http on loopback
SESSION_COOKIE_SECURE = "__Host-kokoa_session"    # everywhere else: Secure, so the __Host- prefix
SESSION_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclasses.dataclass
class Config:
    """Everything the WSGI app needs, resolved from the environment by the CLI."""

    db_path: str
    keyring: "Keyring"
    bootstrap_token: str = ""
    admin_user: str = "admin"
    admin_password: str = ""
    wg_network: object = None   # ipaddress.ip_network or None
    trusted_proxy: object = None    # ipaddress.ip_address of the reverse proxy, or None
    public_url: str = ""        # KOKOA_PUBLIC_URL as given (normalised), or ""
    public_host: str = ""       # its host, as a Host header names it (lower case, [v6])
    alert_retry_delays: tuple = ALERT_RETRY_DELAYS
    alert_timeout: float = ALERT_TIMEOUT
    health_tick: float = HEALTH_TICK_SECONDS
    cert_claim_seconds: int = 900           # fleet certificates (issue 15): a claim's life,
    cert_backoff_seconds: int = 300         # the first wait after a failure (doubling),
    cert_renew_before: int = 30 * 86400     # and when before not_after renewal is due
    dns_settings: dict = dataclasses.field(default_factory=dict)    # KOKOA_DNS_*, for DNS-01


def read_env_file(path):
    """Parse KEY=VALUE lines (# comments, blank lines, optional surrounding quotes)."""
    values = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def decode_key(text):
    """Decode a 32-byte key from 64 hex characters, else standard or url-safe base64."""
    text = (text or "").strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    padded = text + "=" * (-len(text) % 4)
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            return raw
    raise ValueError("must be 32 bytes: 64 hex characters or base64")


def parse_public_url(text):
    """KOKOA_PUBLIC_URL -> (the URL normalised, its host as a Host header names it)."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username \
            or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError("must be http(s)://HOST[:PORT] without a path, e.g. "
                         "https://kokoa.example.com")
    parts.port                       # noqa: B018 -- raises ValueError for a bad port
    host = parts.hostname.rstrip(".")
    if ":" in host:
        host = f"[{ipaddress.ip_address(host.split('%')[0])}]"
    elif not all(LABEL_RE.fullmatch(label) for label in host.split(".")):
        raise ValueError(f"{host!r} is not a host name")
    return f"{parts.scheme}://{parts.netloc.lower()}", host


def parse_listen(text):
    """Split HOST:PORT (or [v6]:PORT) into (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"--listen must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


# Errors ######################################################################################

class HTTPError(Exception):
    """An error answered as a JSON envelope: {"error": {"code", "message", "field"?}}."""

    def __init__(self, status, code, message, field=None, headers=None, fields=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or []
        self.fields = fields        # every field at fault: [{"field", "message"}], first = field

    def body(self):
        """The JSON envelope as a dict."""
        error = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.fields:
            error["fields"] = self.fields
        return {"error": error}


def invalid(field, message):
    """A 400 invalid_field error naming `field`."""
    return HTTPError(400, "invalid_field", message, field=field)


def conflict(field, message):
    """A 409 conflict error naming `field`."""
    return HTTPError(409, "conflict", message, field=field)


def gather(errors, check, *args):
    """check(*args); if it raises a 400 naming a field, None and the error added to `errors`,
    so that a form hears of every field at fault at once (raise_gathered answers them)."""
    try:
        return check(*args)
    except HTTPError as err:
        if err.status != 400 or err.field is None:
            raise
        errors.append(err)
        return None


def gather_required(errors, body, field, check, *args):
    """gather() of check(body[field], *args), or "field is required" when it is absent."""
    if body.get(field) is None:
        errors.append(invalid(field, f"{field} is required"))
        return None
    return gather(errors, check, body[field], *args)


def raise_gathered(errors):
    """One 400 for every gathered error: `field` and `message` the first's, `fields` all."""
    if errors:
        first = errors[0]
        raise HTTPError(400, first.code, first.message, field=first.field,
                        fields=[{"field": err.field, "message": err.message} for err in errors])


def not_found(what="resource"):
    """A 404 not_found error."""
    return HTTPError(404, "not_found", f"{what} not found")


class SecretError(Exception):
    """A stored secret could not be decrypted (wrong key, tampered or swapped blob)."""


# Utilities ###################################################################################

def iso_time(unix_time):
    """A Unix time as UTC ISO 8601 with a Z suffix, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_time))


def parse_iso_time(text):
    """Unix time of an ISO 8601 UTC time written by iso_time()."""
    parsed = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return parsed.replace(tzinfo=datetime.timezone.utc).timestamp()


def utc_now():
    """The current UTC time as ISO 8601 with a Z suffix, to the second."""
    return iso_time(time.time())


def new_id():
    """A fresh UUIDv4 string."""
    return str(uuid.uuid4())


def canonical_json(value):
    """Canonical JSON bytes: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_hex(data):
    """Hex SHA-256 of bytes or str."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")    # a client's lone surrogate is no 500
    return hashlib.sha256(data).hexdigest()


def next_power_of_two(n):
    """The smallest power of two >= n (and >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


class RateLimiter:
    """Counts failures per key in a sliding window; over the limit, answers 429."""

    def __init__(self, limit=AUTH_FAILURE_LIMIT, window=AUTH_FAILURE_WINDOW, max_keys=10000):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(self, key):
        """Raise a 429 HTTPError if `key` has used up its failures in the window."""
        with self._lock:
            times = self._prune(key, time.monotonic())
            if times is not None and len(times) >= self.limit:
                retry = max(1, int(times[0] + self.window - time.monotonic()) + 1)
                raise HTTPError(429, "too_many_requests",
                                "too many failed attempts; try again later",
                                headers=[("Retry-After", str(retry))])

    def fail(self, key):
        """Record one failed attempt by `key`."""
        with self._lock:
            now = time.monotonic()
            times = self._prune(key, now)
            if times is None:
                times = self._failures[key] = collections.deque()
            times.append(now)
            self._failures.move_to_end(key)
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)

    def _prune(self, key, now):
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times


# Crypto (tokens, secrets) ####################################################################

SECRET_BLOB_VERSION = 1
NONCE_BYTES = 12
KEY_ID_BYTES = 4


def rate_key(address):
    """What failures are counted against: the address, an IPv6 client's whole /64 (one
    subscriber gets at least that many addresses), an IPv4-mapped address as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class FailureSlowdown:
    """Across every address: past `threshold` failures in `window` seconds, one attempt per
    `interval` (429 otherwise), so that many addresses (an IPv6 block, a botnet, a proxy that
    passes a client's X-Forwarded-For through) buy no more guesses than one."""

    def __init__(self, threshold=ADMIN_SLOWDOWN_FAILURES, window=AUTH_FAILURE_WINDOW,
                 interval=ADMIN_SLOWDOWN_INTERVAL):
        self.window = window
        self.interval = interval
        self._failures = collections.deque(maxlen=threshold)
        self._last_attempt = -math.inf
        self._lock = threading.Lock()

    def check(self):
        """Raise a 429 HTTPError if the slow-down is on and an attempt came too recently."""
        with self._lock:
            now = time.monotonic()
            while self._failures and self._failures[0] <= now - self.window:
                self._failures.popleft()
            if len(self._failures) == self._failures.maxlen:
                if now - self._last_attempt < self.interval:
                    raise HTTPError(429, "too_many_requests",
                                    "too many failed logins from everywhere; slowed down to one "
                                    "attempt a second", headers=[("Retry-After", "1")])
                self._last_attempt = now

    def fail(self):
        """Record one failure."""
        with self._lock:
            self._failures.append(time.monotonic())


def hash_token(token):
    """SHA-256 hex of a high-entropy token: what is stored instead of the token."""
    return sha256_hex(token)


def new_token():
    """A fresh node token: 32 random bytes, url-safe base64."""
    return secrets.token_urlsafe(32)


def tokens_equal(given, expected):
    """Constant-time comparison of two secrets of any length."""
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    expected_digest = hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(given_digest, expected_digest)


def key_id(key):
    """A short public identifier of an encryption key, stored beside each blob."""
    return hashlib.sha256(b"kokoa-key-id:" + key).digest()[:KEY_ID_BYTES]


def seal(key, plaintext, aad):
    """Encrypt: version byte | key id | 96-bit random nonce | AES-256-GCM ciphertext+tag."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
    return bytes([SECRET_BLOB_VERSION]) + key_id(key) + nonce + sealed


def unseal(keys, blob, aad):
    """Decrypt a blob from seal() with whichever of `keys` it names; SecretError otherwise."""
    header = 1 + KEY_ID_BYTES + NONCE_BYTES
    if len(blob) < header + 16 or blob[0] != SECRET_BLOB_VERSION:
        raise SecretError("unknown secret format")
    wanted = blob[1:1 + KEY_ID_BYTES]
    key = next((k for k in keys if hmac.compare_digest(key_id(k), wanted)), None)
    if key is None:
        raise SecretError("secret was sealed with a key that is not configured")
    try:
        return AESGCM(key).decrypt(blob[1 + KEY_ID_BYTES:header], blob[header:], aad)
    except InvalidTag:
        raise SecretError("secret failed authentication (tampered or moved)") from None


class Keyring:
    """Local AES-GCM keys: seals with the current key, opens with current or old ones.

    This is the seam a KMS would replace: anything with seal(), unseal() and is_current().
    """

    def __init__(self, current, old=()):
        self.current = current
        self.keys = [current, *old]

    def seal(self, plaintext, aad):
        """Encrypt `plaintext` bound to `aad` with the current key."""
        return seal(self.current, plaintext, aad)

    def unseal(self, blob, aad):
        """Decrypt a blob; raises SecretError if no configured key opens it."""
        return unseal(self.keys, blob, aad)

    def is_current(self, blob):
        """True if `blob` was sealed with the current key."""
        return blob[1:1 + KEY_ID_BYTES] == key_id(self.current)


def secret_aad(table, row_id, column):
    """Associated data binding a secret to its row, so blobs cannot be swapped between rows."""
    return f"kokoa:{table}:{row_id}:{column}".encode()


def wg_public_from_private(private_raw):
    """The X25519 (WireGuard) public key of a 32-byte private key."""
    public_key = X25519PrivateKey.from_private_bytes(private_raw).public_key()
    return public_key.public_bytes(serialization.Encoding.Raw,
                                  serialization.PublicFormat.Raw)


def wg_generate_private():
    """A fresh, clamped X25519 private key (as `wg genkey` makes)."""
    raw = bytearray(X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption()))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def b64(raw):
    """Standard base64 text of bytes."""
    return base64.b64encode(raw).decode("ascii")


def repeat_to(data, length):
    """`data` repeated and cut to exactly `length` bytes."""
    return (data * (length // len(data) + 1))[:length]


def crypt_b64(b2, b1, b0, count):
    """crypt's base64 of three bytes (the least significant six bits first), `count` chars."""
    word = (b2 << 16) | (b1 << 8) | b0
    return "".join(CRYPT_ALPHABET[(word >> (6 * i)) & 0x3f] for i in range(count))


def sha512_crypt(password, salt=None, rounds=None):
    """SHA-512-crypt ($6$) of a password: Ulrich Drepper's published algorithm, as crypt(3)
    and `openssl passwd -6` compute it. A fresh 16-character salt unless one is given; rounds
    (clamped to 1000-999999999) are written into the hash only when they are given."""
    key = password.encode("utf-8")
    if salt is None:
        salt = "".join(secrets.choice(CRYPT_ALPHABET) for _ in range(16))
    salt = salt[:16]
    salt_bytes = salt.encode("ascii")
    count = SHA512_CRYPT_ROUNDS if rounds is None else min(max(rounds, 1000), 999999999)
    alternate = hashlib.sha512(key + salt_bytes + key).digest()
    digest_a = hashlib.sha512(key + salt_bytes + repeat_to(alternate, len(key)))
    length = len(key)
    while length:
        digest_a.update(alternate if length & 1 else key)
        length >>= 1
    digest = digest_a.digest()
    p_bytes = repeat_to(hashlib.sha512(key * len(key)).digest(), len(key))
    s_bytes = repeat_to(hashlib.sha512(salt_bytes * (16 + digest[0])).digest(), len(salt_bytes))
    for i in range(count):
        step = hashlib.sha512(p_bytes if i & 1 else digest)
        if i % 3:
            step.update(s_bytes)
        if i % 7:
            step.update(p_bytes)
        step.update(digest if i & 1 else p_bytes)
        digest = step.digest()
    text = []
    for i in range(21):
        triple = (digest[i], digest[i + 21], digest[i + 42])
        text.append(crypt_b64(*triple[i % 3:], *triple[:i % 3], 4))
    text.append(crypt_b64(0, 0, digest[63], 2))
    prefix = "$6$" if rounds is None else f"$6$rounds={count}$"
    return f"{prefix}{salt}${''.join(text)}"


# Database (connect, migrations, queries) #####################################################

NOW_SQL = "(strftime('%Y-%m-%dT%H:%M:%SZ','now'))"


def _wg_ip_guard(table, other, event):
    """A trigger keeping wg_ip unique across origins and edge_nodes."""
    return f"""
        CREATE TRIGGER {table}_wg_ip_unique_{event.lower()}
        BEFORE {event} ON {table}
        WHEN NEW.wg_ip IS NOT NULL
         AND EXISTS (SELECT 1 FROM {other} WHERE wg_ip = NEW.wg_ip)
        BEGIN
            SELECT RAISE(ABORT, 'UNIQUE constraint failed: {table}.wg_ip');
        END"""


# Append-only: version = index + 1. Never edit a shipped entry; add a new one.
MIGRATIONS = [
    [
        f"""
        CREATE TABLE origins (
            id                 TEXT PRIMARY KEY CHECK (length(id) = 36),
            name               TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            name_key           TEXT NOT NULL UNIQUE,
            wg_ip              TEXT NOT NULL UNIQUE,
            wg_public_key      TEXT NOT NULL UNIQUE CHECK (length(wg_public_key) = 44),
            wg_private_key_enc BLOB,
            wg_endpoint        TEXT,
            created_at         TEXT NOT NULL DEFAULT {NOW_SQL}
        )""",
        f"""
        CREATE TABLE routes (
            id          TEXT PRIMARY KEY CHECK (length(id) = 36),
            hostname    TEXT NOT NULL UNIQUE CHECK (length(hostname) BETWEEN 1 AND 253),
            origin_id   TEXT NOT NULL REFERENCES origins (id) ON DELETE RESTRICT,
            target_port INTEGER NOT NULL
                        CHECK (typeof(target_port) = 'integer'
                               AND target_port BETWEEN 1 AND 65535),
            created_at  TEXT NOT NULL DEFAULT {NOW_SQL}
        )""",
        "CREATE INDEX routes_origin_id ON routes (origin_id)",
        f"""
        CREATE TABLE edge_nodes (
            id             TEXT PRIMARY KEY CHECK (length(id) = 36),
            name           TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            name_key       TEXT NOT NULL UNIQUE,
            token_hash     TEXT NOT NULL UNIQUE CHECK (length(token_hash) = 64),
            wg_ip          TEXT UNIQUE,
            wg_public_key  TEXT UNIQUE,
            wg_endpoint    TEXT,
            created_at     TEXT NOT NULL DEFAULT {NOW_SQL},
            last_seen      TEXT,
            applied_hash   TEXT,
            status_ok      INTEGER,
            last_error     TEXT,
            last_status_at TEXT,
            certificates   TEXT NOT NULL DEFAULT '{{}}'
        )""",
        """
        CREATE TABLE settings (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        _wg_ip_guard("origins", "edge_nodes", "INSERT"),
        _wg_ip_guard("origins", "edge_nodes", "UPDATE"),
        _wg_ip_guard("edge_nodes", "origins", "INSERT"),
        _wg_ip_guard("edge_nodes", "origins", "UPDATE"),
    ],
    [
        f"""
        CREATE TABLE enrollment_keys (
            id           TEXT PRIMARY KEY CHECK (length(id) = 36),
            key_hash     TEXT NOT NULL UNIQUE CHECK (length(key_hash) = 64),
            description  TEXT NOT NULL DEFAULT '',
            created_at   TEXT NOT NULL DEFAULT {NOW_SQL},
            expires_at   TEXT NOT NULL,
            uses_left    INTEGER NOT NULL CHECK (uses_left >= 0),
            last_used_at TEXT
        )""",
    ],
    [
        "ALTER TABLE edge_nodes ADD COLUMN agent_version TEXT",
        "ALTER TABLE edge_nodes ADD COLUMN agent_schema INTEGER",
    ],
    [
        # An origin's own token: reads only its wireguard.conf (install-origin.sh's timer).
        "ALTER TABLE origins ADD COLUMN token_hash TEXT "
        "CHECK (token_hash IS NULL OR length(token_hash) = 64)",
        "CREATE UNIQUE INDEX origins_token_hash ON origins (token_hash)",
    ],
    [
        # Route options (DESIGN v2): body limit in MiB (0: none), response buffering, HSTS,
        # and a switch that keeps a route without serving it.
        "ALTER TABLE routes ADD COLUMN max_body_size INTEGER NOT NULL DEFAULT 0 "
        "CHECK (typeof(max_body_size) = 'integer' AND max_body_size BETWEEN 0 AND 1048576)",
        "ALTER TABLE routes ADD COLUMN buffering INTEGER NOT NULL DEFAULT 1 "
        "CHECK (buffering IN (0, 1))",
        "ALTER TABLE routes ADD COLUMN hsts INTEGER NOT NULL DEFAULT 1 CHECK (hsts IN (0, 1))",
        "ALTER TABLE routes ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1 "
        "CHECK (enabled IN (0, 1))",
    ],
    [
        # Access policies (issue 14). The lists are JSON arrays in the form the payload
        # carries them (users: [{"username", "hash"}] sorted by username; the others sorted,
        # deduplicated); forward_auth is its own columns, so that its origin cannot be deleted.
        f"""
        CREATE TABLE access_policies (
            id                 TEXT PRIMARY KEY CHECK (length(id) = 36),
            name               TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            name_key           TEXT NOT NULL UNIQUE,
            users              TEXT NOT NULL DEFAULT '[]',
            allow              TEXT NOT NULL DEFAULT '[]',
            deny               TEXT NOT NULL DEFAULT '[]',
            require            TEXT NOT NULL DEFAULT 'any' CHECK (require IN ('any', 'all')),
            bypass_paths       TEXT NOT NULL DEFAULT '[]',
            forward_origin_id  TEXT REFERENCES origins (id) ON DELETE RESTRICT,
            forward_port       INTEGER CHECK (forward_port IS NULL
                                              OR (typeof(forward_port) = 'integer'
                                                  AND forward_port BETWEEN 1 AND 65535)),
            forward_path       TEXT,
            forward_signin_url TEXT,
            pass_authorization INTEGER NOT NULL DEFAULT 0 CHECK (pass_authorization IN (0, 1)),
            created_at         TEXT NOT NULL DEFAULT {NOW_SQL},
            updated_at         TEXT NOT NULL DEFAULT {NOW_SQL},
            CHECK ((forward_origin_id IS NULL) = (forward_port IS NULL)
                   AND (forward_port IS NULL) = (forward_path IS NULL)
                   AND (forward_signin_url IS NULL OR forward_path IS NOT NULL))
        )""",
        "CREATE INDEX access_policies_forward_origin_id ON access_policies (forward_origin_id)",
        "ALTER TABLE routes ADD COLUMN access_policy_id TEXT "
        "REFERENCES access_policies (id) ON DELETE RESTRICT",
        "CREATE INDEX routes_access_policy_id ON routes (access_policy_id)",
    ],
    [
        # Admin sessions (issue 16): a cookie is stored only as its SHA-256; password_mac, a
        # keyed MAC of the admin credentials it was opened with, ends it when they change.
        f"""
        CREATE TABLE admin_sessions (
            id           TEXT PRIMARY KEY CHECK (length(id) = 36),
            token_hash   TEXT NOT NULL UNIQUE CHECK (length(token_hash) = 64),
            password_mac TEXT NOT NULL CHECK (length(password_mac) = 64),
            created_at   TEXT NOT NULL DEFAULT {NOW_SQL},
            last_used_at TEXT NOT NULL DEFAULT {NOW_SQL}
        )""",
    ],
    [
        # Health and alerts (issue 16): an edge's last measurements (JSON {"interval_s",
        # "origins", "hosts"}, NULL when its agent sends none), webhook targets (the URL
        # sealed with the keyring), their deliveries (the last ALERT_DELIVERIES_KEPT each), and
        # the alert conditions that hold now (so that a change is sent once, also over restarts).
        "ALTER TABLE edge_nodes ADD COLUMN health TEXT",
        "ALTER TABLE edge_nodes ADD COLUMN health_at TEXT",
        f"""
        CREATE TABLE alert_targets (
            id          TEXT PRIMARY KEY CHECK (length(id) = 36),
            name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
            name_key    TEXT NOT NULL UNIQUE,
            url_enc     BLOB NOT NULL,
            url_display TEXT NOT NULL,
            format      TEXT NOT NULL CHECK (format IN ('json', 'slack', 'discord', 'ntfy')),
            events      TEXT NOT NULL,
            created_at  TEXT NOT NULL DEFAULT {NOW_SQL},
            updated_at  TEXT NOT NULL DEFAULT {NOW_SQL}
        )""",
        f"""
        CREATE TABLE alert_deliveries (
            id              TEXT PRIMARY KEY CHECK (length(id) = 36),
            target_id       TEXT NOT NULL REFERENCES alert_targets (id) ON DELETE CASCADE,
            event           TEXT NOT NULL,
            state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
            status_code     INTEGER,
            attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            created_at      TEXT NOT NULL DEFAULT {NOW_SQL},
            last_attempt_at TEXT,
            error           TEXT,
            resolved        INTEGER NOT NULL DEFAULT 0 CHECK (resolved IN (0, 1)),
            subject         TEXT NOT NULL,
            message         TEXT NOT NULL
        )""",
        "CREATE INDEX alert_deliveries_target ON alert_deliveries (target_id, created_at)",
        """
        CREATE TABLE alert_conditions (
            key     TEXT PRIMARY KEY,
            event   TEXT NOT NULL,
            subject TEXT NOT NULL,
            message TEXT NOT NULL,
            since   TEXT NOT NULL
        )""",
    ],
    [
        # Certificates shared by the fleet (issue 15): one row per name, issued by one edge
        # and served by all. The private key is sealed with the keyring (AAD: the name); a
        # claim names the edge that issues now and until when; failures and next_attempt_at
        # are the fleet's back-off for the name, last_error says why in words.
        f"""
        CREATE TABLE certificates (
            name             TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 253),
            fullchain        TEXT CHECK (fullchain IS NULL OR length(fullchain) <= 65536),
            privkey_enc      BLOB,
            not_after        TEXT,
            issuer_edge_id   TEXT REFERENCES edge_nodes (id) ON DELETE SET NULL,
            issuer_edge_name TEXT,
            issued_at        TEXT,
            claim_edge_id    TEXT REFERENCES edge_nodes (id) ON DELETE SET NULL,
            claim_until      TEXT,
            failures         INTEGER NOT NULL DEFAULT 0
                             CHECK (typeof(failures) = 'integer' AND failures >= 0),
            next_attempt_at  TEXT,
            last_error       TEXT,
            updated_at       TEXT NOT NULL DEFAULT {NOW_SQL},
            CHECK ((fullchain IS NULL) = (privkey_enc IS NULL)
                   AND (fullchain IS NULL) = (not_after IS NULL))
        )""",
        "CREATE INDEX certificates_issuer_edge_id ON certificates (issuer_edge_id)",
        "CREATE INDEX certificates_claim_edge_id ON certificates (claim_edge_id)",
    ],
]


def quote_identifier(name):
    """Quote an SQL identifier taken from code constants."""
    return '"' + name.replace('"', '""') + '"'


STORAGE_ERRORS = ("SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_FULL")


def connect(path):
    """Open a connection: autocommit mode, foreign keys, busy timeout, WAL, durable commits.

    If the storage refuses writes (read-only filesystem, full disk), WAL cannot even be read:
    fall back to a read-only connection so that reads keep working and writes fail.
    """
    if path != ":memory:" and not os.path.exists(path):
        create_private_file(path, exist_ok=True)   # SQLite gives -wal and -shm its mode
    db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA busy_timeout = 5000")
        if path != ":memory:":
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
    except sqlite3.OperationalError as err:
        db.close()
        if path == ":memory:" or not getattr(err, "sqlite_errorname", "").startswith(
                STORAGE_ERRORS) or not Path(path).is_file():
            raise
        return connect_read_only(path)
    return db


def connect_read_only(path):
    """A read-only connection that needs no lock or -shm file (which full or read-only storage
    cannot give); used only while the storage refuses writes, so the file cannot change."""
    uri = Path(path).resolve().as_uri() + "?mode=ro&immutable=1"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA foreign_keys = ON")
    return db


@contextlib.contextmanager
def transaction(db):
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def schema_version(db):
    """The database's PRAGMA user_version."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    return version


def migrate(db, migrations=None):
    """Apply every pending migration in one transaction, so a failure leaves the file as it was.

    Each migration's statements run with its user_version bump; a database newer than the
    code is refused with RuntimeError.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    with transaction(db):
        current = schema_version(db)
        if current > len(migrations):
            raise RuntimeError(
                f"database schema v{current} is newer than this kokoa {__version__} "
                f"(knows v{len(migrations)}); refusing to touch it")
        for version, statements in enumerate(migrations[current:], start=current + 1):
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version:d}")
    if current < len(migrations):
        log.info("migrated database from schema v%d to v%d", current, len(migrations))
    return schema_version(db)


def schema_objects(db):
    """Every table, index, trigger and view: {(type, name): sql}. ANALYZE's statistics tables
    are left out: they steer the query planner, nothing else."""
    return {(row[0], row[1]): row[2] for row in db.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_stat%' "
        "ESCAPE '\\'")}


# Litestream (README, "Continuous replication") keeps these two tables in the database it
# replicates; they are allowed with exactly this shape, never required.
LITESTREAM_TABLES = (
    "CREATE TABLE _litestream_seq (id INTEGER PRIMARY KEY, seq INTEGER)",
    "CREATE TABLE _litestream_lock (id INTEGER)",
)


def unexpected_schema(db, version):
    """What differs from the schema that MIGRATIONS[:version] make (e.g. a trigger a crafted
    backup brought along): a list of "extra trigger x" / "missing table y" / "changed ...";
    empty when the database is as Kokoa made it (Litestream's own tables aside)."""
    reference = sqlite3.connect(":memory:")
    try:
        for statements in MIGRATIONS[:version]:
            for statement in statements:
                reference.execute(statement)
        expected = schema_objects(reference)
        for statement in LITESTREAM_TABLES:
            reference.execute(statement)
        tolerated = schema_objects(reference).items() - expected.items()
    finally:
        reference.close()
    found = schema_objects(db)
    expected.update((key, sql) for key, sql in tolerated if found.get(key) == sql)
    return ([f"extra {kind} {name}" for kind, name in sorted(found.keys() - expected.keys())]
            + [f"missing {kind} {name}" for kind, name in sorted(expected.keys() - found.keys())]
            + [f"changed {kind} {name}" for kind, name in sorted(found.keys() & expected.keys())
               if found[kind, name] != expected[kind, name]])


def query_origins(db, origin_id=None):
    """Origin rows with their route counts (all, or the one with `origin_id`)."""
    sql = """
        SELECT o.*,
               (SELECT count(*) FROM routes AS r WHERE r.origin_id = o.id) AS route_count
          FROM origins AS o"""
    if origin_id is None:
        return db.execute(sql + " ORDER BY o.name_key").fetchall()
    return db.execute(sql + " WHERE o.id = ?", (origin_id,)).fetchall()


def query_routes(db, route_id=None):
    """Route rows joined with their origin's name and wg_ip and their policy's name."""
    sql = """
        SELECT r.*, o.name AS origin_name, o.wg_ip AS origin_wg_ip,
               p.name AS access_policy_name
          FROM routes AS r
          JOIN origins AS o ON o.id = r.origin_id
          LEFT JOIN access_policies AS p ON p.id = r.access_policy_id"""
    if route_id is None:
        return db.execute(sql + " ORDER BY r.hostname").fetchall()
    return db.execute(sql + " WHERE r.id = ?", (route_id,)).fetchall()


def query_policies(db, policy_id=None):
    """Access policy rows (all, or the one with `policy_id`), each with the hostnames of the
    routes that use it: [(row, [hostname, ...])]."""
    sql = "SELECT * FROM access_policies"
    rows = (db.execute(sql + " ORDER BY name_key").fetchall() if policy_id is None
            else db.execute(sql + " WHERE id = ?", (policy_id,)).fetchall())
    hostnames = collections.defaultdict(list)
    for route in db.execute("""
            SELECT access_policy_id, hostname
              FROM routes
             WHERE access_policy_id = :id OR (:id IS NULL AND access_policy_id IS NOT NULL)
             ORDER BY hostname""", {"id": policy_id}):
        hostnames[route[0]].append(route[1])
    return [(row, hostnames[row["id"]]) for row in rows]


def query_edges(db, edge_id=None):
    """Edge node rows (all, or the one with `edge_id`)."""
    if edge_id is None:
        return db.execute("SELECT * FROM edge_nodes ORDER BY name_key").fetchall()
    return db.execute("SELECT * FROM edge_nodes WHERE id = ?", (edge_id,)).fetchall()


def read_settings(db):
    """All settings, defaults filled in."""
    settings = dict(DEFAULT_SETTINGS)
    for row in db.execute("SELECT key, value FROM settings"):
        if row["key"] in settings:
            settings[row["key"]] = json.loads(row["value"])
    return settings


def write_setting(db, key, value):
    """Insert or replace one setting (JSON-encoded)."""
    db.execute(
        """
        INSERT INTO settings (key, value)
        VALUES (?, ?)
        ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
        (key, json.dumps(value)))


def wg_ip_owner(db, wg_ip, exclude_id=None):
    """Which table ('origin' or 'edge node') already holds `wg_ip`, ignoring one row id."""
    row = db.execute(
        """
        SELECT 'origin' AS kind FROM origins WHERE wg_ip = :ip AND id IS NOT :skip
        UNION ALL
        SELECT 'edge node' FROM edge_nodes WHERE wg_ip = :ip AND id IS NOT :skip
        LIMIT 1""",
        {"ip": wg_ip, "skip": exclude_id}).fetchone()
    return row["kind"] if row else None


DATABASE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def create_private_file(path, exist_ok=False):
    """Create `path` empty with mode 0600 whatever the umask, never through a symlink or over
    an existing file (FileExistsError, unless exist_ok and it is a regular file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if exist_ok and not os.path.islink(path):
            return
        raise
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def make_database_private(db_path):
    """chmod 0600 the database and its -wal/-shm/-journal files (older installs made 0644)."""
    for suffix in DATABASE_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(db_path + suffix, 0o600, follow_symlinks=False)


def backup_database(source_path, target_path, fresh=True):
    """Copy a live database consistently with sqlite3's online backup API.

    With `fresh`, the target is created 0600 and must not exist yet (nor be a symlink); else
    it must already exist. Neither side's settings are changed (no WAL switch on a backup file
    being restored).
    """
    if fresh:
        create_private_file(target_path)
    source = sqlite3.connect(source_path, timeout=5.0)
    target = sqlite3.connect(target_path, timeout=5.0)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


# Domain logic ################################################################################

def check_fields(body, allowed, required=()):
    """Reject a body that is not an object, has unknown fields, or lacks required ones."""
    if not isinstance(body, dict):
        raise HTTPError(400, "invalid_json", "the body must be a JSON object")
    for field in body:
        if field not in allowed:
            raise invalid(field, f"unknown field {field!r}")
    for field in required:
        if body.get(field) is None:
            raise invalid(field, f"{field} is required")


def check_text(value, field, max_length, allow_newlines=False):
    """A string of at most `max_length` characters without control characters."""
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be a string")
    if len(value) > max_length:
        raise invalid(field, f"{field} must be at most {max_length} characters")
    for char in value:
        if allow_newlines and char in "\n\t":
            continue
        # Cf: invisible format characters (bidi controls that make a name read backwards,
        # zero-width spaces that make "edge1" and "edge1\u200b" two names that look alike)
        if unicodedata.category(char) in ("Cc", "Cs", "Cf"):
            raise invalid(field, f"{field} must not contain control or invisible "
                                 f"formatting characters (found U+{ord(char):04X})")
    return value


def validate_name(value, field="name"):
    """A display name: 1-64 characters, no control characters, no outer whitespace."""
    name = check_text(value, field, 64).strip()
    if not name:
        raise invalid(field, f"{field} must not be empty")
    return name


def name_key(name):
    """The case-insensitive identity of a name."""
    return unicodedata.normalize("NFKC", name).casefold()


def is_ip_address(text):
    """True if `text` parses as an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_dns_name(name, field, min_labels):
    """RFC 1123: labels of 1-63 letters, digits and inner hyphens; at most 253 in all."""
    labels = name.split(".")
    if len(name) > 253 or len(labels) < min_labels:
        raise invalid(field, f"{field} must be a DNS name of at least {min_labels} "
                             "labels and at most 253 characters")
    for label in labels:
        if not LABEL_RE.fullmatch(label):
            raise invalid(field, f"{field} has an invalid label {label!r}: use 1-63 letters, "
                                 "digits or inner hyphens")
    if not re.search("[a-z]", labels[-1]) or is_ip_address(name):     # as the agent checks
        raise invalid(field, f"{field} must be a DNS name whose last label has a letter, "
                             "not an IP address")
    return name


def normalize_hostname(value, field="hostname"):
    """Lower-case, drop one trailing dot, IDN to punycode, then check RFC 1123 rules."""
    text = check_text(value, field, 1024).strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if not text or is_ip_address(text.strip("[]")):
        raise invalid(field, f"{field} must be a DNS name, not empty or an IP address")
    for char, label in IDNA_DEVIATIONS.items():
        if char in text:
            raise invalid(field, f"{field} contains {label}, which browsers and Python's IDNA "
                                 "encode differently (it would be another domain): spell the "
                                 "name without it, or give its punycode (xn--) form")
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError:
        raise invalid(field, f"{field} is not a valid internationalized name") from None
    return check_dns_name(ascii_name.lower(), field, min_labels=2)


def normalize_route_hostname(value, field="hostname"):
    """A route's hostname: as normalize_hostname gives it, or a wildcard `*.` + such a name
    (one leading `*` label, at least two labels after it: `*.example.com`)."""
    if isinstance(value, str) and value.strip().startswith("*."):
        return "*." + normalize_hostname(value.strip()[2:], field)
    return normalize_hostname(value, field)


def validate_port(value, field="target_port"):
    """An integer port 1-65535 (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise invalid(field, f"{field} must be an integer from 1 to 65535")
    return value


def validate_wg_ip(value, network, field="wg_ip"):
    """A unicast host address, not loopback/link-local/multicast/unspecified, inside network."""
    check_text(value, field, 64)
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise invalid(field, f"{field} must be an IPv4 or IPv6 address") from None
    if getattr(address, "scope_id", None) is not None:     # "fd00::1%eth0" breaks nginx
        raise invalid(field, f"{field} must not carry a %zone")
    mapped = getattr(address, "ipv4_mapped", None)
    for candidate in (address, mapped):
        if candidate is not None and (
                candidate.is_loopback or candidate.is_link_local or candidate.is_multicast
                or candidate.is_unspecified or candidate.is_reserved):
            raise invalid(field, f"{field} must not be a loopback, link-local, multicast, "
                                 "reserved or unspecified address")
    if network is None:
        if not any(address in private for private in PRIVATE_NETWORKS):
            raise invalid(field, f"{field} must be a private address ("
                          + ", ".join(map(str, PRIVATE_NETWORKS))
                          + ") while KOKOA_WG_NETWORK is not set")
        return str(address)
    if address not in network:
        raise invalid(field, f"{field} must lie in the tunnel network {network}")
    if network.num_addresses > 2 and address in (network.network_address,
                                                 network.broadcast_address):
        raise invalid(field, f"{field} must be a host address of {network}")
    return str(address)


def parse_wg_network(text):
    """The tunnel network from a CIDR such as 10.8.0.0/24 (ValueError if it is no usable one).

    It must be private (see PRIVATE_NETWORKS) and leave room for an origin and an edge.
    """
    network = ipaddress.ip_network(text.strip(), strict=False)
    if not any(network.subnet_of(private) for private in PRIVATE_NETWORKS
               if private.version == network.version):
        raise ValueError(f"{network} is not inside a private range")
    if network.num_addresses < 4:
        raise ValueError(f"{network} is too small")
    return network


def free_wg_ip(db, network, field="wg_ip"):
    """The lowest host address of `network` that no origin or edge holds; 409 if it is full."""
    taken = {row[0] for row in db.execute(
        "SELECT wg_ip FROM origins UNION SELECT wg_ip FROM edge_nodes WHERE wg_ip IS NOT NULL")}
    for address in network.hosts():
        if str(address) not in taken:
            return str(address)
    raise conflict(field, f"every address of the tunnel network {network} is taken")


def wg_ip_or_assigned(db, config, value, field="wg_ip"):
    """A given wg_ip, validated, or (when none is given) the next free one of the network."""
    if value is not None:
        return validate_wg_ip(value, config.wg_network, field)
    if config.wg_network is None:
        raise invalid(field, f"{field} is required while KOKOA_WG_NETWORK is not set")
    return free_wg_ip(db, config.wg_network, field)


def validate_wg_key(value, field):
    """Standard base64 of exactly 32 bytes; returns (canonical text, raw bytes)."""
    check_text(value, field, 64)
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise invalid(field, f"{field} must be base64 of 32 bytes (as `wg genkey` prints)")
    return b64(raw), raw


def validate_endpoint(value, field="wg_endpoint"):
    """host:port or [v6]:port; None or "" means no endpoint."""
    if value is None or value == "":
        return None
    text = check_text(value, field, 300).strip().lower()
    match = re.fullmatch(r"\[([0-9a-f:.]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})", text)
    if not match:
        raise invalid(field, f"{field} must be host:port or [IPv6]:port")
    host, port = (match.group(1), match.group(2)) if match.group(1) else match.group(3, 4)
    if not 1 <= int(port) <= 65535:
        raise invalid(field, f"{field} port must be from 1 to 65535")
    if match.group(1):
        try:
            host = f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            raise invalid(field, f"{field} has an invalid IPv6 address") from None
    elif not is_ip_address(host):
        host = check_dns_name(host.removesuffix("."), field, min_labels=1)
    return f"{host}:{int(port)}"


def resolve_wg_keys(public_value, private_value):
    """Check or complete a WireGuard key pair; returns (public b64, private raw or None).

    Private alone: derive the public key. Both: they must match. Neither: generate a pair.
    """
    private_raw = None
    if private_value is not None:
        _, private_raw = validate_wg_key(private_value, "wg_private_key")
    if public_value is not None:
        public_text, public_raw = validate_wg_key(public_value, "wg_public_key")
        if private_raw is not None and wg_public_from_private(private_raw) != public_raw:
            raise invalid("wg_private_key", "wg_private_key does not match wg_public_key")
        return public_text, private_raw
    if private_raw is None:
        private_raw = wg_generate_private()
    return b64(wg_public_from_private(private_raw)), private_raw


def check_unique(db, table, column, value, field, exclude_id=None):
    """409 if another row of `table` has `value` in `column`."""
    row = db.execute(
        f"SELECT 1 FROM {quote_identifier(table)} "
        f"WHERE {quote_identifier(column)} = ? AND id IS NOT ?",
        (value, exclude_id)).fetchone()
    if row:
        raise conflict(field, f"{field} is already in use")


def check_wg_key_free(db, public_key, exclude_id=None):
    """409 if an origin or an edge already has `public_key` (two peers with one key would
    take each other's tunnel)."""
    for table, what in (("origins", "an origin"), ("edge_nodes", "an edge")):
        row = db.execute(
            f"SELECT 1 FROM {quote_identifier(table)} WHERE wg_public_key = ? AND id IS NOT ?",
            (public_key, exclude_id)).fetchone()
        if row:
            raise conflict("wg_public_key", f"wg_public_key is already used by {what}")


def check_wg_ip_free(db, wg_ip, exclude_id=None):
    """409 if an origin or an edge already has `wg_ip`."""
    owner = wg_ip_owner(db, wg_ip, exclude_id)
    if owner:
        raise conflict("wg_ip", f"wg_ip {wg_ip} is already used by an {owner}")


# Origins

ORIGIN_FIELDS = ("name", "wg_ip", "wg_public_key", "wg_private_key", "wg_endpoint")


def origin_json(row):
    """The public JSON of an origin row (never the private key)."""
    return {
        "id": row["id"], "name": row["name"], "wg_ip": row["wg_ip"],
        "wg_public_key": row["wg_public_key"], "wg_endpoint": row["wg_endpoint"],
        "has_private_key": row["wg_private_key_enc"] is not None,
        "has_token": row["token_hash"] is not None,
        "route_count": row["route_count"], "created_at": row["created_at"],
    }


def one_or_404(query, db, row_id, what):
    """The first of query(db, row_id) when row_id is a UUID; else a 404 naming `what`."""
    rows = query(db, row_id) if UUID_RE.fullmatch(row_id or "") else []
    if not rows:
        raise not_found(what)
    return rows[0]


def row_exists(db, table, row_id):
    """True if `row_id` is a UUID string naming a row of `table`."""
    return isinstance(row_id, str) and bool(UUID_RE.fullmatch(row_id)) and db.execute(
        f"SELECT 1 FROM {quote_identifier(table)} WHERE id = ?", (row_id,)).fetchone() is not None


def get_origin_row(db, origin_id):
    """The origin row with `origin_id`, or 404."""
    return one_or_404(query_origins, db, origin_id, "origin")


def seal_private_key(keyring, origin_id, private_raw):
    """Encrypt an origin's WireGuard private key bound to its row."""
    if private_raw is None:
        return None
    return keyring.seal(private_raw, secret_aad("origins", origin_id, "wg_private_key"))


def insert_origin(db, config, body):
    """Validate and insert an origin; returns its row."""
    check_fields(body, ORIGIN_FIELDS)
    errors = []
    name = gather_required(errors, body, "name", validate_name)
    endpoint = gather(errors, validate_endpoint, body.get("wg_endpoint"))
    public, private_raw = gather(errors, resolve_wg_keys, body.get("wg_public_key"),
                                 body.get("wg_private_key")) or (None, None)
    origin_id = new_id()
    with transaction(db):
        wg_ip = gather(errors, wg_ip_or_assigned, db, config, body.get("wg_ip"))
        raise_gathered(errors)
        check_unique(db, "origins", "name_key", name_key(name), "name")
        check_wg_ip_free(db, wg_ip)
        check_wg_key_free(db, public)
        db.execute(
            """
            INSERT INTO origins (id, name, name_key, wg_ip, wg_public_key,
                                 wg_private_key_enc, wg_endpoint, created_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (origin_id, name, name_key(name), wg_ip, public,
             seal_private_key(config.keyring, origin_id, private_raw), endpoint, utc_now()))
    return get_origin_row(db, origin_id)


def origin_key_changes(config, row, body):
    """New (public, sealed private) columns for a PATCH that touches the keys."""
    public_value = body.get("wg_public_key", row["wg_public_key"])
    if "wg_private_key" in body:
        private_value = body["wg_private_key"]
        if private_value is None:
            _, public_raw = validate_wg_key(public_value, "wg_public_key")
            return b64(public_raw), None
        public_value = body.get("wg_public_key")
        public, private_raw = resolve_wg_keys(public_value, private_value)
        return public, seal_private_key(config.keyring, row["id"], private_raw)
    public, _ = validate_wg_key(public_value, "wg_public_key")
    sealed = row["wg_private_key_enc"]
    if sealed is not None and public != row["wg_public_key"]:
        raise invalid("wg_public_key", "wg_public_key does not match the stored private key; "
                                       "send wg_private_key too (or null to drop it)")
    return public, sealed


def patch_origin(db, config, origin_id, body):
    """Validate and apply a partial update to an origin; returns its row."""
    check_fields(body, ORIGIN_FIELDS)
    errors = []
    with transaction(db):
        row = get_origin_row(db, origin_id)
        name = gather(errors, validate_name, body["name"]) if "name" in body else row["name"]
        wg_ip = row["wg_ip"]
        if "wg_ip" in body:
            wg_ip = gather(errors, validate_wg_ip, body["wg_ip"], config.wg_network)
        endpoint = row["wg_endpoint"]
        if "wg_endpoint" in body:
            endpoint = gather(errors, validate_endpoint, body["wg_endpoint"])
        public, sealed = gather(errors, origin_key_changes, config, row, body) or (None, None)
        raise_gathered(errors)
        check_unique(db, "origins", "name_key", name_key(name), "name", origin_id)
        check_wg_ip_free(db, wg_ip, origin_id)
        check_wg_key_free(db, public, origin_id)
        db.execute(
            """
            UPDATE origins
               SET name = ?, name_key = ?, wg_ip = ?, wg_public_key = ?,
                   wg_private_key_enc = ?, wg_endpoint = ?
             WHERE id = ?""",
            (name, name_key(name), wg_ip, public, sealed, endpoint, origin_id))
    return get_origin_row(db, origin_id)


def remove_origin(db, origin_id):
    """Delete an origin; 409 while routes use it."""
    with transaction(db):
        row = get_origin_row(db, origin_id)
        if row["route_count"]:
            raise conflict(None, f"origin is in use by {row['route_count']} route(s); "
                                 "delete or move them first")
        policies = [policy["name"] for policy in db.execute(
            "SELECT name FROM access_policies WHERE forward_origin_id = ? ORDER BY name_key",
            (origin_id,))]
        if policies:
            raise conflict(None, f"origin runs the forward-auth verifier of access "
                                 f"polic{'y' if len(policies) == 1 else 'ies'} "
                                 f"{', '.join(policies)}; change them first")
        db.execute("DELETE FROM origins WHERE id = ?", (origin_id,))


def issue_origin_token(db, origin_id):
    """A fresh token for the origin (replacing any earlier one); only its hash is kept."""
    token = ORIGIN_TOKEN_PREFIX + new_token()
    store_origin_token_hash(db, origin_id, hash_token(token))
    return token


def store_origin_token_hash(db, origin_id, token_hash):
    """Set (or, with None, revoke) the origin's token; 404 if there is no such origin."""
    with transaction(db):
        get_origin_row(db, origin_id)
        db.execute("UPDATE origins SET token_hash = ? WHERE id = ?", (token_hash, origin_id))


def origin_by_token(db, token):
    """The origin row whose token this is, or None."""
    digest = hash_token(token)
    row = db.execute("SELECT * FROM origins WHERE token_hash = ?", (digest,)).fetchone()
    return row if row is not None and hmac.compare_digest(row["token_hash"], digest) else None


# Routes

ROUTE_FIELDS = ("hostname", "origin_id", "target_port")
ROUTE_EXTRA_FIELDS = ("max_body_size", "buffering", "hsts", "enabled", "access_policy_id")
MAX_BODY_SIZE_MIB = 1048576        # 1 TiB: "no limit" is 0
ROUTE_OPTIONS = {"max_body_size": 0, "buffering": True, "hsts": True, "enabled": True}


def hostname_from_url(value, field="hostname"):
    """A hostname typed as a URL (https://app.example.com/) as its bare name. A port, path,
    query or user name in it is refused, never dropped silently; anything else is returned
    as it was, for normalize_hostname to judge."""
    if not isinstance(value, str) or not re.search(r"[/:@?#]", value) \
            or is_ip_address(value.strip().strip("[]")):
        return value
    text = check_text(value, field, 1024).strip()     # urlsplit drops tabs and newlines
    try:
        parts = urllib.parse.urlsplit(text if "://" in text else "//" + text)
    except ValueError:          # an unclosed [ of an IPv6 literal
        raise invalid(field, f"{field} must be a name such as app.example.com") from None
    try:
        port = parts.port
    except ValueError:
        port = parts.netloc.rpartition(":")[2]
    if parts.scheme.lower() not in ("", "http", "https") or not parts.hostname:
        raise invalid(field, f"{field} must be a name such as app.example.com, or its "
                             "https:// URL")
    if parts.username is not None or parts.password is not None:
        raise invalid(field, f"{field} must not carry a user name or password")
    if port is not None:
        raise invalid(field, f"{field} must not carry a port (:{port}): edges serve every "
                             "hostname on 443 (and 80); the origin's port is target_port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise invalid(field, f"{field} must be a name without a path or query: a route "
                             "serves the whole site")
    return parts.hostname


def route_hostname(value, field="hostname"):
    """A route's hostname from the API: a bare name or its URL, normalised (a wildcard
    `*.example.com` too)."""
    return normalize_route_hostname(hostname_from_url(value, field), field)


def hostname_unicode(hostname):
    """The Unicode form of an IDN hostname (xn-- labels decoded), or None when it has none."""
    if "xn--" not in hostname:
        return None
    try:
        text = hostname.encode("ascii").decode("idna")
    except UnicodeError:
        return None
    return text if text != hostname else None


def route_json(row):
    """The public JSON of a route row."""
    return {
        "id": row["id"], "hostname": row["hostname"],
        "hostname_unicode": hostname_unicode(row["hostname"]), "origin_id": row["origin_id"],
        "origin_name": row["origin_name"], "target_port": row["target_port"],
        **route_options_of(row), "access_policy_id": row["access_policy_id"],
        "access_policy_name": row["access_policy_name"], "created_at": row["created_at"],
    }


def validate_route_options(body, current=ROUTE_OPTIONS):
    """The route options of `body`, each validated, the others as in `current`."""
    options = dict(current)
    for field in ("buffering", "hsts", "enabled"):
        if field in body:
            options[field] = check_bool(body[field], field)
    if "max_body_size" in body:
        size = body["max_body_size"]
        if isinstance(size, bool) or not isinstance(size, int) \
                or not 0 <= size <= MAX_BODY_SIZE_MIB:
            raise invalid("max_body_size", "max_body_size must be a whole number of MiB from 0 "
                          f"(no limit) to {MAX_BODY_SIZE_MIB}")
        options["max_body_size"] = size
    return options


def route_options_of(row):
    """The options stored in a route row, as validate_route_options gives them."""
    return {"max_body_size": row["max_body_size"], "buffering": bool(row["buffering"]),
            "hsts": bool(row["hsts"]), "enabled": bool(row["enabled"])}


def get_route_row(db, route_id):
    """The route row with `route_id`, or 404."""
    return one_or_404(query_routes, db, route_id, "route")


def check_origin_exists(db, origin_id):
    """400 naming origin_id unless it is an existing origin's id."""
    if not isinstance(origin_id, str) or not UUID_RE.fullmatch(origin_id):
        raise invalid("origin_id", "origin_id must be the id of an origin")
    if not db.execute("SELECT 1 FROM origins WHERE id = ?", (origin_id,)).fetchone():
        raise invalid("origin_id", "origin_id does not name an existing origin")
    return origin_id


def insert_route(db, body):
    """Validate and insert a route; returns its row."""
    check_fields(body, ROUTE_FIELDS + ROUTE_EXTRA_FIELDS)
    errors = []
    hostname = gather_required(errors, body, "hostname", route_hostname)
    if body.get("origin_id") is None:
        errors.append(invalid("origin_id", "origin_id is required"))
    port = gather_required(errors, body, "target_port", validate_port)
    options = gather(errors, validate_route_options, body)
    route_id = new_id()
    with transaction(db):
        origin_id = None if body.get("origin_id") is None \
            else gather(errors, check_origin_exists, db, body["origin_id"])
        policy_id = gather(errors, check_policy_exists, db, body.get("access_policy_id"))
        raise_gathered(errors)
        check_unique(db, "routes", "hostname", hostname, "hostname")
        db.execute(
            """
            INSERT INTO routes (id, hostname, origin_id, target_port, created_at,
                                max_body_size, buffering, hsts, enabled, access_policy_id)
            VALUES (:id, :hostname, :origin_id, :port, :created_at,
                    :max_body_size, :buffering, :hsts, :enabled, :policy_id)""",
            {"id": route_id, "hostname": hostname, "origin_id": origin_id, "port": port,
             "created_at": utc_now(), "policy_id": policy_id, **options})
    return get_route_row(db, route_id)


def patch_route(db, route_id, body):
    """Validate and apply a partial update to a route; returns its row."""
    check_fields(body, ROUTE_FIELDS + ROUTE_EXTRA_FIELDS)
    errors = []
    with transaction(db):
        row = get_route_row(db, route_id)
        hostname = row["hostname"]
        if "hostname" in body:
            hostname = gather(errors, route_hostname, body["hostname"])
        origin_id = row["origin_id"]
        if "origin_id" in body:
            origin_id = gather(errors, check_origin_exists, db, body["origin_id"])
        port = gather(errors, validate_port, body["target_port"]) if "target_port" in body \
            else row["target_port"]
        options = gather(errors, validate_route_options, body, route_options_of(row))
        policy_id = row["access_policy_id"]
        if "access_policy_id" in body:
            policy_id = gather(errors, check_policy_exists, db, body["access_policy_id"])
        raise_gathered(errors)
        check_unique(db, "routes", "hostname", hostname, "hostname", route_id)
        db.execute(
            """
            UPDATE routes
               SET hostname = :hostname, origin_id = :origin_id, target_port = :port,
                   max_body_size = :max_body_size, buffering = :buffering, hsts = :hsts,
                   enabled = :enabled, access_policy_id = :policy_id
             WHERE id = :id""",
            {"hostname": hostname, "origin_id": origin_id, "port": port, "id": route_id,
             "policy_id": policy_id, **options})
    return get_route_row(db, route_id)


def remove_route(db, route_id):
    """Delete a route or 404."""
    with transaction(db):
        get_route_row(db, route_id)
        db.execute("DELETE FROM routes WHERE id = ?", (route_id,))


# Access policies

POLICY_FIELDS = ("name", "users", "allow", "deny", "require", "bypass_paths", "forward_auth",
                 "pass_authorization")
USER_FIELDS = ("username", "password", "password_hash")
FORWARD_AUTH_FIELDS = ("origin_id", "port", "path", "signin_url")
POLICY_DEFAULTS = {"users": [], "allow": [], "deny": [], "require": "any", "bypass_paths": [],
                   "forward_auth": None, "pass_authorization": False}


def check_sized(value, field, limit, kind=list):
    """A JSON array (kind list) or object (kind dict) of at most `limit` entries, else 400
    naming `field`."""
    if not isinstance(value, kind):
        raise invalid(field, f"{field} must be {'a list' if kind is list else 'an object'}")
    if len(value) > limit:
        raise invalid(field, f"{field} must have at most {limit} entries")
    return value


def check_list(value, field):
    """A JSON array of at most POLICY_LIST_LIMITS[field] items."""
    return check_sized(value, field, POLICY_LIST_LIMITS[field])


def validate_username(value, where):
    """A user name of the edge's password file: 1-64 of A-Z a-z 0-9 . _ @ -."""
    if not isinstance(value, str) or not USERNAME_RE.fullmatch(value):
        raise invalid("users", f"{where}.username must be 1-64 letters, digits, '.', '_', '@' "
                               "or '-'")
    return value


def validate_password(value, where):
    """A password to hash: 8-1024 characters, no control characters, and (what the edges'
    crypt(3) accepts) at most 511 bytes in UTF-8. The value is never part of a message."""
    try:
        check_text(value, "users", PASSWORD_MAX_LENGTH)
    except HTTPError:
        raise invalid("users", f"{where}.password must be text of at most "
                               f"{PASSWORD_MAX_LENGTH} characters without control "
                               "characters") from None
    if len(value) < PASSWORD_MIN_LENGTH:
        raise invalid("users", f"{where}.password must have at least {PASSWORD_MIN_LENGTH} "
                               "characters")
    if len(value.encode("utf-8")) > PASSWORD_MAX_BYTES:
        raise invalid("users", f"{where}.password must be at most {PASSWORD_MAX_BYTES} bytes "
                               "in UTF-8 (edges cannot check longer ones)")
    return value


def validate_password_hash(value, where):
    """A crypt hash the edges can check: SHA-512-crypt ($6$) or bcrypt ($2b$, $2y$)."""
    if not isinstance(value, str) or not (SHA512_CRYPT_RE.fullmatch(value)
                                          or BCRYPT_RE.fullmatch(value)):
        raise invalid("users", f"{where}.password_hash must be a $6$ (SHA-512-crypt), $2b$ or "
                               "$2y$ (bcrypt) hash")
    return value


def validate_user(entry, index, stored):
    """One entry of `users` -> (username, hash); a bare username keeps its `stored` hash."""
    where = f"users[{index}]"
    if not isinstance(entry, dict) or any(key not in USER_FIELDS for key in entry):
        raise invalid("users", f"{where} must be an object with username and password or "
                               "password_hash")
    username = validate_username(entry.get("username"), where)
    if "password" in entry:
        raise invalid("users", f"{where} must have a password or a password_hash, not both")
    if "password_hash" in entry:
        return username, validate_password_hash(entry["password_hash"], where)
    if username not in stored:
        raise invalid("users", f"{where} ({username}) needs a password or a password_hash")
    return username, stored[username]


def hash_passwords(body):
    """`body` with each password in `users` replaced by its SHA-512-crypt hash: done before
    the write transaction, which a hundred slow hashes would hold for seconds."""
    users = body.get("users")
    if not isinstance(users, list) or len(users) > POLICY_LIST_LIMITS["users"]:
        return body
    hashed = []
    for index, entry in enumerate(users):
        username = entry.get("username") if isinstance(entry, dict) else None
        if isinstance(username, str) and USERNAME_RE.fullmatch(username) \
                and "password" in entry and "password_hash" not in entry:   # else refused later
            password = validate_password(entry["password"], f"users[{index}]")
            entry = {**{k: v for k, v in entry.items() if k != "password"},
                     "password_hash": sha512_crypt(password)}
        hashed.append(entry)
    return {**body, "users": hashed}


def validate_users(value, stored=None):
    """`users` -> [{"username", "hash"}] sorted by username; `stored` maps the policy's
    current usernames to their hashes (a PATCH may name a user without a password)."""
    users = {}
    for index, entry in enumerate(check_list(value, "users")):
        username, password_hash = validate_user(entry, index, stored or {})
        if username in users:
            raise invalid("users", f"users[{index}]: {username} is listed twice")
        users[username] = password_hash
    return [{"username": name, "hash": users[name]} for name in sorted(users)]


def validate_network(value, field):
    """A CIDR or a bare address, IPv4 or IPv6, normalised (host bits cleared)."""
    text = check_text(value, field, 64).strip()
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        network = None
    if network is None or "%" in text:          # a zone means nothing to another machine
        raise invalid(field, f"{field} must list CIDRs or addresses such as 198.51.100.0/24 or "
                             f"2001:db8::/32 ({text[:64]!r} is not one)")
    return str(network)


def validate_networks(value, field):
    """`allow` or `deny`: CIDRs, normalised, deduplicated, sorted."""
    return sorted({validate_network(item, field) for item in check_list(value, field)})


def validate_uri_path(value, field, label):
    """A URI path (prefix): / then A-Z a-z 0-9 . _ ~ / -, no //, no . or .. segment; 400
    naming `field`, whose message names `label`."""
    if not isinstance(value, str) or not URI_PATH_RE.fullmatch(value) or "//" in value \
            or any(segment in (".", "..") for segment in value.split("/")):
        raise invalid(field, f"{label} must be a path such as /api/: '/' then at most 200 "
                             "letters, digits or . _ ~ / -, with no '//' and no '.' or '..' "
                             "segment")
    return value


def validate_bypass_paths(value):
    """`bypass_paths`: URI path prefixes, deduplicated, sorted."""
    return sorted({validate_uri_path(item, "bypass_paths", f"bypass_paths[{index}]")
                   for index, item in enumerate(check_list(value, "bypass_paths"))})


def validate_signin_url(value):
    """None, or an http(s) URL of a host name or IPv4 address, an optional port and a path or
    query of A-Z a-z 0-9 . _ ~ / ? = & % : + - (at most 512 characters); scheme and host in
    lower case."""
    if value is None:
        return None
    match = SIGNIN_URL_RE.fullmatch(value) if isinstance(value, str) else None
    message = ("forward_auth.signin_url must be an http(s) URL such as "
               "https://auth.example.com/ (at most 512 characters, no spaces or quotes)")
    if match is None or len(value) > 512:
        raise invalid("forward_auth", message)
    host = match["host"].lower()
    if not is_ip_address(host):
        try:
            check_dns_name(host.removesuffix("."), "forward_auth", min_labels=1)
        except HTTPError:
            raise invalid("forward_auth", message) from None
    if match["port"] and not 1 <= int(match["port"][1:]) <= 65535:
        raise invalid("forward_auth", message)
    return f"{match['scheme'].lower()}://{host}{match['port'] or ''}{match['rest'] or ''}"


def validate_forward_auth(db, value):
    """None, or {"origin_id", "port", "path", "signin_url"?} with an existing origin."""
    if value is None:
        return None
    if not isinstance(value, dict) or any(key not in FORWARD_AUTH_FIELDS for key in value) \
            or any(key not in value for key in FORWARD_AUTH_FIELDS[:3]):
        raise invalid("forward_auth", "forward_auth must be null or an object with origin_id, "
                                      "port, path and optionally signin_url")
    origin_id = value["origin_id"]
    if not row_exists(db, "origins", origin_id):
        raise invalid("forward_auth", "forward_auth.origin_id must be the id of an origin")
    port = value["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise invalid("forward_auth", "forward_auth.port must be an integer from 1 to 65535")
    return {"origin_id": origin_id, "port": port,
            "path": validate_uri_path(value["path"], "forward_auth", "forward_auth.path"),
            "signin_url": validate_signin_url(value.get("signin_url"))}


def validate_policy(db, body, current):
    """The policy `body` describes, each field validated, the others as in `current`
    (POLICY_DEFAULTS for a new one, where `name` is required). Every field at fault is named
    at once (raise_gathered)."""
    policy = dict(current)
    errors = []

    def take(field, check, *args):
        if field in body:
            before = len(errors)
            value = gather(errors, check, body[field], *args)
            if len(errors) == before:
                policy[field] = value

    take("name", validate_name)
    take("users", validate_users, {user["username"]: user["hash"] for user in current["users"]})
    for field in ("allow", "deny"):
        take(field, validate_networks, field)
    take("require", validate_require)
    take("bypass_paths", validate_bypass_paths)
    take("forward_auth", lambda value: validate_forward_auth(db, value))
    take("pass_authorization", check_bool, "pass_authorization")
    raise_gathered(errors)
    if not any(policy[field] for field in ("users", "allow", "deny", "forward_auth")):
        raise invalid("users", "a policy needs users, allow, deny or forward_auth: without one "
                               "it would look protected and protect nothing")
    return policy


def validate_require(value):
    """A policy's `require`: "any" or "all"."""
    if value not in ("any", "all"):
        raise invalid("require", "require must be \"any\" or \"all\"")
    return value


def check_bool(value, field):
    """true or false (not 0, 1 or a string), else 400 naming `field`."""
    if not isinstance(value, bool):
        raise invalid(field, f"{field} must be true or false")
    return value


def policy_of(row):
    """The policy stored in a row, in the form validate_policy gives it."""
    forward = None
    if row["forward_origin_id"] is not None:
        forward = {"origin_id": row["forward_origin_id"], "port": row["forward_port"],
                   "path": row["forward_path"], "signin_url": row["forward_signin_url"]}
    return {"name": row["name"], "users": json.loads(row["users"]),
            "allow": json.loads(row["allow"]), "deny": json.loads(row["deny"]),
            "require": row["require"], "bypass_paths": json.loads(row["bypass_paths"]),
            "forward_auth": forward, "pass_authorization": bool(row["pass_authorization"])}


def policy_json(row, hostnames):
    """The public JSON of a policy: usernames only, never a password or a hash."""
    policy = policy_of(row)
    return {"id": row["id"], **policy,
            "users": [user["username"] for user in policy["users"]], "routes": hostnames,
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def policy_columns(policy):
    """The column values of a validated policy."""
    forward = policy["forward_auth"] or {}
    return {"name": policy["name"], "name_key": name_key(policy["name"]),
            "users": json.dumps(policy["users"]), "allow": json.dumps(policy["allow"]),
            "deny": json.dumps(policy["deny"]), "require": policy["require"],
            "bypass_paths": json.dumps(policy["bypass_paths"]),
            "forward_origin_id": forward.get("origin_id"), "forward_port": forward.get("port"),
            "forward_path": forward.get("path"),
            "forward_signin_url": forward.get("signin_url"),
            "pass_authorization": int(policy["pass_authorization"])}


def get_policy(db, policy_id):
    """(row, hostnames of its routes) of the policy with `policy_id`, or 404."""
    return one_or_404(query_policies, db, policy_id, "access policy")


def insert_policy(db, body):
    """Validate and insert an access policy; returns (row, hostnames)."""
    check_fields(body, POLICY_FIELDS, required=("name",))
    body = hash_passwords(body)
    policy_id = new_id()
    with transaction(db):
        columns = policy_columns(validate_policy(db, body, {"name": None, **POLICY_DEFAULTS}))
        check_unique(db, "access_policies", "name_key", columns["name_key"], "name")
        now = utc_now()
        db.execute(
            """
            INSERT INTO access_policies (id, name, name_key, users, allow, deny, require,
                                         bypass_paths, forward_origin_id, forward_port,
                                         forward_path, forward_signin_url, pass_authorization,
                                         created_at, updated_at)
            VALUES (:id, :name, :name_key, :users, :allow, :deny, :require, :bypass_paths,
                    :forward_origin_id, :forward_port, :forward_path, :forward_signin_url,
                    :pass_authorization, :now, :now)""",
            {"id": policy_id, "now": now, **columns})
    return get_policy(db, policy_id)


def patch_policy(db, policy_id, body):
    """Validate and apply a partial update to an access policy; returns (row, hostnames)."""
    check_fields(body, POLICY_FIELDS)
    body = hash_passwords(body)
    with transaction(db):
        row, _ = get_policy(db, policy_id)
        columns = policy_columns(validate_policy(db, body, policy_of(row)))
        check_unique(db, "access_policies", "name_key", columns["name_key"], "name", policy_id)
        db.execute(
            """
            UPDATE access_policies
               SET name = :name, name_key = :name_key, users = :users, allow = :allow,
                   deny = :deny, require = :require, bypass_paths = :bypass_paths,
                   forward_origin_id = :forward_origin_id, forward_port = :forward_port,
                   forward_path = :forward_path, forward_signin_url = :forward_signin_url,
                   pass_authorization = :pass_authorization, updated_at = :now
             WHERE id = :id""",
            {"id": policy_id, "now": utc_now(), **columns})
    return get_policy(db, policy_id)


def remove_policy(db, policy_id):
    """Delete an access policy; 409 in_use naming the routes while routes use it."""
    with transaction(db):
        _, hostnames = get_policy(db, policy_id)
        if hostnames:
            shown = ", ".join(hostnames[:10])
            if len(hostnames) > 10:
                shown += f" and {len(hostnames) - 10} more"
            raise HTTPError(409, "in_use", f"the access policy protects {shown}: give "
                            f"{'that route' if len(hostnames) == 1 else 'those routes'} "
                            "another policy (or none) first")
        db.execute("DELETE FROM access_policies WHERE id = ?", (policy_id,))


def check_policy_exists(db, policy_id):
    """None (public), or the id of an existing access policy; else 400 naming
    access_policy_id."""
    if policy_id is None:
        return None
    if not row_exists(db, "access_policies", policy_id):
        raise invalid("access_policy_id", "access_policy_id must be null (public) or the id of "
                                          "an access policy")
    return policy_id


# Edge nodes

REGISTER_FIELDS = ("bootstrap_token", "name", "wg_public_key", "wg_ip", "wg_endpoint")
STATUS_FIELDS = ("applied_hash", "ok", "error", "certificates", "agent_version", "schema",
                 "interval_s", "origins", "hosts")
CERT_FIELDS = ("status", "not_after", "error")


def version_key(version):
    """The numeric parts of a version such as 0.2.0 as a tuple, for ordering."""
    match = re.match(r"[0-9]+(\.[0-9]+)*", version or "")
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def agent_outdated(row, last_seen):
    """True when the edge's agent is older than this control plane (or too old to say which
    it is); None while the edge has never polled."""
    if last_seen is None:
        return None
    return version_key(row["agent_version"]) < version_key(__version__)


def edge_schema(row):
    """The payload schema an edge's agent last asked for (1 for one that never said)."""
    return row["agent_schema"] if row["agent_schema"] in SCHEMAS else 1


def edge_json(row, configs, last_seen=None, not_before=0.0):
    """The public JSON of an edge row (never its token hash), judged against the payload of
    the schema its agent speaks: `configs` is {schema: (config_hash, body, unserved)}."""
    schema = edge_schema(row)
    config_hash, _, unserved = configs[schema]
    last_seen = last_seen or row["last_seen"]
    health = edge_health(row)
    judged = last_seen and max(last_seen, iso_time(not_before))       # as fleet_edges does
    return {
        "state": edge_state(judged, health["interval_s"], time.time()),
        "origins": health["origins"], "hosts": health["hosts"],
        "id": row["id"], "name": row["name"], "wg_ip": row["wg_ip"],
        "wg_public_key": row["wg_public_key"], "wg_endpoint": row["wg_endpoint"],
        "created_at": row["created_at"], "last_seen": last_seen,
        "applied_hash": row["applied_hash"], "config_hash": config_hash,
        "in_sync": row["applied_hash"] is not None and row["applied_hash"] == config_hash,
        "status_ok": None if row["status_ok"] is None else bool(row["status_ok"]),
        "last_error": row["last_error"], "last_status_at": row["last_status_at"],
        "certificates": json.loads(row["certificates"]),
        "agent_version": row["agent_version"], "schema": schema,
        "agent_outdated": agent_outdated(row, last_seen),
        "unserved_routes": [{"hostname": hostname, "reason": reason}
                            for hostname, reason in sorted(unserved.items())],
        "warnings": edge_warnings(row),
    }


def edge_warnings(row):
    """What is wrong with an edge that no poll can fix, in words (render_origin_wireguard
    skips an edge without a tunnel address or key)."""
    missing = [what for what, value in (("WireGuard address (wg_ip)", row["wg_ip"]),
                                        ("WireGuard public key", row["wg_public_key"]))
               if not value]
    if not missing:
        return []
    return [f"registered without a {' or a '.join(missing)}: origins leave this edge out of "
            "their wireguard.conf, so it cannot reach them; revoke it and install it again "
            "(install-edge.sh makes both)"]


def insert_edge(db, config, body, enrollment_key=None):
    """Validate and insert an edge node; returns (row, the node token shown once).

    With an enrollment key, one of its uses is spent in the same transaction (401 if none).
    """
    check_fields(body, REGISTER_FIELDS, required=("name",))
    name = validate_name(body["name"])
    public = None
    if body.get("wg_public_key") is not None:
        public, _ = validate_wg_key(body["wg_public_key"], "wg_public_key")
    endpoint = validate_endpoint(body.get("wg_endpoint"))
    token = new_token()
    edge_id = new_id()
    with transaction(db):
        if enrollment_key is not None and not spend_enrollment_key(db, enrollment_key):
            raise HTTPError(401, "unauthorized", enrollment_key_refusal(db, enrollment_key),
                            field="bootstrap_token")
        check_unique(db, "edge_nodes", "name_key", name_key(name), "name")
        wg_ip = None
        if body.get("wg_ip") is not None or (public is not None and config.wg_network):
            wg_ip = wg_ip_or_assigned(db, config, body.get("wg_ip"))
            check_wg_ip_free(db, wg_ip)
        if public is not None:
            check_wg_key_free(db, public)
        db.execute(
            """
            INSERT INTO edge_nodes (id, name, name_key, token_hash, wg_ip, wg_public_key,
                                    wg_endpoint, created_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (edge_id, name, name_key(name), hash_token(token), wg_ip, public, endpoint,
             utc_now()))
    return query_edges(db, edge_id)[0], token


def validate_certificates(value):
    """hostname -> {"status", "not_after"?, "error"?}, as an agent reports them."""
    if not isinstance(value, dict):
        raise invalid("certificates", "certificates must be an object of hostname -> state")
    clean = {}
    for hostname, state in value.items():
        host = normalize_route_hostname(hostname, "certificates")
        if not isinstance(state, dict) or state.get("status") not in CERT_STATUSES:
            raise invalid("certificates", "each certificate needs a status: "
                                          + ", ".join(CERT_STATUSES))
        check_fields(state, CERT_FIELDS)
        entry = {"status": state["status"]}
        for key in ("not_after", "error"):
            if state.get(key) is not None:
                entry[key] = check_text(state[key], "certificates", 2000, allow_newlines=True)
        clean[host] = entry
    return clean


def record_edge_status(db, edge_id, body):
    """Store what an edge reports: applied hash, ok/error, certificate states."""
    check_fields(body, STATUS_FIELDS, required=("ok",))
    if not isinstance(body["ok"], bool):
        raise invalid("ok", "ok must be true or false")
    applied = body.get("applied_hash")
    if applied is not None and (not isinstance(applied, str) or not HEX64_RE.fullmatch(applied)):
        raise invalid("applied_hash", "applied_hash must be a lower-case hex SHA-256")
    error = body.get("error")
    if error is not None:
        error = check_text(error, "error", 4000, allow_newlines=True)
    certificates = body.get("certificates")
    if certificates is not None:
        certificates = json.dumps(validate_certificates(certificates), sort_keys=True)
    version = validate_agent_version(body.get("agent_version"))
    schema = body.get("schema")
    if schema is not None and (isinstance(schema, bool) or schema not in SCHEMAS):
        raise invalid("schema", "schema must be one of " + ", ".join(map(str, SCHEMAS)))
    health = validate_health(body)
    now = utc_now()
    with transaction(db):
        health = known_health(db, health)
        db.execute(
            """
            UPDATE edge_nodes
               SET applied_hash = ?, status_ok = ?, last_error = ?, last_status_at = ?,
                   last_seen = ?, certificates = coalesce(?, certificates),
                   agent_version = coalesce(?, agent_version),
                   agent_schema = coalesce(?, agent_schema), health = ?, health_at = ?
             WHERE id = ?""",
            (applied, int(body["ok"]), None if body["ok"] else (error or "unknown error"),
             now, now, certificates, version, schema,
             None if health is None else json.dumps(health, sort_keys=True),
             None if health is None else now, edge_id))


def validate_agent_version(value, field="agent_version"):
    """An agent's version string such as 0.2.0 (None stays None)."""
    if value is not None and (not isinstance(value, str) or not VERSION_RE.fullmatch(value)):
        raise invalid(field, f"{field} must be a version such as {__version__}")
    return value


@functools.lru_cache(maxsize=64)      # every poll of an agent sends the same value
def negotiate_schema(header):
    """(agent version or None, payload schema) from an X-Kokoa-Agent header value.

    No header: an agent from before negotiation, schema 1. 400 naming X-Kokoa-Agent if the
    header is malformed or names no schema this control plane can send.
    """
    if not header:
        return None, 1
    match = AGENT_HEADER_RE.fullmatch(header)
    if not match:
        raise invalid("X-Kokoa-Agent", "X-Kokoa-Agent must be '<version>; schema=<n>[,<n>...]'")
    version = validate_agent_version(match["version"], "X-Kokoa-Agent")
    known = {int(n) for n in match["schemas"].split(",")} & set(SCHEMAS)
    if not known:
        raise invalid("X-Kokoa-Agent", f"the agent knows payload schemas {match['schemas']}; "
                      f"this control plane sends {', '.join(map(str, SCHEMAS))}")
    return version, max(known)


def delete_by_id(db, table, row_id, what):
    """Delete one row of `table` by its UUID; 404 naming `what` if there is none."""
    if not UUID_RE.fullmatch(row_id or ""):
        raise not_found(what)
    with transaction(db):
        sql = f"DELETE FROM {quote_identifier(table)} WHERE id = ?"
        if not db.execute(sql, (row_id,)).rowcount:
            raise not_found(what)


def revoke_edge(db, edge_id):
    """Delete an edge node, which makes its token fail; 404 if unknown."""
    delete_by_id(db, "edge_nodes", edge_id, "edge node")


# Enrollment keys

ENROLLMENT_FIELDS = ("description", "expires_in", "uses")
ENROLLMENT_KEY_PREFIX = "kokoa-ek-"
ORIGIN_TOKEN_PREFIX = "kokoa-ot-"


def enrollment_key_json(row):
    """The public JSON of an enrollment key (never the key itself)."""
    return {"id": row["id"], "description": row["description"],
            "created_at": row["created_at"], "expires_at": row["expires_at"],
            "uses_left": row["uses_left"], "last_used_at": row["last_used_at"]}


def bounded_int(body, field, default, low, high):
    """An optional integer field within [low, high]."""
    value = body.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(field, f"{field} must be an integer from {low} to {high}")
    return value


def insert_enrollment_key(db, body):
    """Make an enrollment key; returns (row, the key shown once)."""
    check_fields(body, ENROLLMENT_FIELDS)
    description = body.get("description")
    description = "" if description is None else check_text(description, "description", 200)
    description = description.strip()
    expires_in = bounded_int(body, "expires_in", 3600, 60, 30 * 86400)
    uses = bounded_int(body, "uses", 1, 1, 1000)
    key = ENROLLMENT_KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = new_id()
    with transaction(db):
        db.execute(
            """
            INSERT INTO enrollment_keys (id, key_hash, description, created_at, expires_at,
                                         uses_left)
            VALUES (?, ?, ?, ?, ?, ?)""",
            (key_id, hash_token(key), description, utc_now(),
             iso_time(time.time() + expires_in), uses))
    row = db.execute("SELECT * FROM enrollment_keys WHERE id = ?", (key_id,)).fetchone()
    return row, key




def enrollment_key_usable(db, key):
    """True if `key` is a live enrollment key with uses left."""
    if not key.startswith(ENROLLMENT_KEY_PREFIX):
        return False
    row = db.execute(
        """
        SELECT key_hash
          FROM enrollment_keys
         WHERE key_hash = ? AND uses_left > 0 AND expires_at > ?""",
        (hash_token(key), utc_now())).fetchone()
    return row is not None and hmac.compare_digest(row["key_hash"], hash_token(key))


def enrollment_key_refusal(db, key):
    """Why `key` cannot register an edge, in words. Only a key whose hash is stored can be
    told apart (used up, expired): a guess learns nothing but "wrong"."""
    row = None
    if key.startswith(ENROLLMENT_KEY_PREFIX):
        row = db.execute("SELECT key_hash, uses_left, expires_at FROM enrollment_keys "
                         "WHERE key_hash = ?", (hash_token(key),)).fetchone()
    if row is None or not hmac.compare_digest(row["key_hash"], hash_token(key)):
        return "wrong bootstrap token or enrollment key"
    if row["uses_left"] <= 0:
        return "this enrollment key is used up: make a new one (Edge nodes, Enrollment keys)"
    return "this enrollment key has expired: make a new one (Edge nodes, Enrollment keys)"


def spend_enrollment_key(db, key):
    """Use up one registration of a live enrollment key; False if it is not one."""
    if not key.startswith(ENROLLMENT_KEY_PREFIX):
        return False
    now = utc_now()
    spent = db.execute(
        """
        UPDATE enrollment_keys
           SET uses_left = uses_left - 1, last_used_at = ?
         WHERE key_hash = ? AND uses_left > 0 AND expires_at > ?""",
        (now, hash_token(key), now)).rowcount
    return spent == 1


# Settings

def store_settings(db, body):
    """Validate and store settings; returns all settings."""
    check_fields(body, tuple(DEFAULT_SETTINGS))
    for key, value in body.items():
        if not isinstance(value, type(DEFAULT_SETTINGS[key])):
            raise invalid(key, f"{key} must be a {type(DEFAULT_SETTINGS[key]).__name__}")
    with transaction(db):
        for key, value in body.items():
            write_setting(db, key, value)
    return read_settings(db)


# Admin sessions

def admin_fingerprint(config):
    """A MAC of the admin user and password, kept with each session: a session opened with
    other credentials (the password changed since) is over. Keyed with the encryption key,
    so that a copy of the database tests no password guesses."""
    key = hmac.new(config.keyring.current, b"kokoa:admin-session", hashlib.sha256).digest()
    message = f"{config.admin_user}\0{config.admin_password}".encode("utf-8", "surrogatepass")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def session_expires_at(row):
    """When a session ends unless it is used again: idle 12 h, at most 7 days after login."""
    return min(parse_iso_time(row["created_at"]) + SESSION_MAX_SECONDS,
               parse_iso_time(row["last_used_at"]) + SESSION_IDLE_SECONDS)


def open_session(db, config, ended_tokens=()):
    """A fresh session: (cookie token, row). Ends the sessions of `ended_tokens` (what the
    browser held: a login never keeps a cookie it did not make), expired ones, ones of other
    credentials and, past SESSION_LIMIT, the least recently used."""
    token, session_id, now = new_token(), new_id(), time.time()
    fingerprint = admin_fingerprint(config)
    with transaction(db):
        for old in ended_tokens:
            db.execute("DELETE FROM admin_sessions WHERE token_hash = ?", (hash_token(old),))
        db.execute(
            """
            DELETE FROM admin_sessions
             WHERE created_at <= ? OR last_used_at <= ? OR password_mac != ?""",
            (iso_time(now - SESSION_MAX_SECONDS), iso_time(now - SESSION_IDLE_SECONDS),
             fingerprint))
        db.execute(
            """
            DELETE FROM admin_sessions
             WHERE rowid IN (SELECT rowid FROM admin_sessions
                              ORDER BY last_used_at DESC, rowid DESC
                              LIMIT -1 OFFSET ?)""", (SESSION_LIMIT - 1,))
        db.execute(
            """
            INSERT INTO admin_sessions (id, token_hash, password_mac, created_at, last_used_at)
            VALUES (?, ?, ?, ?, ?)""",
            (session_id, hash_token(token), fingerprint, iso_time(now), iso_time(now)))
    return token, db.execute("SELECT * FROM admin_sessions WHERE id = ?",
                             (session_id,)).fetchone()


def session_of(db, config, token):
    """The live session `token` opens, or None: unknown, expired, or opened with other admin
    credentials (such a row is deleted). Its last use is stored at most once a minute."""
    digest = hash_token(token)
    row = db.execute("SELECT * FROM admin_sessions WHERE token_hash = ?", (digest,)).fetchone()
    if row is None or not hmac.compare_digest(row["token_hash"], digest):
        return None
    now = time.time()
    over = now >= session_expires_at(row) or not hmac.compare_digest(
        row["password_mac"], admin_fingerprint(config))
    with contextlib.suppress(sqlite3.OperationalError):    # read-only storage: reads go on
        if over:
            db.execute("DELETE FROM admin_sessions WHERE id = ?", (row["id"],))
        elif now - parse_iso_time(row["last_used_at"]) >= SESSION_TOUCH_SECONDS:
            db.execute("UPDATE admin_sessions SET last_used_at = ? WHERE id = ?",
                       (iso_time(now), row["id"]))
    return None if over else row


def close_session(db, session_id):
    """End a session (logout): its cookie opens nothing from now on."""
    db.execute("DELETE FROM admin_sessions WHERE id = ?", (session_id,))


# Health: what edges measure, what the control plane concludes, and alerts (issue 16)
#
# An edge's status report may carry its measurements (interval_s, origins, hosts), which are
# checked here and stored as the edge's last report. sites_view() concludes, per hostname, one
# state with its reasons; a HealthMonitor thread turns changes of those conclusions into alert
# events, and an AlertSender thread delivers them (retries, bounded queue and storage).

HEALTH_FIELDS = ("interval_s", "origins", "hosts")
ORIGIN_HEALTH_FIELDS = ("handshake_age_s", "reachable", "rtt_ms", "ports")
HOST_HEALTH_FIELDS = ("requests", "status_4xx", "status_5xx", "upstream_errors", "window_s")
COUNT_MAX = 10 ** 12
ALERT_TARGET_FIELDS = ("name", "url", "format", "events")


def health_int(value, field, where, high):
    """An integer 0..high (not a bool), else 400 naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise invalid(field, f"{where} must be an integer from 0 to {high}")
    return value


def health_map(value, field):
    """A JSON object of at most HEALTH_LIMITS[field] entries."""
    return check_sized(value, field, HEALTH_LIMITS[field], dict)


def validate_origin_health(address, entry):
    """(normalised address, {"handshake_age_s", "reachable", "rtt_ms", "ports"})."""
    where = f"origins[{str(address)[:64]!r}]"
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError:
        raise invalid("origins", f"{where}: the key must be an origin's wg_ip") from None
    if not isinstance(entry, dict) or any(key not in ORIGIN_HEALTH_FIELDS for key in entry):
        raise invalid("origins", f"{where} must be an object of "
                                 + ", ".join(ORIGIN_HEALTH_FIELDS))
    age, reachable, rtt = (entry.get(key) for key in ORIGIN_HEALTH_FIELDS[:3])
    if age is not None:
        health_int(age, "origins", f"{where}.handshake_age_s", 10 ** 10)
    if reachable is not None and not isinstance(reachable, bool):
        raise invalid("origins", f"{where}.reachable must be true, false or null")
    if rtt is not None and (isinstance(rtt, bool) or not isinstance(rtt, (int, float))
                            or not 0 <= rtt <= 60000):
        raise invalid("origins", f"{where}.rtt_ms must be a number of ms from 0 to 60000")
    ports = {}
    for port, up in health_map(entry.get("ports", {}), "ports").items():
        if not re.fullmatch("[1-9][0-9]{0,4}", port) or int(port) > 65535 \
                or not isinstance(up, bool):
            raise invalid("origins", f"{where}.ports must map ports (1-65535) to true/false")
        ports[port] = up
    return address, {"handshake_age_s": age, "reachable": reachable,
                     "rtt_ms": None if rtt is None else round(float(rtt), 1), "ports": ports}


def validate_host_health(hostname, entry):
    """(hostname, counters): whole numbers, the parts no more than the requests."""
    host = normalize_hostname(hostname, "hosts")
    where = f"hosts[{host!r}]"
    if not isinstance(entry, dict) or sorted(entry) != sorted(HOST_HEALTH_FIELDS):
        raise invalid("hosts", f"{where} must be an object of exactly "
                               + ", ".join(HOST_HEALTH_FIELDS))
    counts = {key: health_int(entry[key], "hosts", f"{where}.{key}", COUNT_MAX)
              for key in HOST_HEALTH_FIELDS}
    if counts["status_4xx"] + counts["status_5xx"] > counts["requests"] \
            or counts["upstream_errors"] > counts["requests"]:
        raise invalid("hosts", f"{where}: the counts add up to more than its requests")
    return host, counts


def validate_health(body):
    """The measurements of a status report: {"interval_s", "origins", "hosts"}, each checked;
    None when the report has none (an agent from before 0.3)."""
    if not any(field in body for field in HEALTH_FIELDS):
        return None
    interval = health_int(body.get("interval_s", DEFAULT_POLL_INTERVAL), "interval_s",
                          "interval_s", 86400)
    origins = dict(validate_origin_health(address, entry) for address, entry
                   in health_map(body.get("origins", {}), "origins").items())
    hosts = dict(validate_host_health(name, entry) for name, entry
                 in health_map(body.get("hosts", {}), "hosts").items())
    return {"interval_s": interval, "origins": origins, "hosts": hosts}


def known_health(db, health):
    """`health` with only the origins (by wg_ip) and hostnames this control plane has: an
    edge's report can say nothing about what is not its to serve."""
    if health is None:
        return None
    known_ips = {row[0] for row in db.execute(
        "SELECT wg_ip FROM origins WHERE wg_ip IN (SELECT value FROM json_each(?))",
        (json.dumps(list(health["origins"])),))}
    known_hosts = {row[0] for row in db.execute(
        "SELECT hostname FROM routes WHERE hostname IN (SELECT value FROM json_each(?))",
        (json.dumps(list(health["hosts"])),))}
    return {**health,
            "origins": {k: v for k, v in health["origins"].items() if k in known_ips},
            "hosts": {k: v for k, v in health["hosts"].items() if k in known_hosts}}


def edge_health(row):
    """The last measurements an edge reported ({} keys when none)."""
    stored = row["health"] if "health" in row.keys() else None
    health = json.loads(stored) if stored else {}
    return {"interval_s": health.get("interval_s") or DEFAULT_POLL_INTERVAL,
            "origins": health.get("origins", {}), "hosts": health.get("hosts", {})}


def edge_state(last_seen, interval, now):
    """online / stale (no poll for 3 intervals) / offline (10) / never."""
    if last_seen is None:
        return "never"
    quiet = now - parse_iso_time(last_seen)
    if quiet > max(OFFLINE_POLLS * interval, OFFLINE_MIN_SECONDS):
        return "offline"
    if quiet > max(STALE_POLLS * interval, STALE_MIN_SECONDS):
        return "stale"
    return "online"


def site_certificate_state(hostname, edges, now):
    """{"state": valid|expiring|pending|failed|none, "not_after", "error"} of a hostname's
    certificate, from what the edges that serve it report. The one place that reads
    certificate states (it will read the fleet's certificates table instead)."""
    reports = [edge["certificates"][hostname] for edge in edges
               if edge["state"] != "offline" and hostname in edge["certificates"]]
    valid = [r for r in reports if r["status"] == "valid"]
    if valid:
        dates = sorted(r["not_after"] for r in valid if r.get("not_after"))
        not_after = dates[0] if dates else None
        soon = not_after is not None and parse_iso_time(not_after) - now \
            < CERT_EXPIRING_DAYS * 86400
        return {"state": "expiring" if soon else "valid", "not_after": not_after,
                "error": None}
    for state in ("failed", "pending"):
        found = [r for r in reports if r["status"] == state]
        if found:
            return {"state": state, "not_after": found[0].get("not_after"),
                    "error": found[0].get("error")}
    return {"state": "none", "not_after": None, "error": None}


def fleet_edges(db, configs, last_seen, now, not_before):
    """Every edge as sites_view judges it: state, health, sync, what its schema leaves out.
    Polls are counted missed only from `not_before` on (when this control plane started: it
    cannot know of polls while it was down)."""
    edges = []
    for row in query_edges(db):
        health = edge_health(row)
        seen = last_seen(row["id"]) or row["last_seen"]
        judged = seen and max(seen, iso_time(not_before))
        config_hash, _, unserved = configs[edge_schema(row)]
        edges.append({"id": row["id"], "name": row["name"], "last_seen": seen,
                      "state": edge_state(judged, health["interval_s"], now), **health,
                      "in_sync": row["applied_hash"] == config_hash,
                      "status_ok": row["status_ok"], "last_error": row["last_error"],
                      "certificates": json.loads(row["certificates"]),
                      "unserved": unserved})
    return edges


def reason(kind, edge, message):
    """One entry of a site's reasons."""
    return {"kind": kind, "edge_id": edge and edge["id"], "edge_name": edge and edge["name"],
            "message": message}


def edge_site_reasons(edge, route):
    """(whether `edge` serves the route's hostname, the reasons it says about it)."""
    host, name = route["hostname"], edge["name"]
    if edge["state"] in ("never", "offline"):
        seen = edge["last_seen"]
        return False, [] if seen is None else [
            reason("edge", edge, f"edge {name} is offline (last poll {seen})")]
    if host in edge["unserved"]:
        return False, [reason("unserved", edge, f"edge {name} does not serve it: "
                                                f"{edge['unserved'][host]}")]
    reasons = []
    if edge["state"] == "stale":
        reasons.append(reason("edge", edge, f"edge {name} has not polled since "
                                            f"{edge['last_seen']}"))
    if not edge["in_sync"]:
        reasons.append(reason("sync", edge, f"edge {name} has not applied the latest config"))
    if edge["status_ok"] == 0:
        reasons.append(reason("sync", edge, f"edge {name} reports an error: "
                                            f"{(edge['last_error'] or '')[:300]}"))
    serving = True
    probe = edge["origins"].get(route["origin_wg_ip"])
    if probe is not None:
        port_up = probe["ports"].get(str(route["target_port"]), probe["reachable"])
        age = probe["handshake_age_s"]
        old = age is not None and age > HANDSHAKE_OLD_SECONDS
        if port_up is False or (old and port_up is not True):
            serving = False
            why = f"; its last WireGuard handshake was {age} s ago" if old else ""
            reasons.append(reason("origin", edge, f"edge {name} cannot connect to origin "
                                  f"{route['origin_name']} on port {route['target_port']}"
                                  f"{why}"))
    counts = edge["hosts"].get(host)
    if counts and counts["requests"] >= ERROR_RATE_MIN_REQUESTS:
        failed = max(counts["status_5xx"], counts["upstream_errors"])
        if failed >= ERROR_RATE_DEGRADED * counts["requests"]:
            reasons.append(reason("error_rate", edge, f"edge {name}: {failed} of "
                                  f"{counts['requests']} requests failed (5xx or no answer "
                                  f"from the origin) in {counts['window_s']} s"))
    return serving, reasons


def site_json(route, edges, now):
    """One site of GET /api/v1/sites."""
    certificate = site_certificate_state(route["hostname"], edges, now)
    traffic = dict.fromkeys(HOST_HEALTH_FIELDS, 0)
    for edge in edges:
        counts = edge["hosts"].get(route["hostname"]) if edge["state"] != "offline" else None
        for key in HOST_HEALTH_FIELDS if counts else ():
            traffic[key] = max(traffic[key], counts[key]) if key == "window_s" \
                else traffic[key] + counts[key]
    site = {"hostname": route["hostname"], "route_id": route["id"],
            "origin_id": route["origin_id"], "origin_name": route["origin_name"],
            "state": "disabled", "reasons": [],
            "certificate": {"state": certificate["state"],
                            "not_after": certificate["not_after"]},
            "traffic": traffic}
    if not route["enabled"]:
        return site
    serving, reasons = [], []
    for edge in edges:
        serves, said = edge_site_reasons(edge, route)
        serving.append(serves)
        reasons += said
    down = not any(serving)
    if down and not reasons:
        reasons.append(reason("edge", None, "no edge serves it yet"))
    cert_state = certificate["state"]
    if cert_state in ("failed", "pending", "expiring"):
        down = down or cert_state == "failed"
        reasons.append(reason("certificate", None, {
            "failed": f"no valid certificate: {(certificate['error'] or 'issuance failed')}"
                      [:300],
            "pending": "waiting for its certificate (the fallback one is served meanwhile)",
            "expiring": f"its certificate expires at {certificate['not_after']}"}[cert_state]))
    site["reasons"] = reasons
    site["state"] = "down" if down else "degraded" if reasons else "ok"
    return site


def sites_view(db, configs, last_seen, now=None, not_before=0.0):
    """GET /api/v1/sites: every hostname's state and reasons, the edges' states, a summary.
    `configs` is {schema: (hash, body, unserved)}; last_seen(edge_id) the in-memory poll
    time (or None); not_before, when this control plane started."""
    now = time.time() if now is None else now
    edges = fleet_edges(db, configs, last_seen, now, not_before)
    sites = [site_json(route, edges, now) for route in db.execute(
        """
        SELECT r.id, r.hostname, r.origin_id, r.target_port, r.enabled,
               o.name AS origin_name, o.wg_ip AS origin_wg_ip
          FROM routes AS r
          JOIN origins AS o ON o.id = r.origin_id
         ORDER BY r.hostname""")]
    summary = {"sites": dict.fromkeys(("ok", "degraded", "down", "disabled"), 0),
               "edges": dict.fromkeys(("online", "stale", "offline", "never"), 0),
               "certificates": {"expiring": 0, "failed": 0}}
    for site in sites:
        summary["sites"][site["state"]] += 1
        if site["state"] != "disabled" and site["certificate"]["state"] in ("expiring",
                                                                             "failed"):
            summary["certificates"][site["certificate"]["state"]] += 1
    for edge in edges:
        summary["edges"][edge["state"]] += 1
    return {"sites": sites, "summary": summary, "edges": [
        {"id": e["id"], "name": e["name"], "state": e["state"], "last_seen": e["last_seen"]}
        for e in edges], "_fleet": edges}


# Alert events: a condition (key -> event, subject, message) holds now or not; each change is
# sent once, when it starts and when it clears.

def alert_conditions(view):
    """{key: (event, subject, message)} of what is wrong now, from sites_view()."""
    found = {}
    for edge in view["_fleet"]:
        if edge["state"] == "offline":
            found[f"edge_offline:{edge['id']}"] = (
                "edge_offline", edge["name"],
                f"edge {edge['name']} is offline: no poll since {edge['last_seen']}")
        if edge["status_ok"] == 0 and edge["state"] != "never":
            found[f"edge_apply_failed:{edge['id']}"] = (
                "edge_apply_failed", edge["name"], f"edge {edge['name']} failed to apply its "
                f"config: {(edge['last_error'] or 'unknown error')[:300]}")
    origins = collections.defaultdict(list)
    for site in view["sites"]:
        if site["state"] == "disabled":
            continue
        host, cert = site["hostname"], site["certificate"]
        if cert["state"] == "failed":
            found[f"certificate_failing:{host}"] = (
                "certificate_failing", host, f"{host} has no valid certificate")
        elif cert["state"] == "expiring":
            found[f"certificate_expiring:{host}"] = (
                "certificate_expiring", host,
                f"the certificate of {host} expires at {cert['not_after']}")
        if site["state"] == "down":
            found[f"site_down:{host}"] = ("site_down", host, f"{host} is down: " + "; ".join(
                r["message"] for r in site["reasons"])[:600])
        origin_down = [r for r in site["reasons"] if r["kind"] == "origin"]
        origins[site["origin_id"], site["origin_name"]].append(bool(origin_down))
    for (origin_id, origin_name), down in origins.items():
        if all(down):
            found[f"origin_down:{origin_id}"] = (
                "origin_down", origin_name,
                f"origin {origin_name} does not answer the edges on any of its routes")
    return found


def apply_alert_conditions(db, current):
    """Store the conditions that hold now; returns the changes as (state, event, subject,
    message) with state "firing" or "resolved". One transaction: two evaluations at once
    cannot both send a change."""
    changes = []
    with transaction(db):
        stored = {row["key"]: row for row in db.execute("SELECT * FROM alert_conditions")}
        for key in sorted(current.keys() - stored.keys()):
            event, subject, message = current[key]
            db.execute("""
                INSERT INTO alert_conditions (key, event, subject, message, since)
                VALUES (?, ?, ?, ?, ?)""", (key, event, subject, message, utc_now()))
            changes.append(("firing", event, subject, message))
        for key in sorted(stored.keys() - current.keys()):
            row = stored[key]
            db.execute("DELETE FROM alert_conditions WHERE key = ?", (key,))
            changes.append(("resolved", row["event"], row["subject"],
                            f"resolved: {row['message']}"))
    return changes


# Alert targets

def validate_alert_url(value):
    """(url, url_display): an http(s) URL of at most 2048 ASCII characters, without
    credentials or a fragment; url_display is its scheme and host only."""
    message = ("url must be an http:// or https:// URL of at most 2048 characters, in ASCII "
               "(punycode, %-escapes), without user:password@ or #fragment")
    if not isinstance(value, str) or len(value) > 2048 or not value.isascii() \
            or any(c.isspace() or not c.isprintable() for c in value):
        raise invalid("url", message)
    parts = urllib.parse.urlsplit(value)
    try:
        parts.port                   # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise invalid("url", message) from None
    host = parts.hostname or ""
    if parts.scheme.lower() not in ("http", "https") or "%" in host \
            or not (is_ip_address(host) or all(LABEL_RE.fullmatch(label)
                                               for label in host.rstrip(".").split("."))) \
            or parts.username is not None or parts.password is not None or parts.fragment \
            or "@" in parts.netloc:
        raise invalid("url", message)
    return value, f"{parts.scheme.lower()}://{parts.netloc.lower()}/…"


def validate_alert_events(value):
    """A non-empty list of ALERT_EVENTS, deduplicated, in ALERT_EVENTS order."""
    if not isinstance(value, list) or not value \
            or any(not isinstance(v, str) or v not in ALERT_EVENTS for v in value):
        raise invalid("events", "events must be a non-empty list of " + ", ".join(ALERT_EVENTS))
    return [event for event in ALERT_EVENTS if event in value]


def alert_target_json(row):
    """The public JSON of an alert target: never its URL, only scheme and host."""
    return {"id": row["id"], "name": row["name"], "url_display": row["url_display"],
            "format": row["format"], "events": json.loads(row["events"]),
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def get_alert_target_row(db, target_id):
    """The alert target row with `target_id`, or 404."""
    return one_or_404(lambda d, i: d.execute("SELECT * FROM alert_targets WHERE id = ?",
                                             (i,)).fetchall(), db, target_id, "alert target")


def alert_target_values(keyring, target_id, body, current, required=()):
    """The columns of a target from `body`, each validated, the others as in `current`;
    every field at fault (or `required` and absent) is named at once (raise_gathered)."""
    errors = [invalid(field, f"{field} is required") for field in required
              if body.get(field) is None]
    given = {field: body[field] for field in ("name", "url", "format", "events")
             if field in body and not (field in required and body[field] is None)}
    name = gather(errors, validate_name, given["name"]) if "name" in given else None
    url = gather(errors, validate_alert_url, given["url"]) if "url" in given else None
    if "format" in given:
        gather(errors, validate_alert_format, given["format"])
    events = gather(errors, validate_alert_events, given["events"]) if "events" in given \
        else None
    raise_gathered(errors)
    values = dict(current)
    if name is not None:
        values["name"], values["name_key"] = name, name_key(name)
    if url is not None:
        values["url_display"] = url[1]
        values["url_enc"] = keyring.seal(url[0].encode(), secret_aad("alert_targets", target_id,
                                                                     "url"))
    if "format" in given:
        values["format"] = given["format"]
    if events is not None:
        values["events"] = json.dumps(events)
    return values


def validate_alert_format(value):
    """One of ALERT_FORMATS."""
    if value not in ALERT_FORMATS:
        raise invalid("format", "format must be one of " + ", ".join(ALERT_FORMATS))
    return value


def insert_alert_target(db, keyring, body):
    """Validate and insert an alert target; returns its row."""
    check_fields(body, ALERT_TARGET_FIELDS)
    target_id = new_id()
    values = alert_target_values(keyring, target_id, body, {
        "format": "json", "events": json.dumps(list(ALERT_EVENTS))}, required=("name", "url"))
    with transaction(db):
        check_unique(db, "alert_targets", "name_key", values["name_key"], "name")
        now = utc_now()
        db.execute("""
            INSERT INTO alert_targets (id, name, name_key, url_enc, url_display, format,
                                       events, created_at, updated_at)
            VALUES (:id, :name, :name_key, :url_enc, :url_display, :format, :events, :now,
                    :now)""", {"id": target_id, "now": now, **values})
    return get_alert_target_row(db, target_id)


def patch_alert_target(db, keyring, target_id, body):
    """Validate and apply a partial update to an alert target; returns its row."""
    check_fields(body, ALERT_TARGET_FIELDS)
    with transaction(db):
        row = get_alert_target_row(db, target_id)
        values = alert_target_values(keyring, target_id, body, dict(row))
        check_unique(db, "alert_targets", "name_key", values["name_key"], "name", target_id)
        db.execute("""
            UPDATE alert_targets
               SET name = :name, name_key = :name_key, url_enc = :url_enc,
                   url_display = :url_display, format = :format, events = :events,
                   updated_at = :now
             WHERE id = :id""", {**values, "id": target_id, "now": utc_now()})
    return get_alert_target_row(db, target_id)


def delivery_json(row):
    """One entry of a target's deliveries."""
    return {"id": row["id"], "event": row["event"], "state": row["state"],
            "status_code": row["status_code"], "attempts": row["attempts"],
            "created_at": row["created_at"], "last_attempt_at": row["last_attempt_at"],
            "error": row["error"], "message": row["message"]}


def insert_deliveries(db, changes, only_target=None):
    """A pending delivery per (change, target that wants its event), the oldest beyond
    ALERT_DELIVERIES_KEPT per target dropped; returns [(delivery id, target id)]."""
    made = []
    with transaction(db):
        targets = db.execute("SELECT id, events FROM alert_targets WHERE id = ? OR ? IS NULL",
                             (only_target, only_target)).fetchall()
        for state, event, subject, message in changes:
            for target in targets:
                if event != "test" and event not in json.loads(target["events"]):
                    continue
                delivery_id = new_id()
                db.execute("""
                    INSERT INTO alert_deliveries (id, target_id, event, state, attempts,
                                                  created_at, resolved, subject, message)
                    VALUES (?, ?, ?, 'pending', 0, ?, ?, ?, ?)""",
                           (delivery_id, target["id"], event, utc_now(),
                            int(state == "resolved"), subject, message))
                made.append((delivery_id, target["id"]))
        for target_id in {target_id for _, target_id in made}:
            db.execute("""
                DELETE FROM alert_deliveries
                 WHERE target_id = :t AND rowid NOT IN (
                       SELECT rowid FROM alert_deliveries WHERE target_id = :t
                        ORDER BY created_at DESC, rowid DESC LIMIT :keep)""",
                       {"t": target_id, "keep": ALERT_DELIVERIES_KEPT})
    return made


def webhook_request(fmt, delivery, public_url):
    """(body bytes, headers) of one alert in a target's format."""
    state = "resolved" if delivery["resolved"] else "firing"
    if delivery["event"] == "test":
        state = "test"
    title = f"Kokoa {delivery['event'].replace('_', ' ')}" + (
        " resolved" if state == "resolved" else "")
    text = f"[{title}] {delivery['message']}"
    if fmt == "slack":
        return json.dumps({"text": text}).encode(), {"Content-Type": JSON_TYPE}
    if fmt == "discord":
        return json.dumps({"content": text[:2000], "username": "Kokoa"}).encode(), {
            "Content-Type": JSON_TYPE}
    if fmt == "ntfy":
        header_title = title if title.isascii() else \
            "=?UTF-8?B?" + base64.b64encode(title.encode()).decode() + "?="
        return delivery["message"].encode(), {
            "Content-Type": "text/plain; charset=utf-8", "Title": header_title,
            "Tags": "white_check_mark" if state != "firing" else "warning",
            "Priority": "high" if state == "firing" else "default"}
    return json.dumps({"event": delivery["event"], "state": state,
                       "subject": delivery["subject"], "message": delivery["message"],
                       "time": delivery["created_at"], "kokoa": public_url or None}).encode(), {
        "Content-Type": JSON_TYPE}


def post_webhook(url, body, headers, timeout):
    """POST `body` to `url`; the response's status code. Connect and each read wait at most
    `timeout` s, the whole exchange at most twice that; no redirect is followed."""
    parts = urllib.parse.urlsplit(url)
    connection = (http.client.HTTPSConnection if parts.scheme.lower() == "https"
                  else http.client.HTTPConnection)(parts.hostname, parts.port, timeout=timeout)
    def cut():
        with contextlib.suppress(OSError, AttributeError):
            connection.sock.shutdown(socket.SHUT_RDWR)
    guard = threading.Timer(2 * timeout, cut)
    guard.daemon = True
    guard.start()
    try:
        connection.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query
                                                          else ""), body,
                           {**headers, "User-Agent": f"kokoa/{__version__}"})
        return connection.getresponse().status
    finally:
        guard.cancel()
        connection.close()


def without_url_path(text, url):
    """`text` with the path and query of `url` (where a webhook keeps its secret) cut out."""
    parts = urllib.parse.urlsplit(url)
    for secret in (parts.path + (f"?{parts.query}" if parts.query else ""), parts.path,
                   parts.query):
        if len(secret) > 1:
            text = text.replace(secret, "/…")
    return text


class AlertSender:
    """Delivers alert deliveries from a bounded queue in one background thread: retries after
    each of `delays` s, records every attempt; a slow or hanging receiver delays only the
    other alerts, never a request."""

    def __init__(self, config):
        self.config = config
        self.queue = queue.Queue(ALERT_QUEUE_SIZE)
        self._retries = []          # heap of (due, sequence, delivery id)
        self._sequence = 0
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    def submit(self, delivery_ids):
        """Queue deliveries (their rows exist); those the full queue refuses are failed."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kokoa-alerts",
                                                daemon=True)
                self._thread.start()
        refused = []
        for delivery_id in delivery_ids:
            try:
                self.queue.put_nowait(delivery_id)
            except queue.Full:
                refused.append(delivery_id)
        if refused:
            log.warning("alert queue full: %d delivery(ies) dropped", len(refused))
            db = connect(self.config.db_path)
            try:
                for delivery_id in refused:
                    self.record(db, delivery_id, "failed", None, "the alert queue was full")
            finally:
                db.close()

    def close(self):
        """Stop the thread (pending deliveries stay pending)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.config.alert_timeout + 1)

    def _run(self):
        while not self._stop.is_set():
            wait = 0.5 if not self._retries else max(0.0, self._retries[0][0] - time.monotonic())
            try:
                delivery_id = self.queue.get(timeout=min(wait, 0.5))
                self._push(0.0, delivery_id)
            except queue.Empty:
                pass
            while self._retries and self._retries[0][0] <= time.monotonic():
                _, _, delivery_id = heapq.heappop(self._retries)
                try:
                    self.attempt(delivery_id)
                except Exception:
                    log.exception("alert delivery %s failed unexpectedly", delivery_id)

    def _push(self, delay, delivery_id):
        self._sequence += 1
        heapq.heappush(self._retries, (time.monotonic() + delay, self._sequence, delivery_id))

    def attempt(self, delivery_id):
        """One try of a delivery; schedules the next or records the outcome."""
        db = connect(self.config.db_path)
        try:
            row = db.execute("""
                SELECT d.*, t.url_enc, t.format
                  FROM alert_deliveries AS d
                  JOIN alert_targets AS t ON t.id = d.target_id
                 WHERE d.id = ? AND d.state = 'pending'""", (delivery_id,)).fetchone()
            if row is None:                 # target deleted, or pruned
                return
            status, error, final = None, None, False
            try:
                url = self.config.keyring.unseal(
                    row["url_enc"], secret_aad("alert_targets", row["target_id"], "url")).decode()
                body, headers = webhook_request(row["format"], row, self.config.public_url)
                status = post_webhook(url, body, headers, self.config.alert_timeout)
                if not 200 <= status < 300:
                    error = f"the receiver answered HTTP {status}"
            except SecretError as err:
                error, final = f"the URL cannot be decrypted: {err}", True
            except (OSError, ValueError, http.client.HTTPException) as err:
                error = without_url_path(f"{type(err).__name__}: {err}", url)[:200]
            attempts = row["attempts"] + 1
            retry = error is not None and not final \
                and attempts <= len(self.config.alert_retry_delays)
            state = "delivered" if error is None else "pending" if retry else "failed"
            self.record(db, delivery_id, state, status, error, attempts)
            if retry:
                self._push(self.config.alert_retry_delays[attempts - 1], delivery_id)
        finally:
            db.close()

    @staticmethod
    def record(db, delivery_id, state, status, error, attempts=None):
        """Store the outcome of an attempt (the error never names the URL's path)."""
        db.execute("""
            UPDATE alert_deliveries
               SET state = ?, status_code = ?, error = ?, last_attempt_at = ?,
                   attempts = coalesce(?, attempts)
             WHERE id = ?""", (state, status, error, utc_now(), attempts, delivery_id))


class DbContext:
    """What EdgeConfigCache.get needs of a request: a database connection."""

    def __init__(self, db):
        self.db = db


class HealthMonitor:
    """Evaluates the fleet's health in a background thread, every `health_tick` s and at once
    after a status report, and hands each change of an alert condition to the AlertSender."""

    def __init__(self, app):
        self.app = app
        self.sender = AlertSender(app.config)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        """Start the evaluator thread (serve does; tests that need alerts do). Deliveries left
        pending by a previous run (their retries lived in its memory) are failed first."""
        if self._thread is None:
            db = connect(self.app.config.db_path)
            try:
                db.execute("""
                    UPDATE alert_deliveries
                       SET state = 'failed', error = 'interrupted by a restart of the control plane'
                     WHERE state = 'pending'""")
            finally:
                db.close()
            self._thread = threading.Thread(target=self._run, name="kokoa-health",
                                            daemon=True)
            self._thread.start()
        return self

    def wake(self):
        """Ask for an evaluation now (cheap; the thread does the work)."""
        self._wake.set()

    def close(self):
        """Stop both threads."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sender.close()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.evaluate()
            except Exception:
                log.exception("health evaluation failed")
            self._wake.wait(self.app.config.health_tick)
            self._wake.clear()

    def view(self, db):
        """sites_view() of the database as this app's caches see it."""
        context = DbContext(db)
        configs = {schema: self.app.edge_config.get(context, schema) for schema in SCHEMAS}
        return sites_view(db, configs, self.app.last_seen.get, not_before=self.app.started)

    def evaluate(self):
        """Compare what is wrong now with what was; queue a delivery for each change."""
        db = connect(self.app.config.db_path)
        try:
            changes = apply_alert_conditions(db, alert_conditions(self.view(db)))
            for state, event, subject, _ in changes:
                log.info("alert %s: %s %s", state, event, subject)
            made = insert_deliveries(db, changes) if changes else []
        finally:
            db.close()
        if made:
            self.sender.submit([delivery_id for delivery_id, _ in made])


# Stored rows, checked again (a backup to restore may have been crafted)

def as_stored(value, normalised, field):
    """400 naming `field` unless a stored value is exactly what the API would have stored."""
    if value != normalised:
        raise invalid(field, f"{field} is not in the form the API stores")


def optional(check, value, *args):
    """check(value, *args) unless value is None."""
    return None if value is None else check(value, *args)


def check_hex64(value, field):
    """64 lower-case hex digits (a token hash, a config hash)."""
    if not isinstance(value, str) or not HEX64_RE.fullmatch(value):
        raise invalid(field, f"{field} must be 64 hex digits")
    return value


def check_id(value, field="id"):
    """A UUIDv4 as new_id() makes them."""
    if not isinstance(value, str) or not UUID_RE.fullmatch(value):
        raise invalid(field, f"{field} must be a UUIDv4")
    return value


def check_named_row(row, network):
    """The columns origins and edge nodes share."""
    check_id(row["id"])
    as_stored(row["name"], validate_name(row["name"]), "name")
    as_stored(row["name_key"], name_key(row["name"]), "name_key")
    as_stored(row["wg_ip"], optional(validate_wg_ip, row["wg_ip"], network), "wg_ip")
    key = optional(validate_wg_key, row["wg_public_key"], "wg_public_key")
    as_stored(row["wg_public_key"], key and key[0], "wg_public_key")
    as_stored(row["wg_endpoint"], validate_endpoint(row["wg_endpoint"]), "wg_endpoint")


def check_edge_row(row, network):
    check_named_row(row, network)
    check_hex64(row["token_hash"], "token_hash")
    optional(check_hex64, row["applied_hash"], "applied_hash")
    optional(check_text, row["last_error"], "last_error", 4000, True)
    validate_certificates(json.loads(row["certificates"]))
    columns = row.keys()
    if "agent_version" in columns:
        validate_agent_version(row["agent_version"])
        if row["agent_schema"] is not None and row["agent_schema"] not in SCHEMAS:
            raise invalid("agent_schema", f"agent_schema must be one of {SCHEMAS}")
    if "health" in columns and row["health"] is not None:
        health = json.loads(row["health"])
        if not isinstance(health, dict) or not validate_health(health):
            raise invalid("health", "health is not an edge's measurements")


def check_route_row(row, network):
    check_id(row["id"])
    check_id(row["origin_id"], "origin_id")
    as_stored(row["hostname"], normalize_route_hostname(row["hostname"]), "hostname")
    validate_port(row["target_port"])
    if "access_policy_id" in row.keys():
        optional(check_id, row["access_policy_id"], "access_policy_id")


def check_access_policy_row(row, network):
    """Every column as validate_policy would have stored it (the forward-auth origin's
    existence is the foreign key check's)."""
    check_id(row["id"])
    stored = policy_of(row)
    users = stored["users"]
    if not isinstance(users, list) or not all(isinstance(user, dict) for user in users):
        raise invalid("users", "users is not in the form the API stores")
    request = {**stored, "users": [{"username": user.get("username"),
                                    "password_hash": user.get("hash")} for user in users]}
    forward = request.pop("forward_auth")      # checked here: the origin needs no query
    if forward is not None:
        check_id(forward["origin_id"], "forward_origin_id")
        validate_port(forward["port"], "forward_port")
        as_stored(forward["path"],
                  validate_uri_path(forward["path"], "forward_path", "forward_path"),
                  "forward_path")
        as_stored(forward["signin_url"], validate_signin_url(forward["signin_url"]),
                  "forward_signin_url")
    policy = validate_policy(None, request, {**POLICY_DEFAULTS, "forward_auth": forward})
    for field in ("name", "users", "allow", "deny", "require", "bypass_paths"):
        as_stored(stored[field], policy[field], field)
    as_stored(row["name_key"], name_key(row["name"]), "name_key")


def check_enrollment_key_row(row, network):
    check_id(row["id"])
    check_hex64(row["key_hash"], "key_hash")
    check_text(row["description"], "description", 200)


def check_setting_row(row, network):
    if row["key"] not in DEFAULT_SETTINGS:
        raise invalid("key", f"unknown setting {row['key']!r}")
    if not isinstance(json.loads(row["value"]), type(DEFAULT_SETTINGS[row["key"]])):
        raise invalid("value", f"setting {row['key']} has a value of the wrong type")


def check_origin_row(row, network):
    check_named_row(row, network)
    if "token_hash" in row.keys():
        optional(check_hex64, row["token_hash"], "token_hash")


def check_admin_session_row(row, network):
    check_id(row["id"])
    check_hex64(row["token_hash"], "token_hash")
    check_hex64(row["password_mac"], "password_mac")
    for field in ("created_at", "last_used_at"):
        try:
            as_stored(row[field], iso_time(parse_iso_time(row[field])), field)
        except (TypeError, ValueError):
            raise invalid(field, f"{field} is not an ISO 8601 UTC time") from None


def check_alert_target_row(row, network):
    check_id(row["id"])
    as_stored(row["name"], validate_name(row["name"]), "name")
    as_stored(row["name_key"], name_key(row["name"]), "name_key")
    if row["format"] not in ALERT_FORMATS:
        raise invalid("format", "format is not one of " + ", ".join(ALERT_FORMATS))
    events = json.loads(row["events"])
    as_stored(events, validate_alert_events(events), "events")
    if not isinstance(row["url_enc"], bytes) or len(row["url_enc"]) < 1 + KEY_ID_BYTES \
            + NONCE_BYTES + 16:
        raise invalid("url_enc", "url_enc is not a sealed secret")
    if not isinstance(row["url_display"], str) \
            or not re.fullmatch(r"https?://[A-Za-z0-9.:\[\]_-]{1,300}/…", row["url_display"]):
        raise invalid("url_display", "url_display is not a URL's scheme and host")


def check_alert_delivery_row(row, network):
    check_id(row["id"])
    check_id(row["target_id"], "target_id")
    if row["event"] not in (*ALERT_EVENTS, "test"):
        raise invalid("event", "event is not an alert event")
    for field, limit in (("subject", 300), ("message", 1000), ("error", 400)):
        optional(check_text, row[field], field, limit)


def check_alert_condition_row(row, network):
    if row["event"] not in ALERT_EVENTS or not isinstance(row["key"], str) \
            or not row["key"].startswith(row["event"] + ":") or len(row["key"]) > 400:
        raise invalid("key", "key is not an alert condition")
    check_text(row["subject"], "subject", 300)
    check_text(row["message"], "message", 1000)


ROW_CHECKS = {"origins": check_origin_row, "edge_nodes": check_edge_row,
              "routes": check_route_row, "enrollment_keys": check_enrollment_key_row,
              "settings": check_setting_row, "access_policies": check_access_policy_row,
              "admin_sessions": check_admin_session_row,
              "alert_targets": check_alert_target_row,
              "alert_deliveries": check_alert_delivery_row,
              "alert_conditions": check_alert_condition_row}


def stored_row_problems(db, network):
    """Every row checked with the API's own validators, and every reference: a list of
    "table row: message" (empty when the database could have come from the API)."""
    problems = [f"{table} row {rowid}: refers to a missing {parent} row"
                for table, rowid, parent, _ in db.execute("PRAGMA foreign_key_check")]
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = ?",
                                             ("table",))}
    for table, check in ROW_CHECKS.items():
        if table not in tables:         # a backup from before the migration that made it
            continue
        for row in db.execute(f"SELECT * FROM {quote_identifier(table)}"):
            try:
                check(row, network)
            except HTTPError as err:
                problems.append(f"{table} row {str(row[0])[:64]!r}: {err.message}")
            except (ValueError, TypeError):        # certificates that are not JSON, ...
                problems.append(f"{table} row {str(row[0])[:64]!r}: a value is not valid JSON")
    return problems


# The edge config

def upstream_address(wg_ip, port):
    """ip:port with IPv6 in brackets."""
    host = f"[{wg_ip}]" if ":" in wg_ip else wg_ip
    return f"{host}:{port}"


def wireguard_peers(origins):
    """The peers every edge needs: one per origin, sorted by public key."""
    peers = []
    for origin in origins:
        prefix = 128 if ":" in origin["wg_ip"] else 32
        peer = {"public_key": origin["wg_public_key"],
                "allowed_ips": [f"{origin['wg_ip']}/{prefix}"]}
        if origin["wg_endpoint"]:
            peer["endpoint"] = origin["wg_endpoint"]
        peers.append(peer)
    return sorted(peers, key=lambda peer: peer["public_key"])


# Keys of a route object (the schema-2 form) that each schema can carry. A route with any
# other key set (a protection the schema's agents cannot enforce) is left out of that schema's
# payload and listed as unserved: never served without it.
SCHEMA_ROUTE_KEYS = {1: frozenset({"upstream"}),
                     2: frozenset({"upstream", "max_body_size", "buffering", "hsts", "access"})}
SCHEMA_ROUTE_KEYS[3] = SCHEMA_ROUTE_KEYS[2]     # schema 3: wildcards, fleet certificates
# Options that a schema without them may leave out: its agents then serve the route as 0.1.0
# did (a 1 MiB body limit, buffered responses, no HSTS), which protects no less.
DROPPABLE_ROUTE_KEYS = frozenset({"max_body_size", "buffering", "hsts"})


def policy_payload(policy, verifier_wg_ip):
    """An access policy (as validate_policy gives it) in the payload form: no id, no name;
    the forward-auth verifier as an upstream inside the tunnel network."""
    forward = policy["forward_auth"]
    if forward is not None:
        forward = {"upstream": upstream_address(verifier_wg_ip, forward["port"]),
                   "path": forward["path"], "signin_url": forward["signin_url"]}
    return {"users": policy["users"], "allow": policy["allow"], "deny": policy["deny"],
            "require": policy["require"], "bypass_paths": policy["bypass_paths"],
            "forward_auth": forward, "pass_authorization": policy["pass_authorization"]}


def policy_key(policy):
    """The name a payload gives a policy: 16 hex digits of the SHA-256 of its payload form."""
    return sha256_hex(canonical_json(policy))[:16]


def policy_payloads(db):
    """{policy id: payload form} of every access policy."""
    return {row["id"]: policy_payload(policy_of(row), row["verifier_wg_ip"])
            for row in db.execute(
                """
                SELECT p.*, o.wg_ip AS verifier_wg_ip
                  FROM access_policies AS p
                  LEFT JOIN origins AS o ON o.id = p.forward_origin_id""")}


def route_objects(db):
    """{hostname: route object} of every enabled route: the desired state, in the schema-2
    form but with `access` the policy itself (absent: public), which a payload names by its
    key (a disabled route is kept in the database but served by no edge)."""
    policies = policy_payloads(db)
    cursor = db.cursor()
    cursor.row_factory = None       # tuples: looking 100,000 rows' columns up by name is slow
    routes = {}
    for hostname, port, max_body_size, buffering, hsts, policy_id, wg_ip in cursor.execute(
            """
            SELECT r.hostname, r.target_port, r.max_body_size, r.buffering, r.hsts,
                   r.access_policy_id, o.wg_ip
              FROM routes AS r
              JOIN origins AS o ON o.id = r.origin_id
             WHERE r.enabled"""):
        route = routes[hostname] = {"upstream": upstream_address(wg_ip, port),
                                    "max_body_size": max_body_size,
                                    "buffering": bool(buffering), "hsts": bool(hsts)}
        if policies.get(policy_id) is not None:
            route["access"] = policies[policy_id]
    return routes


def unserved_reason(route, schema, servable):
    """Why `schema` cannot carry `route` (None if it can); `servable` is the route keys it
    may carry (or drop): SCHEMA_ROUTE_KEYS[schema] | DROPPABLE_ROUTE_KEYS."""
    if route.keys() <= servable:
        return None
    extra = [key for key in route.keys() - servable if route[key] is not None]
    if not extra:
        return None
    return (f"needs {', '.join(sorted(extra))}, which schema {schema} agents cannot enforce: "
            "upgrade the edge's agent")


def edge_payload(routes, peers, staging, schema):
    """The edge payload of one schema, with its config_hash, and the routes left out of it.

    A pure function of its inputs (DESIGN.md "Edge config" and "Schema negotiation"):
    `routes` maps hostname -> route object. Returns (payload dict, {hostname: reason}).
    """
    if schema not in SCHEMAS:
        raise ValueError(f"unknown edge payload schema {schema!r}")
    payload, unserved, _ = edge_payloads(routes, peers, staging, (schema,))[schema]
    return payload, unserved


def schema_route(route, keys, defaults):
    """A served route's object in a schema-2+ payload (its policy named by its key): its
    fields among the schema's `keys`, `defaults` for those it does not set."""
    found = defaults | (route if route.keys() <= keys else {
        field: value for field, value in route.items() if field in keys})
    if found.get("access") is not None:
        found["access"] = policy_key(found["access"])
    return found


def served_routes(routes, schema):
    """({hostname: route} that `schema` can carry, {hostname: why not} of the others)."""
    unserved, served = {}, {}
    servable = SCHEMA_ROUTE_KEYS[schema] | DROPPABLE_ROUTE_KEYS
    for hostname, route in routes.items():
        reason = (unserved_reason(route, schema, servable)
                  or wildcard_unserved(hostname, schema))
        if reason is None:
            served[hostname] = route
        else:
            unserved[hostname] = reason
    return served, unserved


def edge_payloads(routes, peers, staging, schemas=SCHEMAS, keep_payloads=True):
    """edge_payload for each schema with its canonical JSON: {schema: (payload, unserved,
    body)} (without keep_payloads, payload is only {"config_hash": ...}). A route's `access`
    is the policy itself (absent: public): a payload names it by its policy_key and carries
    it in its top-level `access`.

    What schemas share (the served routes, the nginx map, the peers) is built and encoded
    once: with 10,000 routes, three schemas each rendering and encoding all of it twice took
    the first build from 0.06 s (one schema) past its 0.5 s target. An encoding (and without
    keep_payloads, a value) is kept only until the last schema that shares it has its body:
    100,000 routes took the server past its 300 MB target."""
    values = {("acme", None): {"staging": bool(staging)}, ("wireguard", None): {"peers": peers}}
    route_forms = {}        # (route keys of a schema, hostname) -> schema_route()

    def build_once(what, key, make, *args):
        if (what, key) not in values:
            values[what, key] = make(*args)
        return what, key

    layouts, unserved_of = {}, {}   # schema -> {payload field: (what, key)}, its unserved
    for schema in schemas:
        served, unserved_of[schema] = served_routes(routes, schema)
        served_key = frozenset(served)      # same names, same route objects: same parts
        upstreams = build_once("upstreams", served_key, served_upstreams, served)
        keepalive = UPSTREAM_KEEPALIVE[schema]
        layouts[schema] = layout = {
            "hostnames": build_once("hostnames", served_key, sorted, served),
            "routes": upstreams if schema == 1 else build_once(
                ("routes", SCHEMA_ROUTE_KEYS[schema]), served_key, served_forms, served,
                schema, route_forms),
            "acme": ("acme", None),
            "nginx_map": build_once("nginx_map", (keepalive, schema >= 3, served_key),
                                    render_nginx_map, values[upstreams], keepalive,
                                    schema >= 3),
            "wireguard": ("wireguard", None),
        }
        if schema > 1:
            values["schema", schema] = schema
            layout["schema"] = "schema", schema
            layout["access"] = build_once("access", served_key, served_policies, served)
    route_forms.clear()                 # the values hold those still needed
    uses = collections.Counter(key for layout in layouts.values() for key in layout.values())
    encoded, built = {}, {}
    for schema, layout in layouts.items():
        fields = {}
        for field, key in sorted(layout.items()):
            if key not in encoded:
                encoded[key] = canonical_json(values[key])
            fields[field] = encoded[key]
        payload = {field: values[key] for field, key in layout.items()} if keep_payloads else {}
        for key in layout.values():
            uses[key] -= 1
            if not uses[key]:
                del encoded[key]
                if not keep_payloads:
                    del values[key]
        config_hash = hashlib.sha256(json_object(fields)).hexdigest()
        fields["config_hash"] = canonical_json(config_hash)
        payload["config_hash"] = config_hash
        built[schema] = payload, unserved_of[schema], json_object(fields)
    return built


def json_object(fields):
    """canonical_json of a dict from {key: canonical_json(value)}."""
    pieces = [b"{"]
    for key in sorted(fields):
        pieces += [b"," if len(pieces) > 1 else b"", canonical_json(key), b":", fields[key]]
    return b"".join(pieces + [b"}"])


def served_upstreams(served):
    """{hostname: "ip:port"} of served routes (schema 1's routes, the nginx map's input)."""
    return {hostname: route["upstream"] for hostname, route in served.items()}


def served_forms(served, schema, forms):
    """{hostname: schema_route()} of served routes; `forms` keeps each route's form for the
    schemas that carry the same keys."""
    keys, found = SCHEMA_ROUTE_KEYS[schema], {}
    defaults = {field: ROUTE_OPTIONS.get(field) for field in keys}
    for hostname, route in served.items():
        if (keys, hostname) not in forms:
            forms[keys, hostname] = schema_route(route, keys, defaults)
        found[hostname] = forms[keys, hostname]
    return found


def served_policies(served):
    """{policy_key: policy} of the access policies served routes carry."""
    return {policy_key(route["access"]): route["access"]
            for route in served.values() if route.get("access")}


@contextlib.contextmanager
def garbage_collection_paused():
    """No cyclic garbage collection inside: a build of 100,000 routes makes a million objects,
    none of them garbage, and the collector walked them all again and again (a fifth of the
    build). Cycles made meanwhile, by any thread, are collected after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_edge_configs(db):
    """Every schema's payload from the database: {schema: (config_hash, body, unserved)}."""
    origins = db.execute("SELECT wg_ip, wg_public_key, wg_endpoint FROM origins").fetchall()
    with garbage_collection_paused():
        payloads = edge_payloads(route_objects(db), wireguard_peers(origins),
                                 read_settings(db)["acme_staging"], keep_payloads=False)
    return {schema: (payload["config_hash"], body, unserved)
            for schema, (payload, unserved, body) in payloads.items()}


# Fleet certificates (issue 15): claimed, issued once, shared; HTTP-01 and DNS-01 from any edge

CERT_PEM_MAX_BYTES = 65536          # each of fullchain and privkey
CERT_CHAIN_MAX = 10                 # certificates in one fullchain
CERT_BACKOFF_MAX = 21600            # the fleet's back-off of a failing name doubles up to 6 h
CERT_UPLOAD_FIELDS = ("fullchain", "privkey")
CERT_FAILURE_FIELDS = ("error",)
CERT_ERROR_MAX = 2000
ACME_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")           # RFC 8555 8.3: base64url
ACME_THUMBPRINT_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")      # base64url SHA-256 of the JWK
ACME_CHALLENGE_SECONDS = 600        # a published HTTP-01 token lives at most 10 min
ACME_CHALLENGES_PER_EDGE = 20
ACME_CHALLENGES_MAX = 10000
DNS_VALUE_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")           # base64url SHA-256 (RFC 8555 8.4)
DNS_CHALLENGE_TTL = 60
DNS_VISIBLE_SECONDS = 60.0          # how long a PUT waits for the zone's server to serve it
CERT_SIGNING_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
# What a CA's refusal means for an operator: a substring of certbot's detail -> a hint.
CERT_ERROR_HINTS = (
    ("connection refused", "is port 80 open on every edge the name's DNS points to?"),
    ("timeout", "does the name's DNS point only at edges that answer on port 80?"),
    ("no valid ip addresses", "the name has no A/AAAA record: point its DNS at the edges"),
    ("nxdomain", "the name does not exist in DNS: point its DNS at the edges"),
    ("404", "an edge answered 404 for the token: are all the name's edges running schema-3 "
            "agents that reach the control plane?"),
    ("ratelimited", "the CA's rate limit: the fleet waits before it tries again"),
    ("rate limit", "the CA's rate limit: the fleet waits before it tries again"),
)


def wildcard_unserved(hostname, schema):
    """Why a schema cannot carry a route's hostname (None if it can): wildcards need 3."""
    if hostname.startswith("*.") and schema < 3:
        return (f"is a wildcard, which needs a schema-3 agent (its certificate comes by DNS-01 "
                f"through the fleet; schema {schema} agents cannot serve it): upgrade the "
                "edge's agent")
    return None


DNS_MODULE_PATH = Path(__file__).resolve().parent / "dns.py"


def dns_provider_configured(config):
    """True when the control plane has a DNS provider (dns.py's, beside kokoa.py) for DNS-01."""
    return bool(config.dns_settings.get("KOKOA_DNS_PROVIDER")
                and config.dns_settings.get("KOKOA_DNS_ZONE")) and DNS_MODULE_PATH.is_file()


def check_wildcard_route(config, body):
    """400 naming hostname for a wildcard route when no DNS provider can publish DNS-01."""
    hostname = body.get("hostname") if isinstance(body, dict) else None
    if isinstance(hostname, str):
        try:
            hostname = hostname_from_url(hostname, "hostname")  # https://*.example.com/ too
        except HTTPError:
            return              # insert_route / patch_route name it, with the other faults
    if isinstance(hostname, str) and hostname.strip().startswith("*.") \
            and not dns_provider_configured(config):
        raise invalid("hostname", "a wildcard hostname needs a certificate by DNS-01, and no "
                      "DNS provider is configured: set KOKOA_DNS_PROVIDER, KOKOA_DNS_ZONE and "
                      "the provider's credentials on the control plane, with dns.py beside "
                      "kokoa.py (see dns.py --help)")


def route_hostnames(db):
    """The hostnames of every enabled route: the names the fleet certifies."""
    return {row["hostname"] for row in db.execute("SELECT hostname FROM routes WHERE enabled")}


def certificate_name(db, name):
    """A {name} from a path, normalised; 403 naming name unless an enabled route has it."""
    try:
        normalised = normalize_route_hostname(name, "name")
    except HTTPError:
        raise HTTPError(403, "forbidden", "name is not a hostname of this fleet's routes",
                        field="name") from None
    if normalised != name or normalised not in route_hostnames(db):
        raise HTTPError(403, "forbidden", "name is not a hostname of this fleet's routes",
                        field="name")
    return normalised


def certificate_row(db, name, create=False):
    """The certificates row of `name` (inserted empty first with create=True), or None."""
    if create:
        db.execute("INSERT OR IGNORE INTO certificates (name, updated_at) VALUES (?, ?)",
                   (name, utc_now()))
    return db.execute("SELECT * FROM certificates WHERE name = ?", (name,)).fetchone()


def renew_after(row, config):
    """Unix time from which the certificate of `row` is due for renewal (None: none yet)."""
    if row is None or row["not_after"] is None:
        return None
    return parse_iso_time(row["not_after"]) - config.cert_renew_before


def claim_active(row, now):
    """True while the claim of `row` has not expired."""
    return row["claim_edge_id"] is not None and row["claim_until"] is not None \
        and parse_iso_time(row["claim_until"]) > now


def edge_name(db, edge_id):
    """The name of an edge (None if it is gone)."""
    row = db.execute("SELECT name FROM edge_nodes WHERE id = ?", (edge_id,)).fetchone()
    return row["name"] if row else None


def claim_refusal(db, row, edge_id, now, config):
    """The 409 body refusing a claim of `row` to `edge_id`, or None when it may issue."""
    due = renew_after(row, config)
    if claim_active(row, now) and row["claim_edge_id"] != edge_id:
        holder = edge_name(db, row["claim_edge_id"])
        message = f"edge {holder} issues the certificate of {row['name']} now"
        return {"error": {"code": "conflict", "message": message, "field": "name"},
                "holder": holder, "until": row["claim_until"]}
    if due is not None and now < due:
        message = (f"the certificate of {row['name']} is valid until {row['not_after']}; "
                   f"renewal is due from {iso_time(due)}")
        return {"error": {"code": "conflict", "message": message, "field": "name"},
                "holder": None, "until": None, "renew_after": iso_time(due)}
    if row["next_attempt_at"] is not None and now < parse_iso_time(row["next_attempt_at"]):
        message = (f"the last attempt for {row['name']} failed ({row['last_error']}); the "
                   f"fleet waits until {row['next_attempt_at']} before the next")
        return {"error": {"code": "conflict", "message": message, "field": "name"},
                "holder": None, "until": None, "next_attempt_at": row["next_attempt_at"]}
    return None


def claim_certificate(db, config, edge_id, name):
    """(200, {"name", "until"}) when this edge is to issue `name` now, else (409, why)."""
    now = time.time()
    with transaction(db):
        row = certificate_row(db, name, create=True)
        refusal = claim_refusal(db, row, edge_id, now, config)
        if refusal is not None:
            return 409, refusal
        until = iso_time(now + config.cert_claim_seconds)
        db.execute("""
            UPDATE certificates
               SET claim_edge_id = ?, claim_until = ?, updated_at = ?
             WHERE name = ?""", (edge_id, until, iso_time(now), name))
    log.info("edge %s claimed the certificate of %s until %s", edge_id, name, until)
    return 200, {"name": name, "until": until}


def held_claim(db, edge_id, name, now):
    """The row of `name` if `edge_id` holds its live claim; 409 naming name otherwise."""
    row = certificate_row(db, name)
    if row is None or not claim_active(row, now) or row["claim_edge_id"] != edge_id:
        raise conflict("name", f"this edge does not hold a live claim on {name}: claim it "
                               "first (POST .../claim); a claim expires")
    return row


def check_pem(value, field):
    """A PEM text as bytes: ASCII, under CERT_PEM_MAX_BYTES; 400 naming `field`."""
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be a PEM text")
    if not value.isascii() or len(value) >= CERT_PEM_MAX_BYTES:
        raise invalid(field, f"{field} must be an ASCII PEM text under 64 KiB")
    return value.encode("ascii")


def public_key_der(key):
    """SubjectPublicKeyInfo DER of a public key."""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate_dns_names(cert):
    """The DNS names of a certificate's subjectAltName, lower case."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.get_values_for_type(x509.DNSName)]


def parse_chain(pem, field="fullchain"):
    """The certificates of a PEM chain (1 to CERT_CHAIN_MAX); 400 naming `field`."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise invalid(field, f"{field} is not a PEM certificate chain") from None
    if not 1 <= len(chain) <= CERT_CHAIN_MAX:
        raise invalid(field, f"{field} must hold 1 to {CERT_CHAIN_MAX} certificates")
    return chain


def check_certificate_upload(name, body, now):
    """(fullchain text, PKCS#8 private key PEM bytes, not_after ISO) of a valid upload for
    `name`: the key matches the leaf, its names cover `name`, it is valid now; 400 naming the
    field at fault otherwise."""
    check_fields(body, CERT_UPLOAD_FIELDS, required=CERT_UPLOAD_FIELDS)
    chain = parse_chain(check_pem(body["fullchain"], "fullchain"))
    try:
        key = serialization.load_pem_private_key(check_pem(body["privkey"], "privkey"), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise invalid("privkey", "privkey is not an unencrypted PEM private key") from None
    if not isinstance(key, CERT_SIGNING_KEYS):
        raise invalid("privkey", "privkey must be an RSA, ECDSA or Ed25519 key")
    leaf = chain[0]
    if not hmac.compare_digest(public_key_der(leaf.public_key()),
                               public_key_der(key.public_key())):
        raise invalid("privkey", "privkey does not match the first certificate of fullchain")
    names = certificate_dns_names(leaf)
    if name not in names:
        shown = ", ".join(names[:5]) or "none"
        raise invalid("fullchain", f"the certificate does not name {name} (its DNS names: "
                                   f"{shown})")
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise invalid("fullchain", f"the certificate expired at {iso_time(not_after)}")
    if leaf.not_valid_before_utc.timestamp() > now + 3600:
        raise invalid("fullchain", "the certificate is not valid yet")
    text = "".join(cert.public_bytes(serialization.Encoding.PEM).decode() for cert in chain)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return text, key_pem, iso_time(not_after)


def store_certificate(db, config, edge_id, name, body):
    """Check and store an upload from the claim holder; the claim and back-off end."""
    now = time.time()
    fullchain, key_pem, not_after = check_certificate_upload(name, body, now)
    sealed = config.keyring.seal(key_pem, secret_aad("certificates", name, "privkey"))
    with transaction(db):
        held_claim(db, edge_id, name, now)
        db.execute("""
            UPDATE certificates
               SET fullchain = ?, privkey_enc = ?, not_after = ?, issuer_edge_id = ?,
                   issuer_edge_name = ?, issued_at = ?, claim_edge_id = NULL,
                   claim_until = NULL, failures = 0, next_attempt_at = NULL,
                   last_error = NULL, updated_at = ?
             WHERE name = ?""",
                   (fullchain, sealed, not_after, edge_id, edge_name(db, edge_id),
                    iso_time(now), iso_time(now), name))
    log.info("edge %s uploaded the certificate of %s (valid until %s)", edge_id, name,
             not_after)


def certificate_error_words(error):
    """A CA's or certbot's error, with a hint of what to check when one is known."""
    lowered = error.lower()
    for fragment, hint in CERT_ERROR_HINTS:
        if fragment in lowered:
            return f"{error} — {hint}"
    return error


def record_certificate_failure(db, config, edge_id, name, body):
    """The claim holder's attempt failed: release the claim, back off (doubling, capped)."""
    check_fields(body, CERT_FAILURE_FIELDS, required=CERT_FAILURE_FIELDS)
    error = check_text(body["error"], "error", CERT_ERROR_MAX, allow_newlines=True).strip()
    now = time.time()
    with transaction(db):
        row = held_claim(db, edge_id, name, now)
        failures = row["failures"] + 1
        delay = min(config.cert_backoff_seconds * 2 ** min(failures - 1, 20), CERT_BACKOFF_MAX)
        db.execute("""
            UPDATE certificates
               SET failures = ?, next_attempt_at = ?, last_error = ?, claim_edge_id = NULL,
                   claim_until = NULL, updated_at = ?
             WHERE name = ?""",
                   (failures, iso_time(now + delay), certificate_error_words(error or "failed"),
                    iso_time(now), name))
    log.warning("certificate of %s: attempt %d by edge %s failed; next in %ds", name,
                failures, edge_id, delay)


def served_certificate_rows(db):
    """The stored certificates of the fleet's current hostnames, by name."""
    names = route_hostnames(db)
    return [row for row in db.execute(
        "SELECT * FROM certificates WHERE fullchain IS NOT NULL ORDER BY name")
        if row["name"] in names]


def certificates_etag(rows, config):
    """A strong tag of what GET /me/certificates would answer, computed without unsealing."""
    return sha256_hex(canonical_json([config.cert_renew_before] + [
        [row["name"], row["not_after"], sha256_hex(row["fullchain"]),
         sha256_hex(bytes(row["privkey_enc"]))] for row in rows]))


def edge_certificates(rows, config):
    """The body of GET /me/certificates: every stored certificate with its key, unsealed."""
    certificates = {}
    for row in rows:
        key = config.keyring.unseal(bytes(row["privkey_enc"]),
                                    secret_aad("certificates", row["name"], "privkey"))
        certificates[row["name"]] = {"fullchain": row["fullchain"], "privkey": key.decode(),
                                     "not_after": row["not_after"],
                                     "renew_after": iso_time(renew_after(row, config))}
    return {"certificates": certificates}


def certificate_state(row, now, config):
    """valid, expiring (renewal due), pending (being issued), failed or none."""
    if row is not None and row["not_after"] is not None \
            and parse_iso_time(row["not_after"]) > now:
        return "valid" if now < renew_after(row, config) else "expiring"
    if row is not None and claim_active(row, now):
        return "pending"
    if row is not None and row["failures"] > 0:
        return "failed"
    return "none"


def certificate_json(name, row, now, config, edge_names):
    """The admin view of one name's certificate: never a key."""
    claim = None
    if row is not None and claim_active(row, now):
        claim = {"holder_edge_name": edge_names.get(row["claim_edge_id"]),
                 "until": row["claim_until"]}
    stored = dict(row) if row is not None else {}
    value = stored.get
    return {"name": name, "state": certificate_state(row, now, config),
            "not_after": value("not_after"), "issuer_edge_id": value("issuer_edge_id"),
            "issuer_edge_name": value("issuer_edge_name"), "issued_at": value("issued_at"),
            "last_error": value("last_error"), "failures": value("failures") or 0,
            "next_attempt_at": value("next_attempt_at"), "claim": claim,
            "wildcard": name.startswith("*.")}


def list_certificate_states(db, config):
    """Every route hostname's certificate, sorted by name."""
    now = time.time()
    rows = {row["name"]: row for row in db.execute("SELECT * FROM certificates")}
    edge_names = {row["id"]: row["name"] for row in db.execute("SELECT id, name FROM edge_nodes")}
    return [certificate_json(name, rows.get(name), now, config, edge_names)
            for name in sorted(route_hostnames(db))]


def rotate_certificate_keys(db, keyring):
    """Re-seal every certificate's private key with the current key (inside the caller's
    transaction); returns a count."""
    count = 0
    for row in db.execute("SELECT name, privkey_enc FROM certificates "
                          "WHERE privkey_enc IS NOT NULL").fetchall():
        blob = bytes(row["privkey_enc"])
        if keyring.is_current(blob):
            continue
        aad = secret_aad("certificates", row["name"], "privkey")
        db.execute("UPDATE certificates SET privkey_enc = ? WHERE name = ?",
                   (keyring.seal(keyring.unseal(blob, aad), aad), row["name"]))
        count += 1
    return count


def check_certificate_row(row, network):
    """A certificates row as the API stores it (the key's seal is checked by shape only:
    restore has no keyring)."""
    as_stored(row["name"], normalize_route_hostname(row["name"], "name"), "name")
    for column in ("issuer_edge_id", "claim_edge_id"):
        optional(check_id, row[column], column)
    for column in ("not_after", "issued_at", "claim_until", "next_attempt_at", "updated_at"):
        if row[column] is not None and iso_time(parse_iso_time(row[column])) != row[column]:
            raise invalid(column, f"{column} is not an ISO time")
    optional(check_text, row["last_error"], "last_error", CERT_ERROR_MAX + 200, True)
    optional(validate_name, row["issuer_edge_name"], "issuer_edge_name")
    if row["fullchain"] is not None:
        leaf = parse_chain(check_pem(row["fullchain"], "fullchain"))[0]
        if iso_time(leaf.not_valid_after_utc.timestamp()) != row["not_after"]:
            raise invalid("not_after", "not_after is not the certificate's")
        if row["name"] not in certificate_dns_names(leaf):
            raise invalid("fullchain", "the certificate does not name the row's name")
        blob = row["privkey_enc"]
        if not isinstance(blob, bytes) or len(blob) < 1 + KEY_ID_BYTES + NONCE_BYTES + 16 \
                or blob[0] != SECRET_BLOB_VERSION:
            raise invalid("privkey_enc", "privkey_enc is not a sealed secret")


ROW_CHECKS["certificates"] = check_certificate_row


class AcmeChallenges:
    """HTTP-01 key authorizations published by edges, served to the CA by every edge (through
    GET /.well-known/acme-challenge/<token>); in memory, each for at most 10 min."""

    def __init__(self, lifetime=ACME_CHALLENGE_SECONDS):
        self.lifetime = lifetime
        self._entries = {}          # token -> (key authorization, expiry, edge id)
        self._dns = {}              # name -> DNS-01 values published for it
        self._lock = threading.Lock()

    def _expire(self, now):
        for token in [t for t, (_, expiry, _) in self._entries.items() if expiry <= now]:
            del self._entries[token]

    def put(self, edge_id, token, key_authorization):
        """Publish a token (409 if another edge has it; 429 over the per-edge bound)."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            current = self._entries.get(token)
            if current is not None and current[2] != edge_id:
                raise conflict("token", "another edge has published this token")
            mine = sum(1 for _, _, owner in self._entries.values() if owner == edge_id)
            if current is None and (mine >= ACME_CHALLENGES_PER_EDGE
                                    or len(self._entries) >= ACME_CHALLENGES_MAX):
                raise HTTPError(429, "too_many_requests", "too many live challenges: at most "
                                f"{ACME_CHALLENGES_PER_EDGE} per edge", field="token",
                                headers=[("Retry-After", "60")])
            self._entries[token] = (key_authorization, now + self.lifetime, edge_id)

    def get(self, token):
        """The live key authorization of `token`, or None."""
        entry = self._entries.get(token)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    def delete(self, edge_id, token):
        """Withdraw an edge's own token; 404 if it has none by that name."""
        with self._lock:
            entry = self._entries.get(token)
            if entry is None or entry[2] != edge_id:
                raise not_found("challenge")
            del self._entries[token]

    def remember_dns(self, name, value):
        """Note a DNS-01 value this control plane published for `name`."""
        with self._lock:
            self._dns.setdefault(name, set()).add(value)

    def forget_dns(self, name):
        """The DNS-01 values published for `name` (None if none are known), forgotten."""
        with self._lock:
            return self._dns.pop(name, None)


def check_acme_token(token):
    """An ACME token from a path (base64url, 16-128 characters); 400 naming token."""
    if not ACME_TOKEN_RE.fullmatch(token or ""):
        raise invalid("token", "token must be 16-128 characters of A-Za-z0-9_-")
    return token


@functools.lru_cache(maxsize=1)
def dns_module():
    """dns.py beside kokoa.py (loaded by path: an installed `dns` package is another thing)."""
    spec = importlib.util.spec_from_file_location("kokoa_dns", DNS_MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dns_provider(config):
    """(dns module, provider, zone) from the control plane's KOKOA_DNS_* settings; 503 when
    none is configured or it is misconfigured."""
    if not dns_provider_configured(config):
        raise HTTPError(503, "unavailable", "no DNS provider is configured on the control "
                        "plane (KOKOA_DNS_PROVIDER, KOKOA_DNS_ZONE, dns.py beside kokoa.py): "
                        "DNS-01 is not possible")
    dns = dns_module()
    try:
        settings = dns.load_settings(dns.DEFAULT_CONFIG, False, config.dns_settings)
        zone = dns.normalize_zone(settings.get("zone"))
        return dns, dns.make_provider(settings, zone), zone
    except dns.UsageError as err:
        raise HTTPError(503, "unavailable", f"the DNS provider is misconfigured: {err}") from None


def challenge_record_name(name, zone):
    """`_acme-challenge.` + the name (a wildcard's without `*.`); 400 naming name unless it
    lies in the zone."""
    base = name[2:] if name.startswith("*.") else name
    if base != zone and not base.endswith("." + zone):
        raise invalid("name", f"{name} is not in the DNS zone {zone} of the control plane")
    return f"_acme-challenge.{base}"


def publish_dns_challenge(config, challenges, name, body):
    """Publish a DNS-01 TXT value for `name` and wait (bounded) until the zone's configured
    server serves it; 502 in words if the provider refuses, 504 if it never shows."""
    check_fields(body, ("value",), required=("value",))
    value = body["value"]
    if not isinstance(value, str) or not DNS_VALUE_RE.fullmatch(value):
        raise invalid("value", "value must be the base64url digest of the key authorization")
    dns, provider, zone = dns_provider(config)
    record = challenge_record_name(name, zone)
    try:
        if value not in provider.lookup_txt(record):
            provider.add_txt(record, value, DNS_CHALLENGE_TTL)
        challenges.remember_dns(name, value)
        deadline = time.monotonic() + DNS_VISIBLE_SECONDS
        while value not in provider.lookup_txt(record):
            if time.monotonic() > deadline:
                raise HTTPError(504, "timeout", f"the DNS server does not serve the TXT record "
                                f"of {record} after {DNS_VISIBLE_SECONDS:.0f} s")
            time.sleep(0.5)
    except dns.ProviderError as err:
        raise HTTPError(502, "dns_provider_error", f"the DNS provider: {err}") from None
    log.info("published the DNS-01 record %s", record)


def withdraw_dns_challenge(config, challenges, name):
    """Remove the TXT values published for `name` (all of its _acme-challenge TXT records when
    this control plane does not know which)."""
    dns, provider, zone = dns_provider(config)
    record = challenge_record_name(name, zone)
    values = challenges.forget_dns(name)
    try:
        provider.remove_txt(record, None if values is None else sorted(values))
    except dns.ProviderError as err:
        raise HTTPError(502, "dns_provider_error", f"the DNS provider: {err}") from None
    log.info("removed the DNS-01 record %s", record)


def check_key_authorization(token, body):
    """The key authorization of an HTTP-01 challenge: `token.thumbprint`; 400 naming it."""
    check_fields(body, ("key_authorization",), required=("key_authorization",))
    value = body["key_authorization"]
    if not isinstance(value, str) or len(value) > 300:
        raise invalid("key_authorization", "key_authorization must be token.thumbprint")
    prefix, dot, thumbprint = value.partition(".")
    if not dot or prefix != token or not ACME_THUMBPRINT_RE.fullmatch(thumbprint):
        raise invalid("key_authorization", "key_authorization must be the token, a dot and "
                      "the account key's base64url thumbprint")
    return value


# nginx config generator ######################################################################

NGINX_HOSTNAME_RE = re.compile(r"[a-z0-9.-]{1,253}")
NGINX_UPSTREAM_RE = re.compile(r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-f:.]+\]):\d{1,5}")
NGINX_HOSTNAMES_RE = {     # NGINX_HOSTNAME_RE over names joined by newlines, by `hostnames`
    False: re.compile(r"(?:[a-z0-9.-]{1,253}\n)*[a-z0-9.-]{1,253}"),
    True: re.compile(r"(?:(?:\*\.)?[a-z0-9.-]{1,253}\n)*(?:\*\.)?[a-z0-9.-]{1,253}"),  # *.
}


@functools.lru_cache(maxsize=1 << 16)       # each schema's map names the same addresses
def upstream_name(address):
    """A unique, stable nginx upstream name for ip:port, e.g. kokoa_v4_10_8_0_2_8080."""
    host, _, port = address.rpartition(":")
    if host.startswith("["):
        return f"kokoa_v6_{ipaddress.IPv6Address(host[1:-1]).exploded.replace(':', '')}_{port}"
    return f"kokoa_v4_{host.replace('.', '_')}_{port}"


def map_hash_sizes(hostnames):
    """(map_hash_max_size, map_hash_bucket_size) big enough for these names without warnings."""
    longest = max((len(name) for name in hostnames), default=0)
    element = (8 + longest + 2 + 7) // 8 * 8    # nginx: pointer + name + length, 8-aligned
    bucket = max(128, next_power_of_two(element + 8))
    max_size = max(1024, next_power_of_two(len(hostnames) + 1))
    return max_size, bucket


def check_map_values(routes, hostnames):
    """ValueError unless every hostname and address of {hostname: "ip:port"} is what the
    API's validators store. All names are matched at once, joined by newlines, which no
    valid name holds (the count of lines proves that none did): one regex over 100,000 names
    instead of one call per name."""
    if not routes:
        return
    joined = "\n".join(routes)
    if (joined.count("\n") == len(routes) - 1
            and NGINX_HOSTNAMES_RE[bool(hostnames)].fullmatch(joined)
            and all(map(NGINX_UPSTREAM_RE.fullmatch, set(routes.values())))):
        return
    for hostname, address in routes.items():
        name = hostname[2:] if hostnames and hostname.startswith("*.") else hostname
        if not NGINX_HOSTNAME_RE.fullmatch(name) or not NGINX_UPSTREAM_RE.fullmatch(address):
            raise ValueError(f"refusing to render unvalidated route {hostname!r} -> {address!r}")
    raise AssertionError("check_map_values: a route failed only the joined check")


def render_nginx_map(routes, keepalive=UPSTREAM_KEEPALIVE[1], hostnames=False):
    """The text of map.conf from {hostname: "ip:port"}: upstreams with `keepalive` idle
    connections each, then the map (with `hostnames`, schema 3: `*.example.com` names match
    as nginx's server_name does, exact names first).

    Pure and deterministic; every value is checked again against a strict pattern so that
    nothing but a validated hostname or address can ever reach the text.
    """
    check_map_values(routes, hostnames)
    max_size, bucket = map_hash_sizes(routes)
    lines = [
        f"# generated by {NGINX_MAP_GENERATOR}; do not edit",
        f"map_hash_max_size {max_size};",
        f"map_hash_bucket_size {bucket};",
        "map $http_upgrade $kokoa_connection_upgrade {",
        "    default upgrade;",
        '    "" "";',
        "}",
    ]
    names = {address: upstream_name(address) for address in set(routes.values())}
    lines += [f"upstream {names[address]} {{\n    server {address};\n"
              f"    keepalive {keepalive};\n}}" for address in sorted(names, key=names.get)]
    lines += ["map $host $kokoa_backend {", *(["    hostnames;"] if hostnames else []),
              '    default "";']
    lines += [f"    {host} {names[routes[host]]};" for host in sorted(routes)]
    lines.append("}")
    return "\n".join(lines) + "\n"


WG_KEY_RE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
WG_ENDPOINT_RE = re.compile(r"([a-z0-9.-]{1,253}|\[[0-9a-f:.]{2,45}\]):[0-9]{1,5}")


def check_wireguard_values(row):
    """Check a stored origin's or edge's wg_ip, key and endpoint again before they reach a
    wg-quick file, whose PreUp/PostUp lines run commands: ValueError unless each is exactly
    what the API's validators store."""
    wg_ip, key, endpoint = row["wg_ip"], row["wg_public_key"], row["wg_endpoint"]
    try:
        ip_ok = str(ipaddress.ip_address(wg_ip)) == wg_ip
    except (ValueError, TypeError):
        ip_ok = False
    if not ip_ok or not (isinstance(key, str) and WG_KEY_RE.fullmatch(key)) or not (
            endpoint is None or isinstance(endpoint, str) and WG_ENDPOINT_RE.fullmatch(endpoint)):
        raise ValueError(f"refusing to render unvalidated WireGuard values of {row['id']!r}")


def render_origin_wireguard(origin, private_key, edges, network=None):
    """The origin's wg-quick file: its interface and a [Peer] per edge with a key and wg_ip.

    With the tunnel network, a `# kokoa-wg-network:` line tells install-origin.sh which
    peer addresses to accept."""
    check_wireguard_values(origin)
    prefix = 128 if ":" in origin["wg_ip"] else 32
    lines = [
        f"# WireGuard config for kokoa origin {json.dumps(origin['name'])}",
        "# Install as /etc/wireguard/kokoa0.conf (mode 0600), then: wg-quick up kokoa0",
        *([f"# kokoa-wg-network: {network}"] if network is not None else []),
        "[Interface]",
        f"Address = {origin['wg_ip']}/{prefix}",
    ]
    if private_key is None:
        lines += ["# The control plane does not hold this origin's private key: paste it here.",
                  "# PrivateKey = <base64 private key matching " + origin["wg_public_key"] + ">"]
    else:
        lines.append(f"PrivateKey = {b64(private_key)}")
    lines.append("ListenPort = 51820")
    for edge in edges:
        if not edge["wg_public_key"] or not edge["wg_ip"]:
            continue
        check_wireguard_values(edge)
        edge_prefix = 128 if ":" in edge["wg_ip"] else 32
        lines += ["", f"# edge {json.dumps(edge['name'])}", "[Peer]",
                  f"PublicKey = {edge['wg_public_key']}",
                  f"AllowedIPs = {edge['wg_ip']}/{edge_prefix}"]
        if edge["wg_endpoint"]:
            lines.append(f"Endpoint = {edge['wg_endpoint']}")
        lines.append("PersistentKeepalive = 25")
    return "\n".join(lines) + "\n"


# HTTP plumbing (request, routing, responses) #################################################

JSON_TYPE = "application/json"
STATUS_TEXT = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflict", 413: "Payload Too Large", 415: "Unsupported Media Type",
    421: "Misdirected Request", 429: "Too Many Requests", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}
STATUS_LINES = {code: f"{code} {text}" for code, text in STATUS_TEXT.items()}
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
]
# What serve gives waitress; tests serve the app with the same.
WAITRESS_SETTINGS = {"ident": "kokoa", "max_request_body_size": 4 * MAX_BODY_BYTES,
                     "clear_untrusted_proxy_headers": False}    # find_client() reads them
ROUTES = []
STATIC_ROUTE_HITS = {}     # (method, path) -> Route, for patterns without parameters


@dataclasses.dataclass
class Route:
    """One entry of the route table."""

    method: str
    pattern: str
    regex: re.Pattern
    handler: object
    auth: str
    int_params: tuple
    changes_config: bool


AUTH_KINDS = ("admin", "edge", "origin", "local_or_admin", "none")


def route(method, pattern, auth="admin", changes_config=False):
    """Register a handler for METHOD and a path pattern with <name> or <int:name> parts.

    auth is "admin" (HTTP Basic or a session cookie), "edge" (Bearer node token),
    "local_or_admin" (loopback peers, or admin) or "none"; anything else raises at import, so a
    typo cannot make a route public. changes_config: a successful call changes the edge
    payload (its cache is cleared).
    """
    if auth not in AUTH_KINDS:
        raise ValueError(f"route {method} {pattern}: unknown auth kind {auth!r}")
    int_params = tuple(re.findall(r"<int:(\w+)>", pattern))
    regex = re.compile(re.sub(
        r"<(int:)?(\w+)>",
        lambda m: f"(?P<{m.group(2)}>{'[0-9]+' if m.group(1) else '[^/]+'})",
        pattern))

    def decorate(handler):
        ROUTES.append(Route(method, pattern, regex, handler, auth, int_params,
                            changes_config))
        return handler
    return decorate


def match_route(method, path):
    """(Route, params) for a request; 404 if no pattern matches, 405 with Allow if no method.
    A hit on a pattern without parameters is remembered (the polls' paths): the scan costs
    a poll a tenth of its time. Only registered patterns' paths can be remembered."""
    hit = STATIC_ROUTE_HITS.get((method, path))
    if hit is not None:
        return hit, {}
    allowed = []
    for entry in ROUTES:
        match = entry.regex.fullmatch(path)
        if not match:
            continue
        if entry.method == method or (method == "HEAD" and entry.method == "GET"):
            params = match.groupdict()
            if not params:
                STATIC_ROUTE_HITS[(method, path)] = entry
            for name in entry.int_params:
                params[name] = int(params[name])
            return entry, params
        allowed.append(entry.method)
    if allowed:
        allow = ", ".join(sorted(set(allowed + (["HEAD"] if "GET" in allowed else []))))
        raise HTTPError(405, "method_not_allowed", f"{method} is not allowed here",
                        headers=[("Allow", allow)])
    raise not_found("path")


@dataclasses.dataclass
class Response:
    """A non-JSON or header-carrying response."""

    status: int
    body: bytes = b""
    content_type: str = ""
    headers: list = dataclasses.field(default_factory=list)


def json_response(status, value, headers=None):
    """A JSON Response (ASCII-escaped, so no stray surrogate can break encoding)."""
    body = json.dumps(value, ensure_ascii=True).encode() if value is not None else b""
    return Response(status, body, JSON_TYPE if body else "", headers or [])


def reject_duplicate_keys(pairs):
    """object_pairs_hook: a JSON object may not name a key twice."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:64]!r}")
        result[key] = value
    return result


def reject_constant(name):
    """parse_constant hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw):
    """Decode a request body as strict JSON; 400 invalid_json on any fault."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicate_keys,
                          parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        message = str(err)[:200] if isinstance(err, ValueError) else "body is not valid JSON"
        raise HTTPError(400, "invalid_json", f"invalid JSON: {message}") from None


def etag_matches(if_none_match, config_hash):
    """True if an If-None-Match header names this hash (strong or weak, or *)."""
    if not if_none_match or len(if_none_match) > 8192:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == f'"{config_hash}"':
            return True
    return False


def is_loopback(address):
    """True for a loopback peer address (the socket's, never a forwarded header)."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)     # every request names one of a few hosts
def host_name(header):
    """The host a Host header names: lower case, no port, no trailing dot, IPv6 in []."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        host = name
    return host[:-1] if host.endswith(".") else host


def is_own_host(host, public_host):
    """True if `host` (as host_name gives it) names this control plane: a loopback name, or
    KOKOA_PUBLIC_URL's host when it is set."""
    return host in LOOPBACK_HOSTS or (bool(public_host) and host == public_host)


def check_host(req, public_host):
    """421 unless the request names this control plane (DNS rebinding: a page that rebinds its
    own name to 127.0.0.1 still sends that name)."""
    if not is_own_host(host_name(req.environ.get("HTTP_HOST", "")), public_host):
        where = f"{public_host} or localhost" if public_host else "localhost"
        raise HTTPError(421, "misdirected_request",
                        f"this control plane answers only requests addressed to {where}; "
                        "set KOKOA_PUBLIC_URL to the URL that edges and browsers use")


def origin_allowed(origin, public_host):
    """A browser's Origin must be this control plane's own; no Origin (scripts) passes."""
    if not origin:
        return True
    host = host_name(urllib.parse.urlsplit(origin).netloc) if "://" in origin else ""
    return is_own_host(host, public_host)


def session_secure(req):
    """Whether a session cookie is marked Secure: always, but over plain http on loopback."""
    return not (req.local and req.environ.get("wsgi.url_scheme", "http") == "http")


def session_cookie_name(req):
    """The cookie name for this transport (the Secure one carries the __Host- prefix)."""
    return SESSION_COOKIE_SECURE if session_secure(req) else SESSION_COOKIE


def session_tokens(req):
    """Every well-formed session token the Cookie header carries (a sibling site may have
    set one of the same name beside ours: each is tried, none is trusted for being there)."""
    name, tokens = session_cookie_name(req), []
    for part in req.header("Cookie").split(";")[:64]:
        key, sep, value = part.strip().partition("=")
        if sep and key == name and SESSION_TOKEN_RE.fullmatch(value.strip()):
            tokens.append(value.strip())
    return tokens[:4]


def session_cookie(req, token, max_age=SESSION_MAX_SECONDS):
    """A Set-Cookie header for `token` ("" with max_age 0 clears the cookie)."""
    secure = "; Secure" if session_secure(req) else ""
    return ("Set-Cookie", f"{session_cookie_name(req)}={token}; Path=/; Max-Age={max_age}; "
                          f"HttpOnly; SameSite=Strict{secure}")


def same_origin(req):
    """A browser request from this control plane's own page: Sec-Fetch-Site says so, or Origin
    is exactly this request's scheme://Host (another port of localhost is another origin, and
    SameSite would still send it our cookie)."""
    origin = req.header("Origin").strip().lower()
    if req.header("Sec-Fetch-Site") == "same-origin" or (
            origin and origin == req.app.config.public_url):    # a proxy's Host lacks its port
        return True
    scheme = "https" if session_secure(req) else "http"
    default = {"https": ":443", "http": ":80"}[scheme]
    expected = f"{scheme}://{req.header('Host').strip().lower()}".removesuffix(default)
    return origin.removesuffix(default) == expected


def ui_request(req):
    """A fetch of the UI (its X-Requested-With marker, or a session cookie): a 401 then carries
    no Basic challenge, so that the browser shows the login page, not its own prompt."""
    return bool(req.header("X-Requested-With") or session_tokens(req))


def bearer_token(req):
    """The token of an `Authorization: Bearer` header ("" without one)."""
    scheme, _, token = req.header("Authorization").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def find_client(req, trusted_proxy):
    """Set req.client and req.proxied. From the trusted proxy, the client is the last
    X-Forwarded-For hop (the one the proxy appended; earlier ones are the client's to write);
    from anyone else, the socket peer. A request with any forwarding header came through a
    proxy, trusted or not, and is never a loopback client."""
    environ = req.environ
    req.proxied = any(map(environ.get, FORWARDING_HEADERS))
    if trusted_proxy is None or not req.peer:
        return
    try:
        from_proxy = ipaddress.ip_address(req.peer.split("%")[0]) == trusted_proxy
    except ValueError:
        return
    if not from_proxy:
        return
    req.proxied = True
    chain = environ.get("HTTP_X_FORWARDED_FOR", "")
    if chain:
        hop = chain.rsplit(",", 1)[-1].strip()
        if not is_ip_address(hop):
            raise invalid("X-Forwarded-For", "the last X-Forwarded-For hop must be the client's "
                          "IP address, as the proxy appends it")
        req.client = hop


def new_request_id():
    """A fresh X-Request-ID: 32 random hex digits. Not a secret (it is logged and answered),
    so not from os.urandom, whose system call was a tenth of a 304's time in kokoa.py."""
    return f"{random.getrandbits(128):032x}"


@functools.lru_cache(maxsize=64)      # the code's own header names only
def environ_key(header_name):
    """The WSGI environ key of a request header: X-Kokoa-Agent -> HTTP_X_KOKOA_AGENT."""
    return "HTTP_" + header_name.upper().replace("-", "_")


class Request:
    """One request: environ, lazily opened database connection, auth result, JSON body."""

    def __init__(self, app, environ):
        self.app = app
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        self.path = environ.get("PATH_INFO", "") or "/"
        self.peer = environ.get("REMOTE_ADDR", "")    # the socket's: the proxy, if any
        self.client = self.peer     # behind the trusted proxy, its last X-Forwarded-For hop
        self.proxied = False        # came through a proxy: never a loopback client
        given_id = environ.get("HTTP_X_REQUEST_ID", "")
        self.request_id = given_id if REQUEST_ID_RE.fullmatch(given_id) else new_request_id()
        self.edge_id = None
        self.origin = None          # the origin row an origin token opened
        self.session = None         # the admin session row a cookie opened
        self.admin_via = None       # how the admin got in: "basic", "session" or "loopback"
        self.route_pattern = "unmatched"      # labels for metrics: bounded, never raw input
        self.metrics_method = "other"
        self._db = None

    @property
    def local(self):
        """A client on this machine: a loopback socket peer and no proxy in between."""
        return not self.proxied and is_loopback(self.peer)

    @property
    def db(self):
        """The request's database connection, opened on first use."""
        if self._db is None:
            self._db = connect(self.app.config.db_path)
        return self._db

    def close(self):
        """Close the connection if one was opened."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def header(self, name):
        """A request header by name ('' if absent)."""
        return self.environ.get(environ_key(name), "")

    def content_length(self):
        """The declared body length; 400 if malformed."""
        text = self.environ.get("CONTENT_LENGTH") or "0"
        if text == "0":
            return 0
        if not re.fullmatch("[0-9]+", text):     # not str.isdigit(): "²" is a digit
            raise HTTPError(400, "invalid_json", "malformed Content-Length")
        return int(text) if len(text) < 19 else sys.maxsize

    def check_body_headers(self):
        """415 unless a body-carrying request says JSON; 413 over MAX_BODY_BYTES."""
        length = self.content_length()
        if self.method in ("POST", "PUT", "PATCH") or length:
            media_type = self.environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
            if media_type != JSON_TYPE:
                raise HTTPError(415, "unsupported_media_type",
                                "requests with a body must be Content-Type: application/json")
        if length > MAX_BODY_BYTES:
            raise HTTPError(413, "payload_too_large", "the body is larger than 1 MiB")

    def json(self):
        """The body parsed as strict JSON (bounded read)."""
        raw = self.environ["wsgi.input"].read(self.content_length())
        if len(raw) > MAX_BODY_BYTES:
            raise HTTPError(413, "payload_too_large", "the body is larger than 1 MiB")
        return parse_json_body(raw)


class TokenCache:
    """token hash -> edge id, so that a poll need not query the database; revoke evicts."""

    def __init__(self, ttl=TOKEN_CACHE_SECONDS):
        self.ttl = ttl
        self._entries = {}
        self._revocations = 0
        self._lock = threading.Lock()

    def lookup(self, req, token):
        """The edge id owning `token`, or None."""
        digest = hash_token(token)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry and entry[1] > now:
            return entry[0]
        revocations = self._revocations
        row = req.db.execute("SELECT id, token_hash FROM edge_nodes WHERE token_hash = ?",
                             (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row["token_hash"], digest):
            return None
        with self._lock:
            if len(self._entries) > 100000:
                self._entries.clear()
            if revocations == self._revocations:    # a revoke meanwhile: do not cache
                self._entries[digest] = (row["id"], now + self.ttl)
        return row["id"]

    def forget(self, edge_id):
        """Evict every cached token of `edge_id`."""
        with self._lock:
            self._revocations += 1
            for digest in [d for d, (eid, _) in self._entries.items() if eid == edge_id]:
                del self._entries[digest]


class EdgeConfigCache:
    """The edge payloads, built once per change of desired state rather than per poll."""

    def __init__(self):
        self.generation = 0
        self.changed_at = time.time()
        self.build_seconds = 0.0
        self._cached = None         # (generation, {schema: (hash, body, unserved)})
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()

    def invalidate(self):
        """Called after any committed write to routes, origins, access policies or settings."""
        with self._lock:
            self.generation += 1
            self.changed_at = time.time()

    def get(self, req, schema=1):
        """(config_hash, body bytes, {hostname: why unserved}) of one schema's payload."""
        cached = self._cached
        if cached is None or cached[0] != self.generation:
            with self._build_lock:
                cached = self._cached
                if cached is None or cached[0] != self.generation:
                    generation = self.generation
                    started = time.perf_counter()
                    built = build_edge_configs(req.db)
                    self.build_seconds = time.perf_counter() - started
                    cached = self._cached = (generation, built)
        return cached[1][schema]


class Metrics:
    """Request counters and latency histograms by route template, rendered for Prometheus."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()   # (route, method, status) -> count
        self.latency = {}       # (route, method) -> [count per bucket (and past them), sum, n]

    def observe(self, route_pattern, method, status, seconds):
        """Count one request."""
        with self._lock:
            self.requests[(route_pattern, method, status)] += 1
            entry = self.latency.setdefault((route_pattern, method),
                                            [[0] * (len(self.BUCKETS) + 1), 0.0, 0])
            entry[0][bisect.bisect_left(self.BUCKETS, seconds)] += 1     # made cumulative
            entry[1] += seconds                                          # by render()
            entry[2] += 1

    def render(self):
        """The request metrics in the Prometheus text format."""
        lines = ["# HELP kokoa_http_requests_total HTTP requests by route, method and status.",
                 "# TYPE kokoa_http_requests_total counter"]
        with self._lock:
            for (route_pattern, method, status), count in sorted(self.requests.items()):
                labels = prometheus_labels(route=route_pattern, method=method, status=status)
                lines.append(f"kokoa_http_requests_total{{{labels}}} {count}")
            lines += ["# HELP kokoa_http_request_duration_seconds Request latency by route.",
                      "# TYPE kokoa_http_request_duration_seconds histogram"]
            for (route_pattern, method), (buckets, total, count) in sorted(self.latency.items()):
                base = prometheus_labels(route=route_pattern, method=method)
                name = "kokoa_http_request_duration_seconds"
                for bound, bucket_count in zip(self.BUCKETS, itertools.accumulate(buckets),
                                               strict=False):
                    lines.append(f'{name}_bucket{{{base},le="{bound}"}} {bucket_count}')
                lines.append(f'{name}_bucket{{{base},le="+Inf"}} {count}')
                lines.append(f"{name}_sum{{{base}}} {total:.6f}")
                lines.append(f"{name}_count{{{base}}} {count}")
        return lines


def prometheus_labels(**labels):
    """name="value" pairs with Prometheus escaping."""
    def escape(value):
        return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return ",".join(f'{name}="{escape(value)}"' for name, value in labels.items())


class LastSeen:
    """When each edge last polled, and with which agent: exact in memory, written to disk at
    most every 30 s (at once when the agent changes)."""

    def __init__(self, flush_seconds=LAST_SEEN_FLUSH_SECONDS):
        self.flush_seconds = flush_seconds
        self._seen = {}     # edge id -> (unix time of last poll, of last write, agent, schema)
        self._lock = threading.Lock()

    def touch(self, req, edge_id, agent_version, schema):
        """Note a poll by `edge_id` now; persist it if the stored value is stale."""
        now = time.time()
        with self._lock:
            _, flushed, *agent = self._seen.get(edge_id, (None, 0.0, None, None))
            due = now - flushed >= self.flush_seconds or agent != [agent_version, schema]
            self._seen[edge_id] = (now, now if due else flushed, agent_version, schema)
        if not due:
            return
        try:
            req.db.execute(
                """
                UPDATE edge_nodes
                   SET last_seen = ?, agent_version = ?, agent_schema = ?
                 WHERE id = ?""",
                (iso_time(now), agent_version, schema, edge_id))
        except sqlite3.OperationalError as err:     # read-only or full disk: polls go on
            log.debug("last_seen of edge %s not stored: %s", edge_id, err)

    def get(self, edge_id):
        """The in-memory last poll time of `edge_id` (ISO 8601), or None."""
        entry = self._seen.get(edge_id)
        return iso_time(entry[0]) if entry else None


class App:
    """The WSGI application: dispatch, authentication, errors, access log."""

    def __init__(self, config):
        self.config = config
        self.limiters = {kind: RateLimiter()
                         for kind in ("admin", "bootstrap", "edge", "origin")}
        self.admin_slowdown = FailureSlowdown()
        self.warned_untrusted_proxy = False
        self.tokens = TokenCache()
        self.edge_config = EdgeConfigCache()
        self.last_seen = LastSeen()
        self.metrics = Metrics()
        self.acme_challenges = AcmeChallenges()
        self.health = HealthMonitor(self)
        self.started = time.time()      # edges' missed polls count from here (sites_view)

    def close(self):
        """Stop the background threads (the health evaluator and the alert sender)."""
        self.health.close()

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        req = Request(self, environ)
        try:
            response = self.dispatch(req)
        finally:
            req.close()
        security = SECURITY_HEADERS if response.status != 304 else ()
        headers = [("X-Request-ID", req.request_id), *security, *response.headers]
        if response.content_type:
            headers.append(("Content-Type", response.content_type))
        if not any(name.lower() == "cache-control" for name, _ in response.headers):
            headers.append(("Cache-Control", "no-store"))
        body = b"" if response.status in (204, 304) else response.body
        if response.status not in (204, 304):
            headers.append(("Content-Length", str(len(body))))
        start_response(STATUS_LINES.get(response.status) or f"{response.status} Unknown",
                       headers)
        self.log_access(req, response.status, started)
        self.metrics.observe(req.route_pattern, req.metrics_method, response.status,
                             time.perf_counter() - started)
        return [b""] if req.method == "HEAD" else [body]

    def dispatch(self, req):
        """Route, authenticate and run the handler; map every failure to a JSON error."""
        try:
            check_host(req, self.config.public_host)
            find_client(req, self.config.trusted_proxy)
            self.warn_untrusted_proxy(req)
            entry, params = match_route(req.method, req.path)
            req.route_pattern, req.metrics_method = entry.pattern, req.method
            if req.method not in ("GET", "HEAD") and (
                    req.header("Sec-Fetch-Site") == "cross-site"
                    or not origin_allowed(req.header("Origin"), self.config.public_host)):
                raise HTTPError(403, "forbidden", "cross-site requests are refused")
            self.authenticate(req, entry.auth)
            req.check_body_headers()
            result = entry.handler(req, **params)
            if entry.changes_config:
                self.edge_config.invalidate()
            return result if isinstance(result, Response) else json_response(*result)
        except HTTPError as err:
            return json_response(err.status, err.body(), err.headers)
        except sqlite3.OperationalError as err:
            log.error("database unavailable in %s %s: %s", req.method, req.path, err)
            message = "the database is unavailable; try again later"
            if getattr(err, "sqlite_errorname", "").startswith(STORAGE_ERRORS):
                message = ("the database is read-only or the disk is full: changes are refused "
                           "until an operator fixes it; reads keep working")
            return json_response(503, HTTPError(503, "unavailable", message).body(),
                                 [("Retry-After", "5")])
        except Exception:
            log.exception("unhandled error in %s %s", req.method, req.path)
            return json_response(500, HTTPError(500, "internal", "internal error").body())

    def warn_untrusted_proxy(self, req):
        """Once: say that a proxy forwards to us but KOKOA_TRUSTED_PROXY does not name it."""
        if req.proxied and self.config.trusted_proxy is None and is_loopback(req.peer) \
                and not self.warned_untrusted_proxy:
            self.warned_untrusted_proxy = True
            log.warning("requests arrive through a proxy at %s but KOKOA_TRUSTED_PROXY is not "
                        "set: every client counts as that address for rate limits; set "
                        "KOKOA_TRUSTED_PROXY=%s", req.peer, req.peer)

    def rate_limited(self, kind, req):
        """429 if this client has used up its failures of one credential kind; else the
        function that records a failure of it."""
        limiter, key = self.limiters[kind], rate_key(req.client)
        limiter.check(key)
        return lambda: limiter.fail(key)

    def authenticate(self, req, kind):
        """Enforce a route's auth kind: admin (Basic), edge (Bearer), local_or_admin, none."""
        if kind == "local_or_admin" and req.local:
            return
        if kind in ("admin", "local_or_admin"):
            self.authenticate_admin(req)
        elif kind == "edge":
            self.authenticate_edge(req)
        elif kind == "origin":
            self.authenticate_origin(req)

    def authenticate_admin(self, req):
        """HTTP Basic or a session cookie; loopback only when no password is set."""
        challenge = [] if ui_request(req) else [
            ("WWW-Authenticate", 'Basic realm="kokoa", charset="UTF-8"')]
        if not self.config.admin_password:
            if req.local:
                req.admin_via = "loopback"
                return
            raise HTTPError(401, "unauthorized", "no admin password is set: the admin API "
                            "answers loopback clients only", headers=challenge)
        scheme, _, encoded = req.header("Authorization").partition(" ")
        if scheme.lower() != "basic":
            self.authenticate_session(req, challenge)
            return
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            user, password = "", ""
        self.check_admin_login(req, user, password, challenge)
        req.admin_via = "basic"

    def check_admin_login(self, req, user, password, challenge=()):
        """401 unless these are the admin credentials; failures are rate-limited per client
        and, past a threshold, slowed down for everyone (Basic and the login page alike)."""
        fail = self.rate_limited("admin", req)
        self.admin_slowdown.check()
        user_ok = tokens_equal(user, self.config.admin_user)
        if not (tokens_equal(password, self.config.admin_password) and user_ok):
            fail()
            self.admin_slowdown.fail()
            raise HTTPError(401, "unauthorized", "wrong admin credentials",
                            headers=list(challenge))

    def authenticate_session(self, req, challenge):
        """A live session cookie; a write with it must come from our own page (403)."""
        tokens = session_tokens(req)
        for token in tokens:
            req.session = session_of(req.db, self.config, token)
            if req.session is not None:
                break
        if req.session is None:
            message = ("your session has ended (expired, logged out, or the admin password "
                       "changed): log in again") if tokens else "admin credentials required"
            raise HTTPError(401, "unauthorized", message, headers=challenge)
        if req.method not in ("GET", "HEAD") and not same_origin(req):
            raise HTTPError(403, "forbidden", "a change made with a session cookie must come "
                            "from this control plane's own page (same-origin Origin)")
        req.admin_via = "session"

    def authenticate_edge(self, req):
        """Bearer node token, looked up by its hash; revoked or unknown tokens fail."""
        challenge = [("WWW-Authenticate", 'Bearer realm="kokoa"')]
        token = bearer_token(req)
        if not token:
            raise HTTPError(401, "unauthorized", "a node token is required", headers=challenge)
        # A valid token passes even from an address over its failure limit: tokens are too
        # long to guess, and a revoked edge behind the same NAT must not lock out the others.
        edge_id = self.tokens.lookup(req, token)
        if edge_id is None:
            self.rate_limited("edge", req)()
            raise HTTPError(401, "unauthorized", "unknown or revoked node token",
                            headers=challenge)
        req.edge_id = edge_id

    def authenticate_origin(self, req):
        """Bearer origin token: opens only that origin's own wireguard.conf."""
        token = bearer_token(req)
        row = origin_by_token(req.db, token) if token else None
        if row is None:
            self.rate_limited("origin", req)()
            raise HTTPError(401, "unauthorized", "unknown or revoked origin token",
                            headers=[("WWW-Authenticate", 'Bearer realm="kokoa-origin"')])
        req.origin = row

    def log_access(self, req, status, started):
        """One structured line per request; never headers, bodies or query strings. An
        unchanged poll (a 304 to an edge's config or certificates) is logged at DEBUG: every
        edge polls every 30 s, and the line cost the poll path a third of its throughput."""
        level = logging.DEBUG if status == 304 and req.route_pattern in QUIET_POLLS \
            else logging.INFO
        if not log.isEnabledFor(level):
            return
        log.log(level, "request", extra={"access": {
            "request_id": req.request_id, "method": req.method, "path": req.path[:512],
            "status": status, "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "client": req.client, "edge_id": req.edge_id,
            **({"peer": req.peer} if req.peer != req.client else {})}})


QUIET_POLLS = frozenset(("/api/v1/edge-nodes/me/config", "/api/v1/edge-nodes/me/certificates"))


def make_app(config):
    """The WSGI application for `config` (whose database the caller has migrated)."""
    return App(config)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line."""

    def format(self, record):
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "access", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


# API routes ##################################################################################

@route("GET", "/healthz", auth="none")
def get_healthz(req):
    try:
        req.db.execute("SELECT count(*) FROM settings").fetchone()
    except sqlite3.Error as err:
        log.error("health check failed: %s", err)
        return 503, {"status": "unavailable"}
    return 200, {"status": "ok"}


@route("GET", "/metrics", auth="local_or_admin")
def get_metrics(req):
    configs = {schema: req.app.edge_config.get(req, schema)[0] for schema in SCHEMAS}
    lines = req.app.metrics.render() + fleet_metrics(req, configs) + health_metrics(req)
    return Response(200, ("\n".join(lines) + "\n").encode(),
                    "text/plain; version=0.0.4; charset=utf-8")


def fleet_metrics(req, config_hashes):
    """Gauges of the desired state and of how the edges follow it ({schema: hash})."""
    now = time.time()
    edges = {"total": 0, "in_sync": 0, "stale": 0}
    for row in req.db.execute(
            "SELECT id, applied_hash, last_seen, agent_schema FROM edge_nodes"):
        edges["total"] += 1
        edges["in_sync"] += row["applied_hash"] == config_hashes[edge_schema(row)]
        seen = req.app.last_seen.get(row["id"]) or row["last_seen"]
        if seen is None or now - parse_iso_time(seen) > EDGE_STALE_SECONDS:
            edges["stale"] += 1
    counts = {table: req.db.execute(f"SELECT count(*) FROM {quote_identifier(table)}")
              .fetchone()[0] for table in ("routes", "origins")}
    cache = req.app.edge_config
    lines = ["# TYPE kokoa_info gauge", f'kokoa_info{{version="{__version__}"}} 1',
             "# TYPE kokoa_edges gauge"]
    lines += [f'kokoa_edges{{state="{state}"}} {count}' for state, count in edges.items()]
    lines += [f"# TYPE kokoa_{table} gauge\nkokoa_{table} {count}"
              for table, count in counts.items()]
    lines += ["# TYPE kokoa_config_build_seconds gauge",
              f"kokoa_config_build_seconds {cache.build_seconds:.6f}",
              "# TYPE kokoa_config_last_change_timestamp_seconds gauge",
              f"kokoa_config_last_change_timestamp_seconds {cache.changed_at:.3f}"]
    return lines


def health_metrics(req):
    """Gauges of GET /api/v1/sites: sites and edges by state, certificates at risk, and one
    kokoa_site_state line per hostname."""
    view = sites_view_of(req)
    lines = ["# TYPE kokoa_sites gauge"]
    lines += [f'kokoa_sites{{state="{state}"}} {count}'
              for state, count in view["summary"]["sites"].items()]
    lines.append("# TYPE kokoa_edge_states gauge")
    lines += [f'kokoa_edge_states{{state="{state}"}} {count}'
              for state, count in view["summary"]["edges"].items()]
    lines.append("# TYPE kokoa_certificates gauge")
    lines += [f'kokoa_certificates{{state="{state}"}} {count}'
              for state, count in view["summary"]["certificates"].items()]
    lines.append("# TYPE kokoa_site_state gauge")
    lines += [f"kokoa_site_state{{{prometheus_labels(hostname=site['hostname'])},"
              f'state="{site["state"]}"}} 1' for site in view["sites"]]
    return lines


def sites_view_of(req):
    """sites_view() as this request's app sees the fleet."""
    configs = {schema: req.app.edge_config.get(req, schema) for schema in SCHEMAS}
    return sites_view(req.db, configs, req.app.last_seen.get, not_before=req.app.started)


@route("GET", "/api/v1/origins")
def list_origins(req):
    return 200, {"origins": [origin_json(row) for row in query_origins(req.db)]}


@route("POST", "/api/v1/origins", changes_config=True)
def create_origin(req):
    return 201, origin_json(insert_origin(req.db, req.app.config, req.json()))


@route("GET", "/api/v1/origins/<id>")
def get_origin(req, id):
    return 200, origin_json(get_origin_row(req.db, id))


@route("PATCH", "/api/v1/origins/<id>", changes_config=True)
def update_origin(req, id):
    return 200, origin_json(patch_origin(req.db, req.app.config, id, req.json()))


@route("DELETE", "/api/v1/origins/<id>", changes_config=True)
def delete_origin(req, id):
    remove_origin(req.db, id)
    return 204, None


@route("GET", "/api/v1/origins/me/wireguard.conf", auth="origin")
def get_my_wireguard_conf(req):
    return origin_wireguard_response(req, req.origin)


@route("POST", "/api/v1/origins/<id>/token")
def create_origin_token(req, id):
    token = issue_origin_token(req.db, id)
    log.info("issued a new token for origin %s", id)
    return 201, {"token": token}


@route("DELETE", "/api/v1/origins/<id>/token")
def delete_origin_token(req, id):
    store_origin_token_hash(req.db, id, None)
    return 204, None


@route("GET", "/api/v1/origins/<id>/wireguard.conf")
def get_origin_wireguard_conf(req, id):
    return origin_wireguard_response(req, get_origin_row(req.db, id))


def origin_wireguard_response(req, origin):
    """The origin's wg-quick file as a download (its private key decrypted if held)."""
    private_key = None
    if origin["wg_private_key_enc"] is not None:
        aad = secret_aad("origins", origin["id"], "wg_private_key")
        try:
            private_key = req.app.config.keyring.unseal(origin["wg_private_key_enc"], aad)
        except SecretError as err:
            log.error("cannot decrypt the private key of origin %s: %s", origin["id"], err)
            raise HTTPError(500, "internal", "the stored private key cannot be decrypted "
                            "with the configured WIREGUARD_KEY_ENC_SECRET") from None
    text = render_origin_wireguard(origin, private_key, query_edges(req.db),
                                   req.app.config.wg_network)
    return Response(200, text.encode(), "text/plain; charset=utf-8", [
        ("Content-Disposition", 'attachment; filename="kokoa0.conf"')])


@route("GET", "/api/v1/routes")
def list_routes(req):
    return 200, {"routes": [route_json(row) for row in query_routes(req.db)]}


@route("POST", "/api/v1/routes", changes_config=True)
def create_route(req):
    body = req.json()
    check_wildcard_route(req.app.config, body)
    return 201, route_json(insert_route(req.db, body))


@route("GET", "/api/v1/routes/<id>")
def get_route(req, id):
    return 200, route_json(get_route_row(req.db, id))


@route("PATCH", "/api/v1/routes/<id>", changes_config=True)
def update_route(req, id):
    body = req.json()
    check_wildcard_route(req.app.config, body)
    return 200, route_json(patch_route(req.db, id, body))


@route("DELETE", "/api/v1/routes/<id>", changes_config=True)
def delete_route(req, id):
    remove_route(req.db, id)
    return 204, None


@route("GET", "/api/v1/access-policies")
def list_access_policies(req):
    return 200, {"access_policies": [policy_json(row, hostnames)
                                     for row, hostnames in query_policies(req.db)]}


@route("POST", "/api/v1/access-policies", changes_config=True)
def create_access_policy(req):
    return 201, policy_json(*insert_policy(req.db, req.json()))


@route("GET", "/api/v1/access-policies/<id>")
def get_access_policy(req, id):
    return 200, policy_json(*get_policy(req.db, id))


@route("PATCH", "/api/v1/access-policies/<id>", changes_config=True)
def update_access_policy(req, id):
    return 200, policy_json(*patch_policy(req.db, id, req.json()))


@route("DELETE", "/api/v1/access-policies/<id>", changes_config=True)
def delete_access_policy(req, id):
    remove_policy(req.db, id)
    return 204, None


@route("GET", "/api/v1/edge-nodes")
def list_edge_nodes(req):
    configs = {schema: req.app.edge_config.get(req, schema) for schema in SCHEMAS}
    edges = [edge_json(row, configs, req.app.last_seen.get(row["id"]), req.app.started)
             for row in query_edges(req.db)]
    return 200, {"edge_nodes": edges, "config_hash": configs[1][0],
                 "config_hashes": {str(schema): configs[schema][0] for schema in SCHEMAS},
                 "version": __version__}


@route("DELETE", "/api/v1/edge-nodes/<id>")
def delete_edge_node(req, id):
    revoke_edge(req.db, id)
    req.app.tokens.forget(id)
    log.info("revoked edge node %s", id)
    return 204, None


@route("POST", "/api/v1/session", auth="none")
def create_session(req):
    app = req.app
    if not app.config.admin_password:
        raise HTTPError(403, "forbidden", "no admin password is set: there is no login; the "
                        "admin API answers this machine's own clients without one")
    if req.header("Origin") and not same_origin(req):     # no login from another page
        raise HTTPError(403, "forbidden", "log in from this control plane's own page")
    body = req.json()
    check_fields(body, ("username", "password"), required=("username", "password"))
    for field in ("username", "password"):
        if not isinstance(body[field], str) or len(body[field]) > PASSWORD_MAX_LENGTH:
            raise invalid(field, f"{field} must be a string of at most "
                                 f"{PASSWORD_MAX_LENGTH} characters")
    app.check_admin_login(req, body["username"], body["password"])
    token, row = open_session(req.db, app.config, session_tokens(req))
    log.info("admin logged in: session %s", row["id"])
    return Response(204, headers=[session_cookie(req, token)])


@route("GET", "/api/v1/session")
def get_session(req):
    session = req.session
    return 200, {"username": req.app.config.admin_user if req.admin_via != "loopback" else None,
                 "method": req.admin_via,
                 "created_at": session["created_at"] if session else None,
                 "expires_at": iso_time(session_expires_at(session)) if session else None}


@route("DELETE", "/api/v1/session")
def delete_session(req):
    if req.session is not None:
        close_session(req.db, req.session["id"])
        log.info("admin logged out: session %s", req.session["id"])
    return Response(204, headers=[session_cookie(req, "", max_age=0)])


@route("GET", "/api/v1/sites")
def list_sites(req):
    view = sites_view_of(req)
    return 200, {key: view[key] for key in ("sites", "edges", "summary")}


@route("GET", "/api/v1/alert-targets")
def list_alert_targets(req):
    rows = req.db.execute("SELECT * FROM alert_targets ORDER BY name_key").fetchall()
    return 200, {"alert_targets": [alert_target_json(row) for row in rows]}


@route("POST", "/api/v1/alert-targets")
def create_alert_target(req):
    row = insert_alert_target(req.db, req.app.config.keyring, req.json())
    log.info("created alert target %s", row["id"])
    return 201, alert_target_json(row)


@route("GET", "/api/v1/alert-targets/<id>")
def get_alert_target(req, id):
    return 200, alert_target_json(get_alert_target_row(req.db, id))


@route("PATCH", "/api/v1/alert-targets/<id>")
def update_alert_target(req, id):
    return 200, alert_target_json(patch_alert_target(req.db, req.app.config.keyring, id,
                                                     req.json()))


@route("DELETE", "/api/v1/alert-targets/<id>")
def delete_alert_target(req, id):
    delete_by_id(req.db, "alert_targets", id, "alert target")
    return 204, None


@route("POST", "/api/v1/alert-targets/<id>/test")
def test_alert_target(req, id):
    check_fields(req.json(), ())
    row = get_alert_target_row(req.db, id)
    message = f"test alert from Kokoa to {row['name']}: this target works"
    [(delivery_id, _)] = insert_deliveries(req.db, [("firing", "test", row["name"], message)],
                                           only_target=id)
    req.app.health.sender.submit([delivery_id])
    delivery = req.db.execute("SELECT * FROM alert_deliveries WHERE id = ?",
                              (delivery_id,)).fetchone()
    return 202, delivery_json(delivery)


@route("GET", "/api/v1/alert-targets/<id>/deliveries")
def list_alert_deliveries(req, id):
    get_alert_target_row(req.db, id)
    rows = req.db.execute("""
        SELECT * FROM alert_deliveries
         WHERE target_id = ?
         ORDER BY created_at DESC, rowid DESC
         LIMIT ?""", (id, ALERT_DELIVERIES_KEPT)).fetchall()
    return 200, {"deliveries": [delivery_json(row) for row in rows]}


@route("GET", "/api/v1/settings")
def get_settings(req):
    return 200, settings_json(req, read_settings(req.db))


def settings_json(req, settings):
    """The stored settings and, read-only, the control plane's KOKOA_PUBLIC_URL."""
    return {**settings, "public_url": req.app.config.public_url or None}


@route("PATCH", "/api/v1/settings", changes_config=True)
def update_settings(req):
    return 200, settings_json(req, store_settings(req.db, req.json()))


@route("GET", "/api/v1/enrollment-keys")
def list_enrollment_keys(req):
    rows = req.db.execute("SELECT * FROM enrollment_keys ORDER BY created_at, id").fetchall()
    return 200, {"enrollment_keys": [enrollment_key_json(row) for row in rows]}


@route("POST", "/api/v1/enrollment-keys")
def create_enrollment_key(req):
    row, key = insert_enrollment_key(req.db, req.json())
    log.info("created enrollment key %s", row["id"])
    return 201, {**enrollment_key_json(row), "key": key}


@route("DELETE", "/api/v1/enrollment-keys/<id>")
def delete_enrollment_key(req, id):
    delete_by_id(req.db, "enrollment_keys", id, "enrollment key")
    return 204, None


@route("POST", "/api/v1/edge-nodes/register", auth="none")
def register_edge_node(req):
    fail = req.app.rate_limited("bootstrap", req)
    body = req.json()
    given = body.get("bootstrap_token") if isinstance(body, dict) else None
    if not isinstance(given, str) or not given:
        fail()
        raise HTTPError(401, "unauthorized", "a bootstrap token or enrollment key is required",
                        field="bootstrap_token")
    expected = req.app.config.bootstrap_token
    enrollment_key = None
    if not expected or not tokens_equal(given, expected):
        if not enrollment_key_usable(req.db, given):
            fail()
            raise HTTPError(401, "unauthorized", enrollment_key_refusal(req.db, given),
                            field="bootstrap_token")
        enrollment_key = given          # spent inside the insert transaction
    try:
        row, token = insert_edge(req.db, req.app.config, body, enrollment_key)
    except HTTPError as err:
        if err.status == 401:
            fail()
        raise
    req.edge_id = row["id"]
    log.info("registered edge node %s (%s)", row["id"], row["name"])
    network = req.app.config.wg_network
    return 201, {"id": row["id"], "name": row["name"], "token": token, "wg_ip": row["wg_ip"],
                 "wg_network": str(network) if network else None}


@route("GET", "/api/v1/edge-nodes/me/config", auth="edge")
def get_my_config(req):
    agent_version, schema = negotiate_schema(req.header("X-Kokoa-Agent"))
    req.app.last_seen.touch(req, req.edge_id, agent_version, schema)
    config_hash, body, _ = req.app.edge_config.get(req, schema)
    headers = [("ETag", f'"{config_hash}"'), ("Cache-Control", "no-cache")]
    if etag_matches(req.header("If-None-Match"), config_hash):
        return Response(304, headers=headers)
    return Response(200, body, JSON_TYPE, headers)


@route("POST", "/api/v1/edge-nodes/me/status", auth="edge")
def post_my_status(req):
    negotiate_schema(req.header("X-Kokoa-Agent"))
    record_edge_status(req.db, req.edge_id, req.json())
    req.app.health.wake()
    return 204, None


# Served installers: one paste per machine (issue 17). Public (they hold no secret): the edge
# and origin scripts of this checkout with its URL, and agent.sh's SHA-256, filled in.

INSTALLERS = {"edge.sh": "install-edge.sh", "origin.sh": "install-origin.sh",
              "agent.sh": "agent.sh"}
INSTALLER_DIR = Path(__file__).resolve().parent
# What a served script may name as its control plane: nothing a shell could read as code.
INSTALLER_URL_RE = re.compile(
    r"https?://(?:[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\])(?::[0-9]{1,5})?")


def installer_url(config):
    """KOKOA_PUBLIC_URL when it can go into a served script (plain http(s)://HOST[:PORT]),
    else "" (the script then needs --control-plane)."""
    url = config.public_url
    if url and not INSTALLER_URL_RE.fullmatch(url):
        log.warning("KOKOA_PUBLIC_URL %r is left out of the served installers: only "
                    "http(s)://HOST[:PORT] of letters, digits, dots and dashes goes in", url)
        return ""
    return url or ""


def installer_text(name):
    """The text of a served file from this checkout; 404 when it was installed without it."""
    try:
        return (INSTALLER_DIR / INSTALLERS[name]).read_text(encoding="utf-8")
    except OSError:
        raise not_found(f"installer (this control plane has no {INSTALLERS[name]})") from None


def fill_served(text, values):
    """`text` with each `NAME=''` line of `values` set to the value, validated by the caller
    and shell-quoted here all the same."""
    for name, value in values.items():
        text = re.sub(rf"^{name}=''$", lambda _, v=value, n=name: f"{n}={shlex.quote(v)}",
                      text, count=1, flags=re.M)
    return text


def served_installer(config, name):
    """(body, sha256) of /install/<name>."""
    text = installer_text(name)
    if name != "agent.sh":
        agent_sha256 = sha256_hex(installer_text("agent.sh").encode())
        text = fill_served(text, {"SERVED_CONTROL_PLANE": installer_url(config),
                                  "SERVED_AGENT_SHA256": agent_sha256})
    body = text.encode()
    return body, sha256_hex(body)


@route("GET", "/install/<name>", auth="none")
def get_installer(req, name):
    if name not in INSTALLERS:
        raise not_found("installer")
    body, digest = served_installer(req.app.config, name)
    return Response(200, body, "text/x-shellscript; charset=utf-8",
                    [("Cache-Control", "no-cache"), ("X-Kokoa-Sha256", digest)])


# Fleet certificates (issue 15): edges claim, upload and download; HTTP-01 tokens; the admin view

@route("GET", "/api/v1/certificates")
def list_certificates(req):
    return 200, {"certificates": list_certificate_states(req.db, req.app.config)}


@route("GET", "/api/v1/edge-nodes/me/certificates", auth="edge")
def get_my_certificates(req):
    negotiate_schema(req.header("X-Kokoa-Agent"))
    rows = served_certificate_rows(req.db)
    tag = certificates_etag(rows, req.app.config)
    headers = [("ETag", f'"{tag}"'), ("Cache-Control", "no-store")]
    if etag_matches(req.header("If-None-Match"), tag):
        return Response(304, headers=headers)
    return json_response(200, edge_certificates(rows, req.app.config), headers)


@route("POST", "/api/v1/edge-nodes/me/certificates/<name>/claim", auth="edge")
def claim_my_certificate(req, name):
    name = certificate_name(req.db, name)
    check_fields(req.json(), ())
    return claim_certificate(req.db, req.app.config, req.edge_id, name)


@route("PUT", "/api/v1/edge-nodes/me/certificates/<name>", auth="edge")
def put_my_certificate(req, name):
    name = certificate_name(req.db, name)
    store_certificate(req.db, req.app.config, req.edge_id, name, req.json())
    return 204, None


@route("POST", "/api/v1/edge-nodes/me/certificates/<name>/failure", auth="edge")
def post_my_certificate_failure(req, name):
    name = certificate_name(req.db, name)
    record_certificate_failure(req.db, req.app.config, req.edge_id, name, req.json())
    return 204, None


@route("PUT", "/api/v1/edge-nodes/me/acme-challenges/<token>", auth="edge")
def put_my_acme_challenge(req, token):
    token = check_acme_token(token)
    key_authorization = check_key_authorization(token, req.json())
    req.app.acme_challenges.put(req.edge_id, token, key_authorization)
    return 204, None


@route("DELETE", "/api/v1/edge-nodes/me/acme-challenges/<token>", auth="edge")
def delete_my_acme_challenge(req, token):
    req.app.acme_challenges.delete(req.edge_id, check_acme_token(token))
    return 204, None


@route("PUT", "/api/v1/edge-nodes/me/dns-challenges/<name>", auth="edge")
def put_my_dns_challenge(req, name):
    name = certificate_name(req.db, name)
    held_claim(req.db, req.edge_id, name, time.time())
    publish_dns_challenge(req.app.config, req.app.acme_challenges, name, req.json())
    return 204, None


@route("DELETE", "/api/v1/edge-nodes/me/dns-challenges/<name>", auth="edge")
def delete_my_dns_challenge(req, name):
    name = certificate_name(req.db, name)
    row = certificate_row(req.db, name)
    if row is not None and claim_active(row, time.time()) and row["claim_edge_id"] != req.edge_id:
        raise conflict("name", f"another edge issues the certificate of {name} now")
    withdraw_dns_challenge(req.app.config, req.app.acme_challenges, name)
    return 204, None


@route("GET", "/.well-known/acme-challenge/<token>", auth="none")
def get_acme_challenge(req, token):
    value = req.app.acme_challenges.get(token) if ACME_TOKEN_RE.fullmatch(token) else None
    if value is None:
        raise not_found("challenge")
    return Response(200, value.encode("ascii"), "text/plain")


# Static UI ###################################################################################

STATIC_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
    ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8",
}
STATIC_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def static_file(name):
    """A file directly inside static/ (flat; no dot-files, no traversal), or 404."""
    suffix = os.path.splitext(name)[1].lower()
    path = STATIC_DIR / name
    if not STATIC_NAME_RE.fullmatch(name) or suffix not in STATIC_TYPES or not path.is_file():
        raise not_found("file")
    return Response(200, path.read_bytes(), STATIC_TYPES[suffix],
                    [("Cache-Control", "no-cache")])


@route("GET", "/", auth="none")       # the UI's shell holds no data: its login page must load
def get_index(req):
    return static_file("index.html")


@route("GET", "/static/<name>", auth="none")
def get_static(req, name):
    return static_file(name)


# CLI #########################################################################################

class CLIError(Exception):
    """A command-line failure reported as one line on stderr."""


def load_environment(env_file):
    """Variables from the env file (if present), overridden by the real environment."""
    values = {}
    path = Path(env_file)
    if path.is_file():
        try:
            values = read_env_file(path)
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise CLIError(f"cannot read {path}: {err}") from None
    elif env_file != DEFAULT_ENV_FILE:
        raise CLIError(f"env file {path} does not exist")
    values.update(os.environ)
    return values


def db_path_from(args, env):
    """--db, else KOKOA_DB, else ./kokoa.db."""
    return args.db or env.get("KOKOA_DB") or DEFAULT_DB


def file_stamp():
    """UTC time for names of copies kept beside the database, e.g. 20261128T201500Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def load_keyring(env):
    """The Keyring from WIREGUARD_KEY_ENC_SECRET (+ _OLD); CLIError if missing or malformed."""
    try:
        current = decode_key(env.get("WIREGUARD_KEY_ENC_SECRET") or "")
    except ValueError as err:
        state = "is missing" if not env.get("WIREGUARD_KEY_ENC_SECRET") else str(err)
        raise CLIError(f"WIREGUARD_KEY_ENC_SECRET {state}; run `{python_command()} init` or "
                       "set it to 64 hex characters (e.g. `openssl rand -hex 32`)") from None
    old = []
    if env.get("WIREGUARD_KEY_ENC_SECRET_OLD"):
        try:
            old.append(decode_key(env["WIREGUARD_KEY_ENC_SECRET_OLD"]))
        except ValueError as err:
            raise CLIError(f"WIREGUARD_KEY_ENC_SECRET_OLD {err}") from None
    return Keyring(current, old)


def wg_network_from(env):
    """KOKOA_WG_NETWORK parsed, or None when unset; CLIError if it is no usable network."""
    if not env.get("KOKOA_WG_NETWORK"):
        return None
    try:
        return parse_wg_network(env["KOKOA_WG_NETWORK"])
    except ValueError as err:
        raise CLIError(f"KOKOA_WG_NETWORK must be a private CIDR such as "
                       f"{DEFAULT_WG_NETWORK}: {err}") from None


def alert_settings_from(env):
    """KOKOA_ALERT_RETRY_DELAYS (s before each retry, e.g. 1,5,25) and KOKOA_ALERT_TIMEOUT."""
    settings = {}
    try:
        if env.get("KOKOA_ALERT_RETRY_DELAYS"):
            delays = tuple(float(part) for part in env["KOKOA_ALERT_RETRY_DELAYS"].split(","))
            if len(delays) > 10 or not all(0 <= delay <= 3600 for delay in delays):
                raise ValueError
            settings["alert_retry_delays"] = delays
        if env.get("KOKOA_ALERT_TIMEOUT"):
            settings["alert_timeout"] = float(env["KOKOA_ALERT_TIMEOUT"])
            if not 0.1 <= settings["alert_timeout"] <= 60:
                raise ValueError
    except ValueError:
        raise CLIError("KOKOA_ALERT_RETRY_DELAYS must list at most 10 delays of 0-3600 s "
                       "(e.g. 1,5,25) and KOKOA_ALERT_TIMEOUT be 0.1-60 s") from None
    return settings


def certificate_settings_from(env):
    """The Config fields of fleet certificates from KOKOA_CERT_* and the DNS provider's
    variables (dns.py's, for DNS-01); CLIError if a number is malformed."""
    fields = {}
    for variable, field, low in (("KOKOA_CERT_CLAIM_SECONDS", "cert_claim_seconds", 5),
                                 ("KOKOA_CERT_BACKOFF_SECONDS", "cert_backoff_seconds", 1),
                                 ("KOKOA_CERT_RENEW_BEFORE_SECONDS", "cert_renew_before", 0)):
        text = env.get(variable, "").strip()
        if text:
            if not re.fullmatch("[0-9]{1,9}", text) or int(text) < low:
                raise CLIError(f"{variable} must be a whole number of seconds >= {low}")
            fields[field] = int(text)
    fields["dns_settings"] = {key: value for key, value in env.items()
                              if key.startswith(("KOKOA_DNS_", "CLOUDFLARE_",
                                                 "KOKOA_CLOUDFLARE_")) and value}
    return fields


def load_config(args, env):
    """Build a Config from parsed arguments and the merged environment."""
    network = wg_network_from(env)
    try:
        proxy = env.get("KOKOA_TRUSTED_PROXY", "").strip()
        trusted_proxy = ipaddress.ip_address(proxy) if proxy else None
    except ValueError:
        raise CLIError("KOKOA_TRUSTED_PROXY must be the proxy's IP address") from None
    public_url, public_host = "", ""
    if env.get("KOKOA_PUBLIC_URL"):
        try:
            public_url, public_host = parse_public_url(env["KOKOA_PUBLIC_URL"])
        except ValueError as err:
            raise CLIError(f"KOKOA_PUBLIC_URL {err}") from None
    return Config(
        **alert_settings_from(env),
        db_path=db_path_from(args, env),
        keyring=load_keyring(env),
        bootstrap_token=env.get("KOKOA_BOOTSTRAP_TOKEN", ""),
        admin_user=env.get("KOKOA_ADMIN_USER") or "admin",
        admin_password=env.get("KOKOA_ADMIN_PASSWORD", ""),
        wg_network=network,
        trusted_proxy=trusted_proxy,
        public_url=public_url,
        public_host=public_host,
        **certificate_settings_from(env),
    )


class QueueDepthSummary(logging.Filter):
    """waitress warns "Task queue depth is N" for every request that waits for a thread: a
    burst of polls wrote a line per poll (and formatting them cost the poll path a tenth of
    its throughput). Pass one line per `interval` seconds, with the deepest queue since."""

    def __init__(self, interval=60.0):
        super().__init__()
        self.interval, self.next_line, self.deepest, self.waited = interval, 0.0, 0, 0

    def filter(self, record):
        depth = record.args[0] if isinstance(record.args, tuple) and record.args else 0
        self.deepest, self.waited = max(self.deepest, depth), self.waited + 1
        now = time.monotonic()
        if now < self.next_line:
            return False
        record.msg = ("%d request(s) waited for a free thread in the last %d s (at most %d "
                      "in the queue): raise --threads if this recurs")
        record.args = (self.waited, self.interval, self.deepest)
        self.next_line, self.deepest, self.waited = now + self.interval, 0, 0
        return True


def configure_logging(env):
    """JSON lines on stderr at KOKOA_LOG_LEVEL (default INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    level = getattr(logging, (env.get("KOKOA_LOG_LEVEL") or "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    queue_log = logging.getLogger("waitress.queue")
    if not any(isinstance(f, QueueDepthSummary) for f in queue_log.filters):
        queue_log.addFilter(QueueDepthSummary())


def cmd_init(args):
    """Write kokoa.env with fresh secrets, mode 0600; never overwrite."""
    path = Path(args.env_file)
    try:
        network = parse_wg_network(args.wg_network)
    except ValueError as err:
        raise CLIError(f"--wg-network must be a private CIDR such as {DEFAULT_WG_NETWORK}: "
                       f"{err}") from None
    public_url = "https://kokoa.example.com"
    given = args.public_url or os.environ.get("KOKOA_PUBLIC_URL")
    if given:
        try:
            public_url = parse_public_url(given)[0]
        except ValueError as err:
            raise CLIError(f"--public-url (or KOKOA_PUBLIC_URL) {err}") from None
    lines = [
        "# kokoa control plane secrets: keep this file private (mode 0600) and backed up.",
        "# Losing WIREGUARD_KEY_ENC_SECRET makes stored WireGuard private keys unreadable.",
        f"WIREGUARD_KEY_ENC_SECRET={secrets.token_hex(32)}",
        f"KOKOA_BOOTSTRAP_TOKEN={secrets.token_urlsafe(32)}",
        "KOKOA_ADMIN_USER=admin",
        f"KOKOA_ADMIN_PASSWORD={secrets.token_urlsafe(18)}",
        "# The WireGuard tunnel network: origins and edges get their addresses from it.",
        f"KOKOA_WG_NETWORK={network}",
        "# The URL edges and browsers use; other Host names get 421 (loopback names always pass).",
        f"{'' if given else '# '}KOKOA_PUBLIC_URL={public_url}",
        "# Behind a reverse proxy: its address (see README, Security).",
        "# KOKOA_TRUSTED_PROXY=127.0.0.1",
    ]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CLIError(f"{path} already exists; not overwriting it") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {path.resolve()} (mode 0600)")
    print(f"start the control plane:  {python_command()} serve")
    print("log in at http://127.0.0.1:8080/ as 'admin' with KOKOA_ADMIN_PASSWORD from that file")
    return 0


def open_migrated(db_path, backup_first=False):
    """Migrate the database at db_path; with backup_first, copy an older schema aside first.

    Raises CLIError if the database is newer than this code or a migration fails.
    """
    db = connect(db_path)
    make_database_private(db_path)
    try:
        version = schema_version(db)
        if backup_first and 0 < version < len(MIGRATIONS):
            backup_path = f"{db_path}.bak-v{version}-{file_stamp()}"
            db.close()
            backup_database(db_path, backup_path)
            log.info("backed up schema v%d database to %s before migrating", version,
                     backup_path)
            db = connect(db_path)
        version = migrate(db)
        problems = unexpected_schema(db, version)
        if problems:
            raise CLIError(f"{db_path} has schema objects Kokoa did not make ("
                           + ", ".join(problems[:5]) + "): refusing to use it; restore a "
                           "backup that passes `kokoa.py restore`'s checks")
        return version
    except RuntimeError as err:
        raise CLIError(str(err)) from None
    except sqlite3.Error as err:
        raise CLIError(f"database migration failed, nothing was changed: {err}") from None
    finally:
        db.close()


WAITRESS_ERROR_CODES = {413: "payload_too_large", 431: "headers_too_large", 500: "internal"}
PER_ADDRESS_CONNECTIONS = 32      # open connections per client address (IPv6: per /64) ...
CONNECTION_LIMIT = 2000           # ... and in all
HEADER_DEADLINE = 10.0            # s from accept (or the last response) to a request's headers
BODY_DEADLINE = 30.0              # ... and to the end of its body


def raise_fd_limit(wanted):
    """Raise the soft RLIMIT_NOFILE to `wanted` if the hard limit allows; the soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return wanted if soft == resource.RLIM_INFINITY else soft


def make_server(app, host, port, threads, trusted_proxy=None,
                per_address=PER_ADDRESS_CONNECTIONS, connection_limit=CONNECTION_LIMIT,
                header_deadline=HEADER_DEADLINE, body_deadline=BODY_DEADLINE, **settings):
    """A waitress server with limits a slow client cannot stretch: at most `per_address`
    connections per client address (not the trusted proxy's: it must limit its clients),
    and a request's headers in within `header_deadline` s, its body within `body_deadline` s,
    of the connection being ready for it (accepted, or the previous response sent)."""
    from waitress.channel import HTTPChannel
    from waitress.server import TcpWSGIServer
    from waitress.task import ErrorTask, WSGITask

    exempt = None if trusted_proxy is None else str(trusted_proxy)
    fds = raise_fd_limit(2 * connection_limit + 256)    # a channel may hold a buffer file too
    if fds < 2 * connection_limit + 256:
        connection_limit = max(100, (fds - 256) // 2)
        log.warning("open-file limit %d: connection limit lowered to %d", fds, connection_limit)

    class JsonErrorTask(ErrorTask):
        """waitress's own refusals (a body over its limit, a malformed request) as Kokoa's
        JSON errors, with the headers every response carries."""

        def execute(self):
            error = self.request.error
            code = WAITRESS_ERROR_CODES.get(error.code, "bad_request")
            message = ("the body is larger than 1 MiB" if error.code == 413
                       else f"{error.reason}: {error.body}")
            body = json.dumps(HTTPError(error.code, code, message).body()).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.extend([("Content-Type", JSON_TYPE),
                                          ("X-Request-ID", new_request_id()),
                                          ("Cache-Control", "no-store"), *SECURITY_HEADERS])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class BodilessKeepAliveTask(WSGITask):
        """waitress closes the connection after any response without a Content-Length, which
        a 304 or 204 must not have and does not need (it ends with its headers, RFC 9112
        6.3): every keep-alive poll paid a new connection. Only that close is skipped; a
        client's "Connection: close", HTTP/1.0 and an earlier decision to close still close."""

        _keep_open = False

        def build_response_header(self):
            self._keep_open = (self.version == "1.1" and not self.has_body
                               and not self.close_on_finish
                               and self.request.headers.get("CONNECTION", "").lower() != "close")
            try:
                return super().build_response_header()
            finally:
                self._keep_open = False

        def set_close_on_finish(self):
            if not self._keep_open:
                super().set_close_on_finish()

    class Channel(HTTPChannel):
        error_task_class = JsonErrorTask
        task_class = BodilessKeepAliveTask

        def __init__(self, server, sock, addr, adj, map=None):
            super().__init__(server, sock, addr, adj, map)
            self.ready_since, self.key = time.monotonic(), rate_key(addr[0])
            server.per_address[self.key] += 1

        def service(self):                  # worker thread: the queued requests are answered
            super().service()
            self.ready_since = time.monotonic()

        def writable(self):                 # main thread, every turn of the loop
            """Not while a worker is sending on this channel: waitress's handle_write then
            does nothing, and the socket, writable, woke the loop again at once; the spin
            took more CPU than the request it waited for."""
            if self.will_close or self.close_when_flushed:
                return True
            if not self.total_outbufs_len:
                return False
            if not self.requests or self.total_outbufs_len > self.adj.outbuf_high_watermark:
                return True                 # (above the mark a worker waits for the loop)
            if not self.outbuf_lock.acquire(False):
                return False                # a worker holds it, sending
            self.outbuf_lock.release()
            return True

        def write_soon(self, data):         # worker thread
            written = super().write_soon(data)
            if self.total_outbufs_len:      # left unsent: the loop skipped us while we held the
                self.server.pull_trigger()  # lock, so wake it now that the lock is free
            return written

        def del_channel(self, map=None):    # main thread: waitress closes channels only there
            super().del_channel(map)
            key, self.key = self.key, None
            if key is not None:
                self.server.per_address[key] -= 1
                if self.server.per_address[key] <= 0:
                    del self.server.per_address[key]

    class Server(TcpWSGIServer):
        channel_class = Channel

        def __init__(self, *args, **kw):
            self.per_address, self.refused, self.next_refusal_log = collections.Counter(), 0, 0
            super().__init__(*args, **kw)

        def handle_accept(self):            # drain the queue: one accept per poll() is slow
            for _ in range(64):
                self.got = False
                super().handle_accept()
                if not self.got or len(self._map) >= self.adj.connection_limit:
                    break

        def accept(self):
            pair = super().accept()
            self.got = pair is not None
            if (pair is not None and pair[1][0] != exempt
                    and self.per_address[rate_key(pair[1][0])] >= per_address):
                pair[0].close()
                self.refused += 1
                return None
            return pair

        def maintenance(self, now):
            super().maintenance(now)        # channel_timeout: a response the client stalls
            mono = time.monotonic()
            for channel in self.active_channels.values():
                if channel.requests or channel.total_outbufs_len:
                    channel.ready_since = mono          # answering, not waiting for the client
                    continue
                request = channel.request
                headers_in = request is not None and request.headers_finished
                if mono - channel.ready_since > (body_deadline if headers_in
                                                 else header_deadline):
                    channel.will_close = True
            if self.refused and now >= self.next_refusal_log:
                log.warning("refused %d connection(s) over %d per client address",
                            self.refused, per_address)
                self.refused, self.next_refusal_log = 0, now + 60

    return Server(app, host=host, port=port, threads=threads, connection_limit=connection_limit,
                  asyncore_use_poll=True, cleanup_interval=1, channel_timeout=30, **settings)


def cmd_serve(args):
    """Serve the app with waitress until interrupted."""
    env = load_environment(args.env_file)
    config = load_config(args, env)
    host, port = parse_listen(args.listen or env.get("KOKOA_LISTEN") or DEFAULT_LISTEN)
    configure_logging(env)
    if config.trusted_proxy is not None and not config.admin_password:
        raise CLIError("KOKOA_TRUSTED_PROXY is set but KOKOA_ADMIN_PASSWORD is not: behind a "
                       "proxy the password-less (loopback only) admin is refused; set a password")
    version = open_migrated(config.db_path, backup_first=True)
    if not config.public_url:
        log.warning("KOKOA_PUBLIC_URL is not set: only requests addressed to localhost, "
                    "127.0.0.1 or [::1] are answered (others get 421); set it to the URL "
                    "edges and browsers use")
    if not config.admin_password:
        log.warning("KOKOA_ADMIN_PASSWORD is not set: the admin API and UI answer loopback "
                    "clients only")
    if not config.bootstrap_token:
        log.warning("KOKOA_BOOTSTRAP_TOKEN is not set: edges cannot register")
    if config.wg_network is None:
        log.warning("KOKOA_WG_NETWORK is not set: every wg_ip must be given and private; set it "
                    "(e.g. %s) to have addresses assigned", DEFAULT_WG_NETWORK)
    log.info("kokoa %s serving on http://%s:%d/ (database %s, schema v%d)",
             __version__, host, port, config.db_path, version)
    # As a container's PID 1, SIGTERM has no default action: without a handler `podman stop`
    # waits its 10 s and kills. SystemExit ends waitress's loop, which closes the server.
    signal.signal(signal.SIGTERM, stop_serving)
    app = make_app(config)
    app.health.start()
    make_server(app, host, port, args.threads, config.trusted_proxy, **WAITRESS_SETTINGS).run()
    log.info("kokoa stopped")
    return 0


def stop_serving(signum, frame):
    """SIGTERM handler for serve: leave waitress's loop as on Ctrl-C."""
    raise SystemExit(0)


def cmd_migrate(args):
    """Create or upgrade the database schema."""
    env = load_environment(args.env_file)
    db_path = db_path_from(args, env)
    print(f"{db_path}: schema v{open_migrated(db_path)}")
    return 0


def cmd_backup(args):
    """Consistent online copy of the database to a new file."""
    env = load_environment(args.env_file)
    db_path = db_path_from(args, env)
    target = Path(args.path)
    if not Path(db_path).is_file():
        raise CLIError(f"database {db_path} does not exist")
    if target.exists() and not args.force:
        raise CLIError(f"{target} already exists; pass --force to replace it")
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(fd)                   # mkstemp: exclusive, no symlink followed, mode 0600
    partial = Path(partial)
    try:
        backup_database(db_path, str(partial), fresh=False)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    print(f"backed up {db_path} to {target}")
    return 0


def check_restorable(path, network):
    """CLIError unless `path` is an intact Kokoa database this code can migrate, with no
    schema object Kokoa did not make and no row the API would have refused."""
    if not Path(path).is_file():
        raise CLIError(f"{path} does not exist")
    try:
        source = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            source.row_factory = sqlite3.Row
            (check,) = source.execute("PRAGMA integrity_check").fetchone()
            version = schema_version(source)
            if check != "ok":
                raise CLIError(f"{path} fails the integrity check: {check}")
            if not 1 <= version <= len(MIGRATIONS):
                raise CLIError(f"{path} has schema v{version}; this kokoa reads v1 to "
                               f"v{len(MIGRATIONS)}")
            problems = unexpected_schema(source, version) or stored_row_problems(source,
                                                                                 network)
        finally:
            source.close()
    except sqlite3.DatabaseError as err:
        raise CLIError(f"{path} is not a usable SQLite database: {err}") from None
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CLIError(f"{path} is not a database Kokoa would have written, nothing was "
                       f"restored: " + "; ".join(problems[:5]) + more)
    return version


def cmd_restore(args):
    """Replace the database's content with a backup, through SQLite's backup API."""
    env = load_environment(args.env_file)
    db_path = db_path_from(args, env)
    version = check_restorable(args.path, wg_network_from(env))
    if Path(db_path).exists():
        if not args.force:
            raise CLIError(f"{db_path} exists; pass --force to replace it (a copy of it is "
                           "kept beside it)")
        keep = f"{db_path}.pre-restore-{file_stamp()}"
        backup_database(db_path, keep)
        print(f"kept the previous database as {keep}")
    backup_database(args.path, db_path, fresh=not Path(db_path).exists())
    make_database_private(db_path)
    print(f"restored {args.path} (schema v{version}) into {db_path}; restart serve, which "
          "migrates it if needed")
    return 0


def rotate_secrets(db, keyring):
    """Re-seal every stored secret with the current key, in one transaction; returns a count."""
    count = 0
    with transaction(db):
        rows = db.execute("""
            SELECT id, wg_private_key_enc
              FROM origins
             WHERE wg_private_key_enc IS NOT NULL""").fetchall()
        for row in rows:
            if keyring.is_current(row["wg_private_key_enc"]):
                continue
            aad = secret_aad("origins", row["id"], "wg_private_key")
            plaintext = keyring.unseal(row["wg_private_key_enc"], aad)
            db.execute("UPDATE origins SET wg_private_key_enc = ? WHERE id = ?",
                       (keyring.seal(plaintext, aad), row["id"]))
            count += 1
        for row in db.execute("SELECT id, url_enc FROM alert_targets").fetchall():
            if keyring.is_current(row["url_enc"]):
                continue
            aad = secret_aad("alert_targets", row["id"], "url")
            plaintext = keyring.unseal(row["url_enc"], aad)
            db.execute("UPDATE alert_targets SET url_enc = ? WHERE id = ?",
                       (keyring.seal(plaintext, aad), row["id"]))
            count += 1
        count += rotate_certificate_keys(db, keyring)
    return count


def cmd_rotate_key(args):
    """Re-encrypt secrets from WIREGUARD_KEY_ENC_SECRET_OLD to WIREGUARD_KEY_ENC_SECRET."""
    env = load_environment(args.env_file)
    config = load_config(args, env)
    if not env.get("WIREGUARD_KEY_ENC_SECRET_OLD"):
        raise CLIError("set WIREGUARD_KEY_ENC_SECRET_OLD to the previous key and "
                       "WIREGUARD_KEY_ENC_SECRET to the new one")
    open_migrated(config.db_path)
    db = connect(config.db_path)
    try:
        count = rotate_secrets(db, config.keyring)
    except SecretError as err:
        raise CLIError(f"nothing changed: {err}") from None
    finally:
        db.close()
    print(f"re-encrypted {count} secret(s) with the current key")
    return 0


def python_command():
    """How to run this kokoa.py again with the interpreter running it now (the venv's, which
    has the packages), relative to the working directory where that is shorter."""
    def short(path):
        relative = os.path.relpath(path)
        return relative if not relative.startswith("..") else str(path)
    script = short(Path(__file__).resolve())
    return f"{short(sys.executable)} {script}"


def build_parser():
    """The argparse parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="kokoa.py", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"kokoa {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, env_help="KEY=VALUE file to read (default ./kokoa.env)"):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--env-file", default=DEFAULT_ENV_FILE, help=env_help)
        sub.set_defaults(func=func)
        return sub

    init = add("init", cmd_init, "write kokoa.env with fresh secrets (never overwrites)",
               "the KEY=VALUE file to write (default ./kokoa.env); it must not exist")
    init.add_argument("--wg-network", default=DEFAULT_WG_NETWORK,
                      help=f"the tunnel network, a private CIDR (default {DEFAULT_WG_NETWORK})")
    init.add_argument("--public-url", help="the URL edges and browsers will use, e.g. "
                      "https://kokoa.example.com (default: $KOKOA_PUBLIC_URL when set)")
    serve = add("serve", cmd_serve, "serve the API and UI with waitress")
    serve.add_argument("--listen", help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    serve.add_argument("--db", help=f"database path (default ./{DEFAULT_DB})")
    serve.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    migrate_cmd = add("migrate", cmd_migrate, "create or upgrade the database schema")
    migrate_cmd.add_argument("--db", help=f"database path (default ./{DEFAULT_DB})")
    backup = add("backup", cmd_backup, "consistent online copy of the database")
    backup.add_argument("path", help="where to write the copy")
    backup.add_argument("--db", help=f"database path (default ./{DEFAULT_DB})")
    backup.add_argument("--force", action="store_true", help="replace an existing file")
    restore = add("restore", cmd_restore, "replace the database with a backup")
    restore.add_argument("path", help="the backup to restore")
    restore.add_argument("--db", help=f"database path (default ./{DEFAULT_DB})")
    restore.add_argument("--force", action="store_true", help="replace an existing database")
    rotate = add("rotate-key", cmd_rotate_key,
                 "re-encrypt secrets from WIREGUARD_KEY_ENC_SECRET_OLD to the current key")
    rotate.add_argument("--db", help=f"database path (default ./{DEFAULT_DB})")
    return parser


def main(argv=None):
    """Run one CLI command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as err:
        print(f"kokoa: {err}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as err:
        print(f"kokoa: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
