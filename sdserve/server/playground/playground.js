// The sdserve playground: one page over the HTTP gateway (docs/api.md, "HTTP"). No libraries,
// no build step. Requests are the proto's JSON mapping, exactly what POST /v1/generate takes.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];      // ListModelsResponse.models
let adapters = [];    // ListAdaptersResponse.adapters of the chosen model's family

function headers(json) {
  const h = {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

// A gateway error body is {"code", "message"[, "cause"]}: show it as the CLI prints gRPC errors.
async function failure(response) {
  let body = {};
  try { body = await response.json(); } catch (_) { /* not JSON: fall back to the status */ }
  const code = body.code || String(response.status);
  return `${code}: ${body.message || response.statusText}` + (body.cause ? ` (cause: ${body.cause})` : "");
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers(false) });
  if (!response.ok) throw new Error(await failure(response));
  return response.json();
}

async function checkHealth() {
  const pill = $("health");
  try {
    const response = await fetch("/v1/health");
    const ok = response.ok;
    pill.textContent = ok ? "serving" : "not serving";
    pill.className = "pill " + (ok ? "ok" : "bad");
  } catch (_) {
    pill.textContent = "unreachable";
    pill.className = "pill bad";
  }
}

function chosenModel() {
  return models.find((m) => m.name === $("model").value) || models[0];
}

function applyDefaults() {
  const d = (chosenModel() || {}).defaults || {};
  $("steps").placeholder = d.steps || "";
  $("width").placeholder = d.width || "";
  $("height").placeholder = d.height || "";
  $("guidance-scale").placeholder = d.guidance_scale ?? "";
  $("scheduler").placeholder = d.scheduler || "model default";
}

async function loadModels() {
  const data = await getJSON("/v1/models");
  models = data.models || [];
  const select = $("model");
  select.replaceChildren(...models.map((m) => {
    const option = new Option(`${m.name} (${m.family})`, m.name);
    option.selected = Boolean(m.is_default);
    return option;
  }));
  applyDefaults();
}

async function loadAdapters() {
  const model = chosenModel();
  const query = model ? "?family=" + encodeURIComponent(model.family) : "";
  const data = await getJSON("/v1/adapters" + query);
  adapters = (data.adapters || []).filter((a) => (a.kind || "lora") === "lora");
  $("adapter-note").textContent = adapters.length ? "" : "no LoRAs registered for this family (upload with POST /v1/adapters)";
  for (const select of document.querySelectorAll("#adapters select")) fillAdapterSelect(select, select.value);
}

function fillAdapterSelect(select, value) {
  select.replaceChildren(...adapters.map((a) => new Option(
    `${a.name}${a.shared ? " (shared)" : ""}${a.rank ? " r" + a.rank : ""}`, a.name)));
  if (value) select.value = value;
}

function numberCell(className, value, step, min, max) {
  const input = document.createElement("input");
  Object.assign(input, { type: "number", className, value, step });
  if (min !== undefined) input.min = min;
  if (max !== undefined) input.max = max;
  const cell = document.createElement("td");
  cell.append(input);
  return cell;
}

function addAdapterRow() {
  const row = document.createElement("tr");
  const select = document.createElement("select");
  select.className = "adapter-name";
  fillAdapterSelect(select);
  const nameCell = document.createElement("td");
  nameCell.append(select);
  const remove = document.createElement("button");
  Object.assign(remove, { type: "button", textContent: "×", title: "remove" });
  remove.addEventListener("click", () => row.remove());
  const removeCell = document.createElement("td");
  removeCell.append(remove);
  row.append(nameCell, numberCell("scale", "1", "0.05"), numberCell("start", "0", "0.05", 0, 1),
             numberCell("end", "1", "0.05", 0, 1), removeCell);
  $("adapters").tBodies[0].append(row);
}

// The form as a GenerateRequest in the proto's JSON mapping; empty fields stay absent (defaults).
function buildRequest() {
  const request = { prompt: $("prompt").value };
  const text = (id, field) => { const v = $(id).value; if (v !== "") request[field] = v; };
  const int = (id, field) => { const v = $(id).value; if (v !== "") request[field] = parseInt(v, 10); };
  const num = (id, field) => { const v = $(id).value; if (v !== "") request[field] = parseFloat(v); };
  text("model", "model");
  text("negative-prompt", "negative_prompt");
  text("scheduler", "scheduler");
  int("steps", "steps");
  int("width", "width");
  int("height", "height");
  num("guidance-scale", "guidance_scale");
  int("preview-every", "preview_every");
  const seed = $("seed").value;
  if (seed !== "") request.seed = parseInt(seed, 10);  // sdserve's JSON reader takes int64 as a number
  const stack = [];
  for (const row of $("adapters").tBodies[0].rows) {
    const name = row.querySelector(".adapter-name").value;
    if (!name) continue;
    stack.push({
      name,
      scale: parseFloat(row.querySelector(".scale").value),
      start: parseFloat(row.querySelector(".start").value),
      end: parseFloat(row.querySelector(".end").value),
    });
  }
  if (stack.length) request.adapters = stack;
  return request;
}

// The tEXt / iTXt chunk `keyword` of a PNG (A1111's "parameters"), or null.
function pngText(bytes, keyword) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let offset = 8;  // after the signature
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    const data = bytes.subarray(offset + 8, offset + 8 + length);
    if (type === "tEXt" || type === "iTXt") {
      const zero = data.indexOf(0);
      const key = new TextDecoder("latin1").decode(data.subarray(0, zero));
      if (key === keyword) {
        if (type === "tEXt") return new TextDecoder("latin1").decode(data.subarray(zero + 1));
        if (data[zero + 1] !== 0) return "(compressed iTXt chunk)";
        let rest = zero + 3;  // compression flag and method
        rest = data.indexOf(0, rest) + 1;  // language tag
        rest = data.indexOf(0, rest) + 1;  // translated keyword
        return new TextDecoder("utf-8").decode(data.subarray(rest));
      }
    }
    if (type === "IEND") break;
    offset += 12 + length;
  }
  return null;
}

function base64Bytes(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function onEvent(name, data) {
  if (name === "queued") {
    setStatus(`Queued (request ${data.queued.request_id}, position ${data.queued.queue_position || 0}).`);
  } else if (name === "progress") {
    const p = data.progress;
    $("progress").max = p.total_steps;
    $("progress").value = p.step;
    setStatus(`Step ${p.step} / ${p.total_steps}`);
    if (p.preview_png) $("preview-image").src = "data:image/png;base64," + p.preview_png;
  } else if (name === "result") {
    const result = data.result;
    const image = (result.images || [])[0];
    if (image) {
      const url = "data:image/png;base64," + image.png;
      $("result-image").src = url;
      $("download").href = url;
      $("download").hidden = false;
      $("result-caption").textContent = `image ${image.width}×${image.height}, seed ${result.seed}`;
      $("params").textContent = pngText(base64Bytes(image.png), "parameters") || "(no parameters chunk)";
    }
    const shown = { ...result, images: (result.images || []).map((i) => ({ ...i, png: `<${i.png.length} base64 chars>` })) };
    $("response").textContent = JSON.stringify(shown, null, 2);
    const total = result.timings ? ` in ${Number(result.timings.total || 0).toFixed(2)} s` : "";
    setStatus(`Done${total}.`);
    document.body.dataset.state = "done";
  } else if (name === "error") {
    setStatus(`${data.code}: ${data.message}`, true);
    document.body.dataset.state = "error";
  }
}

// POST /v1/generate:stream and read its server-sent events (EventSource cannot POST).
async function generate(event) {
  event.preventDefault();
  const request = buildRequest();
  $("request-json").textContent = JSON.stringify(request, null, 2);
  $("generate").disabled = true;
  $("progress").value = 0;
  $("download").hidden = true;
  document.body.dataset.state = "running";
  setStatus("Sending…");
  try {
    const response = await fetch("/v1/generate:stream", {
      method: "POST", headers: headers(true), body: JSON.stringify(request),
    });
    if (!response.ok) {
      setStatus(await failure(response), true);
      document.body.dataset.state = "error";
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) onEvent(name, JSON.parse(data));
      }
    }
  } catch (error) {
    setStatus(String(error), true);
    document.body.dataset.state = "error";
  } finally {
    $("generate").disabled = false;
  }
}

async function reload() {
  try {
    await loadModels();
    await loadAdapters();
    setStatus("Ready.");
  } catch (error) {
    setStatus(error.message + (error.message.startsWith("UNAUTHENTICATED") ? " (enter an API key above)" : ""), true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("request").addEventListener("submit", generate);
  $("add-adapter").addEventListener("click", addAdapterRow);
  $("refresh").addEventListener("click", reload);
  $("api-key").addEventListener("change", reload);
  $("model").addEventListener("change", () => { applyDefaults(); loadAdapters().catch((e) => setStatus(e.message, true)); });
  checkHealth();
  reload();
});
