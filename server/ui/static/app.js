// numbalm's web page: a chat whose replies stream from /v1/chat/completions, and an inspector
// that shows the model's forward pass over the conversation from /v1/trace (docs/inspect.md).
// Plain browser JavaScript, no libraries: every picture is drawn on a <canvas>.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  messages: [],     // the conversation, as the chat API takes it
  trace: null,      // the trace on show (the JSON of POST /v1/trace)
  request: null,    // the body that made it (to fetch more attention layers)
  selected: null,   // the position of the selected token
  busy: false,
};
const LENS = { left: 56, top: 4, cellH: 10, bottom: 70 };

// -- the API --------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const js = await r.json();
  if (!r.ok) throw Object.assign(new Error(js.error ? js.error.message : r.statusText),
                                 { status: r.status, detail: js.error || {} });
  return js;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const js = await r.json();
    if (!r.ok) throw new Error(js.error ? js.error.message : r.statusText);
    const select = $("model");
    select.innerHTML = "";
    for (const m of js.data) {
      if (m.capabilities && !m.capabilities.includes("chat")) continue;
      select.add(new Option(m.id, m.id));
    }
    status(js.data.length ? "ready" : "no model loaded");
  } catch (e) {
    status("models: " + e.message);
  }
}

function status(text) { $("status").textContent = text; }

// -- the chat -------------------------------------------------------------------------------

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  $("input").value = "";
  addBubble("user", text);
  state.messages.push({ role: "user", content: text });
  const prompt = state.messages.slice();
  const bubble = addBubble("assistant", "");
  const temperature = Number($("temperature").value) || 0;
  const seed = Math.floor(Math.random() * 2 ** 31);
  try {
    const usage = await streamReply(prompt, bubble, temperature, seed);
    state.messages.push({ role: "assistant", content: bubble.textContent });
    bubble.dataset.done = "1";
    status("tracing the conversation…");
    await inspect(bubble, { messages: prompt, max_tokens: usage.completion_tokens,
                            temperature, seed });
  } catch (e) {
    bubble.classList.add("error");
    bubble.textContent = bubble.textContent || e.message;
    status(e.message);
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

async function streamReply(messages, bubble, temperature, seed) {
  const body = { model: $("model").value || undefined, messages, stream: true, temperature,
                 max_tokens: Number($("max-tokens").value) || 48, seed,
                 stream_options: { include_usage: true } };
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                  body: JSON.stringify(body) });
  if (!r.ok) {
    const js = await r.json().catch(() => ({}));
    throw new Error(js.error ? js.error.message : r.statusText);
  }
  status("replying…");
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", usage = { completion_tokens: 0 };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          bubble.textContent += delta.content;
          bubble.scrollIntoView({ block: "end" });
        }
      }
    }
  }
  return usage;
}

// -- tracing --------------------------------------------------------------------------------

async function inspect(bubble, body) {
  body.model = $("model").value || undefined;
  let trace;
  try {
    trace = await api("/v1/trace", body);
  } catch (e) {  // too much attention for one answer: take one layer at a time
    if (e.detail.code !== "trace_too_large" || e.detail.param !== "attention_layers") throw e;
    body.attention_layers = [Number($("att-layer").value) || 0];
    trace = await api("/v1/trace", body);
  }
  bubble.trace = trace;
  bubble.request = body;
  tokenSpans(bubble, trace);
  show(trace, body, trace.tokens.length - 1);
  status(`traced ${trace.tokens.length} tokens in ${trace.seconds} s`);
}

// The reply's text becomes its tokens, each one clickable.
function tokenSpans(bubble, trace) {
  bubble.textContent = "";
  for (const t of trace.tokens) {
    if (!t.generated) continue;
    bubble.appendChild(tokenSpan(t, () => { show(bubble.trace, bubble.request, t.position); }));
  }
}

function tokenSpan(t, onclick) {
  const span = document.createElement("span");
  span.className = "tok" + (t.generated ? " generated" : "");
  span.textContent = t.text;
  span.dataset.position = t.position;
  span.title = `position ${t.position}, id ${t.id}`;
  span.addEventListener("click", onclick);
  return span;
}

function show(trace, request, position) {
  const fresh = state.trace !== trace;
  state.trace = trace;
  state.request = request;
  state.selected = position;
  if (fresh) {
    $("inspector-hint").hidden = true;
    $("trace-info").textContent = `${trace.model}, ${trace.n_layers} layers × ` +
      `${trace.n_heads} heads, ${trace.tokens.length} tokens (${trace.backend} backend)`;
    const strip = $("tokens");
    strip.innerHTML = "";
    for (const t of trace.tokens) strip.appendChild(tokenSpan(t, () => select(t.position)));
    fillSelect($("att-layer"), trace.n_layers, trace.n_layers - 1);
    fillSelect($("att-head"), trace.n_heads, 0);
  }
  select(position);
}

function fillSelect(select, n, value) {
  const keep = select.options.length === n ? select.value : String(value);
  select.innerHTML = "";
  for (let i = 0; i < n; i++) select.add(new Option(String(i), String(i)));
  select.value = keep;
}

function select(position) {
  state.selected = position;
  for (const el of document.querySelectorAll(".tok")) {
    const mine = el.closest("#tokens") || (el.closest(".msg") || {}).trace === state.trace;
    el.classList.toggle("selected", Boolean(mine) && Number(el.dataset.position) === position);
  }
  drawLens();
  explain();
  drawAttention();
  drawNorms();
}

// The position whose output predicted the selected token (the first token is only given).
function focus() { return Math.max(0, state.selected - 1); }

// -- the logit-lens heatmap -------------------------------------------------------------------

function color(p) {  // probability 0..1 -> white to dark blue
  const t = Math.sqrt(Math.max(0, Math.min(1, p)));
  const c0 = [247, 251, 255], c1 = [8, 48, 107];
  const c = c0.map((a, i) => Math.round(a + (c1[i] - a) * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function lensGeometry(trace) {
  const n = trace.tokens.length;
  const room = $("inspector").clientWidth - LENS.left - 40;
  const cellW = Math.max(8, Math.min(36, Math.floor(room / n)));
  return { n, L: trace.n_layers, cellW, width: LENS.left + n * cellW + 4,
           height: LENS.top + trace.n_layers * LENS.cellH + LENS.bottom };
}

function drawLens() {
  const trace = state.trace, canvas = $("lens"), g = lensGeometry(trace);
  canvas.width = g.width;
  canvas.height = g.height;
  const ctx = canvas.getContext("2d");
  const lens = trace.logit_lens;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, g.width, g.height);
  ctx.font = "10px ui-monospace, monospace";
  for (let layer = 0; layer < g.L; layer++) {
    const y = LENS.top + (g.L - 1 - layer) * LENS.cellH;  // last layer on top
    if (layer % 5 === 0 || layer === g.L - 1) {
      ctx.fillStyle = "#556";
      ctx.fillText("layer " + layer, 2, y + LENS.cellH - 1);
    }
    for (let t = 0; t < g.n; t++) {
      const x = LENS.left + t * g.cellW;
      ctx.fillStyle = color(lens.top_probs[layer][t][0]);
      ctx.fillRect(x, y, g.cellW - 1, LENS.cellH - 1);
      if (lens.top_ids[layer][t][0] === lens.targets[t]) {  // the guess came true
        ctx.strokeStyle = "#f0a020";
        ctx.lineWidth = 1.5;
        ctx.strokeRect(x + 1, y + 1, g.cellW - 3, LENS.cellH - 3);
      }
    }
  }
  const f = focus(), x = LENS.left + f * g.cellW;
  ctx.strokeStyle = "#d6204b";
  ctx.lineWidth = 2;
  ctx.strokeRect(x - 1, LENS.top - 1, g.cellW + 1, g.L * LENS.cellH + 1);
  const base = LENS.top + g.L * LENS.cellH + 4;  // the tokens, written downwards
  ctx.fillStyle = "#223";
  for (let t = 0; t < g.n; t++) {
    ctx.save();
    ctx.translate(LENS.left + t * g.cellW + g.cellW / 2 + 3, base);
    ctx.rotate(Math.PI / 2);
    ctx.fillText(visible(trace.tokens[t].text).slice(0, 10), 0, 0);
    ctx.restore();
  }
  canvas.dataset.drawn = "1";
  canvas.dataset.cells = String(g.n * g.L);
}

function visible(text) { return text.replace(/ /g, "·").replace(/\n/g, "↵"); }

function piece(trace, id) { return JSON.stringify(trace.vocab[String(id)] ?? "?"); }

function hover(event) {
  const trace = state.trace, tip = $("tooltip");
  if (!trace) return;
  const g = lensGeometry(trace), box = $("lens").getBoundingClientRect();
  const t = Math.floor((event.clientX - box.left - LENS.left) / g.cellW);
  const row = Math.floor((event.clientY - box.top - LENS.top) / LENS.cellH);
  if (t < 0 || t >= g.n || row < 0 || row >= g.L) { tip.hidden = true; return; }
  const layer = g.L - 1 - row, lens = trace.logit_lens;
  const lines = [`layer ${layer}, position ${t} ${JSON.stringify(trace.tokens[t].text)}`,
                 `next: ${piece(trace, lens.targets[t])}, rank ${lens.target_rank[layer][t]}` +
                 `, p ${lens.target_prob[layer][t].toFixed(4)}`, ""];
  lens.top_ids[layer][t].forEach((id, k) => {
    lines.push(`${(lens.top_probs[layer][t][k]).toFixed(3)}  ${piece(trace, id)}`);
  });
  tip.textContent = lines.join("\n");
  tip.hidden = false;
  tip.style.left = event.clientX + 14 + "px";
  tip.style.top = event.clientY + 14 + "px";
}

function clickLens(event) {
  const trace = state.trace;
  if (!trace) return;
  const g = lensGeometry(trace), box = $("lens").getBoundingClientRect();
  const t = Math.floor((event.clientX - box.left - LENS.left) / g.cellW);
  if (t >= 0 && t < g.n) select(Math.min(g.n - 1, t + 1));  // column t predicts token t + 1
}

// -- how the model arrived at the selected token ----------------------------------------------

function explain() {
  const trace = state.trace, p = state.selected, panel = $("how");
  const tok = trace.tokens[p];
  if (p === 0) {
    panel.innerHTML = `<h3>${esc(JSON.stringify(tok.text))} is the first token: it is given, ` +
      "not predicted.</h3>";
    return;
  }
  const lens = trace.logit_lens, q = p - 1, L = trace.n_layers;
  let from = L;  // the first layer from which the token stays the top guess
  while (from > 0 && lens.target_rank[from - 1][q] === 1) from--;
  const how = from < L ? `the top guess from layer ${from} on`
                       : `never the top guess (rank ${lens.target_rank[L - 1][q]} at the end)`;
  const origin = tok.generated ? "generated" : "in the prompt";
  let rows = "";
  for (let layer = L - 1; layer >= 0; layer--) {
    const top = lens.top_ids[layer][q][0];
    rows += `<tr class="${lens.target_rank[layer][q] === 1 ? "top" : ""}"><td>${layer}</td>` +
      `<td>${lens.target_rank[layer][q]}</td><td>${lens.target_prob[layer][q].toFixed(4)}</td>` +
      `<td>${esc(piece(trace, top))} ${lens.top_probs[layer][q][0].toFixed(3)}</td></tr>`;
  }
  panel.innerHTML = `<h3 id="how-summary">${esc(JSON.stringify(tok.text))} (position ${p}, ` +
    `${origin}) was predicted at position ${q} ${esc(JSON.stringify(trace.tokens[q].text))}: ` +
    `${how}.</h3><canvas id="how-plot" width="360" height="90"></canvas>` +
    `<details><summary>layer by layer</summary><table><tr><th>layer</th><th>rank</th>` +
    `<th>p</th><th>the layer's top guess</th></tr>${rows}</table></details>`;
  plot($("how-plot"), [lens.target_prob.map((r) => r[q])], ["#0a7a2f"], 1,
       "p of this token after each layer");
}

function esc(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// A line chart of series over the layers (x) on `canvas`.
function plot(canvas, series, colors, ymax, title) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  const left = 40, bottom = 16, top = 14;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  ctx.strokeStyle = "#ccd";
  ctx.strokeRect(left, top, W - left - 4, H - top - bottom);
  ctx.fillStyle = "#556";
  ctx.font = "10px ui-monospace, monospace";
  ctx.fillText(title, left, 10);
  ctx.fillText(ymax >= 10 ? ymax.toFixed(0) : ymax.toFixed(2), 2, top + 8);
  ctx.fillText("0", 2, H - bottom);
  const n = series[0].length;
  ctx.fillText("layer 0", left, H - 3);
  ctx.fillText(`layer ${n - 1}`, W - 50, H - 3);
  series.forEach((values, s) => {
    ctx.strokeStyle = colors[s];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = left + (i / Math.max(1, n - 1)) * (W - left - 4);
      const y = H - bottom - (v / ymax) * (H - top - bottom);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
  canvas.dataset.drawn = "1";
}

// -- attention and norms -----------------------------------------------------------------------

async function drawAttention() {
  const trace = state.trace, canvas = $("attention"), note = $("att-note");
  const layer = Number($("att-layer").value), head = Number($("att-head").value);
  const att = trace.attention;
  let index = att ? att.layers.indexOf(layer) : -1;
  if (index < 0 && state.request) {  // not recorded: ask for this layer
    note.textContent = `fetching layer ${layer}…`;
    const body = { ...state.request, attention: true, attention_layers: [layer] };
    try {
      const more = await api("/v1/trace", body);
      if (!trace.attention) trace.attention = { layers: [], heads: more.attention.heads,
                                                positions: more.attention.positions,
                                                weights: [] };
      trace.attention.layers.push(layer);
      trace.attention.weights.push(more.attention.weights[0]);
      index = trace.attention.layers.length - 1;
    } catch (e) {
      note.textContent = e.message;
      return;
    }
  }
  if (state.trace !== trace || index < 0) return;
  const weights = trace.attention.weights[index][trace.attention.heads.indexOf(head)];
  const rows = trace.attention.positions, n = trace.tokens.length;
  const cell = Math.max(1, Math.min(20, Math.floor(300 / n)));
  canvas.width = canvas.height = cell * n;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  rows.forEach((qpos, r) => {
    for (let k = 0; k <= qpos; k++) {
      ctx.fillStyle = color(weights[r][k]);
      ctx.fillRect(k * cell, qpos * cell, cell, cell);
    }
  });
  const q = focus();
  ctx.strokeStyle = "#d6204b";
  ctx.strokeRect(0, q * cell, canvas.width, cell);
  const r = rows.indexOf(q);
  if (r >= 0) {
    const best = weights[r].map((w, k) => [w, k]).sort((a, b) => b[0] - a[0]).slice(0, 3);
    note.textContent = `row ${q} ${JSON.stringify(trace.tokens[q].text)} reads most from: ` +
      best.map(([w, k]) => `${JSON.stringify(trace.tokens[k].text)} ${w.toFixed(2)}`).join(", ");
  }
  canvas.dataset.drawn = "1";
}

function drawNorms() {
  const trace = state.trace, f = focus();
  const series = ["resid", "attn", "mlp"].map((k) => trace.norms[k].map((r) => r[f]));
  const ymax = Math.max(...series.flat()) * 1.05;
  plot($("norms"), series, ["#1d2330", "#d6604b", "#4b6cd6"], ymax,
       `position ${f} ${JSON.stringify(trace.tokens[f].text)}`);
}

// -- wiring -----------------------------------------------------------------------------------

$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("lens").addEventListener("mousemove", hover);
$("lens").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
$("lens").addEventListener("click", clickLens);
$("att-layer").addEventListener("change", () => state.trace && drawAttention());
$("att-head").addEventListener("change", () => state.trace && drawAttention());
$("api-key").value = localStorage.getItem("numbalm-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("numbalm-api-key", $("api-key").value);
  loadModels();
});
loadModels();
