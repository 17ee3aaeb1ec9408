// naclip serve: the one page. Plain JS, no dependencies.
(function () {
  "use strict";

  const limits = JSON.parse(document.getElementById("limits").textContent);
  const form = document.getElementById("segment-form");
  const fileInput = document.getElementById("image-input");
  const classesInput = document.getElementById("classes");
  const submitButton = document.getElementById("submit");
  const statusBox = document.getElementById("status");
  const errorBox = document.getElementById("error");
  const results = document.getElementById("results");
  const placeholder = document.getElementById("placeholder");
  const preview = document.getElementById("preview");
  const previewImg = document.getElementById("preview-img");
  const previewName = document.getElementById("preview-name");
  const sampleButtons = Array.from(document.querySelectorAll("button.sample"));

  let selectedSample = null;
  let previewUrl = null;

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  function setPreview(src, name) {
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
      previewUrl = null;
    }
    if (!src) {
      preview.hidden = true;
      return;
    }
    previewImg.src = src;
    previewName.textContent = name;
    preview.hidden = false;
  }

  function selectSample(button) {
    selectedSample = button.dataset.sample;
    sampleButtons.forEach((b) => b.classList.toggle("selected", b === button));
    fileInput.value = "";
    setPreview(button.querySelector("img").src, button.title);
    if (!classesInput.value.trim()) {
      classesInput.value = button.dataset.classes;
    }
    clearError();
  }

  sampleButtons.forEach((b) => b.addEventListener("click", () => selectSample(b)));

  // Each method's own PAMR default (NACLIP on, ProxyCLIP off) when the user switches methods.
  form.querySelectorAll("input[name=method]").forEach((radio) => radio.addEventListener("change", () => {
    document.getElementById("pamr").checked = radio.dataset.pamr === "on";
  }));

  fileInput.addEventListener("change", () => {
    clearError();
    const file = fileInput.files[0];
    if (!file) {
      setPreview(null);
      return;
    }
    selectedSample = null;
    sampleButtons.forEach((b) => b.classList.remove("selected"));
    if (file.size > limits.max_upload_bytes) {
      showError(`The file is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${limits.max_upload_mb} MB.`);
    }
    const url = URL.createObjectURL(file);
    setPreview(url, file.name);
    previewUrl = url;
  });

  function fmtSeconds(s) {
    if (s >= 10) return s.toFixed(1) + " s";
    if (s >= 1) return s.toFixed(2) + " s";
    return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
  }

  function renderResult(data) {
    document.getElementById("overlay").src = data.overlay;
    document.getElementById("label-map").src = data.label_map;
    document.getElementById("overlay-download").href = data.overlay;
    document.getElementById("label-map-download").href = data.label_map;

    const legend = document.getElementById("legend");
    legend.replaceChildren();
    for (const entry of data.legend) {
      const li = document.createElement("li");
      li.className = entry.share > 0 ? "legend-item" : "legend-item absent";
      li.title = `class ${entry.index}`;
      li.dataset.name = entry.name;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = entry.color;
      const name = document.createElement("span");
      name.className = "legend-name";
      name.textContent = entry.name;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = (100 * entry.share).toFixed(1) + "%";
      fill.style.background = entry.color;
      bar.appendChild(fill);
      const share = document.createElement("span");
      share.className = "share";
      share.textContent = (100 * entry.share).toFixed(1) + "%";
      li.append(swatch, name, bar, share);
      legend.appendChild(li);
    }

    const tbody = document.querySelector("#timings tbody");
    tbody.replaceChildren();
    for (const t of data.timings) {
      const tr = document.createElement("tr");
      if (t.stage === "total") tr.className = "total";
      const th = document.createElement("th");
      th.textContent = t.stage;
      const td = document.createElement("td");
      td.textContent = fmtSeconds(t.seconds);
      tr.append(th, td);
      tbody.appendChild(tr);
    }
    document.getElementById("result-info").textContent =
      `${data.width}x${data.height} px, ${data.method ? data.method + ", " : ""}` +
      `${data.mode === "slide" ? "sliding window" : "whole image"}, ` +
      `PAMR ${data.pamr ? "on" : "off"}`;
    results.hidden = false;
    placeholder.hidden = true;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    const file = fileInput.files[0];
    const body = new FormData();
    if (file) {
      if (file.size > limits.max_upload_bytes) {
        showError(`The file is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${limits.max_upload_mb} MB.`);
        return;
      }
      body.append("image", file, file.name);
    } else if (selectedSample) {
      body.append("sample", selectedSample);
    }
    body.append("classes", classesInput.value);
    body.append("mode", form.querySelector("input[name=mode]:checked").value);
    const method = form.querySelector("input[name=method]:checked");
    if (method) body.append("method", method.value);
    body.append("pamr", document.getElementById("pamr").checked ? "on" : "off");

    submitButton.disabled = true;
    statusBox.textContent = "Segmenting\u2026 (if another image is being processed, this one waits its turn)";
    statusBox.classList.add("busy");
    try {
      const response = await fetch("api/segment", { method: "POST", body: body });
      let data = null;
      try {
        data = await response.json();
      } catch (e) {
        data = null;
      }
      if (!response.ok || !data || data.error) {
        const message = data && data.error ? data.error : `The server answered ${response.status} ${response.statusText}.`;
        showError(message);
        return;
      }
      renderResult(data);
    } catch (e) {
      showError("Could not reach the server (is it still running? was the upload too large?): " + e.message);
    } finally {
      submitButton.disabled = false;
      statusBox.textContent = "";
      statusBox.classList.remove("busy");
    }
  });
})();
