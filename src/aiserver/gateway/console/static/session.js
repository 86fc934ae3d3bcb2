// What the current key may do: {admin, open}; asked of the API, never assumed.
import { ApiError, getJson, getKey } from "./api.js";

export const session = { admin: false, open: false, signedIn: false };

export async function probeSession() {
  session.signedIn = false;
  session.admin = false;
  session.open = false;
  try {
    await getJson("/v1/jobs?pageSize=1");
    session.signedIn = true;
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) throw err;
    label();
    return session;
  }
  try {
    await getJson("/v1/jobs?pageSize=1&allOwners=true");
    session.admin = true;
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
  }
  session.open = session.admin && !getKey();
  label();
  return session;
}

// The last link of the navigation says who the console is acting as.
function label() {
  const link = document.getElementById("signin-link");
  if (session.open) link.textContent = "Open mode";
  else if (!session.signedIn) link.textContent = "Sign in";
  else link.textContent = session.admin ? "Admin key" : "Signed in";
}
