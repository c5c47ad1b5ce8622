// The driftwatch live view: draws the component graph by zone and lists deviations as the agent
// streams them over server-sent events (/api/events).
//
// Every string from the agent (executables, argv, comm, ids) reaches the DOM through textContent
// or an attribute set with setAttribute, never through innerHTML, so markup in a process name is
// shown as text.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Deviations kept in the list; older ones leave the page but stay in the agent's history.
  const MAX_DEVIATIONS = 200;
  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 15000;

  const NODE_WIDTH = 200;
  const NODE_HEIGHT = 46;
  const NODE_GAP = 28;
  const COLUMN_WIDTH = 340;
  const ZONE_PADDING = 22;
  const ZONE_HEADER = 30;
  const MARGIN = 20;

  const state = {
    source: null,
    retryMs: RETRY_MIN_MS,
    retryTimer: null,
    lastSequence: 0,
    graph: null,
    // Newest first.
    deviations: [],
    drawPending: false,
  };

  const elements = {};

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svgElement(tag, attributes) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      node.setAttribute(name, String(value));
    }
    return node;
  }

  function svgText(x, y, className, text) {
    const node = svgElement("text", { x, y, class: className });
    node.textContent = text;
    return node;
  }

  function svgTitle(text) {
    const title = svgElement("title");
    title.textContent = text;
    return title;
  }

  function shorten(text, length) {
    return text.length > length ? text.slice(0, length - 1) + "\u2026" : text;
  }

  function formatTime(ms) {
    return new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  // Connection

  function setConnection(status, text) {
    elements.connection.className = "connection " + status;
    elements.connection.textContent = text;
  }

  function connect() {
    state.retryTimer = null;
    const url = state.lastSequence > 0 ? "/api/events?from=" + (state.lastSequence + 1) : "/api/events";
    const source = new EventSource(url);
    state.source = source;
    setConnection("connecting", "connecting");

    source.addEventListener("open", () => {
      state.retryMs = RETRY_MIN_MS;
      setConnection("live", "live");
    });
    source.addEventListener("graph", (event) => {
      state.graph = JSON.parse(event.data);
      scheduleDraw();
    });
    source.addEventListener("deviation", (event) => addDeviation(JSON.parse(event.data)));
    source.addEventListener("loss", (event) => addLoss(JSON.parse(event.data)));
    source.addEventListener("reset", (event) => reset(JSON.parse(event.data)));
    source.addEventListener("error", () => {
      // The page reconnects itself with the last sequence it holds, rather than through the
      // browser's retry, so that the resume point and the delay are the page's own.
      source.close();
      if (state.source !== source) return;
      state.source = null;
      const seconds = Math.round(state.retryMs / 1000);
      setConnection("reconnecting", "disconnected, retrying in " + seconds + " s");
      state.retryTimer = setTimeout(connect, state.retryMs);
      state.retryMs = Math.min(state.retryMs * 2, RETRY_MAX_MS);
    });
  }

  // Closes the stream and opens a new one that resumes after the last sequence received.
  function reconnectNow() {
    if (state.retryTimer) clearTimeout(state.retryTimer);
    if (state.source) state.source.close();
    state.source = null;
    connect();
  }

  function setLastSequence(sequence) {
    state.lastSequence = sequence;
    elements.lastSequence.textContent = "last sequence: " + sequence;
  }

  // Deviations

  function addDeviation(deviation) {
    // A resumed stream starts after the last sequence, so a repeat only comes from a stale stream.
    if (deviation.sequence <= state.lastSequence) return;
    setLastSequence(deviation.sequence);
    state.deviations.unshift(deviation);
    elements.list.prepend(renderDeviation(deviation));
    while (state.deviations.length > MAX_DEVIATIONS) {
      state.deviations.pop();
      elements.list.lastElementChild.remove();
    }
    updateCount();
    scheduleDraw();
  }

  function updateCount() {
    elements.count.textContent = String(state.deviations.length);
    elements.empty.hidden = state.deviations.length > 0;
  }

  function addLoss(loss) {
    if (loss.last_sequence > state.lastSequence) setLastSequence(loss.last_sequence);
    const why =
      loss.reason === "history-evicted"
        ? "older than the agent's replay history"
        : "dropped because this page read too slowly";
    const text =
      loss.missed + " deviation(s) not received (sequences " + loss.first_sequence + " to " +
      loss.last_sequence + "): " + why;
    elements.losses.append(element("li", "loss", text));
  }

  function reset(notice) {
    state.deviations = [];
    elements.list.replaceChildren();
    elements.losses.replaceChildren();
    elements.losses.append(
      element("li", "loss", "The agent restarted (it is at sequence " + notice.next + "); the list starts again."),
    );
    setLastSequence(0);
    updateCount();
  }

  function describeProcess(process) {
    const user = process.user ? process.user + " (" + process.uid + ")" : "uid " + process.uid;
    return "pid " + process.pid + ", " + user + ", comm " + process.comm;
  }

  function evidenceRow(list, label, value, code) {
    if (value === undefined || value === null || value === "") return;
    list.append(element("dt", null, label));
    const dd = element("dd");
    dd.append(code ? element("code", null, value) : document.createTextNode(String(value)));
    list.append(dd);
  }

  function renderDeviation(deviation) {
    const item = element("li", "deviation severity-" + deviation.severity);
    item.dataset.sequence = String(deviation.sequence);

    const head = element("div", "deviation-head");
    head.append(element("span", "severity", deviation.severity));
    head.append(element("span", "category", deviation.category));
    if (deviation.node) head.append(element("span", "node", deviation.node));
    head.append(element("span", "sequence", "#" + deviation.sequence));
    head.append(element("time", null, formatTime(deviation.last_seen_ms)));
    item.append(head);
    item.append(element("p", "summary", deviation.summary));

    const evidence = element("dl", "evidence");
    let flow = deviation.source;
    if (deviation.destination) flow += " \u2192 " + deviation.destination;
    if (deviation.port !== null) flow += " " + (deviation.protocol || "tcp") + "/" + deviation.port;
    evidenceRow(evidence, "flow", flow);
    const process = deviation.process;
    if (process) {
      evidenceRow(evidence, "executable", process.exe, true);
      evidenceRow(evidence, "process", describeProcess(process));
      const argv = process.argv.join(" ") + (process.argv_truncated ? " \u2026" : "");
      evidenceRow(evidence, "argv", argv, true);
      evidenceRow(evidence, "cgroup", process.cgroup, true);
      const ancestry = process.ancestry.map(([pid, exe]) => exe + " (" + pid + ")").join(" \u2190 ");
      evidenceRow(evidence, "ancestry", ancestry, true);
    }
    if (deviation.peer_process) {
      evidenceRow(evidence, "peer", deviation.peer_process.exe + " (" + deviation.peer_process.pid + ")", true);
    }
    const endpoints = [deviation.local_addr, deviation.remote_addr].filter(Boolean).join(" \u2192 ");
    evidenceRow(evidence, "endpoints", endpoints, true);
    const zones = [deviation.source_zone, deviation.destination_zone].filter(Boolean).join(" \u2192 ");
    evidenceRow(evidence, "zones", zones);
    evidenceRow(evidence, "seen", deviation.count + " time(s) since " + formatTime(deviation.first_seen_ms));
    evidenceRow(evidence, "id", deviation.id, true);
    item.append(evidence);

    if (deviation.resolution) {
      const details = element("details", "resolution");
      details.append(element("summary", null, "YAML that would declare it"));
      details.append(element("pre", null, deviation.resolution));
      item.append(details);
    }
    return item;
  }

  // Graph

  function scheduleDraw() {
    if (state.drawPending) return;
    state.drawPending = true;
    requestAnimationFrame(() => {
      state.drawPending = false;
      drawGraph();
    });
  }

  // Edges differ by protocol too: a deviation on udp/53 must not colour the declared tcp/53 edge.
  function edgeKey(source, destination, protocol, port) {
    return source + "\u0000" + destination + "\u0000" + protocol + "\u0000" + port;
  }

  // Edges and nodes named by the deviations in the list.
  function flaggedByDeviations() {
    const edges = new Map();
    const nodes = new Map();
    for (const deviation of state.deviations) {
      if (deviation.destination && deviation.port !== null) {
        const key = edgeKey(deviation.source, deviation.destination, deviation.protocol || "tcp", deviation.port);
        edges.set(key, (edges.get(key) || 0) + 1);
      } else {
        nodes.set(deviation.source, (nodes.get(deviation.source) || 0) + 1);
      }
    }
    return { edges, nodes };
  }

  function layout(graph) {
    const columns = graph.zones.map((zone) => ({ zone, nodes: [] }));
    const byZone = new Map(columns.map((column) => [column.zone.id, column]));
    let outside = null;
    for (const node of graph.nodes) {
      let column = node.zone !== null ? byZone.get(node.zone) : undefined;
      if (!column) {
        if (!outside) outside = { zone: { id: "outside every zone", trust: null }, nodes: [] };
        column = outside;
      }
      column.nodes.push(node);
    }
    if (outside) columns.push(outside);
    const kindOrder = { zone: 0, external: 1, declared: 2, discovered: 3 };
    const positions = new Map();
    let height = 0;
    columns.forEach((column, index) => {
      column.nodes.sort((a, b) => kindOrder[a.kind] - kindOrder[b.kind] || a.id.localeCompare(b.id));
      column.x = MARGIN + index * COLUMN_WIDTH;
      column.nodes.forEach((node, row) => {
        const x = column.x + ZONE_PADDING;
        const y = MARGIN + ZONE_HEADER + ZONE_PADDING + row * (NODE_HEIGHT + NODE_GAP);
        positions.set(node.id, { x, y, column: index });
      });
      const rows = Math.max(column.nodes.length, 1);
      column.height = ZONE_HEADER + 2 * ZONE_PADDING + rows * NODE_HEIGHT + (rows - 1) * NODE_GAP;
      height = Math.max(height, column.height);
    });
    const zoneWidth = NODE_WIDTH + 2 * ZONE_PADDING;
    const width = MARGIN * 2 + Math.max(columns.length - 1, 0) * COLUMN_WIDTH + zoneWidth + 60;
    return { columns, positions, width, height: height + MARGIN * 2 };
  }

  function edgePath(from, to, offset) {
    if (from.column === to.column) {
      // Same zone: an arc that leaves and re-enters on the right side.
      const x = from.x + NODE_WIDTH;
      const y1 = from.y + NODE_HEIGHT / 2 + offset;
      const y2 = to.y + NODE_HEIGHT / 2 + offset;
      const bulge = 40 + Math.abs(y2 - y1) / 4 + Math.abs(offset);
      return { d: `M ${x} ${y1} C ${x + bulge} ${y1}, ${x + bulge} ${y2}, ${x} ${y2}`, lx: x + bulge * 0.75, ly: (y1 + y2) / 2 };
    }
    const forward = to.column > from.column;
    const x1 = forward ? from.x + NODE_WIDTH : from.x;
    const x2 = forward ? to.x : to.x + NODE_WIDTH;
    const y1 = from.y + NODE_HEIGHT / 2 + offset;
    const y2 = to.y + NODE_HEIGHT / 2 + offset;
    const dx = (x2 - x1) / 2;
    return { d: `M ${x1} ${y1} C ${x1 + dx} ${y1}, ${x2 - dx} ${y2}, ${x2} ${y2}`, lx: (x1 + x2) / 2, ly: (y1 + y2) / 2 + offset };
  }

  function defineMarkers(svg) {
    const defs = svgElement("defs");
    for (const name of ["declared-seen", "declared-unseen", "undeclared", "deviation", "denied"]) {
      const marker = svgElement("marker", {
        id: "arrow-" + name,
        viewBox: "0 0 10 10",
        refX: 9,
        refY: 5,
        markerWidth: 7,
        markerHeight: 7,
        orient: "auto-start-reverse",
      });
      marker.append(svgElement("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow " + name }));
      defs.append(marker);
    }
    svg.append(defs);
  }

  function drawGraph() {
    const graph = state.graph;
    const svg = elements.svg;
    svg.replaceChildren();
    if (!graph || !graph.zones) return;
    defineMarkers(svg);

    const { columns, positions, width, height } = layout(graph);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const flagged = flaggedByDeviations();

    const zoneLayer = svgElement("g", { class: "zones" });
    for (const column of columns) {
      const group = svgElement("g", { class: "zone-box", "data-zone": column.zone.id });
      group.append(
        svgElement("rect", {
          x: column.x,
          y: MARGIN,
          width: NODE_WIDTH + 2 * ZONE_PADDING,
          height: column.height,
          rx: 10,
        }),
      );
      const trust = column.zone.trust === null ? "" : "  trust " + column.zone.trust;
      group.append(svgText(column.x + 12, MARGIN + 20, "zone-label", shorten(column.zone.id, 22) + trust));
      zoneLayer.append(group);
    }
    svg.append(zoneLayer);

    // Edges between the same two nodes fan out so that each port stays readable.
    const pairCounts = new Map();
    const edgeLayer = svgElement("g", { class: "edges" });
    const labelLayer = svgElement("g", { class: "edge-labels" });
    for (const edge of graph.edges) {
      const from = positions.get(edge.source);
      const to = positions.get(edge.destination);
      if (!from || !to) continue;
      // Both directions share one count, so a flow and its reverse do not overlap.
      const pair = [edge.source, edge.destination].sort().join("\u0000");
      const index = pairCounts.get(pair) || 0;
      pairCounts.set(pair, index + 1);
      const offset = (index % 2 === 0 ? 1 : -1) * Math.ceil(index / 2) * 8;

      const deviations = flagged.edges.get(edgeKey(edge.source, edge.destination, edge.protocol, edge.port)) || 0;
      const style = deviations > 0 ? "deviation" : edge.state;
      const { d, lx, ly } = edgePath(from, to, offset);
      const path = svgElement("path", {
        d,
        class: "edge " + style,
        "marker-end": "url(#arrow-" + style + ")",
        "data-source": edge.source,
        "data-destination": edge.destination,
        "data-port": edge.port,
        "data-protocol": edge.protocol,
        "data-state": edge.state,
      });
      const lines = [
        edge.source + " \u2192 " + edge.destination + " " + edge.protocol + "/" + edge.port,
        edge.state.replace("-", " ") + (deviations > 0 ? ", " + deviations + " deviation(s)" : ""),
        edge.connections + " connection(s)" + (edge.last_seen_ms ? ", last " + formatTime(edge.last_seen_ms) : ""),
      ];
      for (const example of edge.examples) lines.push("pid " + example.pid + " " + example.exe);
      path.append(svgTitle(lines.join("\n")));
      edgeLayer.append(path);
      labelLayer.append(svgText(lx, ly - 4, "edge-label " + style, ":" + edge.port));
    }
    svg.append(edgeLayer);

    const nodeLayer = svgElement("g", { class: "nodes" });
    for (const node of graph.nodes) {
      const position = positions.get(node.id);
      const deviations = flagged.nodes.get(node.id) || 0;
      const group = svgElement("g", {
        class: "node " + node.kind + (deviations > 0 ? " flagged" : ""),
        "data-id": node.id,
      });
      const hosts = node.hosts || [];
      if (hosts.length > 0) group.setAttribute("data-hosts", hosts.join(" "));
      group.append(
        svgElement("rect", { x: position.x, y: position.y, width: NODE_WIDTH, height: NODE_HEIGHT, rx: node.kind === "declared" ? 6 : 18 }),
      );
      group.append(svgText(position.x + 10, position.y + 19, "node-label", shorten(node.id, 27)));
      const tags = [];
      if (node.kind !== "declared") tags.push(node.kind === "discovered" ? "unknown process" : node.kind);
      if (node.exposed) tags.push("exposed");
      if (node.criticality === "high" || node.criticality === "critical") tags.push(node.criticality);
      if (deviations > 0) tags.push(deviations + " deviation(s)");
      if (hosts.length === 1) tags.push("on " + hosts[0]);
      if (hosts.length > 1) tags.push("on " + hosts.length + " nodes");
      group.append(svgText(position.x + 10, position.y + 36, "node-tags", tags.join(" \u00b7 ")));
      let title = node.id + (node.zone ? " (zone " + node.zone + ")" : "");
      if (hosts.length > 0) title += "\non " + hosts.join(", ");
      group.append(svgTitle(title));
      nodeLayer.append(group);
    }
    svg.append(nodeLayer);
    svg.append(labelLayer);

    const counts = { "declared-seen": 0, "declared-unseen": 0, undeclared: 0, denied: 0 };
    for (const edge of graph.edges) counts[edge.state] += 1;
    elements.graphInfo.textContent =
      graph.nodes.length + " nodes, " + counts["declared-seen"] + " declared flows seen, " +
      counts["declared-unseen"] + " not seen, " + counts.undeclared + " undeclared";
    elements.graphNote.hidden = !(graph.omitted_edges > 0);
    elements.graphNote.textContent =
      graph.omitted_edges > 0 ? graph.omitted_edges + " observed edges idle the longest are not drawn." : "";
  }

  function start() {
    elements.connection = document.getElementById("connection");
    elements.lastSequence = document.getElementById("last-sequence");
    elements.graphInfo = document.getElementById("graph-info");
    elements.graphNote = document.getElementById("graph-note");
    elements.svg = document.getElementById("graph");
    elements.list = document.getElementById("deviations");
    elements.losses = document.getElementById("losses");
    elements.count = document.getElementById("deviation-count");
    elements.empty = document.getElementById("no-deviations");
    // For scripts and tests driving the page: force a reconnect, read the resume point.
    window.driftwatchLive = {
      reconnectNow,
      lastSequence: () => state.lastSequence,
    };
    connect();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
