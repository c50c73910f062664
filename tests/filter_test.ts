import assert from "node:assert/strict";
import { ReplayGuard } from "../src/pipeline/filter.ts";
import type { JetstreamEvent } from "../src/jetstream/events.ts";

function commit(
  i: number,
  over: Partial<{ rev: string; operation: string; rkey: string }> = {},
): JetstreamEvent {
  return {
    did: `did:plc:${String(i).padStart(24, "a")}`,
    time_us: 1_700_000_000_000_000 + i,
    kind: "commit",
    commit: {
      rev: over.rev ?? `3l${i}`,
      operation: (over.operation ?? "create") as "create",
      collection: "app.bsky.feed.post",
      rkey: over.rkey ?? `rk${i}`,
    },
  } as JetstreamEvent;
}

Deno.test("ReplayGuard drops what it recorded once armed, by content and not by time_us", () => {
  const guard = new ReplayGuard(100);
  for (let i = 0; i < 50; i++) guard.record(commit(i));
  assert.equal(guard.isReplay(commit(3)), false, "nothing is checked before arm()");
  guard.arm();
  assert.ok(guard.armed);
  // The same content under another time_us (a rewind on another instance) is a replay.
  assert.equal(guard.isReplay({ ...commit(7), time_us: 1 }), true);
  assert.equal(guard.isReplay(commit(49)), true);
  // Any field of the identity that differs makes it another event.
  assert.equal(guard.isReplay(commit(7, { rev: "3lother" })), false);
  assert.equal(guard.isReplay(commit(8, { operation: "delete" })), false);
  assert.equal(guard.isReplay(commit(9, { rkey: "rkother" })), false);
  assert.equal(guard.isReplay(commit(50)), false);
  // A new event seen while armed is remembered too: its own replay is caught.
  assert.equal(guard.isReplay(commit(50)), true);
});

Deno.test("ReplayGuard remembers only the last `capacity` events and checks until as many new ones passed", () => {
  const guard = new ReplayGuard(10);
  for (let i = 0; i < 25; i++) guard.record(commit(i));
  guard.arm();
  assert.equal(guard.isReplay(commit(14)), false, "older than the window");
  for (let i = 15; i < 25; i++) assert.equal(guard.isReplay(commit(i)), true, `event ${i}`);
  // Replays do not use up the check; new events do: nine more and the guard is disarmed.
  for (let i = 100; i < 109; i++) assert.equal(guard.isReplay(commit(i)), false);
  assert.equal(guard.armed, false);
  assert.equal(guard.isReplay(commit(20)), false, "no longer checked");
});

Deno.test("ReplayGuard keys identity and account events by did, kind, time and seq", () => {
  const guard = new ReplayGuard(10);
  const identity = (seq: number, time: string): JetstreamEvent => ({
    did: "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb",
    time_us: 5,
    kind: "identity",
    identity: { did: "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", seq, time },
  } as JetstreamEvent);
  guard.record(identity(1, "2024-09-09T19:46:02.102Z"));
  guard.arm();
  assert.equal(guard.isReplay({ ...identity(1, "2024-09-09T19:46:02.102Z"), time_us: 99 }), true);
  assert.equal(guard.isReplay(identity(2, "2024-09-09T19:46:02.102Z")), false);
  assert.equal(guard.isReplay(identity(1, "2024-09-09T19:46:03.000Z")), false);
});
