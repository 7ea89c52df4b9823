(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("depprune-data").textContent);
  const P = D.params, M = D.modules, G = D.groups;
  const LIMIT = 400;  // rows a detail table shows before "show all"
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const fmt = (n) => (n === null || n === undefined ? "?" : Number(n).toLocaleString("en-US"));
  const byName = new Map(M.map((m, i) => [m.name, i]));

  // Subtree ranges (tin..tout over a pre-order), depth and the run each module sits in.
  const tin = new Array(M.length), tout = new Array(M.length), order = [];
  const depth = new Array(M.length).fill(0), runOf = new Array(M.length).fill(-1);
  const stack = [[0, false]];
  while (stack.length) {
    const [id, done] = stack.pop();
    if (done) { tout[id] = order.length; continue; }
    tin[id] = order.length; order.push(id); stack.push([id, true]);
    for (let k = M[id].kids.length - 1; k >= 0; k--) {
      const item = M[id].kids[k];
      for (let j = item.length - 1; j >= 0; j--) {
        depth[item[j]] = depth[id] + 1;
        if (item.length > 1) runOf[item[j]] = item[0];
        stack.push([item[j], false]);
      }
    }
  }
  const inside = (root, id) => tin[root] <= tin[id] && tin[id] < tout[root];
  const subSet = M.map((m) => new Set(m.groups)), ownSet = M.map((m) => new Set(m.own));
  const runCache = new Map();
  function runInfo(first) {
    if (!runCache.has(first)) {
      const parent = M[M[first].parent];
      const ids = parent.kids.find((item) => item[0] === first);
      const set = new Set();
      let tensors = 0;
      for (const id of ids) { M[id].groups.forEach((g) => set.add(g)); tensors += M[id].tensors; }
      runCache.set(first, { ids, set, groups: [...set].sort((a, b) => a - b), tensors });
    }
    return runCache.get(first);
  }

  const S = { open: new Set(), pin: null, hover: null, hidden: new Set(), all: false };
  const tree = document.getElementById("dp-tree"), detail = document.getElementById("dp-detail");
  const legend = document.getElementById("dp-legend"), kindBox = document.getElementById("dp-kinds");
  const kindStyle = document.head.appendChild(document.createElement("style"));

  function parseHash() {
    const out = {};
    for (const part of location.hash.replace(/^#/, "").split("&")) {
      if (!part) continue;
      const at = part.indexOf("=");
      out[decodeURIComponent(at < 0 ? part : part.slice(0, at))] =
        at < 0 ? "" : decodeURIComponent(part.slice(at + 1));
    }
    return out;
  }
  function openToDepth(limit) {
    S.open.clear();
    M.forEach((m, i) => { if (depth[i] < limit && m.kids.length) S.open.add("n" + i); });
  }
  function reveal(id) {
    for (let x = id; x > 0; x = M[x].parent) {
      S.open.add("n" + M[x].parent);
      if (runOf[x] >= 0) S.open.add("r" + runOf[x]);
    }
  }
  function openSubtree(id) {
    for (let t = tin[id]; t < tout[id]; t++) {
      const x = order[t];
      if (M[x].kids.length) S.open.add("n" + x);
      if (runOf[x] >= 0 && x !== id) S.open.add("r" + runOf[x]);
    }
  }
  const labelOf = (id) => {
    const m = M[id];
    if (id === 0) return D.title;
    return /^\d+$/.test(m.label) && m.parent > 0 ? M[m.parent].label + "." + m.label : m.label;
  };
  const kindName = (k) => (k === "" ? "(no kind)" : k);

  // A chip's kind is worth its width only where the graph has more than one kind.
  const KINDED = Object.keys(D.kinds).length > 1;
  function chip(g, frozen, length, bare) {
    const grp = G[g];
    const c = el("span", "chip" + (frozen ? " part" : ""), "g" + g);
    c.style.setProperty("--c", grp.color);
    c.dataset.g = g; c.dataset.kind = grp.kind;
    if (grp.kind && KINDED && !bare) c.append(el("i", null, grp.kind));
    c.title = "group " + g + " (" + kindName(grp.kind) + "): " + fmt(grp.size) + " units, " +
      fmt(grp.ppu) + " params/unit" + (frozen ? "; " + fmt(frozen) + " of " + fmt(length) +
      " indices frozen" : "");
    return c;
  }
  function dot(g) {
    const d = el("span", "dot");
    d.style.setProperty("--c", G[g].color);
    d.dataset.g = g; d.dataset.kind = G[g].kind;
    d.title = "group " + g + " (" + kindName(G[g].kind) + ")";
    return d;
  }
  function paramEl(pid) {
    const p = P[pid], s = el("span", "param");
    s.append(el("span", "pname", p.label));
    const frozen = [];
    for (const [dim, length, gs] of p.dims) {
      if (!gs.length) { frozen.push(dim); continue; }
      const d = el("span", "dim", dim + ":");
      for (const [g, f] of gs) d.append(chip(g, f, length));
      s.append(d);
    }
    if (frozen.length || !p.dims.length) {
      s.append(el("span", "chip frozen", frozen.length ? frozen.join(",") + ": frozen" : "not traced"));
    }
    return s;
  }
  function summary(groups, tensors) {
    const s = el("span", "sum", fmt(tensors) + (tensors === 1 ? " tensor" : " tensors") +
      (groups.length ? " · " + groups.length + (groups.length === 1 ? " group" : " groups") : ""));
    for (const g of groups.slice(0, 16)) s.append(dot(g));
    if (groups.length > 16) s.append(el("span", null, "+" + (groups.length - 16)));
    return s;
  }
  function row(depthLevel, key, open) {
    const r = el("div", "row");
    r.style.paddingLeft = 4 + 16 * depthLevel + "px";
    const t = el("span", "tog", key ? (open ? "▾" : "▸") : "");
    if (key) t.dataset.toggle = key;
    r.append(t);
    return r;
  }
  function addModule(out, id, level) {
    const m = M[id], key = m.kids.length ? "n" + id : "", open = S.open.has(key);
    const r = row(level, key, open);
    r.dataset.n = id;
    const name = el("span", "name", labelOf(id));
    name.title = m.name || D.title;
    // Wrapped tensors line up under the first one, not under the module's name.
    const body = el("span", "body");
    for (const p of m.params) body.append(paramEl(p));
    if (key && !open) body.append(summary(m.groups, m.tensors));
    r.append(name, body);
    out.push(r);
    if (key && open) for (const item of m.kids) addItem(out, item, level + 1);
  }
  function addItem(out, item, level) {
    if (item.length === 1) { addModule(out, item[0], level); return; }
    const key = "r" + item[0], open = S.open.has(key), info = runInfo(item[0]);
    const r = row(level, key, open);
    r.classList.add("run");
    r.dataset.run = item[0];
    const body = el("span", "body");
    body.append(el("span", "badge", "\u00d7" + item.length + " identical blocks"));
    if (!open) body.append(summary(info.groups, info.tensors));
    r.append(el("span", "name", labelOf(item[0]) + " … " + labelOf(item[item.length - 1])), body);
    out.push(r);
    if (open) for (const id of item) addModule(out, id, level + 1);
  }
  function renderTree() {
    const out = [];
    addModule(out, 0, 0);
    tree.replaceChildren(...out);
    document.documentElement.dataset.deppruneRows = out.length;
    highlight();
  }

  function current() { return S.hover || S.pin; }
  function highlight() {
    const cur = current();
    const g = cur && cur.g !== undefined ? cur.g : -1, m = cur && cur.m !== undefined ? cur.m : -1;
    for (const r of tree.children) {
      r.classList.remove("hit-own", "hit-sub", "cur");
      if (g >= 0) {
        r.style.setProperty("--hc", G[g].color);
        if ("n" in r.dataset) {
          const n = +r.dataset.n;
          if (ownSet[n].has(g)) r.classList.add("hit-own");
          else if (subSet[n].has(g)) r.classList.add("hit-sub");
        } else if (runInfo(+r.dataset.run).set.has(g)) r.classList.add("hit-sub");
      }
      if (m >= 0 && +r.dataset.n === m) r.classList.add("cur");
    }
    for (const c of document.querySelectorAll(".sel")) c.classList.remove("sel");
    if (g >= 0) for (const c of document.querySelectorAll('[data-g="' + g + '"]')) c.classList.add("sel");
  }

  function facts(pairs) {
    const box = el("div", "facts");
    for (const [value, label] of pairs) {
      const d = el("div");
      d.append(el("b", null, value), el("span", null, label));
      box.append(d);
    }
    return box;
  }
  function table(head, numeric) {
    const t = el("table"), tr = el("tr");
    head.forEach((h, i) => tr.append(el("th", numeric.includes(i) ? "num" : null, h)));
    t.append(el("thead"), el("tbody"));
    t.tHead.append(tr);
    return t;
  }
  function cells(tr, values, numeric) {
    values.forEach((v, i) => {
      const td = el("td", numeric.includes(i) ? "num" : "mono");
      if (v instanceof Node) td.append(v); else td.textContent = v;
      tr.append(td);
    });
    return tr;
  }
  function more(container, shown, total) {
    if (shown >= total) return;
    const b = el("button", null, "show all " + fmt(total) + " (" + fmt(total - shown) + " more)");
    b.addEventListener("click", () => { S.all = true; showDetail(); });
    container.append(b);
  }
  function groupDetail(g) {
    const grp = G[g], h = el("h3");
    h.append(chip(g, 0, 0), el("span", null, "Group " + g + " · " + kindName(grp.kind)));
    const members = grp.members;
    const first = members.length ? P[members[0][0]].name + "[" + members[0][1] + "]" : "";
    detail.append(el("h2", null, "Group"), h, facts([
      [fmt(grp.size), "units"], [fmt(grp.ppu), "params / unit"],
      [fmt(grp.size * grp.ppu), "params in all"], [fmt(members.length), "members"],
      [fmt(grp.modules.length), "modules"],
    ]));
    detail.append(el("p", "hint", "first member " + first));
    const t = table(["module", "tensor", "dim", "length", "frozen"], [2, 3, 4]);
    const shown = S.all ? members.length : Math.min(LIMIT, members.length);
    for (const [p, dim, length, frozen] of members.slice(0, shown)) {
      const tr = cells(el("tr"), [M[P[p].m].name || D.title, P[p].label, dim, fmt(length), fmt(frozen)], [2, 3, 4]);
      tr.dataset.member = P[p].name + "[" + dim + "]";
      tr.dataset.module = P[p].m;
      t.tBodies[0].append(tr);
    }
    detail.append(t);
    more(detail, shown, members.length);
  }
  function moduleDetail(id) {
    const m = M[id], h = el("h3");
    h.append(el("span", "mono", m.name || D.title));
    detail.append(el("h2", null, id === 0 ? "Model" : "Module"), h, facts([
      [fmt(m.tensors), "tensors"], [fmt(m.params.length), "own tensors"],
      [fmt(m.groups.length), "groups"], [fmt(m.own.length), "own groups"],
    ]));
    if (m.params.length) {
      const t = table(["tensor", "dim", "length", "groups"], [1, 2]);
      for (const p of m.params) {
        const dims = P[p].dims.length ? P[p].dims : [["\u2013", null, []]];
        for (const [dim, length, gs] of dims) {
          const box = el("span");
          if (gs.length) for (const [g, f] of gs) box.append(chip(g, f, length), " ");
          else box.append(el("span", "chip frozen", P[p].dims.length ? "frozen" : "not traced"));
          const tr = cells(el("tr"), [P[p].label, dim, fmt(length), box], [1, 2]);
          tr.dataset.tensor = P[p].name;
          t.tBodies[0].append(tr);
        }
      }
      detail.append(t);
    }
    if (m.groups.length) {
      detail.append(el("h2", null, "Groups in " + (id === 0 ? "the model" : "this module")));
      const t = table(["group", "kind", "units", "params/unit", "members here"], [2, 3, 4]);
      const shown = S.all ? m.groups.length : Math.min(LIMIT, m.groups.length);
      for (const g of m.groups.slice(0, shown)) {
        const here = G[g].members.filter(([p]) => inside(id, P[p].m)).length;
        const tr = cells(el("tr"), [chip(g, 0, 0, true), kindName(G[g].kind), fmt(G[g].size), fmt(G[g].ppu), fmt(here)], [2, 3, 4]);
        tr.dataset.group = g;
        t.tBodies[0].append(tr);
      }
      detail.append(t);
      more(detail, shown, m.groups.length);
    }
  }
  function showDetail() {
    const cur = current();
    detail.replaceChildren();
    if (!cur) {
      detail.append(el("h2", null, "Details"),
        el("p", "hint", "Hover a group chip, a legend row or a module to see its members, " +
          "units and parameters per unit; click to pin it."));
    } else if (cur.g !== undefined) groupDetail(cur.g);
    else moduleDetail(cur.m);
    highlight();
  }
  const same = (a, b) => (a === b) || (a && b && a.g === b.g && a.m === b.m);
  function hover(target) {
    if (same(S.hover, target)) return;
    S.hover = target; S.all = false;
    showDetail();
  }
  function pin(target) {
    S.pin = same(S.pin, target) ? null : target;
    S.hover = null; S.all = false;
    const hash = !S.pin ? "" : S.pin.g !== undefined ? "group=" + S.pin.g :
      "module=" + encodeURIComponent(M[S.pin.m].name);
    try { history.replaceState(null, "", "#" + hash); } catch (e) { /* file: pages may refuse */ }
    showDetail();
  }
  function jumpTo(id) {
    reveal(id);
    renderTree();
    const r = tree.querySelector('[data-n="' + id + '"]');
    if (r) { r.scrollIntoView({ block: "center" }); r.classList.add("flash"); }
  }
  function toggle(key) {
    if (!S.open.delete(key)) S.open.add(key);
    renderTree();
  }

  function applyKinds() {
    const rules = [];
    for (const k of S.hidden) {
      const q = '[data-kind="' + CSS.escape(k) + '"]';
      rules.push(".chip" + q + ", .dot" + q + " { display: none; }");
    }
    kindStyle.textContent = rules.join("\n");
    for (const r of legend.tBodies[0].rows) r.hidden = S.hidden.has(r.dataset.kind);
    for (const b of kindBox.querySelectorAll("button[data-kind]")) b.classList.toggle("off", S.hidden.has(b.dataset.kind));
  }
  const COLUMNS = [["group", (g) => g.i, true], ["kind", (g) => g.kind, false],
    ["units", (g) => g.size, true], ["params/unit", (g) => g.ppu, true],
    ["members", (g) => g.members.length, true], ["first member", (g) => g.members.length ? P[g.members[0][0]].name : "", false]];
  let sortBy = 0, sortDown = false;
  function renderLegend() {
    const tr = el("tr");
    COLUMNS.forEach(([name, , numeric], i) => {
      const th = el("th", numeric ? "num" : null, name + (i === sortBy ? (sortDown ? " ▾" : " ▴") : ""));
      th.dataset.col = i;
      tr.append(th);
    });
    legend.tHead.replaceChildren(tr);
    const key = COLUMNS[sortBy][1];
    const rows = G.slice().sort((a, b) => {
      const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : a.i - b.i) * (sortDown ? -1 : 1);
    }).map((g) => {
      const first = g.members.length ? P[g.members[0][0]].name + "[" + g.members[0][1] + "]" : "";
      const r = cells(el("tr"), [chip(g.i, 0, 0, true), kindName(g.kind), fmt(g.size), fmt(g.ppu), fmt(g.members.length), first], [2, 3, 4]);
      r.cells[5].className = "mono first";
      r.cells[5].title = first;
      r.dataset.g = g.i; r.dataset.kind = g.kind;
      return r;
    });
    legend.tBodies[0].replaceChildren(...rows);
    applyKinds();
    highlight();
  }
  function renderKinds() {
    const all = el("button", null, "all kinds");
    all.addEventListener("click", () => { S.hidden.clear(); applyKinds(); });
    kindBox.append(all);
    for (const [k, n] of Object.entries(D.kinds)) {
      const b = el("button", null, kindName(k) + " " + n);
      b.dataset.kind = k;
      b.addEventListener("click", () => { if (!S.hidden.delete(k)) S.hidden.add(k); applyKinds(); });
      kindBox.append(b);
    }
  }
  function renderDiag() {
    const box = document.getElementById("dp-diag");
    const section = (title, items, empty) => {
      box.append(el("h4", null, title));
      if (!items.length) { box.append(el("p", "none", empty)); return; }
      const ul = el("ul");
      for (const item of items.slice(0, LIMIT)) ul.append(el("li", null, item));
      if (items.length > LIMIT) ul.append(el("li", null, "… " + fmt(items.length - LIMIT) + " more"));
      box.append(ul);
    };
    const ops = Object.entries(D.unsupported_ops);
    section("Ops without an axis rule (the axes they touch are frozen)",
      ops.map(([op, n]) => op + " \u00d7" + n), "none: every op had a rule");
    const frozen = new Map();
    for (const [p, dim] of D.frozen_dims) frozen.set(p, [...(frozen.get(p) || []), dim]);
    section("Frozen tensor dims (" + fmt(D.frozen_dims.length) + " in " + fmt(frozen.size) + " tensors)",
      [...frozen].map(([p, dims]) => P[p].name + "[" + dims.join(", ") + "]"), "none");
    section("Members with frozen indices (" + fmt(D.partial.length) + ")",
      D.partial.map(([g, p, dim, length, frozen]) => P[p].name + "[" + dim + "] in g" + g + ": " +
        fmt(frozen) + " of " + fmt(length) + " indices frozen"), "none");
    section("Notes from the trace", D.notes, "none");
    if (D.conflicts) section("Conflicts", [D.conflicts + " equation(s) could only be frozen"], "");
  }

  tree.addEventListener("click", (e) => {
    const t = e.target.closest("[data-toggle]");
    if (t) { toggle(t.dataset.toggle); return; }
    const c = e.target.closest("[data-g]");
    if (c) { pin({ g: +c.dataset.g }); return; }
    const r = e.target.closest(".row");
    if (!r) return;
    if ("run" in r.dataset) { toggle("r" + r.dataset.run); return; }
    const id = +r.dataset.n;
    if (M[id].kids.length && !S.open.has("n" + id)) S.open.add("n" + id), renderTree();
    pin({ m: id });
  });
  tree.addEventListener("mouseover", (e) => {
    const c = e.target.closest("[data-g]");
    if (c) { hover({ g: +c.dataset.g }); return; }
    const r = e.target.closest(".row");
    if (r && "n" in r.dataset) hover({ m: +r.dataset.n });
  });
  tree.addEventListener("mouseleave", () => hover(null));
  legend.addEventListener("mouseover", (e) => {
    const r = e.target.closest("tbody tr");
    if (r) hover({ g: +r.dataset.g });
  });
  legend.addEventListener("mouseleave", () => hover(null));
  legend.addEventListener("click", (e) => {
    const th = e.target.closest("th");
    if (th) {
      const col = +th.dataset.col;
      sortDown = col === sortBy ? !sortDown : COLUMNS[col][2] && col > 1;
      sortBy = col;
      renderLegend();
      return;
    }
    const r = e.target.closest("tbody tr");
    if (r) pin({ g: +r.dataset.g });
  });
  detail.addEventListener("click", (e) => {
    const c = e.target.closest("[data-g]");
    if (c) { pin({ g: +c.dataset.g }); return; }
    const r = e.target.closest("tr[data-module]");
    if (r) jumpTo(+r.dataset.module);
  });
  document.getElementById("dp-expand").addEventListener("click", () => { openSubtree(0); renderTree(); });
  document.getElementById("dp-collapse").addEventListener("click", () => { openToDepth(1); renderTree(); });

  const H = parseHash();
  openToDepth(/^\d+$/.test(H.depth || "") ? +H.depth : D.open_depth);
  for (const name of (H.open === undefined ? [] : H.open.split(","))) {
    if (byName.has(name)) { reveal(byName.get(name)); openSubtree(byName.get(name)); }
  }
  if (H.kind !== undefined) {
    const shown = new Set(H.kind.split(","));
    for (const k of Object.keys(D.kinds)) if (!shown.has(k)) S.hidden.add(k);
  }
  if (/^\d+$/.test(H.group || "") && +H.group < G.length) S.pin = { g: +H.group };
  else if (H.module !== undefined && byName.has(H.module)) {
    S.pin = { m: byName.get(H.module) };
    reveal(S.pin.m);
    if (M[S.pin.m].kids.length) S.open.add("n" + S.pin.m);  // as a click on its row would
  }

  document.getElementById("dp-title").textContent = D.title;
  const s = D.summary;
  const count = (n, one, many) => fmt(n) + " " + (n === 1 ? one : many);
  document.getElementById("dp-stats").textContent = [
    count(s.groups, "group", "groups"), count(s.units, "unit", "units"),
    count(s.members, "member", "members"), count(s.tensors, "tensor", "tensors"),
    count(D.frozen_dims.length, "frozen dim", "frozen dims"),
    count(Object.keys(D.unsupported_ops).length, "op without a rule", "ops without a rule"),
    count(D.notes.length, "note", "notes"),
  ].join(" · ");
  renderKinds();
  renderLegend();
  renderDiag();
  renderTree();
  showDetail();
  if (S.pin && S.pin.m !== undefined) {
    const r = tree.querySelector('[data-n="' + S.pin.m + '"]');
    if (r) r.scrollIntoView({ block: "center" });
  }
  document.documentElement.dataset.deppruneRendered = G.length;
})();
