/**
 * The server end of a WebSocket (RFC 6455) on a raw TCP connection, built for replay speed: frames
 * are encoded straight into large batch buffers and written many per syscall. `Deno.upgradeWebSocket`
 * writes one frame per syscall, which tops out near 150k–200k small frames/s on loopback; batching
 * gives two to three times that.
 *
 * No extensions (no permessage-deflate) and no subprotocols are negotiated.
 *
 * @module
 */
import { closePayload } from "../jetstream/raw_ws.ts";
import { concat } from "../bytes.ts";

/**
 * Callbacks for what the client sends.
 *
 * @example
 * ```ts
 * import type { WebSocketHandlers } from "./websocket.ts";
 * const handlers: WebSocketHandlers = {
 *   onText: (text) => console.log("client said", text),
 *   onClose: (code) => console.log("closed", code),
 * };
 * ```
 */
export interface WebSocketHandlers {
  /** A complete text message. */
  onText?: (text: string) => void;
  /** A complete binary message. */
  onBinary?: (data: Uint8Array) => void;
  /** The connection is gone; called once. `code` is the client's close code, or 1006 without one. */
  onClose?: (code: number, reason: string) => void;
}

/**
 * Options of {@linkcode ServerWebSocket}.
 *
 * @example
 * ```ts
 * import type { ServerWebSocketOptions } from "./websocket.ts";
 * const options: ServerWebSocketOptions = { maxMessageBytes: 10_000_000, closeTimeoutMs: 500 };
 * ```
 */
export interface ServerWebSocketOptions {
  /**
   * Largest client message accepted; a bigger one closes the connection with 1009.
   *
   * @default {16777216}
   */
  maxMessageBytes?: number;
  /**
   * How long to wait for the client's answer to a close frame before dropping the connection.
   *
   * @default {2000}
   */
  closeTimeoutMs?: number;
  /**
   * A write to the client that has not completed after this long drops the connection without a
   * close frame (the real servers' per-frame write deadline: a client that stops reading is let go).
   *
   * @default {Infinity}
   */
  writeTimeoutMs?: number;
}

const BATCH_BYTES = 128 * 1024;
// Written batches kept for reuse: enough to cover the server's default 4 MiB high-water mark, so that
// a busy connection does not allocate (and zero) a fresh 128 KiB buffer for every batch. Measured on
// the 200,000-event bench capture against 4 spares: half the server's CPU on the first connection, an
// eighth less on later ones, and 50 MB less RSS.
const SPARE_BATCHES = 36;
const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

/** The close codes a client may send (gorilla/websocket's list), besides 3000–4999. */
const CLIENT_CLOSE_CODES = new Set([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013]);

/** A protocol violation by the client: close with this code. */
class ProtocolError extends Error {
  readonly code: number;
  constructor(code: number, message: string) {
    super(message);
    this.code = code;
  }
}

/**
 * The server end of one WebSocket connection whose handshake has been answered. Sends are
 * synchronous and queued; {@linkcode ServerWebSocket.bufferedAmount} and
 * {@linkcode ServerWebSocket.drain} provide backpressure.
 *
 * @example
 * ```ts ignore
 * import { ServerWebSocket } from "./websocket.ts";
 * const ws = new ServerWebSocket(conn, head.rest, { onText: (text) => console.log(text) });
 * ws.sendText('{"hello":"world"}');
 * ws.close(1000, "bye");
 * await ws.finished;
 * ```
 */
export class ServerWebSocket {
  readonly #conn: Deno.Conn;
  readonly #handlers: WebSocketHandlers;
  readonly #maxMessageBytes: number;
  readonly #closeTimeoutMs: number;
  readonly #writeTimeoutMs: number;
  /** Batch being filled. */
  #batch = new Uint8Array(BATCH_BYTES);
  #batchLen = 0;
  /** Batches waiting to be written, and their total size. */
  #queue: Uint8Array[] = [];
  #queued = 0;
  #writing = false;
  #flushScheduled = false;
  #spare: Uint8Array<ArrayBuffer>[] = [];
  #drainWaiters: { low: number; resolve: () => void }[] = [];
  /** A close frame was queued: nothing else may be sent. */
  #closeSent = false;
  /** The client's close frame arrived. */
  #closeReceived: { code: number; reason: string } | undefined;
  #closeTimer: ReturnType<typeof setTimeout> | undefined;
  /** Parts of a fragmented message being received. */
  #fragments: Uint8Array[] = [];
  #fragmentBytes = 0;
  #fragmentOpcode = 0;
  #finished = false;
  /** Set by {@linkcode ServerWebSocket.mute}: nothing but a close echo goes out any more. */
  #muted = false;
  #resolveFinished!: (result: { code: number; reason: string }) => void;
  /** Resolves once the TCP connection is closed, with the code the connection closed with. */
  readonly finished: Promise<{ code: number; reason: string }>;

  /**
   * Takes over a connection right after the `101` response has been written (or queued with
   * {@linkcode ServerWebSocket.sendRaw}). `initial` holds bytes already read past the request head.
   */
  constructor(
    conn: Deno.Conn,
    initial: Uint8Array,
    handlers: WebSocketHandlers = {},
    options: ServerWebSocketOptions = {},
  ) {
    this.#conn = conn;
    this.#handlers = handlers;
    this.#maxMessageBytes = options.maxMessageBytes ?? 16 * 1024 * 1024;
    this.#closeTimeoutMs = options.closeTimeoutMs ?? 2000;
    this.#writeTimeoutMs = options.writeTimeoutMs ?? Number.POSITIVE_INFINITY;
    this.finished = new Promise((resolve) => this.#resolveFinished = resolve);
    // Frames the client sent right behind its request head are handled once the caller has queued
    // the handshake response and set up its own state: a reply to them must not go out first.
    queueMicrotask(() => this.#read(initial).catch(() => this.#finish(1006, "")));
  }

  /** Bytes queued and not yet handed to the kernel. */
  get bufferedAmount(): number {
    return this.#queued + this.#batchLen;
  }

  /** Whether sending is over: a close frame was queued, the connection is gone or it was muted. */
  get closing(): boolean {
    return this.#closeSent || this.#finished || this.#muted;
  }

  /** `performance.now()` when the client last answered a ping (a pong), or -1. */
  lastPongAt = -1;

  /** Sends a ping (an empty one), unless the connection is closing or muted. */
  ping(): void {
    if (!this.closing) this.#control(9, new Uint8Array(0));
  }

  /**
   * Goes quiet for good, keeping the connection open (fault injection: a stalled server). Later
   * sends are refused, pings are no longer answered, and {@linkcode ServerWebSocket.close} drops the
   * connection without a close frame. A close frame from the client is still echoed, so clients can
   * leave cleanly. Whatever is already queued is still written.
   */
  mute(): void {
    this.#muted = true;
  }

  /** Makes room for `bytes` in the current batch, moving a full batch to the write queue. */
  #reserve(bytes: number): void {
    if (this.#batch.length - this.#batchLen >= bytes) return;
    this.#push();
    if (bytes > this.#batch.length) this.#batch = new Uint8Array(bytes);
  }

  /** Moves the current batch to the write queue and starts the writer. */
  #push(): void {
    if (this.#batchLen > 0) {
      this.#queue.push(this.#batch.subarray(0, this.#batchLen));
      this.#queued += this.#batchLen;
      this.#batch = this.#spare.pop() ?? new Uint8Array(BATCH_BYTES);
      this.#batchLen = 0;
    }
    if (!this.#writing && this.#queue.length > 0) this.#write();
  }

  /** Frames appended in one synchronous run are written together once the caller yields. */
  #scheduleFlush(): void {
    if (this.#flushScheduled) return;
    this.#flushScheduled = true;
    queueMicrotask(() => {
      this.#flushScheduled = false;
      this.#push();
    });
  }

  async #write(): Promise<void> {
    this.#writing = true;
    try {
      while (this.#queue.length > 0 && !this.#finished) {
        const chunk = this.#queue[0];
        let off = 0;
        while (off < chunk.length) off += await this.#timedWrite(chunk.subarray(off));
        this.#queue.shift();
        this.#queued -= chunk.length;
        if (chunk.buffer.byteLength === BATCH_BYTES && this.#spare.length < SPARE_BATCHES) {
          this.#spare.push(new Uint8Array(chunk.buffer as ArrayBuffer));
        }
        this.#wakeDrainers();
        if (this.#queue.length === 0 && this.#batchLen > 0) this.#push();
      }
    } catch {
      this.#finish(1006, "");
      return;
    } finally {
      this.#writing = false;
    }
    this.#wakeDrainers();
    // Both close frames have crossed: the server closes the TCP connection (RFC 6455 §7.1.1).
    if (this.#closeSent && this.#closeReceived && this.bufferedAmount === 0) {
      this.#finish(this.#closeReceived.code, this.#closeReceived.reason);
    }
  }

  /** One write, failing once it has taken longer than the write timeout. */
  #timedWrite(bytes: Uint8Array): Promise<number> {
    const writing = this.#conn.write(bytes);
    if (!Number.isFinite(this.#writeTimeoutMs)) return writing;
    writing.catch(() => {});
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error("write timeout")), this.#writeTimeoutMs);
    });
    return Promise.race([writing, late]).finally(() => clearTimeout(timer));
  }

  #wakeDrainers(): void {
    if (this.#drainWaiters.length === 0) return;
    const amount = this.bufferedAmount;
    this.#drainWaiters = this.#drainWaiters.filter((w) => {
      if (amount > w.low && !this.#finished) return true;
      w.resolve();
      return false;
    });
  }

  /**
   * Resolves once at most `low` bytes are queued, or the connection is gone. It always waits for at
   * least one write or close, unless already drained.
   */
  drain(low = 0): Promise<void> {
    this.#push();
    if (this.bufferedAmount <= low || this.#finished) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push({ low, resolve }));
  }

  #header(opcode: number, length: number): void {
    const b = this.#batch;
    let i = this.#batchLen;
    b[i++] = 0x80 | opcode;
    if (length < 126) {
      b[i++] = length;
    } else if (length < 65536) {
      b[i++] = 126;
      b[i++] = length >>> 8;
      b[i++] = length & 255;
    } else {
      b[i++] = 127;
      b[i++] = 0;
      b[i++] = 0;
      b[i++] = 0;
      b[i++] = 0;
      b[i++] = length >>> 24;
      b[i++] = (length >>> 16) & 255;
      b[i++] = (length >>> 8) & 255;
      b[i++] = length & 255;
    }
    this.#batchLen = i;
  }

  /**
   * Queues a text frame, unless its UTF-8 payload is longer than `maxBytes` (0 = no limit). Returns
   * whether it was queued; false also once the connection is closing.
   */
  sendText(text: string, maxBytes = 0): boolean {
    if (this.#closeSent || this.#finished || this.#muted) return false;
    const upper = text.length * 3;
    this.#reserve(upper + 10);
    // Encode in place after the longest possible header, then move the payload left when the exact
    // length needs a shorter header (rare: only messages under 126 or over 65,535 bytes).
    const start = this.#batchLen;
    const headerGuess = upper < 126 ? 2 : upper < 65536 ? 4 : 10;
    const { written } = encoder.encodeInto(text, this.#batch.subarray(start + headerGuess));
    if (maxBytes > 0 && written > maxBytes) return false;
    const headerSize = written < 126 ? 2 : written < 65536 ? 4 : 10;
    if (headerSize !== headerGuess) {
      this.#batch.copyWithin(start + headerSize, start + headerGuess, start + headerGuess + written);
    }
    this.#header(1, written);
    this.#batchLen += written;
    this.#scheduleFlush();
    return true;
  }

  /** Queues a binary frame. Returns false once the connection is closing. */
  sendBinary(data: Uint8Array): boolean {
    if (this.#closeSent || this.#finished || this.#muted) return false;
    this.#reserve(data.length + 10);
    this.#header(2, data.length);
    this.#batch.set(data, this.#batchLen);
    this.#batchLen += data.length;
    this.#scheduleFlush();
    return true;
  }

  /**
   * Queues raw bytes as they are, outside any frame: for the handshake response and for sending
   * deliberately broken frames in fault-injection tests.
   */
  sendRaw(bytes: Uint8Array): void {
    if (this.#finished || this.#muted) return;
    this.#reserve(bytes.length);
    this.#batch.set(bytes, this.#batchLen);
    this.#batchLen += bytes.length;
    this.#scheduleFlush();
  }

  #control(opcode: number, payload: Uint8Array): void {
    this.#reserve(payload.length + 2);
    this.#header(opcode, payload.length);
    this.#batch.set(payload, this.#batchLen);
    this.#batchLen += payload.length;
    this.#push();
  }

  /**
   * Starts the closing handshake: queues a close frame after everything already queued and drops the
   * connection if the client has not answered within the close timeout. The reason is cut to the
   * 123 bytes a close frame can hold. On a muted connection it drops the connection instead.
   */
  close(code = 1000, reason = ""): void {
    if (this.#closeSent || this.#finished) return;
    if (this.#muted) {
      this.abort();
      return;
    }
    this.#closeSent = true;
    this.#control(8, closePayload(code, reason));
    this.#armCloseTimer();
  }

  /** Bounds the closing handshake, even when the client stops reading while our queue is full. */
  #armCloseTimer(): void {
    if (this.#closeTimer !== undefined || this.#finished) return;
    this.#closeTimer = setTimeout(() => {
      const received = this.#closeReceived;
      this.#finish(received?.code ?? 1006, received?.reason ?? "");
    }, this.#closeTimeoutMs);
  }

  /** Drops the TCP connection without a close frame (the client sees 1006). */
  abort(): void {
    this.#finish(1006, "");
  }

  #finish(code: number, reason: string): void {
    if (this.#finished) return;
    this.#finished = true;
    clearTimeout(this.#closeTimer);
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
    this.#queue = [];
    this.#queued = 0;
    this.#batchLen = 0;
    this.#wakeDrainers();
    this.#handlers.onClose?.(code, reason);
    this.#resolveFinished({ code, reason });
  }

  async #read(initial: Uint8Array): Promise<void> {
    let buf = new Uint8Array(Math.max(64 * 1024, initial.length));
    buf.set(initial);
    let len = initial.length;
    try {
      while (!this.#finished) {
        // Parse every complete frame in the buffer.
        let pos = 0;
        while (true) {
          if (len - pos < 2) break;
          const b0 = buf[pos];
          const b1 = buf[pos + 1];
          const fin = (b0 & 0x80) !== 0;
          const opcode = b0 & 0x0f;
          if ((b0 & 0x70) !== 0) throw new ProtocolError(1002, "reserved bits set");
          if ((b1 & 0x80) === 0) throw new ProtocolError(1002, "client frames must be masked");
          let length = b1 & 0x7f;
          let offset = pos + 2;
          if (length === 126) {
            if (len - pos < 4) break;
            length = (buf[pos + 2] << 8) | buf[pos + 3];
            offset = pos + 4;
          } else if (length === 127) {
            if (len - pos < 10) break;
            const high = (buf[pos + 2] << 24 >>> 0) + (buf[pos + 3] << 16) + (buf[pos + 4] << 8) +
              buf[pos + 5];
            const low = (buf[pos + 6] << 24 >>> 0) + (buf[pos + 7] << 16) + (buf[pos + 8] << 8) +
              buf[pos + 9];
            length = high * 4294967296 + low;
            offset = pos + 10;
          }
          if (length > this.#maxMessageBytes) throw new ProtocolError(1009, "message too big");
          if (len - offset < 4 + length) {
            // Incomplete: make sure the buffer can hold the whole frame, then read more.
            const need = offset - pos + 4 + length;
            if (need > buf.length) {
              const bigger = new Uint8Array(need);
              bigger.set(buf.subarray(pos, len));
              buf = bigger;
              len -= pos;
              pos = 0;
            }
            break;
          }
          const mask = buf.subarray(offset, offset + 4);
          const payload = buf.slice(offset + 4, offset + 4 + length);
          for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3];
          pos = offset + 4 + length;
          this.#onFrame(fin, opcode, payload);
          if (this.#finished) return;
        }
        if (pos > 0) {
          buf.copyWithin(0, pos, len);
          len -= pos;
        }
        if (len === buf.length) {
          const bigger = new Uint8Array(buf.length * 2);
          bigger.set(buf);
          buf = bigger;
        }
        const n = await this.#conn.read(buf.subarray(len));
        if (n === null) break;
        len += n;
      }
    } catch (err) {
      if (err instanceof ProtocolError) {
        await this.#failConnection(err.code, err.message, buf);
        return;
      }
      throw err;
    }
    // EOF: after a close exchange this is the normal end, otherwise an abnormal one.
    const received = this.#closeReceived;
    this.#finish(received?.code ?? 1006, received?.reason ?? "");
  }

  /**
   * Closes with `code` after the client broke the protocol. No close reply is awaited, but what the
   * client still sends (the rest of an oversized message, say) is read and dropped until it closes
   * or the close timeout passes: closing a socket with unread bytes resets the connection, and the
   * reset can destroy the close frame before the client reads it.
   */
  async #failConnection(code: number, reason: string, scratch: Uint8Array): Promise<void> {
    this.close(code, reason);
    await this.drain(0);
    try {
      // Our side is done: a client that waits for the server to close first sees the end now.
      await this.#conn.closeWrite();
    } catch {
      // Already closed.
    }
    while (!this.#finished) {
      const n = await this.#conn.read(scratch).catch(() => null);
      if (n === null) break;
    }
    this.#finish(code, reason);
  }

  #onFrame(fin: boolean, opcode: number, payload: Uint8Array): void {
    if (opcode >= 8) {
      if (!fin || payload.length > 125) throw new ProtocolError(1002, "bad control frame");
      if (opcode === 8) this.#onClose(payload);
      else if (opcode === 9) {
        if (!this.#closeSent && !this.#muted) this.#control(10, payload);
      } else if (opcode === 10) this.lastPongAt = performance.now();
      else throw new ProtocolError(1002, "unknown opcode");
      return;
    }
    if (opcode === 0) {
      if (this.#fragmentOpcode === 0) throw new ProtocolError(1002, "continuation without a start");
      this.#fragmentBytes += payload.length;
      if (this.#fragmentBytes > this.#maxMessageBytes) throw new ProtocolError(1009, "message too big");
      this.#fragments.push(payload);
      if (!fin) return;
      const whole = concat(this.#fragments);
      const messageOpcode = this.#fragmentOpcode;
      this.#fragments = [];
      this.#fragmentBytes = 0;
      this.#fragmentOpcode = 0;
      this.#deliver(messageOpcode, whole);
      return;
    }
    if (opcode !== 1 && opcode !== 2) throw new ProtocolError(1002, "unknown opcode");
    if (this.#fragmentOpcode !== 0) throw new ProtocolError(1002, "new message inside a fragmented one");
    if (!fin) {
      this.#fragments = [payload];
      this.#fragmentBytes = payload.length;
      this.#fragmentOpcode = opcode;
      return;
    }
    this.#deliver(opcode, payload);
  }

  #deliver(opcode: number, payload: Uint8Array): void {
    if (this.#closeReceived) return;
    if (opcode === 1) {
      let text: string;
      try {
        text = strictDecoder.decode(payload);
      } catch {
        throw new ProtocolError(1007, "invalid UTF-8 in a text message");
      }
      this.#handlers.onText?.(text);
    } else {
      this.#handlers.onBinary?.(payload);
    }
  }

  #onClose(payload: Uint8Array): void {
    const code = payload.length >= 2 ? (payload[0] << 8) | payload[1] : 1005;
    // A code no endpoint may send (1005, 1006, 1015, unassigned ones) or a reason that is not UTF-8
    // is a protocol error, answered with 1002 as gorilla/websocket answers it (RFC 6455 §7.4).
    if (payload.length >= 2 && !CLIENT_CLOSE_CODES.has(code) && !(code >= 3000 && code <= 4999)) {
      throw new ProtocolError(1002, `bad close code ${code}`);
    }
    let reason: string;
    try {
      reason = strictDecoder.decode(payload.subarray(2));
    } catch {
      throw new ProtocolError(1002, "invalid utf8 payload in close frame");
    }
    this.#closeReceived = { code, reason };
    if (!this.#closeSent) {
      // Echo the code, as browsers and Deno do.
      this.#closeSent = true;
      const echo = payload.length >= 2 ? payload.subarray(0, 2) : new Uint8Array(0);
      this.#control(8, echo);
      this.#armCloseTimer();
    } else if (!this.#writing && this.bufferedAmount === 0) {
      this.#finish(code, reason);
    }
  }
}
