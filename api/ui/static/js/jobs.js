// The jobs list: status filter, progress, ETA, latest loss; refreshes every few seconds. Ticking
// two to eight rows opens them side by side (compare.js).
import { api } from "./api.js";
import {
  eta,
  duration,
  h,
  lossName,
  num,
  progressBar,
  STATUSES,
  statusBadge,
  studentName,
  table,
  when,
} from "./dom.js";

const REFRESH_MS = 3000;
const PAGE = 50;

export function render(view, { query }, ctx) {
  const status = query.get("status") || "";
  const after = query.get("after") || "";
  const selected = new Set();
  const filter = h(
    "select",
    { id: "status-filter" },
    h("option", { value: "" }, "all"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)),
  );
  filter.addEventListener("change", () => {
    ctx.focusAfter = "#status-filter";
    ctx.navigate(filter.value ? `#/jobs?status=${filter.value}` : "#/jobs");
  });
  const compareButton = h("button", { type: "button", disabled: true }, "Compare selected (0)");
  compareButton.addEventListener("click", () => ctx.navigate(`#/compare/${[...selected].join(",")}`));
  const body = h("tbody");
  const more = h("p", { class: "pager" });
  const updated = h("span", { class: "muted", "aria-live": "off" });
  view.append(
    h("div", { class: "view-head" }, h("h1", {}, "Jobs"), updated),
    h(
      "div",
      { class: "toolbar" },
      h("label", { for: "status-filter" }, "Status"),
      filter,
      compareButton,
      h("a", { class: "button", href: "#/submit" }, "New job"),
    ),
  );
  const headers = [
    "",
    "Job",
    "Status",
    "Progress",
    "Step",
    "ETA",
    "Loss",
    "Teacher → student",
    "Loss fn",
    "Created",
  ];
  const wrap = table(null, [], [], { id: "jobs-table", "aria-label": "Jobs" });
  const tableEl = wrap.querySelector("table");
  tableEl
    .querySelector("thead tr")
    .replaceChildren(
      ...headers.map((x, i) =>
        h("th", { scope: "col" }, i === 0 ? h("span", { class: "sr-only" }, "Select") : x),
      ),
    );
  tableEl.querySelector("tbody").replaceWith(body);
  view.append(wrap, more);

  function syncCompare() {
    compareButton.textContent = `Compare selected (${selected.size})`;
    compareButton.disabled = selected.size < 2 || selected.size > 8;
    compareButton.title = selected.size > 8 ? "at most 8 jobs" : "";
  }

  function row(job) {
    const box = h("input", {
      type: "checkbox",
      checked: selected.has(job.id),
      "aria-label": `select ${job.id} for comparison`,
    });
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.id);
      else selected.delete(job.id);
      syncCompare();
    });
    const loss = job.metrics ? job.metrics.loss : null;
    return h(
      "tr",
      { dataset: { job: job.id, status: job.status } },
      h("td", {}, box),
      h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, progressBar(job)),
      h("td", { class: "num" }, `${job.current_step}/${job.total_steps ?? "?"}`),
      h("td", { class: "num" }, duration(eta(job))),
      h("td", { class: "num" }, num(loss)),
      h("td", {}, `${job.teacher} → ${studentName(job.spec)}`),
      h("td", {}, lossName(job.spec)),
      h("td", {}, when(job.created_at)),
    );
  }

  let timer = null;
  let stopped = false;
  async function refresh() {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (status) params.set("status", status);
    if (after) params.set("after", after);
    try {
      const page = await api.get(`/v1/jobs?${params}`);
      if (stopped) return;
      ctx.clearError();
      // Rows are rebuilt; a keyboard user's focus goes back to the same control of the same job.
      const focused = document.activeElement;
      const focusJob = body.contains(focused) ? focused.closest("tr").dataset.job : null;
      const focusTag = focused && focused.tagName === "INPUT" ? "input" : "a";
      body.replaceChildren(
        ...(page.data.length
          ? page.data.map(row)
          : [h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "No jobs yet."))]),
      );
      if (focusJob) {
        const again = body.querySelector(`tr[data-job="${CSS.escape(focusJob)}"] ${focusTag}`);
        if (again) again.focus();
      }
      more.replaceChildren();
      if (page.has_more) {
        const next = new URLSearchParams({ after: page.last_id });
        if (status) next.set("status", status);
        more.append(h("a", { href: `#/jobs?${next}` }, "Older jobs →"));
      }
      updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (!stopped) ctx.showError(err);
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
