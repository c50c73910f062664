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

/** The sync's own connections, without the coverage probes (`cursor=0`, no filters). */
export function syncConnections(server: JetstreamServer): JetstreamServer["connections"] {
  return server.connections.filter((c) => c.query !== "cursor=0");
}
