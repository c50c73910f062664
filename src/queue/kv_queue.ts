/**
 * A jetfill queue in Deno KV: the messages (KV's queue), the queue's checkpoint and its counters,
 * all written together in atomic commits so that what is stored and what is counted never disagree.
 *
 * Keys, all under `["jetfill", <queue>]`:
 * - `"checkpoint"`: {@link Checkpoint}, rewritten by every commit;
 * - `"writer"`: the lock of the run writing the queue, checked by every commit, removed when it stops;
 * - `"count", "messages" | "records"`: `Deno.KvU64` totals ever enqueued;
 * - `"count", "messagesHandled" | "recordsHandled"`: totals consumed (see `consume()`);
 * - `"day", "YYYY-MM-DD"`: `Deno.KvU64` records stored per UTC day;
 * - `"run"`: the last run's options and statistics;
 * - `"dead", seq`: messages KV gave up delivering (`keysIfUndelivered`);
 * - `"alive"`: the writing run's sign of life while it is quiet;
 * - `"keys", seq`: the content keys of the records stored last, for a resume;
 * - `"dids", sha256, i`: a run's DID list too long for the checkpoint, which names it by its hash;
 * - `"parked", …` and `"consumer", run`: `consume()`'s parked messages and its sign of life.
 *
 * @module
 */
import type { QueueMessage } from "./message.ts";
import { fileURLToPath } from "node:url";
import { basename, dirname, join, resolve } from "node:path";
import { show, UsageError } from "../errors.ts";
import { delay } from "../async.ts";
import { QUEUE_NAME, QUEUE_NAME_RULE, withoutOwnParams } from "../options.ts";

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
  /** The run that wrote it, or that took the queue last: what `--resume` needs to continue it. */
  run: RunState;
  /**
   * The last run that stored records in the queue, while `run` has stored none (a run writes the
   * checkpoint when it takes the queue): what a new run compares itself with. Absent otherwise.
   */
  priorRun?: RunState;
  /**
   * The content keys (pairs of 32-bit hashes, see `ReplayGuard`) of the records stored at `cursor`,
   * so that a resume, whose cursor is inclusive, tells them from other events at that same time;
   * `keys` is null when there were too many to keep. Absent in checkpoints of older versions.
   */
  tail?: TailKeys;
}

/** The content keys of the last records stored, all at time `us`. */
export interface TailKeys {
  /** Their `time_us`. */
  us: number;
  /** Their keys as (b, a) pairs, or null when there were too many to keep. */
  keys: number[] | null;
}

/**
 * How far back from the newest `time_us` stored a queue keeps the content keys of its records (see
 * {@link KeyEntry}): a restarted legacy server re-ingests its last seconds under new `time_us`, and a
 * resume on another instance, whose `time_us` differ by seconds, takes the stream up 5 s earlier.
 */
export const KEYS_SPAN_US = 10_000_000;
/** The fewest records whose keys a queue keeps, however old: a v2 server re-ingests up to 4,096. */
export const RECENT_KEYS = 12_288;

/**
 * The content keys (see `ReplayGuard`) of the records of one commit, in order, kept under
 * `["jetfill", queue, "keys", seq]` (the seq of its last message) in the same commit as the records,
 * and deleted by a later commit once older than {@link KEYS_SPAN_US} and {@link RECENT_KEYS}
 * records: what the queue holds of them is always what it stored last, even after a crash.
 */
export interface KeyEntry {
  /** The seq of the commit's last message. */
  seq: number;
  /** The `time_us` of the commit's last record (the checkpoint's cursor after it). */
  cursor: number;
  /**
   * The newest `time_us` of the commit's records, what its age is judged by (the last one's may be
   * an operator's import, years old). Absent in entries of older versions.
   */
  maxUs?: number;
  /** (b, a) pairs of 32-bit hashes. */
  keys: Int32Array;
  /** The id of the run that stored the records; absent in entries of older versions. */
  run?: string;
}

/** The key of a {@link KeyEntry}. */
export function keysKey(queue: string, seq: number): Deno.KvKey {
  return queueKey(queue, "keys", seq);
}

/** The queue's key entries, oldest first. */
export async function listKeyEntries(kv: Deno.Kv, queue: string): Promise<KeyEntry[]> {
  const entries: KeyEntry[] = [];
  for await (
    const e of kv.list<{ v: number; cursor: number; maxUs?: unknown; keys: Int32Array; run?: unknown }>({
      prefix: queueKey(queue, "keys"),
    })
  ) {
    const seq = e.key[e.key.length - 1];
    if (typeof seq !== "number" || e.value?.v !== 1 || !(e.value.keys instanceof Int32Array)) continue;
    const run = typeof e.value.run === "string" ? e.value.run : undefined;
    const maxUs = typeof e.value.maxUs === "number" ? e.value.maxUs : undefined;
    entries.push({
      seq,
      cursor: e.value.cursor,
      ...(maxUs === undefined ? {} : { maxUs }),
      keys: e.value.keys,
      ...(run === undefined ? {} : { run }),
    });
  }
  return entries;
}

/** The content keys of the last records a queue stored, from its key entries. */
export interface RecentKeys {
  /** The cursor of the newest entry: the checkpoint's, when the entries are complete. */
  cursor: number;
  /** The seq of the newest entry: the checkpoint's, when the entries are complete. */
  seq: number;
  /** (b, a) pairs, oldest first. */
  keys: Int32Array;
}

/**
 * All the keys of the entries of run `run` (oldest first), or undefined when there are none. Another
 * run's records are not this run's to recognise: a new run on a queue that holds records stores its
 * own copies of the events they share. Entries of older versions, which do not say their run, count.
 */
export function recentKeysOf(all: KeyEntry[], run: string): RecentKeys | undefined {
  const entries = all.filter((e) => e.run === undefined || e.run === run);
  const last = entries.at(-1);
  if (!last) return undefined;
  const keys = new Int32Array(entries.reduce((n, e) => n + e.keys.length, 0));
  let at = 0;
  for (const e of entries) {
    keys.set(e.keys, at);
    at += e.keys.length;
  }
  return { cursor: last.cursor, seq: last.seq, keys };
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
  /**
   * The start by the clock of `instance`, where a search that lined its stream up after a failover
   * moved it (that instance's `time_us` run behind another's, or a record stored there marks where
   * the window begins): a resume there is held to it. Absent: the run's start.
   */
  instanceStartUs?: number;
  /**
   * The highest `time_us` processed on `instance` up to the last record stored from it (records
   * recognised and events not selected too), by its clock: where a resume there takes the stream up
   * when the last record's display time is an import's (see `maxUs`). Absent in checkpoints of older
   * versions.
   */
  instanceMaxUs?: number;
  /**
   * The WebSocket URL the run's first record came from: its start and end are times of that
   * instance (each instance has its own time_us). Absent in checkpoints of older versions.
   */
  firstInstance?: string;
  /** The instances the run was given, in order. */
  instances?: string[];
  /**
   * A live tail's (a run without a start's) first event processed: its `time_us`, by the clock of
   * the instance it came from. A resume by time there is held to it, as the run was (the rewind
   * before the cursor would otherwise reach events from before the tail began). Absent with a start,
   * and in checkpoints of older versions.
   */
  tailFrom?: { us: number; instance: string };
  /**
   * When a live tail began (it took the queue), unix µs by this machine's clock: a resume of one that
   * stored nothing asks from there, as its reconnects did, rather than from the moment it is resumed
   * (what came in between would be lost). Absent with a start, and in checkpoints of older versions.
   */
  tailBeganUs?: number;
  /**
   * The highest `time_us` of the records the run stored. On a v2 host it can be far later than the
   * checkpoint's `cursor`: an operator's import gives events display times years old (protocol doc
   * §3.2), and the last record stored may be one of them. Absent in checkpoints of older versions.
   */
  maxUs?: number;
  /** Server sequence cursor (v2 hosts) of the last stored record that had one. */
  seqCursor?: number;
  /** The instance that issued `seqCursor`; a sequence number is never sent to another. */
  seqInstance?: string;
  /**
   * How the run packs and asks for events, which a `--resume` that leaves them out keeps: with
   * `compress`, the absolute path of the zstd dictionary when one was given as a path.
   */
  settings?: { batchSize: number; compress: boolean; zstdDictionary?: string };
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

/**
 * The last run that stored records in the queue of `checkpoint`: its own run, or, when that one has
 * stored none, the one before it. Undefined for a queue that holds none.
 */
export function storingRun(checkpoint: Checkpoint | null): RunState | undefined {
  if (checkpoint === null) return undefined;
  return checkpoint.run.recordsStored > 0 ? checkpoint.run : checkpoint.priorRun;
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

/**
 * Page size of the databases jetfill creates. Deno KV leaves SQLite's default of 4 KiB, so a queue
 * message of 50 KB is a chain of a dozen overflow pages, each written to the log, then copied into
 * the database at a checkpoint every 4 MB of log. With 16 KiB pages KV's writer thread spends about
 * 40 % less CPU on the same commits (0.25 s against 0.42 s in a sync of 200,000 events), which the
 * rest of a sync gets on a machine of two cores; the log grows to 16 MB between checkpoints. 64 KiB
 * pages save a little more CPU but let the log grow to 64 MB, and each checkpoint then stalls the
 * writer for tens of milliseconds.
 */
export const KV_PAGE_SIZE = 16_384;

/**
 * `kv`, a `Deno.Kv` given to `verb` (`sync`, `consume`), once it is known to be open: a closed one is
 * refused with a `UsageError` that says so, rather than failing later with `BadResource`.
 *
 * @example
 * ```ts ignore
 * const kv = await ensureOpenKv(await Deno.openKv(":memory:"), "sync");
 * ```
 */
export async function ensureOpenKv(kv: Deno.Kv, verb: string): Promise<Deno.Kv> {
  try {
    await kv.get(queueKey("-"));
  } catch (err) {
    if (err instanceof Deno.errors.BadResource) {
      throw new UsageError(
        `Cannot ${verb} as 'kv' must be an open Deno.Kv: current value is one that was closed`,
      );
    }
    throw err;
  }
  return kv;
}

/**
 * Opens the database at `path`, creating its folder. A database that does not exist yet is created
 * with {@link KV_PAGE_SIZE} pages in WAL mode, then opened by Deno KV like any other; an existing
 * one is opened as it is. A file that is not a SQLite database, or one with tables but not Deno
 * KV's (which Deno KV would add to it), is refused with a `UsageError`. `runBackfillSync()` and
 * `consume()` open a `kv` path this way; use it to open a database yourself, for instance to share
 * one handle between a sync and a consumer.
 *
 * @example
 * ```ts ignore
 * import { openKvAt, runBackfillSync } from "@jetfill/jetfill";
 * const kv = await openKvAt("./jetfill-data/jetstream_sync.sqlite");
 * await runBackfillSync({ kv, numRecords: 1000 });
 * kv.close();
 * ```
 */
export async function openKvAt(path: string): Promise<Deno.Kv> {
  // Before anything is made: without it, the folder and the file would be, and then Deno's own
  // "Deno.openKv is not a function" would say little of what to do.
  if (typeof Deno.openKv !== "function") {
    throw new UsageError(
      `Cannot open the Deno KV database ${
        JSON.stringify(path)
      }: Deno KV is not enabled; run with --unstable-kv, or add "unstable": ["kv"] to deno.json`,
    );
  }
  const file = localDatabasePath(path);
  if (file !== undefined) {
    const slash = file.lastIndexOf("/");
    const folder = slash > 0 ? file.slice(0, slash) : undefined;
    // (Made only when missing: Deno's permissions ask for write access to make one that exists.)
    // Deno's permissions may refuse to look at the folder yet allow what follows (write access, and
    // read access to the file alone): then it is made as if missing, which is harmless when it is
    // there, and only a refusal of that too is said, as the look's refusal.
    let unseen: Error | undefined;
    const folderThere = folder !== undefined && await Deno.stat(folder).then((i) => i.isDirectory, (err) => {
      if (err instanceof Deno.errors.NotCapable) unseen = err;
      return false;
    });
    if (folder !== undefined && !folderThere) {
      await Deno.mkdir(folder, { recursive: true }).catch(async (err) => {
        if (unseen !== undefined) {
          throw new UsageError(
            `Cannot open the Deno KV database ${JSON.stringify(path)}: ${unseen.message}`,
            {
              cause: unseen,
            },
          );
        }
        // A file where a folder of the path should be is the path's fault (bad input); the rest
        // (permissions, a full disk) is the machine's.
        const blocker = await fileOnPath(folder);
        if (blocker !== undefined) {
          throw new UsageError(
            `Cannot make the folder of the Deno KV database ${JSON.stringify(path)}: ${
              JSON.stringify(blocker)
            } is a file, not a folder`,
            { cause: err },
          );
        }
        // Deno's permissions refusing it is how the process was started, and the file system's is
        // where the path points: bad input too, as a read-only database file is.
        throw new (refused(err) ? UsageError : Error)(
          `cannot make the folder of the Deno KV database ${JSON.stringify(path)}: ${(err as Error).message}`,
          { cause: err },
        );
      });
    }
    const info = await Deno.stat(file).catch(() => undefined);
    // (A folder is said below, as SQLite's refusal of it is.)
    if (info && !info.isFile && !info.isDirectory) {
      throw new UsageError(
        `Cannot open the Deno KV database ${
          JSON.stringify(path)
        }: it is not a file (a device, a pipe or a socket); give a Deno KV database file`,
      );
    }
    // (Before the file is opened at all: even a read-only look makes its log files beside this name.)
    if (info && await linkCount(file, info) > 1) {
      throw new UsageError(
        `Cannot open the Deno KV database ${
          JSON.stringify(path)
        }: the file has several names (hard links), ` +
          "and SQLite keeps a database's log beside the name it is opened by, so processes using different " +
          "names would not see each other's writes and could corrupt it; give the database a single name " +
          "(a symbolic link to it is fine)",
      );
    }
    await checkLogFiles(path, file);
    // Only a speed-up: where it cannot be done, Deno KV creates the database as it always does.
    if (!info) await createDatabase(file).catch(() => {});
    else if (info.isFile && info.size > 0 && !checkedDatabases.has(file)) {
      await checkDatabaseFile(path, file);
      checkedDatabases.add(file);
    }
    path = file;
  }
  let kv: Deno.Kv;
  try {
    kv = await Deno.openKv(path);
  } catch (err) {
    // SQLite's "unable to open database file" does not say why.
    const folder = await Deno.stat(path).then((s) => s.isDirectory, () => false);
    const unwritable =
      !folder && file !== undefined && /unable to open|readonly|read-only/i.test((err as Error).message)
        ? !(await canMakeFileIn(dirname(file)))
        : undefined;
    const hint = folder
      ? " (it is a folder: give the database file's path)"
      : unwritable
      ? ` (its folder ${JSON.stringify(dirname(file!))} cannot be written by this process, and SQLite ` +
        "needs to create its -wal and -shm files beside it; give the folder write access, or use a writable copy)"
      : unwritable === false
      ? " (is its folder writable? SQLite needs to create its -wal and -shm files beside it)"
      : "";
    // A folder given for the database, a folder that cannot be written, or Deno's permissions refusing
    // it, is bad input (exit 2 in the CLI); the rest is the machine's.
    throw new (folder || unwritable || err instanceof Deno.errors.NotCapable ? UsageError : Error)(
      `cannot open the Deno KV database ${JSON.stringify(path)}: ${(err as Error).message}${hint}`,
      { cause: err },
    );
  }
  // Only a speed-up too: a database that cannot be indexed now (read-only, or busy) is used as it is.
  if (file !== undefined) {
    await indexQueueTables(file).catch(() => {});
    // Absolute: the file is read again later, whatever the working folder is by then.
    databaseFiles.set(kv, resolve(file));
  }
  return kv;
}

/** An error by which Deno's permissions or the file system refused access (not a missing file). */
function refused(err: unknown): boolean {
  return err instanceof Deno.errors.NotCapable || err instanceof Deno.errors.PermissionDenied ||
    /read-only file system/i.test((err as Error)?.message ?? "");
}

/** Whether this process may write `file`: false only when that is refused (see {@link refused}). */
async function canWrite(file: string): Promise<boolean> {
  try {
    // (Neither created nor truncated: opened, and closed.)
    (await Deno.open(file, { read: true, write: true })).close();
    return true;
  } catch (err) {
    return !refused(err);
  }
}

/** Whether this process may make a file in `folder`: tried with a file made and removed at once. */
async function canMakeFileIn(folder: string): Promise<boolean> {
  try {
    await Deno.remove(await Deno.makeTempFile({ dir: folder, prefix: ".jetfill-probe-" }));
    return true;
  } catch (err) {
    return !refused(err);
  }
}

/** SQLite's files beside a database in WAL mode: its log and the log's shared-memory index. */
const LOG_FILES = ["-wal", "-shm"] as const;

/**
 * Refuses SQLite's log file beside the database `file` that this process cannot write when it can
 * write the database: SQLite would open the database for reading alone without a word, and Deno KV's
 * background work then fails its first write with a panic. A look at a database while it was
 * read-only leaves such files, as SQLite gives them the database's mode (see
 * {@link unlockLogFiles}), and so may another program.
 */
async function checkLogFiles(path: string, file: string): Promise<void> {
  let databaseWritable: boolean | undefined;
  for (const suffix of LOG_FILES) {
    const log = file + suffix;
    if (!(await Deno.lstat(log).then(() => true, () => false))) continue;
    databaseWritable ??= await canWrite(file);
    if (!databaseWritable || await canWrite(log)) continue;
    throw new UsageError(
      `Cannot open the Deno KV database ${JSON.stringify(path)}: its SQLite file ${
        JSON.stringify(log)
      } cannot be written by this process while the database can, so SQLite would refuse every write ` +
        "(a look at the database by a process that could not write it leaves such a file); have its owner " +
        `give it write access (chmod u+w ${JSON.stringify(log)}), or delete it while no program has the ` +
        "database open",
    );
  }
}

/**
 * After a look at a database `file` that has no write access for its owner (see `jetfill status`):
 * gives its owner write access to SQLite's log files beside it, which SQLite made with the
 * database's mode, so that they do not keep every writer out once the database is writable again
 * (see {@link checkLogFiles}). Call it once the database is closed: SQLite may make them again
 * until then. Files of another owner, or a system without modes, are left as they are.
 */
export async function unlockLogFiles(file: string): Promise<void> {
  const mode = await Deno.stat(file).then((i) => i.mode, () => null);
  if (mode === null || (mode & 0o200) !== 0) return;
  for (const suffix of LOG_FILES) {
    const log = file + suffix;
    const logMode = await Deno.lstat(log).then((i) => i.isFile ? i.mode : null, () => null);
    if (logMode !== null && (logMode & 0o200) === 0) {
      await Deno.chmod(log, (logMode & 0o7777) | 0o200).catch(() => {});
    }
  }
}

/**
 * Refuses a local database file that this process can read but not write (its mode or owner, or a
 * read-only file system): SQLite opens such a file read-only without a word, and then a queue
 * listener is given nothing and a commit fails. `what` opens the message ("Cannot export"), `why`
 * says what the command writes. A file that is not there, or that Deno's permissions keep from
 * view, is left to {@link openKvAt}.
 */
export async function requireWritable(path: string, what: string, why: string): Promise<void> {
  const file = localDatabasePath(path);
  if (file === undefined) return;
  let f: Deno.FsFile;
  try {
    // (Neither created nor truncated: opened, and closed.)
    f = await Deno.open(file, { read: true, write: true });
  } catch (err) {
    const message = (err as Error)?.message ?? String(err);
    if (err instanceof Deno.errors.PermissionDenied || /read-only file system/i.test(message)) {
      throw new UsageError(
        `${what} as the Deno KV database ${
          JSON.stringify(path)
        } cannot be written by this process (${message}): ${why}; give it write access, or use a writable copy`,
        { cause: err },
      );
    }
    return;
  }
  f.close();
}

/** The first of `folder` and its parents that exists as something other than a folder, if any. */
async function fileOnPath(folder: string): Promise<string | undefined> {
  for (let at = folder; at.length > 0; at = at.slice(0, Math.max(0, at.lastIndexOf("/")))) {
    const info = await Deno.stat(at).catch(() => undefined);
    if (info) return info.isDirectory ? undefined : at;
  }
  return undefined;
}

/** The database files of the handles {@link openKvAt} opened. */
const databaseFiles = new WeakMap<Deno.Kv, string>();

/** The database file of a handle {@link openKvAt} opened; undefined for another handle. */
export function databaseFileOf(kv: Deno.Kv): string | undefined {
  return databaseFiles.get(kv);
}

/** The database file of a handle {@link openKvAt} opened, for messages; "this database" otherwise. */
export function databaseName(kv: Deno.Kv): string {
  return databaseFiles.get(kv) ?? "this database";
}

/**
 * How many of `queue`'s messages Deno KV's own queue holds in the database file of `kv` (waiting, or
 * being delivered), or (`records`) how many records they hold. Each jetfill message names its queue
 * in its dead-letter key (`keysIfUndelivered`), which Deno KV keeps beside it, encoded as the
 * database encodes keys. With `count`, when the database holds no other jetfill queue, the tables'
 * rows are counted by their index (the messages, up to 64 KiB each, are not read), and another
 * program's messages there count too; `exact` counts by the key whatever the database holds, which
 * reads the whole table, and finds when the last of the messages waiting is due. Undefined when the file cannot be read: `kv` was not opened by
 * {@link openKvAt} (a `Deno.Kv` opened elsewhere, whose file is not known), or the database is busy
 * or unreadable.
 */
async function readKvQueue(
  kv: Deno.Kv,
  queue: string,
  read: "count" | "exact" | "records",
): Promise<KvQueueFigures | undefined> {
  const file = databaseFiles.get(kv);
  if (file === undefined) return undefined;
  const onlyThis = read === "count" && (await queuesIn(kv)).every((q) => q === queue);
  try {
    const { DatabaseSync } = await import("node:sqlite");
    const db = new DatabaseSync(file, { readOnly: true, timeout: 1000 });
    try {
      const names = db.prepare("select name from sqlite_master where type = 'table'").all() as {
        name: string;
      }[];
      const tables = new Set(names.map((r) => r.name));
      if (!tables.has("queue") || !tables.has("queue_running")) {
        return { messages: 0, latestDueMs: 0, records: 0 };
      }
      if (onlyThis) {
        const row = db.prepare(
          "select (select count(*) from queue) + (select count(*) from queue_running) as n",
        ).get();
        return { messages: Number((row as { n: number }).n) };
      }
      // One statement, so one snapshot: a message moving between the two tables is seen once.
      const pattern = `[[${encodedKeyPrefix(queueKey(queue, "dead"))},%`;
      const ours = (table: string) => `from ${table} where keys_if_undelivered like ?1`;
      if (read !== "records") {
        const row = db.prepare(
          `select (select count(*) ${ours("queue")}) + (select count(*) ${ours("queue_running")}) as n, ` +
            `(select max(ts) ${ours("queue")}) as due`,
        ).get(pattern) as { n: number; due: number | null };
        return { messages: Number(row.n), latestDueMs: Number(row.due ?? 0) };
      }
      // Message by message, keeping only the count: a backlog can be gigabytes.
      const { deserialize } = await import("node:v8");
      let records = 0;
      const rows = db.prepare(`select data ${ours("queue")} union all select data ${ours("queue_running")}`);
      for (const row of rows.iterate(pattern) as Iterable<{ data: Uint8Array }>) {
        try {
          const m = deserialize(row.data) as { records?: unknown; compressed?: unknown };
          records += (Array.isArray(m.records) ? m.records.length : 0) +
            (Array.isArray(m.compressed) ? m.compressed.length : 0);
        } catch {
          // Not a message this version can read: no records counted.
        }
      }
      return { records };
    } finally {
      db.close();
    }
  } catch {
    return undefined;
  }
}

/**
 * The bytes of a key of string parts as Deno KV encodes it (each part: 0x02, its UTF-8 with 0x00
 * escaped as 0x00 0xFF, then 0x00), joined with commas, as its queue tables write key lists (JSON).
 */
function encodedKeyPrefix(key: Deno.KvKey): string {
  const bytes: number[] = [];
  for (const part of key) {
    bytes.push(2);
    for (const b of new TextEncoder().encode(String(part))) bytes.push(...(b === 0 ? [0, 0xff] : [b]));
    bytes.push(0);
  }
  return bytes.join(",");
}

/**
 * How many of `queue`'s messages Deno KV's own queue holds (waiting, or being delivered), read from
 * the database file: undefined when it cannot be (see {@link readKvQueue}). Unlike the queue's
 * counters, this sees what a plain `listenQueue` took.
 */
export async function messagesInKvQueue(kv: Deno.Kv, queue: string): Promise<number | undefined> {
  return (await readKvQueue(kv, queue, "count"))?.messages;
}

/** What {@link readKvQueue} finds: those figures it was asked for. */
interface KvQueueFigures {
  /** The queue's messages in Deno KV's queue, waiting or being delivered. */
  messages?: number;
  /** When the last of those waiting is due, ms since 1970 (0: none waits). */
  latestDueMs?: number;
  /** The records in those messages. */
  records?: number;
}

/**
 * The queue's messages in Deno KV's own queue, counted by their dead-letter key (another program's
 * messages left out, at the cost of reading the whole queue table), and when the last of those
 * waiting is due (ms since 1970; 0 when none waits): a message KV retries after a failure waits there
 * up to a minute. Undefined when the database file cannot be read (see {@link readKvQueue}).
 */
export async function kvQueueOf(
  kv: Deno.Kv,
  queue: string,
): Promise<{ messages: number; latestDueMs: number } | undefined> {
  const figures = await readKvQueue(kv, queue, "exact");
  return figures && { messages: figures.messages ?? 0, latestDueMs: figures.latestDueMs ?? 0 };
}

/**
 * The records in `queue`'s messages that Deno KV's own queue holds, read from the database file (each
 * message is decoded): undefined when it cannot be (see {@link readKvQueue}).
 */
export async function recordsInKvQueue(kv: Deno.Kv, queue: string): Promise<number | undefined> {
  return (await readKvQueue(kv, queue, "records"))?.records;
}

/** Files {@link checkDatabaseFile} found to be Deno KV databases (or empty SQLite ones) in this process. */
const checkedDatabases = new Set<string>();

/**
 * Refuses, with a {@link UsageError}, a file that Deno KV would otherwise turn into its own: one
 * that is not a SQLite database, or a SQLite database with tables but not Deno KV's (Deno.openKv
 * would add its tables to it). `path` is the name the user gave, for the message.
 */
async function checkDatabaseFile(path: string, file: string): Promise<void> {
  const { DatabaseSync } = await import("node:sqlite");
  let tables: string[];
  try {
    const db = new DatabaseSync(file, { readOnly: true, timeout: 1000 });
    try {
      const rows = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all();
      tables = rows.map((row) => String(row.name));
    } finally {
      db.close();
    }
  } catch (err) {
    const message = (err as Error).message;
    if (!/file is not a database/.test(message)) return; // Busy, or unreadable: Deno KV will say.
    throw new UsageError(
      `${
        JSON.stringify(path)
      } is not a Deno KV database (SQLite says: ${message}): give a Deno KV database's path (a sync makes one where none is)`,
    );
  }
  if (tables.length === 0 || (tables.includes("kv") && tables.includes("migration_state"))) return;
  throw new UsageError(
    `${JSON.stringify(path)} is a SQLite database but not a Deno KV one (its tables: ${
      tables.slice(0, 5).join(", ")
    }${
      tables.length > 5 ? ", …" : ""
    }), and Deno KV would add its own tables to it: give a Deno KV database's path (a sync makes one where none is)`,
  );
}

/** The indexes {@link indexQueueTables} adds, each with its table (both are on `id`). */
const QUEUE_INDEXES = [
  ["jetfill_queue_id", "queue"],
  ["jetfill_queue_running_id", "queue_running"],
] as const;

/**
 * Adds an index on `id` to Deno KV's two queue tables in the database `file`, where they are not
 * there yet. Deno KV's SQLite backend keys those tables by (time, id) but removes a message by its
 * `id` alone (`delete from queue where id = ?`) each time it hands one over, so without an index on
 * `id` every delivery reads the whole queue table: draining a backlog costs time in the square of
 * its length (a plain `listenQueue` on 12,000 messages of 50 KB: 109 s, and 28 s with the index; on
 * 4,000: 14.6 s and 7.2 s). The index changes no value and no query's result; any Deno KV reader of
 * the database uses it (SQLite picks it for those statements). The connection is opened after Deno
 * KV's, which creates the tables; Deno links one SQLite, so the two share its bookkeeping of locks.
 */
async function indexQueueTables(file: string): Promise<void> {
  const { DatabaseSync } = await import("node:sqlite");
  const db = new DatabaseSync(file, { timeout: 1000 });
  try {
    const rows = db.prepare("select name from sqlite_master where type in ('table', 'index')").all();
    const names = new Set((rows as { name: string }[]).map((r) => r.name));
    const missing = QUEUE_INDEXES.filter(([index, table]) => names.has(table) && !names.has(index));
    for (const [index, table] of missing) db.exec(`create index if not exists ${index} on ${table} (id)`);
  } finally {
    db.close();
  }
}

/**
 * How many names (hard links) the file `info` of `path` has. A database that another process is
 * creating has two for a moment (see {@link createDatabase}): only a count that stays is counted,
 * once the temporary name of a creation killed at that moment is removed.
 */
async function linkCount(path: string, info: Deno.FileInfo): Promise<number> {
  if (!info.isFile || info.nlink === null || info.nlink <= 1) return 1;
  await delay(100);
  let now = await Deno.stat(path).catch(() => info);
  if ((now.nlink ?? 1) > 1 && await removeStrayCreations(path, now)) {
    now = await Deno.stat(path).catch(() => now);
  }
  return now.nlink ?? 1;
}

/**
 * Removes the names {@link createDatabase} left beside the database at `path` (file `info`) when
 * its process was killed between linking the new file into place and removing its temporary name:
 * `<name>.<uuid>.new`, the same file. Another name is the user's, and left alone. Resolves to
 * whether one was removed.
 */
async function removeStrayCreations(path: string, info: Deno.FileInfo): Promise<boolean> {
  const base = basename(path);
  const dir = dirname(path);
  let removed = false;
  try {
    for await (const entry of Deno.readDir(dir)) {
      if (
        !entry.isFile || !entry.name.startsWith(`${base}.`) ||
        !STRAY_CREATION.test(entry.name.slice(base.length))
      ) {
        continue;
      }
      const stray = join(dir, entry.name);
      const same = await Deno.lstat(stray).then((s) => s.ino === info.ino && s.dev === info.dev, () => false);
      if (same) removed = await Deno.remove(stray).then(() => true, () => removed);
    }
  } catch {
    // A folder that cannot be listed: the count stands.
  }
  return removed;
}

/** The end of a temporary name of {@link createDatabase}: `.<uuid>.new`. */
const STRAY_CREATION = /^\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.new$/;

/**
 * The file of a local database: `path` itself, or the path of a `file:` URL; undefined for
 * `:memory:` and for a remote database's URL. Throws a `UsageError` for a path that cannot mean
 * what was meant: a `file:` URL without `//` (`file:q.sqlite` is `/q.sqlite`, at the root), a path
 * that begins with `~` (a shell's, never expanded here) or that ends in `/` (a folder).
 *
 * @example
 * ```ts
 * import { localDatabasePath } from "./kv_queue.ts";
 * localDatabasePath("file:///tmp/q.sqlite"); // "/tmp/q.sqlite"
 * localDatabasePath("https://kv.example.com"); // undefined
 * ```
 */
export function localDatabasePath(path: string): string | undefined {
  if (path === ":memory:") return undefined;
  const unusable = (why: string) =>
    new UsageError(`${JSON.stringify(path)} is not a usable database path: ${why}`);
  let file = path;
  if (/^file:/i.test(path)) {
    // (file:/tmp/q.sqlite is /tmp/q.sqlite, as written; file:q.sqlite is /q.sqlite, which it seems not to be.)
    if (!/^file:\//i.test(path)) {
      throw unusable(
        'a file: URL without "/" after "file:" names a file from the root, not from the current folder: give ' +
          "file:/// and the whole path, or the path itself",
      );
    }
    try {
      file = fileURLToPath(path);
    } catch (err) {
      throw new UsageError(
        `${JSON.stringify(path)} is not a database path or a file: URL of one (${(err as Error).message})`,
      );
    }
  } else if (/^[a-z][a-z0-9+.-]*:\/\//i.test(path)) return undefined;
  // (~ or ~user and a folder below: a file named "~notes.sqlite" is one.)
  if (/^~(\/|$)|^~[a-z_][a-z0-9_-]*\//i.test(file)) {
    throw unusable(
      'it begins with "~", which only a shell expands (not in quotes, nor after "="); give the path from "/" ' +
        "or from $HOME",
    );
  }
  if (file === "") throw unusable("it is empty; give the database file's path");
  // ("x/", "x/." and "x/..", "." and "..": folders.)
  if (/(^|\/)\.{0,2}$/.test(file)) {
    throw unusable(
      `it ends in "${/\.*$/.exec(file)![0] || "/"}", so it names a folder; give the database file's path`,
    );
  }
  return file;
}

/**
 * Creates an empty database at `path` with {@link KV_PAGE_SIZE} pages, unless one appears there
 * meanwhile: it is made under another name and linked into place, which fails where a rename would
 * replace a database that another process has just created.
 */
async function createDatabase(path: string): Promise<void> {
  const { DatabaseSync } = await import("node:sqlite");
  const fresh = `${path}.${crypto.randomUUID()}.new`;
  try {
    const db = new DatabaseSync(fresh);
    try {
      // Switching to WAL writes the file's header, with the page size. (Not VACUUM: it attaches a
      // database, which Deno's node:sqlite forbids without --allow-all.)
      db.exec(`PRAGMA page_size = ${KV_PAGE_SIZE}; PRAGMA journal_mode = WAL;`);
    } finally {
      db.close();
    }
    await Deno.link(fresh, path).catch((e) => {
      if (!(e instanceof Deno.errors.AlreadyExists)) throw e;
    });
  } finally {
    for (const f of [fresh, `${fresh}-wal`, `${fresh}-shm`]) await Deno.remove(f).catch(() => {});
  }
}

/** Whether `err` is SQLite's "database is locked": nothing of the operation was written. */
export function isBusy(err: unknown): boolean {
  return err instanceof Error && /database is locked|busy/i.test(err.message);
}

/**
 * Runs `op` again while SQLite reports the database busy, after a random 5 to 25 ms each time, until
 * `budgetMs` have been spent waiting, then throws an error that says so; other errors go through at
 * once, and `advice` (what the user can do) ends its message. Short waits, not a growing backoff: a busy consumer in another process holds the write lock
 * for most of each second (a commit and its sync per message it handles), and only an attempt that
 * comes in one of the gaps between its commits gets through; SQLite answers a busy attempt at once,
 * so trying often costs little.
 * Another connection holds SQLite's write lock (a process opening the database), or wrote between an
 * atomic commit's checks and its writes (a consumer acknowledging messages): either way nothing of
 * the operation was written, and running it again is safe.
 *
 * @example
 * ```ts
 * import { retryWhileBusy } from "./kv_queue.ts";
 * const kv = await Deno.openKv(":memory:");
 * await retryWhileBusy(() => kv.set(["k"], 1), 1000);
 * kv.close();
 * ```
 */
export async function retryWhileBusy<T>(
  op: () => Promise<T>,
  budgetMs: number,
  advice = "stop it or wait, then run again",
): Promise<T> {
  const started = performance.now();
  for (;;) {
    try {
      return await op();
    } catch (err) {
      if (!isBusy(err)) throw err;
      const waited = performance.now() - started;
      if (waited >= budgetMs) {
        throw new Error(
          `${(err as Error).message}: another connection kept the database busy for ${
            (waited / 1000).toFixed(1)
          } s (another process writing to it?)${advice === "" ? "" : `; ${advice}`}`,
          { cause: err },
        );
      }
      await delay(5 + Math.random() * 20);
    }
  }
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
 * Reads a queue's checkpoint: its entry, whose `value` is null while no run has taken the queue.
 *
 * @example
 * ```ts
 * import { readCheckpoint } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * const checkpoint = (await readCheckpoint(kv, "jetstream_sync")).value;
 * console.log(checkpoint?.seq ?? 0, "messages enqueued; last cursor", checkpoint?.cursor);
 * kv.close();
 * ```
 */
export async function readCheckpoint(kv: Deno.Kv, queue: string): Promise<Deno.KvEntryMaybe<Checkpoint>> {
  const entry = await kv.get<Checkpoint>(queueKey(queue, "checkpoint"));
  const run = entry.value?.run;
  if (run) {
    // Instances as jetfill names them now: older versions kept a URL's query string as given, filters
    // and cursor included, which jetfill replaced on each connection and now refuses.
    run.instance = withoutOwnParams(run.instance);
    if (run.firstInstance !== undefined) run.firstInstance = withoutOwnParams(run.firstInstance);
    if (run.seqInstance !== undefined) run.seqInstance = withoutOwnParams(run.seqInstance);
    if (run.instances !== undefined) run.instances = run.instances.map(withoutOwnParams);
  }
  return entry;
}

/**
 * When `queue` has never been written in the database at `path` (a name for messages) but other
 * queues have: why a command on it is refused, most likely a mistyped or forgotten queue name.
 * Undefined when the queue is there, or when the database holds no queue at all yet. A database
 * that holds no jetfill queue but another program's keys or queued messages is refused at once
 * (`UsageError`, "Cannot `what` as …"): reading a queue there would take that program's messages
 * and put them back without their `keysIfUndelivered`.
 *
 * @example
 * ```ts
 * import { unknownQueue } from "./kv_queue.ts";
 * const kv = await Deno.openKv(":memory:");
 * await kv.set(["jetfill", "posts", "checkpoint"], {});
 * console.log(await unknownQueue(kv, "post", "q.sqlite", "export")); // queue 'post' has nothing in q.sqlite, which holds 'posts'
 * kv.close();
 * ```
 */
export async function unknownQueue(
  kv: Deno.Kv,
  queue: string,
  path: string,
  what: string,
): Promise<string | undefined> {
  const [own] = await Array.fromAsync(kv.list({ prefix: ["jetfill", queue] }, { limit: 1 }));
  if (own) return undefined;
  const others = await queuesIn(kv);
  // (Written meanwhile, when another process is starting on it.)
  if (others.includes(queue)) return undefined;
  if (others.length > 0) {
    return `queue '${queue}' has nothing in ${path}, which holds ${others.map((q) => `'${q}'`).join(", ")}`;
  }
  const [key] = await Array.fromAsync(kv.list({ prefix: [] }, { limit: 1 }));
  const queued = key ? 0 : (await readKvQueue(kv, queue, "count"))?.messages ?? 0;
  // (A sync starting on a new database writes its first keys with its first messages.)
  if ((key === undefined && queued === 0) || (await queuesIn(kv)).length > 0) return undefined;
  const held = key
    ? `the key [${key.key.map(show).join(", ")}]`
    : `${queued} queued message${queued === 1 ? "" : "s"}`;
  throw new UsageError(
    `Cannot ${what} as ${path} holds no jetfill queue but another program's data (${held}): give the path of a jetfill database`,
  );
}

/**
 * Refuses (`UsageError`) a queue name that breaks the rule of `queueName`, or that the database has
 * never held when it holds other queues (most likely a mistyped name), and a database that holds no
 * jetfill queue but another program's data (see {@link unknownQueue}): a public function that reads
 * or repairs a queue would otherwise answer 0, or change nothing, without a word. `what` is what it
 * does ("read the status").
 *
 * @example
 * ```ts
 * import { refuseQueueName } from "./kv_queue.ts";
 * const kv = await Deno.openKv(":memory:");
 * await refuseQueueName(kv, "jetstream_sync", "read the status"); // a database without queues: fine
 * kv.close();
 * ```
 */
export async function refuseQueueName(kv: Deno.Kv, queue: string, what: string): Promise<void> {
  if (typeof queue !== "string" || !QUEUE_NAME.test(queue)) {
    throw new UsageError(
      `Cannot ${what} as the queue name must be ${QUEUE_NAME_RULE}: current value is ${show(queue)}`,
    );
  }
  const unknown = await unknownQueue(kv, queue, databaseName(kv), what);
  if (unknown) throw new UsageError(`Cannot ${what} as ${unknown}`);
}

/** The names of the jetfill queues a database holds, one key read each (at most 20). */
export async function queuesIn(kv: Deno.Kv): Promise<string[]> {
  const names: string[] = [];
  let start: Deno.KvKey | undefined;
  while (names.length < 20) {
    const selector = start ? { prefix: ["jetfill"], start } : { prefix: ["jetfill"] };
    const [entry] = await Array.fromAsync(kv.list(selector, { limit: 1 }));
    const name = entry?.key[1];
    if (typeof name !== "string") break;
    names.push(name);
    // The first key past every key of this queue.
    start = ["jetfill", `${name}\0`];
  }
  return names;
}
