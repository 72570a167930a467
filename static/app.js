// Kokoa web UI: plain DOM + fetch, no framework, no build step.
// Server data is only ever inserted as text (textContent / Text nodes), never as HTML.
"use strict";

(function () {
  const API = "/api/v1";
  const EDGE_POLL_MS = 5000;     // edge status refresh
  const FULL_POLL_MS = 30000;    // everything else (changes made elsewhere)
  const PAGES = ["overview", "origins", "routes", "policies", "edges", "certificates", "alerts", "settings"];
  const TITLES = {overview: "Overview", origins: "Origins", routes: "Routes", policies: "Access policies", edges: "Edge nodes", certificates: "Certificates", alerts: "Alerts", settings: "Settings"};

  const state = {
    origins: null, routes: null, policies: null, edges: null, configHash: null, version: null, settings: null, enrollKeys: null,
    sites: null, siteFilter: null, alertTargets: null, deliveriesFor: null, deliveries: null, certificates: null,
    skewMs: 0, offline: false, signedIn: false,
  };

  // ------------------------------------------------------------------ DOM helpers

  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  /** Create an element; string children become Text nodes (never parsed as HTML). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  /** A table cell; its content sits in one <div> so narrow screens can lay it out as a card. */
  function cell(label, ...children) {
    return cellWith(label, null, ...children);
  }

  function cellWith(label, className, ...children) {
    return el("td", {"data-label": label, role: "cell", class: className}, el("div", {}, ...children));
  }

  /**
   * Update a tbody in place: rows are keyed by id and rebuilt only when their data changed,
   * so a refresh never blanks the table and keeps focus on unchanged rows.
   */
  function syncRows(tbody, items, build) {
    const existing = new Map($$(":scope > tr", tbody).map((tr) => [tr.dataset.key, tr]));
    const wanted = new Set();
    let prev = null;
    for (const item of items) {
      const key = String(item.id);
      const sig = JSON.stringify(item);
      let tr = existing.get(key);
      if (!tr || tr.dataset.sig !== sig) {
        const fresh = build(item);
        fresh.dataset.key = key;
        fresh.dataset.sig = sig;
        fresh.setAttribute("role", "row");
        if (tr) {
          const focused = tr.contains(document.activeElement) && document.activeElement.dataset.action;
          tr.replaceWith(fresh);
          if (focused) {
            const again = $(`[data-action="${focused}"]`, fresh);
            if (again) again.focus();
          }
        }
        tr = fresh;
      }
      wanted.add(key);
      const slot = prev ? prev.nextSibling : tbody.firstChild;
      if (slot !== tr) tbody.insertBefore(tr, slot);
      prev = tr;
    }
    for (const [key, tr] of existing) {
      if (!wanted.has(key)) tr.remove();
    }
  }

  /** Show a list's table or its empty text; `total` is the count before a search filtered it. */
  function showList(name, items, emptyText, total = items.length) {
    const table = $(`#${name}-table`);
    const empty = $(`#${name}-empty`);
    const view = views[name];
    table.hidden = items.length === 0;
    empty.hidden = items.length !== 0;
    empty.textContent = total && view ? `Nothing matches “${view.query}”.` : emptyText;
    if (!view) return;
    view.tools.hidden = total === 0;
    view.count.textContent = view.query ? `${items.length} of ${total}` : "";
  }

  // ------------------------------------------------------------------ search & sort (every list)

  /**
   * Search and sortable columns for one list, the same on every page. Call once per list:
   *   listView("origins", {label: "origins", render: renderOrigins,
   *     text: (o) => [o.name, o.wg_ip], sort: {name: (o) => o.name, routes: (o) => o.route_count}});
   * with <th data-sort="name"> in #origins-table's head; then, in the render function:
   *   const shown = viewOf("origins", items);            // searched and sorted
   *   syncRows(tbody, shown, rowBuilder); showList("origins", shown, "None yet.", items.length);
   */
  const views = {};
  function listView(name, {label, render, text, sort, initial, dir}) {
    const table = $(`#${name}-table`);
    const view = views[name] = {query: "", key: initial || Object.keys(sort)[0], dir: dir || 1, text, sort};
    const search = el("input", {type: "search", id: `${name}-search`, class: "search", placeholder: `Search ${label}`,
      autocomplete: "off", spellcheck: "false", "aria-label": `Search ${label}`, "aria-controls": `${name}-table`});
    search.addEventListener("input", () => { view.query = search.value.trim().toLowerCase(); render(); });
    const order = el("select", {class: "sort-select", "aria-label": `Sort ${label}`,
      onchange: () => { [view.key, view.dir] = [order.value.split(" ")[0], Number(order.value.split(" ")[1])]; render(); }});
    view.order = order;
    for (const th of $$("th[data-sort]", table)) {
      const key = th.dataset.sort;
      const title = th.textContent;
      order.append(el("option", {value: `${key} 1`, text: `${title} ↑`}), el("option", {value: `${key} -1`, text: `${title} ↓`}));
      th.replaceChildren(el("button", {type: "button", class: "sort", text: title, onclick: () => {
        view.dir = view.key === key ? -view.dir : 1;
        view.key = key;
        render();
      }}));
    }
    view.count = el("span", {class: "muted", "aria-live": "polite"});
    view.tools = el("div", {class: "list-tools", hidden: true}, search, order, view.count);
    $(`#${name}-empty`).before(view.tools);
  }

  function compareValues(a, b) {
    if (typeof a === "number" && typeof b === "number") return a - b;
    return String(a ?? "").localeCompare(String(b ?? ""), undefined, {sensitivity: "base", numeric: true});
  }

  /** The items a list shows: those its search matches, in its sort order. */
  function viewOf(name, items) {
    const view = views[name];
    const shown = view.query
      ? items.filter((item) => view.text(item).filter((t) => t !== null && t !== undefined).join("\n").toLowerCase().includes(view.query))
      : items.slice();
    const value = view.sort[view.key];
    shown.sort((a, b) => view.dir * compareValues(value(a), value(b)) || compareValues(a.id, b.id));
    for (const th of $$(`#${name}-table th[data-sort]`)) {
      th.setAttribute("aria-sort", th.dataset.sort !== view.key ? "none" : view.dir > 0 ? "ascending" : "descending");
    }
    view.order.value = `${view.key} ${view.dir}`;
    return shown;
  }

  // ------------------------------------------------------------------ formatting

  function sentence(text) {
    const s = String(text || "").trim();
    if (!s) return "";
    const first = s.charAt(0).toUpperCase() + s.slice(1);
    return /[.!?]$/.test(first) ? first : first + ".";
  }

  function shortKey(key) {
    return key && key.length > 16 ? `${key.slice(0, 8)}…${key.slice(-4)}` : key || "";
  }

  function shortHash(hash) {
    return hash ? hash.slice(0, 12) : "";
  }

  function utcText(iso) {
    const t = Date.parse(iso);
    if (!iso || Number.isNaN(t)) return "—";
    return new Date(t).toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function dateOnly(iso) {
    return iso ? String(iso).slice(0, 10) : "—";
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (!iso || Number.isNaN(t)) return "never";
    const s = Math.max(0, Math.round((Date.now() + state.skewMs - t) / 1000));
    if (s < 2) return "just now";
    if (s < 90) return `${s} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  }

  /** A <time> whose text says how long ago it was; tick() keeps it current. */
  function relTime(iso) {
    if (!iso) return el("span", {class: "muted", text: "never"});
    return el("time", {datetime: iso, title: utcText(iso), "data-rel": iso, text: ago(iso)});
  }

  /** How long until a moment in the future ("in 59 min"), or "expired". */
  function until(iso) {
    const t = Date.parse(iso);
    if (!iso || Number.isNaN(t)) return "—";
    const s = Math.round((t - Date.now() - state.skewMs) / 1000);
    if (s <= 0) return "expired";
    if (s < 90) return `in ${s} s`;
    if (s < 5400) return `in ${Math.round(s / 60)} min`;
    if (s < 172800) return `in ${Math.round(s / 3600)} h`;
    return `in ${Math.round(s / 86400)} days`;
  }

  function tick() {
    for (const node of $$("time[data-rel]")) {
      const text = ago(node.dataset.rel);
      if (node.textContent !== text) node.textContent = text;
    }
    let expired = false;
    for (const node of $$("time[data-until]")) {
      const text = until(node.dataset.until);
      if (text === "expired") expired = true;
      else if (node.textContent !== text) node.textContent = text;
    }
    if (expired) renderEnrollKeys();
  }

  /** host:port as code that may wrap before the port, not inside the host name. */
  function endpointCode(endpoint) {
    const at = endpoint.lastIndexOf(":");
    return at > 0 ? el("code", {}, endpoint.slice(0, at), el("wbr"), endpoint.slice(at))
      : el("code", {text: endpoint});
  }

  function badge(kind, text) {
    return el("span", {class: `badge ${kind}`, text});
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, code, message, field, fields) {
      super(message);
      this.status = status;
      this.code = code;
      this.field = field || null;
      this.fields = fields || (field ? [{field, message}] : []);
    }
  }

  async function api(method, path, body) {
    // The marker tells the control plane this is the UI: a 401 then carries no Basic
    // challenge, so the browser shows our login page instead of its own prompt.
    const options = {method, credentials: "same-origin", headers: {Accept: "application/json", "X-Requested-With": "kokoa"}};
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(API + path, options);
    } catch (err) {
      throw new ApiError(0, "network", "Could not reach the control plane. Check that it is running and try again.");
    }
    noteServerClock(resp);
    if (resp.status === 204) return null;
    let data = null;
    if ((resp.headers.get("Content-Type") || "").includes("json")) {
      try { data = await resp.json(); } catch (err) { data = null; }
    }
    if (!resp.ok) {
      const e = (data && data.error) || {};
      if (resp.status === 401 && path !== "/session") signedOut();
      throw new ApiError(resp.status, e.code || `http_${resp.status}`, e.message || resp.statusText, e.field, e.fields);
    }
    return data;
  }

  function noteServerClock(resp) {
    const server = Date.parse(resp.headers.get("Date") || "");
    if (Number.isNaN(server)) return;
    const skew = server - Date.now();
    state.skewMs = Math.abs(skew) > 3000 ? skew : 0;
  }

  // Added after the server's own message for an invalid field: an example to copy.
  const HINTS = {
    wg_ip: "For example 10.8.0.2: one address inside the WireGuard network.",
    wg_public_key: "Paste the 44-character key that ends in “=”.",
    wg_private_key: "Paste the 44-character key that ends in “=”.",
    wg_endpoint: "For example home.example.com:51820 or [2001:db8::1]:51820.",
    hostname: "For example app.example.com.",
    origin_id: "Choose one of your origins.",
    target_port: "For example 8080.",
    uses: "For example 1, or the number of edges you are about to install.",
    allow: "One network per line, e.g. 198.51.100.0/24, 2001:db8::/32 or a single address.",
    deny: "One network per line, e.g. 203.0.113.66 or 203.0.113.0/24.",
    bypass_paths: "One path per line, starting with /, e.g. /api/.",
    access_policy_id: "Choose Public or one of your access policies.",
  };

  const CONFLICT_HINTS = {
    name: "Names are compared ignoring upper and lower case.",
    wg_ip: "Each origin and each edge node needs its own WireGuard IP.",
    hostname: "A hostname can have only one route: edit the existing one instead.",
  };

  // API field names as a person reads them ("wg_ip must be ..." -> "WireGuard IP must be ...").
  const LABELS = {
    wg_public_key: "public key", wg_private_key: "private key", wg_endpoint: "endpoint",
    wg_ip: "WireGuard IP", origin_id: "origin", target_port: "port", acme_staging: "staging setting",
    expires_in: "expiry", access_policy_id: "access policy", bypass_paths: "paths without sign-in",
    forward_auth: "single sign-on", pass_authorization: "Authorization setting",
    allow: "allowed networks", deny: "denied networks",
  };

  function humanize(text) {
    return String(text || "")
      .replace(/\busers\[(\d+)\]\.(username|password_hash|password)\b/g,
        (_, i, part) => `the ${part.replace("_", " ")} of user ${Number(i) + 1}`)
      .replace(/\busers\[(\d+)\]/g, (_, i) => `user ${Number(i) + 1}`)
      .replace(/\bbypass_paths\[(\d+)\]/g, (_, i) => `path ${Number(i) + 1} without sign-in`)
      .replace(/\bforward_auth\.(origin_id|port|path|signin_url)\b/g, (_, part) =>
        `the single sign-on ${{origin_id: "origin", port: "port", path: "path", signin_url: "sign-in URL"}[part]}`)
      .replace(/\b(wg_public_key|wg_private_key|wg_endpoint|wg_ip|origin_id|target_port|acme_staging|expires_in|access_policy_id|bypass_paths|forward_auth|pass_authorization)\b/g,
        (name) => LABELS[name]);
  }

  /** Turn an API error into a sentence a person can act on. */
  function humanMessage(err) {
    if (!(err instanceof ApiError)) return "Something went wrong in this page. Reload it and try again.";
    if (err.status === 0) return err.message;
    if (err.status === 401) return "You are not signed in, or your password changed. Reload the page to sign in again.";
    if (err.status === 403) return `The control plane refused this request: ${sentence(err.message)}`;
    if (err.status === 404) return "It no longer exists: someone may have deleted it. The list has been refreshed.";
    if (err.status === 413) return "That is too much data for one request.";
    if (err.status === 429) return "Too many attempts. Wait a minute and try again.";
    if (err.status >= 500) return "The control plane hit an internal problem. Try again; if it keeps happening, check its log.";
    const base = sentence(humanize(err.message)) || `The request failed (HTTP ${err.status}).`;
    const hint = err.code === "invalid_field" ? HINTS[err.field]
      : err.code === "conflict" ? CONFLICT_HINTS[err.field] : "";
    return hint && !base.includes(hint) ? `${base} ${hint}` : base;
  }

  // ------------------------------------------------------------------ banner & status

  let bannerTimer = 0;
  function banner(text, kind, sticky) {
    const node = $("#banner");
    clearTimeout(bannerTimer);
    node.textContent = text || "";
    node.className = `banner ${kind || "info"}`;
    node.hidden = !text;
    if (text && !sticky) bannerTimer = setTimeout(() => { node.hidden = true; }, 6000);
  }

  function connectionOk() {
    if (state.offline) {
      state.offline = false;
      banner("Connected to the control plane again.", "ok");
    }
  }

  function connectionLost(err) {
    state.offline = true;
    banner(`${humanMessage(err)} Retrying every few seconds…`, "bad", true);
  }

  // ------------------------------------------------------------------ forms

  function fieldError(form, field) {
    return $(`[data-error-for="${field}"]`, form);
  }

  function clearErrors(form) {
    for (const node of $$("[data-error-for], [data-form-error]", form)) {
      node.hidden = true;
      node.textContent = "";
    }
    for (const input of $$("[aria-invalid]", form)) input.removeAttribute("aria-invalid");
  }

  function showFieldError(form, field, message) {
    const box = fieldError(form, field);
    const input = form.elements.namedItem(field);
    box.textContent = message;
    box.hidden = false;
    const fold = box.closest("details");
    if (fold) fold.open = true;
    if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
    return input;
  }

  function showFormError(form, message) {
    const box = $("[data-form-error]", form);
    box.textContent = message;
    box.hidden = false;
  }

  /** Show every error next to the field it names (error.fields), the rest at the top of the form. */
  function reportError(form, err) {
    const fields = err instanceof ApiError ? err.fields : [];
    let shown = 0;
    const elsewhere = [];
    for (const entry of fields) {
      const message = humanMessage(new ApiError(err.status, err.code, entry.message, entry.field));
      if (fieldError(form, entry.field)) {
        showFieldError(form, entry.field, message);
        shown += 1;
      } else {
        elsewhere.push(message);
      }
    }
    if (!shown || elsewhere.length) showFormError(form, shown ? elsewhere.join(" ") : humanMessage(err));
    const focus = fields.map((f) => fieldError(form, f.field) && form.elements.namedItem(f.field)).find((i) => i && i.focus);
    if (focus) focus.focus();
    if (err instanceof ApiError && err.status === 404) refreshAll();
  }

  /** Client-side checks: `checks` maps field -> message for fields that are wrong. */
  function reportLocal(form, checks) {
    const fields = Object.keys(checks);
    let first = null;
    for (const field of fields) {
      const input = showFieldError(form, field, checks[field]);
      first = first || input;
    }
    if (first) first.focus();
    return fields.length > 0;
  }

  async function runForm(form, action) {
    const buttons = $$("button[type=submit]", form);
    buttons.forEach((b) => { b.disabled = true; });
    form.setAttribute("aria-busy", "true");
    try {
      await action();
    } catch (err) {
      reportError(form, err);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
      form.removeAttribute("aria-busy");
    }
  }

  function value(form, name) {
    const input = form.elements.namedItem(name);
    return input ? String(input.value).trim() : "";
  }

  function portValue(text) {
    return /^\d{1,6}$/.test(text) ? Number(text) : text;
  }

  // ------------------------------------------------------------------ clipboard

  async function copyText(text, button) {
    let ok = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        ok = true;
      }
    } catch (err) {
      ok = false;
    }
    if (!ok) {
      const area = el("textarea", {class: "offscreen", readonly: true, "aria-hidden": "true"});
      area.value = text;
      document.body.append(area);
      area.select();
      try { ok = document.execCommand("copy"); } catch (err) { ok = false; }
      area.remove();
      button.focus();
    }
    const label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    button.textContent = ok ? "Copied" : "Copy failed";
    clearTimeout(Number(button.dataset.timer));
    button.dataset.timer = String(setTimeout(() => { button.textContent = label; }, 1500));
  }

  // ------------------------------------------------------------------ confirm dialog

  /** Ask before a destructive action; `action` runs on confirm, errors stay in the dialog. */
  function confirmAction({title, text, button, action, onCancel}) {
    const dialog = $("#confirm-dialog");
    let done = false;
    dialog.onclose = () => { if (!done && onCancel) onCancel(); };
    const form = $("#confirm-form");
    const ok = $("#confirm-ok");
    clearErrors(form);
    $("#confirm-title").textContent = title;
    $("#confirm-text").textContent = text;
    ok.textContent = button;
    ok.hidden = false;
    $("#confirm-cancel").textContent = "Cancel";
    form.onsubmit = (event) => {
      event.preventDefault();
      runForm(form, async () => {
        try {
          await action();
        } catch (err) {
          if (err instanceof ApiError && err.status === 409) {
            ok.hidden = true;
            $("#confirm-cancel").textContent = "Close";
            $("#confirm-cancel").focus();
          }
          throw err;
        }
        done = true;
        dialog.close();
      });
    };
    dialog.showModal();
    $("#confirm-cancel").focus();
  }

  // ------------------------------------------------------------------ origins

  function originRow(origin) {
    const keyCell = [];
    if (origin.wg_public_key) {
      keyCell.push(el("span", {class: "keyline"},
        el("code", {title: origin.wg_public_key, text: shortKey(origin.wg_public_key)}),
        el("button", {
          type: "button", class: "btn small", "data-action": "copy-key",
          "aria-label": `Copy the public key of ${origin.name}`, text: "Copy",
          onclick: (event) => copyText(origin.wg_public_key, event.currentTarget),
        }),
      ));
    }
    keyCell.push(el("span", {
      class: "sub", text: origin.has_private_key ? "key pair stored" : "public key only",
    }));

    const routes = origin.route_count === 1 ? "1 route" : `${origin.route_count} routes`;
    return el("tr", {},
      cell("Name", el("strong", {class: "name", title: origin.name, text: origin.name}),
        el("span", {class: "sub"}, "added ", el("time", {
          datetime: origin.created_at, title: utcText(origin.created_at), class: "nowrap",
          text: dateOnly(origin.created_at),
        })),
        el("a", {
          class: "download", "data-action": "download", download: "",
          href: `${API}/origins/${encodeURIComponent(origin.id)}/wireguard.conf`,
          "aria-label": `Download wireguard.conf for ${origin.name}`,
        }, el("span", {"aria-hidden": "true", text: "↓ "}), "wireguard.conf")),
      cell("WireGuard IP", el("code", {text: origin.wg_ip})),
      cell("Public key", keyCell),
      cell("Endpoint", origin.wg_endpoint
        ? endpointCode(origin.wg_endpoint)
        : el("span", {class: "muted", text: "none (dials out)"})),
      cellWith("Routes", "num", el("span", {title: routes, text: String(origin.route_count)})),
      el("td", {class: "row-actions", role: "cell"},
        el("button", {
          type: "button", class: "btn small", "data-action": "install",
          "aria-label": `Install origin ${origin.name}`, text: "Install",
          onclick: () => installOrigin(origin),
        }),
        el("button", {
          type: "button", class: "btn small", "data-action": "edit",
          "aria-label": `Edit origin ${origin.name}`, text: "Edit",
          onclick: () => editOrigin(origin),
        }),
        el("button", {
          type: "button", class: "btn small danger", "data-action": "delete",
          "aria-label": `Delete origin ${origin.name}`, text: "Delete",
          onclick: () => deleteOrigin(origin),
        }),
      ),
    );
  }

  function renderOrigins() {
    const origins = (state.origins || []).slice().sort((a, b) =>
      a.name.localeCompare(b.name, undefined, {sensitivity: "base"}));
    const shown = viewOf("origins", origins);
    syncRows($("#origins-body"), shown, originRow);
    showList("origins", shown, "No origins yet. Add the first one with “Add an origin”.", origins.length);
    openFormWhenEmpty("origin-form", origins);
    $("#count-origins").textContent = String(origins.length);
    fillOriginSelect($("#route-origin"), origins);
    fillOriginSelect($("#edit-origin"), origins);
    for (const select of $$("select[name=forward_origin]")) fillOriginSelect(select, origins);
  }

  function fillOriginSelect(select, origins) {
    const current = select.value;
    const options = [];
    if (select.id === "route-origin") {
      options.push(el("option", {value: ""},
        origins.length ? "Choose an origin…" : "No origins yet: add one first"));
    } else if (select.dataset.none) {
      options.push(el("option", {value: ""}, select.dataset.none));
    }
    for (const origin of origins) {
      options.push(el("option", {value: origin.id}, `${origin.name} (${origin.wg_ip})`));
    }
    const sig = JSON.stringify(options.map((o) => [o.value, o.textContent]));
    if (select.dataset.sig === sig) return;
    select.dataset.sig = sig;
    select.replaceChildren(...options);
    if (origins.some((o) => o.id === current)) select.value = current;
  }

  async function loadOrigins() {
    const data = await api("GET", "/origins");
    state.origins = data.origins || [];
    renderOrigins();
  }

  function setupOriginForm() {
    const form = $("#origin-form");
    const own = $("#origin-own-keys");
    const keyHint = $("#origin-keys-hint");
    const syncMode = () => {
      const mine = form.elements.namedItem("key_mode").value === "own";
      own.hidden = !mine;
      keyHint.hidden = mine;
    };
    for (const radio of $$("input[name=key_mode]", form)) radio.addEventListener("change", syncMode);
    syncMode();

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const body = {name: value(form, "name")};
      const wgIp = value(form, "wg_ip");
      if (wgIp) body.wg_ip = wgIp;      // empty: the control plane assigns the next free one
      const endpoint = value(form, "wg_endpoint");
      if (endpoint) body.wg_endpoint = endpoint;
      const checks = {};
      if (!body.name) checks.name = "Enter a name for this origin.";
      if (form.elements.namedItem("key_mode").value === "own") {
        const pub = value(form, "wg_public_key");
        const priv = value(form, "wg_private_key");
        if (pub) body.wg_public_key = pub;
        if (priv) body.wg_private_key = priv;
        if (!pub && !priv) {
          checks.wg_public_key = "Paste the origin's public key, or choose “Generate a key pair for me”.";
        }
      }
      if (reportLocal(form, checks)) return;
      runForm(form, async () => {
        const created = await api("POST", "/origins", body);
        form.reset();
        syncMode();
        banner(`Origin “${created.name}” added.`, "ok");
        await loadOrigins();
        form.elements.namedItem("name").focus();
      });
    });
  }

  let editingOrigin = null;

  function editOrigin(origin) {
    const form = $("#origin-edit-form");
    editingOrigin = origin;
    clearErrors(form);
    $("#origin-dialog-title").textContent = `Edit origin ${origin.name}`;
    form.elements.namedItem("name").value = origin.name;
    form.elements.namedItem("wg_ip").value = origin.wg_ip;
    form.elements.namedItem("wg_endpoint").value = origin.wg_endpoint || "";
    $("#origin-dialog").showModal();
    form.elements.namedItem("name").focus();
  }

  function setupOriginEdit() {
    const dialog = $("#origin-dialog");
    const form = $("#origin-edit-form");
    $("[data-close]", form).addEventListener("click", () => dialog.close());
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const origin = editingOrigin;
      const changes = {};
      for (const field of ["name", "wg_ip", "wg_endpoint"]) {
        const now = value(form, field);
        if (now !== (origin[field] || "")) changes[field] = field === "wg_endpoint" && !now ? null : now;
      }
      const checks = {};
      if (!value(form, "name")) checks.name = "Enter a name for this origin.";
      if (!value(form, "wg_ip")) checks.wg_ip = "Enter the origin's WireGuard IP, e.g. 10.8.0.2.";
      if (reportLocal(form, checks)) return;
      if (Object.keys(changes).length === 0) {
        dialog.close();
        return;
      }
      runForm(form, async () => {
        const updated = await api("PATCH", `/origins/${encodeURIComponent(origin.id)}`, changes);
        dialog.close();
        banner(`Origin “${updated.name}” saved.`, "ok");
        await Promise.all([loadOrigins(), loadRoutes()]);
      });
    });
  }

  function deleteOrigin(origin) {
    const inUse = origin.route_count > 0;
    confirmAction({
      title: `Delete origin “${origin.name}”?`,
      text: inUse
        ? `It is used by ${origin.route_count === 1 ? "1 route" : origin.route_count + " routes"}: the control plane will refuse until those routes are deleted or moved to another origin.`
        : "Edges stop peering with it on their next pull. Its keys are deleted.",
      button: "Delete origin",
      action: async () => {
        try {
          await api("DELETE", `/origins/${encodeURIComponent(origin.id)}`);
        } catch (err) {
          if (err instanceof ApiError && err.status === 409 && inUse) {
            throw new ApiError(409, "conflict",
              `“${origin.name}” is still used by routes, so it was not deleted. Delete those routes or move them to another origin first.`);
          }
          throw err;
        }
        banner(`Origin “${origin.name}” deleted.`, "ok");
        await refreshAll();
      },
    });
  }

  // ------------------------------------------------------------------ routes

  const CERT_BADGE = {valid: "ok", pending: "warn", failed: "bad"};

  function certificatesFor(hostname) {
    const edges = state.edges || [];
    if (edges.length === 0) return el("span", {class: "muted", text: "no edges yet"});
    const items = [];
    for (const edge of edges.slice().sort((a, b) => a.name.localeCompare(b.name))) {
      const cert = (edge.certificates || {})[hostname];
      if (!cert) continue;
      const status = String(cert.status || "unknown");
      const item = el("li", {}, badge(CERT_BADGE[status] || "muted", status),
        el("span", {class: "cert-edge", text: ` ${edge.name}`}));
      if (status === "valid" && cert.not_after) {
        item.append(" ", el("span", {class: "cert-edge nowrap muted", text: `until ${dateOnly(cert.not_after)}`}));
      }
      if (cert.error) item.append(el("span", {class: "sub error-text", text: cert.error}));
      items.push(item);
    }
    if (items.length === 0) return el("span", {class: "muted", text: "not reported yet"});
    return el("ul", {class: "certs"}, items);
  }

  function routeRow(route) {
    return el("tr", {},
      cell("Hostname", el("a", {
        href: `https://${route.hostname}/`, target: "_blank", rel: "noopener noreferrer",
        class: "host", title: route.hostname, text: route.hostname_unicode || route.hostname,
      }), route.hostname_unicode ? el("span", {class: "sub punycode", text: route.hostname}) : null, routeLock(route)),
      cell("Origin", el("span", {class: "name-text", title: route.origin_name, text: route.origin_name}), routeBadges(route)),
      cellWith("Port", "num", String(route.target_port)),
      cell("Certificates", certificatesFor(route.hostname)),
      el("td", {class: "row-actions", role: "cell"},
        el("button", {
          type: "button", class: "btn small", "data-action": "edit",
          "aria-label": `Edit route ${route.hostname}`, text: "Edit",
          onclick: () => editRoute(route),
        }),
        el("button", {
          type: "button", class: "btn small danger", "data-action": "delete",
          "aria-label": `Delete route ${route.hostname}`, text: "Delete",
          onclick: () => deleteRoute(route),
        }),
      ),
    );
  }

  /** A lock with the policy's name on a protected route. */
  function routeLock(route) {
    if (!route.access_policy_id) return null;
    return el("span", {class: "lock", title: `Protected by the access policy “${route.access_policy_name}”`},
      el("span", {class: "sr-only", text: "Protected by "}),
      el("span", {class: "badge lock-badge", text: route.access_policy_name}));
  }

  /** What differs from the defaults, in words, beside the origin's name. */
  function routeBadges(route) {
    const notes = [];
    if (route.enabled === false) notes.push("not served");
    if (route.buffering === false) notes.push("streamed");
    if (route.max_body_size) notes.push(`uploads ≤ ${route.max_body_size} MiB`);
    if (route.hsts === false) notes.push("no HSTS");
    return notes.map((note) => el("span", {class: "badge muted", text: note}));
  }

  function renderRoutes() {
    if (state.routes === null) return;
    const routes = state.routes.slice().sort((a, b) => a.hostname.localeCompare(b.hostname));
    // Certificates come from the edge list: include them in the row signature.
    const rows = viewOf("routes", routes.map((route) => ({...route, _certs: certSignature(route.hostname)})));
    syncRows($("#routes-body"), rows, routeRow);
    showList("routes", rows, "No routes yet. Add an origin first, then a route with “Add a route”.", routes.length);
    openFormWhenEmpty("route-form", routes);
    $("#count-routes").textContent = String(routes.length);
  }

  function certSignature(hostname) {
    return (state.edges || []).map((e) => [e.name, (e.certificates || {})[hostname] || null]);
  }

  async function loadRoutes() {
    const data = await api("GET", "/routes");
    state.routes = data.routes || [];
    renderRoutes();
  }

  // ------------------------------------------------------------------ route options

  const ROUTE_OPTIONS = {max_body_size: 0, buffering: true, hsts: true, enabled: true};

  /** The "Advanced" fold of a route form: upload limit, buffering, HSTS, serving. */
  function advancedFold(prefix) {
    const toggle = (name, label, hint) => el("div", {class: "field toggle"},
      el("input", {type: "checkbox", id: `${prefix}-${name}`, name, "aria-describedby": `${prefix}-${name}-hint`}),
      el("label", {for: `${prefix}-${name}`, text: label}),
      el("p", {class: "hint", id: `${prefix}-${name}-hint`, text: hint}),
      el("p", {class: "error", id: `${prefix}-${name}-error`, "data-error-for": name, hidden: true}));
    return el("details", {class: "advanced"},
      el("summary", {text: "Advanced"}),
      el("div", {class: "field"},
        el("label", {for: `${prefix}-max-body-size`, text: "Largest upload (MiB)"}),
        el("input", {id: `${prefix}-max-body-size`, name: "max_body_size", inputmode: "numeric", autocomplete: "off",
          class: "short", "aria-describedby": `${prefix}-max-body-size-hint ${prefix}-max-body-size-error`}),
        el("p", {class: "hint", id: `${prefix}-max-body-size-hint`, text: "0 or empty: no limit. Uploads stream to the origin, never onto the edge's disk."}),
        el("p", {class: "error", id: `${prefix}-max-body-size-error`, "data-error-for": "max_body_size", hidden: true})),
      toggle("buffering", "Buffer responses", "Turn off for server-sent events and long polls, which must reach the browser as they are sent."),
      toggle("hsts", "HSTS", "Browsers then use only HTTPS for this name for a year; sent once the edge has its real certificate."),
      toggle("enabled", "Serve this route", "Off: the route is kept here but no edge serves it."));
  }

  function fillRouteOptions(form, route) {
    form.elements.namedItem("max_body_size").value = String(route.max_body_size || "");
    for (const name of ["buffering", "hsts", "enabled"]) form.elements.namedItem(name).checked = route[name] !== false;
  }

  /** The options as the form has them (max_body_size as typed when it is not a number). */
  function routeOptions(form) {
    const size = value(form, "max_body_size");
    const options = {max_body_size: size === "" ? 0 : portValue(size)};
    for (const name of ["buffering", "hsts", "enabled"]) options[name] = form.elements.namedItem(name).checked;
    return options;
  }

  function setupRouteForm() {
    const form = $("#route-form");
    form.querySelector(".actions").before(advancedFold("route"));
    fillRouteOptions(form, ROUTE_OPTIONS);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const body = {
        hostname: value(form, "hostname"),
        origin_id: value(form, "origin_id"),
        target_port: portValue(value(form, "target_port")),
        access_policy_id: value(form, "access_policy_id") || null,
        ...routeOptions(form),
      };
      const checks = {};
      if (!body.hostname) checks.hostname = "Enter the public hostname, e.g. app.example.com.";
      if (!body.origin_id) {
        checks.origin_id = (state.origins || []).length
          ? "Choose the origin that serves this hostname."
          : "There is no origin yet: add one on the Origins page first.";
      }
      if (body.target_port === "") checks.target_port = "Enter the port the service listens on, e.g. 8080.";
      if (reportLocal(form, checks)) return;
      runForm(form, async () => {
        const created = await api("POST", "/routes", body);
        form.elements.namedItem("hostname").value = "";
        form.elements.namedItem("target_port").value = "";
        fillRouteOptions(form, ROUTE_OPTIONS);
        banner(`Route ${created.hostname} added. Edges pick it up on their next pull.`, "ok");
        await Promise.all([loadRoutes(), loadOrigins(), loadPolicies()]);
        form.elements.namedItem("hostname").focus();
      });
    });
  }

  let editing = null;

  function editRoute(route) {
    const dialog = $("#route-dialog");
    const form = $("#route-edit-form");
    editing = route;
    clearErrors(form);
    $("#route-dialog-title").textContent = `Edit route ${route.hostname}`;
    form.elements.namedItem("hostname").value = route.hostname;
    fillOriginSelect($("#edit-origin"), state.origins || []);
    form.elements.namedItem("origin_id").value = route.origin_id;
    form.elements.namedItem("target_port").value = String(route.target_port);
    fillPolicySelect($("#edit-policy"), state.policies || []);
    form.elements.namedItem("access_policy_id").value = route.access_policy_id || "";
    fillRouteOptions(form, route);
    form.querySelector("details.advanced").open = Object.keys(ROUTE_OPTIONS).some((k) => route[k] !== ROUTE_OPTIONS[k]);
    dialog.showModal();
    form.elements.namedItem("target_port").focus();
  }

  function setupRouteEdit() {
    const dialog = $("#route-dialog");
    const form = $("#route-edit-form");
    form.querySelector(".actions").before(advancedFold("edit"));
    $("[data-close]", form).addEventListener("click", () => dialog.close());
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const route = editing;
      const changes = {};
      const hostname = value(form, "hostname");
      const originId = value(form, "origin_id");
      const port = portValue(value(form, "target_port"));
      if (hostname !== route.hostname) changes.hostname = hostname;
      if (originId !== route.origin_id) changes.origin_id = originId;
      if (port !== route.target_port) changes.target_port = port;
      const policyId = value(form, "access_policy_id") || null;
      if (policyId !== (route.access_policy_id || null)) changes.access_policy_id = policyId;
      for (const [name, option] of Object.entries(routeOptions(form))) {
        if (option !== route[name]) changes[name] = option;
      }
      const checks = {};
      if (!hostname) checks.hostname = "Enter the public hostname, e.g. app.example.com.";
      if (port === "") checks.target_port = "Enter the port the service listens on, e.g. 8080.";
      if (reportLocal(form, checks)) return;
      if (Object.keys(changes).length === 0) {
        dialog.close();
        return;
      }
      runForm(form, async () => {
        const updated = await api("PATCH", `/routes/${encodeURIComponent(route.id)}`, changes);
        dialog.close();
        banner(`Route ${updated.hostname} saved.`, "ok");
        await Promise.all([loadRoutes(), loadOrigins(), loadPolicies()]);
      });
    });
  }

  function deleteRoute(route) {
    confirmAction({
      title: `Delete route ${route.hostname}?`,
      text: `Edges stop serving ${route.hostname} on their next pull. Its certificates stay on the edges until they expire.`,
      button: "Delete route",
      action: async () => {
        await api("DELETE", `/routes/${encodeURIComponent(route.id)}`);
        banner(`Route ${route.hostname} deleted.`, "ok");
        await Promise.all([loadRoutes(), loadOrigins(), loadPolicies()]);
      },
    });
  }

  // ------------------------------------------------------------------ access policies

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  function fillPolicySelect(select, policies) {
    const current = select.value;
    const options = [el("option", {value: ""}, "Public: no access policy")];
    const sorted = policies.slice().sort((a, b) => a.name.localeCompare(b.name, undefined, {sensitivity: "base"}));
    for (const policy of sorted) options.push(el("option", {value: policy.id}, `Protected: ${policy.name}`));
    const sig = JSON.stringify(options.map((o) => [o.value, o.textContent]));
    if (select.dataset.sig === sig) return;
    select.dataset.sig = sig;
    select.replaceChildren(...options);
    if (policies.some((p) => p.id === current)) select.value = current;
  }

  function originName(id) {
    const origin = (state.origins || []).find((o) => o.id === id);
    return origin ? origin.name : "an origin";
  }

  /** The protections of a policy, as badges. */
  function policySummary(policy) {
    const parts = [];
    if (policy.users.length) {
      parts.push(el("span", {class: "badge ok", title: policy.users.join(", "),
        text: plural(policy.users.length, "user", "users")}));
    }
    if (policy.allow.length) {
      parts.push(el("span", {class: "badge ok", title: policy.allow.join("\n"),
        text: plural(policy.allow.length, "allowed network", "allowed networks")}));
    }
    if (policy.forward_auth) {
      parts.push(el("span", {class: "badge ok", title: policy.forward_auth.path,
        text: `single sign-on: ${originName(policy.forward_auth.origin_id)}:${policy.forward_auth.port}`}));
    }
    if (policy.deny.length) {
      parts.push(el("span", {class: "badge bad", title: policy.deny.join("\n"),
        text: plural(policy.deny.length, "denied network", "denied networks")}));
    }
    const methods = [policy.users.length, policy.allow.length, policy.forward_auth].filter(Boolean).length;
    if (methods > 1) parts.push(badge("muted", policy.require === "all" ? "all must pass" : "any one lets in"));
    if (policy.bypass_paths.length) {
      parts.push(el("span", {class: "badge warn", title: policy.bypass_paths.join("\n"),
        text: plural(policy.bypass_paths.length, "path without sign-in", "paths without sign-in")}));
    }
    if (policy.pass_authorization) parts.push(badge("warn", "passes Authorization"));
    const names = policy.users.length
      ? el("span", {class: "sub", text: `Users: ${policy.users.join(", ")}`}) : null;
    return [el("span", {class: "badges policy-badges"}, parts), names];
  }

  function policyRow(policy) {
    const routes = policy.routes.length
      ? el("ul", {class: "hosts"}, policy.routes.map((host) => el("li", {text: host})))
      : el("span", {class: "muted", text: "no route uses it yet"});
    return el("tr", {},
      cell("Name", el("strong", {class: "name", title: policy.name, text: policy.name}),
        el("span", {class: "sub"}, "changed ", relTime(policy.updated_at))),
      cell("Protection", policySummary(policy)),
      cell("Routes", routes),
      el("td", {class: "row-actions", role: "cell"},
        el("button", {
          type: "button", class: "btn small", "data-action": "edit",
          "aria-label": `Edit access policy ${policy.name}`, text: "Edit",
          onclick: () => editPolicy(policy),
        }),
        el("button", {
          type: "button", class: "btn small danger", "data-action": "delete",
          "aria-label": `Delete access policy ${policy.name}`, text: "Delete",
          onclick: () => deletePolicy(policy),
        }),
      ),
    );
  }

  function renderPolicies() {
    if (state.policies === null) return;
    const policies = state.policies.slice().sort((a, b) =>
      a.name.localeCompare(b.name, undefined, {sensitivity: "base"}));
    // The summary names origins: include them in the row signature.
    const rows = viewOf("policies", policies.map((p) => ({...p, _origin: p.forward_auth ? originName(p.forward_auth.origin_id) : null})));
    syncRows($("#policies-body"), rows, policyRow);
    showList("policies", rows, "No access policies yet: every route is public. Add one with “Add a policy”, then choose it for a route.", policies.length);
    $("#count-policies").textContent = String(policies.length);
    fillPolicySelect($("#route-policy"), policies);
    fillPolicySelect($("#edit-policy"), policies);
  }

  async function loadPolicies() {
    const data = await api("GET", "/access-policies");
    state.policies = data.access_policies || [];
    renderPolicies();
  }

  /** One user of the users editor: name, password (empty keeps a stored one), remove. */
  function userRow(list, username) {
    const row = el("div", {class: "user-row", "data-existing": username || null});
    const name = el("input", {class: "user-name", "aria-label": "User name", placeholder: "user name", autocomplete: "off",
      spellcheck: "false", autocapitalize: "none", maxlength: 64});
    name.value = username || "";
    const password = el("input", {type: "password", class: "user-password", autocomplete: "new-password",
      "aria-label": username ? `New password for ${username}` : "Password",
      placeholder: username ? "password unchanged" : "password"});
    row.append(name, password, el("button", {
      type: "button", class: "btn small danger", text: "Remove",
      "aria-label": username ? `Remove user ${username}` : "Remove this user",
      onclick: () => {
        row.remove();
        if (!$(".user-row", list)) list.append(userRow(list));
      },
    }));
    return row;
  }

  function fillUsers(form, usernames) {
    const list = $(".user-rows", form);
    list.replaceChildren(...(usernames.length ? usernames : [null]).map((u) => userRow(list, u)));
  }

  /** The fields of a policy form (add and edit alike), built once per form. */
  function policyFields(prefix) {
    const id = (name) => `${prefix}-${name}`;
    const hint = (name, ...text) => el("p", {class: "hint", id: `${id(name)}-hint`}, ...text);
    const error = (name, field) => el("p", {class: "error", id: `${id(name)}-error`, "data-error-for": field, hidden: true});
    const described = (name) => `${id(name)}-hint ${id(name)}-error`;
    const input = (name, field, label, attrs, ...hintText) => el("div", {class: "field"},
      el("label", {for: id(name)}, ...label),
      el("input", {id: id(name), name: field, autocomplete: "off", spellcheck: "false", "aria-describedby": described(name), ...attrs}),
      hint(name, ...hintText), error(name, field));
    const lines = (field, label, placeholder, ...hintText) => el("div", {class: "field"},
      el("label", {for: id(field)}, label, " ", el("span", {class: "optional", text: "(one per line)"})),
      el("textarea", {id: id(field), name: field, rows: 3, class: "mono", spellcheck: "false", autocomplete: "off",
        autocapitalize: "none", placeholder, "aria-describedby": described(field)}),
      hint(field, ...hintText), error(field, field));
    const list = el("div", {class: "user-rows"});
    const forward = el("div", {class: "subfields", hidden: true},
      input("forward-port", "forward_port", ["Verifier port"], {inputmode: "numeric", class: "short"},
        "Where it listens on the origin's WireGuard IP, e.g. ", el("code", {text: "9091"}), " (Authelia) or ",
        el("code", {text: "4180"}), " (oauth2-proxy)."),
      input("forward-path", "forward_path", ["Verifier path"], {class: "mono", placeholder: "/api/authz/auth-request"},
        "Asked about each request; 2xx lets it in, 401 or 403 refuses. E.g. ", el("code", {text: "/oauth2/auth"}), "."),
      input("forward-signin", "forward_signin_url", ["Sign-in URL ", el("span", {class: "optional", text: "(optional)"})],
        {inputmode: "url", autocapitalize: "none", placeholder: "https://auth.example.com/"},
        "Where a 401 sends the browser, with the page it wanted in ", el("code", {text: "rd"}), ". Empty: the 401 is shown."));
    const origin = el("select", {id: id("forward-origin"), name: "forward_origin", "data-none": "None",
      "aria-describedby": described("forward-origin"),
      onchange: () => { forward.hidden = !origin.value; }});
    return [
      input("name", "name", ["Name"], {maxlength: 64}, "A short name, e.g. ", el("code", {text: "family"}), " or ",
        el("code", {text: "office network"}), "."),
      el("fieldset", {class: "field users"},
        el("legend", {text: "Users"}),
        el("p", {class: "hint intro", text: "People who sign in with a name and password. Passwords are stored only as hashes; leave one empty to keep it."}),
        list,
        el("button", {type: "button", class: "btn small", text: "Add user", onclick: () => {
          list.append(userRow(list));
          $(".user-row:last-child .user-name", list).focus();
        }}),
        error("users", "users")),
      lines("allow", "Allowed networks", "198.51.100.0/24",
        "Clients from these addresses get in without a password. CIDRs or single addresses, IPv4 or IPv6."),
      lines("deny", "Denied networks", "203.0.113.66",
        "Always refused with 403, even with the right password or sign-on."),
      el("fieldset", {class: "field"},
        el("legend", {text: "Single sign-on (forward auth)"}),
        el("div", {class: "field"},
          el("label", {for: id("forward-origin"), text: "Verifier origin"}),
          origin,
          hint("forward-origin", "The origin that runs Authelia, an Authentik outpost or oauth2-proxy; the edge asks it about every request."),
          error("forward-origin", "forward_auth")),
        forward),
      el("div", {class: "field"},
        el("label", {for: id("require"), text: "When there is more than one way in"}),
        el("select", {id: id("require"), name: "require", "aria-describedby": described("require")},
          el("option", {value: "any", text: "Any one of them lets a request in"}),
          el("option", {value: "all", text: "All of them must pass"})),
        hint("require", "Users, allowed networks and single sign-on: whether one suffices or each is needed."),
        error("require", "require")),
      lines("bypass_paths", "Paths without sign-in", "/api/",
        "Path prefixes served to anyone not denied, e.g. ", el("code", {text: "/api/"}), " for an app's own mobile clients. End each with / (", el("code", {text: "/api"}), " would open /apikeys too). Leave empty to protect every path."),
      el("div", {class: "field toggle"},
        el("input", {type: "checkbox", id: id("pass-authorization"), name: "pass_authorization",
          "aria-describedby": described("pass-authorization")}),
        el("label", {for: id("pass-authorization"), text: "Pass the Authorization header on to the origin"}),
        hint("pass-authorization", "Off: the edge strips the users' passwords before a request reaches the origin. Turn on only for an app that checks the same Basic credentials itself."),
        error("pass-authorization", "pass_authorization")),
    ];
  }

  function fillPolicyForm(form, policy) {
    form.elements.namedItem("name").value = policy.name || "";
    fillUsers(form, policy.users || []);
    for (const field of ["allow", "deny", "bypass_paths"]) form.elements.namedItem(field).value = (policy[field] || []).join("\n");
    form.elements.namedItem("require").value = policy.require || "any";
    const forward = policy.forward_auth;
    const origin = form.elements.namedItem("forward_origin");
    fillOriginSelect(origin, state.origins || []);
    origin.value = forward ? forward.origin_id : "";
    form.elements.namedItem("forward_port").value = forward ? String(forward.port) : "";
    form.elements.namedItem("forward_path").value = forward ? forward.path : "";
    form.elements.namedItem("forward_signin_url").value = forward ? forward.signin_url || "" : "";
    $(".subfields", form).hidden = !forward;
    form.elements.namedItem("pass_authorization").checked = Boolean(policy.pass_authorization);
  }

  /** The policy as the form has it, and the local checks that failed. */
  function policyBody(form) {
    const lines = (field) => form.elements.namedItem(field).value.split("\n").map((l) => l.trim()).filter(Boolean);
    const checks = {};
    const users = [];
    for (const row of $$(".user-row", form)) {
      const username = $(".user-name", row).value.trim();
      const password = $(".user-password", row).value;
      if (!username && !password) continue;
      if (!username) checks.users = "Enter a user name for each password, or remove the row.";
      else if (password) users.push({username, password});
      else if (row.dataset.existing === username) users.push({username});
      else checks.users = `Enter a password for ${username}.`;
    }
    const originId = value(form, "forward_origin");
    const forward = originId ? {
      origin_id: originId, port: portValue(value(form, "forward_port")), path: value(form, "forward_path"),
      signin_url: value(form, "forward_signin_url") || null,
    } : null;
    if (forward && forward.port === "") checks.forward_port = "Enter the port the verifier listens on, e.g. 9091.";
    if (forward && !forward.path) checks.forward_path = "Enter the verifier's path, e.g. /api/authz/auth-request.";
    const body = {
      name: value(form, "name"), users, allow: lines("allow"), deny: lines("deny"),
      require: value(form, "require"), bypass_paths: lines("bypass_paths"), forward_auth: forward,
      pass_authorization: form.elements.namedItem("pass_authorization").checked,
    };
    if (!body.name) checks.name = "Enter a name for this policy.";
    return {body, checks};
  }

  /** A field of the policy form that takes an error the API names (users, forward_auth). */
  function reportPolicyLocal(form, checks) {
    const mapped = {};
    for (const [field, message] of Object.entries(checks)) {
      mapped[field === "forward_port" || field === "forward_path" ? "forward_auth" : field] = message;
    }
    return reportLocal(form, mapped);
  }

  const EMPTY_POLICY = {name: "", users: [], allow: [], deny: [], require: "any", bypass_paths: [],
    forward_auth: null, pass_authorization: false};

  function setupPolicyForm() {
    const form = $("#policy-form");
    form.querySelector(".actions").before(...policyFields("policy"));
    fillPolicyForm(form, EMPTY_POLICY);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const {body, checks} = policyBody(form);
      if (reportPolicyLocal(form, checks)) return;
      runForm(form, async () => {
        const created = await api("POST", "/access-policies", body);
        fillPolicyForm(form, EMPTY_POLICY);
        banner(`Access policy “${created.name}” added. Choose it for a route on the Routes page.`, "ok");
        await loadPolicies();
        form.elements.namedItem("name").focus();
      });
    });
  }

  let editingPolicy = null;

  function editPolicy(policy) {
    const form = $("#policy-edit-form");
    editingPolicy = policy;
    clearErrors(form);
    $("#policy-dialog-title").textContent = `Edit access policy ${policy.name}`;
    fillPolicyForm(form, policy);
    $("#policy-dialog").showModal();
    form.elements.namedItem("name").focus();
  }

  function setupPolicyEdit() {
    const dialog = $("#policy-dialog");
    const form = $("#policy-edit-form");
    form.querySelector(".actions").before(...policyFields("edit-policy"));
    $("[data-close]", form).addEventListener("click", () => dialog.close());
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const {body, checks} = policyBody(form);
      if (reportPolicyLocal(form, checks)) return;
      runForm(form, async () => {
        const updated = await api("PATCH", `/access-policies/${encodeURIComponent(editingPolicy.id)}`, body);
        dialog.close();
        banner(`Access policy “${updated.name}” saved. Edges apply it on their next pull.`, "ok");
        await Promise.all([loadPolicies(), loadRoutes()]);
      });
    });
  }

  function deletePolicy(policy) {
    const used = policy.routes.length;
    confirmAction({
      title: `Delete access policy “${policy.name}”?`,
      text: used
        ? `It protects ${plural(used, "route", "routes")}: the control plane will refuse until ${used === 1 ? "it uses" : "they use"} another policy or none.`
        : "No route uses it. Its users and their password hashes are deleted.",
      button: "Delete policy",
      action: async () => {
        await api("DELETE", `/access-policies/${encodeURIComponent(policy.id)}`);
        banner(`Access policy “${policy.name}” deleted.`, "ok");
        await loadPolicies();
      },
    });
  }

  // ------------------------------------------------------------------ edges

  function syncState(edge) {
    const failed = edge.status_ok === false ? badge("bad", "last apply failed") : null;
    if (!edge.applied_hash) return el("span", {class: "badges"}, badge("muted", "not applied yet"), failed);
    if (edge.in_sync) return el("span", {class: "badges"}, badge("ok", "in sync"), failed);
    return [el("span", {class: "badges"}, badge("warn", "out of sync"), failed),
      el("span", {class: "sub", text: `applied ${shortHash(edge.applied_hash)}`})];
  }

  function certSummary(edge) {
    const counts = {valid: 0, pending: 0, failed: 0};
    for (const cert of Object.values(edge.certificates || {})) {
      if (cert && cert.status in counts) counts[cert.status] += 1;
    }
    const parts = Object.entries(counts).filter(([, n]) => n > 0)
      .map(([status, n]) => badge(CERT_BADGE[status], `${n} ${status}`));
    return parts.length ? el("span", {class: "badges"}, parts) : el("span", {class: "muted", text: "none yet"});
  }

  function agentState(edge) {
    if (edge.agent_outdated === null || edge.agent_outdated === undefined) {
      return el("span", {class: "muted", text: "—"});
    }
    const version = el("code", {text: edge.agent_version || "0.1 or older"});
    const outdated = edge.agent_outdated
      ? el("span", {class: "badge warn", text: "outdated",
        title: `older than this control plane (${state.version || "?"}): update agent.sh on the edge`})
      : null;
    const unserved = edge.unserved_routes || [];
    const left = unserved.length
      ? el("span", {
        class: "badge bad", text: `${unserved.length} route${unserved.length > 1 ? "s" : ""} not served`,
        title: unserved.map((r) => `${r.hostname}: ${r.reason}`).join("\n"),
      }) : null;
    return [version, el("span", {class: "sub", text: `payload schema ${edge.schema}`}),
      (outdated || left) ? el("span", {class: "badges"}, outdated, left) : null];
  }

  /** The control plane's warnings about an edge (e.g. no tunnel address or key: origins
   *  leave it out of their wireguard.conf), one badge each with the words in full. */
  function edgeWarnings(edge) {
    const warnings = edge.warnings || [];
    if (!warnings.length) return null;
    return el("span", {class: "badges"}, ...warnings.map((text) =>
      el("span", {class: "badge bad", "data-warning": "edge", text: "not in origins' tunnels", title: text})),
    el("span", {class: "sub error-text", text: warnings.join(" ")}));
  }

  function edgeRow(edge) {
    const wg = cell("WireGuard",
      edge.wg_ip ? el("code", {text: edge.wg_ip}) : el("span", {class: "muted", text: "—"}),
      edge.wg_endpoint ? el("span", {class: "sub", text: edge.wg_endpoint}) : null,
      edgeWarnings(edge));
    const error = edge.last_error
      ? el("span", {class: "error-text", text: edge.last_error})
      : el("span", {class: "muted", text: "none"});
    return el("tr", {},
      cell("Name", el("strong", {class: "name", title: edge.name, text: edge.name}),
        el("span", {class: "sub"}, "registered ", el("span", {class: "nowrap", text: dateOnly(edge.created_at)}))),
      wg,
      cell("Last seen", edgeStateBadge(edge), relTime(edge.last_seen)),
      cell("Agent", agentState(edge), originHealth(edge)),
      cell("Configuration", syncState(edge)),
      cell("Certificates", certSummary(edge)),
      cell("Last error", error),
      el("td", {class: "row-actions", role: "cell"},
        el("button", {
          type: "button", class: "btn small danger", "data-action": "revoke",
          "aria-label": `Revoke edge ${edge.name}`, text: "Revoke",
          onclick: () => revokeEdge(edge),
        }),
      ),
    );
  }

  const EDGE_BADGES = {online: ["ok", "online"], stale: ["warn", "stale"], offline: ["bad", "offline"]};

  /** online / stale (missed 3 polls) / offline (missed 10), as the control plane judges it; an
   *  edge that never polled has no badge: its last-seen time already says "never". */
  function edgeStateBadge(edge) {
    if (!EDGE_BADGES[edge.state]) return null;
    const [kind, text] = EDGE_BADGES[edge.state];
    return el("span", {class: "badges"}, badge(kind, text));
  }

  /** What the edge measured of the origins last time: how many answer, and which do not. */
  function originHealth(edge) {
    const origins = Object.entries(edge.origins || {});
    if (!origins.length) return null;
    const closed = (o) => Object.entries(o.ports || {}).filter(([, up]) => !up).map(([port]) => port);
    const down = origins.filter(([, o]) => !o.reachable || closed(o).length)
      .map(([ip, o]) => (closed(o).length ? `${ip} port ${closed(o).join(", ")}` : ip));
    const text = down.length ? `cannot reach origin ${down.join("; ")}` : `${origins.length} of ${origins.length} origins answer`;
    return el("span", {class: down.length ? "sub error-text" : "sub", text});
  }

  function renderEdges() {
    const edges = (state.edges || []).slice().sort((a, b) => a.name.localeCompare(b.name));
    const shown = viewOf("edges", edges);
    syncRows($("#edges-body"), shown, edgeRow);
    showList("edges", shown, "No edge nodes yet. Add one with the command below.", edges.length);
    const hash = $("#config-hash");
    hash.textContent = shortHash(state.configHash) || "unknown";
    hash.title = state.configHash || "";
    const inSync = edges.filter((e) => e.in_sync).length;
    const count = $("#count-edges");
    count.textContent = edges.length ? `${inSync}/${edges.length}` : "0";
    count.classList.toggle("warn", inSync < edges.length);
    count.title = `${inSync} of ${edges.length} in sync`;
  }

  async function loadEdges() {
    const data = await api("GET", "/edge-nodes");
    state.edges = data.edge_nodes || [];
    state.configHash = data.config_hash || null;
    state.version = data.version || null;
    renderEdges();
    renderRoutes();
  }

  function revokeEdge(edge) {
    confirmAction({
      title: `Revoke edge ${edge.name}?`,
      text: "Its token stops working at once. The edge keeps serving its last configuration but gets no more updates. To bring it back, install it again.",
      button: "Revoke edge",
      action: async () => {
        await api("DELETE", `/edge-nodes/${encodeURIComponent(edge.id)}`);
        banner(`Edge ${edge.name} revoked.`, "ok");
        await loadEdges();
      },
    });
  }

  // ------------------------------------------------------------------ certificates (issue 15)

  const CERT_STATES = {
    valid: ["ok", "valid"], expiring: ["warn", "renewal due"], pending: ["muted", "being issued"],
    failed: ["bad", "failing"], none: ["muted", "not issued yet"],
  };

  function certificateRow(cert) {
    const [tone, label] = CERT_STATES[cert.state] || ["muted", cert.state];
    const stateCell = cell("State", el("span", {class: `badge ${tone}`, "data-state": cert.state, text: label}));
    if (cert.claim) {
      stateCell.firstChild.append(el("span", {class: "sub",
        text: `edge ${cert.claim.holder_edge_name || "?"} is issuing it (claim ${until(cert.claim.until)})`}));
    } else if (cert.next_attempt_at && cert.state !== "valid") {
      stateCell.firstChild.append(el("span", {class: "sub", text: `next attempt ${until(cert.next_attempt_at)}`}));
    }
    const error = cert.last_error
      ? el("span", {class: "error-text", text: sentence(cert.last_error)})
      : el("span", {class: "muted", text: "none"});
    return el("tr", {},
      cell("Name", el("strong", {class: "name", text: cert.name}),
        cert.wildcard ? el("span", {class: "sub", text: "wildcard, by DNS-01"}) : null),
      stateCell,
      cell("Expires", cert.not_after
        ? el("time", {datetime: cert.not_after, title: utcText(cert.not_after), text: `${dateOnly(cert.not_after)} (${until(cert.not_after)})`})
        : el("span", {class: "muted", text: "—"})),
      cell("Issued by", cert.issuer_edge_name
        ? el("span", {}, el("span", {text: cert.issuer_edge_name}), el("span", {class: "sub", text: dateOnly(cert.issued_at)}))
        : el("span", {class: "muted", text: "—"})),
      cell("Last error", error),
    );
  }

  function renderCertificates() {
    const certs = (state.certificates || []).map((c) => ({...c, id: c.name}));
    const shown = viewOf("certificates", certs);
    syncRows($("#certificates-body"), shown, certificateRow);
    showList("certificates", shown, "No hostnames yet: add a route, and its certificate appears here.", certs.length);
    const bad = certs.filter((c) => c.state === "failed" || c.state === "expiring").length;
    const count = $("#count-certificates");
    count.textContent = bad ? String(bad) : "";       // only what needs a look: the bar is full
    count.hidden = !bad;
    count.classList.toggle("warn", bad > 0);
    count.title = `${bad} failing or due of ${certs.length}`;
  }

  async function loadCertificates() {
    const data = await api("GET", "/certificates");
    state.certificates = data.certificates || [];
    renderCertificates();
  }

  /** KOKOA_PUBLIC_URL when the control plane has one, else the address of this page. */
  function controlPlaneUrl() {
    return (state.settings && state.settings.public_url) || window.location.origin;
  }

  /** The secret is read by the shell (not echoed, not in history) and handed over in the
   *  environment: on a command line every local user could read it in /proc. */
  function installCommand(prompt) {
    return `read -rsp '${prompt}: ' KOKOA_ENROLL_KEY && export KOKOA_ENROLL_KEY && ` +
      `curl -fsSL ${controlPlaneUrl()}/install/edge.sh | sudo --preserve-env=KOKOA_ENROLL_KEY bash -s -- --email you@example.com --edge-fqdn edge1.example.com`;
  }

  /** The origin's one paste: the control plane's origin.sh, with the origin's own token read
   *  into the environment (never argv); it fetches wireguard.conf and keeps it fresh. */
  function originInstallCommand() {
    return "read -rsp 'Origin token: ' KOKOA_ORIGIN_TOKEN && export KOKOA_ORIGIN_TOKEN && " +
      `curl -fsSL ${controlPlaneUrl()}/install/origin.sh | sudo --preserve-env=KOKOA_ORIGIN_TOKEN bash -s`;
  }

  /** "Install": make the origin's token (replacing an earlier one) and show it once, with the
   *  command that installs the origin. */
  function installOrigin(origin) {
    const show = async () => {
      const made = await api("POST", `/origins/${encodeURIComponent(origin.id)}/token`, {});
      $("#origin-install-name").textContent = origin.name;
      $("#origin-token").textContent = made.token;
      $("#origin-command").textContent = originInstallCommand();
      $("#origin-install").hidden = false;
      $("#origin-install-title").focus();
      await loadOrigins();
    };
    if (!origin.has_token) return show().catch((err) => banner(err.message, "error"));
    confirmAction({
      title: `New token for ${origin.name}?`,
      text: "The origin's current token stops working at once: an origin installed with it stops refreshing its peers until it is installed again with the new one.",
      button: "Make a new token",
      action: show,
    });
  }

  function setupOriginInstall() {
    $("#copy-origin-token").addEventListener("click", (event) => copyText($("#origin-token").textContent, event.currentTarget));
    $("#copy-origin-command").addEventListener("click", (event) => copyText($("#origin-command").textContent, event.currentTarget));
    $("#origin-install-done").addEventListener("click", () => {
      for (const id of ["#origin-token", "#origin-command", "#origin-install-name"]) $(id).textContent = "";
      $("#origin-install").hidden = true;
    });
  }

  function renderEdgeHelp() {
    $("#edge-command").textContent = installCommand("Bootstrap token");
    if (shownKey) $("#enroll-command").textContent = shownKey.command = installCommand("Enrollment key");
    const publicUrl = state.settings && state.settings.public_url;
    const host = window.location.hostname;
    const local = !publicUrl && (host === "localhost" || host.startsWith("127.") || host === "[::1]");
    for (const note of [$("#edge-url-note"), $("#enroll-url-note")]) {
      note.textContent = publicUrl ? `The control plane URL is its KOKOA_PUBLIC_URL, ${publicUrl}.`
        : local ? `This page was opened on ${host}, which edges cannot reach: set KOKOA_PUBLIC_URL on the control plane, or replace the URL with its public address.`
        : "The control plane URL is the address of this page. If edges reach the control plane by another address, set KOKOA_PUBLIC_URL to it.";
      note.classList.toggle("warn-text", local);
    }
  }

  function setupEdgeHelp() {
    renderEdgeHelp();
    $("#copy-edge-command").addEventListener("click", (event) => copyText($("#edge-command").textContent, event.currentTarget));
  }

  // ------------------------------------------------------------------ enrollment keys

  function keyExpired(key) {
    const t = Date.parse(key.expires_at);
    return !Number.isNaN(t) && t <= Date.now() + state.skewMs;
  }

  function keyLabel(key) {
    return key.description ? `“${key.description}”` : `made ${utcText(key.created_at)}`;
  }

  function enrollRow(key) {
    const expires = key._expired
      ? [badge("bad", "expired"), el("span", {class: "sub nowrap", text: utcText(key.expires_at)})]
      : el("time", {datetime: key.expires_at, title: utcText(key.expires_at), "data-until": key.expires_at,
        text: until(key.expires_at)});
    return el("tr", {},
      cell("Description", key.description
        ? el("strong", {class: "name", title: key.description, text: key.description})
        : el("span", {class: "muted", text: "no description"})),
      cell("Created", relTime(key.created_at)),
      cell("Expires", expires),
      cellWith("Uses left", "num", key.uses_left > 0 ? String(key.uses_left) : badge("muted", "used up")),
      cell("Last used", relTime(key.last_used_at)),
      el("td", {class: "row-actions", role: "cell"},
        el("button", {
          type: "button", class: "btn small danger", "data-action": "revoke",
          "aria-label": `Revoke enrollment key ${keyLabel(key)}`, text: "Revoke",
          onclick: () => revokeEnrollKey(key),
        }),
      ),
    );
  }

  function renderEnrollKeys() {
    if (state.enrollKeys === null) return;
    const keys = state.enrollKeys.slice().sort((a, b) =>
      b.created_at.localeCompare(a.created_at) || a.id.localeCompare(b.id));
    // Whether a key has expired depends on the clock: part of the row signature.
    const rows = viewOf("enroll", keys.map((k) => ({...k, _expired: keyExpired(k)})));
    syncRows($("#enroll-body"), rows, enrollRow);
    showList("enroll", rows, "No enrollment keys. Make one above to install an edge without the bootstrap token.", keys.length);
  }

  async function loadEnrollKeys() {
    const data = await api("GET", "/enrollment-keys");
    state.enrollKeys = data.enrollment_keys || [];
    renderEnrollKeys();
  }

  /** The key exists only here, in the page, until "Done" or a reload: the server never shows it again. */
  let shownKey = null;

  function showNewKey(created) {
    shownKey = {id: created.id, key: created.key, command: installCommand("Enrollment key")};
    const uses = created.uses_left === 1 ? "one edge" : `${created.uses_left} edges`;
    $("#enroll-key").textContent = shownKey.key;
    $("#enroll-command").textContent = shownKey.command;
    $("#enroll-new-meta").textContent = `${created.description ? `“${created.description}”: r` : "R"}egisters ${uses}, until ${utcText(created.expires_at)}.`;
    $("#enroll-new").hidden = false;
    $("#enroll-new-title").focus();
  }

  function hideNewKey() {
    shownKey = null;
    for (const id of ["#enroll-key", "#enroll-command", "#enroll-new-meta"]) $(id).textContent = "";
    $("#enroll-new").hidden = true;
  }

  function setupEnrollKeys() {
    const form = $("#enroll-form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const uses = value(form, "uses");
      const body = {expires_in: Number(value(form, "expires_in")), uses: portValue(uses)};
      const description = value(form, "description");
      if (description) body.description = description;
      if (reportLocal(form, uses ? {} : {uses: "Enter how many edges may register with this key, e.g. 1."})) return;
      runForm(form, async () => {
        const created = await api("POST", "/enrollment-keys", body);
        form.reset();
        showNewKey(created);
        await loadEnrollKeys();
      });
    });
    $("#copy-enroll-key").addEventListener("click", (event) => {
      if (shownKey) copyText(shownKey.key, event.currentTarget);
    });
    $("#copy-enroll-command").addEventListener("click", (event) => {
      if (shownKey) copyText(shownKey.command, event.currentTarget);
    });
    $("#enroll-done").addEventListener("click", () => {
      hideNewKey();
      form.elements.namedItem("description").focus();
    });
  }

  function revokeEnrollKey(key) {
    confirmAction({
      title: `Revoke enrollment key ${keyLabel(key)}?`,
      text: "No edge can register with it any more. Edges that already registered with it keep working.",
      button: "Revoke key",
      action: async () => {
        await api("DELETE", `/enrollment-keys/${encodeURIComponent(key.id)}`);
        if (shownKey && shownKey.id === key.id) hideNewKey();
        banner(`Enrollment key ${keyLabel(key)} revoked.`, "ok");
        await loadEnrollKeys();
      },
    });
  }

  // ------------------------------------------------------------------ settings

  function renderSettings() {
    const box = $("#acme-staging");
    box.checked = Boolean(state.settings && state.settings.acme_staging);
    box.disabled = state.settings === null;
  }

  async function loadSettings() {
    state.settings = await api("GET", "/settings");
    if (!$("#settings-form").hasAttribute("aria-busy")) renderSettings();
    renderEdgeHelp();
  }

  function setupSettings() {
    const form = $("#settings-form");
    const box = $("#acme-staging");
    const status = $("#settings-status");
    form.addEventListener("submit", (event) => event.preventDefault());
    box.addEventListener("change", () => {
      clearErrors(form);
      status.textContent = "";
      const wanted = box.checked;
      confirmAction({
        title: wanted ? "Use staging certificates on every edge?" : "Use real certificates on every edge?",
        text: wanted
          ? "Every edge then requests its certificates from Let's Encrypt's staging environment: browsers will not trust them, so visitors see a warning on every site until you switch back."
          : "Every edge then requests real, trusted certificates from Let's Encrypt, within its rate limits.",
        button: wanted ? "Use staging" : "Use real certificates",
        onCancel: () => { box.checked = !wanted; },
        action: () => saveStaging(wanted),
      });
    });

    function saveStaging(wanted) {
      box.disabled = true;
      return runForm(form, async () => {
        try {
          state.settings = await api("PATCH", "/settings", {acme_staging: wanted});
        } catch (err) {
          box.checked = !wanted;
          throw err;
        } finally {
          box.disabled = false;
        }
        renderSettings();
        status.textContent = state.settings.acme_staging
          ? "Saved. Edges will request staging (untrusted) certificates."
          : "Saved. Edges will request real, trusted certificates.";
      });
    }
  }

  // ------------------------------------------------------------------ login, logout, Add buttons

  /** Show the login page or the app. `via` is how the admin got in (session, basic, loopback). */
  function showSignedIn(signedIn, via) {
    state.signedIn = signedIn;
    document.body.dataset.auth = signedIn ? "in" : "out";
    $("#login-page").hidden = signedIn;
    $("#main").hidden = !signedIn;
    $(".topbar nav").hidden = !signedIn;
    $("#logout").hidden = !signedIn || via !== "session";
  }

  /** A 401 (the session ended, the password changed): back to the login page, data forgotten. */
  function signedOut(message) {
    if (!state.signedIn && !$("#login-page").hidden) return;
    for (const key of ["origins", "routes", "policies", "edges", "settings", "enrollKeys", "sites", "alertTargets", "deliveriesFor", "deliveries", "certificates"]) state[key] = null;
    for (const body of $$("#main tbody")) body.replaceChildren();
    hideNewKey();
    for (const dialog of $$("dialog[open]")) dialog.close();
    showSignedIn(false);
    banner("", "info");
    const form = $("#login-form");
    clearErrors(form);
    if (message !== false) showFormError(form, message || "Your session has ended. Log in again.");
    form.elements.namedItem("password").value = "";
    form.elements.namedItem(value(form, "username") ? "password" : "username").focus();
    document.title = "Log in · Kokoa";
    document.body.dataset.loaded = "true";
  }

  let started = false;
  async function enterApp() {
    let session;
    try {
      session = await api("GET", "/session");
    } catch (err) {
      if (err.status === 401) return signedOut(false);
      throw err;
    }
    showSignedIn(true, session.method);
    showPage(false);
    await refreshAll();
    document.body.dataset.loaded = "true";
    if (started) return;
    started = true;
    setInterval(pollEdges, EDGE_POLL_MS);
    setInterval(() => { if (!document.hidden) refreshAll(); }, FULL_POLL_MS);
    setInterval(tick, 1000);
  }

  function setupLogin() {
    const form = $("#login-form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const body = {username: value(form, "username"), password: form.elements.namedItem("password").value};
      const checks = {};
      if (!body.username) checks.username = "Enter the admin user name (KOKOA_ADMIN_USER, admin unless set).";
      if (!body.password) checks.password = "Enter the admin password.";
      if (reportLocal(form, checks)) return;
      runForm(form, async () => {
        try {
          await api("POST", "/session", body);
        } catch (err) {
          form.elements.namedItem("password").select();
          if (err.status === 401) throw new ApiError(400, "login", "Wrong user name or password.");
          throw err;
        }
        form.elements.namedItem("password").value = "";
        await enterApp();
      });
    });
    $("#logout").addEventListener("click", async () => {
      try {
        await api("DELETE", "/session");
      } catch (err) {
        if (err.status !== 401) return banner(humanMessage(err), "bad", true);
      }
      signedOut(false);
      banner("You are logged out.", "ok");
    });
  }

  /** The "Add" button at the top of a page opens its form (above the list, however long). */
  function setupAddButtons() {
    for (const button of $$("[data-add]")) {
      const form = $(`#${button.dataset.add}`);
      const close = el("button", {type: "button", class: "btn", text: "Close", onclick: () => toggleForm(form, false, true)});
      $(".actions", form).append(close);
      button.addEventListener("click", () => toggleForm(form, form.hidden, true));
    }
  }

  function toggleForm(form, open, moveFocus) {
    const button = $(`[data-add="${form.id}"]`);
    form.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    if (!moveFocus) return;
    if (open) $("input, select, textarea", form).focus();
    else button.focus();
  }

  /** An empty list has nothing to hide its form from: open it the first time the list loads empty. */
  function openFormWhenEmpty(id, items) {
    const form = $(`#${id}`);
    if (form.dataset.seen) return;
    form.dataset.seen = "true";
    if (items.length === 0) toggleForm(form, true, false);
  }

  function setupLists() {
    const text = (...fields) => (item) => fields.map((f) => (typeof f === "function" ? f(item) : item[f]));
    listView("origins", {label: "origins", render: renderOrigins, text: text("name", "wg_ip", "wg_endpoint", "wg_public_key"),
      sort: {name: (o) => o.name, wg_ip: (o) => o.wg_ip, endpoint: (o) => o.wg_endpoint, routes: (o) => o.route_count}});
    listView("routes", {label: "routes", render: renderRoutes,
      text: text("hostname", "hostname_unicode", "origin_name", (r) => String(r.target_port), "access_policy_name"),
      sort: {hostname: (r) => r.hostname_unicode || r.hostname, origin: (r) => r.origin_name, port: (r) => r.target_port}});
    listView("policies", {label: "policies", render: renderPolicies, text: text("name", (p) => p.users.join(" "), (p) => p.routes.join(" ")),
      sort: {name: (p) => p.name, routes: (p) => p.routes.length}});
    listView("edges", {label: "edges", render: renderEdges, text: text("name", "wg_ip", "wg_endpoint", "agent_version", "last_error"),
      sort: {name: (e) => e.name, last_seen: (e) => e.last_seen || "", agent: (e) => e.agent_version || ""}});
    const SEVERITY = {down: 0, failed: 0, degraded: 1, expiring: 1, pending: 2, ok: 3, valid: 3, none: 4, disabled: 5};
    listView("sites", {label: "sites", render: renderOverview,
      text: text("hostname", "origin_name", "state", (s) => s.reasons.map((r) => r.message).join(" ")),
      sort: {hostname: (s) => s.hostname, state: (s) => SEVERITY[s.state], certificate: (s) => s.certificate.not_after || "",
        traffic: (s) => s.traffic.requests}});
    listView("certificates", {label: "certificates", render: renderCertificates,
      text: text("name", "state", "issuer_edge_name", "last_error"),
      sort: {name: (c) => c.name, state: (c) => SEVERITY[c.state], expires: (c) => c.not_after || "", issuer: (c) => c.issuer_edge_name || ""}});
    listView("alerts", {label: "alert targets", render: renderAlerts, text: text("name", "url_display", "format", (t) => t.events.join(" ")),
      sort: {name: (t) => t.name, url: (t) => t.url_display}});
    listView("deliveries", {label: "deliveries", render: renderDeliveries, text: text("event", "state", "error", "message"),
      initial: "time", dir: -1, sort: {time: (d) => d.created_at, event: (d) => d.event, state: (d) => d.state}});
    listView("enroll", {label: "keys", render: renderEnrollKeys, text: text("description"), initial: "created", dir: -1,
      sort: {description: (k) => k.description, created: (k) => k.created_at, expires: (k) => k.expires_at,
        uses: (k) => k.uses_left, last_used: (k) => k.last_used_at || ""}});
  }

  // ------------------------------------------------------------------ overview (issue 16)

  const SITE_BADGES = {ok: "ok", degraded: "warn", down: "bad", disabled: "muted"};
  const CERT_BADGES = {valid: "ok", expiring: "warn", pending: "warn", failed: "bad", none: "muted"};
  const SITE_FILTERS = {
    ok: ["Sites that work", (s) => s.state === "ok"],
    degraded: ["Sites that work with a problem", (s) => s.state === "degraded"],
    down: ["Sites that are down", (s) => s.state === "down"],
    certificates: ["Sites whose certificate expires soon or failed",
      (s) => s.state !== "disabled" && ["expiring", "failed"].includes(s.certificate.state)],
  };

  function overviewTile(kind, number, label, onclick, pressed) {
    return el("button", {
      type: "button", class: `tile ${kind}`, "data-tile": label, "aria-pressed": pressed ? "true" : "false",
      onclick,
    }, el("strong", {text: String(number)}), el("span", {text: label}));
  }

  function filterSites(name) {
    state.siteFilter = state.siteFilter === name ? null : name;
    renderOverview();
    $("#sites-table").scrollIntoView({block: "nearest"});
  }

  function siteRow(site) {
    const reasons = site.reasons.length
      ? el("ul", {class: "reasons"}, site.reasons.map((r) => el("li", {text: sentence(r.message)})))
      : el("span", {class: "muted", text: "—"});
    const cert = site.certificate;
    const t = site.traffic;
    const failed = Math.max(t.status_5xx, t.upstream_errors);
    return el("tr", {},
      cell("Site", el("strong", {class: "name", text: site.hostname}),
        el("span", {class: "sub", text: `origin ${site.origin_name}`})),
      cell("State", badge(SITE_BADGES[site.state], site.state)),
      cell("Why", reasons),
      cell("Certificate", badge(CERT_BADGES[cert.state], cert.state),
        cert.not_after ? el("span", {class: "sub", text: `until ${dateOnly(cert.not_after)}`}) : null),
      cell("Traffic", t.requests
        ? el("span", {text: `${t.requests} requests, ${failed} failed, in ${t.window_s} s`})
        : el("span", {class: "muted", text: "no requests lately"})),
    );
  }

  function renderOverview() {
    const view = state.sites;
    if (!view) return;
    const sum = view.summary;
    const edges = view.edges.length;
    const filter = SITE_FILTERS[state.siteFilter];
    $("#overview-tiles").replaceChildren(
      overviewTile("ok", sum.sites.ok, "sites ok", () => filterSites("ok"), state.siteFilter === "ok"),
      overviewTile(sum.sites.degraded ? "warn" : "muted", sum.sites.degraded, "degraded",
        () => filterSites("degraded"), state.siteFilter === "degraded"),
      overviewTile(sum.sites.down ? "bad" : "muted", sum.sites.down, "down",
        () => filterSites("down"), state.siteFilter === "down"),
      overviewTile(sum.edges.online === edges && edges ? "ok" : "warn", `${sum.edges.online} of ${edges}`,
        "edges online", () => { window.location.hash = "#edges"; }, false),
      overviewTile(sum.certificates.expiring + sum.certificates.failed ? "warn" : "muted",
        sum.certificates.expiring + sum.certificates.failed, "certificates expiring or failed",
        () => filterSites("certificates"), state.siteFilter === "certificates"),
    );
    const sites = view.sites.filter(filter ? filter[1] : () => true)
      .map((site) => ({id: site.route_id, ...site}));
    const shown = viewOf("sites", sites);
    syncRows($("#sites-body"), shown, siteRow);
    showList("sites", shown, filter ? "No site is in this state." : "No sites yet: add a route first.", sites.length);
    const note = $("#sites-filter");
    note.hidden = !filter;
    $("span", note).textContent = filter ? `${filter[0]}.` : "";
    const down = $("#count-down");
    down.textContent = sum.sites.down ? String(sum.sites.down) : "";
    down.classList.toggle("warn", sum.sites.down > 0);
    down.title = sum.sites.down ? `${sum.sites.down} site(s) down` : "";
  }

  async function loadSites() {
    state.sites = await api("GET", "/sites");
    renderOverview();
  }

  // ------------------------------------------------------------------ alerts (issue 16)

  const DELIVERY_BADGES = {delivered: "ok", pending: "warn", failed: "bad"};

  function alertRow(target) {
    return el("tr", {},
      cell("Name", el("strong", {class: "name", text: target.name}),
        el("span", {class: "sub", text: target.format})),
      cell("Sends to", el("code", {text: target.url_display})),
      cell("Events", el("span", {class: "badges"}, target.events.map((e) => badge("muted", e.replace(/_/g, " "))))),
      el("td", {class: "row-actions", role: "cell"},
        el("button", {
          type: "button", class: "btn small", "data-action": "test", text: "Test",
          "aria-label": `Send a test alert to ${target.name}`, onclick: () => testAlert(target),
        }),
        el("button", {
          type: "button", class: "btn small", "data-action": "deliveries", text: "Deliveries",
          "aria-label": `Show the deliveries to ${target.name}`, onclick: () => showDeliveries(target, true),
        }),
        el("button", {
          type: "button", class: "btn small danger", "data-action": "delete", text: "Delete",
          "aria-label": `Delete alert target ${target.name}`, onclick: () => deleteAlert(target),
        })),
    );
  }

  function renderAlerts() {
    const targets = state.alertTargets || [];
    const shown = viewOf("alerts", targets);
    syncRows($("#alerts-body"), shown, alertRow);
    showList("alerts", shown, "No alert targets yet. Add one to hear when something breaks.", targets.length);
  }

  async function loadAlertTargets() {
    state.alertTargets = (await api("GET", "/alert-targets")).alert_targets || [];
    renderAlerts();
    openFormWhenEmpty("alert-form", state.alertTargets);
    if (state.deliveriesFor) await showDeliveries(state.deliveriesFor, false);
  }

  function deliveryRow(d) {
    return el("tr", {},
      cell("Time", relTime(d.created_at)),
      cell("Event", el("span", {text: d.event.replace(/_/g, " ")}),
        el("span", {class: "sub", text: d.message})),
      cell("State", badge(DELIVERY_BADGES[d.state], d.state),
        el("span", {class: "sub", text: `${d.attempts} attempt(s)${d.status_code ? `, HTTP ${d.status_code}` : ""}`})),
      cell("Error", d.error ? el("span", {text: d.error}) : el("span", {class: "muted", text: "—"})),
    );
  }

  async function showDeliveries(target, moveFocus) {
    state.deliveriesFor = target;
    const data = await api("GET", `/alert-targets/${encodeURIComponent(target.id)}/deliveries`);
    $("#deliveries-card").hidden = false;
    $("#deliveries-title").textContent = `Deliveries to ${target.name}`;
    state.deliveries = data.deliveries;
    renderDeliveries();
    if (moveFocus) $("#deliveries-title").focus();
  }

  function renderDeliveries() {
    const deliveries = state.deliveries || [];
    const shown = viewOf("deliveries", deliveries);
    syncRows($("#deliveries-body"), shown, deliveryRow);
    showList("deliveries", shown, "No deliveries yet: press Test to send one.", deliveries.length);
  }

  async function testAlert(target) {
    try {
      await api("POST", `/alert-targets/${encodeURIComponent(target.id)}/test`, {});
      banner(`Test alert to “${target.name}” queued; its delivery appears below.`, "ok");
      await showDeliveries(target, false);
      setTimeout(() => { if (state.deliveriesFor === target) showDeliveries(target, false).catch(() => {}); }, 2000);
    } catch (err) {
      banner(humanMessage(err), "bad");
    }
  }

  function deleteAlert(target) {
    confirmAction({
      title: `Delete alert target “${target.name}”?`,
      text: "It stops receiving alerts, and its deliveries are forgotten.",
      button: "Delete alert target",
      action: async () => {
        await api("DELETE", `/alert-targets/${encodeURIComponent(target.id)}`);
        if (state.deliveriesFor && state.deliveriesFor.id === target.id) {
          state.deliveriesFor = null;
          $("#deliveries-card").hidden = true;
        }
        await loadAlertTargets();
      },
    });
  }

  function setupAlertForm() {
    const form = $("#alert-form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      clearErrors(form);
      const body = {
        name: value(form, "name"), url: value(form, "url"), format: value(form, "format"),
        events: $$("input[name=events]:checked", form).map((box) => box.value),
      };
      if (reportLocal(form, Object.fromEntries([
        !body.name && ["name", "Give the target a name."],
        !body.url && ["url", "Paste the webhook URL."],
        !body.events.length && ["events", "Choose at least one event."]].filter(Boolean)))) return;
      runForm(form, async () => {
        const created = await api("POST", "/alert-targets", body);
        form.reset();
        banner(`Alert target “${created.name}” added. Press Test to check that it arrives.`, "ok");
        await loadAlertTargets();
      });
    });
  }

  // ------------------------------------------------------------------ pages & refresh

  function currentPage() {
    const name = window.location.hash.slice(1);
    return PAGES.includes(name) ? name : null;
  }

  let shownPage = null;
  function showPage(moveFocus) {
    const name = currentPage() || shownPage || "overview";
    shownPage = name;
    for (const section of $$("[data-page]")) section.hidden = section.dataset.page !== name;
    for (const link of $$("[data-nav]")) {
      if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = `${TITLES[name]} · Kokoa`;
    if (moveFocus) $(`#${name}-title`).focus();
  }

  async function refreshAll() {
    if (!state.signedIn) return;
    const results = await Promise.allSettled([
      loadOrigins(), loadRoutes(), loadPolicies(), loadEdges(), loadSettings(), loadEnrollKeys(),
      loadSites(), loadAlertTargets(), loadCertificates()]);
    const failed = results.find((r) => r.status === "rejected");
    if (!state.signedIn) return;
    if (failed) connectionLost(failed.reason);
    else connectionOk();
  }

  let polling = false;
  async function pollEdges() {
    if (polling || document.hidden || !state.signedIn) return;
    polling = true;
    try {
      // Registrations spend enrollment keys: refresh their uses while they are on screen.
      await Promise.all([loadEdges(), shownPage === "edges" ? loadEnrollKeys() : null,
        shownPage === "overview" ? loadSites() : null,
        shownPage === "certificates" ? loadCertificates() : null,
        shownPage === "alerts" && state.deliveriesFor ? showDeliveries(state.deliveriesFor, false) : null]);
      connectionOk();
    } catch (err) {
      if (state.signedIn) connectionLost(err);
    } finally {
      polling = false;
    }
  }

  function start() {
    setupLists();
    setupAddButtons();
    setupLogin();
    setupOriginForm();
    setupOriginEdit();
    setupRouteForm();
    setupRouteEdit();
    setupPolicyForm();
    setupPolicyEdit();
    setupSettings();
    setupEdgeHelp();
    setupOriginInstall();
    setupEnrollKeys();
    setupAlertForm();
    $("#sites-filter-clear").addEventListener("click", () => filterSites(null));
    $("#confirm-cancel").addEventListener("click", () => $("#confirm-dialog").close());
    $(".skip-link").addEventListener("click", (event) => {
      event.preventDefault();
      $("#main").focus();
    });
    window.addEventListener("hashchange", () => {
      if (currentPage()) showPage(true);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refreshAll();
    });
    boot();
  }

  function boot() {
    enterApp().catch((err) => {
      connectionLost(err);
      setTimeout(boot, EDGE_POLL_MS);
    });
  }

  start();
})();
