// Collab's client for browsers and Node (20+): one WebSocket kept open, replies matched by id,
// request timeouts, reconnect with capped and jittered backoff, and loss-free recovery: it
// remembers each room's (epoch, offset), rejoins with `since`, drops duplicates by offset, and
// publishes idempotently (every publish carries a client_msg_id and is sent again, with the
// same id, after a lost connection or an `outcome: "unknown"` error, until it is acknowledged).
//
// The protocol: docs/PROTOCOL.md and the AsyncAPI document served at /asyncapi.json.
// The token never goes into a URL: before each connect the client trades it for a one-use
// ticket (POST /auth/ws-ticket), and the URL carries that. `getToken` supplies a fresh token
// before each connect and whenever the server refuses the current one (4401).
//
// This file is the npm package `clients/js` and is also served by the server at
// /static/collab.js (a copy, kept identical by the test suite).

const FINAL_CLOSES = new Set([1000, 1009, 4403, 4429]); // retrying cannot help
const UNAUTHORIZED = 4401;
const PUBLISH_RETRIES = 5; // re-sends of a publish whose outcome was unknown

export class CollabError extends Error {
  constructor(frame) {
    super(frame.message ?? frame.code);
    this.name = "CollabError";
    this.code = frame.code;
    this.frame = frame;
    this.outcome = frame.outcome;
  }
}

export class CollabSocket extends EventTarget {
  constructor(url, options = {}) {
    super();
    const {
      token,
      getToken,
      endpoint = "chat",
      requestTimeout = 10000,
      backoffMin = 500,
      backoffMax = 30000,
      WebSocket: WebSocketImpl = globalThis.WebSocket,
      fetch: fetchImpl = globalThis.fetch?.bind(globalThis),
      connect = true,
    } = options;
    if (token === undefined && getToken === undefined) throw new TypeError("give token or getToken");
    this.httpBase = url.replace(/^ws/, "http").replace(/\/$/, "");
    this.base = this.httpBase.replace(/^http/, "ws");
    this.endpoint = endpoint;
    this.token = token;
    this.getToken = getToken;
    this.requestTimeout = requestTimeout;
    this.backoffMin = backoffMin;
    this.backoffMax = backoffMax;
    this.WebSocket = WebSocketImpl;
    this.fetch = fetchImpl;
    this.nextId = 1;
    this.pending = new Map(); // id -> {resolve, reject, timer}
    this.unacked = new Map(); // client_msg_id -> publish command not yet acknowledged
    this.positions = new Map(); // room or feed -> {epoch, offset}
    this.joined = new Map(); // room or feed -> join options, rejoined after a reconnect
    this.attempt = 0;
    this.state = "disconnected";
    this.ready = false; // connected and every room rejoined
    this.readyWaiters = [];
    this.closedByUser = false;
    this.failure = null; // why the client gave up for good
    if (connect) this.connect();
  }

  // -- connection ---------------------------------------------------------------------------

  async connect() {
    if (this.closedByUser || this.failure) return;
    this.setState("connecting", { attempt: this.attempt });
    let ticket;
    try {
      // A fresh token before every connect: the last one may have expired meanwhile.
      if (this.getToken) this.token = await this.getToken();
      ticket = await wsTicket(this.httpBase, this.token, this.fetch);
    } catch (error) {
      // 401: the token is no good (expired, or its password changed): a fresh one, or stop.
      this.onClose({ code: error.status === 401 ? UNAUTHORIZED : 1006, reason: String(error.message ?? error) });
      return;
    }
    if (this.closedByUser) return;
    const ws = new this.WebSocket(`${this.base}/ws/${this.endpoint}?ticket=${encodeURIComponent(ticket)}`);
    this.ws = ws;
    ws.onmessage = (event) => this.onFrame(JSON.parse(typeof event.data === "string" ? event.data : String(event.data)));
    ws.onclose = (event) => {
      if (this.ws === ws) this.onClose({ code: event.code, reason: event.reason });
    };
    ws.onerror = () => {}; // a close event follows, with the code
  }

  onClose({ code, reason }) {
    this.ws = null;
    this.ready = false;
    this.welcome = null;
    for (const [id, { reject, timer }] of this.pending) {
      clearTimeout(timer);
      reject(Object.assign(new Error("connection closed"), { code: "connection_lost" }));
      this.pending.delete(id);
    }
    this.emit("close", { code, reason });
    if (this.closedByUser) {
      this.setState("closed", { code, reason });
      return;
    }
    this.setState("disconnected", { code, reason });
    if (FINAL_CLOSES.has(code) || (code === UNAUTHORIZED && !this.getToken)) {
      this.failure = Object.assign(new Error(`closed with ${code} ${reason ?? ""}`.trim()), { code: "closed", closeCode: code });
      this.setState("closed", { code, reason });
      for (const waiter of this.readyWaiters.splice(0)) waiter.reject(this.failure);
      return;
    }
    this.attempt += 1;
    const delay = this.backoff(this.attempt);
    this.setState("reconnecting", { delay: delay / 1000, attempt: this.attempt });
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  backoff(attempt) {
    // Full jitter: clients dropped together do not come back together.
    const ceiling = Math.min(this.backoffMax, this.backoffMin * 2 ** Math.max(0, attempt - 1));
    return ceiling * (0.5 + Math.random() / 2);
  }

  onFrame(frame) {
    if (frame.type === "welcome" && !this.welcome) {
      this.welcome = frame;
      this.attempt = 0;
      this.emit("open", frame);
      this.rejoin();
      return;
    }
    if ("id" in frame) {
      const waiting = this.pending.get(frame.id);
      if (waiting) {
        this.pending.delete(frame.id);
        clearTimeout(waiting.timer);
        if (frame.type === "error") waiting.reject(new CollabError(frame));
        else waiting.resolve(frame);
      } else if (frame.id === null && frame.type === "error") {
        this.emit("error", new CollabError(frame)); // tied to no command (rate limited without an id)
      }
      return;
    }
    if (frame.type === "message" || frame.type === "update") {
      const key = frame.room ?? frame.feed;
      const seen = this.positions.get(key);
      if (seen && seen.epoch === frame.epoch && frame.offset <= seen.offset) return; // duplicate
      this.positions.set(key, { epoch: frame.epoch, offset: frame.offset });
    }
    this.emit(frame.type, frame);
  }

  // Only a refusal (forbidden, too_many_channels...) drops a room. A rejoin answered
  // rate_limited (more rooms than the server's burst) waits for the server's rate and goes on;
  // one answered unavailable (the broker away, a Redis Cluster shard failing over) is tried
  // again with backoff, so a client reconnecting during an outage is back in all its rooms
  // once it ends. Until then it is not ready: what it sends waits, as while disconnected.
  async rejoin() {
    const ws = this.ws;
    const rate = this.rate();
    for (const [key, options] of [...this.joined]) {
      const command = this.endpoint === "chat"
        ? { type: "join", room: key, ...options }
        : { type: "subscribe", feed: key };
      for (let outages = 0; ;) {
        const since = this.positions.get(key);
        if (since) command.since = since;
        try {
          this.afterJoin(key, await this.requestNow(command));
          break;
        } catch (error) {
          if (error.code === "connection_lost") return; // the next connection rejoins
          if (error.code === "timeout") {
            // No reply on a socket still open (a wedged server, a network dropping
            // everything): never ready on it, so a new connection rejoins.
            if (this.ws === ws) ws.close(4000, "no reply to a rejoin");
            return;
          }
          if (error.code === "rate_limited" || error.code === "unavailable") {
            outages += error.code === "unavailable" ? 1 : 0;
            const wait = error.code === "rate_limited" ? 1000 / rate : this.backoff(outages);
            await new Promise((resolve) => setTimeout(resolve, wait));
            if (this.ws !== ws) return; // gone meanwhile; the next connection rejoins
            continue;
          }
          this.joined.delete(key);
          error.rejoin = key; // which room or feed was given up
          this.emit("error", error);
          break;
        }
      }
    }
    this.ready = true;
    this.setState("connected", { welcome: this.welcome });
    for (const waiter of this.readyWaiters.splice(0)) waiter.resolve();
  }

  afterJoin(key, reply) {
    for (const frame of reply.missed) this.onFrame(frame);
    const seen = this.positions.get(key);
    if (!seen || seen.epoch !== reply.epoch || seen.offset < reply.offset) {
      this.positions.set(key, { epoch: reply.epoch, offset: reply.offset });
    }
    this.emit("joined", reply);
  }

  whenReady() {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closedByUser) return Promise.reject(Object.assign(new Error("closed"), { code: "closed" }));
    if (this.ready) return Promise.resolve();
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  // -- requests -----------------------------------------------------------------------------

  /**
   * Send a command once connected; its reply. Rejects on an error reply, a timeout, a lost
   * connection. A command refused as rate_limited (not carried out) is sent again at the
   * server's pace (welcome.limits.rate) for up to requestTimeout, so joining fifty rooms or
   * publishing a burst at once goes through, a little later.
   */
  async request(command) {
    const deadline = Date.now() + this.requestTimeout;
    for (;;) {
      await this.whenReady();
      try {
        return await this.requestNow(command);
      } catch (error) {
        if (error.code !== "rate_limited") throw error;
        const wait = (1000 * (1 + Math.random())) / this.rate(); // jittered: not all back at once
        if (Date.now() + wait > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  }

  rate() {
    return Number(this.welcome?.limits?.rate) || 20;
  }

  requestNow(command) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== 1) {
        reject(Object.assign(new Error("not connected"), { code: "connection_lost" }));
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(Object.assign(new Error(`no reply to ${command.type} within ${this.requestTimeout} ms`), { code: "timeout" }));
      }, this.requestTimeout);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ ...command, id }));
    });
  }

  async join(room, options = {}) {
    const reply = await this.request({ type: "join", room, ...options });
    this.joined.set(room, options);
    this.afterJoin(room, reply);
    return reply;
  }

  async subscribe(feed) {
    const reply = await this.request({ type: "subscribe", feed });
    this.joined.set(feed, {});
    this.afterJoin(feed, reply);
    return reply;
  }

  leave(room) {
    this.joined.delete(room);
    this.positions.delete(room);
    return this.request({ type: "leave", room });
  }

  unsubscribe(feed) {
    this.joined.delete(feed);
    this.positions.delete(feed);
    return this.request({ type: "unsubscribe", feed });
  }

  /**
   * Publish `body` to a joined room; resolves with the ack. Waits while disconnected, and is
   * sent again with the same client_msg_id after a lost connection or `outcome: "unknown"`,
   * so the room gets it once. Rejects on a refusal or a timeout (then retrying with the same
   * `clientMsgId` is safe).
   */
  async publish(room, body, { clientMsgId = newId() } = {}) {
    const command = { type: "publish", room, body, client_msg_id: clientMsgId };
    this.unacked.set(clientMsgId, command);
    let unconfirmed = 0;
    let uncertain = null; // the last reply that left the outcome unknown
    try {
      for (;;) {
        try {
          return await this.request(command);
        } catch (error) {
          if (error.code === "connection_lost") continue; // once reconnected: same id, sent once
          if (error.outcome === "unknown" || error.frame?.delivery === "unknown") {
            // Delivered but not confirmed stored, or maybe delivered (the broker's reply was
            // lost): the same id gets the first message's ack, or publishes it; never twice.
            uncertain = error;
          } else if (uncertain === null) {
            throw error;
          } else if (error.code !== "unavailable" && error.code !== "rate_limited") {
            throw uncertain; // a retry refused otherwise says nothing of the first attempt
          } // else a retry answered "not done": the first attempt may still have gone out
          if (unconfirmed >= PUBLISH_RETRIES) throw uncertain;
          unconfirmed += 1;
          await new Promise((resolve) => setTimeout(resolve, this.backoff(unconfirmed)));
        }
      }
    } finally {
      this.unacked.delete(clientMsgId);
    }
  }

  typing(room) {
    if (this.ready && this.ws?.readyState === 1) this.ws.send(JSON.stringify({ type: "typing", room }));
  }

  history(room, before, limit = 50) {
    return this.request({ type: "history", room, before, limit });
  }

  presence(room) {
    return this.request({ type: "presence", room });
  }

  ping() {
    return this.request({ type: "ping" });
  }

  close() {
    this.closedByUser = true;
    clearTimeout(this.reconnectTimer);
    const closed = Object.assign(new Error("closed"), { code: "closed" });
    for (const waiter of this.readyWaiters.splice(0)) waiter.reject(closed);
    if (this.ws) this.ws.close(1000);
    else this.setState("closed", {});
  }

  setState(state, detail) {
    this.state = state;
    this.emit(state, detail);
    this.emit("state", { state, ...detail });
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function newId() {
  return globalThis.crypto.randomUUID();
}

export async function wsTicket(httpBase, token, fetchImpl = globalThis.fetch) {
  const response = await fetchImpl(`${httpBase}/auth/ws-ticket`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}` },
  });
  if (!response.ok) throw Object.assign(new Error(`ws ticket: ${response.status}`), { status: response.status });
  return (await response.json()).ticket;
}

export async function guestToken(name, httpBase = "", fetchImpl = globalThis.fetch) {
  const response = await fetchImpl(`${httpBase}/auth/guest`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name }),
  });
  if (!response.ok) throw new Error(`guest token: ${response.status}`);
  return (await response.json()).access_token;
}
