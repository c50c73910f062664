/**
 * The lock file of a queue: a sync that writes a queue of a database given by path holds an
 * operating-system lock on a small file beside it (`<database>-<queue>.lock`) for as long as it runs.
 *
 * The writer lock in the database itself (see `QueueWriter`) can only judge a sync alive by the
 * writes it gets through, and a consumer can keep SQLite busy for seconds. This lock does not depend
 * on writes: the process holds it until it exits, however it exits (a crash or `kill -9` gives it
 * back at once), and a paused process keeps it. It is SQLite's own file lock, taken by an exclusive
 * transaction on an empty database of its own, which works the same across processes and between two
 * handles in one process, on every platform Deno runs on; Deno's `FsFile.lock()` cannot be tried
 * without waiting.
 *
 * A `Deno.Kv` handed in by the caller has no path to lock beside, and neither has `:memory:` or a
 * remote database: those rely on the writer lock alone.
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";
import { delay } from "../async.ts";
import { isBusy } from "./kv_queue.ts";

/** A queue's lock file, held. */
export interface QueueFileLock {
  /** The lock file's path. */
  readonly path: string;
  /** Gives the lock back (idempotent). */
  release(): void;
}

/**
 * How long a sync tries for a lock that is held before it gives up: `jetfill status` holds it for a
 * moment while it looks, and that must not turn a sync away.
 */
const TRY_FOR_MS = 500;

/** Whether `path` names a local database file (not `:memory:` or a remote database's URL). */
function isLocalFile(path: string): boolean {
  return path !== ":memory:" && !/^[a-z][a-z0-9+.-]*:\/\//i.test(path);
}

/**
 * The lock file of `queue` in the database at `dbPath`, which must exist. Its real path is used, so
 * that a database reached through a link or another spelling of its path has one lock file.
 */
export async function queueLockPath(dbPath: string, queue: string): Promise<string> {
  return `${await Deno.realPath(dbPath)}-${queue}.lock`;
}

/** Opens the lock file, taking its lock if it can; undefined where a lock cannot be had at all. */
async function tryLock(path: string): Promise<DatabaseSync | "held" | undefined> {
  const { DatabaseSync } = await import("node:sqlite");
  let db: DatabaseSync;
  try {
    db = new DatabaseSync(path);
    // Never wait inside SQLite: that would block the event loop. Tries are repeated here instead.
    db.exec("PRAGMA busy_timeout = 0");
  } catch {
    return undefined;
  }
  try {
    db.exec("BEGIN EXCLUSIVE");
    return db;
  } catch (err) {
    db.close();
    // A file system without locks: the writer lock in the database still guards the queue.
    return isBusy(err) ? "held" : undefined;
  }
}

/**
 * Takes the lock file of `queue` in the database at `dbPath` (which must exist). Resolves to the
 * lock; to "held" when another sync, in this process or another, holds it; to undefined where no
 * lock file can be used (see the module's notes), and the writer lock alone guards the queue.
 */
export async function lockQueueFile(
  dbPath: string,
  queue: string,
): Promise<QueueFileLock | "held" | undefined> {
  if (!isLocalFile(dbPath)) return undefined;
  const path = await queueLockPath(dbPath, queue);
  const until = performance.now() + TRY_FOR_MS;
  for (;;) {
    const db = await tryLock(path);
    if (db === undefined) return undefined;
    if (db !== "held") {
      let held = true;
      return {
        path,
        release() {
          if (!held) return;
          held = false;
          // Closing ends the transaction and gives the lock back.
          db.close();
        },
      };
    }
    if (performance.now() >= until) return "held";
    await delay(10 + Math.random() * 20);
  }
}

/**
 * Whether a process holds the lock file of `queue` in the database at `dbPath`: true or false, or
 * undefined when there is no lock file to ask (no sync of this version ran there, or the path is not
 * a local file). Looking takes the lock for a moment when it is free.
 */
export async function queueFileLocked(dbPath: string, queue: string): Promise<boolean | undefined> {
  if (!isLocalFile(dbPath)) return undefined;
  const path = await queueLockPath(dbPath, queue);
  try {
    await Deno.stat(path);
  } catch {
    return undefined;
  }
  const db = await tryLock(path);
  if (db === undefined) return undefined;
  if (db === "held") return true;
  db.close();
  return false;
}
