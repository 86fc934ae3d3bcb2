// The public API as the console uses it: the same routes and key as every other client.
const KEY = "aiserver.apiKey";

export const getKey = () => sessionStorage.getItem(KEY) || "";
export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    const rs = (body && body.responseStatus) || {};
    super(rs.message || `HTTP ${status}`);
    this.status = status;
    this.code = rs.errorCode || "";
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function answer(resp) {
  const text = await resp.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

export async function getJson(path, signal) {
  return answer(await fetch(path, { headers: headers({ Accept: "application/json" }), signal }));
}

export async function postJson(path, body) {
  const init = {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "application/json" }),
    body: JSON.stringify(body || {}),
  };
  return answer(await fetch(path, init));
}

// A multipart POST; a JSON answer is parsed, anything else (an image) returned as a Blob.
export async function postForm(path, form) {
  const resp = await fetch(path, { method: "POST", headers: headers(), body: form });
  const type = resp.headers.get("Content-Type") || "";
  if (!resp.ok || type.startsWith("application/json")) return answer(resp);
  return resp.blob();
}

// Artifacts are private to the key (unless URLs are signed): fetched with it, shown as blobs.
export async function blobUrl(url, signal) {
  const resp = await fetch(url, { headers: headers(), signal });
  if (!resp.ok) throw new ApiError(resp.status, null);
  return URL.createObjectURL(await resp.blob());
}

// Follows a Server-Sent Events stream (fetch, since EventSource cannot send the key).
// onEvent(name, data) for each event; resolves when the stream ends, rejects on an error.
export async function follow(path, onEvent, signal) {
  const resp = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!resp.ok) await answer(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue; // a keepalive comment
      const parsed = JSON.parse(data.join("\n"));
      if (name === "error") throw new ApiError(0, parsed);
      onEvent(name, parsed);
    }
  }
}
