// Two to eight jobs side by side (a loss sweep, say): their curves overlaid, one colour per job,
// and their final evaluations in one table. #/compare/ID,ID,... ; without ids, a picker.
import { api } from "./api.js";
import { align, lineChart, PALETTE } from "./charts.js";
import { h, lossName, statusBadge, studentName, table, when } from "./dom.js";
import { columns, EVAL_METRICS, MAX_POINTS } from "./job.js";

export const MIN_JOBS = 2;
export const MAX_JOBS = 8;

const METRICS = [
  ["loss", "Loss"],
  ["kd", "KD term"],
  ["ce", "CE"],
  ["g_head", "g_head"],
  ["g_tail", "g_tail"],
  ["w_head", "w_head"],
];

const EVAL_ROWS = EVAL_METRICS;

async function picker(view, ctx) {
  const page = await api.get("/v1/jobs?limit=100");
  const chosen = new Set();
  const go = h("button", { type: "button", disabled: true }, `Compare (0)`);
  go.addEventListener("click", () => ctx.navigate(`#/compare/${[...chosen].join(",")}`));
  const rows = page.data.map((job) => {
    const box = h("input", { type: "checkbox", "aria-label": `select ${job.id}` });
    box.addEventListener("change", () => {
      box.checked ? chosen.add(job.id) : chosen.delete(job.id);
      go.textContent = `Compare (${chosen.size})`;
      go.disabled = chosen.size < MIN_JOBS || chosen.size > MAX_JOBS;
    });
    return h(
      "tr",
      { dataset: { job: job.id } },
      h("td", {}, box),
      h("td", {}, job.id),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, lossName(job.spec)),
      h("td", {}, `${job.teacher} → ${studentName(job.spec)}`),
      h("td", {}, when(job.created_at)),
    );
  });
  view.append(
    h("div", { class: "view-head" }, h("h1", {}, "Compare jobs")),
    h("p", {}, `Pick ${MIN_JOBS} to ${MAX_JOBS} jobs, for example the runs of a loss sweep.`),
    table(null, ["", "Job", "Status", "Loss", "Teacher → student", "Created"], rows, {
      "aria-label": "Jobs to compare",
    }),
    h("div", { class: "toolbar" }, go),
  );
}

export async function render(view, { arg }, ctx) {
  const ids = [...new Set(arg.split(",").filter(Boolean))];
  if (ids.length < MIN_JOBS) return picker(view, ctx);
  if (ids.length > MAX_JOBS) throw new Error(`compare takes at most ${MAX_JOBS} jobs, not ${ids.length}`);
  const jobs = await Promise.all(
    ids.map(async (id) => {
      const path = `/v1/jobs/${encodeURIComponent(id)}`;
      const [job, metrics, evaluations] = await Promise.all([
        api.get(path),
        api.get(`${path}/metrics?max_points=${MAX_POINTS}`),
        api.get(`${path}/evaluations`),
      ]);
      return { job, metrics, evaluations: evaluations.data };
    }),
  );
  const colour = (i) => PALETTE[i % PALETTE.length];
  const legend = jobs.map(({ job }, i) =>
    h(
      "tr",
      { dataset: { job: job.id } },
      h("td", {}, h("span", { class: "swatch", style: `background:${colour(i)}`, "aria-hidden": "true" })),
      h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, lossName(job.spec)),
      h("td", {}, `${job.teacher} → ${studentName(job.spec)}`),
      h("td", { class: "num" }, `${job.current_step}/${job.total_steps ?? "?"}`),
    ),
  );
  const chartsBox = h("div", { class: "charts" });
  view.append(
    h(
      "div",
      { class: "view-head" },
      h("h1", {}, `Compare ${jobs.length} jobs`),
      h("a", { href: "#/compare" }, "Pick others"),
    ),
    h(
      "section",
      { class: "card" },
      table(null, ["Colour", "Job", "Status", "Loss", "Teacher → student", "Step"], legend, {
        "aria-label": "Compared jobs",
      }),
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "compare-curves" },
      h("h2", { id: "compare-curves" }, "Curves"),
      chartsBox,
    ),
  );
  const charts = [];
  for (const [field, title] of METRICS) {
    const tables = jobs.map(({ metrics }) => {
      const cols = columns(metrics.data, [field]);
      return [cols.step, cols[field]];
    });
    if (!tables.some((t) => t[1].some((v) => v !== null))) continue;
    const joined = align(tables);
    const cols = Object.fromEntries(jobs.map(({ job }, i) => [job.id, joined[i + 1]]));
    charts.push(
      lineChart(chartsBox, {
        id: `compare-${field}`,
        title,
        series: jobs.map(({ job }, i) => ({
          key: job.id,
          label: `${lossName(job.spec)} …${job.id.slice(-6)}`,
          color: colour(i),
        })),
        steps: joined[0],
        columns: cols,
      }),
    );
  }
  // The final evaluation of each job: the one at the highest step.
  const finals = jobs.map(({ evaluations }) =>
    evaluations.reduce((a, e) => (a && a.step > e.step ? a : e), null),
  );
  const header = ["", ...jobs.map(({ job }) => job.id)];
  const rows = EVAL_ROWS.map(([name, cell]) =>
    h(
      "tr",
      {},
      h("th", { scope: "row" }, name),
      finals.map((e) => h("td", { class: "num" }, e ? cell(e.metrics) : "–")),
    ),
  );
  rows.unshift(
    h(
      "tr",
      {},
      h("th", { scope: "row" }, "Step"),
      finals.map((e) => h("td", { class: "num" }, e ? String(e.step) : "–")),
    ),
  );
  view.append(
    h(
      "section",
      { class: "card", "aria-labelledby": "compare-evals" },
      h("h2", { id: "compare-evals" }, "Final evaluations"),
      table(null, header, rows, { id: "compare-evaluations", "aria-label": "Final evaluations" }),
    ),
  );
  return () => charts.forEach((c) => c.destroy());
}
