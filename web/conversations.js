/**
 * conversations.js: the sidebar's list of conversations: open one, rename it in place, delete it
 * after a confirmation (two clicks, no browser dialog). Most recently updated first.
 */

function smallButton(text, label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `mini ${cls}`;
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function iconOnly(label, path, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "conv-act";
  b.setAttribute("aria-label", label);
  b.title = label;
  b.innerHTML = `<svg viewBox="0 0 24 24" aria-hidden="true">${path}</svg>`;
  b.addEventListener("click", (e) => {
    e.stopPropagation();
    onClick();
  });
  return b;
}

export class ConversationList {
  /**
   * @param {import("./store.js").Store} store
   * @param {object} hooks {open(id), remove(id), renamed()}
   */
  constructor(store, hooks) {
    this.store = store;
    this.onOpen = hooks.open;
    this.onDelete = hooks.remove;
    this.onRenamed = hooks.renamed;
    this.list = document.getElementById("conv-list");
    this.empty = document.getElementById("conv-empty");
    /** Id of the row being renamed, and of the row asking to confirm its deletion. */
    this.renaming = null;
    this.confirmingDelete = null;
  }

  render() {
    const convs = this.store.list();
    this.empty.hidden = convs.length > 0;
    const frag = document.createDocumentFragment();
    for (const c of convs) frag.append(this.row(c));
    this.list.replaceChildren(frag);
  }

  row(c) {
    const li = document.createElement("li");
    li.className = "conv";
    li.dataset.id = c.id;
    if (c.id === this.store.currentId) li.classList.add("active");

    if (this.renaming === c.id) {
      const input = document.createElement("input");
      input.className = "rename-input";
      input.value = c.title;
      input.setAttribute("aria-label", "Conversation name");
      let done = false;
      const finish = (save) => {
        if (done) return;
        done = true;
        if (save) this.store.rename(c.id, input.value);
        this.renaming = null;
        this.onRenamed();
      };
      input.addEventListener("keydown", (e) => {
        if (e.key === "Enter") {
          e.preventDefault();
          finish(true);
        } else if (e.key === "Escape") finish(false);
      });
      input.addEventListener("blur", () => finish(true));
      li.append(input);
      queueMicrotask(() => {
        input.focus();
        input.select();
      });
      return li;
    }

    const open = document.createElement("button");
    open.type = "button";
    open.className = "conv-open";
    open.textContent = c.title;
    open.title = c.title;
    if (c.id === this.store.currentId) open.setAttribute("aria-current", "page");
    open.addEventListener("click", () => this.onOpen(c.id));

    const acts = document.createElement("div");
    acts.className = "conv-actions";
    if (this.confirmingDelete === c.id) {
      li.classList.add("confirming");
      const yes = smallButton("Delete", "Confirm delete", "danger", () => {
        this.confirmingDelete = null;
        this.onDelete(c.id);
      });
      const no = smallButton("Cancel", "Cancel delete", "", () => {
        this.confirmingDelete = null;
        this.render();
      });
      acts.append(yes, no);
      queueMicrotask(() => no.focus());
    } else {
      acts.append(
        iconOnly("Rename conversation", '<path d="M12 20h9"/><path d="M16.5 3.5a2.1 2.1 0 0 1 3 3L7 19l-4 1 1-4z"/>', () => {
          this.renaming = c.id;
          this.confirmingDelete = null;
          this.render();
        }),
        iconOnly(
          "Delete conversation",
          '<path d="M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3"/>',
          () => {
            this.confirmingDelete = c.id;
            this.renaming = null;
            this.render();
          },
        ),
      );
    }
    li.append(open, acts);
    return li;
  }
}
