/**
 * A jetfill queue in Deno KV: the messages (KV's queue), the queue's checkpoint and its counters,
 * all written together in atomic commits so that what is stored and what is counted never disagree.
 *
 * Keys, all under `["jetfill", <queue>]`:
 * - `"checkpoint"`: {@link Checkpoint}, rewritten by every commit;
 * - `"writer"`: the lock of the run writing the queue, checked by every commit;
 * - `"count", "messages" | "records"`: `Deno.KvU64` totals ever enqueued;
 * - `"count", "messagesHandled" | "recordsHandled"`: totals consumed (see `consume()`);
 * - `"day", "YYYY-MM-DD"`: `Deno.KvU64` records stored per UTC day;
 * - `"run"`: the last run's options and statistics;
 * - `"dead", seq`: messages KV gave up delivering (`keysIfUndelivered`).
 *
 * @module
 */
import type { QueueMessage } from "./message.ts";

/** The state a queue keeps about what it holds; written in the same commit as the messages. */
export interface Checkpoint {
  /** Format version. */
  v: 1;
  /** The queue's name. */
  queue: string;
  /** Seq of the last message enqueued. */
  seq: number;
  /** `time_us` of the last record stored. */
  cursor: number;
  /** Records ever stored in this queue. */
  recordsStored: number;
  /** When the commit happened, ms since the epoch. */
  updatedAt: number;
  /** The run that wrote it: what `--resume` needs to continue it. */
  run: RunState;
}

/** What a run must remember so that it can be resumed. */
export interface RunState {
  /** Random id of the run. */
  id: string;
  /** The options that select events (filters, window, limit), as a comparable object. */
  selection: Record<string, unknown>;
  /** Records this run (and its resumptions) stored. */
  recordsStored: number;
  /** The WebSocket URL the last record came from. */
  instance: string;
  /** The instances the run was given, in order. */
  instances?: string[];
  /** Server sequence cursor (v2 hosts) of the last stored record that had one. */
  seqCursor?: number;
  /** The instance that issued `seqCursor`; a sequence number is never sent to another. */
  seqInstance?: string;
}

/**
 * The checkpoint of a queue nothing was stored in yet, for a run described by `run` (by default a
 * new run with an empty selection).
 *
 * @example
 * ```ts
 * import { emptyCheckpoint } from "./kv_queue.ts";
 * emptyCheckpoint("jetstream_sync").seq; // 0
 * ```
 */
export function emptyCheckpoint(queue: string, run?: RunState): Checkpoint {
  return {
    v: 1,
    queue,
    seq: 0,
    cursor: 0,
    recordsStored: 0,
    updatedAt: Date.now(),
    run: run ?? { id: crypto.randomUUID(), selection: {}, recordsStored: 0, instance: "" },
  };
}

/** Key of a queue's item under the jetfill namespace. */
export function queueKey(queue: string, ...parts: Deno.KvKeyPart[]): Deno.KvKey {
  return ["jetfill", queue, ...parts];
}

/** One queue message ready to commit, with what it counts for. */
export interface PreparedMessage {
  /** The message (its `seq` is assigned at commit time). */
  message: Omit<QueueMessage, "seq">;
  /** Upper bound on its serialized size. */
  size: number;
  /** Records it holds. */
  records: number;
}

/** Opens the database at `path`, creating its folder. */
export async function openKvAt(path: string): Promise<Deno.Kv> {
  if (path !== ":memory:") {
    const slash = path.lastIndexOf("/");
    if (slash > 0) await Deno.mkdir(path.slice(0, slash), { recursive: true });
  }
  return await Deno.openKv(path);
}

/** The default database path of a queue. */
export function defaultKvPath(queue: string): string {
  return `./jetfill-data/${queue}.sqlite`;
}

/** Reads a `Deno.KvU64` counter as a number (0 when absent). */
export function counterValue(entry: Deno.KvEntryMaybe<unknown>): number {
  const v = entry.value;
  return v instanceof Deno.KvU64 ? Number(v.value) : 0;
}

/**
 * Messages waiting in a queue: enqueued minus handled.
 *
 * @example
 * ```ts
 * import { queueLength } from "./kv_queue.ts";
 * const kv = await Deno.openKv(":memory:");
 * await queueLength(kv, "jetstream_sync"); // 0
 * kv.close();
 * ```
 */
export async function queueLength(kv: Deno.Kv, queue: string): Promise<number> {
  const [enq, handled] = await kv.getMany([
    queueKey(queue, "count", "messages"),
    queueKey(queue, "count", "messagesHandled"),
  ]);
  return Math.max(0, counterValue(enq) - counterValue(handled));
}

/** Reads a queue's checkpoint. */
export async function readCheckpoint(kv: Deno.Kv, queue: string): Promise<Deno.KvEntryMaybe<Checkpoint>> {
  return await kv.get<Checkpoint>(queueKey(queue, "checkpoint"));
}
