// Collab's browser client: one WebSocket, replies matched by id, automatic reconnect with
// backoff, and loss-free recovery: it remembers each room's (epoch, offset) and rejoins with
// `since`, and re-sends unacknowledged publishes with the same client_msg_id.
// Protocol: PROTOCOL.md (version 1). The token never goes into a URL: before each connect the
// client trades it for a one-use ticket (POST /auth/ws-ticket), and the URL carries that.

export class CollabSocket extends EventTarget {
  constructor(url, { token, endpoint = "chat" } = {}) {
    super();
    this.httpBase = url.replace(/^ws/, "http").replace(/\/$/, "");
    this.base = this.httpBase.replace(/^http/, "ws");
    this.endpoint = endpoint;
    this.token = token;
    this.nextId = 1;
    this.pending = new Map(); // id -> {resolve, reject, command}
    this.unacked = new Map(); // client_msg_id -> publish command, re-sent after a reconnect
    this.positions = new Map(); // room or feed -> {epoch, offset}
    this.joined = new Map(); // room or feed -> join/subscribe options
    this.attempt = 0;
    this.closedByUser = false;
    this.connect();
  }

  async connect() {
    let ticket;
    try {
      ticket = await wsTicket(this.httpBase, this.token);
    } catch (error) {
      // 401: the token is no good (expired, or its password changed); anything else may pass.
      if (error.status === 401) {
        this.emit("close", { code: 4401, reason: "token refused" });
        return;
      }
      this.onClose({ code: 1006, reason: String(error) });
      return;
    }
    if (this.closedByUser) return;
    const url = `${this.base}/ws/${this.endpoint}?ticket=${encodeURIComponent(ticket)}`;
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onmessage = (event) => this.onFrame(JSON.parse(event.data));
    ws.onclose = (event) => this.onClose(event);
  }

  onFrame(frame) {
    if (frame.type === "welcome") {
      this.attempt = 0;
      this.welcome = frame;
      this.emit("open", frame);
      this.rejoin();
      return;
    }
    if (frame.id !== undefined && this.pending.has(frame.id)) {
      const { resolve, reject } = this.pending.get(frame.id);
      this.pending.delete(frame.id);
      if (frame.type === "error") reject(Object.assign(new Error(frame.message), frame));
      else resolve(frame);
    }
    if (frame.type === "message" || frame.type === "update") {
      const key = frame.room ?? frame.feed;
      const seen = this.positions.get(key);
      if (seen && seen.epoch === frame.epoch && frame.offset <= seen.offset) return; // duplicate
      this.positions.set(key, { epoch: frame.epoch, offset: frame.offset });
    }
    this.emit(frame.type, frame);
  }

  onClose(event) {
    for (const { reject } of this.pending.values()) reject(new Error("connection closed"));
    this.pending.clear();
    this.emit("close", { code: event.code, reason: event.reason });
    // 4401, 4403 and 4429 need the user, not a retry; 1000 is a normal close.
    if (this.closedByUser || [1000, 4401, 4403, 4429].includes(event.code)) return;
    const delay = Math.min(30000, 500 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    setTimeout(() => this.connect(), delay);
  }

  async rejoin() {
    for (const [key, options] of this.joined) {
      const since = this.positions.get(key);
      try {
        const reply = this.endpoint === "chat"
          ? await this.request({ type: "join", room: key, since, ...options })
          : await this.request({ type: "subscribe", feed: key, since });
        this.afterJoin(key, reply);
      } catch (error) {
        this.emit("error", error);
      }
    }
    for (const command of this.unacked.values()) this.request(command).catch(() => {});
  }

  afterJoin(key, reply) {
    for (const frame of reply.missed) this.onFrame(frame);
    this.positions.set(key, { epoch: reply.epoch, offset: reply.offset });
    this.emit("joined", reply);
  }

  request(command) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new Error("not connected"));
        return;
      }
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ ...command, id }));
    });
  }

  async join(room, options = {}) {
    this.joined.set(room, options);
    const reply = await this.request({ type: "join", room, ...options });
    this.afterJoin(room, reply);
    return reply;
  }

  async subscribe(feed) {
    this.joined.set(feed, {});
    const reply = await this.request({ type: "subscribe", feed });
    this.afterJoin(feed, reply);
    return reply;
  }

  leave(room) {
    this.joined.delete(room);
    this.positions.delete(room);
    return this.request({ type: "leave", room });
  }

  async publish(room, body) {
    const clientMsgId = crypto.randomUUID();
    const command = { type: "publish", room, body, client_msg_id: clientMsgId };
    this.unacked.set(clientMsgId, command);
    try {
      const ack = await this.request(command);
      this.unacked.delete(clientMsgId);
      return ack;
    } catch (error) {
      // Kept in `unacked` when the connection dropped: re-sent, idempotently, on reconnect.
      if (error.code && error.code !== "unavailable") this.unacked.delete(clientMsgId);
      throw error;
    }
  }

  typing(room) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: "typing", room }));
  }

  history(room, before, limit = 50) {
    return this.request({ type: "history", room, before, limit });
  }

  close() {
    this.closedByUser = true;
    this.ws?.close(1000);
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

export async function wsTicket(httpBase, token) {
  const response = await fetch(`${httpBase}/auth/ws-ticket`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}` },
  });
  if (!response.ok) throw Object.assign(new Error(`ws ticket: ${response.status}`), { status: response.status });
  return (await response.json()).ticket;
}

export async function guestToken(name) {
  const response = await fetch("/auth/guest", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name }),
  });
  if (!response.ok) throw new Error(`guest token: ${response.status}`);
  return (await response.json()).access_token;
}
