// The package against a real `collab serve`: reconnect with backoff, rejoin with recovery,
// offline publishes sent exactly once, token refresh, request timeouts, state events.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, test } from "node:test";
import { Server, client, guest, lockDatabase, metric, noRedisServer, sleep, startRedis, storedMessages, until } from "../testlib/server.mjs";
import { CollabError, CollabSocket } from "../collab.js";

const room = () => `js-${randomUUID().slice(0, 8)}`;
let server;
const opened = [];
const open = (options, target = server) => {
  const socket = client(target, options);
  opened.push(socket);
  return socket;
};

before(async () => {
  server = await new Server().start();
});

after(async () => {
  for (const socket of opened) socket.close();
  await server.stop();
});

test("connects with a ticket, joins, publishes with a client_msg_id and gets its ack", async () => {
  const ann = open({ token: await guest(server, "ann") });
  const name = room();
  await ann.join(name, { presence_events: false });
  const ack = await ann.publish(name, { text: "hi" });
  assert.equal(ack.type, "ack");
  assert.equal(ack.offset, 1);
  await until(() => ann.events.some((e) => e.kind === "message"), "own message");
  const message = ann.events.find((e) => e.kind === "message");
  assert.match(message.client_msg_id, /^[0-9a-f-]{36}$/); // always sent
  assert.equal(ann.unacked.size, 0);
  assert.deepEqual(ann.states.map((s) => s.state).slice(0, 2), ["connecting", "connected"]);
});

test("a lost connection: state events, backoff, rejoin recovers exactly what was missed", async () => {
  const ann = open({ token: await guest(server, "ann"), backoffMin: 400 });
  const bob = open({ token: await guest(server, "bob") });
  const name = room();
  await ann.join(name, { presence_events: false });
  await bob.join(name, { presence_events: false });
  await bob.publish(name, { n: 0 });
  await until(() => ann.events.some((e) => e.kind === "message"), "first message");
  ann.ws.terminate(); // the network goes: no close frame
  await until(() => ann.state === "reconnecting", "reconnecting");
  // Published while ann is away (its backoff is at least 200 ms): recovered on rejoin.
  await bob.publish(name, { n: 1 });
  await bob.publish(name, { n: 2 });
  await until(() => ann.events.filter((e) => e.kind === "joined").length === 2, "rejoined");
  const rejoined = ann.events.filter((e) => e.kind === "joined")[1];
  assert.equal(rejoined.recovered, true);
  assert.deepEqual(rejoined.missed.map((m) => m.body.n), [1, 2]);
  assert.deepEqual(ann.events.filter((e) => e.kind === "message").map((m) => m.offset), [1, 2, 3]);
  const states = ann.states.map((s) => s.state);
  assert.deepEqual(states.slice(-4), ["disconnected", "reconnecting", "connecting", "connected"]);
  const disconnected = ann.states.findLast((s) => s.state === "disconnected");
  assert.equal(disconnected.code, 1006);
  const reconnecting = ann.states.findLast((s) => s.state === "reconnecting");
  assert.ok(reconnecting.delay >= 0.2 && reconnecting.delay <= 0.4, String(reconnecting.delay));
});

test("publishes made offline are sent exactly once, and never again after their ack", async () => {
  const restarting = await new Server().start();
  try {
    const ann = open({ token: await guest(restarting, "ann") }, restarting);
    const name = room();
    await ann.join(name, { presence_events: false });
    await ann.publish(name, { n: 0 });
    await restarting.stop(); // 1001: reconnect and recover
    await until(() => ann.state === "reconnecting", "reconnecting");
    assert.ok(ann.states.some((s) => s.state === "disconnected" && s.code === 1001));
    const offline = [ann.publish(name, { n: 1 }), ann.publish(name, { n: 2 })];
    assert.equal(ann.unacked.size, 2);
    await restarting.start(); // same port, same database
    const acks = await Promise.all(offline);
    assert.deepEqual(acks.map((a) => a.offset).sort(), [2, 3]);
    assert.equal(ann.unacked.size, 0); // acknowledged: nothing left to send again
    // Another reconnect sends nothing again (the defect of the old client).
    ann.ws.terminate();
    await until(() => ann.state === "reconnecting", "reconnecting again");
    await until(() => ann.state === "connected", "connected again");
    await ann.ping();
    const stored = await storedMessages(restarting, name);
    assert.deepEqual(stored.map((m) => m.body.n), [0, 1, 2]);
    assert.equal(new Set(stored.map((m) => m.client_msg_id)).size, 3);
  } finally {
    await restarting.stop();
  }
});

test("getToken is asked before connecting and again when the token is refused", async () => {
  const good = await guest(server, "ann");
  const handed = [];
  const ann = open({
    getToken: async () => {
      const token = handed.length === 0 ? "not-a-token" : good;
      handed.push(token);
      return token;
    },
  });
  await ann.whenReady();
  assert.deepEqual(handed.slice(0, 2), ["not-a-token", good]);
  assert.ok(ann.states.some((s) => s.state === "disconnected" && s.code === 4401));
  assert.equal(ann.welcome.user.name, "ann");
  // Without getToken a refused token ends the session, and says so.
  const alone = open({ token: "not-a-token" });
  await assert.rejects(alone.whenReady(), /4401/);
  assert.equal(alone.state, "closed");
});

test("a request whose reply never comes times out", async () => {
  const ann = open({ token: await guest(server, "ann"), requestTimeout: 500 });
  await ann.whenReady();
  server.signal("SIGSTOP"); // the server stops answering, without closing anything
  try {
    await assert.rejects(ann.ping(), (error) => error.code === "timeout");
  } finally {
    server.signal("SIGCONT");
  }
  assert.equal((await ann.ping()).type, "pong");
  assert.equal(ann.pending.size, 0);
});

test("feeds: subscribe, updates, resubscribe from the last offset", async () => {
  const dash = open({ token: await guest(server, "dash"), endpoint: "live" });
  const reply = await dash.subscribe("items");
  assert.equal(reply.type, "subscribed");
  const editor = await guest(server, "editor");
  const created = await fetch(`${server.url}/items`, {
    method: "POST",
    headers: { authorization: `Bearer ${editor}`, "content-type": "application/json" },
    body: JSON.stringify({ title: "from the js tests" }),
  });
  assert.equal(created.status, 201);
  await until(() => dash.events.some((e) => e.kind === "update"), "an update");
  assert.equal(dash.events.find((e) => e.kind === "update").data.op, "created");
  dash.ws.terminate();
  await until(() => dash.events.filter((e) => e.kind === "joined").length === 2, "resubscribed");
  assert.equal(dash.events.filter((e) => e.kind === "joined")[1].recovered, true);
  await sleep(0);
});

test("a publish whose storage did not confirm is sent again with the same id, once", async () => {
  const stalling = await new Server({ settings: { COLLAB_PERSIST_TIMEOUT: "0.3" } }).start();
  try {
    const ann = open({ token: await guest(stalling, "ann") }, stalling);
    const name = room();
    await ann.join(name, { presence_events: false });
    const lock = await lockDatabase(stalling); // storage stalls past the persist timeout
    let ack;
    const publishing = ann.publish(name, { n: 1 }).then((reply) => { ack = reply; });
    try {
      await until(async () => (await metric(stalling, "collab_messages_unconfirmed_replies")) >= 1, "outcome unknown");
      assert.equal(ack, undefined); // not acknowledged: it is being retried
      assert.equal(ann.unacked.size, 1);
    } finally {
      await lock.release();
    }
    await publishing;
    assert.equal(ack.offset, 1);
    assert.equal(ann.unacked.size, 0);
    await sleep(300);
    const messages = ann.events.filter((e) => e.kind === "message");
    assert.deepEqual(messages.map((m) => m.msg_id), [ack.msg_id]); // delivered once
    const stored = await storedMessages(stalling, name);
    assert.deepEqual(stored.map((m) => m.msg_id), [ack.msg_id]); // stored once
  } finally {
    await stalling.stop();
  }
});

test("a rejoin of more rooms than the server's burst is paced, and drops none", async () => {
  const strict = await new Server({ settings: { COLLAB_RATE_BURST: "4", COLLAB_RATE_LIMIT: "40" } }).start();
  try {
    const ann = open({ token: await guest(strict, "ann"), backoffMin: 100 }, strict);
    const bob = open({ token: await guest(strict, "bob") }, strict);
    const names = Array.from({ length: 10 }, room);
    for (const name of names) { // joined at the server's pace (not what is tested here)
      await ann.join(name, { presence_events: false });
      await bob.join(name, { presence_events: false });
      await sleep(60);
    }
    ann.ws.terminate(); // the network goes: ann rejoins all ten at once
    await until(() => ann.events.filter((e) => e.kind === "joined").length === 20, "rejoined every room");
    assert.deepEqual(ann.events.filter((e) => e.kind === "error"), []); // none was rate_limited away
    assert.equal(ann.state, "connected");
    assert.equal(ann.joined.size, 10);
    await sleep(300); // bob's command tokens back
    for (const name of names.slice(-3)) await bob.publish(name, { name });
    await until(() => ann.events.filter((e) => e.kind === "message").length === 3, "the last rooms' messages");
    assert.deepEqual(ann.events.filter((e) => e.kind === "message").map((m) => m.room), names.slice(-3));
  } finally {
    await strict.stop();
  }
});

test("a publish whose broker reply was lost (delivery unknown) is sent again with its id, once", { skip: noRedisServer }, async () => {
  const redis = await startRedis();
  const stalling = await new Server({ settings: { COLLAB_BROKER_URL: redis.url } }).start();
  try {
    const ann = open({ token: await guest(stalling, "ann") }, stalling);
    const bob = open({ token: await guest(stalling, "bob") }, stalling);
    const name = room();
    await ann.join(name, { presence_events: false });
    await bob.join(name, { presence_events: false });
    await ann.publish(name, { n: 0 }); // the room is marked for reconciling: no stall before the script
    redis.signal("SIGSTOP"); // the server's read times out (2 s); Redis runs the publish on waking
    let ack;
    const publishing = ann.publish(name, { n: 1 }).then((reply) => { ack = reply; });
    try {
      await sleep(2600); // the first try was answered "delivery unknown" and is waiting to retry
      assert.equal(ack, undefined);
      assert.equal(ann.unacked.size, 1);
    } finally {
      redis.signal("SIGCONT");
    }
    await publishing;
    await until(() => bob.events.filter((e) => e.kind === "message").length === 2, "both messages");
    await sleep(300);
    const messages = bob.events.filter((e) => e.kind === "message");
    assert.deepEqual(messages.map((m) => m.body.n), [0, 1]); // once: the retry got the first's ack
    assert.equal(ack.msg_id, messages[1].msg_id);
    assert.equal(ann.events.filter((e) => e.kind === "error").length, 0);
  } finally {
    await stalling.stop();
    redis.stop();
  }
});

test("joins and publishes past the server's burst go through at its pace", async () => {
  const strict = await new Server({ settings: { COLLAB_RATE_BURST: "4", COLLAB_RATE_LIMIT: "40" } }).start();
  try {
    const ann = open({ token: await guest(strict, "ann") }, strict);
    const names = Array.from({ length: 10 }, room);
    const joined = await Promise.all(names.map((name) => ann.join(name, { presence_events: false })));
    assert.deepEqual(joined.map((j) => j.room), names);
    const acks = await Promise.all(names.map((name) => ann.publish(name, { name })));
    assert.deepEqual(acks.map((a) => a.offset), Array(10).fill(1));
    await until(() => ann.events.filter((e) => e.kind === "message").length === 10, "ten messages");
    assert.deepEqual(ann.events.filter((e) => e.kind === "message").map((m) => m.room).sort(), [...names].sort());
  } finally {
    await strict.stop();
  }
});

test("a publish stays unknown until a retry settles it (the retry rule alone)", async () => {
  const unknown = new CollabError({ type: "error", code: "unavailable", delivery: "unknown" });
  const notDone = new CollabError({ type: "error", code: "unavailable", message: "not done" });
  const ack = { type: "ack", offset: 7 };
  const run = async (replies) => {
    const socket = new CollabSocket("http://127.0.0.1:1", { token: "t", connect: false, backoffMin: 1, backoffMax: 2 });
    const sent = [];
    socket.request = async (command) => {
      sent.push(command.client_msg_id);
      const reply = replies.shift();
      if (reply instanceof Error) throw reply;
      return reply;
    };
    try {
      return [await socket.publish("r", { n: 1 }), sent.length];
    } catch (error) {
      assert.equal(new Set(sent).size, 1); // one id throughout
      return [error, sent.length];
    }
  };
  // After an unknown outcome a retry answered "not done" says nothing of the first attempt.
  assert.deepEqual(await run([unknown, notDone, notDone, ack]), [ack, 4]);
  assert.deepEqual(await run([notDone]), [notDone, 1]); // nothing unknown before: it stands
  assert.deepEqual(await run([unknown, ...Array(10).fill(notDone)]), [unknown, 6]); // out of retries: unknown
  const forbidden = new CollabError({ type: "error", code: "forbidden", message: "left the room" });
  assert.deepEqual(await run([unknown, forbidden]), [unknown, 2]); // the first may still have gone out
});
