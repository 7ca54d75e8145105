// The node socket.io peer of the fan-out benchmark: one room, `publish` broadcast to it, acks.
//
//   npm install --prefix loadtests/peers/socketio_node   (once; node_modules is not committed)
//   node loadtests/peers/socketio_node/server.js --port 9004
//
// Events: `join` (data: the room name) enters the room and acknowledges; `publish` (data:
// {room, body}) emits `message` to the room, then acknowledges with the offset. The `message`
// data carries the same fields as a Collab `message` event, so frames are the same size.
"use strict";

const { Server } = require("socket.io");

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const port = Number.parseInt(option("--port", "9004"), 10);
const host = option("--host", "127.0.0.1");
const user = { id: "1", name: "bench" };
const offsets = new Map();
let counter = 0;

function msgId() {
  counter += 1;
  return process.pid.toString(16).padStart(8, "0") + counter.toString(16).padStart(18, "0");
}

const io = new Server({ transports: ["websocket"], perMessageDeflate: false, serveClient: false });

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    socket.join(room);
    if (typeof ack === "function") ack({ room });
  });
  socket.on("publish", (data, ack) => {
    const room = data.room;
    const offset = (offsets.get(room) || 0) + 1;
    offsets.set(room, offset);
    io.to(room).emit("message", {
      room,
      offset,
      msg_id: msgId(),
      client_msg_id: null,
      user,
      body: data.body,
      ts: new Date().toISOString(),
    });
    if (typeof ack === "function") ack({ room, offset });
  });
});

const httpServer = require("node:http").createServer();
io.attach(httpServer);
httpServer.listen({ port, host, backlog: 4096 });

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    io.close();
    process.exit(0);
  });
}
