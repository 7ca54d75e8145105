// Subscribers in Node for the rate phase of the fan-out benchmark (`loadtests/fanout.py
// --node-subscribers`), as the outside harness that asked for the tail target used: `ws`
// clients on one core. Node reads a delivery for less of its core than the Python generator,
// which on two cores cannot keep up with a server that writes 2,000 members in under ~40 ms.
//
// argv[2] is JSON: {base, path, room, count, concurrency, guests, token}. Each subscriber signs
// in as a guest of its own (guests) or uses `token`, connects, joins (presence events on for
// guests, as a browser; off otherwise). Prints {"ready": n, "failed": k} once all are in. Then
// reads lines on stdin: "record" starts recording latencies; "done <count> <timeout>" waits
// until every subscriber has <count> recorded messages (or <timeout> seconds pass), prints
// {"latencies": [...], "delivered": n, "gaps": k, "disconnected": d, "others": {type: n}}
// and exits (`others`: frames other than messages read while recording).
// Latencies are process.hrtime (CLOCK_MONOTONIC) less the body's `t`, Python's time.monotonic().
"use strict";

const http = require("node:http");
const readline = require("node:readline");
const WebSocket = require("ws");

const config = JSON.parse(process.argv[2]);
const subs = [];
const latencies = [];
const others = {}; // frames other than `message` read while recording, by type
let recording = false;
let failed = 0;

function monotonic() {
  return Number(process.hrtime.bigint()) / 1e9;
}

// A connection per sign-in, closed after it (as the Python generator's door): each guest is a
// browser of its own, and no pooled connection is left for the server to time out and close
// in the middle of the measurement, which the peers' runs (no sign-in) would not have.
function token(i) {
  if (!config.guests) return Promise.resolve(config.token || null);
  const [host, port] = config.base.split(":");
  const body = JSON.stringify({ name: `guest ${i}` });
  return new Promise((resolve, reject) => {
    const request = http.request(
      {
        host,
        port: Number(port),
        path: "/auth/guest",
        method: "POST",
        agent: false,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
      },
      (response) => {
        let text = "";
        response.setEncoding("utf8");
        response.on("data", (chunk) => (text += chunk));
        response.on("end", () => {
          if (response.statusCode !== 200) reject(new Error(`sign-in: ${response.statusCode}`));
          else resolve(JSON.parse(text).access_token);
        });
      },
    );
    request.on("error", reject);
    request.end(body);
  });
}

async function open(i) {
  let credential;
  try {
    credential = await token(i);
  } catch {
    failed += 1;
    return;
  }
  const query = credential ? `?token=${encodeURIComponent(credential)}` : "";
  await new Promise((resolve) => {
    const ws = new WebSocket(`ws://${config.base}${config.path}${query}`, { perMessageDeflate: false });
    const sub = { ws, last: 0, recorded: 0, gaps: 0, open: false };
    const give_up = () => {
      if (!sub.open) failed += 1;
      sub.open = false;
      resolve();
    };
    ws.on("message", (data) => {
      const now = monotonic();
      const frame = JSON.parse(data);
      if (frame.type === "message") {
        const body = frame.body;
        if (recording) {
          latencies.push(now - body.t);
          if (sub.recorded > 0 && body.seq !== sub.last + 1) sub.gaps += 1;
          sub.recorded += 1;
        }
        sub.last = body.seq;
      } else if (recording) {
        others[frame.type] = (others[frame.type] || 0) + 1;
      } else if (frame.type === "welcome") {
        const join = { type: "join", id: 0, room: config.room };
        if (!config.guests) join.presence_events = false;
        ws.send(JSON.stringify(join));
      } else if (frame.type === "joined") {
        sub.open = true;
        subs.push(sub);
        resolve();
      } else if (frame.type === "error") {
        give_up();
      }
    });
    ws.on("error", give_up);
    ws.on("close", give_up);
  });
}

async function main() {
  let next = 0;
  const worker = async () => {
    while (next < config.count) await open(next++);
  };
  await Promise.all(Array.from({ length: Math.min(config.concurrency, config.count) }, worker));
  // The crowd's sign-ins leave garbage (responses, pooled sockets) that the Collab runs have
  // and the peers' do not: collected now, not in the middle of the measurement (as the Python
  // generator collects and freezes its own). `--expose-gc` makes `gc` available.
  if (typeof global.gc === "function") global.gc();
  process.stdout.write(JSON.stringify({ ready: subs.length, failed }) + "\n");
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const [command, count, timeout] = line.trim().split(/\s+/);
    if (command === "record") {
      recording = true;
    } else if (command === "done") {
      const deadline = monotonic() + Number(timeout);
      while (monotonic() < deadline && subs.some((s) => s.open && s.recorded < Number(count))) {
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const result = {
        latencies,
        delivered: subs.reduce((n, s) => n + s.recorded, 0),
        gaps: subs.reduce((n, s) => n + s.gaps, 0),
        disconnected: subs.filter((s) => !s.open).length,
        others,
      };
      process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
      return;
    }
  }
}

main();
