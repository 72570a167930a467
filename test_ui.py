"""The web UI in static/, driven in headless Chromium against a real `kokoa.py serve`.

Uses Debian's /usr/bin/chromium through the Python `playwright` package (never
`playwright install`: no browser is downloaded). Without either, the browser tests skip, or fail
under KOKOA_REQUIRE_E2E=1. Screenshots of every page, at 360 px and desktop width, are saved in
each test's tmp_path (run pytest with --basetemp=DIR to keep them somewhere known).
"""

import functools
import json
import re
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import kokoa
from conftest import REPO, KokoaServer, make_certificate, remember_secret, require, require_tools

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the `browser` fixture (skip, or fail under KOKOA_REQUIRE_E2E)
    expect = sync_playwright = None

STATIC = REPO / "static"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]
PHONE = {"width": 360, "height": 740}
SMALL_PHONE = {"width": 375, "height": 812}
SCREENS = Path("/work/screens")     # where the policy screenshots are kept for people to see
DESKTOP = {"width": 1280, "height": 860}
TIMEOUT_MS = 10_000
EDGE_POLL_TIMEOUT_MS = 15_000   # the edge list refreshes every 5 s
PAGE_BUDGET_BYTES = 176 * 1024      # uncompressed; 100 KiB until the Policies page (issue 14),
                                    # 128 KiB until login, Overview, Alerts, Certificates (16, 15)
HOSTILE = "<img src=x onerror=alert(1)>"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGES = ("overview", "origins", "routes", "policies", "edges", "certificates", "alerts",
         "settings")
ORIGIN_KEY = "8cHeykp4BvaGOmRjnBp0Zd7Qw9ia7DEp3eE+2bV3KUI="  # any 32 bytes, base64


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (Debian's) for the module; Playwright gives it a fresh profile."""
    require(sync_playwright is not None, "python package playwright is not installed")
    require_tools("chromium")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS,
            timeout=60_000)
        yield chromium
        chromium.close()


class UiSession:
    """A logged-in browser tab on the control plane that records what the page does."""

    def __init__(self, browser, server: KokoaServer, shots: Path, viewport=DESKTOP, login=True):
        self.server = server
        self.shots = shots
        self.width = viewport["width"]
        self.context = browser.new_context(base_url=server.url, viewport=viewport)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.context.set_default_navigation_timeout(TIMEOUT_MS)
        if login:       # as the login page does (the login tests below use the page itself)
            self.log_in()
        self.page = self.context.new_page()
        self.dialogs, self.problems, self.requests, self.finished = [], [], [], []
        self.page.on("dialog", self._on_dialog)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.on("requestfinished", lambda req: self.finished.append(req))
        self.page.on("requestfailed", lambda req: self.problems.append(
            f"request failed: {req.url} {req.failure}"))

    def log_in(self, password=None):
        """POST /api/v1/session from this browser context: its cookie jar gets the session."""
        response = self.context.request.post("/api/v1/session", data=json.dumps({
            "username": self.server.admin_user,
            "password": self.server.admin_password if password is None else password}),
            headers={"Content-Type": "application/json", "Origin": self.server.url})
        assert response.status == 204, response.text()
        return response

    def add_form(self, form_id):
        """A page's add form, opened with its "Add" button (an empty list opens it itself)."""
        form = self.page.locator(f"#{form_id}")
        if form.is_hidden():
            self.page.locator(f'[data-add="{form_id}"]').click()
        expect(form).to_be_visible()
        return form

    def _on_dialog(self, dialog):
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _on_console(self, msg):
        # 4xx answers to fetch() are logged by Chromium as "Failed to load resource": expected
        # when a test provokes a validation error. Script errors and CSP violations are not.
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            self.problems.append(f"console: {msg.text}")

    def open(self, page_name="origins"):
        """Load the UI on one page and wait until its first data load has finished."""
        response = self.page.goto(f"/#{page_name}")
        assert response is not None and response.status == 200
        expect(self.page.locator("body")).to_have_attribute("data-loaded", "true")
        expect(self.section(page_name)).to_be_visible()
        return response

    def go(self, page_name):
        """Move to another page through the navigation bar, as a person would."""
        self.page.get_by_role("navigation", name="Sections").locator(
            f'a[data-nav="{page_name}"]').click()
        expect(self.section(page_name)).to_be_visible()
        expect(self.page.locator(f"#{page_name}-title")).to_be_focused()

    def section(self, page_name):
        return self.page.locator(f"#page-{page_name}")

    def row(self, table, text):
        return self.page.locator(f"#{table}-body tr", has_text=text)

    def shot(self, name):
        path = self.shots / f"{name}-{self.width}.png"
        self.page.screenshot(path=str(path), full_page=True, animations="disabled")
        return path

    def confirm(self, button_name):
        dialog = self.page.locator("#confirm-dialog")
        expect(dialog).to_be_visible()
        dialog.get_by_role("button", name=button_name).click()
        return dialog

    def assert_clean(self):
        """No alert/confirm/prompt ever opened and no script error or CSP violation happened."""
        assert self.dialogs == [], self.dialogs
        assert self.problems == [], self.problems

    def close(self):
        self.context.close()


@pytest.fixture
def ui(browser, kokoa_server, tmp_path):
    session = UiSession(browser, kokoa_server, tmp_path)
    yield session
    session.close()


def api(server, method, path, body=None, auth="admin", expected=None):
    """Call the admin API directly (to set up or check state); assert the status if given."""
    status, _, data = server.request(method, "/api/v1" + path, body, auth=auth)
    if expected is not None:
        assert status == expected, (method, path, status, data)
    return data


def make_origin(server, name="home-nas", wg_ip="10.8.0.2", **extra):
    return api(server, "POST", "/origins", {"name": name, "wg_ip": wg_ip, **extra}, expected=201)


def make_route(server, origin, hostname="app.example.com", port=8080):
    body = {"hostname": hostname, "origin_id": origin["id"], "target_port": port}
    return api(server, "POST", "/routes", body, expected=201)


def make_enrollment_key(server, **body):
    return api(server, "POST", "/enrollment-keys", body, expected=201)


def register_with(server, key, name, **fields):
    """Register an edge anonymously with `key` in bootstrap_token; return (status, body)."""
    status, _, data = server.request("POST", "/api/v1/edge-nodes/register",
                                     {"bootstrap_token": key, "name": name, **fields}, auth=None)
    return status, data


def report_status(server, token, ok=True, error=None, certificates=None, applied_hash=None):
    """Act as an edge: read the current config, then report it applied (or failed)."""
    if applied_hash is None:
        applied_hash = api(server, "GET", "/edge-nodes/me/config", auth=token,
                           expected=200)["config_hash"]
    body = {"applied_hash": applied_hash, "ok": ok}
    if error is not None:
        body["error"] = error
    if certificates is not None:
        body["certificates"] = certificates
    api(server, "POST", "/edge-nodes/me/status", body, auth=token, expected=204)
    return applied_hash


# ---------------------------------------------------------------- static checks (no browser)

def test_static_files_have_no_inline_script_style_or_html_injection():
    html = (STATIC / "index.html").read_text()
    js = (STATIC / "app.js").read_text()
    names = sorted(p.name for p in STATIC.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all(p.is_file() for p in STATIC.iterdir()), "static/ must stay flat"
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, f"inline script: {tag}"
    assert not re.search(r"<style\b", html), "inline <style> element"
    assert not re.search(r"\sstyle\s*=", html), "inline style attribute"
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", html), "off-site resource"
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", ".style.", "setAttribute(\"style\""):
        assert sink not in js, f"app.js uses {sink}"
    for label in re.findall(r'<label for="([^"]+)"', html):
        assert f'id="{label}"' in html, f"label for missing #{label}"


def test_ui_responses_are_guarded(kokoa_server):
    # The shell loads without credentials (its login page must), with no data in it; the data
    # is behind the API's authentication (test_sessions.py, test_hardening.py).
    status, headers, body = kokoa_server.request("GET", "/", auth=None)
    assert status == 200 and "WWW-Authenticate" not in headers
    assert kokoa_server.request("GET", "/api/v1/origins", auth=None)[0] == 401
    for path, kind in (("/", "text/html"), ("/static/app.js", "javascript"),
                       ("/static/style.css", "text/css")):
        status, headers, body = kokoa_server.request("GET", path)
        assert status == 200, path
        assert kind in headers["Content-Type"], (path, headers["Content-Type"])
        assert headers["Content-Security-Policy"] == CSP, path
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Referrer-Policy"] == "no-referrer", path
        assert body == (STATIC / (path.rsplit("/", 1)[1] or "index.html")).read_bytes()
    for path in ("/static/nope.js", "/static/..%2fkokoa.py", "/static/sub/x.js"):
        status, _, _ = kokoa_server.request("GET", path)
        assert status == 404, path


# ---------------------------------------------------------------- the browser tests

def test_origin_and_route_lifecycle(ui):
    server, page = ui.server, ui.page
    ui.open("origins")
    expect(page.locator("#origins-empty")).to_contain_text("No origins yet")

    # Create an origin with generated keys, by keyboard: type, Tab, Enter submits.
    form = ui.add_form("origin-form")
    form.get_by_label("Name").fill("home-nas")
    form.get_by_label("Name").press("Tab")
    expect(form.get_by_label("WireGuard IP")).to_be_focused()
    page.keyboard.type("10.8.0.2")
    form.get_by_label("Endpoint").fill("home.example.com:51820")
    form.get_by_label("WireGuard IP").press("Enter")
    row = ui.row("origins", "home-nas")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("10.8.0.2")
    expect(row).to_contain_text("home.example.com:51820")
    expect(row).to_contain_text("key pair stored")
    expect(form.get_by_label("Name")).to_have_value("")  # the form is cleared after success
    origins = api(server, "GET", "/origins", expected=200)["origins"]
    assert [(o["name"], o["has_private_key"]) for o in origins] == [("home-nas", True)]
    origin = origins[0]
    link = row.get_by_role("link", name="Download wireguard.conf for home-nas")
    assert link.get_attribute("href") == f"/api/v1/origins/{origin['id']}/wireguard.conf"
    with page.expect_download() as download_info:
        link.click()
    download = download_info.value
    assert download.failure() is None
    conf = Path(download.path()).read_text()
    assert "[Interface]" in conf and "10.8.0.2" in conf

    # An origin with its own public key only.
    form.get_by_label("I already have keys").check()
    form.get_by_label("Name").fill("office")
    form.get_by_label("WireGuard IP").fill("10.8.0.3")
    form.get_by_label("Public key").fill(ORIGIN_KEY)
    form.get_by_role("button", name="Add origin").click()
    expect(ui.row("origins", "office")).to_contain_text("public key only")
    ui.shot("origins-two")

    # Edit its endpoint: a bad value is reported inside the dialog, next to the field.
    ui.row("origins", "office").get_by_role("button", name="Edit").click()
    dialog = page.locator("#origin-dialog")
    endpoint = dialog.get_by_label("Endpoint")
    endpoint.fill("no-port-here")
    dialog.get_by_role("button", name="Save changes").click()
    expect(dialog.locator("#edit-origin-endpoint-error")).to_be_visible()
    expect(endpoint).to_have_value("no-port-here")
    endpoint.fill("office.example.com:51820")
    dialog.get_by_role("button", name="Save changes").click()
    expect(dialog).to_be_hidden()
    expect(ui.row("origins", "office")).to_contain_text("office.example.com:51820")
    ui.row("origins", "office").get_by_role("button", name="Edit").click()
    dialog.get_by_label("Endpoint").fill("")
    dialog.get_by_role("button", name="Save changes").click()
    expect(ui.row("origins", "office")).to_contain_text("none (dials out)")
    office = [o for o in api(server, "GET", "/origins", expected=200)["origins"]
              if o["name"] == "office"]
    assert office[0]["wg_endpoint"] is None

    # A route.
    ui.go("routes")
    routes = ui.add_form("route-form")
    routes.get_by_label("Hostname").fill("App.Example.com")
    routes.get_by_label("Origin", exact=True).select_option(label="home-nas (10.8.0.2)")
    routes.get_by_label("Port on the origin").fill("8080")
    routes.get_by_role("button", name="Add route").click()
    row = ui.row("routes", "app.example.com")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("home-nas")
    expect(row).to_contain_text("8080")
    expect(row.get_by_role("link", name="app.example.com")).to_have_attribute(
        "href", "https://app.example.com/")
    ui.go("origins")
    expect(ui.row("origins", "home-nas").locator('td[data-label="Routes"]')).to_have_text("1")
    expect(page.locator("#count-routes")).to_have_text("1")

    # Edit its port and origin.
    ui.go("routes")
    ui.row("routes", "app.example.com").get_by_role("button", name="Edit").click()
    dialog = page.locator("#route-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Port on the origin").fill("9090")
    dialog.get_by_label("Origin", exact=True).select_option(label="office (10.8.0.3)")
    ui.shot("routes-edit-dialog")
    dialog.get_by_role("button", name="Save changes").click()
    expect(dialog).to_be_hidden()
    expect(ui.row("routes", "app.example.com")).to_contain_text("9090")
    expect(ui.row("routes", "app.example.com")).to_contain_text("office")
    route = api(server, "GET", "/routes", expected=200)["routes"][0]
    assert (route["target_port"], route["origin_name"]) == (9090, "office")

    # Delete: Escape backs out, then confirm for real.
    ui.row("routes", "app.example.com").get_by_role("button", name="Delete").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    assert len(api(server, "GET", "/routes", expected=200)["routes"]) == 1
    ui.row("routes", "app.example.com").get_by_role("button", name="Delete").click()
    ui.confirm("Delete route")
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    expect(ui.row("routes", "app.example.com")).to_have_count(0)
    expect(page.locator("#routes-empty")).to_contain_text("No routes yet")
    assert api(server, "GET", "/routes", expected=200)["routes"] == []

    # Now the unused origin can be deleted.
    ui.go("origins")
    ui.row("origins", "office").get_by_role("button", name="Delete").click()
    ui.confirm("Delete origin")
    expect(ui.row("origins", "office")).to_have_count(0)
    assert [o["name"] for o in api(server, "GET", "/origins", expected=200)["origins"]] == [
        "home-nas"]
    ui.assert_clean()


def test_validation_errors_are_shown_next_to_their_field_and_keep_the_form(ui):
    server, page = ui.server, ui.page
    make_origin(server)
    ui.open("routes")
    form = ui.add_form("route-form")
    hostname, port = form.get_by_label("Hostname"), form.get_by_label("Port on the origin")

    # Nothing filled in: every missing field says so, no request is sent.
    sent = len(ui.requests)
    form.get_by_role("button", name="Add route").click()
    for field in ("hostname", "origin", "port"):
        expect(page.locator(f"#route-{field}-error")).to_be_visible()
    expect(hostname).to_be_focused()
    assert len(ui.requests) == sent

    # The server refuses a one-label hostname: the message sits under the hostname field.
    hostname.fill("localhost")
    form.get_by_label("Origin", exact=True).select_option(label="home-nas (10.8.0.2)")
    port.fill("8080")
    form.get_by_role("button", name="Add route").click()
    error = page.locator("#route-hostname-error")
    expect(error).to_be_visible()
    expect(error).not_to_be_empty()
    expect(hostname).to_have_attribute("aria-invalid", "true")
    expect(hostname).to_be_focused()
    expect(page.locator("#route-port-error")).to_be_hidden()
    expect(hostname).to_have_value("localhost")
    expect(port).to_have_value("8080")
    expect(form.get_by_label("Origin", exact=True)).to_have_value(
        api(server, "GET", "/origins", expected=200)["origins"][0]["id"])
    ui.shot("routes-hostname-error")

    # A port out of range: the error moves to the port field.
    hostname.fill("app.example.com")
    port.fill("70000")
    form.get_by_role("button", name="Add route").click()
    expect(page.locator("#route-port-error")).to_be_visible()
    expect(page.locator("#route-hostname-error")).to_be_hidden()
    expect(hostname).not_to_have_attribute("aria-invalid", "true")
    expect(port).to_have_value("70000")

    # A duplicate hostname is a conflict on the hostname field, in plain words.
    make_route(server, api(server, "GET", "/origins", expected=200)["origins"][0],
               hostname="taken.example.com")
    hostname.fill("taken.example.com")
    port.fill("8080")
    form.get_by_role("button", name="Add route").click()
    expect(page.locator("#route-hostname-error")).to_contain_text("already")

    # Origins: a bad WireGuard IP, then a duplicate name.
    ui.go("origins")
    origin_form = ui.add_form("origin-form")
    origin_form.get_by_label("Name").fill("second")
    origin_form.get_by_label("WireGuard IP").fill("not-an-ip")
    origin_form.get_by_role("button", name="Add origin").click()
    expect(page.locator("#origin-wg-ip-error")).to_be_visible()
    expect(origin_form.get_by_label("Name")).to_have_value("second")
    expect(origin_form.get_by_label("WireGuard IP")).to_have_value("not-an-ip")
    ui.shot("origins-wg-ip-error")
    origin_form.get_by_label("Name").fill("HOME-NAS")
    origin_form.get_by_label("WireGuard IP").fill("10.8.0.9")
    origin_form.get_by_role("button", name="Add origin").click()
    expect(page.locator("#origin-name-error")).to_be_visible()
    expect(page.locator("#origin-wg-ip-error")).to_be_hidden()
    assert len(api(server, "GET", "/origins", expected=200)["origins"]) == 1
    ui.assert_clean()


def test_deleting_an_origin_in_use_explains_why_it_was_refused(ui):
    server = ui.server
    origin = make_origin(server)
    make_route(server, origin)
    ui.open("origins")
    ui.row("origins", "home-nas").get_by_role("button", name="Delete").click()
    dialog = ui.confirm("Delete origin")
    alert = dialog.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("still used by routes")
    expect(dialog.get_by_role("button", name="Delete origin")).to_be_hidden()
    ui.shot("origins-delete-refused")
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    expect(ui.row("origins", "home-nas")).to_have_count(1)
    assert len(api(server, "GET", "/origins", expected=200)["origins"]) == 1
    ui.assert_clean()


def test_installing_an_origin_shows_its_token_once_and_the_one_line_command(ui):
    server, page = ui.server, ui.page
    ui.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    make_origin(server)
    ui.open("origins")
    ui.row("origins", "home-nas").get_by_role("button", name="Install origin home-nas").click()
    card = page.locator("#origin-install")
    expect(card).to_be_visible()
    token = page.locator("#origin-token").text_content()
    assert re.fullmatch(r"kokoa-ot-[A-Za-z0-9_-]{40,}", token), token
    command = page.locator("#origin-command").text_content()
    assert token not in command
    assert command == (
        "read -rsp 'Origin token: ' KOKOA_ORIGIN_TOKEN && export KOKOA_ORIGIN_TOKEN && "
        f"curl -fsSL {server.url}/install/origin.sh | "
        "sudo --preserve-env=KOKOA_ORIGIN_TOKEN bash -s")
    card.get_by_role("button", name="Copy the origin install command").click()
    assert page.evaluate("navigator.clipboard.readText()") == command
    status, _, conf = server.request("GET", "/api/v1/origins/me/wireguard.conf", auth=token)
    assert status == 200 and b"[Interface]" in conf
    # A second Install asks first: the old token stops working.
    ui.row("origins", "home-nas").get_by_role("button", name="Install origin home-nas").click()
    ui.confirm("Make a new token")
    expect(page.locator("#origin-token")).not_to_have_text(token)
    assert server.request("GET", "/api/v1/origins/me/wireguard.conf", auth=token)[0] == 401
    card.get_by_role("button", name="Done, hide the token").click()
    expect(card).to_be_hidden()
    ui.assert_clean()


def test_an_edge_left_out_of_the_tunnels_is_flagged(ui):
    server = ui.server
    server.register_edge("bare-edge")
    ui.open("edges")
    row = ui.row("edges", "bare-edge")
    expect(row).to_contain_text("not in origins' tunnels", timeout=EDGE_POLL_TIMEOUT_MS)
    expect(row).to_contain_text("leave this edge out of their wireguard.conf")
    ui.assert_clean()


def test_hostile_names_are_rendered_as_text(ui):
    server, page = ui.server, ui.page
    origin = make_origin(server, name=HOSTILE)
    make_route(server, origin, hostname="x.example.com")
    edge_name = "<svg onload=alert(2)>"
    status, _, _ = server.request("POST", "/api/v1/edge-nodes/register", {
        "bootstrap_token": server.bootstrap_token, "name": edge_name}, auth=None)
    ui.open("origins")
    expect(ui.row("origins", "alert(1)").locator("strong.name")).to_have_text(HOSTILE)
    ui.row("origins", "alert(1)").get_by_role("button", name="Delete").click()
    expect(page.locator("#confirm-title")).to_have_text(f"Delete origin “{HOSTILE}”?")
    page.locator("#confirm-dialog").get_by_role("button", name="Cancel").click()
    ui.go("routes")
    expect(ui.row("routes", "x.example.com").locator('td[data-label="Origin"]')).to_have_text(
        HOSTILE)
    expect(page.locator("#route-origin option", has_text="onerror")).to_have_text(
        f"{HOSTILE} (10.8.0.2)")
    make_enrollment_key(server, description=HOSTILE)
    ui.go("edges")
    expect(ui.row("enroll", "alert(1)").locator("strong.name")).to_have_text(HOSTILE)
    if status == 201:  # the server may refuse such an edge name; if it takes it, show it as text
        expect(ui.row("edges", "svg").locator("strong.name")).to_have_text(edge_name)
    elements = page.evaluate("document.querySelectorAll('img, svg, script:not([src])').length")
    assert elements == 0
    ui.assert_clean()


def test_edge_list_shows_registered_edges_their_state_and_revokes(ui):
    server, page = ui.server, ui.page
    origin = make_origin(server)
    make_route(server, origin, hostname="app.example.com")
    ui.open("edges")
    expect(page.locator("#edges-empty")).to_contain_text("No edge nodes yet")

    # The install command carries this control plane's URL, never the bootstrap token.
    command = page.locator("#edge-command")
    expect(command).to_have_text(
        "read -rsp 'Bootstrap token: ' KOKOA_ENROLL_KEY && export KOKOA_ENROLL_KEY && "
        f"curl -fsSL {server.url}/install/edge.sh | sudo --preserve-env=KOKOA_ENROLL_KEY "
        "bash -s -- --email you@example.com --edge-fqdn edge1.example.com")
    expect(page.locator("#add-edge")).to_contain_text("kokoa.env")
    assert server.bootstrap_token not in page.content()

    # Registered after the page loaded: the list picks it up by itself.
    edge_id, token = server.register_edge("edge1", wg_ip="10.8.0.1")
    row = ui.row("edges", "edge1")
    expect(row).to_have_count(1, timeout=EDGE_POLL_TIMEOUT_MS)
    expect(row).to_contain_text("10.8.0.1")
    expect(row).to_contain_text("not applied yet")
    expect(row.locator('td[data-label="Last seen"]')).to_have_text("never")

    # It applies the config and reports a certificate: in sync, seen just now.
    report_status(server, token, certificates={
        "app.example.com": {"status": "valid", "not_after": "2027-02-26T18:00:00Z"}})
    expect(row).to_contain_text("in sync", timeout=EDGE_POLL_TIMEOUT_MS)
    last_seen = row.locator('td[data-label="Last seen"]')
    expect(last_seen).to_have_text(re.compile(r"just now|\d+ s ago"))
    expect(row).to_contain_text("1 valid")
    expect(page.locator("#count-edges")).to_have_text("1/1")
    # It polled without X-Kokoa-Agent: an agent from before 0.2, flagged as outdated.
    agent = row.locator('td[data-label="Agent"]')
    expect(agent).to_contain_text("0.1 or older")
    expect(agent).to_contain_text("payload schema 1")
    expect(agent.locator(".badge.warn")).to_have_text("outdated")
    # Its agent is upgraded: it names itself and gets schema 2; the flag goes.
    agent_header = {"X-Kokoa-Agent": f"{kokoa.__version__}; schema=1,2"}
    _, _, config = server.request("GET", "/api/v1/edge-nodes/me/config", auth=token,
                                  headers=agent_header)
    assert config["schema"] == 2
    status, _, _ = server.request("POST", "/api/v1/edge-nodes/me/status", {
        "applied_hash": config["config_hash"], "ok": True, "agent_version": kokoa.__version__,
        "schema": 2}, auth=token, headers=agent_header)
    assert status == 204
    expect(agent).to_contain_text(kokoa.__version__, timeout=EDGE_POLL_TIMEOUT_MS)
    expect(agent).to_contain_text("payload schema 2")
    expect(agent.locator(".badge")).to_have_count(0)

    # A second edge fails to apply: out of sync, with its error shown.
    _, token2 = server.register_edge("edge2", wg_ip="10.8.0.4")
    report_status(server, token2, ok=False, applied_hash="0" * 64,
                  error="nginx: [emerg] unknown directive \"oops\"",
                  certificates={"app.example.com": {"status": "failed", "error": "rate limited"}})
    row2 = ui.row("edges", "edge2")
    expect(row2).to_contain_text("out of sync", timeout=EDGE_POLL_TIMEOUT_MS)
    expect(row2).to_contain_text('unknown directive "oops"')
    expect(row2).to_contain_text("last apply failed")
    expect(page.locator("#count-edges")).to_have_text("1/2")
    ui.shot("edges")

    # Routes show each edge's certificate state.
    ui.go("routes")
    certs = ui.row("routes", "app.example.com").locator('td[data-label="Certificates"]')
    expect(certs).to_contain_text("valid edge1 until 2027-02-26")
    expect(certs).to_contain_text("failed edge2")
    expect(certs).to_contain_text("rate limited")

    # Revoke edge2.
    ui.go("edges")
    ui.row("edges", "edge2").get_by_role("button", name="Revoke").click()
    ui.confirm("Revoke edge")
    expect(ui.row("edges", "edge2")).to_have_count(0)
    edges = api(server, "GET", "/edge-nodes", expected=200)["edge_nodes"]
    assert [e["id"] for e in edges] == [edge_id]
    ui.assert_clean()


def no_sideways_scroll(ui):
    width = ui.page.evaluate("document.documentElement.scrollWidth")
    assert width <= ui.width, f"the page scrolls sideways: {width}px"


def test_enrollment_key_is_shown_once_registers_an_edge_and_can_be_revoked(ui):
    server, page = ui.server, ui.page
    ui.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    ui.open("edges")
    card = page.locator("#enroll-card")
    expect(page.locator("#enroll-empty")).to_contain_text("No enrollment keys")
    form = page.locator("#enroll-form")
    make = form.get_by_role("button", name="Make key")
    expect(form.get_by_label("Uses")).to_have_value("1")
    expect(form.get_by_label("Expires after")).to_have_value("3600")

    # The server's refusal sits under the field it names; nothing is made.
    uses = form.get_by_label("Uses")
    uses.fill("0")
    form.get_by_label("Description").fill("rack 2")
    make.click()
    error = page.locator("#enroll-uses-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("1 to 1000")
    expect(uses).to_have_attribute("aria-invalid", "true")
    expect(uses).to_be_focused()
    expect(form.get_by_label("Description")).to_have_value("rack 2")
    expect(page.locator("#enroll-new")).to_be_hidden()
    assert api(server, "GET", "/enrollment-keys", expected=200)["enrollment_keys"] == []

    # Make a key valid for a day: it is shown once, with the exact install line.
    uses.fill("1")
    form.get_by_label("Expires after").select_option(label="1 day")
    make.click()
    reveal = page.locator("#enroll-new")
    expect(reveal).to_be_visible()
    expect(page.locator("#enroll-new-title")).to_be_focused()
    expect(error).to_be_hidden()
    expect(reveal).to_contain_text("cannot be shown again")
    key = page.locator("#enroll-key").text_content()
    assert re.fullmatch(r"kokoa-ek-[A-Za-z0-9_-]{40,}", key), key
    command = page.locator("#enroll-command").text_content()
    # the key is never on a command line (/proc/*/cmdline): the shell asks for it
    assert key not in command
    assert command == (
        "read -rsp 'Enrollment key: ' KOKOA_ENROLL_KEY && export KOKOA_ENROLL_KEY && "
        f"curl -fsSL {server.url}/install/edge.sh | sudo --preserve-env=KOKOA_ENROLL_KEY "
        "bash -s -- --email you@example.com --edge-fqdn edge1.example.com")
    reveal.get_by_role("button", name="Copy the command with this enrollment key").click()
    assert page.evaluate("navigator.clipboard.readText()") == command
    reveal.get_by_role("button", name="Copy the enrollment key").click()
    assert page.evaluate("navigator.clipboard.readText()") == key
    expect(form.get_by_label("Description")).to_have_value("")  # the form is reset
    row = ui.row("enroll", "rack 2")
    expect(row).to_have_count(1)
    expect(row.locator('td[data-label="Expires"]')).to_have_text(re.compile(r"in 2[34] h"))
    expect(row.locator('td[data-label="Uses left"]')).to_have_text("1")
    expect(row.locator('td[data-label="Last used"]')).to_have_text("never")
    [listed] = api(server, "GET", "/enrollment-keys", expected=200)["enrollment_keys"]
    assert listed["description"] == "rack 2" and listed["uses_left"] == 1
    assert "key" not in listed and key not in str(listed)
    ui.shot("edges-enrollment-key")
    page.set_viewport_size(PHONE)
    ui.width = PHONE["width"]
    no_sideways_scroll(ui)
    card.screenshot(path=str(ui.shots / "edges-enrollment-key-card-360.png"),
                    animations="disabled")
    ui.shot("edges-enrollment-key")
    page.set_viewport_size(DESKTOP)
    ui.width = DESKTOP["width"]

    # An edge registers with the key (as install-edge.sh does); the key is then used up.
    status, data = register_with(server, key, "edge-ek", wg_ip="10.8.0.7")
    assert status == 201, data
    assert data["name"] == "edge-ek" and data["token"]
    expect(ui.row("edges", "edge-ek")).to_have_count(1, timeout=EDGE_POLL_TIMEOUT_MS)
    expect(row.locator('td[data-label="Uses left"]')).to_have_text(
        "used up", timeout=EDGE_POLL_TIMEOUT_MS)
    expect(row.locator('td[data-label="Last used"]')).to_have_text(
        re.compile(r"just now|\d+ s ago"))
    status, data = register_with(server, key, "edge-again", wg_ip="10.8.0.8")
    assert status == 401, data
    assert data["error"]["field"] == "bootstrap_token"
    assert [e["name"] for e in api(server, "GET", "/edge-nodes", expected=200)["edge_nodes"]] == [
        "edge-ek"]

    # A second key, made and then revoked in the UI: it disappears and no longer registers.
    form.get_by_label("Description").fill("spare")
    form.get_by_label("Uses").fill("5")
    make.click()
    expect(ui.row("enroll", "spare")).to_have_count(1)
    spare = page.locator("#enroll-key").text_content()
    assert spare.startswith("kokoa-ek-") and spare != key
    expect(ui.row("enroll", "spare").locator('td[data-label="Uses left"]')).to_have_text("5")
    ui.row("enroll", "spare").get_by_role("button", name="Revoke").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_contain_text("Revoke enrollment key “spare”?")
    ui.confirm("Revoke key")
    expect(dialog).to_be_hidden()
    expect(ui.row("enroll", "spare")).to_have_count(0)
    expect(reveal).to_be_hidden()  # the key on screen was the one revoked
    assert spare not in page.content()
    assert [k["description"] for k in
            api(server, "GET", "/enrollment-keys", expected=200)["enrollment_keys"]] == ["rack 2"]
    assert register_with(server, spare, "edge-spare", wg_ip="10.8.0.9")[0] == 401

    # A third key, then a reload: the list is still there, no key ever is.
    form.get_by_label("Description").fill("later")
    make.click()
    expect(ui.row("enroll", "later")).to_have_count(1)
    later = page.locator("#enroll-key").text_content()
    assert later in page.content()
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    expect(ui.row("enroll", "later")).to_have_count(1)
    expect(ui.row("enroll", "rack 2")).to_have_count(1)
    expect(reveal).to_be_hidden()
    html = page.content()
    for secret in (key, spare, later, server.bootstrap_token):
        assert secret not in html
    assert "kokoa-ek-" not in html
    ui.assert_clean()


def test_settings_toggle_acme_staging(ui):
    server, page = ui.server, ui.page
    assert api(server, "GET", "/settings", expected=200)["acme_staging"] is False
    ui.open("settings")
    box = page.get_by_label("Use the Let's Encrypt staging environment")
    expect(box).to_be_enabled()
    expect(box).not_to_be_checked()
    box.check()
    ui.confirm("Use staging")
    expect(page.locator("#settings-status")).to_contain_text("Saved")
    assert api(server, "GET", "/settings", expected=200)["acme_staging"] is True
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    expect(box).to_be_checked()
    box.uncheck()
    ui.confirm("Use real certificates")
    expect(page.locator("#settings-status")).to_contain_text("trusted certificates")
    assert api(server, "GET", "/settings", expected=200)["acme_staging"] is False
    ui.assert_clean()


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["360px", "desktop"])
def test_every_page_fits_stays_small_and_stays_on_the_control_plane(
        browser, kokoa_server, tmp_path, viewport):
    server = kokoa_server
    home = make_origin(server, wg_endpoint="home.example.com:51820")
    office = make_origin(server, name="office-with-a-rather-long-name", wg_ip="10.8.0.3",
                         wg_public_key=ORIGIN_KEY)
    make_route(server, home, hostname="app.example.com")
    make_route(server, home, hostname="a-very-long-hostname-for-testing.staging.example.com",
               port=3000)
    make_route(server, office, hostname="wiki.example.org", port=80)
    _, token = server.register_edge("edge1", wg_ip="10.8.0.1")
    report_status(server, token, certificates={
        "app.example.com": {"status": "valid", "not_after": "2027-02-26T18:00:00Z"},
        "wiki.example.org": {"status": "pending"}})
    server.register_edge("edge2", wg_ip="10.8.0.4")
    make_enrollment_key(server, description="for the second edge in the Frankfurt rack",
                        uses=3)

    ui = UiSession(browser, server, tmp_path, viewport)
    try:
        response = ui.open("origins")
        assert response.headers["content-security-policy"] == CSP
        for name in PAGES:
            if name != "origins":
                ui.go(name)
            if name != "settings":
                for empty in ui.section(name).locator(".empty").all():
                    expect(empty).not_to_contain_text("Loading")
            ui.shot(name)
            overflow = ui.page.evaluate("document.documentElement.scrollWidth")
            assert overflow <= viewport["width"], f"{name} scrolls sideways: {overflow}px"
            cards = ui.page.evaluate("""[...document.querySelectorAll('.card')]
                .filter(c => c.offsetParent && c.scrollWidth > c.clientWidth + 1).length""")
            assert cards == 0, f"a card on {name} scrolls sideways"

        # Every form control has a label a screen reader can announce.
        unlabeled = ui.page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
            .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)""")
        assert unlabeled == []

        # The key is shortened on screen; its copy button copies all of it.
        ui.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        ui.go("origins")
        copy = ui.row("origins", "office").get_by_role("button", name="Copy the public key")
        copy.click()
        expect(copy).to_have_text("Copied")
        assert ui.page.evaluate("navigator.clipboard.readText()") == ORIGIN_KEY
        ui.go("edges")
        ui.page.get_by_role("button", name="Copy the install command").click()
        command = ui.page.evaluate("navigator.clipboard.readText()")
        assert f"curl -fsSL {server.url}/install/edge.sh | sudo " \
               "--preserve-env=KOKOA_ENROLL_KEY bash -s -- " in command

        off_site = [u for u in ui.requests
                    if not (u.startswith(server.url + "/") or u.startswith("data:"))]
        assert off_site == []
        total = 0
        for req in ui.finished:
            sizes = req.sizes()
            total += sizes["responseBodySize"] + sizes["responseHeadersSize"]
        assert 0 < total < PAGE_BUDGET_BYTES, f"page transferred {total} bytes"
        ui.assert_clean()
    finally:
        ui.close()


def test_edge_status_refresh_does_not_rebuild_unchanged_rows(ui):
    server, page = ui.server, ui.page
    _, token = server.register_edge("steady", wg_ip="10.8.0.1")
    report_status(server, token)
    ui.open("edges")
    row = ui.row("edges", "steady")
    expect(row).to_contain_text("in sync")
    row.evaluate("tr => { tr.dataset.marker = 'kept'; }")
    # Another edge appears; the unchanged row must be the very same element afterwards.
    server.register_edge("newcomer", wg_ip="10.8.0.5")
    expect(ui.row("edges", "newcomer")).to_have_count(1, timeout=EDGE_POLL_TIMEOUT_MS)
    expect(row).to_have_attribute("data-marker", "kept")
    first_host = urlsplit(page.url).netloc
    assert first_host == urlsplit(server.url).netloc
    ui.assert_clean()


def test_route_options_live_in_an_advanced_fold(ui):
    server, page = ui.server, ui.page
    origin = make_origin(server)
    ui.open("routes")
    form = ui.add_form("route-form")
    fold = form.locator("details.advanced")
    expect(fold).not_to_have_attribute("open", "")           # folded: the defaults suit most
    form.get_by_label("Hostname").fill("events.example.com")
    form.get_by_label("Origin", exact=True).select_option(label="home-nas (10.8.0.2)")
    form.get_by_label("Port on the origin").fill("8123")
    fold.locator("summary").click()
    expect(form.get_by_label("Buffer responses")).to_be_checked()
    form.get_by_label("Buffer responses").uncheck()
    form.get_by_label("Largest upload (MiB)").fill("lots")
    form.get_by_role("button", name="Add route").click()
    expect(form.locator("#route-max-body-size-error")).to_be_visible()   # the API's 400
    assert api(server, "GET", "/routes", expected=200)["routes"] == []
    form.get_by_label("Largest upload (MiB)").fill("100")
    form.get_by_role("button", name="Add route").click()
    row = ui.row("routes", "events.example.com")
    expect(row).to_contain_text("streamed")
    expect(row).to_contain_text("uploads ≤ 100 MiB")
    [route] = api(server, "GET", "/routes", expected=200)["routes"]
    assert (route["buffering"], route["max_body_size"], route["hsts"], route["enabled"]) == (
        False, 100, True, True)

    # Stop serving it, from the edit dialog (open, since its options are not the defaults).
    row.get_by_role("button", name="Edit").click()
    dialog = page.locator("#route-dialog")
    expect(dialog.locator("details.advanced")).to_have_attribute("open", "")
    dialog.get_by_label("Serve this route").uncheck()
    dialog.get_by_role("button", name="Save changes").click()
    expect(dialog).to_be_hidden()
    expect(row).to_contain_text("not served")
    [route] = api(server, "GET", "/routes", expected=200)["routes"]
    assert route["enabled"] is False and route["buffering"] is False
    make_route(server, origin, hostname="plain.example.com")
    expect(ui.row("routes", "plain.example.com").locator(".badge")).to_have_count(0)


# ---------------------------------------------------------------- access policies

def stored_users(server, name):
    """{username: hash} of a policy, read from the database as a backup would hold it."""
    db = sqlite3.connect(server.db)
    try:
        (text,) = db.execute("SELECT users FROM access_policies WHERE name = ?",
                             (name,)).fetchone()
    finally:
        db.close()
    return {user["username"]: user["hash"] for user in json.loads(text)}


def fill_user(form, index, username, password):
    rows = form.locator(".user-row")
    if rows.count() <= index:
        form.get_by_role("button", name="Add user").click()
    rows.nth(index).locator(".user-name").fill(username)
    rows.nth(index).locator(".user-password").fill(password)


def test_a_policy_made_in_the_ui_protects_a_route_and_shows_a_lock(ui):
    server, page = ui.server, ui.page
    passwords = ["alice's long password", "bob's long password", "carol's long password"]
    remember_secret(*passwords)
    make_origin(server)
    verifier = make_origin(server, name="authelia", wg_ip="10.8.0.5")
    ui.open("routes")
    ui.go("policies")
    expect(page.locator("#policies-empty")).to_contain_text("every route is public")

    form = ui.add_form("policy-form")
    form.get_by_label("Name", exact=True).fill("family")
    fill_user(form, 0, "alice", passwords[0])
    fill_user(form, 1, "bob", passwords[1])
    form.get_by_label("Allowed networks").fill("198.18.0.0/24\n 198.18.0.9 \n\n")
    # A bad network: the API's 400 sits under its field, the form keeps what was typed.
    form.get_by_label("Denied networks").fill("10.0.0.0/33")
    form.get_by_role("button", name="Add policy").click()
    expect(form.locator("#policy-deny-error")).to_be_visible()
    expect(form.locator("#policy-deny-error")).to_contain_text("10.0.0.0/33")
    expect(form.locator(".user-row")).to_have_count(2)
    assert api(server, "GET", "/access-policies", expected=200)["access_policies"] == []
    form.get_by_label("Denied networks").fill("198.18.0.66")
    form.get_by_role("button", name="Add policy").click()
    row = ui.row("policies", "family")
    expect(row).to_contain_text("2 users")
    expect(row).to_contain_text("2 allowed networks")
    expect(row).to_contain_text("1 denied network")
    expect(row).to_contain_text("no route uses it yet")
    expect(form.get_by_label("Name", exact=True)).to_have_value("")      # cleared after success
    [policy] = api(server, "GET", "/access-policies", expected=200)["access_policies"]
    assert policy["users"] == ["alice", "bob"]
    assert policy["allow"] == ["198.18.0.0/24", "198.18.0.9/32"]
    hashes = stored_users(server, "family")
    salt = hashes["alice"].split("$")[2]
    assert hashes["alice"] == kokoa.sha512_crypt(passwords[0], salt)

    # Edit: alice is kept without retyping, bob goes, carol comes, single sign-on is added.
    row.get_by_role("button", name="Edit").click()
    dialog = page.locator("#policy-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator(".user-name").nth(0)).to_have_value("alice")
    expect(dialog.get_by_label("New password for alice")).to_have_value("")
    dialog.get_by_role("button", name="Remove user bob").click()
    fill_user(dialog, 1, "carol", passwords[2])
    dialog.get_by_label("Verifier origin").select_option(label="authelia (10.8.0.5)")
    dialog.get_by_label("Verifier port").fill("9091")
    dialog.get_by_label("Verifier path").fill("/api/authz/auth-request")
    dialog.get_by_label("Sign-in URL").fill("https://auth.example.com/")
    dialog.get_by_label("When there is more than one way in").select_option("all")
    dialog.get_by_label("Paths without sign-in").fill("/api/")
    ui.shot("policy-edit-dialog")
    dialog.get_by_role("button", name="Save changes").click()
    expect(dialog).to_be_hidden()
    expect(row).to_contain_text("single sign-on: authelia:9091")
    expect(row).to_contain_text("all must pass")
    expect(row).to_contain_text("1 path without sign-in")
    [policy] = api(server, "GET", "/access-policies", expected=200)["access_policies"]
    assert policy["users"] == ["alice", "carol"] and policy["require"] == "all"
    assert policy["forward_auth"] == {"origin_id": verifier["id"], "port": 9091,
                                      "path": "/api/authz/auth-request",
                                      "signin_url": "https://auth.example.com/"}
    after = stored_users(server, "family")
    assert after["alice"] == hashes["alice"] and set(after) == {"alice", "carol"}

    # Pick it for a new route: the routes list shows a lock with the policy's name.
    ui.go("routes")
    routes = ui.add_form("route-form")
    routes.get_by_label("Hostname").fill("nas.example.com")
    routes.get_by_label("Origin", exact=True).select_option(label="home-nas (10.8.0.2)")
    routes.get_by_label("Port on the origin").fill("5000")
    routes.get_by_label("Access").select_option(label="Protected: family")
    routes.get_by_role("button", name="Add route").click()
    nas = ui.row("routes", "nas.example.com")
    expect(nas.locator(".lock-badge")).to_have_text("family")
    expect(nas.locator(".lock")).to_have_attribute("title",
                                                   "Protected by the access policy “family”")
    make_route(server, {"id": route_id_of(server, "nas.example.com", "origin_id")},
               hostname="www.example.com", port=80)
    page.reload()                           # made through the API: load it now
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    expect(ui.row("routes", "www.example.com")).to_have_count(1)
    expect(ui.row("routes", "www.example.com").locator(".lock-badge")).to_have_count(0)
    [route] = [r for r in api(server, "GET", "/routes", expected=200)["routes"]
               if r["hostname"] == "nas.example.com"]
    assert route["access_policy_id"] == policy["id"]

    # Made public in the edit dialog, and protected again.
    nas.get_by_role("button", name="Edit").click()
    route_dialog = page.locator("#route-dialog")
    expect(route_dialog.get_by_label("Access")).to_have_value(policy["id"])
    route_dialog.get_by_label("Access").select_option(label="Public: no access policy")
    route_dialog.get_by_role("button", name="Save changes").click()
    expect(route_dialog).to_be_hidden()
    expect(nas.locator(".lock-badge")).to_have_count(0)
    nas.get_by_role("button", name="Edit").click()
    route_dialog.get_by_label("Access").select_option(label="Protected: family")
    route_dialog.get_by_role("button", name="Save changes").click()
    expect(nas.locator(".lock-badge")).to_have_text("family")

    # A policy in use is not deleted, and the dialog says which route holds it.
    ui.go("policies")
    expect(row).to_contain_text("nas.example.com")
    row.get_by_role("button", name="Delete").click()
    confirm = ui.confirm("Delete policy")
    alert = confirm.get_by_role("alert")
    expect(alert).to_contain_text("nas.example.com")
    expect(confirm.get_by_role("button", name="Delete policy")).to_be_hidden()
    confirm.get_by_role("button", name="Close").click()
    assert len(api(server, "GET", "/access-policies", expected=200)["access_policies"]) == 1

    # Nor is the origin that runs its verifier (it has no route: the server says why).
    ui.go("origins")
    ui.row("origins", "authelia").get_by_role("button", name="Delete").click()
    confirm = ui.confirm("Delete origin")
    expect(confirm.get_by_role("alert")).to_contain_text("forward-auth verifier")
    expect(confirm.get_by_role("alert")).to_contain_text("family")
    confirm.get_by_role("button", name="Close").click()
    assert len(api(server, "GET", "/origins", expected=200)["origins"]) == 2
    ui.assert_clean()


def route_id_of(server, hostname, key="id"):
    """A field of the route with `hostname`, from the API."""
    [route] = [r for r in api(server, "GET", "/routes", expected=200)["routes"]
               if r["hostname"] == hostname]
    return route[key]


def test_a_new_user_needs_a_password_and_hostile_policy_names_are_text(ui):
    page = ui.page
    ui.open("policies")
    form = ui.add_form("policy-form")
    form.get_by_label("Name", exact=True).fill(HOSTILE)
    form.locator(".user-name").first.fill("dave")
    sent = len(ui.requests)
    form.get_by_role("button", name="Add policy").click()
    expect(form.locator("#policy-users-error")).to_contain_text("Enter a password for dave")
    assert len(ui.requests) == sent
    # Nothing to protect with: the server says so, under the users.
    form.locator(".user-name").first.fill("")
    form.get_by_role("button", name="Add policy").click()
    expect(form.locator("#policy-users-error")).to_contain_text("protect nothing")
    form.get_by_label("Allowed networks").fill("10.0.0.0/8")
    form.get_by_role("button", name="Add policy").click()
    expect(ui.row("policies", "onerror").locator("strong.name")).to_have_text(HOSTILE)
    ui.go("routes")
    expect(page.locator("#route-policy option", has_text="onerror")).to_have_text(
        f"Protected: {HOSTILE}")
    assert page.evaluate("document.querySelectorAll('img, script:not([src])').length") == 0
    ui.assert_clean()


@pytest.mark.parametrize("viewport", [DESKTOP, SMALL_PHONE], ids=["1280px", "375px"])
def test_policies_page_and_protected_routes_fit_and_are_photographed(browser, kokoa_server,
                                                                     viewport):
    server = kokoa_server
    home = make_origin(server)
    authelia = make_origin(server, name="authelia", wg_ip="10.8.0.5")
    family = api(server, "POST", "/access-policies", {
        "name": "family", "users": [{"username": name, "password": "a long family password"}
                                    for name in ("alice", "bob", "carol")],
        "allow": ["198.18.0.0/24"], "deny": ["198.18.0.66"], "bypass_paths": ["/api/"]},
        expected=201)
    sso = api(server, "POST", "/access-policies", {
        "name": "single sign-on for the whole office", "forward_auth": {
            "origin_id": authelia["id"], "port": 9091, "path": "/api/authz/auth-request",
            "signin_url": "https://auth.example.com/"}}, expected=201)
    for hostname, policy in (("nas.example.com", family), ("ha.example.com", family),
                             ("wiki.example.org", sso),
                             ("a-very-long-hostname-for-testing.staging.example.com", sso),
                             ("www.example.com", None)):
        api(server, "POST", "/routes", {"hostname": hostname, "origin_id": home["id"],
                                        "target_port": 8080,
                                        "access_policy_id": policy and policy["id"]},
            expected=201)
    SCREENS.mkdir(parents=True, exist_ok=True)
    ui = UiSession(browser, server, SCREENS, viewport)
    try:
        ui.open("routes")
        expect(ui.page.locator("#routes-body .lock-badge")).to_have_count(4)
        ui.shot("routes-protected")
        ui.go("policies")
        expect(ui.row("policies", "family")).to_contain_text("3 users")
        ui.shot("policies")
        ui.page.screenshot(path=str(SCREENS / f"policies-{ui.width}-screenful.png"))
        for name in ("routes", "policies"):
            ui.go(name)
            width = ui.page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], f"{name} scrolls sideways: {width}px"
            cards = ui.page.evaluate("""[...document.querySelectorAll('.card')]
                .filter(c => c.offsetParent && c.scrollWidth > c.clientWidth + 1).length""")
            assert cards == 0, f"a card on {name} scrolls sideways"
            tops = ui.page.evaluate(
                "new Set([...document.querySelectorAll('.nav a')].map(a => a.offsetTop)).size")
            # eight sections since issue 16 (Overview, Certs, Alerts): two lines on a phone
            assert tops <= (1 if viewport["width"] >= 1000 else 2), \
                f"the top bar's sections take {tops} lines"
        ui.row("policies", "family").get_by_role("button", name="Edit").click()
        expect(ui.page.locator("#policy-dialog")).to_be_visible()
        ui.page.screenshot(path=str(SCREENS / f"policy-edit-{ui.width}.png"))
        ui.assert_clean()
    finally:
        ui.close()


# ---------------------------------------------------------------- issue 16: login, lists, forms

LONG_NAME = "n" * 30 + "-" + "m" * 33            # 64 characters, one word: nothing to wrap at
LONG_HOST = "h" * 63 + ".a-rather-long-zone-name-for-the-layout.example.com"


def keep_shots():
    """Where the issue-16 screenshots are kept for people to see (as the policy ones are)."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    return SCREENS


def cookie_header(ui):
    """The browser's session cookie as a Cookie header, to try it from outside the browser."""
    [cookie] = [c for c in ui.context.cookies() if c["name"] == kokoa.SESSION_COOKIE]
    return {"Cookie": f"{cookie['name']}={cookie['value']}"}, cookie


def test_login_page_logout_and_an_ended_session_back_to_login(browser, kokoa_server, tmp_path):
    server = kokoa_server
    make_origin(server)
    SCREENS.mkdir(parents=True, exist_ok=True)
    for viewport in (DESKTOP, SMALL_PHONE):
        ui = UiSession(browser, server, keep_shots(), viewport, login=False)
        challenges = []
        ui.page.on("response", functools.partial(note_challenge, challenges))
        try:
            page = ui.page
            assert page.goto("/#origins").status == 200
            form = page.locator("#login-form")
            expect(form).to_be_visible()
            expect(page.locator("#main")).to_be_hidden()
            expect(page.get_by_role("navigation", name="Sections")).to_be_hidden()
            expect(form.get_by_label("Password")).to_be_focused()
            page.screenshot(path=str(SCREENS / f"ui-login-{ui.width}.png"))
            form.get_by_label("Password").fill("not the password")
            form.get_by_role("button", name="Log in").click()
            expect(form.get_by_role("alert")).to_contain_text("Wrong user name or password")
            expect(page.locator("#main")).to_be_hidden()
            page.screenshot(path=str(SCREENS / f"ui-login-wrong-{ui.width}.png"))
            form.get_by_label("Password").fill(server.admin_password)
            form.get_by_label("Password").press("Enter")
            expect(ui.row("origins", "home-nas")).to_have_count(1)
            expect(form).to_be_hidden()
            cookie, stored = cookie_header(ui)
            assert stored["httpOnly"] and stored["sameSite"] == "Strict" and stored["path"] == "/"
            assert status_with(server, "/api/v1/session", cookie) == 200
            assert page.evaluate("document.cookie") == ""          # HttpOnly: no script reads it
            logout = page.get_by_role("button", name="Log out")
            expect(logout).to_be_visible()
            ui.shot("ui-logged-in")
            logout.click()
            expect(form).to_be_visible()
            expect(page.locator("#banner")).to_contain_text("logged out")
            expect(ui.row("origins", "home-nas")).to_have_count(0)     # the data is forgotten
            assert status_with(server, "/api/v1/session", cookie) == 401   # ended on the server
            # log in again, then the session ends elsewhere: the page goes back to the login
            form.get_by_label("Password").fill(server.admin_password)
            form.get_by_role("button", name="Log in").click()
            expect(ui.row("origins", "home-nas")).to_have_count(1)
            cookie, _ = cookie_header(ui)
            status, _, _ = server.request("DELETE", "/api/v1/session", auth=None,
                                          headers={**cookie, "Origin": server.url})
            assert status == 204
            expect(form).to_be_visible(timeout=EDGE_POLL_TIMEOUT_MS)
            expect(form.get_by_role("alert")).to_contain_text("session has ended")
            page.screenshot(path=str(SCREENS / f"ui-session-ended-{ui.width}.png"))
            assert challenges == []        # never a Basic prompt in the browser
            ui.assert_clean()
        finally:
            ui.close()


def note_challenge(challenges, response):
    if response.headers.get("www-authenticate"):
        challenges.append(response.url)


def status_with(server, path, headers):
    return server.request("GET", path, auth=None, headers=headers)[0]


def test_without_a_password_the_ui_on_loopback_needs_no_login(browser, tmp_path):
    server = KokoaServer(tmp_path, {"KOKOA_ADMIN_PASSWORD": ""})
    server.start()
    try:
        ui = UiSession(browser, server, tmp_path, login=False)
        try:
            ui.open("origins")
            expect(ui.page.locator("#login-form")).to_be_hidden()
            expect(ui.page.get_by_role("button", name="Log out")).to_be_hidden()
            ui.assert_clean()
        finally:
            ui.close()
    finally:
        server.stop()


def row_texts(ui, table, label):
    return ui.page.locator(f'#{table}-body td[data-label="{label}"]').all_text_contents()


def test_every_list_searches_and_sorts_with_one_helper(ui):
    server, page = ui.server, ui.page
    ui.shots = keep_shots()
    nas = make_origin(server, name="home-nas", wg_ip="10.8.0.2")
    office = make_origin(server, name="office", wg_ip="10.8.0.10")
    make_origin(server, name="Attic", wg_ip="10.8.0.3")
    for number, host in enumerate(("wiki.example.org", "app.example.com", "zeta.example.net")):
        make_route(server, office if number == 1 else nas, hostname=host, port=8000 + number)
    ui.open("origins")
    assert row_texts(ui, "origins", "Name")[0].startswith("Attic")     # by name, any case
    search = page.get_by_label("Search origins")
    search.fill("10.8.0.1")
    expect(ui.page.locator("#origins-body tr")).to_have_count(1)
    expect(ui.row("origins", "office")).to_have_count(1)
    expect(ui.section("origins").locator(".list-tools")).to_contain_text("1 of 3")
    search.fill("no such thing")
    expect(page.locator("#origins-empty")).to_have_text("Nothing matches “no such thing”.")
    ui.shot("ui-search-nothing")
    search.fill("")
    expect(ui.page.locator("#origins-body tr")).to_have_count(3)
    # sort by WireGuard IP (numerically: .2 < .3 < .10), then the other way
    header = page.locator('#origins-table th[data-sort="wg_ip"]')
    header.get_by_role("button").click()
    expect(header).to_have_attribute("aria-sort", "ascending")
    assert [t.split()[0] for t in row_texts(ui, "origins", "WireGuard IP")] == [
        "10.8.0.2", "10.8.0.3", "10.8.0.10"]
    header.get_by_role("button").click()
    expect(header).to_have_attribute("aria-sort", "descending")
    assert row_texts(ui, "origins", "WireGuard IP")[0] == "10.8.0.10"
    ui.go("routes")
    page.locator('#routes-table th[data-sort="port"]').get_by_role("button").click()
    page.locator('#routes-table th[data-sort="port"]').get_by_role("button").click()
    assert row_texts(ui, "routes", "Port") == ["8002", "8001", "8000"]
    page.get_by_label("Search routes").fill("office")            # by origin name too
    expect(ui.page.locator("#routes-body tr")).to_have_count(1)
    expect(ui.row("routes", "app.example.com")).to_have_count(1)
    ui.shot("ui-routes-search")
    # a phone has no column heads: the same sort is a select there
    page.set_viewport_size(SMALL_PHONE)
    ui.width = SMALL_PHONE["width"]
    page.get_by_label("Search routes").fill("")
    page.get_by_label("Sort routes").select_option(label="Hostname ↓")
    expect(ui.page.locator("#routes-body tr").first).to_contain_text("zeta.example.net")
    ui.shot("ui-routes-sorted")
    ui.assert_clean()


def test_the_edges_page_shows_each_edge_state_and_what_it_measured(ui):
    server = ui.server
    make_route(server, make_origin(server, name="home-nas", wg_ip="10.8.0.2"),
               hostname="app.example.com", port=8080)
    _, token = server.register_edge("edge1", wg_ip="10.8.0.1")
    server.register_edge("edge2", wg_ip="10.8.0.5")                # never polls
    report_health(server, token, {}, {8080: False})
    ui.open("edges")
    edge1, edge2 = ui.row("edges", "edge1"), ui.row("edges", "edge2")
    expect(edge1.locator('td[data-label="Last seen"] .badge')).to_have_text("online")
    expect(edge1.locator('td[data-label="Agent"]')).to_contain_text(
        "cannot reach origin 10.8.0.2 port 8080")
    expect(edge2.locator('td[data-label="Last seen"]')).to_have_text("never")     # no badge
    report_health(server, token, {}, {8080: True})
    expect(edge1.locator('td[data-label="Agent"]')).to_contain_text("1 of 1 origins answer",
                                                                     timeout=EDGE_POLL_TIMEOUT_MS)
    ui.assert_clean()


def test_the_overview_certificates_and_alerts_lists_search_and_sort_too(ui):
    server, page = ui.server, ui.page
    origin = make_origin(server, name="home-nas", wg_ip="10.8.0.2")
    for number, host in enumerate(("wiki.example.org", "app.example.com", "zeta.example.net")):
        make_route(server, origin, hostname=host, port=8000 + number)
    for name in ("pager", "chat"):
        api(server, "POST", "/alert-targets", {"name": name, "url": f"https://{name}.example/h",
                                               "format": "json"}, expected=201)
    for page_name, table, column, label in (("overview", "sites", "hostname", "Site"),
                                            ("certificates", "certificates", "name", "Name"),
                                            ("alerts", "alerts", "name", "Name")):
        ui.open(page_name) if page_name == "overview" else ui.go(page_name)
        header = page.locator(f'#{table}-table th[data-sort="{column}"]')
        expect(header).to_have_attribute("aria-sort", "ascending")     # sorted by name first
        header.get_by_role("button").click()
        expect(header).to_have_attribute("aria-sort", "descending")
        first = row_texts(ui, table, label)[0]
        assert first.startswith("zeta" if table != "alerts" else "pager"), first
        page.locator(f"#{table}-search").fill("wiki" if table != "alerts" else "chat")
        expect(page.locator(f"#{table}-body tr")).to_have_count(1)
        page.locator(f"#{table}-search").fill("")
    ui.assert_clean()


def assert_fits(ui, name):
    """Nothing on the page is wider than the viewport, and every row's buttons stay inside it."""
    wide = ui.page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(e => e.offsetParent !== null || e.getClientRects().length)
        .filter(e => { for (let a = e; a; a = a.parentElement) {     // not clipped away
                         if (a.getBoundingClientRect().width <= 1
                             && getComputedStyle(a).overflow === "hidden") return false; }
                       return true; })
        .map(e => [e, e.getBoundingClientRect()])
        .filter(([e, r]) => r.width > 2 && (r.right > innerWidth + 0.5 || r.left < -0.5))
        .map(([e, r]) => `${e.tagName}.${e.className}#${e.id} ${Math.round(r.left)}-${
            Math.round(r.right)}`)""")
    assert wide == [], f"{name}: wider than {ui.width}px: {wide[:5]}"
    width = ui.page.evaluate("document.documentElement.scrollWidth")
    assert width <= ui.width, f"{name} scrolls sideways: {width}px"
    outside = ui.page.evaluate("""() => [...document.querySelectorAll('.row-actions .btn')]
        .filter(b => b.offsetParent !== null)
        .filter(b => { const r = b.getBoundingClientRect(), c = b.closest('.card')
                       .getBoundingClientRect(); return r.right > c.right || r.left < c.left; })
        .length""")
    assert outside == 0, f"{name}: a row's buttons are pushed out of the table"


@pytest.mark.parametrize("viewport", [DESKTOP, SMALL_PHONE], ids=["1280px", "375px"])
def test_long_names_wrap_and_nothing_is_wider_than_the_viewport(browser, kokoa_server,
                                                                viewport):
    server = kokoa_server
    origin = make_origin(server, name=LONG_NAME, wg_endpoint=f"{'e' * 60}.example.com:51820")
    make_route(server, origin, hostname=LONG_HOST)
    make_route(server, origin, hostname="bücher.example.org")
    api(server, "POST", "/access-policies", {"name": LONG_NAME, "allow": ["198.51.100.0/24"]},
        expected=201)
    _, token = server.register_edge(LONG_NAME, wg_ip="10.8.0.9")
    report_status(server, token, ok=False, error="nginx: " + "x" * 300)
    make_enrollment_key(server, description="d" * 200)
    SCREENS.mkdir(parents=True, exist_ok=True)
    ui = UiSession(browser, server, SCREENS, viewport)
    try:
        ui.open("origins")
        for name in ("origins", "routes", "policies", "edges"):
            if name != "origins":
                ui.go(name)
            expect(ui.section(name).locator("tbody tr").first).to_be_visible()
            full = ui.section(name).locator(f'[title="{LONG_NAME}"], [title="{LONG_HOST}"]')
            expect(full.first).to_be_visible()           # the whole name on hover
            assert_fits(ui, name)
            ui.shot(f"ui-long-names-{name}")
        ui.go("origins")
        ui.page.locator('[data-add="origin-form"]').click()
        assert_fits(ui, "origins with the form open")
        ui.assert_clean()
    finally:
        ui.close()


def test_every_field_error_is_shown_at_once(ui):
    server, page = ui.server, ui.page
    ui.shots = keep_shots()
    make_origin(server)
    ui.open("routes")
    form = ui.add_form("route-form")
    form.get_by_label("Hostname").fill("localhost")
    form.get_by_label("Origin", exact=True).select_option(label="home-nas (10.8.0.2)")
    form.get_by_label("Port on the origin").fill("70000")
    form.get_by_role("button", name="Add route").click()
    for field in ("hostname", "port"):
        expect(page.locator(f"#route-{field}-error")).to_be_visible()
    expect(page.locator("#route-port-error")).to_contain_text("65535")
    expect(form.get_by_label("Hostname")).to_be_focused()
    expect(form.get_by_label("Port on the origin")).to_have_attribute("aria-invalid", "true")
    expect(form.locator("[data-form-error]")).to_be_hidden()
    ui.shot("ui-route-errors-at-once")
    # the upload limit sits in the closed "Advanced" fold: its error opens it
    form.get_by_label("Port on the origin").fill("80")
    form.locator("summary").click()
    form.get_by_label("Largest upload (MiB)").fill("-3")
    form.locator("summary").click()
    form.get_by_role("button", name="Add route").click()
    expect(page.locator("#route-max-body-size-error")).to_be_visible()
    expect(page.locator("#route-hostname-error")).to_be_visible()
    expect(page.locator("#route-port-error")).to_be_hidden()
    ui.go("origins")
    origin_form = ui.add_form("origin-form")
    origin_form.get_by_label("Name").fill("second")
    origin_form.get_by_label("WireGuard IP").fill("not-an-ip")
    origin_form.get_by_label("Endpoint").fill("no-port-here")
    origin_form.get_by_role("button", name="Add origin").click()
    expect(page.locator("#origin-wg-ip-error")).to_be_visible()
    expect(page.locator("#origin-endpoint-error")).to_be_visible()
    ui.shot("ui-origin-errors-at-once")
    assert len(api(server, "GET", "/origins", expected=200)["origins"]) == 1
    assert api(server, "GET", "/routes", expected=200)["routes"] == []
    ui.assert_clean()


def test_a_hostname_typed_as_a_url_and_an_idn_shown_in_unicode(ui):
    server, page = ui.server, ui.page
    ui.shots = keep_shots()
    make_origin(server)
    ui.open("routes")
    form = ui.add_form("route-form")
    hostname = form.get_by_label("Hostname")
    form.get_by_label("Origin", exact=True).select_option(label="home-nas (10.8.0.2)")
    form.get_by_label("Port on the origin").fill("8080")
    hostname.fill("https://app.example.com:8443/")
    form.get_by_role("button", name="Add route").click()
    expect(page.locator("#route-hostname-error")).to_contain_text("port")
    hostname.fill("https://App.Example.com/")
    form.get_by_role("button", name="Add route").click()
    expect(ui.row("routes", "app.example.com")).to_have_count(1)
    hostname.fill("https://bücher.example.org/")
    form.get_by_label("Port on the origin").fill("8081")       # a success empties the form
    form.get_by_role("button", name="Add route").click()
    row = ui.row("routes", "bücher.example.org")
    expect(row).to_have_count(1)
    link = row.get_by_role("link", name="bücher.example.org")
    expect(link).to_have_attribute("href", "https://xn--bcher-kva.example.org/")
    expect(row.locator(".punycode")).to_have_text("xn--bcher-kva.example.org")
    assert sorted(r["hostname"] for r in api(server, "GET", "/routes", expected=200)[
        "routes"]) == ["app.example.com", "xn--bcher-kva.example.org"]
    ui.shot("ui-routes-idn")
    ui.assert_clean()


def test_switching_acme_staging_for_the_fleet_asks_first(ui):
    server, page = ui.server, ui.page
    ui.shots = keep_shots()
    ui.open("settings")
    box = page.get_by_label("Use the Let's Encrypt staging environment")
    box.check()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_contain_text("every edge")
    ui.shot("ui-staging-confirm")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(box).not_to_be_checked()
    assert api(server, "GET", "/settings", expected=200)["acme_staging"] is False
    box.check()
    page.keyboard.press("Escape")                  # Escape backs out too
    expect(box).not_to_be_checked()
    box.check()
    ui.confirm("Use staging")
    expect(page.locator("#settings-status")).to_contain_text("Saved")
    assert api(server, "GET", "/settings", expected=200)["acme_staging"] is True
    ui.assert_clean()


# ---------------------------------------------------------------- overview and alerts (issue 16)

def report_health(server, token, certificates, ports):
    """Act as an edge that measured: every route's certificate, origin 10.8.0.2's ports."""
    config_hash = api(server, "GET", "/edge-nodes/me/config", auth=token,
                      expected=200)["config_hash"]
    body = {"applied_hash": config_hash, "ok": True, "certificates": certificates,
            "interval_s": 30, "origins": {"10.8.0.2": {
                "handshake_age_s": 12, "reachable": True, "rtt_ms": 2.5,
                "ports": {str(port): up for port, up in ports.items()}}},
            "hosts": {"app.example.com": {"requests": 40, "status_4xx": 2, "status_5xx": 0,
                                          "upstream_errors": 0, "window_s": 30}}}
    api(server, "POST", "/edge-nodes/me/status", body, auth=token, expected=204)


@pytest.mark.parametrize("viewport", [DESKTOP, SMALL_PHONE], ids=["1280px", "375px"])
def test_the_overview_shows_each_state_and_leads_to_its_cause(browser, kokoa_server, viewport):
    from netlab import WebhookReceiver
    server = kokoa_server
    home = make_origin(server)
    make_route(server, home, hostname="app.example.com", port=8080)
    make_route(server, home, hostname="broken.example.com", port=9090)
    make_route(server, home, hostname="soon.example.com", port=8080)
    _, token = server.register_edge("edge1", wg_ip="10.8.0.1")
    soon = kokoa.iso_time(time.time() + 6 * 86400)
    report_health(server, token, {
        "app.example.com": {"status": "valid", "not_after": "2099-01-01T00:00:00Z"},
        "broken.example.com": {"status": "valid", "not_after": "2099-01-01T00:00:00Z"},
        "soon.example.com": {"status": "valid", "not_after": soon}}, {8080: True, 9090: False})
    SCREENS.mkdir(parents=True, exist_ok=True)
    receiver = WebhookReceiver()
    ui = UiSession(browser, server, SCREENS, viewport)
    try:
        ui.page.goto("/")                        # the Overview is the first page
        expect(ui.section("overview")).to_be_visible()
        expect(ui.page.locator("body")).to_have_attribute("data-loaded", "true")
        tiles = ui.page.locator("#overview-tiles")
        expect(tiles.locator('[data-tile="sites ok"] strong')).to_have_text("1")
        expect(tiles.locator('[data-tile="degraded"] strong')).to_have_text("1")
        expect(tiles.locator('[data-tile="down"] strong')).to_have_text("1")
        expect(tiles.locator('[data-tile="edges online"] strong')).to_have_text("1 of 1")
        expect(tiles.locator('[data-tile="certificates expiring or failed"] strong')
               ).to_have_text("1")
        expect(ui.page.locator("#count-down")).to_have_text("1")
        expect(ui.page.locator("#sites-body tr")).to_have_count(3)
        expect(ui.row("sites", "app.example.com")).to_contain_text("40 requests, 0 failed")
        ui.shot("overview")
        width = ui.page.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"], f"the overview scrolls sideways: {width}px"

        tiles.locator('[data-tile="down"]').click()         # the cause of "down"
        expect(ui.page.locator("#sites-body tr")).to_have_count(1)
        broken = ui.row("sites", "broken.example.com")
        expect(broken).to_contain_text("down")
        expect(broken).to_contain_text("cannot connect to origin home-nas on port 9090")
        tiles.locator('[data-tile="certificates expiring or failed"]').click()
        expect(ui.page.locator("#sites-body tr")).to_have_count(1)
        expect(ui.row("sites", "soon.example.com")).to_contain_text("expiring")
        ui.shot("overview-certificates")
        ui.page.get_by_role("button", name="Show all sites").click()
        expect(ui.page.locator("#sites-body tr")).to_have_count(3)
        tiles.locator('[data-tile="edges online"]').click()
        expect(ui.section("edges")).to_be_visible()

        # Alerts: add a target, test it, see the delivery; the URL is never shown again.
        ui.go("alerts")
        form = ui.page.locator("#alert-form")
        form.get_by_label("Name").fill("ops phone")
        form.get_by_label("Webhook URL").fill(receiver.url + "/hook/secret-path-1234")
        form.get_by_role("button", name="Add alert target").click()
        row = ui.row("alerts", "ops phone")
        expect(row).to_contain_text(receiver.url.removeprefix("http://").split("/")[0])
        expect(ui.section("alerts")).not_to_contain_text("secret-path-1234")
        row.get_by_role("button", name="Send a test alert").click()
        expect(ui.page.locator("#deliveries-body tr").first).to_contain_text(
            "delivered", timeout=EDGE_POLL_TIMEOUT_MS)
        assert receiver.received and receiver.received[0]["path"] == "/hook/secret-path-1234"
        ui.shot("alerts")
        width = ui.page.evaluate("document.documentElement.scrollWidth")
        assert width <= viewport["width"], f"the alerts page scrolls sideways: {width}px"
        ui.assert_clean()
    finally:
        ui.close()
        receiver.close()


def test_certificates_page_shows_state_expiry_issuer_and_the_last_error_in_words(ui):
    server, page = ui.server, ui.page
    origin = make_origin(server)
    for hostname in ("app.example.com", "wiki.example.org", "new.example.com"):
        make_route(server, origin, hostname=hostname)
    _, token = server.register_edge("edge1", wg_ip="10.8.0.1")
    agent = {"X-Kokoa-Agent": f"{kokoa.__version__}; schema=1,2,3"}
    me = "/api/v1/edge-nodes/me/certificates"
    fullchain, privkey = make_certificate(["app.example.com"])
    for path, body, expected in (
            (f"{me}/app.example.com/claim", {}, 200),
            (f"{me}/app.example.com", {"fullchain": fullchain, "privkey": privkey}, 204),
            (f"{me}/wiki.example.org/claim", {}, 200),
            (f"{me}/wiki.example.org/failure", {"error": (
                "Detail: 198.51.100.7: Fetching http://wiki.example.org/.well-known/"
                "acme-challenge/abc: Connection refused")}, 204)):
        method = "PUT" if expected == 204 and "failure" not in path else "POST"
        status, _, answer = server.request(method, path, body, auth=token, headers=agent)
        assert status == expected, (path, answer)
    ui.open("certificates")
    app = ui.row("certificates", "app.example.com")
    expect(app.locator(".badge")).to_have_text("valid")
    expect(app.locator('td[data-label="Issued by"]')).to_contain_text("edge1")
    expect(app.locator('td[data-label="Expires"]')).to_contain_text("days")
    wiki = ui.row("certificates", "wiki.example.org")
    expect(wiki.locator(".badge")).to_have_text("failing")
    expect(wiki).to_contain_text("Connection refused")
    expect(wiki).to_contain_text("is port 80 open on every edge")
    expect(wiki).to_contain_text("next attempt in")
    expect(ui.row("certificates", "new.example.com").locator(".badge")).to_have_text(
        "not issued yet")
    expect(page.locator("#count-certificates")).to_have_text("1")      # one failing
    assert privkey.splitlines()[1] not in page.content()
    ui.shot("certificates")
    ui.assert_clean()

