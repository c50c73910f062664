import assert from "node:assert/strict";
import { type RunContext, searchFurther } from "../src/pipeline/context.ts";
import { ReplayGuard } from "../src/pipeline/filter.ts";
import { shapeProblem } from "../src/jetstream/events.ts";
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

Deno.test("ReplayGuard recognises the same content again, whatever its time_us, and only that", () => {
  const guard = new ReplayGuard(100);
  for (let i = 0; i < 50; i++) assert.equal(guard.repeats(commit(i)), false, `event ${i} is new`);
  // The same content under another time_us (a rewind on another instance, a server's re-ingest).
  assert.equal(guard.repeats({ ...commit(7), time_us: 1 }), true);
  assert.equal(guard.repeats(commit(49)), true);
  // Any field of the identity that differs makes it another event.
  assert.equal(guard.repeats(commit(7, { rev: "3lother" })), false);
  assert.equal(guard.repeats(commit(8, { operation: "delete" })), false);
  assert.equal(guard.repeats(commit(9, { rkey: "rkother" })), false);
  assert.equal(guard.repeats(commit(50)), false);
  assert.equal(guard.repeats(commit(50)), true, "a new event is remembered at once");
});

Deno.test("ReplayGuard remembers only the last `capacity` events", () => {
  const guard = new ReplayGuard(10);
  for (let i = 0; i < 25; i++) guard.repeats(commit(i));
  assert.equal(guard.repeats(commit(14)), false, "older than the window: new again (and now remembered)");
  // Remembering 14 pushed 15 out; 16 to 24 are still there.
  assert.equal(guard.repeats(commit(15)), false);
  for (let i = 17; i < 25; i++) assert.equal(guard.repeats(commit(i)), true, `event ${i}`);
});

Deno.test("ReplayGuard remembers keys given as (b, a) pairs, in order, each once", () => {
  const source = new ReplayGuard(100);
  const keys: number[] = [];
  for (let i = 0; i < 25; i++) {
    source.repeats(commit(i));
    keys.push(source.lastB, source.lastA);
  }
  const next = new ReplayGuard(10);
  next.remember(keys.slice(2 * 21));
  for (let i = 21; i < 25; i++) assert.equal(next.repeats(commit(i)), true, `event ${i}`);
  assert.equal(next.repeats(commit(20)), false);
  // Given again (with one more, 19), only 19 is new; in order, so that the oldest go first.
  next.remember(keys.slice(2 * 19));
  assert.equal(next.repeats(commit(19)), true);
  for (let i = 0; i < 4; i++) next.repeats(commit(100 + i));
  // All 10 slots: 21 to 24 (remembered first), 20, 19, 100 to 103. One more pushes out 21, the
  // oldest, and nothing else: had 20 and 21 to 24 been remembered twice, 21 would still be there.
  next.repeats(commit(104));
  assert.equal(next.repeats(commit(22)), true);
  assert.equal(next.repeats(commit(19)), true);
  assert.equal(next.repeats(commit(21)), false);
});

Deno.test("ReplayGuard.seen() recognises without remembering", () => {
  const guard = new ReplayGuard(4);
  assert.equal(guard.seen(commit(1)), false);
  assert.equal(guard.seen(commit(1)), false, "seen() did not remember it");
  for (let i = 1; i <= 4; i++) guard.repeats(commit(i));
  assert.equal(guard.seen(commit(1)), true);
  guard.repeats(commit(5));
  assert.equal(guard.seen(commit(1)), false, "forgotten to make room for 5");
  assert.equal(guard.seen(commit(2)), true);
});

Deno.test("ReplayGuard agrees with a plain window of the last `capacity` keys over a long random run", () => {
  // Small table, many collisions and evictions: the open addressing and its deletions must hold.
  let seed = 7;
  const random = () => (seed = Math.imul(seed ^ (seed >>> 15), 0x2c1b3c6d) + 0x9e3779b9 | 0) >>> 0;
  for (const capacity of [1, 3, 64, 1000]) {
    const guard = new ReplayGuard(capacity);
    const window: number[] = [];
    for (let n = 0; n < 50_000; n++) {
      const i = random() % (capacity * 3 + 2);
      const expected = window.includes(i);
      assert.equal(guard.repeats(commit(i)), expected, `capacity ${capacity}, step ${n}, event ${i}`);
      if (!expected) {
        window.push(i);
        if (window.length > capacity) window.shift();
      }
    }
  }
});

Deno.test("ReplayGuard keys identity and account events by did, kind, time and seq", () => {
  const guard = new ReplayGuard(10);
  const identity = (seq: number, time: string): JetstreamEvent => ({
    did: "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb",
    time_us: 5,
    kind: "identity",
    identity: { did: "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb", seq, time },
  } as JetstreamEvent);
  assert.equal(guard.repeats(identity(1, "2024-09-09T19:46:02.102Z")), false);
  assert.equal(guard.repeats({ ...identity(1, "2024-09-09T19:46:02.102Z"), time_us: 99 }), true);
  assert.equal(guard.repeats(identity(2, "2024-09-09T19:46:02.102Z")), false);
  assert.equal(guard.repeats(identity(1, "2024-09-09T19:46:03.000Z")), false);
});

Deno.test("shapeProblem() takes a time_us from 2001 to a day past this machine's clock, and no other", () => {
  const nowUs = Date.now() * 1000;
  const ev = (time_us: number) => ({ did: "did:plc:x", time_us, kind: "identity", identity: {} });
  // A server's clock ahead of this one, or this one behind, by hours: still an event.
  assert.equal(shapeProblem(ev(nowUs + 2 * 3_600_000_000)), undefined);
  assert.equal(shapeProblem(ev(1_000_000_000_000_000)), undefined);
  for (const t of [nowUs + 2 * 86_400_000_000, 4102444800000000, 999_999_999_999_999, 0, -5]) {
    assert.equal(shapeProblem(ev(t)), "bad_time", String(t));
  }
  // There but no integer of µs: a bad time too, not a missing field (as before).
  for (const t of [9007199254740993, 1725911162329308.5, "1725911162329308", true]) {
    assert.equal(shapeProblem(ev(t as number)), "bad_time", String(t));
  }
  assert.equal(shapeProblem({ did: "did:plc:x", kind: "identity", identity: {} }), "missing_fields");
  // The bound can be given, as the sync does once for the frames it reads together.
  assert.equal(shapeProblem(ev(nowUs), nowUs - 1), "bad_time");
});

Deno.test("shapeProblem() refuses as bad_value a did, operation, collection or rkey no Jetstream sends", () => {
  const t = 1725911162329308;
  const post = (did: string, commit: Record<string, unknown> = {}) => ({
    did,
    time_us: t,
    kind: "commit",
    commit: {
      rev: "3l3qo2vuowo2b",
      operation: "create",
      collection: "app.bsky.feed.post",
      rkey: "3k",
      ...commit,
    },
  });
  for (const did of ["did:plc:abc", "did:web:example.com", "did:example:a:b"]) {
    assert.equal(shapeProblem(post(did)), undefined, did);
  }
  for (const operation of ["update", "delete"]) {
    assert.equal(shapeProblem(post("did:plc:abc", { operation })), undefined);
  }
  for (
    const did of [
      "",
      "x",
      "did:",
      "did:plc",
      "did:plc:",
      "did::abc",
      "DID:plc:abc",
      `did:web:${"a".repeat(2041)}`,
    ]
  ) {
    assert.equal(shapeProblem(post(did)), "bad_value", did);
    assert.equal(shapeProblem({ did, time_us: t, kind: "account", account: {} }), "bad_value", did);
  }
  for (const commit of [{ operation: "explode" }, { operation: "" }, { collection: "" }, { rkey: "" }]) {
    assert.equal(shapeProblem(post("did:plc:abc", commit)), "bad_value", JSON.stringify(commit));
  }
  // A field that is not there at all, as Go's omitempty leaves an empty one, stays missing_fields.
  assert.equal(shapeProblem(post("did:plc:abc", { operation: undefined })), "missing_fields");
  // The fields the content key reads as text or a number: another type is bad_value (before, the
  // key's String() threw on some, ending the run, every time it met the event again).
  assert.equal(shapeProblem(post("did:plc:abc", { rev: undefined })), undefined);
  for (const rev of [{ toString: 1 }, [[["x"]]], 5, null]) {
    assert.equal(shapeProblem(post("did:plc:abc", { rev })), "bad_value", JSON.stringify(rev));
  }
  const relay = (body: Record<string, unknown>) => ({
    did: "did:plc:abc",
    time_us: t,
    kind: "identity",
    identity: body,
  });
  assert.equal(
    shapeProblem(relay({ did: "did:plc:abc", seq: 5, time: "2024-09-09T19:46:02.102Z" })),
    undefined,
  );
  assert.equal(shapeProblem(relay({})), undefined);
  for (const body of [{ time: { valueOf: 1, toString: 1 } }, { time: 5 }, { seq: "5" }, { seq: {} }]) {
    assert.equal(shapeProblem(relay(body)), "bad_value", JSON.stringify(body));
  }
  assert.equal(shapeProblem({ ...relay({}), identity: [] }), "missing_fields");
});

Deno.test("searchFurther() doubles the rewind up to 64 rewinds or the beginning of the history, then gives up at the first rewind", () => {
  const rewindUs = 5_000_000;
  const lastUs = 1_700_000_000_000_000;
  const ctx = {
    o: { rewindUs },
    awaited: { lastUs, lastB: 1, lastA: 1, lined: undefined },
    search: { rewindUs, historyMet: false, linedUp: false },
    searchedUs: 0,
  } as unknown as RunContext;
  // 10, 20, … 320 s, then back to 5 s, the search given up.
  const cursors: number[] = [];
  while (ctx.search !== undefined) cursors.push(lastUs - searchFurther(ctx));
  assert.deepEqual(cursors, [10, 20, 40, 80, 160, 320, 5].map((s) => s * 1_000_000));
  assert.equal(ctx.searchedUs, 320_000_000);
  // A v2 host said that the 20 s step was older than its history: no further back.
  ctx.search = { rewindUs, historyMet: false, linedUp: false };
  const tried = [lastUs - searchFurther(ctx), lastUs - searchFurther(ctx)];
  ctx.search!.historyMet = true;
  tried.push(lastUs - searchFurther(ctx));
  assert.deepEqual(tried, [10, 20, 5].map((s) => s * 1_000_000));
  assert.equal(ctx.search, undefined);
  assert.equal(ctx.searchedUs, 20_000_000);
});
