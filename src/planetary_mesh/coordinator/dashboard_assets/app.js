// Planetary Mesh dashboard: one ES module, no build step, nothing from the internet.
// Views are drawn from the coordinator's JSON API (/v1/...) with this browser session's
// cookie; a server-sent event stream (/v1/events/stream) says when to draw them again.
// Every piece of text from the API goes in as text (textContent), never as HTML.

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const me = { name: document.body.dataset.user, admin: document.body.dataset.role === "admin" };
const main = document.getElementById("main");
const flashBox = document.getElementById("flash");
const liveBadge = document.getElementById("live");

const JOBS_PER_PAGE = 50;
const TASKS_PER_PAGE = 100;
const NODES_PER_PAGE = 100;
const TAIL_BYTES = 64 * 1024;
const TASK_STATES = ["pending", "assigned", "running", "succeeded", "failed", "cancelled"];
const ENDED = new Set(["succeeded", "failed", "cancelled"]);

// -- small helpers ----------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "style") el.style.cssText = value; // CSSOM: allowed by the page's CSP
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(svgNS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  for (const child of children) el.append(child instanceof Node ? child : String(child));
  return el;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) signedOut();
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  const total = response.headers.get("X-Total-Count");
  const data = await response.json();
  return total === null ? data : { items: data, total: Number(total) };
}

function flash(message, kind = "error") {
  flashBox.textContent = message;
  flashBox.className = kind === "error" ? "" : "info";
  flashBox.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { flashBox.hidden = true; }, kind === "error" ? 15000 : 6000);
}

function signedOut() {
  stream?.close();
  liveBadge.textContent = "signed out";
  liveBadge.className = "live";
  main.replaceChildren(h("h1", {}, "Signed out"),
    h("p", {}, "This browser session has ended. Run `mesh dashboard` for a new login link."));
  throw new ApiError(401, "signed out");
}

const units = ["B", "KiB", "MiB", "GiB", "TiB"];
function bytes(n) {
  if (n === null || n === undefined) return "–";
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n >= 10 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}
function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}
function shellQuote(arg) {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'"'"'`)}'`;
}
function ago(ts) { return ts ? `${duration(Math.max(0, Date.now() / 1000 - ts))} ago` : "–"; }
function clock(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString([], { hour12: false }) : "–";
}
function badge(state) { return h("span", { class: `badge ${state}` }, state); }
function meter(fraction, label) {
  const pct = Math.max(0, Math.min(100, Math.round(fraction * 100)));
  return h("span", { class: "meter", role: "meter", "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": pct, "aria-label": label }, h("span", { style: `width:${pct}%` }));
}
function link(href, text, attrs = {}) { return h("a", { href, ...attrs }, text); }
function jobLink(id, text) { return link(`#/jobs/${encodeURIComponent(id)}`, text ?? id, { class: "mono" }); }
function nodeLink(id, names) {
  return id ? link(`#/nodes/${encodeURIComponent(id)}`, names?.get(id) ?? id) : "–";
}
function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map(([text, cls]) => h("th", { class: cls, scope: "col" }, text)))),
    h("tbody", {}, rows.length ? rows
      : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "Nothing here yet."))));
}
function pager(page, total, perPage, hrefFor, what) {
  const pages = Math.max(1, Math.ceil(total / perPage));
  return h("nav", { class: "pager", "aria-label": `${what} pages` },
    page > 1 ? link(hrefFor(page - 1), "← Previous") : null,
    h("span", { class: "muted" }, `Page ${page} of ${pages} · ${total} ${what}`),
    page < pages ? link(hrefFor(page + 1), "Next →") : null);
}

function progress(job) {
  const t = job.tasks;
  const total = t.total || 1;
  const ended = t.succeeded + t.failed + t.cancelled;
  const pct = Math.round((ended / total) * 100);
  const seg = (state) => h("span", { class: state, style: `width:${(t[state] / total) * 100}%` });
  return h("div", { class: "progress-wrap" },
    h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
      "aria-valuenow": pct, "aria-label": `Progress of job ${job.id}`, "data-job": job.id },
    seg("succeeded"), seg("failed"), seg("cancelled"), seg("running")),
    h("span", { class: "progress-label" },
      `${ended}/${t.total} ended · ${t.running + t.assigned} running · ${t.pending} pending`
      + (t.failed ? ` · ${t.failed} failed` : "")));
}

// -- actions ------------------------------------------------------------------------------------

const confirming = new Set(); // jobs whose cancel button is asking "really?"

function cancelControl(job) {
  const ended = ENDED.has(job.state);
  if (ended || !(me.admin || job.owner === me.name)) return null;
  if (!confirming.has(job.id)) {
    return h("button", { type: "button", class: "danger", "data-key": `cancel-${job.id}`,
      onclick: () => { confirming.add(job.id); refresh(`yes-${job.id}`); } }, "Cancel job");
  }
  return h("span", { role: "group", "aria-label": "Confirm cancel" },
    h("span", {}, "Cancel every unfinished task? "),
    h("button", { type: "button", class: "danger confirm", "data-key": `yes-${job.id}`,
      onclick: () => cancelJob(job.id) }, "Yes, cancel job"), " ",
    h("button", { type: "button", "data-key": `no-${job.id}`,
      onclick: () => { confirming.delete(job.id); refresh(`cancel-${job.id}`); } }, "Keep it"));
}

async function cancelJob(id) {
  confirming.delete(id);
  try {
    await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    flash(`Job ${id} cancelled: its unfinished tasks end with reason "cancelled".`, "info");
  } catch (err) {
    flash(`Could not cancel job ${id}: ${err.message}`);
  }
  draw(false);
}

function drainControl(node) {
  if (!me.admin || node.state === "lost") return null;
  const draining = node.state === "draining" || node.drain_deadline !== null;
  const action = draining ? "undrain" : "drain";
  return h("button", { type: "button", "data-key": `${action}-${node.id}`,
    title: draining ? "Take new work again" : "Take no new work; running tasks finish",
    onclick: async () => {
      try {
        await api(`/v1/nodes/${encodeURIComponent(node.id)}/${action}`,
          { method: "POST", body: draining ? undefined : {} });
        flash(`Node ${node.name} ${draining ? "takes work again" : "is draining"}.`, "info");
      } catch (err) {
        flash(`Could not ${action} node ${node.name}: ${err.message}`);
      }
      refresh(`${draining ? "drain" : "undrain"}-${node.id}`);
    } }, draining ? "Undrain" : "Drain");
}

// -- views --------------------------------------------------------------------------------------

async function overviewView() {
  const o = await api("/v1/overview?window=900&bucket=30&events=20");
  const n = o.nodes, t = o.tasks;
  const card = (figure, label, key) =>
    h("div", { class: "card", "data-card": key }, h("div", { class: "figure" }, figure),
      h("div", { class: "label" }, label));
  const tp = o.throughput;
  const lastMinute = tp.succeeded.slice(-2).reduce((a, b) => a + b, 0)
    + tp.failed.slice(-2).reduce((a, b) => a + b, 0) + tp.other.slice(-2).reduce((a, b) => a + b, 0);
  return [
    h("h1", {}, "Overview"),
    h("div", { class: "cards" },
      card(`${n.ready + n.draining} / ${n.total}`, "nodes ready" + (n.suspect || n.lost
        ? ` (${n.suspect} suspect, ${n.lost} lost)` : ""), "nodes"),
      card(t.running + t.assigned, "tasks running", "running"),
      card(t.pending, "tasks pending", "pending"),
      card(t.failed, "tasks failed", "failed"),
      card(t.succeeded, "tasks succeeded", "succeeded")),
    h("div", { class: "grid2" },
      h("section", { "aria-labelledby": "tp" },
        h("h2", { id: "tp" }, `Tasks ended per ${tp.bucket_seconds} s, last ${Math.round(tp.succeeded.length * tp.bucket_seconds / 60)} minutes`),
        h("div", { class: "panel" }, chart(tp),
          h("p", { class: "muted" }, `${lastMinute} tasks ended in the last minute.`))),
      h("section", { "aria-labelledby": "ev" },
        h("h2", { id: "ev" }, "Recent events"),
        h("div", { class: "panel" }, eventList([...o.events].reverse())))),
  ];
}

function chart(tp) {
  const W = 600, H = 140, pad = 18, n = tp.succeeded.length;
  const totals = tp.succeeded.map((v, i) => v + tp.failed[i] + tp.other[i]);
  const max = Math.max(1, ...totals);
  const bw = (W - pad) / n;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `Tasks ended per ${tp.bucket_seconds} seconds; at most ${max} in one slot` });
  totals.forEach((_, i) => {
    let y = H - pad;
    for (const kind of ["succeeded", "failed", "other"]) {
      const v = tp[kind][i];
      if (!v) continue;
      const bh = (v / max) * (H - 2 * pad);
      y -= bh;
      svg.append(s("rect", { class: kind, x: pad + i * bw + 1, y, width: Math.max(1, bw - 2), height: bh },
        s("title", {}, `${v} ${kind}`)));
    }
  });
  svg.append(s("text", { x: 0, y: pad - 6 }, `${max}`));
  svg.append(s("text", { x: pad, y: H - 4 }, `${Math.round(n * tp.bucket_seconds / 60)} min ago`));
  svg.append(s("text", { x: W - 24, y: H - 4 }, "now"));
  svg.append(s("line", { x1: pad, y1: H - pad, x2: W, y2: H - pad, stroke: "#c9ced6" }));
  return svg;
}

function eventList(events) {
  if (!events.length) return h("p", { class: "muted" }, "No events yet.");
  return h("ul", { class: "events" }, events.map((e) => h("li", {},
    h("time", { datetime: new Date(e.time * 1000).toISOString() }, clock(e.time)),
    h("span", {}, h("span", { class: "badge" }, e.kind.replace(/_/g, " ")), " ",
      e.job_id ? jobLink(e.job_id) : null, e.job_id ? " " : null,
      h("span", {}, e.message)))));
}

async function nodesView(route) {
  const page = Number(route.params.get("page") || 1);
  const all = await api("/v1/nodes");
  const nodes = all.slice((page - 1) * NODES_PER_PAGE, page * NODES_PER_PAGE);
  const gpus = all.some((n) => n.gpus > 0);
  const ready = all.filter((n) => n.state === "ready" || n.state === "draining").length;
  return [
    h("h1", {}, `Nodes · ${ready} of ${all.length} ready`),
    table([["Name"], ["State"], ["Tasks", "num"], ["CPUs (mesh)"], ["Memory (mesh)"],
      ["Machine CPU"], ["Machine memory"], ...(gpus ? [["GPUs", "num"]] : []), ["Sandbox"],
      ["Labels"], ["Last seen"], ...(me.admin ? [["Actions"]] : [])],
    nodes.map((n) => h("tr", { "data-node": n.id, "data-name": n.name },
      h("td", {}, nodeLink(n.id, new Map([[n.id, n.name]]))),
      h("td", { class: "state" }, badge(n.state)),
      h("td", { class: "num" }, n.running),
      h("td", { class: "nowrap" }, meter(n.used_cpus / n.cpus, `CPUs held on ${n.name}`), `${n.used_cpus} / ${n.cpus}`),
      h("td", { class: "nowrap" }, meter(n.used_memory / n.memory, `Memory held on ${n.name}`),
        `${bytes(n.used_memory)} / ${bytes(n.memory)}`),
      h("td", { class: "nowrap" }, n.cpu_percent === null ? h("span", { class: "muted" }, "–")
        : [meter(n.cpu_percent / 100, `CPU use of ${n.name}`), `${Math.round(n.cpu_percent)} %`]),
      h("td", {}, n.memory_in_use === null ? h("span", { class: "muted" }, "–") : bytes(n.memory_in_use)),
      gpus ? h("td", { class: "num" }, n.gpus) : null,
      h("td", {}, h("span", { class: "muted" }, n.sandbox)),
      h("td", {}, Object.entries(n.labels).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`))),
      h("td", {}, ago(n.last_seen)),
      me.admin ? h("td", {}, drainControl(n)) : null))),
    all.length > NODES_PER_PAGE ? pager(page, all.length, NODES_PER_PAGE, (p) => `#/nodes?page=${p}`, "nodes") : null,
  ];
}

async function nodeView(route) {
  const id = route.id;
  const [node, attempts] = await Promise.all([
    api(`/v1/nodes/${encodeURIComponent(id)}`),
    api(`/v1/nodes/${encodeURIComponent(id)}/attempts?limit=50`),
  ]);
  return [
    h("h1", {}, `Node ${node.name} `, badge(node.state)),
    h("div", { class: "toolbar" }, drainControl(node)),
    h("div", { class: "panel" }, h("dl", { class: "facts" },
      h("dt", {}, "Id"), h("dd", { class: "mono" }, node.id),
      h("dt", {}, "CPUs held by tasks"), h("dd", {}, `${node.used_cpus} of ${node.cpus}`),
      h("dt", {}, "Memory held by tasks"), h("dd", {}, `${bytes(node.used_memory)} of ${bytes(node.memory)}`),
      h("dt", {}, "Machine now"), h("dd", {}, node.cpu_percent === null ? "not heard from"
        : `${Math.round(node.cpu_percent)} % CPU, ${bytes(node.memory_in_use)} memory in use`),
      h("dt", {}, "GPUs"), h("dd", {}, node.gpus),
      h("dt", {}, "Tasks running"), h("dd", {}, node.running),
      h("dt", {}, "Sandbox"), h("dd", {}, node.sandbox),
      h("dt", {}, "Labels"), h("dd", {}, Object.keys(node.labels).length
        ? Object.entries(node.labels).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`)) : "none"),
      h("dt", {}, "Version"), h("dd", {}, node.version),
      h("dt", {}, "Last seen"), h("dd", {}, ago(node.last_seen)),
      node.drain_deadline ? [h("dt", {}, "Drain deadline"), h("dd", {}, clock(node.drain_deadline))] : null)),
    h("h2", {}, "Recent tasks"),
    table([["Job"], ["Task", "num"], ["Attempt", "num"], ["State"], ["Started"], ["Duration"], ["Exit", "num"], ["Reason"]],
      attempts.map((a) => h("tr", {},
        h("td", {}, jobLink(a.job_id)),
        h("td", { class: "num" }, link(`#/jobs/${encodeURIComponent(a.job_id)}?task=${a.index}`, a.index)),
        h("td", { class: "num" }, a.attempt),
        h("td", {}, badge(a.state)),
        h("td", {}, clock(a.started_at)),
        h("td", {}, a.started_at ? duration((a.ended_at ?? Date.now() / 1000) - a.started_at) : "–"),
        h("td", { class: "num" }, a.exit_code ?? "–"),
        h("td", {}, a.reason ?? "")))),
  ];
}

async function jobsView(route) {
  const page = Number(route.params.get("page") || 1);
  const { items: jobs, total } = await api(`/v1/jobs?limit=${JOBS_PER_PAGE}&offset=${(page - 1) * JOBS_PER_PAGE}`);
  return [
    h("h1", {}, "Jobs"),
    table([["Job"], ["Name"], ["Owner"], ["Age"], ["State"], ["Progress"], ["Actions"]],
      jobs.map((j) => h("tr", { "data-job": j.id },
        h("td", {}, jobLink(j.id)),
        h("td", {}, j.name),
        h("td", {}, j.owner),
        h("td", {}, ago(j.created_at)),
        h("td", { class: "state" }, badge(j.state)),
        h("td", {}, progress(j)),
        h("td", {}, cancelControl(j))))),
    pager(page, total, JOBS_PER_PAGE, (p) => `#/jobs?page=${p}`, "jobs"),
  ];
}

async function jobView(route) {
  const id = route.id;
  const page = Number(route.params.get("page") || 1);
  const state = route.params.get("state") || "";
  const selected = route.params.get("task");
  const q = new URLSearchParams({ limit: TASKS_PER_PAGE, offset: (page - 1) * TASKS_PER_PAGE });
  if (state) q.set("state", state);
  const [job, tasks, nodes] = await Promise.all([
    api(`/v1/jobs/${encodeURIComponent(id)}?tasks=false`),
    api(`/v1/jobs/${encodeURIComponent(id)}/tasks?${q}`),
    api("/v1/nodes"),
  ]);
  const names = new Map(nodes.map((n) => [n.id, n.name]));
  const here = (changes) => {
    const p = new URLSearchParams({ page, state, ...(selected !== null ? { task: selected } : {}), ...changes });
    for (const [k, v] of [...p.entries()]) if (v === "" || v === "null") p.delete(k);
    return `#/jobs/${encodeURIComponent(id)}?${p}`;
  };
  const now = Date.now() / 1000;
  return [
    h("h1", {}, `Job `, h("span", { class: "mono" }, job.id), ` · ${job.name} `, badge(job.state)),
    h("div", { class: "toolbar" }, progress(job), h("span", { class: "spacer" }), cancelControl(job)),
    h("div", { class: "panel" }, h("dl", { class: "facts" },
      job.python
        ? [h("dt", {}, "Runs"), h("dd", {}, `Python ${job.python} function calls (an executor's)`)]
        : [h("dt", {}, "Command"), h("dd", { class: "mono" }, job.argv.map(shellQuote).join(" "))],
      h("dt", {}, "Owner"), h("dd", {}, job.owner),
      h("dt", {}, "Submitted"), h("dd", {}, `${clock(job.created_at)} (${ago(job.created_at)})`),
      h("dt", {}, "Each task asks for"), h("dd", {}, `${job.cpus} CPU, ${bytes(job.memory)}`
        + (job.timeout ? `, ${duration(job.timeout)} at most` : "") + `, ${job.retries} retries`),
      h("dt", {}, "Tasks"), h("dd", {}, TASK_STATES.filter((st) => job.tasks[st])
        .map((st) => `${job.tasks[st]} ${st}`).join(", ") || "none"),
      job.cancelled_by ? [h("dt", {}, "Cancelled by"), h("dd", {}, job.cancelled_by)] : null)),
    h("div", { class: "grid2" },
      h("section", { "aria-labelledby": "tasks" },
        h("h2", { id: "tasks" }, "Tasks"),
        h("nav", { class: "toolbar tabs", "aria-label": "Show tasks in state" },
          ["", ...TASK_STATES].map((st) => link(here({ state: st, page: 1 }), st || "all",
            { "aria-current": st === state ? "true" : null }))),
        table([["#", "num"], ["State"], ["Node"], ["Attempts", "num"], ["Started"], ["Duration"], ["Exit", "num"], ["Reason"]],
          tasks.items.map((t) => h("tr", { "data-task": t.index, class: String(t.index) === selected ? "selected" : null },
            h("td", { class: "num" }, link(here({ task: t.index }), t.index, { "aria-label": `Task ${t.index}` })),
            h("td", { class: "state" }, badge(t.state)),
            h("td", {}, nodeLink(t.node, names)),
            h("td", { class: "num" }, t.attempts),
            h("td", {}, clock(t.started_at)),
            h("td", {}, t.started_at ? duration((t.ended_at ?? now) - t.started_at) : "–"),
            h("td", { class: "num" }, t.exit_code ?? "–"),
            h("td", { class: "reason" }, t.reason ?? "")))),
        pager(page, tasks.total, TASKS_PER_PAGE, (p) => here({ page: p }), "tasks")),
      h("section", { "aria-labelledby": "task" },
        selected === null ? h("p", { class: "muted" }, "Choose a task to see why it waits or how it ended, and its output.")
          : await taskPanel(id, Number(selected), names))),
  ];
}

async function taskPanel(jobId, index, names) {
  const why = await api(`/v1/jobs/${encodeURIComponent(jobId)}/tasks/${index}/why`);
  const tail = outputTail(jobId, index);
  return h("div", { class: "panel", id: "task-panel" },
    h("h2", { id: "task" }, `Task ${index} `, badge(why.state)),
    h("p", { class: "why-summary" }, why.summary),
    why.nodes.length ? h("ul", { class: "why" }, why.nodes.map((v) =>
      h("li", {}, nodeLink(v.node_id, names), v.fits_now ? ": could run it now" : `: ${v.reason}`))) : null,
    why.attempts.length ? table([["Attempt", "num"], ["Node"], ["State"], ["Exit", "num"], ["Reason"]],
      why.attempts.map((a) => h("tr", {}, h("td", { class: "num" }, a.attempt), h("td", {}, nodeLink(a.node, names)),
        h("td", {}, badge(a.state)), h("td", { class: "num" }, a.exit_code ?? "–"), h("td", {}, a.reason ?? "")))) : null,
    h("h2", {}, "Output ", tail.label),
    tail.element);
}

// The live tail of one task's output: fetched once from the end, then followed by offset.
let tail = null;
function outputTail(jobId, index) {
  const key = `${jobId}/${index}`;
  if (tail?.key !== key) {
    tail = { key, jobId, index, offset: null, attempt: null, ended: false, text: "",
      decoder: new TextDecoder(), label: h("span", { class: "muted" }, ""),
      element: h("pre", { class: "output", tabindex: 0, "aria-label": "Task output" }, "…") };
    pollTail(tail);
  }
  return tail;
}

async function pollTail(t) {
  while (tail === t) {
    const base = `/v1/jobs/${encodeURIComponent(t.jobId)}/tasks/${t.index}/logs`;
    const q = t.offset === null ? `?tail=${TAIL_BYTES}` : `?offset=${t.offset}&attempt=${t.attempt}`;
    try {
      const chunk = await api(base + q);
      if (t.attempt !== null && chunk.attempt !== t.attempt) t.text = "";
      t.attempt = chunk.attempt;
      const raw = Uint8Array.from(atob(chunk.data), (c) => c.charCodeAt(0));
      t.text = (t.text + t.decoder.decode(raw, { stream: !chunk.ended })).slice(-TAIL_BYTES);
      t.offset = chunk.next_offset;
      const atBottom = t.element.scrollTop + t.element.clientHeight >= t.element.scrollHeight - 4;
      t.element.textContent = t.text || (chunk.ended ? "(no output)" : "(no output yet)");
      if (atBottom) t.element.scrollTop = t.element.scrollHeight;
      t.label.textContent = chunk.attempt === 0 ? "(not started yet)" : chunk.ended ? "(ended)" : "(live)";
      if (chunk.attempt === 0) { t.offset = null; t.attempt = null; } // not started yet
      else if (chunk.ended) { t.ended = true; return; }
    } catch (err) {
      if (err.status === 401) return;
      t.element.textContent = `Could not read the output: ${err.message}`;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// -- routing, drawing and live updates --------------------------------------------------------

function parseRoute() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  if (parts[0] === "nodes") return parts[1] ? { section: "nodes", view: nodeView, id: parts[1], params }
    : { section: "nodes", view: nodesView, params };
  if (parts[0] === "jobs") return parts[1] ? { section: "jobs", view: jobView, id: parts[1], params }
    : { section: "jobs", view: jobsView, params };
  return { section: "overview", view: overviewView, params };
}

let drawing = null; // the draw in progress
let again = false; // another draw was asked for while one ran
let focusKey = null;

async function draw(moveFocus) {
  if (drawing) { again = true; return drawing; }
  const route = parseRoute();
  if (!(route.view === jobView && route.params.get("task") !== null)) tail = null; // stops polling
  for (const a of document.querySelectorAll("header nav a")) {
    a.toggleAttribute("aria-current", a.dataset.nav === route.section);
    if (a.dataset.nav === route.section) a.setAttribute("aria-current", "page");
  }
  drawing = (async () => {
    try {
      const content = await route.view(route);
      const key = focusKey ?? document.activeElement?.dataset?.key;
      focusKey = null;
      main.replaceChildren(...[content].flat().filter(Boolean));
      document.title = `${main.querySelector("h1")?.textContent ?? "Dashboard"} · Planetary Mesh`;
      if (moveFocus) main.focus();
      else if (key) main.querySelector(`[data-key="${CSS.escape(key)}"]`)?.focus();
    } catch (err) {
      if (err.status !== 401) {
        main.replaceChildren(h("h1", {}, "Could not load this page"), h("p", {}, err.message),
          h("p", {}, link("#/", "Back to the overview")));
      }
    }
  })();
  await drawing;
  drawing = null;
  if (again) { again = false; return draw(false); }
}

// Events may come by the hundred a second: draw at most once a second for them (at once for
// the person's own clicks), so a busy mesh costs the coordinator a few queries, not thousands.
const EVENT_REDRAW_MS = 1000;
let refreshTimer = null;
let lastEventDraw = 0;
function refresh(keyToFocus) {
  if (keyToFocus) {
    focusKey = keyToFocus;
    clearTimeout(refreshTimer);
    refreshTimer = null;
    draw(false);
    return;
  }
  if (refreshTimer) return; // one is already due
  const wait = Math.max(100, lastEventDraw + EVENT_REDRAW_MS - Date.now());
  refreshTimer = setTimeout(() => { refreshTimer = null; lastEventDraw = Date.now(); draw(false); }, wait);
}

let stream = null;
function follow(after) {
  stream = new EventSource(`/v1/events/stream?after=${after}`);
  stream.addEventListener("open", () => { liveBadge.textContent = "live"; liveBadge.className = "live on"; });
  stream.addEventListener("error", () => {
    liveBadge.textContent = "reconnecting…"; liveBadge.className = "live";
    // The browser retries by itself; a session that ended cannot come back.
    fetch("/v1/overview?events=0", { credentials: "same-origin" })
      .then((r) => { if (r.status === 401) { try { signedOut(); } catch { /* shown */ } } });
  });
  stream.addEventListener("mesh", (message) => {
    const event = JSON.parse(message.data);
    const route = parseRoute();
    // A job's page changes only with its own events or a node's; every other page with any.
    if (route.view === jobView && event.job_id && event.job_id !== route.id) return;
    refresh();
  });
}

window.addEventListener("hashchange", () => { confirming.clear(); draw(true); });
document.getElementById("logout").addEventListener("click", async () => {
  try { await api("/logout", { method: "POST" }); } catch { /* signed out either way */ }
  stream?.close();
  location.replace("/");
});
// Figures no event announces (a node's CPU use, the chart's clock) are drawn again now and then.
setInterval(() => { if (!document.hidden && !drawing) draw(false); }, 5000);

(async () => {
  await draw(false);
  try {
    const o = await api("/v1/overview?events=1");
    follow(o.events.length ? o.events[o.events.length - 1].seq : 0);
  } catch (err) {
    if (err.status !== 401) flash(`Live updates are off: ${err.message}`);
  }
})();
