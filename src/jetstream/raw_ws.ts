/**
 * A WebSocket client (RFC 6455) on a raw TCP or TLS connection, built for receive speed.
 *
 * Deno's `WebSocket` and `WebSocketStream` cost an async op, a promise and an event or stream chunk
 * per message; at Jetstream's rates (hundreds of thousands of ~550-byte messages a second) that
 * machinery took a quarter of the main thread, and its garbage much of the rest. Here the socket is
 * read in large chunks and every complete message in a chunk is parsed in one synchronous loop, so
 * the per-message cost is one `TextDecoder.decode()` call.
 *
 * Reading is pulled: the socket is read only when {@linkcode RawConnection.next} is called and no
 * complete message is left, so a slow consumer stops the reads, TCP slows the server, and memory
 * stays bounded by the read buffer (or by the largest message allowed).
 *
 * No extensions (no permessage-deflate) are offered.
 *
 * @module
 */
import { show } from "../errors.ts";
import {
  type CloseCause,
  ConnectError,
  type Connection,
  type Frame,
  InvalidTextFrame,
  OversizedFrame,
} from "./socket.ts";
import { bodyInMessage, printable, urlInMessage, utf8Text } from "./utf8.ts";
import { concat, encodeBase64 } from "../bytes.ts";
import { authorityOf, connectRequest, parseProxy, proxyFor, type ProxyRoute } from "./proxy.ts";

export type { CloseCause, Connection, Frame };

/**
 * Options of {@linkcode openRawConnection}. The `ConnectionOptions` of `openConnection()` fit as
 * they are (`maxBufferedBytes` is not needed: nothing is read ahead of the consumer).
 *
 * @example
 * ```ts
 * import type { RawConnectionOptions } from "./raw_ws.ts";
 * const options: RawConnectionOptions = { idleTimeoutMs: 60_000, hello: '{"type":"options_update"}' };
 * ```
 */
export interface RawConnectionOptions {
  /**
   * End the connection (cause `idle`) when `next()` has waited this long without progress: a
   * message, or payload bytes of one still arriving (a large message that trickles in is not idle).
   * Pings, pongs and empty fragments do not count, so a server that stalls but keeps pinging is
   * caught. The opening handshake is bounded by the smaller of this and 30 s.
   *
   * @default {Infinity}
   */
  idleTimeoutMs?: number;
  /** Text to send as soon as the handshake completes (the `options_update` hello). */
  hello?: string;
  /** Subprotocols to offer in `Sec-WebSocket-Protocol`. */
  protocols?: string[];
  /** Aborting it cancels the handshake, or closes the connection (cause `aborted`). */
  signal?: AbortSignal;
  /**
   * The largest message read, fragments included: a larger one is skipped as it arrives, without
   * being held, and handed on as an `OversizedFrame`. One that goes on past
   * {@linkcode ENDLESS_MESSAGE_BYTES} (or twice this size, if larger) is no event a server would
   * send (a message of endless fragments, say): the connection then fails with 1009 "message too
   * big".
   *
   * @default {33554432}
   */
  maxMessageBytes?: number;
  /**
   * The HTTP proxy to tunnel through (an `http://` URL, see `proxyFor()`), or `null` to connect
   * directly; by default the environment's (`HTTPS_PROXY` for `wss://`, `HTTP_PROXY` for `ws://`,
   * `NO_PROXY`), as Deno's `WebSocket` takes it.
   */
  proxy?: string | null;
  /**
   * Once it closes the connection (an abort, `close()`), read on, dropping what comes, until the
   * server's close frame comes or it closes the TCP connection (or nothing has come for 100 ms; 500
   * ms at most): a connection closed with data unread is reset, which the server sees as an abnormal
   * close (1006). False drops it at once, for a connection whose server is sending fast what is no
   * longer wanted (a probe's replay): reading that on would only compete with the work that matters.
   *
   * @default {true}
   */
  linger?: boolean;
}

/**
 * A message skipped for its size that reaches this many bytes (or twice `maxMessageBytes`, if
 * larger) ends the connection: skipping it would go on for as long as the server sends. No Jetstream
 * event comes near it (a record is at most about 1 MiB).
 */
export const ENDLESS_MESSAGE_BYTES = 256 * 1024 * 1024;
const READ_BUFFER_BYTES = 256 * 1024;
/** How much of the start of a message skipped for its size is kept (to say which event it was). */
const SKIPPED_HEAD_BYTES = 512;
/** The largest message a connection holds unless told otherwise; a larger one is skipped as it comes. */
export const DEFAULT_MAX_MESSAGE_BYTES: number = 32 * 1024 * 1024;
/** Largest response head accepted in the handshake. */
const MAX_HEAD_BYTES = 64 * 1024;
/** A refusal's body is read up to this size, and for at most this long. */
const MAX_BODY_BYTES = 64 * 1024;
const BODY_TIMEOUT_MS = 2000;
/** How long a close frame may take to leave before the TCP connection is dropped anyway. */
const CLOSE_WRITE_TIMEOUT_MS = 250;
/** `closed()` never waits longer than this. */
const CLOSED_TIMEOUT_MS = 2000;
/**
 * After sending a close frame, how long the TCP connection is read on, what comes dropped, for the
 * server to close it (RFC 6455 §7.1.1), ms: a connection closed with data still unread is reset, and
 * the server would see an abnormal close (1006) rather than the closing handshake.
 */
const LINGER_MS = 500;

/** How long `next()` reads at most before it gives the event loop a turn (ms). */
const YIELD_EVERY_MS = 50;
/**
 * …and given up sooner once nothing has come for this long, ms: nothing is left unread to reset the
 * connection, and a server that answers later still had the close frame.
 */
const LINGER_QUIET_MS = 100;
/**
 * Text messages waiting to go out are held up to this many bytes (one larger message is still
 * taken when none waits): a server that does not read cannot make them pile up.
 */
const MAX_OUTBOX_BYTES = 1024 * 1024;
const WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const EMPTY = new Uint8Array(0);

/** The message's text, or an {@link InvalidTextFrame} when its bytes are not UTF-8. */
function textOf(bytes: Uint8Array): string | InvalidTextFrame {
  return utf8Text(bytes) ?? new InvalidTextFrame(bytes.byteLength);
}

/**
 * One open WebSocket connection made by {@linkcode openRawConnection}. Not safe for concurrent
 * `next()` calls: one reader at a time, as with every {@linkcode Connection}.
 *
 * @example
 * ```ts ignore
 * import { openRawConnection } from "./raw_ws.ts";
 * const conn = await openRawConnection("ws://127.0.0.1:6008/subscribe", { idleTimeoutMs: 60_000 });
 * for (let frames = await conn.next(); frames; frames = await conn.next()) console.log(frames.length);
 * console.log(conn.cause); // { kind: "closed", code: 1000, reason: "" }
 * await conn.closed();
 * ```
 */
export class RawConnection implements Connection {
  /** The URL connected to. */
  readonly url: string;
  /** Message payload bytes received. */
  bytesReceived = 0;
  /** The payload size in bytes of each message the last `next()` returned. */
  frameBytes: number[] = [];
  /** Why it ended, once it has. */
  cause: CloseCause | undefined;
  /** The subprotocol the server chose, or `""`. */
  readonly protocol: string;
  readonly #conn: Deno.Conn;
  readonly #maxMessageBytes: number;
  #idleTimeoutMs: number;
  readonly #signal: AbortSignal | undefined;
  /** Received bytes: `#head` is the first not yet parsed, `#tail` the end of what was read. */
  #buf: Uint8Array;
  #head: number;
  #tail: number;
  /** Bytes (from `#head`) the frame in progress needs in the buffer, when it is incomplete. */
  #need = 0;
  /**
   * The fragmented message being received: its opcode (0 when none) and its payload so far,
   * `#fragmentBuf[0..#fragmentBytes)`. One buffer, grown by doubling up to `maxMessageBytes`, so a
   * message of many tiny (or empty) fragments holds its payload and no more.
   */
  #fragmentOpcode = 0;
  #fragmentBuf: Uint8Array = EMPTY;
  #fragmentBytes = 0;
  /** The message being skipped for its size: what is known of it, and its frames still to come. */
  #skipping: { bytes: number; binary: boolean; head: Uint8Array; fin: boolean } | undefined;
  /** A frame of it is being skipped, and `#skipLeft` of its payload bytes have not arrived yet. */
  #skipFrame = false;
  #skipLeft = 0;
  /** A close frame or a protocol error was met: nothing after it is parsed. */
  #stopped = false;
  #reading = false;
  /** The last read of the TCP connection, which may still be under way. */
  #read: Promise<number | null> | undefined;
  /** Closed from here, the connection is read on for the server's close (`#readToServerClose()`)… */
  #lingering = false;
  /** …unless the option `linger` is false. */
  readonly #linger: boolean;
  /**
   * When progress was last made (`performance.now()`), or `next()` was last called: the time the
   * consumer spends between calls is not the server's idleness.
   */
  #lastProgress = performance.now();
  /** The last parse stopped inside a data frame's payload: the next bytes read are payload. */
  #awaitingPayload = false;
  /** Payload bytes were taken in the parse under way without completing a message. */
  #progressed = false;
  #idleTimer: ReturnType<typeof setTimeout> | undefined;
  /** Ends a {@linkcode RawConnection.drain} that the server's close has not ended, at its `maxMs`. */
  #drainTimer: ReturnType<typeof setTimeout> | undefined;
  /** During a drain: the time `next()` may still spend waiting for the server (ms). */
  #drainLeftMs: number | undefined;
  /** Ends a drain once `next()` has used up its time. */
  #drainWaitTimer: ReturnType<typeof setTimeout> | undefined;
  /** While that timer runs: when it started (a `next()` that waits, from its start or the drain's). */
  #drainWaitFrom: number | undefined;
  /** Whether a `next()` is pending. */
  #inNext = false;
  /** When `next()` last gave the event loop a turn (see {@link YIELD_EVERY_MS}). */
  #yieldedAt = performance.now();
  readonly #onDrainOver = (): void => this.#finish({ kind: "aborted" }, undefined);
  #finishing = false;
  #closeSent = false;
  #connClosed = false;
  /**
   * What waits to go out, written one frame at a time by `#pump()` (never interleaved): at most one
   * pong, carrying the latest ping's payload (RFC 6455 §5.5.3 lets a client answer only the most
   * recent ping, so a ping flood costs one pending pong, not one each); text messages, bounded by
   * {@linkcode MAX_OUTBOX_BYTES}; and the close frame, last.
   */
  readonly #pongPayload = new Uint8Array(125);
  /** The length of the pending pong's payload, or -1 when no pong waits. */
  #pongLength = -1;
  #outbox: Uint8Array[] = [];
  #outboxBytes = 0;
  #closeFrame: Uint8Array | undefined;
  #pumping = false;
  /** Settles once what is pending has been written (or the connection failed). */
  #writes: Promise<void> = Promise.resolve();
  readonly #closedPromise: Promise<void>;
  #resolveClosed!: () => void;
  readonly #onAbort = (): void => this.#finish({ kind: "aborted" }, 1000);
  readonly #onIdleTick = (): void => this.#idleTick();

  /**
   * Takes over a connection whose handshake has completed; use {@linkcode openRawConnection}.
   * `buf` holds the bytes read so far, of which `buf[head..tail)` follow the `101` response.
   */
  constructor(
    conn: Deno.Conn,
    url: string,
    buf: Uint8Array,
    head: number,
    tail: number,
    protocol: string,
    options: RawConnectionOptions = {},
  ) {
    this.#conn = conn;
    this.url = url;
    this.#buf = buf;
    this.#head = head;
    this.#tail = tail;
    this.protocol = protocol;
    this.#maxMessageBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.#idleTimeoutMs = options.idleTimeoutMs ?? Number.POSITIVE_INFINITY;
    this.#signal = options.signal;
    this.#linger = options.linger ?? true;
    this.#closedPromise = new Promise((resolve) => this.#resolveClosed = resolve);
    this.#signal?.addEventListener("abort", this.#onAbort, { once: true });
    if (Number.isFinite(this.#idleTimeoutMs)) {
      this.#idleTimer = setTimeout(this.#onIdleTick, this.#idleTimeoutMs);
    }
    if (this.#signal?.aborted) this.#onAbort();
  }

  /**
   * Every complete message received so far, reading the socket (and waiting) only when none is
   * left; `null` once the connection has ended and everything received was taken.
   */
  async next(): Promise<Frame[] | null> {
    if (this.#inNext) throw new Error("next() called while another next() is pending");
    this.#inNext = true;
    // Idle time runs from here until progress: pings and pongs read meanwhile do not count, so a
    // server that only pings (jetstream-legacy#48) is still caught.
    this.#lastProgress = performance.now();
    if (this.#drainLeftMs !== undefined && this.cause === undefined) this.#startDrainWait();
    try {
      for (;;) {
        if (this.#head < this.#tail && !this.#stopped) {
          const frames = this.#parse();
          if (frames.length > 0) return frames;
        }
        if (this.cause !== undefined || this.#stopped) return null;
        // Reads that each complete at once (a flood of frames, pings or ones the run drops) would
        // keep timers and signals (max time, idle, a drain's wait, Ctrl-C) waiting for seconds: a
        // turn of the event loop every YIELD_EVERY_MS.
        if (performance.now() - this.#yieldedAt > YIELD_EVERY_MS) {
          await new Promise((resolve) => setTimeout(resolve, 0));
          this.#yieldedAt = performance.now();
        }
        await this.#fill();
      }
    } finally {
      this.#inNext = false;
      if (this.#drainWaitFrom !== undefined) {
        clearTimeout(this.#drainWaitTimer);
        this.#drainLeftMs! -= performance.now() - this.#drainWaitFrom;
        this.#drainWaitFrom = undefined;
      }
    }
  }

  /** Starts counting the time `next()` waits against the drain's (see {@linkcode drain}). */
  #startDrainWait(): void {
    this.#drainWaitFrom = performance.now();
    this.#drainWaitTimer = setTimeout(this.#onDrainOver, Math.max(0, this.#drainLeftMs!));
  }

  /**
   * Queues a text message (masked, as client frames must be). Returns false once closing, or when
   * messages already waiting to go out hold over 1 MiB (a server that does not read).
   *
   * @example
   * ```ts ignore
   * conn.sendText(JSON.stringify({ type: "options_update", payload: { wantedCollections: [] } }));
   * ```
   */
  sendText(text: string): boolean {
    if (this.#closeSent || this.#connClosed) return false;
    const frame = encodeClientFrame(1, encoder.encode(text));
    if (this.#outboxBytes > 0 && this.#outboxBytes + frame.length > MAX_OUTBOX_BYTES) return false;
    this.#outbox.push(frame);
    this.#outboxBytes += frame.length;
    this.#pump();
    return true;
  }

  /**
   * Starts the closing handshake and goes on reading (RFC 6455 §7.1.2): sends a close frame (1000),
   * and `next()` goes on returning what the server sent before it saw that close, then `null` once
   * the server's close frame came (cause `closed`). A server that does not answer is given up
   * (cause `aborted`: the TCP connection is dropped, and what was read by then can still be taken)
   * once `next()` has spent `waitMs` in all waiting for the socket, or `maxMs` after the call
   * whatever the consumer does. Only time spent in `next()` counts against `waitMs`: a consumer
   * slowed by its own storage is not a server that does not answer, and what the server sent waits
   * in the socket meanwhile. Returns false, doing nothing, when the connection is already ending.
   *
   * @example
   * ```ts ignore
   * if (conn.drain(2000)) for (let f = await conn.next(); f !== null; f = await conn.next()) use(f);
   * ```
   */
  drain(waitMs: number, maxMs: number = waitMs): boolean {
    if (this.cause !== undefined || this.#finishing || this.#closeSent || this.#connClosed) return false;
    this.#sendClose(closePayload(1000, ""));
    this.#drainLeftMs = waitMs;
    this.#drainTimer = setTimeout(this.#onDrainOver, maxMs);
    // A next() waiting already (a quiet server, the usual case of a stop) waits from now on.
    if (this.#inNext) this.#startDrainWait();
    return true;
  }

  /**
   * Changes the idle timeout from now on (counted from the last progress, as before): a shorter one
   * takes effect at once.
   */
  setIdleTimeout(ms: number): void {
    this.#idleTimeoutMs = ms;
    if (this.#idleTimer === undefined || this.cause !== undefined) return;
    clearTimeout(this.#idleTimer);
    this.#idleTick();
  }

  /** Sends a close frame (1000) if the connection is open, then drops it; frames already read can still be taken. */
  close(): void {
    this.#finish({ kind: "aborted" }, 1000);
  }

  /** Resolves once the TCP connection is closed, or after 2 s at most. */
  async closed(): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.#closedPromise,
      new Promise<void>((resolve) => timer = setTimeout(resolve, CLOSED_TIMEOUT_MS)),
    ]);
    clearTimeout(timer);
  }

  /** Reads more bytes into the buffer, making room first; sets `cause` when the stream ends. */
  async #fill(): Promise<void> {
    let buf = this.#buf;
    const pending = this.#tail - this.#head;
    // Only an incomplete frame is left when we read, so moving it to the front is cheap; a buffer
    // grown for a big message goes back to the usual size once that message is gone.
    if (
      buf.length > READ_BUFFER_BYTES && this.#need <= READ_BUFFER_BYTES && pending <= READ_BUFFER_BYTES / 2
    ) {
      const smaller = new Uint8Array(READ_BUFFER_BYTES);
      smaller.set(buf.subarray(this.#head, this.#tail));
      buf = this.#buf = smaller;
    } else if (this.#need > buf.length) {
      const bigger = new Uint8Array(Math.ceil(this.#need / 65536) * 65536);
      bigger.set(buf.subarray(this.#head, this.#tail));
      buf = this.#buf = bigger;
    } else if (this.#head > 0) {
      buf.copyWithin(0, this.#head, this.#tail);
    }
    this.#head = 0;
    this.#tail = pending;
    this.#reading = true;
    let n: number | null;
    try {
      n = await (this.#read = this.#conn.read(buf.subarray(pending)));
    } catch (err) {
      // Closing the connection (idle, abort) interrupts the read; otherwise the peer reset it.
      this.#reading = false;
      this.#finish({ kind: "closed", code: 1006, reason: (err as Error)?.message ?? "" }, undefined);
      return;
    }
    this.#reading = false;
    // Bytes that came after the close frame went out are #readToServerClose()'s, to drop.
    if (this.#lingering) return;
    if (n === null) {
      this.#finish({ kind: "closed", code: 1006, reason: "" }, undefined);
      return;
    }
    this.#tail += n;
    if (this.#awaitingPayload) this.#lastProgress = performance.now();
  }

  /** Parses every complete frame from `#head` on and returns the complete messages among them. */
  #parse(): Frame[] {
    const frames: Frame[] = [];
    const sizes: number[] = this.frameBytes = [];
    const buf = this.#buf;
    const tail = this.#tail;
    let pos = this.#head;
    let received = 0;
    this.#need = 0;
    this.#awaitingPayload = false;
    for (;;) {
      if (this.#skipFrame) {
        // The payload of a frame being skipped for its size: dropped as it comes.
        const n = Math.min(this.#skipLeft, tail - pos);
        pos += n;
        this.#skipLeft -= n;
        this.#skipping!.bytes += n;
        received += n;
        if (n > 0) this.#progressed = true;
        if (this.#skipping!.bytes >= Math.max(ENDLESS_MESSAGE_BYTES, 2 * this.#maxMessageBytes)) {
          this.#head = pos;
          this.bytesReceived += received;
          this.#protocolError(1009, "message too big");
          return frames;
        }
        if (this.#skipLeft > 0) {
          this.#awaitingPayload = true;
          break;
        }
        this.#skipFrame = false;
        const skipped = this.#skipping!;
        if (skipped.fin) {
          this.#skipping = undefined;
          frames.push(new OversizedFrame(skipped.bytes, skipped.binary, this.#maxMessageBytes, skipped.head));
          sizes.push(skipped.bytes);
        }
      }
      if (tail - pos < 2) break;
      const b0 = buf[pos];
      const b1 = buf[pos + 1];
      if ((b0 & 0x70) !== 0 || (b1 & 0x80) !== 0) {
        this.#head = pos;
        this.bytesReceived += received;
        this.#protocolError(1002, (b0 & 0x70) !== 0 ? "reserved bits set" : "masked frame from the server");
        return frames;
      }
      let length = b1;
      let at = pos + 2;
      if (length === 126) {
        if (tail - pos < 4) break;
        length = (buf[pos + 2] << 8) | buf[pos + 3];
        at = pos + 4;
      } else if (length === 127) {
        if (tail - pos < 10) break;
        if (buf[pos + 2] >= 0x80) {
          // RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0.
          this.#head = pos;
          this.bytesReceived += received;
          this.#protocolError(1002, "64-bit payload length with the most significant bit set");
          return frames;
        }
        const high = (buf[pos + 2] << 24 >>> 0) + (buf[pos + 3] << 16) + (buf[pos + 4] << 8) + buf[pos + 5];
        const low = (buf[pos + 6] << 24 >>> 0) + (buf[pos + 7] << 16) + (buf[pos + 8] << 8) + buf[pos + 9];
        // Beyond 2^53 the length is not even a safe integer; it is far over any limit anyway.
        length = high > 0x1fffff ? Number.POSITIVE_INFINITY : high * 4294967296 + low;
        at = pos + 10;
      }
      const opcode = b0 & 0x0f;
      // Refuse an oversized message or a bad control frame from its header, before buffering it.
      if (opcode >= 8 && (length > 125 || (b0 & 0x80) === 0)) {
        this.#head = pos;
        this.bytesReceived += received;
        this.#protocolError(1002, "fragmented or oversized control frame");
        return frames;
      }
      if (this.#skipping !== undefined && opcode < 8) {
        if (opcode !== 0) {
          this.#head = pos;
          this.bytesReceived += received;
          this.#protocolError(1002, "new message inside a fragmented one");
          return frames;
        }
        // The next part of a message being skipped.
        this.#skipping.fin = (b0 & 0x80) !== 0;
        this.#skipFrame = true;
        this.#skipLeft = length;
        pos = at;
        continue;
      }
      if (length > this.#maxMessageBytes - (opcode === 0 ? this.#fragmentBytes : 0)) {
        const refusal: [number, string] | undefined = !Number.isSafeInteger(length)
          ? [1009, "message too big"]
          : opcode > 2 && opcode < 8
          ? [1002, `unknown opcode ${opcode}`]
          : opcode !== 0 && this.#fragmentOpcode !== 0
          ? [1002, "new message inside a fragmented one"]
          : opcode === 0 && this.#fragmentOpcode === 0
          ? [1002, "continuation without a message"]
          : undefined;
        if (refusal) {
          this.#head = pos;
          this.bytesReceived += received;
          this.#protocolError(...refusal);
          return frames;
        }
        // Too large to hold: skipped as it arrives (with what was held of it), and handed on as
        // an OversizedFrame once its last part is through.
        const first = opcode === 0
          ? this.#fragmentBuf.subarray(0, this.#fragmentBytes)
          : buf.subarray(at, Math.min(tail, at + length));
        this.#skipping = {
          bytes: opcode === 0 ? this.#fragmentBytes : 0,
          binary: (opcode === 0 ? this.#fragmentOpcode : opcode) === 2,
          head: first.slice(0, SKIPPED_HEAD_BYTES),
          fin: (b0 & 0x80) !== 0,
        };
        this.#fragmentOpcode = 0;
        this.#fragmentBuf = EMPTY;
        this.#fragmentBytes = 0;
        this.#skipFrame = true;
        this.#skipLeft = length;
        pos = at;
        continue;
      }
      if (tail - at < length) {
        this.#need = at - pos + length;
        this.#awaitingPayload = opcode < 8;
        break;
      }
      const end = at + length;
      if (b0 === 0x81 && this.#fragmentOpcode === 0) {
        // The hot path: a whole text message in one frame.
        frames.push(textOf(buf.subarray(at, end)));
        sizes.push(length);
        received += length;
        pos = end;
        continue;
      }
      pos = end;
      this.bytesReceived += received;
      received = 0;
      if (!this.#onFrame(b0, buf, at, end, frames)) {
        this.#head = pos;
        return frames;
      }
    }
    this.#head = pos;
    this.bytesReceived += received;
    if (this.#progressed) {
      this.#progressed = false;
      this.#lastProgress = performance.now();
    }
    return frames;
  }

  /** Everything but an unfragmented text frame. Returns false when parsing must stop. */
  #onFrame(b0: number, buf: Uint8Array, at: number, end: number, frames: Frame[]): boolean {
    const fin = (b0 & 0x80) !== 0;
    const opcode = b0 & 0x0f;
    switch (opcode) {
      case 1:
      case 2:
        if (this.#fragmentOpcode !== 0) {
          return this.#protocolError(1002, "new message inside a fragmented one");
        }
        if (fin) {
          this.#deliver(opcode, buf.subarray(at, end), frames);
        } else {
          this.#fragmentOpcode = opcode;
          this.#appendFragment(buf, at, end);
        }
        return true;
      case 0: {
        if (this.#fragmentOpcode === 0) return this.#protocolError(1002, "continuation without a message");
        this.#appendFragment(buf, at, end);
        if (!fin) return true;
        const size = this.#fragmentBytes;
        // The buffer is handed on (or decoded) and not reused; a binary message gets its exact size.
        const whole = this.#fragmentBuf.length === size || this.#fragmentOpcode === 1
          ? this.#fragmentBuf.subarray(0, size)
          : this.#fragmentBuf.slice(0, size);
        const messageOpcode = this.#fragmentOpcode;
        this.#fragmentOpcode = 0;
        this.#fragmentBuf = EMPTY;
        this.#fragmentBytes = 0;
        this.#deliver(messageOpcode, whole, frames);
        return true;
      }
      case 8: {
        if (end - at === 1) return this.#protocolError(1002, "close frame with a one-byte payload");
        const code = end - at >= 2 ? (buf[at] << 8) | buf[at + 1] : 1005;
        if (end - at >= 2 && !validCloseCode(code)) {
          return this.#protocolError(1002, `invalid close code ${code}`);
        }
        const reason = end - at > 2 ? utf8Text(buf.subarray(at + 2, end)) : "";
        if (reason === undefined) return this.#protocolError(1002, "close reason is not UTF-8");
        this.#stopped = true;
        // Echo the code, as browsers and Deno do; an empty close is answered with an empty one.
        this.#sendClose(code !== 1005 ? buf.slice(at, at + 2) : new Uint8Array(0));
        // The reason is printed as it comes: without control characters (terminal escapes).
        this.#finish({ kind: "closed", code, reason: printable(reason) }, undefined);
        return false;
      }
      case 9:
        // Only the latest ping needs an answer: a pong not yet written takes this payload instead.
        if (this.#closeSent || this.#connClosed) return true;
        this.#pongPayload.set(buf.subarray(at, end));
        this.#pongLength = end - at;
        this.#pump();
        return true;
      case 10:
        return true;
      default:
        return this.#protocolError(1002, `unknown opcode ${opcode}`);
    }
  }

  /**
   * Copies a fragment's payload out of the read buffer (which is reused) to the end of the message
   * so far; the cap was checked from the frame's header, so it fits in `maxMessageBytes`.
   */
  #appendFragment(buf: Uint8Array, at: number, end: number): void {
    const n = end - at;
    if (n === 0) return;
    this.#progressed = true;
    const size = this.#fragmentBytes + n;
    if (size > this.#fragmentBuf.length) {
      const capacity = Math.min(Math.max(size, 2 * this.#fragmentBuf.length, 4096), this.#maxMessageBytes);
      const grown = new Uint8Array(capacity);
      grown.set(this.#fragmentBuf.subarray(0, this.#fragmentBytes));
      this.#fragmentBuf = grown;
    }
    this.#fragmentBuf.set(buf.subarray(at, end), this.#fragmentBytes);
    this.#fragmentBytes = size;
  }

  #deliver(opcode: number, payload: Uint8Array, frames: Frame[]): void {
    this.frameBytes.push(payload.byteLength);
    if (opcode === 1) {
      frames.push(textOf(payload));
      this.bytesReceived += payload.byteLength;
    } else {
      // A copy, unless the payload already is one: views into the read buffer would be overwritten.
      const bytes = payload.buffer === this.#buf.buffer ? payload.slice() : payload;
      this.bytesReceived += bytes.byteLength;
      frames.push(bytes);
    }
  }

  #protocolError(code: number, reason: string): false {
    this.#stopped = true;
    this.#finish({ kind: "closed", code, reason }, code, reason);
    return false;
  }

  #idleTick(): void {
    this.#idleTimer = undefined;
    if (this.cause !== undefined) return;
    // Only time spent waiting on the socket counts: a busy consumer is not an idle server.
    const quiet = this.#reading ? performance.now() - this.#lastProgress : 0;
    if (quiet >= this.#idleTimeoutMs) {
      // A message had begun and stalled: say so, as retrying may meet the same stall.
      const partial = this.#fragmentOpcode !== 0 || this.#skipping !== undefined || this.#awaitingPayload;
      this.#finish(partial ? { kind: "idle", partial: true } : { kind: "idle" }, 1000);
    } else this.#idleTimer = setTimeout(this.#onIdleTick, this.#idleTimeoutMs - quiet);
  }

  /** Queues the close frame, after which nothing else is queued. */
  #sendClose(payload: Uint8Array): void {
    if (this.#closeSent || this.#connClosed) return;
    this.#closeSent = true;
    this.#closeFrame = encodeClientFrame(8, payload);
    this.#pump();
  }

  /** Starts writing what is pending, unless a write is under way (it then takes it in turn). */
  #pump(): void {
    if (this.#pumping) return;
    this.#pumping = true;
    this.#writes = this.#writePending();
  }

  async #writePending(): Promise<void> {
    try {
      for (;;) {
        let frame: Uint8Array;
        if (this.#pongLength >= 0) {
          frame = encodeClientFrame(10, this.#pongPayload.subarray(0, this.#pongLength));
          this.#pongLength = -1;
        } else if (this.#outbox.length > 0) {
          frame = this.#outbox.shift()!;
          this.#outboxBytes -= frame.length;
        } else if (this.#closeFrame !== undefined) {
          frame = this.#closeFrame;
          this.#closeFrame = undefined;
        } else {
          return;
        }
        await writeAll(this.#conn, frame);
      }
    } catch {
      // The connection was closed or reset: nothing more can go out.
      this.#pongLength = -1;
      this.#outbox = [];
      this.#outboxBytes = 0;
      this.#closeFrame = undefined;
    } finally {
      this.#pumping = false;
    }
  }

  /**
   * Ends the connection once: records the cause (the first one wins), sends a close frame with
   * `closeCode` if given, and drops the TCP connection once that frame is out (or soon anyway).
   */
  #finish(cause: CloseCause, closeCode: number | undefined, reason = ""): void {
    this.cause ??= cause;
    if (this.#finishing) return;
    this.#finishing = true;
    clearTimeout(this.#idleTimer);
    this.#idleTimer = undefined;
    clearTimeout(this.#drainTimer);
    clearTimeout(this.#drainWaitTimer);
    this.#signal?.removeEventListener("abort", this.#onAbort);
    if (closeCode !== undefined) this.#sendClose(closePayload(closeCode, reason));
    this.#dropSoon();
  }

  /**
   * Reads the TCP connection on after the close frame, dropping what comes, until the server's close
   * frame comes or the server closes it. It is closed from here (which ends a read under way) once
   * nothing has come for {@link LINGER_QUIET_MS}, as nothing is left unread then, or after
   * {@link LINGER_MS} in all. What was read before the close can still be taken by `next()`; what
   * comes after it is walked through only to find the server's close frame.
   */
  async #readToServerClose(): Promise<void> {
    this.#lingering = true;
    const giveUpAt = performance.now() + LINGER_MS;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const wait = () => {
      clearTimeout(timer);
      // Never a negative delay, which Deno warns of on stderr.
      const ms = Math.max(0, Math.min(LINGER_QUIET_MS, giveUpAt - performance.now()));
      timer = setTimeout(() => closeQuietly(this.#conn), ms);
    };
    // Frames are found from #head on (the parse took every complete frame before it), past what
    // remains of a frame being skipped for its size.
    const finder = new CloseFrameFinder(this.#skipFrame ? this.#skipLeft : 0);
    try {
      if (finder.feed(this.#buf.subarray(this.#head, this.#tail))) return;
      wait();
      if (this.#reading) {
        // The read under way puts its bytes after #tail, where #fill leaves them.
        const at = this.#tail;
        const n = await this.#read!;
        if (n === null || finder.feed(this.#buf.subarray(at, at + n))) return;
        wait();
      }
      const scratch = new Uint8Array(READ_BUFFER_BYTES);
      for (;;) {
        const n = await this.#conn.read(scratch);
        if (n === null || finder.feed(scratch.subarray(0, n))) return;
        // (Reads that each complete at once, as in a ping flood, would clear the timer before it
        // ever fired.)
        if (performance.now() >= giveUpAt) {
          closeQuietly(this.#conn);
          return;
        }
        wait();
      }
    } catch {
      // Closed from here, or reset by the server: either way it has ended.
    } finally {
      clearTimeout(timer);
    }
  }

  async #dropSoon(): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.#writes,
      new Promise<void>((resolve) => timer = setTimeout(resolve, CLOSE_WRITE_TIMEOUT_MS)),
    ]);
    clearTimeout(timer);
    // Only a close from here (an abort, close()) waits for the server's: a server whose close came
    // (even one parsed after the close from here: #stopped), or that ended the connection, has
    // nothing more to send; an idle one sent nothing to leave unread; a drain has had its time; a
    // protocol error (#stopped too) is the server's fault, and what follows it cannot be parsed.
    if (
      this.#linger && this.#closeSent && this.cause?.kind === "aborted" && this.#drainLeftMs === undefined &&
      !this.#stopped
    ) {
      await this.#readToServerClose();
    }
    this.#connClosed = true;
    closeQuietly(this.#conn);
    // A write still pending was interrupted by the close; let it settle before reporting closed.
    await this.#writes;
    this.#resolveClosed();
  }
}

/**
 * Walks the server's frames through the bytes that come after the client's close frame, only to tell
 * when the server's close frame (opcode 8) comes: each frame's payload is skipped unread.
 */
export class CloseFrameFinder {
  /** Payload bytes of the current frame still to skip. */
  #skip: number;
  /** The header being gathered (at most 14 bytes: 2, 8 of extended length, 4 of mask). */
  readonly #head = new Uint8Array(14);
  #headBytes = 0;
  /** The frame being skipped is the server's close frame. */
  #closing = false;

  constructor(skip: number) {
    this.#skip = skip;
  }

  /** Takes the next bytes; true once the whole of the server's close frame has come. */
  feed(bytes: Uint8Array): boolean {
    const head = this.#head;
    let i = 0;
    for (;;) {
      if (this.#skip > 0) {
        const n = Math.min(this.#skip, bytes.length - i);
        this.#skip -= n;
        i += n;
        if (this.#skip > 0) return false;
      }
      if (this.#closing) return true;
      if (i === bytes.length) return false;
      head[this.#headBytes++] = bytes[i++];
      if (this.#headBytes < 2) continue;
      const short = head[1] & 0x7f;
      const need = 2 + (short === 126 ? 2 : short === 127 ? 8 : 0) + (head[1] & 0x80 ? 4 : 0);
      if (this.#headBytes < need) continue;
      this.#closing = (head[0] & 0x0f) === 8;
      let length = short;
      if (short === 126) length = (head[2] << 8) | head[3];
      else if (short === 127) {
        length = 0;
        for (let k = 2; k < 10; k++) length = length * 256 + head[k];
      }
      this.#skip = length;
      this.#headBytes = 0;
    }
  }
}

/**
 * Whether a close frame may carry `code` (RFC 6455 §7.4): the defined codes that an endpoint may
 * send (not 1004, 1005, 1006 or 1015), the ones registered since (1012 to 1014), and 3000 to 4999.
 */
function validCloseCode(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

/** A client frame: FIN set, masked with a fresh random key. */
function encodeClientFrame(opcode: number, payload: Uint8Array): Uint8Array {
  const length = payload.length;
  const header = length < 126 ? 2 : length < 65536 ? 4 : 10;
  const frame = new Uint8Array(header + 4 + length);
  frame[0] = 0x80 | opcode;
  if (length < 126) {
    frame[1] = 0x80 | length;
  } else if (length < 65536) {
    frame[1] = 0x80 | 126;
    frame[2] = length >>> 8;
    frame[3] = length & 255;
  } else {
    frame[1] = 0x80 | 127;
    // Bytes 2 to 5 (the high 32 bits) stay 0: client messages are far below 4 GiB.
    frame[6] = length >>> 24;
    frame[7] = (length >>> 16) & 255;
    frame[8] = (length >>> 8) & 255;
    frame[9] = length & 255;
  }
  const key = frame.subarray(header, header + 4);
  crypto.getRandomValues(key);
  for (let i = 0; i < length; i++) frame[header + 4 + i] = payload[i] ^ key[i & 3];
  return frame;
}

/**
 * A close frame's payload: the code, then the reason cut to the 123 bytes a control frame allows
 * (without splitting a UTF-8 sequence). Shared with the project's server.
 *
 * @example
 * ```ts
 * import { closePayload } from "./raw_ws.ts";
 * closePayload(1000, "bye"); // Uint8Array [3, 232, 98, 121, 101]
 * ```
 */
export function closePayload(code: number, reason: string): Uint8Array {
  let bytes = encoder.encode(reason);
  if (bytes.length > 123) {
    let cut = 123;
    while (cut > 0 && (bytes[cut] & 0xc0) === 0x80) cut--; // do not split a UTF-8 sequence
    bytes = bytes.subarray(0, cut);
  }
  const payload = new Uint8Array(2 + bytes.length);
  payload[0] = code >>> 8;
  payload[1] = code & 255;
  payload.set(bytes, 2);
  return payload;
}

/** The header fields of a response head's `lines` (the status line first). */
function parseHeaders(lines: string[]): Headers {
  const headers = new Headers();
  for (let i = 1; i < lines.length; i++) {
    const colon = lines[i].indexOf(":");
    if (colon <= 0) continue;
    try {
      headers.append(lines[i].slice(0, colon).trim(), lines[i].slice(colon + 1).trim());
    } catch {
      // An invalid header line is ignored, as browsers do.
    }
  }
  return headers;
}

/**
 * Asks the proxy on `conn` for a tunnel to `hostname`:`port` (HTTP `CONNECT`) and returns once it
 * is open. A refusal rejects with a {@linkcode ConnectError} carrying the proxy's status: a 4xx
 * (407 when it wants credentials) stops a run as a refused upgrade does, and a 5xx (the proxy could
 * not reach the host) is retried.
 */
async function tunnel(
  conn: Deno.Conn,
  route: ProxyRoute,
  hostname: string,
  port: number,
  url: string,
): Promise<void> {
  await writeAll(conn, encoder.encode(connectRequest(route, hostname, port)));
  // Nothing comes behind the proxy's answer until the tunnel is used: the head is all there is.
  const buf = new Uint8Array(MAX_HEAD_BYTES);
  let len = 0;
  for (;;) {
    let headEnd = findHeadEnd(buf, 0, len);
    while (headEnd === -1) {
      if (len >= MAX_HEAD_BYTES) throw new Error("the proxy's response head is too large");
      const n = await conn.read(buf.subarray(len));
      if (n === null) throw new Error("the proxy closed the connection before it answered the CONNECT");
      headEnd = findHeadEnd(buf, len, len + n);
      len += n;
    }
    const lines = decoder.decode(buf.subarray(0, headEnd)).split("\r\n");
    const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(lines[0])?.[1]);
    if (!(status >= 100)) {
      throw new Error(
        `malformed response from the proxy: ${printable(JSON.stringify(lines[0].slice(0, 100)))}`,
      );
    }
    if (status < 200) {
      // An interim response: the final one follows.
      buf.copyWithin(0, headEnd + 4, len);
      len -= headEnd + 4;
      continue;
    }
    if (status < 300) {
      if (len > headEnd + 4) throw new Error("the proxy sent data into the tunnel before it was used");
      return;
    }
    const body = await readRefusalBody(conn, buf.slice(headEnd + 4, len), parseHeaders(lines));
    throw new ConnectError(
      `cannot connect to ${urlInMessage(url)}: the proxy ${route.label} refused the tunnel to ${
        authorityOf(hostname, port)
      }: HTTP ${status}${
        status === 407
          ? " (it wants credentials: give them in the proxy URL, http://user:password@host:port)"
          : ""
      }${body ? `: ${bodyInMessage(body)}` : ""}`,
      status,
      body,
    );
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) off += await conn.write(bytes.subarray(off));
}

function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}

function findHeadEnd(buf: Uint8Array, from: number, to: number): number {
  for (let i = Math.max(0, from - 3); i + 3 < to; i++) {
    if (buf[i] === 13 && buf[i + 1] === 10 && buf[i + 2] === 13 && buf[i + 3] === 10) return i;
  }
  return -1;
}

/** The body of a `Transfer-Encoding: chunked` response, as much of it as arrived. */
function dechunk(bytes: Uint8Array): Uint8Array {
  const parts: Uint8Array[] = [];
  let pos = 0;
  while (pos < bytes.length) {
    let eol = pos;
    while (eol + 1 < bytes.length && !(bytes[eol] === 13 && bytes[eol + 1] === 10)) eol++;
    if (eol + 1 >= bytes.length) break;
    const size = parseInt(decoder.decode(bytes.subarray(pos, eol)).split(";")[0].trim(), 16);
    if (!(size > 0)) break;
    parts.push(bytes.subarray(eol + 2, Math.min(eol + 2 + size, bytes.length)));
    pos = eol + 2 + size + 2;
  }
  return concat(parts);
}

/**
 * Reads the body of a refused upgrade (per `Content-Length`, chunked, or until the server closes),
 * at most {@linkcode MAX_BODY_BYTES} and for at most {@linkcode BODY_TIMEOUT_MS}: the explanation
 * is worth a short wait, not a hang.
 */
async function readRefusalBody(conn: Deno.Conn, initial: Uint8Array, headers: Headers): Promise<string> {
  const chunked = /\bchunked\b/i.test(headers.get("transfer-encoding") ?? "");
  const declared = Number(headers.get("content-length") ?? NaN);
  const want = chunked || !Number.isFinite(declared) ? MAX_BODY_BYTES : Math.min(declared, MAX_BODY_BYTES);
  const body = new Uint8Array(Math.max(want, initial.length));
  body.set(initial);
  let len = initial.length;
  const timer = setTimeout(() => closeQuietly(conn), BODY_TIMEOUT_MS);
  try {
    while (len < want) {
      if (chunked && decoder.decode(body.subarray(Math.max(0, len - 7), len)).endsWith("0\r\n\r\n")) break;
      const n = await conn.read(body.subarray(len, want));
      if (n === null) break;
      len += n;
    }
  } catch {
    // Cut short by the timeout or a reset: keep what arrived.
  } finally {
    clearTimeout(timer);
  }
  const bytes = chunked ? dechunk(body.subarray(0, len)) : body.subarray(0, Math.min(len, want));
  return decoder.decode(bytes).trim();
}

/**
 * Opens a WebSocket over `Deno.connect` (and `Deno.startTls` for wss://) and resolves once the
 * handshake is done and the `hello`, if any, is queued. A refused upgrade rejects with a
 * {@linkcode ConnectError} carrying the HTTP status and the response body; a network failure,
 * timeout or abort with a `ConnectError` without a status.
 *
 * @example
 * ```ts ignore
 * import { openRawConnection } from "./raw_ws.ts";
 * const conn = await openRawConnection("ws://127.0.0.1:6008/subscribe?cursor=0", {
 *   idleTimeoutMs: 60_000,
 *   signal: AbortSignal.timeout(10_000),
 * });
 * let n = 0;
 * for (let frames = await conn.next(); frames; frames = await conn.next()) n += frames.length;
 * console.log(n, conn.cause);
 * ```
 */
export async function openRawConnection(
  url: string,
  options: RawConnectionOptions = {},
): Promise<RawConnection> {
  const target = new URL(url);
  const secure = target.protocol === "wss:";
  if (!secure && target.protocol !== "ws:") {
    throw new TypeError(
      `Cannot open a WebSocket as the URL must start with ws:// or wss://: current value is ${show(url)}`,
    );
  }
  const idleTimeoutMs = options.idleTimeoutMs ?? Number.POSITIVE_INFINITY;
  if (!(idleTimeoutMs > 0)) {
    throw new RangeError(
      `Cannot open a WebSocket as 'idleTimeoutMs' must be a positive number: current value is ${
        show(idleTimeoutMs)
      }`,
    );
  }
  const max = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  if (!Number.isSafeInteger(max) || max <= 0) {
    throw new RangeError(
      `Cannot open a WebSocket as 'maxMessageBytes' must be a positive integer: current value is ${
        show(max)
      }`,
    );
  }
  const protocols = options.protocols ?? [];
  const badProtocol = protocols.find((p) => !TOKEN.test(p));
  if (badProtocol !== undefined) {
    throw new TypeError(
      `Cannot open a WebSocket as a protocol must be a token: current value is '${badProtocol}'`,
    );
  }
  const signal = options.signal;
  if (signal?.aborted) throw new ConnectError(`connection to ${urlInMessage(url)} aborted`);

  const limit = Math.min(idleTimeoutMs, 30_000);
  const hostname = target.hostname.replace(/^\[(.*)\]$/, "$1");
  const port = target.port ? Number(target.port) : secure ? 443 : 80;
  // (A proxy that cannot be used is a TypeError, as a bad option is: runBackfillSync() checks the
  // environment's before it connects.)
  const route: ProxyRoute | undefined = options.proxy === undefined
    ? proxyFor(target)
    : options.proxy === null
    ? undefined
    : parseProxy(options.proxy, "the proxy option");
  // The deadline and the caller's signal both cut the handshake short: closing the connection
  // makes the pending read or write fail at once.
  let conn: Deno.Conn | undefined;
  let failure: string | undefined;
  let rejectCut: (err: Error) => void = () => {};
  const cutShort = new Promise<never>((_, reject) => rejectCut = reject);
  cutShort.catch(() => {});
  const connectAbort = new AbortController();
  const cut = (why: string): void => {
    if (failure !== undefined) return;
    failure = why;
    connectAbort.abort();
    if (conn) closeQuietly(conn);
    rejectCut(new Error(why));
  };
  // Set while the TLS handshake runs: a server that speaks plain WebSocket given as wss:// (a bare
  // host:port means wss://) never answers it, or answers in plain text.
  let inTls = false;
  const plainHint = `; if this server speaks plain WebSocket, give ws://${target.host}${target.pathname}`;
  const timer = setTimeout(
    () =>
      cut(
        inTls
          ? `no answer to the TLS handshake within ${limit / 1000} s${plainHint}`
          : `no answer within ${limit / 1000} s`,
      ),
    limit,
  );
  const onAbort = (): void => cut("aborted");
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    // TCP first, with the signal, even for wss://: `Deno.connectTls()` takes none, so a host that never
    // answers its SYN would leave a pending connect behind the deadline, and the process could not
    // exit until the system gave up on it minutes later. TLS starts on the TCP connection (its
    // handshake runs with the first write, which closing the connection cancels).
    const connecting: Promise<Deno.Conn> = Deno.connect({
      hostname: route?.hostname ?? hostname,
      port: route?.port ?? port,
      signal: connectAbort.signal,
    });
    // A connection that arrives after the handshake was cut short is closed as it arrives.
    connecting.then((c) => {
      if (failure !== undefined) closeQuietly(c);
    }, () => {});
    conn = await Promise.race([connecting, cutShort]);
    if (route) await tunnel(conn, route, hostname, port, url);
    if (secure) {
      const tls = Deno.startTls(conn as Deno.TcpConn, { hostname });
      tls.then((c) => {
        if (failure !== undefined) closeQuietly(c);
      }, () => {});
      const tlsConn = await Promise.race([tls, cutShort]);
      conn = tlsConn;
      inTls = true;
      try {
        await Promise.race([tlsConn.handshake(), cutShort]);
      } catch (err) {
        const message = (err as Error)?.message || String(err);
        // Bytes that are not TLS at all: most likely an HTTP answer from a plain server.
        throw new Error(
          failure ??
            `TLS handshake failed: ${message}${
              /corrupt|InvalidContentType|eof/i.test(message) ? plainHint : ""
            }`,
        );
      }
      inTls = false;
    }

    const key = encodeBase64(crypto.getRandomValues(new Uint8Array(16)));
    const request = `GET ${target.pathname}${target.search} HTTP/1.1\r\n` +
      `Host: ${target.host}\r\n` +
      "Upgrade: websocket\r\nConnection: Upgrade\r\n" +
      `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n` +
      (protocols.length > 0 ? `Sec-WebSocket-Protocol: ${protocols.join(", ")}\r\n` : "") +
      "User-Agent: jetfill\r\n\r\n";
    await writeAll(conn, encoder.encode(request));

    // The read buffer of the connection-to-be: frames sent right behind the 101 land in it.
    const buf = new Uint8Array(READ_BUFFER_BYTES);
    let len = 0;
    let headEnd = -1;
    let status = 0;
    let lines: string[] = [];
    for (;;) {
      while (headEnd === -1) {
        if (len >= MAX_HEAD_BYTES) throw new Error("the server's response head is too large");
        const n = await conn.read(buf.subarray(len, MAX_HEAD_BYTES));
        if (n === null) throw new Error("the server closed the connection during the handshake");
        headEnd = findHeadEnd(buf, len, len + n);
        len += n;
      }
      lines = decoder.decode(buf.subarray(0, headEnd)).split("\r\n");
      const statusLine = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0]);
      if (!statusLine) {
        throw new Error(`malformed response: ${printable(JSON.stringify(lines[0].slice(0, 100)))}`);
      }
      status = Number(statusLine[1]);
      if (status === 101 || status < 100 || status > 199) break;
      // An interim response (100 Continue, 103 Early Hints): the final one follows (RFC 9110 §15.2).
      buf.copyWithin(0, headEnd + 4, len);
      len -= headEnd + 4;
      headEnd = findHeadEnd(buf, 0, len);
    }
    const headers = parseHeaders(lines);
    if (status !== 101) {
      const body = await readRefusalBody(conn, buf.slice(headEnd + 4, len), headers);
      // A redirect is not followed (the URL is the user's to change), but where it points is said.
      const location = status >= 300 && status < 400 ? headers.get("location") : null;
      throw new ConnectError(
        `${urlInMessage(url)} refused the connection: HTTP ${status}${
          location !== null ? ` (a redirect to ${printable(location)}, not followed)` : ""
        }${body ? `: ${bodyInMessage(body)}` : ""}`,
        status,
        body,
        false,
        status === 429 || status >= 500 ? retryAfterMs(headers.get("retry-after")) : undefined,
      );
    }
    const expected = encodeBase64(
      new Uint8Array(await crypto.subtle.digest("SHA-1", encoder.encode(key + WS_GUID))),
    );
    if ((headers.get("upgrade") ?? "").toLowerCase() !== "websocket") {
      throw new Error("invalid handshake: 'Upgrade' is not 'websocket'");
    }
    if (!(headers.get("connection") ?? "").toLowerCase().split(/\s*,\s*/).includes("upgrade")) {
      throw new Error("invalid handshake: 'Connection' does not include 'Upgrade'");
    }
    if (headers.get("sec-websocket-accept") !== expected) {
      throw new Error("invalid handshake: wrong 'Sec-WebSocket-Accept'");
    }
    if (headers.has("sec-websocket-extensions")) {
      throw new Error("invalid handshake: the server chose an extension that was not offered");
    }
    const protocol = headers.get("sec-websocket-protocol") ?? "";
    if (protocol !== "" && !protocols.includes(protocol)) {
      throw new Error(
        `invalid handshake: the server chose protocol '${printable(protocol)}', which was not offered`,
      );
    }
    if (failure !== undefined) throw new Error(failure);
    const connection = new RawConnection(conn, url, buf, headEnd + 4, len, protocol, {
      ...options,
      idleTimeoutMs,
      maxMessageBytes: max,
    });
    if (options.hello !== undefined) connection.sendText(options.hello);
    return connection;
  } catch (err) {
    if (conn) closeQuietly(conn);
    if (err instanceof ConnectError) throw err;
    const message = failure ?? ((err as Error)?.message || String(err));
    throw new ConnectError(
      `cannot connect to ${urlInMessage(url)}${route ? ` through the proxy ${route.label}` : ""}: ${message}`,
      undefined,
      undefined,
      failure === undefined && isPermissionError(err),
    );
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  }
}

/** The longest wait a `Retry-After` header is taken at: one hour. */
const MAX_RETRY_AFTER_MS = 3_600_000;

/**
 * The wait (ms) a `Retry-After` header's value asks for (RFC 9110 §10.2.3: seconds, or an HTTP
 * date), at most an hour; undefined when there is none or it cannot be read.
 *
 * @example
 * ```ts
 * import { retryAfterMs } from "./raw_ws.ts";
 * retryAfterMs("120"); // 120000
 * retryAfterMs("Wed, 02 Dec 2026 08:00:30 GMT", Date.parse("2026-12-02T08:00:00Z")); // 30000
 * ```
 */
export function retryAfterMs(value: string | null | undefined, now: number = Date.now()): number | undefined {
  if (value === null || value === undefined) return undefined;
  const text = value.trim();
  // An HTTP date begins with the day's name ("Wed, 02 Dec 2026 08:00:30 GMT").
  const ms = /^\d+$/.test(text) ? Number(text) * 1000 : /^[A-Za-z]/.test(text) ? Date.parse(text) - now : NaN;
  if (Number.isNaN(ms)) return undefined;
  return Math.min(Math.max(0, ms), MAX_RETRY_AFTER_MS);
}

/** Whether `err` is Deno's refusal of an operation for want of a permission. */
function isPermissionError(err: unknown): boolean {
  return err instanceof Deno.errors.NotCapable || err instanceof Deno.errors.PermissionDenied;
}
