// Jobs: a filtered, paged list kept live by WatchJobs (GET /v1/jobs:watch, SSE).
import { session } from "./session.js";
import { follow, getJson, postJson } from "./api.js";
import { openapi, queryEnum } from "./openapi.js";
import {
  FINAL, TASK_VALUES, age, duration, el, jobLabel, progressBar, short, stateLabel, taskLabel, toast,
} from "./ui.js";

const STATES = ["STATE_QUEUED", "STATE_RUNNING", "STATE_SUCCEEDED", "STATE_FAILED", "STATE_CANCELLED"];
const PAGE_SIZE = 20;

function select(id, label, values, current, labelOf) {
  return el("label", { for: id }, label,
    el("select", { id, name: id },
      el("option", { value: "", text: "any" }),
      values.map((v) => el("option", { value: v, selected: v === current, text: labelOf(v) }))));
}

export async function jobsPage(main, params, signal) {
  const state = params.get("state") || "";
  const task = params.get("task") || "";
  const tag = params.get("tag") || "";
  const token = params.get("page") || "";
  const doc = await openapi(signal);
  const filters = el("form", { class: "filters", role: "search" },
    select("state", "State", queryEnum(doc, "/v1/jobs", "states", STATES), state, stateLabel),
    select("task", "Task", queryEnum(doc, "/v1/jobs", "task", TASK_VALUES), task, taskLabel),
    el("label", { for: "tag" }, "Tag", el("input", { id: "tag", name: "tag", value: tag })),
    el("button", { type: "submit", text: "Filter" }));
  filters.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const name of ["state", "task", "tag"]) {
      const v = filters.elements[name].value.trim();
      if (v) q.set(name, v);
    }
    location.hash = `#/jobs?${q}`;
  });
  for (const s of filters.querySelectorAll("select")) {
    s.addEventListener("change", () => filters.requestSubmit());
  }

  const q = new URLSearchParams({ pageSize: String(PAGE_SIZE) });
  if (state) q.set("states", state);
  if (task) q.set("task", task);
  if (tag) q.set("tag", tag);
  if (token) q.set("pageToken", token);
  if (session.admin) q.set("allOwners", "true");
  const answer = await getJson(`/v1/jobs?${q}`, signal);
  const jobs = answer.jobs || [];

  const head = el("tr", {}, columns().map((h) => el("th", { scope: "col", text: h })));
  const body = el("tbody");
  const table = el("table", { class: "jobs" }, el("thead", {}, head), body);
  const rows = new Map();
  for (const job of jobs) {
    const row = renderRow(job);
    rows.set(job.name, row);
    body.append(row);
  }
  const pager = el("nav", { class: "pager", "aria-label": "Pages of jobs" },
    token ? el("a", { href: `#/jobs?${withPage(params, "")}`, text: "First page" }) : null,
    answer.nextPageToken
      ? el("a", { href: `#/jobs?${withPage(params, answer.nextPageToken)}`, text: "Next page" })
      : null);
  main.append(
    el("h1", { text: "Jobs" }),
    filters,
    jobs.length ? el("div", { class: "scroll" }, table) : el("p", { class: "empty", text: "No jobs." }),
    pager,
  );

  const watch = new URLSearchParams();
  if (task) watch.set("task", task);
  if (tag) watch.set("tag", tag);
  if (session.admin) watch.set("allOwners", "true");
  // New jobs join the first page; rows elsewhere only change in place.
  const onChange = (change) => {
    const job = change.job;
    const old = rows.get(job.name);
    if (!old && (token || (state && job.state !== state))) return;
    const row = renderRow(job, change.progress || {});
    rows.set(job.name, row);
    if (old) old.replaceWith(row);
    else {
      if (!body.isConnected) main.querySelector("p.empty")?.replaceWith(el("div", { class: "scroll" }, table));
      body.prepend(row);
    }
  };
  // Ages and running durations move with the clock (a local tick; nothing is fetched).
  const tick = setInterval(() => {
    for (const row of rows.values()) {
      row.querySelector(".age").textContent = age(row.job.createTime);
      if (!FINAL.has(row.job.state)) row.querySelector(".duration").textContent = duration(row.job);
    }
  }, 1000);
  signal.addEventListener("abort", () => clearInterval(tick));
  for (;;) {
    try {
      await follow(`/v1/jobs:watch?${watch}`, (_name, change) => onChange(change), signal);
    } catch (err) {
      if (signal.aborted) return;
      toast(`Live updates lost (${err.message}); reconnecting`);
    }
    if (signal.aborted) return;
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function columns() {
  return ["State", "Task", session.admin ? "Owner" : null, "Tag", "Ref id", "Age", "Duration",
    "Agent", "Progress", ""].filter((h) => h !== null);
}

function withPage(params, token) {
  const q = new URLSearchParams(params);
  if (token) q.set("page", token);
  else q.delete("page");
  return q.toString();
}

function renderRow(job, live = {}) {
  const id = short(job.name);
  const running = job.state === "STATE_RUNNING";
  let where = "";
  if (live.node) where = `${live.nodeType || "node"} ${live.node}`;
  if (live.maxSteps) where += ` step ${live.step || 0}/${live.maxSteps}`;
  const progress = running
    ? el("span", {}, progressBar(live.fraction ?? job.progress, `progress of ${id}`),
        el("span", { class: "where", text: where }))
    : job.state === "STATE_QUEUED" ? `queued, position ${job.queuePosition || 0}` : "";
  const cancel = FINAL.has(job.state) ? "" : el("button", {
    type: "button", class: "secondary small", "data-cancel": id, text: "Cancel",
    "aria-label": `Cancel job ${id}`,
    onclick: async () => {
      try {
        await postJson(`/v1/jobs/${encodeURIComponent(id)}:cancel`, {});
        toast(`Cancelled ${id}`);
      } catch (err) {
        toast(`Cancel failed: ${err.message}`);
      }
    },
  });
  const cells = [
    el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(id)}`, class: `state ${stateLabel(job.state)}`,
      text: stateLabel(job.state) })),
    el("td", { text: jobLabel(job) }),
    session.admin ? el("td", { text: job.owner || "-" }) : null,
    el("td", { text: job.tag || "" }),
    el("td", { class: "mono", text: job.refId || "" }),
    el("td", { class: "age", text: age(job.createTime) }),
    el("td", { class: "duration", text: duration(job) }),
    el("td", { class: "agent", text: job.agent || job.provider || "" }),
    el("td", { class: "progress-cell" }, progress),
    el("td", {}, cancel),
  ].filter((c) => c !== null);
  // Labels for the phone layout, where each row is a card.
  columns().forEach((label, i) => { if (label) cells[i].dataset.label = label; });
  const row = el("tr", { "data-job": id, "data-state": stateLabel(job.state) }, cells);
  row.job = job;
  return row;
}
