/**
 * The little HTTP/1.1 the replay server needs on a raw TCP connection: read one request head, answer
 * with a plain-text response, and accept a WebSocket upgrade (RFC 6455 §4.2).
 *
 * The server owns its TCP connections (instead of using `Deno.serve` and `Deno.upgradeWebSocket`) so
 * it can batch many WebSocket frames per write and, later, misbehave on purpose at the byte level.
 *
 * @module
 */
import { encodeBase64 } from "../bytes.ts";

/**
 * A parsed request head plus the bytes that followed it on the connection.
 *
 * @example
 * ```ts ignore
 * const head = await readRequestHead(conn);
 * if (head) console.log(head.method, head.target, head.headers.get("upgrade"), head.rest.length);
 * ```
 */
export interface RequestHead {
  /** Request method, as sent (`GET`). */
  method: string;
  /** Request target, as sent (`/subscribe?cursor=1`). */
  target: string;
  /** Header fields (names are case-insensitive). */
  headers: Headers;
  /** Bytes already read past the end of the head (the start of WebSocket frames, if any). */
  rest: Uint8Array;
}

/**
 * Why a request head could not be read, with the status to answer.
 *
 * @example
 * ```ts
 * import { HttpError } from "./http1.ts";
 * const err = new HttpError(431, "request head too large");
 * console.log(err.status); // 431
 * ```
 */
export class HttpError extends Error {
  /** The status to answer with. */
  readonly status: number;
  /** Creates the error. */
  constructor(status: number, message: string) {
    super(message);
    this.name = "HttpError";
    this.status = status;
  }
}

/**
 * Go's net/http default limit on a request head; a 10,000-DID query string fits in it.
 *
 * @example
 * ```ts
 * import { MAX_HEAD_BYTES } from "./http1.ts";
 * console.log(MAX_HEAD_BYTES); // 1048576
 * ```
 */
export const MAX_HEAD_BYTES = 1 << 20;

const decoder = new TextDecoder();
const encoder = new TextEncoder();
const WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const REASONS: Record<number, string> = {
  101: "Switching Protocols",
  200: "OK",
  304: "Not Modified",
  400: "Bad Request",
  404: "Not Found",
  405: "Method Not Allowed",
  426: "Upgrade Required",
  431: "Request Header Fields Too Large",
  503: "Service Unavailable",
};

function findHeadEnd(buf: Uint8Array, from: number, to: number): number {
  for (let i = Math.max(0, from - 3); i + 3 < to; i++) {
    if (buf[i] === 13 && buf[i + 1] === 10 && buf[i + 2] === 13 && buf[i + 3] === 10) return i;
  }
  return -1;
}

/**
 * Reads one HTTP/1.1 request head from a connection. Resolves to `null` when the peer closes before
 * sending anything; throws {@linkcode HttpError} for a malformed or oversized head.
 *
 * @example
 * ```ts ignore
 * import { readRequestHead } from "./http1.ts";
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const conn = await listener.accept();
 * const head = await readRequestHead(conn);
 * console.log(head?.method, head?.target);
 * ```
 */
export async function readRequestHead(conn: Deno.Conn): Promise<RequestHead | null> {
  let buf = new Uint8Array(16 * 1024);
  let len = 0;
  let end = -1;
  while (end === -1) {
    if (len === buf.length) {
      if (buf.length >= MAX_HEAD_BYTES) throw new HttpError(431, "request head too large");
      const bigger = new Uint8Array(Math.min(buf.length * 4, MAX_HEAD_BYTES));
      bigger.set(buf);
      buf = bigger;
    }
    const n = await conn.read(buf.subarray(len));
    if (n === null) {
      if (len === 0) return null;
      throw new HttpError(400, "connection closed inside the request head");
    }
    const from = len;
    len += n;
    // A request line begins with its method, in capitals: anything else (a TLS handshake, from a
    // client given wss:// for this plain server) is answered at once, as Go's server would soon do,
    // rather than waited on for a head that never ends.
    if (from === 0 && !(buf[0] >= 0x41 && buf[0] <= 0x5a)) throw new HttpError(400, "malformed request line");
    end = findHeadEnd(buf, from, len);
  }
  const lines = decoder.decode(buf.subarray(0, end)).split("\r\n");
  const requestLine = /^([A-Z]+) (\S+) HTTP\/1\.[01]$/.exec(lines[0]);
  if (!requestLine) throw new HttpError(400, "malformed request line");
  const headers = new Headers();
  for (let i = 1; i < lines.length; i++) {
    const colon = lines[i].indexOf(":");
    if (colon <= 0) throw new HttpError(400, "malformed header line");
    try {
      headers.append(lines[i].slice(0, colon).trim(), lines[i].slice(colon + 1).trim());
    } catch {
      throw new HttpError(400, "invalid header");
    }
  }
  return { method: requestLine[1], target: requestLine[2], headers, rest: buf.slice(end + 4, len) };
}

/**
 * Writes a complete response that closes the connection (`Connection: close`), with the given
 * content type and extra header fields.
 *
 * @example
 * ```ts ignore
 * import { writeResponse } from "./http1.ts";
 * await writeResponse(conn, 200, dictionaryBytes, "application/octet-stream", { ETag: '"zstd-dict-1"' });
 * ```
 */
export async function writeResponse(
  conn: Deno.Conn,
  status: number,
  body: string | Uint8Array,
  contentType: string,
  headers: Record<string, string> = {},
): Promise<void> {
  const payload = typeof body === "string" ? encoder.encode(body) : body;
  let head = `HTTP/1.1 ${status} ${REASONS[status] ?? "Unknown"}\r\n` +
    `Content-Type: ${contentType}\r\n` +
    "Access-Control-Allow-Origin: *\r\n";
  for (const [name, value] of Object.entries(headers)) head += `${name}: ${value}\r\n`;
  head += `Content-Length: ${payload.length}\r\nConnection: close\r\n\r\n`;
  const headBytes = encoder.encode(head);
  const bytes = new Uint8Array(headBytes.length + payload.length);
  bytes.set(headBytes);
  bytes.set(payload, headBytes.length);
  let off = 0;
  while (off < bytes.length) off += await conn.write(bytes.subarray(off));
}

/**
 * Writes a complete plain-text response that closes the connection (`Connection: close`), the way
 * the legacy server answers refused subscriptions.
 *
 * @example
 * ```ts ignore
 * import { writeTextResponse } from "./http1.ts";
 * await writeTextResponse(conn, 400, "invalid cursor: abc");
 * ```
 */
export function writeTextResponse(
  conn: Deno.Conn,
  status: number,
  body: string,
  headers: Record<string, string> = {},
): Promise<void> {
  return writeResponse(conn, status, body, "text/plain; charset=UTF-8", headers);
}

/**
 * Writes a plain-text error the way Go's `http.Error` does, as the v2 server answers a refused
 * `/subscribe` (protocol doc §1.2): `text/plain; charset=utf-8`, `X-Content-Type-Options: nosniff`,
 * and the message followed by a newline.
 *
 * @example
 * ```ts ignore
 * import { writeGoHttpError } from "./http1.ts";
 * await writeGoHttpError(conn, 400, "subscribe: invalid cursor: negative value -1");
 * ```
 */
export function writeGoHttpError(
  conn: Deno.Conn,
  status: number,
  message: string,
  headers: Record<string, string> = {},
): Promise<void> {
  // (A refusal in coder/websocket's words is written with its newline already.)
  const body = message.endsWith("\n") ? message : `${message}\n`;
  return writeResponse(conn, status, body, "text/plain; charset=utf-8", {
    ...headers,
    "X-Content-Type-Options": "nosniff",
  });
}

/**
 * Writes an XRPC error envelope `{"error":name,"message":message}` as `application/json`, the way
 * the v2 server answers refused `subscribeEvents` requests and failed XRPC calls.
 *
 * @example
 * ```ts ignore
 * import { writeXrpcError } from "./http1.ts";
 * await writeXrpcError(conn, 400, "InvalidRequest", "subscribe: invalid cursor: \"abc\"");
 * ```
 */
export function writeXrpcError(
  conn: Deno.Conn,
  status: number,
  name: string,
  message: string,
  headers: Record<string, string> = {},
): Promise<void> {
  return writeResponse(conn, status, JSON.stringify({ error: name, message }), "application/json", headers);
}

/**
 * Why a request is not a WebSocket opening handshake, answered as the real servers' WebSocket
 * libraries answer it (before any WebSocket exists, as plain text): the status, the body and the
 * extra header fields.
 */
export interface HandshakeRefusal {
  /** The HTTP status: 400, or 426 (coder/websocket, for a request that is no upgrade at all). */
  status: number;
  /** The response body. */
  body: string;
  /** Extra header fields (`Sec-WebSocket-Version: 13`, or `Upgrade`/`Connection` for a 426). */
  headers: Record<string, string>;
}

/**
 * The library that makes a server's handshake: gorilla/websocket for the legacy server, whose
 * refusals are a bare `400 Bad Request`; coder/websocket for the v2 server, which says what was wrong
 * and answers a request that is no upgrade at all with 426.
 */
export type WebSocketLibrary = "gorilla" | "coder";

/** The comma-separated tokens of a header field, trimmed and lower-cased. */
function tokens(headers: Headers, name: string): string[] {
  return (headers.get(name) ?? "").split(",").map((token) => token.trim().toLowerCase());
}

/** Go's %q of an ASCII string, near enough: a double-quoted string with `"` and `\` escaped. */
function goQuote(text: string): string {
  return JSON.stringify(text);
}

/** The first problem `library` finds with a handshake, in the order it checks, or undefined. */
function handshakeRefusal(headers: Headers, library: WebSocketLibrary): HandshakeRefusal | undefined {
  const hasConnection = tokens(headers, "connection").includes("upgrade");
  const hasUpgrade = tokens(headers, "upgrade").includes("websocket");
  const version = headers.get("sec-websocket-version");
  const key = headers.get("sec-websocket-key");
  if (library === "gorilla") {
    // gorilla/websocket's Upgrader.returnError: the status text as body, whatever the reason.
    const ok = hasConnection && hasUpgrade && tokens(headers, "sec-websocket-version").includes("13") &&
      key !== null && key.trim() !== "";
    return ok
      ? undefined
      : { status: 400, body: "Bad Request\n", headers: { "Sec-Websocket-Version": "13" } };
  }
  const upgradeRequired = { Connection: "Upgrade", Upgrade: "websocket" };
  const missing = !hasConnection
    ? ["Connection", "Upgrade"]
    : !hasUpgrade
    ? ["Upgrade", "websocket"]
    : undefined;
  if (missing) {
    const [field, token] = missing;
    return {
      status: 426,
      body: `WebSocket protocol violation: ${field} header ${
        goQuote(headers.get(field) ?? "")
      } does not contain ${token}\n`,
      headers: upgradeRequired,
    };
  }
  if (version !== "13") {
    return {
      status: 400,
      body: `unsupported WebSocket protocol version (only 13 is supported): ${goQuote(version ?? "")}\n`,
      headers: { "Sec-WebSocket-Version": "13" },
    };
  }
  if (!key) {
    return { status: 400, body: "WebSocket protocol violation: missing Sec-WebSocket-Key\n", headers: {} };
  }
  return undefined;
}

/**
 * Checks that a request is a WebSocket opening handshake and returns the `101 Switching Protocols`
 * response head to send, or the refusal that `library` would answer with. The first of
 * `subprotocols` that the client offered (matched case-sensitively) is echoed in
 * `Sec-WebSocket-Protocol`.
 *
 * @example
 * ```ts ignore
 * import { acceptWebSocket } from "./http1.ts";
 * const accepted = await acceptWebSocket(head.headers);
 * if ("refusal" in accepted) console.log(accepted.refusal.status);
 * ```
 */
export async function acceptWebSocket(
  headers: Headers,
  subprotocols: readonly string[] = [],
  library: WebSocketLibrary = "gorilla",
): Promise<{ response: Uint8Array } | { refusal: HandshakeRefusal }> {
  const refusal = handshakeRefusal(headers, library);
  if (refusal) return { refusal };
  const key = headers.get("sec-websocket-key")!;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-1", encoder.encode(key + WS_GUID)));
  const offered = (headers.get("sec-websocket-protocol") ?? "").split(",").map((token) => token.trim());
  const protocol = subprotocols.find((token) => offered.includes(token));
  const head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
    `Sec-WebSocket-Accept: ${encodeBase64(digest)}\r\n` +
    (protocol ? `Sec-WebSocket-Protocol: ${protocol}\r\n` : "") + "\r\n";
  return { response: encoder.encode(head) };
}
