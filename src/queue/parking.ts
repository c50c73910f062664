/**
 * Parked messages: where consume() keeps the messages it took out of KV's queue but could not handle
 * within KV's 5 s deadline, the signs of life of the consumer runs that hold them, the checked writes
 * by which a run is taken over, and {@link requeueParked}, which hands a stopped consumer's parked
 * messages back to KV's queue. See consume()'s module documentation for the whole protocol.
 *
 * @module
 */
import { queueKey, retryWhileBusy } from "./kv_queue.ts";

/** A consumer with parked messages writes that it is alive this often, ms. */
export const PARK_HEARTBEAT_MS = 1_000;
/** The parked messages of a consumer not seen alive for this long are taken over by another, ms. */
export const PARK_STALE_MS = 10_000;

/** A KV operation, run again a few times over about 350 ms while SQLite reports the database busy. */
export function retryBusy<T>(op: () => Promise<T>): Promise<T> {
  return retryWhileBusy(op, 350);
}

/** Where a parked message is kept: `["jetfill", queue, "parked", run, seq]`. */
export function parkedKey(queue: string, p: { run: string; seq: number }): Deno.KvKey {
  return queueKey(queue, "parked", p.run, p.seq);
}

/** Its small index entry, listed to find parked messages without reading them. */
export function parkedSeqKey(queue: string, p: { run: string; seq: number }): Deno.KvKey {
  return queueKey(queue, "parkedSeq", p.run, p.seq);
}

/** Where the consumer holding a run's parked messages writes that it is alive. */
export function signOfLifeKey(queue: string, run: string): Deno.KvKey {
  return queueKey(queue, "consumer", run);
}

/**
 * Writes a run's sign of life if it is still as the writer last saw it (`versionstamp`; null: none):
 * the claim of a run's parked messages, or the next beat of one held. Refused when another wrote it.
 */
export function claimSignOfLife(
  kv: Deno.Kv,
  queue: string,
  run: string,
  versionstamp: string | null,
  by?: string,
): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
  const key = signOfLifeKey(queue, run);
  return retryBusy(() =>
    kv.atomic().check({ key, versionstamp }).set(
      key,
      by === undefined ? { at: Date.now() } : { at: Date.now(), by },
    )
      .commit()
  );
}

/** The seqs of the messages parked in `queue`, by the consumer run that parked them, lowest first. */
export async function parkedByRun(kv: Deno.Kv, queue: string): Promise<Map<string, number[]>> {
  const runs = new Map<string, number[]>();
  for await (const entry of kv.list({ prefix: queueKey(queue, "parkedSeq") })) {
    const [run, seq] = entry.key.slice(-2);
    if (typeof run !== "string" || typeof seq !== "number") continue;
    const seqs = runs.get(run);
    if (seqs) seqs.push(seq);
    else runs.set(run, [seq]);
  }
  return runs;
}

/** How long ago (ms) a consumer run last said it was alive (Infinity: never, or it stopped), and its entry. */
export async function lastSeenOf(
  kv: Deno.Kv,
  queue: string,
  run: string,
): Promise<{ age: number; entry: Deno.KvEntryMaybe<{ at?: unknown }> }> {
  const entry = await kv.get<{ at?: unknown }>(signOfLifeKey(queue, run));
  return { age: ageOf(entry.value), entry };
}

/** How long ago (ms) a sign of life was written: Infinity when there is none. */
export function ageOf(sign: { at?: unknown } | null): number {
  const at = sign?.at;
  return typeof at === "number" ? Date.now() - at : Number.POSITIVE_INFINITY;
}

/**
 * Deletes the signs of life of runs that hold no parked message and were not seen for
 * PARK_STALE_MS: left by a consumer killed after its last parked message was handled, say.
 */
export async function dropStaleSignsOfLife(
  kv: Deno.Kv,
  queue: string,
  parked: Map<string, number[]>,
): Promise<void> {
  const stale: Deno.KvEntry<unknown>[] = [];
  await retryBusy(async () => {
    stale.length = 0;
    for await (const entry of kv.list<{ at?: unknown }>({ prefix: queueKey(queue, "consumer") })) {
      const run = entry.key.at(-1);
      if (typeof run === "string" && !parked.has(run) && ageOf(entry.value) >= PARK_STALE_MS) {
        stale.push(entry);
      }
    }
  });
  for (const entry of stale) await retryBusy(() => kv.atomic().check(entry).delete(entry.key).commit());
}

/**
 * Puts the messages that stopped or crashed consumers left parked (see {@link consume}) back in the
 * queue, lowest `seq` first, for a plain `listenQueue` or any other consumer to take; each is
 * deleted in the commit that enqueues it again, and one handled already is only deleted. The
 * messages of a consumer that may still be running (seen within {@link PARK_STALE_MS}) are left
 * alone. Resolves to the number of messages requeued.
 *
 * @example
 * ```ts
 * import { requeueParked } from "./parking.ts";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * console.log(`${await requeueParked(kv, "jetstream_sync")} parked messages back in the queue`);
 * kv.close();
 * ```
 */
export async function requeueParked(kv: Deno.Kv, queue: string): Promise<number> {
  let requeued = 0;
  const runs = await retryBusy(() => parkedByRun(kv, queue));
  await dropStaleSignsOfLife(kv, queue, runs);
  for (const [run, seqs] of runs) {
    const seen = await retryBusy(() => lastSeenOf(kv, queue, run));
    if (seen.age < PARK_STALE_MS) continue;
    // Claimed as a consumer taking them over would, and kept alive with checked writes: a consumer
    // that comes meanwhile sees the run alive, and one that takes it over stops this.
    const key = signOfLifeKey(queue, run);
    let claim = await claimSignOfLife(kv, queue, run, seen.entry.versionstamp);
    let claimedAt = Date.now();
    for (const seq of seqs) {
      if (!claim.ok) break;
      if (Date.now() - claimedAt >= PARK_HEARTBEAT_MS) {
        claim = await claimSignOfLife(kv, queue, run, claim.versionstamp);
        claimedAt = Date.now();
        if (!claim.ok) break;
      }
      const entryKey = parkedKey(queue, { run, seq });
      const [parked, handled] = await retryBusy(() =>
        kv.getMany([entryKey, queueKey(queue, "handled", seq)])
      );
      const again = parked.versionstamp !== null && handled.versionstamp === null;
      const res = await retryBusy(() => {
        const op = kv.atomic().check(parked).delete(entryKey).delete(parkedSeqKey(queue, { run, seq }));
        if (again) op.enqueue(parked.value, { keysIfUndelivered: [queueKey(queue, "dead", seq)] });
        return op.commit();
      });
      if (res.ok && again) requeued++;
    }
    if (claim.ok) {
      const last = claim.versionstamp;
      await retryBusy(() => kv.atomic().check({ key, versionstamp: last }).delete(key).commit());
    }
  }
  return requeued;
}
