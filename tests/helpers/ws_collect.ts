/**
 * Loopback WebSocket helpers for tests: open a real `WebSocket`, collect what arrives, and always
 * close it, so the test sanitizers stay happy.
 *
 * @module
 */

/**
 * Options of {@linkcode collectMessages}.
 *
 * @example
 * ```ts
 * import type { CollectOptions } from "./ws_collect.ts";
 * const options: CollectOptions = { count: 10, send: ['{"type":"options_update","payload":{}}'], timeoutMs: 1000 };
 * ```
 */
export interface CollectOptions {
  /** Stop (and close from the client side) after this many messages. */
  count?: number;
  /** Text messages to send as soon as the socket opens, in order. */
  send?: (string | Uint8Array)[];
  /** Extra request headers (Deno's non-standard `WebSocket` options bag). */
  headers?: Record<string, string>;
  /** Subprotocols to offer (`Sec-WebSocket-Protocol`). */
  protocols?: string[];
  /**
   * Give up after this long: close from the client side and return what arrived.
   *
   * @default {5000}
   */
  timeoutMs?: number;
}

/**
 * What {@linkcode collectMessages} saw.
 *
 * @example
 * ```ts ignore
 * const { messages, code, reason, timedOut }: Collected = await collectMessages(url);
 * ```
 */
export interface Collected {
  /** Text messages as strings, binary ones as bytes, in arrival order. */
  messages: (string | Uint8Array)[];
  /**
   * The close code the client saw; 1006 when the connection ended without a close frame (Deno's
   * `WebSocket` reports 0 then, after an `error` event).
   */
  code: number;
  /** The close reason the client saw. */
  reason: string;
  /** Whether the client closed because `count` was reached or the timeout fired. */
  closedByClient: boolean;
  /** Whether the timeout fired. */
  timedOut: boolean;
  /** The subprotocol the server selected ("" for none). */
  protocol: string;
}

/**
 * Connects to `url`, sends `send`, and collects messages until the server closes, `count` messages
 * arrived, or `timeoutMs` passed; then makes sure the socket is closed.
 *
 * @example
 * ```ts ignore
 * import { collectMessages } from "./ws_collect.ts";
 * const { messages, code } = await collectMessages(`${server.url}?cursor=0`);
 * ```
 */
export function collectMessages(url: string, options: CollectOptions = {}): Promise<Collected> {
  const { count, send = [], headers, protocols, timeoutMs = 5000 } = options;
  // Deno accepts an options bag with headers as the second argument (protocol doc §10.11).
  const socket = headers
    ? new WebSocket(url, { headers, protocols } as unknown as string[])
    : new WebSocket(url, protocols);
  socket.binaryType = "arraybuffer";
  const messages: (string | Uint8Array)[] = [];
  let closedByClient = false;
  let timedOut = false;
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      timedOut = true;
      closedByClient = true;
      socket.close();
    }, timeoutMs);
    socket.onopen = () => {
      for (const message of send) socket.send(message);
    };
    socket.onmessage = (event) => {
      messages.push(typeof event.data === "string" ? event.data : new Uint8Array(event.data as ArrayBuffer));
      if (count !== undefined && messages.length === count && !closedByClient) {
        closedByClient = true;
        socket.close(1000);
      }
    };
    socket.onerror = () => {};
    socket.onclose = (event) => {
      clearTimeout(timer);
      const code = event.code === 0 ? 1006 : event.code;
      resolve({ messages, code, reason: event.reason, closedByClient, timedOut, protocol: socket.protocol });
    };
  });
}

/**
 * Polls `condition` every few milliseconds until it holds or `timeoutMs` passes (then throws).
 *
 * @example
 * ```ts ignore
 * import { waitFor } from "./ws_collect.ts";
 * await waitFor(() => server.connections[0]?.closeCode !== undefined);
 * ```
 */
export async function waitFor(condition: () => boolean, timeoutMs = 3000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/**
 * Sends one raw HTTP/1.1 GET over TCP and returns the status, body and response headers. Unlike
 * `fetch`, it has no URL length limit, so it can send the 10,000-DID query strings the legacy server
 * accepts, and it can send any header.
 *
 * @example
 * ```ts ignore
 * import { rawGet } from "./ws_collect.ts";
 * const { status, body } = await rawGet(server.port, "/subscribe?cursor=abc");
 * ```
 */
export async function rawGet(
  port: number,
  target: string,
  headers: Record<string, string> = {},
): Promise<{ status: number; body: string; headers: Headers }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    let head = `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\n`;
    for (const [name, value] of Object.entries(headers)) head += `${name}: ${value}\r\n`;
    const request = new TextEncoder().encode(`${head}\r\n`);
    let off = 0;
    while (off < request.length) off += await conn.write(request.subarray(off));
    const response = await new Response(conn.readable).text();
    const status = Number(/^HTTP\/1\.1 (\d{3}) /.exec(response)?.[1]);
    const end = response.indexOf("\r\n\r\n");
    const fields = new Headers();
    for (const line of response.slice(0, end).split("\r\n").slice(1)) {
      const colon = line.indexOf(":");
      fields.append(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
    }
    return { status, body: response.slice(end + 4), headers: fields };
  } finally {
    try {
      conn.close();
    } catch {
      // The readable stream already closed it.
    }
  }
}
