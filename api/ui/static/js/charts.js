// Line charts over steps with uPlot (vendor/uplot). Hovering shows every series' value at that
// step in the legend. What each chart plots is kept on window.akl.charts[id] (steps and one
// array per series, exactly the arrays handed to uPlot) so that a test can compare it with the API.
import uPlot from "../vendor/uplot/uPlot.esm.js";
import { h, num } from "./dom.js";

// Eight colours that stay apart for colour-blind readers (Okabe-Ito, plus a grey).
export const PALETTE = [
  "#0072B2",
  "#D55E00",
  "#009E73",
  "#CC79A7",
  "#E69F00",
  "#56B4E9",
  "#000000",
  "#999999",
];

window.akl = window.akl || { charts: {} };

// Steps are whole numbers: ticks at 1, 2, 5, 10, 20, 50, ... never at 1.2.
const STEP_INCREMENTS = [1, 2, 5]
  .flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((p) => m * p))
  .sort((a, b) => a - b);

function axisValues(_u, values) {
  return values.map((v) => (v === null ? "" : num(v, 3)));
}

// The legend shows the values under the cursor; with no cursor on the chart (idx null), the
// latest recorded ones rather than dashes.
function shown(u, v, sidx, idx) {
  if (idx !== null && idx !== undefined) return v;
  const column = u.data[sidx] || [];
  for (let i = column.length - 1; i >= 0; i--)
    if (column[i] !== null && column[i] !== undefined) return column[i];
  return null;
}

function options(chart, width) {
  return {
    width,
    height: chart.height || 220,
    scales: { x: { time: false } },
    legend: { live: true },
    cursor: { focus: { prox: 16 } },
    series: [
      { label: "step", value: (u, v, sidx, idx) => num(shown(u, v, sidx, idx)) },
      ...chart.series.map((s, i) => ({
        label: s.label,
        stroke: s.color || PALETTE[i % PALETTE.length],
        width: 1.5,
        spanGaps: true,
        points: { show: false },
        value: (u, v, sidx, idx) => num(shown(u, v, sidx, idx)),
      })),
    ],
    axes: [
      { label: "step", size: 40, incrs: STEP_INCREMENTS },
      { values: axisValues, size: 64 },
    ],
  };
}

/** A chart in `parent`: {id, title, series: [{key, label, color?}], steps: [..], columns: {key: [..]}}.
 * Returns {update(steps, columns), destroy()}. */
export function lineChart(parent, chart) {
  const figure = h("figure", { class: "chart", id: `chart-${chart.id}`, dataset: { chart: chart.id } });
  const plot = h("div", { class: "chart-plot", role: "img" });
  figure.append(h("figcaption", {}, chart.title), plot);
  parent.append(figure);
  const width = () => Math.max(240, plot.clientWidth || parent.clientWidth || 600);
  let data = null;
  const state = { steps: [], series: {} };

  function set(steps, columns) {
    data = [steps, ...chart.series.map((s) => columns[s.key] || steps.map(() => null))];
    state.steps = steps;
    state.series = Object.fromEntries(chart.series.map((s, i) => [s.key, data[i + 1]]));
    window.akl.charts[chart.id] = state;
    figure.dataset.points = String(steps.length);
    const last = chart.series.map((s, i) => `${s.label} ${num(data[i + 1][steps.length - 1])}`).join(", ");
    plot.setAttribute("aria-label", `${chart.title}: ${steps.length} points; at the last step ${last}`);
  }

  set(chart.steps, chart.columns);
  const u = new uPlot(options(chart, width()), data, plot);
  const resize = new ResizeObserver(() => u.setSize({ width: width(), height: chart.height || 220 }));
  resize.observe(plot);
  return {
    update(steps, columns) {
      set(steps, columns);
      u.setData(data);
    },
    destroy() {
      resize.disconnect();
      u.destroy();
      delete window.akl.charts[chart.id];
      figure.remove();
    },
  };
}

/** Align several [steps, values] tables on the union of their steps (nulls where a job has none). */
export function align(tables) {
  if (!tables.length) return [[]];
  const joined = uPlot.join(tables.map((t) => [t[0], t[1]]));
  return joined.map((col) => Array.from(col, (v) => (v === undefined ? null : v)));
}
