/**
 * One WebSocket connection to Jetstream, read by pulling.
 *
 * By default (`transport: "raw"`) the project's own client in `raw_ws.ts` is used: it reads the
 * socket in large chunks, only when the pipeline asks, and parses every message of a chunk at once.
 * The transports below remain as options.
 *
 * Where Deno offers `WebSocketStream` (`"unstable": ["net"]`, which this project's deno.json sets),
 * frames are read only when the pipeline asks for them: a slow sink stops the reads and TCP slows the
 * server, so memory stays flat. Elsewhere the standard `WebSocket` is used: it never stops reading, so
 * its frames go into a bounded buffer, and when the pipeline falls behind the connection closes
 * itself (`overflow`) and the caller reconnects from its cursor instead of buffering without limit.
 *
 * Either way, a silent connection is closed after an idle timeout, because Deno does not show the
 * server's pings.
 *
 * @module
 */
import { openRawConnection } from "./raw_ws.ts";
import { bodyInMessage, urlInMessage } from "./utf8.ts";

/**
 * A text message whose payload is not valid UTF-8. Deno's `WebSocket` fails the whole connection
 * on one (close 1007), and the reconnect would meet it again; jetfill's transport hands it on as
 * this, so that the run counts it and goes on.
 */
export class InvalidTextFrame {
  /** A frame of `byteLength` payload bytes. */
  constructor(readonly byteLength: number) {}
}

/**
 * A message larger than the connection reads (`maxMessageBytes`): jetfill's transport skips its
 * payload as it arrives, without holding it, and hands this on so that the run counts it and goes
 * on (closing with 1009 would only bring the same message back on the reconnect).
 */
export class OversizedFrame {
  /**
   * A message of `byteLength` payload bytes, over `limit`; `head` is the start of its payload, as
   * far as it was at hand (enough to say which event it was).
   */
  constructor(
    readonly byteLength: number,
    readonly binary: boolean,
    readonly limit: number,
    readonly head: Uint8Array,
  ) {}
}

/** A frame as received: text (JSON), binary (zstd), text that is not UTF-8, or one too large to read. */
export type Frame = string | ArrayBuffer | Uint8Array | InvalidTextFrame | OversizedFrame;

/** The common face of both transports. */
export interface Connection {
  /** The URL connected to. */
  readonly url: string;
  /** Bytes received on this connection. */
  readonly bytesReceived: number;
  /** Why it ended, once it has. */
  readonly cause: CloseCause | undefined;
  /** The next frames, waiting for at least one; `null` once the connection has ended. */
  next(): Promise<Frame[] | null>;
  /**
   * The payload size in bytes of each frame the last `next()` returned, when the transport knows it
   * (for a text frame, its UTF-8 length).
   */
  readonly frameBytes?: readonly number[];
  /** Closes the connection. */
  close(): void;
  /** Changes the idle timeout from now on; only jetfill's own transport has it. */
  setIdleTimeout?(ms: number): void;
  /**
   * Starts the closing handshake but goes on reading: `next()` returns what the server sent before
   * it saw the close, then `null` (once it has waited `waitMs` in all for a server that does not
   * answer, or `maxMs` after the call). False when the connection is already ending. Only jetfill's
   * own transport has it: a `WebSocket` drops what arrives once it closes.
   */
  drain?(waitMs: number, maxMs?: number): boolean;
  /** Resolves once the socket is fully released. */
  closed(): Promise<void>;
}

/** Why a connection ended. */
export type CloseCause =
  | { kind: "closed"; code: number; reason: string }
  | {
    kind: "idle";
    /** Set when a message had begun arriving and stalled (an endless or stuck message). */
    partial?: true;
  }
  | { kind: "overflow" }
  | { kind: "aborted" };

/** A connection attempt failed before the WebSocket opened. */
export class ConnectError extends Error {
  /** The HTTP status of the refused upgrade, when there was one. */
  readonly status: number | undefined;
  /** The body of the refusal (Jetstream explains a 400 there), when it could be read. */
  readonly body: string | undefined;
  /**
   * Deno's permissions denied the connection (no `--allow-net` for the host): trying again cannot
   * help.
   */
  readonly denied: boolean;
  /** How long the refusal's `Retry-After` header asks to wait before trying again (ms), if it did. */
  readonly retryAfterMs: number | undefined;
  /** Creates the error. */
  constructor(message: string, status?: number, body?: string, denied = false, retryAfterMs?: number) {
    super(message);
    this.name = "ConnectError";
    this.status = status;
    this.body = body;
    this.denied = denied;
    this.retryAfterMs = retryAfterMs;
  }
}

/** Options of {@link openConnection}. */
export interface ConnectionOptions {
  /** Close the connection when nothing arrives for this long (ms). */
  idleTimeoutMs: number;
  /** Close the connection when frames waiting to be pulled exceed this many bytes. */
  maxBufferedBytes: number;
  /** Text to send as soon as the socket opens (the `options_update` hello). */
  hello?: string;
  /** Extra protocols to offer. */
  protocols?: string[];
  /** Aborting closes the connection. */
  signal?: AbortSignal;
  /** Use the buffered `WebSocket` transport even where `WebSocketStream` exists (`transport: "websocket"`). */
  forceBuffered?: boolean;
  /**
   * How to connect: `"raw"`, this project's own WebSocket client on `Deno.connect` and `Deno.startTls`
   * (pulled, many messages per read; see `raw_ws.ts`); `"stream"`, Deno's `WebSocketStream` (pulled,
   * one message per read), or `WebSocket` where it is missing; `"websocket"`, the standard
   * `WebSocket` with a bounded buffer.
   *
   * @default {"raw", or "websocket" with forceBuffered}
   */
  transport?: "raw" | "stream" | "websocket";
  /** The raw client's `linger` (see `RawConnectionOptions`); the others close as their `WebSocket` does. */
  linger?: boolean;
}

/**
 * Calls `onIdle` once `ms` have passed since `lastActivity()` (re-armed as activity moves it), and
 * returns the function that stops watching. Deno hides the server's pings, so silence is all a
 * client can see of a dead connection.
 */
export function watchIdle(ms: number, lastActivity: () => number, onIdle: () => void): () => void {
  if (!Number.isFinite(ms)) return () => {};
  let timer: ReturnType<typeof setTimeout> | undefined;
  const tick = () => {
    const quiet = Date.now() - lastActivity();
    if (quiet >= ms) onIdle();
    else timer = setTimeout(tick, ms - quiet);
  };
  timer = setTimeout(tick, ms);
  return () => clearTimeout(timer);
}

/** A connection over the standard `WebSocket`, with a bounded buffer. */
export class BufferedConnection implements Connection {
  /** The URL connected to. */
  readonly url: string;
  /** Bytes received on this connection. */
  bytesReceived = 0;
  /** Why it ended, once it has. */
  cause: CloseCause | undefined;
  #ws: WebSocket;
  #buf: Frame[] = [];
  #bufBytes = 0;
  #wake: (() => void) | undefined;
  #lastActivity = Date.now();
  #stopIdle: () => void = () => {};
  #opts: ConnectionOptions;
  #onAbort = () => this.#end({ kind: "aborted" });

  /** Wraps an open socket; use {@link openConnection}. */
  constructor(ws: WebSocket, url: string, opts: ConnectionOptions) {
    this.#ws = ws;
    this.url = url;
    this.#opts = opts;
    ws.onmessage = (e: MessageEvent) => this.#onMessage(e.data);
    // Deno reports 0 for a connection lost without a close frame; the protocol calls that 1006.
    ws.onclose = (e: CloseEvent) => this.#end({ kind: "closed", code: e.code || 1006, reason: e.reason });
    ws.onerror = () => {};
    opts.signal?.addEventListener("abort", this.#onAbort, { once: true });
    this.#armIdle();
  }

  #onMessage(data: Frame): void {
    if (this.cause) return;
    const size = typeof data === "string" ? data.length : data.byteLength;
    this.bytesReceived += size;
    this.#bufBytes += size;
    this.#buf.push(data);
    this.#lastActivity = Date.now();
    if (this.#bufBytes > this.#opts.maxBufferedBytes) this.#end({ kind: "overflow" });
    const wake = this.#wake;
    if (wake) {
      this.#wake = undefined;
      wake();
    }
  }

  #armIdle(): void {
    this.#stopIdle = watchIdle(
      this.#opts.idleTimeoutMs,
      () => this.#lastActivity,
      () => this.#end({ kind: "idle" }),
    );
  }

  #end(cause: CloseCause): void {
    if (this.cause) return;
    this.cause = cause;
    this.#stopIdle();
    this.#opts.signal?.removeEventListener("abort", this.#onAbort);
    if (this.#ws.readyState === WebSocket.OPEN || this.#ws.readyState === WebSocket.CONNECTING) {
      try {
        this.#ws.close(1000);
      } catch { /* already closing */ }
    }
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  /**
   * The frames received since the last call, waiting for at least one; `null` once the connection
   * has ended and everything received was taken.
   */
  async next(): Promise<Frame[] | null> {
    while (this.#buf.length === 0) {
      if (this.cause) return null;
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
    const frames = this.#buf;
    this.#buf = [];
    this.#bufBytes = 0;
    return frames;
  }

  /** Closes the connection; frames already received can still be taken. */
  close(): void {
    this.#end({ kind: "aborted" });
  }

  /** Resolves once the socket is fully closed (so tests and shutdowns leave nothing open). */
  async closed(): Promise<void> {
    if (this.#ws.readyState === WebSocket.CLOSED) return;
    await new Promise<void>((resolve) => this.#ws.addEventListener("close", () => resolve(), { once: true }));
  }
}

interface WebSocketStreamLike {
  opened: Promise<{
    readable: ReadableStream<string | Uint8Array>;
    writable: WritableStream<string | Uint8Array>;
  }>;
  closed: Promise<{ closeCode?: number; reason?: string }>;
  close(info?: { closeCode?: number; reason?: string }): void;
}
type WebSocketStreamCtor = new (url: string, options?: { protocols?: string[] }) => WebSocketStreamLike;

/** A connection over `WebSocketStream`: nothing is read until the pipeline asks. */
class StreamConnection implements Connection {
  readonly url: string;
  bytesReceived = 0;
  cause: CloseCause | undefined;
  readonly #wss: WebSocketStreamLike;
  readonly #reader: ReadableStreamDefaultReader<string | Uint8Array>;
  readonly #opts: ConnectionOptions;
  #lastActivity = Date.now();
  #stopIdle: () => void = () => {};
  #onAbort = () => this.#end({ kind: "aborted" });
  #wake: ((frames: Frame[] | null) => void) | undefined;

  constructor(
    wss: WebSocketStreamLike,
    reader: ReadableStreamDefaultReader<string | Uint8Array>,
    url: string,
    opts: ConnectionOptions,
  ) {
    this.#wss = wss;
    this.#reader = reader;
    this.url = url;
    this.#opts = opts;
    opts.signal?.addEventListener("abort", this.#onAbort, { once: true });
    this.#stopIdle = watchIdle(
      opts.idleTimeoutMs,
      () => this.#lastActivity,
      () => this.#end({ kind: "idle" }),
    );
  }

  #end(cause: CloseCause): void {
    if (this.cause) return;
    this.cause = cause;
    this.#stopIdle();
    this.#opts.signal?.removeEventListener("abort", this.#onAbort);
    // A pending next() is answered here, not by cancelling the reader: cancelling trips a Deno 2.9
    // WebSocketStream bug (its pull enqueues into the cancelled stream and throws).
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.(null);
    try {
      this.#wss.close({ closeCode: 1000 });
    } catch { /* already closed */ }
  }

  next(): Promise<Frame[] | null> {
    if (this.cause) return Promise.resolve(null);
    return new Promise((resolve) => {
      this.#wake = resolve;
      this.#reader.read().then((chunk) => {
        if (this.#wake !== resolve) return;
        if (chunk.done) {
          this.#wake = undefined;
          // Answer the close, and do not wait forever for a handshake a broken peer never ends.
          try {
            this.#wss.close();
          } catch { /* already closing */ }
          let timer: ReturnType<typeof setTimeout> | undefined;
          Promise.race([
            this.#wss.closed.catch(() => ({ closeCode: 1006, reason: "" })),
            new Promise<{ closeCode: number; reason: string }>((r) =>
              timer = setTimeout(
                () => r({ closeCode: 1006, reason: "the server's close did not complete" }),
                1000,
              )
            ),
          ]).then((info) => {
            clearTimeout(timer);
            this.#end({ kind: "closed", code: info.closeCode || 1006, reason: info.reason ?? "" });
            resolve(null);
          });
          return;
        }
        this.#wake = undefined;
        const frame = chunk.value;
        this.bytesReceived += typeof frame === "string" ? frame.length : frame.byteLength;
        this.#lastActivity = Date.now();
        resolve([frame]);
      }, (err: Error) => {
        if (this.#wake !== resolve) return;
        this.#wake = undefined;
        this.#end({ kind: "closed", code: 1006, reason: err?.message ?? "" });
        resolve(null);
      });
    });
  }

  close(): void {
    this.#end({ kind: "aborted" });
  }

  async closed(): Promise<void> {
    // A stalled server may never answer the close handshake; do not wait for it forever.
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.#wss.closed.catch(() => {}),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, 2000))),
    ]);
    clearTimeout(timer);
  }
}

async function openStreamConnection(
  Stream: WebSocketStreamCtor,
  url: string,
  opts: ConnectionOptions,
): Promise<Connection> {
  if (opts.signal?.aborted) throw new ConnectError(`connection to ${urlInMessage(url)} aborted`);
  const wss = new Stream(url, opts.protocols ? { protocols: opts.protocols } : undefined);
  wss.closed.catch(() => {});
  const limit = Math.min(opts.idleTimeoutMs, 30_000);
  let timer: ReturnType<typeof setTimeout> | undefined;
  let abort: (() => void) | undefined;
  try {
    const opened = await Promise.race([
      wss.opened,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within ${limit / 1000} s`)), limit);
        abort = () => reject(new Error("aborted"));
        opts.signal?.addEventListener("abort", abort, { once: true });
      }),
    ]);
    const reader = opened.readable.getReader();
    if (opts.hello) {
      const writer = opened.writable.getWriter();
      await writer.write(opts.hello);
      writer.releaseLock();
    }
    return new StreamConnection(wss, reader, url, opts);
  } catch (err) {
    try {
      wss.close();
    } catch { /* not open */ }
    throw await connectError(url, (err as Error).message ?? String(err), opts.signal);
  } finally {
    clearTimeout(timer);
    if (abort) opts.signal?.removeEventListener("abort", abort);
  }
}

async function connectError(url: string, message: string, signal?: AbortSignal): Promise<ConnectError> {
  const status = /status code:? (\d{3})/i.exec(message)?.[1];
  if (status && Number(status) >= 400 && !signal?.aborted) {
    const r = await refusalBody(url, signal);
    const body = r.status === Number(status) ? r.body : undefined;
    return new ConnectError(
      `${urlInMessage(url)} refused the connection: HTTP ${status}${body ? `: ${bodyInMessage(body)}` : ""}`,
      Number(status),
      body,
    );
  }
  return new ConnectError(
    `cannot connect to ${urlInMessage(url)}: ${message.replace(/^(NetworkError|WebSocketError): /, "")}`,
    status ? Number(status) : undefined,
  );
}

async function refusalBody(url: string, signal?: AbortSignal): Promise<{ status?: number; body?: string }> {
  // The WebSocket API hides the refused upgrade's response; a plain GET with the same query gets
  // the server's explanation (Jetstream validates the query before upgrading).
  const http = url.replace(/^ws/, "http");
  try {
    const res = await fetch(http, { signal: signal ?? AbortSignal.timeout(5000) });
    const body = (await res.text()).trim().slice(0, 500);
    return { status: res.status, body };
  } catch {
    return {};
  }
}

/**
 * Opens a WebSocket and resolves once it is open; rejects with a {@link ConnectError} carrying the
 * HTTP status and body when the server refuses the upgrade.
 *
 * @example
 * ```ts
 * import { openConnection } from "./socket.ts";
 * const conn = await openConnection("ws://127.0.0.1:6008/subscribe", {
 *   idleTimeoutMs: 60_000,
 *   maxBufferedBytes: 64 << 20,
 * });
 * for (let frames = await conn.next(); frames; frames = await conn.next()) console.log(frames.length);
 * ```
 */
export function openConnection(url: string, opts: ConnectionOptions): Promise<Connection> {
  const transport = opts.transport ?? (opts.forceBuffered ? "websocket" : "raw");
  // Deno's own sockets cost a promise and an async op per message; the raw client parses whole
  // reads at once, which matters at Jetstream's rates.
  if (transport === "raw" && /^wss?:\/\//i.test(url)) return openRawConnection(url, opts);
  const Stream = (globalThis as unknown as { WebSocketStream?: WebSocketStreamCtor }).WebSocketStream;
  if (Stream && transport !== "websocket") return openStreamConnection(Stream, url, opts);
  return new Promise((resolve, reject) => {
    if (opts.signal?.aborted) return reject(new ConnectError(`connection to ${urlInMessage(url)} aborted`));
    const ws = new WebSocket(url, opts.protocols);
    ws.binaryType = "arraybuffer";
    let message = "";
    const timer = setTimeout(() => {
      message = `no answer within ${Math.min(opts.idleTimeoutMs, 30_000) / 1000} s`;
      ws.close();
    }, Math.min(opts.idleTimeoutMs, 30_000));
    const onAbort = () => {
      message = "aborted";
      ws.close();
    };
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    ws.onopen = () => {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      const conn = new BufferedConnection(ws, url, opts);
      if (opts.hello) ws.send(opts.hello);
      resolve(conn);
    };
    ws.onerror = (e) => {
      message ||= (e as ErrorEvent).message ?? "connection failed";
    };
    ws.onclose = async () => {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      reject(await connectError(url, message, opts.signal));
    };
  });
}
