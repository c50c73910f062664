import assert from "node:assert/strict";
import { runBackfillSync } from "../src/backfill.ts";
import { lockQueueFile, type QueueFileLock, queueFileLocked } from "../src/queue/file_lock.ts";
import { openKvAt, queueKey, readCheckpoint } from "../src/queue/kv_queue.ts";
import { ConcurrentWriterError } from "../src/queue/writer.ts";
import { delay } from "../src/async.ts";
import { UsageError } from "../src/errors.ts";
import { pathToFileURL as toFileUrlNode } from "node:url";
import { commit } from "./helpers/events.ts";
import { serveEvents, syncConnections, tempDb } from "./helpers/loopback.ts";
import type { JetstreamServer } from "../src/server/server.ts";
import { killIfRunning, runCli, spawnCli, syncArgs, whileRunning } from "./helpers/cli.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const dec = new TextDecoder();

/** Takes the lock file of `queue` in the database at `path`, which must be free. */
async function take(path: string, queue = "jetstream_sync"): Promise<QueueFileLock> {
  const lock = await lockQueueFile(path, queue);
  assert.ok(lock && typeof lock === "object" && "release" in lock, JSON.stringify(lock));
  return lock;
}

/** Stops `child`, a sync that stored `records`, with Ctrl-C: it ends cleanly, its records stored. */
async function interruptCleanly(child: Deno.ChildProcess, records: number): Promise<void> {
  killIfRunning(child, "SIGINT");
  const out = await child.output();
  assert.equal(out.code, 130, dec.decode(out.stderr));
  const stats = JSON.parse(dec.decode(out.stdout));
  assert.equal(stats.error, undefined);
  assert.equal(stats.recordsStored, records);
}

/**
 * Starts `jetfill sync` from T0 on `server`, which stays open, and resolves once the server sent all
 * `count` events and the sync had time to store them.
 */
async function syncAll(server: JetstreamServer, kv: string, count: number): Promise<Deno.ChildProcess> {
  const child = spawnCli(syncArgs(server.url, kv, T0, "--json"));
  await whileRunning(child, () => syncConnections(server)[0]?.sent >= count);
  await delay(1500);
  return child;
}

Deno.test("a sync is refused at once, reading and writing nothing, while its queue's lock file is held", async () => {
  const events = Array.from({ length: 5 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  (await openKvAt(db.path)).close();
  const held = await take(db.path);
  try {
    await assert.rejects(
      () => runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 }),
      (err) => {
        assert.ok(err instanceof ConcurrentWriterError, String(err));
        assert.match(
          err.message,
          /queue 'jetstream_sync' is being written by another sync right now \(a running process holds ".*queue\.sqlite@jetstream_sync\.lock"; lsof or fuser on that file shows which\): let that sync finish or stop it, then run again \(--resume \/ resume: true continues its run\); a separate run needs a database of its own \(--kv \/ kv\), as a database holds one queue$/,
        );
        return true;
      },
    );
    assert.equal(server.connections.length, 0, "it connected");
    const kv = await Deno.openKv(db.path);
    assert.equal((await readCheckpoint(kv, "jetstream_sync")).versionstamp, null);
    assert.equal((await kv.get(queueKey("jetstream_sync", "writer"))).versionstamp, null);
    kv.close();
    assert.equal(await queueFileLocked(db.path, "jetstream_sync"), true);
    // Another queue of the same database has a lock file of its own.
    const other = await runBackfillSync({
      instance: server.url,
      kv: db.path,
      startTimestamp: T0,
      queueName: "other",
    });
    assert.equal(other.recordsStored, 5);
  } finally {
    held.release();
  }
  assert.equal(await queueFileLocked(db.path, "jetstream_sync"), false);
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 });
  assert.equal(stats.recordsStored, 5);
  // The run gave it back.
  assert.equal(await queueFileLocked(db.path, "jetstream_sync"), false);
});

Deno.test("the lock file of a sync killed with SIGKILL is free at once: the next sync resumes", async () => {
  const events = Array.from({ length: 30 }, (_, i) => commit(T0 + i * 1000));
  // Stays open after the capture: the first sync runs until it is killed.
  await using server = serveEvents(events);
  await using db = await tempDb();
  const first = await syncAll(server, db.path, events.length);
  assert.equal(await queueFileLocked(db.path, "jetstream_sync"), true);
  killIfRunning(first, "SIGKILL");
  await first.output();
  assert.equal(await queueFileLocked(db.path, "jetstream_sync"), false);
  const stats = await runBackfillSync({ kv: db.path, resume: true, maxTime: 2 });
  assert.equal(stats.error, undefined);
  assert.equal(stats.latestCursor, events[29].time_us);
});

Deno.test("a paused sync keeps its queue: a second sync is refused however long the first was silent, and the first then ends cleanly", async () => {
  const events = Array.from({ length: 20 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events);
  await using db = await tempDb();
  const first = await syncAll(server, db.path, events.length);
  killIfRunning(first, "SIGSTOP");
  try {
    // Longer than a sync waits for a sign of life in the database (10 s): by that alone, the paused
    // sync would be taken for crashed and its queue taken over.
    await delay(11_000);
    const s = JSON.parse((await runCli(["status", "--kv", db.path, "--json"])).stdout);
    assert.equal(s.lockFile.held, true);
    assert.match(s.lockFile.path, /queue\.sqlite@jetstream_sync\.lock$/);
    assert.ok(s.writer, "no writer in the status");
    const second = await runCli([
      "sync",
      "--instance",
      server.url,
      "--kv",
      db.path,
      "--resume",
      "--max-time",
      "3",
    ]);
    assert.equal(second.code, 1, second.stderr);
    assert.match(second.stderr, /is being written by another sync right now \(a running process holds/);
  } finally {
    killIfRunning(first, "SIGCONT");
  }
  await delay(500);
  await interruptCleanly(first, 20);
  assert.equal(await queueFileLocked(db.path, "jetstream_sync"), false);
});

Deno.test("lock files of different databases and queues never share a name", async () => {
  await using db = await tempDb();
  // "feeds" with queue "posts-en" and "feeds-posts" with queue "en": joined by "-", one name.
  for (const name of ["feeds", "feeds-posts"]) (await openKvAt(`${db.dir}/${name}`)).close();
  const a = await take(`${db.dir}/feeds`, "posts-en");
  const b = await take(`${db.dir}/feeds-posts`, "en");
  assert.notEqual(a.path, b.path);
  a.release();
  b.release();
});

Deno.test("looking whether a lock file is held does not make it held, for another look or for a sync", async () => {
  await using db = await tempDb();
  (await openKvAt(db.path)).close();
  (await take(db.path)).release();
  // A look in progress (a shared lock, as `jetfill status` takes it for a moment).
  const { DatabaseSync } = await import("node:sqlite");
  const looking = new DatabaseSync(`${await Deno.realPath(db.path)}@jetstream_sync.lock`, { readOnly: true });
  looking.exec("BEGIN");
  looking.prepare("SELECT count(*) FROM sqlite_master").get();
  try {
    assert.equal(await queueFileLocked(db.path, "jetstream_sync"), false);
  } finally {
    looking.close();
  }
  // Once the look is over, a sync takes the lock.
  (await take(db.path)).release();
});

Deno.test("a database with two names (hard links) is refused before anything is written", async () => {
  const events = [commit(T0)];
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  (await openKvAt(db.path)).close();
  await Deno.link(db.path, `${db.dir}/other-name.sqlite`);
  for (const kv of [db.path, `${db.dir}/other-name.sqlite`]) {
    await assert.rejects(
      () => runBackfillSync({ instance: server.url, kv, startTimestamp: T0 }),
      (err) => {
        assert.ok(err instanceof UsageError, String(err));
        assert.match(
          err.message,
          /the file has several names \(hard links\).*give the database a single name/,
        );
        return true;
      },
    );
  }
  assert.equal(server.connections.length, 0);
  // Not even SQLite's log files beside either name (a read-only look makes them).
  assert.deepEqual([...Deno.readDirSync(db.dir)].map((e) => e.name).sort(), [
    "other-name.sqlite",
    "queue.sqlite",
  ]);
});

Deno.test("the temporary name a killed creation of the database left is removed, and the database opens", async () => {
  const events = [commit(T0)];
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  (await openKvAt(db.path)).close();
  // A kill -9 between linking the new database into place and removing its temporary name.
  const stray = `${db.path}.${crypto.randomUUID()}.new`;
  await Deno.link(db.path, stray);
  // (Before, every command refused it: "the file has several names".)
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 });
  assert.equal(stats.recordsStored, 1);
  assert.equal(await Deno.stat(stray).then(() => true, () => false), false, "the temporary name is gone");
  assert.equal((await Deno.stat(db.path)).nlink, 1);
});

Deno.test("a sync whose lock file cannot be written says so, and goes on with the writer lock alone", async () => {
  const events = Array.from({ length: 3 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  (await openKvAt(db.path)).close();
  const lock = `${await Deno.realPath(db.path)}@jetstream_sync.lock`;
  await Deno.writeFile(lock, new Uint8Array());
  // (Tests run as root, for whom file modes do not forbid writing: Deno's permissions do.)
  const out = await runCli(syncArgs(server.url, db.path, T0, "--json"), [`--deny-write=${lock}`]);
  assert.equal(out.code, 0, out.stderr);
  assert.equal(JSON.parse(out.stdout).recordsStored, 3);
  assert.match(
    out.stderr,
    /^jetfill sync: warning: cannot use the lock file ".*@jetstream_sync\.lock" \(.+\); only the writer lock in the database keeps another sync out/m,
  );
});

Deno.test("a sync finding the writer lock of a sync that held the lock file, now free, does not wait for signs of life", async () => {
  const events = Array.from({ length: 3 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  // As a sync leaves the queue when it is killed: its writer lock, just written, saying whether it
  // held the lock file.
  const afterKilled = async (lockFile: boolean) => {
    await using db = await tempDb();
    const kv = await openKvAt(db.path);
    await kv.set(queueKey("jetstream_sync", "writer"), { run: "killed", at: Date.now(), lockFile });
    kv.close();
    const started = performance.now();
    const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 });
    assert.equal(stats.recordsStored, 3);
    assert.equal(stats.error, undefined);
    return performance.now() - started;
  };
  // Without the lock file, the killed sync may be alive: the next one watches for 2 s (LIVE_WRITER_MS).
  const watched = await afterKilled(false);
  const free = await afterKilled(true);
  assert.ok(watched >= 2000, `the watch took ${watched} ms`);
  assert.ok(free < watched - 1000, `took ${free} ms, against ${watched} ms with the watch`);
});

Deno.test("a lock file deleted while its sync runs is not taken for that sync's: the next sync watches for signs of life, and is refused", async () => {
  const events = Array.from({ length: 20 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events);
  await using db = await tempDb();
  const first = await syncAll(server, db.path, events.length);
  try {
    // (A clean-up of stale files, say.) The next sync makes a new lock file and finds it free.
    await Deno.remove(`${db.path}@jetstream_sync.lock`);
    await assert.rejects(
      () => runBackfillSync({ instance: server.url, kv: db.path, resume: true, maxTime: 3 }),
      (err) =>
        err instanceof ConcurrentWriterError &&
        /is being written by another sync right now/.test(err.message),
    );
    // The lock file there now (the refused sync's) is not the running one's: status goes by its
    // signs of life, not by that file being free.
    const status = await runCli(["status", "--kv", db.path]);
    assert.match(status.stdout, /^writer {14}a sync is running: run /m);
    const json = JSON.parse((await runCli(["status", "--kv", db.path, "--json"])).stdout);
    assert.equal(json.writer.lockFile, false);
    assert.equal(json.lockFile.held, false);
  } catch (err) {
    killIfRunning(first, "SIGKILL");
    await first.output();
    throw err;
  }
  await interruptCleanly(first, 20);
});

Deno.test("a file: URL names the database like its path, lock file included", async () => {
  const events = Array.from({ length: 3 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const url = toFileUrlNode(db.path).href;
  const stats = await runBackfillSync({ instance: server.url, kv: url, startTimestamp: T0 });
  assert.equal(stats.recordsStored, 3);
  assert.deepEqual([...Deno.readDirSync(db.dir)].map((e) => e.name).sort(), [
    "queue.sqlite",
    "queue.sqlite@jetstream_sync.lock",
  ]);
  const status = await runCli(["status", "--kv", url, "--json"]);
  assert.equal(status.code, 0, status.stderr);
  const s = JSON.parse(status.stdout);
  assert.equal(s.recordsStored, 3);
  assert.deepEqual(s.lockFile, { path: `${await Deno.realPath(db.path)}@jetstream_sync.lock`, held: false });
});
