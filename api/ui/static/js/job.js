// One job: status and progress, cancel, the metric curves (loss/CE/KD, the AKL gaps g_head,
// g_tail, w_head, FKL/RKL when recorded, lr, grad norm, tokens/s), evaluations, events,
// checkpoints with downloads, and the spec as YAML. Polls until the job has finished.
import { api } from "./api.js";
import { lineChart } from "./charts.js";
import {
  duration,
  eta,
  h,
  meanStd,
  lossName,
  num,
  progressBar,
  statusBadge,
  studentName,
  table,
  TERMINAL,
  when,
} from "./dom.js";
import yaml from "../vendor/js-yaml/js-yaml.mjs";

const REFRESH_MS = 2000;
// Charts are a few hundred pixels wide: more points than this add nothing but bytes and time
// (the metrics route down-samples at an even stride; a 100k-step history stays as fast).
export const MAX_POINTS = 1000;

export const CHARTS = [
  { id: "loss", title: "Loss, CE and KD", series: ["loss", "ce", "kd"] },
  { id: "gaps", title: "AKL gaps: g_head, g_tail and w_head", series: ["g_head", "g_tail", "w_head"] },
  { id: "divergences", title: "FKL and RKL", series: ["fkl", "rkl"], optional: true },
  { id: "lr", title: "Learning rate", series: ["lr"] },
  { id: "grad_norm", title: "Gradient norm", series: ["grad_norm"], optional: true },
  { id: "tokens_per_s", title: "Tokens per second", series: ["tokens_per_s"] },
];

/** Step array and one array per field; anything that is not a finite number plots as a gap. */
export function columns(points, fields) {
  const out = { step: points.map((p) => p.step) };
  for (const f of fields) out[f] = points.map((p) => (typeof p[f] === "number" ? p[f] : null));
  return out;
}

/** The evaluation metrics shown for a job and side by side in Compare: [label, cell(metrics)]. */
export const EVAL_METRICS = [
  ["Rouge-L (student)", (m) => meanStd(m, "rouge_l")],
  ["Rouge-L (teacher)", (m) => meanStd(m, "teacher_rouge_l")],
  ["Greedy Rouge-L (student)", (m) => num(m.rouge_l_greedy)],
  ["Greedy Rouge-L (teacher)", (m) => num(m.teacher_rouge_l_greedy)],
  ["distinct-1", (m) => num(m.distinct_1, 3)],
  ["distinct-2", (m) => num(m.distinct_2, 3)],
  ["Validation CE", (m) => num(m.val_ce)],
  ["Validation KL", (m) => num(m.val_kl)],
];

const EVAL_COLUMNS = [["Step", (m, e) => String(e.step)], ...EVAL_METRICS];

export function evaluationTable(evaluations) {
  if (!evaluations.length)
    return h(
      "p",
      { class: "muted" },
      "No evaluation yet (it runs at the end, or every evaluation.every_steps).",
    );
  const rows = evaluations.map((e) =>
    h(
      "tr",
      {},
      EVAL_COLUMNS.map(([, cell]) => h("td", { class: "num" }, cell(e.metrics, e))),
    ),
  );
  return table(
    null,
    EVAL_COLUMNS.map(([name]) => name),
    rows,
    { id: "evaluations", "aria-label": "Evaluations" },
  );
}

function section(title, id, ...children) {
  return h(
    "section",
    { class: "card", "aria-labelledby": `${id}-title` },
    h("h2", { id: `${id}-title` }, title),
    ...children,
  );
}

export async function render(view, { arg: jobId }, ctx) {
  let job = await api.get(`/v1/jobs/${encodeURIComponent(jobId)}`);
  const head = h("div", { class: "view-head" });
  const summary = h("dl", { class: "summary" });
  const actions = h("div", { class: "toolbar" });
  const chartsBox = h("div", { class: "charts" });
  const evalBox = h("div");
  const eventsBox = h("ol", { class: "events", role: "log", "aria-label": "Events", tabindex: 0 });
  const checkpointsBox = h("div");
  const specBox = h("pre", { class: "spec", tabindex: 0, "aria-label": "Spec as YAML" });
  view.append(
    head,
    h("section", { class: "card", "aria-label": "Summary" }, summary, actions),
    section("Metrics", "metrics", chartsBox),
    section("Evaluation", "evaluation", evalBox),
    h(
      "div",
      { class: "two" },
      section("Events", "events", eventsBox),
      section("Checkpoints", "checkpoints", checkpointsBox),
    ),
    section(
      "Spec",
      "spec",
      specBox,
      h(
        "div",
        { class: "toolbar" },
        h("button", { type: "button", class: "secondary", onclick: reuse }, "Use as a new job"),
      ),
    ),
  );
  const charts = {};
  let lastEvent = null;
  let checkpointIds = null;
  let confirming = false;

  function reuse() {
    sessionStorage.setItem("akl.draft", specBox.textContent);
    ctx.navigate("#/submit");
  }

  function drawHead() {
    head.replaceChildren(h("h1", {}, job.id), statusBadge(job.status));
    const items = [
      ["Progress", progressBar(job)],
      ["Step", `${job.current_step}/${job.total_steps ?? "?"}`],
      ["ETA", duration(eta(job))],
      ["Teacher → student", `${job.teacher} → ${studentName(job.spec)}`],
      ["Loss", lossName(job.spec)],
      ["Latest loss", num(job.metrics ? job.metrics.loss : null)],
      ["Trained tokens", String(job.trained_tokens)],
      ["Created", when(job.created_at)],
      ["Started", when(job.started_at)],
      ["Finished", when(job.finished_at)],
      ["Queue / attempts", `${job.queue} / ${job.attempts}`],
    ];
    if (job.metadata)
      items.push([
        "Metadata",
        Object.entries(job.metadata)
          .map(([k, v]) => `${k}=${v}`)
          .join(", "),
      ]);
    summary.replaceChildren(...items.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
    if (job.error) {
      const message = `${job.error.code}: ${job.error.message}`;
      summary.append(
        h("div", { class: "wide" }, h("dt", {}, "Error"), h("dd", { class: "error-text" }, message)),
      );
    }
    drawActions();
  }

  function drawActions() {
    actions.replaceChildren();
    if (job.status === "succeeded") {
      actions.append(
        h(
          "button",
          { type: "button", onclick: () => download(`/v1/jobs/${job.id}/model`, `${job.id}-final.tar.gz`) },
          "Download model",
        ),
      );
    }
    if (TERMINAL.has(job.status)) return;
    if (job.cancel_requested) {
      actions.append(h("span", { class: "muted" }, "Cancel requested; the worker stops at its next step."));
    } else if (!confirming) {
      actions.append(
        h(
          "button",
          {
            type: "button",
            class: "danger",
            id: "cancel",
            onclick: () => ((confirming = true), drawActions()),
          },
          "Cancel job",
        ),
      );
    } else {
      const yes = h(
        "button",
        { type: "button", class: "danger", id: "cancel-confirm", onclick: cancel },
        "Yes, cancel it",
      );
      actions.append(
        h("span", {}, `Cancel ${job.id}? A running job keeps its last checkpoint.`),
        yes,
        h(
          "button",
          { type: "button", class: "secondary", onclick: () => ((confirming = false), drawActions()) },
          "Keep it",
        ),
      );
      yes.focus();
    }
  }

  async function cancel() {
    try {
      job = await api.post(`/v1/jobs/${job.id}/cancel`);
      confirming = false;
      drawHead();
      const note = actions.querySelector("span");
      if (note) {
        note.tabIndex = -1;
        note.focus(); // the button that had focus is gone
      }
    } catch (err) {
      ctx.showError(err);
    }
  }

  async function download(path, name) {
    try {
      await api.download(path, name);
    } catch (err) {
      ctx.showError(err);
    }
  }

  function drawCharts(metrics) {
    const fields = CHARTS.flatMap((c) => c.series);
    const cols = columns(metrics.data, fields);
    if (!metrics.data.length) {
      chartsBox.replaceChildren(
        h("p", { class: "muted" }, "No steps yet: the curves appear with the first step."),
      );
      return;
    }
    chartsBox.querySelector(":scope > p")?.remove();
    for (const chart of CHARTS) {
      const has = chart.series.some((f) => cols[f].some((v) => v !== null));
      if (chart.optional && !has && !charts[chart.id]) continue;
      if (charts[chart.id]) charts[chart.id].update(cols.step, cols);
      else {
        charts[chart.id] = lineChart(chartsBox, {
          id: chart.id,
          title: chart.title,
          series: chart.series.map((key) => ({ key, label: key })),
          steps: cols.step,
          columns: cols,
        });
      }
    }
    chartsBox.dataset.maxPoints = String(MAX_POINTS);
    chartsBox.dataset.totalPoints = String(metrics.total_points);
    window.akl.job = { id: job.id, maxPoints: MAX_POINTS, totalPoints: metrics.total_points };
  }

  function drawCheckpoints(list) {
    const ids = list.map((c) => c.id).join();
    if (ids === checkpointIds) return;
    checkpointIds = ids;
    if (!list.length) {
      checkpointsBox.replaceChildren(h("p", { class: "muted" }, "No checkpoint yet."));
      return;
    }
    const rows = list.map((c) => {
      const name = c.is_final ? "final model" : `step ${c.step}`;
      return h(
        "tr",
        { dataset: { checkpoint: c.id } },
        h("td", {}, name),
        h("td", {}, when(c.created_at)),
        h(
          "td",
          {},
          h(
            "button",
            {
              type: "button",
              "aria-label": `Download ${name}`,
              onclick: () => download(c.download_url, `${job.id}-${c.step}.tar.gz`),
            },
            "Download",
          ),
        ),
      );
    });
    checkpointsBox.replaceChildren(
      table(null, ["Checkpoint", "Saved", ""], rows, { id: "checkpoints", "aria-label": "Checkpoints" }),
    );
  }

  async function events() {
    for (;;) {
      const q = new URLSearchParams({ limit: "1000" });
      if (lastEvent !== null) q.set("after", String(lastEvent));
      const page = await api.get(`/v1/jobs/${job.id}/events?${q}`);
      for (const e of page.data) {
        lastEvent = e.id;
        eventsBox.append(
          h(
            "li",
            { class: `level-${e.level}` },
            h("time", {}, when(e.created_at)),
            " ",
            h("strong", {}, e.type),
            " ",
            e.message,
          ),
        );
      }
      if (page.data.length) eventsBox.scrollTop = eventsBox.scrollHeight;
      if (!page.has_more) return;
    }
  }

  async function refresh() {
    const id = encodeURIComponent(job.id);
    const [fresh, metrics, evaluations, checkpoints] = await Promise.all([
      api.get(`/v1/jobs/${id}`),
      api.get(`/v1/jobs/${id}/metrics?max_points=${MAX_POINTS}`),
      api.get(`/v1/jobs/${id}/evaluations`),
      api.get(`/v1/jobs/${id}/checkpoints`),
      events(),
    ]);
    job = fresh;
    if (!confirming) drawHead();
    drawCharts(metrics);
    evalBox.replaceChildren(evaluationTable(evaluations.data));
    drawCheckpoints(checkpoints.data);
  }

  specBox.textContent = yaml.dump(job.spec, { sortKeys: false, lineWidth: 100 });
  drawHead();
  let stopped = false;
  let timer = null;
  async function loop() {
    try {
      const wasTerminal = TERMINAL.has(job.status);
      await refresh();
      if (stopped) return;
      ctx.clearError();
      view.dataset.loaded = "true";
      if (wasTerminal && TERMINAL.has(job.status)) return; // one read after the end, then stop
    } catch (err) {
      if (stopped) return;
      ctx.showError(err);
    }
    timer = setTimeout(loop, REFRESH_MS);
  }
  await loop();
  return () => {
    stopped = true;
    clearTimeout(timer);
    Object.values(charts).forEach((c) => c.destroy());
  };
}
