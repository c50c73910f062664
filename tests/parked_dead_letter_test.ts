/**
 * The last path of a parked message: a handler that always fails it. In a file of its own because it
 * takes KV's whole retry schedule (96 s, mostly waiting), which runs beside the other test files.
 */
import assert from "node:assert/strict";
import { consume } from "../src/queue/consume.ts";
import { deadLetters } from "../src/queue/dead_letters.ts";
import { openKvAt } from "../src/queue/kv_queue.ts";
import { queueStatus } from "../src/queue/status.ts";
import { backlog, kvQueueTables, listParked, Q, sleep, tempDb } from "./helpers/consume.ts";

Deno.test("consume() tries a parked message that always fails six times on KV's schedule, then writes its dead letter", async () => {
  const { dir, path } = await tempDb();
  try {
    // 100 messages of 40 ms, 4 s of work: the last ones are parked, seq 100 among them.
    await backlog(path, 2000, 31, 20);
    const reports: string[] = [];
    const tries: number[] = [];
    const kvTablesAtTries: { queued: number; running: number }[] = [];
    let parkedAtTries = 0;
    const result = await consume({
      kv: path,
      untilEmpty: true,
      onError: (r) => reports.push(`${r.reason}: ${r.message}`),
      handler: async (_events, { seq }) => {
        await sleep(40);
        if (seq !== 100) return;
        tries.push(performance.now());
        if (tries.length > 1) {
          // Between tries it waits in its parked keys, not in KV's queue (as a redelivery would).
          kvTablesAtTries.push(kvQueueTables(path));
          if ((await listParked(path)).some(([, s]) => s === 100)) parkedAtTries++;
        }
        throw new Error("never");
      },
    });
    assert.equal(result.stopReason, "empty");
    assert.ok(result.deferred > 0, "nothing was parked: the test no longer shows what it is for");
    assert.equal(result.messages, 99);
    assert.equal(result.failures, 6);
    assert.equal(parkedAtTries, 5, "message 100 was not parked between its tries");
    assert.deepEqual(kvTablesAtTries, Array(5).fill({ queued: 0, running: 0 }));
    // KV's default backoff: 0.1, 1, 5, 30 and 60 s between the six tries (each plus the handler's 40 ms).
    const gaps = tries.slice(1).map((t, i) => t - tries[i]);
    [100, 1_000, 5_000, 30_000, 60_000].forEach((ms, i) =>
      assert.ok(
        gaps[i] >= ms && gaps[i] < ms + 2_000,
        `try ${i + 2} came ${Math.round(gaps[i])} ms after the last`,
      )
    );
    assert.deepEqual(reports, [
      "handler: handler failed on message 100: never; it stays parked, to be tried again in 100 ms",
      "handler: handler failed on message 100: never; it stays parked, to be tried again in 1000 ms",
      "handler: handler failed on message 100: never; it stays parked, to be tried again in 5000 ms",
      "handler: handler failed on message 100: never; it stays parked, to be tried again in 30000 ms",
      "handler: handler failed on message 100: never; it stays parked, to be tried again in 60000 ms",
      "handler: handler failed on message 100: never; it failed 6 times and goes to its dead letter",
    ]);
    const kv = await openKvAt(path);
    const letters = await deadLetters(kv, Q);
    const status = await queueStatus(kv, Q);
    kv.close();
    assert.deepEqual(letters.map((l) => [l.seq, l.records, l.handled]), [[100, 20, false]]);
    assert.deepEqual(
      [status.messagesWaiting, status.messagesParked, status.deadLetters, status.queueLength],
      [0, 0, 1, 1],
    );
    assert.deepEqual(await listParked(path), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("consume() gives a handler slower than a delivery's 4 s its whole handlerTimeout, by parking the message", async () => {
  // One message; the handler takes 4.5 s, and handlerTimeout allows 8. A delivery can give it 4 s at
  // most (ACK_DEADLINE_MS): cut short there, the message is parked, and its next try gets all 8.
  // (Before, every delivery was run and cut short at 4 s, and KV's six went by in 96 s before the
  // message went to its dead letter, never handled.)
  const { dir, path } = await tempDb();
  try {
    await backlog(path, 5, 3, 5);
    const tries: number[] = [];
    const reports: string[] = [];
    const result = await consume({
      kv: path,
      untilEmpty: true,
      handlerTimeout: 8000,
      signal: AbortSignal.timeout(30_000),
      onError: (r) => reports.push(`${r.reason}: ${r.message}`),
      handler: async (_events, { signal, timeLeft }) => {
        tries.push(timeLeft);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, 4500);
          signal.addEventListener("abort", () => {
            clearTimeout(timer);
            resolve();
          });
        });
        signal.throwIfAborted();
      },
    });
    assert.equal(result.stopReason, "empty", JSON.stringify(reports));
    assert.equal(result.messages, 1);
    assert.equal(tries.length, 2, JSON.stringify(tries));
    assert.ok(tries[0] <= 4000 && tries[1] === 8000, JSON.stringify(tries));
    assert.ok(
      reports.some((r) => /^timeout: .*; parked: its next try gets the whole handlerTimeout/.test(r)),
      JSON.stringify(reports),
    );
    const kv = await openKvAt(path);
    try {
      assert.equal((await deadLetters(kv, Q)).length, 0);
    } finally {
      kv.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
