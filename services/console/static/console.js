// TuneDock's web console: a page per hash route, every call to the stack's OpenAI-compatible API on
// this origin with the signed-in token. No framework, no CDN: this file and console.css are all of it.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");
const COLORS = ["#2f5bd3", "#d94f30", "#23945a", "#8c3fc7", "#c98a00", "#2aa3b8"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const METHODS = {
  lora: ["LoRA", "Low-rank adapters beside frozen weights: little memory, hot-swapped per request as trained."],
  qlora: ["QLoRA", "LoRA on a 4-bit base: the least memory, for big models on small GPUs; a little slower."],
  freeze: ["Freeze", "Trains only the last layers: moderate memory; served through an extracted adapter."],
  full: ["Full", "Trains every weight: the most memory, for large shifts of domain; served through an extracted adapter."],
};
let timer = null;

// A page refreshes itself later only while it is still the page shown (a refresh must never redraw
// the page the user moved on to, losing what they typed there).
function later(ms) {
  clearTimeout(timer);
  const hash = location.hash;
  timer = setTimeout(() => { if (location.hash === hash) route(true); }, ms);
}

function token() { return sessionStorage.getItem("tunedock-token") || ""; }

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(options.headers || {}) };
  const answer = await fetch(`/v1${path}`, { ...options, headers });
  const kind = answer.headers.get("content-type") || "";
  const body = kind.includes("json") ? await answer.json() : await answer.text();
  if (!answer.ok) {
    const error = new Error(body?.error?.message || `${answer.status} ${answer.statusText}`);
    error.status = answer.status;
    throw error;
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  return node;
}

function show(...nodes) { main.replaceChildren(...nodes); }
function fail(error) { return el("p", { class: "error", "data-testid": "error" }, error.message || String(error)); }
function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : ""; }
function status(s) { return el("span", { class: `status ${s}`, "data-testid": "status" }, s); }
function bytes(n) { return n > 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : n > 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`; }

// ------------------------------------------------------------------------------------ sign-in

function signIn(message = "") {
  $("#nav").hidden = true;
  $("#signout").hidden = true;
  $("#who").textContent = "";
  const input = el("input", { type: "password", id: "token", placeholder: "td-...", autocomplete: "off" });
  const form = el("form", { class: "card", on: { submit: async (e) => {
    e.preventDefault();
    sessionStorage.setItem("tunedock-token", input.value.trim());
    try {
      await api("/models");
      location.hash = "#/jobs";
      route();
    } catch (error) {
      sessionStorage.removeItem("tunedock-token");
      signIn(error.status === 401 ? "That token is unknown, revoked or expired." : error.message);
    }
  } } },
    el("h1", {}, "Sign in"),
    el("p", { class: "muted" }, "Paste a TuneDock token (tunedock tokens create, or the admin token tunedock up wrote). It stays in this tab."),
    el("label", { for: "token" }, "Token"), input, el("p"), el("button", { type: "submit" }, "Sign in"),
    message ? el("p", { class: "error", "data-testid": "error" }, message) : "");
  show(form);
  input.focus();
}

// ----------------------------------------------------------------------------------------- jobs

async function jobsPage() {
  const list = await api("/fine_tuning/jobs?limit=100");
  const rows = list.data.map((j) => el("tr", { class: "link", "data-job": j.id, on: { click: () => { location.hash = `#/jobs/${j.id}`; } } },
    el("td", {}, j.id), el("td", {}, j.tunedock?.method || j.method?.type), el("td", {}, status(j.status)),
    el("td", {}, j.tunedock?.total_steps ? `${j.tunedock.step}/${j.tunedock.total_steps}` : ""),
    el("td", {}, j.estimated_finish ? `${Math.max(0, Math.round(j.estimated_finish - Date.now() / 1000))} s` : ""),
    el("td", {}, j.fine_tuned_model || ""), el("td", {}, when(j.created_at))));
  show(el("h1", {}, "Jobs"),
    el("table", { "data-testid": "jobs" }, el("tr", {}, ...["job", "method", "status", "progress", "ETA", "fine_tuned_model", "created"].map((h) => el("th", {}, h))), ...rows),
    list.data.length ? "" : el("p", { class: "muted" }, "No jobs yet: start one under New job."));
  later(3000);
}

function series(events) {
  const pick = (key) => events.filter((e) => e.type === "metrics" && e.data && key in e.data).map((e) => [e.data.step, e.data[key]]);
  return {
    train_loss: pick("train_loss"), valid_loss: pick("valid_loss"), learning_rate: pick("learning_rate"),
    tokens_per_second: pick("tokens_per_second"), peak_memory_bytes: pick("peak_memory_bytes"),
  };
}

// Charts are uPlot's (vendor/uPlot.iife.min.js, shipped with the console): drawn once the holder is in
// the page (its width is known then).
function plot(holder, options, data) {
  requestAnimationFrame(() => {
    holder.replaceChildren();
    new uPlot({ width: Math.max(holder.clientWidth, 280), height: 180, ...options }, data, holder);
  });
}

function chart(title, lines, format = (v) => v.toPrecision(3)) {
  const drawn = lines.filter((l) => l.points.length);
  const holder = el("div", { "data-testid": `chart-${title}`, "data-points": String(lines[0]?.points.length || 0) });
  const box = el("div", { class: "card" }, el("strong", {}, title), holder);
  if (!drawn.length) { holder.append(el("p", { class: "muted" }, "no data yet")); return box; }
  const steps = [...new Set(drawn.flatMap((l) => l.points.map((p) => p[0])))].sort((a, b) => a - b);
  const data = [steps, ...drawn.map((l) => { const at = new Map(l.points); return steps.map((x) => (at.has(x) ? at.get(x) : null)); })];
  plot(holder, {
    scales: { x: { time: false } },
    series: [{ label: "step" }, ...drawn.map((l, i) => ({
      label: l.name, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { show: true, size: 5 },
      value: (u, v) => (v == null ? "" : format(v)),
    }))],
    axes: [{}, { size: 84, values: (u, ticks) => ticks.map((v) => format(v)) }],
  }, data);
  return box;
}

async function allEvents(jobId) {
  const events = [];
  let after = "";
  for (;;) {
    const page = await api(`/fine_tuning/jobs/${jobId}/events?limit=1000${after ? `&after=${after}` : ""}`);
    events.push(...page.data);
    if (!page.has_more) break;
    after = page.last_id;
  }
  return events.reverse(); // oldest first
}

const overlays = new Set();

async function jobPage(jobId) {
  const [job, events, checkpoints, others] = await Promise.all([
    api(`/fine_tuning/jobs/${jobId}`), allEvents(jobId), api(`/fine_tuning/jobs/${jobId}/checkpoints?limit=100`), api("/fine_tuning/jobs?limit=50"),
  ]);
  const own = series(events);
  const compared = [];
  for (const other of others.data.filter((o) => overlays.has(o.id) && o.id !== jobId)) {
    compared.push({ name: `${other.id} train`, points: series(await allEvents(other.id)).train_loss });
  }
  const cancel = el("button", { class: "secondary", "data-testid": "cancel", on: { click: async () => {
    if (!confirm(`Cancel ${jobId}?`)) return;
    try { await api(`/fine_tuning/jobs/${jobId}/cancel`, { method: "POST" }); route(true); } catch (error) { main.prepend(fail(error)); }
  } } }, "Cancel job");
  const picker = el("div", {}, others.data.filter((o) => o.id !== jobId).map((o) => el("label", { style: "font-weight:normal" },
    el("input", { type: "checkbox", style: "width:auto", "data-overlay": o.id, checked: overlays.has(o.id), on: { change: (e) => {
      if (e.target.checked) overlays.add(o.id); else overlays.delete(o.id); route(true);
    } } }), ` ${o.id} (${o.tunedock?.method}, ${o.status})`)));
  const t = job.tunedock || {};
  show(
    el("h1", {}, `Job ${job.id} `, status(job.status)),
    el("div", { class: "card" },
      el("p", {}, `Method ${t.method} · base ${job.model} · step ${t.step ?? 0}/${t.total_steps ?? "?"} · file ${job.training_file}`),
      job.fine_tuned_model ? el("p", {}, "Serves as ", el("code", { "data-testid": "fine-tuned-model" }, job.fine_tuned_model)) : "",
      job.error ? el("p", { class: "error" }, job.error.message) : "",
      t.extraction ? el("p", { class: "muted" }, `Extracted adapter: ${t.extraction.output_ref || t.extraction.state}` +
        (t.extraction.metrics?.extract_greedy_agreement !== undefined ? `, greedy agreement ${(100 * t.extraction.metrics.extract_greedy_agreement).toFixed(0)}%` : "")) : "",
      TERMINAL.has(job.status) ? "" : cancel),
    el("div", { class: "grid" },
      chart("loss", [{ name: "train", points: own.train_loss }, { name: "eval", points: own.valid_loss }, ...compared]),
      chart("learning rate", [{ name: "lr", points: own.learning_rate }], (v) => v.toExponential(1)),
      chart("tokens/s", [{ name: "tokens/s", points: own.tokens_per_second }], (v) => v.toFixed(0)),
      chart("peak memory", [{ name: "peak", points: own.peak_memory_bytes }], bytes)),
    el("h2", {}, "Compare with past runs"), picker,
    el("h2", {}, "Checkpoints"),
    el("table", {}, el("tr", {}, el("th", {}, "step"), el("th", {}, "train loss"), el("th", {}, "valid loss"), el("th", {}, "model")),
      checkpoints.data.map((c) => el("tr", {}, el("td", {}, c.step_number), el("td", {}, c.metrics.train_loss?.toFixed(4) ?? ""),
        el("td", {}, c.metrics.valid_loss?.toFixed(4) ?? ""), el("td", {}, c.fine_tuned_model_checkpoint)))),
    el("h2", {}, "Events"),
    el("div", { class: "log", "data-testid": "events" }, events.map((e) => el("div", {}, `${when(e.created_at)}  ${e.message}`))),
  );
  if (!TERMINAL.has(job.status)) later(1500);
}

// ------------------------------------------------------------------------------------- datasets

async function datasetsPage() {
  const files = await api("/files");
  const input = el("input", { type: "file", id: "file", "data-testid": "file-input", style: "display:none", on: { change: () => upload(input.files[0]) } });
  const bar = el("progress", { max: 100, value: 0, hidden: true, "data-testid": "progress" });
  const report = el("div", { "data-testid": "report" });
  const drop = el("div", { class: "drop", on: {
    click: () => input.click(),
    dragover: (e) => { e.preventDefault(); drop.classList.add("over"); },
    dragleave: () => drop.classList.remove("over"),
    drop: (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files[0]); },
  } }, "Drop a dataset here (JSONL, JSON, Parquet, CSV), or click to choose one");

  function upload(file) {
    if (!file) return;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    bar.hidden = false;
    report.replaceChildren(el("p", { class: "muted" }, `Uploading ${file.name} (${bytes(file.size)}) ...`));
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total); };
    xhr.onload = () => {
      const body = JSON.parse(xhr.responseText || "{}");
      if (xhr.status !== 200) { report.replaceChildren(fail(new Error(body.error?.message || xhr.statusText))); return; }
      bar.value = 100;
      const t = body.tunedock || {};
      const st = t.stats || {};
      report.replaceChildren(el("div", { class: "card" }, el("strong", {}, `${body.filename}: ${t.records} records, ${t.format} format`),
        el("p", { class: "muted" }, `id ${body.id} · ${bytes(body.bytes)} · project ${t.project}` + (st.source ? ` · read as ${st.source}` : "")),
        st.chars_p50 !== undefined ? el("p", {}, `characters per record: p50 ${st.chars_p50}, p95 ${st.chars_p95}, max ${st.chars_max}`) : "",
        el("p", { "data-testid": "ignored" }, t.ignored_columns?.length ? `ignored columns: ${t.ignored_columns.join(", ")}` : "no column ignored")));
      later(300);
    };
    xhr.open("POST", "/v1/files");
    xhr.setRequestHeader("Authorization", `Bearer ${token()}`);
    xhr.send(form);
  }

  show(el("h1", {}, "Datasets"), drop, input, bar, report,
    el("h2", {}, "Uploaded"),
    el("table", { "data-testid": "files" }, el("tr", {}, ...["id", "file", "format", "records", "size", "uploaded"].map((h) => el("th", {}, h))),
      files.data.map((f) => el("tr", { class: "link", "data-file": f.id, on: { click: () => { location.hash = `#/datasets/${f.id}`; } } }, el("td", {}, f.id), el("td", {}, f.filename), el("td", {}, f.tunedock?.format), el("td", {}, f.tunedock?.records),
        el("td", {}, bytes(f.bytes)), el("td", {}, when(f.created_at))))),
    files.data.length ? el("p", { class: "muted" }, "Click a dataset to see its records as the model will see them.") : "");
}

// A dataset through the base's chat template, as training tokenizes it: the tokens the loss covers
// highlighted, and the token lengths of a sample against the job's max length.
async function datasetPage(fileId) {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const maxLength = el("input", { id: "max_length", type: "number", value: q.get("max_length") || 512, min: 16 });
  const count = el("input", { id: "records", type: "number", value: q.get("records") || 3, min: 1, max: 20 });
  const base = el("input", { id: "base", type: "text", value: q.get("model") || "", placeholder: "the trainer's default base" });
  const apply = (e) => { e.preventDefault(); location.hash = `#/datasets/${fileId}?` + new URLSearchParams({ max_length: maxLength.value, records: count.value, model: base.value }); };
  const file = await api(`/files/${fileId}`);
  const form = el("form", { class: "card", on: { submit: apply } }, el("div", { class: "two" },
    el("div", {}, el("label", { for: "max_length" }, "max length (the job's max_seq_length)"), maxLength),
    el("div", {}, el("label", { for: "records" }, "records shown"), count)),
    el("label", { for: "base" }, "base model"), base, el("p"), el("button", { type: "submit", "data-testid": "preview-apply" }, "Preview"));
  show(el("h1", {}, `${file.filename} `, el("span", { class: "muted" }, `${file.tunedock?.records} records · ${file.tunedock?.format}`)), form,
    el("p", { class: "muted", "data-testid": "preview-wait" }, "Tokenizing with the base's tokenizer (the first preview loads it) ..."));
  const params = new URLSearchParams({ max_length: maxLength.value, records: count.value, sample: 2000 });
  if (base.value) params.set("model", base.value);
  let p;
  try { p = await api(`/files/${fileId}/preview?${params}`); } catch (error) { $("[data-testid=preview-wait]").replaceWith(fail(error)); return; }
  const L = p.lengths;
  const edges = L.histogram.edges;
  const holder = el("div", { "data-testid": "histogram", "data-bins": String(L.histogram.counts.length) });
  const histogram = el("div", { class: "card" }, el("strong", {}, "tokens per record"), holder);
  if (L.sampled) {
    const centers = L.histogram.counts.map((_, i) => (edges[i] + edges[i + 1]) / 2);
    plot(holder, {
      legend: { show: false },
      scales: { x: { time: false, range: [0, edges[edges.length - 1]] }, y: { range: (u, lo, hi) => [0, hi * 1.1 || 1] } },
      series: [{}, { label: "records", stroke: COLORS[0], fill: `${COLORS[0]}aa`, paths: uPlot.paths.bars({ size: [0.95, 100] }), points: { show: false } }],
      axes: [{ label: "tokens" }, { label: "records", size: 60 }],
      hooks: { draw: [(u) => { // the job's max length, where records are cut
        const x = u.valToPos(p.max_length, "x", true);
        u.ctx.save(); u.ctx.strokeStyle = COLORS[1]; u.ctx.setLineDash([6, 4]); u.ctx.lineWidth = 2;
        u.ctx.beginPath(); u.ctx.moveTo(x, u.bbox.top); u.ctx.lineTo(x, u.bbox.top + u.bbox.height); u.ctx.stroke(); u.ctx.restore();
      }] },
    }, [centers, L.histogram.counts]);
  }
  const sampled = L.sampled < p.num_records ? `the first ${L.sampled.toLocaleString()} of ${p.num_records.toLocaleString()} records` : `all ${L.sampled.toLocaleString()} records`;
  const record = (r) => el("div", { class: "card", "data-testid": "preview-record" },
    el("p", { class: "muted" }, `${r.where}: ${r.tokens} tokens, ${r.trained_tokens} trained` + (r.truncated ? ` · cut at ${p.max_length}: ${r.tokens - p.max_length} tokens dropped` : "")),
    el("pre", { class: "tokens" }, r.spans.map((s) => (s.trained ? el("mark", { title: `${s.tokens} tokens the loss covers` }, s.text) : el("span", { title: `${s.tokens} tokens, not trained` }, s.text)))));
  $("[data-testid=preview-wait]").replaceWith(el("div", {},
    el("p", { "data-testid": "truncation" }, `Of ${sampled}, ${L.truncated.toLocaleString()} would be cut at ${p.max_length} tokens` +
      (L.sampled ? ` (tokens per record: p50 ${L.p50}, p95 ${L.p95}, max ${L.max}; trained tokens per record ${L.trained_tokens_mean} on average).` : ".")),
    p.refused_count ? el("div", { class: "error", "data-testid": "refused" }, `${p.refused_count} records the base's template cannot format (training would fail on them):`,
      p.refused.map((r) => el("div", {}, `${r.where}: ${r.error}`))) : "",
    histogram,
    el("h2", {}, "As the model sees them"),
    el("p", { class: "legend" }, el("mark", {}, "highlighted"), " tokens are what the model learns to say (the loss covers them); the rest is context. ", el("span", { class: "muted" }, `Base: ${p.base_model}`)),
    p.records.map(record)));
}

// -------------------------------------------------------------------------------------- new job

async function newJobPage() {
  const files = await api("/files");
  let method = "lora";
  const field = (id, label, value, help, type = "number") => el("div", {}, el("label", { for: id }, label), el("input", { id, type, value, step: "any" }), el("span", { class: "muted" }, help));
  const knobs = el("div");
  const publishes = el("p", { class: "muted", "data-testid": "publishes" });
  function drawKnobs() {
    const lora = [field("r", "rank r", 8, "adapter rank: more capacity, more memory"), field("alpha", "alpha", 16, "scale of the update (2 r by default)")];
    knobs.replaceChildren(...({
      lora, qlora: [...lora, el("div", {}, el("label", { for: "quant_type" }, "4-bit type"), el("select", { id: "quant_type" }, el("option", {}, "nf4"), el("option", {}, "fp4")))],
      freeze: [field("trainable_layers", "trainable layers", 2, "the last N decoder layers train")],
      full: [],
    })[method]);
    const suffix = $("#suffix")?.value || "my-model";
    publishes.textContent = method === "lora" || method === "qlora"
      ? `Publishes a LoRA adapter ${suffix}:N, hot-swapped per request as trained.`
      : `Publishes ${method === "full" ? "a model" : "a delta"} ${suffix}:N, then extracts the LoRA adapter ${suffix}-lora:N that inference serves.`;
    for (const card of document.querySelectorAll(".method")) card.classList.toggle("chosen", card.dataset.method === method);
    replan();
  }
  // The memory plan (`tunedock plan`) for the knobs as they are now, redrawn as they change.
  const plan = el("div", { class: "card plan", "data-testid": "plan" }, el("p", { class: "muted" }, "Estimating memory ..."));
  let planTimer = null, planAsked = 0;
  function replan() {
    clearTimeout(planTimer);
    planTimer = setTimeout(async () => {
      const value = (id, fallback) => $(`#${id}`)?.value || fallback;
      const params = new URLSearchParams({ batch_size: value("batch_size", 4), max_seq_length: value("max_seq_length", 512), r: value("r", 16), trainable_layers: value("trainable_layers", 2) });
      const asked = ++planAsked;
      let answer;
      try { answer = await api(`/fine_tuning/plan?${params}`); } catch (error) { plan.replaceChildren(fail(error)); return; }
      if (asked !== planAsked) return; // a newer plan is on its way
      const chosen = answer.methods.find((m) => m.method === method);
      const p = chosen.parts;
      plan.replaceChildren(
        el("strong", { "data-testid": "plan-chosen" }, `${METHODS[method][0]}: about ${bytes(chosen.peak_bytes)} peak on ${answer.device}`),
        el("p", { class: "muted" }, `weights ${bytes(p.weights)} · gradients + optimizer ${bytes(p.gradients + p.optimizer)} · activations ${bytes(p.activations)}` +
          (p.runtime ? ` · runtime ${bytes(p.runtime)}` : "") + ` · ${chosen.trainable_params.toLocaleString()} trainable parameters, batch ${answer.batch_size} x ${answer.max_seq_length} tokens`),
        el("table", {}, el("tr", {}, ...["method", "estimated peak", "trainable params"].map((h) => el("th", {}, h))),
          answer.methods.map((m) => el("tr", { class: m.method === method ? "chosen" : "", "data-plan": m.method },
            el("td", {}, METHODS[m.method][0]), el("td", {}, bytes(m.peak_bytes)), el("td", {}, m.trainable_params.toLocaleString())))));
      plan.dataset.method = method;
      plan.dataset.peak = String(chosen.peak_bytes);
    }, 250);
  }
  const cards = el("div", { class: "methods" }, Object.entries(METHODS).map(([key, [name, text]]) => el("div", { class: "method", "data-method": key, on: { click: () => { method = key; drawKnobs(); } } },
    el("strong", {}, name), el("p", { class: "muted" }, text))));
  const message = el("div");
  const submit = async (e) => {
    e.preventDefault();
    const number = (id) => ($(`#${id}`)?.value === "" ? undefined : Number($(`#${id}`)?.value));
    const hyperparameters = { batch_size: number("batch_size"), learning_rate_multiplier: number("lr_multiplier") };
    if (number("max_steps")) hyperparameters.max_steps = number("max_steps"); else hyperparameters.n_epochs = number("n_epochs");
    if (number("max_seq_length")) hyperparameters.max_seq_length = number("max_seq_length");
    const config = { hyperparameters };
    if (method === "lora" || method === "qlora") { config.r = number("r"); config.alpha = number("alpha"); }
    if (method === "qlora") config.quant_type = $("#quant_type").value;
    if (method === "freeze") config.trainable_layers = number("trainable_layers");
    try {
      const job = await api("/fine_tuning/jobs", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({
        model: "auto", training_file: $("#training_file").value, suffix: $("#suffix").value || undefined, method: { type: method, [method]: config },
      }) });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) { message.replaceChildren(fail(error)); }
  };
  show(el("h1", {}, "New fine-tuning job"),
    el("form", { class: "card", on: { submit, input: (e) => { if (e.target.type === "number") replan(); } } },
      el("label", {}, "Method"), cards, knobs,
      el("div", { class: "two" },
        el("div", {}, el("label", { for: "training_file" }, "Training file"),
          el("select", { id: "training_file" }, files.data.map((f) => el("option", { value: f.id }, `${f.filename} (${f.tunedock?.records} records, ${f.id})`)))),
        el("div", {}, el("label", { for: "suffix" }, "Name (suffix)"), el("input", { id: "suffix", type: "text", placeholder: "my-model", on: { input: drawKnobs } }))),
      el("div", { class: "two" },
        field("max_steps", "max steps", "", "0 or empty: train n_epochs"), field("n_epochs", "epochs", 1, "passes over the data"),
        field("batch_size", "batch size", 4, "examples per step and process"), field("lr_multiplier", "learning-rate multiplier", 1, "× the method's default rate"),
        field("max_seq_length", "max sequence length", 512, "tokens per example; longer ones are cut")),
      el("label", {}, "Memory plan"), plan,
      publishes, el("button", { type: "submit", "data-testid": "submit" }, "Start job"), message));
  drawKnobs();
}

// -------------------------------------------------------------------------------------- compare

const comparing = new Set();

function bars(title, rows, value, format) {
  const known = rows.filter((r) => Number.isFinite(value(r)));
  const holder = el("div", { "data-testid": `bars-${title}`, "data-bars": String(known.length) });
  const box = el("div", { class: "card" }, el("strong", {}, title), holder);
  if (!known.length) { holder.append(el("p", { class: "muted" }, "no data yet")); return box; }
  plot(holder, {
    legend: { show: false },
    scales: { x: { time: false, range: [-0.5, known.length - 0.5] }, y: { range: (u, lo, hi) => [0, hi * 1.1 || 1] } },
    series: [{}, { label: title, stroke: COLORS[0], fill: `${COLORS[0]}aa`, paths: uPlot.paths.bars({ size: [0.6, 80] }), points: { show: false } }],
    axes: [
      { splits: () => known.map((_, i) => i), values: (u, ticks) => ticks.map((i) => known[i]?.method ?? "") },
      { size: 84, values: (u, ticks) => ticks.map((v) => format(v)) },
    ],
  }, [known.map((_, i) => i), known.map(value)]);
  return box;
}

async function comparePage() {
  const [jobs, files] = await Promise.all([api("/fine_tuning/jobs?limit=100"), api("/files")]);
  if (!comparing.size) { // the newest finished job of each method
    const seen = new Set();
    for (const j of jobs.data) if (j.status === "succeeded" && !seen.has(j.tunedock?.method)) { seen.add(j.tunedock?.method); comparing.add(j.id); }
  }
  const rows = jobs.data.filter((j) => comparing.has(j.id)).map((j) => {
    const m = j.tunedock?.metrics || {};
    return {
      job: j, method: j.tunedock?.method, params: m.trainable_params, memory: m.training_memory_bytes, peak: m.peak_memory_bytes,
      speed: m.trained_tokens && m.wall_time_s ? m.trained_tokens / m.wall_time_s : NaN, wall: m.wall_time_s,
      loss: m.eval_loss ?? m.train_loss, lossKind: m.eval_loss !== undefined ? "eval" : "train",
      agreement: j.tunedock?.extraction?.metrics?.extract_greedy_agreement,
    };
  });
  // Artifact sizes from the registry (what each method publishes: a model, a delta, an adapter).
  const published = [...new Set(rows.map((r) => r.job.tunedock?.output_ref).filter(Boolean).map((ref) => ref.split(":")[0]))];
  const sizes = new Map();
  await Promise.all(published.map(async (name) => {
    try { for (const v of (await tunedock(`/artifacts/${name}/versions`)).data) sizes.set(v.ref, v.size); } catch { /* not readable: no size */ }
  }));
  for (const r of rows) r.artifact = sizes.get(r.job.tunedock?.output_ref) ?? NaN;
  const done = rows.filter((r) => r.job.status === "succeeded" && Number.isFinite(r.loss));
  const best = done.length ? done.reduce((a, b) => (b.loss < a.loss ? b : a)) : null;
  const lightest = done.length ? done.reduce((a, b) => (b.memory < a.memory ? b : a)) : null;
  const fmt = (v, f) => (Number.isFinite(v) ? f(v) : "");
  const runFour = async (e) => {
    e.preventDefault();
    const prefix = $("#prefix").value || "compare";
    comparing.clear();
    for (const method of Object.keys(METHODS)) {
      const hyperparameters = { max_steps: Number($("#steps").value) || 12 };
      const job = await api("/fine_tuning/jobs", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({
        model: "auto", training_file: $("#compare_file").value, suffix: `${prefix}-${method}`, method: { type: method, [method]: { hyperparameters } },
      }) });
      comparing.add(job.id);
    }
    route(true);
  };
  show(el("h1", {}, "Compare the four methods"),
    el("form", { class: "card", on: { submit: (e) => runFour(e).catch((error) => main.prepend(fail(error))) } },
      el("p", { class: "muted" }, "Train Full, Freeze, LoRA and QLoRA on the same data and steps, then compare them here."),
      el("div", { class: "two" },
        el("div", {}, el("label", { for: "compare_file" }, "Training file"), el("select", { id: "compare_file" }, files.data.map((f) => el("option", { value: f.id }, `${f.filename} (${f.id})`)))),
        el("div", {}, el("label", { for: "steps" }, "steps"), el("input", { id: "steps", type: "number", value: 12 }))),
      el("label", { for: "prefix" }, "Name prefix"), el("input", { id: "prefix", type: "text", value: "compare" }), el("p"),
      el("button", { type: "submit", "data-testid": "run-four" }, "Run the four methods")),
    el("table", { "data-testid": "compare" },
      el("tr", {}, ...["method", "job", "status", "trainable params", "tensor memory", "process peak", "tokens/s", "wall s", "loss", "artifact", "served as"].map((h) => el("th", {}, h))),
      rows.map((r) => el("tr", { "data-method": r.method }, el("td", {}, r.method), el("td", {}, el("a", { href: `#/jobs/${r.job.id}` }, r.job.id)), el("td", {}, status(r.job.status)),
        el("td", {}, fmt(r.params, (v) => v.toLocaleString())), el("td", {}, fmt(r.memory, bytes)), el("td", {}, fmt(r.peak, bytes)),
        el("td", {}, fmt(r.speed, (v) => v.toFixed(0))), el("td", {}, fmt(r.wall, (v) => v.toFixed(1))), el("td", {}, fmt(r.loss, (v) => `${v.toFixed(3)} (${r.lossKind})`)),
        el("td", { "data-testid": "artifact-size" }, fmt(r.artifact, bytes)),
        el("td", {}, (r.job.fine_tuned_model || "") + (r.agreement !== undefined ? ` (extracted, ${(100 * r.agreement).toFixed(0)}% agreement)` : ""))))),
    best ? el("p", { "data-testid": "recommendation" }, `Lowest loss: ${best.method} (${best.loss.toFixed(3)}). Least memory: ${lightest.method} (${bytes(lightest.memory)}). ` +
      "LoRA and QLoRA serve as trained; Full and Freeze through an extracted adapter.") : "",
    el("div", { class: "grid" },
      bars("tensor memory", rows, (r) => r.memory, bytes), bars("tokens/s", rows, (r) => r.speed, (v) => v.toFixed(0)),
      bars("loss", rows, (r) => r.loss, (v) => v.toFixed(3)), bars("artifact size", rows, (r) => r.artifact, bytes)),
    el("h2", {}, "Jobs to compare"),
    el("div", {}, jobs.data.map((j) => el("label", { style: "font-weight:normal" }, el("input", { type: "checkbox", style: "width:auto", checked: comparing.has(j.id),
      on: { change: (e) => { if (e.target.checked) comparing.add(j.id); else comparing.delete(j.id); route(true); } } }), ` ${j.id} (${j.tunedock?.method}, ${j.status})`))));
  if (rows.some((r) => !TERMINAL.has(r.job.status))) later(2000);
}

// ------------------------------------------------------------------------------------- registry

async function tunedock(path, options = {}) {
  const answer = await fetch(`/tunedock/v1${path}`, { ...options, headers: { Authorization: `Bearer ${token()}`, "content-type": "application/json" } });
  const body = await answer.json();
  if (!answer.ok) { const error = new Error(body?.error?.message || answer.statusText); error.status = answer.status; throw error; }
  return body;
}

async function registryPage(name) {
  const artifacts = (await tunedock("/artifacts")).data;
  if (!name) {
    show(el("h1", {}, "Registry"),
      el("table", { "data-testid": "artifacts" }, el("tr", {}, ...["artifact", "kind", "latest", "aliases", "base", "project"].map((h) => el("th", {}, h))),
        artifacts.map((a) => el("tr", { class: "link", "data-artifact": a.name, on: { click: () => { location.hash = `#/registry/${a.name}`; } } },
          el("td", {}, a.name), el("td", {}, a.kind), el("td", {}, a.latest_version),
          el("td", {}, Object.entries(a.aliases).map(([k, v]) => `${k}→${v}`).join(", ")), el("td", {}, a.base_model), el("td", {}, a.project)))));
    return;
  }
  const artifact = artifacts.find((a) => a.name === name);
  if (!artifact) throw new Error(`artifact ${name} not found`);
  const versions = (await tunedock(`/artifacts/${name}/versions`)).data;
  const extractedName = artifacts.find((a) => a.name === `${name}-lora`)?.name;
  const extracted = extractedName ? (await tunedock(`/artifacts/${extractedName}/versions`)).data : [];
  const box = (text, extra = {}) => el("div", { class: "card", style: "margin:0;padding:.4rem .6rem", ...extra }, text);
  const arrow = () => el("span", { class: "muted" }, "→");
  const graph = versions.map((v) => {
    const m = v.lineage.metrics;
    const into = extracted.filter((x) => x.lineage.extracted_from === v.ref);
    return el("div", { style: "display:flex;gap:.5rem;align-items:center;margin:.4rem 0", "data-testid": `lineage-${v.version}` },
      box(`dataset ${v.lineage.dataset_ids.join(", ") || "?"}`), arrow(),
      box(el("a", { href: `#/jobs/${v.lineage.job_id}` }, `job ${v.lineage.job_id || "?"}`)), arrow(),
      box(`${v.ref} (${v.kind}${v.aliases.length ? `; ${v.aliases.join(", ")}` : ""})` +
        (m.train_loss !== undefined ? ` loss ${m.train_loss.toFixed(3)}` : "") + (m.eval_loss !== undefined ? `, eval ${m.eval_loss.toFixed(3)}` : ""), { "data-ref": v.ref }),
      v.lineage.extracted_from ? [el("span", { class: "muted" }, "extracted from"), box(v.lineage.extracted_from)] : "",
      into.length ? [arrow(), ...into.map((x) => box(`${x.ref} (extracted adapter${x.lineage.metrics.extract_greedy_agreement !== undefined ? `, ${(100 * x.lineage.metrics.extract_greedy_agreement).toFixed(0)}% agreement` : ""})`))] : "");
  });
  const message = el("div", { "data-testid": "alias-message" });
  const aliasRow = (alias, current) => {
    const pick = el("select", { "data-alias": alias }, versions.map((v) => el("option", { value: v.version, selected: v.version === current }, `version ${v.version}`)));
    const nameInput = alias ? null : el("input", { type: "text", placeholder: "new alias, e.g. prod", "data-testid": "new-alias", style: "width:12rem" });
    const move = el("button", { "data-testid": `move-${alias || "new"}`, on: { click: async () => {
      const target = alias || nameInput.value.trim();
      if (!target) return;
      if (!confirm(`Point ${name}@${target} at version ${pick.value}?`)) return;
      try {
        const moved = await tunedock(`/artifacts/${name}/aliases/${target}`, { method: "PUT", body: JSON.stringify({ version: Number(pick.value) }) });
        message.replaceChildren(el("p", {}, `${name}@${target} → version ${moved.version}` + (moved.previous ? ` (was ${moved.previous})` : "")));
        later(800);
      } catch (error) { message.replaceChildren(fail(error)); }
    } } }, alias ? "Move" : "Set");
    return el("tr", {}, el("td", {}, alias || nameInput), el("td", {}, pick), el("td", {}, move));
  };
  show(el("h1", {}, `${name} `, el("span", { class: "muted" }, `${artifact.kind} · ${artifact.project}`)),
    el("h2", {}, "Lineage"), el("div", {}, graph),
    el("h2", {}, "Aliases"), el("p", { class: "muted" }, "Moving an alias (promote, roll back) needs the registry.admin role; replicas serving it load the new version."),
    el("table", { "data-testid": "aliases" }, el("tr", {}, el("th", {}, "alias"), el("th", {}, "version"), el("th", {}, "")),
      Object.entries(artifact.aliases).map(([a, v]) => aliasRow(a, v)), aliasRow("", artifact.latest_version)), message);
}

// -------------------------------------------------------------------------------------- serving

async function servingPage() {
  const answer = await fetch("/tunedock/v1/serving?replicas=1", { headers: { Authorization: `Bearer ${token()}` } });
  const s = await answer.json();
  if (!answer.ok) throw new Error(s.error?.message || answer.statusText);
  const replicas = s.replicas || [s];
  const card = (x) => {
    if (x.error) return el("div", { class: "card", "data-testid": "replica" }, el("strong", {}, x.address), el("p", { class: "error" }, x.error));
    const r = x.replica, e = x.engine, t = x.throughput || {};
    return el("div", { class: "card", "data-testid": "replica" },
      el("strong", {}, x.address || "this replica"),
      el("p", {}, `Base ${r.base_id} (${r.architecture}, ${r.device}, ${e.dtype}) · max_model_len ${r.max_model_len} · TuneDock ${r.version}`),
      el("p", {}, `LoRA slots ${r.max_loras} in the engine, ${r.max_cpu_loras} in host memory, rank ≤ ${r.max_lora_rank} · ${x.adapters_loaded} adapters loaded`),
      el("p", {}, `Queue ${e.queued_requests} waiting · ${e.open_streams} open streams · isolation ${e.isolation}` + (e.restarting ? " · engine restarting" : "")),
      el("p", { "data-testid": "throughput" }, `Throughput ${(t.tokens_per_s_10s ?? 0).toFixed(1)} tokens/s over 10 s, ${(t.tokens_per_s_60s ?? 0).toFixed(1)} over 60 s · ${(t.requests_per_s_10s ?? 0).toFixed(2)} requests/s`),
      el("table", { "data-testid": "loaded" }, el("tr", {}, ...["adapter you can see", "project", "rank", "size", "in engine", "in flight", "pinned"].map((h) => el("th", {}, h))),
        x.adapters.map((a) => el("tr", {}, el("td", {}, a.ref), el("td", {}, a.project), el("td", {}, a.rank), el("td", {}, bytes(a.bytes)),
          el("td", {}, a.in_engine ? "yes" : "no"), el("td", {}, a.in_flight), el("td", {}, a.pinned ? "yes" : "")))));
  };
  show(el("h1", {}, "Serving"),
    el("p", { class: "muted" }, s.replicas ? `${replicas.length} replicas (the SRV records of their HTTP port, as the proxy finds them), each answering for itself.`
      : "The replica that answered this page (set --peers-srv on the replicas to see every one)."),
    s.peers_error ? el("p", { class: "error" }, `Other replicas not found: ${s.peers_error}`) : "",
    el("div", { class: "grid" }, replicas.map(card)));
  later(3000);
}

// ------------------------------------------------------------------------------- models, playground

async function modelsPage() {
  const models = await api("/models");
  show(el("h1", {}, "Models"),
    el("table", { "data-testid": "models" }, el("tr", {}, ...["model", "base", "method", "aliases", "project"].map((h) => el("th", {}, h))),
      models.data.map((m) => el("tr", {}, el("td", {}, m.id), el("td", {}, m.parent || "(base)"), el("td", {}, m.tunedock?.method || ""),
        el("td", {}, (m.tunedock?.aliases || []).join(", ")), el("td", {}, m.tunedock?.project || m.owned_by)))));
}

// One streamed answer into `out`: chat completions (a delta's content) or completions (a choice's text).
async function stream(path, body, out) {
  out.textContent = "";
  delete out.dataset.done;
  const answer = await fetch(`/v1${path}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token()}`, "content-type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!answer.ok) { out.replaceChildren(fail(new Error((await answer.json()).error?.message))); out.dataset.done = "true"; return null; }
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const parts = buffer.split("\n\n");
    buffer = parts.pop();
    for (const part of parts) {
      const data = part.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { out.append(fail(new Error(chunk.error.message))); continue; }
      const piece = chunk.choices?.[0]?.delta?.content ?? chunk.choices?.[0]?.text ?? "";
      text += piece;
      out.append(piece);
    }
  }
  out.dataset.done = "true";
  return text;
}

function copyAs(kind, path, body) {
  const json = JSON.stringify(body);
  if (kind === "curl") {
    return `curl -s ${location.origin}/v1${path} -H "Authorization: Bearer $TUNEDOCK_TOKEN" \\\n  -H 'content-type: application/json' -d '${json.replaceAll("'", "'\\''")}'`;
  }
  const head = `from openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", api_key=TUNEDOCK_TOKEN)\n`;
  if (path === "/completions") {
    return head + `reply = client.completions.create(model=${JSON.stringify(body.model)}, prompt=${JSON.stringify(body.prompt)}, ` +
      `temperature=${body.temperature}, max_tokens=${body.max_tokens})\nprint(reply.choices[0].text)`;
  }
  return head + `reply = client.chat.completions.create(model=${JSON.stringify(body.model)}, messages=${JSON.stringify(body.messages)}, ` +
    `temperature=${body.temperature}, max_tokens=${body.max_tokens})\nprint(reply.choices[0].message.content)`;
}

// The base and up to four adapters or aliases side by side. Chat keeps a conversation per pane (each
// model answers its own earlier turns); prompt sends raw text to /v1/completions, no template.
async function playgroundPage() {
  const models = (await api("/models")).data.map((m) => m.id);
  const adapters = models.slice(1);
  const chosen = [models[0], ...adapters.slice(0, 2)];
  const panes = [0, 1, 2, 3, 4].map((i) => ({
    pick: el("select", { id: `model-${i}`, "data-testid": `model-${i}` }, el("option", { value: "" }, "(none)"),
      models.map((m) => el("option", { value: m, selected: m === chosen[i] }, m))),
    turns: el("div", { class: "turns", "data-testid": `turns-${i}` }),
    out: el("div", { class: "answer", "data-testid": `answer-${i}` }),
    history: [],
  }));
  const mode = el("select", { id: "mode", "data-testid": "mode", on: { change: () => { reset(); system.parentElement.hidden = mode.value !== "chat"; } } },
    el("option", { value: "chat" }, "chat (a conversation per model)"), el("option", { value: "prompt" }, "prompt (raw text, /v1/completions)"));
  const system = el("textarea", { id: "system", rows: 2, placeholder: "optional: the system prompt" });
  const prompt = el("textarea", { id: "prompt", rows: 3 }, "What does the pirate say about ship 3?");
  const temperature = el("input", { id: "temperature", type: "number", value: 0, step: "0.1", min: 0, max: 2 });
  const maxTokens = el("input", { id: "max_tokens", type: "number", value: 32, min: 1 });
  const copied = el("pre", { class: "log", "data-testid": "copy-as", hidden: true });
  const sampling = () => ({ temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) });
  const request = (pane, model) => {
    if (mode.value === "prompt") return ["/completions", { model, prompt: prompt.value, ...sampling() }];
    const head = system.value.trim() ? [{ role: "system", content: system.value.trim() }] : [];
    return ["/chat/completions", { model, messages: [...head, ...pane.history, { role: "user", content: prompt.value }], ...sampling() }];
  };
  function reset() { for (const pane of panes) { pane.history = []; pane.turns.replaceChildren(); pane.out.textContent = ""; } }
  async function ask(pane) {
    const question = prompt.value;
    const [path, body] = request(pane, pane.pick.value);
    if (mode.value === "chat") { // the last answer moves up into the conversation, the new question below it
      if (pane.history.length) pane.turns.append(el("div", { class: "turn assistant" }, pane.history[pane.history.length - 1].content));
      pane.turns.append(el("div", { class: "turn user" }, question));
    }
    const text = await stream(path, body, pane.out);
    if (mode.value === "chat" && text !== null) pane.history.push({ role: "user", content: question }, { role: "assistant", content: text });
  }
  const run = el("button", { "data-testid": "run", on: { click: () => Promise.all(panes.filter((p) => p.pick.value).map(ask)) } }, "Ask them all");
  const fresh = el("button", { class: "secondary", "data-testid": "new-conversation", on: { click: reset } }, "New conversation");
  const copy = (kind) => el("button", { class: "secondary", "data-testid": `copy-${kind}`, on: { click: () => {
    const pane = panes.find((p) => p.pick.value && p.pick.value !== models[0]) || panes[0];
    copied.hidden = false;
    copied.textContent = copyAs(kind, ...request(pane, pane.pick.value || models[0]));
    navigator.clipboard?.writeText(copied.textContent).catch(() => {});
  } } }, `Copy as ${kind}`);
  show(el("h1", {}, "Playground"), el("p", { class: "muted" }, "One chat or prompt to the base and up to four adapters or aliases at once, streamed side by side."),
    el("div", { class: "two" }, el("div", {}, el("label", { for: "mode" }, "Mode"), mode), el("div", {}, el("label", { for: "system" }, "System prompt"), system)),
    el("label", { for: "prompt" }, "Message"), prompt,
    el("div", { class: "two" }, el("div", {}, el("label", { for: "temperature" }, "temperature"), temperature), el("div", {}, el("label", { for: "max_tokens" }, "max tokens"), maxTokens)),
    el("p"), run, " ", fresh, " ", copy("curl"), " ", copy("openai-python"), copied,
    el("div", { class: "grid" }, panes.map((p) => el("div", {}, p.pick, p.turns, p.out))));
}

// ---------------------------------------------------------------------------------------- router

async function route(refresh = false) {
  clearTimeout(timer);
  if (!token()) { signIn(); return; }
  $("#nav").hidden = false;
  $("#signout").hidden = false;
  const hash = location.hash || "#/jobs";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", hash.startsWith(a.getAttribute("href")));
  const [, page, id] = hash.split("/");
  const pages = { jobs: () => (id ? jobPage(id) : jobsPage()), datasets: () => (id ? datasetPage(id.split("?")[0]) : datasetsPage()), new: newJobPage, compare: comparePage, registry: () => registryPage(id), serving: servingPage, models: modelsPage, playground: playgroundPage };
  try {
    await (pages[page] || jobsPage)();
  } catch (error) {
    if (error.status === 401) { sessionStorage.removeItem("tunedock-token"); signIn("Signed out: the token is no longer accepted."); return; }
    if (!refresh || !main.children.length) show(fail(error));
  }
}

$("#signout").addEventListener("click", () => { sessionStorage.removeItem("tunedock-token"); signIn(); });
window.addEventListener("hashchange", () => route());
route();
