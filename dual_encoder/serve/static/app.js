// The search page: text queries, image queries (drop, paste or pick a photo), "more like this", a viewer for the
// full image, and one history entry per search so Back returns to the previous results. No framework, no build step.
"use strict";

const form = document.getElementById("search-form");
const queryInput = document.getElementById("query");
const kInput = document.getElementById("k");
const button = document.getElementById("search-button");
const statusBox = document.getElementById("status");
const queryEcho = document.getElementById("query-echo");
const results = document.getElementById("results");
const indexInfo = document.getElementById("index-info");
const imageInput = document.getElementById("image-input");
const attachment = document.getElementById("attachment");
const attachmentPreview = document.getElementById("attachment-preview");
const attachmentName = document.getElementById("attachment-name");
const attachmentRemove = document.getElementById("attachment-remove");
const dropOverlay = document.getElementById("drop-overlay");
const viewer = document.getElementById("viewer");
const viewerImage = document.getElementById("viewer-image");
const viewerMeta = document.getElementById("viewer-meta");
const viewerCaption = document.getElementById("viewer-caption");
const viewerOpen = document.getElementById("viewer-open");

// Limits the server reports (/api/info); checked before an upload is sent.
const limits = { max_upload_bytes: 20 * 1024 * 1024 };
// Only the newest request may draw: an older, slower answer must not overwrite it.
let inFlight = null;
// The image attached to the query box: {id, file, name, preview}. Files stay in memory by id, so a history entry
// can bring its image back while the page lives.
let attached = null;
const attachments = new Map();
let nextAttachmentId = 1;
// What is on screen: the hits (for the viewer) and which one the viewer shows.
let shownHits = [];
let viewerPosition = -1;

// -- status, results ---------------------------------------------------------------------------------------------

function setStatus(state, message) {
  statusBox.dataset.state = state;
  statusBox.textContent = message;
  statusBox.setAttribute("role", state === "error" ? "alert" : "status");
}

function clearResults() {
  results.replaceChildren();
  queryEcho.hidden = true;
  shownHits = [];
}

function renderHit(hit, position) {
  const item = document.createElement("li");
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.id = hit.id;

  const link = document.createElement("a");
  link.href = hit.image_url;
  link.target = "_blank";
  link.rel = "noopener";
  link.title = "View the full image";
  link.addEventListener("click", (event) => {
    if (event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    event.preventDefault(); // a plain click opens the viewer; a modified one still opens a tab
    openViewer(position);
  });

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
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more-like";
  more.textContent = "More like this";
  more.addEventListener("click", () => searchLike(hit.id));
  caption.append(more);

  figure.append(link, caption);
  item.append(figure);
  return item;
}

// "Results for [thumbnail] image beach.jpg + more like #17 + "at night"": what was searched, as the server says.
function describeQuery(search, result) {
  const parts = [];
  if (result.image) {
    const image = document.createElement("span");
    image.className = "echo-image";
    if (search.preview) {
      const thumb = document.createElement("img");
      thumb.className = "echo-thumb";
      thumb.src = search.preview;
      thumb.alt = "";
      image.append(thumb);
    }
    image.append(`image ${result.image}`);
    parts.push(image);
  }
  if (result.like !== undefined && result.like !== null) parts.push(`more like #${result.like}`);
  if (result.normalized_query) {
    const quoted = document.createElement("q");
    quoted.textContent = result.normalized_query;
    parts.push(quoted);
  }
  const echo = ["Results for "];
  parts.forEach((part, index) => {
    if (index > 0) echo.push(" + ");
    echo.push(part);
  });
  return echo;
}

function render(search, result, seconds) {
  clearResults();
  queryEcho.replaceChildren(...describeQuery(search, result));
  queryEcho.hidden = false;
  shownHits = result.hits;
  if (result.hits.length === 0) {
    setStatus("no-results", "No results: the index is empty.");
    return;
  }
  const count = result.hits.length === 1 ? "1 result" : `${result.hits.length} results`;
  setStatus("results", `${count} in ${seconds.toFixed(2)} s`);
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

// -- searching ---------------------------------------------------------------------------------------------------

// A search is {kind: "text" | "image" | "like", q, k, like, attachment, imageName, preview}: what the history keeps.
function currentSearch() {
  const q = queryInput.value.trim() === "" ? "" : queryInput.value;
  const k = kInput.value.trim();
  if (attached) {
    return { kind: "image", q, k, attachment: attached.id, imageName: attached.name, preview: attached.preview };
  }
  return { kind: "text", q, k };
}

function request(search) {
  if (search.kind === "image") {
    const entry = attachments.get(search.attachment);
    const body = new FormData();
    body.append("image", entry.file, entry.name);
    if (search.q) body.append("q", search.q);
    if (search.k) body.append("k", search.k);
    return fetch("/api/search", { method: "POST", body, signal: search.signal });
  }
  // No k: the server's default (its config's `serve.default_k`), the one the CLI and API use too.
  const params = new URLSearchParams();
  if (search.q) params.set("q", search.q);
  if (search.like !== undefined) params.set("like", search.like);
  if (search.k) params.set("k", search.k);
  return fetch(`/api/search?${params}`, { signal: search.signal });
}

// The address of a search, so text and "more like this" searches can be bookmarked or shared. An image cannot
// travel in an address: its entry keeps the page's address without a query.
function addressOf(search) {
  const params = new URLSearchParams();
  if (search.kind !== "image") {
    if (search.q) params.set("q", search.q);
    if (search.like !== undefined) params.set("like", search.like);
  }
  if (search.k) params.set("k", search.k);
  const query = params.toString();
  return query ? `?${query}` : location.pathname;
}

function sameSearch(a, b) {
  return Boolean(a && b) && a.kind === b.kind && a.q === b.q && a.k === b.k && a.like === b.like &&
    a.attachment === b.attachment;
}

// Run `search`; a new search gets its own history entry (pushState), so Back returns to the one before.
async function run(search, { remember = true } = {}) {
  if (search.kind === "text" && !search.q) {
    if (inFlight) inFlight.abort();
    clearResults();
    setStatus("empty", "Type a query, or drop, paste or pick a photo to find images like it.");
    if (remember && history.state && history.state.search) history.pushState(null, "", location.pathname);
    return;
  }
  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  setStatus("loading", "Searching…");
  button.disabled = true;
  const started = performance.now();
  try {
    const response = await request({ ...search, signal: controller.signal });
    if (!response.ok) {
      clearResults();
      setStatus("error", await errorMessage(response));
      return;
    }
    const result = await response.json();
    const seconds = (performance.now() - started) / 1000;
    if (inFlight !== controller) return;
    render(search, result, seconds);
    if (remember && !sameSearch(history.state && history.state.search, search)) {
      history.pushState({ search, result, seconds }, "", addressOf(search));
    }
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

function searchLike(itemId) {
  closeViewer();
  detach();
  queryInput.value = "";
  run({ kind: "like", q: "", like: String(itemId), k: kInput.value.trim() });
}

// -- image queries: pick, drop, paste ----------------------------------------------------------------------------

function looksLikeImage(file) {
  return file.type.startsWith("image/") || /\.(heic|heif|tiff?|webp)$/i.test(file.name);
}

// A small preview (a data URL, so a history entry can show it again); browsers that cannot draw the format
// (HEIC, TIFF) give none.
function makePreview(file) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file);
    const image = new Image();
    image.onload = () => {
      const scale = 96 / Math.max(image.naturalWidth, image.naturalHeight, 1);
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
      canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
      canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
      URL.revokeObjectURL(url);
      resolve(canvas.toDataURL("image/jpeg", 0.8));
    };
    image.onerror = () => {
      URL.revokeObjectURL(url);
      resolve("");
    };
    image.src = url;
  });
}

function showAttachment(entry) {
  attached = entry;
  attachment.hidden = !entry;
  if (!entry) return;
  attachmentName.textContent = entry.name;
  attachmentPreview.src = entry.preview || "/static/favicon.svg";
}

function detach() {
  showAttachment(null);
  imageInput.value = "";
}

async function searchWithFile(file) {
  if (!file) return;
  if (!looksLikeImage(file)) {
    setStatus("error", `${file.name || "That file"} is not an image: drop a JPEG, PNG, GIF, BMP, WebP, TIFF or HEIC photo.`);
    return;
  }
  if (file.size > limits.max_upload_bytes) {
    const megabytes = (limits.max_upload_bytes / 1048576).toFixed(0);
    setStatus("error", `${file.name} is too large to search with: the limit is ${megabytes} MB.`);
    return;
  }
  const entry = { id: nextAttachmentId++, file, name: file.name || "pasted image", preview: await makePreview(file) };
  attachments.set(entry.id, entry);
  showAttachment(entry);
  run(currentSearch());
}

imageInput.addEventListener("change", () => searchWithFile(imageInput.files[0]));
attachmentRemove.addEventListener("click", () => {
  detach();
  queryInput.focus();
});

let dragDepth = 0;
function dragsFiles(event) {
  return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
}
document.addEventListener("dragenter", (event) => {
  if (!dragsFiles(event)) return;
  dragDepth += 1;
  dropOverlay.hidden = false;
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) dropOverlay.hidden = true;
});
document.addEventListener("dragover", (event) => {
  if (dragsFiles(event)) event.preventDefault(); // allow the drop
});
document.addEventListener("drop", (event) => {
  if (!dragsFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  dropOverlay.hidden = true;
  searchWithFile(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const files = Array.from((event.clipboardData && event.clipboardData.files) || []);
  const image = files.find(looksLikeImage);
  if (!image) return; // text pastes into the query box as usual
  event.preventDefault();
  searchWithFile(image);
});

// -- the viewer --------------------------------------------------------------------------------------------------

function openViewer(position) {
  if (position < 0 || position >= shownHits.length) return;
  viewerPosition = position;
  const hit = shownHits[position];
  viewerImage.alt = hit.caption || `Result ${hit.rank}`;
  // Browsers show neither TIFF nor HEIC: fall back to the thumbnail, which the server makes from any format.
  viewerImage.onerror = () => {
    viewerImage.onerror = null;
    viewerImage.src = hit.thumbnail_url;
  };
  viewerImage.src = hit.image_url;
  viewerMeta.textContent = `#${hit.rank} of ${shownHits.length} · score ${hit.score.toFixed(3)} · item ${hit.id}`;
  viewerCaption.textContent = hit.caption || "";
  viewerOpen.href = hit.image_url;
  if (!viewer.open) viewer.showModal();
}

function closeViewer() {
  if (viewer.open) viewer.close();
}

function step(delta) {
  if (!viewer.open || shownHits.length === 0) return;
  openViewer((viewerPosition + delta + shownHits.length) % shownHits.length);
}

document.getElementById("viewer-previous").addEventListener("click", () => step(-1));
document.getElementById("viewer-next").addEventListener("click", () => step(1));
document.getElementById("viewer-close").addEventListener("click", closeViewer);
document.getElementById("viewer-more").addEventListener("click", () => searchLike(shownHits[viewerPosition].id));
viewer.addEventListener("click", (event) => {
  if (event.target === viewer) closeViewer(); // a click on the backdrop
});
viewer.addEventListener("keydown", (event) => {
  if (event.key === "ArrowLeft") step(-1);
  else if (event.key === "ArrowRight") step(1);
  else return;
  event.preventDefault();
});
// Esc closes a modal <dialog> by itself.

// -- history: Back and Forward show the searches again ------------------------------------------------------------

window.addEventListener("popstate", (event) => {
  closeViewer();
  const state = event.state;
  if (state && state.search && state.result) {
    const { search } = state;
    queryInput.value = search.q || "";
    if (search.k) kInput.value = search.k;
    const entry = search.kind === "image" ? attachments.get(search.attachment) : null;
    if (entry) showAttachment(entry);
    else detach();
    if (inFlight) inFlight.abort();
    button.disabled = false;
    render(search, state.result, state.seconds || 0);
    return;
  }
  // An entry without a result (the page's first, or opened from an address): search what the address says.
  detach();
  searchFromAddress({ remember: false });
});

function searchFromAddress(options) {
  const params = new URLSearchParams(location.search);
  if (params.has("k")) kInput.value = params.get("k");
  queryInput.value = params.get("q") || "";
  const k = params.get("k") || "";
  if (params.get("like")) return run({ kind: "like", q: params.get("q") || "", like: params.get("like"), k }, options);
  return run({ kind: "text", q: params.get("q") || "", k }, options);
}

// -- start -------------------------------------------------------------------------------------------------------

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    if (!response.ok) return;
    const info = await response.json();
    kInput.max = info.limits.max_k;
    if (info.limits.max_upload_bytes) limits.max_upload_bytes = info.limits.max_upload_bytes;
    if (!kInput.value) kInput.value = info.limits.default_k;
    indexInfo.textContent = `Describe what you are looking for in plain words, or drop a photo — ${info.index.count.toLocaleString()} images indexed.`;
  } catch (_) {
    // The page still works without the counts.
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  run(currentSearch());
});

loadInfo();
const initial = new URLSearchParams(location.search);
if (initial.has("k")) kInput.value = initial.get("k");
if (initial.get("q") || initial.get("like")) {
  // The entry the page was opened with is the first search: no new entry for it.
  searchFromAddress({ remember: false });
}
