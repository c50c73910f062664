/**
 * consume(): real Deno KV files in temp folders, messages written by the real QueueWriter, and real
 * subprocesses for the cross-process cases (this file is also their script: `deno run` it with a role).
 */
import assert from "node:assert/strict";
import type { JetstreamEvent } from "../src/jetstream/events.ts";
import {
  ACK_DEADLINE_MS,
  consume,
  type ConsumeErrorReport,
  type ConsumeOptions,
} from "../src/queue/consume.ts";
import { deadLetters, requeueDeadLetters } from "../src/queue/dead_letters.ts";
import {
  PARK_CONFIRM_MS,
  PARK_HEARTBEAT_MS,
  PARK_STALE_MS,
  parkedKey,
  parkedSeqKey,
  requeueParked,
} from "../src/queue/parking.ts";
import { queueStatus } from "../src/queue/status.ts";
import { openKvAt, queueKey } from "../src/queue/kv_queue.ts";
import { queueLength } from "../src/queue/status.ts";
import type { QueueMessage } from "../src/queue/message.ts";
import { generateCapture } from "../src/server/synth.ts";
import { produce } from "./helpers/produce.ts";
import { patchAtomic } from "./helpers/kv_patch.ts";
import { commit } from "./helpers/events.ts";
import { UsageError } from "../src/errors.ts";
import { killIfRunning, statusWithin } from "./helpers/cli.ts";
import { backlog, eachLine, kvQueueTables, listParked, Q, sleep, tempDb } from "./helpers/consume.ts";

function message(seq: number, events: JetstreamEvent[], queue = Q): QueueMessage {
  return { v: 1, queue, seq, cursor: events.at(-1)?.time_us ?? 0, records: events };
}

/**
 * Writes messages of one record as consumer run `run` parks them; `enqueued` counts them in the
 * queue's counters too, as for messages no sync wrote.
 */
async function parkAs(kv: Deno.Kv, run: string, seqs: number[], enqueued: boolean): Promise<void> {
  for (const seq of seqs) {
    const op = kv.atomic();
    if (enqueued) op.sum(queueKey(Q, "count", "messages"), 1n).sum(queueKey(Q, "count", "records"), 1n);
    await op.set(parkedKey(Q, { run, seq }), message(seq, [commit(seq)]))
      .set(parkedSeqKey(Q, { run, seq }), true)
      .commit();
  }
}

Deno.test("consume() hands over every stored event once, in seq order, and drains the counters", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await Deno.openKv(path);
    const stored = await produce(kv, generateCapture({ count: 1200, seed: 7 }), { batchSize: 40 });
    const before = await queueStatus(kv, Q);
    kv.close();
    assert.equal(before.messagesWaiting, before.messagesEnqueued);
    assert.equal(before.recordsWaiting, 1200);

    const seen: JetstreamEvent[] = [];
    const seqs: number[] = [];
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handler: (events, ctx) => {
        seqs.push(ctx.seq);
        seen.push(...events);
        // The array is the handler's own: emptying it changes no count. (Before, the counts were
        // taken from it after the handler, and came to 0.)
        events.length = 0;
      },
    });
    assert.equal(result.stopReason, "empty");
    assert.equal(result.records, 1200);
    assert.equal(result.messages, before.messagesEnqueued);
    assert.equal(result.duplicates, 0);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "handled in seq order");
    assert.deepEqual(seen, stored);

    const kv2 = await Deno.openKv(path);
    const after = await queueStatus(kv2, Q);
    assert.equal(await queueLength(kv2, Q), 0);
    assert.equal(after.messagesHandled, before.messagesEnqueued);
    assert.equal(after.recordsHandled, 1200);
    assert.equal(after.messagesWaiting, 0);
    assert.equal(after.recordsWaiting, 0);
    kv2.close();
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 }, "every delivery was acknowledged");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() until empty refuses a database that does not exist (or an empty file), and creates nothing", async () => {
  const { dir, path } = await tempDb();
  try {
    const refuses = (kv: string) =>
      assert.rejects(
        () => consume({ kv, untilEmpty: true, handler: () => {} }),
        (err: unknown) =>
          err instanceof UsageError &&
          err.message ===
            `Cannot consume as the database ${
              JSON.stringify(kv)
            } does not exist or is an empty file (check 'kv' and 'queueName')`,
      );
    await refuses(path);
    assert.deepEqual(await Array.fromAsync(Deno.readDir(dir)), []);
    const empty = `${dir}/empty.sqlite`;
    await Deno.writeTextFile(empty, "");
    await refuses(empty);
    assert.deepEqual((await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name), ["empty.sqlite"]);
    assert.equal((await Deno.stat(empty)).size, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() skips a redelivered seq and a second consume() finds nothing", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await Deno.openKv(path);
    const stored = await produce(kv, generateCapture({ count: 30, seed: 3 }), { batchSize: 10 });
    // A copy of message 2, as KV makes when it requeues a message whose acknowledgement was lost.
    await kv.enqueue(message(2, stored.slice(10, 20)));
    kv.close();
    let calls = 0;
    const first = await consume({ kv: path, untilEmpty: true, handler: () => void calls++ });
    assert.equal(first.messages, 3);
    assert.equal(first.duplicates, 1);
    assert.equal(calls, 3);
    const second = await consume({ kv: path, untilEmpty: true, handler: () => void calls++ });
    assert.equal(second.messages, 0);
    assert.equal(second.stopReason, "empty");
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/**
 * Enqueues `msg` as jetfill's writer does (dead-letter key, counters), but with a short backoff
 * schedule: the writer's is KV's default, whose retries take 96 s to run out.
 */
async function enqueueLikeWriter(kv: Deno.Kv, msg: QueueMessage, backoffSchedule: number[]): Promise<void> {
  const res = await kv.atomic()
    .enqueue(msg, { backoffSchedule, keysIfUndelivered: [queueKey(msg.queue, "dead", msg.seq)] })
    .sum(queueKey(msg.queue, "count", "messages"), 1n)
    .sum(queueKey(msg.queue, "count", "records"), BigInt(msg.records.length))
    .commit();
  assert.ok(res.ok);
}

Deno.test("consume() leaves a throwing handler's message for redelivery, then to its dead letter", async () => {
  const { dir, path } = await tempDb();
  try {
    const events = generateCapture({ count: 20, seed: 5 }).map((l) => JSON.parse(l) as JetstreamEvent);
    const kv = await Deno.openKv(path);
    await enqueueLikeWriter(kv, message(1, events.slice(0, 10)), [50, 50, 50]);
    await enqueueLikeWriter(kv, message(2, events.slice(10)), [50, 50, 50]);
    kv.close();
    const attempts = new Map<number, number>();
    const errors: ConsumeErrorReport[] = [];
    const result = await consume({
      kv: path,
      untilEmpty: true,
      onError: (r) => errors.push(r),
      handler: (_events, { seq }) => {
        attempts.set(seq, (attempts.get(seq) ?? 0) + 1);
        if (seq === 2) throw new Error(`attempt ${attempts.get(seq)} fails`);
        if (attempts.get(seq) === 1) throw new Error("fails once");
      },
    });
    assert.equal(result.stopReason, "empty", "a dead-lettered message no longer counts as waiting");
    assert.equal(attempts.get(1), 2, "message 1 redelivered once, then handled");
    assert.equal(attempts.get(2), 4, "message 2 delivered once and retried 3 times");
    assert.equal(result.messages, 1);
    assert.equal(result.failures, 5);
    assert.equal(errors.length, 5);
    assert.ok(errors.every((e) => e.reason === "handler"));

    const kv2 = await Deno.openKv(path);
    const dead = await deadLetters(kv2, Q);
    assert.equal(dead.length, 1);
    assert.equal(dead[0].seq, 2);
    assert.equal(dead[0].records, 10);
    assert.equal(dead[0].handled, false);
    assert.deepEqual((dead[0].message as QueueMessage).records, events.slice(10));
    const status = await queueStatus(kv2, Q);
    assert.equal(status.deadLetters, 1);
    assert.equal(status.deadRecords, 10);
    assert.equal(status.messagesWaiting, 0);
    assert.equal(status.queueLength, 1, "queueLength() counts what is not handled, dead letters included");

    // After the fix: requeue the dead letter, and consume it.
    assert.equal(await requeueDeadLetters(kv2, Q), 1);
    assert.equal((await deadLetters(kv2, Q)).length, 0);
    let got: JetstreamEvent[] = [];
    const again = await consume({ kv: kv2, untilEmpty: true, handler: (evs) => void (got = evs) });
    assert.equal(again.messages, 1);
    assert.deepEqual(got, events.slice(10));
    const final = await queueStatus(kv2, Q);
    assert.deepEqual([final.messagesHandled, final.recordsHandled, final.queueLength], [2, 20, 0]);
    kv2.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("requeueDeadLetters() hands back a dead letter that a read makes larger than KV's limit", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await Deno.openKv(path);
    const event = manySmallNumbers(1);
    await enqueueLikeWriter(kv, message(1, [event]), [50]);
    const failed = await consume({
      kv,
      untilEmpty: true,
      onError: () => {},
      handler: () => Promise.reject(new Error("no")),
    });
    assert.deepEqual([failed.messages, (await deadLetters(kv, Q)).length], [0, 1]);
    // Read back, the dead letter's array of 20,000 numbers would be written 60 KB larger.
    assert.equal(await requeueDeadLetters(kv, Q), 1);
    let got: JetstreamEvent[] = [];
    const again = await consume({ kv, untilEmpty: true, handler: (evs) => void (got = evs) });
    kv.close();
    assert.equal(again.messages, 1);
    assert.deepEqual(got, [event]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() times out a handler past handlerTimeout, aborts its signal, and gets the message again", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 10, 11, 10);
    let calls = 0;
    let aborted: unknown;
    const errors: ConsumeErrorReport[] = [];
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handlerTimeout: 200,
      onError: (r) => errors.push(r),
      handler: async (_events, { signal, timeLeft }) => {
        calls++;
        assert.ok(timeLeft <= 200);
        if (calls > 1) return;
        await new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve()));
        aborted = signal.reason;
      },
    });
    assert.equal(calls, 2);
    assert.equal((aborted as Error).name, "TimeoutError");
    assert.deepEqual([result.messages, result.failures, result.timeouts], [1, 1, 1]);
    assert.equal(errors.length, 1);
    assert.equal(errors[0].reason, "timeout");
    assert.match(errors[0].message, /ran past its 200 ms; the message will be redelivered/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() puts back another queue's message for its own consumer", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await Deno.openKv(path);
    await produce(kv, generateCapture({ count: 20, seed: 12 }), { batchSize: 20 });
    await produce(kv, generateCapture({ count: 5, seed: 13 }), { queue: "other", batchSize: 5 });
    kv.close();
    const errors: ConsumeErrorReport[] = [];
    const mine = await consume({
      kv: path,
      untilEmpty: true,
      onError: (r) => errors.push(r),
      handler: () => {},
    });
    assert.equal(mine.records, 20);
    assert.ok(mine.foreign >= 1);
    assert.equal(errors[0].reason, "foreign");
    assert.match(errors[0].message, /message 1 of queue 'other' is not this queue's \('jetstream_sync'\)/);
    let got = 0;
    const theirs = await consume({
      kv: path,
      queueName: "other",
      untilEmpty: true,
      handler: (events) => void (got += events.length),
    });
    assert.equal(theirs.messages, 1);
    assert.equal(got, 5);
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() until empty stops while another queue's backlog keeps coming back", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await Deno.openKv(path);
    await produce(kv, generateCapture({ count: 1000, seed: 22 }), { batchSize: 10 });
    // 1000 messages of another queue that nobody consumes: put back every 2 s, they never stop coming.
    await produce(kv, generateCapture({ count: 20_000, seed: 23 }), { queue: "other", batchSize: 20 });
    kv.close();
    let records = 0;
    const result = await consume({
      kv: path,
      untilEmpty: true,
      // Only so that a consumer that never stops fails the test instead of hanging it.
      signal: AbortSignal.timeout(30_000),
      handler: (events) => void (records += events.length),
    });
    assert.equal(result.stopReason, "empty");
    assert.equal(records, 1000);
    assert.ok(result.foreign > 0);
    const kv2 = await Deno.openKv(path);
    assert.equal(
      (await queueStatus(kv2, "other")).messagesWaiting,
      1000,
      "the other queue's messages are all kept",
    );
    kv2.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() on a Deno.Kv gets what the same process enqueues at once, and stops on signal", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const ac = new AbortController();
    const seen: number[] = [];
    const latencies: number[] = [];
    const consuming = consume({
      kv,
      signal: ac.signal,
      handler: (events, { seq }) => {
        seen.push(seq);
        latencies.push(Date.now() - events[0].time_us / 1000);
        if (seen.length === 5) ac.abort();
      },
    });
    const base = JSON.parse(generateCapture({ count: 1, seed: 14 })[0]) as JetstreamEvent;
    for (let i = 0; i < 5; i++) {
      const ev = { ...base, time_us: Date.now() * 1000 };
      await produce(kv, [JSON.stringify(ev)], { batchSize: 1 });
      await sleep(30);
    }
    const result = await consuming;
    assert.equal(result.stopReason, "aborted");
    assert.deepEqual(seen, [1, 2, 3, 4, 5]);
    assert.ok(Math.max(...latencies) < 500, `same-process latency ${latencies}`);
    assert.equal(await queueLength(kv, Q), 0);
  } finally {
    kv.close();
  }
});

Deno.test("consume() rejects bad options with a UsageError that names them, before opening anything", async () => {
  const handler = () => {};
  const cases: [unknown, string][] = [
    [{ handler: undefined }, "Cannot consume as 'handler' must be a function: current value is undefined"],
    [
      { handler, concurrency: 0 },
      "Cannot consume as 'concurrency' must be an integer from 1 to 100: current value is 0",
    ],
    [
      { handler, concurrency: 101 },
      "Cannot consume as 'concurrency' must be an integer from 1 to 100: current value is 101",
    ],
    [
      { handler, handlerTimeout: -1 },
      "Cannot consume as 'handlerTimeout' must be a positive number: current value is -1",
    ],
    [
      { handler, emptyTimeout: NaN },
      "Cannot consume as 'emptyTimeout' must be a positive number: current value is NaN",
    ],
    [
      { handler, pollInterval: 0 },
      "Cannot consume as 'pollInterval' must be a positive number: current value is 0",
    ],
    [
      { handler, queueName: "a/b" },
      `Cannot consume as 'queueName' must be 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit: current value is "a/b"`,
    ],
    [{ handler, kv: {} }, "Cannot consume as 'kv' must be a Deno.Kv or a database path: current value is {}"],
    [{ handler, kv: "" }, `Cannot consume as 'kv' must be a Deno.Kv or a database path: current value is ""`],
    [
      { handler, kv: ":memory:" },
      `Cannot consume as 'kv' must be a Deno.Kv or a database path: current value is ":memory:", a database in memory that would be gone when the call returns (open it with Deno.openKv(":memory:") and pass that Deno.Kv)`,
    ],
    [
      { handler, untilEmtpy: true },
      "Cannot consume as 'untilEmtpy' is not an option of consume() (did you mean 'untilEmpty'?)",
    ],
    [
      { handler, queue: "q" },
      "Cannot consume as 'queue' is not an option of consume() (did you mean 'queueName'?)",
    ],
    [{ handler, zzz: 1 }, "Cannot consume as 'zzz' is not an option of consume()"],
    [null, "Cannot consume as the options must be an object: current value is null"],
  ];
  const before = [...Deno.readDirSync(".")].length;
  for (const [options, message] of cases) {
    await assert.rejects(
      () => consume(options as ConsumeOptions),
      (err: unknown) => err instanceof UsageError && err.message === message,
      message,
    );
  }
  assert.equal([...Deno.readDirSync(".")].length, before, "nothing created");
});

Deno.test("consume() refuses a closed Deno.Kv, and a second consume() on one Deno.Kv, with a UsageError", async () => {
  const closed = await Deno.openKv(":memory:");
  closed.close();
  for (const untilEmpty of [true, false]) {
    // Before: BadResource, or (listening) an error that blamed a message KV cannot read.
    await assert.rejects(
      () => consume({ kv: closed, handler: () => {}, untilEmpty }),
      (err: unknown) =>
        err instanceof UsageError &&
        err.message ===
          "Cannot consume as 'kv' must be an open Deno.Kv: current value is one that was closed",
    );
  }
  await using kv = await Deno.openKv(":memory:");
  const stop = new AbortController();
  const first = consume({ kv, handler: () => {}, signal: stop.signal });
  await sleep(50);
  await assert.rejects(
    () => consume({ kv, handler: () => {} }),
    (err: unknown) =>
      err instanceof UsageError && /another consume\(\) is already running on this Deno.Kv/.test(err.message),
  );
  stop.abort();
  assert.equal((await first).stopReason, "aborted");
});

Deno.test("consume() keeps slow handlers out of KV's 5 s redelivery while another process opens the database", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 600, 15, 10);
    // Every open of the file requeues the running messages past their deadline, so a consumer
    // that holds all 60 messages of 80 ms (4.8 s of work) would see many come back.
    const opener = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", import.meta.filename!, "opener", path, "250"],
      stdout: "null",
      stderr: "inherit",
    }).spawn();
    const calls = new Map<number, number>();
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handler: async (_events, { seq }) => {
        calls.set(seq, (calls.get(seq) ?? 0) + 1);
        await sleep(80);
      },
    });
    killIfRunning(opener);
    await opener.status;
    assert.equal(result.messages, 60);
    assert.equal(calls.size, 60);
    assert.deepEqual([...calls.values()].filter((n) => n > 1), [], "no handler ran twice for a message");
    assert.ok(result.deferred > 0, "messages that could not be handled in time were parked");
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() with a backlog it must park hands every message over in seq order, parking each at most once", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 5000, 16, 5);
    // 1,000 messages of 10 ms: KV hands over all of them at once (each commit's in random order), and
    // more than a few seconds' worth must be parked. (Put back in KV's queue instead, they came back
    // when due, many of them several times: 3,151 put-backs here; 25,138 for 4,000 messages, with
    // 94 seqs late.)
    const seqs: number[] = [];
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handler: async (_events, { seq }) => {
        seqs.push(seq);
        await sleep(10);
      },
    });
    assert.equal(result.messages, 1000);
    assert.ok(result.deferred > 0, "messages were parked");
    assert.ok(
      result.deferred <= result.messages,
      `${result.deferred} parkings for ${result.messages} messages`,
    );
    const late = seqs.filter((seq, i) => i > 0 && seq < seqs[i - 1]);
    assert.deepEqual(late, [], "a parked message came after higher seqs");
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 });
    assert.equal((await listParked(path)).length, 0, "parked entries were left behind");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** A post at `i` µs past a fixed time whose record holds 20,000 small numbers (40 KB of JSON). */
function manySmallNumbers(i: number): JetstreamEvent {
  const ev = commit(1_700_000_000_000_000 + i) as JetstreamEvent & { commit: { record: { n?: number[] } } };
  ev.commit.record.n = new Array(20_000).fill(i % 2);
  return ev;
}

Deno.test("consume() parks, and requeueParked() hands back, messages that a delivery makes larger than KV's limit", async () => {
  // A record of many small numbers: 2 bytes each as the sync stored it, but an array Deno KV
  // hands over is written back element by element with its index (5 to 6 bytes each). Writing
  // the delivered message as it came (to park it, or to put it back) exceeded KV's 64 KiB.
  const { dir, path } = await tempDb();
  try {
    const lines = Array.from({ length: 12 }, (_, i) => JSON.stringify(manySmallNumbers(i)));
    const kv = await Deno.openKv(path);
    const stored = await produce(kv, lines, { batchSize: 1 });
    kv.close();
    // 12 messages of 700 ms: most are parked; stop after 4, leaving the rest parked.
    const ac = new AbortController();
    const seen: JetstreamEvent[] = [];
    const reports: string[] = [];
    const first = await consume({
      kv: path,
      signal: ac.signal,
      onError: (r) => reports.push(`${r.reason}: ${r.message}`),
      handler: async (events) => {
        seen.push(...events);
        await sleep(700);
        if (seen.length === 4) ac.abort();
      },
    });
    assert.deepEqual(reports, []);
    assert.ok(first.deferred > 0, "nothing was parked: the test no longer shows what it is for");
    // A plain listener gets the rest from KV's queue.
    const kv2 = await Deno.openKv(path);
    assert.equal(await requeueParked(kv2, Q), 12 - first.messages);
    const rest = new Map<number, JetstreamEvent[]>();
    const done = Promise.withResolvers<void>();
    const listening = kv2.listenQueue((m) => {
      const msg = m as QueueMessage;
      rest.set(msg.seq, msg.records);
      if (seen.length + rest.size === 12) done.resolve();
    });
    await done.promise;
    kv2.close();
    await listening;
    const all = [...seen, ...[...rest.entries()].sort((a, b) => a[0] - b[0]).flatMap(([, r]) => r)];
    assert.deepEqual(all, stored);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("small batches make commits of at most 32 messages, whose backlog consume() hands over in seq order but for a few", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await Deno.openKv(path);
    // The messages each commit enqueued, counted as the writer builds it (grouping KV's queue rows by
    // their time counted two commits of the same millisecond as one).
    const sizes: number[] = [];
    const counted = patchAtomic(kv, (op) => {
      const at = sizes.push(0) - 1;
      const enqueue = op.enqueue.bind(op);
      op.enqueue = (...args: Parameters<Deno.AtomicOperation["enqueue"]>) => (sizes[at]++, enqueue(...args));
    });
    // Two events a message: without the cap, the writer put hundreds of messages in a commit, which KV
    // hands over in random order, one every few milliseconds.
    await produce(counted, generateCapture({ count: 1600, seed: 21 }), { batchSize: 2 });
    kv.close();
    assert.equal(sizes.reduce((a, b) => a + b, 0), 800);
    assert.ok(Math.max(...sizes) <= 32, `a commit held ${Math.max(...sizes)} messages`);
    const seqs: number[] = [];
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handler: (_events, { seq }) => void seqs.push(seq),
    });
    assert.equal(result.stopReason, "empty");
    assert.equal(result.messages, 800);
    // Order is restored within reorderWindow, which a loaded machine can outlast now and then (a
    // few seqs); without the cap, hundreds of the 800 came late.
    const late = seqs.filter((seq, i) => i > 0 && seq < seqs[i - 1]);
    assert.ok(late.length <= 8, `${late.length} seqs were handled after higher ones: ${late.slice(0, 10)}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume({ untilEmpty }) clears parked copies of messages handled already before it says the queue is empty", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 1000, 33, 2);
    const first = await consume({ kv: path, untilEmpty: true, handler: () => {} });
    assert.equal(first.messages, 500);
    // Copies of every other one left parked by a consumer that stopped: the handled marks say they
    // are done. (The gaps between their seqs make the consumer wait reorderWindow for those between.)
    const kv = await openKvAt(path);
    for (let seq = 2; seq <= 500; seq += 2) {
      const at = { run: "stopped-run", seq };
      await kv.atomic().set(parkedKey(Q, at), message(seq, [])).set(parkedSeqKey(Q, at), true).commit();
    }
    const seqs: number[] = [];
    const second = await consume({
      kv,
      untilEmpty: true,
      reorderWindow: 2_000,
      handler: (_events, { seq }) => void seqs.push(seq),
    });
    kv.close();
    assert.equal(second.stopReason, "empty");
    assert.deepEqual([second.messages, seqs.length], [0, 0]);
    // It stopped "empty" (no message waiting) while still waiting to clear them.
    assert.deepEqual(await listParked(path), [], "parked copies were left behind");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume({ untilEmpty }) handles the messages it parked before it stops, however short its emptyTimeout", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await openKvAt(path);
    await produce(kv, generateCapture({ count: 30, seed: 9 }), { batchSize: 2 });
    kv.close();
    let first = true;
    const result = await consume({
      kv: path,
      untilEmpty: true,
      emptyTimeout: 500,
      // A first message that takes 1.5 s: the rest is parked, to be read back after it.
      handler: async () => {
        if (first) await sleep(1_500);
        first = false;
      },
    });
    assert.equal(
      result.stopReason,
      "empty",
      `stopped '${result.stopReason}' after ${result.messages} messages`,
    );
    assert.equal(result.messages, 15);
    assert.ok(result.deferred > 0, "nothing was parked: the test no longer shows what it is for");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() stops with a clear error when Deno KV cannot read a message, by path or on a Deno.Kv", async () => {
  // What a jetfill before nested records were gzipped could write: KV stores it, and cannot read it.
  let deep: unknown = 1;
  for (let i = 0; i < 3000; i++) deep = { a: deep };
  const expected =
    /^Deno KV stopped delivering the queue's messages: could not deserialize value\. A message it cannot read .* stays in the queue and stops every consumer; no message was handled before it$/;
  for (const mode of ["path", "Deno.Kv"]) {
    const { dir, path } = await tempDb();
    const kv = await Deno.openKv(path);
    try {
      await kv.atomic()
        .enqueue(message(1, [{ ...commit(1), deep } as unknown as JetstreamEvent]))
        .set(queueKey(Q, "count", "messages"), new Deno.KvU64(1n))
        .set(queueKey(Q, "count", "records"), new Deno.KvU64(1n))
        .commit();
      await assert.rejects(
        () => consume({ kv: mode === "path" ? path : kv, untilEmpty: true, handler: () => {} }),
        (err: unknown) => err instanceof Error && expected.test(err.message),
        mode,
      );
    } finally {
      kv.close();
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("consume() in another process sees each event of a producer process once, within 3 s of its enqueue", async () => {
  const { dir, path } = await tempDb();
  try {
    const run = (...args: string[]) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", "--unstable-kv", import.meta.filename!, ...args],
        stdout: "piped",
        stderr: "inherit",
      }).spawn();
    const consumer = run("consumer", path, "20");
    await sleep(300);
    const producer = run("producer", path, "20", "150");
    const [c, p] = await Promise.all([consumer.output(), producer.output()]);
    assert.ok(p.success && c.success);
    const lines = new TextDecoder().decode(c.stdout).trim().split("\n").map((l) =>
      JSON.parse(l) as { seq: number; latencyMs: number; events: number }
    );
    assert.deepEqual(
      lines.map((l) => l.seq).sort((a, b) => a - b),
      Array.from({ length: 20 }, (_, i) => i + 1),
    );
    const latencies = lines.map((l) => l.latencyMs).sort((a, b) => a - b);
    console.log(
      `cross-process latency: p50 ${latencies[10]} ms, max ${
        latencies[19]
      } ms (ack deadline ${ACK_DEADLINE_MS} ms)`,
    );
    assert.ok(latencies[19] < 3000, `max latency ${latencies[19]} ms`);
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// Roles for the subprocesses of the tests above.
if (import.meta.main) {
  const [role, path, ...rest] = Deno.args;
  if (role === "opener") {
    // Opens and closes the database over and over, as `jetfill status` or a new sync would.
    while (true) {
      const kv = await Deno.openKv(path);
      await kv.get(["jetfill"]);
      kv.close();
      await sleep(Number(rest[0]));
    }
  } else if (role === "producer") {
    const [count, intervalMs] = rest.map(Number);
    const kv = await Deno.openKv(path);
    const base = JSON.parse(generateCapture({ count: 1, seed: 16 })[0]) as JetstreamEvent;
    for (let i = 0; i < count; i++) {
      await produce(kv, [JSON.stringify({ ...base, time_us: Date.now() * 1000 })], { batchSize: 1 });
      await sleep(intervalMs);
    }
    kv.close();
  } else if (role === "parker") {
    // Prints each seq it handles; slow enough that a backlog is parked. Killed by the test, or done
    // once the queue is empty with "until-empty"; with a number of ms, its thread stops that long
    // in its first handler of a parked message (the whole handlerTimeout to run) after 30.
    const pauseMs = Number(rest[1] ?? 0);
    let handled = 0;
    let paused = false;
    await consume({
      kv: path,
      untilEmpty: rest[0] === "until-empty",
      handler: async (_events, { seq, timeLeft }) => {
        console.log(seq);
        if (++handled >= 30 && timeLeft === 3000 && pauseMs > 0 && !paused) {
          paused = true;
          console.log("paused");
          const until = performance.now() + pauseMs;
          while (performance.now() < until) { /* the whole thread stands still */ }
        }
        await sleep(30);
      },
    });
  } else if (role === "requeue-skewed") {
    // requeueParked() in a process whose wall clock is `rest[0]` ms ahead, as after a step of the clock.
    const realNow = Date.now;
    Date.now = () => realNow() + Number(rest[0]);
    const kv = await Deno.openKv(path);
    console.log(await requeueParked(kv, Q));
    kv.close();
  } else if (role === "consumer") {
    const expected = Number(rest[0]);
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), 20_000);
    let seen = 0;
    await consume({
      kv: path,
      signal: ac.signal,
      handler: (events, { seq }) => {
        const latencyMs = Date.now() - Math.round(events[0].time_us / 1000);
        console.log(JSON.stringify({ seq, latencyMs, events: events.length }));
        if (++seen === expected) ac.abort();
      },
    });
    clearTimeout(timer);
  }
}

Deno.test("consume() stops soon when aborted with a backlog, and a later consume() gets the rest once", async () => {
  const { dir, path } = await tempDb();
  try {
    const stored = await backlog(path, 8000, 9, 10);
    // Abort after 20 messages, with about 780 still waiting: KV keeps delivering them, and each one
    // that comes after the stop is put back. Stopping must not wait for those to cease.
    const ac = new AbortController();
    const seen: JetstreamEvent[] = [];
    let abortedAt = 0;
    const first = await consume({
      kv: path,
      signal: ac.signal,
      handler: (events) => {
        seen.push(...events);
        if (seen.length === 200) {
          abortedAt = performance.now();
          ac.abort();
        }
      },
    });
    const stopMs = performance.now() - abortedAt;
    assert.equal(first.stopReason, "aborted");
    assert.ok(stopMs < 3000, `stopped ${Math.round(stopMs)} ms after the abort`);
    const rest = await consume({
      kv: path,
      untilEmpty: true,
      handler: (events) => void seen.push(...events),
    });
    assert.equal(rest.stopReason, "empty");
    assert.deepEqual(seen.sort((a, b) => a.time_us - b.time_us), stored);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() leaves what it parked when stopped, status counts it, and the next consume() takes it over at once, in seq order", async () => {
  const { dir, path } = await tempDb();
  try {
    const stored = await backlog(path, 6000, 23, 20);
    // 300 messages of 20 ms: far more than 3 s of work, so most are parked; stop after 20.
    const ac = new AbortController();
    const seqs: number[] = [];
    const seen: JetstreamEvent[] = [];
    const first = await consume({
      kv: path,
      signal: ac.signal,
      handler: async (events, { seq }) => {
        seqs.push(seq);
        seen.push(...events);
        await sleep(20);
        if (seqs.length === 20) ac.abort();
      },
    });
    assert.equal(first.messages, 20);
    assert.ok(first.deferred > 0, "nothing was parked: the test no longer shows what it is for");
    const kv2 = await openKvAt(path);
    const status = await queueStatus(kv2, Q);
    kv2.close();
    assert.equal(status.messagesWaiting, 280);
    assert.ok(status.messagesParked > 0 && status.messagesParked <= 280, `${status.messagesParked} parked`);
    assert.ok((await listParked(path)).length > 0);
    const started = performance.now();
    const rest = await consume({
      kv: path,
      untilEmpty: true,
      handler: (events, { seq }) => {
        seqs.push(seq);
        seen.push(...events);
      },
    });
    // Taken over at once: the first consumer deleted its sign of life when it stopped.
    assert.ok(performance.now() - started < PARK_STALE_MS, "the parked messages waited to be taken over");
    assert.equal(rest.stopReason, "empty");
    assert.equal(rest.messages, 280);
    assert.deepEqual(seqs, Array.from({ length: 300 }, (_, i) => i + 1), "every message once, in seq order");
    assert.deepEqual(seen, stored);
    assert.deepEqual(await listParked(path), []);
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("requeueParked() hands what a stopped consumer parked back to KV's queue, for a plain listenQueue", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 3000, 26, 20);
    const ac = new AbortController();
    const first = await consume({
      kv: path,
      signal: ac.signal,
      handler: async (_events, { seq }) => {
        await sleep(30);
        if (seq === 10) ac.abort();
      },
    });
    assert.equal(first.messages, 10);
    const kv2 = await openKvAt(path);
    try {
      const parked = (await queueStatus(kv2, Q)).messagesParked;
      assert.ok(parked > 0, "nothing was parked: the test no longer shows what it is for");
      assert.equal(await requeueParked(kv2, Q), parked);
      assert.equal((await queueStatus(kv2, Q)).messagesParked, 0);
      assert.deepEqual(await listParked(path), []);
      assert.equal(await requeueParked(kv2, Q), 0, "a second call finds nothing");
    } finally {
      kv2.close();
    }
    // A plain listener, with no jetfill code, now gets every message not handled.
    const listener = await Deno.openKv(path);
    const got = new Set<number>();
    let all: () => void = () => {};
    const done = new Promise<void>((resolve) => all = resolve);
    const listening = listener.listenQueue((m) => {
      got.add((m as QueueMessage).seq);
      if (got.size === 140) all();
    });
    const timer = setTimeout(all, 20_000);
    await done;
    clearTimeout(timer);
    listener.close();
    await listening;
    assert.deepEqual([...got].sort((a, b) => a - b), Array.from({ length: 140 }, (_, i) => i + 11));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** A sign of life that a test writes as a live consumer would: its key, its next value, its last versionstamp. */
interface SignOfLifeBeat {
  key: Deno.KvKey;
  value: () => unknown;
  versionstamp: string;
}

/**
 * Writes each of `signs` every 300 ms, as a live consumer does, each write checked against its last
 * one, until `stop()`, which resolves once the write on its way is done: to whether a write was
 * refused, that is, whether another wrote the sign meanwhile. The writes go one at a time: with
 * setInterval, a write that took over 300 ms (each commit waits for an fsync; a busy disk) had the
 * next start from the same versionstamp, refused as if another had written the sign.
 */
function beatEvery300Ms(kv: Deno.Kv, signs: SignOfLifeBeat[]): { stop(): Promise<boolean> } {
  let stopped = false;
  let lost = false;
  const beating = (async () => {
    while (!stopped) {
      await sleep(300);
      for (const sign of signs) {
        const res = await kv.atomic().check(sign).set(sign.key, sign.value()).commit();
        if (res.ok) sign.versionstamp = res.versionstamp;
        else lost = true;
      }
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await beating;
      return lost;
    },
  };
}

/**
 * A queue of 400 messages of 20 events, whose first consumer (30 ms a message) stopped after 20,
 * parking most of the rest. Its 20th message waits until over 100 are parked (30 s at most): on a
 * busy disk, parking can lag far behind the handler.
 */
async function stoppedWithParked(path: string, handled: Map<number, number>): Promise<void> {
  await backlog(path, 8000, 27, 20);
  const ac = new AbortController();
  const first = await consume({
    kv: path,
    signal: ac.signal,
    handler: async (_events, { seq }) => {
      handled.set(seq, (handled.get(seq) ?? 0) + 1);
      await sleep(30);
      if (handled.size < 20) return;
      const until = performance.now() + 30_000;
      while ((await listParked(path)).length <= 100 && performance.now() < until) await sleep(100);
      ac.abort();
    },
  });
  assert.equal(first.messages, 20);
  assert.ok((await listParked(path)).length > 100, "too little was parked for the test to show anything");
}

Deno.test("requeueParked() leaves alone the parked messages a running consumer took over", async () => {
  const { dir, path } = await tempDb();
  try {
    const handled = new Map<number, number>();
    await stoppedWithParked(path, handled);
    // The next consumer takes them over; a second in, a program hands "stopped consumers'" parked
    // messages back to KV's queue. (They were: the consumer took their copies for duplicates of
    // what it held, then found the entries gone, and 315 of 400 messages were lost.)
    const kv = await openKvAt(path);
    let requeued: Promise<number> | undefined;
    const timer = setTimeout(() => requeued = requeueParked(kv, Q), 1000);
    const second = await consume({
      kv,
      untilEmpty: true,
      // A delivery that the first consumer's KV took just as it closed stays in KV's running table
      // until its deadline and a cleanup: on this open Deno.Kv, KV's own, every 60 s. (A busy disk
      // slows that first consumer down enough for one to be caught so, and 10 s was too short.)
      emptyTimeout: 75_000,
      handler: async (_events, { seq }) => {
        handled.set(seq, (handled.get(seq) ?? 0) + 1);
        await sleep(30);
      },
    });
    clearTimeout(timer);
    assert.ok(requeued, "requeueParked() did not run while the consumer did");
    assert.equal(await requeued, 0);
    const status = await queueStatus(kv, Q);
    kv.close();
    assert.equal(second.stopReason, "empty");
    assert.equal(handled.size, 400, "every message handled");
    assert.deepEqual([status.messagesWaiting, status.messagesParked], [0, 0]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a consume() started after a consumer crashed watches its sign of life for PARK_CONFIRM_MS, then takes its parked messages first", async () => {
  const { dir, path } = await tempDb();
  try {
    const handled = new Map<number, number>();
    await stoppedWithParked(path, handled);
    // As if that consumer had crashed a minute ago instead of stopping: its sign of life is left.
    const runs = new Set((await listParked(path)).map(([run]) => run));
    const kv = await openKvAt(path);
    for (const run of runs) await kv.set(queueKey(Q, "consumer", run), { at: Date.now() - 60_000, by: run });
    const started = performance.now();
    let firstAt = 0;
    const seqs: number[] = [];
    const second = await consume({
      kv,
      untilEmpty: true,
      handler: (_events, { seq }) => {
        firstAt ||= performance.now();
        seqs.push(seq);
      },
    });
    kv.close();
    assert.equal(second.stopReason, "empty");
    assert.ok(
      firstAt - started >= PARK_CONFIRM_MS - 100,
      `handled from ${Math.round(firstAt - started)} ms: its sign of life was not watched first`,
    );
    assert.deepEqual(seqs, Array.from({ length: 380 }, (_, i) => i + 21), "every message once, in seq order");
    assert.deepEqual(await listParked(path), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a consume() whose clock calls a live consumer's sign of life stale still starts, and leaves that consumer's parked messages alone", async () => {
  const { dir, path } = await tempDb();
  const kv = await openKvAt(path);
  try {
    // 50 messages for the next consumer to handle (seqs 1 to 50), and 100 more that a live consumer
    // took and parked. (Written here: a consumer stopped on a busy disk had left some of its backlog
    // in KV's queue, for the next one to handle, and sometimes parked next to nothing.)
    await produce(kv, generateCapture({ count: 1000, seed: 32 }), { batchSize: 20 });
    const run = "live-run";
    const parked: [string, number][] = Array.from({ length: 100 }, (_, i) => [run, 51 + i]);
    await parkAs(kv, run, parked.map(([, seq]) => seq), true);
    // That consumer writes its sign of life every 300 ms, but with a clock a minute behind this one.
    const key = queueKey(Q, "consumer", run);
    const value = () => ({ at: Date.now() - 60_000, by: run });
    const beating = beatEvery300Ms(kv, [{
      key,
      value,
      versionstamp: (await kv.set(key, value())).versionstamp,
    }]);
    // The next consumer runs 10 s (it looks at the parked messages three times), and on until it has
    // handled the 50 (a minute at most).
    const ac = new AbortController();
    const seqs: number[] = [];
    let tenSeconds = false;
    const ten = setTimeout(() => {
      tenSeconds = true;
      if (seqs.length >= 50) ac.abort();
    }, 10_000);
    const bound = setTimeout(() => ac.abort(), 60_000);
    let lost: boolean;
    try {
      await consume({
        kv,
        signal: ac.signal,
        handler: (_events, { seq }) => {
          seqs.push(seq);
          if (tenSeconds && seqs.length >= 50) ac.abort();
        },
      });
    } finally {
      clearTimeout(ten);
      clearTimeout(bound);
      lost = await beating.stop();
    }
    // It waited for the first look's confirmation once, then went on with the new messages. (Before,
    // it waited for a confirmation that never came, and handled nothing.)
    assert.deepEqual(seqs.toSorted((a, b) => a - b), Array.from({ length: 50 }, (_, i) => i + 1));
    assert.deepEqual(await listParked(path), parked, "the live consumer's messages were taken");
    assert.ok(!lost, "the live consumer's sign of life was written over");
  } finally {
    kv.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("of two consumers started together, one takes over a stopped consumer's parked messages", async () => {
  const { dir, path } = await tempDb();
  try {
    const handled = new Map<number, number>();
    await stoppedWithParked(path, handled);
    const consumer = () =>
      consume({
        kv: path,
        untilEmpty: true,
        handler: async (_events, { seq }) => {
          handled.set(seq, (handled.get(seq) ?? 0) + 1);
          await sleep(5);
        },
      });
    const [b, c] = await Promise.all([consumer(), consumer()]);
    assert.equal(b.messages + c.messages, 380);
    assert.equal(handled.size, 400);
    // Both took over the same run before, and handled nearly all of it twice, side by side.
    const twice = [...handled].filter(([, n]) => n > 1).map(([seq]) => seq);
    assert.ok(twice.length <= 2, `handled twice: ${twice}`);
    assert.deepEqual(await listParked(path), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the messages a killed consumer parked wait while it may be alive, then another consume() takes them over", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 4000, 24, 20);
    // A consumer process with a 30 ms handler, killed (no clean stop) once it has parked messages.
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", import.meta.filename!, "parker", path],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const handledByChild = new Set<number>();
    const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    while (handledByChild.size < 10) {
      const { value, done } = await lines.read();
      if (done) break;
      buffered += value;
      const parts = buffered.split("\n");
      buffered = parts.pop()!;
      for (const part of parts) handledByChild.add(Number(part));
    }
    const deadline = performance.now() + 20_000;
    while ((await listParked(path)).length === 0) {
      if (performance.now() > deadline) assert.fail("the consumer parked nothing in 20 s");
      await sleep(50);
    }
    killIfRunning(child, "SIGKILL");
    await child.status;
    const killedAt = performance.now();
    // What it printed after the tenth: handled there too, and so skipped by the next consumer (a
    // busy disk made it handle more before parking, and the test lost count of them).
    for (let r = await lines.read(); !r.done; r = await lines.read()) {
      buffered += r.value;
      const parts = buffered.split("\n");
      buffered = parts.pop()!;
      for (const part of parts) handledByChild.add(Number(part));
    }
    const parked = await listParked(path);
    assert.ok(parked.length > 0);
    const seqs: number[] = [];
    let firstParkedAt = Number.POSITIVE_INFINITY;
    const parkedSeqs = new Set(parked.map(([, seq]) => seq));
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handler: (_events, { seq }) => {
        seqs.push(seq);
        if (parkedSeqs.has(seq)) firstParkedAt = Math.min(firstParkedAt, performance.now());
      },
    });
    assert.equal(
      result.stopReason,
      "empty",
      `stopped '${result.stopReason}' after ${result.messages} messages`,
    );
    // Its last sign of life was at most PARK_HEARTBEAT_MS before the kill: not taken over before it
    // is PARK_STALE_MS old.
    const waited = firstParkedAt - killedAt;
    assert.ok(
      waited >= PARK_STALE_MS - PARK_HEARTBEAT_MS - 500,
      `a parked message of the killed consumer was handled ${Math.round(waited)} ms after the kill`,
    );
    for (const seq of parkedSeqs) assert.ok(seqs.includes(seq), `parked message ${seq} was never handled`);
    const all = new Set([...handledByChild, ...seqs]);
    assert.equal(all.size, 200, "every message handled");
    assert.deepEqual(await listParked(path), []);
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a step of the wall clock does not make requeueParked() take a live consumer's parked messages", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 8000, 29, 20);
    // A consumer process (30 ms a message) parks most of the 400 messages, 12 s of work.
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", import.meta.filename!, "parker", path, "until-empty"],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const handled: number[] = [];
    const reading = eachLine(child.stdout, (line) => handled.push(Number(line)));
    const deadline = performance.now() + 20_000;
    while ((await listParked(path)).length === 0) {
      if (performance.now() > deadline) assert.fail("the consumer parked nothing in 20 s");
      await sleep(50);
    }
    // Seen from a clock a minute ahead, its sign of life is a minute old; it still changes every second.
    const skewed = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", import.meta.filename!, "requeue-skewed", path, "60000"],
      stderr: "inherit",
    }).output();
    const requeued = Number(new TextDecoder().decode(skewed.stdout));
    assert.ok(
      (await listParked(path)).length > 0,
      "the consumer was done before the test could show anything",
    );
    assert.equal((await child.status).code, 0);
    await reading;
    // Judged by the wall clock alone, the run looked gone and its messages were requeued.
    assert.equal(requeued, 0, "requeueParked() took parked messages of a live consumer");
    assert.deepEqual(handled.toSorted((a, b) => a - b), Array.from({ length: 400 }, (_, i) => i + 1));
    assert.deepEqual(await listParked(path), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("requeueParked() deletes a sign of life with nothing parked once it is stale, and only then", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await openKvAt(path);
    const key = (run: string) => queueKey(Q, "consumer", run);
    // Left by a consumer killed a minute ago; written a second ago; and one a minute old by its
    // clock but written again every 300 ms, as by a live consumer after a step of the wall clock.
    await kv.set(key("gone"), { at: Date.now() - 60_000 });
    await kv.set(key("fresh"), { at: Date.now() - 1_000 });
    const value = () => ({ at: Date.now() - 60_000 });
    const beating = beatEvery300Ms(kv, [
      { key: key("alive"), value, versionstamp: (await kv.set(key("alive"), value())).versionstamp },
    ]);
    let lost: boolean;
    try {
      assert.equal(await requeueParked(kv, Q), 0);
    } finally {
      lost = await beating.stop();
    }
    const [gone, fresh, alive] = await kv.getMany([key("gone"), key("fresh"), key("alive")]);
    kv.close();
    assert.equal(gone.versionstamp, null, "the stale sign of life is still there");
    assert.notEqual(fresh.versionstamp, null, "a sign of life written a second ago was deleted");
    assert.ok(!lost && alive.versionstamp !== null, "the sign of life of a live consumer was deleted");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a paused consumer whose parked messages were taken over leaves them to their new holder once it resumes", async () => {
  const { dir, path } = await tempDb();
  const kv = await openKvAt(path);
  let child: Deno.ChildProcess | undefined;
  let reading: Promise<void> | undefined;
  try {
    await produce(kv, generateCapture({ count: 20000, seed: 28 }), { batchSize: 20 });
    // A consumer process (30 ms a message) parks most of the 1,000 messages, and its thread then
    // stops for 25 s once it handles parked ones, with the next few read (a process stopped by
    // SIGSTOP could be holding SQLite's write lock, which would stop everyone).
    child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", import.meta.filename!, "parker", path, "until-empty", "25000"],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const byChild = new Set<number>();
    let pausedWith: Set<number> | undefined;
    reading = eachLine(child.stdout, (line) => {
      if (line === "paused") pausedWith = new Set(byChild);
      else byChild.add(Number(line));
    });
    const deadline = performance.now() + 20_000;
    while (!pausedWith) {
      if (performance.now() > deadline) assert.fail("the consumer did not get to a parked message in 20 s");
      await sleep(100);
    }
    // Another consumer takes its run over once its sign of life is 10 s old, before it resumes.
    let claimed = false;
    const byOther = new Set<number>();
    const ac = new AbortController();
    const bound = setTimeout(() => ac.abort(), 120_000);
    let other;
    try {
      other = await consume({
        kv,
        untilEmpty: true,
        signal: ac.signal,
        // What the paused consumer holds of KV's deliveries waits for it: news only once it resumes.
        emptyTimeout: 30_000,
        handler: async (_events, { seq }) => {
          if (!claimed) {
            for await (const e of kv.list<{ by?: string }>({ prefix: queueKey(Q, "consumer") })) {
              claimed ||= e.value.by !== undefined && e.value.by !== e.key.at(-1);
            }
          }
          byOther.add(seq);
          // Slow enough to be still at it when the first one resumes.
          await sleep(20);
        },
      });
    } finally {
      clearTimeout(bound);
    }
    assert.ok(claimed, "the paused consumer's run was never taken over");
    assert.equal(other.stopReason, "empty", `the other consumer stopped '${other.stopReason}' (120 s bound)`);
    // The resumed consumer is done a moment after the other one. (It once waited for ever for a
    // parked message of the run taken over, the queue done.)
    const exit = await statusWithin(
      child,
      60_000,
      "the resumed consumer (parker, until empty) was still waiting, 60 s after the other one found the queue empty",
    );
    assert.equal(exit.code, 0);
    await reading;
    const both = [...byOther].filter((seq) => byChild.has(seq) && !pausedWith!.has(seq));
    // Before, the resumed consumer went on with the parked messages it remembered: 750 of 1,000
    // were handled by both, side by side.
    assert.ok(
      both.length <= 3,
      `${both.length} messages handled by both after the resume: ${both.slice(0, 20)}`,
    );
    assert.equal(new Set([...byChild, ...byOther]).size, 1000);
    const status = await queueStatus(kv, Q);
    assert.deepEqual([status.messagesWaiting, status.messagesParked], [0, 0]);
    const signs = [];
    for await (const e of kv.list({ prefix: queueKey(Q, "consumer") })) signs.push(e.key);
    assert.deepEqual(signs, [], "signs of life were left behind");
  } finally {
    // A test that failed midway leaves no process behind.
    if (child) {
      killIfRunning(child, "SIGKILL");
      await child.status;
      await reading;
    }
    kv.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume({ untilEmpty }) stops once the queue is done when a parked message fails after its run was taken over", async () => {
  const { dir, path } = await tempDb();
  const kv = await openKvAt(path);
  try {
    // Three messages parked by a consumer that stopped: the next consume() takes their run over at once.
    const run = "stopped-run";
    const seqs = [1, 2, 3];
    const sign = queueKey(Q, "consumer", run);
    const setup = kv.atomic()
      .set(queueKey(Q, "count", "messages"), new Deno.KvU64(3n))
      .set(queueKey(Q, "count", "records"), new Deno.KvU64(3n));
    for (const seq of seqs) {
      setup.set(parkedKey(Q, { run, seq }), message(seq, [commit(seq)])).set(
        parkedSeqKey(Q, { run, seq }),
        true,
      );
    }
    assert.ok((await setup.commit()).ok);
    const handled: number[] = [];
    const reports: string[] = [];
    // Before, it never stopped: bounded, so that the test fails instead.
    const ac = new AbortController();
    const bound = setTimeout(() => ac.abort(), 20_000);
    let result;
    try {
      result = await consume({
        kv,
        untilEmpty: true,
        signal: ac.signal,
        handlerTimeout: 30_000,
        onError: (r) => reports.push(`${r.reason}: ${r.message}`),
        handler: async (_events, { seq }) => {
          handled.push(seq);
          // While the handler runs, this consumer seems gone to another (as after a pause), which
          // takes the run over; this one's next sign of life (one every PARK_HEARTBEAT_MS) finds
          // that out before the handler ends. (Had it not yet, it would find out later, and this
          // test would pass on the old code too: it never fails for want of time.)
          await kv.set(sign, { at: Date.now(), by: "taker" });
          await sleep(2 * PARK_HEARTBEAT_MS + 500);
          // The new holder handles the three messages and lets the run go, as it does when done.
          const done = kv.atomic()
            .sum(queueKey(Q, "count", "messagesHandled"), 3n)
            .sum(queueKey(Q, "count", "recordsHandled"), 3n)
            .delete(sign);
          for (const s of seqs) {
            done.set(queueKey(Q, "handled", s), Date.now())
              .delete(parkedKey(Q, { run, seq: s }))
              .delete(parkedSeqKey(Q, { run, seq: s }));
          }
          assert.ok((await done.commit()).ok);
          // And this handler fails: its message went back among the parked ones it waits for, under
          // a run it no longer held and would never start.
          throw new Error(`message ${seq} failed after the take-over`);
        },
      });
    } finally {
      clearTimeout(bound);
    }
    assert.equal(
      result.stopReason,
      "empty",
      `stopped '${result.stopReason}' (20 s bound): it waited for a parked message of a run taken over`,
    );
    assert.deepEqual(handled, [1]);
    assert.deepEqual(reports, [
      "handler: handler failed on message 1: message 1 failed after the take-over; its run was taken over meanwhile: it is left to its new holder",
    ]);
    assert.deepEqual(await listParked(path), []);
  } finally {
    kv.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() tries a parked message whose handler failed again, and goes on with the others meanwhile", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 6000, 25, 20);
    // 300 messages of 25 ms, 7.5 s of work: all but the first 3 s or so are parked; seq 280 fails once.
    const seqs: number[] = [];
    const reports: string[] = [];
    let failed = false;
    let retried: JetstreamEvent[] = [];
    let kvTablesAtRetry: { queued: number; running: number } | undefined;
    const result = await consume({
      kv: path,
      untilEmpty: true,
      onError: (r) => reports.push(`${r.reason}: ${r.message}`),
      handler: async (events, { seq }) => {
        await sleep(25);
        if (seq === 280 && !failed) {
          failed = true;
          // What a failing handler did to its events is not what the next try gets. (Before, the
          // parked message was tried again with them changed.)
          (events[0] as { did: string }).did = "changed";
          events.pop();
          throw new Error("not now");
        }
        if (seq === 280) {
          kvTablesAtRetry = kvQueueTables(path);
          retried = events;
        }
        seqs.push(seq);
      },
    });
    // It waited in its parked keys, not in KV's queue (a redelivery is in KV's running table).
    assert.deepEqual(kvTablesAtRetry, { queued: 0, running: 0 });
    assert.equal(result.stopReason, "empty");
    assert.ok(result.deferred > 0);
    assert.equal(result.messages, 300);
    assert.equal(result.failures, 1);
    assert.deepEqual(reports, [
      "handler: handler failed on message 280: not now; it stays parked, to be tried again in 100 ms",
    ]);
    // Tried again 100 ms later (KV's first retry delay), after a few of the next seqs.
    const at = seqs.indexOf(280);
    assert.ok(at > 279 && at < 290, `message 280 handled in place ${at}: ${seqs.slice(275)}`);
    assert.deepEqual([...seqs].sort((a, b) => a - b), Array.from({ length: 300 }, (_, i) => i + 1));
    assert.deepEqual(await listParked(path), []);
    assert.equal(retried.length, 20);
    assert.ok(retried.every((e) => e.did.startsWith("did:")), JSON.stringify(retried[0]));
    assert.equal(result.records, 6000);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() parks the message of a handler that fails once stopping, using up no retry", async () => {
  const { dir, path } = await tempDb();
  try {
    const stored = await backlog(path, 50, 12, 10);
    // The handler's output is gone at the third message: it stops consume() and throws.
    const ac = new AbortController();
    const seen: JetstreamEvent[] = [];
    const reports: string[] = [];
    const first = await consume({
      kv: path,
      signal: ac.signal,
      onError: (r) => reports.push(`${r.reason}: ${r.message}`),
      handler: (events, { seq }) => {
        if (seq === 3) {
          ac.abort();
          throw new Error("output closed");
        }
        seen.push(...events);
      },
    });
    assert.equal(first.messages, 2);
    assert.equal(first.failures, 0);
    assert.ok(first.deferred >= 1);
    assert.ok(
      reports.some((r) =>
        /^handler: .*message 3 while stopping: output closed; the message was parked/.test(r)
      ),
      reports.join("\n"),
    );
    const rest = await consume({
      kv: path,
      untilEmpty: true,
      handler: (events) => void seen.push(...events),
    });
    assert.equal(rest.messages, 3);
    assert.deepEqual(seen, stored);
    assert.deepEqual(kvQueueTables(path), { queued: 0, running: 0 });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() leaves a failed delivery to KV with one line on stderr, not the error's stack", async () => {
  const dir = await Deno.makeTempDir({ prefix: "jetfill-test-" });
  try {
    const path = `${dir}/q.sqlite`;
    const kv = await Deno.openKv(path);
    await produce(kv, generateCapture({ count: 5, seed: 3 }));
    kv.close();
    // Deno prints what a listenQueue handler rejects with; a child process shows what a user sees.
    const script = `
      import { consume } from ${JSON.stringify(new URL("../src/queue/consume.ts", import.meta.url).href)};
      let calls = 0;
      const r = await consume({ kv: ${JSON.stringify(path)}, untilEmpty: true, onError: () => {},
        handler: () => { if (calls++ === 0) throw new Error("boom"); } });
      console.log(r.messages);
    `;
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--unstable-kv", script],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.ok(out.success, stderr);
    assert.equal(new TextDecoder().decode(out.stdout).trim(), "1", "handled on its second delivery");
    assert.match(stderr, /jetfill consume: a message was left for KV to redeliver \(boom\)/);
    assert.doesNotMatch(stderr, /^\s+at /m, "no stack trace");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() until empty refuses a queue name the database never held when it holds others, taking nothing", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await Deno.openKv(path);
    await produce(kv, generateCapture({ count: 20, seed: 41 }), { batchSize: 10 });
    kv.close();
    const message =
      `Cannot consume as queue 'jetstream_snyc' has nothing in ${path}, which holds 'jetstream_sync' (check 'queueName')`;
    await assert.rejects(
      () => consume({ kv: path, queueName: "jetstream_snyc", untilEmpty: true, handler: () => {} }),
      (err: unknown) => err instanceof UsageError && err.message === message,
    );
    const handle = await Deno.openKv(path);
    await assert.rejects(
      () => consume({ kv: handle, queueName: "jetstream_snyc", untilEmpty: true, handler: () => {} }),
      (err: unknown) => err instanceof UsageError && err.message === message.replace(path, "the database"),
    );
    handle.close();
    // Nothing was taken: the queue's own consumer gets both messages.
    const seen: number[] = [];
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handler: (_events, { seq }) => void seen.push(seq),
    });
    assert.equal(result.messages, 2);
    assert.deepEqual(seen, [1, 2]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("status counts as parked only the parked messages not handled yet", async () => {
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 200, 41, 20);
    const done = await consume({ kv: path, untilEmpty: true, handler: () => {} });
    assert.equal(done.messages, 10);
    const kv = await openKvAt(path);
    try {
      // A consumer killed after parking messages 3 and 4, whose acknowledgements KV never got: KV
      // delivered them again, and the consumer above handled them. Their parked copies stay until
      // a consumer takes the killed one's run over.
      await parkAs(kv, "killed-run", [3, 4], false);
      const status = await queueStatus(kv, Q);
      // (Before, 2 parked of 0 waiting.)
      assert.deepEqual([status.messagesWaiting, status.messagesParked], [0, 0]);
    } finally {
      kv.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("status adds up when a consumer handles a parked message while it reads", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await openKvAt(path);
    try {
      // Ten messages a consumer took from KV's queue and parked.
      await parkAs(kv, "running", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], true);
      // The consumer handles message 1 just before status lists the parked messages: its parked
      // keys go and the handled counters rise in one commit, as consume() does it.
      const list = kv.list.bind(kv);
      let handled = false;
      kv.list = ((selector: Deno.KvListSelector, options?: Deno.KvListOptions) => {
        const prefix = "prefix" in selector ? selector.prefix : [];
        if (!handled && prefix.includes("parkedSeq")) {
          handled = true;
          return (async function* () {
            await kv.atomic()
              .delete(parkedKey(Q, { run: "running", seq: 1 }))
              .delete(parkedSeqKey(Q, { run: "running", seq: 1 }))
              .set(queueKey(Q, "handled", 1), Date.now())
              .sum(queueKey(Q, "count", "messagesHandled"), 1n)
              .sum(queueKey(Q, "count", "recordsHandled"), 1n)
              .commit();
            yield* list(selector, options);
          })() as unknown as Deno.KvListIterator<unknown>;
        }
        return list(selector, options);
      }) as typeof kv.list;
      const status = await queueStatus(kv, Q);
      assert.ok(handled, "status no longer lists parked messages: the test shows nothing");
      // (Before, 0 handled and 9 waiting: the message was in neither figure.)
      assert.deepEqual(
        [status.messagesHandled, status.messagesWaiting, status.messagesParked, status.queueLength],
        [1, 9, 9, 9],
      );
    } finally {
      kv.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() takes a handlerTimeout beyond setTimeout's range (24.8 days) as given", async () => {
  const { dir, path } = await tempDb();
  try {
    const kv = await openKvAt(path);
    try {
      // Parked by a consumer that stopped cleanly: the next takes them over at once, and a parked
      // message's handler gets the whole handlerTimeout.
      await parkAs(kv, "stopped-run", [1, 2, 3], true);
    } finally {
      kv.close();
    }
    const reports: string[] = [];
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handlerTimeout: 2 ** 31,
      onError: (r) => reports.push(`${r.reason}: ${r.message}`),
      handler: async () => {
        await sleep(50);
      },
    });
    // (Before, each timed out at once, and was tried again until it went to its dead letter.)
    assert.deepEqual(reports, []);
    assert.deepEqual([result.messages, result.timeouts, result.failures], [3, 0, 0]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Holds SQLite's write lock on the database at `path` from a connection of its own, for `ms`. */
async function holdWriteLock(path: string, ms: number): Promise<void> {
  const { DatabaseSync } = await import("node:sqlite");
  const db = new DatabaseSync(path);
  db.exec("BEGIN IMMEDIATE");
  await sleep(ms);
  db.exec("COMMIT");
  db.close();
}

Deno.test("a handler that succeeded is not run again when the database stays busy while consume() records it", async () => {
  // Another connection holds the write lock from the moment each handler returns: for 0.8 s (past
  // the 0.35 s a busy commit used to be retried), then for 4.5 s (past the delivery's deadline, so
  // the record can only be made on the message's next delivery).
  for (const holdMs of [800, 4_500]) {
    const { dir, path } = await tempDb();
    try {
      await backlog(path, 3, 5, 3);
      const calls: number[] = [];
      const said: ConsumeErrorReport[] = [];
      let held: Promise<void> | undefined;
      const result = await consume({
        kv: path,
        untilEmpty: true,
        onError: (r) => said.push(r),
        handler: (_events, ctx) => {
          calls.push(ctx.seq);
          held ??= holdWriteLock(path, holdMs);
        },
      });
      await held;
      // (Before: [1, 1]: the commit gave up after 0.35 s and KV delivered the message again.)
      assert.deepEqual(calls, [1], `held ${holdMs} ms; told: ${said.map((r) => r.message).join(" | ")}`);
      assert.deepEqual([result.messages, result.records, result.duplicates], [1, 3, 0]);
      if (holdMs > ACK_DEADLINE_MS) {
        assert.equal(result.failures, 1);
        assert.deepEqual(said.map((r) => r.reason), ["storage"]);
        assert.match(
          said[0].message,
          /^could not record message 1 as handled: database is locked: another connection kept the database busy for \d\.\d s \(another process writing to it\?\); KV will redeliver it; its handler succeeded and is not run again for it here: its next try only records it$/,
        );
      } else {
        assert.deepEqual([result.failures, said], [0, []]);
      }
      const kv = await Deno.openKv(path);
      const status = await queueStatus(kv, Q);
      kv.close();
      assert.deepEqual([status.messagesHandled, status.recordsHandled, status.deadLetters], [1, 3, 0]);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});
