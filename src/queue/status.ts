/**
 * {@link queueStatus}: a queue's checkpoint, counters, parked messages, dead letters, writer lock and
 * last run, as `jetfill status` shows them.
 *
 * @module
 */
import {
  counterValue,
  databaseFileOf,
  messagesInKvQueue,
  queueKey,
  readCheckpoint,
  recordsInKvQueue,
  refuseQueueName,
} from "./kv_queue.ts";
import { deadLettersOf } from "./dead_letters.ts";
import { fileIdentity, queueLockPath } from "./file_lock.ts";
import { parkedByRun } from "./parking.ts";
import { isoFromUs } from "../time.ts";
import { decodeQueueMessage } from "./message.ts";

/** A queue's state, as `jetfill status` shows it. */
export interface QueueStatus {
  /** The queue's name. */
  queue: string;
  /** Seq of the last message enqueued (0 when none). */
  lastSeq: number;
  /** `time_us` of the last record stored, or null when none was. */
  latestCursor: number | null;
  /** `latestCursor` as an ISO 8601 UTC time, or null. */
  latestCursorTime: string | null;
  /** When the checkpoint was last written, ISO 8601 UTC, or null. */
  checkpointUpdatedAt: string | null;
  /** Records ever stored in the queue (all runs). */
  recordsStored: number;
  /** Messages ever enqueued. */
  messagesEnqueued: number;
  /** Messages handled by consumers. */
  messagesHandled: number;
  /** Records in the handled messages. */
  recordsHandled: number;
  /** Messages still to be handled: in the KV queue, neither handled nor dead-lettered. */
  messagesWaiting: number;
  /** Records in the waiting messages. */
  recordsWaiting: number;
  /**
   * Of the waiting messages, those a consumer parked in KV keys (out of KV's queue: consume() takes
   * them in `seq` order with the rest, a plain `listenQueue` does not see them).
   */
  messagesParked: number;
  /** Dead letters not handled after all (see {@link deadLetters}). */
  deadLetters: number;
  /** Records in those dead letters. */
  deadRecords: number;
  /** Messages not handled, dead letters included: what `queueLength()` and a sync's `queueLength` report. */
  queueLength: number;
  /** Records stored per UTC day of their `time_us`, all runs together. */
  recordsPerDay: Record<string, number>;
  /**
   * Whether the queue's counters stood still while the figures above were read, so that they are of
   * one moment and add up (stored = handled + waiting + dead letters, unless a plain `listenQueue`
   * took some). False when a sync or a consumer committed all through four readings: each figure is
   * then true of a moment of the reading, perhaps not the same one.
   */
  steady: boolean;
  /**
   * The sync that holds the queue's writer lock, or null when none does (a sync gives it back when
   * it stops). A running sync shows it is alive by its commits, or every 0.5 s while quiet: a
   * `lastSeen` more than 10 s old is a sync that crashed, which the next one takes the lock over from
   * (one seen less long ago is watched for 2 s first).
   */
  writer: {
    /** Random id of its run. */
    run: string;
    /**
     * Whether that sync holds the queue's lock file too (it was given a database path): while a
     * process holds the lock file, it is running, however long ago it was last seen. False when the
     * lock file there now is another than the one it took (that one was deleted or replaced since).
     */
    lockFile: boolean;
    /** When it took the lock, ISO 8601 UTC. */
    since: string;
    /** Its last commit or heartbeat, ISO 8601 UTC. */
    lastSeen: string;
  } | null;
  /**
   * The run `--resume` continues, named by the checkpoint, or null when there is none: the last run
   * to take the queue, unless one after it put the checkpoint back (it never got a connection, or
   * its server refused it), in which case it is not {@link lastRun}.
   */
  resumeRun: {
    /** Random id of the run. */
    id: string;
    /** Records it stored (with its resumptions). */
    recordsStored: number;
    /** The options that select its events, as the checkpoint keeps them. */
    selection: Record<string, unknown>;
  } | null;
  /** The last sync run, as it recorded itself when it finished, or null. */
  lastRun: {
    /** Random id of the run. */
    id: string;
    /** When it finished, ISO 8601 UTC. */
    finishedAt: string;
    /** The options it ran with. */
    options: Record<string, unknown>;
    /** Its statistics, as `jetfill sync --json` printed them. */
    stats: Record<string, unknown>;
  } | null;
}

/**
 * Of the parked seqs, those not handled yet. A parked copy of a handled message is left behind when
 * a consumer is killed after parking a message whose acknowledgement KV never got: KV delivers it
 * again and another consumer handles it, and the copy is deleted once a consumer takes the killed
 * one's run over.
 */
async function stillWaiting(kv: Deno.Kv, queue: string, seqs: Set<number>): Promise<Set<number>> {
  const all = [...seqs];
  for (let i = 0; i < all.length; i += 10) {
    const chunk = all.slice(i, i + 10);
    const marks = await kv.getMany(chunk.map((seq) => queueKey(queue, "handled", seq)));
    marks.forEach((m, j) => {
      if (m.versionstamp !== null) seqs.delete(chunk[j]);
    });
  }
  return seqs;
}

/** Of the messages a consumer parked, those not handled yet: their seqs. */
export async function parkedWaiting(kv: Deno.Kv, queue: string): Promise<Set<number>> {
  return await stillWaiting(kv, queue, new Set([...(await parkedByRun(kv, queue)).values()].flat()));
}

/** The records in the parked messages whose seqs are in `waiting`. */
async function parkedRecords(kv: Deno.Kv, queue: string, waiting: Set<number>): Promise<number> {
  if (waiting.size === 0) return 0;
  let records = 0;
  for await (const entry of kv.list({ prefix: queueKey(queue, "parked") })) {
    if (!waiting.has(entry.key[entry.key.length - 1] as number)) continue;
    try {
      records += decodeQueueMessage(entry.value).length;
    } catch {
      // Not a message this version can read: no records counted.
    }
  }
  return records;
}

/**
 * Messages of a queue not handled yet, dead letters included. By the queue's counters, enqueued minus
 * handled by `consume()`; but for a database opened by path (as `runBackfillSync()`, `consume()` and
 * the CLI open theirs), Deno KV's queue is counted in its file too, with the parked messages and the
 * dead letters, and the smaller figure is the answer: messages a plain `listenQueue` took (which
 * keeps no counters) do not count. For a `Deno.Kv` opened elsewhere, whose file is not known, the
 * counters alone. A queue name that breaks `queueName`'s rule, or that the database has never held
 * when it holds other queues (a mistyped name), is refused with a `UsageError`, as is a database that
 * holds no jetfill queue but another program's data.
 *
 * @example
 * ```ts
 * import { queueLength } from "@jetfill/jetfill";
 * const kv = await Deno.openKv(":memory:");
 * await queueLength(kv, "jetstream_sync"); // 0
 * kv.close();
 * ```
 */
export async function queueLength(kv: Deno.Kv, queue: string): Promise<number> {
  await refuseQueueName(kv, queue, "count the messages waiting");
  return await waitingIn(kv, queue);
}

/** {@link queueLength} of a queue known to be there (a sync's own, at its end). */
export async function waitingIn(kv: Deno.Kv, queue: string): Promise<number> {
  const { value } = await withSteadyCounters(kv, queue, ([enqueued, , handled]) =>
    smallerFigure(
      kv,
      queue,
      Math.max(0, enqueued - handled),
      async () => (await deadLettersOf(kv, queue)).filter((l) => !l.handled).length,
      async () => (await parkedWaiting(kv, queue)).size,
    ));
  return value;
}

/** The queue's counters: messages and records enqueued, messages and records handled. */
async function readCounters(kv: Deno.Kv, queue: string): Promise<number[]> {
  const counts = await kv.getMany([
    queueKey(queue, "count", "messages"),
    queueKey(queue, "count", "records"),
    queueKey(queue, "count", "messagesHandled"),
    queueKey(queue, "count", "recordsHandled"),
  ]);
  return counts.map(counterValue);
}

/**
 * What `read` makes of the queue's counters and of what it reads after them, read again until the
 * counters are the same after it as before (four times at most, under a steady stream of commits;
 * `steady` says whether they were). A consumer's commit in between (a parked message handled: its
 * key deleted and the handled counter raised at once) would otherwise leave a message in neither
 * figure, and a sync's in both.
 */
async function withSteadyCounters<T>(
  kv: Deno.Kv,
  queue: string,
  read: (counters: number[]) => Promise<T>,
): Promise<{ value: T; steady: boolean }> {
  let counters = await readCounters(kv, queue);
  for (let attempt = 1;; attempt++) {
    const value = await read(counters);
    const after = await readCounters(kv, queue);
    const steady = after.every((n, i) => n === counters[i]);
    if (steady || attempt === 4) return { value, steady };
    counters = after;
  }
}

/**
 * The rule of {@link queueLength}: the messages waiting by the counters (`byCounters`, dead letters
 * included), unless Deno KV's queue in the database file, with the dead letters and the parked
 * messages not handled yet, holds fewer. Those two are asked for only when needed (a sync calls this
 * at its end).
 */
async function smallerFigure(
  kv: Deno.Kv,
  queue: string,
  byCounters: number,
  dead: () => Promise<number>,
  parked: () => Promise<number>,
): Promise<number> {
  // A plain listenQueue can only make Deno KV's figure the smaller one: the counters stand unless it
  // is (a message being parked is for a moment both in KV's queue and parked).
  const inKv = byCounters === 0 ? undefined : await messagesInKvQueue(kv, queue);
  if (inKv === undefined || inKv >= byCounters) return byCounters;
  const deadCount = await dead();
  if (inKv + deadCount >= byCounters) return byCounters;
  return Math.min(byCounters, inKv + deadCount + await parked());
}

/**
 * Reads a queue's checkpoint, counters, per-day counts, dead letters and last run. Reading takes
 * a consistent view of each part, not of all of them together: the checkpoint, the counters, the
 * per-day counts, the dead letters, the parked messages and Deno KV's queue are read again when the
 * counters moved meanwhile (up to four times), so that stored, handled and waiting add up
 * (`steady` says whether they could be read so); the writer lock and the last run, read after
 * them while a sync or a consumer runs, may be a commit apart. A queue name that breaks
 * `queueName`'s rule, or that the database has never held when it holds other queues (a mistyped
 * name), is refused with a `UsageError`.
 *
 * @example
 * ```ts
 * import { queueStatus } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * const s = await queueStatus(kv, "jetstream_sync");
 * console.log(`${s.messagesWaiting} messages (${s.recordsWaiting} records) waiting, ${s.deadLetters} dead`);
 * kv.close();
 * ```
 */
export async function queueStatus(kv: Deno.Kv, queue: string): Promise<QueueStatus> {
  await refuseQueueName(kv, queue, "read the status");
  const {
    value: {
      checkpoint,
      recordsPerDay,
      counters: [messagesEnqueued, recordsEnqueued, messagesHandled, recordsHandled],
      dead,
      deadRecords,
      parked,
      length,
      recordsWaiting,
    },
    steady,
  } = await withSteadyCounters(kv, queue, async (counters) => {
    // (A sync commits its checkpoint with the counters: read between two equal readings of them, it
    // is of the same moment.)
    const checkpoint = (await readCheckpoint(kv, queue)).value;
    // (Counted in the same commits as well.)
    const recordsPerDay: Record<string, number> = {};
    for await (const entry of kv.list({ prefix: queueKey(queue, "day") })) {
      const day = entry.key[entry.key.length - 1];
      if (typeof day === "string") recordsPerDay[day] = counterValue(entry);
    }
    const dead = (await deadLettersOf(kv, queue)).filter((l) => !l.handled);
    // Read after Deno KV's queue: a message parked in between is then counted twice, not missed.
    let parked: Set<number> | undefined;
    const waitingParked = async () => (parked = await parkedWaiting(kv, queue)).size;
    // What the counters say waits, or, for a database opened by path, what Deno KV's queue holds
    // when that is less (see queueLength()).
    const byCounters = Math.max(0, counters[0] - counters[2]);
    const length = await smallerFigure(
      kv,
      queue,
      byCounters,
      () => Promise.resolve(dead.length),
      waitingParked,
    );
    parked ??= await parkedWaiting(kv, queue);
    const deadRecords = dead.reduce((n, l) => n + l.records, 0);
    let recordsWaiting = Math.max(0, counters[1] - counters[3] - deadRecords);
    if (length < byCounters) {
      // Taken by a plain listener: the records are counted in the messages themselves, those in KV's
      // queue and those parked.
      const inMessages = await recordsInKvQueue(kv, queue);
      if (inMessages !== undefined) {
        recordsWaiting = Math.min(recordsWaiting, inMessages + await parkedRecords(kv, queue, parked));
      }
    }
    return { checkpoint, recordsPerDay, counters, dead, deadRecords, parked, length, recordsWaiting };
  });
  const messagesWaiting = Math.max(0, length - dead.length);
  const run = (await kv.get<{
    id: string;
    finishedAt: number;
    options: Record<string, unknown>;
    stats: Record<string, unknown>;
  }>(queueKey(queue, "run"))).value;
  const latest = checkpoint && checkpoint.recordsStored > 0 ? checkpoint.cursor : null;
  const [lock, alive] = await kv.getMany<
    [{ run?: string; at?: number; lockFile?: boolean; lockFileId?: string }, { at?: number }]
  >([
    queueKey(queue, "writer"),
    queueKey(queue, "alive"),
  ]);
  let writer: QueueStatus["writer"] = null;
  if (lock.value && typeof lock.value.at === "number") {
    const at = lock.value.at;
    // Commits of the lock's run count as signs of life too.
    const committed = checkpoint && checkpoint.run.id === lock.value.run ? checkpoint.updatedAt : at;
    let lockFile = lock.value.lockFile === true;
    const file = databaseFileOf(kv);
    if (lockFile && lock.value.lockFileId !== undefined && file !== undefined) {
      const now = await queueLockPath(file, queue).then(fileIdentity, () => undefined);
      lockFile = now === lock.value.lockFileId;
    }
    writer = {
      run: String(lock.value.run),
      lockFile,
      since: new Date(at).toISOString(),
      lastSeen: new Date(Math.max(at, committed, alive.value?.at ?? at)).toISOString(),
    };
  }
  return {
    queue,
    lastSeq: checkpoint?.seq ?? 0,
    latestCursor: latest,
    latestCursorTime: latest === null ? null : isoFromUs(latest),
    checkpointUpdatedAt: checkpoint ? new Date(checkpoint.updatedAt).toISOString() : null,
    recordsStored: checkpoint?.recordsStored ?? recordsEnqueued,
    messagesEnqueued,
    messagesHandled,
    recordsHandled,
    messagesWaiting,
    recordsWaiting,
    messagesParked: parked.size,
    deadLetters: dead.length,
    deadRecords,
    queueLength: length,
    recordsPerDay,
    steady,
    writer,
    resumeRun: checkpoint
      ? {
        id: checkpoint.run.id,
        recordsStored: checkpoint.run.recordsStored,
        selection: checkpoint.run.selection,
      }
      : null,
    lastRun: run
      ? {
        id: run.id,
        finishedAt: new Date(run.finishedAt).toISOString(),
        options: run.options,
        stats: run.stats,
      }
      : null,
  };
}
