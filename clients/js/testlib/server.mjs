// A real `collab serve` for the tests: its own port and SQLite file, stopped by its PID.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";
import { CollabSocket, guestToken } from "../collab.js";

const PYTHON = process.env.COLLAB_PYTHON || "python3";
const REPO = new URL("../../..", import.meta.url).pathname;

export async function freePort() {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

export class Server {
  constructor({ folder = mkdtempSync(join(tmpdir(), "collab-js-")), port, settings = {} } = {}) {
    this.folder = folder;
    this.port = port;
    this.settings = settings; // extra COLLAB_* variables
  }

  get database() {
    return join(this.folder, "collab.db");
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    this.port ??= await freePort();
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("COLLAB_")));
    Object.assign(env, {
      COLLAB_ENV: "test",
      COLLAB_DATABASE_URL: `sqlite+aiosqlite:///${this.database}`,
      COLLAB_SECRET_KEY: "js-client-tests-" + "s".repeat(40),
      COLLAB_AUTH_RATE_LIMIT: "10000",
      COLLAB_AUTH_RATE_BURST: "10000",
      COLLAB_SHUTDOWN_TIMEOUT: "3",
      PYTHONUNBUFFERED: "1",
      ...this.settings,
    });
    this.output = "";
    this.process = spawn(PYTHON, ["-m", "collab", "serve", "--port", String(this.port)], {
      cwd: REPO,
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    for (const stream of [this.process.stdout, this.process.stderr]) {
      stream.on("data", (chunk) => { this.output = (this.output + chunk).slice(-5000); });
    }
    const deadline = Date.now() + 30000;
    while (Date.now() < deadline) {
      if (this.process.exitCode !== null) throw new Error(`server exited:\n${this.output}`);
      try {
        if ((await fetch(`${this.url}/healthz`)).ok) return this;
      } catch {}
      await sleep(100);
    }
    await this.stop();
    throw new Error(`server did not answer:\n${this.output}`);
  }

  signal(name) {
    if (this.process && this.process.exitCode === null) process.kill(this.process.pid, name);
  }

  async stop() {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 15000);
    await exited;
    clearTimeout(timer);
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export async function until(check, what, timeout = 15000) {
  const deadline = Date.now() + timeout;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeout} ms`);
    await sleep(20);
  }
}

/** A client on `ws` (Node 20's own WebSocket is behind a flag), recording events and states. */
export function client(server, options = {}) {
  const socket = new CollabSocket(server.url, {
    WebSocket,
    backoffMin: 100,
    backoffMax: 1000,
    ...options,
    connect: false, // once the listeners below are on, so that they see every state
  });
  socket.events = [];
  socket.states = [];
  for (const type of ["message", "joined", "update", "error"]) {
    socket.addEventListener(type, (event) => socket.events.push({ kind: type, ...event.detail }));
  }
  socket.addEventListener("state", (event) => socket.states.push(event.detail));
  socket.connect();
  return socket;
}

export async function guest(server, name) {
  return guestToken(name, server.url);
}

export async function storedMessages(server, room) {
  const token = await guest(server, "reader");
  const response = await fetch(`${server.url}/rooms/${room}/messages?limit=200`, {
    headers: { authorization: `Bearer ${token}` },
  });
  return (await response.json()).messages;
}

/** Hold an exclusive lock on the server's SQLite file (its writes wait) until `release()`. */
export async function lockDatabase(server) {
  const code = [
    "import sqlite3, sys",
    "db = sqlite3.connect(sys.argv[1], isolation_level=None)",
    "db.execute('BEGIN EXCLUSIVE')",
    "print('locked', flush=True)",
    "sys.stdin.read()",
    "db.execute('ROLLBACK')",
  ].join("\n");
  const child = spawn(PYTHON, ["-c", code, server.database], { stdio: ["pipe", "pipe", "inherit"] });
  await new Promise((resolve, reject) => {
    child.stdout.once("data", resolve);
    child.once("exit", (status) => reject(new Error(`lock helper exited with ${status}`)));
  });
  return {
    release: () => new Promise((resolve) => {
      child.once("exit", resolve);
      child.stdin.end();
    }),
  };
}

/** A counter from the server's /metrics (0 when absent). */
export async function metric(server, name) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "_total "));
  return line ? Number(line.split(" ").at(-1)) : 0;
}

/** Why a test that starts a redis-server must skip: none is installed (never in CI). */
export const noRedisServer =
  !process.env.CI && spawnSync("redis-server", ["--version"]).error ? "redis-server is not installed" : false;

/** A redis-server of the test's own on a free port (to stall with SIGSTOP), stopped by its PID. */
export async function startRedis() {
  const port = await freePort();
  const folder = mkdtempSync(join(tmpdir(), "collab-js-redis-"));
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "",
    "--appendonly", "no", "--dir", folder], { stdio: "ignore" });
  const deadline = Date.now() + 10000;
  for (;;) {
    const up = await new Promise((resolve) => {
      const probe = connect(port, "127.0.0.1", () => { probe.end(); resolve(true); });
      probe.once("error", () => resolve(false));
    });
    if (up) break;
    if (child.exitCode !== null || Date.now() > deadline) throw new Error("redis-server did not start");
    await sleep(20);
  }
  return {
    url: `redis://127.0.0.1:${port}/0`,
    signal: (name) => { if (child.exitCode === null) process.kill(child.pid, name); },
    stop: () => { if (child.exitCode === null) child.kill("SIGKILL"); },
  };
}
