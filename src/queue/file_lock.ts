/**
 * The lock file of a queue: a sync that writes a queue of a database given by path holds an
 * operating-system lock on a small file beside it (`<database>@<queue>.lock`) for as long as it runs.
 *
 * The writer lock in the database itself (see `QueueWriter`) can only judge a sync alive by the
 * writes it gets through, and a consumer can keep SQLite busy for seconds. This lock does not depend
 * on writes: the process holds it until it exits, however it exits (a crash or `kill -9` gives it
 * back at once), and a paused process keeps it. It is SQLite's own file lock, taken by an exclusive
 * transaction on an empty database of its own (journal in memory: no file beside it), which works the
 * same across processes and between two handles in one process, on every platform Deno runs on;
 * Deno's `FsFile.lock()` cannot be tried without waiting. Looking whether it is held takes a shared
 * lock, which only a holder's exclusive one conflicts with.
 *
 * A `Deno.Kv` handle passed by the caller has no path to lock beside, and neither has `:memory:` or
 * a remote database: those rely on the writer lock alone.
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";
import { delay } from "../async.ts";
import { isBusy, localDatabasePath } from "./kv_queue.ts";

/** A queue's lock file, held. */
export interface QueueFileLock {
  /** The lock file's path. */
  readonly path: string;
  /**
   * The lock file's identity on its file system (device and inode), when it has one: another file
   * put in its place (the one a sync locked deleted, say) is another lock, which that sync does not
   * hold.
   */
  readonly id: string | undefined;
  /** Gives the lock back (idempotent). */
  release(): void;
}

/** Why no lock file could be used, for a warning: the writer lock alone then guards the queue. */
export interface LockUnavailable {
  /** The lock file's path. */
  path: string;
  /** What went wrong. */
  reason: string;
}

/**
 * How long a sync tries for a lock that is held before it gives up: another sync may be about to
 * give it back, and `jetfill status` holds a shared lock for a moment while it looks.
 */
const TRY_FOR_MS = 500;

/**
 * The lock file of `queue` in the database at `dbPath`, which must exist. Its real path is used, so
 * that a database reached through a symbolic link or another spelling of its path has one lock file
 * (a database with several hard links is refused by `openKvAt`). `@` cannot occur in a queue name,
 * so no other pair of database and queue has the same lock file.
 */
export async function queueLockPath(dbPath: string, queue: string): Promise<string> {
  return `${await Deno.realPath(localDatabasePath(dbPath) ?? dbPath)}@${queue}.lock`;
}

/**
 * Opens the lock file, taking its lock (exclusive, or shared to look) if it can. "held" when the
 * lock conflicts with another's.
 */
async function tryLock(path: string, exclusive: boolean): Promise<DatabaseSync | "held" | LockUnavailable> {
  if (exclusive) {
    // SQLite opens a file it cannot write read-only, without a word, and an "exclusive" transaction
    // there takes only a shared lock: a lock file this process cannot write locks nothing.
    try {
      (await Deno.open(path, { read: true, write: true, create: true })).close();
    } catch (err) {
      return { path, reason: (err as Error).message };
    }
  }
  const { DatabaseSync } = await import("node:sqlite");
  let db: DatabaseSync;
  try {
    db = new DatabaseSync(path, { readOnly: !exclusive });
  } catch (err) {
    return { path, reason: (err as Error).message };
  }
  try {
    // Never wait inside SQLite: that would block the event loop. Tries are repeated by the caller.
    db.exec("PRAGMA busy_timeout = 0");
    if (exclusive) {
      db.exec("PRAGMA journal_mode = MEMORY");
      db.exec("BEGIN EXCLUSIVE");
    } else {
      db.exec("BEGIN");
      db.prepare("SELECT count(*) FROM sqlite_master").get();
    }
    return db;
  } catch (err) {
    db.close();
    return isBusy(err) ? "held" : { path, reason: (err as Error).message };
  }
}

/**
 * Creates the lock file, if it is missing, with the database's permissions: whoever may write the
 * database may lock it (a database shared between users, a sync once run by another user).
 */
async function createLike(path: string, db: string): Promise<void> {
  try {
    (await Deno.open(path, { write: true, createNew: true })).close();
  } catch {
    return;
  }
  const mode = (await Deno.stat(db).catch(() => undefined))?.mode;
  if (typeof mode === "number") await Deno.chmod(path, mode & 0o666).catch(() => {});
}

/**
 * Takes the lock file of `queue` in the database at `dbPath` (which must exist). Resolves to the
 * lock; to "held" when another sync, in this process or another, holds it; to the reason when no
 * lock file can be used here (a file this process may not write, a file system without locks): the
 * writer lock in the database alone then guards the queue, and the caller should say so. Undefined
 * for a database that is not a local file.
 */
export async function lockQueueFile(
  dbPath: string,
  queue: string,
): Promise<QueueFileLock | "held" | LockUnavailable | undefined> {
  if (localDatabasePath(dbPath) === undefined) return undefined;
  let path: string;
  try {
    path = await queueLockPath(dbPath, queue);
  } catch (err) {
    return { path: `${dbPath}@${queue}.lock`, reason: (err as Error).message };
  }
  await createLike(path, localDatabasePath(dbPath)!);
  const until = performance.now() + TRY_FOR_MS;
  for (;;) {
    const db = await tryLock(path, true);
    if (db === "held") {
      if (performance.now() >= until) return "held";
      await delay(10 + Math.random() * 20);
      continue;
    }
    if (!("exec" in db)) return db;
    let held = true;
    return {
      path,
      id: await fileIdentity(path),
      release() {
        if (!held) return;
        held = false;
        // Closing ends the transaction and gives the lock back.
        db.close();
      },
    };
  }
}

/** The identity of the file at `path` on its file system (device and inode), when it has one. */
export async function fileIdentity(path: string): Promise<string | undefined> {
  const info = await Deno.stat(path).catch(() => undefined);
  return info?.ino != null ? `${info.dev}:${info.ino}` : undefined;
}

/**
 * Whether a process holds the lock file of `queue` in the database at `dbPath`: true or false, or
 * undefined when there is no lock file to ask (no sync of this version ran there, the path is not a
 * local file, or the file cannot be read). Looking takes a shared lock for a moment.
 */
export async function queueFileLocked(dbPath: string, queue: string): Promise<boolean | undefined> {
  if (localDatabasePath(dbPath) === undefined) return undefined;
  let path: string;
  try {
    path = await queueLockPath(dbPath, queue);
    await Deno.stat(path);
  } catch {
    return undefined;
  }
  const db = await tryLock(path, false);
  if (db === "held") return true;
  if (!("exec" in db)) return undefined;
  db.close();
  return false;
}
