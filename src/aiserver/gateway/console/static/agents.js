// Agents: every provider as WatchAgents streams it, redrawn on each change.
import { follow } from "./api.js";
import { age, el, taskLabel } from "./ui.js";

function card(agent, opened) {
  const state = (agent.state || "").replace(/^STATE_/, "").toLowerCase();
  const max = agent.maxConcurrentJobs || 0;
  const running = agent.runningJobs || 0;
  const models = agent.models || [];
  return el("article", { class: `card agent ${state}`, "data-agent": agent.name, "aria-label": `Agent ${agent.name}` },
    el("h2", {}, agent.name, " ", el("span", { class: `state ${state}`, "data-state": state, text: state })),
    el("p", { class: "muted", text: `${(agent.kind || "").replace(/^KIND_/, "").toLowerCase()} ${agent.url || ""}` }),
    el("p", {}, `load ${running}${max ? ` / ${max}` : ""}`,
      max ? el("meter", { min: "0", max: String(max), value: String(running), "aria-label": `load of ${agent.name}` }) : null),
    el("p", {}, "tasks: ", (agent.tasks || []).map(taskLabel).join(", ") || "none"),
    agent.priority ? el("p", { text: `priority ${agent.priority}` }) : null,
    agent.lastError ? el("p", { class: "why", text: agent.lastError }) : null,
    agent.lastSeenTime ? el("p", { class: "muted", text: `last seen ${age(agent.lastSeenTime)} ago` }) : null,
    models.length ? el("details", { open: opened.has(agent.name) }, el("summary", { text: `${models.length} models` }),
      el("ul", {}, models.map((m) => el("li", { class: "mono", text: m })))) : null);
}

export async function agentsPage(main, signal) {
  const list = el("div", { class: "agents", id: "agents" });
  const status = el("p", { class: "muted", role: "status", text: "Connecting…" });
  main.append(el("h1", { text: "Agents" }), status, list);
  for (;;) {
    try {
      await follow("/v1/agents:watch", (_name, message) => {
        status.textContent = `Live · updated ${new Date().toLocaleTimeString()}`;
        // Redrawn whole; a model list someone opened stays open.
        const opened = new Set([...list.querySelectorAll("details[open]")].map((d) => d.closest("[data-agent]").dataset.agent));
        list.replaceChildren(...(message.agents || []).map((a) => card(a, opened)));
      }, signal);
    } catch (err) {
      if (signal.aborted) return;
      if (err.status === 403 || err.status === 401) {
        status.textContent = "Agents are shown to admin keys only.";
        return;
      }
      status.textContent = `Stream lost (${err.message}); reconnecting…`;
    }
    if (signal.aborted) return;
    // The stream ended (the server restarted): reconnect after a pause.
    await new Promise((r) => setTimeout(r, 2000));
  }
}
