// The demo's segment viewer: the body of the `js_on_load` of a gr.HTML (Gradio gives `element` and `watch`).
//
// The server sends the image, a PNG of segment ids (id = red + 256 * green) and one record per segment
// (app_view.viewer_html). Everything a pointer does happens here, with no server round trip: the overlay is composed
// per pixel (image, segment colour at the opacity slider's value, white boundaries when the toggle is on, the rest
// dimmed when a segment is isolated); hovering shows a segment's name, area and score (concept maps: every word's
// share at the pointer); a click (or a tap, Enter on a
// row of the segment table, or Enter and the arrows on the image) isolates a segment and selects its table row, and
// Escape releases it; names are written largest segment first, skipping any that would overlap one already written.

const DIM = 0.3; // brightness of the other segments while one is isolated
const state = { data: null, selected: null };

const opacity = () => {
  const input = document.querySelector("#opacity input[type=range]");
  return input ? Number(input.value) : 0.5;
};
const showBoundaries = () => {
  const input = document.querySelector("#boundaries input[type=checkbox]");
  return input ? input.checked : true;
};

function decode(uri) {
  const image = new Image();
  image.src = uri;
  return image.decode().then(() => image);
}

function pixels(image) {
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(image, 0, 0);
  return context.getImageData(0, 0, canvas.width, canvas.height).data;
}

async function load() {
  const root = element.querySelector(".diffseg-viewer");
  state.selected = null;
  if (!root) {
    state.data = null;
    return;
  }
  const [image, idImage] = await Promise.all([decode(root.dataset.image), decode(root.dataset.ids)]);
  if (root !== element.querySelector(".diffseg-viewer")) return; // a newer result arrived meanwhile
  const width = idImage.naturalWidth;
  const height = idImage.naturalHeight;
  const rgba = pixels(idImage);
  const ids = new Int32Array(width * height);
  for (let i = 0; i < ids.length; i++) ids[i] = rgba[4 * i] + 256 * rgba[4 * i + 1];
  // Boundary pixels: the right or lower neighbour has another id (visualisation.boundaries).
  const edge = new Uint8Array(ids.length);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = y * width + x;
      if ((x + 1 < width && ids[i] !== ids[i + 1]) || (y + 1 < height && ids[i] !== ids[i + width])) edge[i] = 1;
    }
  }
  const segments = new Map(JSON.parse(root.dataset.segments).map((s) => [s.id, s]));
  const colours = new Uint8Array(3 * (Math.max(...segments.keys()) + 1));
  for (const s of segments.values()) {
    for (let c = 0; c < 3; c++) colours[3 * s.id + c] = parseInt(s.colour.slice(1 + 2 * c, 3 + 2 * c), 16);
  }
  const canvas = root.querySelector("canvas");
  canvas.width = width;
  canvas.height = height;
  // A small image is drawn several times its size: its pixels stay sharp squares (a blur would invent edges).
  canvas.style.imageRendering = Math.max(width, height) < 256 ? "pixelated" : "auto";
  root.querySelector(".stage").style.setProperty("--aspect", String(width / height));
  // The image at the id map's size (the server sends both at the same size).
  const base = document.createElement("canvas");
  base.width = width;
  base.height = height;
  base.getContext("2d").drawImage(image, 0, 0, width, height);
  const photo = base.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, width, height).data;
  state.data = { root, canvas, width, height, ids, edge, segments, colours, photo, shares: null };
  if (root.dataset.shares) {
    // Concept maps: the K words' maps stacked top to bottom in one grey PNG (view.shares_uri), map k the word k.
    const grey = await decode(root.dataset.shares);
    if (root !== element.querySelector(".diffseg-viewer")) return;
    const words = JSON.parse(root.dataset.words);
    const values = pixels(grey);
    state.data.shares = { values, words, width: grey.naturalWidth, height: grey.naturalHeight / words.length };
  }
  draw();
  placeNames();
  syncTable();
}

function draw() {
  const d = state.data;
  if (!d) return;
  const a = opacity();
  const edges = showBoundaries();
  const context = d.canvas.getContext("2d");
  const out = context.createImageData(d.width, d.height);
  const o = out.data;
  for (let i = 0; i < d.ids.length; i++) {
    const id = d.ids[i];
    const p = 4 * i;
    if (edges && d.edge[i]) {
      o[p] = o[p + 1] = o[p + 2] = 255;
    } else {
      const dim = state.selected === null || state.selected === id ? 1 : DIM;
      for (let c = 0; c < 3; c++) o[p + c] = dim * ((1 - a) * d.photo[p + c] + a * d.colours[3 * id + c]);
    }
    o[p + 3] = 255;
  }
  context.putImageData(out, 0, 0);
  d.root.dataset.selected = state.selected === null ? "" : String(state.selected);
  d.root.dataset.opacity = String(a);
  d.root.dataset.boundaries = String(edges);
}

// Concept maps: every word's share at (fx, fy), largest first ("sky 62 % · grass 30 % · cat 8 %").
function sharesAt(fx, fy) {
  const m = state.data.shares;
  const x = Math.min(m.width - 1, Math.floor(fx * m.width));
  const y = Math.min(m.height - 1, Math.floor(fy * m.height));
  const shares = m.words.map((word, k) => [word, m.values[4 * ((k * m.height + y) * m.width + x)] / 255]);
  shares.sort((a, b) => b[1] - a[1]);
  return shares.map(([name, p]) => `${name} ${Math.round(100 * p)} %`).join(" · ");
}

function describe(s, fx, fy) {
  if (state.data.shares && fx !== undefined) return sharesAt(fx, fy);
  const parts = [`Segment ${s.id}`];
  if (s.name) parts.push(s.name);
  parts.push(`${(100 * s.area).toFixed(1)} % of the image`);
  if (s.score !== null && s.score !== undefined) parts.push(`score ${s.score.toFixed(2)}`);
  return parts.join(" · ");
}

// Names largest first, each kept unless it overlaps one already kept (visualisation.placed_first).
function placeNames() {
  const d = state.data;
  if (!d) return;
  const layer = d.root.querySelector(".names");
  layer.replaceChildren();
  const kept = [];
  const ordered = [...d.segments.values()].filter((s) => s.name).sort((p, q) => q.area - p.area || p.id - q.id);
  for (const s of ordered) {
    const label = document.createElement("span");
    label.textContent = s.name;
    label.dataset.segment = String(s.id);
    label.style.left = `${100 * s.x}%`;
    label.style.top = `${100 * s.y}%`;
    layer.append(label);
    const box = label.getBoundingClientRect();
    const overlaps = kept.some((k) => !(box.right <= k.left || k.right <= box.left || box.bottom <= k.top || k.bottom <= box.top));
    if (overlaps || s.area < 0.005) label.remove(); // small or crowded: its name shows on hover
    else kept.push(box);
  }
}

function rows() {
  return document.querySelectorAll("#segments tr[data-segment]");
}

function syncTable() {
  for (const row of rows()) {
    const selected = state.selected !== null && Number(row.dataset.segment) === state.selected;
    row.setAttribute("aria-selected", String(selected));
    row.classList.toggle("selected", selected);
    if (selected) {
      const details = row.closest("details");
      if (details) details.open = true;
      const scroller = row.closest(".segment-table");
      if (scroller) scroller.scrollTop = row.offsetTop - scroller.clientHeight / 2; // the table only, not the page
    }
  }
}

function select(id) {
  const d = state.data;
  if (!d) return;
  state.selected = id === null || id === state.selected || !d.segments.has(id) ? null : id;
  draw();
  syncTable();
  restingTip();
}

// With no pointer on the image: the isolated segment's tooltip at its anchor, or none.
function restingTip() {
  const isolated = state.data.segments.get(state.selected);
  if (isolated) showTip(isolated, isolated.x, isolated.y);
  else state.data.root.querySelector(".tip").hidden = true;
}

function showTip(s, fx, fy, pointer = false) {
  const tip = state.data.root.querySelector(".tip");
  tip.textContent = pointer ? describe(s, fx, fy) : describe(s);
  tip.style.left = `${100 * fx}%`;
  tip.style.top = `${100 * fy}%`;
  // Kept inside the image: near an edge it extends away from that edge.
  const x = fx < 0.25 ? "0%" : fx > 0.75 ? "-100%" : "-50%";
  const y = fy < 0.2 ? "12px" : "calc(-100% - 10px)";
  tip.style.transform = `translate(${x}, ${y})`;
  tip.hidden = false;
}

function segmentAt(event) {
  const d = state.data;
  const rect = d.canvas.getBoundingClientRect();
  const fx = (event.clientX - rect.left) / rect.width;
  const fy = (event.clientY - rect.top) / rect.height;
  if (fx < 0 || fy < 0 || fx >= 1 || fy >= 1) return null;
  const id = d.ids[Math.floor(fy * d.height) * d.width + Math.floor(fx * d.width)];
  return { segment: d.segments.get(id), fx, fy };
}

element.addEventListener("pointermove", (event) => {
  if (!state.data || event.target !== state.data.canvas) return;
  const hit = segmentAt(event);
  if (hit && hit.segment) showTip(hit.segment, hit.fx, hit.fy, true);
});
element.addEventListener("pointerleave", () => {
  if (state.data) restingTip();
});
element.addEventListener("click", (event) => {
  if (!state.data || event.target !== state.data.canvas) return;
  const hit = segmentAt(event);
  select(hit && hit.segment ? hit.segment.id : null);
});
// The keyboard on the image: Enter, Space or an arrow isolates the next segment by area (largest first; left and up
// go back), Escape releases it.
const STEP = { Enter: 1, " ": 1, ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
element.addEventListener("keydown", (event) => {
  if (!state.data) return;
  if (event.key === "Escape") return select(null);
  if (!(event.key in STEP) || event.target !== state.data.canvas) return;
  event.preventDefault();
  const order = [...state.data.segments.values()].sort((a, b) => b.area - a.area).map((s) => s.id);
  const at = order.indexOf(state.selected);
  const next = at < 0 ? (STEP[event.key] > 0 ? 0 : order.length - 1) : (at + STEP[event.key] + order.length) % order.length;
  select(order[next]);
});

// The segment table and the view controls are other components: listen on the document, once per page.
if (!window.diffsegViewer) {
  document.addEventListener("click", (event) => {
    const row = event.target.closest && event.target.closest("#segments tr[data-segment]");
    if (row) window.diffsegViewer.select(Number(row.dataset.segment));
  });
  document.addEventListener("keydown", (event) => {
    const row = event.target.closest && event.target.closest("#segments tr[data-segment]");
    if (row && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      window.diffsegViewer.select(Number(row.dataset.segment));
    }
    if (row && event.key === "Escape") window.diffsegViewer.select(null);
  });
  const redraw = (event) => {
    if (event.target.closest && event.target.closest("#opacity, #boundaries")) window.diffsegViewer.draw();
  };
  document.addEventListener("input", redraw);
  document.addEventListener("change", redraw);
  window.addEventListener("resize", () => window.diffsegViewer.placeNames());
}
window.diffsegViewer = { select, draw, placeNames, state };

watch("value", load);
load();
