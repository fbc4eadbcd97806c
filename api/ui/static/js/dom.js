// Small DOM and formatting helpers. Text always goes in through textContent, never innerHTML:
// job data (messages, metadata, spec strings) is the user's and must not become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];

export function num(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "string") return value; // "NaN" / "Infinity" as the API names them
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  const text = value.toPrecision(digits);
  return text.includes(".") ? text.replace(/\.?0+$/, "") : text; // 0.5000 -> 0.5, but 100 stays
}

// "mean ± std", or the mean alone when no std was recorded.
export function meanStd(metrics, key) {
  const mean = metrics[key];
  if (mean === null || mean === undefined) return "–";
  const std = metrics[`${key}_std`];
  return std === null || std === undefined ? num(mean, 3) : `${num(mean, 3)} ± ${num(std, 2)}`;
}

export function when(unix) {
  if (!unix) return "–";
  const d = new Date(unix * 1000);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function duration(seconds) {
  if (seconds === null || !Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

// Time left, from the pace so far: (elapsed / steps done) * steps left.
export function eta(job, now = Date.now() / 1000) {
  if (job.status !== "running" || !job.started_at || !job.total_steps || !job.current_step) return null;
  const elapsed = now - job.started_at;
  return (elapsed / job.current_step) * (job.total_steps - job.current_step);
}

export function studentName(spec) {
  const s = (spec && spec.student) || {};
  if (s.init === "pretrained") return s.model || "pretrained";
  return `${s.init || "truncate"}${s.num_layers ? ` ${s.num_layers}L` : ""}`;
}

export function lossName(spec) {
  return (spec && spec.loss && spec.loss.name) || "akl";
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export function progressBar(job) {
  const pct = Math.round((job.progress || 0) * 100);
  return h(
    "span",
    { class: "progress" },
    h("progress", { max: 100, value: pct, "aria-label": `progress of ${job.id}` }),
    h("span", { class: "progress-text" }, `${pct}%`),
  );
}

export function table(caption, headers, rows, attrs = {}) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      attrs,
      caption ? h("caption", {}, caption) : null,
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          headers.map((x) => h("th", { scope: "col" }, x)),
        ),
      ),
      h("tbody", {}, rows),
    ),
  );
}
