// The chat page: conversations on the left, the open one on the right, replies streamed from /v1.
// Everything a model or the server says is shown as text (textContent, or markdown.js's text nodes).

import { ApiError, chatModels, forgetKey, saveKey, storedKey, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { loadChats, loadSettings, newChat, saveChats, saveSettings } from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  chatList: $("chat-list"), newChat: $("new-chat"), model: $("model"), status: $("status"),
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"), regenerate: $("regenerate"),
  system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"), theme: $("theme"),
  forgetKey: $("forget-key"), keyDialog: $("key-dialog"), keyInput: $("key-input"),
  keyRemember: $("key-remember"), keySave: $("key-save"), keyCancel: $("key-cancel"), keyReason: $("key-reason"),
};

const state = {
  chats: loadChats(),
  settings: loadSettings(),
  chatId: null,
  running: null, // {controller, chat, message} while a reply streams
  keyPrompt: null, // the open key dialog's promise, shared by every request that met a 401
};

// -- conversations ------------------------------------------------------------------------------
function currentChat() {
  let chat = state.chats.find((c) => c.id === state.chatId);
  if (!chat) {
    chat = state.chats[0] ?? newChat();
    if (!state.chats.includes(chat)) state.chats.unshift(chat);
    state.chatId = chat.id;
  }
  return chat;
}

function persist() {
  state.settings.chat = state.chatId ?? "";
  saveSettings(state.settings);
  if (!saveChats(state.chats)) showStatus("the browser refused to save the conversations (storage full?)", true);
}

function startNewChat() {
  if (state.running) return;
  const open = currentChat();
  if (open.messages.length === 0) {
    ui.input.focus();
    return; // the open chat is already empty
  }
  const chat = newChat();
  state.chats.unshift(chat);
  state.chatId = chat.id;
  persist();
  render();
  ui.input.focus();
}

function openChat(id) {
  if (state.running) return;
  state.chatId = id;
  persist();
  render();
}

function deleteChat(id) {
  if (state.running?.chat.id === id) return;
  const chat = state.chats.find((c) => c.id === id);
  if (!chat || (chat.messages.length && !window.confirm(`Delete "${chat.title}"?`))) return;
  state.chats = state.chats.filter((c) => c.id !== id);
  if (state.chatId === id) state.chatId = state.chats[0]?.id ?? null;
  persist();
  render();
}

function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}

// -- rendering ----------------------------------------------------------------------------------
function render() {
  renderChatList();
  renderMessages();
  renderControls();
}

function renderChatList() {
  const current = currentChat();
  const items = state.chats.map((chat) => {
    const li = document.createElement("li");
    if (chat === current) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = chat.title;
    open.title = chat.title;
    open.addEventListener("click", () => openChat(chat.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.textContent = "×";
    remove.title = "Delete this conversation";
    remove.setAttribute("aria-label", `Delete ${chat.title}`);
    remove.addEventListener("click", () => deleteChat(chat.id));
    li.append(open, remove);
    return li;
  });
  ui.chatList.replaceChildren(...items);
}

function renderMessages() {
  const chat = currentChat();
  if (chat.messages.length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask something. Replies stay on this computer.";
    ui.messages.replaceChildren(empty);
    return;
  }
  ui.messages.replaceChildren(...chat.messages.map(messageElement));
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function messageElement(message) {
  const box = document.createElement("article");
  box.className = `message ${message.role}`;
  if (state.running?.message === message) box.classList.add("streaming");
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = message.role === "user" ? "You" : (message.model || "Assistant");
  const body = document.createElement("div");
  body.className = "body";
  if (message.role === "user") body.textContent = message.content; // what the user typed, as typed
  else body.append(renderMarkdown(message.content));
  box.append(who, body);
  if (message.note) {
    const note = document.createElement("div");
    note.className = message.error ? "note error" : "note";
    note.textContent = message.note;
    box.append(note);
  }
  message.element = box;
  return box;
}

let frame = 0;
function redrawStreaming() {
  // at most once a frame: a fast model sends many pieces between two paints
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const running = state.running;
    if (!running || running.chat !== currentChat()) return;
    const stick = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
    const old = running.message.element;
    const fresh = messageElement(running.message);
    if (old?.parentNode === ui.messages) old.replaceWith(fresh);
    else renderMessages();
    if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
  });
}

function renderControls() {
  const busy = Boolean(state.running);
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  const chat = currentChat();
  ui.regenerate.disabled = busy || !chat.messages.some((m) => m.role === "user");
  ui.send.disabled = !ui.model.value;
  ui.newChat.disabled = busy;
}

function showStatus(text, error = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", error);
}

// -- generation ---------------------------------------------------------------------------------
function send() {
  const text = ui.input.value;
  if (state.running || !text.trim() || !ui.model.value) return;
  const chat = currentChat();
  if (chat.messages.length === 0) chat.title = titleOf(text);
  chat.messages.push({ role: "user", content: text });
  ui.input.value = "";
  generate(chat);
}

function regenerate() {
  if (state.running) return;
  const chat = currentChat();
  while (chat.messages.length && chat.messages.at(-1).role === "assistant") chat.messages.pop();
  if (chat.messages.length) generate(chat);
}

function stop() {
  state.running?.controller.abort(); // closing the connection cancels the generation on the server
}

function requestFor(chat) {
  const messages = chat.messages
    .filter((m) => m.content) // a reply that failed before its first word is not part of the talk
    .map((m) => ({ role: m.role, content: m.content }));
  const system = ui.system.value.trim();
  if (system) messages.unshift({ role: "system", content: system });
  const request = { model: ui.model.value, messages };
  const temperature = ui.temperature.value.trim();
  if (temperature !== "") request.temperature = Number(temperature);
  const maxTokens = ui.maxTokens.value.trim();
  // empty: no cap from the page; the server's own rule for a chat reply decides where it ends
  if (maxTokens !== "") request.max_tokens = Number(maxTokens);
  return request;
}

async function generate(chat) {
  const message = { role: "assistant", content: "", model: ui.model.value };
  chat.messages.push(message);
  chat.updated = Date.now();
  const controller = new AbortController();
  state.running = { controller, chat, message };
  showStatus("");
  persist();
  render();
  try {
    await streamReply(chat, message, controller.signal);
  } catch (err) {
    if (controller.signal.aborted) {
      message.note = "stopped";
    } else {
      message.note = err instanceof ApiError ? err.message : `the request failed: ${err.message}`;
      message.error = true;
    }
  } finally {
    state.running = null;
    if (!message.content && !message.note) message.note = "(no reply)";
    persist();
    if (chat === currentChat()) render();
    else renderControls();
    ui.input.focus();
  }
}

async function streamReply(chat, message, signal) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      const started = performance.now();
      let first = null;
      for await (const event of streamChat(requestFor(chat), signal)) {
        if (event.text) {
          first ??= performance.now();
          message.content += event.text;
          redrawStreaming();
        } else if (event.done) {
          message.note = replyNote(event, first ? (performance.now() - first) / 1000 : 0, started);
        }
      }
      return;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401 || attempt > 2 || message.content) throw err;
      if (!(await askForKey(err.message))) throw err;
    }
  }
}

function replyNote(event, seconds, started) {
  const ended = {
    stop: "", length: "cut at the token limit", tool_calls: "", content_filter: "filtered",
  }[event.finish];
  const parts = [];
  if (event.finish === null) parts.push("the reply broke off");
  else if (ended) parts.push(ended);
  const tokens = event.usage?.completion_tokens;
  if (tokens) {
    parts.push(`${tokens} tokens`);
    if (seconds > 0 && tokens > 1) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
    parts.push(`${((performance.now() - started) / 1000).toFixed(1)} s`);
  }
  return parts.join(" · ");
}

// -- models and the API key ---------------------------------------------------------------------
async function loadModels() {
  for (let attempt = 0; ; attempt += 1) {
    try {
      const models = await chatModels();
      fillModels(models);
      return;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401 && attempt < 3 && (await askForKey(err.message))) continue;
      showStatus(`cannot list the models: ${err.message}`, true);
      return;
    }
  }
}

function fillModels(models) {
  const options = models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id;
    return option;
  });
  ui.model.replaceChildren(...options);
  const wanted = models.find((m) => m.id === state.settings.model);
  if (wanted) ui.model.value = wanted.id;
  if (models.length === 0) showStatus("this server serves no chat model", true);
  renderControls();
}

function askForKey(reason) {
  state.keyPrompt ??= new Promise((resolve) => {
    ui.keyReason.textContent = storedKey()
      ? `The server refused the key: ${reason}`
      : "This server needs an API key (the one given to edgelm serve --api-key).";
    ui.keyInput.value = "";
    const finish = (ok) => {
      ui.keySave.removeEventListener("click", accept);
      ui.keyCancel.removeEventListener("click", cancel);
      ui.keyInput.removeEventListener("keydown", onKey);
      ui.keyDialog.removeEventListener("cancel", cancel);
      if (ui.keyDialog.open) ui.keyDialog.close();
      state.keyPrompt = null;
      ui.forgetKey.hidden = !storedKey();
      resolve(ok);
    };
    const accept = () => {
      const key = ui.keyInput.value.trim();
      if (!key) return;
      saveKey(key, ui.keyRemember.checked);
      finish(true);
    };
    const cancel = () => finish(false);
    const onKey = (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        accept();
      }
    };
    ui.keySave.addEventListener("click", accept);
    ui.keyCancel.addEventListener("click", cancel);
    ui.keyInput.addEventListener("keydown", onKey);
    ui.keyDialog.addEventListener("cancel", cancel);
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  });
  return state.keyPrompt;
}

// -- settings, theme, keys ----------------------------------------------------------------------
function applyTheme() {
  const theme = state.settings.theme;
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
  ui.theme.textContent = isDark() ? "Light mode" : "Dark mode";
  ui.theme.setAttribute("aria-pressed", String(isDark()));
}

function isDark() {
  const theme = state.settings.theme;
  return theme ? theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
}

function toggleTheme() {
  state.settings.theme = isDark() ? "light" : "dark";
  saveSettings(state.settings);
  applyTheme();
}

function bindSettings() {
  ui.system.value = state.settings.system;
  ui.temperature.value = state.settings.temperature;
  ui.maxTokens.value = state.settings.maxTokens;
  const keep = () => {
    state.settings.system = ui.system.value;
    state.settings.temperature = ui.temperature.value;
    state.settings.maxTokens = ui.maxTokens.value;
    state.settings.model = ui.model.value;
    saveSettings(state.settings);
    renderControls();
  };
  for (const field of [ui.system, ui.temperature, ui.maxTokens, ui.model]) field.addEventListener("change", keep);
}

function bindKeys() {
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault(); // Enter sends; Shift+Enter is a new line
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.running && !ui.keyDialog.open) {
      event.preventDefault();
      stop();
    }
  });
}

function start() {
  state.chatId = state.settings.chat || null;
  applyTheme();
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);
  bindSettings();
  bindKeys();
  ui.send.addEventListener("click", send);
  ui.stop.addEventListener("click", stop);
  ui.regenerate.addEventListener("click", regenerate);
  ui.newChat.addEventListener("click", startNewChat);
  ui.theme.addEventListener("click", toggleTheme);
  ui.forgetKey.hidden = !storedKey();
  ui.forgetKey.addEventListener("click", () => {
    forgetKey();
    ui.forgetKey.hidden = true;
    showStatus("the API key is forgotten");
  });
  render();
  loadModels();
  ui.input.focus();
}

start();
