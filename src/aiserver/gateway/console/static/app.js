// The console: a hash router over five pages, each a module rendering into <main>.
import { agentsPage } from "./agents.js";
import { jobPage } from "./job.js";
import { jobsPage } from "./jobs.js";
import { runPage } from "./run.js";
import { probeSession, session } from "./session.js";
import { signinPage } from "./signin.js";
import { el } from "./ui.js";

let current = null; // the page's AbortController: leaving a page closes its streams

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const main = document.getElementById("main");
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query);
  const page = parts[0] || "jobs";
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  main.replaceChildren();
  if (page !== "signin" && !session.signedIn) {
    location.hash = "#/signin";
    return;
  }
  try {
    if (page === "jobs" && parts[1]) await jobPage(main, decodeURIComponent(parts[1]), signal);
    else if (page === "jobs") await jobsPage(main, params, signal);
    else if (page === "run") await runPage(main, parts[1] ? decodeURIComponent(parts[1]) : "", params, signal);
    else if (page === "agents") await agentsPage(main, signal);
    else if (page === "signin") await signinPage(main);
    else main.append(el("p", { text: "No such page." }));
  } catch (err) {
    if (signal.aborted) return;
    main.append(el("p", { class: "error", role: "alert", text: `Error: ${err.message}` }));
  }
}

async function start() {
  try {
    await probeSession();
  } catch (err) {
    document.getElementById("main").append(el("p", { class: "error", text: err.message }));
  }
  window.addEventListener("hashchange", route);
  await route();
}

start();
