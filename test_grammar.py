"""One hostname grammar per language, proved equal (STYLE J1, DESIGN "Route" hostname).

The same valid and hostile names go to every hostname validator Kokoa has, each run for real:

- kokoa.py  `normalize_hostname` (lower-case, one trailing dot, IDN -> punycode, RFC 1123);
- agent.sh  its jq `is_host` (COMMON_JQ, read out of agent.sh itself) that checks payloads,
            and its bash `is_hostname` / RE_HOST, seen through `agent.sh status` with
            EDGE_FQDN set (rc 2 "EDGE_FQDN is not a valid hostname", or the name it serves);
- dns.py    `check_hostname`, which checks every absolute name (and zone) before anything is sent;
- install-edge.sh  its --edge-fqdn check, run with --root in an empty directory and
            --no-packages: it refuses the name, or gets past argument checking and stops at the
            first check of the (empty) root, before it has changed anything.

Only canonical names are compared (a name is canonical if normalize_hostname returns it as it
is). The payload validators (jq, dns.py) take names as they are; the two bash scripts lower-case
ASCII first (`${x,,}` under LC_ALL=C), so they are compared on that lower-cased name.
Non-canonical spellings are checked apart: kokoa.py turns them into a canonical name of the
table that every validator accepts.
"""

import os
import subprocess

import pytest

import dns
import kokoa
from conftest import REPO, agent_common_jq, agent_is_host, require_tools

AGENT = REPO / "agent.sh"
INSTALL = REPO / "install-edge.sh"


def joined(*labels):
    return ".".join(labels)


L63 = "a" * 63
L64 = "a" * 64
NAME_253 = joined(L63, "b" * 63, "c" * 63, "d" * 61)
NAME_254 = joined(L63, "b" * 63, "c" * 63, "d" * 62)
NAME_10K = joined(*["e" * 63] * 156, "com")            # well-formed labels, 9,987 characters
VALID = True
INVALID = False

# name -> VALID (canonical and accepted), INVALID (refused everywhere), or the canonical name
# that kokoa.py makes of a non-canonical spelling.
HOSTNAMES = {
    # plain names
    "a.example.com": VALID,
    "b.example.com": VALID,
    "a.b.c.d": VALID,
    "a-b.example.com": VALID,
    "ab--cd.example.com": VALID,
    "123.com": VALID,
    "1e100.net": VALID,
    "1.2.3.4.com": VALID,
    "a.1a": VALID,
    "a.a1": VALID,
    "a.0x1": VALID,
    "ss.com": VALID,
    # lengths
    f"{L63}.example.com": VALID,
    f"{L64}.example.com": INVALID,
    f"a.{L63}": VALID,
    f"a.{L64}": INVALID,
    NAME_253: VALID,
    NAME_254: INVALID,
    NAME_10K: INVALID,
    "a" * 10000: INVALID,
    "": INVALID,
    # one label, IP addresses, all-digit last label
    "localhost": INVALID,
    "com": INVALID,
    "10.1.2.3": INVALID,
    "10.1.2.3.": INVALID,
    "255.255.255.255": INVALID,
    "a.123": INVALID,
    "0x7f.1": INVALID,
    "::1": INVALID,
    "[::1]": INVALID,
    "fd00::1": INVALID,
    "[fd00::1]": INVALID,
    # hyphens and empty labels
    "-a.example.com": INVALID,
    "a-.example.com": INVALID,
    "a.-example": INVALID,
    "a.example-": INVALID,
    "-.com": INVALID,
    "a.-": INVALID,
    "a..b.com": INVALID,
    ".a.com": INVALID,
    "a.com..": INVALID,
    ".": INVALID,
    "..": INVALID,
    # case and the trailing dot
    "A.EXAMPLE.COM": "a.example.com",
    "a.Example.com": "a.example.com",
    "a.example.com.": "a.example.com",
    "A.Example.Com.": "a.example.com",
    # underscores, punycode and xn-- oddities
    "_dmarc.example.com": INVALID,
    "a_b.example.com": INVALID,
    "xn--bcher-kva.example.org": VALID,
    "XN--BCHER-KVA.EXAMPLE.ORG": "xn--bcher-kva.example.org",
    "xn--ls8h.la": VALID,
    "a.xn--p1ai": VALID,
    "xn--a.example.com": VALID,            # RFC 1123 allows it; no validator decodes punycode
    "xn--.example.com": INVALID,
    "xn---.example.com": INVALID,
    "xn--bücher.example.org": INVALID,
    "a.xn--": INVALID,
    # whitespace, quotes, nginx and shell syntax
    "a b.example.com": INVALID,
    " a.example.com": "a.example.com",
    "a.example.com ": "a.example.com",
    "a\tb.example.com": INVALID,
    "a.example.com\n": INVALID,
    "\na.example.com": INVALID,
    "a\nb.example.com": INVALID,
    "a.example.com\nevil.example.com": INVALID,
    "a.example.com\r": INVALID,
    'a"b.example.com': INVALID,
    "a'b.example.com": INVALID,
    "a;b.example.com": INVALID,
    "a.example.com;": INVALID,
    "a.example.com; include /etc/passwd": INVALID,
    "$host.example.com": INVALID,
    "${x}.example.com": INVALID,
    "$(id).example.com": INVALID,
    "`id`.example.com": INVALID,
    "{a}.example.com": INVALID,
    "a.example.com}": INVALID,
    "a/b.example.com": INVALID,
    "a\\b.example.com": INVALID,
    "a.example.com:443": INVALID,
    "user@a.example.com": INVALID,
    "a.example.com#x": INVALID,
    "-h": INVALID,
    "--help": INVALID,
    # unicode
    "bücher.example.org": "xn--bcher-kva.example.org",
    "Bücher.Example.Org": "xn--bcher-kva.example.org",
    "💩.la": "xn--ls8h.la",
    "ß.com": INVALID,                           # IDNA2003 says ss.com, browsers xn--zca.com
    "straße.de": INVALID,
    "STRAẞE.de": INVALID,                       # capital sharp s lower-cases to ß
    "ας.gr": INVALID,                           # final sigma: IDNA2003 makes it σ
    "xn--strae-oqa.de": VALID,                  # straße.de as browsers encode it
    "ａ.example.com": "a.example.com",         # fullwidth a
    "a。example。com": "a.example.com",         # ideographic full stops
    "a.example.com。": INVALID,
    "\u202ea.example.com": INVALID,             # a bidi control
    "a\u200bb.example.com": INVALID,            # zero-width space: nameprep would drop it
    "a\u200db.example.com": INVALID,            # ZWJ (IDNA2003 drops it, browsers keep it)
    "a\u200cb.example.com": INVALID,            # ZWNJ
    "a\u00adb.example.com": INVALID,            # soft hyphen
    "ab.example.com": VALID,
    "é": INVALID,
    # wildcards (DESIGN plans `*.example.com` routes; today no validator takes them)
    "*.example.com": INVALID,
    "a.*.com": INVALID,
    "*": INVALID,
}


def ascii_lower(name):
    """What `${name,,}` does under LC_ALL=C: A-Z to a-z, every other byte as it is."""
    return name.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                                        "abcdefghijklmnopqrstuvwxyz"))


def name_id(name):
    """A short printable test id for a name."""
    text = ascii(name)[1:-1]
    return f"{text[:40]}...({len(name)})" if len(text) > 48 else text or "(empty)"


def kokoa_canonical(name):
    """True if kokoa.py accepts `name` exactly as it is spelled."""
    try:
        return kokoa.normalize_hostname(name) == name
    except kokoa.HTTPError:
        return False


def dns_accepts(name):
    try:
        dns.check_hostname(name)
    except dns.UsageError:
        return False
    return True


@pytest.fixture(scope="module")
def edge_home(tmp_path_factory):
    """An agent home: an empty env file, an applied config without hostnames."""
    home = tmp_path_factory.mktemp("grammar")
    (home / "state").mkdir()
    (home / "state" / "applied.json").write_text('{"hostnames": []}\n')
    env_file = home / "edge.env"
    env_file.write_text("")
    env_file.chmod(0o600)
    return home


def agent_edge_fqdn(home, name):
    """The name `agent.sh status` serves as its own for EDGE_FQDN=name, or None if refused."""
    env = {"PATH": os.environ["PATH"], "EDGE_FQDN": name, "CONFIG_DIR": f"{home}/nginx",
           "STATE_DIR": f"{home}/state", "LETSENCRYPT_DIR": f"{home}/letsencrypt",
           "WEBROOT": f"{home}/webroot"}
    result = subprocess.run(["bash", str(AGENT), "--env-file", str(home / "edge.env"), "status"],
                            env=env, capture_output=True, encoding="utf-8",
                            errors="replace", timeout=30)
    if result.returncode == 2 and "EDGE_FQDN is not a valid hostname" in result.stderr:
        return None
    assert result.returncode == 0, result.stderr
    hosts = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert result.stdout.endswith(f"{len(hosts)} hostname(s)\n"), result.stdout
    assert len(hosts) <= 1, result.stdout
    return hosts[0] if hosts else ""


def installer_accepts(root, name):
    """Whether install-edge.sh takes `--edge-fqdn name`; it must change nothing either way."""
    result = subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--no-packages", "--no-run",
         "--control-plane", "https://control.invalid", "--email", "edge@example.com",
         "--edge-fqdn", name],
        env={"PATH": os.environ["PATH"]}, capture_output=True, encoding="utf-8",
        errors="replace", timeout=30)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert list(root.iterdir()) == [], "install-edge.sh wrote to its root before it refused"
    if "--edge-fqdn is not a valid hostname" in result.stderr:
        return False
    # Past the argument checks: the first check of the root (a tool, or nginx.conf) stops it.
    assert ("nginx.conf not found" in result.stderr or "is required" in result.stderr), \
        result.stderr
    return True


@pytest.fixture
def empty_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    return root


def verdicts(name, home, root):
    """{validator: accepts name} for every validator, fed the same string."""
    return {
        "kokoa.py normalize_hostname": kokoa_canonical(name),
        "agent.sh jq is_host": agent_is_host([name])[0],
        "agent.sh EDGE_FQDN": agent_edge_fqdn(home, name) is not None,
        "dns.py check_hostname": dns_accepts(name),
        "install-edge.sh --edge-fqdn": installer_accepts(root, name),
    }


def expected_verdicts(name):
    """What each validator must say: kokoa.py's verdict on the name that validator checks."""
    as_given = kokoa_canonical(name)
    lowered = kokoa_canonical(ascii_lower(name))
    return {
        "kokoa.py normalize_hostname": as_given,
        "agent.sh jq is_host": as_given,
        "agent.sh EDGE_FQDN": lowered,
        "dns.py check_hostname": as_given,
        "install-edge.sh --edge-fqdn": lowered,
    }


# The table itself ###########################################################################

def test_the_table_covers_what_it_must():
    canonical = {name for name, want in HOSTNAMES.items() if want is VALID}
    spellings = {name: want for name, want in HOSTNAMES.items() if isinstance(want, str)}
    assert set(spellings.values()) <= canonical      # every normal form is itself compared
    assert len(NAME_253) == 253 and len(NAME_254) == 254 and len(NAME_10K) > 9900
    assert len(L63) == 63 and len(L64) == 64


@pytest.mark.parametrize("name, want", HOSTNAMES.items(), ids=map(name_id, HOSTNAMES))
def test_kokoa_normaliser_follows_the_table(name, want):
    if want is VALID:
        assert kokoa.normalize_hostname(name) == name
    elif want is INVALID:
        with pytest.raises(kokoa.HTTPError) as err:
            kokoa.normalize_hostname(name)
        assert err.value.status == 400
    else:
        assert kokoa.normalize_hostname(name) == want
        assert kokoa.normalize_hostname(want) == want


# Every validator agrees ######################################################################

@pytest.mark.parametrize("name", [n for n in HOSTNAMES if n], ids=name_id)
def test_every_hostname_validator_agrees_with_kokoa(name, edge_home, empty_root):
    require_tools("bash", "jq")
    assert verdicts(name, edge_home, empty_root) == expected_verdicts(name)


@pytest.mark.parametrize("name", [n for n, want in HOSTNAMES.items() if want is VALID
                                  or isinstance(want, str) and ascii_lower(n) == want])
def test_the_agent_serves_edge_fqdn_as_the_control_plane_spells_it(name, edge_home):
    require_tools("bash", "jq")
    assert agent_edge_fqdn(edge_home, name) == kokoa.normalize_hostname(name)


def test_an_empty_edge_fqdn_means_no_edge_name(edge_home, empty_root):
    """Not a hostname to validate: both bash scripts take an empty value as "not set"."""
    require_tools("bash", "jq")
    assert agent_edge_fqdn(edge_home, "") == ""
    assert installer_accepts(empty_root, "")
    assert not kokoa_canonical("") and not agent_is_host([""])[0] and not dns_accepts("")


def test_names_that_no_command_line_can_carry_are_refused_too():
    """NUL reaches only the in-process validators and jq's JSON input; lone surrogates only
    the in-process validators."""
    require_tools("jq")
    names = ["a.example.com\x00", "a\x00b.example.com", "\x00"]
    assert agent_is_host(names) == [False] * len(names)
    names += ["a\ud800.example.com", "\udfff.example.com"]     # not even JSON can carry these
    assert [kokoa_canonical(n) or dns_accepts(n) for n in names] == [False] * len(names)


def test_the_agent_jq_grammar_is_read_from_agent_sh():
    """The jq text is agent.sh's own COMMON_JQ heredoc, word for word, not a copy."""
    require_tools("jq")
    text = agent_common_jq()
    assert "def is_host:" in text
    assert f"<<'JQ' || true\n{text}JQ\n" in AGENT.read_text()
    assert agent_is_host(["a.example.com", "a.123"]) == [True, False]


def test_dns_zones_may_have_one_label_but_the_names_in_them_two():
    assert dns.normalize_zone("Lan.") == "lan"
    assert dns.resolve_name("app", "lan") == "app.lan"
    for name in ("@", "lan."):
        with pytest.raises(dns.UsageError, match="fewer than 2 labels"):
            dns.resolve_name(name, "lan")
    for zone in ("10.1.2.3", "a.123", "-lan", "_lan"):
        with pytest.raises(dns.UsageError, match="invalid zone"):
            dns.normalize_zone(zone)
