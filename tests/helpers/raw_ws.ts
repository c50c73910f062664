/**
 * A byte-level WebSocket client for tests that need what `WebSocket` cannot do: fragmented or
 * unmasked frames, pings, and dropping the TCP connection without a close frame.
 *
 * @module
 */

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * One frame received from the server.
 *
 * @example
 * ```ts ignore
 * const frame: RawFrame | null = await ws.next();
 * if (frame?.opcode === 1) console.log(new TextDecoder().decode(frame.payload));
 * ```
 */
export interface RawFrame {
  /** The FIN bit. */
  fin: boolean;
  /** The opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong). */
  opcode: number;
  /** The (unmasked) payload. */
  payload: Uint8Array;
}

/**
 * One frame with the shortest length encoding: masked unless `mask` is false (a client's frame), with
 * `rsv` bits if given (to break the protocol on purpose).
 */
export function encodeFrame(
  opcode: number,
  data: Uint8Array | string,
  { fin = true, mask = true, rsv = 0 }: { fin?: boolean; mask?: boolean; rsv?: number } = {},
): Uint8Array {
  const payload = typeof data === "string" ? encoder.encode(data) : data;
  const n = payload.length;
  const header = n < 126 ? 2 : n < 65536 ? 4 : 10;
  const frame = new Uint8Array(header + (mask ? 4 : 0) + n);
  frame[0] = (fin ? 0x80 : 0) | rsv | opcode;
  if (n < 126) {
    frame[1] = n;
  } else if (n < 65536) {
    frame[1] = 126;
    frame[2] = n >> 8;
    frame[3] = n & 255;
  } else {
    frame[1] = 127;
    new DataView(frame.buffer).setBigUint64(2, BigInt(n));
  }
  let off = header;
  if (mask) {
    frame[1] |= 0x80;
    const key = [0x12, 0x34, 0x56, 0x78];
    frame.set(key, off);
    off += 4;
    for (let i = 0; i < n; i++) frame[off + i] = payload[i] ^ key[i & 3];
  } else {
    frame.set(payload, off);
  }
  return frame;
}

/**
 * A raw WebSocket connection on 127.0.0.1.
 *
 * @example
 * ```ts ignore
 * import { RawWebSocket } from "./raw_ws.ts";
 * const ws = await RawWebSocket.connect(server.port, "/subscribe?requireHello=true");
 * await ws.send(1, new TextEncoder().encode("{}"));
 * ws.close();
 * ```
 */
export class RawWebSocket {
  readonly #conn: Deno.TcpConn;
  #buf: Uint8Array;

  private constructor(conn: Deno.TcpConn, rest: Uint8Array) {
    this.#conn = conn;
    this.#buf = rest;
  }

  /**
   * Connects and performs the opening handshake; throws unless the server answers 101. `early`
   * bytes (frames, say) go out in the same write as the request, before the answer.
   */
  static async connect(port: number, target: string, early?: Uint8Array): Promise<RawWebSocket> {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    const request = encoder.encode(
      `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\n` +
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    const bytes = new Uint8Array(request.length + (early?.length ?? 0));
    bytes.set(request);
    if (early) bytes.set(early, request.length);
    await RawWebSocket.#writeAll(conn, bytes);
    let buf = new Uint8Array(0);
    let end = -1;
    while (end === -1) {
      const chunk = new Uint8Array(4096);
      const n = await conn.read(chunk);
      if (n === null) {
        conn.close();
        throw new Error("connection closed during the handshake");
      }
      const joined = new Uint8Array(buf.length + n);
      joined.set(buf);
      joined.set(chunk.subarray(0, n), buf.length);
      buf = joined;
      end = decoder.decode(buf).indexOf("\r\n\r\n");
    }
    const head = decoder.decode(buf).slice(0, end);
    if (
      !head.startsWith("HTTP/1.1 101 ") ||
      !head.includes("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    ) {
      conn.close();
      throw new Error(`handshake refused: ${head.split("\r\n")[0]}`);
    }
    return new RawWebSocket(conn, buf.slice(encoder.encode(head).length + 4));
  }

  static async #writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
    let off = 0;
    while (off < bytes.length) off += await conn.write(bytes.subarray(off));
  }

  /** Sends one frame, masked unless `mask` is false. */
  async send(
    opcode: number,
    payload: Uint8Array,
    options: { fin?: boolean; mask?: boolean } = {},
  ): Promise<void> {
    await RawWebSocket.#writeAll(this.#conn, encodeFrame(opcode, payload, options));
  }

  /** Reads the next frame, or `null` at end of stream. */
  async next(): Promise<RawFrame | null> {
    for (;;) {
      const frame = this.#parse();
      if (frame) return frame;
      const chunk = new Uint8Array(64 * 1024);
      const n = await this.#conn.read(chunk);
      if (n === null) return null;
      const joined = new Uint8Array(this.#buf.length + n);
      joined.set(this.#buf);
      joined.set(chunk.subarray(0, n), this.#buf.length);
      this.#buf = joined;
    }
  }

  #parse(): RawFrame | null {
    const b = this.#buf;
    if (b.length < 2) return null;
    let length = b[1] & 0x7f;
    let off = 2;
    if (length === 126) {
      if (b.length < 4) return null;
      length = (b[2] << 8) | b[3];
      off = 4;
    } else if (length === 127) {
      if (b.length < 10) return null;
      length = (b[6] << 24 >>> 0) + (b[7] << 16) + (b[8] << 8) + b[9];
      off = 10;
    }
    if (b.length < off + length) return null;
    const frame = { fin: (b[0] & 0x80) !== 0, opcode: b[0] & 0x0f, payload: b.slice(off, off + length) };
    this.#buf = b.slice(off + length);
    return frame;
  }

  /** Reads frames until a close frame (returned) or the end of the stream (`null`). */
  async untilClose(): Promise<{ frames: RawFrame[]; close: RawFrame | null }> {
    const frames: RawFrame[] = [];
    for (;;) {
      const frame = await this.next();
      if (frame === null || frame.opcode === 8) return { frames, close: frame };
      frames.push(frame);
    }
  }

  /** Closes the TCP connection (without a close frame unless one was sent). */
  close(): void {
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
  }
}

/**
 * The close code in a close frame's payload (1005 when it has none).
 *
 * @example
 * ```ts
 * import { closeCode } from "./raw_ws.ts";
 * closeCode({ fin: true, opcode: 8, payload: new Uint8Array([0x03, 0xe8]) }); // 1000
 * ```
 */
export function closeCode(frame: RawFrame): number {
  return frame.payload.length >= 2 ? (frame.payload[0] << 8) | frame.payload[1] : 1005;
}
