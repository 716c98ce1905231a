// The "Try and rate" page: generate, rate (click or key), rate the unrated queue, compare two.
import { api, say, signIn, typing } from "./common.js";

const $ = (id) => document.getElementById(id);
const ENDPOINT = { generate: "/v1/generate", translate: "/v1/translate", qa: "/v1/qa" };

const state = {
  me: null,
  mode: "try",
  current: null, // the generation being rated
  rating: {}, // what this key has saved for it: thumbs, stars
  queue: [], // unrated generations still to show
  queueCursor: null, // next page of the queue, from the API
  seen: new Set(), // queue items already shown (skipped or rated) in this visit
  pair: null, // { a, b }: the two generations shown side by side
  busy: false,
};

// ---- the input form ----

function taskInput() {
  const task = $("task").value;
  const value = (id) => $(id).value.trim();
  if (task === "generate") return { prompt: value("prompt") };
  if (task === "translate") {
    const body = { text: value("text"), target_lang: value("target_lang") };
    if (value("source_lang")) body.source_lang = value("source_lang");
    return body;
  }
  const body = { question: value("question") };
  if (value("context")) body.context = value("context");
  return body;
}

function samplingInput() {
  const body = {
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_new_tokens: Number($("max_new_tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function showTaskFields() {
  for (const block of document.querySelectorAll("[data-task]")) {
    block.hidden = block.dataset.task !== $("task").value;
  }
}

function describeInput(generation) {
  const input = generation.input || {};
  if (generation.task === "translate") {
    const from = input.source_lang ? `from ${input.source_lang} ` : "";
    return [`Translate ${from}to ${input.target_lang}`, input.text];
  }
  if (generation.task === "chat") {
    const turns = (input.messages || []).map((m) => `${m.role}: ${m.content}`);
    return ["Chat", turns.join("\n\n")];
  }
  if (generation.task === "completion") return ["Completion of", input.prompt];
  if (generation.task === "qa") {
    return ["Question", input.context ? `${input.question}\n\nContext: ${input.context}` : input.question];
  }
  return ["Prompt", input.prompt];
}

// ---- one answer and its rating ----

function showAnswer(generation, { withInput }) {
  state.current = generation;
  state.rating = {};
  $("answer").hidden = false;
  $("answer-input").hidden = !withInput;
  if (withInput) {
    const [label, text] = describeInput(generation);
    $("answer-task").textContent = `${label} · generation #${generation.id}`;
    $("answer-input-text").textContent = text;
  }
  $("output").textContent = generation.output; // text, never markup
  $("answer-version").textContent = generation.model_version;
  const usage = generation.usage || {};
  $("answer-meta").textContent =
    ` · ${usage.completion_tokens ?? "?"} tokens · ${generation.latency_ms ?? "?"} ms · ` +
    `${generation.finish_reason}`;
  $("comment").value = "";
  $("correction").value = "";
  say($("rating-status"), "");
  paintRating();
}

function paintRating() {
  $("thumb-up").setAttribute("aria-pressed", String(state.rating.thumbs === "up"));
  $("thumb-down").setAttribute("aria-pressed", String(state.rating.thumbs === "down"));
  for (const button of $("stars").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(Number(button.dataset.stars) === state.rating.stars));
  }
}

async function sendRating(fields, label) {
  if (!state.current) return;
  try {
    const saved = await api("/v1/feedback", {
      method: "POST",
      body: { generation_id: state.current.id, ...fields },
    });
    state.rating = { thumbs: saved.thumbs, stars: saved.stars };
    paintRating();
    say($("rating-status"), `Saved: ${label}`, "ok");
  } catch (err) {
    say($("rating-status"), err.message, "error");
  }
}

const thumb = (value) => sendRating({ thumbs: value }, value === "up" ? "✓ good" : "✗ bad");
const stars = (value) => sendRating({ stars: value }, `${value}★`);

async function saveText() {
  const fields = {};
  const comment = $("comment").value.trim();
  const correction = $("correction").value.trim();
  if (comment) fields.comment = comment;
  if (correction) fields.correction = correction;
  if (!comment && !correction) {
    say($("rating-status"), "Write a comment or a better answer first.", "error");
    return;
  }
  if (comment && !correction && !state.rating.thumbs && !state.rating.stars) {
    say($("rating-status"), "A comment goes with a rating: choose a thumb or stars too.", "error");
    return;
  }
  await sendRating(fields, correction ? "better answer" : "comment");
}

function editCorrection() {
  if (!state.current) return;
  if (!$("correction").value) $("correction").value = state.current.output;
  $("correction").focus();
}

// ---- modes ----

function setMode(mode) {
  state.mode = mode;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  }
  $("input-form").hidden = mode === "queue";
  $("compare-options").hidden = mode !== "compare";
  $("run").textContent = mode === "compare" ? "Generate two answers" : "Generate";
  $("answer").hidden = true;
  $("pair").hidden = true;
  state.current = null;
  state.pair = null;
  say($("status"), "");
  if (mode === "queue") nextInQueue();
  if (mode === "compare") loadVersions();
}

async function generate() {
  if (state.busy) return;
  state.busy = true;
  $("run").disabled = true;
  say($("status"), state.mode === "compare" ? "Generating two answers…" : "Generating…");
  try {
    if (state.mode === "compare") await generatePair();
    else {
      const generation = await api(ENDPOINT[$("task").value], {
        method: "POST",
        body: { ...taskInput(), ...samplingInput() },
      });
      say($("status"), "");
      showAnswer(generation, { withInput: false });
    }
  } catch (err) {
    say($("status"), err.message, "error");
  } finally {
    state.busy = false;
    $("run").disabled = false;
  }
}

// The queue: generations nobody has rated yet, newest first: from all traffic for rater and
// admin keys, a user key's own for a user key (the API lists no other).
async function fillQueue() {
  let cursor = state.queueCursor;
  // Pages of answers already shown in this visit (skipped) are passed over.
  for (let page = 0; page < 20; page++) {
    const query = `/v1/generations?rated=false&limit=50${cursor ? `&cursor=${cursor}` : ""}`;
    const result = await api(query);
    state.queue = result.items.filter((g) => !state.seen.has(g.id));
    cursor = result.next_cursor;
    if (state.queue.length || !cursor) break;
  }
  state.queueCursor = cursor; // null: the next fill starts again from the newest
}

async function nextInQueue() {
  $("answer").hidden = true;
  while (state.queue.length && state.seen.has(state.queue[0].id)) state.queue.shift();
  if (!state.queue.length) {
    say($("status"), "Loading unrated answers…");
    try {
      await fillQueue();
    } catch (err) {
      say($("status"), err.message, "error");
      return;
    }
  }
  const generation = state.queue.shift();
  if (!generation) {
    const whose = state.me.role === "user" ? "every answer of yours" : "every answer";
    say($("status"), `Nothing left to rate: ${whose} has a rating.`, "ok");
    state.current = null;
    return;
  }
  state.seen.add(generation.id);
  say($("status"), "");
  showAnswer(generation, { withInput: true });
}

// ---- compare ----

async function loadVersions() {
  const row = $("against-version-row");
  if (state.me.role !== "admin") {
    row.hidden = true;
    return;
  }
  try {
    const models = await api("/v1/models");
    const select = $("against-version");
    select.replaceChildren(
      ...models.data
        .filter((m) => !m.serving && m.status !== "refused")
        .map((m) => new Option(`${m.name} (${m.status})`, m.name)),
    );
    row.hidden = select.options.length === 0;
  } catch (err) {
    say($("status"), err.message, "error");
  }
}

async function generatePair() {
  const against = document.querySelector("input[name=against]:checked").value;
  const base = { ...taskInput(), ...samplingInput() };
  delete base.seed; // two samples need two seeds
  if (base.temperature === 0 && against === "sample") base.temperature = 0.7;
  const seed = () => Math.floor(Math.random() * 2 ** 31);
  const first = { ...base, seed: seed() };
  const second = { ...base, seed: seed() };
  if (against === "version") second.model_version = $("against-version").value;
  const url = ENDPOINT[$("task").value];
  // One at a time: the engine runs one request at a time anyway.
  const one = await api(url, { method: "POST", body: first });
  const two = await api(url, { method: "POST", body: second });
  const [a, b] = Math.random() < 0.5 ? [one, two] : [two, one];
  state.pair = { a, b, chosen: null };
  say($("status"), "");
  $("pair").hidden = false;
  $("pair-input").textContent = describeInput(a).join(": ");
  $("output-a").textContent = a.output;
  $("output-b").textContent = b.output;
  for (const side of ["a", "b"]) {
    $(`version-${side}`).hidden = true;
    $(`version-${side}`).textContent = state.pair[side].model_version;
  }
  say($("pair-status"), "Which answer is better?");
}

async function choose(winner) {
  if (!state.pair) return;
  try {
    await api("/v1/comparisons", {
      method: "POST",
      body: { generation_a: state.pair.a.id, generation_b: state.pair.b.id, winner },
    });
    state.pair.chosen = winner;
    $("version-a").hidden = false;
    $("version-b").hidden = false;
    const label = winner === "tie" ? "a tie" : `${winner.toUpperCase()} is better`;
    say($("pair-status"), `Saved: ${label}. Press n for a new pair.`, "ok");
  } catch (err) {
    say($("pair-status"), err.message, "error");
  }
}

function next() {
  if (state.mode === "queue") nextInQueue();
  else if (state.mode === "compare") {
    $("pair").hidden = true;
    state.pair = null;
    generate();
  } else {
    $("answer").hidden = true;
    state.current = null;
    const field = { generate: "prompt", translate: "text", qa: "question" }[$("task").value];
    $(field).select();
  }
}

// ---- keyboard ----

function onKey(event) {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    const inRating = ["comment", "correction"].includes(document.activeElement?.id);
    if (inRating) saveText();
    else if (state.mode !== "queue") generate();
    return;
  }
  if (event.key === "Escape" && typing(event)) {
    document.activeElement.blur();
    return;
  }
  if (typing(event) || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  const rating = state.current && !$("answer").hidden;
  const pair = state.pair && !$("pair").hidden;
  const actions = {
    u: () => rating && thumb("up"),
    d: () => rating && thumb("down"),
    c: () => rating && $("comment").focus(),
    e: () => rating && editCorrection(),
    s: () => rating && saveText(),
    n: () => next(),
    a: () => pair && choose("a"),
    b: () => pair && choose("b"),
    t: () => pair && choose("tie"),
  };
  if (/^[1-5]$/.test(key) && rating) {
    event.preventDefault();
    stars(Number(key));
  } else if (actions[key]) {
    event.preventDefault();
    actions[key]();
  }
}

// ---- wiring ----

function start(me) {
  state.me = me;
  $("app").hidden = false;
  $("queue-tab").title =
    me.role === "user"
      ? "Your own answers nobody has rated yet (rater keys rate everyone's)"
      : "Answers nobody has rated yet, from all traffic";
  $("task").addEventListener("change", showTaskFields);
  $("input-form").addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
  }
  $("thumb-up").addEventListener("click", () => thumb("up"));
  $("thumb-down").addEventListener("click", () => thumb("down"));
  for (const button of $("stars").querySelectorAll("button")) {
    button.addEventListener("click", () => stars(Number(button.dataset.stars)));
  }
  $("save").addEventListener("click", saveText);
  $("next").addEventListener("click", next);
  $("choose-a").addEventListener("click", () => choose("a"));
  $("choose-b").addEventListener("click", () => choose("b"));
  $("choose-tie").addEventListener("click", () => choose("tie"));
  $("pair-next").addEventListener("click", next);
  document.addEventListener("keydown", onKey);
  showTaskFields();
  $("prompt").focus();
}

signIn(start);
