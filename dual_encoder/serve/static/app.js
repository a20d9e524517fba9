// The search page: reads the form, calls /api/search, and renders one of four states
// (empty, loading, results / no results, error). No framework, no build step.
"use strict";

const form = document.getElementById("search-form");
const queryInput = document.getElementById("query");
const kInput = document.getElementById("k");
const button = document.getElementById("search-button");
const statusBox = document.getElementById("status");
const queryEcho = document.getElementById("query-echo");
const results = document.getElementById("results");
const indexInfo = document.getElementById("index-info");

// Only the newest request may draw: an older, slower answer must not overwrite it.
let inFlight = null;

function setStatus(state, message) {
  statusBox.dataset.state = state;
  statusBox.textContent = message;
  statusBox.setAttribute("role", state === "error" ? "alert" : "status");
}

function clearResults() {
  results.replaceChildren();
  queryEcho.hidden = true;
}

function renderHit(hit) {
  const item = document.createElement("li");
  const figure = document.createElement("figure");
  figure.className = "card";

  const link = document.createElement("a");
  link.href = hit.image_url;
  link.target = "_blank";
  link.rel = "noopener";

  const image = document.createElement("img");
  image.src = hit.thumbnail_url;
  image.alt = hit.caption || `Result ${hit.rank}`;
  image.loading = "lazy";
  image.decoding = "async";
  link.append(image);

  const caption = document.createElement("figcaption");
  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.textContent = `#${hit.rank}`;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  score.title = "cosine similarity";
  meta.append(rank, score);
  caption.append(meta);
  if (hit.caption) {
    const text = document.createElement("div");
    text.className = "caption";
    text.textContent = hit.caption;
    caption.append(text);
  }

  figure.append(link, caption);
  item.append(figure);
  return item;
}

function render(result) {
  clearResults();
  const echo = document.createElement("q");
  echo.textContent = result.normalized_query;
  queryEcho.replaceChildren("Results for ", echo);
  queryEcho.hidden = false;
  if (result.hits.length === 0) {
    setStatus("no-results", "No results: the index is empty.");
    return;
  }
  setStatus("results", "");
  results.append(...result.hits.map(renderHit));
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
  } catch (_) {
    // Not JSON (a proxy's error page, say): fall back to the status line.
  }
  return `The server answered ${response.status} ${response.statusText}.`;
}

async function search() {
  const query = queryInput.value;
  const k = kInput.value.trim();
  syncUrl(query, k);
  if (query.trim() === "") {
    if (inFlight) inFlight.abort();
    clearResults();
    setStatus("empty", "Type a query to search the images.");
    return;
  }

  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  setStatus("loading", "Searching…");
  button.disabled = true;

  // No k: the server's default (its config's `serve.default_k`), the one the CLI and API use too.
  const params = new URLSearchParams({ q: query });
  if (k) params.set("k", k);
  try {
    const response = await fetch(`/api/search?${params}`, { signal: controller.signal });
    if (!response.ok) {
      clearResults();
      setStatus("error", await errorMessage(response));
      return;
    }
    render(await response.json());
  } catch (error) {
    if (error.name === "AbortError") return;
    clearResults();
    setStatus("error", "The server cannot be reached. Is it still running?");
  } finally {
    if (inFlight === controller) {
      inFlight = null;
      button.disabled = false;
    }
  }
}

// Keep the query in the address bar so a search can be bookmarked or shared.
function syncUrl(query, k) {
  const params = new URLSearchParams();
  if (query) params.set("q", query);
  if (k) params.set("k", k);
  const search = params.toString();
  history.replaceState(null, "", search ? `?${search}` : location.pathname);
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    if (!response.ok) return;
    const info = await response.json();
    kInput.max = info.limits.max_k;
    if (!kInput.value) kInput.value = info.limits.default_k;
    indexInfo.textContent = `Describe what you are looking for in plain words — ${info.index.count.toLocaleString()} images indexed.`;
  } catch (_) {
    // The page still works without the counts.
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});

const initial = new URLSearchParams(location.search);
if (initial.has("k")) kInput.value = initial.get("k");
loadInfo();
if (initial.get("q")) {
  queryInput.value = initial.get("q");
  search();
}
