// swapd status page: plain JavaScript, no build step, no external requests.
//
// Data: GET /swapd/status (the whole picture, refreshed on every event and every few
// seconds), GET /v1/models (display names), and two server-sent event streams read with
// fetch() so that an API key can be sent (EventSource cannot send headers):
// /swapd/events (state changes) and /swapd/logs/stream (the child's output).
"use strict";

(() => {
  const KEY_STORE = "swapd.key";
  const POLL_MS = 5000;
  const TICK_MS = 500;
  const STALL_MS = 45000; // the server sends a keepalive every 15 s
  const MAX_LOG_LINES = 600;
  const MAX_EVENTS = 10;
  const MAX_SWAPS = 12;
  const FALLBACK_RECENT_S = 120;

  const $ = (id) => document.getElementById(id);

  const model = {
    status: null,          // the last /swapd/status, patched by events
    fetchedAt: 0,          // performance.now() when load_elapsed/uptime were true
    names: {},             // profile -> display name
    events: [],            // newest first, for the feed
    pending: {},           // profile -> "load" | "unload" while a call runs
    actionError: {},       // profile -> message from the last failed call
    fallbackSeen: {},      // fallback -> {served, usedAt}
    connected: false,
  };

  // ------------------------------------------------------------------ helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "style") el.style.cssText = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function setAttr(el, name, value) {
    if (value === null || value === undefined) el.removeAttribute(name);
    else if (el.getAttribute(name) !== String(value)) el.setAttribute(name, value);
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function secs(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "–";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 10) return `${s.toFixed(2)} s`;
    if (s < 60) return `${s.toFixed(1)} s`;
    return span(s);
  }

  function eta(s) {
    return s < 10 ? `${s.toFixed(1)} s` : secs(s);
  }

  /** Messages start with "profile 'x': "; the page already says which profile. */
  function tidy(message) {
    return String(message || "").replace(/^profile '[^']*': /, "");
  }

  function span(s) {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Math.floor(s));
    if (s < 60) return `${s} s`;
    if (s < 3600) return s % 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s / 60} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function ago(at) {
    if (!at) return "";
    const d = Date.now() / 1000 - at;
    if (d < 5) return "just now";
    if (d < 60) return `${Math.round(d)} s ago`;
    if (d < 3600) return `${Math.round(d / 60)} min ago`;
    if (d < 86400) return `${Math.round(d / 3600)} h ago`;
    return `${Math.round(d / 86400)} d ago`;
  }

  function clock(at) {
    return new Date(at * 1000).toLocaleTimeString([], { hour12: false });
  }

  function tokens(n) {
    if (!n) return null;
    return n % 1024 === 0 ? `${n / 1024}K` : n.toLocaleString();
  }

  const label = (name) => (name && model.names[name]) || name || "";
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  function announce(text) {
    setText($("announce"), text);
  }

  // ------------------------------------------------------------------ API key

  let keyAsk = null;
  let keyRefused = false;
  let keyWaiters = [];

  function storedKey() {
    try { return localStorage.getItem(KEY_STORE); } catch { return null; }
  }

  function storeKey(key) {
    try {
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
    } catch { /* private mode: the key lives until the page closes */ }
    memoryKey = key;
  }
  let memoryKey = null;
  const currentKey = () => storedKey() || memoryKey;

  /** Ask for the key once; concurrent callers share the one dialog. */
  function askKey(reason) {
    if (keyAsk) return keyAsk;
    if (keyRefused) return Promise.resolve(false);
    const dialog = $("key-dialog");
    const input = $("key-input");
    keyAsk = new Promise((resolve) => {
      $("key-why").textContent = reason ||
        "Operations need the admin key (or the API key if no admin key is set). " +
        "It is kept in this browser only (localStorage).";
      input.value = "";
      dialog.returnValue = "";
      dialog.addEventListener("close", () => {
        const key = input.value.trim();
        const ok = dialog.returnValue === "ok" && key !== "";
        if (ok) {
          storeKey(key);
          keyRefused = false;
          const waiters = keyWaiters;
          keyWaiters = [];
          waiters.forEach((w) => w());
        } else {
          keyRefused = true;
        }
        keyAsk = null;
        updateKeyButton();
        resolve(ok);
      }, { once: true });
      dialog.showModal();
      input.focus();
    });
    updateKeyButton();
    return keyAsk;
  }

  const waitForKey = () => new Promise((resolve) => keyWaiters.push(resolve));

  function updateKeyButton() {
    const button = $("key-button");
    if (currentKey()) {
      button.textContent = "Forget key";
      button.hidden = false;
    } else if (keyRefused) {
      button.textContent = "Enter key";
      button.hidden = false;
    } else {
      button.hidden = true;
    }
  }

  $("key-button").addEventListener("click", async () => {
    if (currentKey()) {
      storeKey(null);
      updateKeyButton();
      announce("Key forgotten");
      return;
    }
    keyRefused = false;
    if (await askKey()) refreshAll();
  });

  /** fetch() with the stored key; a 401 asks for the key (once) and retries. */
  async function api(path, init = {}) {
    for (let tries = 0; ; tries++) {
      const key = currentKey();
      const headers = new Headers(init.headers || {});
      if (key) headers.set("Authorization", `Bearer ${key}`);
      const res = await fetch(path, { ...init, headers, cache: "no-store" });
      if (res.status !== 401 || tries >= 3) return res;
      if (currentKey() !== key) continue; // a key arrived while this was in flight
      if (key) storeKey(null);
      const ok = await askKey(key ? "That key was refused. Enter the admin key for this swapd." : null);
      if (!ok) {
        setConn("locked", "key needed");
        return res;
      }
    }
  }

  // ------------------------------------------------------------------ data

  let refreshing = null;
  let refreshAgain = false;

  async function refreshStatus() {
    if (refreshing) {
      refreshAgain = true;
      return refreshing;
    }
    refreshing = (async () => {
      do {
        refreshAgain = false;
        try {
          const res = await api("/swapd/status");
          if (res.ok) {
            model.status = await res.json();
            model.fetchedAt = performance.now();
            noteFallbacks();
            render();
          }
        } catch { /* the event stream's reconnect loop reports the outage */ }
      } while (refreshAgain);
      refreshing = null;
    })();
    return refreshing;
  }

  let refreshTimer = null;
  function refreshSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshStatus, 120);
  }

  async function refreshModels() {
    try {
      const res = await api("/v1/models");
      if (!res.ok) return;
      const body = await res.json();
      const names = {};
      for (const m of body.data || []) names[m.id] = m.name || m.id;
      model.names = names;
      render();
    } catch { /* display names are a nicety; ids still work */ }
  }

  function refreshAll() {
    refreshModels();
    refreshStatus();
  }

  function noteFallbacks() {
    const now = Date.now() / 1000;
    for (const fb of model.status.fallbacks || []) {
      const seen = model.fallbackSeen[fb.name];
      if (seen && fb.served > seen.served) seen.usedAt = now;
      model.fallbackSeen[fb.name] = { served: fb.served, usedAt: seen ? seen.usedAt : null };
    }
  }

  // ------------------------------------------------------------------ SSE over fetch

  let staleTimer = null;
  function setConn(kind, text) {
    const conn = $("conn");
    setAttr(conn, "data-conn", kind);
    setText($("conn-text"), text);
    // Say so when what is shown may be out of date (after a grace period: blips happen).
    clearTimeout(staleTimer);
    if (kind === "live") {
      $("stale").hidden = true;
    } else if (kind !== "connecting") {
      staleTimer = setTimeout(() => { $("stale").hidden = false; }, 2500);
    }
  }

  /** Read one SSE response, calling onData with each decoded `data:` payload. */
  async function readSSE(res, onData, controller) {
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let stall = setTimeout(() => controller.abort(), STALL_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        clearTimeout(stall);
        stall = setTimeout(() => controller.abort(), STALL_MS);
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (data) {
            try { onData(JSON.parse(data)); } catch (e) { console.error("swapd: bad event", e); }
          }
        }
      }
    } finally {
      clearTimeout(stall);
    }
  }

  /** Follow an SSE endpoint forever: reconnect with backoff, pause while a key is needed. */
  async function follow(path, { onOpen, onData, onDrop }) {
    let delay = 1000;
    for (;;) {
      const controller = new AbortController();
      let why = "closed";
      try {
        const res = await api(path, { signal: controller.signal,
                                      headers: { Accept: "text/event-stream" } });
        if (res.status === 401) {
          onDrop("locked");
          await waitForKey();
          continue;
        }
        if (!res.ok) throw new Error(`HTTP ${res.status}`);
        delay = 1000;
        await onOpen();
        await readSSE(res, onData, controller);
      } catch (e) {
        why = e.name === "AbortError" ? "stalled" : "error";
      }
      const wait = delay * (0.8 + Math.random() * 0.4);
      onDrop(why, wait);
      await sleep(wait);
      delay = Math.min(delay * 2, 30000);
    }
  }

  function followEvents() {
    let countdown = null;
    follow("/swapd/events", {
      onOpen: async () => {
        clearInterval(countdown);
        model.connected = true;
        setConn("live", "live");
      },
      onData: onEvent,
      onDrop: (why, wait) => {
        model.connected = false;
        clearInterval(countdown);
        if (why === "locked") {
          setConn("locked", "key needed");
          return;
        }
        const until = performance.now() + wait;
        const show = () => {
          const left = Math.max(0, Math.ceil((until - performance.now()) / 1000));
          setConn("retrying", left > 0 ? `reconnecting in ${left} s` : "reconnecting…");
        };
        show();
        countdown = setInterval(show, 1000);
      },
    });
  }

  // ------------------------------------------------------------------ events

  function onEvent(ev) {
    const s = model.status;
    if (ev.kind === "status") {
      const { kind, ...fresh } = ev;
      model.status = { ...(s || {}), ...fresh };
      model.fetchedAt = performance.now();
      render();
      refreshStatus(); // the snapshot lacks requests, fallbacks and profiles
      return;
    }
    if (!s) return;
    const now = performance.now();
    switch (ev.kind) {
      case "state":
        s.state = ev.state;
        s.active = ev.profile;
        if (ev.state !== "ready") s.uptime = null;
        if (ev.state === "idle" || ev.state === "failed") {
          s.pid = null;
          s.inflight = 0;
          s.draining = false;
        }
        break;
      case "starting":
        s.active = ev.profile;
        s.state = "starting";
        s.load_elapsed = 0;
        s.load_expected = ev.expected_seconds;
        model.fetchedAt = now;
        break;
      case "ready":
        s.pid = ev.pid;
        s.uptime = 0;
        s.load_seconds = { ...(s.load_seconds || {}), [ev.profile]: ev.load_seconds };
        model.fetchedAt = now;
        delete model.actionError[ev.profile];
        announce(`${label(ev.profile)} is ready (loaded in ${secs(ev.load_seconds)})`);
        break;
      case "start_failed":
        s.last_error = { profile: ev.profile, message: ev.message, exit_code: ev.exit_code,
                         stderr_tail: [] };
        announce(`${label(ev.profile)} failed to start (exit code ${ev.exit_code})`);
        break;
      case "crashed":
        announce(`${label(ev.profile)} crashed (exit code ${ev.exit_code})`);
        break;
      case "reloaded":
        refreshModels();
        break;
      case "shutdown":
        setConn("retrying", "swapd is shutting down");
        break;
      default:
        break;
    }
    if (ev.kind !== "state") {
      model.events.unshift(ev);
      model.events.length = Math.min(model.events.length, MAX_EVENTS);
    }
    render();
    refreshSoon();
  }

  function describe(ev) {
    const who = label(ev.profile);
    switch (ev.kind) {
      case "queued": return [`request for ${who} queued`, ` (${ev.waiting} waiting)`];
      case "left_queue": return [`a request for ${who} left the queue`];
      case "starting":
        return [`loading ${who}`, ev.expected_seconds
          ? ` (≈ ${secs(ev.expected_seconds)})` : " (first load, no estimate yet)"];
      case "ready": return [`${who} ready in ${secs(ev.load_seconds)}`, ` · pid ${ev.pid}`];
      case "draining": return [`draining ${who}`, ` (${ev.inflight} in flight)`];
      case "stopping": return [`stopping ${who}`];
      case "stopped": return [`${who} stopped`];
      case "start_failed":
        return [`${who} failed to start`, ev.exit_code === null ? "" : ` · exit code ${ev.exit_code}`];
      case "crashed": return [`${who} crashed`, ` · exit code ${ev.exit_code}`];
      case "circuit_open":
        return [`circuit open for ${who}`,
          ` after ${plural(ev.failures, "failure")}; next try in ${secs(ev.cooldown)}`];
      case "circuit_closed": return [`circuit closed for ${who}`];
      case "ttl_expired": return [`${who} unloaded after its idle ttl`];
      case "reloaded": {
        const parts = [];
        for (const k of ["added", "changed", "removed"]) {
          if (ev[k] && ev[k].length) parts.push(`${k} ${ev[k].join(", ")}`);
        }
        return ["config reloaded", parts.length ? ` (${parts.join("; ")})` : ""];
      }
      case "shutdown": return ["swapd is shutting down"];
      default: return [ev.kind.replace(/_/g, " ")];
    }
  }

  // ------------------------------------------------------------------ derived state

  function profileState(name) {
    const s = model.status;
    // Several models may be resident (residency.mode: budget): each has its own state.
    const resident = (s.resident || []).find((r) => r.name === name);
    if (resident && ["starting", "ready", "stopping"].includes(resident.state)) {
      return resident.state;
    }
    if (s.active === name && ["starting", "ready", "stopping"].includes(s.state)) return s.state;
    const circuit = (s.circuits || {})[name];
    if (circuit && circuit.failures > 0) return "failed";
    return "idle";
  }

  function progress() {
    const s = model.status;
    if (!s || s.state !== "starting") return null;
    const elapsed = (s.load_elapsed || 0) + (performance.now() - model.fetchedAt) / 1000;
    const expected = s.load_expected || (s.load_seconds || {})[s.active] || null;
    if (!expected) return { elapsed, expected: null, pct: null, eta: null };
    const pct = Math.min(99, Math.floor((100 * elapsed) / expected));
    return { elapsed, expected, pct, eta: Math.max(0, expected - elapsed) };
  }

  function progressText(p) {
    if (p.pct === null) return `${secs(p.elapsed)} · first load, no estimate yet`;
    return p.eta > 0.05 ? `${p.pct} % · ready in ~${eta(p.eta)}` : `${p.pct} % · any moment now`;
  }

  function paintProgress(wrap, p) {
    wrap.hidden = !p;
    if (!p) return;
    const bar = wrap.querySelector(".progress");
    bar.classList.toggle("indeterminate", p.pct === null);
    setAttr(bar, "aria-valuenow", p.pct === null ? null : p.pct);
    setAttr(bar, "aria-valuetext", progressText(p));
    bar.querySelector(".bar").style.width = p.pct === null ? "" : `${p.pct}%`;
    setText(wrap.querySelector(".progress-text"), progressText(p));
  }

  function progressElement() {
    return h("div", { class: "progress-wrap" },
      h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0,
                 "aria-valuemax": 100, "aria-label": "Load progress" },
        h("span", { class: "bar" })),
      h("span", { class: "progress-text" }));
  }

  /** The profile a requested model name means (name or alias), else null. */
  function profileOf(name) {
    const profiles = model.status.profiles || {};
    if (profiles[name]) return name;
    for (const [profile, info] of Object.entries(profiles)) {
      if ((info.aliases || []).includes(name)) return profile;
    }
    return null;
  }

  /** Requests counted per profile (aliases folded in); other names stay as they are. */
  function requestsByProfile() {
    const totals = new Map();
    for (const [name, n] of Object.entries(model.status.requests || {})) {
      const key = profileOf(name) || name;
      const entry = totals.get(key) || { n: 0, via: new Set() };
      entry.n += n;
      if (key !== name) entry.via.add(name);
      totals.set(key, entry);
    }
    return totals;
  }

  function lastSwapTo(name) {
    const history = model.status.history || [];
    for (let i = history.length - 1; i >= 0; i--) {
      if (history[i].to === name) return history[i];
    }
    return null;
  }

  // ------------------------------------------------------------------ rendering

  function render() {
    const s = model.status;
    if (!s) return;
    renderNow(s);
    renderProfiles(s);
    renderLive(s);
    renderHistory(s);
    renderRequests(s);
    renderGpus(s);
    renderFailure(s);
    if (s.version) setText($("version"), `v${s.version}`);
  }

  function tick() {
    const s = model.status;
    if (!s) return;
    if (s.state === "starting") {
      renderNow(s);
      renderProfiles(s);
    } else if (s.state === "ready" && s.uptime !== null && s.uptime !== undefined) {
      setText($("stat-uptime"), span(s.uptime + (performance.now() - model.fetchedAt) / 1000));
    }
  }

  function renderNow(s) {
    const now = $("now");
    const state = s.state || "idle";
    setAttr(now, "data-state", state);
    setText($("state-badge"), state);
    const active = s.active;
    let title;
    let sub;
    if (active) {
      title = label(active);
      const ctx = tokens(((s.profiles || {})[active] || {}).context_length);
      const bits = [active];
      if (ctx) bits.push(`${ctx} context`);
      if (state === "ready") {
        const took = (s.load_seconds || {})[active];
        if (took) bits.push(`loaded in ${secs(took)}`);
        if (s.draining) bits.push("draining for a swap");
      } else if (state === "starting") {
        bits.push("loading");
      } else if (state === "stopping") {
        bits.push("stopping");
      }
      sub = bits.join(" · ");
    } else if (state === "failed" && s.last_error) {
      title = `${label(s.last_error.profile)} failed`;
      sub = tidy(s.last_error.message);
    } else {
      title = "No model loaded";
      sub = "A request for any model loads it on demand, or press Load below.";
    }
    setText($("now-model"), title);
    setText($("now-sub"), sub);
    paintProgress($("now-progress"), progress());
    for (const li of $("machine").children) {
      li.classList.toggle("on", li.dataset.step === state);
      setAttr(li, "aria-current", li.dataset.step === state ? "step" : null);
    }
    setText($("stat-pid"), s.pid ? String(s.pid) : "–");
    const uptime = state === "ready" && s.uptime !== null && s.uptime !== undefined
      ? span(s.uptime + (performance.now() - model.fetchedAt) / 1000) : "–";
    setText($("stat-uptime"), uptime);
    setText($("stat-inflight"), String(s.inflight || 0));
    const waiting = Object.values(s.waiting || {}).reduce((a, b) => a + b, 0);
    setText($("stat-waiting"), String(waiting));
  }

  const cards = new Map();

  function profileNames(s) {
    const names = Object.keys(s.profiles || {});
    return names.length ? names : Object.keys(model.names);
  }

  function renderProfiles(s) {
    const names = profileNames(s);
    const list = $("profile-list");
    if (names.join("\n") !== [...cards.keys()].join("\n")) {
      cards.clear();
      list.replaceChildren(...names.map((name) => {
        const card = makeCard(name);
        cards.set(name, card);
        return card.li;
      }));
    }
    setText($("profiles-count"), `${names.length} configured`);
    for (const name of names) paintCard(cards.get(name), name, s);
  }

  function makeCard(name) {
    const els = {
      title: h("span", { class: "profile-name" }),
      pill: h("span", { class: "pill" }),
      meta: h("div", { class: "profile-meta" }),
      load: h("button", { type: "button", class: "btn primary", "data-action": "load",
                          onclick: () => load(name) }, "Load"),
      unload: h("button", { type: "button", class: "btn", "data-action": "unload",
                            onclick: () => unload(name) }, "Unload"),
      progress: progressElement(),
      note: h("p", { class: "profile-note" }),
    };
    const li = h("li", { class: "profile", "data-profile": name },
      h("div", { class: "profile-title" }, els.title, els.pill),
      els.meta,
      h("div", { class: "profile-actions" }, els.load, els.unload),
      h("div", { class: "profile-detail" }, els.progress, els.note));
    return { li, els, metaKey: "" };
  }

  function paintCard(card, name, s) {
    const { li, els } = card;
    const state = profileState(name);
    const info = (s.profiles || {})[name] || {};
    const circuit = (s.circuits || {})[name];
    const pending = model.pending[name];
    const p = state === "starting" ? progress() : null;
    setAttr(li, "data-state", state);
    setText(els.title, label(name));

    let pill = { idle: "unloaded", starting: "loading", ready: "ready",
                 stopping: "stopping", failed: "failed" }[state];
    if (state === "starting" && p && p.pct !== null) pill = `loading ${p.pct} %`;
    if (state === "failed" && circuit && circuit.state !== "closed") {
      pill = circuit.state === "open" ? "failed · circuit open" : "failed · half-open";
    }
    if (state === "idle" && pending === "load") pill = "waiting";
    setAttr(els.pill, "data-state", pending === "load" && state === "idle" ? "starting" : state);
    setText(els.pill, pill);

    // Meta line: id, aliases, context, last load, requests.
    const swap = lastSwapTo(name);
    const took = (s.load_seconds || {})[name];
    const requests = (requestsByProfile().get(name) || { n: 0 }).n;
    const metaKey = JSON.stringify([name, info.aliases, info.context_length, took,
                                    swap && ago(swap.at), requests, model.names[name]]);
    if (metaKey !== card.metaKey) {
      card.metaKey = metaKey;
      const bits = [h("code", { class: "chip", title: "profile name" }, name)];
      for (const alias of info.aliases || []) {
        bits.push(h("code", { class: "chip", title: "alias" }, alias));
      }
      if (info.context_length) {
        bits.push(h("span", { title: `${info.context_length.toLocaleString()} tokens` },
                    `${tokens(info.context_length)} context`));
      }
      bits.push(h("span", {}, took ? `last load ${secs(took)}` : "never loaded here"));
      if (swap && swap.at) bits.push(h("span", {}, ago(swap.at)));
      if (requests) bits.push(h("span", {}, plural(requests, "request")));
      els.meta.replaceChildren(...bits.flatMap((b, i) => (i > 1 ? [dot(), b] : [b])));
    }

    // Buttons: Load when it is not running, Unload (or Cancel) when it is.
    const running = state === "starting" || state === "ready";
    els.load.hidden = running || state === "stopping";
    els.load.disabled = pending === "load";
    const loadText = pending === "load" ? "Loading…" : state === "failed" ? "Retry" : "Load";
    setText(els.load, loadText);
    setAttr(els.load, "aria-label", `${loadText.replace("…", "")} ${label(name)}`);
    els.unload.hidden = !running;
    els.unload.disabled = pending === "unload";
    const unloadText = pending === "unload" ? "Unloading…" : state === "starting" ? "Cancel" : "Unload";
    setText(els.unload, unloadText);
    setAttr(els.unload, "aria-label", `${unloadText.replace("…", "")} ${label(name)}`);

    paintProgress(els.progress, p);

    // A note: why it failed, or what the last call said.
    let note = "";
    let noteClass = "profile-note";
    const error = model.actionError[name];
    if (state === "failed" || error) {
      noteClass += " profile-error";
      const last = s.last_error && s.last_error.profile === name ? s.last_error : null;
      if (last) {
        note = last.exit_code === null || last.exit_code === undefined
          ? tidy(last.message) : `exit code ${last.exit_code} · ${tidy(last.message)}`;
      } else if (circuit && circuit.last_error) {
        note = tidy(circuit.last_error);
      } else if (error) {
        note = tidy(error.split("\n")[0]);
      }
      if (circuit && circuit.state === "open") {
        note += ` — ${plural(circuit.failures, "failure")} in a row, local starts paused`;
      }
    } else if (state === "idle" && pending === "load" && s.active && s.active !== name) {
      note = `waiting for ${label(s.active)} to stop`;
      noteClass += " muted";
    }
    setText(els.note, note);
    if (els.note.className !== noteClass) els.note.className = noteClass;
  }

  const dot = () => h("span", { "aria-hidden": "true" }, "·");

  function renderLive(s) {
    // Queue: who waits for what.
    const waiting = Object.entries(s.waiting || {}).filter(([, n]) => n > 0);
    const queue = $("queue");
    const rows = waiting.map(([name, n]) => h("li", {},
      h("span", { class: "name" }, label(name),
        name === s.active && s.state === "starting"
          ? h("span", { class: "muted small" }, " · loading") : null),
      h("span", { class: "count", "aria-label": `${n} waiting` }, String(n))));
    const queueBits = [];
    if (s.draining && s.active) {
      queueBits.push(h("p", { class: "small" },
        `Draining ${label(s.active)}: ${plural(s.inflight, "request")} still in flight.`));
    }
    queueBits.push(rows.length ? h("ul", { class: "rows" }, rows)
      : h("p", { class: "empty" }, "Nobody is waiting."));
    queue.replaceChildren(...queueBits);

    // Circuits: only the profiles that have failed lately.
    const circuits = Object.entries(s.circuits || {});
    $("circuits").replaceChildren(circuits.length
      ? h("ul", { class: "rows" }, circuits.map(([name, c]) => h("li", {},
          h("span", { class: "name" }, label(name)),
          h("span", { class: "pill", "data-state": c.state === "closed" ? "starting" : "failed" },
            `${c.state.replace("_", "-")} · ${plural(c.failures, "failure")}`))))
      : h("p", { class: "empty" }, "All closed: every model may start."));

    // Fallbacks: health, use.
    const fallbacks = s.fallbacks || [];
    const open = Object.values(s.circuits || {}).some((c) => c.state === "open");
    const now = Date.now() / 1000;
    const fbRows = fallbacks.map((fb) => {
      const seen = model.fallbackSeen[fb.name];
      const inUse = seen && seen.usedAt && now - seen.usedAt < FALLBACK_RECENT_S;
      const health = fb.healthy === null || fb.healthy === undefined
        ? h("span", { class: "health" }, "not checked yet")
        : fb.healthy ? h("span", { class: "health ok" }, "healthy")
          : h("span", { class: "health bad", title: fb.problem || "" }, fb.problem || "down");
      return h("li", { class: "fallback" },
        h("span", { class: "name" }, h("strong", {}, fb.name),
          h("small", { class: "muted fallback-model" }, fb.model)),
        h("span", { class: "fallback-state" },
          h("span", {}, inUse ? h("span", { class: "tag" }, "in use") : null, " ", health),
          h("small", { class: "muted" }, `${fb.served} served`)));
    });
    const fbBits = [];
    if (open && fallbacks.length) {
      fbBits.push(h("p", { class: "small note" }, "A circuit is open: its requests go to the fallbacks."));
    }
    fbBits.push(fbRows.length ? h("ul", { class: "rows" }, fbRows)
      : h("p", { class: "empty" }, "None configured."));
    $("fallbacks").replaceChildren(...fbBits);

    // Recent events.
    const events = model.events.map((ev) => {
      const [main, extra] = describe(ev);
      const cls = ["start_failed", "crashed", "hung", "circuit_open"].includes(ev.kind) ? "ev-failed"
        : ev.kind === "ready" ? "ev-ready" : "";
      return h("li", {}, h("time", { datetime: new Date(ev.at * 1000).toISOString() }, clock(ev.at)),
        h("span", {}, h("span", { class: cls }, main), extra ? h("span", { class: "muted" }, extra) : null));
    });
    $("events").replaceChildren(...(events.length ? events
      : [h("li", { class: "empty" }, "No events since this page opened.")]));
  }

  function renderHistory(s) {
    const swaps = (s.history || []).slice(-MAX_SWAPS).reverse();
    const chart = $("history-chart");
    if (!swaps.length) {
      chart.replaceChildren(h("p", { class: "empty" }, "No loads yet."));
      return;
    }
    const max = Math.max(...swaps.map((w) => w.total_seconds), 0.001);
    chart.replaceChildren(h("ul", { class: "swaps" }, swaps.map((w) => {
      const failed = w.result !== "ok";
      const from = w.from ? `after ${label(w.from)}` : "from idle";
      const summary = `${label(w.to)} ${failed ? "failed" : "loaded"} ${from}: ` +
        `stop ${secs(w.stop_seconds)}, load ${secs(w.load_seconds)}, total ${secs(w.total_seconds)}`;
      return h("li", {},
        h("div", { class: "swap-head" },
          h("span", { class: "swap-name" }, h("strong", {}, label(w.to)), " ",
            h("span", { class: "muted small" }, from)),
          h("span", { class: `value${failed ? " fail" : ""}` },
            failed ? `failed after ${secs(w.total_seconds)}` : secs(w.total_seconds))),
        h("span", { class: "track", role: "img", "aria-label": summary },
          w.stop_seconds > 0 ? h("span", { class: "seg stop",
            style: `width:${(100 * w.stop_seconds) / max}%` }) : null,
          h("span", { class: `seg ${failed ? "fail" : "load"}`,
            style: `width:${(100 * w.load_seconds) / max}%` })),
        h("span", { class: "swap-foot" },
          w.from ? ["stop ", h("b", {}, secs(w.stop_seconds)), " · "] : null,
          failed ? "start " : "load ", h("b", {}, secs(w.load_seconds)),
          ` · ${clock(w.at)}`));
    })));
  }

  function renderRequests(s) {
    const counts = [...requestsByProfile()].sort((a, b) => b[1].n - a[1].n);
    const total = counts.reduce((a, [, e]) => a + e.n, 0);
    setText($("requests-total"), total ? `${total} since start` : "");
    const chart = $("requests-chart");
    if (!counts.length) {
      chart.replaceChildren(h("p", { class: "empty" }, "No inference requests yet."));
      return;
    }
    const max = counts[0][1].n || 1;
    chart.replaceChildren(h("ul", { class: "swaps" }, counts.map(([name, { n, via }]) =>
      h("li", {},
        h("div", { class: "swap-head" },
          h("span", { class: "swap-name" }, h("strong", {}, label(name)),
            via.size ? h("span", { class: "muted small" }, ` as ${[...via].join(", ")}`) : null),
          h("span", { class: "value" }, String(n))),
        h("span", { class: "track", role: "img", "aria-label": `${label(name)}: ${n} requests` },
          h("span", { class: "seg req", style: `width:${(100 * n) / max}%` }))))));
  }

  function gib(n) {
    return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : `${Math.round(n / 2 ** 20)} MiB`;
  }

  // One bar per GPU with a budget (residency.mode: budget): a segment per resident model
  // (its planned bytes, split evenly over the GPUs it spans), then what is free.
  function renderGpus(s) {
    const gpus = (s.gpus || []).filter((g) => g.budget);
    $("gpus").hidden = !gpus.length;
    if (!gpus.length) return;
    const resident = s.resident || [];
    setText($("gpus-total"), `${resident.length} model${resident.length === 1 ? "" : "s"} loaded`);
    $("gpus-chart").replaceChildren(h("ul", { class: "swaps" }, gpus.map((g) => {
      const parts = resident.filter((r) => (r.gpus || []).includes(g.id) && r.planned)
        .map((r) => ({ name: r.name, state: r.state, bytes: r.planned / r.gpus.length }));
      const used = parts.reduce((a, p) => a + p.bytes, 0);
      const free = Math.max(0, g.budget - used);
      const measured = g.measured ? `, ${gib(g.measured)} measured` : "";
      return h("li", {},
        h("div", { class: "swap-head" },
          h("span", { class: "swap-name" }, h("strong", {}, `GPU ${g.id}`),
            h("span", { class: "muted small" }, ` ${gib(g.budget)} for models${measured}`)),
          h("span", { class: "value" }, `${gib(free)} free`)),
        h("span", { class: "track", role: "img", "aria-label": `GPU ${g.id}: ` +
            parts.map((p) => `${label(p.name)} ${gib(p.bytes)}`).join(", ") + `, ${gib(free)} free` },
          ...parts.map((p) => h("span", {
            class: `seg gpu ${p.state}`, title: `${label(p.name)}: ${gib(p.bytes)} (${p.state})`,
            style: `width:${(100 * p.bytes) / g.budget}%` }))),
        h("span", { class: "muted small" },
          parts.map((p) => `${label(p.name)} ${gib(p.bytes)}`).join(" · ") || "nothing loaded"));
    })));
  }

  let failureKey = "";
  function renderFailure(s) {
    const e = s.last_error;
    const box = $("failure");
    box.hidden = !e;
    if (!e) return;
    const key = JSON.stringify(e);
    if (key === failureKey) return;
    failureKey = key;
    const swap = (s.history || []).filter((w) => w.to === e.profile && w.result !== "ok").pop();
    setText($("failure-title"), `Last failure: ${label(e.profile)}${swap ? ` · ${clock(swap.at)}` : ""}`);
    const code = $("failure-code");
    code.hidden = e.exit_code === null || e.exit_code === undefined;
    setText(code, `exit code ${e.exit_code}`);
    setText($("failure-message"), tidy(e.message));
    const tail = e.stderr_tail || [];
    const pre = $("failure-tail");
    pre.hidden = !tail.length;
    setText(pre, tail.join("\n"));
    failureLines = new Set(tail.map((l) => l.trim()).filter(Boolean));
    for (const ln of $("log").querySelectorAll(".ln")) classifyLine(ln);
  }

  // ------------------------------------------------------------------ logs

  let failureLines = new Set();
  const ERROR_RE = new RegExp("\\b(error|failed|failure|fatal|abort(ed)?|panic|exception|" +
                              "out of memory|cannot|could not|couldn't)\\b", "i");

  function classifyLine(el) {
    const text = el.textContent;
    el.classList.toggle("tail", failureLines.has(text.trim()));
    el.classList.toggle("err", !el.classList.contains("tail") && ERROR_RE.test(text));
  }

  // The log follows new output (and size changes) until someone scrolls up to read.
  let logFollows = true;
  const logPre = $("log");
  const pinLog = () => { if (logFollows) logPre.scrollTop = logPre.scrollHeight; };
  let userScrolledAt = -Infinity; // layout changes scroll too; only people decide
  for (const kind of ["wheel", "touchmove", "keydown", "pointerdown"]) {
    logPre.addEventListener(kind, () => { userScrolledAt = performance.now(); }, { passive: true });
  }
  logPre.addEventListener("scroll", () => {
    if (performance.now() - userScrolledAt > 1500) return;
    logFollows = logPre.scrollHeight - logPre.scrollTop - logPre.clientHeight < 24;
  });
  if (window.ResizeObserver) new ResizeObserver(pinLog).observe(logPre);

  function appendLog(lines, { replace = false } = {}) {
    const pre = logPre;
    if (replace) pre.replaceChildren();
    pre.querySelector(".placeholder")?.remove();
    const frag = document.createDocumentFragment();
    for (const line of lines) {
      const el = h("span", { class: "ln" }, line);
      classifyLine(el);
      frag.append(el);
    }
    pre.append(frag);
    while (pre.childElementCount > MAX_LOG_LINES) pre.firstElementChild.remove();
    if (!pre.childElementCount) {
      pre.append(h("span", { class: "placeholder" },
                   "No output yet: llama-server writes here once a model starts."));
    }
    pinLog();
  }

  function followLogs() {
    follow("/swapd/logs/stream", {
      onOpen: async () => {
        setText($("logs-state"), "streaming");
        try {
          const res = await api("/swapd/logs?lines=300");
          if (res.ok) {
            const text = await res.text();
            appendLog(text.split("\n").filter((l) => l.trim()), { replace: true });
          }
        } catch { /* the stream still brings new lines */ }
      },
      onData: (line) => appendLog([String(line)]),
      onDrop: (why) => setText($("logs-state"), why === "locked" ? "key needed" : "reconnecting…"),
    });
  }

  // ------------------------------------------------------------------ actions

  async function load(name) {
    model.pending[name] = "load";
    delete model.actionError[name];
    render();
    try {
      const res = await api("/swapd/load", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model: name }),
      });
      if (!res.ok) {
        const body = await res.json().catch(() => null);
        model.actionError[name] = (body && body.error && body.error.message) || `HTTP ${res.status}`;
      }
    } catch (e) {
      model.actionError[name] = `could not reach swapd: ${e.message}`;
    } finally {
      delete model.pending[name];
      render();
      refreshStatus();
    }
  }

  async function unload(name) {
    model.pending[name] = "unload";
    render();
    try {
      const res = await api("/swapd/unload", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: name }),
      });
      if (!res.ok) model.actionError[name] = `unload failed: HTTP ${res.status}`;
    } catch (e) {
      model.actionError[name] = `could not reach swapd: ${e.message}`;
    } finally {
      delete model.pending[name];
      render();
      refreshStatus();
    }
  }

  // ------------------------------------------------------------------ start

  updateKeyButton();
  appendLog([]);
  refreshAll();
  followEvents();
  followLogs();
  setInterval(tick, TICK_MS);
  setInterval(() => {
    if (document.visibilityState === "visible") refreshStatus();
  }, POLL_MS);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") refreshStatus();
  });
})();
