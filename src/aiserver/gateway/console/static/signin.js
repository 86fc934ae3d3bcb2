// Sign-in: an API key kept in session storage (gone when the tab closes).
import { probeSession, session } from "./session.js";
import { getKey, setKey } from "./api.js";
import { el } from "./ui.js";

function describe() {
  if (session.open) return "Open mode: the service has no API keys; you see every job.";
  if (!session.signedIn) return getKey() ? "That key was refused." : "Not signed in.";
  return session.admin ? "Signed in with an admin key: every owner's jobs." : "Signed in: your own jobs.";
}

export async function signinPage(main) {
  const status = el("p", { id: "signin-status", role: "status", text: describe() });
  const input = el("input", {
    id: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    value: getKey(),
  });
  const form = el(
    "form",
    { class: "card signin" },
    el("h1", { text: "Sign in" }),
    el("label", { for: "api-key", text: "API key" }),
    input,
    el("div", { class: "actions" },
      el("button", { type: "submit", text: "Sign in" }),
      el("button", { type: "button", class: "secondary", id: "signout", text: "Sign out",
        onclick: async () => {
          setKey("");
          input.value = "";
          await probeSession();
          status.textContent = describe();
        } })),
    status,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setKey(input.value.trim());
    await probeSession();
    status.textContent = describe();
    if (session.signedIn) location.hash = "#/jobs";
  });
  main.append(form);
  input.focus();
}
