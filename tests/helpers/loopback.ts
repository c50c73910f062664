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
  let ordinal = 0;
  const accepting = (async () => {
    for await (const client of listener) {
      let backend: Deno.Conn;
      try {
        backend = await Deno.connect({ hostname: "127.0.0.1", port: route(++ordinal) });
      } catch {
        // A backend that refuses (one shut down, or a closed port on purpose): the client's
        // connection is dropped, as a host that cannot be reached drops it, and the relay goes on.
        client.close();
        continue;
      }
      open.add(client).add(backend);
      piping.push(pipe(client, backend), pipe(backend, client));
    }
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
