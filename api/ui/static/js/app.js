// The dashboard shell: sign in, the hash router (#/jobs, #/jobs/ID, #/compare/ID,ID, #/submit,
// #/caches) and the one place errors are shown. Views are modules with
// render(view, params, ctx) -> cleanup.
import { api, ApiError, session } from "./api.js";
import { h } from "./dom.js";
import * as caches from "./caches.js";
import * as compare from "./compare.js";
import * as job from "./job.js";
import * as jobs from "./jobs.js";
import * as submit from "./submit.js";

const $ = (id) => document.getElementById(id);
let cleanup = () => {};
let cachesAvailable = false;
let routes = 0;

function showError(err) {
  if (err instanceof ApiError && err.status === 401) {
    session.signOut();
    route();
  }
  const alert = $("alert");
  alert.textContent = err instanceof Error ? err.message : String(err);
  alert.hidden = false;
}

function clearError() {
  $("alert").hidden = true;
  $("alert").textContent = "";
}

const ctx = { showError, clearError, navigate: (hash) => (location.hash = hash) };

function parse() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [view = "jobs", ...rest] = path.split("/").filter(Boolean);
  return { view, arg: rest.map(decodeURIComponent).join("/"), query: new URLSearchParams(query) };
}

function signInForm(message) {
  const key = h("input", {
    id: "api-key",
    type: "password",
    autocomplete: "off",
    required: true,
    spellcheck: false,
    placeholder: "akl-…",
  });
  const error = h("p", { class: "form-error", role: "alert" }, message || "");
  const form = h(
    "form",
    { class: "card sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title", tabindex: -1 }, "Sign in"),
    h(
      "p",
      {},
      "Use an API key (",
      h("code", {}, "akl keys create --tenant NAME"),
      "). It is kept in this tab only.",
    ),
    h("label", { for: "api-key" }, "API key"),
    key,
    h("button", { type: "submit" }, "Sign in"),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    session.signIn(key.value.trim());
    try {
      await api.get("/v1/jobs?limit=1");
    } catch (err) {
      session.signOut();
      error.textContent = err.message;
      key.focus();
      return;
    }
    key.value = "";
    probeCaches();
    if (!location.hash || location.hash === "#/sign-in") location.hash = "#/jobs";
    route();
  });
  return [form, key];
}

async function probeCaches() {
  // Teacher caches are listed once the API has them: the route answers 200 (404 before).
  try {
    cachesAvailable = (await api.maybe("/v1/teacher_caches")) !== null;
  } catch {
    cachesAvailable = false;
  }
  $("nav-caches").hidden = !cachesAvailable;
}

async function route() {
  cleanup();
  cleanup = () => {};
  clearError();
  const view = $("view");
  view.replaceChildren();
  if (!session.key()) {
    $("nav").hidden = true;
    const [form, key] = signInForm();
    view.append(form);
    key.focus();
    return;
  }
  $("nav").hidden = false;
  const { view: name, arg, query } = parse();
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const views = { jobs, job, compare, submit, caches };
  const target = name === "jobs" && arg ? "job" : name;
  const module = views[target] || jobs;
  // Each route renders into its own box: a slow render that a newer route overtook lands in a
  // detached box and is cleaned up at once (its polling stops).
  const token = ++routes;
  const page = h("div");
  view.replaceChildren(page);
  try {
    const done = (await module.render(page, { arg, query, cachesAvailable }, ctx)) || (() => {});
    if (token !== routes) return done();
    cleanup = done;
  } catch (err) {
    if (token === routes) showError(err);
    return;
  }
  // Keyboard and screen-reader users land on the new page's heading, not on the old link; a
  // view that re-rendered itself (the status filter) asks to keep its control focused instead.
  const keep = ctx.focusAfter && view.querySelector(ctx.focusAfter);
  ctx.focusAfter = null;
  const heading = view.querySelector("h1");
  if (keep) keep.focus();
  else if (heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

// The skip link moves focus; following its href would change the route (#main is not a view).
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  $("main").focus();
});

$("sign-out").addEventListener("click", () => {
  session.signOut();
  location.hash = "#/jobs";
  route();
});
window.addEventListener("hashchange", route);
if (session.key()) probeCaches();
route();
