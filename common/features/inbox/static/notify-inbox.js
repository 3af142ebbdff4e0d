// <notify-inbox api-base="https://notify.example.com" token="…"></notify-inbox>
//
// The drop-in in-app inbox: a bell with the unread count, a panel of the user's messages, kept
// live by the gateway's Server-Sent Events (GET /api/v1/inbox/events). An ES module with no
// dependencies and no build step, served by the gateway at /inbox/notify-inbox.js.
//
// Attributes: api-base (the gateway's origin), token (the user's access token from
// POST /api/v1/users/{id}/token), page-size (messages per page, 1-100, default 20),
// link-target (where a message's link opens: _self, the default, or e.g. _blank).
// Events (bubbling, composed): notify-inbox:open, notify-inbox:close, notify-inbox:error
// (detail: {message, status}), notify-inbox:click (detail: {message}; cancelable: call
// preventDefault() to route the link yourself).
// Theming: the CSS custom properties below (--notify-inbox-*) and the parts bell, badge,
// panel, message, archive, mark-all-read, load-more, empty.

const STYLE = `
:host {
  --_accent: var(--notify-inbox-accent, #4f46e5);
  --_bg: var(--notify-inbox-bg, #ffffff);
  --_fg: var(--notify-inbox-fg, #111827);
  --_muted: var(--notify-inbox-muted, #6b7280);
  --_border: var(--notify-inbox-border, #e5e7eb);
  --_unread-bg: var(--notify-inbox-unread-bg, #eef2ff);
  --_hover-bg: var(--notify-inbox-hover-bg, #f3f4f6);
  --_badge-bg: var(--notify-inbox-badge-bg, #dc2626);
  --_badge-fg: var(--notify-inbox-badge-fg, #ffffff);
  --_radius: var(--notify-inbox-radius, 12px);
  --_shadow: var(--notify-inbox-shadow, 0 12px 32px rgba(17, 24, 39, 0.18));
  display: inline-block;
  position: relative;
  font-family: var(--notify-inbox-font, system-ui, -apple-system, "Segoe UI", Roboto, sans-serif);
  color: var(--_fg);
  line-height: 1.4;
}
[hidden] { display: none !important; }
button { font: inherit; color: inherit; }
.bell {
  position: relative; display: inline-flex; align-items: center; justify-content: center;
  width: 40px; height: 40px; padding: 0; border: 1px solid var(--_border); border-radius: 50%;
  background: var(--_bg); color: var(--notify-inbox-bell-fg, var(--_fg)); cursor: pointer;
}
.bell:hover { background: var(--_hover-bg); }
.bell svg { width: 22px; height: 22px; }
:focus-visible { outline: 2px solid var(--_accent); outline-offset: 2px; }
.badge {
  position: absolute; top: -4px; right: -4px; min-width: 18px; height: 18px; padding: 0 5px;
  box-sizing: border-box; border-radius: 9px; background: var(--_badge-bg); color: var(--_badge-fg);
  font-size: 11px; font-weight: 700; line-height: 18px; text-align: center;
}
.panel {
  position: fixed; z-index: var(--notify-inbox-z, 1000); box-sizing: border-box;
  width: min(380px, 100vw - 16px); max-width: min(380px, 100vw - 16px);
  display: flex; flex-direction: column; overflow: hidden;
  background: var(--_bg); color: var(--_fg); border: 1px solid var(--_border);
  border-radius: var(--_radius); box-shadow: var(--_shadow);
}
.head {
  display: flex; align-items: center; justify-content: space-between; gap: 8px;
  padding: 12px 14px; border-bottom: 1px solid var(--_border);
}
.head h2 { margin: 0; font-size: 15px; font-weight: 650; }
.link-button {
  border: 0; background: none; padding: 4px 6px; border-radius: 6px; cursor: pointer;
  color: var(--_accent); font-size: 13px; font-weight: 550;
}
.link-button:hover { background: var(--_hover-bg); }
.link-button:disabled { color: var(--_muted); cursor: default; background: none; }
.list { list-style: none; margin: 0; padding: 0; overflow-y: auto; overscroll-behavior: contain; }
.message {
  position: relative; display: flex; gap: 10px; padding: 12px 14px; cursor: pointer;
  border-bottom: 1px solid var(--_border); outline-offset: -2px;
}
.message:hover { background: var(--_hover-bg); }
.message[data-read="false"] { background: var(--_unread-bg); }
.marker { flex: none; width: 8px; height: 8px; margin-top: 6px; border-radius: 50%; background: transparent; }
.message[data-read="false"] .marker { background: var(--_accent); }
.content { flex: 1; min-width: 0; }
.title { margin: 0; font-size: 14px; font-weight: 600; overflow-wrap: anywhere; }
.message[data-read="true"] .title { font-weight: 500; }
.body { margin: 2px 0 0; font-size: 13px; color: var(--_fg); opacity: 0.85; overflow-wrap: anywhere;
  display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden; }
.time { display: block; margin-top: 4px; font-size: 12px; color: var(--_muted); }
.image { display: block; max-width: 100%; max-height: 160px; margin-top: 6px; border-radius: 8px; object-fit: cover; }
.archive {
  flex: none; align-self: flex-start; width: 28px; height: 28px; padding: 0; border: 0;
  border-radius: 6px; background: none; color: var(--_muted); cursor: pointer;
}
.archive:hover { background: var(--_border); color: var(--_fg); }
.archive svg { width: 16px; height: 16px; }
.empty, .error { margin: 0; padding: 28px 14px; text-align: center; color: var(--_muted); font-size: 14px; }
.error { padding: 8px 14px; color: var(--_badge-bg); font-size: 13px; }
.more { display: block; width: 100%; padding: 10px; border-top: 1px solid var(--_border); border-radius: 0; }
.sr-only { position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; overflow: hidden;
  clip: rect(0 0 0 0); white-space: nowrap; border: 0; }
`;

const BELL_SVG = `<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="1.8"
  stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><path d="M6 8a6 6 0 1 1 12 0c0 7 3 9 3 9H3s3-2 3-9"/>
  <path d="M10.3 21a1.94 1.94 0 0 0 3.4 0"/></svg>`;
const ARCHIVE_SVG = `<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2"
  stroke-linecap="round" stroke-linejoin="round" aria-hidden="true"><rect x="3" y="4" width="18" height="4" rx="1"/>
  <path d="M5 8v11a1 1 0 0 0 1 1h12a1 1 0 0 0 1-1V8"/><path d="M10 12h4"/></svg>`;

// Fixed markup only: nothing of a message ever goes through innerHTML.
const MARKUP = `<style>${STYLE}</style>
<button part="bell" class="bell" type="button" aria-label="Notifications" aria-expanded="false"
  aria-haspopup="dialog" aria-controls="panel">${BELL_SVG}<span class="live" aria-live="polite"
  aria-atomic="true"><span part="badge" class="badge" aria-hidden="true" hidden></span><span class="sr-only"></span></span></button>
<section part="panel" class="panel" id="panel" role="dialog" aria-label="Notifications" hidden>
  <div class="head"><h2>Notifications</h2>
    <button part="mark-all-read" class="link-button mark-all" type="button">Mark all as read</button></div>
  <p class="error" role="status" hidden></p>
  <ul class="list" aria-label="Messages"></ul>
  <p part="empty" class="empty" hidden>You have no notifications.</p>
  <button part="load-more" class="link-button more" type="button" hidden>Load more</button>
</section>`;

const API = "/api/v1/inbox";
const BACKOFF_FIRST = 1000;
const BACKOFF_MAX = 30000;

function isWebUrl(value) {
  if (typeof value !== "string" || value === "") return false;
  try {
    const url = new URL(value);
    return url.protocol === "http:" || url.protocol === "https:";
  } catch {
    return false;
  }
}

// A message's title and body are the template's HTML (autoescaped): shown as their text, parsed in an inert document
// (nothing in it runs or loads) and never inserted as markup.
function plainText(html) {
  if (typeof html !== "string" || html === "") return "";
  if (!/[<&]/.test(html)) return html;
  const doc = new DOMParser().parseFromString(html, "text/html");
  return (doc.body.textContent || "").replace(/\s+/g, " ").trim();
}

const UNITS = [
  ["year", 31536000], ["month", 2592000], ["week", 604800],
  ["day", 86400], ["hour", 3600], ["minute", 60],
];

function relativeTime(iso, now = Date.now()) {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return "";
  const seconds = Math.round((then - now) / 1000);
  const format = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  for (const [unit, size] of UNITS) {
    if (Math.abs(seconds) >= size) return format.format(Math.trunc(seconds / size), unit);
  }
  return Math.abs(seconds) < 45 ? "just now" : format.format(seconds, "second");
}

class ApiFailure extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export class NotifyInbox extends HTMLElement {
  static get observedAttributes() {
    return ["api-base", "token", "page-size"];
  }

  constructor() {
    super();
    const root = this.attachShadow({ mode: "open" });
    root.innerHTML = MARKUP;
    this._bell = root.querySelector(".bell");
    this._badge = root.querySelector(".badge");
    this._spoken = root.querySelector(".sr-only");
    this._panel = root.querySelector(".panel");
    this._list = root.querySelector(".list");
    this._empty = root.querySelector(".empty");
    this._more = root.querySelector(".more");
    this._markAll = root.querySelector(".mark-all");
    this._error = root.querySelector(".error");
    this._items = new Map(); // message id -> {message, el}
    this._generation = 0; // bumped on every restart: late answers of an older one are dropped
    this._source = null;
    this._retryTimer = null;
    this._clockTimer = null;
    this._backoff = BACKOFF_FIRST;
    this._lastEventId = null;
    this._next = null;
    this._loaded = false;
    this._unread = 0;
    this._started = false;
    this._restartQueued = false;

    this._bell.addEventListener("click", () => this.toggle());
    this._markAll.addEventListener("click", () => this.markAllRead());
    this._more.addEventListener("click", () => this.loadMore());
    this._panel.addEventListener("keydown", (event) => this._panelKey(event));
    this._onDocumentKey = (event) => {
      if (event.key === "Escape" && this.open) {
        event.preventDefault();
        this.close();
        this._bell.focus();
      }
    };
    this._onDocumentPointer = (event) => {
      if (this.open && !event.composedPath().includes(this)) this.close();
    };
    this._onResize = () => this._place();
    this._onOnline = () => {
      if (!this._source && this._retryTimer) this._reconnectSoon(0);
    };
  }

  get open() {
    return !this._panel.hidden;
  }

  get unread() {
    return this._unread;
  }

  connectedCallback() {
    document.addEventListener("keydown", this._onDocumentKey);
    document.addEventListener("pointerdown", this._onDocumentPointer);
    window.addEventListener("resize", this._onResize);
    window.addEventListener("online", this._onOnline);
    this._clockTimer = setInterval(() => this._refreshTimes(), 60000);
    this._started = true;
    this._restart();
  }

  disconnectedCallback() {
    document.removeEventListener("keydown", this._onDocumentKey);
    document.removeEventListener("pointerdown", this._onDocumentPointer);
    window.removeEventListener("resize", this._onResize);
    window.removeEventListener("online", this._onOnline);
    clearInterval(this._clockTimer);
    this._started = false;
    this._stop();
  }

  attributeChangedCallback(name, before, after) {
    // An upgrade reports every attribute before connectedCallback, which starts once anyway.
    if (before === after || !this._started) return;
    // Several attributes set in a row restart once.
    if (!this._restartQueued) {
      this._restartQueued = true;
      queueMicrotask(() => {
        this._restartQueued = false;
        if (this._started) this._restart();
      });
    }
  }

  // --- configuration ---------------------------------------------------------------------------

  get _base() {
    return (this.getAttribute("api-base") || "").replace(/\/+$/, "");
  }

  get _token() {
    return this.getAttribute("token") || "";
  }

  get _pageSize() {
    const size = parseInt(this.getAttribute("page-size") || "", 10);
    return Number.isFinite(size) && size >= 1 && size <= 100 ? size : 20;
  }

  _stop() {
    this._generation += 1;
    if (this._source) this._source.close();
    this._source = null;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  _restart() {
    this._stop();
    this._items.clear();
    this._list.replaceChildren();
    this._lastEventId = null;
    this._next = null;
    this._loaded = false;
    this._backoff = BACKOFF_FIRST;
    this._setUnread(0);
    this._showError("");
    this._renderChrome();
    if (!this._base || !this._token) return;
    this._connect(this._generation);
  }

  // --- the API ---------------------------------------------------------------------------------

  async _api(path, method = "GET") {
    const generation = this._generation;
    let response;
    try {
      response = await fetch(this._base + API + path, {
        method,
        mode: "cors",
        credentials: "omit",
        headers: { Authorization: `Bearer ${this._token}`, Accept: "application/json" },
        keepalive: method !== "GET",
      });
    } catch {
      throw new ApiFailure("The notification service cannot be reached.", 0);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (generation !== this._generation) throw new ApiFailure("superseded", -1);
    if (!response.ok) {
      const message = body && body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
      throw new ApiFailure(message, response.status);
    }
    return body || {};
  }

  _failed(error) {
    if (error instanceof ApiFailure && error.status === -1) return; // an older configuration's
    const message = error instanceof Error ? error.message : String(error);
    this._showError(message);
    this.dispatchEvent(
      new CustomEvent("notify-inbox:error", {
        bubbles: true,
        composed: true,
        detail: { message, status: error instanceof ApiFailure ? error.status : 0 },
      }),
    );
  }

  _showError(message) {
    this._error.textContent = message;
    this._error.hidden = !message;
  }

  // --- live: tickets and the event stream ------------------------------------------------------

  async _connect(generation) {
    let ticket;
    try {
      ticket = (await this._api("/tickets", "POST")).data.ticket;
    } catch (error) {
      if (generation !== this._generation) return;
      if (error instanceof ApiFailure && (error.status === 401 || error.status === 403)) {
        this._failed(error); // a wrong or expired token: retrying will not help
        return;
      }
      this._scheduleReconnect(generation);
      return;
    }
    if (generation !== this._generation) return;
    const query = new URLSearchParams({ ticket });
    if (this._lastEventId !== null) query.set("last_event_id", this._lastEventId);
    const source = new EventSource(`${this._base}${API}/events?${query}`);
    this._source = source;
    let opened = false;
    const track = (event) => {
      if (event.lastEventId) this._lastEventId = event.lastEventId;
    };
    source.addEventListener("counts", (event) => {
      if (generation !== this._generation) return;
      track(event);
      const counts = JSON.parse(event.data);
      this._setUnread(counts.unread);
      if (!opened) {
        opened = true;
        this._backoff = BACKOFF_FIRST;
        this._showError("");
        if (!this._loaded) this._loadFirstPage(generation);
      }
    });
    source.addEventListener("message", (event) => {
      if (generation !== this._generation) return;
      track(event);
      this._prepend(JSON.parse(event.data));
    });
    source.addEventListener("message.updated", (event) => {
      if (generation !== this._generation) return;
      track(event);
      this._updated(JSON.parse(event.data));
    });
    source.addEventListener("reset", (event) => {
      if (generation !== this._generation) return;
      track(event);
      this._reload(generation);
    });
    // A ticket is single use: EventSource's own reconnect would present a spent one. Close it
    // and come back with a new ticket and the last event id.
    source.addEventListener("error", () => {
      if (generation !== this._generation || this._source !== source) return;
      source.close();
      this._source = null;
      this._scheduleReconnect(generation);
    });
  }

  _scheduleReconnect(generation) {
    const delay = this._backoff / 2 + Math.random() * (this._backoff / 2); // jitter: 50-100 %
    this._backoff = Math.min(this._backoff * 2, BACKOFF_MAX);
    this._reconnectSoon(delay, generation);
  }

  _reconnectSoon(delay, generation = this._generation) {
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (generation === this._generation && !this._source) this._connect(generation);
    }, delay);
  }

  // --- the list --------------------------------------------------------------------------------

  async _loadFirstPage(generation) {
    this._loaded = true;
    try {
      const page = await this._api(`/messages?status=all&archived=false&limit=${this._pageSize}`);
      if (generation !== this._generation) return;
      for (const message of page.data) this._append(message);
      this._next = page.meta && page.meta.has_next ? page.meta.next : null;
    } catch (error) {
      this._loaded = false;
      if (generation === this._generation) this._failed(error);
    }
    this._renderChrome();
  }

  async _reload(generation) {
    this._items.clear();
    this._list.replaceChildren();
    this._next = null;
    await this._loadFirstPage(generation);
  }

  async loadMore() {
    if (this._next === null) return;
    const generation = this._generation;
    this._more.disabled = true;
    try {
      const after = encodeURIComponent(this._next);
      const page = await this._api(
        `/messages?status=all&archived=false&limit=${this._pageSize}&after=${after}`,
      );
      for (const message of page.data) this._append(message);
      this._next = page.meta && page.meta.has_next ? page.meta.next : null;
    } catch (error) {
      if (generation === this._generation) this._failed(error);
    } finally {
      this._more.disabled = false;
      this._renderChrome();
    }
  }

  async markAllRead() {
    const generation = this._generation;
    this._markAll.disabled = true;
    try {
      const counts = (await this._api("/read-all", "POST")).data;
      for (const item of this._items.values()) this._setRead(item, true);
      if (counts) this._setUnread(counts.unread);
    } catch (error) {
      if (generation === this._generation) this._failed(error);
    } finally {
      this._markAll.disabled = false;
      this._renderChrome();
    }
  }

  async archive(id) {
    const item = this._items.get(id);
    if (!item) return;
    try {
      await this._api(`/messages/${encodeURIComponent(id)}/archive`, "POST");
      this._remove(id);
    } catch (error) {
      this._failed(error);
    }
  }

  async markRead(id) {
    const item = this._items.get(id);
    if (!item || item.message.read_at) return;
    this._setRead(item, true);
    try {
      const message = (await this._api(`/messages/${encodeURIComponent(id)}/read`, "POST")).data;
      if (message) this._updated(message);
    } catch (error) {
      this._failed(error);
    }
  }

  async _activate(id) {
    const item = this._items.get(id);
    if (!item) return;
    const message = item.message;
    const read = this.markRead(id);
    const clicked = new CustomEvent("notify-inbox:click", {
      bubbles: true,
      composed: true,
      cancelable: true,
      detail: { message },
    });
    if (!this.dispatchEvent(clicked) || !isWebUrl(message.link)) return;
    const target = this.getAttribute("link-target") || "_self";
    if (target === "_self") {
      await read; // the read is sent before the page goes (keepalive carries it in any case)
      window.location.assign(message.link);
    } else {
      window.open(message.link, target, "noopener,noreferrer");
    }
  }

  _prepend(message) {
    if (!message || !message.id) return;
    if (this._items.has(message.id)) {
      this._updated(message);
      return;
    }
    if (message.archived_at) return;
    const item = this._build(message);
    // Newest first: before the first one older than it (a page and the stream may interleave).
    const created = Date.parse(message.created_at) || Infinity;
    const older = [...this._list.children].find((el) => {
      const other = this._items.get(el.dataset.id);
      return other && (Date.parse(other.message.created_at) || 0) < created;
    });
    if (older) this._list.insertBefore(item.el, older);
    else if (this._next === null || this._items.size === 1) this._list.append(item.el);
    else this._items.delete(message.id); // older than all shown with more to load: it comes with them
    this._renderChrome();
  }

  _append(message) {
    if (!message || !message.id || message.archived_at) return;
    if (this._items.has(message.id)) {
      this._updated(message);
      return;
    }
    const item = this._build(message);
    this._list.append(item.el);
  }

  _updated(change) {
    if (change && change.all) {
      if (change.change === "read") for (const item of this._items.values()) this._setRead(item, true);
      return;
    }
    const item = change && this._items.get(change.id);
    if (!item) return;
    if (change.archived_at) {
      this._remove(change.id);
      return;
    }
    item.message = change;
    this._setRead(item, Boolean(change.read_at));
  }

  _remove(id) {
    const item = this._items.get(id);
    if (!item) return;
    const focused = this.shadowRoot.activeElement;
    const next = item.el.nextElementSibling || item.el.previousElementSibling;
    item.el.remove();
    this._items.delete(id);
    if (focused && item.el.contains(focused)) (next || this._bell).focus();
    this._renderChrome();
  }

  _setRead(item, read) {
    if (read && !item.message.read_at) item.message = { ...item.message, read_at: new Date().toISOString() };
    if (!read) item.message = { ...item.message, read_at: null };
    item.el.dataset.read = String(read);
    item.status.textContent = read ? "" : "Unread. ";
  }

  _build(message) {
    const el = document.createElement("li");
    el.className = "message";
    el.setAttribute("part", "message");
    el.tabIndex = 0;
    el.dataset.id = message.id;
    el.dataset.read = String(Boolean(message.read_at));

    const marker = document.createElement("span");
    marker.className = "marker";
    marker.setAttribute("aria-hidden", "true");

    const content = document.createElement("div");
    content.className = "content";
    const status = document.createElement("span");
    status.className = "sr-only";
    status.textContent = message.read_at ? "" : "Unread. ";
    const title = document.createElement("p");
    title.className = "title";
    title.textContent = plainText(message.title);
    content.append(status, title);
    const text = plainText(message.body);
    if (text) {
      const body = document.createElement("p");
      body.className = "body";
      body.textContent = text;
      content.append(body);
    }
    if (isWebUrl(message.image_url)) {
      const image = document.createElement("img");
      image.className = "image";
      image.setAttribute("part", "image");
      image.alt = "";
      image.loading = "lazy";
      image.referrerPolicy = "no-referrer";
      image.src = message.image_url;
      content.append(image);
    }
    const time = document.createElement("time");
    time.className = "time";
    time.dateTime = message.created_at || "";
    time.textContent = relativeTime(message.created_at);
    content.append(time);

    const archive = document.createElement("button");
    archive.type = "button";
    archive.className = "archive";
    archive.setAttribute("part", "archive");
    archive.setAttribute("aria-label", `Archive: ${plainText(message.title) || "message"}`);
    archive.title = "Archive";
    archive.innerHTML = ARCHIVE_SVG; // fixed markup
    archive.addEventListener("click", (event) => {
      event.stopPropagation();
      this.archive(message.id);
    });

    el.append(marker, content, archive);
    el.addEventListener("click", () => this._activate(message.id));
    el.addEventListener("keydown", (event) => {
      if (event.target !== el) return;
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        this._activate(message.id);
      }
    });
    const item = { message, el, status, time };
    this._items.set(message.id, item);
    return item;
  }

  _refreshTimes() {
    for (const item of this._items.values()) item.time.textContent = relativeTime(item.message.created_at);
  }

  _renderChrome() {
    const none = this._items.size === 0;
    this._empty.hidden = !(none && this._loaded);
    this._more.hidden = this._next === null;
  }

  _setUnread(count) {
    const unread = Math.max(0, Number(count) || 0);
    this._unread = unread;
    this._badge.textContent = unread > 99 ? "99+" : String(unread);
    this._badge.hidden = unread === 0;
    const words = unread === 0 ? "" : `${unread} unread`;
    this._spoken.textContent = words;
    this._bell.setAttribute("aria-label", words ? `Notifications, ${words}` : "Notifications");
  }

  // --- the panel -------------------------------------------------------------------------------

  toggle() {
    if (this.open) this.close();
    else this.show();
  }

  show() {
    if (this.open) return;
    this._panel.hidden = false;
    this._bell.setAttribute("aria-expanded", "true");
    this._place();
    this._refreshTimes();
    this.dispatchEvent(new CustomEvent("notify-inbox:open", { bubbles: true, composed: true }));
  }

  close() {
    if (!this.open) return;
    this._panel.hidden = true;
    this._bell.setAttribute("aria-expanded", "false");
    this.dispatchEvent(new CustomEvent("notify-inbox:close", { bubbles: true, composed: true }));
  }

  // Fixed to the viewport under the bell, kept inside it whatever the bell's place on the page.
  _place() {
    if (!this.open) return;
    const bell = this._bell.getBoundingClientRect();
    const width = this._panel.offsetWidth;
    const margin = 8;
    const left = Math.min(Math.max(bell.right - width, margin), window.innerWidth - width - margin);
    const top = bell.bottom + margin;
    this._panel.style.left = `${Math.max(left, 0)}px`;
    this._panel.style.top = `${top}px`;
    this._panel.style.maxHeight = `${Math.max(window.innerHeight - top - margin, 160)}px`;
  }

  _panelKey(event) {
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    const items = [...this._list.children];
    const at = items.indexOf(this.shadowRoot.activeElement);
    if (at === -1 && items.length === 0) return;
    event.preventDefault();
    const next = event.key === "ArrowDown" ? Math.min(at + 1, items.length - 1) : Math.max(at - 1, 0);
    items[next].focus();
  }
}

if (!customElements.get("notify-inbox")) customElements.define("notify-inbox", NotifyInbox);
