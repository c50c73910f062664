/**
 * Parked messages: where consume() keeps the messages it took out of KV's queue but could not handle
 * within KV's 5 s deadline, the signs of life of the consumer runs that hold them, the checked writes
 * by which a run is taken over, and {@link requeueParked}, which hands a stopped consumer's parked
 * messages back to KV's queue. See consume()'s module documentation for the whole protocol.
 *
 * @module
 */
import { delay } from "../async.ts";
import { queueKey, refuseQueueName, retryWhileBusy } from "./kv_queue.ts";
import { repackMessage } from "./message.ts";

/** A consumer with parked messages writes that it is alive this often, ms. */
export const PARK_HEARTBEAT_MS = 1_000;
/**
 * The parked messages of a consumer not seen alive for this long are taken over by another, ms: its
 * sign of life is this old by the wall clock and then stays unchanged for {@link PARK_CONFIRM_MS}
 * more, or stays unchanged this long.
 */
export const PARK_STALE_MS = 10_000;
/**
 * How long a sign of life that the wall clock calls stale must stay unchanged, ms, timed on the
 * looking process's monotonic clock, before its run is taken over. A step of the wall clock (a
 * resumed laptop, an NTP correction) can make a live consumer's sign of life look old; that consumer
 * writes again within a heartbeat and keeps its run.
 */
export const PARK_CONFIRM_MS = 3_000;
/**
 * A consumer starts a parked message only within this time (on its monotonic clock) of issuing its
 * run's last sign of life that landed. Below PARK_CONFIRM_MS: by the time another can take the run
 * over, this consumer has stopped starting its messages.
 */
export const PARK_START_WITHIN_MS = 2_000;

/** How long {@link retryBusy} runs an operation again while SQLite reports the database busy, ms. */
export const BUSY_RETRY_MS = 350;

/** A KV operation, run again a few times over about 350 ms while SQLite reports the database busy. */
export function retryBusy<T>(op: () => Promise<T>): Promise<T> {
  return retryWhileBusy(op, BUSY_RETRY_MS);
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

/** How long ago (ms) a sign of life was written, by the wall clock: Infinity when there is none. */
function ageOf(sign: { at?: unknown } | null): number {
  const at = sign?.at;
  return typeof at === "number" ? Date.now() - at : Number.POSITIVE_INFINITY;
}

/** A sign of life as read from KV: `{ at, by? }`, or none (versionstamp null). */
export type SignOfLife = Deno.KvEntryMaybe<{ at?: unknown }>;

/** Reads a run's sign of life. */
export function readSignOfLife(kv: Deno.Kv, queue: string, run: string): Promise<SignOfLife> {
  return retryBusy(() => kv.get<{ at?: unknown }>(signOfLifeKey(queue, run)));
}

/**
 * Judges whether the consumers of runs are gone, from their signs of life read over time: a run is
 * gone when its sign of life is absent (its consumer stopped), or was written PARK_STALE_MS ago by
 * the wall clock and has been seen unchanged (same versionstamp) for PARK_CONFIRM_MS here, or has
 * been seen unchanged for PARK_STALE_MS. Times seen are on this process's monotonic clock, so no
 * step of the wall clock makes a live consumer look gone.
 */
export class LifeWatch {
  readonly #seen = new Map<string, { versionstamp: string; since: number; lookedAt: number }>();

  /** How long (ms) until `run` may be judged gone, from its sign of life just read: 0, gone now. */
  wait(run: string, sign: SignOfLife): number {
    if (sign.versionstamp === null) {
      this.#seen.delete(run);
      return 0;
    }
    const now = performance.now();
    let seen = this.#seen.get(run);
    if (seen?.versionstamp !== sign.versionstamp) {
      seen = { versionstamp: sign.versionstamp, since: now, lookedAt: now };
      this.#seen.set(run, seen);
    }
    seen.lookedAt = now;
    const unchanged = now - seen.since;
    if (unchanged >= PARK_STALE_MS) return 0;
    const byWall = Math.max(0, PARK_STALE_MS - ageOf(sign.value));
    return Math.max(Math.min(byWall, PARK_STALE_MS - unchanged), PARK_CONFIRM_MS - unchanged, 0);
  }

  /** Forgets the runs not looked at for a minute: their signs of life are gone. */
  prune(): void {
    const now = performance.now();
    for (const [run, seen] of this.#seen) if (now - seen.lookedAt > 60_000) this.#seen.delete(run);
  }
}

/**
 * Deletes the signs of life of runs that hold no parked message and that `watch` judges gone: left
 * by a consumer killed after its last parked message was handled, say. Resolves to how long (ms)
 * until the next of the others may be judged gone (Infinity: none).
 */
export async function dropStaleSignsOfLife(
  kv: Deno.Kv,
  queue: string,
  parked: Map<string, number[]>,
  watch: LifeWatch,
): Promise<number> {
  const signs: Deno.KvEntry<{ at?: unknown }>[] = [];
  await retryBusy(async () => {
    signs.length = 0;
    for await (const entry of kv.list<{ at?: unknown }>({ prefix: queueKey(queue, "consumer") })) {
      const run = entry.key.at(-1);
      if (typeof run === "string" && !parked.has(run)) signs.push(entry);
    }
  });
  let next = Number.POSITIVE_INFINITY;
  for (const entry of signs) {
    const wait = watch.wait(String(entry.key.at(-1)), entry);
    if (wait === 0) await retryBusy(() => kv.atomic().check(entry).delete(entry.key).commit());
    else next = Math.min(next, wait);
  }
  return next;
}

/**
 * Puts the messages that stopped or crashed consumers left parked (see `consume()`) back in the
 * queue, lowest `seq` first, for a plain `listenQueue` or any other consumer to take; each is
 * deleted in the commit that enqueues it again, and one handled already is only deleted. The
 * messages of a consumer that may still be running are left alone: one seen within
 * {@link PARK_STALE_MS}, or whose sign of life then changes within {@link PARK_CONFIRM_MS} (so a stale
 * one costs that much more time). A crashed consumer's sign of life that looks recent to this clock
 * (a clock behind the one that wrote it) is left too; a running consume() takes such a run over once
 * the sign has stayed unchanged for PARK_STALE_MS. Resolves to the number of messages requeued. A
 * queue name that breaks `queueName`'s rule, or that the database has never held when it holds other
 * queues (a mistyped name), is refused with a `UsageError`.
 *
 * @example
 * ```ts
 * import { requeueParked } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * console.log(`${await requeueParked(kv, "jetstream_sync")} parked messages back in the queue`);
 * kv.close();
 * ```
 */
export async function requeueParked(kv: Deno.Kv, queue: string): Promise<number> {
  await refuseQueueName(kv, queue, "requeue the parked messages");
  let requeued = 0;
  const watch = new LifeWatch();
  const runs = await retryBusy(() => parkedByRun(kv, queue));
  // A sign of life that looks stale is watched for PARK_CONFIRM_MS first; the look after that is the last.
  for (let look = 0;; look++) {
    let confirm = await dropStaleSignsOfLife(kv, queue, runs, watch);
    for (const [run, seqs] of runs) {
      const sign = await readSignOfLife(kv, queue, run);
      const wait = watch.wait(run, sign);
      if (wait === 0) {
        requeued += await requeueRun(kv, queue, run, seqs, sign.versionstamp);
        runs.delete(run);
      } else {
        confirm = Math.min(confirm, wait);
      }
    }
    if (look > 0 || confirm > PARK_CONFIRM_MS) return requeued;
    await delay(confirm);
  }
}

/**
 * requeueParked() for one run judged gone, whose sign of life was last seen at `versionstamp`:
 * claimed as a consumer taking it over would, and kept alive with checked writes, so that a consumer
 * that comes meanwhile sees the run alive. Each message goes back to KV's queue in a commit checked
 * against the claim: one that took the run over stops this at once.
 */
async function requeueRun(
  kv: Deno.Kv,
  queue: string,
  run: string,
  seqs: number[],
  versionstamp: string | null,
): Promise<number> {
  let requeued = 0;
  const key = signOfLifeKey(queue, run);
  let claim = await claimSignOfLife(kv, queue, run, versionstamp);
  let claimedAt = performance.now();
  for (const seq of seqs) {
    if (!claim.ok) return requeued;
    if (performance.now() - claimedAt >= PARK_HEARTBEAT_MS) {
      claimedAt = performance.now();
      claim = await claimSignOfLife(kv, queue, run, claim.versionstamp);
      if (!claim.ok) return requeued;
    }
    const held = { key, versionstamp: claim.versionstamp };
    const entryKey = parkedKey(queue, { run, seq });
    const [parked, handled] = await retryBusy(() => kv.getMany([entryKey, queueKey(queue, "handled", seq)]));
    const again = parked.versionstamp !== null && handled.versionstamp === null;
    const res = await retryBusy(() => {
      const op = kv.atomic().check(held, parked).delete(entryKey).delete(parkedSeqKey(queue, { run, seq }));
      if (again) {
        op.enqueue(repackMessage(parked.value), { keysIfUndelivered: [queueKey(queue, "dead", seq)] });
      }
      return op.commit();
    });
    if (res.ok && again) requeued++;
    else if (!res.ok && (await readSignOfLife(kv, queue, run)).versionstamp !== held.versionstamp) {
      return requeued;
    }
  }
  if (claim.ok) {
    const last = claim.versionstamp;
    await retryBusy(() => kv.atomic().check({ key, versionstamp: last }).delete(key).commit());
  }
  return requeued;
}
