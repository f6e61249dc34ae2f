// The KegNet web page: plain DOM and fetch, no framework. Every call is the public API with the key from this
// tab's sessionStorage; every failure shows the API's own message (never a blank page).
"use strict";

const KEY = "kegnet-api-key";
const FIELDS = ["checkpoint", "arch", "arch_kwargs", "input_shape", "num_classes", "preset", "rank_method",
  "target_ratio", "config_json", "eval_set"];
const $ = (id) => document.getElementById(id);

function authHeaders() {
  const key = sessionStorage.getItem(KEY) || "";
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = detail;
  }
}

// fetch with the key; a non-2xx answer becomes an ApiError carrying the API's `detail`.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (err) {
    throw new ApiError(0, `the service could not be reached (${err.message}); is it running?`);
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.detail !== undefined) detail = body.detail;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new ApiError(response.status, detail);
  }
  return response;
}

function showMessage(text, ok = false) {
  const msg = $("msg");
  msg.textContent = text;
  msg.className = ok ? "msg ok" : "msg";
  msg.hidden = !text;
}

function explain(err) {
  const text = err instanceof ApiError ? err.message : String(err && err.message ? err.message : err);
  if (err && err.status === 401) return `${text} (enter a valid API key above)`;
  return text;
}

// ---- the key

function setupKey() {
  const input = $("api-key");
  input.value = sessionStorage.getItem(KEY) || "";
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    $("key-state").textContent = input.value.trim() ? "key set for this tab" : "no key";
    showMessage("");
    refresh();
  });
}

// ---- the submit form

function clearErrors() {
  for (const name of FIELDS) $(`err-${name}`).textContent = "";
  showMessage("");
}

// 422 detail: a string (shown in the message area) or a list of {loc, msg} (each beside its field).
function showErrors(err) {
  const detail = err instanceof ApiError ? err.detail : null;
  if (!Array.isArray(detail)) {
    const text = explain(err);
    if (text.startsWith("eval_set:")) $("err-eval_set").textContent = text;
    showMessage(text);
    return;
  }
  const general = [];
  for (const item of detail) {
    const loc = (item.loc || []).map(String);
    const field = fieldOf(loc);
    const text = `${item.msg}${field ? "" : ` (${loc.join(".")})`}`;
    if (field) $(`err-${field}`).textContent = text; else general.push(text);
  }
  showMessage(general.length ? general.join("\n") : "the request was refused: see the fields marked below");
}

function fieldOf(loc) {
  if (loc[0] !== "spec") return null;
  if (loc[1] === "model" && ["arch", "arch_kwargs", "input_shape", "num_classes"].includes(loc[2])) return loc[2];
  if (loc[1] === "config") {
    for (const name of ["preset", "rank_method", "target_ratio"]) if (loc.includes(name)) return name;
    return "config_json";
  }
  return null;
}

function parseJsonField(name) {
  const text = $(name).value.trim();
  if (!text) return {};
  try {
    const value = JSON.parse(text);
    if (value && typeof value === "object" && !Array.isArray(value)) return value;
  } catch (_) { /* reported below */ }
  throw new FieldError(name, "must be a JSON object, e.g. {\"key\": 1}");
}

class FieldError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

function buildSpec() {
  const model = { arch: $("arch").value.trim() };
  const kwargs = parseJsonField("arch_kwargs");
  if (Object.keys(kwargs).length) model.arch_kwargs = kwargs;
  const shape = $("input_shape").value.trim();
  if (shape) {
    // Numbers go as they are typed: the API's validation says what is wrong with them.
    model.input_shape = shape.split(/[\s,x×]+/).filter(Boolean).map((t) => (/^-?\d+$/.test(t) ? Number(t) : t));
  }
  const classes = $("num_classes").value.trim();
  if (classes) model.num_classes = Number(classes);
  const overrides = parseJsonField("config_json");
  const compression = { ...(overrides.compression || {}), rank_method: $("rank_method").value };
  // Left empty, the service's default applies (2x, or 2x of the layers that can be factorized).
  if ($("rank_method").value === "ratio" && $("target_ratio").value !== "") {
    compression.target_ratio = Number($("target_ratio").value);
  }
  const config = { ...overrides, preset: $("preset").value, compression };
  return { model, config };
}

async function submitJob(ev) {
  ev.preventDefault();
  clearErrors();
  const file = $("checkpoint").files[0];
  if (!file) { $("err-checkpoint").textContent = "choose a checkpoint file"; $("checkpoint").focus(); return; }
  let spec;
  try {
    spec = buildSpec();
  } catch (err) {
    if (err instanceof FieldError) { $(`err-${err.field}`).textContent = err.message; return; }
    throw err;
  }
  const form = new FormData();
  form.append("checkpoint", file, file.name);
  form.append("spec", JSON.stringify(spec));
  const evalFile = $("eval_set").files[0];
  if (evalFile) form.append("eval_set", evalFile, evalFile.name);
  const button = $("submit");
  button.disabled = true;
  showMessage("uploading…", true);
  try {
    const job = await (await api("/v1/jobs", { method: "POST", body: form })).json();
    window.location.assign(`/jobs/${job.id}`);
  } catch (err) {
    showErrors(err);
  } finally {
    button.disabled = false;
  }
}

async function loadArchitectures() {
  const q = $("arch").value.trim();
  try {
    const names = await (await api(`/v1/architectures?q=${encodeURIComponent(q)}&limit=30`)).json();
    const list = $("arch-list");
    list.replaceChildren(...names.map((n) => Object.assign(document.createElement("option"), { value: n })));
  } catch (err) {
    $("err-arch").textContent = `architecture names unavailable: ${explain(err)}`;
  }
}

// ---- the jobs table

function cell(text) {
  return Object.assign(document.createElement("td"), { textContent: text });
}

function button(label, onClick) {
  const b = Object.assign(document.createElement("button"), { type: "button", textContent: label });
  b.addEventListener("click", onClick);
  return b;
}

async function jobAction(id, action) {
  try {
    if (action === "cancel") await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
    else await api(`/v1/jobs/${id}`, { method: "DELETE" });
    showMessage(`job ${id.slice(0, 8)}: ${action === "cancel" ? "cancel requested" : "deleted"}`, true);
  } catch (err) {
    showMessage(explain(err));
  }
}

async function refresh() {
  if ($("main").dataset.job) return loadJob();
  const body = $("jobs").tBodies[0];
  try {
    const page = await (await api("/v1/jobs?limit=50")).json();
    body.replaceChildren(...page.jobs.map(jobRow));
    if (!page.jobs.length) {
      const empty = cell("no jobs yet");
      empty.colSpan = 6;
      body.replaceChildren(Object.assign(document.createElement("tr")));
      body.rows[0].append(empty);
    }
  } catch (err) {
    body.replaceChildren();
    showMessage(explain(err));
  }
}

function jobRow(job) {
  const tr = document.createElement("tr");
  const link = Object.assign(document.createElement("a"), { href: `/jobs/${job.id}`, textContent: job.id.slice(0, 8) });
  const first = document.createElement("td");
  first.append(link);
  const ratio = job.metrics && job.metrics.compression_ratio ? `${job.metrics.compression_ratio.toFixed(2)}×` : "";
  const actions = document.createElement("td");
  const ended = ["succeeded", "failed", "cancelled"].includes(job.status);
  actions.append(ended ? button("Delete", async () => { await jobAction(job.id, "delete"); refresh(); })
    : button("Cancel", async () => { await jobAction(job.id, "cancel"); refresh(); }));
  tr.append(first, cell(job.status), cell(`${Math.round(job.progress * 100)}%`),
    cell(new Date(job.created_at * 1000).toLocaleString()), cell(ratio), actions);
  return tr;
}

// ---- one job

let lastSeq = 0;
let lastProgress = null;
let timer = null;

async function loadJob() {
  const id = $("main").dataset.job;
  clearTimeout(timer);
  try {
    const page = await (await api(`/v1/jobs/${id}/events?after=${lastSeq}`)).json();
    lastSeq = page.next_after;
    for (const ev of page.events) if (ev.type === "progress") lastProgress = ev;
    const job = await (await api(`/v1/jobs/${id}`)).json();
    renderJob(job);
    if (!["succeeded", "failed", "cancelled"].includes(job.status)) timer = setTimeout(loadJob, 1000);
  } catch (err) {
    $("job-state").textContent = "unavailable";
    showMessage(explain(err));
    if (err.status === 0 || err.status >= 500) timer = setTimeout(loadJob, 2000);
  }
}

function renderJob(job) {
  $("job-state").textContent = job.status;
  $("job-stage").textContent = job.stage ? `— stage ${job.stage}` : "";
  $("job-progress").value = job.progress || 0;
  const p = lastProgress;
  $("job-step").textContent = p && p.total ? `step ${p.step} of ${p.total} (${p.stage})` : "";
  $("job-cancel").hidden = ["succeeded", "failed", "cancelled"].includes(job.status);
  if (job.status === "failed" || job.status === "cancelled") showMessage(job.error || `the job ${job.status}`);
  if (job.status === "succeeded" && $("job-result").hidden) showResult(job);
}

const fmt = (v, digits = 3) => (typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString() : v.toPrecision(digits)) : v ?? "");

function summaryRows(m) {
  const rows = [["parameters", fmt(m.teacher_parameters), fmt(m.student_parameters)],
    ["compression ratio", "", m.compression_ratio ? `${m.compression_ratio.toFixed(2)}×` : ""]];
  for (const k of Object.keys(m.teacher_speed || {})) {
    const what = `${m.speed_unit === "ms" ? "latency" : "speed"} ${k.split("_")[0].replace("batch", "batch ")}`;
    rows.push([`${what} (${m.speed_unit || ""})`, fmt(m.teacher_speed[k]), fmt((m.student_speed || {})[k])]);
  }
  if (m.synthetic_agreement !== undefined) rows.push(["agreement with the teacher (synthetic)", "", fmt(m.synthetic_agreement)]);
  if (m.confidence_estimate !== undefined) {
    rows.push(["confidence estimate", "", `${fmt(m.confidence_estimate)} (${m.confidence_level})`]);
  }
  if (m.eval_samples !== undefined) {
    rows.push([`accuracy on your ${m.eval_samples} samples`, fmt(m.eval_teacher_accuracy), fmt(m.eval_student_accuracy)]);
  }
  if (m.seconds !== undefined) rows.push(["run time, s", "", fmt(m.seconds)]);
  return rows;
}

async function showResult(job) {
  $("job-result").hidden = false;
  const m = job.metrics || {};
  $("summary").tBodies[0].replaceChildren(...summaryRows(m).map((r) => {
    const tr = document.createElement("tr");
    tr.append(Object.assign(document.createElement("th"), { textContent: r[0] }), cell(r[1]), cell(r[2]));
    return tr;
  }));
  const notes = [...(m.warnings || []), ...(m.confidence_warnings || [])];
  $("notes").replaceChildren(...notes.map((w) => Object.assign(document.createElement("li"), { textContent: `warning: ${w}` })));
  $("artifacts").replaceChildren(...job.artifacts.map(artifactItem));
  const names = job.artifacts.map((a) => a.name);
  for (const name of ["curves", "samples"]) {
    const img = $(`img-${name}`);
    if (names.includes(`${name}.png`)) loadImage(img, `/v1/jobs/${job.id}/artifacts/${name}.png`);
    else img.closest("figure").hidden = true;
  }
  $("usage").textContent = usage(job, names);
}

async function blobUrl(url) {
  return URL.createObjectURL(await (await api(url)).blob());
}

async function loadImage(img, url) {
  try { img.src = await blobUrl(url); } catch (err) { img.alt = `could not load: ${explain(err)}`; showMessage(explain(err)); }
}

function artifactItem(a) {
  const li = document.createElement("li");
  const b = button(`Download ${a.name}`, async () => {
    try {
      const link = Object.assign(document.createElement("a"), { href: await blobUrl(a.url), download: a.name });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    } catch (err) { showMessage(explain(err)); }
  });
  li.append(b, ` ${a.size.toLocaleString()} bytes, sha256 ${a.sha256.slice(0, 16)}…`);
  return li;
}

function usage(job, names) {
  const shape = ((job.request.model || {}).input_shape || []).join(", ") || "...";
  if (names.includes("student.pt2")) {
    return `import torch\nstudent = torch.export.load("student.pt2").module()\nx = torch.randn(1, ${shape})\nclasses = student(x).argmax(1)`;
  }
  if (names.includes("student.onnx")) {
    return `import onnxruntime, numpy\nstudent = onnxruntime.InferenceSession("student.onnx")\n` +
      `x = numpy.random.randn(1, ${shape}).astype("float32")\nlogits = student.run(None, {student.get_inputs()[0].name: x})[0]`;
  }
  return `from kegnet import load_student\nstudent = load_student("results/")`;
}

// ---- start

function start() {
  setupKey();
  const id = $("main").dataset.job;
  if (id) {
    $("job").hidden = false;
    $("job-id").textContent = id;
    $("job-cancel").addEventListener("click", async () => { await jobAction(id, "cancel"); loadJob(); });
    $("job-delete").addEventListener("click", async () => {
      await jobAction(id, "delete");
      if ($("msg").className === "msg ok") window.location.assign("/");
    });
    loadJob();
    return;
  }
  $("home").hidden = false;
  $("submit-form").addEventListener("submit", submitJob);
  $("refresh").addEventListener("click", refresh);
  $("arch").addEventListener("input", loadArchitectures);
  loadArchitectures();
  refresh();
}

window.addEventListener("unhandledrejection", (ev) => showMessage(explain(ev.reason)));
document.addEventListener("DOMContentLoaded", start);
