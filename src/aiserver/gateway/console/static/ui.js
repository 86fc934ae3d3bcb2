// Small DOM helpers: every node is built with textContent, never from HTML strings.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function toast(message) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => box.classList.remove("show"), 5000);
}

export const short = (name) => (name || "").replace(/^jobs\//, "");

const TASKS = {
  TASK_IMAGE_TO_IMAGE: "ImageToImage",
  TASK_IMAGE_WITH_MASK: "ImageWithMask",
  TASK_IMAGE_UPSCALE: "ImageUpscale",
  TASK_IMAGE_TO_TEXT: "ImageToText",
  TASK_WORKFLOW: "Workflow",
};
export const taskLabel = (task) => TASKS[task] || (task || "").replace(/^TASK_/, "").toLowerCase();

// What a job runs: its task, or the workflow's name for a workflow job.
export const jobLabel = (job) => (job.workflow?.workflow || "").replace(/^workflows\//, "") || taskLabel(job.task);
export const TASK_VALUES = Object.keys(TASKS);

export const stateLabel = (state) => (state || "").replace(/^STATE_/, "").toLowerCase();

export function bytes(n) {
  const v = Number(n || 0);
  if (v < 1024) return `${v} B`;
  if (v < 1024 * 1024) return `${(v / 1024).toFixed(1)} KiB`;
  return `${(v / 1024 / 1024).toFixed(1)} MiB`;
}

export function seconds(ms) {
  if (!Number.isFinite(ms) || ms < 0) return "";
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

export const age = (time) => (time ? seconds(Date.now() - Date.parse(time)) : "");

export function duration(job) {
  if (!job.startTime) return "";
  const end = job.endTime ? Date.parse(job.endTime) : Date.now();
  return seconds(end - Date.parse(job.startTime));
}

export function progressBar(fraction, label) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  const bar = el("progress", { max: "100", value: String(pct), "aria-label": label || "progress" });
  return el("span", { class: "progress" }, bar, el("span", { class: "pct", text: `${pct}%` }));
}

export const FINAL = new Set(["STATE_SUCCEEDED", "STATE_FAILED", "STATE_CANCELLED"]);
