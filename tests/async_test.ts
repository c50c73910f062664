import assert from "node:assert/strict";
import { backoffDelay, delay, longTimeout, MAX_TIMER_MS } from "../src/async.ts";

Deno.test("delay() waits its time, and returns early without error when its signal aborts", async () => {
  let t = performance.now();
  await delay(60);
  assert.ok(performance.now() - t >= 55, `waited ${performance.now() - t} ms`);

  const controller = new AbortController();
  t = performance.now();
  setTimeout(() => controller.abort(), 20);
  await delay(5_000, controller.signal);
  assert.ok(performance.now() - t < 1_000, `waited ${performance.now() - t} ms after the abort`);

  t = performance.now();
  await delay(5_000, AbortSignal.abort());
  assert.ok(performance.now() - t < 100, "an aborted signal waits for nothing");
});

Deno.test("backoffDelay() doubles its ceiling from baseMs up to maxMs, with jitter between half and all of it", () => {
  const low = () => 0;
  const high = () => 0.999_999;
  assert.deepEqual([1, 2, 3, 4].map((n) => backoffDelay(n, { random: low })), [125, 250, 500, 1000]);
  assert.deepEqual([1, 2, 3, 4].map((n) => backoffDelay(n, { random: high })), [250, 500, 1000, 2000]);
  // Capped: the 10th retry and the 100th wait at most maxMs (30 s by default).
  assert.equal(backoffDelay(10, { random: high }), 30_000);
  assert.equal(backoffDelay(100, { random: low }), 15_000);
  assert.equal(backoffDelay(3, { baseMs: 100, maxMs: 300, random: high }), 300);
  // Attempt 0 or below is the first retry's.
  assert.equal(backoffDelay(0, { random: low }), 125);
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(5);
    assert.ok(d >= 2000 && d <= 4000, `attempt 5 waited ${d} ms`);
  }
});

Deno.test("longTimeout() waits past the longest setTimeout in steps, and can be cancelled", async () => {
  // Steps of 20 ms stand in for setTimeout's 24.8-day limit.
  let fired = 0;
  const t = performance.now();
  await new Promise<void>((resolve) => {
    longTimeout(
      () => {
        fired = performance.now() - t;
        resolve();
      },
      90,
      20,
    );
  });
  assert.ok(fired >= 85 && fired < 1_000, `fired after ${fired} ms`);

  let called = false;
  const cancel = longTimeout(() => called = true, 50, 20);
  await delay(30);
  cancel();
  await delay(60);
  assert.equal(called, false, "cancelled between two steps, it still fired");

  // A delay over setTimeout's limit is not fired at once (setTimeout alone would fire it now).
  let early = false;
  const stop = longTimeout(() => early = true, MAX_TIMER_MS + 1000);
  await delay(30);
  stop();
  assert.equal(early, false);
});
