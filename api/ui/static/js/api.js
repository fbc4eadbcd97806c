// The API client. The key lives in sessionStorage only: it is sent in the Authorization header,
// never in a URL (downloads go through fetch() + a Blob for the same reason), never logged.
const KEY = "akl.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

// The API's own message: `detail` is a string, or FastAPI's list of {loc, msg} for a 422.
export function errorMessage(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".") || "body"}: ${e.msg}`)
      .join("; ");
  }
  return `HTTP ${status}`;
}

async function send(path, { method = "GET", json, form, headers = {} } = {}) {
  const init = { method, headers: { ...headers, Authorization: `Bearer ${session.key() || ""}` } };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `the API did not answer (${err.message})`);
  }
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: the status line is all there is
    }
    throw new ApiError(response.status, errorMessage(response.status, body));
  }
  return response;
}

export const api = {
  get: async (path) => (await send(path)).json(),
  post: async (path, json, headers) => (await send(path, { method: "POST", json, headers })).json(),
  upload: async (path, form) => (await send(path, { method: "POST", form })).json(),
  // GET that answers null on 404: for optional routes (teacher caches) and missing resources.
  maybe: async (path) => {
    try {
      return await api.get(path);
    } catch (err) {
      if (err.status === 404) return null;
      throw err;
    }
  },
  // Saves a download as a file: fetch() with the header, then an object URL for the Blob.
  download: async (path, fallbackName) => {
    const response = await send(path);
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = (disposition.match(/filename="([^"]+)"/) || [])[1] || fallbackName;
    const url = URL.createObjectURL(await response.blob());
    const link = Object.assign(document.createElement("a"), { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    return name;
  },
};
