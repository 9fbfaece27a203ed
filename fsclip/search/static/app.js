"use strict";
// Search page: text search, image upload, click a result for image-to-image search.
// Paths and names go into the page with textContent only (file names are untrusted).

const $ = (sel) => document.querySelector(sel);
let latest = 0; // a slow answer to an older search must not overwrite a newer one

function basename(path) {
  const parts = path.split(/[\\/]/);
  return parts[parts.length - 1] || path;
}

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
  el.classList.remove("muted");
}

async function api(url, options) {
  const res = await fetch(url, options);
  let body;
  try {
    body = await res.json();
  } catch {
    body = { error: `HTTP ${res.status}` };
  }
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function render(results) {
  const grid = $("#results");
  grid.replaceChildren();
  for (const hit of results) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    fig.dataset.path = hit.path;
    fig.dataset.score = String(hit.score);
    fig.tabIndex = 0;
    fig.title = `${hit.path}\nClick to find similar images`;
    const img = document.createElement("img");
    img.src = hit.thumb;
    img.alt = basename(hit.path);
    img.loading = "lazy";
    const cap = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = basename(hit.path);
    cap.append(score, name);
    fig.append(img, cap);
    fig.addEventListener("click", () => similar(hit.path));
    fig.addEventListener("keydown", (e) => { if (e.key === "Enter") similar(hit.path); });
    grid.append(fig);
  }
}

async function run(url, options, label) {
  const seq = ++latest;
  setStatus("Searching…");
  document.body.classList.add("busy");
  try {
    const body = await api(url, options);
    if (seq !== latest) return;
    render(body.results);
    const n = body.results.length;
    setStatus(`${n} result${n === 1 ? "" : "s"} ${label} (${Math.round(body.took_ms)} ms)`);
  } catch (err) {
    if (seq !== latest) return;
    $("#results").replaceChildren();
    setStatus(err.message, true);
  } finally {
    if (seq === latest) document.body.classList.remove("busy");
  }
}

const k = () => $("#k").value;

function textSearch(q) {
  const params = new URLSearchParams({ q, k: k() });
  run(`/api/search?${params}`, undefined, `for “${q}”`);
}

function similar(path) {
  const params = new URLSearchParams({ like: path, k: k() });
  run(`/api/search?${params}`, undefined, `similar to ${basename(path)}`);
  window.scrollTo({ top: 0 });
}

function upload(file) {
  // The file itself as the body, typed image/*: the server refuses form posts (a foreign page can send
  // those without asking). Browsers leave the type empty for formats they do not know (e.g. HEIC).
  const type = file.type.startsWith("image/") ? file.type : "image/x-unknown";
  run(`/api/search/image?k=${encodeURIComponent(k())}`,
      { method: "POST", body: file, headers: { "Content-Type": type } }, `similar to ${file.name}`);
}

// The index's model has no text tower (e.g. a timm backbone): it answers image queries only.
function imageOnly() {
  for (const id of ["#q", "#go"]) $(id).hidden = true;
  $("#status").textContent = "This index searches by image: upload one, or click a result to find similar images.";
}

document.addEventListener("DOMContentLoaded", () => {
  $("#search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("#q").value.trim();
    if (q) textSearch(q);
    else setStatus("Type what you are looking for first.", true);
  });
  $("#upload").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) upload(file);
    e.target.value = "";
  });
  api("/api/info").then((info) => {
    $("#info").textContent = `${info.images} images · model ${info.model} · ${info.index.kind} index`;
    if (info.has_text === false) imageOnly();
  }).catch((err) => setStatus(err.message, true));
});
