// preflab collect: the page's only script. It talks to the same JSON API as any other client, sending the
// CSRF token from the page with each write. Text goes in with textContent, never innerHTML.
"use strict";
const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

async function api(method, path, body) {
  const response = await fetch(path, {
    method, credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data;
}

function showPrompt(el, prompt) {
  el.textContent = "";
  if (Array.isArray(prompt)) {
    for (const m of prompt) {
      const div = document.createElement("div"), b = document.createElement("b");
      div.className = "msg"; b.textContent = m.role + ": ";
      div.append(b, document.createTextNode(m.content));
      el.append(div);
    }
  } else el.textContent = prompt || "";
}

function setupVoting() {
  const section = document.getElementById("pair");
  if (!section) return;
  let busy = false;
  const status = document.getElementById("status");
  async function vote(choice) {
    const pairId = Number(section.dataset.pairId);
    if (busy || !pairId || section.hidden) return;
    busy = true; status.textContent = "saving…";
    const clientId = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2));
    try {
      const body = {pair_id: pairId, choice, rationale: document.getElementById("rationale").value, client_id: clientId};
      let tries = 0;
      for (;;) {  // a retry with the same client_id is stored once
        try { await api("POST", "/api/votes", body); break; }
        catch (e) { if (++tries >= 3 || !(e instanceof TypeError)) throw e; }
      }
      const [stats, next] = await Promise.all([api("GET", "/api/stats"), api("GET", "/api/next")]);
      document.getElementById("collected").textContent = stats.collected;
      document.getElementById("mine").textContent = stats.mine;
      document.getElementById("rationale").value = "";
      if (next.done) { section.hidden = true; document.getElementById("done").hidden = false; }
      else {
        section.dataset.pairId = next.pair_id;
        showPrompt(document.getElementById("prompt"), next.prompt);
        document.getElementById("left").textContent = next.left;
        document.getElementById("right").textContent = next.right;
      }
      status.textContent = "saved";
    } catch (e) { status.textContent = "not saved: " + e.message; }
    busy = false;
  }
  const keys = {"1": "left", "2": "right", "3": "tie", "4": "both_bad"};
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (keys[e.key]) { e.preventDefault(); vote(keys[e.key]); }
  });
  for (const b of section.querySelectorAll("button[data-choice]")) b.addEventListener("click", () => vote(b.dataset.choice));
}

function setupAuthor() {
  const form = document.getElementById("author-form");
  if (!form) return;
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const status = document.getElementById("author-status");
    const body = Object.fromEntries(new FormData(form).entries());
    try {
      await api("POST", "/api/authored", body);
      const n = document.getElementById("authored");
      n.textContent = Number(n.textContent) + 1;
      form.reset(); status.textContent = "saved";
    } catch (err) { status.textContent = "not saved: " + err.message; }
  });
}

function setupAdmin() {
  const button = document.getElementById("train");
  if (!button) return;
  const status = document.getElementById("train-status");
  async function poll() {
    const s = await api("GET", "/api/admin/train");
    status.dataset.status = s.status;
    status.textContent = `job ${s.id}: ${s.status}` + (s.accuracy !== null ? `, held-out agreement ${s.accuracy.toFixed(3)} on ${s.held_out} votes` : "") + (s.message ? " " + s.message : "");
    if (s.status === "running") setTimeout(poll, 2000);
  }
  button.addEventListener("click", async () => {
    try { await api("POST", "/api/admin/train"); poll(); } catch (e) { status.textContent = e.message; }
  });
  if (status.dataset.status === "running") poll();
}

document.addEventListener("DOMContentLoaded", () => { setupVoting(); setupAuthor(); setupAdmin(); });
