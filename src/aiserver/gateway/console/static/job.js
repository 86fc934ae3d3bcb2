// One job: its events as a timeline, its error, inputs beside outputs, and "run again".
import { blobUrl, follow, getJson, postJson } from "./api.js";
import {
  FINAL, bytes, duration, el, jobLabel, progressBar, short, stateLabel, toast,
} from "./ui.js";

const THUMB = "width=256";

function errorBox(error) {
  if (!error || !error.code) return null;
  const info = (error.details || []).find((d) => (d["@type"] || "").endsWith("ErrorInfo")) || {};
  const meta = info.metadata || {};
  return el("section", { class: "card failure", role: "alert", "aria-label": "Error" },
    el("h2", { text: "Error" }),
    el("p", { class: "reason", text: info.reason || `code ${error.code}` }),
    el("p", { class: "message", text: error.message || "" }),
    Object.keys(meta).length
      ? el("dl", { class: "meta" }, Object.entries(meta).map(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]))
      : null);
}

function artifactPath(url) {
  return new URL(url, location.href).pathname.replace(/^\/artifacts\//, "");
}

function variantUrl(url, spec) {
  const u = new URL(url, location.href);
  return `/variants/${spec}/${artifactPath(url)}${u.search}`;
}

// Loads an image through the key and sets it on <img> (artifacts are private to their key).
function authImage(url, alt, signal) {
  const img = el("img", { alt, loading: "lazy" });
  blobUrl(url, signal).then((src) => { img.src = src; }).catch(() => { img.alt = `${alt} (unavailable)`; });
  return img;
}

async function download(url, fileName) {
  const u = new URL(url, location.href);
  u.searchParams.set("download", "true");
  const href = await blobUrl(u.toString());
  const a = el("a", { href, download: fileName || "" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10000);
}

export function outputsView(job, signal) {
  const outputs = job.outputs || [];
  const texts = job.textOutputs || [];
  return el("section", { class: "card outputs", "aria-label": "Outputs" },
    el("h2", { text: "Outputs" }),
    !outputs.length && !texts.length ? el("p", { class: "empty", text: "None yet." }) : null,
    outputs.map((a) => el("figure", { class: "output" },
      authImage(variantUrl(a.url, THUMB), `variant ${THUMB} of ${a.fileName}`, signal),
      el("figcaption", {},
        el("strong", { text: a.fileName }),
        el("span", { text: ` ${a.width}x${a.height} · ${bytes(a.sizeBytes)} · ${a.mimeType}` }),
        a.seed !== undefined ? el("span", { text: ` · seed ${a.seed}` }) : null,
        el("span", { class: "links" },
          el("button", { type: "button", class: "secondary small", text: "Download",
            "aria-label": `Download ${a.fileName}`, onclick: () => download(a.url, a.fileName) }),
          ["width=128", "width=512"].map((spec) => el("button", {
            type: "button", class: "secondary small", text: spec,
            "aria-label": `Download the ${spec} variant of ${a.fileName}`,
            onclick: () => download(variantUrl(a.url, spec), `${spec}-${a.fileName}`),
          })))))),
    texts.map((t) => el("blockquote", { class: "text-output", text: t.text })));
}

function inputsView(job) {
  const inputs = job.inputs || [];
  const params = job.workflow?.parameters || job.imageToImage || job.imageWithMask || job.imageUpscale
    || job.imageToText || {};
  return el("section", { class: "card inputs", "aria-label": "Inputs" },
    el("h2", { text: "Inputs" }),
    el("ul", {}, inputs.map((f) => el("li", {},
      el("strong", { text: f.field }), ` ${f.fileName || ""} ${f.width || "?"}x${f.height || "?"} · ${bytes(f.sizeBytes)}`))),
    Object.keys(params).length
      ? el("pre", { class: "params", text: JSON.stringify(params, null, 2) })
      : el("p", { class: "muted", text: "Default parameters." }));
}

function summary(job) {
  const rows = [
    ["State", stateLabel(job.state)], ["Task", jobLabel(job)],
    // A workflow job keeps the version it was accepted with, whatever the folder says now.
    job.workflow ? ["Version", job.workflow.version || ""] : null, ["Owner", job.owner || "-"],
    ["Ref id", job.refId], ["Tag", job.tag || ""], ["Agent", job.agent || job.provider || ""],
    ["Attempts", job.attempts || 0], ["Created", job.createTime ? new Date(job.createTime).toLocaleString() : ""], ["Duration", duration(job)],
  ];
  return el("dl", { class: "summary" }, rows.filter(Boolean).map(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
}

function timelineItem(name, event) {
  let text = name;
  const p = event.progress;
  if (name === "accepted") text = `accepted (queue position ${event.accepted.queuePosition || 0})`;
  else if (p) {
    text = `${(p.stage || "").replace(/^STAGE_/, "").toLowerCase()} ${Math.round((p.fraction || 0) * 100)}%`;
    if (p.node) text += ` · ${p.nodeType || "node"} ${p.node}`;
    if (p.maxSteps) text += ` step ${p.step || 0}/${p.maxSteps}`;
  } else if (name === "output") text = `output ${event.output.artifact.fileName}`;
  else if (name === "text_output") text = "text output";
  else if (name === "retrying") text = `retrying after attempt ${event.retrying.attempt}: ${event.retrying.reason}`;
  else if (name === "finished") text = `finished: ${stateLabel(event.finished.job.state)}`;
  const when = event.time ? new Date(event.time).toLocaleTimeString() : "";
  return el("li", { "data-kind": name }, el("time", { text: when }), " ", text);
}

export async function jobPage(main, id, signal) {
  let job = (await getJson(`/v1/jobs/${encodeURIComponent(id)}`, signal)).job;
  const title = el("h1", {}, `${jobLabel(job)} `, el("span", { class: "mono", text: short(job.name) }));
  const state = el("span", { id: "job-state", class: `state ${stateLabel(job.state)}`, text: stateLabel(job.state) });
  const bar = el("div", { id: "job-progress" });
  const where = el("p", { class: "where" });
  const timeline = el("ol", { class: "timeline", "aria-label": "Events" });
  const details = el("div", { class: "details" });
  const actions = el("div", { class: "actions" });
  const render = () => {
    state.className = `state ${stateLabel(job.state)}`;
    state.textContent = stateLabel(job.state);
    bar.replaceChildren(FINAL.has(job.state) ? "" : progressBar(job.progress, "job progress"));
    details.replaceChildren(summary(job), errorBox(job.error) || "",
      el("div", { class: "side" }, inputsView(job), outputsView(job, signal)));
    actions.replaceChildren(
      FINAL.has(job.state) ? "" : el("button", { type: "button", id: "cancel", text: "Cancel",
        onclick: async () => {
          try { job = (await postJson(`/v1/jobs/${encodeURIComponent(id)}:cancel`, {})).job; render(); }
          catch (err) { toast(`Cancel failed: ${err.message}`); }
        } }),
      job.task ? el("a", { class: "button", id: "run-again", href: `#/run/${encodeURIComponent(jobLabel(job))}?from=${encodeURIComponent(id)}`, text: "Run again" }) : "");
  };
  render();
  main.append(title, el("p", {}, state), bar, where, actions, details,
    el("section", { class: "card" }, el("h2", { text: "Timeline" }), timeline));
  await follow(`/v1/jobs/${encodeURIComponent(id)}:watch`, (name, event) => {
    // Consecutive progress collapses into its latest: the timeline stays readable.
    const item = timelineItem(name, event);
    const last = timeline.lastElementChild;
    if (name === "progress" && last?.dataset.kind === "progress") last.replaceWith(item);
    else timeline.append(item);
    if (name === "progress") {
      const p = event.progress;
      job = { ...job, progress: p.fraction || 0,
        state: p.stage === "STAGE_QUEUED" ? "STATE_QUEUED" : "STATE_RUNNING" };
      bar.replaceChildren(progressBar(job.progress, "job progress"));
      where.textContent = p.node ? `${p.nodeType || "node"} ${p.node}${p.maxSteps ? ` step ${p.step || 0}/${p.maxSteps}` : ""}` : "";
      state.className = `state ${stateLabel(job.state)}`;
      state.textContent = stateLabel(job.state);
    } else if (name === "finished") {
      job = event.finished.job;
      where.textContent = "";
      render();
    }
  }, signal);
}
