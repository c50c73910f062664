/** Loopback fixtures for sync tests: a capture served by the project's server and a temp KV file. */
import { parseCapture } from "../../src/server/capture.ts";
import {
  type JetstreamServer,
  type JetstreamServerOptions,
  serveJetstream,
} from "../../src/server/server.ts";
import type { JetstreamEvent } from "../../src/jetstream/events.ts";
import { acceptWebSocket, readRequestHead } from "../../src/server/http1.ts";
import { runBackfillSync } from "../../src/backfill.ts";
import type { BackfillSyncOptions } from "../../src/options.ts";
import type { SyncErrorReport, SyncStats } from "../../src/stats.ts";

/** Serves `events` (objects or exact lines) on 127.0.0.1. */
export function serveEvents(
  events: (JetstreamEvent | string)[],
  options: Omit<JetstreamServerOptions, "events"> = {},
): JetstreamServer {
  const lines = events.map((e) => typeof e === "string" ? e : JSON.stringify(e));
  return serveJetstream({ events: parseCapture(lines), ...options });
}

/** `runBackfillSync(options)`, with every report its `onError` gets. */
export async function syncReporting(
  options: BackfillSyncOptions,
): Promise<{ stats: SyncStats; reports: SyncErrorReport[] }> {
  const reports: SyncErrorReport[] = [];
  const stats = await runBackfillSync({ ...options, onError: (r) => reports.push(r) });
  return { stats, reports };
}

/** A temporary folder holding a KV database path; removed on dispose. */
export async function tempDb(): Promise<{ path: string; dir: string } & AsyncDisposable> {
  const dir = await Deno.makeTempDir({ prefix: "jetfill-test-" });
  return {
    dir,
    path: `${dir}/queue.sqlite`,
    [Symbol.asyncDispose]: () => Deno.remove(dir, { recursive: true }),
  };
}

/**
 * The sync's own connections, without the coverage probes: `/subscribe?cursor=0` and, on the v2
 * wire, `subscribeEvents` with a cursor and nothing else (a sync names its kinds).
 */
export function syncConnections(server: JetstreamServer): JetstreamServer["connections"] {
  return server.connections.filter((c) => !isCoverageProbe(c));
}

/** Whether `c` is a sync's coverage probe (see {@link syncConnections}). */
export function isCoverageProbe(c: JetstreamServer["connections"][number]): boolean {
  return c.endpoint === "subscribe" ? c.query === "cursor=0" : /^cursor=\d+$/.test(c.query);
}

/**
 * A loopback TCP port that refuses connections (nothing listens there). A port that a listener on port
 * 0 was just given and gave back can be handed to another test's server before it is used (tests run
 * in parallel); a port below 1024 never is (Linux gives port 0 listeners ports of its ephemeral range,
 * 32768–60999 by default), so the first of a few low ports that refuses now is taken (none of them on
 * the fetch standard's list of bad ports, which `fetch` refuses to try).
 */
export async function refusedPort(): Promise<number> {
  for (const port of [2, 3, 4, 5, 6, 8, 10]) {
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conn.close();
    } catch (err) {
      if (err instanceof Deno.errors.ConnectionRefused) return port;
    }
  }
  throw new Error("no low loopback port refuses connections on this machine");
}

/** A loopback TCP port that accepts connections and never answers (a network that hangs). */
export async function withSilentPort(fn: (port: number) => Promise<void>): Promise<void> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) conns.push(conn);
  })();
  try {
    await fn(listener.addr.port);
  } finally {
    listener.close();
    await accepting.catch(() => {});
    for (const conn of conns) conn.close();
  }
}

/**
 * A TCP relay: each connection `listener` (by default plain TCP on 127.0.0.1) accepts is piped,
 * both ways, to the 127.0.0.1 port that `route` names for it (by its ordinal from 1, asked when it
 * arrives), so that one host's address can be served by different servers from one connection to
 * the next, or a TLS listener can front a plain server.
 */
export function tcpRelay(
  route: (ordinal: number) => number,
  listener: Deno.Listener = Deno.listen({ hostname: "127.0.0.1", port: 0 }),
): { port: number } & AsyncDisposable {
  return relay(listener, (_client, ordinal) => Promise.resolve(route(ordinal)));
}

/** The test certificates in `tests/fixtures/`: each host's certificate, key and CA. */
const TLS_FIXTURES = {
  localhost: { cert: "localhost.crt", key: "localhost.key", ca: "test-ca.crt" },
  "jetstream.test": { cert: "jetstream.test.crt", key: "jetstream.test.key", ca: "proxy-test-ca.crt" },
};

/**
 * A TLS front on 127.0.0.1 for the plain server on `port`, with the test certificate of `host`
 * (`ca` is the path of its CA, for Deno's `--cert`): what a client sees of a public Jetstream's
 * `wss://` endpoint.
 */
export function tlsFront(
  port: number,
  host: keyof typeof TLS_FIXTURES = "localhost",
): { port: number; ca: string } & AsyncDisposable {
  const fixtures = new URL("../fixtures/", import.meta.url);
  const files = TLS_FIXTURES[host];
  const front = tcpRelay(
    () => port,
    Deno.listenTls({
      hostname: "127.0.0.1",
      port: 0,
      cert: Deno.readTextFileSync(new URL(files.cert, fixtures)),
      key: Deno.readTextFileSync(new URL(files.key, fixtures)),
    }),
  );
  return {
    port: front.port,
    ca: new URL(files.ca, fixtures).pathname,
    [Symbol.asyncDispose]: () => front[Symbol.asyncDispose](),
  };
}

/** What {@link connectProxy} was asked: each CONNECT's request line and headers. */
export interface ProxyRequest {
  line: string;
  headers: Headers;
}

/**
 * An HTTP proxy on 127.0.0.1 that tunnels `CONNECT` requests (as a corporate proxy does for
 * `wss://`): `route` maps the requested `host:port` to a 127.0.0.1 port (undefined: 502). With
 * `credentials`, a request without that `Proxy-Authorization` gets a 407.
 */
export function connectProxy(
  route: (authority: string) => number | undefined,
  credentials?: string,
): { port: number; url: string; requests: ProxyRequest[] } & AsyncDisposable {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const requests: ProxyRequest[] = [];
  const encoder = new TextEncoder();
  const answer = (client: Deno.Conn, text: string) => client.write(encoder.encode(text)).catch(() => 0);
  const relayed = relay(
    listener,
    async (client) => {
      const head = await readHead(client);
      if (head === undefined) return undefined;
      const [line, ...fields] = head.split("\r\n");
      const headers = new Headers(
        fields.map((f) => [f.slice(0, f.indexOf(":")).trim(), f.slice(f.indexOf(":") + 1).trim()]),
      );
      requests.push({ line, headers });
      const authority = /^CONNECT (\S+) HTTP\/1\.1$/.exec(line)?.[1];
      if (authority === undefined) {
        await answer(client, "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
        return undefined;
      }
      if (credentials !== undefined && headers.get("proxy-authorization") !== `Basic ${btoa(credentials)}`) {
        const body = "credentials, please";
        await answer(
          client,
          `HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="test"\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
        );
        return undefined;
      }
      const port = route(authority);
      if (port === undefined) await answer(client, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
      return port;
    },
    (client) => answer(client, "HTTP/1.1 200 Connection established\r\n\r\n"),
  );
  const port = listener.addr.port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    requests,
    [Symbol.asyncDispose]: relayed[Symbol.asyncDispose],
  };
}

/** A request head (up to its blank line) read from `conn`; undefined if it closed first. */
async function readHead(conn: Deno.Conn): Promise<string | undefined> {
  const buf = new Uint8Array(16 * 1024);
  let len = 0;
  while (len < buf.length) {
    const n = await conn.read(buf.subarray(len)).catch(() => null);
    if (n === null) return undefined;
    len += n;
    const text = new TextDecoder().decode(buf.subarray(0, len));
    const end = text.indexOf("\r\n\r\n");
    if (end !== -1) return text.slice(0, end);
  }
  return undefined;
}

/**
 * Accepts connections on `listener` and pipes each, both ways, to the 127.0.0.1 port `pick` names
 * for it (undefined: the client is dropped); `connected`, if given, runs once the backend took it.
 */
function relay(
  listener: Deno.Listener,
  pick: (client: Deno.Conn, ordinal: number) => Promise<number | undefined>,
  connected?: (client: Deno.Conn) => Promise<unknown>,
): { port: number } & AsyncDisposable {
  const open = new Set<Deno.Conn>();
  const piping: Promise<unknown>[] = [];
  const pipe = async (from: Deno.Conn, to: Deno.Conn) => {
    try {
      await from.readable.pipeTo(to.writable, { preventCancel: true, preventClose: true });
    } catch {
      // The other side went away: both are closed below.
    }
    for (const conn of [from, to]) closeQuietly(conn);
  };
  const closeQuietly = (conn: Deno.Conn) => {
    if (!open.delete(conn)) return;
    try {
      conn.close();
    } catch {
      // Already closed by Deno when its streams ended.
    }
  };
  const serve = async (client: Deno.Conn, ordinal: number) => {
    open.add(client);
    const port = await pick(client, ordinal).catch(() => undefined);
    let backend: Deno.Conn;
    try {
      if (port === undefined) throw new Error("no backend");
      backend = await Deno.connect({ hostname: "127.0.0.1", port });
    } catch {
      // A backend that refuses (one shut down, or a closed port on purpose): the client's
      // connection is dropped, as a host that cannot be reached drops it, and the relay goes on.
      closeQuietly(client);
      return;
    }
    open.add(backend);
    await connected?.(client);
    piping.push(pipe(client, backend), pipe(backend, client));
  };
  let ordinal = 0;
  const accepting = (async () => {
    for await (const client of listener) piping.push(serve(client, ++ordinal));
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    [Symbol.asyncDispose]: async () => {
      listener.close();
      await accepting;
      for (const conn of [...open]) closeQuietly(conn);
      await Promise.allSettled(piping);
    },
  };
}

/**
 * A server that accepts every WebSocket connection and drops it at once, without a frame or a close
 * (a server that goes down right after the upgrade). `accepted()` counts the connections.
 */
export function upgradeThenDropServer(): { port: number; accepted: () => number } & AsyncDisposable {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  let accepted = 0;
  const serving = (async () => {
    for await (const conn of listener) {
      const head = await readRequestHead(conn).catch(() => undefined);
      const answer = head && await acceptWebSocket(head.headers);
      if (answer && "response" in answer) {
        await conn.write(answer.response).catch(() => {});
        accepted++;
      }
      conn.close();
    }
  })().catch(() => {/* closed */});
  return {
    port: listener.addr.port,
    accepted: () => accepted,
    [Symbol.asyncDispose]: async () => {
      listener.close();
      await serving;
    },
  };
}

/**
 * A server that takes one WebSocket connection, sends it `event`, then reads and ignores whatever
 * comes, the close frame included, and never closes: a server that does not answer a close.
 * `connected()` says when the event was sent.
 */
export function closeIgnoringServer(
  event: JetstreamEvent,
): { url: string; connected: () => boolean } & AsyncDisposable {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  let connected = false;
  let conn: Deno.Conn | undefined;
  const serving = (async () => {
    conn = await listener.accept();
    const head = await readRequestHead(conn);
    const accepted = await acceptWebSocket(head!.headers);
    if (!("response" in accepted)) throw new Error("refused");
    const text = new TextEncoder().encode(JSON.stringify(event));
    await conn.write(
      new Uint8Array([...accepted.response, 0x81, 126, text.length >> 8, text.length & 255, ...text]),
    );
    connected = true;
    const sink = new Uint8Array(65536);
    while (await conn.read(sink) !== null);
  })().catch(() => {/* the client went away */});
  return {
    url: `ws://127.0.0.1:${listener.addr.port}/subscribe`,
    connected: () => connected,
    [Symbol.asyncDispose]: async () => {
      try {
        listener.close();
      } catch { /* closed */ }
      try {
        conn?.close();
      } catch { /* closed */ }
      await serving;
    },
  };
}

/**
 * A legacy server by hand, with time_us from this machine's clock: no cursor gets only what is sent to
 * its `listening` sockets from then on; a cursor, what `held` holds from it on (inclusive), then what
 * comes. `cursors` has each connection's but the coverage probes' (cursor=0, which read the oldest and
 * close), which `probes` counts; `onOpen` is called for each connection once its replay is sent.
 */
export function handServer(held: JetstreamEvent[], onOpen?: (socket: WebSocket) => void) {
  const listening = new Set<WebSocket>();
  const cursors: (string | null)[] = [];
  let probes = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const raw = new URL(req.url).searchParams.get("cursor");
    if (raw !== "0") cursors.push(raw);
    else probes++;
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onopen = () => {
      if (raw !== null) {
        for (const ev of held) if (ev.time_us >= Number(raw)) socket.send(JSON.stringify(ev));
      }
      listening.add(socket);
      onOpen?.(socket);
    };
    socket.onclose = () => listening.delete(socket);
    return response;
  });
  return {
    instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
    listening,
    cursors,
    get probes() {
      return probes;
    },
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}
