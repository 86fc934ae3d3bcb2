// Run: one form per multipart operation of /openapi.json (every task, and every workflow
// the API publishes), built from its request schema; progress follows the job's events.
import { follow, getJson, postForm } from "./api.js";
import { outputsView } from "./job.js";
import { openapi } from "./openapi.js";
import { FINAL, el, progressBar, short, stateLabel, toast } from "./ui.js";

// How the answer comes back is the console's business: it always queues, then watches.
const HIDDEN = new Set(["Sync", "Mode", "Delivery"]);

// [{key, path, summary, schema, workflow}] of POST operations that take multipart forms, read
// afresh on each visit: a workflow added to the server's folder appears without a restart.
async function loadOperations(signal) {
  const doc = await openapi(signal, { fresh: true });
  const ops = [];
  for (const [path, item] of Object.entries(doc.paths || {})) {
    const form = item.post?.requestBody?.content?.["multipart/form-data"]?.schema;
    if (!form || /\/Queue[A-Z]/.test(path) || path.startsWith("/json/")) continue;
    const schema = form.$ref ? resolve(doc, form.$ref) : form;
    // A free-form object (RunWorkflow's parameters) cannot come from form fields: each
    // workflow has its own typed operation instead.
    if (Object.values(schema.properties || {}).some((p) => p.type === "object")) continue;
    ops.push({ key: path.split("/").pop(), path, id: item.post.operationId || "", summary: item.post.summary || "",
      schema, workflow: path.startsWith("/api/workflows/") });
  }
  // A gRPC method reachable both as AI Server's /api/{Task} and as its /v1 route: one form.
  const named = ops.filter((o) => o.path.startsWith("/api/")).map((o) => o.summary).join(" ");
  return ops.filter((o) => o.path.startsWith("/api/") || !o.id.includes("_")
    || !named.includes(`.${o.id.replace("_", ".")})`));
}

function resolve(doc, ref) {
  return ref.replace(/^#\//, "").split("/").reduce((node, part) => node?.[part], doc) || {};
}

function dropZone(name, required) {
  const input = el("input", { type: "file", id: `f-${name}`, name, accept: "image/*", required });
  const preview = el("img", { alt: "", class: "preview", hidden: true });
  const label = el("span", { class: "drop-label", text: `Drop the ${name} here, or choose a file` });
  const zone = el("div", { class: "drop", "data-field": name }, label, input, preview);
  const show = () => {
    const file = input.files[0];
    if (!file) return;
    label.textContent = `${name}: ${file.name} (${Math.round(file.size / 1024)} KiB)`;
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
  };
  input.addEventListener("change", show);
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    if (ev.dataTransfer.files.length) {
      input.files = ev.dataTransfer.files;
      show();
    }
  });
  return el("div", { class: "field" }, el("label", { for: `f-${name}`, text: name + (required ? " *" : "") }), zone);
}

function input(name, prop, value, required) {
  const id = `f-${name}`;
  // An exclusive zero minimum arrives as the smallest float: say what it means.
  const low = prop.minimum > 0 && prop.minimum < 1e-6 ? "more than 0" : `min ${prop.minimum}`;
  const hint = [prop.minimum !== undefined ? low : "", prop.maximum !== undefined ? `max ${prop.maximum}` : "",
    prop.default !== undefined ? `default ${prop.default}` : ""].filter(Boolean).join(", ");
  const initial = value ?? prop.default;
  let control;
  if (prop.enum) {
    control = el("select", { id, name },
      el("option", { value: "", text: "(default)" }),
      prop.enum.map((v) => el("option", { value: v, selected: String(initial) === String(v), text: v })));
  } else if (prop.type === "boolean") {
    control = el("input", { id, name, type: "checkbox", checked: initial === true || initial === "true" });
  } else if (prop.type === "integer" || prop.type === "number" || /^u?int/.test(prop.format || "")) {
    control = el("input", { id, name, type: "number", inputmode: "decimal",
      step: prop.type === "number" && !/int/.test(prop.format || "") ? "any" : "1",
      min: prop.minimum, max: prop.maximum, value: initial });
  } else if (/prompt/i.test(name)) {
    control = el("textarea", { id, name, rows: "3", required });
    if (initial !== undefined) control.value = initial;
  } else {
    control = el("input", { id, name, value: initial, maxlength: prop.maxLength, required });
  }
  return el("div", { class: "field" }, el("label", { for: id, text: name + (required ? " *" : "") }), control,
    hint || prop.description ? el("small", { text: [hint, prop.description].filter(Boolean).join(" · ") }) : null);
}

// The parameters of an earlier job, flattened to the form's PascalCase names ("run again").
async function earlierValues(jobId, signal) {
  const { job } = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`, signal);
  // A workflow's parameters are named as its form names them; its options are the job's.
  if (job.workflow) return { ...(job.workflow.parameters || {}), ...(job.tag ? { Tag: job.tag } : {}) };
  const params = job.imageToImage || job.imageWithMask || job.imageUpscale || job.imageToText || {};
  const values = {};
  const put = (k, v) => { values[k[0].toUpperCase() + k.slice(1)] = v; };
  for (const [k, v] of Object.entries(params)) {
    if (v && typeof v === "object" && !Array.isArray(v)) for (const [ik, iv] of Object.entries(v)) put(ik, iv);
    else put(k, v);
  }
  delete values.RefId; // a new job, not the same one again
  return values;
}

export async function runPage(main, key, params, signal) {
  const ops = await loadOperations(signal);
  const nav = el("nav", { class: "tabs", "aria-label": "Tasks" },
    ops.map((op) => el("a", { href: `#/run/${op.key}`, "aria-current": op.key === key ? "page" : null, text: op.key,
      class: op.workflow ? "workflow" : null, title: op.workflow ? `workflow: ${op.summary}` : null })));
  main.append(el("h1", { text: "Run" }), nav);
  const op = ops.find((o) => o.key === key);
  if (!op) {
    main.append(el("p", { text: "Choose a task or a workflow." }));
    return;
  }
  const values = params.get("from") ? await earlierValues(params.get("from"), signal) : {};
  const props = op.schema.properties || {};
  const required = new Set(op.schema.required || []);
  const files = Object.entries(props).filter(([, p]) => p.format === "binary");
  const fields = Object.entries(props).filter(([n, p]) => p.format !== "binary" && !HIDDEN.has(n));
  const result = el("section", { class: "result", "aria-live": "polite" });
  const form = el("form", { class: "card run", id: "run-form" },
    el("p", { class: "muted", text: op.summary }),
    params.get("from") ? el("p", { class: "muted", text: `Parameters of job ${params.get("from")}; choose the image again.` }) : null,
    files.map(([name]) => dropZone(name, required.has(name))),
    el("div", { class: "grid" }, fields.map(([name, prop]) => input(name, prop, values[name], required.has(name)))),
    el("div", { class: "actions" }, el("button", { type: "submit", id: "run-submit", text: `Run ${op.key}` })));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const data = new FormData();
    for (const [name, prop] of fields) {
      const control = form.elements[name];
      if (prop.type === "boolean") {
        if (control.checked) data.append(name, "true");
        else if (prop.default === true) data.append(name, "false"); // unset would mean true
      } else if (control.value !== "") data.append(name, control.value);
    }
    for (const [name] of files) {
      const file = form.elements[name].files[0];
      if (file) data.append(name, file, file.name);
    }
    const button = form.querySelector("#run-submit");
    button.disabled = true;
    result.replaceChildren(el("p", { text: "Sending…" }));
    try {
      const answer = await postForm(op.path, data);
      if (answer instanceof Blob) {
        result.replaceChildren(el("figure", { class: "output" },
          el("img", { src: URL.createObjectURL(answer), alt: `result of ${op.key}` }),
          el("figcaption", { text: `${answer.type} · ${answer.size} bytes` })));
      } else if (answer && answer.jobId) {
        await followJob(answer.jobId, result, signal);
      } else {
        result.replaceChildren(el("pre", { text: JSON.stringify(answer, null, 2) }));
      }
    } catch (err) {
      if (!signal.aborted) result.replaceChildren(el("p", { class: "error", role: "alert", text: `${err.code ? `${err.code}: ` : ""}${err.message}` }));
    } finally {
      button.disabled = false;
    }
  });
  main.append(form, result);
}

async function followJob(jobId, result, signal) {
  const link = el("a", { href: `#/jobs/${encodeURIComponent(jobId)}`, text: `job ${jobId}` });
  const state = el("span", { id: "run-state", class: "state queued", text: "queued" });
  const bar = el("div", { id: "run-progress" }, progressBar(0, "run progress"));
  const where = el("p", { class: "where" });
  result.replaceChildren(el("p", {}, link, " ", state), bar, where);
  await follow(`/v1/jobs/${encodeURIComponent(jobId)}:watch`, (name, event) => {
    if (name === "progress") {
      const p = event.progress;
      const s = p.stage === "STAGE_QUEUED" ? "queued" : "running";
      state.textContent = s;
      state.className = `state ${s}`;
      bar.replaceChildren(progressBar(p.fraction, "run progress"));
      where.textContent = p.node ? `${p.nodeType || "node"} ${p.node}${p.maxSteps ? ` step ${p.step || 0}/${p.maxSteps}` : ""}` : "";
    } else if (name === "finished") {
      const job = event.finished.job;
      state.textContent = stateLabel(job.state);
      state.className = `state ${stateLabel(job.state)}`;
      if (job.state === "STATE_SUCCEEDED") bar.replaceChildren(progressBar(1, "run progress"));
      where.textContent = job.error?.message || "";
      result.append(outputsView(job, signal));
      if (FINAL.has(job.state) && job.state !== "STATE_SUCCEEDED") toast(`${short(job.name)} ${stateLabel(job.state)}`);
    }
  }, signal);
}
