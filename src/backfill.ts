/**
 * `runBackfillSync()`: connects to Jetstream, keeps the events the options select, stores them in
 * batches in a Deno KV queue and returns honest statistics.
 *
 * The pipeline is pulled end to end: socket frames → decode → filter → batch → atomic commit
 * (`source.ts` holds the connection loop, `pipeline/process.ts` the per-frame path). A slow commit
 * slows the reader, so memory stays bounded.
 *
 * @module
 */
import { delay, longTimeout, MAX_TIMER_MS } from "./async.ts";
import { UsageError } from "./errors.ts";
import { sha256Hex } from "./bytes.ts";
import {
  DICTIONARY_OPTION,
  type DictionarySearch,
  LEGACY_DICTIONARY_SHA256,
  noDictionaryError,
  resolveZstdDictionary,
  searchFindings,
  searchZstdDictionary,
} from "./jetstream/dictionary.ts";
import { isV2Url, V2_HOSTS } from "./jetstream/v2.ts";
import { didsNeedHello, URL_DID_CHARS, URL_DID_LIMIT } from "./jetstream/url.ts";
import { permissionHost } from "./jetstream/proxy.ts";
import { printable } from "./jetstream/utf8.ts";
import { COMMIT_OPERATIONS, type CommitOperation } from "./jetstream/events.ts";
import { createZstdDecoder, LEGACY_DICTIONARY_ID, V2_DICTIONARY_ID } from "./jetstream/zstd.ts";
import {
  type BackfillSyncOptions,
  DEFAULT_MAX_EVENT_BYTES,
  isBareInstance,
  type ResolvedSyncOptions,
  resolveSyncOptions,
} from "./options.ts";
import { Batcher } from "./pipeline/batch.ts";
import { type RunContext, stopWith, userAbort } from "./pipeline/context.ts";
import { ReplayGuard } from "./pipeline/filter.ts";
import {
  type Checkpoint,
  defaultKvPath,
  emptyCheckpoint,
  ensureOpenKv,
  listKeyEntries,
  localDatabasePath,
  openKvAt,
  queueKey,
  queuesIn,
  readCheckpoint,
  recentKeysOf,
  requireWritable,
  retryWhileBusy,
  type RunState,
  storingRun,
} from "./queue/kv_queue.ts";
import { waitingIn } from "./queue/status.ts";
import { lockQueueFile, type QueueFileLock, queueLockPath } from "./queue/file_lock.ts";
import { ConcurrentWriterError, QueueWriter } from "./queue/writer.ts";
import { consumeStream } from "./source.ts";
import { StatsTracker, type SyncErrorReport, type SyncStats } from "./stats.ts";
import { isoFromUs } from "./time.ts";
import { pathExists } from "./fs.ts";
import { resolve } from "node:path";

const PROGRESS_INTERVAL_MS = 250;

/** Up to this many DIDs are kept in the checkpoint itself; more go under their own keys. */
const INLINE_DIDS = 100;
/** DIDs per KV value when a long list is stored apart (well under 64 KiB). */
const DIDS_PER_KEY = 1000;

/**
 * The options that decide which events a run stores; a resumed run must have the same. A long DID
 * list is represented by its count and hash: the checkpoint is rewritten on every commit and a KV
 * value holds 64 KiB at most (the list itself is stored once, by {@link storeDidList}).
 */
export function selectionOf(o: ResolvedSyncOptions): Record<string, unknown> {
  const dids = [...o.wantedDids].sort();
  let wantedDids: unknown = dids;
  if (dids.length > INLINE_DIDS) {
    wantedDids = { count: dids.length, sha256: sha256Hex(dids.join("\n")) };
  }
  return {
    wantedDids,
    wantedCollections: [...o.wantedCollections].sort(),
    kinds: [...o.kinds].sort(),
    // Only when some are left out, so that runs recorded before the option compare equal.
    ...(o.operations.length === COMMIT_OPERATIONS.length
      ? {}
      : { operations: sortedOperations(o.operations) }),
    startUs: o.startUs ?? null,
    endUs: o.endUs ?? null,
    numRecords: o.numRecords,
    // Which events are stored too; only when set, so that runs recorded before it compare equal.
    ...(o.maxEventBytes === DEFAULT_MAX_EVENT_BYTES ? {} : { maxEventBytes: o.maxEventBytes }),
  };
}

/** Operations in the order Jetstream documents them. */
function sortedOperations(ops: readonly CommitOperation[]): CommitOperation[] {
  return COMMIT_OPERATIONS.filter((op) => ops.includes(op));
}

/** The hash that a selection gives a long DID list (see {@link selectionOf}), or undefined. */
function listHash(wantedDids: unknown): string | undefined {
  const sha256 = (wantedDids as { sha256?: unknown } | null)?.sha256;
  return typeof sha256 === "string" ? sha256 : undefined;
}

/**
 * Stores a long DID list under `["jetfill", queue, "dids", sha256, i]`, so that `--resume` can reuse
 * it; a list already there (a resumed run's) is left as it is. Written before the run takes the
 * queue, whose checkpoint may then name it at once: under its own hash, it replaces nothing another
 * run needs.
 */
async function storeDidList(
  kv: Deno.Kv,
  queue: string,
  dids: readonly string[],
  sha256: string,
): Promise<void> {
  const sorted = [...dids].sort();
  const parts = Math.ceil(sorted.length / DIDS_PER_KEY);
  const there = await Array.fromAsync(kv.list({ prefix: queueKey(queue, "dids", sha256) }));
  if (there.length === parts) return;
  for (let i = 0; i < parts; i += 10) {
    const op = kv.atomic();
    for (let j = i; j < Math.min(parts, i + 10); j++) {
      op.set(queueKey(queue, "dids", sha256, j), sorted.slice(j * DIDS_PER_KEY, (j + 1) * DIDS_PER_KEY));
    }
    await commitWhileBusy(op);
  }
}

/**
 * Deletes the DID lists of runs other than `keep` (this run's, and the one the checkpoint it found
 * names: this run may yet be refused, or stop before its first commit, and leave that checkpoint in
 * place). Lists stored before they were kept by hash are under `["dids", i]`: theirs is worked out.
 * Only while the queue's lock is held.
 */
async function pruneDidLists(kv: Deno.Kv, queue: string, keep: (string | undefined)[]): Promise<void> {
  const stored = await Array.fromAsync(kv.list<string[]>({ prefix: queueKey(queue, "dids") }));
  const unhashed = stored.filter((e) => typeof e.key[3] === "number");
  const unhashedHash = unhashed.length > 0
    ? sha256Hex(unhashed.flatMap((e) => e.value).sort().join("\n"))
    : undefined;
  const gone = stored.filter((e) =>
    !keep.includes(typeof e.key[3] === "number" ? unhashedHash : String(e.key[3]))
  );
  for (let i = 0; i < gone.length; i += 100) {
    const op = kv.atomic();
    for (const e of gone.slice(i, i + 100)) op.delete(e.key);
    await commitWhileBusy(op);
  }
}

/** Commits `op`, again while SQLite reports the database busy (it then wrote nothing). */
function commitWhileBusy(op: Deno.AtomicOperation): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
  return retryWhileBusy(() => op.commit(), 5000);
}

/** The DID list of a run's selection, whether inline or stored apart. */
async function loadDidList(kv: Deno.Kv, queue: string, value: unknown): Promise<string[] | undefined> {
  if (Array.isArray(value)) return value as string[];
  const sha256 = listHash(value);
  if (sha256 === undefined) return undefined;
  const parts = await Array.fromAsync(kv.list<string[]>({ prefix: queueKey(queue, "dids", sha256) }));
  if (parts.length > 0) return parts.flatMap((p) => p.value);
  // Stored before lists were kept by hash.
  const unhashed = await Array.fromAsync(kv.list<string[]>({ prefix: queueKey(queue, "dids") }));
  return unhashed.filter((p) => typeof p.key[3] === "number").flatMap((p) => p.value);
}

/** The option a selection key comes from, as the user wrote it. */
function optionName(key: string): string {
  return key === "startUs" ? "startTimestamp" : key === "endUs" ? "endTimestamp" : key;
}

/** A selection value for people: times as UTC ISO-8601, none as "none". */
function showSelected(key: string, value: unknown): string {
  // Left out of a selection when it is the default (see selectionOf).
  if (key === "maxEventBytes" && value === undefined) return `${DEFAULT_MAX_EVENT_BYTES} (the default)`;
  if (key === "operations" && value === undefined) return `${JSON.stringify(COMMIT_OPERATIONS)} (all)`;
  if (value === null || value === undefined) return "none";
  // No DIDs or collections named: all of them (`["*"]` is recorded so too).
  if (Array.isArray(value) && value.length === 0 && key.startsWith("wanted")) return "[] (all)";
  if ((key === "startUs" || key === "endUs") && typeof value === "number") return isoFromUs(value);
  return JSON.stringify(value);
}

function differences(a: Record<string, unknown>, b: Record<string, unknown>): string[] {
  const names = new Set([...Object.keys(a), ...Object.keys(b)]);
  return [...names].filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k]));
}

/**
 * Copies the events that `options` select from Jetstream into a Deno KV queue and resolves to the
 * run's statistics. Bad options (and, before anything is stored, a connection or a database that Deno's
 * permissions deny, or a server's 4xx refusal but 429 or its redirect) are rejected with a
 * {@link UsageError}, and a second sync into the same
 * database and queue with a {@link ConcurrentWriterError}; a failure once under way (a server that cannot
 * be reached, a database that refuses a commit) is in the statistics instead, with `stopReason`
 * `"error"` and the `error` message. A `kv` given as a `Deno.Kv` is left open for the caller; one
 * given as a path is opened and closed by the run.
 *
 * @example
 * ```ts
 * import { runBackfillSync } from "@jetfill/jetfill";
 * // The posts and likes of an hour that ended an hour ago (Jetstream keeps a day or so of history).
 * const hourUs = 3_600_000_000;
 * const nowUs = Date.now() * 1000;
 * const stats = await runBackfillSync({
 *   wantedCollections: ["app.bsky.feed.post", "app.bsky.feed.like"],
 *   startTimestamp: nowUs - 2 * hourUs,
 *   endTimestamp: nowUs - hourUs,
 *   numRecords: 5000,
 * });
 * console.log(`stored ${stats.recordsStored} records, stopped by ${stats.stopReason}`);
 * ```
 */
export async function runBackfillSync(options: BackfillSyncOptions = {}): Promise<SyncStats> {
  let o = resolveSyncOptions(options);
  const resuming = o.resume;
  // (On a resume, compression and instances may be the last run's: checked once the options are merged.)
  if (!resuming) {
    checkDictionaryUse(options, o);
    checkNetAccess(o.instances);
  }
  const callbacks = new Callbacks();
  options = callbacks.guard(options);
  const started = performance.now();
  const path = typeof o.kv === "object" ? undefined : o.kv ?? defaultKvPath(o.queueName);
  if (o.resume && path !== undefined) {
    // Nothing to resume: say so before a database (and its folder) is made.
    const file = localDatabasePath(path);
    if (file !== undefined && !(await pathExists(file))) {
      throw new UsageError(
        `Cannot resume queue '${o.queueName}': the database ${
          JSON.stringify(path)
        } does not exist (check --kv / kv)`,
      );
    }
  }
  // The legacy dictionary is only needed for /subscribe connections; v2 hosts serve their own. A new
  // run's is found before the database is opened (or made): a bad one is bad input. A resume's
  // settings are in its queue.
  const needsDecoder = (o: ResolvedSyncOptions) => o.compress && o.instances.some((u) => !isV2Url(u));
  let decodeFrame = !o.resume && needsDecoder(o) ? await loadNewRunDecoder(options, o) : undefined;
  // On v2 hosts alone, a dictionary given is the one used when a host has none to give: a bad one is
  // bad input all the same, found now rather than once a host is asked.
  if (!o.resume && o.compress && !needsDecoder(o) && options.zstdDictionary !== undefined) {
    await resolveZstdDictionary({ dictionary: options.zstdDictionary });
  }
  if (path !== undefined) await requireWritable(path, "Cannot sync", "a sync stores its records in it");
  const kv = path === undefined ? await ensureOpenKv(o.kv as Deno.Kv, "sync") : await openKvAt(path);
  let fileLock: QueueFileLock | undefined;
  // The dictionary file the resumed run used, when it is not there any more.
  let lostDictionary: string | undefined;
  // The dictionary file the resumed run used, taken again (none was given this time).
  let rememberedDictionary: string | undefined;
  try {
    // (undefined: no resume, or one that finds no checkpoint.)
    const previous = o.resume ? (await readCheckpoint(kv, o.queueName)).value?.run : undefined;
    if (o.resume && !previous) {
      // A run killed in its first moments, before it took the queue, leaves a database without a
      // checkpoint, and so nothing stored: given the run's options again, the resume starts that
      // run. Without them (or where the database holds other queues: a mistyped name?), there
      // is nothing to go on.
      const given = RUN_OPTIONS.some((k) => options[k] !== undefined);
      if (!given || (await queuesIn(kv)).some((q) => q !== o.queueName)) {
        throw await nothingToResume(kv, o.queueName);
      }
      options.onError?.({
        reason: "queue",
        message:
          `queue '${o.queueName}' has no checkpoint yet (a run stopped before it began leaves none, and nothing stored): nothing to resume, so this run starts it with the options given`,
      });
      options = { ...options, resume: false };
      o = resolveSyncOptions(options);
      if (needsDecoder(o)) decodeFrame = await loadNewRunDecoder(options, o);
      else if (o.compress && options.zstdDictionary !== undefined) {
        await resolveZstdDictionary({ dictionary: options.zstdDictionary });
      }
    }
    if (previous) {
      // Options left out on resume are the checkpoint's: `--resume` alone continues the same run.
      const dids = await loadDidList(kv, o.queueName, previous.selection.wantedDids);
      // A dictionary file that has gone since is looked for as usual (environment, cache, download).
      const dictionary = previous.settings?.zstdDictionary;
      const keepDictionary = dictionary !== undefined && await pathExists(dictionary);
      if (dictionary !== undefined && !keepDictionary) lostDictionary = dictionary;
      if (keepDictionary && options.zstdDictionary === undefined) rememberedDictionary = dictionary;
      options = inheritOptions(options, previous, dids, keepDictionary ? dictionary : undefined);
      o = resolveSyncOptions(options);
      checkDictionaryUse(options, o);
    }
    if (resuming) checkNetAccess(o.instances);
    if (path !== undefined) {
      // Before anything is read: a sync that is running, even paused or kept from writing by a busy
      // consumer, holds it.
      const lock = await lockQueueFile(path, o.queueName);
      if (lock === "held") {
        const file = JSON.stringify(await queueLockPath(path, o.queueName));
        throw new ConcurrentWriterError(
          o.queueName,
          `is being written by another sync right now (a running process holds ${file}; lsof or fuser on that file shows which)`,
          true,
        );
      }
      if (lock && "reason" in lock) {
        options.onError?.({
          reason: "lock",
          message: `cannot use the lock file ${JSON.stringify(lock.path)} (${lock.reason}); ` +
            "only the writer lock in the database keeps another sync out of this queue, and a sync paused " +
            "for over 10 s or kept from writing by a busy consumer can be taken over",
        });
      } else {
        fileLock = lock;
      }
    }
    if (o.resume && needsDecoder(o)) {
      decodeFrame = await loadDecoder(options, o.maxTimeMs, lostDictionary, rememberedDictionary);
    }
    return await run(o, options, kv, started, decodeFrame, fileLock, callbacks);
  } finally {
    if (path !== undefined) kv.close();
    // After the writer lock is given back (in run()): the next sync finds the queue free.
    fileLock?.release();
  }
}

/**
 * The caller's callbacks (`onProgress`, `onDateChange`, `onError`), each guarded: one that throws
 * stops the run as an error that names it, after what was received is stored, and the statistics
 * are returned as for any other error.
 */
class Callbacks {
  /** What the first callback that threw said. */
  failure: string | undefined;
  /** Stops the run, once it has a context; a failure before that stops it as soon as it has one. */
  #stop: ((failure: string) => void) | undefined;

  /** `options` with its callbacks guarded. */
  guard(options: BackfillSyncOptions): BackfillSyncOptions {
    const fail = (name: string, err: unknown) => {
      this.failure ??= `${name} threw: ${err instanceof Error ? err.message : String(err)}`;
      this.#stop?.(this.failure);
    };
    const wrap = <A>(name: string, fn: ((arg: A) => void) | undefined) =>
      fn &&
      ((arg: A) => {
        try {
          // An async callback's rejection counts as its throw (unhandled, it would end the process).
          const returned: unknown = fn(arg);
          if (returned instanceof Promise) returned.catch((err) => fail(name, err));
        } catch (err) {
          fail(name, err);
        }
      });
    return {
      ...options,
      onProgress: wrap("onProgress", options.onProgress),
      onDateChange: wrap("onDateChange", options.onDateChange),
      onError: wrap("onError", options.onError),
    };
  }

  /** From now on a failure stops `ctx` (at once, when one came before). */
  attach(ctx: RunContext): void {
    this.#stop = (failure) => {
      ctx.error ??= failure;
      stopWith(ctx, "error");
    };
    if (this.failure !== undefined) this.#stop(this.failure);
  }
}

/** The refusal of a resume of a queue that has no checkpoint, naming the queues the database holds. */
/** The options that say which run a sync is: given with a resume that finds none, they start it. */
const RUN_OPTIONS = [
  "startTimestamp",
  "endTimestamp",
  "wantedDids",
  "wantedCollections",
  "kinds",
  "operations",
  "numRecords",
] as const;

async function nothingToResume(kv: Deno.Kv, queue: string): Promise<UsageError> {
  const others = (await queuesIn(kv)).filter((q) => q !== queue);
  return new UsageError(
    `Cannot resume queue '${queue}': it has no checkpoint yet${
      others.length > 0
        ? ` (this database holds ${others.map((q) => `'${q}'`).join(", ")}: see --queue-name / queueName)`
        : ""
    }; a first run of a queue is started without --resume / resume: true`,
  );
}

function inheritOptions(
  options: BackfillSyncOptions,
  run: RunState,
  dids: string[] | undefined,
  zstdDictionary: string | undefined,
): BackfillSyncOptions {
  const sel = run.selection as {
    wantedCollections?: string[];
    kinds?: BackfillSyncOptions["kinds"];
    operations?: BackfillSyncOptions["operations"];
    startUs?: number | null;
    endUs?: number | null;
    numRecords?: number;
    maxEventBytes?: number;
  };
  const compress = options.compress ?? run.settings?.compress;
  return {
    ...options,
    batchSize: options.batchSize ?? run.settings?.batchSize,
    compress,
    // The remembered file, unless this resume is not compressed.
    zstdDictionary: options.zstdDictionary ?? (compress ? zstdDictionary : undefined),
    maxEventBytes: options.maxEventBytes ?? sel.maxEventBytes,
    wantedDids: options.wantedDids ?? dids,
    wantedCollections: options.wantedCollections ?? sel.wantedCollections,
    kinds: options.kinds ?? sel.kinds,
    operations: options.operations ?? sel.operations,
    startTimestamp: options.startTimestamp ?? sel.startUs ?? undefined,
    endTimestamp: options.endTimestamp ?? sel.endUs ?? undefined,
    numRecords: options.numRecords ?? sel.numRecords,
    instance: options.instance ?? run.instances,
    wire: options.wire ??
      (options.instance === undefined ? undefined : wireForBareInstances(options.instance, run)),
  };
}

/**
 * The wire of the resumed run, for instances given now without a path (a host name, or a URL of
 * just a host), which would otherwise get the wire their host has by default: a resume on another
 * v2 server named by its address alone stays on the v2 wire, as `wire` was left out. Undefined when
 * an instance names its path (and so its wire), or the run used both wires.
 */
function wireForBareInstances(instance: string | readonly string[], run: RunState): "v1" | "v2" | undefined {
  const given = typeof instance === "string" ? [instance] : instance;
  const bare = given.every(isBareInstance);
  const previous = run.instances ?? [run.instance];
  if (!bare || previous.length === 0) return undefined;
  const v2 = previous.map(isV2Url);
  return v2.every((b) => b) ? "v2" : v2.some((b) => b) ? undefined : "v1";
}

/** How long a sync watches a queue whose lock is taken, for a sign of life of the sync holding it. */
const LIVE_WRITER_MS = 2000;
/** A lock whose last recorded sign of life is older than this is a crashed sync's: not watched. */
const RECENT_WRITER_MS = 10_000;

/**
 * The queue's checkpoint, with the versionstamps of the writer lock and of the `alive` key as seen
 * (null when absent), once it is clear that no other sync is writing it. A sync holds the lock from
 * its start until it stops, and shows that it is alive by committing or, when quiet, by a heartbeat
 * every 0.5 s (`WRITER_HEARTBEAT_MS`). With the lock taken and a sign of life recorded in the last
 * {@link RECENT_WRITER_MS}, the checkpoint, the lock and `alive` are watched for
 * {@link LIVE_WRITER_MS}, and the sync is refused if any of them moves. (A heartbeat may take a
 * while to land beside a busy consumer, and it records when it started: a whole watch, not one
 * reckoned from that time, gives it its chance.) A crashed sync costs the next one that wait. The
 * lock is then taken with a check that the lock and `alive` are still as seen, so that a sync that
 * shows itself alive only then, or another sync starting at the same time, makes the taking fail.
 * When this sync holds the queue's lock file (`fileLock`) and the lock's holder said it held that
 * same file too, that holder has stopped: no watch. (A lock file deleted, or replaced, while a sync
 * held it is another file, which the new sync's lock says nothing about.)
 */
async function watchForLiveWriter(
  kv: Deno.Kv,
  queue: string,
  fileLock: QueueFileLock | undefined,
  existing: Deno.KvEntryMaybe<Checkpoint>,
): Promise<{ existing: Deno.KvEntryMaybe<Checkpoint>; lock: string | null; alive: string | null }> {
  const keys = [queueKey(queue, "writer"), queueKey(queue, "alive")] as const;
  const [lock, alive] = await kv.getMany<[{ at?: number; lockFile?: boolean; lockFileId?: string }, {
    at?: number;
  }]>(keys);
  const seen = { existing, lock: lock.versionstamp, alive: alive.versionstamp };
  if (lock.versionstamp === null) return seen;
  // Its holder held the queue's lock file, which this sync holds now: it is not running. (A holder
  // from before lock files had identities said only that it held one.)
  const heldId = lock.value?.lockFileId;
  if (fileLock && lock.value?.lockFile === true && (heldId === undefined || heldId === fileLock.id)) {
    return seen;
  }
  const last = Math.max(
    existing.value?.updatedAt ?? -Infinity,
    alive.value?.at ?? -Infinity,
    lock.value?.at ?? -Infinity,
  );
  // (A clock set back since that write makes the age negative: such a lock is watched too.)
  if (!(Date.now() - last < RECENT_WRITER_MS)) return seen;
  await delay(LIVE_WRITER_MS);
  const again = await readCheckpoint(kv, queue);
  const [lockAgain, aliveAgain] = await kv.getMany(keys);
  if (
    again.versionstamp !== existing.versionstamp || aliveAgain.versionstamp !== alive.versionstamp ||
    lockAgain.versionstamp !== lock.versionstamp
  ) {
    throw new ConcurrentWriterError(queue, "is being written by another sync right now", true);
  }
  return { ...seen, existing: again };
}

async function run(
  o: ResolvedSyncOptions,
  options: BackfillSyncOptions,
  kv: Deno.Kv,
  started: number,
  decodeFrame: ((bytes: Uint8Array) => Uint8Array) | undefined,
  fileLock: QueueFileLock | undefined,
  callbacks: Callbacks,
): Promise<SyncStats> {
  const selection = selectionOf(o);
  const { existing, lock, alive } = await watchForLiveWriter(
    kv,
    o.queueName,
    fileLock,
    await readCheckpoint(kv, o.queueName),
  );
  let resumeFrom: Checkpoint | undefined;
  let newRunNote: SyncErrorReport | undefined;
  // The last run that stored records: the checkpoint's own, or the one before a run that stored none.
  const storing = storingRun(existing.value);
  if (o.resume) {
    if (!existing.value) throw await nothingToResume(kv, o.queueName);
    const diff = differences(existing.value.run.selection, selection);
    if (diff.length > 0 && !o.force) {
      throw new UsageError(
        `Cannot resume queue '${o.queueName}' with different options: ${
          diff.map((k) =>
            `${optionName(k)} was ${showSelected(k, existing.value!.run.selection[k])}, now ${
              showSelected(k, selection[k])
            }`
          ).join("; ")
        } (pass --force / force: true to resume anyway)`,
      );
    }
    resumeFrom = existing.value;
  } else if (
    existing.value && storing !== undefined && o.startUs !== undefined && !o.force &&
    differences(storing.selection, selection).length === 0
  ) {
    // The same command again, after a Ctrl-C or a crash most likely: from the same start it would
    // store the same events a second time.
    const last = isoFromUs(existing.value.cursor);
    throw new UsageError(
      `Cannot sync into queue '${o.queueName}': it already holds ${storing.recordsStored} record${
        storing.recordsStored === 1 ? "" : "s"
      } of a run with these same options (the last from ${last}), and this run would store them again. ${
        storing === existing.value.run
          ? "Continue that run with --resume / resume: true, or pass --force / force: true to store them a second time"
          : `A later run, which stored nothing, took the queue since, so --resume / resume: true would continue that one, not this: pass --force / force: true to store them a second time, or a start after ${last} (--start / startTimestamp) to go on from there`
      }`,
    );
  } else if (existing.value && existing.value.recordsStored > 0) {
    // Easy to do by mistake: the same run again stores the same events again. Said as this run stores
    // its first records after them (below): a run refused by its server, or one that stores nothing,
    // adds nothing.
    newRunNote = {
      reason: "queue",
      message: `queue '${o.queueName}' already holds ${existing.value.recordsStored} record${
        existing.value.recordsStored === 1 ? "" : "s"
      } (the last from ${isoFromUs(existing.value.cursor)}); this run adds its own after them, as a new run${
        storing === existing.value.run
          ? ": to continue the run that stored them instead, use --resume / resume: true (with --force / force: true to give it another limit or end)"
          : ""
      }`,
    };
  }
  // A dictionary given as a path is remembered, so that `--resume` alone finds it again.
  const dictionary = o.compress && typeof options.zstdDictionary === "string"
    ? resolve(options.zstdDictionary)
    : undefined;
  const settings = {
    batchSize: o.batchSize,
    compress: o.compress,
    ...(dictionary === undefined ? {} : { zstdDictionary: dictionary }),
  };
  const runState: RunState = resumeFrom
    ? { ...resumeFrom.run, selection, instances: o.instances, settings }
    : {
      id: crypto.randomUUID(),
      selection,
      recordsStored: 0,
      instance: o.instances[0],
      instances: o.instances,
      settings,
      ...(o.startUs === undefined ? { tailBeganUs: Date.now() * 1000 } : {}),
    };
  // A new run names the one before it that stored records, as it takes the queue (see claim()).
  const checkpoint: Checkpoint = !existing.value
    ? emptyCheckpoint(o.queueName, runState)
    : resumeFrom || storing === undefined
    ? { ...existing.value, run: runState }
    : { ...existing.value, run: runState, priorRun: storing };

  // Date changes go on from the day the resumed run stored last, not from its start's day again.
  const stats = new StatsTracker(
    resumeFrom && resumeFrom.run.recordsStored > 0 ? resumeFrom.run.maxUs ?? resumeFrom.cursor : o.startUs,
  );
  if (resumeFrom && resumeFrom.run.recordsStored > 0) stats.latestCursor = resumeFrom.cursor;
  const internal = new AbortController();

  let lastProgress = 0;
  const progress = (force: boolean) => {
    if (!options.onProgress) return;
    const now = performance.now();
    if (!force && now - lastProgress < PROGRESS_INTERVAL_MS) return;
    lastProgress = now;
    const elapsed = (now - started) / 1000;
    const cursor = stats.lastProcessedUs;
    options.onProgress({
      recordsStored: stats.recordsStored,
      messagesReceived: stats.messagesReceived,
      rate: elapsed > 0 ? stats.recordsStored / elapsed : 0,
      currentDate: stats.currentDate,
      cursor,
      elapsed,
      // The end reached: the whole window, whatever the time of the last event before it.
      percent: ctx.stop === "end" && o.endUs !== undefined
        ? 100
        : windowPercent(o.startUs ?? stats.firstProcessedUs, o.endUs, cursor),
      percentOfLimit: Math.min(100, ((ctx.writer.checkpoint.run.recordsStored) / o.numRecords) * 100),
    });
  };

  // The content keys of the last records stored, kept with them: a resume starts knowing them.
  const keyEntries = await listKeyEntries(kv, o.queueName);
  const writer = new QueueWriter(
    kv,
    o.queueName,
    {
      checkpoint,
      versionstamp: existing.versionstamp,
      lock,
      alive,
      lockFile: fileLock !== undefined,
      lockFileId: fileLock?.id,
      keyEntries,
    },
    (r) => {
      if (newRunNote !== undefined) {
        options.onError?.(newRunNote);
        newRunNote = undefined;
      }
      stats.committed(r.records, r.cursor, r.days, r.collections, r.messages);
      progress(false);
    },
  );
  writer.onLost = (err) => {
    ctx.error ??= err.message;
    stopWith(ctx, "error");
  };
  const ctx: RunContext = {
    o,
    stats,
    writer,
    batcher: new Batcher(o.queueName, o.batchSize),
    guard: new ReplayGuard(o.dedupeWindow),
    stop: undefined,
    error: undefined,
    accepted: runState.recordsStored,
    internal,
    sideProbes: new AbortController(),
    // Server text (close reasons, refusals, v2 #info messages) goes to a terminal: no controls.
    report: (r: SyncErrorReport) => options.onError?.({ ...r, message: printable(r.message) }),
    decodeFrame,
    resumedFilterChanged: resumeFrom !== undefined &&
      differences(resumeFrom.run.selection, selection).some((k) =>
        k === "wantedDids" || k === "wantedCollections" || k === "kinds"
      ),
    v2Uncompressed: new Set(),
    v2Dictionary: undefined,
    awaitStoredUntilUs: -1,
    sentWhileAwaiting: undefined,
    initialGapUs: 0,
    awaitDropsBelowUs: Number.NEGATIVE_INFINITY,
    awaitWarns: false,
    awaitDropped: 0,
    awaited: undefined,
    search: undefined,
    searchBack: false,
    searchLeftOut: 0,
    lastStoredB: 0,
    lastStoredA: 0,
    searchedUs: 0,
    gapOnTrial: undefined,
    acceptedAtGiveUp: 0,
    toldBackdated: false,
    probeAnswered: false,
    connected: false,
    drain: undefined,
    draining: false,
  };
  if ((!resumeFrom || resumeFrom.run.recordsStored === 0) && o.startUs === undefined && storing) {
    // A new live tail on a queue that holds records (or the resume of one that stored none): what
    // the last run stored last, come again in a reconnect's rewind (the few seconds before this tail
    // began, for the clocks' difference), is recognised by content, as within a run.
    const last = recentKeysOf(keyEntries, storing.id);
    if (last) ctx.guard.remember(last.keys);
  }
  callbacks.attach(ctx);
  // Only now that ctx is there: an abort while the lines above awaited is seen just below.
  const onUserAbort = () => userAbort(ctx);
  options.signal?.addEventListener("abort", onUserAbort, { once: true });
  const cancelTimer = longTimeout(
    () => stopWith(ctx, "max_time"),
    Math.max(0, o.maxTimeMs - (performance.now() - started)),
  );
  if (options.signal?.aborted) stopWith(ctx, "aborted");
  if (ctx.accepted >= o.numRecords) {
    // A resume of a run that was done: said, as a run that stores nothing would otherwise seem stuck.
    ctx.report({
      reason: "queue",
      message: `the run being resumed already stored ${ctx.accepted} record${
        ctx.accepted === 1 ? "" : "s"
      }, at or over the limit of ${o.numRecords}, so there is nothing more to store: to go on, give a larger --limit / numRecords with --force / force: true`,
    });
    stopWith(ctx, "limit");
  }
  for (const collection of ctx.stop ? [] : o.wantedCollections) {
    // Valid, but most likely a slip: records name their collection with a lowercase domain part
    // (atproto normalizes it) and a lowerCamelCase name, and Jetstream matches the filter exactly.
    const dot = collection.lastIndexOf(".");
    const name = collection.slice(dot + 1);
    const usual = collection.slice(0, dot).toLowerCase() + "." + name.charAt(0).toLowerCase() + name.slice(1);
    if (usual === collection) continue;
    ctx.report({
      reason: "coverage",
      message: `collection "${collection}" has capitals where NSIDs have none (a domain part in lowercase, ` +
        `a name in lowerCamelCase): Jetstream matches collections exactly, so it most likely matches nothing ` +
        `(did you mean "${usual}"?)`,
    });
  }
  const longUrl = didsNeedHello(o.wantedDids) ? o.instances.find(isV2Url) : undefined;
  if (longUrl !== undefined && !ctx.stop) {
    // The v2 wire has no options_update: the URL is its only channel (protocol doc §9, item 4).
    ctx.report({
      reason: "connection",
      message: `the ${o.wantedDids.length} DIDs go in the URL on the v2 wire (${
        new URL(longUrl).host
      }), which takes no options_update: a server or a proxy may refuse a URL this long (HTTP 414 or 431); --wire v1 / wire: "v1" sends them in a hello on /subscribe, which v2 hosts serve too`,
      instance: longUrl,
    });
  }

  // Errors before the stream starts, and refused subscriptions, are thrown, not reported.
  let refusal: { error: unknown } | undefined;
  let streaming = false;
  let ticker: ReturnType<typeof setInterval> | undefined;
  const sha256 = listHash(selection.wantedDids);
  // When the last new event was seen, to within QUIET_CHECK_MS: a run that ends by maxTime while
  // events still come has simply run out of time; one that had been quiet may never see its end.
  let lastSeenUs = stats.lastProcessedUs;
  let newAt = performance.now();
  const watch = setInterval(() => {
    if (stats.lastProcessedUs === lastSeenUs) return;
    lastSeenUs = stats.lastProcessedUs;
    newAt = performance.now();
  }, QUIET_CHECK_MS);
  try {
    if (sha256 !== undefined) await storeDidList(kv, o.queueName, o.wantedDids, sha256);
    // The lock is held from now on, so that a sync started beside this one is refused even while
    // this one is quiet.
    await writer.claim();
    await pruneDidLists(kv, o.queueName, [sha256, listHash(existing.value?.run.selection.wantedDids)]);
    streaming = true;
    // Between commits too (a quiet selection stores little): the events processed, the date.
    if (options.onProgress) ticker = setInterval(() => progress(false), PROGRESS_INTERVAL_MS);
    await consumeStream(
      ctx,
      options,
      resumeFrom,
      resumeFrom ? recentKeysOf(keyEntries, resumeFrom.run.id) : undefined,
    );
  } catch (err) {
    // A probe made beside the stream does not outlive the run.
    ctx.sideProbes.abort();
    if (err instanceof UsageError || !streaming) refusal = { error: err };
    ctx.stop ??= "error";
    ctx.error ??= err instanceof Error ? err.message : String(err);
  } finally {
    clearInterval(ticker);
    clearInterval(watch);
    cancelTimer();
    options.signal?.removeEventListener("abort", onUserAbort);
  }
  if (refusal) {
    // Its DID list goes too, unless a commit of this run names it, if the lock was this run's (a list
    // is only pruned under the lock).
    if (streaming) {
      const committed = writer.checkpoint.seq !== checkpoint.seq;
      const keep = [listHash(existing.value?.run.selection.wantedDids), committed ? sha256 : undefined];
      await pruneDidLists(kv, o.queueName, keep).catch(() => {});
    }
    await writer.abandon(existing.value);
    throw refusal.error;
  }
  try {
    const last = ctx.batcher.take();
    if (last) await writer.add(last);
    await writer.flush();
  } catch (err) {
    ctx.stop = "error";
    ctx.error ??= `could not store the last batch: ${err instanceof Error ? err.message : String(err)}`;
  }
  try {
    const endReached = ctx.stop === "end";
    // Quiet: nothing new for as long as the idle timeout, or 5 s if shorter (a narrow selection's
    // replay can bring its events seconds apart, a busy one never does).
    const quietMs = stats.lastProcessedUs === lastSeenUs ? performance.now() - newAt : 0;
    if (
      ctx.stop === "max_time" && o.endUs !== undefined && o.endUs <= Date.now() * 1000 &&
      quietMs >= Math.min(o.idleTimeoutMs, QUIET_MS)
    ) {
      ctx.report({
        reason: "coverage",
        message: endNotReached(o, stats.lastProcessedUs, quietMs, ctx.accepted > 0),
      });
    }
    progress(true);
    if (callbacks.failure !== undefined && ctx.stop !== "error") {
      // The last progress report threw, after the run had stopped for another reason.
      ctx.stop = "error";
      ctx.error = callbacks.failure;
    }
    // A run that never got a connection and stored nothing (its server unreachable, a typo in
    // --instance, a stop while connecting) does not displace the run before it that stored records:
    // the checkpoint that taking the queue wrote is put back, so that --resume continues that one.
    // (Runs that stored nothing take each other's place: the last is the one meant, most likely.)
    const putBack = !ctx.connected && storing !== undefined ? existing.value : undefined;
    return await finish(o, options, kv, ctx, selection, started, endReached, putBack);
  } finally {
    // Done by finish() unless something failed before it: release() is idempotent.
    await writer.release();
  }
}

/** How often a run checks whether a new event came (for {@link endNotReached}), ms. */
const QUIET_CHECK_MS = 500;
/** The quiet spell, at most, after which a run stopped by `maxTime` says why its end was not reached. */
const QUIET_MS = 5_000;

/**
 * What a run stopped by `maxTime` after a quiet spell, before its end, which is past, says: the
 * window may be complete or not. Jetstream filters on the server, so only a selected event (or, on
 * `/subscribe`, an identity or account event) can show the end, and a narrow selection may send
 * none for long after it; whether the server was still reading history for one cannot be seen
 * (protocol doc §9.8).
 */
function endNotReached(
  o: ResolvedSyncOptions,
  lastUs: number | null,
  quietMs: number,
  stored: boolean,
): string {
  return `the end, ${isoFromUs(o.endUs!)}, was not reached within --max-time / maxTime (${
    o.maxTimeMs / 1000
  } s): no event at or after it came (${
    lastUs === null
      ? "nor any other"
      : `the last one processed is at ${isoFromUs(lastUs)}, and nothing new came in the last ${
        Math.floor(quietMs / 1000)
      } s`
  }).${
    stored ? " What came before it is stored, and a resume (--resume / resume: true) goes on from there." : ""
  } With a narrow selection (a few quiet accounts, a rare collection) this happens even when the window is complete: Jetstream filters on the server, so the event that would show the end can be long in coming`;
}

/** The run's statistics, recorded for `jetfill status` as the writer lock is given back. */
async function finish(
  o: ResolvedSyncOptions,
  options: BackfillSyncOptions,
  kv: Deno.Kv,
  ctx: RunContext,
  selection: Record<string, unknown>,
  started: number,
  endReached: boolean,
  putBack: Checkpoint | null | undefined,
): Promise<SyncStats> {
  const { stats, writer } = ctx;

  let queueLength: number;
  try {
    queueLength = await waitingIn(kv, o.queueName);
  } catch (err) {
    if (!(err instanceof Deno.errors.BadResource)) throw err;
    // The caller's own Deno.Kv, closed while the run went on: the statistics cannot be completed,
    // but what is stored, and where a resume goes on from, can be said.
    throw new Error(
      `the Deno.Kv given as kv was closed before the run ended (${err.message}): ${stats.recordsStored} records were stored${
        stats.latestCursor === null ? "" : `, the last at time_us ${stats.latestCursor}`
      }; a resume (resume: true) goes on from there`,
    );
  }
  const totalTime = (performance.now() - started) / 1000;
  const result: SyncStats = {
    recordsStored: stats.recordsStored,
    messagesReceived: stats.messagesReceived,
    totalTime,
    recordsPerSecond: totalTime > 0 ? stats.recordsStored / totalTime : 0,
    collections: stats.collections(),
    targetReached: writer.checkpoint.run.recordsStored >= o.numRecords,
    latestCursor: stats.latestCursor,
    queueLength,
    currentDate: stats.currentDate,
    endCursorReached: endReached,
    stopReason: ctx.stop ?? "closed",
    recordsPerDay: stats.recordsPerDay,
    messagesEnqueued: stats.messagesEnqueued,
    skipped: stats.skipped,
    bytesReceived: stats.bytesReceived,
    bytesDecoded: stats.bytesDecoded,
    reconnects: stats.reconnects,
    failovers: stats.failovers,
    duplicatesDropped: stats.duplicatesDropped,
    coverageStart: stats.coverageStart,
    startClamped: stats.startClamped,
    coverageGapUs: stats.coverageGapUs,
  };
  if (ctx.error !== undefined) result.error = printable(ctx.error);
  // The run's record for `jetfill status` goes with the lock's release, and only while the lock is
  // still this run's; the statistics are returned whether or not it can be written.
  const record = {
    id: writer.checkpoint.run.id,
    finishedAt: Date.now(),
    options: {
      ...selection,
      // (The selection leaves out the default, which status shows all the same.)
      maxEventBytes: o.maxEventBytes,
      operations: sortedOperations(o.operations),
      instances: o.instances,
      queueName: o.queueName,
      batchSize: o.batchSize,
      compress: o.compress,
    },
    stats: result,
  };
  try {
    await writer.release((op) => {
      op.set(queueKey(o.queueName, "run"), record);
      if (putBack !== undefined) writer.putBack(op, putBack);
    });
  } catch (err) {
    options.onError?.({
      reason: "connection",
      message: `could not record the run for status: ${(err as Error).message}`,
    });
  }
  return result;
}

/** How far `cursor` is through the window from `start` to `end` (0–100), or null without an end. */
function windowPercent(
  start: number | null | undefined,
  end: number | undefined,
  cursor: number | null,
): number | null {
  if (end === undefined || start === undefined || start === null || cursor === null || end <= start) {
    return null;
  }
  return Math.max(0, Math.min(100, ((cursor - start) / (end - start)) * 100));
}

/**
 * Deno's net permission for every instance (or the proxy it is reached through), asked for before a
 * new run's database is opened: a run that could not connect, or not fail over, is refused having
 * made nothing. In a terminal, Deno's prompt comes here rather than mid-run.
 */
function checkNetAccess(instances: readonly string[]): void {
  const permissions = Deno.permissions;
  if (permissions?.querySync === undefined) return;
  for (const instance of instances) {
    const host = permissionHost(new URL(instance));
    const descriptor = { name: "net", host } as const;
    const state = permissions.querySync(descriptor).state;
    if (state === "granted") continue;
    if (state === "prompt" && permissions.requestSync(descriptor).state === "granted") continue;
    throw new UsageError(
      `cannot connect to ${instance}: Requires net access to "${host}", run again with the --allow-net flag`,
    );
  }
}

/** A dictionary given without compression is a mistake: it would be ignored. */
function checkDictionaryUse(options: BackfillSyncOptions, o: ResolvedSyncOptions): void {
  if (options.zstdDictionary === undefined || o.compress) return;
  const value = typeof options.zstdDictionary === "string"
    ? JSON.stringify(options.zstdDictionary)
    : `${options.zstdDictionary.byteLength} bytes`;
  throw new UsageError(
    `Cannot sync as 'zstdDictionary' must be left out without 'compress' (it decodes compressed frames only): current value is ${value}`,
  );
}

/** {@link loadDecoder} for a new run, whose refused dictionary says when the v2 hosts were moved to /subscribe. */
function loadNewRunDecoder(
  options: BackfillSyncOptions,
  o: ResolvedSyncOptions,
): Promise<(bytes: Uint8Array) => Uint8Array> {
  return loadDecoder(options, o.maxTimeMs, undefined).catch((err) => {
    // A v2 host that only the number of DIDs took to /subscribe: said, as the user did not ask for it.
    const moved = options.wire === undefined && didsNeedHello(o.wantedDids) &&
      o.instances.some((u) => !isV2Url(u) && V2_HOSTS.includes(new URL(u).hostname));
    if (!moved || !(err instanceof UsageError)) throw err;
    throw new UsageError(
      `${err.message} (with over ${URL_DID_LIMIT} DIDs, or over ${URL_DID_CHARS} characters of them, the v2 hosts are spoken to on /subscribe, whose hello carries them; --wire v2 / wire: "v2" keeps their own wire, with the DIDs in its URL)`,
      { cause: err },
    );
  });
}

/**
 * Resolves the legacy dictionary (option, environment, cache, verified download) and prepares a
 * decoder for /subscribe connections. `lost` is the file a resumed run used, gone since;
 * `remembered`, that file taken again, as none was given: a fault of it is not the option's.
 */
async function loadDecoder(
  options: BackfillSyncOptions,
  maxTimeMs: number,
  lost: string | undefined,
  remembered?: string,
): Promise<(bytes: Uint8Array) => Uint8Array> {
  try {
    return await loadGivenDecoder(options, maxTimeMs, lost);
  } catch (err) {
    if (remembered === undefined || !(err instanceof UsageError)) throw err;
    const why = err.message.replace(` (from ${DICTIONARY_OPTION})`, "");
    throw new UsageError(
      `The zstd dictionary that this queue's last run used, '${remembered}', cannot be used now. ${why}. ` +
        `Give the legacy dictionary with ${DICTIONARY_OPTION}`,
      { cause: err },
    );
  }
}

async function loadGivenDecoder(
  options: BackfillSyncOptions,
  maxTimeMs: number,
  lost: string | undefined,
): Promise<(bytes: Uint8Array) => Uint8Array> {
  // A download that hangs must not outlive --max-time.
  const limit = AbortSignal.timeout(Math.min(maxTimeMs, MAX_TIMER_MS));
  const signal = options.signal ? AbortSignal.any([options.signal, limit]) : limit;
  let dictionary;
  const search: DictionarySearch = { failures: [] };
  try {
    dictionary = await searchZstdDictionary({ dictionary: options.zstdDictionary, signal }, search);
  } catch (err) {
    // maxTime ran out during the download (a network that hangs): the dictionary is what is missing.
    const missing = limit.aborted && !options.signal?.aborted
      ? noDictionaryError(
        `${searchFindings(search)} Its download had not finished when --max-time / maxTime (${
          maxTimeMs / 1000
        } s) ran out.`,
        err,
        "runtime",
      )
      : err;
    // The last run's file is gone: the input's failure whatever went wrong after it (a download
    // that failed as well), so a UsageError that says so.
    if (lost === undefined || options.signal?.aborted || !(missing instanceof Error)) throw missing;
    throw new UsageError(
      `The zstd dictionary that this queue's last run used, '${lost}', is gone. ${missing.message}`,
      {
        cause: err,
      },
    );
  }
  const id = dictionary.dictionaryId;
  if (id !== LEGACY_DICTIONARY_ID) {
    throw new UsageError(
      `${
        dictionary.path === undefined
          ? "The zstd dictionary given as bytes"
          : `The zstd dictionary '${dictionary.path}'`
      } has ID ${id}, but /subscribe connections (the legacy wire) are compressed with the legacy Jetstream dictionary, ` +
        `ID ${LEGACY_DICTIONARY_ID} (legacy_subscribe.zdict, sha256 ${LEGACY_DICTIONARY_SHA256})${
          id === V2_DICTIONARY_ID
            ? "; it is the v2 wire's dictionary, which jetfill fetches from a v2 host (subscribeEvents) by itself"
            : ""
        }`,
    );
  }
  const decoder = await createZstdDecoder(dictionary.bytes);
  return (bytes) => decoder.decode(bytes);
}
