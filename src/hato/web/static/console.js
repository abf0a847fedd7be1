// Hato's web console: the live message list, bulk actions and a message's actions.
// Plain script, no build step. It talks to the JSON API under /api/v1/ and sends the
// page's CSRF token on every state-changing request.
"use strict";

(function () {
  const API = "/api/v1";
  const EVENT_NAMES = ["accepted", "deferred", "relayed", "delivered", "bounced", "expired",
    "delayed", "held", "released", "deleted", "message", "bulk"];
  const POLL_MS = 3000;
  // Beside the event stream, a slow refresh catches changes that carry no event
  // (a retry makes a deferred message queued again).
  const SLOW_POLL_MS = 15000;

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") || "" : "";
  }

  async function send(method, url, body) {
    const headers = { "Accept": "application/json" };
    const token = csrfToken();
    if (token) {
      headers["X-CSRF-Token"] = token;
    }
    const init = { method: method, headers: headers, credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      const detail = data && (data.detail || data.title) ? (data.detail || data.title) : response.statusText;
      throw new Error(detail);
    }
    return data;
  }

  function text(tag, value, className) {
    const el = document.createElement(tag);
    el.textContent = value;
    if (className) {
      el.className = className;
    }
    return el;
  }

  function when(epoch) {
    const d = new Date(epoch * 1000);
    return d.toISOString().replace("T", " ").slice(0, 19);
  }

  // --- the message list -------------------------------------------------------------

  function startList(table) {
    const state = table.dataset.state || "";
    const q = table.dataset.q || "";
    const rows = document.getElementById("message-rows");
    const live = document.getElementById("live");
    let pending = null;
    let polling = null;

    function filter() {
      const f = {};
      if (state) { f.state = state; }
      if (q) { f.q = q; }
      return f;
    }

    async function refresh() {
      const params = new URLSearchParams(filter());
      params.set("limit", "100");
      let data;
      try {
        data = await send("GET", API + "/messages?" + params.toString());
      } catch (e) {
        live.textContent = "Cannot load messages: " + e.message;
        return;
      }
      render(data.items);
      const counts = data.counts || {};
      let all = 0;
      for (const key in counts) { all += counts[key]; }
      document.querySelectorAll("[data-count]").forEach(function (el) {
        const key = el.dataset.count;
        el.textContent = "(" + (key === "all" ? all : (counts[key] || 0)) + ")";
      });
    }

    function render(items) {
      rows.replaceChildren();
      if (!items.length) {
        const tr = document.createElement("tr");
        const td = text("td", "No messages" + (state ? " in this state" : "") + ".", "empty");
        td.colSpan = 5;
        tr.append(td);
        rows.append(tr);
        return;
      }
      for (const item of items) {
        const tr = document.createElement("tr");
        tr.dataset.id = item.id;
        tr.append(text("td", when(item.created_at)));
        tr.append(text("td", item.sender || "<>"));
        tr.append(text("td", item.recipients.join(", ")));
        const subject = document.createElement("td");
        const link = text("a", item.subject || "(no subject)");
        link.href = "/messages/" + encodeURIComponent(item.id);
        subject.append(link);
        tr.append(subject);
        const st = document.createElement("td");
        st.append(text("span", item.state, "state state-" + item.state));
        tr.append(st);
        rows.append(tr);
      }
    }

    function soon() {
      if (pending === null) {
        pending = setTimeout(function () { pending = null; refresh(); }, 150);
      }
    }

    function poll() {
      if (polling === null) {
        polling = setInterval(refresh, POLL_MS);
        table.dataset.live = "polling";
      }
    }

    function subscribe() {
      if (!("EventSource" in window)) {
        poll();
        return;
      }
      // Only what happens from now on (the list itself is read by refresh()).
      const source = new EventSource(API + "/events?since=10s");
      source.onopen = function () { table.dataset.live = "events"; };
      setInterval(function () { if (polling === null) { refresh(); } }, SLOW_POLL_MS);
      source.onmessage = soon;
      for (const name of EVENT_NAMES) {
        source.addEventListener(name, soon);
      }
      source.onerror = function () {
        // No event stream here (or it ended): poll instead, so the list stays live.
        source.close();
        poll();
      };
    }

    refresh();
    subscribe();

    const form = document.getElementById("bulk-form");
    const dialog = document.getElementById("bulk-confirm");
    const question = document.getElementById("bulk-question");
    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      const action = document.getElementById("bulk-action").value;
      let counted;
      try {
        counted = await send("POST", API + "/messages/bulk", { action: action, filter: filter(), dry_run: true });
      } catch (e) {
        live.textContent = "Cannot count the messages: " + e.message;
        return;
      }
      question.textContent = action.charAt(0).toUpperCase() + action.slice(1) + " " +
        counted.matched + " message" + (counted.matched === 1 ? "" : "s") + "?";
      document.getElementById("bulk-ok").disabled = counted.matched === 0;
      dialog.dataset.matched = String(counted.matched);
      dialog.returnValue = "";
      dialog.showModal();
      dialog.addEventListener("close", async function onClose() {
        dialog.removeEventListener("close", onClose);
        if (dialog.returnValue !== "confirm") {
          return;
        }
        try {
          const done = await send("POST", API + "/messages/bulk", { action: action, filter: filter() });
          live.textContent = action + ": " + done.done + " of " + done.matched + " message(s) done.";
        } catch (e) {
          live.textContent = action + " failed: " + e.message;
        }
        refresh();
      });
    });
  }

  // --- one message ------------------------------------------------------------------

  function startMessage(box) {
    const id = box.dataset.id;
    const result = document.getElementById("action-result");
    const base = API + "/messages/" + encodeURIComponent(id);

    async function run(label, method, url, body, after) {
      result.textContent = label + "…";
      try {
        const data = await send(method, url, body);
        result.textContent = after(data);
        return true;
      } catch (e) {
        result.textContent = label + " failed: " + e.message;
        return false;
      }
    }

    const releaseRoute = document.getElementById("release-route");
    if (releaseRoute) {
      releaseRoute.addEventListener("click", async function () {
        if (await run("Releasing", "POST", base + "/release", undefined,
          function () { return "Released: the worker sends it to the configured relay."; })) {
          setTimeout(function () { location.reload(); }, 800);
        }
      });
    }
    const releaseForm = document.getElementById("release-form");
    if (releaseForm) {
      releaseForm.addEventListener("submit", async function (event) {
        event.preventDefault();
        const body = {};
        const recipient = document.getElementById("release-recipient");
        const relay = document.getElementById("release-relay");
        if (recipient && recipient.value.trim()) { body.recipient = recipient.value.trim(); }
        if (relay && relay.value.trim()) { body.relay = relay.value.trim(); }
        await run("Releasing", "POST", base + "/release", body, function (data) {
          const r = data.results.map(function (x) { return x.recipient + ": " + x.reply_code + " " + x.reply_text; });
          return "Released to " + data.relay + " — " + r.join("; ");
        });
      });
    }
    const retry = document.getElementById("retry");
    if (retry) {
      retry.addEventListener("click", function () {
        run("Retrying", "POST", base + "/retry", undefined, function () { return "Due now: the worker tries it next."; });
      });
    }
    const del = document.getElementById("delete");
    if (del) {
      del.addEventListener("click", async function () {
        if (!window.confirm("Delete this message from the queue?")) {
          return;
        }
        if (await run("Deleting", "DELETE", base, undefined, function () { return "Deleted."; })) {
          location.href = "/";
        }
      });
    }
    const images = document.getElementById("load-images");
    if (images) {
      images.addEventListener("click", function () {
        document.getElementById("html-body").src = images.dataset.src;
        images.disabled = true;
        images.textContent = "Remote images loaded";
      });
    }
    const raw = document.getElementById("raw");
    if (raw) {
      raw.addEventListener("toggle", async function () {
        const pre = document.getElementById("raw-source");
        if (!raw.open || pre.dataset.loaded) {
          return;
        }
        const response = await fetch(pre.dataset.src, { credentials: "same-origin" });
        pre.textContent = await response.text();
        pre.dataset.loaded = "1";
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    const table = document.getElementById("messages");
    if (table) {
      startList(table);
    }
    const box = document.getElementById("message");
    if (box) {
      startMessage(box);
    }
  });
})();
