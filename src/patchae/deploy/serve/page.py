"""The station's live page: plain HTML and a small script that polls /stats and /history once a second.

It shows the latest parts (overlay, decision, score), the running pass / fail counts, the histogram of the
normalised scores against the threshold (0.5 on that scale), and an upload for a manual check. Text from the
server is set with ``textContent``, never parsed as HTML.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>patchae station</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1rem 2rem; background: #f6f6f4; color: #222; }
  header { display: flex; flex-wrap: wrap; gap: 2rem; align-items: baseline; }
  h1 { font-size: 1.3rem; margin: 0; }
  #model { color: #555; }
  .row { display: flex; flex-wrap: wrap; gap: 2rem; margin: 1rem 0; align-items: flex-start; }
  .panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.8rem 1rem; }
  .count { font-size: 2rem; font-weight: 600; }
  .pass { color: #1b7f2a; } .fail { color: #c62828; } .other { color: #777; }
  #latest { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 0.8rem; }
  .part img { width: 100%; display: block; }
  #manual-overlay { width: 100%; max-width: 460px; display: block; }
  .part { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.4rem; font-size: 0.85rem; }
  .badge { font-weight: 600; text-transform: uppercase; }
  .badge.normal { color: #1b7f2a; } .badge.anomalous { color: #c62828; }
  .badge.rejected, .badge.error { color: #777; }
  #manual-result { min-height: 1.5rem; }
  #manual-decision { font-size: 1.4rem; }
</style>
</head>
<body>
<header>
  <h1>patchae screening station</h1>
  <span id="model">loading model...</span>
</header>
<div class="row">
  <div class="panel"><div>pass</div><div class="count pass" id="count-normal">0</div></div>
  <div class="panel"><div>fail</div><div class="count fail" id="count-anomalous">0</div></div>
  <div class="panel"><div>refused</div><div class="count other" id="count-rejected">0</div></div>
  <div class="panel">
    <div>normalised score (0.5 = threshold <span id="raw-threshold"></span>)</div>
    <svg id="histogram" width="420" height="130" role="img" aria-label="score histogram"></svg>
  </div>
  <div class="panel">
    <div>manual check</div>
    <input type="file" id="upload" accept="image/*">
    <div><input type="password" id="token" placeholder="bearer token (if the station has one)" size="30"></div>
    <div id="manual-result">
      <span id="manual-decision" class="badge"></span> <span id="manual-score"></span>
      <div id="manual-error" class="other"></div>
      <img id="manual-overlay" alt="" hidden>
    </div>
  </div>
</div>
<h2>latest parts</h2>
<div id="latest"></div>
<script>
const LATEST = __LATEST__;
const SVG = "http://www.w3.org/2000/svg";
let newest = null;

function el(tag, attributes, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function score(value) { return value === null || value === undefined ? "" : Number(value).toFixed(3); }

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function drawHistogram(histogram) {
  const svg = document.getElementById("histogram");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const width = 420, height = 110, counts = histogram.counts, top = Math.max(1, ...counts);
  const bar = width / counts.length;
  counts.forEach((count, i) => {
    const h = (count / top) * (height - 10);
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", i * bar + 1); rect.setAttribute("width", bar - 2);
    rect.setAttribute("y", height - h); rect.setAttribute("height", h);
    rect.setAttribute("fill", (i + 0.5) / counts.length >= histogram.threshold ? "#c62828" : "#1b7f2a");
    const title = document.createElementNS(SVG, "title");
    title.textContent = count + " part(s) in [" + (i / counts.length).toFixed(2) + ", " + ((i + 1) / counts.length).toFixed(2) + ")";
    rect.appendChild(title);
    svg.appendChild(rect);
  });
  const line = document.createElementNS(SVG, "line");
  const x = histogram.threshold * width;
  line.setAttribute("x1", x); line.setAttribute("x2", x); line.setAttribute("y1", 0); line.setAttribute("y2", height);
  line.setAttribute("stroke", "#000"); line.setAttribute("stroke-dasharray", "4 3");
  svg.appendChild(line);
  [["0", 0, "start"], ["0.5", x, "middle"], ["1", width, "end"]].forEach(([label, at, anchor]) => {
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("x", at); text.setAttribute("y", height + 16); text.setAttribute("font-size", "11");
    text.setAttribute("text-anchor", anchor); text.textContent = label;
    svg.appendChild(text);
  });
}

function partCard(row) {
  const card = el("div", { class: "part", "data-id": row.request_id });
  if (row.overlay) card.appendChild(el("img", { src: row.overlay, alt: "overlay " + row.request_id, loading: "lazy" }));
  const line = el("div");
  line.appendChild(el("span", { class: "badge " + row.decision }, row.decision));
  line.appendChild(document.createTextNode(" " + score(row.normalized_score) + "  " + row.time.replace("T", " ").slice(0, 19)));
  card.appendChild(line);
  if (row.error) card.appendChild(el("div", { class: "other" }, row.error));
  return card;
}

async function refresh() {
  try {
    const [stats, history] = await Promise.all([getJson("/stats"), getJson("/history?limit=" + LATEST)]);
    for (const key of ["normal", "anomalous", "rejected"]) document.getElementById("count-" + key).textContent = stats[key];
    drawHistogram(stats.histogram);
    const first = history.rows.length ? history.rows[0].id : null;
    if (first !== newest) {
      newest = first;
      const latest = document.getElementById("latest");
      latest.replaceChildren(...history.rows.map(partCard));
    }
  } catch (failure) { console.warn(failure); }
}

async function showModel() {
  try {
    const model = await getJson("/model");
    const threshold = model.threshold;
    document.getElementById("model").textContent = [model.category || "?", model.model, model.backbone,
      model.image_size.join("x") + " px", "threshold " + threshold.method + " = " + Number(threshold.value).toPrecision(4),
      model.runtime + " on " + model.device, "model " + model.model_id].join(" | ");
    document.getElementById("raw-threshold").textContent = "= raw " + Number(threshold.value).toPrecision(4);
  } catch (failure) { console.warn(failure); }
}

document.getElementById("upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const decision = document.getElementById("manual-decision");
  const overlay = document.getElementById("manual-overlay");
  const problem = document.getElementById("manual-error");
  decision.textContent = ""; decision.className = "badge"; problem.textContent = "checking " + file.name + "...";
  overlay.hidden = true;
  const form = new FormData();
  form.append("file", file);
  const headers = {};
  const token = document.getElementById("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  try {
    const response = await fetch("/predict", { method: "POST", body: form, headers });
    const result = await response.json();
    if (!response.ok) { decision.textContent = "refused"; decision.className = "badge rejected"; problem.textContent = result.error; return; }
    problem.textContent = "";
    decision.textContent = result.decision; decision.className = "badge " + result.decision;
    document.getElementById("manual-score").textContent = "normalised " + score(result.normalized_score) +
      ", raw " + score(result.score) + ", " + result.latency_ms + " ms";
    if (result.overlay) { overlay.src = result.overlay; overlay.hidden = false; }
  } catch (failure) { decision.textContent = "refused"; problem.textContent = String(failure); }
  finally { event.target.value = ""; refresh(); }
});

showModel();
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""


def page_html(latest: int = 12) -> str:
    if isinstance(latest, bool) or not isinstance(latest, int) or not 1 <= latest <= 1000:
        latest = 12
    return PAGE.replace("__LATEST__", str(latest))
