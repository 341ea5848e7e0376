// The console's entry point: the two views (#playground, #fleet), the API key prompt and the
// health pill.

import { ApiError, apiKey, authorization, onKeyRefused, setApiKey } from "./api.js";
import { Fleet } from "./fleet.js";
import { Playground } from "./playground.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["playground", "fleet"];

const playground = new Playground();
const fleet = new Fleet();
const main = document.querySelector("main");
const keyPanel = $("key-panel");
const keyButton = $("key-button");

function showView() {
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : VIEWS[0];
  for (const view of VIEWS) {
    $(`view-${view}`).hidden = view !== name;
    $(`tab-${view}`).setAttribute("aria-selected", String(view === name));
  }
  if (name === "fleet" && keyPanel.hidden) fleet.start();
  else fleet.stop();
}

function askForKey(message) {
  fleet.stop();
  main.hidden = true;
  keyPanel.hidden = false;
  $("key-error").textContent = message;
  $("key-input").value = "";
  $("key-input").focus();
}

onKeyRefused((message, keyGiven) => {
  askForKey(keyGiven ? `This key was refused (401): ${message}` : `401: ${message}`);
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey($("key-input").value.trim());
  keyPanel.hidden = true;
  main.hidden = false;
  start();
});

keyButton.addEventListener("click", () => {
  setApiKey("");
  askForKey("");
});

async function start() {
  keyButton.hidden = !apiKey();
  try {
    await playground.loadModels();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // the key prompt is shown
    console.warn("the model list could not be read", error);
  }
  showView();
}

async function health() {
  const pill = $("health");
  try {
    const response = await fetch("health", { headers: authorization(), cache: "no-store" });
    const body = await response.json();
    pill.textContent = response.ok ? "ready" : body.status ?? `HTTP ${response.status}`;
    pill.className = `pill ${response.ok ? "ok" : "bad"}`;
  } catch {
    pill.textContent = "unreachable";
    pill.className = "pill bad";
  }
}

window.addEventListener("hashchange", showView);
health();
setInterval(health, 5000);
start();
