/**
 * Shared by the consume() tests: a temp database, a stored backlog, and test-only looks at what a
 * database holds (parked entries, KV's own queue tables).
 */
import { DatabaseSync } from "node:sqlite";
import type { JetstreamEvent } from "../../src/jetstream/events.ts";
import { queueKey } from "../../src/queue/kv_queue.ts";
import { generateCapture } from "../../src/server/synth.ts";
import { produce } from "./produce.ts";

export const Q = "jetstream_sync";

/** What KV itself still holds in its queue tables (test-only look at the SQLite file). */
export function kvQueueTables(path: string): { queued: number; running: number } {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    const n = (t: string) => Number((db.prepare(`select count(*) as n from ${t}`).get() as { n: number }).n);
    return { queued: n("queue"), running: n("queue_running") };
  } finally {
    db.close();
  }
}

export async function tempDb(): Promise<{ dir: string; path: string }> {
  const dir = await Deno.makeTempDir({ prefix: "jetfill_consume_" });
  return { dir, path: `${dir}/q.sqlite` };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Stores `count` synthetic events (`seed`) at `path` in messages of `batchSize`; returns them. */
export async function backlog(
  path: string,
  count: number,
  seed: number,
  batchSize: number,
): Promise<JetstreamEvent[]> {
  const kv = await Deno.openKv(path);
  try {
    return await produce(kv, generateCapture({ count, seed }), { batchSize });
  } finally {
    kv.close();
  }
}

/** The parked entries' keys left in a database: [run, seq] pairs. */
export async function listParked(path: string): Promise<[string, number][]> {
  const kv = await Deno.openKv(path);
  try {
    const found: [string, number][] = [];
    for await (const e of kv.list({ prefix: queueKey(Q, "parkedSeq") })) {
      found.push([e.key.at(-2) as string, e.key.at(-1) as number]);
    }
    return found;
  } finally {
    kv.close();
  }
}

/** Calls `onLine` with each line a child process prints, until its stdout ends. */
export async function eachLine(
  stdout: ReadableStream<Uint8Array>,
  onLine: (line: string) => void,
): Promise<void> {
  let buffered = "";
  for await (const chunk of stdout.pipeThrough(new TextDecoderStream())) {
    buffered += chunk;
    const lines = buffered.split("\n");
    buffered = lines.pop()!;
    for (const line of lines) onLine(line);
  }
}
