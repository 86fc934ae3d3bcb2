// The service's own description of itself: forms and filters are built from it. Fetched once,
// or again when `fresh` (its workflow operations follow the server's workflows folder).
import { getJson } from "./api.js";

let document_ = null;

export async function openapi(signal, { fresh = false } = {}) {
  if (!document_ || fresh) document_ = await getJson("/openapi.json", signal);
  return document_;
}

// The enum values of a query parameter of an operation, without the UNSPECIFIED one.
export function queryEnum(doc, path, name, fallback) {
  const param = (doc.paths?.[path]?.get?.parameters || []).find((p) => p.name === name);
  const schema = param?.schema?.items || param?.schema || {};
  const values = (schema.enum || []).filter((v) => !v.endsWith("_UNSPECIFIED"));
  return values.length ? values : fallback;
}
