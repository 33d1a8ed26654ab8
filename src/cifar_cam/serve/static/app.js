// cifar-cam serve: the page's script (served from the package at /static/app.js; no build step).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), file = $("file"), layer = $("layer"), topk = $("topk"), opacity = $("opacity");
  const statusLine = $("status"), overlay = $("overlay"), input = $("input"), under = $("under");
  let shape = {h: 32, w: 32, policy: "stretch", fill: [114, 114, 114]}, current = null, seq = 0, aborter = null;

  function say(text, kind) {
    statusLine.textContent = text;
    statusLine.className = kind || "";
  }

  function detailOf(body, res) {
    // FastAPI's {"detail": "..."}; a 422 from validation has a list of {loc, msg}.
    const d = body && body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((e) => (e.loc ? e.loc.join(".") + ": " : "") + (e.msg || "")).join("; ");
    return res.statusText || "request failed";
  }

  // -- the API key (serve.api_key): asked for when /v1/model answers 401, sent as X-API-Key ------
  const keyForm = $("key-form"), keyInput = $("api-key");
  let apiKey = "";
  try { apiKey = sessionStorage.getItem("cifar-cam-api-key") || ""; } catch (e) { /* storage off */ }
  const withKey = (init) => {
    const headers = new Headers((init && init.headers) || {});
    if (apiKey) headers.set("X-API-Key", apiKey);
    return Object.assign({}, init || {}, { headers });
  };
  const api = (url, init) => fetch(url, withKey(init));
  function askForKey(message) {
    keyForm.hidden = false;
    say(message, "error");
    keyInput.focus();
  }
  keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey = keyInput.value.trim();
    try { sessionStorage.setItem("cifar-cam-api-key", apiKey); } catch (err) { /* storage off */ }
    loadModel();
  });

  // -- the model card: layers, classes, input size --------------------------------------------
  function loadModel() {
    return api("v1/model").then(async (res) => {
      const card = await res.json().catch(() => null);
      if (res.status === 401) {
        $("model").textContent = "This server needs an API key.";
        askForKey(`${apiKey ? "That API key was refused" : "This server needs an API key"}: ` +
                  `${detailOf(card, res)}. Enter it above.`);
        return;
      }
      if (!res.ok) throw new Error(`${res.status}: ${detailOf(card, res)}`);
      if (apiKey) { keyForm.hidden = true; say("API key accepted. Pick or drop an image to classify it.", "ok"); }
      const [h, w] = card.input_size || [Number(card.image_size) || 32, Number(card.image_size) || 32];
      const resize = card.resize || {};
      shape = {h, w, policy: resize.policy || "stretch", fill: resize.fill || [114, 114, 114]};
      const size = `${h}×${w}`;
      const layers = card.cam_layers || card.layers || ["layer4"];
      layer.replaceChildren(...layers.map((name) => new Option(name, name)));
      layer.value = layers.includes("layer4") ? "layer4" : layers[layers.length - 1];
      const n = (card.classes || []).length;
      if (n) topk.max = String(n);
      if (card.topk_default) topk.value = String(card.topk_default);
      if (card.input && card.input.formats) {
        $("drop-hint").textContent = `${card.input.formats}, up to ${card.input.max_upload_mb} MB; ` +
                                     "resized to the model's input size.";
      }
      $("input-caption").textContent = `Model input (${size}, enlarged)`;
      const parts = [card.kind, n ? `${n} classes` : "", `${size} input`,
                     card.test_accuracy != null ? `test accuracy ${(100 * card.test_accuracy).toFixed(2)}%` : ""];
      $("model").textContent = parts.filter(Boolean).join(" · ");
      loadGallery();
    }).catch((e) => {
      $("model").textContent = `Model card unavailable (${e.message})`;
      say(`The server did not give its model card (${e.message}).`, "error");
    });
  }

  // -- the gallery (serve.gallery): the model's most confident mistakes -------------------------
  const blobs = new Map();  // image URL -> object URL (the PNGs sit under /v1, which may need the key)
  async function imageUrl(url) {
    if (!blobs.has(url)) {
      blobs.set(url, api(url).then(async (res) => {
        if (!res.ok) throw new Error(`${res.status}`);
        return URL.createObjectURL(await res.blob());
      }));
      blobs.get(url).catch(() => blobs.delete(url));
    }
    return blobs.get(url);
  }
  const pctOf = (p) => (100 * Number(p)).toFixed(1) + "%";
  const describe = (m) => `#${m.rank}: true ${m.true}, predicted ${m.pred} (${pctOf(m.confidence)} confident)` +
                          (m.test_row >= 0 ? ` · test image ${m.test_row}` : "");

  async function showMistake(m, button) {
    for (const b of $("gallery").querySelectorAll("button")) b.setAttribute("aria-pressed", String(b === button));
    const box = $("mistake-images"), caption = $("mistake-caption");
    caption.textContent = describe(m);
    $("mistake").hidden = false;
    const imgs = await Promise.all(m.layers.map(async (name) => {
      const img = document.createElement("img");
      img.alt = `Grad-CAM at ${name} of test image ${m.test_row}: true ${m.true}, predicted ${m.pred}`;
      img.dataset.layer = name;
      try { img.src = await imageUrl(m.images[name]); } catch (e) { img.alt += " (could not be loaded)"; }
      return img;
    }));
    if (caption.textContent === describe(m)) box.replaceChildren(...imgs);  // not overtaken by a newer click
  }

  async function loadGallery() {
    let list = null;
    try {
      const res = await api("v1/gallery");
      if (res.ok) list = await res.json();
    } catch (e) { list = null; }
    const section = $("gallery-section");
    if (!Array.isArray(list) || !list.length) { section.hidden = true; return; }
    $("gallery").replaceChildren(...list.map((m) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "mistake";
      b.dataset.rank = String(m.rank);
      b.setAttribute("aria-pressed", "false");
      b.setAttribute("aria-label", describe(m));
      b.title = describe(m);
      const img = document.createElement("img");
      img.alt = "";
      const thumb = m.layers[m.layers.length - 1];
      imageUrl(m.images[thumb]).then((u) => { img.src = u; }).catch(() => {});
      const label = document.createElement("span");
      label.textContent = `${m.true} → ${m.pred}`;
      b.append(img, label);
      b.addEventListener("click", () => showMistake(m, b));
      return b;
    }));
    const right = list.every((m) => m.true === m.pred);  // a gradcam run with gradcam.select=correct
    $("gallery-hint").textContent = `${list.length} test images the model got ${right ? "right" : "wrong"}, ` +
                                    "most confident first. Pick one to see its Grad-CAM at each layer.";
    section.hidden = false;
  }

  loadModel();

  // -- the image as the model sees it: resized by the model's policy, transparency over white ----
  // stretch: the whole image to h×w; crop: the shorter side to fit, the centre cut; pad: the longer side to fit,
  // the border filled with the card's fill colour (as data.resize does for training).
  async function drawInput(blob) {
    const bitmap = await createImageBitmap(blob);  // rejects on a file the browser cannot decode
    const {h, w, policy, fill} = shape;
    let dw = w, dh = h;
    if (policy !== "stretch") {
      const scale = (policy === "crop" ? Math.max : Math.min)(w / bitmap.width, h / bitmap.height);
      dw = Math.max(1, Math.round(bitmap.width * scale));
      dh = Math.max(1, Math.round(bitmap.height * scale));
    }
    const x = Math.floor((w - dw) / 2), y = Math.floor((h - dh) / 2);
    for (const c of [input, under]) {
      c.width = w;
      c.height = h;
      const ctx = c.getContext("2d");
      ctx.fillStyle = `rgb(${fill.join(",")})`;
      ctx.fillRect(0, 0, w, h);
      ctx.fillStyle = "#fff";
      ctx.fillRect(x, y, dw, dh);
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(bitmap, x, y, dw, dh);
      c.hidden = false;
    }
    bitmap.close && bitmap.close();
  }

  function pngSrc(b64) { return b64.startsWith("data:") ? b64 : "data:image/png;base64," + b64; }

  function showBars(result) {
    const classes = result.classes || [], probs = result.probabilities || [];
    const pct = (p) => (100 * p).toFixed(1) + "%";
    const top1 = $("top1");
    top1.replaceChildren();
    if (classes.length) {
      const pctSpan = document.createElement("span");
      pctSpan.className = "pct";
      pctSpan.textContent = " " + pct(probs[0]);
      top1.append(classes[0], pctSpan);
    }
    $("bars").replaceChildren(...classes.map((name, i) => {
      const li = document.createElement("li");
      li.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span>' +
                     '<span class="pct"></span>';
      li.querySelector(".name").textContent = name;
      li.querySelector(".name").title = name;
      li.querySelector(".fill").style.width = Math.max(0.5, 100 * probs[i]).toFixed(2) + "%";
      li.querySelector(".pct").textContent = pct(probs[i]);
      li.setAttribute("aria-label", `${name} ${pct(probs[i])}`);
      return li;
    }));
    const meta = [];
    if (result.ms != null) meta.push(`${Number(result.ms).toFixed(1)} ms on the server`);
    if (result.model) meta.push(`model ${String(result.model).slice(0, 12)}`);
    $("meta").textContent = meta.join(" · ");
  }

  function clearResult() {
    $("top1").replaceChildren();
    $("bars").replaceChildren();
    $("meta").textContent = "";
    overlay.hidden = input.hidden = under.hidden = true;
    overlay.removeAttribute("src");
    $("views-section").classList.add("empty");
    $("overlay-caption").textContent = "Grad-CAM";
  }

  // -- one request ----------------------------------------------------------------------------
  async function predict(blob, name) {
    const mine = ++seq;
    if (aborter) aborter.abort();
    aborter = new AbortController();
    current = { blob, name };
    say(`Sending ${name}…`);
    const form = new FormData();
    form.append("file", blob, name);
    const k = Math.max(1, Math.min(Number(topk.max) || 10, Math.round(Number(topk.value) || 3)));
    const query = new URLSearchParams({ cam: "true", layer: layer.value, topk: String(k) });
    let res, body;
    try {
      res = await api("v1/predict?" + query, { method: "POST", body: form, signal: aborter.signal });
      body = await res.json().catch(() => null);
    } catch (e) {
      if (e.name === "AbortError") return;
      if (mine === seq) { clearResult(); say(`The server could not be reached (${e.message}).`, "error"); }
      return;
    }
    if (mine !== seq) return;  // a newer upload is on its way
    if (res.status === 401) {
      clearResult();
      current = null;
      askForKey(`Refused (401): ${detailOf(body, res)}. Enter the API key above.`);
      return;
    }
    if (!res.ok) {
      clearResult();
      const refused = res.status >= 400 && res.status < 500;
      say(`${refused ? "Refused" : "Server error"} (${res.status}): ${detailOf(body, res)}`, "error");
      current = null;
      return;
    }
    const shown = body.input_png || body.image_png;  // the server's own model input, where it sends one
    try {
      if (shown) await drawInput(await (await fetch(pngSrc(shown))).blob());
      else await drawInput(blob);
    } catch (e) {
      input.hidden = under.hidden = true;  // the server decoded what this browser cannot: the bars still stand
    }
    $("views-section").classList.remove("empty");
    showBars(body);
    if (body.overlay_png) {
      overlay.onload = () => { overlay.hidden = false; };
      overlay.src = pngSrc(body.overlay_png);
      $("overlay-caption").textContent = `Grad-CAM at ${body.layer || layer.value} for “${body.classes[0]}”`;
    } else {
      overlay.hidden = true;
      $("overlay-caption").textContent = "Grad-CAM: not returned by the server";
    }
    say(`${name}: ${body.classes[0]} (${(100 * body.probabilities[0]).toFixed(1)}%).`, "ok");
  }

  function take(files) {
    const f = files && files[0];
    if (f) predict(f, f.name || "image");
  }

  // -- input: picker, drop zone (mouse and keyboard), drag-and-drop -----------------------------
  file.addEventListener("change", () => { take(file.files); file.value = ""; });
  drop.addEventListener("click", (e) => { if (e.target !== file) file.click(); });
  drop.addEventListener("keydown", (e) => {
    if (e.target === drop && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); file.click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => { e.preventDefault(); take(e.dataTransfer.files); });
  // a file dropped beside the zone must not make the browser navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  // -- controls: a new layer or k asks again for the same image; opacity is drawn here ----------
  const again = () => { if (current) predict(current.blob, current.name); };
  layer.addEventListener("change", again);
  topk.addEventListener("change", again);
  const setOpacity = () => {
    overlay.style.opacity = String(Number(opacity.value) / 100);
    $("opacity-value").textContent = opacity.value + "%";
  };
  opacity.addEventListener("input", setOpacity);
  setOpacity();
})();
