// The review page of `insect report`, drawn from the JSON in #review-data.
// Every text from the data (file, folder and class names) goes in through textContent or a
// DOM property, never innerHTML: a name is shown, never parsed. The page's
// Content-Security-Policy runs this file only, and it fetches nothing.
"use strict";

(function () {
  const data = JSON.parse(document.getElementById("review-data").textContent);
  const THUMB = /^thumbs\/[0-9a-f]{32}\.jpg$/; // the only image sources the page sets
  const corrections = new Map(); // image index -> label (a class, or data.skip_label)
  const controls = new Map(); // image index -> its <select>s, one per gallery showing it
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child); // strings: text nodes
    }
    return node;
  }

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    return node;
  }

  function number(x, digits) {
    return x === null || x === undefined ? "n/a" : Number(x).toFixed(digits);
  }

  function count(n) {
    return Number(n).toLocaleString("en");
  }

  // ---- the run --------------------------------------------------------------------------

  function runFacts() {
    const run = data.run;
    const facts = [
      ["output", data.output],
      ["input", run.input],
      ["inputs", run.inputs === undefined ? null : count(run.inputs)],
      ["rows", count(run.rows_read)],
      ["errors", run.errors === undefined ? count(data.errors.total) : count(run.errors)],
      ["not decided (below --min-score)", run.undecided ? count(run.undecided) : null],
      ["model", run.model],
      ["started", run.started],
      ["finished", run.incomplete ? `not a whole run (${run.incomplete})` : run.finished],
      ["warning", run.foreign],
      ["seconds", run.seconds === undefined ? null : number(run.seconds, 1)],
      ["images per second", run.images_per_second ? number(run.images_per_second, 1) : null],
      ["--min-score", run.row_format ? run.row_format.min_score : null],
      ["--top-k", run.row_format ? run.row_format.top_k : null],
      ["page made", data.generated],
    ];
    const list = el("dl", "facts");
    for (const [name, value] of facts) {
      if (value === null || value === undefined) continue;
      list.append(el("dt", null, name), el("dd", null, String(value)));
    }
    return el("section", "run", el("h2", null, "The run"), list, errorKinds(), histogram());
  }

  function errorKinds() {
    const kinds = Object.entries(data.errors.kinds);
    if (!kinds.length) return el("p", null, "No file failed.");
    const list = el("ul", "kinds");
    for (const [kind, n] of kinds) list.append(el("li", null, `${kind}: ${count(n)}`));
    return el("div", null, el("h3", null, "Errors by kind"), list);
  }

  function histogram() {
    const { edges, counts } = data.histogram;
    const width = 600, height = 140, bottom = 20, top = Math.max(1, ...counts);
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "histogram", role: "img" });
    const step = width / counts.length;
    counts.forEach((n, i) => {
      const h = ((height - bottom - 4) * n) / top;
      const bar = svg("rect", { x: i * step + 1, y: height - bottom - h, width: step - 2, height: h });
      const tip = svg("title", {});
      tip.textContent = `${edges[i].toFixed(2)}-${edges[i + 1].toFixed(2)}: ${count(n)} rows`;
      bar.append(tip);
      chart.append(bar);
    });
    for (const x of [0, 0.5, 1]) {
      const label = svg("text", { x: Math.min(width - 12, Math.max(0, x * width - 6)), y: height - 4 });
      label.textContent = String(x);
      chart.append(label);
    }
    return el("div", null, el("h3", null, "Scores (the probability of the predicted class)"), chart);
  }

  // ---- an evaluation --------------------------------------------------------------------

  function evaluationSection() {
    const ev = data.evaluation;
    const perClass = el("table", "per-class");
    perClass.append(header(["class", "precision", "recall", "F1", "images"]));
    for (const [name, m] of Object.entries(ev.per_class || {})) {
      perClass.append(row([name, number(m.precision, 3), number(m.recall, 3), number(m.f1, 3), count(m.support)]));
    }
    return el(
      "section", "evaluation",
      el("h2", null, "The evaluation"),
      el("p", null, `Accuracy ${number(ev.accuracy, 4)} on ${count(ev.images)} images` +
        (ev.unreadable ? ` (${count(ev.unreadable)} unreadable)` : "") +
        (ev.data ? ` of ${ev.data}` : "") + "."),
      perClass,
      el("h3", null, "Confusion matrix (rows: true class, columns: predicted); a cell opens its images"),
      confusionMatrix(ev),
    );
  }

  function confusionMatrix(ev) {
    const table = el("table", "confusion");
    table.append(header(["true \\ predicted", ...ev.classes]));
    ev.matrix.forEach((counts, i) => {
      const line = el("tr", null, el("th", null, ev.classes[i]));
      counts.forEach((n, j) => {
        const id = ev.cells[`${i},${j}`];
        const cell = el("td", i === j ? "diagonal" : n ? "mistake" : null);
        if (id) {
          const button = el("button", "cell", count(n));
          button.type = "button";
          button.title = `${ev.classes[i]} predicted as ${ev.classes[j]}`;
          button.addEventListener("click", () => openCell(id));
          cell.append(button);
        } else {
          cell.append(count(n));
        }
        line.append(cell);
      });
      table.append(line);
    });
    return table;
  }

  function openCell(id) {
    for (const section of document.querySelectorAll("section.gallery.cell")) {
      section.hidden = section.id !== id;
    }
    document.getElementById(id).scrollIntoView();
  }

  function header(names) {
    const line = el("tr");
    for (const name of names) line.append(el("th", null, name));
    return line;
  }

  function row(values) {
    const line = el("tr");
    for (const value of values) line.append(el("td", null, value));
    return line;
  }

  // ---- galleries --------------------------------------------------------------------------

  function galleryTitle(g) {
    if (g.kind === "class") return `Predicted ${g.label}`;
    if (g.kind === "undecided") {
      return "Not decided: score below --min-score" + (g.min_score === null ? "" : ` ${g.min_score}`);
    }
    return `True ${g.truth}, predicted ${g.label}`;
  }

  function gallerySection(g) {
    const section = el("section", `gallery ${g.kind}`);
    section.id = g.id;
    section.hidden = g.kind === "cell";
    const shown = g.images.length < g.total ? `${count(g.images.length)} of ${count(g.total)}` : count(g.total);
    section.append(
      el("h2", null, galleryTitle(g)),
      el("p", "about", `${shown} images, ${g.order}`),
    );
    const grid = el("div", "grid");
    for (const index of g.images) grid.append(figure(index));
    section.append(grid);
    return section;
  }

  function figure(index) {
    const image = data.images[index];
    const card = el("figure", "thumb");
    card.dataset.image = String(index);
    if (image.thumb && THUMB.test(image.thumb)) {
      const img = el("img");
      img.src = image.thumb;
      img.alt = image.name;
      img.width = 160;
      img.height = 160;
      card.append(img);
    } else {
      card.append(el("div", "no-thumb", `no thumbnail: ${image.problem || "not made"}`));
    }
    const name = el("span", "name", image.name);
    name.title = image.path;
    const caption = el("figcaption", null, name, el("span", "score", scoreLine(image)));
    if (image.top) caption.append(el("span", "top", image.top.map(([l, s]) => `${l} ${number(s, 3)}`).join(" · ")));
    caption.append(correctionControl(index));
    card.append(caption);
    return card;
  }

  function scoreLine(image) {
    const score = `score ${number(image.score, 3)}`;
    if (image.label !== null) return `${image.label}, ${score}`;
    return image.guess ? `best guess ${image.guess}, ${score}` : score;
  }

  // ---- corrections ------------------------------------------------------------------------

  function correctionControl(index) {
    const select = el("select", "correction");
    select.title = "the true class of this image";
    select.append(new Option("true class…", ""));
    for (const name of data.classes) select.append(new Option(name, name));
    select.append(new Option("not an insect / skip", data.skip_label));
    select.value = corrections.get(index) || "";
    select.addEventListener("change", () => setCorrection(index, select.value));
    if (!controls.has(index)) controls.set(index, []);
    controls.get(index).push(select);
    return el("label", "correct", select);
  }

  function setCorrection(index, label) {
    if (label) corrections.set(index, label);
    else corrections.delete(index);
    for (const select of controls.get(index)) select.value = label;
    for (const select of controls.get(index)) select.closest("figure").classList.toggle("corrected", !!label);
    document.getElementById("correction-count").textContent = `${corrections.size} corrections`;
    document.getElementById("download-corrections").disabled = corrections.size === 0;
  }

  function csvField(text) {
    return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function correctionsCsv() {
    const lines = ["path,label"];
    const rows = [...corrections].map(([index, label]) => [data.images[index].path, label]);
    rows.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    for (const [path, label] of rows) lines.push(`${csvField(path)},${csvField(label)}`);
    return lines.join("\n") + "\n";
  }

  function download() {
    const blob = new Blob([correctionsCsv()], { type: "text/csv" });
    const link = el("a");
    link.href = URL.createObjectURL(blob);
    link.download = "corrections.csv";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  function toolbar() {
    const button = el("button", null, "Download corrections (CSV)");
    button.id = "download-corrections";
    button.type = "button";
    button.disabled = true;
    button.addEventListener("click", download);
    const clear = el("button", null, "Clear");
    clear.type = "button";
    clear.addEventListener("click", () => [...corrections.keys()].forEach((i) => setCorrection(i, "")));
    const counter = el("span", null, "0 corrections");
    counter.id = "correction-count";
    const hint = el("span", "hint", "for insect train --labels corrections.csv");
    return el("div", "toolbar", counter, button, clear, hint);
  }

  // ---- errors and the page ----------------------------------------------------------------

  function errorSection() {
    const { total, rows } = data.errors;
    const section = el("section", "errors", el("h2", null, `Files that failed (${count(total)})`));
    section.id = "errors";
    if (!total) return section;
    const table = el("table", "error-rows", header(["path", "error"]));
    for (const r of rows) table.append(row([r.path, r.error]));
    section.append(table);
    if (rows.length < total) section.append(el("p", "about", `${count(total - rows.length)} more not listed.`));
    return section;
  }

  function navigation() {
    const list = el("ul", "nav");
    for (const g of data.galleries) {
      if (g.kind === "cell") continue;
      const link = el("a", null, `${galleryTitle(g)} (${count(g.total)})`);
      link.href = `#${g.id}`;
      list.append(el("li", null, link));
    }
    const errors = el("a", null, `Files that failed (${count(data.errors.total)})`);
    errors.href = "#errors";
    list.append(el("li", null, errors));
    return el("nav", null, list);
  }

  function draw() {
    document.title = `insect review: ${data.output}`;
    const main = document.getElementById("review");
    const kind = data.kind === "evaluate" ? "evaluation" : "classification";
    main.append(el("h1", null, `Review of the ${kind} ${data.output}`), toolbar(), runFacts());
    if (data.evaluation) main.append(evaluationSection());
    main.append(navigation());
    for (const g of data.galleries) main.append(gallerySection(g));
    main.append(errorSection());
  }

  draw();
})();
