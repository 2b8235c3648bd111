// The server's OpenAI-compatible API, as the page uses it: the chat models, and a streamed chat reply.

const KEY = "edgelm.apiKey";
const CHAT_ENDPOINT = "/v1/chat/completions";

/** An answer other than 2xx, with the server's one-line message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The API key the user gave (this tab's, else the one they asked the browser to remember). */
export function storedKey() {
  return sessionStorage.getItem(KEY) ?? localStorage.getItem(KEY);
}

export function saveKey(key, remember) {
  forgetKey();
  (remember ? localStorage : sessionStorage).setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = storedKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** The served models that answer chat requests, as /v1/models describes them. */
export async function chatModels() {
  const response = await fetch("/v1/models", { headers: headers(), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  const models = Array.isArray(body?.data) ? body.data : [];
  return models.filter((m) => typeof m?.id === "string" && Array.isArray(m.endpoints) &&
    m.endpoints.includes(CHAT_ENDPOINT));
}

/**
 * Streams one chat reply: yields {text} for each piece, then {done, finish, usage} at the end.
 * Aborting `signal` closes the connection, which cancels the generation on the server.
 */
export async function* streamChat(request, signal) {
  const response = await fetch(CHAT_ENDPOINT, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  let finish = null;
  let usage = null;
  for await (const data of serverSentEvents(response.body, signal)) {
    if (data === "[DONE]") break;
    const event = JSON.parse(data);
    if (event.error) throw new ApiError(500, String(event.error.message ?? "the model failed"));
    const choice = event.choices?.[0];
    if (typeof choice?.delta?.content === "string" && choice.delta.content) yield { text: choice.delta.content };
    if (choice?.finish_reason) finish = choice.finish_reason;
    if (event.usage) usage = event.usage;
  }
  yield { done: true, finish, usage }; // finish is null when the stream broke off before its end
}

async function* serverSentEvents(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
        if (data.length) yield data.join("\n");
      }
    }
  } finally {
    if (!signal?.aborted) reader.cancel().catch(() => {});
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (typeof body?.error?.message === "string") message = body.error.message;
  } catch {
    // not JSON: the status line says enough
  }
  return new ApiError(response.status, message);
}
