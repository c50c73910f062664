/**
 * A faithful legacy Jetstream `/subscribe` server (protocol doc §1.1, §2, §5) that plays a capture:
 * the same query parameters, limits, 400 texts, cursor rules and `options_update` handling as the
 * legacy Go server, fast enough to benchmark a client against (hundreds of thousands of events/s).
 *
 * It speaks HTTP/1.1 and WebSocket itself on a `Deno.listen` socket (see `websocket.ts` for why),
 * which also leaves room for byte-level fault injection later.
 *
 * Convention for a capture standing in for a live server: **a connection without a cursor gets the
 * capture from its first event, as if those events were arriving live**; a cursor replays from the
 * first event with `time_us >= cursor` (an older cursor is clamped to the first event, `0` or a
 * negative cursor means everything), and a cursor later than "now" means live with nothing new, so
 * nothing is sent.
 *
 * @module
 */
import type { CaptureEvent } from "./capture.ts";
import {
  garbageKind,
  junkBytes,
  type ResolvedFaults,
  resolveFaults,
  type ServerFaults,
  v1Garbage,
} from "./faults.ts";
import { acceptWebSocket, HttpError, readRequestHead, type RequestHead, writeTextResponse } from "./http1.ts";
import {
  type OptionsUpdatePayload,
  parseClientMessage,
  parseSubscribeRequest,
  type SubscribeParams,
  type SubscriberFilter,
  wants,
} from "./options.ts";
import { ServerWebSocket } from "./websocket.ts";

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
  /** The events to serve, in `time_us` order (see `loadCapture()` and `parseCapture()`). */
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
   * The clock deciding that a cursor is in the future (and so means live), unix microseconds.
   *
   * @default {() => Date.now() * 1000}
   */
  now?: () => number;
  /**
   * Encoder for compressed connections (`compress=true` or a `Socket-Encoding` header containing
   * `zstd`): each event is sent as a binary frame of `compressor(text)`, computed once per event and
   * cached. Without it, such requests get HTTP 400 `compression not available on this server`.
   */
  compressor?: (text: string) => Uint8Array;
  /**
   * Bytes a connection may have queued in its socket before the sender yields and waits for them to
   * drain. Larger values cost memory; much smaller ones cost throughput.
   *
   * @default {4194304}
   */
  highWaterMark?: number;
  /**
   * Deliberate misbehaviour (HTTP 503s, dropped, stalled and garbage-laden connections), all off by
   * default and all deterministic; see {@linkcode ServerFaults}.
   */
  faults?: ServerFaults;
}

/**
 * What the server saw and did on one `/subscribe` request; updated as the connection runs, so tests
 * can check what a client asked for.
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
  /** The raw query string, without the leading `?`. */
  query: string;
  /** The request's options as the server read them. */
  params: SubscribeParams;
  /** 101 when upgraded to a WebSocket, else the HTTP status of the refusal. */
  status: number;
  /** The body of a refusal (the legacy error text). */
  error?: string;
  /** Payloads of the valid `options_update` messages received, in order (the first is the hello). */
  hellos: OptionsUpdatePayload[];
  /** Events sent so far (queued to the socket). */
  sent: number;
  /**
   * Once closed: the code of the client's close frame (an echo of the server's when the server
   * closed first), or 1006 when the connection ended without one.
   */
  closeCode?: number;
  /** Once closed: the reason in the client's close frame. */
  closeReason?: string;
  /** Whether the server dropped the connection on purpose (`faults.dropEvery`). */
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
 * import { serveJetstream } from "./server.ts";
 * const server = serveJetstream({ events: [] });
 * console.log(server.url); // ws://127.0.0.1:PORT/subscribe
 * await server.shutdown();
 * ```
 */
export interface JetstreamServer {
  /** The WebSocket URL, `ws://127.0.0.1:PORT/subscribe`. */
  url: string;
  /** The port actually bound. */
  port: number;
  /** One record per `/subscribe` request, in arrival order (refused ones included). */
  connections: ConnectionRecord[];
  /**
   * Stops listening, closes every connection (code 1001, `server shutting down`) and resolves once
   * all sockets are released. Safe to call more than once.
   */
  shutdown(): Promise<void>;
  /** Same as {@linkcode JetstreamServer.shutdown}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>;
}

const DEFAULT_HIGH_WATER_MARK = 4 * 1024 * 1024;
/** Scan this many events between checks of the socket's queue. */
const CHECK_EVERY = 64;

/** Shared, lazily built per-event data: each event is compressed once, not once per connection. */
class EventTable {
  readonly events: CaptureEvent[];
  /** Whether `time_us` never decreases, so a cursor can be found by binary search. */
  readonly sorted: boolean;
  readonly #compressor: ((text: string) => Uint8Array) | undefined;
  readonly #compressed: (Uint8Array | undefined)[] = [];

  constructor(events: CaptureEvent[], compressor: ((text: string) => Uint8Array) | undefined) {
    this.events = events;
    this.#compressor = compressor;
    let sorted = true;
    for (let i = 1; i < events.length && sorted; i++) sorted = events[i].timeUs >= events[i - 1].timeUs;
    this.sorted = sorted;
  }

  get canCompress(): boolean {
    return this.#compressor !== undefined;
  }

  /** First index whose `time_us >= cursor`. */
  lowerBound(cursor: number): number {
    let lo = 0;
    let hi = this.events.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.events[mid].timeUs < cursor) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Compresses any text, uncached (for one-off frames). */
  compressText(text: string): Uint8Array {
    return this.#compressor!(text);
  }

  compressed(index: number): Uint8Array {
    let frame = this.#compressed[index];
    if (frame === undefined) {
      frame = this.#compressor!(this.events[index].text);
      this.#compressed[index] = frame;
    }
    return frame;
  }
}

interface SessionConfig {
  table: EventTable;
  record: ConnectionRecord;
  filter: SubscriberFilter;
  /** First index to consider. */
  start: number;
  /** Events with a smaller `time_us` are skipped (for unsorted captures; else -Infinity). */
  minTimeUs: number;
  closeAtEnd: boolean;
  highWaterMark: number;
  faults: ResolvedFaults;
  /** Whether this connection is one of those that stall (`faults.stallConnections`). */
  stalls: boolean;
}

/**
 * One subscriber. Every event frame leaves through `#pump()`, which stops at the event counts where
 * a fault is due (`#nextStop()`) and applies it (`#fault()`).
 */
class Session {
  readonly #config: SessionConfig;
  readonly #ws: ServerWebSocket;
  #filter: SubscriberFilter;
  #helloWanted: boolean;
  #wake: (() => void) | undefined;
  /** Resolves once the connection is closed and the pump has stopped. */
  readonly done: Promise<void>;

  constructor(config: SessionConfig, conn: Deno.Conn, head: RequestHead, handshake: Uint8Array) {
    this.#config = config;
    this.#filter = config.filter;
    this.#helloWanted = config.record.params.requireHello;
    this.#ws = new ServerWebSocket(conn, head.rest, {
      onText: (text) => this.#onText(text),
      // Binary client frames are ignored, as on the legacy server.
      onClose: (code, reason) => {
        config.record.closeCode = code;
        config.record.closeReason = reason;
        this.#wakeUp();
      },
    });
    this.#ws.sendRaw(handshake);
    const pump = this.#pump().catch(() => this.#ws.abort());
    this.done = Promise.all([pump, this.#ws.finished]).then(() => {});
  }

  #wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  #onText(text: string): void {
    if (this.#ws.closing) return;
    const message = parseClientMessage(text);
    if (message.type === "invalid") {
      this.#ws.close(1000, message.reason);
      this.#wakeUp();
      return;
    }
    if (message.type === "ignored") return;
    this.#config.record.hellos.push(message.payload);
    // Full replacement; maxMessageSizeBytes in an update is ignored (legacy behaviour).
    this.#filter = message.filter;
    if (this.#helloWanted) {
      this.#helloWanted = false;
      this.#wakeUp();
    }
  }

  /** Starts closing with 1001; resolves when the connection is gone. */
  shutdown(): Promise<void> {
    this.#ws.close(1001, "server shutting down");
    this.#wakeUp();
    return this.done;
  }

  /** The smallest event count `>= from` after which a fault is due, or `Infinity`. */
  #nextStop(from: number): number {
    const { faults, stalls } = this.#config;
    let next = Infinity;
    if (faults.garbageEvery !== Infinity) {
      next = Math.max(1, Math.ceil(from / faults.garbageEvery)) * faults.garbageEvery;
    }
    if (faults.dropEvery >= from && faults.dropEvery < next) next = faults.dropEvery;
    if (stalls && faults.stallAfter >= from && faults.stallAfter < next) next = faults.stallAfter;
    return next;
  }

  /**
   * Applies the faults due after `count` events (the last one at `lastIndex`, -1 before any).
   * Resolves to true when the pump must stop: the connection was dropped or stalled.
   */
  async #fault(count: number, lastIndex: number): Promise<boolean> {
    const { faults, stalls, record, table } = this.#config;
    const ws = this.#ws;
    if (ws.closing) return true;
    if (count > 0 && count % faults.garbageEvery === 0 && lastIndex >= 0) {
      const index = record.garbage++;
      const kind = garbageKind(record.id, index);
      if (kind === "binary-junk") {
        ws.sendBinary(junkBytes(record.id, index));
      } else {
        const text = v1Garbage(kind, table.events[lastIndex].text, `${record.id}-${index}`);
        if (record.params.compress) ws.sendBinary(table.compressText(text));
        else ws.sendText(text);
      }
    }
    if (count === faults.dropEvery) {
      record.dropped = true;
      await ws.drain(0);
      ws.abort();
      return true;
    }
    if (stalls && count === faults.stallAfter) {
      record.stalled = true;
      ws.mute();
      await ws.finished;
      return true;
    }
    return false;
  }

  async #pump(): Promise<void> {
    const { table, record, minTimeUs, highWaterMark } = this.#config;
    const ws = this.#ws;
    if (this.#helloWanted) await new Promise<void>((resolve) => this.#wake = resolve);
    const events = table.events;
    const end = events.length;
    const limit = record.params.maxMessageSizeBytes;
    const compress = record.params.compress;
    let i = this.#config.start;
    let sent = 0;
    let last = -1;
    let nextStop = this.#nextStop(0);
    for (;;) {
      if (sent === nextStop) {
        record.sent = sent;
        if (await this.#fault(sent, last)) return;
        nextStop = this.#nextStop(sent + 1);
      }
      if (i >= end || ws.closing) break;
      // Queue frames synchronously until the socket holds enough to stay busy: nothing is written
      // before this loop yields, and awaiting per message would cost most of the throughput.
      let check = 0;
      while (i < end) {
        const index = i++;
        const event = events[index];
        if (event.timeUs < minTimeUs) continue;
        if (!wants(this.#filter, event.did, event.kind, event.collection)) continue;
        if (compress) {
          const frame = table.compressed(index);
          if (limit > 0 && frame.length > limit) continue;
          if (!ws.sendBinary(frame)) break;
        } else if (!ws.sendText(event.text, limit)) {
          if (ws.closing) break;
          continue; // over maxMessageSizeBytes
        }
        last = index;
        if (++sent === nextStop) break;
        if (++check === CHECK_EVERY) {
          check = 0;
          if (ws.bufferedAmount > highWaterMark) break;
        }
      }
      record.sent = sent;
      if (sent !== nextStop) await ws.drain(highWaterMark / 2);
    }
    record.sent = sent;
    if (this.#config.closeAtEnd) ws.close(1000, "");
  }
}

function hostForUrl(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

/**
 * Starts a legacy-wire Jetstream server playing `events` on `GET /subscribe` (and `GET /` answering
 * `Welcome to Jetstream`). Each event is sent as a text frame holding its exact captured line, or as
 * a binary frame from `compressor` on compressed connections.
 *
 * Query parameters follow the legacy server: repeated `wantedCollections` (NSIDs or `<prefix>.*`,
 * at most 100) and `wantedDids` (at most 10,000), `cursor` (inclusive `time_us`), `compress`,
 * `maxMessageSizeBytes` and `requireHello`, with the same HTTP 400 texts. `options_update` messages
 * replace the DID and collection filters for events not yet sent; an invalid one closes the
 * connection with code 1000. A connection without a cursor gets the capture from its start, as if
 * live (see the module docs).
 *
 * @example
 * ```ts
 * import { generateCapture } from "./synth.ts";
 * import { parseCapture } from "./capture.ts";
 * import { serveJetstream } from "./server.ts";
 *
 * const events = parseCapture(generateCapture({ count: 100, seed: 1 }));
 * await using server = serveJetstream({ events, closeAtEnd: true });
 * const socket = new WebSocket(`${server.url}?wantedCollections=app.bsky.feed.*`);
 * socket.onmessage = (event) => console.log(JSON.parse(event.data).did);
 * await new Promise((resolve) => socket.onclose = resolve);
 * ```
 */
export function serveJetstream(options: JetstreamServerOptions): JetstreamServer {
  const {
    events,
    hostname = "127.0.0.1",
    port = 0,
    signal,
    closeAtEnd = false,
    now = () => Date.now() * 1000,
    compressor,
    highWaterMark = DEFAULT_HIGH_WATER_MARK,
  } = options;
  const faults = resolveFaults(options.faults);
  if (!Array.isArray(events)) {
    throw new TypeError("Cannot serve as 'events' must be an array of capture events");
  }
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new RangeError(
      `Cannot serve as 'port' must be an integer from 0 to 65535: current value is ${port}`,
    );
  }
  if (!Number.isFinite(highWaterMark) || highWaterMark < 1) {
    throw new RangeError(
      `Cannot serve as 'highWaterMark' must be a positive number of bytes: current value is ${highWaterMark}`,
    );
  }
  const table = new EventTable(events, compressor);
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

  /**
   * Decides whether a subscription may proceed to the WebSocket handshake; `undefined` means yes.
   * `faults.refuseFirst` comes first, as a bootstrapping server refuses before reading anything.
   */
  const admit = (
    record: ConnectionRecord,
    parsed: ReturnType<typeof parseSubscribeRequest>,
  ): { status: number; body: string } | undefined => {
    if (refused < faults.refuseFirst) {
      refused++;
      return { status: 503, body: "service not ready: bootstrap in progress" };
    }
    if (!parsed.ok) return { status: 400, body: parsed.error };
    if (record.params.compress && !table.canCompress) {
      return { status: 400, body: "compression not available on this server" };
    }
    if (stopping) return { status: 503, body: "server shutting down" };
    return undefined;
  };

  /** Serves one subscription; resolves to true when a session took (and has since closed) the connection. */
  const subscribe = async (conn: Deno.TcpConn, head: RequestHead, url: URL): Promise<boolean> => {
    const parsed = parseSubscribeRequest(url.searchParams, head.headers);
    const record: ConnectionRecord = {
      id: connections.length + 1,
      query: url.search.slice(1),
      params: parsed.params,
      status: 101,
      hellos: [],
      sent: 0,
      dropped: false,
      stalled: false,
      garbage: 0,
    };
    connections.push(record);
    let refusal = admit(record, parsed);
    let handshake: Uint8Array | undefined;
    if (!refusal) {
      const accepted = await acceptWebSocket(head.headers);
      if ("error" in accepted) refusal = { status: 400, body: accepted.error };
      else handshake = accepted.response;
    }
    if (refusal || !handshake) {
      record.status = refusal?.status ?? 400;
      record.error = refusal?.body ?? "";
      await writeTextResponse(conn, record.status, record.error);
      return false;
    }
    const cursor = parsed.params.cursor;
    let start = 0;
    let minTimeUs = -Infinity;
    if (cursor !== undefined) {
      if (cursor > now()) start = events.length; // live, and the capture has nothing newer
      else if (table.sorted) start = table.lowerBound(cursor);
      else minTimeUs = cursor;
    }
    pending.delete(conn);
    const session = new Session(
      {
        table,
        record,
        filter: (parsed as { filter: SubscriberFilter }).filter,
        start,
        minTimeUs,
        closeAtEnd,
        highWaterMark,
        faults,
        stalls: upgraded++ < faults.stallConnections,
      },
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
      if (url.pathname === "/subscribe") {
        if (head.method !== "GET") {
          await writeTextResponse(conn, 405, "Method Not Allowed");
          return;
        }
        handedOver = await subscribe(conn, head, url);
        return;
      }
      if (url.pathname === "/" && head.method === "GET") {
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

  return {
    url: `ws://${hostForUrl(hostname)}:${boundPort}/subscribe`,
    port: boundPort,
    connections,
    shutdown,
    [Symbol.asyncDispose]: shutdown,
  };
}
