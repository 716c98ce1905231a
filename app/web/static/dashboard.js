// The dashboard: per-version quality, the Bradley-Terry leaderboard, plots, training runs.
import { api, el, percent, say, signIn, when } from "./common.js";

const $ = (id) => document.getElementById(id);
const REFRESH_SECONDS = 15;
const COLORS = ["#2f6fde", "#18864b", "#c2362b", "#9a6a00", "#7a44c9", "#0f8a8a", "#b4487a"];

const state = { me: null, runs: [], charts: {}, selectedRun: null, confirming: null };

// ---- tables ----

function interval(low, high, digits, scale = 1) {
  if (low === null || low === undefined) return "";
  return ` (${(low * scale).toFixed(digits)}–${(high * scale).toFixed(digits)})`;
}

function versionRow(stats, model) {
  const approval =
    stats.approval_rate === null
      ? "–"
      : `${percent(stats.approval_rate)}${interval(...(stats.approval_ci || []), 1, 100)}`;
  const cells = [
    el("td", {}, el("strong", {}, stats.name), model && model.serving ? " · serving" : ""),
    el("td", {}, el("span", { class: `badge ${stats.status}` }, stats.status)),
    el("td", { class: "num" }, stats.generations),
    el("td", { class: "num" }, stats.ratings),
    el("td", { class: "num" }, approval, ` · n=${stats.approvals + stats.disapprovals}`),
    el("td", { class: "num" }, stats.mean_stars === null ? "–" : stats.mean_stars.toFixed(2)),
    el(
      "td",
      { class: "num" },
      stats.win_rate === null ? "–" : `${percent(stats.win_rate)} of ${stats.comparisons}`,
    ),
  ];
  if (state.me.role === "admin") {
    const button =
      stats.status === "active"
        ? el("span", { class: "meta" }, "active")
        : el("button", { type: "button", onclick: (e) => activate(stats.name, e.target) }, "Activate");
    cells.push(el("td", {}, button));
  }
  return el("tr", { dataset: { version: stats.name } }, cells);
}

function evaluationRow(model) {
  const m = model.evaluation.metrics;
  const fixed = (key, digits) => (m[key] === undefined ? "–" : m[key].toFixed(digits));
  return el("tr", { dataset: { version: model.name } }, [
    el("td", {}, el("strong", {}, model.name)),
    el("td", { class: "num" }, fixed("chrf", 3)),
    el("td", { class: "num" }, fixed("rouge_l", 3)),
    el("td", { class: "num" }, fixed("repetition", 3)),
    el("td", { class: "num" }, fixed("distinct_2", 3)),
    el("td", { class: "num" }, fixed("mean_words", 1)),
    el("td", { class: "num" }, fixed("opening_diversity", 2)),
    el("td", { class: "num" }, fixed("base_perplexity", 1)),
    el("td", { class: "meta" }, model.evaluation.digest),
  ]);
}

// Activation is one click to arm and a second to confirm, so a stray click changes nothing.
async function activate(name, button) {
  if (state.confirming !== name) {
    state.confirming = name;
    button.textContent = `Confirm: serve ${name}`;
    setTimeout(() => {
      if (state.confirming === name) {
        state.confirming = null;
        button.textContent = "Activate";
      }
    }, 5000);
    return;
  }
  state.confirming = null;
  button.disabled = true;
  try {
    await api(`/v1/models/${encodeURIComponent(name)}/activate`, { method: "POST" });
    say($("status"), `${name} is now the active version.`, "ok");
  } catch (err) {
    say($("status"), err.message, "error");
  }
  refresh();
}

function leaderboardRow(row) {
  return el(
    "tr",
    { dataset: { version: row.name } },
    el("td", { class: "num" }, row.rank),
    el("td", {}, row.name),
    el("td", { class: "num" }, row.score.toFixed(0), interval(row.ci_low, row.ci_high, 0)),
    el("td", { class: "num" }, row.battles),
    el("td", { class: "num" }, `${row.wins} / ${row.ties} / ${row.losses}`),
  );
}

function duration(run) {
  if (!run.started_at || !run.finished_at) return "–";
  const seconds = (new Date(run.finished_at) - new Date(run.started_at)) / 1000;
  return seconds < 120 ? `${seconds.toFixed(0)} s` : `${(seconds / 60).toFixed(1)} min`;
}

function runRow(run) {
  const examples = Object.entries(run.counts || {})
    .filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k} ${v}`)
    .join(", ");
  return el(
    "tr",
    { dataset: { run: run.id }, onclick: () => selectRun(run.id) },
    el("td", { class: "num" }, `#${run.id}`),
    el("td", {}, el("span", { class: `badge ${run.status}` }, run.status)),
    el("td", {}, run.trigger),
    el("td", {}, when(run.started_at || run.created_at)),
    el("td", { class: "num" }, duration(run)),
    el("td", { class: "num" }, examples || "–"),
    el("td", {}, `${run.parent_version || "–"} → ${run.version || "–"}`),
    el("td", {}, run.reason || ""),
  );
}

function fill(tableId, rows, emptyText, columns) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(
    ...(rows.length
      ? rows
      : [el("tr", {}, el("td", { class: "empty", colSpan: columns }, emptyText))]),
  );
}

// ---- charts ----

function chart(id, series, data, { yRange, steps = false } = {}) {
  const target = $(id);
  state.charts[id]?.destroy();
  target.replaceChildren();
  if (!data[0].length) {
    target.append(el("p", { class: "empty" }, "No data yet."));
    return;
  }
  const options = {
    width: Math.max(280, target.clientWidth || 480),
    height: 220,
    series: [{}, ...series],
    scales: { x: { time: !steps }, ...(yRange ? { y: { range: yRange } } : {}) },
    axes: [{}, {}],
    legend: { live: false },
  };
  state.charts[id] = new uPlot(options, data, target);
}

const day = (iso) => Date.parse(`${iso}T00:00:00Z`) / 1000;

function dailyCharts(daily) {
  const xs = daily.days.map((d) => day(d.date));
  chart(
    "chart-daily",
    [
      { label: "ratings", stroke: COLORS[0], width: 2 },
      { label: "comparisons", stroke: COLORS[1], width: 2 },
    ],
    [xs, daily.days.map((d) => d.ratings), daily.days.map((d) => d.comparisons)],
  );
  const versions = [...new Set(daily.approval.map((a) => a.version))];
  const dates = daily.days.map((d) => d.date); // the same window as the ratings chart
  const series = versions.map((v, i) => ({
    label: v,
    stroke: COLORS[i % COLORS.length],
    width: 2,
    points: { show: true },
    spanGaps: true,
    value: (_, y) => (y === null ? "–" : `${y.toFixed(0)}%`),
  }));
  const columns = versions.map((v) =>
    dates.map((d) => {
      const point = daily.approval.find((a) => a.version === v && a.date === d);
      return point && point.approval_rate !== null ? 100 * point.approval_rate : null;
    }),
  );
  const data = versions.length ? [xs, ...columns] : [[]];
  chart("chart-approval", series, data, { yRange: [0, 100] });
}

function runChart(run) {
  const history = (run && run.history) || [];
  const steps = history.map((_, i) => i + 1);
  chart(
    "chart-run",
    [
      { label: "loss", stroke: COLORS[0], width: 2 },
      { label: "KL", stroke: COLORS[2], width: 2 },
    ],
    [steps, history.map((h) => h.loss ?? null), history.map((h) => h.kl ?? null)],
    { steps: true },
  );
  const gate = $("run-gate");
  gate.replaceChildren();
  if (!run) return;
  const metrics = Object.entries(run.metrics || {}).filter(([, v]) => typeof v === "number");
  gate.append(
    el("p", {}, `Run #${run.id}: `, el("span", { class: `badge ${run.status}` }, run.status)),
    run.reason ? el("p", {}, run.reason) : "",
    metrics.length
      ? el(
          "table",
          {},
          el(
            "tbody",
            {},
            metrics.map(([k, v]) =>
              el("tr", {}, el("td", {}, k), el("td", { class: "num" }, Number(v).toPrecision(4))),
            ),
          ),
        )
      : el("p", { class: "empty" }, "No metrics."),
  );
}

function selectRun(id) {
  state.selectedRun = id;
  $("run-select").value = String(id);
  runChart(state.runs.find((r) => r.id === id));
}

// ---- loading ----

async function refresh() {
  try {
    const [versions, models, board, daily, runs] = await Promise.all([
      api("/v1/stats/versions"),
      api("/v1/models"),
      api("/v1/stats/leaderboard?samples=200"),
      api("/v1/stats/daily?days=30"),
      api("/v1/training/runs"),
    ]);
    const byName = Object.fromEntries(models.data.map((m) => [m.name, m]));
    const admin = state.me.role === "admin";
    $("actions-head").hidden = !admin;
    fill(
      "versions",
      versions.data.map((v) => versionRow(v, byName[v.name])),
      "No versions yet.",
      admin ? 8 : 7,
    );
    fill(
      "evaluations",
      models.data.filter((m) => m.evaluation).map(evaluationRow),
      "No version evaluated yet: a training round evaluates its candidate and its parent.",
      9,
    );
    $("leaderboard-method").textContent = board.method;
    fill(
      "leaderboard",
      board.data.map(leaderboardRow),
      "No comparisons between different versions yet.",
      5,
    );
    dailyCharts(daily);
    state.runs = runs;
    fill("runs", runs.map(runRow), "No training runs yet.", 8);
    const select = $("run-select");
    select.replaceChildren(...runs.map((r) => new Option(`#${r.id} (${r.status})`, r.id)));
    const withCurves = runs.find((r) => (r.history || []).length) || runs[0];
    if (!runs.some((r) => r.id === state.selectedRun)) state.selectedRun = withCurves?.id ?? null;
    if (state.selectedRun !== null) selectRun(state.selectedRun);
    else runChart(null);
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    say($("status"), err.message, "error");
  }
}

async function startRound() {
  const button = $("start-round");
  button.disabled = true;
  try {
    const run = await api("/v1/training/runs", { method: "POST", body: {} });
    say($("status"), `Training round #${run.id} is ${run.status}.`, "ok");
  } catch (err) {
    say($("status"), err.message, "error");
  } finally {
    button.disabled = false;
  }
  refresh();
}

function start(me) {
  state.me = me;
  $("app").hidden = false;
  $("start-round").hidden = me.role !== "admin";
  $("start-round").addEventListener("click", startRound);
  $("refresh").addEventListener("click", refresh);
  $("run-select").addEventListener("change", (e) => selectRun(Number(e.target.value)));
  refresh();
  setInterval(() => document.visibilityState === "visible" && refresh(), REFRESH_SECONDS * 1000);
}

signIn(start);
