// ciea search page: calls /api/search and draws one card per hit. Plain DOM, no framework;
// user and table text only ever goes through textContent, never innerHTML.
// A query is text (GET ?q=), a picture with optional text (POST, the picture as the body)
// or "more like this" a result (GET ?like=DOC_ID).
"use strict";

const $ = (id) => document.getElementById(id);

let info = null;     // /api/health: accepts_pictures, max_upload_bytes, …
let picture = null;  // the File/Blob being asked with; held in memory only

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
  const like = node.querySelector(".like");
  // A real link (can open in a new tab); a click runs the search in place.
  like.href = `/?${likeParams(hit.doc_id)}`;
  like.addEventListener("click", (event) => {
    event.preventDefault();
    searchLike(hit.doc_id);
  });
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

function describe(body) {
  const n = body.hits.length;
  const filter = `(${body.mode}, ${body.modality})`;
  let what;
  if (body.like) what = `like ${body.like}`;
  else if (body.picture) what = body.query ? `for the picture + “${body.query}”` : "for the picture";
  else what = `for “${body.query}”`;
  return n ? `${n} result${n === 1 ? "" : "s"} ${what} ${filter} in ${body.took_ms} ms`
           : `no results ${what} ${filter}`;
}

// params: the query string; upload: a picture to POST as the body (else a GET).
async function search(params, upload) {
  const results = $("results");
  setStatus(upload ? "sending the picture…" : "searching…");
  $("go").disabled = true;
  try {
    const init = { headers: { Accept: "application/json" } };
    if (upload) {
      init.method = "POST";
      init.body = upload;
      // The server says which types it takes (415 otherwise, shown like any error).
      init.headers["Content-Type"] = upload.type || "application/octet-stream";
    }
    const response = await fetch(`/api/search?${params}`, init);
    let body;
    try {
      body = await response.json();
    } catch (_) {
      throw new Error(`the server answered ${response.status} without JSON`);
    }
    if (!response.ok) throw new Error(body.error || `the server answered ${response.status}`);
    results.replaceChildren(...body.hits.map((hit) => card(hit, body.patch_grid)));
    setStatus(describe(body));
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

function likeParams(docId) {
  const params = new URLSearchParams();
  params.set("like", docId);
  params.set("k", $("k").value || "10");
  params.set("modality", $("modality").value);
  return params;
}

function searchLike(docId) {
  clearPicture();
  $("q").value = "";
  const params = likeParams(docId);
  history.replaceState(null, "", `/?${params}`);
  search(params);
}

// ---- the picture control: pick, drop on the search box, or paste -------------------------

const Q_PLACEHOLDER = "what are you looking for? e.g. a small red circle on a blue background";
const Q_WITH_PICTURE = "optional: words to go with the picture, e.g. but in blue";

function mib(bytes) {
  return (bytes / (1024 * 1024)).toFixed(1);
}

function setPicture(file) {
  if (!file) return;
  if (!info || !info.accepts_pictures) {
    setStatus("this table's model takes no picture: search it with text", true);
    return;
  }
  if (file.size > info.max_upload_bytes) {
    setStatus(`the picture is ${mib(file.size)} MiB: this server takes at most ${mib(info.max_upload_bytes)} MiB`, true);
    return;
  }
  picture = file;
  const thumb = $("picture-thumb");
  thumb.removeAttribute("src");
  // A data: URI (the page's CSP allows no blob: images); the picture stays in this tab.
  const reader = new FileReader();
  reader.addEventListener("load", () => {
    if (picture === file) thumb.src = reader.result;
  });
  reader.readAsDataURL(file);
  $("picture-preview").hidden = false;
  const q = $("q");
  q.required = false;
  q.placeholder = Q_WITH_PICTURE;
  // A picture query is a vector search: full-text and hybrid rank words.
  $("mode").value = "vector";
  $("mode").disabled = true;
  runSearch();
}

function clearPicture() {
  picture = null;
  $("picture").value = "";  // picking the same file again fires "change" again
  $("picture-preview").hidden = true;
  $("picture-thumb").removeAttribute("src");
  const q = $("q");
  q.required = true;
  q.placeholder = Q_PLACEHOLDER;
  $("mode").disabled = false;
}

function firstFile(list) {
  return list && list.length ? list[0] : null;
}

function wirePictureControl() {
  const form = $("search-form");
  $("picture").addEventListener("change", (event) => setPicture(firstFile(event.target.files)));
  $("picture-remove").addEventListener("click", () => {
    clearPicture();
    $("q").focus();
  });
  form.addEventListener("dragover", (event) => {
    if (!info || !info.accepts_pictures || !event.dataTransfer.types.includes("Files")) return;
    event.preventDefault();
    form.classList.add("dragging");
  });
  form.addEventListener("dragleave", () => form.classList.remove("dragging"));
  form.addEventListener("drop", (event) => {
    form.classList.remove("dragging");
    const file = firstFile(event.dataTransfer.files);
    if (!file) return;  // dropped text: let the box take it
    event.preventDefault();
    setPicture(file);
  });
  document.addEventListener("paste", (event) => {
    const file = firstFile(event.clipboardData && event.clipboardData.files);
    if (!file || !file.type.startsWith("image/") || !info || !info.accepts_pictures) return;  // pasted text
    event.preventDefault();
    setPicture(file);
  });
}

function runSearch() {
  const params = formParams();
  if (picture) {
    params.delete("mode");
    if (!params.get("q")) params.delete("q");
    // A picture cannot travel in the URL: the address goes back to the bare page.
    history.replaceState(null, "", "/");
    search(params, picture);
    return;
  }
  if (!params.get("q")) {
    setStatus("type a query first (or ask with a picture)", true);
    return;
  }
  // The URL carries the search, so a result page can be bookmarked or shared.
  history.replaceState(null, "", `/?${params}`);
  search(params);
}

async function loadInfo() {
  try {
    info = await (await fetch("/api/health")).json();
    $("table-info").textContent =
      `table ${info.table} @ version ${info.version}${info.tag ? ` (${info.tag})` : ""} · ` +
      `${info.rows} documents · model ${info.model_id.slice(0, 12)}`;
    if (!info.patch_grid) $("legend").hidden = true;  // no weights stored: nothing to explain
    $("picture-control").hidden = !info.accepts_pictures;  // text-only models take no picture
  } catch (_) {
    $("table-info").textContent = "server unreachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadInfo();
  wirePictureControl();
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });
  const initial = new URLSearchParams(location.search);
  for (const name of ["k", "mode", "modality"]) {
    if (initial.get(name)) $(name).value = initial.get(name);
  }
  if (initial.get("like")) {
    // A shared "more like this" link: the server checks it (q and like together is a 400).
    $("q").value = initial.get("q") || "";
    search(initial);
  } else if (initial.get("q")) {
    $("q").value = initial.get("q");
    search(formParams());
  }
});
