"use strict";
// The inspector page: reads /inspect/*, posts real events to /events, shows what changed.
const $ = (id) => document.getElementById(id);
let current = null, previous = {primary: null, compare: null}, meta = {compare: false, truth: false};

function status(text, kind) { const s = $("status"); s.textContent = text; s.className = kind || ""; }
function esc(v) { return String(v ?? "").replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }

// Each refusal becomes one clear state on the page: busy (429, 503: retry later), error (4xx, 5xx),
// down (no answer at all).
async function getJson(url, options) {
  let r;
  try { r = await fetch(url, options); }
  catch (e) { throw {state: "error", msg: "server unreachable: " + (e.message || e)}; }
  const body = await r.json().catch(() => ({}));
  const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? "");
  const after = r.headers.get("Retry-After");
  const retry = after && !/retry in/.test(detail) ? ` (retry in ${after} s)` : "";
  if (r.status === 429) throw {state: "busy", status: 429, msg: `server overloaded (429): ${detail}${retry}`};
  if (r.status === 503) throw {state: "busy", status: 503, msg: `service unavailable (503): ${detail || "retry shortly"}${retry}`};
  if (!r.ok) throw {state: "error", status: r.status, msg: `${r.status}: ${detail}`};
  return body;
}

function renderHistory(user) {
  const rows = user.history.map((h) => `<tr data-item="${esc(h.item_id)}"><td>${esc(h.title || h.item_id)}</td><td>${esc(h.category)}</td><td>${esc(h.publisher)}</td><td class="num">${h.age_h == null ? "" : esc(h.age_h) + "&nbsp;h"}</td><td class="num">${h.dwell_s == null ? "" : esc(h.dwell_s) + "&nbsp;s"}</td></tr>`);
  $("history").innerHTML = "<tr><th>title</th><th>category</th><th>publisher</th><th>age</th><th>dwell</th></tr>" + rows.join("");
  $("interests").innerHTML = user.interests ? "<b>true interests:</b> " + user.interests.map((t) => `${esc(t.topic)} ${t.weight}`).join(", ") : "";
}

function renderFeed(which, feed, other) {
  const before = previous[which], otherIds = new Set(other ? other.items.map((i) => i.item_id) : []);
  const oldRank = new Map(before ? before.items.map((i, n) => [i.item_id, n]) : []);
  const nowIds = new Set(feed.items.map((i) => i.item_id));
  const rows = feed.items.map((it, n) => {
    const cls = [];
    if (otherIds.has(it.item_id)) cls.push("both");
    if (before && !oldRank.has(it.item_id)) cls.push("new");
    else if (before && oldRank.get(it.item_id) > n) cls.push("moved-up");
    else if (before && oldRank.get(it.item_id) < n) cls.push("moved-down");
    const truth = meta.truth ? `<td class="num">${esc(it.true_utility)}</td>` : "";
    return `<tr class="${cls.join(" ")}" data-item="${esc(it.item_id)}"><td class="num">${n + 1}</td><td>${esc(it.title || it.item_id)}<div class="reason">${esc(it.reason)}</div></td>` +
      `<td>${esc(it.category)}</td><td class="num">${it.score.toFixed(3)}</td><td>${esc(it.source)}</td>${truth}` +
      `<td><button class="click" data-item="${esc(it.item_id)}" data-rank="${n}">click</button> <button class="hide" data-item="${esc(it.item_id)}" data-rank="${n}">hide</button></td></tr>`;
  });
  const gone = before ? before.items.filter((i) => !nowIds.has(i.item_id)).map((i) => `<li class="gone" data-item="${esc(i.item_id)}">${esc(i.title || i.item_id)}</li>`) : [];
  const timings = Object.entries(feed.timings_ms).map(([k, v]) => `${k} ${v.toFixed(1)} ms`).join(" · ");
  $("feed-" + which).innerHTML = `<h2>Feed (${which}: ${esc(Object.entries(feed.model_versions).map(([k, v]) => k + " " + String(v).slice(0, 12)).join(", "))})</h2>` +
    `<p class="timings">path ${esc(feed.path)} · cache ${esc(feed.cache)} · ${timings}</p>` +
    `<table><tr><th>#</th><th>title / reason</th><th>category</th><th>score</th><th>source</th>${meta.truth ? "<th>true utility</th>" : ""}<th></th></tr>${rows.join("")}</table>` +
    (gone.length ? `<p>gone since last load:</p><ul class="gone-list">${gone.join("")}</ul>` : "");
  previous[which] = feed;
}

// A load answered after a newer one started (two quick presses) is dropped, not drawn over it.
// When a load is drawn, #feeds carries data-user and a rising data-loads: what a test waits on.
let loads = 0;
async function load(userId, keepPrevious) {
  if (!keepPrevious || current !== userId) previous = {primary: null, compare: null};
  const mine = ++loads;
  current = userId; $("user").value = userId;
  status("loading " + userId + " ...", "busy");
  try {
    let note = "", user = null;
    try { user = await getJson("/inspect/user/" + encodeURIComponent(userId)); }
    catch (e) { if (e.status !== 404) throw e; note = e.msg.replace(/^404: /, ""); }
    const wantCompare = meta.compare && $("compare").checked;
    const primary = await getJson("/inspect/feed?user_id=" + encodeURIComponent(userId));
    const compare = wantCompare ? await getJson("/inspect/feed?bundle=compare&user_id=" + encodeURIComponent(userId)) : null;
    if (mine !== loads) return;
    if (user) renderHistory(user); else { $("history").innerHTML = ""; $("interests").textContent = ""; }
    renderFeed("primary", primary, compare);
    $("feed-compare").hidden = !compare;
    if (compare) renderFeed("compare", compare, primary);
    $("feeds").dataset.user = userId; $("feeds").dataset.loads = String(mine);
    status(note || `user ${userId}`, note ? "error" : "");
  } catch (e) { if (mine === loads) status(e.msg || String(e), e.state || "error"); }
}

// "click" is a click read for 30 s; "hide" is the user hiding the item. position: its 0-based rank.
async function send(itemId, clicked, position) {
  const event = {user_id: current, item_id: itemId, clicked, hidden: !clicked, dwell_s: clicked ? 30 : 0, position};
  try {
    await getJson("/events", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(event)});
    await load(current, true);
  } catch (e) { status(e.msg || String(e), e.state || "error"); }
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button.click, button.hide");
  if (b) send(b.dataset.item, b.classList.contains("click"), Number(b.dataset.rank));
});
$("pick").addEventListener("submit", (ev) => { ev.preventDefault(); if ($("user").value.trim()) load($("user").value.trim()); });
// /?seed=N makes the random buttons reproducible: the n-th press asks for seed N + n.
const seed = new URLSearchParams(location.search).get("seed");
let presses = 0;
for (const kind of ["warm", "cold"]) {
  $(kind).addEventListener("click", async () => {
    const fixed = seed === null ? "" : "&seed=" + (Number(seed) + presses++);
    try { load((await getJson("/inspect/users?kind=" + kind + fixed)).user_id); } catch (e) { status(e.msg, e.state || "error"); }
  });
}
$("compare").addEventListener("change", () => { if (current) load(current); });

// Until /inspect/meta answers (a 503 while the models load), say so and ask again.
async function start() {
  try {
    meta = await getJson("/inspect/meta");
  } catch (e) {
    status(e.msg || String(e), e.state || "error");
    if (e.status === 503 || e.status === 429) setTimeout(start, 1000);
    return;
  }
  $("compare-toggle").hidden = !meta.compare; $("compare").checked = meta.compare;
  const names = {report: "evaluation report", labs: "labs"};
  for (const [name, url] of Object.entries(meta.pages || {})) {
    if (url) $("links").insertAdjacentHTML("beforeend", ` <a id="link-${name}" href="${esc(url)}">${names[name] || name}</a>`);
  }
  document.body.dataset.ready = "true";
  status("ready: open a user", "");
}
start();
