// Conversations and settings kept in the browser's localStorage.
//
// What is read back is checked, not trusted: another page on the same origin (any server on this
// host and port) can write there too, and a full or corrupt store must not stop the page loading.

const CHATS = "edgelm.chats.v1";
const SETTINGS = "edgelm.settings.v1";
const MAX_CHATS = 200;
const ROLES = new Set(["user", "assistant"]);

/** The saved conversations, newest first; malformed entries are dropped. */
export function loadChats() {
  const stored = readJson(CHATS);
  if (!Array.isArray(stored)) return [];
  return stored.filter(isChat).slice(0, MAX_CHATS).map((chat) => ({
    id: chat.id,
    title: chat.title,
    updated: Number(chat.updated) || 0,
    messages: chat.messages.filter(isMessage).map(cleanMessage),
  }));
}

/** Saves the conversations; false when the browser refused (storage full or disabled). */
export function saveChats(chats) {
  const kept = chats.slice(0, MAX_CHATS).map((chat) => ({
    ...chat,
    messages: chat.messages.map(cleanMessage),
  }));
  return writeJson(CHATS, kept);
}

export function newChat() {
  return { id: newId(), title: "New chat", updated: Date.now(), messages: [] };
}

/** The settings the user chose (model, system prompt, temperature, max tokens, theme, open chat). */
export function loadSettings() {
  const stored = readJson(SETTINGS);
  const settings = stored && typeof stored === "object" && !Array.isArray(stored) ? stored : {};
  const text = (value) => (typeof value === "string" ? value : "");
  return {
    model: text(settings.model),
    system: text(settings.system),
    temperature: text(settings.temperature),
    maxTokens: text(settings.maxTokens),
    theme: ["light", "dark"].includes(settings.theme) ? settings.theme : "",
    chat: text(settings.chat),
  };
}

export function saveSettings(settings) {
  return writeJson(SETTINGS, settings);
}

function isChat(chat) {
  return chat && typeof chat === "object" && typeof chat.id === "string" && chat.id.length <= 100 &&
    typeof chat.title === "string" && Array.isArray(chat.messages);
}

function isMessage(message) {
  return message && typeof message === "object" && ROLES.has(message.role) && typeof message.content === "string";
}

function cleanMessage(message) {
  // only the fields the page shows; anything else in the store is dropped
  const clean = { role: message.role, content: message.content };
  if (typeof message.note === "string") clean.note = message.note;
  if (typeof message.model === "string") clean.model = message.model;
  if (message.error === true) clean.error = true;
  return clean;
}

function newId() {
  // crypto.randomUUID needs a secure context; a page served to another machine over http has none
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function readJson(key) {
  try {
    const text = localStorage.getItem(key);
    return text === null ? null : JSON.parse(text);
  } catch {
    return null; // no storage, or not JSON: start afresh rather than fail to load
  }
}

function writeJson(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}
