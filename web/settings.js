/**
 * settings.js: the model menu (filled from GET /v1/models) and the settings dialog (system
 * prompt, temperature, max tokens, model, optional API key), both saved through the Store.
 *
 * The menu defaults to the first model the tree serves; the one chosen is remembered with the
 * settings and sent as `model` with each request. While the tree serves a single model the menu
 * only shows its name (disabled): there is nothing to choose.
 */

import { listModels } from "./api.js";
import { DEFAULT_SETTINGS } from "./store.js";

const $ = (id) => document.getElementById(id);

function fillModels(select, models, chosen) {
  select.replaceChildren(...models.map((id) => new Option(id, id)));
  if (chosen && models.includes(chosen)) select.value = chosen;
  select.disabled = models.length < 2;
  select.title = select.disabled ? "The only model this server serves" : "";
}

const sameList = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

export class Settings {
  /**
   * @param {import("./store.js").Store} store
   * @param {object} hooks {serverState(ok), beforeOpen()}
   */
  constructor(store, hooks) {
    this.store = store;
    this.hooks = hooks;
    this.models = [];
    this.menu = $("model");
    this.dlg = $("settings");

    this.menu.addEventListener("change", () => store.saveSettings({ model: this.menu.value }));
    $("set-temp").addEventListener("input", (e) => {
      this.temperature = Number(e.target.value);
      $("temp-out").textContent = this.temperature.toFixed(2);
      e.target.classList.remove("unset");
    });
    $("close-settings").addEventListener("click", () => this.dlg.close());
    $("reset-settings").addEventListener("click", () => this.fill({ ...store.settings, ...DEFAULT_SETTINGS, model: store.settings.model, apiKey: store.settings.apiKey }));
    $("settings-form").addEventListener("submit", () => this.save());
    this.dlg.addEventListener("click", (e) => {
      if (e.target === this.dlg) this.dlg.close(); // a click on the backdrop
    });
  }

  /** The model to ask for: the chosen one, else the menu's, else none (the gateway's default). */
  model() {
    return this.store.settings.model || this.menu.value || "";
  }

  /** Fills the menu from GET /v1/models (again on each call: a node of a new model may have
   * joined); an unchanged list leaves the menu alone, so an open menu stays open. */
  async loadModels() {
    const s = this.store.settings;
    const before = this.models;
    try {
      this.models = await listModels(s.apiKey);
      this.hooks.serverState(true);
    } catch (e) {
      this.models = [];
      if (e.kind === "network") this.hooks.serverState(false);
    }
    if (before.length && sameList(before, this.models)) return;
    const shown = this.models.length ? this.models : [s.model].filter(Boolean);
    if (!shown.length) {
      this.menu.replaceChildren(new Option("No models", ""));
      return;
    }
    fillModels(this.menu, shown, s.model);
    if (!shown.includes(s.model)) this.store.saveSettings({ model: shown[0] });
  }

  fill(s) {
    fillModels($("set-model"), this.models.length ? this.models : [s.model].filter(Boolean), s.model);
    $("set-system").value = s.systemPrompt;
    // null until the slider is moved: requests carry no temperature, the server uses the model's.
    // The slider then shows no value of its own (dimmed), so it never contradicts its label.
    this.temperature = s.temperature;
    const unset = s.temperature == null;
    $("set-temp").value = String(s.temperature ?? 0.7);
    $("set-temp").classList.toggle("unset", unset);
    $("temp-out").textContent = unset ? "model default (move the slider to set one)" : Number(s.temperature).toFixed(2);
    $("set-max").value = String(s.maxTokens);
    $("set-key").value = s.apiKey;
  }

  open() {
    this.fill(this.store.settings);
    this.hooks.beforeOpen?.();
    this.dlg.showModal();
  }

  save() {
    const max = Number.parseInt($("set-max").value, 10);
    const key = $("set-key").value.trim();
    const keyChanged = key !== this.store.settings.apiKey;
    this.store.saveSettings({
      model: $("set-model").value || this.store.settings.model,
      systemPrompt: $("set-system").value,
      temperature: Number.isFinite(this.temperature) ? this.temperature : null,
      maxTokens: Number.isFinite(max) && max > 0 ? max : DEFAULT_SETTINGS.maxTokens,
      apiKey: key,
    });
    if (keyChanged) this.loadModels();
    else if (this.store.settings.model) this.menu.value = this.store.settings.model;
  }
}
