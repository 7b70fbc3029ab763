// preflab lesson: the panels beside the voting page (voting itself is app.js's, unchanged). It polls
// /api/lesson/state, asks for a reward-model retraining after each vote (the server decides whether `every`
// new votes have arrived), and starts policy training and simulated annotators. Text goes in with textContent.
"use strict";
const lessonCsrf = () => document.querySelector('meta[name="csrf-token"]').content;

async function lessonApi(method, path, body) {
  const response = await fetch(path, {
    method, credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": lessonCsrf()},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data;
}

const $ = (id) => document.getElementById(id);
const num = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x)) ? "n/a" : Number(x).toFixed(d);
const signed = (x, d = 2) => (x >= 0 ? "+" : "") + num(x, d);
const pct = (x) => x === null || x === undefined ? "n/a" : (100 * x).toFixed(0) + "%";
const ci = (e, d = 2, sign = true) => e ? `${sign ? signed(e.mean, d) : num(e.mean, d)} [${sign ? signed(e.low, d) : num(e.low, d)}, ${sign ? signed(e.high, d) : num(e.high, d)}]` : "n/a";
const rate = (r) => r && r.rate !== null ? `${pct(r.rate)} [${pct(r.low)}, ${pct(r.high)}] of ${r.n}` : "n/a";

function row(table, cells, header = false) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement(header ? "th" : "td");
    td.textContent = c;
    tr.append(td);
  }
  table.append(tr);
  return tr;
}

function renderReward(r) {
  const s = $("reward-status");
  s.dataset.status = r.status;
  if (r.status === "never") s.textContent = `not trained yet (${r.new_votes} votes so far)`;
  else s.textContent = `job ${r.id}: ${r.status}` + (r.status === "running" ? "…" : ` on ${r.votes} votes`) +
    (r.message ? ` (${r.message})` : "") + ` · ${r.new_votes} new votes since`;
  $("reward-agreement").textContent = r.agreement ? rate(r.agreement) + " (a coin: 50%)" : "n/a";
}

function renderBiases(b) {
  const t = $("bias-table");
  t.textContent = "";
  if (!b.ready) { row(t, [b.reason || `vote at least ${b.min_votes} times (${b.votes} so far, ties left out)`]); return; }
  row(t, ["bias", "logit beyond true utility [95% CI]", "what you did"], true);
  const c = b.coefficients, coef = (x) => x ? `${signed(x.coef, 3)} [${signed(x.low, 3)}, ${signed(x.high, 3)}]${x.excludes_zero ? " *" : ""}` : "n/a (no pair differs)";
  const longer = b.prefer_longer, sure = b.prefer_confident;
  row(t, ["length (per word)", coef(c.length), `longer answer won ${rate(longer)}` +
    (longer.predicted_by_utility !== undefined ? `; the utility alone predicts ${pct(longer.predicted_by_utility)}` : "")]).id = "bias-length";
  row(t, ["position (left)", coef(c.position), `left answer won ${rate(b.prefer_left)}`]).id = "bias-position";
  row(t, ["confidence", coef(c.confidence), `confident answer won ${rate(sure)}` +
    (sure.truth_prefers !== undefined ? `; the truth prefers it ${pct(sure.truth_prefers)}` : "")]).id = "bias-confidence";
  row(t, ["true utility (slope)", coef(c.utility), `you picked the truly better answer ${rate(b.agree_with_truth)}`]).id = "bias-utility";
}

function renderPolicy(jobs) {
  const runs = $("policy-runs"), last = jobs[jobs.length - 1];
  runs.textContent = "";
  if (jobs.length) row(runs, ["#", "algorithm", "trained on", "votes", "true utility change [95% CI]", "words before → after", "KL to SFT [95% CI]"], true);
  for (const j of jobs) {
    const r = j.result;
    row(runs, [j.id, j.algorithm, j.data === "mine" ? "my votes" : "all votes", j.votes, r ? ci(r.utility_change) : j.status,
      r ? `${num(r.words_before, 1)} → ${num(r.words_after, 1)}` : "", r ? ci(r.kl, 2, false) : ""]);
  }
  const s = $("policy-status"), bar = $("policy-progress");
  if (!last) return;
  s.dataset.status = last.status;
  bar.hidden = last.status !== "running";
  bar.max = last.max_steps; bar.value = last.step;
  s.textContent = `job ${last.id} (${last.algorithm} on ${last.data === "mine" ? "my" : "all"} ${last.votes} votes): ` +
    (last.status === "running" ? `${last.phase}, step ${last.step} of ${last.max_steps}` : last.status) + (last.message ? ` — ${last.message}` : "");
  const ba = $("before-after");
  ba.hidden = !last.result;
  if (!last.result) return;
  const r = last.result, d = r.utility_change;
  $("policy-summary").classList.toggle("flag", !!r.length_warning);
  $("policy-summary").textContent = `On ${r.prompts} held-out prompts: true utility ${num(r.utility_before.mean)} → ${num(r.utility_after.mean)}, ` +
    `change ${ci(d)}; KL to the SFT policy ${ci(r.kl, 2, false)} nats; length ${num(r.words_before, 1)} → ${num(r.words_after, 1)} words ` +
    `(change ${ci(r.words_change, 1)}).` + (r.length_warning ?
    " The answers grew longer while the true utility did not rise with them: a length bias in the votes, learned." : "");
  const t = $("side-by-side");
  t.textContent = "";
  row(t, ["held-out prompt", "before (SFT)", "after"], true);
  for (const x of r.side_by_side) row(t, [x.question, `${x.before} [${signed(x.utility_before)}]`, `${x.after} [${signed(x.utility_after)}]`]);
}

let timer = null;
async function refresh() {
  clearTimeout(timer);
  try {
    const s = await lessonApi("GET", "/api/lesson/state");
    $("collected").textContent = s.collected;
    $("mine").textContent = s.mine;
    renderReward(s.reward); renderBiases(s.biases); renderPolicy(s.policy);
  } catch (e) { $("reward-status").textContent = "could not refresh: " + e.message; }
  timer = setTimeout(refresh, 2000);
}

function setupLesson() {
  if (!$("reward-panel")) return;
  $("reward-train").addEventListener("click", async () => {
    try { await lessonApi("POST", "/api/lesson/reward", {auto: false}); } catch (e) { $("reward-status").textContent = e.message; return; }
    refresh();
  });
  $("policy-train").addEventListener("click", async () => {
    try { await lessonApi("POST", "/api/lesson/policy", {algorithm: $("policy-algorithm").value, data: $("policy-data").value}); }
    catch (e) { $("policy-status").textContent = e.message; return; }
    refresh();
  });
  $("simulate-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = Object.fromEntries(new FormData(e.target).entries());
    const body = {votes: Number(f.votes), annotators: Number(f.annotators), length_bias: Number(f.length_bias), position_bias: Number(f.position_bias)};
    $("simulate-status").textContent = "adding…";
    try {
      const r = await lessonApi("POST", "/api/lesson/simulate", body);
      $("simulate-status").textContent = `added ${r.votes} votes from ${r.annotators.length} simulated annotators (sim${r.batch}-*), length bias ${r.length_bias}, position bias ${r.position_bias}`;
    } catch (err) { $("simulate-status").textContent = "not added: " + err.message; }
    try { await lessonApi("POST", "/api/lesson/reward", {auto: true}); } catch (err) { /* busy: asked again later */ }
    refresh();
  });
  // after each of the person's votes (app.js updates the counter), the server retrains when `every` votes are new
  let seen = $("mine").textContent;
  new MutationObserver(async () => {
    if ($("mine").textContent === seen) return;
    seen = $("mine").textContent;
    try { await lessonApi("POST", "/api/lesson/reward", {auto: true}); } catch (e) { /* busy: the next vote asks again */ }
    refresh();
  }).observe($("mine"), {childList: true, characterData: true, subtree: true});
  refresh();
}

document.addEventListener("DOMContentLoaded", setupLesson);
