#!/usr/bin/env python3
"""dns.py: point public hostnames of one DNS zone at the Kokoa edges.

Usage:
    python3 dns.py add    --name NAME --ip ADDRESS [--ttl N] [--dry-run]
    python3 dns.py add    --name NAME --type TXT --value TEXT [--ttl N] [--dry-run]
    python3 dns.py remove --name NAME [--ip ADDRESS] [--dry-run]
    python3 dns.py remove --name NAME --type TXT [--value TEXT] [--dry-run]
    python3 dns.py list   [--json]
    (every command also takes --config FILE, default /etc/kokoa/dns.conf)

`add` adds an A (IPv4) or AAAA (IPv6) record to the name's existing addresses; adding a record
that already exists is a no-op that says so (its TTL is left as it is). `remove` removes one
address (`--ip`) or every A/AAAA record of the name. `list` prints the zone's A/AAAA records as
a table, or as a JSON list of {"name", "type", "ttl", "address"} with `--json`. `--dry-run`
asks the provider what exists and prints what would change, without changing it.

`--type TXT` works on TXT records instead (DNS-01 challenges: `_acme-challenge.app`): `add`
adds one value (1-255 printable ASCII characters, no space, quote or backslash) to the name's
values, `remove` removes one value (`--value`) or every TXT record of the name. TXT names may
begin with labels that start with an underscore.

NAME is relative to the zone (`app` -> app.example.com), `@` is the apex, a name that already
ends with the zone's name is taken as it is, and a name ending in a dot is absolute (refused
unless it lies inside the zone). Names must be host names as Kokoa has them: RFC 1123, at
least two labels, the last with a letter (IDN is converted with Python's `idna` codec);
addresses are checked before anything is sent.

Environment (a variable that is set and not empty wins over the INI file):
    KOKOA_DNS_ZONE            the zone, e.g. example.com                    (INI: zone)
    KOKOA_DNS_PROVIDER        rfc2136 or cloudflare                         (INI: provider)
    KOKOA_DNS_TIMEOUT         seconds to wait for the provider, default 5   (INI: timeout)
  rfc2136 (DNS UPDATE signed with TSIG; list by AXFR over TCP):
    KOKOA_DNS_SERVER          primary server, host[:port] or [v6]:port      (INI: server)
    KOKOA_DNS_TSIG_NAME       TSIG key name                                 (INI: tsig_name)
    KOKOA_DNS_TSIG_SECRET     TSIG secret, base64                           (INI: tsig_secret)
    KOKOA_DNS_TSIG_ALGORITHM  hmac-sha256 (default), hmac-sha512, hmac-sha384, hmac-sha224,
                              hmac-sha1 or hmac-md5                         (INI: tsig_algorithm)
  cloudflare (API v4; records are created DNS-only, "proxied": false):
    CLOUDFLARE_API_TOKEN      API token with Zone:Read and DNS:Edit (INI: cloudflare_api_token)
    CLOUDFLARE_ZONE_ID        optional; else looked up by zone name (INI: cloudflare_zone_id)
    KOKOA_CLOUDFLARE_API_URL  API base, default https://api.cloudflare.com/client/v4
                                                                  (INI: cloudflare_api_url)

The INI file has one section, [dns], with the keys named above. It holds secrets: keep it 0600.

Exit status: 0 success (including "nothing to do"), 1 provider error (refused, bad signature,
timeout, API error), 2 usage error (bad arguments, configuration, name or address).
"""

__version__ = "0.1.0"

import argparse
import base64
import binascii
import configparser
import dataclasses
import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import struct
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request

# Configuration & constants ######################################################################

DEFAULT_CONFIG = "/etc/kokoa/dns.conf"
DEFAULT_TTL = 300
DEFAULT_TIMEOUT = 5.0
DEFAULT_CLOUDFLARE_API_URL = "https://api.cloudflare.com/client/v4"
PROVIDERS = ("rfc2136", "cloudflare")

# setting name -> environment variable; the INI key is the setting name.
SETTINGS = {
    "zone": "KOKOA_DNS_ZONE",
    "provider": "KOKOA_DNS_PROVIDER",
    "timeout": "KOKOA_DNS_TIMEOUT",
    "server": "KOKOA_DNS_SERVER",
    "tsig_name": "KOKOA_DNS_TSIG_NAME",
    "tsig_secret": "KOKOA_DNS_TSIG_SECRET",
    "tsig_algorithm": "KOKOA_DNS_TSIG_ALGORITHM",
    "cloudflare_api_token": "CLOUDFLARE_API_TOKEN",
    "cloudflare_zone_id": "CLOUDFLARE_ZONE_ID",
    "cloudflare_api_url": "KOKOA_CLOUDFLARE_API_URL",
}

TYPE_A = 1
TYPE_CNAME = 5
TYPE_TXT = 16
TYPE_SOA = 6
TYPE_AAAA = 28
TYPE_TSIG = 250
TYPE_AXFR = 252
CLASS_IN = 1
CLASS_NONE = 254
CLASS_ANY = 255
OPCODE_QUERY = 0
OPCODE_UPDATE = 5
FLAG_QR = 0x8000
FLAG_TC = 0x0200
TYPE_NAMES = {TYPE_A: "A", TYPE_AAAA: "AAAA"}
TYPE_CODES = {"A": TYPE_A, "AAAA": TYPE_AAAA}

RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
          6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE"}
TSIG_ERRORS = {16: "BADSIG", 17: "BADKEY", 18: "BADTIME", 22: "BADTRUNC"}
TSIG_FUDGE = 300
# short name -> (algorithm name on the wire, hashlib name)
TSIG_ALGORITHMS = {
    "hmac-md5": ("hmac-md5.sig-alg.reg.int", "md5"),
    "hmac-sha1": ("hmac-sha1", "sha1"),
    "hmac-sha224": ("hmac-sha224", "sha224"),
    "hmac-sha256": ("hmac-sha256", "sha256"),
    "hmac-sha384": ("hmac-sha384", "sha384"),
    "hmac-sha512": ("hmac-sha512", "sha512"),
}
AXFR_MAX_MESSAGES = 100000
AXFR_MAX_UNSIGNED = 99          # RFC 8945 5.3.1: a TSIG at least every 100 envelopes
CLOUDFLARE_PER_PAGE = 100
CLOUDFLARE_MAX_PAGES = 1000
HTTP_MAX_BODY = 16 * 1024 * 1024

LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
SERVICE_LABEL_RE = re.compile(r"_[a-z0-9]([a-z0-9-]{0,60}[a-z0-9])?")   # _acme-challenge
TXT_VALUE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,255}")  # one character-string


# Errors #########################################################################################

class UsageError(Exception):
    """Bad arguments, configuration, name or address: exit 2."""


class ProviderError(Exception):
    """The provider refused, failed or could not be reached: exit 1."""


class WireError(ProviderError):
    """A malformed DNS message from the server."""


# Names, addresses and records ###################################################################

@dataclasses.dataclass(frozen=True)
class Record:
    """One A/AAAA record; `name` is absolute without the trailing dot, `ref` a provider id."""

    name: str
    rtype: str
    ttl: int
    address: str
    ref: str = dataclasses.field(default="", compare=False)

    def describe(self):
        """Return e.g. `A app.example.com 192.0.2.1`."""
        return f"{self.rtype} {self.name} {self.address}"

    def as_json(self):
        """Return the record as the JSON object of `list --json`."""
        return {"name": self.name, "type": self.rtype, "ttl": self.ttl, "address": self.address}


def normalize_zone(zone):
    """Return the zone lower-cased, without trailing dot, checked; raise UsageError."""
    name = to_ascii(zone.strip()).rstrip(".").lower() if zone else ""
    if not name:
        raise UsageError("no zone configured: set KOKOA_DNS_ZONE or zone in the config file")
    check_hostname(name, what="zone", min_labels=1)
    return name


def to_ascii(name):
    """Convert an IDN to its ASCII (punycode) form; raise UsageError if that fails."""
    if name.isascii():
        return name
    # As kokoa.py refuses them: invisible format characters, and the letters Python's IDNA2003
    # codec maps to others where browsers keep them (the name would be another domain).
    if any(unicodedata.category(char) == "Cf" for char in name) or \
            any(char in name.lower() for char in "\u00df\u03c2"):
        raise UsageError(f"invalid name {name!r}: it has an invisible character, ß or final "
                         "sigma ς, which browsers and Python's IDNA encode differently")
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        raise UsageError(f"invalid name {name!r}: not a valid internationalized name") from None


def check_hostname(name, what="name", min_labels=2):
    """Raise UsageError unless `name` is a host name as kokoa.py and the agent have it.

    RFC 1123 labels of 1-63 letters, digits and inner hyphens, at most 253 characters, at least
    `min_labels` labels (a zone may have one), the last label with a letter (so not an IP).
    """
    labels = name.split(".")
    if len(name) > 253:
        raise UsageError(f"invalid {what} {name!r}: longer than 253 characters")
    if len(labels) < min_labels:
        raise UsageError(f"invalid {what} {name!r}: fewer than {min_labels} labels")
    for label in labels:
        if not LABEL_RE.fullmatch(label):
            raise UsageError(
                f"invalid {what} {name!r}: label {label!r} is not 1-63 letters, digits or "
                f"inner hyphens (RFC 1123)")
    if not re.search("[a-z]", labels[-1]):
        raise UsageError(f"invalid {what} {name!r}: the last label has no letter "
                         f"(an IP address is not a host name)")


def resolve_name(raw, zone):
    """Turn a --name argument into an absolute name inside `zone`; raise UsageError."""
    text = raw.strip()
    if text == "@":
        check_hostname(zone)            # the apex of a one-label zone is not a host name
        return zone
    if not text or text.startswith(".") or ".." in text:
        raise UsageError(f"invalid name {raw!r}")
    name = to_ascii(text).lower()
    if name.endswith("."):
        name = name[:-1]
        if not in_zone(name, zone):
            raise UsageError(f"name {raw!r} is outside the zone {zone}")
    elif not in_zone(name, zone):
        name = f"{name}.{zone}"
    check_hostname(name)
    return name


def resolve_txt_name(raw, zone):
    """A --name of a TXT record: leading service labels (`_acme-challenge.`) and then a name
    as resolve_name takes it (none left: the apex); raise UsageError."""
    labels = raw.strip().lower().split(".")
    prefix = []
    while labels and labels[0].startswith("_"):
        if not SERVICE_LABEL_RE.fullmatch(labels[0]):
            raise UsageError(f"invalid name {raw!r}: label {labels[0]!r} is not _ and 1-62 "
                             "letters, digits or inner hyphens")
        prefix.append(labels.pop(0))
    rest = ".".join(labels)
    if prefix and rest in ("", "."):
        rest = "@"
    name = resolve_name(rest, zone)
    return ".".join(prefix + [name])


def check_txt_value(raw):
    """Return a TXT value: 1-255 printable ASCII characters, no space, quote or backslash."""
    if not TXT_VALUE_RE.fullmatch(raw or ""):
        raise UsageError(f"invalid TXT value {raw[:80]!r}: use 1-255 printable ASCII "
                         "characters without space, quote or backslash")
    return raw


def in_zone(name, zone):
    """Return whether `name` is the zone's apex or below it."""
    return name == zone or name.endswith("." + zone)


def parse_address(raw):
    """Return (type, canonical text) of an IPv4/IPv6 host address; raise UsageError."""
    try:
        addr = ipaddress.ip_address(raw.strip())
    except ValueError:
        raise UsageError(f"invalid address {raw!r}: not an IPv4 or IPv6 address") from None
    if addr.version == 6 and addr.scope_id:
        raise UsageError(f"invalid address {raw!r}: a scoped IPv6 address cannot go in DNS")
    if addr.is_unspecified or addr.is_multicast:
        raise UsageError(f"invalid address {raw!r}: unspecified or multicast")
    return ("A" if addr.version == 4 else "AAAA"), str(addr)


def ttl_argument(text):
    """argparse type for --ttl: an integer 1..2147483647 (RFC 2181)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"must be between 1 and {2**31 - 1}: {value}")
    return value


# DNS wire format ################################################################################

@dataclasses.dataclass
class ResourceRecord:
    """A parsed resource record; `rdata_offset` locates rdata inside the whole message."""

    name: str
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes
    rdata_offset: int


@dataclasses.dataclass
class Message:
    """A parsed DNS message; `tsig_offset` is where its final TSIG record starts, if any."""

    msg_id: int
    flags: int
    answer: list
    additional: list
    tsig: ResourceRecord = None
    tsig_offset: int = 0

    @property
    def rcode(self):
        """The header's response code (the low four bits)."""
        return self.flags & 0x000F


def encode_name(name):
    """Encode an absolute name (no trailing dot, "" = root) uncompressed and lower-cased."""
    out = bytearray()
    for label in name.lower().split(".") if name else []:
        raw = label.encode("ascii")
        out += bytes([len(raw)]) + raw
    return bytes(out + b"\x00")


def pack_header(msg_id, flags, counts):
    """Pack the 12-byte header; `counts` are the four section counts."""
    return struct.pack("!6H", msg_id, flags, *counts)


def pack_question(name, rtype, rclass=CLASS_IN):
    """Pack a question (or an UPDATE zone) entry."""
    return encode_name(name) + struct.pack("!HH", rtype, rclass)


def pack_rr(name, rtype, rclass, ttl, rdata):
    """Pack a resource record with uncompressed owner name."""
    return encode_name(name) + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def address_rdata(rtype, address):
    """Return the rdata of an A or AAAA record."""
    return ipaddress.ip_address(address).packed


def read_name(buf, offset):
    """Read a possibly compressed name at `offset`; return (name, offset after it)."""
    labels = []
    end = None
    length_total = 1
    position = offset
    while True:
        if position >= len(buf):
            raise WireError("malformed DNS message: name runs past the end")
        length = buf[position]
        if length & 0xC0 == 0xC0:
            if position + 1 >= len(buf):
                raise WireError("malformed DNS message: truncated compression pointer")
            pointer = ((length & 0x3F) << 8) | buf[position + 1]
            if end is None:
                end = position + 2
            if pointer >= position:
                raise WireError("malformed DNS message: forward compression pointer")
            position = pointer
            continue
        if length & 0xC0:
            raise WireError("malformed DNS message: unknown label type")
        if length == 0:
            return ".".join(labels), (end if end is not None else position + 1)
        label = buf[position + 1:position + 1 + length]
        if len(label) != length:
            raise WireError("malformed DNS message: label runs past the end")
        length_total += length + 1
        if length_total > 255:
            raise WireError("malformed DNS message: name longer than 255 octets")
        labels.append(escape_label(label))
        position += 1 + length


def escape_label(label):
    """Return a label as text, lower-cased, with odd octets as \\DDD (RFC 4343 style)."""
    out = []
    for octet in label.lower():
        char = chr(octet)
        if 0x21 <= octet <= 0x7E and char not in ".\\":
            out.append(char)
        else:
            out.append(f"\\{octet:03d}")
    return "".join(out)


def read_rr(buf, offset):
    """Read one resource record; return (ResourceRecord, offset after it)."""
    name, offset = read_name(buf, offset)
    if offset + 10 > len(buf):
        raise WireError("malformed DNS message: truncated record header")
    rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", buf, offset)
    offset += 10
    if offset + rdlength > len(buf):
        raise WireError("malformed DNS message: record data runs past the end")
    rr = ResourceRecord(name, rtype, rclass, ttl, bytes(buf[offset:offset + rdlength]), offset)
    return rr, offset + rdlength


def parse_message(buf):
    """Parse a DNS message; the TSIG record must be the last one (RFC 8945 5.1)."""
    if len(buf) < 12:
        raise WireError("malformed DNS message: shorter than a header")
    msg_id, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", buf, 0)
    offset = 12
    for _ in range(qdcount):
        _, offset = read_name(buf, offset)
        offset += 4
    sections = ([], [], [])
    starts = []
    for section, count in zip(sections, (ancount, nscount, arcount), strict=True):
        for _ in range(count):
            starts.append(offset)
            rr, offset = read_rr(buf, offset)
            section.append(rr)
    if offset > len(buf):
        raise WireError("malformed DNS message: truncated question")
    message = Message(msg_id, flags, sections[0], sections[2])
    tsigs = [rr for section in sections for rr in section if rr.rtype == TYPE_TSIG]
    if tsigs:
        if len(tsigs) > 1 or sections[2][-1] is not tsigs[0]:
            raise WireError("malformed DNS message: TSIG record is not the last record")
        message.tsig = sections[2][-1]
        message.tsig_offset = starts[-1]
    return message


def parse_address_rdata(rtype, rdata):
    """Return the text of A/AAAA rdata."""
    size = 4 if rtype == TYPE_A else 16
    if len(rdata) != size:
        raise WireError(f"malformed DNS message: {TYPE_NAMES[rtype]} rdata of {len(rdata)} octets")
    return str(ipaddress.ip_address(rdata))


def txt_rdata(value):
    """The rdata of a TXT record of one character-string."""
    data = value.encode("ascii")
    return bytes([len(data)]) + data


def parse_txt_rdata(rdata):
    """The text of TXT rdata: its character-strings joined."""
    parts, offset = [], 0
    while offset < len(rdata):
        length = rdata[offset]
        chunk = rdata[offset + 1:offset + 1 + length]
        if len(chunk) != length:
            raise WireError("malformed DNS message: TXT character-string runs past the end")
        parts.append(chunk.decode("ascii", "replace"))
        offset += 1 + length
    return "".join(parts)


def to_records(rrs, owner=None):
    """Convert the A/AAAA entries of `rrs` (optionally only those of `owner`) to Records."""
    found = []
    for rr in rrs:
        if rr.rtype in TYPE_NAMES and rr.rclass == CLASS_IN and owner in (None, rr.name):
            address = parse_address_rdata(rr.rtype, rr.rdata)
            found.append(Record(rr.name, TYPE_NAMES[rr.rtype], rr.ttl, address))
    return found


# TSIG (RFC 8945) ################################################################################

@dataclasses.dataclass(frozen=True)
class TsigKey:
    """A TSIG key: name, algorithm name on the wire, hashlib name, secret octets."""

    name: str
    algorithm: str
    digest: str
    secret: bytes = dataclasses.field(repr=False)


def make_tsig_key(name, secret_b64, algorithm):
    """Build a TsigKey from configuration text; raise UsageError."""
    key_name = (name or "").strip().rstrip(".").lower()
    if not key_name:
        raise UsageError("rfc2136 needs KOKOA_DNS_TSIG_NAME (tsig_name in the config file)")
    if not secret_b64:
        raise UsageError("rfc2136 needs KOKOA_DNS_TSIG_SECRET (tsig_secret in the config file)")
    try:
        if len(encode_name(key_name)) > 255 or any(
                not 1 <= len(label) <= 63 for label in key_name.split(".")):
            raise UnicodeError("bad key name")
        secret = base64.b64decode(secret_b64.strip(), validate=True)
    except (UnicodeError, binascii.Error):
        raise UsageError("KOKOA_DNS_TSIG_NAME or KOKOA_DNS_TSIG_SECRET is malformed "
                         "(the secret must be base64)") from None
    if not secret:
        raise UsageError("KOKOA_DNS_TSIG_SECRET is empty")
    short = (algorithm or "hmac-sha256").strip().rstrip(".").lower()
    for alias, (wire, digest) in TSIG_ALGORITHMS.items():
        if short in (alias, wire):
            return TsigKey(key_name, wire, digest, secret)
    raise UsageError(f"unknown KOKOA_DNS_TSIG_ALGORITHM {algorithm!r}; "
                     f"use one of {', '.join(TSIG_ALGORITHMS)}")


def pack_time(seconds):
    """Pack a 48-bit time."""
    return struct.pack("!HI", seconds >> 32, seconds & 0xFFFFFFFF)


def tsig_variables(key, time_signed, fudge, error=0, other=b""):
    """The TSIG variables that enter the MAC (RFC 8945 4.3.3)."""
    return (encode_name(key.name) + struct.pack("!HI", CLASS_ANY, 0) + encode_name(key.algorithm)
            + pack_time(time_signed) + struct.pack("!HHH", fudge, error, len(other)) + other)


def tsig_sign(message, key, now=None):
    """Append a TSIG record to `message` (ARCOUNT bumped); return (signed bytes, MAC)."""
    time_signed = int(time.time() if now is None else now)
    data = message + tsig_variables(key, time_signed, TSIG_FUDGE)
    mac = hmac.new(key.secret, data, key.digest).digest()
    (msg_id,) = struct.unpack_from("!H", message, 0)
    rdata = (encode_name(key.algorithm) + pack_time(time_signed)
             + struct.pack("!HH", TSIG_FUDGE, len(mac)) + mac + struct.pack("!HHH", msg_id, 0, 0))
    (arcount,) = struct.unpack_from("!H", message, 10)
    signed = (message[:10] + struct.pack("!H", arcount + 1) + message[12:]
              + pack_rr(key.name, TYPE_TSIG, CLASS_ANY, 0, rdata))
    return signed, mac


def parse_tsig_rdata(buf, rr):
    """Return (algorithm, time, fudge, mac, original id, error, other) of a TSIG record."""
    algorithm, offset = read_name(buf, rr.rdata_offset)
    end = rr.rdata_offset + len(rr.rdata)
    try:
        high, low, fudge, mac_size = struct.unpack_from("!HIHH", buf, offset)
        offset += 10
        mac = bytes(buf[offset:offset + mac_size])
        offset += mac_size
        original_id, error, other_len = struct.unpack_from("!HHH", buf, offset)
    except struct.error:
        raise WireError("malformed TSIG record") from None
    offset += 6
    other = bytes(buf[offset:offset + other_len])
    if len(mac) != mac_size or offset + other_len != end:
        raise WireError("malformed TSIG record")
    return algorithm, (high << 32) | low, fudge, mac, original_id, error, other


class TsigVerifier:
    """Verify the TSIG of each response to one signed request (RFC 8945 5.3, 5.3.1).

    The first message is checked with the request MAC and all TSIG variables; later signed
    messages with the prior MAC, the unsigned messages in between and the timers only.
    """

    def __init__(self, key, request_mac, what):
        self.key = key
        self.prior_mac = request_mac
        self.unsigned = []
        self.first = True
        self.what = what

    def check(self, raw, message):
        """Verify one response message; raise ProviderError if it is not properly signed."""
        if message.tsig is None:
            if self.first:
                raise ProviderError(
                    f"{self.what}: the server answered {rcode_name(message)} without a TSIG "
                    f"signature, so the answer cannot be trusted")
            self.unsigned.append(raw)
            if len(self.unsigned) > AXFR_MAX_UNSIGNED:
                raise ProviderError(f"{self.what}: more than {AXFR_MAX_UNSIGNED} unsigned "
                                    f"messages in a row from the server")
            return
        algorithm, signed_at, fudge, mac, original_id, error, other = \
            parse_tsig_rdata(raw, message.tsig)
        if error:
            raise ProviderError(f"{self.what}: {tsig_error_text(error, self.key, message)}")
        if message.tsig.name != self.key.name or algorithm != self.key.algorithm:
            raise ProviderError(f"{self.what}: the server signed its answer with another key "
                                f"({message.tsig.name}, {algorithm})")
        stripped = (struct.pack("!H", original_id) + raw[2:10]
                    + struct.pack("!H", struct.unpack_from("!H", raw, 10)[0] - 1)
                    + raw[12:message.tsig_offset])
        data = (struct.pack("!H", len(self.prior_mac)) + self.prior_mac
                + b"".join(self.unsigned) + stripped)
        if self.first:
            data += tsig_variables(self.key, signed_at, fudge, error, other)
        else:
            data += pack_time(signed_at) + struct.pack("!H", fudge)
        self.verify_mac(data, mac)
        if abs(time.time() - signed_at) > fudge:
            raise ProviderError(f"{self.what}: the server's signature time is off by more than "
                                f"{fudge} s (BADTIME): check the clocks")
        self.prior_mac, self.unsigned, self.first = mac, [], False

    def verify_mac(self, data, mac):
        """Compare the received MAC (possibly truncated, RFC 8945 5.2.2.1) with ours."""
        expected = hmac.new(self.key.secret, data, self.key.digest).digest()
        shortest = max(10, len(expected) // 2)
        if not shortest <= len(mac) <= len(expected) or \
                not hmac.compare_digest(expected[:len(mac)], mac):
            raise ProviderError(f"{self.what}: the server's TSIG signature does not verify "
                                f"(BADSIG): the answer was forged or the key differs")

    def finish(self):
        """Raise unless the last message of the answer was signed."""
        if self.unsigned or self.first:
            raise ProviderError(f"{self.what}: the last message from the server was not signed")


def tsig_error_text(error, key, message):
    """Explain a TSIG error code returned by the server (with the answer's RCODE)."""
    name = f"{rcode_name(message)}/{TSIG_ERRORS.get(error, f'TSIG error {error}')}"
    if error == 16:
        return (f"the server rejected our TSIG signature ({name}): KOKOA_DNS_TSIG_SECRET does "
                f"not match the server's key {key.name}")
    if error == 17:
        return (f"the server did not accept TSIG key {key.name} ({name}): it does not know the "
                f"key with algorithm {key.algorithm}, or its ACL does not allow this key to do "
                f"this (check KOKOA_DNS_TSIG_NAME, KOKOA_DNS_TSIG_ALGORITHM and the server's ACL)")
    if error == 18:
        return f"the server says our clock is off by more than {TSIG_FUDGE} s ({name})"
    return f"the server rejected our TSIG signature ({name})"


def rcode_name(message):
    """Name of a message's RCODE."""
    return RCODES.get(message.rcode, f"RCODE {message.rcode}")


# DNS transport ##################################################################################

def parse_server(text):
    """Split KOKOA_DNS_SERVER `host`, `host:port` or `[v6]:port`; raise UsageError."""
    value = (text or "").strip()
    if not value:
        raise UsageError("rfc2136 needs KOKOA_DNS_SERVER (server in the config file), "
                         "e.g. 192.0.2.53:53")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\s]+)(?::(\d+))?|([0-9A-Fa-f:]+)",
                         value)
    if not match:
        raise UsageError(f"invalid KOKOA_DNS_SERVER {value!r}: use host:port or [v6]:port")
    host = match.group(1) or match.group(3) or match.group(5)
    port = int(match.group(2) or match.group(4) or 53)
    if not 1 <= port <= 65535:
        raise UsageError(f"invalid KOKOA_DNS_SERVER {value!r}: port out of range")
    return host, port


class Transport:
    """Sends DNS messages to one server: UDP with TCP fallback, and TCP streams."""

    def __init__(self, host, port, timeout):
        self.host, self.port, self.timeout = host, port, timeout
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def address(self, socktype):
        """Resolve the server; raise ProviderError."""
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(self.host, self.port, 0, socktype)[0]
        except (OSError, IndexError) as err:
            raise ProviderError(f"cannot resolve DNS server {self.host}: {err}") from None
        return family, sockaddr

    def exchange(self, payload, msg_id):
        """Send one request; return the raw answer, over TCP when UDP is truncated or large."""
        if len(payload) <= 512:
            raw = self.udp(payload, msg_id)
            if len(raw) < 4 or not struct.unpack_from("!H", raw, 2)[0] & FLAG_TC:
                return raw
        stream = self.tcp_stream(payload)
        try:
            return next(stream)
        finally:
            stream.close()

    def udp(self, payload, msg_id):
        """One UDP exchange (retransmitted once at half time); raise ProviderError."""
        family, sockaddr = self.address(socket.SOCK_DGRAM)
        deadline = time.monotonic() + self.timeout
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect(sockaddr)
                for attempt_end in (deadline - self.timeout / 2, deadline):
                    sock.send(payload)
                    raw = self._udp_wait(sock, msg_id, attempt_end)
                    if raw is not None:
                        return raw
            except OSError as err:
                raise ProviderError(f"DNS server {self.label}: {err.strerror or err}") from None
        raise ProviderError(f"DNS server {self.label} did not answer within "
                            f"{self.timeout:g} s (timeout)")

    @staticmethod
    def _udp_wait(sock, msg_id, until):
        """Wait for the answer with our id until `until`; None on timeout."""
        while (left := until - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                raw = sock.recv(65535)
            except socket.timeout:
                return None
            if len(raw) >= 12 and struct.unpack_from("!H", raw, 0)[0] == msg_id:
                return raw
        return None

    def tcp_stream(self, payload):
        """Send one request over TCP and yield each length-prefixed answer message."""
        family, sockaddr = self.address(socket.SOCK_STREAM)
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                sock.sendall(struct.pack("!H", len(payload)) + payload)
                while True:
                    (length,) = struct.unpack("!H", self._recv_exact(sock, 2))
                    yield self._recv_exact(sock, length)
        except socket.timeout:
            raise ProviderError(f"DNS server {self.label} did not answer within "
                                f"{self.timeout:g} s over TCP (timeout)") from None
        except OSError as err:
            raise ProviderError(f"DNS server {self.label} over TCP: "
                                f"{err.strerror or err}") from None

    def _recv_exact(self, sock, size):
        """Read exactly `size` octets or raise ProviderError."""
        chunks = bytearray()
        while len(chunks) < size:
            chunk = sock.recv(size - len(chunks))
            if not chunk:
                raise ProviderError(f"DNS server {self.label} closed the TCP connection early")
            chunks += chunk
        return bytes(chunks)


# Provider: rfc2136 ##############################################################################

class Rfc2136:
    """DNS UPDATE (RFC 2136) and AXFR, both signed with TSIG, against the zone's primary."""

    def __init__(self, zone, settings, timeout):
        self.zone = zone
        host, port = parse_server(settings.get("server"))
        self.transport = Transport(host, port, timeout)
        self.key = make_tsig_key(settings.get("tsig_name"), settings.get("tsig_secret"),
                                 settings.get("tsig_algorithm"))

    def signed_exchange(self, message, what):
        """Sign, send, verify the answer's id and TSIG and RCODE; return the parsed answer."""
        msg_id = struct.unpack_from("!H", message, 0)[0]
        signed, mac = tsig_sign(message, self.key)
        raw = self.transport.exchange(signed, msg_id)
        answer = parse_message(raw)
        if answer.msg_id != msg_id or not answer.flags & FLAG_QR:
            raise ProviderError(f"{what}: the server sent an answer that does not match")
        verifier = TsigVerifier(self.key, mac, what)
        verifier.check(raw, answer)
        verifier.finish()
        return answer

    def fail_on_rcode(self, answer, what, allowed=(0,)):
        """Raise a ProviderError explaining the RCODE unless it is allowed."""
        if answer.rcode in allowed:
            return
        hints = {
            5: f"check that the server serves {self.zone} and its ACL allows key "
               f"{self.key.name}",
            9: f"the server is not authoritative for {self.zone} or does not accept key "
               f"{self.key.name}",
            10: f"the name is not in zone {self.zone}",
            2: "the server failed; see its log",
        }
        hint = hints.get(answer.rcode, "")
        raise ProviderError(f"{what}: the server answered {rcode_name(answer)}"
                            + (f": {hint}" if hint else ""))

    def lookup(self, name):
        """Return the name's A and AAAA records (signed queries)."""
        found = []
        for rtype in (TYPE_A, TYPE_AAAA):
            query = pack_header(secrets.randbits(16), OPCODE_QUERY << 11, (1, 0, 0, 0))
            query += pack_question(name, rtype)
            what = f"query {TYPE_NAMES[rtype]} {name}"
            answer = self.signed_exchange(query, what)
            self.fail_on_rcode(answer, what, allowed=(0, 3))
            if any(rr.rtype == TYPE_CNAME and rr.name == name for rr in answer.answer):
                raise ProviderError(f"{name} is a CNAME; it cannot also have addresses")
            found += to_records(answer.answer, owner=name)
        return found

    def list_zone(self):
        """Return every A/AAAA record of the zone, read by AXFR over TCP."""
        what = f"zone transfer of {self.zone}"
        msg_id = secrets.randbits(16)
        query = pack_header(msg_id, OPCODE_QUERY << 11, (1, 0, 0, 0))
        query += pack_question(self.zone, TYPE_AXFR)
        signed, mac = tsig_sign(query, self.key)
        verifier = TsigVerifier(self.key, mac, what)
        records, soa_count = [], 0
        stream = self.transport.tcp_stream(signed)
        for count, raw in enumerate(stream, start=1):
            if count > AXFR_MAX_MESSAGES:
                raise ProviderError(f"{what}: more than {AXFR_MAX_MESSAGES} messages")
            answer = parse_message(raw)
            if answer.msg_id != msg_id or not answer.flags & FLAG_QR:
                raise ProviderError(f"{what}: the server sent an answer that does not match")
            verifier.check(raw, answer)
            self.fail_on_rcode(answer, what)
            for rr in answer.answer:
                if soa_count == 0 and rr.rtype != TYPE_SOA:
                    raise ProviderError(f"{what}: the transfer does not start with the SOA")
                soa_count += rr.rtype == TYPE_SOA
            records += to_records(answer.answer)
            if soa_count >= 2:
                break
        stream.close()
        verifier.finish()
        return records

    def update(self, changes, what):
        """Send one signed UPDATE with `changes` (packed update-section records)."""
        message = pack_header(secrets.randbits(16), OPCODE_UPDATE << 11, (1, 0, len(changes), 0))
        message += pack_question(self.zone, TYPE_SOA) + b"".join(changes)
        answer = self.signed_exchange(message, what)
        self.fail_on_rcode(answer, what)

    def add(self, record):
        """Add one record (RFC 2136 2.5.1)."""
        rtype = TYPE_CODES[record.rtype]
        change = pack_rr(record.name, rtype, CLASS_IN, record.ttl,
                         address_rdata(record.rtype, record.address))
        self.update([change], f"update adding {record.describe()}")

    def remove(self, name, records, everything):
        """Delete the given records, or (everything) the name's A and AAAA RRsets."""
        if everything:
            changes = [pack_rr(name, rtype, CLASS_ANY, 0, b"") for rtype in (TYPE_A, TYPE_AAAA)]
            what = f"update removing the addresses of {name}"
        else:
            changes = [pack_rr(r.name, TYPE_CODES[r.rtype], CLASS_NONE, 0,
                               address_rdata(r.rtype, r.address)) for r in records]
            what = "update removing " + ", ".join(r.describe() for r in records)
        self.update(changes, what)

    def lookup_txt(self, name):
        """Return the values of the name's TXT records (a signed query to the server)."""
        query = pack_header(secrets.randbits(16), OPCODE_QUERY << 11, (1, 0, 0, 0))
        query += pack_question(name, TYPE_TXT)
        what = f"query TXT {name}"
        answer = self.signed_exchange(query, what)
        self.fail_on_rcode(answer, what, allowed=(0, 3))
        return sorted(parse_txt_rdata(rr.rdata) for rr in answer.answer
                      if rr.rtype == TYPE_TXT and rr.rclass == CLASS_IN and rr.name == name)

    def add_txt(self, name, value, ttl):
        """Add one TXT value to a name (RFC 2136 2.5.1)."""
        self.update([pack_rr(name, TYPE_TXT, CLASS_IN, ttl, txt_rdata(value))],
                    f"update adding TXT {name} {value}")

    def remove_txt(self, name, values):
        """Delete these TXT values of a name, or (None) its whole TXT RRset."""
        if values is None:
            changes = [pack_rr(name, TYPE_TXT, CLASS_ANY, 0, b"")]
        else:
            changes = [pack_rr(name, TYPE_TXT, CLASS_NONE, 0, txt_rdata(v)) for v in values]
        self.update(changes, f"update removing TXT of {name}")


# Provider: cloudflare ###########################################################################

class Cloudflare:
    """Cloudflare API v4: zones and DNS records with an API token."""

    def __init__(self, zone, settings, timeout):
        self.zone = zone
        self.token = (settings.get("cloudflare_api_token") or "").strip()
        if not self.token:
            raise UsageError("cloudflare needs CLOUDFLARE_API_TOKEN "
                             "(cloudflare_api_token in the config file)")
        self.zone_id = (settings.get("cloudflare_zone_id") or "").strip()
        if self.zone_id and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.zone_id):
            raise UsageError(f"invalid CLOUDFLARE_ZONE_ID {self.zone_id!r}")
        base = (settings.get("cloudflare_api_url") or DEFAULT_CLOUDFLARE_API_URL).rstrip("/")
        if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
            raise UsageError(f"invalid KOKOA_CLOUDFLARE_API_URL {base!r}")
        self.base = base
        self.timeout = timeout

    def call(self, method, path, query=None, body=None):
        """Call the API; return the decoded envelope or raise ProviderError in words."""
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json",
                   "User-Agent": f"kokoa-dns/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read(HTTP_MAX_BODY)
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read(HTTP_MAX_BODY)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ProviderError(f"cannot reach the Cloudflare API at {self.base}: "
                                f"{reason}") from None
        return self.decode(method, path, status, raw)

    @staticmethod
    def decode(method, path, status, raw):
        """Decode an envelope; raise ProviderError with the API's errors in words."""
        try:
            envelope = json.loads(raw)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict):
            raise ProviderError(f"Cloudflare API {method} {path}: HTTP {status} "
                                f"with a body that is not a JSON object")
        if status < 400 and envelope.get("success", True) is not False:
            return envelope
        errors = envelope.get("errors") or []
        words = "; ".join(
            f"{e.get('message', 'unknown error')} (code {e.get('code', '?')})"
            if isinstance(e, dict) else str(e) for e in errors) or "no error details given"
        raise ProviderError(f"Cloudflare API {method} {path} failed with HTTP {status}: {words}")

    def zone_path(self):
        """Return `/zones/{id}`, looking the id up by zone name once if not configured."""
        if not self.zone_id:
            result = self.call("GET", "/zones", {"name": self.zone}).get("result") or []
            ids = [z.get("id") for z in result if isinstance(z, dict)
                   and str(z.get("name", "")).lower() == self.zone and z.get("id")]
            if not ids:
                raise ProviderError(f"Cloudflare has no zone {self.zone} that this API token "
                                    f"can see (check the zone name and the token's Zone:Read)")
            self.zone_id = ids[0]
        return f"/zones/{urllib.parse.quote(self.zone_id, safe='')}"

    def records(self, rtype, name=None):
        """Return all records of `rtype` (and `name`), following the pages."""
        path = self.zone_path() + "/dns_records"
        found = []
        for page in range(1, CLOUDFLARE_MAX_PAGES + 1):
            query = [("type", rtype)] + ([("name", name)] if name else [])
            query += [("page", page), ("per_page", CLOUDFLARE_PER_PAGE)]
            envelope = self.call("GET", path, query)
            result = envelope.get("result") or []
            for item in result:
                found.append(self.to_record(item, rtype))
            info = envelope.get("result_info")
            total = info.get("total_pages") if isinstance(info, dict) else None
            if not result or not isinstance(total, int) or page >= total:
                break
        return [r for r in found if r is not None]

    @staticmethod
    def to_record(item, rtype):
        """Convert one API record to a Record, or None if it is not usable."""
        if not isinstance(item, dict) or item.get("type") != rtype:
            return None
        try:
            address = str(ipaddress.ip_address(item.get("content", "")))
            ttl = int(item.get("ttl") or 1)
        except (TypeError, ValueError):
            return None
        name = str(item.get("name", "")).rstrip(".").lower()
        return Record(name, rtype, ttl, address, str(item.get("id", "")))

    def lookup(self, name):
        """Return the name's A and AAAA records."""
        return self.records("A", name) + self.records("AAAA", name)

    def list_zone(self):
        """Return the zone's A and AAAA records."""
        return self.records("A") + self.records("AAAA")

    def add(self, record):
        """Create one DNS-only record."""
        body = {"type": record.rtype, "name": record.name, "content": record.address,
                "ttl": record.ttl, "proxied": False}
        self.call("POST", self.zone_path() + "/dns_records", body=body)

    def remove(self, name, records, everything):
        """Delete each given record by its id."""
        for record in records:
            rid = urllib.parse.quote(record.ref, safe="")
            self.call("DELETE", f"{self.zone_path()}/dns_records/{rid}")

    def txt_records(self, name):
        """[(value, id)] of the name's TXT records, following the pages. The API may give a
        TXT content in quotes (RFC 1035 presentation form): they are not part of the value."""
        path = self.zone_path() + "/dns_records"
        found = []
        for page in range(1, CLOUDFLARE_MAX_PAGES + 1):
            query = [("type", "TXT"), ("name", name), ("page", page),
                     ("per_page", CLOUDFLARE_PER_PAGE)]
            envelope = self.call("GET", path, query)
            result = envelope.get("result") or []
            for item in result:
                if isinstance(item, dict) and item.get("type") == "TXT" \
                        and isinstance(item.get("content"), str):
                    content = item["content"]
                    if len(content) >= 2 and content[0] == content[-1] == '"':
                        content = content[1:-1]
                    found.append((content, str(item.get("id", ""))))
            info = envelope.get("result_info")
            total = info.get("total_pages") if isinstance(info, dict) else None
            if not result or not isinstance(total, int) or page >= total:
                break
        return found

    def lookup_txt(self, name):
        """Return the values of the name's TXT records."""
        return sorted(value for value, _ in self.txt_records(name))

    def add_txt(self, name, value, ttl):
        """Create one TXT record."""
        body = {"type": "TXT", "name": name, "content": value, "ttl": ttl}
        self.call("POST", self.zone_path() + "/dns_records", body=body)

    def remove_txt(self, name, values):
        """Delete the name's TXT records with these values (None: all of them)."""
        for value, rid in self.txt_records(name):
            if values is None or value in values:
                rid = urllib.parse.quote(rid, safe="")
                self.call("DELETE", f"{self.zone_path()}/dns_records/{rid}")


# Commands #######################################################################################

def command_add(provider, args, zone):
    """Add one address to a name unless it is already there."""
    name = resolve_name(args.name, zone)
    rtype, address = parse_address(args.ip)
    record = Record(name, rtype, args.ttl, address)
    same_type = [r for r in provider.lookup(name) if r.rtype == rtype]
    existing = [r for r in same_type if r.address == address]
    if existing:
        print(f"{record.describe()} already exists (ttl {existing[0].ttl}); nothing to do")
        return 0
    if any(r.ttl != record.ttl for r in same_type):
        print(f"dns.py: note: an RRset has one TTL (RFC 2181 5.2); the provider may set ttl "
              f"{record.ttl} on every {rtype} record of {name}", file=sys.stderr)
    if args.dry_run:
        print(f"would add {record.describe()} (ttl {record.ttl})")
        return 0
    provider.add(record)
    print(f"added {record.describe()} (ttl {record.ttl})")
    return 0


def command_remove(provider, args, zone):
    """Remove one address of a name, or all of its A/AAAA records."""
    name = resolve_name(args.name, zone)
    wanted = parse_address(args.ip) if args.ip is not None else None
    existing = provider.lookup(name)
    if wanted:
        existing = [r for r in existing if (r.rtype, r.address) == wanted]
    if not existing:
        what = f"{wanted[0]} record {wanted[1]}" if wanted else "A/AAAA records"
        print(f"{name} has no {what}; nothing to do")
        return 0
    if not args.dry_run:
        provider.remove(name, existing, everything=wanted is None)
    for record in sorted(existing, key=sort_key):
        print(f"{'would remove' if args.dry_run else 'removed'} {record.describe()}")
    return 0


def command_add_txt(provider, args, zone):
    """Add one TXT value to a name unless it is already there."""
    name = resolve_txt_name(args.name, zone)
    value = check_txt_value(args.value)
    if value in provider.lookup_txt(name):
        print(f"TXT {name} {value} already exists; nothing to do")
        return 0
    if args.dry_run:
        print(f"would add TXT {name} {value} (ttl {args.ttl})")
        return 0
    provider.add_txt(name, value, args.ttl)
    print(f"added TXT {name} {value} (ttl {args.ttl})")
    return 0


def command_remove_txt(provider, args, zone):
    """Remove one TXT value of a name, or all of its TXT records."""
    name = resolve_txt_name(args.name, zone)
    existing = provider.lookup_txt(name)
    if args.value is not None:
        existing = [value for value in existing if value == check_txt_value(args.value)]
    if not existing:
        print(f"{name} has no {'such ' if args.value else ''}TXT record; nothing to do")
        return 0
    if not args.dry_run:
        provider.remove_txt(name, None if args.value is None else existing)
    for value in existing:
        print(f"{'would remove' if args.dry_run else 'removed'} TXT {name} {value}")
    return 0


def check_argument_shape(args):
    """Which of --ip, --type and --value add/remove were given together; raise UsageError."""
    if args.command not in ("add", "remove"):
        return
    if args.type == "TXT":
        if args.ip is not None:
            raise UsageError("--type TXT takes --value, not --ip")
        if args.command == "add" and args.value is None:
            raise UsageError("add --type TXT needs --value")
        if args.value is not None:
            check_txt_value(args.value)
        return
    if args.value is not None:
        raise UsageError("--value is for --type TXT; addresses are given with --ip")
    if args.command == "add" and args.ip is None:
        raise UsageError("add needs --ip (or --type TXT --value)")


def check_arguments(args, zone):
    """Check the name, address or value of add/remove before anything is sent."""
    if args.type == "TXT":
        resolve_txt_name(args.name, zone)
        return
    resolve_name(args.name, zone)
    if args.ip is not None:
        rtype, _ = parse_address(args.ip)
        if args.type not in (None, rtype):
            raise UsageError(f"--ip {args.ip} is an {rtype} address, not {args.type}")


def command_list(provider, args, zone):
    """Print the zone's A/AAAA records as a table or as JSON."""
    records = sorted(set(provider.list_zone()), key=sort_key)
    if args.json:
        print(json.dumps([r.as_json() for r in records], indent=2))
        return 0
    rows = [("NAME", "TYPE", "TTL", "ADDRESS")]
    rows += [(r.name, r.rtype, str(r.ttl), r.address) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        print("  ".join(cells + [row[3]]))
    if not records:
        print(f"(no A/AAAA records in {zone})", file=sys.stderr)
    return 0


def sort_key(record):
    """Order records by name from the apex down, then type, then address."""
    address = ipaddress.ip_address(record.address)
    return (list(reversed(record.name.split("."))), record.rtype, address.version, address)


# CLI ############################################################################################

def load_settings(config_path, explicit, environ):
    """Merge the INI file's [dns] section with the environment (which wins)."""
    settings = {}
    try:
        with open(config_path, encoding="utf-8") as handle:
            parser = configparser.ConfigParser(interpolation=None)
            parser.read_file(handle)
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {config_path} does not exist") from None
        parser = None
    except (OSError, UnicodeError, configparser.Error) as err:
        raise UsageError(f"cannot read config file {config_path}: "
                         f"{str(err).splitlines()[0]}") from None
    if parser is not None and parser.has_section("dns"):
        for key, value in parser.items("dns"):
            if key not in SETTINGS:
                print(f"dns.py: warning: unknown key {key!r} in {config_path}", file=sys.stderr)
            settings[key] = value.strip()
    for key, variable in SETTINGS.items():
        if environ.get(variable, "").strip():
            settings[key] = environ[variable].strip()
    return settings


def make_provider(settings, zone):
    """Build the configured provider; raise UsageError."""
    try:
        timeout = float(settings.get("timeout") or DEFAULT_TIMEOUT)
    except ValueError:
        raise UsageError(f"invalid KOKOA_DNS_TIMEOUT {settings.get('timeout')!r}") from None
    if not 0 < timeout <= 600:
        raise UsageError("KOKOA_DNS_TIMEOUT must be between 0 and 600 seconds")
    name = (settings.get("provider") or "").strip().lower()
    if name == "rfc2136":
        return Rfc2136(zone, settings, timeout)
    if name == "cloudflare":
        return Cloudflare(zone, settings, timeout)
    if not name:
        raise UsageError("no provider configured: set KOKOA_DNS_PROVIDER to rfc2136 or cloudflare")
    raise UsageError(f"unknown KOKOA_DNS_PROVIDER {name!r}: use rfc2136 or cloudflare")


def build_parser():
    """The argparse parser with the add/remove/list subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"INI file with a [dns] section (default {DEFAULT_CONFIG})")
    parser = argparse.ArgumentParser(
        prog="dns.py", description="Manage the A/AAAA records of one DNS zone for Kokoa.",
        epilog="Configuration: KOKOA_DNS_* variables or the INI file; see the module docstring.")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"INI file with a [dns] section (default {DEFAULT_CONFIG})")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser("add", parents=[common], help="add an address to a name",
                         description="Add an A (IPv4) or AAAA (IPv6) record; no-op if present.")
    add.add_argument("--name", required=True, help="name relative to the zone, FQDN., or @")
    add.add_argument("--ip", help="IPv4 or IPv6 address (A or AAAA)")
    add.add_argument("--type", choices=("A", "AAAA", "TXT"), type=str.upper,
                     help="record type (default: A or AAAA by --ip)")
    add.add_argument("--value", help="the TXT record's text (with --type TXT)")
    add.add_argument("--ttl", type=ttl_argument, default=DEFAULT_TTL,
                     help=f"time to live in seconds (default {DEFAULT_TTL})")
    add.add_argument("--dry-run", action="store_true", help="print what would change, only")
    remove = sub.add_parser("remove", parents=[common], help="remove addresses of a name",
                            description="Remove one address, or all A/AAAA records of a name.")
    remove.add_argument("--name", required=True, help="name relative to the zone, FQDN., or @")
    remove.add_argument("--ip", help="remove only this address (default: all A/AAAA)")
    remove.add_argument("--type", choices=("A", "AAAA", "TXT"), type=str.upper,
                        help="record type (TXT: remove TXT records, not addresses)")
    remove.add_argument("--value", help="with --type TXT, remove only this value")
    remove.add_argument("--dry-run", action="store_true", help="print what would change, only")
    listing = sub.add_parser("list", parents=[common], help="list the zone's A/AAAA records",
                             description="Print the zone's A/AAAA records.")
    listing.add_argument("--json", action="store_true",
                         help='print a JSON list of {"name","type","ttl","address"}')
    return parser


def main(argv=None) -> int:
    """Run the CLI; return the exit status (0 ok, 1 provider error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    commands = {"add": command_add, "remove": command_remove, "list": command_list}
    if getattr(args, "type", None) == "TXT":
        commands.update(add=command_add_txt, remove=command_remove_txt)
    try:
        check_argument_shape(args)
        settings = load_settings(args.config or DEFAULT_CONFIG, args.config is not None,
                                 os.environ)
        zone = normalize_zone(settings.get("zone"))
        if args.command in ("add", "remove"):
            check_arguments(args, zone)
        provider = make_provider(settings, zone)
        return commands[args.command](provider, args, zone)
    except UsageError as err:
        print(f"dns.py: error: {err}", file=sys.stderr)
        return 2
    except ProviderError as err:
        print(f"dns.py: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
