import assert from "node:assert/strict";
import { runBackfillSync } from "../src/backfill.ts";
import { lockQueueFile, queueFileLocked } from "../src/queue/file_lock.ts";
import { openKvAt, queueKey, readCheckpoint } from "../src/queue/kv_queue.ts";
import { ConcurrentWriterError } from "../src/queue/writer.ts";
import { delay } from "../src/async.ts";
import { commit } from "./helpers/events.ts";
import { serveEvents, syncConnections, tempDb } from "./helpers/loopback.ts";
import type { JetstreamServer } from "../src/server/server.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;
const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const dec = new TextDecoder();

function cli(args: string[]): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
}

/**
 * Starts `jetfill sync` from T0 on `server`, which stays open, and resolves once the server sent all
 * `count` events and the sync had time to store them.
 */
async function syncAll(server: JetstreamServer, kv: string, count: number): Promise<Deno.ChildProcess> {
  const child = cli(["sync", "--instance", server.url, "--kv", kv, "--start", String(T0), "--json"]);
  while (!(syncConnections(server)[0]?.sent >= count)) await delay(50);
  await delay(1500);
  return child;
}

Deno.test("a sync is refused at once, reading and writing nothing, while its queue's lock file is held", async () => {
  const events = Array.from({ length: 5 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  (await openKvAt(db.path)).close();
  const held = await lockQueueFile(db.path, "jetstream_sync");
  assert.ok(held !== undefined && held !== "held", String(held));
  try {
    await assert.rejects(
      () => runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 }),
      (err) => {
        assert.ok(err instanceof ConcurrentWriterError, String(err));
        assert.match(
          err.message,
          /queue 'jetstream_sync' is being written by another sync right now \(a running process holds ".*queue\.sqlite-jetstream_sync\.lock"\): run one sync per queue, and resume this one once that one has stopped \(resume: true, or --resume\)$/,
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
  first.kill("SIGKILL");
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
  first.kill("SIGSTOP");
  try {
    // Longer than a sync waits for a sign of life in the database (10 s): by that alone, the paused
    // sync would be taken for crashed and its queue taken over.
    await delay(11_000);
    const status = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", CLI, "status", "--kv", db.path, "--json"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const s = JSON.parse(dec.decode(status.stdout));
    assert.equal(s.lockFile.held, true);
    assert.match(s.lockFile.path, /queue\.sqlite-jetstream_sync\.lock$/);
    assert.ok(s.writer, "no writer in the status");
    const second = await cli([
      "sync",
      "--instance",
      server.url,
      "--kv",
      db.path,
      "--resume",
      "--max-time",
      "3",
      "--json",
    ]).output();
    assert.equal(second.code, 1, dec.decode(second.stderr));
    assert.match(
      dec.decode(second.stderr),
      /is being written by another sync right now \(a running process holds/,
    );
  } finally {
    first.kill("SIGCONT");
  }
  await delay(500);
  first.kill("SIGINT");
  const out = await first.output();
  assert.equal(out.code, 130, dec.decode(out.stderr));
  const stats = JSON.parse(dec.decode(out.stdout));
  assert.equal(stats.error, undefined);
  assert.equal(stats.recordsStored, 20);
  assert.equal(await queueFileLocked(db.path, "jetstream_sync"), false);
});
