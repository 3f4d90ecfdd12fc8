// ciea search page: calls /api/search and draws one card per hit. Plain DOM, no framework;
// user and table text only ever goes through textContent, never innerHTML.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

// w in [0, 1] → a heat colour: faint yellow (the caption already says it) to strong red
// (the image adds it). t is w rescaled to this image's own range, so the contrast between
// its patches shows even when all of them sit in a narrow band; the card prints the range.
function heat(t) {
  const g = Math.round(220 * (1 - t));
  const a = (0.08 + 0.52 * t).toFixed(3);  // the image stays visible under the hottest patch
  return `rgba(255, ${g}, 0, ${a})`;
}

function drawOverlay(overlay, weights, grid) {
  const [rows, cols] = grid;
  overlay.style.gridTemplateColumns = `repeat(${cols}, 1fr)`;
  overlay.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
  const lo = Math.min(...weights);
  const hi = Math.max(...weights);
  const span = hi - lo;
  overlay.replaceChildren();
  weights.forEach((w, j) => {
    const cell = document.createElement("div");
    cell.className = "cell";
    cell.style.backgroundColor = heat(span > 1e-6 ? (w - lo) / span : w);
    cell.title = `patch ${Math.floor(j / cols) + 1},${(j % cols) + 1}: w = ${w.toFixed(3)}`;
    if (rows * cols <= 64) cell.textContent = w.toFixed(2);
    overlay.appendChild(cell);
  });
  return [lo, hi];
}

function card(hit, grid) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.docId = hit.doc_id;
  node.dataset.modality = hit.modality;
  node.querySelector(".rank").textContent = `#${hit.rank}`;
  node.querySelector(".badge").textContent = hit.modality;
  node.querySelector(".score").textContent =
    hit.score === null ? "score n/a" : `score ${hit.score.toFixed(4)}`;
  node.querySelector(".docid").textContent = hit.doc_id;
  const img = node.querySelector("img");
  const caption = node.querySelector(".caption");
  if (hit.thumbnail) {
    img.src = hit.thumbnail;
    img.alt = hit.caption || `image ${hit.doc_id}`;
    // Tiny thumbnails (synthetic corpora) read better as crisp pixels than blurred.
    img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < 64));
  } else {
    img.remove();
    const box = node.querySelector(".textdoc");
    box.hidden = false;
    box.textContent = hit.text || hit.caption || "(no text)";
  }
  if (hit.modality === "image") {
    caption.textContent = hit.caption || "(no caption)";
  } else {
    caption.remove();
  }
  if (hit.thumbnail && hit.patch_weights && grid) {
    const overlay = node.querySelector(".overlay");
    const [lo, hi] = drawOverlay(overlay, hit.patch_weights, grid);
    const row = node.querySelector(".wrow");
    row.hidden = false;
    row.querySelector(".wrange").textContent = `w ${lo.toFixed(2)}–${hi.toFixed(2)}, ${grid[0]}×${grid[1]} patches`;
    const button = row.querySelector(".toggle-w");
    button.addEventListener("click", () => {
      const on = overlay.hidden;
      overlay.hidden = !on;
      button.setAttribute("aria-pressed", String(on));
      button.textContent = on ? "hide w" : "show w";
    });
  }
  return node;
}

async function search(params) {
  const results = $("results");
  setStatus("searching…");
  $("go").disabled = true;
  try {
    const response = await fetch(`/api/search?${params}`, { headers: { Accept: "application/json" } });
    let body;
    try {
      body = await response.json();
    } catch (_) {
      throw new Error(`the server answered ${response.status} without JSON`);
    }
    if (!response.ok) throw new Error(body.error || `the server answered ${response.status}`);
    results.replaceChildren(...body.hits.map((hit) => card(hit, body.patch_grid)));
    const n = body.hits.length;
    setStatus(n ? `${n} result${n === 1 ? "" : "s"} for “${body.query}” (${body.mode}, ` +
                  `${body.modality}) in ${body.took_ms} ms`
                : `no results for “${body.query}” (${body.mode}, ${body.modality})`);
  } catch (err) {
    results.replaceChildren();
    setStatus(err.message, true);
  } finally {
    $("go").disabled = false;
  }
}

function formParams() {
  const params = new URLSearchParams();
  params.set("q", $("q").value.trim());
  params.set("k", $("k").value || "10");
  params.set("mode", $("mode").value);
  params.set("modality", $("modality").value);
  return params;
}

async function loadInfo() {
  try {
    const info = await (await fetch("/api/health")).json();
    $("table-info").textContent =
      `table ${info.table} @ version ${info.version}${info.tag ? ` (${info.tag})` : ""} · ` +
      `${info.rows} documents · model ${info.model_id.slice(0, 12)}`;
    if (!info.patch_grid) $("legend").hidden = true;  // no weights stored: nothing to explain
  } catch (_) {
    $("table-info").textContent = "server unreachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadInfo();
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const params = formParams();
    if (!params.get("q")) {
      setStatus("type a query first", true);
      return;
    }
    // The URL carries the search, so a result page can be bookmarked or shared.
    history.replaceState(null, "", `/?${params}`);
    search(params);
  });
  const initial = new URLSearchParams(location.search);
  if (initial.get("q")) {
    $("q").value = initial.get("q");
    for (const name of ["k", "mode", "modality"]) {
      if (initial.get(name)) $(name).value = initial.get(name);
    }
    search(formParams());
  }
});
