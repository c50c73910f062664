/**
 * `queueLength`: the messages waiting in a queue, counted in Deno KV's own queue for a database opened
 * by path, so that what a plain `listenQueue` took is not counted.
 */
import assert from "node:assert/strict";
import { runBackfillSync } from "../src/backfill.ts";
import type { BackfillSyncOptions } from "../src/options.ts";
import type { SyncStats } from "../src/stats.ts";
import { openKvAt } from "../src/queue/kv_queue.ts";
import { queueLength, queueStatus } from "../src/queue/status.ts";
import { delay } from "../src/async.ts";
import { consume } from "../src/queue/consume.ts";
import { formatStatus } from "../src/cli/status.ts";
import { UsageError } from "../src/errors.ts";
import { deadLetters, requeueDeadLetters } from "../src/queue/dead_letters.ts";
import { requeueParked } from "../src/queue/parking.ts";
import { commit, did } from "./helpers/events.ts";
import { serveEvents, tempDb } from "./helpers/loopback.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const EVENTS = Array.from(
  { length: 1000 },
  (_, i) => commit(T0 + i * 1000, { did: did(i % 7), text: `post ${i}` }),
);

/** A sync of {@link EVENTS} from `server` into `path` from T0, 50 records a message. */
function syncOf(
  server: { url: string },
  path: string,
  numRecords: number,
  more: Partial<BackfillSyncOptions> = {},
): Promise<SyncStats> {
  return runBackfillSync({
    instance: server.url,
    kv: path,
    startTimestamp: T0,
    numRecords,
    batchSize: 50,
    ...more,
  });
}

/** Takes `count` messages with a plain `listenQueue`, as another program would, and lets KV settle. */
async function plainListener(path: string, count: number): Promise<void> {
  const kv = await Deno.openKv(path);
  let taken = 0;
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  const listening = kv.listenQueue(() => {
    if (++taken === count) done();
  });
  const timer = setTimeout(done, 10_000);
  await finished;
  clearTimeout(timer);
  // The last handler's acknowledgement is committed after it returns.
  await delay(500);
  kv.close();
  await listening;
  assert.equal(taken, count);
}

Deno.test("a sync's queueLength counts what Deno KV's queue holds: messages a plain listenQueue took do not count", async () => {
  await using server = serveEvents(EVENTS, { closeAtEnd: true });
  await using db = await tempDb();
  const sync = (start: number, numRecords: number) =>
    syncOf(server, db.path, numRecords, { startTimestamp: start });
  const first = await sync(T0, 300);
  assert.equal(first.queueLength, 6);
  await plainListener(db.path, 6);
  const second = await sync(T0 + 500_000, 100);
  assert.equal(second.recordsStored, 100);
  // Before, enqueued minus handled by consume(): 8.
  assert.equal(second.queueLength, 2);
  const kv = await openKvAt(db.path);
  try {
    const status = await queueStatus(kv, "jetstream_sync");
    assert.equal(status.messagesEnqueued, 8);
    assert.equal(status.messagesWaiting, 2);
    assert.equal(status.recordsWaiting, 100);
    assert.equal(status.queueLength, 2);
    // The readable status says where the rest went, so that its figures add up.
    assert.ok(
      formatStatus(status, db.path).split("\n").includes(
        "taken elsewhere     300 records in 6 messages (by a reader other than jetfill export and consume(), such as a plain listenQueue)",
      ),
      formatStatus(status, db.path),
    );
  } finally {
    kv.close();
  }
});

Deno.test("two queues in one database: each one's queueLength counts its own messages in Deno KV's queue", async () => {
  await using server = serveEvents(EVENTS, { closeAtEnd: true });
  await using db = await tempDb();
  const sync = (queueName: string, numRecords: number) => syncOf(server, db.path, numRecords, { queueName });
  assert.equal((await sync("first", 150)).queueLength, 3);
  assert.equal((await sync("second", 250)).queueLength, 5);
  await plainListener(db.path, 8);
  // Not taken by a listener: the second queue's next run.
  const again = await syncOf(server, db.path, 100, { queueName: "second", startTimestamp: T0 + 600_000 });
  assert.equal(again.queueLength, 2);
  const kv = await openKvAt(db.path);
  try {
    assert.equal(await queueLength(kv, "first"), 0);
    assert.equal(await queueLength(kv, "second"), 2);
    const status = await queueStatus(kv, "second");
    assert.deepEqual([status.messagesWaiting, status.recordsWaiting], [2, 100]);
  } finally {
    kv.close();
  }
});

Deno.test("consume({ untilEmpty }) after a plain listenQueue took the messages stops as empty, not idle", async () => {
  await using server = serveEvents(EVENTS, { closeAtEnd: true });
  await using db = await tempDb();
  const stats = await syncOf(server, db.path, 300);
  assert.equal(stats.queueLength, 6);
  await plainListener(db.path, 6);
  let handled = 0;
  const result = await consume({
    kv: db.path,
    untilEmpty: true,
    // The counters still say 6 wait: before, consume() waited this long for them, then said idle.
    emptyTimeout: 8_000,
    handler: () => {
      handled++;
    },
  });
  assert.equal(result.stopReason, "empty");
  assert.equal(handled, 0);
});

Deno.test("queueLength of a database opened by a relative path reads that database after a change of folder", async () => {
  await using server = serveEvents(EVENTS, { closeAtEnd: true });
  await using db = await tempDb();
  const stats = await syncOf(server, db.path, 100);
  assert.equal(stats.queueLength, 2);
  const here = Deno.cwd();
  const name = db.path.slice(db.dir.length + 1);
  Deno.chdir(db.dir);
  const kv = await openKvAt(name);
  // Elsewhere, an empty database of the same name.
  const other = await Deno.makeTempDir({ prefix: "jetfill_elsewhere_" });
  try {
    Deno.chdir(other);
    (await openKvAt(name)).close();
    assert.equal(await queueLength(kv, "jetstream_sync"), 2);
  } finally {
    Deno.chdir(here);
    kv.close();
    await Deno.remove(other, { recursive: true });
  }
});

Deno.test("consume({ untilEmpty }) of a queue whose messages a plain listener took stops as empty while another queue's messages keep coming back", async () => {
  await using server = serveEvents(EVENTS, { closeAtEnd: true });
  await using db = await tempDb();
  const sync = (queueName: string, numRecords: number) => syncOf(server, db.path, numRecords, { queueName });
  assert.equal((await sync("first", 150)).queueLength, 3);
  assert.equal((await sync("second", 250)).queueLength, 5);
  // A plain listener takes the first queue's messages and leaves the second's (it fails them).
  const plain = await Deno.openKv(db.path);
  let taken = 0;
  const listening = plain.listenQueue((m) => {
    if ((m as { queue?: string }).queue !== "first") throw new Error("not mine");
    taken++;
  });
  for (const until = Date.now() + 10_000; taken < 3 && Date.now() < until;) await delay(50);
  await delay(500);
  plain.close();
  await listening;
  assert.equal(taken, 3);
  const result = await consume({
    kv: db.path,
    queueName: "first",
    untilEmpty: true,
    handler: () => {},
    onError: () => {},
    // Before, the second queue's messages, put back every 2 s, kept it from ever stopping.
    signal: AbortSignal.timeout(40_000),
  });
  assert.equal(result.stopReason, "empty");
  assert.equal(result.messages, 0);
});

Deno.test("consume({ untilEmpty }) waits for a message that Deno KV's queue holds for a retry, rather than stop as idle", async () => {
  await using server = serveEvents(EVENTS, { closeAtEnd: true });
  await using db = await tempDb();
  await syncOf(server, db.path, 100);
  // A consumer whose handler fails: after its third try, KV retries each message 5 s later.
  const failing = new AbortController();
  let tries = 0;
  const first = consume({
    kv: db.path,
    handler: () => {
      if (++tries === 6) setTimeout(() => failing.abort(), 300);
      throw new Error("not now");
    },
    onError: () => {},
    signal: failing.signal,
  });
  await first;
  assert.ok(tries >= 6, String(tries));
  let handled = 0;
  const result = await consume({
    kv: db.path,
    untilEmpty: true,
    // Before, it stopped as idle this long after it began, seconds before the retries came.
    emptyTimeout: 2_000,
    handler: () => {
      handled++;
    },
    onError: () => {},
    signal: AbortSignal.timeout(60_000),
  });
  assert.equal(result.stopReason, "empty");
  assert.equal(handled, 2);
});

Deno.test("`queueStatus()`, `queueLength()` and the repair functions refuse a queue name the database never held, and one that breaks the rule", async () => {
  await using db = await tempDb();
  const kv = await openKvAt(db.path);
  try {
    await kv.set(["jetfill", "posts", "checkpoint"], { v: 1 });
    for (const read of [queueStatus, queueLength, deadLetters, requeueDeadLetters, requeueParked]) {
      // (Before, each gave zeros: a mistyped name looked like an empty queue.)
      await assert.rejects(
        () => read(kv, "post"),
        (err: unknown) =>
          err instanceof UsageError &&
          err.message.endsWith(` as queue 'post' has nothing in ${db.path}, which holds 'posts'`),
      );
      await assert.rejects(
        () => read(kv, "no such/queue!"),
        (err: unknown) =>
          err instanceof UsageError &&
          err.message.endsWith(
            `as the queue name must be 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit: current value is "no such/queue!"`,
          ),
      );
    }
    assert.equal(await queueLength(kv, "posts"), 0);
  } finally {
    kv.close();
  }
  // A database that holds no queue yet: any valid name is an empty queue.
  const empty = await Deno.openKv(":memory:");
  try {
    assert.equal(await queueLength(empty, "jetstream_sync"), 0);
  } finally {
    empty.close();
  }
});
