// Chat page: conversation id + client token live in localStorage; replies stream as Server-Sent Events over fetch.
// Every piece of text goes into the page with textContent, never innerHTML, so typed markup stays text.
"use strict";

const KEY = "ecb-chat";
const $ = (id) => document.getElementById(id);
let session = JSON.parse(localStorage.getItem(KEY) || "null");
// Loading the history and starting a new conversation run one after the other, and send() waits for them: a reply
// typed right after "New conversation" must not go to the old conversation and then be wiped by the switch.
let switching = Promise.resolve();
function switchTo(step) { switching = switching.then(step, step); return switching; }

function setStatus(text) { $("status").textContent = text; }
// The greeting and example questions show while the conversation is empty (they are page text, not messages).
function showWelcome() { $("welcome").hidden = $("messages").children.length > 0; }

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.dataset.role = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  el.appendChild(body);
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function addRating(el, message) {
  el.dataset.messageId = message.id;
  const box = document.createElement("div");
  box.className = "rate";
  for (const [label, value] of [["\u{1F44D}", 1], ["\u{1F44E}", -1]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.title = value > 0 ? "Helpful" : "Not helpful";
    b.dataset.rating = String(value);
    if (message.rating === value) b.classList.add("on");
    b.addEventListener("click", () => rate(message.id, value, box, b));
    box.appendChild(b);
  }
  el.appendChild(box);
}

async function api(path, options = {}) {
  const headers = Object.assign({ "Content-Type": "application/json" }, options.headers || {});
  if (session) headers["X-Client-Token"] = session.token;
  return fetch(path, Object.assign({}, options, { headers }));
}

async function rate(id, value, box, button) {
  const r = await api(`/api/messages/${id}/feedback`, { method: "POST", body: JSON.stringify({ rating: value }) });
  if (r.ok) {
    box.querySelectorAll("button").forEach((b) => b.classList.remove("on"));
    button.classList.add("on");
  } else if (r.status === 429) {
    setStatus("Too many ratings from here; try again in a minute");
  }
}

async function startConversation() {
  session = null;
  const r = await api("/api/conversations", { method: "POST", body: "{}" });
  if (!r.ok) { setStatus(`Could not start a conversation (${r.status})`); return; }
  const data = await r.json();
  session = { id: data.conversation_id, token: data.client_token };
  localStorage.setItem(KEY, JSON.stringify(session));
  $("messages").replaceChildren();
  showWelcome();
  setStatus("");
}

async function loadHistory() {
  if (!session) return startConversation();
  const r = await api(`/api/conversations/${encodeURIComponent(session.id)}`);
  if (r.status === 404) return startConversation();
  const data = await r.json();
  $("messages").replaceChildren();
  for (const m of data.messages) {
    const el = bubble(m.role, m.content);
    if (m.role === "assistant") addRating(el, m);
  }
  showWelcome();
}

async function loadModel() {
  try {
    const r = await fetch("/api/model");
    const m = await r.json();
    $("model").textContent = m.ready ? `model v${m.version}` : "model loading...";
    if (!m.ready) setTimeout(loadModel, 2000);
  } catch (e) { $("model").textContent = "model unavailable"; }
}

// Parse "event: x\ndata: {...}\n\n" blocks from a fetch body stream.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield [name, data ? JSON.parse(data) : {}];
    }
  }
}

async function send(text) {
  $("send").disabled = true;
  await switching;
  if (!session) await switchTo(startConversation);
  if (!session) { $("send").disabled = false; return; }  // could not start one: setStatus said why
  bubble("user", text);
  showWelcome();
  const el = bubble("assistant", "");
  el.classList.add("streaming");
  const body = el.querySelector(".text");
  try {
    const r = await api(`/api/conversations/${encodeURIComponent(session.id)}/messages`, {
      method: "POST", body: JSON.stringify({ content: text, stream: true }),
      headers: { Accept: "text/event-stream" },
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: r.statusText }));
      body.textContent = "";
      setStatus(`Not sent: ${err.error} (${r.status})`);
      el.remove();
      return;
    }
    for await (const [name, data] of sseEvents(r)) {
      if (name === "token") { body.textContent += data.text; el.scrollIntoView({ block: "end" }); }
      else if (name === "done") { body.textContent = data.message.content; addRating(el, data.message); }
      else if (name === "error") setStatus(`The reply failed: ${data.error}`);
    }
  } finally {
    el.classList.remove("streaming");
    $("send").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim()) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("new").addEventListener("click", () => switchTo(startConversation));
  for (const b of document.querySelectorAll("#welcome .example")) b.addEventListener("click", () => send(b.textContent));
  loadModel();
  switchTo(loadHistory);
});
