import assert from "node:assert/strict";
import { type CaptureEvent, countOutOfOrder, inTimeOrder, parseCapture } from "../src/server/capture.ts";

/** Identity events with these `time_us`, each with its own DID so that they can be told apart. */
function events(...times: number[]): CaptureEvent[] {
  return parseCapture(
    times.map((t, i) =>
      `{"did":"did:plc:a${i}","time_us":${t},"kind":"identity","identity":{"did":"did:plc:a${i}"}}`
    ),
  );
}

Deno.test("`countOutOfOrder()` counts the events with a time_us below one before them", () => {
  assert.equal(countOutOfOrder([]), 0);
  assert.equal(countOutOfOrder(events(1, 2, 2, 3)), 0, "equal time_us are in order");
  // Two exports the wrong way round: every event of the earlier one.
  assert.equal(countOutOfOrder(events(4, 5, 6, 1, 2, 3)), 3);
  // One event late: only it; one event early: all those after it that it passed.
  assert.equal(countOutOfOrder(events(1, 2, 4, 3, 5)), 1);
  assert.equal(countOutOfOrder(events(1, 9, 2, 3, 4)), 3);
});

Deno.test("`inTimeOrder()` returns events in time order as they are, without a copy", () => {
  const sorted = events(1, 2, 2, 3);
  assert.equal(inTimeOrder(sorted), sorted);
  const none: CaptureEvent[] = [];
  assert.equal(inTimeOrder(none), none);
});

Deno.test("`inTimeOrder()` sorts a copy by time_us, keeping equal time_us in their order", () => {
  const joined = events(30, 10, 20, 10, 30, 5);
  const before = [...joined];
  const sorted = inTimeOrder(joined);
  assert.notEqual(sorted, joined);
  assert.deepEqual(joined, before, "the input is left as it was");
  assert.deepEqual(sorted, [joined[5], joined[1], joined[3], joined[2], joined[0], joined[4]]);
});
