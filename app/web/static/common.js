// Shared by both pages: the API key, calls to the REST API, and safe DOM building.
// Everything the model or a user wrote reaches the page through textContent, never innerHTML.

const KEY_STORAGE = "feedback-lm.api-key";

export function storedKey() {
  return localStorage.getItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The API's error body as one readable line (FastAPI's detail is a string or a list). */
function describe(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`)
      .join("; ");
  }
  return `HTTP ${status}`;
}

/** Call the REST API with the stored key; resolves to the JSON body, rejects with ApiError. */
export async function api(path, { method = "GET", body, key } = {}) {
  const headers = { Authorization: `Bearer ${key || storedKey() || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, `the service cannot be reached (${err.message})`);
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) throw new ApiError(response.status, describe(response.status, json));
  return json;
}

/** Build an element: attributes as properties, children as nodes or text (never HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Show a message in a status line; kind is "", "ok" or "error". */
export function say(node, message, kind = "") {
  node.textContent = message;
  node.className = `status ${kind}`.trim();
}

/**
 * The sign-in gate shared by both pages: shows the form until a key works, then calls
 * onSignedIn(me). The key stays in localStorage until "Sign out".
 */
export async function signIn(onSignedIn) {
  const gate = document.getElementById("sign-in");
  const form = document.getElementById("sign-in-form");
  const input = document.getElementById("key");
  const error = document.getElementById("sign-in-error");
  const who = document.getElementById("who");
  const out = document.getElementById("sign-out");

  out.addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    location.reload();
  });

  async function accept(key) {
    const me = await api("/v1/keys/me", { key });
    localStorage.setItem(KEY_STORAGE, key);
    gate.hidden = true;
    who.textContent = `${me.name} (${me.role})`;
    out.hidden = false;
    onSignedIn(me);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    say(error, "");
    try {
      await accept(input.value.trim());
      input.value = "";
    } catch (err) {
      say(error, err.status === 401 ? "That key is unknown or revoked." : err.message, "error");
    }
  });

  const saved = storedKey();
  if (saved) {
    try {
      await accept(saved);
      return;
    } catch (err) {
      if (err.status === 401) localStorage.removeItem(KEY_STORAGE);
      say(error, err.status === 401 ? "The saved key no longer works." : err.message, "error");
    }
  }
  gate.hidden = false;
  input.focus();
}

/** Whether a key press belongs to a text field rather than to the page's shortcuts. */
export function typing(event) {
  const target = event.target;
  return (
    target instanceof HTMLElement &&
    (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName))
  );
}

export function percent(value) {
  return value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)}%`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}
