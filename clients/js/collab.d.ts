// Types of the Collab client (collab.js). Frames follow docs/PROTOCOL.md and /asyncapi.json.

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export interface User { id: string; name: string }
export interface Position { epoch: string; offset: number }
export interface PresenceMember { user: User; connections: number }

export interface Welcome {
  type: "welcome";
  session: string;
  node: string;
  user: User;
  heartbeat: number;
  limits: { max_body_bytes: number; rate: number; burst: number };
}
export interface MessageEvent {
  type: "message";
  room: string;
  epoch: string;
  offset: number;
  msg_id: string;
  client_msg_id: string | null;
  user: User;
  body: { [key: string]: Json };
  ts: string;
}
export interface UpdateEvent { type: "update"; feed: string; epoch: string; offset: number; data: Json; ts: string }
export interface TypingEvent { type: "typing"; room: string; user: User }
export interface PresenceDiff { type: "presence_diff"; room: string; joins: PresenceMember[]; leaves: PresenceMember[] }
export interface Joined {
  type: "joined";
  id: number;
  room: string;
  epoch: string;
  offset: number;
  presence: PresenceMember[];
  recovered: boolean;
  missed: MessageEvent[];
}
export interface Subscribed {
  type: "subscribed";
  id: number;
  feed: string;
  epoch: string;
  offset: number;
  snapshot: Json;
  recovered: boolean;
  missed: UpdateEvent[];
}
export interface Ack { type: "ack"; id: number; room: string; offset: number; msg_id: string }
export interface HistoryReply { type: "history"; id: number; room: string; messages: MessageEvent[]; has_more: boolean }
export interface PresenceReply { type: "presence"; id: number; room: string; members: PresenceMember[] }
export interface ErrorFrame {
  type: "error";
  id: number | string | null;
  code: string;
  message: string;
  /** Only on a publish delivered to every member whose storage did not confirm. */
  outcome?: "unknown";
  /** Only on a publish whose broker reply was lost: it may or may not have been delivered. */
  delivery?: "unknown";
  room?: string;
  offset?: number;
  msg_id?: string;
}

export type State = "connecting" | "connected" | "disconnected" | "reconnecting" | "closed";
export interface StateDetail {
  state: State;
  /** disconnected, closed: the WebSocket close code (1006: the connection was lost). */
  code?: number;
  reason?: string;
  /** reconnecting: seconds until the next attempt. */
  delay?: number;
  attempt?: number;
  welcome?: Welcome;
}

export interface CollabSocketOptions {
  /** A bearer token; or use getToken. */
  token?: string;
  /** Called before every connect, and so again after the server refused a token (4401). */
  getToken?: () => string | Promise<string>;
  endpoint?: "chat" | "live";
  /** Milliseconds to wait for a reply before the request rejects with code "timeout". Default 10000. */
  requestTimeout?: number;
  /** Reconnect backoff bounds in milliseconds (doubling, with jitter). Defaults 500 and 30000. */
  backoffMin?: number;
  backoffMax?: number;
  /** A WebSocket class (in Node 20, the `ws` package's); defaults to globalThis.WebSocket. */
  WebSocket?: unknown;
  fetch?: typeof fetch;
  /** Connect from the constructor (default true); else call connect(). */
  connect?: boolean;
}

/** An error reply (`code`), a lost connection (code "connection_lost"), a timeout (code "timeout"). */
export class CollabError extends Error {
  code: string;
  frame: ErrorFrame;
  outcome?: "unknown";
  /** On an `error` event: the room or feed a rejoin was refused for, and so given up. */
  rejoin?: string;
}

interface CollabEvents {
  open: CustomEvent<Welcome>;
  close: CustomEvent<{ code: number; reason: string }>;
  state: CustomEvent<StateDetail>;
  connecting: CustomEvent<StateDetail>;
  connected: CustomEvent<StateDetail>;
  disconnected: CustomEvent<StateDetail>;
  reconnecting: CustomEvent<StateDetail>;
  closed: CustomEvent<StateDetail>;
  message: CustomEvent<MessageEvent>;
  update: CustomEvent<UpdateEvent>;
  typing: CustomEvent<TypingEvent>;
  presence_diff: CustomEvent<PresenceDiff>;
  joined: CustomEvent<Joined | Subscribed>;
  error: CustomEvent<unknown>;
}

export class CollabSocket extends EventTarget {
  constructor(url: string, options?: CollabSocketOptions);
  readonly state: State;
  readonly ready: boolean;
  readonly welcome: Welcome | null;
  /** Rooms (or feeds) joined, with their join options; rejoined after every reconnect. */
  readonly joined: Map<string, object>;
  /** The last position seen per room or feed. */
  readonly positions: Map<string, Position>;
  /** Publishes not acknowledged yet, by client_msg_id. */
  readonly unacked: Map<string, object>;
  connect(): Promise<void>;
  /** Resolves once connected and rejoined; rejects when the client gave up for good. */
  whenReady(): Promise<void>;
  request(command: { type: string; [field: string]: unknown }): Promise<any>;
  join(room: string, options?: { presence_events?: boolean }): Promise<Joined>;
  leave(room: string): Promise<{ type: "left"; id: number; room: string }>;
  subscribe(feed: string): Promise<Subscribed>;
  unsubscribe(feed: string): Promise<{ type: "unsubscribed"; id: number; feed: string }>;
  publish(room: string, body: { [key: string]: Json }, options?: { clientMsgId?: string }): Promise<Ack>;
  typing(room: string): void;
  history(room: string, before?: number, limit?: number): Promise<HistoryReply>;
  presence(room: string): Promise<PresenceReply>;
  ping(): Promise<{ type: "pong"; id: number }>;
  close(): void;
  addEventListener<K extends keyof CollabEvents>(
    type: K,
    listener: (event: CollabEvents[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}

/** A one-use WebSocket ticket for `token` (POST /auth/ws-ticket). */
export function wsTicket(httpBase: string, token: string, fetchImpl?: typeof fetch): Promise<string>;
/** A guest token (POST /auth/guest); `httpBase` defaults to the page's own origin. */
export function guestToken(name: string, httpBase?: string, fetchImpl?: typeof fetch): Promise<string>;
