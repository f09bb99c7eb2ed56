"use strict";
// The inspector page: reads /inspect/*, posts real events to /events, shows what changed.
const $ = (id) => document.getElementById(id);
let current = null, previous = {primary: null, compare: null}, meta = {compare: false, truth: false};

function status(text, kind) { const s = $("status"); s.textContent = text; s.className = kind || ""; }
function esc(v) { return String(v ?? "").replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }

async function getJson(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({}));
  if (r.status === 503) throw {state: "busy", msg: "server overloaded or model still loading: " + (body.detail || "retry shortly")};
  if (r.status === 429) throw {state: "busy", msg: "rate limited: " + (body.detail || "")};
  if (!r.ok) throw {state: "error", status: r.status, msg: typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)};
  return body;
}

function renderHistory(user) {
  const rows = user.history.map((h) => `<tr><td>${esc(h.title || h.item_id)}</td><td>${esc(h.category)}</td><td>${esc(h.publisher)}</td><td class="num">${esc(h.age_h)} h</td></tr>`);
  $("history").innerHTML = "<tr><th>title</th><th>category</th><th>publisher</th><th>age</th></tr>" + rows.join("");
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
      `<td><button class="click" data-item="${esc(it.item_id)}">click</button> <button class="hide" data-item="${esc(it.item_id)}">hide</button></td></tr>`;
  });
  const gone = before ? before.items.filter((i) => !nowIds.has(i.item_id)).map((i) => `<li class="gone">${esc(i.title || i.item_id)}</li>`) : [];
  const timings = Object.entries(feed.timings_ms).map(([k, v]) => `${k} ${v.toFixed(1)} ms`).join(" · ");
  $("feed-" + which).innerHTML = `<h2>Feed (${which}: ${esc(Object.values(feed.model_versions).join(", "))})</h2>` +
    `<p class="timings">path ${esc(feed.path)} · cache ${esc(feed.cache)} · ${timings}</p>` +
    `<table><tr><th>#</th><th>title / reason</th><th>category</th><th>score</th><th>source</th>${meta.truth ? "<th>true utility</th>" : ""}<th></th></tr>${rows.join("")}</table>` +
    (gone.length ? `<p>gone since last load:</p><ul class="gone-list">${gone.join("")}</ul>` : "");
  previous[which] = feed;
}

async function load(userId, keepPrevious) {
  if (!keepPrevious || current !== userId) previous = {primary: null, compare: null};
  current = userId; $("user").value = userId;
  status("loading " + userId + " ...", "busy");
  try {
    let note = "";
    try { renderHistory(await getJson("/inspect/user/" + encodeURIComponent(userId))); }
    catch (e) { if (e.status !== 404) throw e; note = e.msg; $("history").innerHTML = ""; $("interests").textContent = ""; }
    const wantCompare = meta.compare && $("compare").checked;
    const primary = await getJson("/inspect/feed?user_id=" + encodeURIComponent(userId));
    const compare = wantCompare ? await getJson("/inspect/feed?bundle=compare&user_id=" + encodeURIComponent(userId)) : null;
    renderFeed("primary", primary, compare);
    $("feed-compare").hidden = !compare;
    if (compare) renderFeed("compare", compare, primary);
    status(note || `user ${userId}`, note ? "error" : "");
  } catch (e) { status(e.msg || String(e), e.state || "error"); }
}

async function send(itemId, clicked) {
  const event = {user_id: current, item_id: itemId, clicked, dwell_s: clicked ? 30 : 0};
  try {
    await getJson("/events", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(event)});
    await load(current, true);
  } catch (e) { status(e.msg || String(e), e.state || "error"); }
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button.click, button.hide");
  if (b) send(b.dataset.item, b.classList.contains("click"));
});
$("pick").addEventListener("submit", (ev) => { ev.preventDefault(); if ($("user").value.trim()) load($("user").value.trim()); });
for (const kind of ["warm", "cold"]) {
  $(kind).addEventListener("click", async () => {
    try { load((await getJson("/inspect/users?kind=" + kind)).user_id); } catch (e) { status(e.msg, e.state || "error"); }
  });
}
$("compare").addEventListener("change", () => { if (current) load(current); });
getJson("/inspect/meta").then((m) => { meta = m; $("compare-toggle").hidden = !m.compare; $("compare").checked = m.compare; })
  .catch((e) => status(e.msg || String(e), e.state || "error"));
