/**
 * A Jetstream server that plays a capture, in two flavours:
 *
 * - **legacy** (default): the original Jetstream's `/subscribe` (protocol doc §1.1, §2, §5), with
 *   the same query parameters, limits, 400 texts, cursor rules and `options_update` handling as the
 *   legacy Go server;
 * - **v2**: the rewrite (§0, §1.2, §1.3, §3.2, §3.3, §4.2), which numbers events with seqs, serves
 *   `/subscribe` with its own validation and a `cursor` field on every event, and adds the v2 wire
 *   `GET /xrpc/network.bsky.jetstream.subscribeEvents` and
 *   `GET /xrpc/network.bsky.jetstream.getZstdDictionary`.
 *
 * Both are fast enough to benchmark a client against (hundreds of thousands of events/s) and can
 * misbehave on purpose (see `faults.ts` and `errorAfter`).
 *
 * It speaks HTTP/1.1 and WebSocket itself on a `Deno.listen` socket (see `websocket.ts` for why),
 * which is also what makes byte-level fault injection possible.
 *
 * Convention for a capture standing in for a live server: **a connection without a cursor gets the
 * capture from the start of its history window (its first event unless `historyStartUs` or
 * `lookbackFloorSeq` cut some off), as if those events were arriving live**; a cursor replays from
 * the event it names (an older cursor is clamped to the history window), and a cursor later than
 * "now" (or, on a v2 server, a seq past the last event) means live with nothing new, so nothing is
 * sent.
 *
 * @module
 */
import { show } from "../errors.ts";
import { type CaptureEvent, inTimeOrder } from "./capture.ts";
import {
  garbageKind,
  junkBytes,
  type ResolvedFaults,
  resolveFaults,
  type ServerFaults,
  v1Garbage,
} from "./faults.ts";
import {
  acceptWebSocket,
  HttpError,
  readRequestHead,
  type RequestHead,
  writeGoHttpError,
  writeResponse,
  writeTextResponse,
  writeXrpcError,
} from "./http1.ts";
import {
  goQueryValues,
  type OptionsUpdatePayload,
  parseClientMessage,
  parseSubscribeRequest,
  type SubscribeParams,
  type SubscriberFilter,
  wants,
} from "./options.ts";
import { EventTable, type StartPlan, type Wire } from "./table.ts";
import { utf8Length } from "../jetstream/utf8.ts";
import { SUBSCRIBE_EVENTS_NSID, v2Error, type V2ErrorName, v2Garbage, v2Info } from "./v2_frames.ts";
import {
  parseSubscribeEventsRequest,
  parseV2ClientMessage,
  parseV2ServerSubscribe,
  type SubscribeEventsParams,
  V2_MAX_CLIENT_MESSAGE_BYTES,
  V2_SUBPROTOCOL,
  type V2Filter,
  wantsV2,
} from "./v2_options.ts";
import { ServerWebSocket } from "./websocket.ts";
import { dictionaryIdOf, V2_DICTIONARY_ID } from "../jetstream/zstd.ts";

/**
 * Which Jetstream server to imitate.
 *
 * @example
 * ```ts
 * import type { ServerVersion } from "./server.ts";
 * const version: ServerVersion = "v2";
 * ```
 */
export type ServerVersion = "legacy" | "v2";

/**
 * A terminal error to send after a number of events (see
 * {@linkcode JetstreamServerOptions.errorAfter}).
 *
 * @example
 * ```ts
 * import type { ErrorAfter } from "./server.ts";
 * const errorAfter: ErrorAfter = { events: 1000, error: "ConsumerTooSlow" };
 * ```
 */
export interface ErrorAfter {
  /** Events each connection gets before the error (0: before any). */
  events: number;
  /** The error frame's name. */
  error: V2ErrorName;
}

/**
 * Options of {@linkcode serveJetstream}.
 *
 * @example
 * ```ts
 * import type { JetstreamServerOptions } from "./server.ts";
 * const options: JetstreamServerOptions = { events: [], port: 6008, closeAtEnd: true };
 * ```
 */
export interface JetstreamServerOptions {
  /**
   * The events to serve (see `loadCapture()` and `parseCapture()`). The legacy server serves them in
   * `time_us` order, as its store keeps them: when they are not, it sorts a copy (stably, so equal
   * `time_us` keep their order; see `inTimeOrder()`), unless `faults.fileOrder` asks it to misbehave.
   * A v2 server serves them in the given order, its seq order, whatever their `time_us` (a display
   * time, which may go backwards).
   */
  events: CaptureEvent[];
  /**
   * Interface to listen on.
   *
   * @default {"127.0.0.1"}
   */
  hostname?: string;
  /**
   * Port to listen on; 0 picks a free port (read it from the result).
   *
   * @default {0}
   */
  port?: number;
  /** Aborting it shuts the server down, as {@linkcode JetstreamServer.shutdown} does. */
  signal?: AbortSignal;
  /**
   * Close each connection with code 1000 once everything it selected has been sent. When false the
   * connection stays open, like a live server with nothing new to say.
   *
   * @default {false}
   */
  closeAtEnd?: boolean;
  /**
   * How often a connection is pinged, ms (protocol doc §5.3: both servers ping every 30 s). The v2
   * server drops a connection whose pong has not come `pongTimeoutMs` after the ping; the legacy
   * server does not check.
   *
   * @default {30000}
   */
  pingIntervalMs?: number;
  /**
   * v2 server: how long a ping waits for its pong before the connection is dropped, ms.
   *
   * @default {5000}
   */
  pongTimeoutMs?: number;
  /**
   * A write to a client that has not completed after this long drops the client without a close
   * frame, ms (protocol doc §5.3: the legacy server's 10 s write deadline, the v2 server's 5 s).
   *
   * @default {10000 (legacy), 5000 (v2)}
   */
  writeTimeoutMs?: number;
  /**
   * The clock deciding that a unix-µs cursor is in the future (and so means live), unix
   * microseconds.
   *
   * @default {() => Date.now() * 1000}
   */
  now?: () => number;
  /**
   * Encoder for compressed `/subscribe` connections (`compress=true` or a `Socket-Encoding` header
   * containing `zstd`), normally zstd with the legacy dictionary: each event is sent as a binary
   * frame of `compressor(text)`, computed once per event and cached. Without it, such requests get
   * HTTP 400 `compression not available on this server`. As `jetfill serve --zstd-dictionary` makes
   * it: `const encoder = await createZstdEncoder(await Deno.readFile("legacy_subscribe.zdict"))`, then
   * `(text) => encoder.encode(new TextEncoder().encode(text)).slice()` (a copy: small frames share
   * the encoder's buffer).
   */
  compressor?: (text: string) => Uint8Array;
  /**
   * Bytes a connection may have queued in its socket before the sender yields and waits for them to
   * drain. Larger values cost memory; much smaller ones cost throughput. A new connection starts at
   * 64 KiB (or this, if smaller) and doubles each turn up to it.
   *
   * @default {4194304}
   */
  highWaterMark?: number;
  /**
   * Deliberate misbehaviour (HTTP 503s, dropped, stalled and garbage-laden connections), all off by
   * default and all deterministic; see {@linkcode ServerFaults}.
   */
  faults?: ServerFaults;
  /**
   * The server to imitate. `"v2"` numbers the events with seqs (see `seqBase`), adds `cursor` to
   * every `/subscribe` event and serves `subscribeEvents` and `getZstdDictionary`; its
   * `/subscribe` validates, resolves cursors and handles `options_update` the v2 way (§1.2).
   *
   * @default {"legacy"}
   */
  version?: ServerVersion;
  /**
   * Seq numbering: event `i` of the capture (from 0) has seq `seqBase + 1 + i`, so by default seqs
   * start at 1001 and seqs 1 to 1000 count as already outside the lookback window (a
   * `subscribeEvents` cursor among them is `CursorTooOld`).
   *
   * @default {1000}
   */
  seqBase?: number;
  /**
   * The lookback floor as a seq: events with a smaller seq are outside the history window. On
   * `/subscribe` an older cursor is clamped silently (both versions); on `subscribeEvents` an older
   * seq cursor gets HTTP 400 `CursorTooOld` and an older time cursor is clamped with an
   * `OutdatedCursor` notice. Combined with `historyStartUs`, the later floor wins.
   */
  lookbackFloorSeq?: number;
  /**
   * The history window as a time: events before the first one with `time_us >= historyStartUs`
   * are outside it (same rules as `lookbackFloorSeq`).
   */
  historyStartUs?: number;
  /**
   * v2 only: reproduces bluesky-social/jetstream#343 — a unix-µs cursor starts replay this many
   * microseconds earlier than asked, without notice (clients must drop `time_us < cursor`).
   *
   * @default {0}
   */
  earlyReplayUs?: number;
  /**
   * v2 only: encoder for `subscribeEvents?zstdDictionary=<id>` connections (zstd with the v2
   * dictionary). Every frame, info and error frames included, is then one compressed binary
   * message. Without it, `zstdDictionary` gets HTTP 400 `UnknownZstdDictionary`.
   */
  v2Compressor?: (text: string) => Uint8Array;
  /**
   * v2 only: the ID clients must name in `zstdDictionary`.
   *
   * @default {the ID in v2Dictionary's header, else 20260811}
   */
  v2DictionaryId?: number;
  /** v2 only: the dictionary served by `getZstdDictionary` (without it, that endpoint answers 404). */
  v2Dictionary?: Uint8Array;
  /**
   * After this many events of each connection, end it as an overloaded or failing v2 server does:
   * on `subscribeEvents` a terminal error frame
   * `{"$type":"error","error":"ConsumerTooSlow"|"InternalError","message":…}` (the message names
   * the cursor to reconnect with) and then, as the v2 handler returns, the TCP connection is closed
   * without a close frame (the client sees 1006); on `/subscribe`, which has no error frames, just
   * the drop. Sets `ConnectionRecord.dropped` (and `errorFrame`).
   */
  errorAfter?: ErrorAfter;
}

/**
 * What the server saw and did on one subscription request; updated as the connection runs, so
 * tests can check what a client asked for.
 *
 * @example
 * ```ts ignore
 * const [first] = server.connections;
 * console.log(first.query, first.params.cursor, first.hellos.length, first.sent, first.closeCode);
 * ```
 */
export interface ConnectionRecord {
  /** 1-based number of the request, in arrival order. */
  id: number;
  /** Which endpoint was asked: `/subscribe` or `subscribeEvents`. */
  endpoint: "subscribe" | "subscribeEvents";
  /** The raw query string, without the leading `?`. */
  query: string;
  /**
   * The request's options as the server read them. For `subscribeEvents`: `dids` as `wantedDids`,
   * `collections` as `wantedCollections`, `compress` true with `zstdDictionary` (see `v2` for
   * the rest).
   */
  params: SubscribeParams;
  /** The `subscribeEvents` options as read (`subscribeEvents` requests only). */
  v2?: SubscribeEventsParams;
  /** 101 when upgraded to a WebSocket, else the HTTP status of the refusal. */
  status: number;
  /** The refusal's message (legacy text, or the `message` of the XRPC envelope). */
  error?: string;
  /** Why the server dropped the connection when its own send loop failed (a bug, or a capture it cannot send). */
  failure?: string;
  /** The XRPC error name of a refused `subscribeEvents` request (`InvalidRequest`, `CursorTooOld`, …). */
  errorName?: string;
  /** Payloads of the valid `options_update` messages received, in order (the first is the hello). */
  hellos: OptionsUpdatePayload[];
  /** Events sent so far (queued to the socket). */
  sent: number;
  /** v2 server: the seq replay started from (the first event considered). */
  startSeq?: number;
  /** v2 server: the seq of the last event sent, updated after each batch. */
  lastSeq?: number;
  /** The `#info` notice sent before the events (`OutdatedCursor`). */
  notice?: { name: string; message: string };
  /** The name of the terminal error frame sent (`errorAfter`). */
  errorFrame?: V2ErrorName;
  /**
   * Once closed: the code of the client's close frame (an echo of the server's when the server
   * closed first), or 1006 when the connection ended without one.
   */
  closeCode?: number;
  /** Once closed: the reason in the client's close frame. */
  closeReason?: string;
  /** Whether the server dropped the connection on purpose (`faults.dropEvery`, `errorAfter`). */
  dropped: boolean;
  /** Whether the connection went quiet on purpose (`faults.stallAfter`). */
  stalled: boolean;
  /** Bad frames sent on purpose so far (`faults.garbageEvery`). */
  garbage: number;
}

/**
 * A running server; see {@linkcode serveJetstream}.
 *
 * @example
 * ```ts
 * import { serveJetstream } from "@jetfill/jetfill";
 * const server = serveJetstream({ events: [] });
 * console.log(server.url); // ws://127.0.0.1:PORT/subscribe
 * await server.shutdown();
 * ```
 */
export interface JetstreamServer {
  /** The WebSocket URL of the v1 wire, `ws://127.0.0.1:PORT/subscribe`. */
  url: string;
  /**
   * The WebSocket URL of the v2 wire, `ws://127.0.0.1:PORT/xrpc/network.bsky.jetstream.subscribeEvents`
   * (answered on v2 servers only).
   */
  v2Url: string;
  /** The HTTP origin, `http://127.0.0.1:PORT`. */
  httpUrl: string;
  /** The port actually bound. */
  port: number;
  /** One record per subscription request, in arrival order (refused ones included). */
  connections: ConnectionRecord[];
  /**
   * Stops listening, closes every connection (v2: code 1001, `server shutting down`; legacy: dropped
   * without a close frame, as the legacy server does) and resolves once all sockets are released.
   * Safe to call more than once.
   */
  shutdown(): Promise<void>;
  /** Same as {@linkcode JetstreamServer.shutdown}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>;
}

const DEFAULT_HIGH_WATER_MARK = 4 * 1024 * 1024;
/**
 * What a connection's first turn queues at most; each later turn may queue twice as much as the one
 * before, up to the high-water mark. A client that reads one message and leaves (a coverage probe)
 * is then noticed after a few small turns rather than after one of megabytes: measured from another
 * process, such a probe costs the server about 12 ms of CPU instead of 34, and the sync that follows
 * it waits less for its own connection.
 */
const FIRST_BURST = 64 * 1024;
/** Scan this many events between checks of the socket's queue. */
const CHECK_EVERY = 64;
const SUBSCRIBE_EVENTS_PATH = `/xrpc/${SUBSCRIBE_EVENTS_NSID}`;
const GET_DICTIONARY_PATH = "/xrpc/network.bsky.jetstream.getZstdDictionary";
const BOOTSTRAPPING = "service not ready: bootstrap in progress";
/** Client messages over this size are ignored by the legacy server (protocol doc §2). */
const LEGACY_IGNORED_MESSAGE_BYTES = 10_000_000;
const ERROR_NAMES: readonly string[] = ["ConsumerTooSlow", "InternalError"];

interface SessionConfig {
  table: EventTable;
  record: ConnectionRecord;
  wire: Wire;
  /** The v1-wire filter (replaced by `options_update`). */
  filter: SubscriberFilter;
  /** The `subscribeEvents` filter. */
  v2Filter: V2Filter | undefined;
  /** Whether frames are compressed (binary). */
  compress: boolean;
  /** `maxMessageSizeBytes`; 0 = no limit. */
  limit: number;
  plan: StartPlan;
  closeAtEnd: boolean;
  highWaterMark: number;
  /** Ping every this many ms; on the v2 server, drop when the pong is this late (ms). */
  ping: { intervalMs: number; pongTimeoutMs: number };
  /** A write to the client that takes longer drops it (ms). */
  writeTimeoutMs: number;
  faults: ResolvedFaults;
  /** Whether this connection is one of those that stall (`faults.stallConnections`). */
  stalls: boolean;
  errorAfter: ErrorAfter | undefined;
}

/**
 * One subscriber. Every event frame leaves through `#pump()`, which stops at the event counts where
 * a fault is due (`#nextStop()`) and applies it (`#fault()`).
 */
class Session {
  readonly #config: SessionConfig;
  readonly #ws: ServerWebSocket;
  #filter: SubscriberFilter;
  #limit: number;
  #helloWanted: boolean;
  #wake: (() => void) | undefined;
  /** Resolves once the connection is closed and the pump has stopped. */
  readonly done: Promise<void>;

  constructor(config: SessionConfig, conn: Deno.Conn, head: RequestHead, handshake: Uint8Array) {
    this.#config = config;
    this.#filter = config.filter;
    this.#limit = config.limit;
    this.#helloWanted = config.wire !== "v2" && config.record.params.requireHello;
    const onClose = (code: number, reason: string): void => {
      config.record.closeCode = code;
      config.record.closeReason = reason;
      this.#wakeUp();
    };
    // The v2 wire is server-push only: any data frame is a policy violation (coder/websocket's
    // CloseRead). On the v1 wires binary client frames are ignored.
    const refuse = (): void => {
      this.#ws.close(1008, "unexpected data message");
      this.#wakeUp();
    };
    this.#ws = new ServerWebSocket(
      conn,
      head.rest,
      config.wire === "v2"
        ? { onText: refuse, onBinary: refuse, onClose }
        : { onText: (text) => config.wire === "v1" ? this.#onTextV2(text) : this.#onText(text), onClose },
      {
        ...(config.wire === "v1" ? { maxMessageBytes: V2_MAX_CLIENT_MESSAGE_BYTES } : {}),
        writeTimeoutMs: config.writeTimeoutMs,
      },
    );
    this.#ws.sendRaw(handshake);
    const pump = this.#pump().catch((err) => {
      // A failure of the send loop itself (a socket that went away is not one): the connection is
      // dropped, and the reason recorded and said, not hidden.
      if (!this.#ws.closing) {
        config.record.failure = err instanceof Error ? err.message : String(err);
        console.error(`jetfill serve: dropped a connection: ${config.record.failure}`);
      }
      this.#ws.abort();
    });
    const pinging = this.#pingEvery(config.ping, config.wire !== "legacy");
    this.done = Promise.all([pump, this.#ws.finished]).then(() => clearInterval(pinging));
  }

  /**
   * Pings every `intervalMs` (§5.3); with `enforce` (the v2 server), a pong later than
   * `pongTimeoutMs` drops the connection. A muted (stalled) connection sends no pings.
   */
  #pingEvery(ping: SessionConfig["ping"], enforce: boolean): ReturnType<typeof setInterval> {
    const ws = this.#ws;
    let pongTimer: ReturnType<typeof setTimeout> | undefined;
    void ws.finished.then(() => clearTimeout(pongTimer));
    return setInterval(() => {
      if (ws.closing) return;
      const sentAt = performance.now();
      ws.ping();
      if (!enforce || pongTimer !== undefined) return;
      pongTimer = setTimeout(() => {
        pongTimer = undefined;
        if (ws.lastPongAt < sentAt) ws.abort();
      }, ping.pongTimeoutMs);
    }, ping.intervalMs);
  }

  #wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  /** A client message on the legacy server. */
  #onText(text: string): void {
    if (this.#ws.closing) return;
    // The legacy server reads any size, but ignores a message over 10,000,000 bytes (§2).
    if (text.length > LEGACY_IGNORED_MESSAGE_BYTES / 3 && utf8Length(text) > LEGACY_IGNORED_MESSAGE_BYTES) {
      return;
    }
    const message = parseClientMessage(text);
    if (message.type === "invalid") {
      // A reason over the 123 bytes a close frame holds cannot be sent: the client sees 1006 (§2).
      if (utf8Length(message.reason) > 123) this.#ws.abort();
      else this.#ws.close(1000, message.reason);
      this.#wakeUp();
      return;
    }
    if (message.type === "ignored") return;
    this.#config.record.hellos.push(message.payload);
    // Full replacement; maxMessageSizeBytes in an update is ignored (legacy behaviour).
    this.#filter = message.filter;
    this.#hello();
  }

  /** A client message on the v2 server's `/subscribe`. */
  #onTextV2(text: string): void {
    if (this.#ws.closing) return;
    const message = parseV2ClientMessage(text);
    if (message.type === "invalid") {
      this.#ws.close(message.code, message.reason);
      this.#wakeUp();
      return;
    }
    if (message.type === "ignored") return;
    this.#config.record.hellos.push(message.payload);
    // Full replacement, maxMessageSizeBytes included (the v2 server applies it).
    this.#filter = message.filter;
    this.#limit = message.maxMessageSizeBytes;
    this.#hello();
  }

  #hello(): void {
    if (this.#helloWanted) {
      this.#helloWanted = false;
      this.#wakeUp();
    }
  }

  /** Starts closing with 1001 (the legacy server just drops the connection); resolves when it is gone. */
  shutdown(): Promise<void> {
    if (this.#config.wire === "legacy") this.#ws.abort();
    else this.#ws.close(1001, "server shutting down");
    this.#wakeUp();
    return this.done;
  }

  /** Sends a one-off JSON frame (info, error, garbage), compressed on compressed connections. */
  #sendOneOff(text: string): void {
    const { compress, table, wire } = this.#config;
    if (compress) this.#ws.sendBinary(table.compressText(text, wire));
    else this.#ws.sendText(text);
  }

  /** The smallest event count `>= from` after which a fault is due, or `Infinity`. */
  #nextStop(from: number): number {
    const { faults, stalls, errorAfter } = this.#config;
    let next = Infinity;
    if (faults.garbageEvery !== Infinity) {
      next = Math.max(1, Math.ceil(from / faults.garbageEvery)) * faults.garbageEvery;
    }
    if (errorAfter && errorAfter.events >= from && errorAfter.events < next) next = errorAfter.events;
    if (faults.dropEvery >= from && faults.dropEvery < next) next = faults.dropEvery;
    if (stalls && faults.stallAfter >= from && faults.stallAfter < next) next = faults.stallAfter;
    return next;
  }

  /**
   * Applies the faults due after `count` events (the last one at `lastIndex`, -1 before any; `next`
   * is the index the scan would continue from). Resolves to true when the pump must stop: the
   * connection was dropped or stalled.
   */
  async #fault(count: number, lastIndex: number, next: number): Promise<boolean> {
    const { faults, stalls, record, table, wire, errorAfter } = this.#config;
    const ws = this.#ws;
    if (ws.closing) return true;
    if (count > 0 && count % faults.garbageEvery === 0 && lastIndex >= 0) {
      const index = record.garbage++;
      const kind = garbageKind(record.id, index);
      const tag = `${record.id}-${index}`;
      if (kind === "binary-junk") ws.sendBinary(junkBytes(record.id, index));
      else if (wire === "v2") {
        const text = table.events[lastIndex].text;
        this.#sendOneOff(v2Garbage(kind, table.v2Text(lastIndex), text, table.seq(lastIndex), tag));
      } else {
        const text = wire === "v1" ? table.v1Text(lastIndex) : table.events[lastIndex].text;
        this.#sendOneOff(v1Garbage(kind, text, tag));
      }
    }
    if (errorAfter && count === errorAfter.events) {
      if (wire === "v2") {
        const cursor = table.seq(next);
        const message = errorAfter.error === "ConsumerTooSlow"
          ? `reading below the floor rate ${
            table.nextSeq - cursor
          } events behind the tip; reconnect with cursor=${cursor}`
          : "stream read failed; reconnect";
        this.#sendOneOff(v2Error(errorAfter.error, message));
        record.errorFrame = errorAfter.error;
      }
      return await this.#drop();
    }
    if (count === faults.dropEvery) return await this.#drop();
    if (stalls && count === faults.stallAfter) {
      record.stalled = true;
      ws.mute();
      await ws.finished;
      return true;
    }
    return false;
  }

  /** Flushes what is queued, then closes the TCP connection without a close frame. */
  async #drop(): Promise<true> {
    this.#config.record.dropped = true;
    await this.#ws.drain(0);
    this.#ws.abort();
    return true;
  }

  /**
   * Sends event `index` on anything but the legacy uncompressed wire (which the pump inlines).
   * Returns false when it was skipped (size limit, `#sync` on `/subscribe`) or the socket is closing.
   */
  #send(index: number, limit: number): boolean {
    const { table, wire, compress } = this.#config;
    const ws = this.#ws;
    if (wire === "legacy") {
      // Legacy measures the compressed frame against maxMessageSizeBytes.
      const frame = table.compressed(index, "legacy");
      return (limit === 0 || frame.length <= limit) && ws.sendBinary(frame);
    }
    if (wire === "v1") {
      if (table.events[index].kind === "sync") return false; // never on the v1 wire (§1.2)
      if (!compress) return ws.sendText(table.v1Text(index), limit);
      // The v2 server measures the uncompressed JSON, even on zstd connections.
      return (limit === 0 || table.byteLength("v1", index) <= limit) &&
        ws.sendBinary(table.compressed(index, "v1"));
    }
    if (!compress) return ws.sendText(table.v2Text(index), limit);
    return (limit === 0 || table.byteLength("v2", index) <= limit) &&
      ws.sendBinary(table.v2Compressed(index));
  }

  async #pump(): Promise<void> {
    const { table, record, highWaterMark, wire, compress, v2Filter, plan } = this.#config;
    const ws = this.#ws;
    if (this.#helloWanted) await new Promise<void>((resolve) => this.#wake = resolve);
    if (plan.notice && !ws.closing) {
      this.#sendOneOff(v2Info(plan.notice.name, plan.notice.message));
      record.notice = plan.notice;
    }
    const events = table.events;
    const end = events.length;
    const minTimeUs = plan.minTimeUs;
    // The legacy server's uncompressed frames are the captured lines: the fast path, inlined.
    const plain = wire === "legacy" && !compress;
    const seqs = wire !== "legacy";
    let i = plan.start;
    let sent = 0;
    let last = -1;
    let nextStop = this.#nextStop(0);
    let burst = Math.min(FIRST_BURST, highWaterMark);
    for (;;) {
      if (sent === nextStop) {
        record.sent = sent;
        if (await this.#fault(sent, last, i)) return;
        nextStop = this.#nextStop(sent + 1);
      }
      if (i >= end || ws.closing) break;
      // Client messages (options_update) are handled only while this loop yields, so reading the
      // filter and limit once per batch sees every update in time.
      const filter = this.#filter;
      const limit = this.#limit;
      // Queue frames synchronously until the socket holds enough to stay busy: nothing is written
      // before this loop yields, and awaiting per message would cost most of the throughput.
      let check = 0;
      while (i < end) {
        const index = i++;
        const event = events[index];
        if (event.timeUs < minTimeUs) continue;
        if (
          v2Filter === undefined
            ? !wants(filter, event.did, event.kind, event.collection)
            : !wantsV2(v2Filter, event.did, event.kind, event.collection)
        ) {
          continue;
        }
        if (plain ? !ws.sendText(event.text, limit) : !this.#send(index, limit)) {
          if (ws.closing) break;
          continue; // over maxMessageSizeBytes, or not for this wire
        }
        last = index;
        if (++sent === nextStop) break;
        if (++check === CHECK_EVERY) {
          check = 0;
          if (ws.bufferedAmount > burst) break;
        }
      }
      record.sent = sent;
      if (seqs && last >= 0) record.lastSeq = table.seq(last);
      if (sent !== nextStop) await ws.drain(burst / 2);
      burst = Math.min(burst * 2, highWaterMark);
    }
    record.sent = sent;
    if (this.#config.closeAtEnd) ws.close(1000, "");
  }
}

function hostForUrl(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

function nonNegativeInteger(name: string, value: number | undefined): void {
  if (value !== undefined && (!Number.isSafeInteger(value) || value < 0)) {
    throw new RangeError(
      `Cannot serve as '${name}' must be a non-negative integer: current value is ${show(value)}`,
    );
  }
}

/** A refusal before the WebSocket handshake. */
interface Refusal {
  status: number;
  message: string;
  /** The XRPC error name; plain text without it. */
  name?: string;
  /** Extra header fields of a plain-text refusal. */
  headers?: Record<string, string>;
}

/**
 * Starts a Jetstream server playing `events`: a legacy one by default, a v2 one with
 * `version: "v2"`. It answers `GET /` with `Welcome to Jetstream`.
 *
 * **Legacy** (`GET /subscribe`): events are sent in `time_us` order (a capture that is not in it is
 * sorted, stably, as the legacy store keyed by `time_us` would hold it), each as a text frame
 * holding its exact captured line, or as a binary frame from `compressor` on compressed
 * connections. Query parameters follow the legacy server: repeated `wantedCollections` (NSIDs or
 * `<prefix>.*`, at most 100) and `wantedDids` (at most 10,000), `cursor` (inclusive `time_us`),
 * `compress`, `maxMessageSizeBytes` and `requireHello`, with the same HTTP 400 texts.
 * `options_update` messages replace the DID and collection filters for events not yet sent; an
 * invalid one closes the connection with code 1000.
 *
 * **v2**: events keep the given order and get seqs in it (`seqBase + 1 + index`), whatever their
 * `time_us` (a display time on a v2 host); a unix-µs cursor starts at the first event, in that
 * order, with `time_us` at or after it, and the ones after it follow whatever their `time_us`, as
 * on a v2 host (protocol doc §3.2). `GET /subscribe` adds `"cursor":<seq>` after `time_us`, takes
 * a cursor below 1e15 as a seq and above as unix µs (negative or non-integer: 400), clamps old
 * cursors silently, never sends `sync` events, applies `maxMessageSizeBytes` to the uncompressed
 * JSON and closes with 1007/1008 on bad `options_update`s. `GET
 * /xrpc/network.bsky.jetstream.subscribeEvents` sends `xrpc.v1.json` frames
 * (`{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#commit","seq":…}}`)
 * filtered by `kinds`, `dids` and `collections`, with XRPC JSON errors before the upgrade
 * (`InvalidRequest`, `CursorTooOld`, `UnknownZstdDictionary`, `ServiceUnavailable`), `#info`
 * notices, zstd frames with `zstdDictionary`, and 1008 on any client data frame. `GET
 * /xrpc/network.bsky.jetstream.getZstdDictionary[?id=N]` serves `v2Dictionary`.
 *
 * A connection without a cursor gets the capture from the start of the history window, as if live
 * (see the module docs).
 *
 * @example
 * ```ts
 * import { generateCapture } from "@jetfill/jetfill";
 * import { parseCapture } from "@jetfill/jetfill";
 * import { serveJetstream } from "@jetfill/jetfill";
 *
 * const events = parseCapture(generateCapture({ count: 100, seed: 1 }));
 * await using server = serveJetstream({ events, closeAtEnd: true, version: "v2" });
 * const socket = new WebSocket(`${server.v2Url}?kinds=commit&collections=app.bsky.feed.*`);
 * socket.onmessage = (event) => console.log(JSON.parse(event.data).payload.seq);
 * await new Promise((resolve) => socket.onclose = resolve);
 * ```
 */
export function serveJetstream(options: JetstreamServerOptions): JetstreamServer {
  if (typeof options !== "object" || options === null) {
    throw new TypeError(`Cannot serve as the options must be an object: current value is ${show(options)}`);
  }
  const {
    events,
    hostname = "127.0.0.1",
    port = 0,
    signal,
    closeAtEnd = false,
    now = () => Date.now() * 1000,
    compressor,
    highWaterMark = DEFAULT_HIGH_WATER_MARK,
    pingIntervalMs = 30_000,
    pongTimeoutMs = 5_000,
    writeTimeoutMs,
    version = "legacy",
    earlyReplayUs = 0,
    v2Compressor,
    v2Dictionary,
    errorAfter,
  } = options;
  const faults = resolveFaults(options.faults);
  if (!Array.isArray(events)) {
    throw new TypeError("Cannot serve as 'events' must be an array of capture events");
  }
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new RangeError(
      `Cannot serve as 'port' must be an integer from 0 to 65535: current value is ${show(port)}`,
    );
  }
  for (
    const [name, ms] of [
      ["pingIntervalMs", pingIntervalMs],
      ["pongTimeoutMs", pongTimeoutMs],
      ["writeTimeoutMs", writeTimeoutMs ?? 1],
    ] as const
  ) {
    if (!(ms > 0)) {
      throw new RangeError(
        `Cannot serve as '${name}' must be a positive number of ms: current value is ${show(ms)}`,
      );
    }
  }
  const ping = { intervalMs: pingIntervalMs, pongTimeoutMs };
  if (!Number.isFinite(highWaterMark) || highWaterMark < 1) {
    throw new RangeError(
      `Cannot serve as 'highWaterMark' must be a positive number of bytes: current value is ${
        show(highWaterMark)
      }`,
    );
  }
  if (version !== "legacy" && version !== "v2") {
    throw new TypeError(
      `Cannot serve as 'version' must be "legacy" or "v2": current value is ${show(version)}`,
    );
  }
  if (version === "legacy") {
    for (const name of ["earlyReplayUs", "v2Compressor", "v2Dictionary", "v2DictionaryId"] as const) {
      if (options[name] !== undefined) {
        throw new TypeError(`Cannot serve as '${name}' needs version "v2": current version is "legacy"`);
      }
    }
  }
  nonNegativeInteger("earlyReplayUs", earlyReplayUs);
  if (errorAfter !== undefined) {
    nonNegativeInteger("errorAfter.events", errorAfter.events);
    if (!ERROR_NAMES.includes(errorAfter.error)) {
      throw new TypeError(
        `Cannot serve as 'errorAfter.error' must be "ConsumerTooSlow" or "InternalError": current value is ${
          show(errorAfter.error)
        }`,
      );
    }
  }
  let dictionaryId = options.v2DictionaryId;
  if (
    dictionaryId !== undefined &&
    (!Number.isInteger(dictionaryId) || dictionaryId < 1 || dictionaryId > 0xffffffff)
  ) {
    throw new RangeError(
      `Cannot serve as 'v2DictionaryId' must be a positive 32-bit integer: current value is ${
        show(dictionaryId)
      }`,
    );
  }
  if (v2Dictionary !== undefined) {
    const inHeader = dictionaryIdOf(v2Dictionary);
    if (dictionaryId !== undefined && dictionaryId !== inHeader) {
      throw new RangeError(
        `Cannot serve as 'v2DictionaryId' (${dictionaryId}) differs from the ID in v2Dictionary's header (${inHeader})`,
      );
    }
    dictionaryId = inHeader;
  }
  dictionaryId ??= V2_DICTIONARY_ID;
  // The legacy store is keyed by time_us, so it replays in time order whatever order the capture's
  // lines came in (protocol doc §5.1, §5.4); a v2 host's order is its seqs', the capture's (§3.2).
  const table = new EventTable(version === "legacy" && !faults.fileOrder ? inTimeOrder(events) : events, {
    compressor,
    v2Compressor,
    seqBase: options.seqBase,
    lookbackFloorSeq: options.lookbackFloorSeq,
    historyStartUs: options.historyStartUs,
  });
  const connections: ConnectionRecord[] = [];
  const sessions = new Set<Session>();
  /** TCP connections not (yet) handed to a session, closed on shutdown. */
  const pending = new Set<Deno.TcpConn>();
  const tasks = new Set<Promise<void>>();
  let stopping: Promise<void> | undefined;
  /** Subscription requests refused so far by `faults.refuseFirst`. */
  let refused = 0;
  /** WebSocket connections accepted so far (for `faults.stallConnections`). */
  let upgraded = 0;

  /** Decides how a `/subscribe` request proceeds, or why it may not. */
  const prepareV1 = (
    record: ConnectionRecord,
    rawQuery: string,
    headers: Headers,
  ): Refusal | Omit<SessionConfig, "record" | "stalls"> => {
    const parsed = version === "legacy"
      ? parseSubscribeRequest(goQueryValues(rawQuery), headers)
      : parseV2ServerSubscribe(rawQuery, headers);
    record.params = parsed.params;
    if (!parsed.ok) return { status: 400, message: parsed.error };
    if (parsed.params.compress && !table.canCompress) {
      return { status: 400, message: "compression not available on this server" };
    }
    const cursor = parsed.params.cursor;
    const plan = version === "legacy"
      ? table.resolveLegacy(cursor, now())
      : table.resolveV2(cursor, "v1", now(), earlyReplayUs);
    return {
      table,
      wire: version === "legacy" ? "legacy" : "v1",
      filter: parsed.filter,
      v2Filter: undefined,
      compress: parsed.params.compress,
      limit: parsed.params.maxMessageSizeBytes,
      plan,
      closeAtEnd,
      highWaterMark,
      ping,
      writeTimeoutMs: writeTimeoutMs ?? (version === "legacy" ? 10_000 : 5_000),
      faults,
      errorAfter,
    };
  };

  /** Decides how a `subscribeEvents` request proceeds, or why it may not. */
  const prepareV2 = (
    record: ConnectionRecord,
    rawQuery: string,
    headers: Headers,
  ): Refusal | Omit<SessionConfig, "record" | "stalls"> => {
    const parsed = parseSubscribeEventsRequest(rawQuery, headers, v2Compressor ? dictionaryId : undefined);
    const v2 = parsed.params;
    record.v2 = v2;
    record.params = {
      wantedCollections: v2.collections,
      wantedDids: v2.dids,
      cursor: v2.cursor,
      compress: v2.zstdDictionary !== undefined,
      maxMessageSizeBytes: v2.maxMessageSizeBytes,
      requireHello: false,
    };
    if (!parsed.ok) return { status: 400, name: parsed.name, message: parsed.message };
    const plan = table.resolveV2(v2.cursor, "v2", now(), earlyReplayUs);
    if (plan.tooOld) return { status: 400, name: "CursorTooOld", message: plan.tooOld };
    return {
      table,
      wire: "v2",
      filter: { collections: null, prefixes: [], dids: null },
      v2Filter: parsed.filter,
      compress: v2.zstdDictionary !== undefined,
      limit: v2.maxMessageSizeBytes,
      plan,
      closeAtEnd,
      highWaterMark,
      ping,
      writeTimeoutMs: writeTimeoutMs ?? (version === "legacy" ? 10_000 : 5_000),
      faults,
      errorAfter,
    };
  };

  /** Serves one subscription; resolves to true when a session took (and has since closed) the connection. */
  const subscribe = async (
    conn: Deno.TcpConn,
    head: RequestHead,
    url: URL,
    endpoint: ConnectionRecord["endpoint"],
  ): Promise<boolean> => {
    const rawQuery = url.search.slice(1);
    const record: ConnectionRecord = {
      id: connections.length + 1,
      endpoint,
      query: rawQuery,
      params: {
        wantedCollections: [],
        wantedDids: [],
        cursor: undefined,
        compress: false,
        maxMessageSizeBytes: 0,
        requireHello: false,
      },
      status: 101,
      hellos: [],
      sent: 0,
      dropped: false,
      stalled: false,
      garbage: 0,
    };
    connections.push(record);
    let prepared = endpoint === "subscribe"
      ? prepareV1(record, rawQuery, head.headers)
      : prepareV2(record, rawQuery, head.headers);
    // A bootstrapping server refuses whatever was asked (the params are still recorded).
    if (refused < faults.refuseFirst) {
      refused++;
      prepared = {
        status: 503,
        name: "ServiceUnavailable",
        message: BOOTSTRAPPING,
        ...(faults.retryAfter === undefined ? {} : { headers: { "Retry-After": String(faults.retryAfter) } }),
      };
    }
    if (!("status" in prepared) && stopping) {
      prepared = { status: 503, name: "ServiceUnavailable", message: "server shutting down" };
    }
    let handshake: Uint8Array | undefined;
    if (!("status" in prepared)) {
      // The legacy server upgrades with gorilla/websocket, the v2 server with coder/websocket; each
      // refuses a request that is no proper handshake in its own words.
      const accepted = await acceptWebSocket(
        head.headers,
        endpoint === "subscribeEvents" ? [V2_SUBPROTOCOL] : [],
        version === "v2" ? "coder" : "gorilla",
      );
      if ("refusal" in accepted) {
        const { status, body, headers } = accepted.refusal;
        prepared = { status, message: body, headers };
      } else handshake = accepted.response;
    }
    if ("status" in prepared || !handshake) {
      const refusal = prepared as Refusal;
      record.status = refusal.status;
      record.error = refusal.message;
      if (endpoint === "subscribeEvents" && refusal.name) {
        record.errorName = refusal.name;
        await writeXrpcError(conn, refusal.status, refusal.name, refusal.message, refusal.headers);
      } else if (version === "v2") {
        await writeGoHttpError(conn, refusal.status, refusal.message, refusal.headers);
      } else {
        await writeTextResponse(conn, refusal.status, refusal.message, refusal.headers);
      }
      return false;
    }
    if (version === "v2") record.startSeq = table.seq(prepared.plan.start);
    pending.delete(conn);
    const session = new Session(
      { ...prepared, record, stalls: upgraded++ < faults.stallConnections },
      conn,
      head,
      handshake,
    );
    sessions.add(session);
    // A shutdown that started while the handshake was computed missed this session.
    if (stopping) session.shutdown();
    await session.done;
    sessions.delete(session);
    return true;
  };

  /** `getZstdDictionary` (v2 only). */
  const serveDictionary = async (conn: Deno.TcpConn, head: RequestHead, url: URL): Promise<void> => {
    const rawId = url.searchParams.get("id");
    if (rawId !== null && !/^[+-]?\d+$/.test(rawId)) {
      await writeXrpcError(conn, 400, "InvalidRequest", "id must be an integer zstd dictionary ID");
      return;
    }
    if (v2Dictionary === undefined) {
      await writeXrpcError(conn, 404, "DictionaryNotFound", "this server publishes no zstd dictionary");
      return;
    }
    if (rawId !== null && Number(rawId) !== dictionaryId) {
      await writeXrpcError(
        conn,
        404,
        "DictionaryNotFound",
        `no dictionary with id ${Number(rawId)}; current dictionary id is ${dictionaryId}`,
      );
      return;
    }
    const etag = `"zstd-dict-${dictionaryId}"`;
    const headers = {
      ETag: etag,
      "Cache-Control": "public, max-age=31536000, immutable",
      "X-Zstd-Dictionary-Id": String(dictionaryId),
    };
    const fresh = head.headers.get("if-none-match")?.split(",").some((tag) => tag.trim() === etag);
    await writeResponse(
      conn,
      fresh ? 304 : 200,
      fresh ? "" : v2Dictionary,
      "application/octet-stream",
      headers,
    );
  };

  const handle = async (conn: Deno.TcpConn): Promise<void> => {
    pending.add(conn);
    let handedOver = false;
    try {
      conn.setNoDelay(true);
      let head: RequestHead | null;
      try {
        head = await readRequestHead(conn);
      } catch (err) {
        if (err instanceof HttpError) await writeTextResponse(conn, err.status, err.message);
        return;
      }
      if (head === null) return;
      let url: URL;
      try {
        url = new URL(head.target, "http://localhost");
      } catch {
        await writeTextResponse(conn, 400, "invalid request target");
        return;
      }
      const path = url.pathname;
      const isV2Route = version === "v2" && (path === SUBSCRIBE_EVENTS_PATH || path === GET_DICTIONARY_PATH);
      if (path === "/subscribe" || isV2Route) {
        if (head.method !== "GET") {
          if (path === "/subscribe") await writeTextResponse(conn, 405, "Method Not Allowed");
          else await writeXrpcError(conn, 405, "InvalidRequest", `method ${head.method} not allowed`);
          return;
        }
        if (path === GET_DICTIONARY_PATH) await serveDictionary(conn, head, url);
        else {handedOver = await subscribe(
            conn,
            head,
            url,
            path === "/subscribe" ? "subscribe" : "subscribeEvents",
          );}
        return;
      }
      if (path === "/" && head.method === "GET") {
        await writeTextResponse(conn, 200, "Welcome to Jetstream");
        return;
      }
      await writeTextResponse(conn, 404, "Not Found");
    } catch {
      // The peer went away or the server is shutting down; nothing to report to anyone.
    } finally {
      pending.delete(conn);
      // A session closes its own connection; everything else ends after its one response.
      if (!handedOver) {
        try {
          conn.close();
        } catch {
          // Already closed.
        }
      }
    }
  };

  const listener = Deno.listen({ hostname, port, transport: "tcp" });
  const boundPort = (listener.addr as Deno.NetAddr).port;
  const acceptLoop = (async () => {
    try {
      for await (const conn of listener) {
        const task = handle(conn);
        tasks.add(task);
        task.finally(() => tasks.delete(task));
      }
    } catch {
      // The listener was closed.
    }
  })();

  const shutdown = (): Promise<void> => {
    stopping ??= (async () => {
      signal?.removeEventListener("abort", onAbort);
      try {
        listener.close();
      } catch {
        // Already closed.
      }
      await acceptLoop;
      for (const conn of pending) {
        try {
          conn.close();
        } catch {
          // Already closed.
        }
      }
      for (const session of sessions) session.shutdown();
      while (tasks.size > 0) await Promise.all([...tasks]);
    })();
    return stopping;
  };
  const onAbort = (): void => void shutdown();
  if (signal?.aborted) void shutdown();
  else signal?.addEventListener("abort", onAbort, { once: true });

  const origin = `${hostForUrl(hostname)}:${boundPort}`;
  return {
    url: `ws://${origin}/subscribe`,
    v2Url: `ws://${origin}${SUBSCRIBE_EVENTS_PATH}`,
    httpUrl: `http://${origin}`,
    port: boundPort,
    connections,
    shutdown,
    [Symbol.asyncDispose]: shutdown,
  };
}
