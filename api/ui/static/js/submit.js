// Submit a job: upload a JSONL file (its id goes into the spec), write or paste the spec as
// YAML, check it against the spec's JSON schema (GET /v1/spec/schema) while typing, submit.
import { Validator } from "../vendor/json-schema/index.js";
import yaml from "../vendor/js-yaml/js-yaml.mjs";
import { api } from "./api.js";
import { h } from "./dom.js";

const DRAFT = "akl.draft";

// The tiny preset: runs in seconds on a CPU (examples/tiny.yaml, with the demo data).
export const TEMPLATE = `teacher: preset:tiny
student:
  init: truncate
  num_layers: 2
data:
  train: demo:train
  validation: demo:validation
  max_train_examples: 64
  max_validation_examples: 8
loss:
  name: akl
  kd_ratio: 0.5
training:
  max_steps: 20
  batch_size: 4
  learning_rate: 1.0e-3
  max_length: 128
  max_prompt_length: 96
evaluation:
  num_examples: 4
  seeds: [10, 20]
  max_new_tokens: 16
checkpointing:
  every_steps: 10
resources:
  device: cpu
`;

// The validator's leaf errors, as "path: message". Wrapper keywords only say "a child failed".
const WRAPPERS = new Set(["properties", "$ref", "allOf", "items", "additionalProperties", "prefixItems"]);

export function schemaErrors(validator, spec) {
  const { errors } = validator.validate(spec);
  const messages = errors
    .filter((e) => !WRAPPERS.has(e.keyword))
    .map((e) => {
      const path = e.instanceLocation.replace(/^#\/?/, "").replaceAll("/", ".") || "spec";
      const message = e.keyword === "false" ? "unknown field" : e.error;
      return `${path}: ${message}`;
    });
  return [...new Set(messages)];
}

/** The spec parsed from YAML and its problems (YAML syntax, then the schema). */
export function check(text, validator) {
  let spec;
  try {
    spec = yaml.load(text);
  } catch (err) {
    return { spec: null, errors: [`YAML: ${err.message}`] };
  }
  if (spec === null || typeof spec !== "object" || Array.isArray(spec)) {
    return { spec: null, errors: ["the spec must be a YAML mapping (teacher:, student:, data:, ...)"] };
  }
  return { spec, errors: validator ? schemaErrors(validator, spec) : [] };
}

export async function render(view, _params, ctx) {
  const schema = await api.get("/v1/spec/schema");
  const validator = new Validator(schema, "2020-12", false);
  let idempotencyKey = crypto.randomUUID(); // one per draft: a double click submits one job

  const file = h("input", {
    id: "upload-file",
    type: "file",
    accept: ".jsonl,application/jsonl,application/x-ndjson",
  });
  const purpose = h(
    "select",
    { id: "upload-purpose" },
    h("option", { value: "train" }, "train"),
    h("option", { value: "validation" }, "validation"),
  );
  const uploadButton = h("button", { type: "submit" }, "Upload");
  const uploaded = h("p", { class: "muted", role: "status", id: "upload-result" });
  const upload = h(
    "form",
    { class: "card", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "1. Data (optional)"),
    h("p", {}, "Upload a JSONL file (Dolly, prompt/response or chat messages); its id goes into the spec."),
    h(
      "div",
      { class: "fields" },
      h("label", { for: "upload-file" }, "JSONL file"),
      file,
      h("label", { for: "upload-purpose" }, "Use as"),
      purpose,
    ),
    h("div", { class: "toolbar" }, uploadButton),
    uploaded,
  );

  const editor = h("textarea", {
    id: "spec-yaml",
    rows: 24,
    spellcheck: false,
    autocomplete: "off",
    "aria-describedby": "spec-check",
  });
  editor.value = sessionStorage.getItem(DRAFT) || TEMPLATE;
  const problems = h("div", { id: "spec-check", role: "status", "aria-live": "polite" });
  const submitButton = h("button", { type: "submit", id: "submit-job" }, "Submit job");
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "spec-title", novalidate: true },
    h("h2", { id: "spec-title" }, "2. Spec (YAML)"),
    h("p", {}, "Checked against the spec's JSON schema as you type; the server checks it again."),
    h("label", { for: "spec-yaml" }, "Job spec"),
    editor,
    problems,
    h(
      "div",
      { class: "toolbar" },
      submitButton,
      h("button", { type: "button", class: "secondary", onclick: reset }, "Start from the template"),
    ),
  );
  view.append(h("div", { class: "view-head" }, h("h1", {}, "Submit a job")), upload, form);

  function showCheck() {
    const { errors } = check(editor.value, validator);
    problems.replaceChildren(
      errors.length
        ? h(
            "ul",
            { class: "problems" },
            errors.map((e) => h("li", {}, e)),
          )
        : h("p", { class: "ok" }, "The spec matches the schema."),
    );
    problems.dataset.valid = String(!errors.length);
    return errors;
  }

  function reset() {
    editor.value = TEMPLATE;
    sessionStorage.removeItem(DRAFT);
    showCheck();
  }

  let pending = null;
  editor.addEventListener("input", () => {
    sessionStorage.setItem(DRAFT, editor.value);
    idempotencyKey = crypto.randomUUID();
    clearTimeout(pending);
    pending = setTimeout(showCheck, 250);
  });
  showCheck();

  upload.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files.length) {
      ctx.showError(new Error("choose a JSONL file to upload"));
      return;
    }
    const body = new FormData();
    body.append("file", file.files[0]);
    body.append("purpose", purpose.value);
    uploadButton.disabled = true;
    try {
      const result = await api.upload("/v1/files", body);
      ctx.clearError();
      const { spec } = check(editor.value, null);
      if (spec) {
        spec.data = { ...(spec.data || {}), [purpose.value]: result.id };
        editor.value = yaml.dump(spec, { sortKeys: false, lineWidth: 100 });
        sessionStorage.setItem(DRAFT, editor.value);
        showCheck();
      }
      uploaded.textContent = `Uploaded ${result.filename} as ${result.id} (${result.num_examples ?? "?"} examples)${spec ? `: data.${purpose.value} set` : ""}.`;
      uploaded.dataset.fileId = result.id;
    } catch (err) {
      ctx.showError(err);
    } finally {
      uploadButton.disabled = false;
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const errors = showCheck();
    if (errors.length) {
      editor.focus();
      return;
    }
    submitButton.disabled = true;
    try {
      const job = await api.post("/v1/jobs", check(editor.value, null).spec, {
        "Idempotency-Key": idempotencyKey,
      });
      sessionStorage.removeItem(DRAFT);
      ctx.navigate(`#/jobs/${job.id}`);
    } catch (err) {
      ctx.showError(err);
    } finally {
      submitButton.disabled = false;
    }
  });
}
