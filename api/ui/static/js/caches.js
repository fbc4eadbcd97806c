// Teacher caches, once the API has them (GET /v1/teacher_caches answers 200; the nav link is
// hidden before). Fields are shown as the API gives them.
import { api } from "./api.js";
import { h, num, table, when } from "./dom.js";

function cell(key, value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return key.endsWith("_at") ? when(value) : num(value);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

export async function render(view) {
  view.append(h("div", { class: "view-head" }, h("h1", {}, "Teacher caches")));
  const page = await api.maybe("/v1/teacher_caches");
  if (page === null) {
    view.append(h("p", { class: "muted" }, "This server does not keep teacher caches yet."));
    return;
  }
  const items = page.data || [];
  if (!items.length) {
    view.append(h("p", { class: "muted" }, "No teacher cache yet."));
    return;
  }
  const keys = [...new Set(items.flatMap((item) => Object.keys(item)))].filter((k) => k !== "object");
  const rows = items.map((item) =>
    h(
      "tr",
      {},
      keys.map((k) => h("td", {}, cell(k, item[k]))),
    ),
  );
  view.append(table(null, keys, rows, { id: "teacher-caches", "aria-label": "Teacher caches" }));
}
