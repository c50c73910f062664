/** Loopback fixtures for sync tests: a capture served by the project's server and a temp KV file. */
import { parseCapture } from "../../src/server/capture.ts";
import {
  type JetstreamServer,
  type JetstreamServerOptions,
  serveJetstream,
} from "../../src/server/server.ts";
import type { JetstreamEvent } from "../../src/jetstream/events.ts";

/** Serves `events` (objects or exact lines) on 127.0.0.1. */
export function serveEvents(
  events: (JetstreamEvent | string)[],
  options: Omit<JetstreamServerOptions, "events"> = {},
): JetstreamServer {
  const lines = events.map((e) => typeof e === "string" ? e : JSON.stringify(e));
  return serveJetstream({ events: parseCapture(lines), ...options });
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
