import assert from "node:assert/strict";
import { serialize } from "node:v8";
import { Batcher } from "../src/pipeline/batch.ts";
import { compressEvent, decodeQueueMessage, type QueueMessage, repackMessage } from "../src/queue/message.ts";
import { KV_VALUE_LIMIT, MAX_RECORD_DEPTH, nestedTooDeep, serializedSizeBound } from "../src/queue/size.ts";
import { QueueWriter } from "../src/queue/writer.ts";
import { emptyCheckpoint, queueKey, readCheckpoint, retryWhileBusy } from "../src/queue/kv_queue.ts";
import { queueLength } from "../src/queue/status.ts";
import { commit, drainQueue } from "./helpers/events.ts";
import type { JetstreamEvent } from "../src/jetstream/events.ts";
import { mapV2Frame } from "../src/jetstream/v2.ts";
import { generateCapture } from "../src/server/synth.ts";
import { v2Message } from "../src/server/v2_frames.ts";
import { slowKv } from "./helpers/slow_kv.ts";
import { patchAtomic } from "./helpers/kv_patch.ts";
import { delay } from "../src/async.ts";

const T0 = Date.UTC(2026, 10, 27, 23, 59, 59) * 1000;

Deno.test("serializedSizeBound() is never below V8's serialized size", () => {
  const texts = [
    JSON.stringify(commit(T0)),
    JSON.stringify(commit(T0, { text: "日本語のテキスト😀".repeat(50) })),
    JSON.stringify(commit(T0, { text: "\\u65e5 escaped" })).replace("escaped", "\\u65e5"),
    JSON.stringify({
      did: "x",
      time_us: 1,
      kind: "commit",
      commit: { a: [], b: {}, c: [[], [], {}], d: [1, 2, 3, 64, 8191] },
    }),
    JSON.stringify(commit(T0, { text: "é".repeat(3000) })),
    JSON.stringify({
      did: "x",
      time_us: 1,
      kind: "commit",
      commit: { items: Array.from({ length: 14_000 }, () => []) },
    }),
    JSON.stringify({
      did: "x",
      time_us: 1,
      kind: "commit",
      commit: { items: Array.from({ length: 5_000 }, (_, i) => [i]) },
    }),
    JSON.stringify({
      did: "x",
      time_us: 1,
      kind: "commit",
      commit: { items: Array.from({ length: 5_000 }, () => ({})) },
    }),
  ];
  // Only the strings around wide characters are two-byte: short wide strings in a long ASCII text, a
  // wide key, escaped quotes and backslashes next to wide characters, surrogate pairs, several strings.
  texts.push(JSON.stringify({
    did: "x",
    time_us: 1,
    kind: "commit",
    commit: {
      a: "ascii ".repeat(500),
      "キー": "é",
      q: '"😀\\"漢"\\',
      list: ["ü", "字", "x".repeat(300) + "😀", "\\u2028"],
      deep: { t: "tab\t漢\n" + "y".repeat(200) },
    },
  }));
  for (let i = 0; i < 50; i++) {
    const parts = Array.from({ length: 1 + (i % 7) }, (_, j) => 'ab"c'.repeat(i * j) + (j % 2 ? "字" : "é"));
    texts.push(
      JSON.stringify({ did: "x", time_us: i, kind: "commit", commit: { parts, [`k${"字".repeat(i)}`]: i } }),
    );
  }
  // All-ASCII texts whose escapes decide: Latin-1 stays one byte a character, U+2028 does not.
  texts.push(JSON.stringify(commit(T0, { text: "x".repeat(2000) })).replace('"xx', '"\\u00e9\\u2028'));
  texts.push(JSON.stringify(commit(T0, { text: "x".repeat(2000) })).replace('"xx', '"\\u00e9\\u00ff'));
  const encoder = new TextEncoder();
  for (const text of texts) {
    const actual = serialize(JSON.parse(text)).length;
    // With and without the UTF-8 length (which lets an all-ASCII text skip the wide-character search).
    for (const bound of [serializedSizeBound(text), serializedSizeBound(text, encoder.encode(text).length)]) {
      assert.ok(bound >= actual, `bound ${bound} < actual ${actual} for ${text.slice(0, 60)}`);
    }
  }
  // The hint changes nothing for an all-ASCII text without escapes, nor for one with a wide escape.
  const plain = JSON.stringify(commit(T0));
  assert.equal(serializedSizeBound(plain, plain.length), serializedSizeBound(plain));
  const escaped = texts.at(-2)!;
  assert.equal(serializedSizeBound(escaped, escaped.length), serializedSizeBound(escaped));
});

Deno.test("nestedTooDeep() follows the nesting of objects and arrays, not brackets in strings", () => {
  const nest = (levels: number) => `{"a":${"[".repeat(levels - 1)}1${"]".repeat(levels - 1)}}`;
  assert.equal(nestedTooDeep(nest(MAX_RECORD_DEPTH)), false);
  assert.equal(nestedTooDeep(nest(MAX_RECORD_DEPTH + 1)), true);
  // Brackets inside strings (escaped quotes too) do not nest.
  assert.equal(nestedTooDeep(JSON.stringify({ t: `\\"${"{[".repeat(400)}` })), false);
  // Many brackets side by side are shallow.
  assert.equal(nestedTooDeep(JSON.stringify(Array.from({ length: 1000 }, () => ({ b: [1] })))), false);
});

Deno.test("a message's seq is its last record's: none when a legacy host's record came after a v2 host's", () => {
  const b = new Batcher("q", 100);
  const add = (e: ReturnType<typeof commit>) =>
    b.add(e, JSON.stringify(e), "2026-11-27", "app.bsky.feed.post");
  b.host = "ws://v2.example/subscribe";
  add({ ...commit(T0), cursor: 1001 });
  b.host = "ws://legacy.example/subscribe";
  add(commit(T0 + 1));
  const [m] = b.take()!.messages;
  // (Before: seq 1001 of the v2 host, with the legacy record's time_us as the message's cursor.)
  assert.deepEqual([m.seq, m.seqHost, m.cursor], [undefined, undefined, T0 + 1]);
  b.host = "ws://v2.example/subscribe";
  add({ ...commit(T0 + 2), cursor: 1002 });
  assert.deepEqual([b.take()!.messages[0].seq], [1002]);
});

Deno.test("Batcher packs messages under 64 KiB and at most batchSize records", () => {
  const b = new Batcher("q", 100);
  let full = false;
  const wide = "漢字とemoji😀".repeat(200);
  for (let i = 0; i < 100; i++) {
    full = b.add(
      commit(T0 + i, { text: wide }),
      JSON.stringify(commit(T0 + i, { text: wide })),
      "2026-11-27",
      "app.bsky.feed.post",
    );
  }
  assert.ok(full);
  const batch = b.take()!;
  assert.equal(batch.records, 100);
  assert.ok(batch.messages.length > 1, "wide events must spill into several messages");
  for (const m of batch.messages) {
    const size = serialize({ v: 1, queue: "q", seq: 1, cursor: m.cursor, records: m.records }).length;
    assert.ok(size < KV_VALUE_LIMIT, `message of ${size} bytes`);
    assert.ok(m.count <= 100);
    // Each record's text travels with it: a refused commit is rebuilt from the texts.
    assert.deepEqual(m.texts.map((t) => JSON.parse(t)), m.records);
  }
  assert.equal(batch.messages.flatMap((m) => m.texts).length, 100);
  assert.equal(b.take(), undefined);
});

/** The event a v2 frame's text maps to, and how much shorter its JSON is at least. */
function mapped(frame: string): { event: JetstreamEvent; shorterBy: number } {
  const m = mapV2Frame(JSON.parse(frame));
  if (m.type !== "event") throw new Error(`not an event frame: ${frame}`);
  return m;
}

/** v2 frames that a server could send, from synthetic events and some spelled oddly but validly. */
function v2Frames(): string[] {
  const frames = generateCapture({ count: 3000, seed: 5, startUs: T0 }).map((line, i) =>
    // Seqs of 1 to 16 digits.
    v2Message(line, 10 ** (i % 16) + i)
  );
  const ev = JSON.stringify(commit(T0, { text: "é 😀" }));
  const frame = v2Message(ev, 7);
  frames.push(
    // Spaces and line breaks; escapes where none are needed and a seq spelled short.
    JSON.stringify(JSON.parse(frame), null, 1),
    frame.replace('"seq":7', '"seq":7e0').replace('"$type":"message"', '"\\u0024type":"m\\u0065ssage"'),
    // No rev, record or cid; the least of an identity (its members in another order) and an account.
    '{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#commit","seq":1,"did":"d","time":"2026-11-27T23:59:59Z","operation":"delete","collection":"c","rkey":"r"}}',
    '{"payload":{"identity":{},"time":"2026-11-27T23:59:59Z","did":"d","seq":1,"$type":"network.bsky.jetstream.subscribeEvents#identity"},"$type":"message"}',
    '{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#account","seq":1,"did":"d","time":"2026-11-27T23:59:59Z","account":[]}}',
  );
  return frames;
}

Deno.test("a v2 frame's text, less mapV2Frame()'s shorterBy, bounds its event's stored JSON and its serialized size", () => {
  const utf8 = new TextEncoder();
  for (const frame of v2Frames()) {
    const { event, shorterBy } = mapped(frame);
    const stored = JSON.stringify(event);
    assert.ok(
      frame.length - shorterBy >= stored.length,
      `${frame.length} - ${shorterBy} < ${stored.length}: ${frame}`,
    );
    const bound = serializedSizeBound(frame, utf8.encode(frame).byteLength, shorterBy);
    assert.ok(bound >= serializedSizeBound(stored), frame);
    assert.ok(bound >= serialize(event).length, frame);
  }
});

/** The largest size bound of a record that travels in a message of queue "q". */
const RECORDS_ROOM = new Batcher("q", 1).recordRoom;

/** A commit with a post text of `length` as a v2 frame with `seq`, and the event mapped from it. */
function framedCommit(length: number, seq: number) {
  const frame = v2Message(JSON.stringify(commit(T0 + seq % 1000, { text: "x".repeat(length) })), seq);
  return { frame, ...mapped(frame) };
}

/** The longest post text for which `fits(bound of framedCommit(…, seq)'s event's own JSON)` holds. */
function longestText(fits: (bound: number) => boolean, seq = 1): number {
  let [lo, hi] = [0, KV_VALUE_LIMIT];
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (fits(serializedSizeBound(JSON.stringify(framedCommit(mid, seq).event)))) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

Deno.test("Batcher packs events sized from their v2 frames as it packs them sized from their own JSON", () => {
  // 100 records whose own bounds leave under 1 % of a message free: they share one, either way.
  const length = longestText((bound) => 100 * (bound + 6) <= RECORDS_ROOM);
  const own = new Batcher("q", 100);
  const framed = new Batcher("q", 100);
  for (let seq = 1; seq <= 100; seq++) {
    const { frame, event, shorterBy } = framedCommit(length, seq);
    const text = JSON.stringify(event);
    own.add(event, text, "2026-11-27", "app.bsky.feed.post", text.length);
    framed.add(event, frame, "2026-11-27", "app.bsky.feed.post", frame.length, shorterBy);
  }
  const a = own.take()!, b = framed.take()!;
  assert.equal(a.messages.length, 1);
  assert.equal(b.messages.length, 1);
  // The frames' texts are kept, and make the records again.
  assert.ok(b.messages[0].texts[0].startsWith('{"$type":"message"'));
  assert.deepEqual(b.messages[0].texts.map(b.messages[0].fromText!), b.messages[0].records);
});

Deno.test("Batcher keeps the texts of /subscribe events and of v2 frames in separate messages, each of which makes its records again", () => {
  // A failover from a /subscribe host to a v2 host and back, within one batch.
  const b = new Batcher("q", 100);
  const own = (seq: number) => {
    const { event } = framedCommit(10, seq);
    b.add(event, JSON.stringify(event), "2026-11-27", "c");
  };
  const framed = (seq: number) => {
    const { frame, event, shorterBy } = framedCommit(10, seq);
    b.add(event, frame, "2026-11-27", "c", frame.length, shorterBy);
  };
  own(1);
  own(2);
  framed(3);
  framed(4);
  own(5);
  const messages = b.take()!.messages;
  assert.deepEqual(messages.map((m) => m.count), [2, 2, 1]);
  assert.deepEqual(messages.map((m) => m.fromText !== undefined), [false, true, false]);
  for (const m of messages) {
    assert.deepEqual(m.texts.map(m.fromText ?? ((t) => JSON.parse(t))), m.records);
  }
});

Deno.test("decodeQueueMessage() names the message and the entry of a compressed event it cannot unpack", () => {
  const message = {
    v: 1,
    queue: "q",
    seq: 9,
    cursor: 0,
    records: [],
    compressed: [new Uint8Array([1, 2, 3])],
  };
  assert.throws(
    () => decodeQueueMessage(message),
    (err: unknown) =>
      err instanceof TypeError &&
      /^Cannot decode queue message 9 of queue 'q': compressed\[0\] \(3 bytes\) is not the gzip of an event's JSON: /
        .test(err.message),
  );
  assert.throws(
    () => decodeQueueMessage({ ...message, compressed: ["text"] }),
    /^TypeError: Cannot decode queue message: expected \{ v: 1, queue, seq, cursor, records \}: 'compressed\[0\]' is "text" \(a string\), expected bytes \(a Uint8Array\)$/,
  );
  // The gzip of JSON that is no object: not an event. (Before, it was returned as one.)
  assert.throws(
    () => decodeQueueMessage({ ...message, compressed: [compressEvent("42")] }),
    (err: Error) =>
      /^Cannot decode queue message 9 of queue 'q': compressed\[0\] \(\d+ bytes\) is not the gzip of an event's JSON: it holds 42, not an object$/
        .test(err.message),
  );
});

Deno.test("decodeQueueMessage() names the field of a value that is not a queue message, and a record that is not an event", () => {
  const message = { v: 1, queue: "q", seq: 3, cursor: 0, records: [{ did: "did:plc:x" }] };
  const cases: [unknown, string][] = [
    [{ ...message, v: 2 }, "'v' is 2, expected 1"],
    [{ ...message, seq: "1" }, `'seq' is "1" (a string), expected a whole number from 1`],
    // (Before: taken for a message, though seqs count from 1.)
    [{ ...message, seq: 0 }, "'seq' is 0, expected a whole number from 1"],
    [{ ...message, seq: 1.5 }, "'seq' is 1.5, expected a whole number from 1"],
    [{ ...message, records: "x" }, `'records' is "x" (a string), expected an array`],
    [{ ...message, records: undefined }, "'records' is missing, expected an array"],
    [{ ...message, compressed: {} }, "'compressed' is an object without keys, expected an array, or nothing"],
  ];
  for (const [value, problem] of cases) {
    assert.throws(
      () => decodeQueueMessage(value),
      (err: unknown) =>
        err instanceof TypeError &&
        err.message ===
          `Cannot decode queue message: expected { v: 1, queue, seq, cursor, records }: ${problem}`,
      problem,
    );
  }
  assert.throws(() => decodeQueueMessage("hello"), /, got "hello" \(a string\)$/);
  // Thousands of keys are not all listed.
  const wide = Object.fromEntries(Array.from({ length: 5000 }, (_, i) => [`k${i}`, i]));
  assert.throws(
    () => decodeQueueMessage({ ...message, records: wide }),
    (err: Error) =>
      err.message.length < 200 &&
      /'records' is an object with keys k0, .*, … \(5000 in all\)/.test(err.message),
  );
  // (Before, records that are no objects were returned as events.)
  assert.throws(
    () => decodeQueueMessage({ ...message, records: [{ did: "did:plc:x" }, null, 5] }),
    (err: Error) =>
      err.message ===
        "Cannot decode queue message 3 of queue 'q': records[1] is null, expected an event (an object)",
  );
});

Deno.test("Batcher judges an event that its v2 frame makes look too large or too deep by its own JSON", () => {
  const b = new Batcher("q", 100);
  // Its frame says over a message, its own JSON says under: a record, not gzipped. (The frame spells
  // its 16-digit seq in 6 more characters than the stored "cursor", which the bound does not count on.)
  const seq = 10 ** 15;
  const near = framedCommit(longestText((bound) => bound <= RECORDS_ROOM, seq), seq);
  const nearFrame = near.frame;
  assert.ok(serializedSizeBound(nearFrame, nearFrame.length, near.shorterBy) > RECORDS_ROOM);
  b.add(near.event, nearFrame, "2026-11-27", "c", nearFrame.length, near.shorterBy);
  // An identity body nested exactly as deep as a record may be: its frame is one level deeper.
  let body: unknown = {};
  for (let i = 1; i < MAX_RECORD_DEPTH - 1; i++) body = { a: body };
  const deepFrame =
    `{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#identity","seq":2,"did":"d","time":"2026-11-27T23:59:59.000001Z","identity":${
      JSON.stringify(body)
    }}}`;
  assert.equal(nestedTooDeep(deepFrame), true);
  const deep = mapped(deepFrame);
  assert.equal(nestedTooDeep(JSON.stringify(deep.event)), false);
  b.add(deep.event, deepFrame, "2026-11-27", undefined, deepFrame.length, deep.shorterBy);
  // Too large by its own JSON as well: gzipped, as its JSON.
  const bigFrame = v2Message(JSON.stringify(commit(T0 + 2, { text: "z".repeat(KV_VALUE_LIMIT) })), 3);
  const big = mapped(bigFrame);
  b.add(big.event, bigFrame, "2026-11-27", "c", bigFrame.length, big.shorterBy);
  const [first, second, third, ...rest] = b.take()!.messages;
  assert.equal(rest.length, 0);
  // The first two judged again and kept as records, with their own JSON as their texts.
  assert.deepEqual(first.records, [near.event]);
  assert.deepEqual(first.texts, [JSON.stringify(near.event)]);
  assert.equal(first.fromText, undefined);
  assert.deepEqual(second.records, [deep.event]);
  assert.deepEqual(second.texts, [JSON.stringify(deep.event)]);
  assert.equal(third.records.length, 0);
  assert.deepEqual(
    decodeQueueMessage({ v: 1, queue: "q", seq: 3, cursor: 0, records: [], compressed: third.compressed }),
    [big.event],
  );
});

/** A KV database in a temporary folder; closed (if still open) and removed on dispose. */
async function tempKv(): Promise<{ path: string; kv: Deno.Kv } & AsyncDisposable> {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/q.sqlite`;
  const kv = await Deno.openKv(path);
  return {
    path,
    kv,
    async [Symbol.asyncDispose]() {
      closeQuietly(kv);
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Closes `kv`, which a test may have closed already. */
function closeQuietly(kv: Deno.Kv): void {
  try {
    kv.close();
  } catch { /* closed */ }
}

/**
 * Checks that the queue in `db` holds `events` exactly, in messages numbered 1, 2, 3… without a gap
 * and in their order, and that its checkpoint and records counter say so. Closes the database.
 */
async function assertStoredInOrder(
  db: { path: string; kv: Deno.Kv },
  events: { time_us: number }[],
): Promise<void> {
  const cp = (await readCheckpoint(db.kv, "q")).value!;
  assert.equal(cp.recordsStored, events.length);
  assert.equal(cp.cursor, events.at(-1)!.time_us);
  const records = await db.kv.get<Deno.KvU64>(queueKey("q", "count", "records"));
  assert.equal(Number(records.value!.value), events.length);
  db.kv.close();
  const msgs = (await drainQueue(db.path, cp.seq)) as QueueMessage[];
  msgs.sort((a, b) => a.seq - b.seq);
  assert.deepEqual(msgs.map((m) => m.seq), Array.from({ length: cp.seq }, (_, i) => i + 1));
  assert.deepEqual(msgs.flatMap((m) => m.records.map((r) => r.time_us)), events.map((e) => e.time_us));
}

function newCheckpoint(queue: string) {
  return { checkpoint: emptyCheckpoint(queue), versionstamp: null };
}

Deno.test("QueueWriter stores an event over 64 KiB whole, gzipped, with its checkpoint", async () => {
  await using db = await tempKv();
  const { path, kv } = db;
  const huge = commit(T0, { text: "大きい投稿😀".repeat(9000) });
  const text = JSON.stringify(huge);
  assert.ok(serialize(huge).length > KV_VALUE_LIMIT);
  const small = commit(T0 + 1);
  const b = new Batcher("q", 100);
  b.add(huge, text, "2026-11-27", "app.bsky.feed.post");
  b.add(small, JSON.stringify(small), "2026-11-27", "app.bsky.feed.post");
  const w = new QueueWriter(kv, "q", newCheckpoint("q"), () => {});
  await w.add(b.take()!);
  await w.flush();
  const cp = (await readCheckpoint(kv, "q")).value!;
  assert.equal(cp.seq, 2);
  assert.equal(cp.cursor, T0 + 1);
  assert.equal(cp.recordsStored, 2);
  assert.equal(await queueLength(kv, "q"), 2);
  kv.close();
  const msgs = (await drainQueue(path, 2)) as { seq: number; compressed?: Uint8Array[] }[];
  msgs.sort((a, b) => a.seq - b.seq);
  assert.equal(msgs[0].compressed?.length, 1);
  assert.deepEqual(decodeQueueMessage(msgs[0]), [huge]);
  assert.deepEqual(decodeQueueMessage(msgs[1]), [small]);
});

Deno.test("QueueWriter splits a batch only where KV's commit limits force it, keeping counters exact", async () => {
  await using db = await tempKv();
  const { path, kv } = db;
  // 100 records of ~30 KB each: ~3 MB, far over one commit's 800 KiB.
  const b = new Batcher("q", 100);
  // The first event is on 2026-11-27, the other 99 after midnight.
  const events = Array.from(
    { length: 100 },
    (_, i) => commit(i === 0 ? T0 : T0 + 1_000_000 + i, { text: "x".repeat(30_000) }),
  );
  for (const e of events) b.add(e, JSON.stringify(e), i2day(e.time_us), "app.bsky.feed.post");
  let commits = 0;
  const w = new QueueWriter(kv, "q", newCheckpoint("q"), () => commits++);
  await w.add(b.take()!);
  await w.flush();
  assert.ok(commits > 1, `expected several commits, got ${commits}`);
  const cp = (await readCheckpoint(kv, "q")).value!;
  assert.equal(cp.recordsStored, 100);
  assert.equal(cp.cursor, T0 + 1_000_099);
  const days = await Array.fromAsync(kv.list<Deno.KvU64>({ prefix: queueKey("q", "day") }));
  assert.deepEqual(days.map((d) => [d.key[3], Number(d.value.value)]), [["2026-11-27", 1], [
    "2026-11-28",
    99,
  ]]);
  kv.close();
  const msgs = await drainQueue(path, cp.seq);
  const got = msgs.flatMap((m) => decodeQueueMessage(m)).sort((a, b) => a.time_us - b.time_us);
  assert.deepEqual(got, events);
});

Deno.test("QueueWriter on a slow disk fills the next commit while one is in flight, and sends it once full", async () => {
  await using db = await tempKv();
  const { kv } = db;
  // Every commit takes 200 ms to land: a slow disk, with the real KV behind it.
  let started = 0;
  let inFlight = 0;
  let most = 0;
  let waiting: { n: number; resolve: () => void } | undefined;
  const slow = slowKv(kv, 200, {
    started: () => {
      most = Math.max(most, ++inFlight);
      if (++started >= (waiting?.n ?? Infinity)) waiting!.resolve();
    },
    ended: () => inFlight--,
  });
  const untilStarted = (n: number) =>
    started >= n ? Promise.resolve() : new Promise<void>((resolve) => waiting = { n, resolve });
  const w = new QueueWriter(slow, "q", newCheckpoint("q"), () => {});
  // Batches of ten 10 KB events: about 100 KB each.
  const events = Array.from({ length: 150 }, (_, i) => commit(T0 + i, { text: "y".repeat(10_000) }));
  const batch = (from: number) => {
    const b = new Batcher("q", 10);
    for (const e of events.slice(from, from + 10)) {
      b.add(e, JSON.stringify(e), "2026-11-27", "app.bsky.feed.post");
    }
    return b.take()!;
  };
  // The writer lock, then the first batch: KV had nothing in hand, so it went at once.
  await w.add(batch(0));
  await untilStarted(2);
  // ~300 KB more while that commit is in flight: they wait for it and go together in one commit.
  for (let i = 10; i < 40; i += 10) await w.add(batch(i));
  await w.flush();
  assert.equal(started, 3, "lock, first batch, the next three together");
  assert.equal(most, 1, `commits in flight at most: ${most}`);
  // Now ~1.1 MB while one is in flight: the next commit fills up (800 KiB) and goes before the
  // first lands.
  await w.add(batch(40));
  await untilStarted(4);
  for (let i = 50; i < 150; i += 10) await w.add(batch(i));
  await w.flush();
  assert.equal(most, 2, `commits in flight at most: ${most}`);
  assert.equal(started, 6, "the batch alone, a full commit, the rest");
  assert.equal((await readCheckpoint(kv, "q")).value!.recordsStored, 150);
});

Deno.test("QueueWriter makes add() wait once the commit being built is full and every slot is taken", async () => {
  await using db = await tempKv();
  const { kv } = db;
  // Every commit takes 300 ms to land, the writer lock's included.
  const slow = slowKv(kv, 300);
  let durable = 0;
  const w = new QueueWriter(slow, "q", newCheckpoint("q"), (r) => durable += r.records);
  // Batches of ~195 KB: four fit in one commit (800 KiB), a fifth does not.
  const big = commit(T0, { text: "z".repeat(19_000) });
  const batch = () => {
    const b = new Batcher("q", 10);
    for (let i = 0; i < 10; i++) b.add(big, JSON.stringify(big), "2026-11-27", "app.bsky.feed.post");
    return b.take()!;
  };
  const outstandingAtWait: number[] = [];
  for (let i = 0; i < 24; i++) {
    const outstanding = i - durable / 10;
    const pending = w.add(batch());
    // add() either returns at once or waits for a commit to be issued or to land.
    if (await Promise.race([pending.then(() => false), delay(50).then(() => true)])) {
      outstandingAtWait.push(outstanding);
    }
    await pending;
  }
  await w.flush();
  // It waited, and never with more than three commits in flight and one full commit being built
  // (16 batches) already accepted; at least once, with all three slots taken (12 or more).
  assert.ok(outstandingAtWait.length > 0, "add() never waited");
  assert.ok(Math.max(...outstandingAtWait) <= 16, `waited with ${outstandingAtWait} batches outstanding`);
  assert.ok(Math.max(...outstandingAtWait) >= 12, `waited with ${outstandingAtWait} batches outstanding`);
  assert.equal((await readCheckpoint(kv, "q")).value!.recordsStored, 240);
});

function i2day(us: number): string {
  return new Date(us / 1000).toISOString().slice(0, 10);
}

Deno.test("QueueWriter refuses to continue when another writer changed the queue", async () => {
  await using db = await tempKv();
  const { kv } = db;
  const w = new QueueWriter(kv, "q", newCheckpoint("q"), () => {});
  const b = new Batcher("q", 1);
  b.add(commit(T0), JSON.stringify(commit(T0)), "2026-11-27", "app.bsky.feed.post");
  await w.add(b.take()!);
  await w.flush();
  // A second writer takes the queue's lock.
  await kv.set(queueKey("q", "writer"), { run: "intruder" });
  b.add(commit(T0 + 1), JSON.stringify(commit(T0 + 1)), "2026-11-27", "app.bsky.feed.post");
  await w.add(b.take()!);
  await assert.rejects(() => w.flush(), /changed by another writer/);
});

Deno.test("QueueWriter refuses to start on a checkpoint that changed since it was read", async () => {
  await using db = await tempKv();
  const { kv } = db;
  const stale = newCheckpoint("q");
  const first = new QueueWriter(kv, "q", stale, () => {});
  const b = new Batcher("q", 1);
  b.add(commit(T0), JSON.stringify(commit(T0)), "2026-11-27", "app.bsky.feed.post");
  await first.add(b.take()!);
  await first.flush();
  // A second writer that read the (then empty) checkpoint before the first one committed.
  const second = new QueueWriter(kv, "q", stale, () => {});
  b.add(commit(T0 + 1), JSON.stringify(commit(T0 + 1)), "2026-11-27", "app.bsky.feed.post");
  await second.add(b.take()!);
  await assert.rejects(() => second.flush(), /changed by another writer/);
  assert.equal((await readCheckpoint(kv, "q")).value?.seq, 1);
});

/**
 * `kv`, logging every commit as it is handed to KV: the seqs and record times it enqueues, then
 * whether it landed.
 */
function loggingKv(kv: Deno.Kv) {
  const log: { seqs: number[]; times: number[]; ok?: boolean }[] = [];
  const proxy = patchAtomic(kv, (op, commit) => {
    const entry: (typeof log)[number] = { seqs: [], times: [] };
    const enqueue = op.enqueue.bind(op);
    op.enqueue = (value, options) => {
      const m = value as { seq: number; records: { time_us: number }[] };
      entry.seqs.push(m.seq);
      entry.times.push(...m.records.map((r) => r.time_us));
      return enqueue(value, options);
    };
    op.commit = () => {
      log.push(entry);
      const p = commit();
      p.then((r) => entry.ok = r.ok, () => entry.ok = false);
      return p;
    };
  });
  return { kv: proxy, log };
}

Deno.test("QueueWriter sends nothing after a commit that KV refuses until that commit's records are stored", async () => {
  await using db = await tempKv();
  const { kv } = db;
  const { kv: logged, log } = loggingKv(kv);
  const w = new QueueWriter(logged, "q", newCheckpoint("q"), () => {});
  // Records of 1,000 doubles: 4 KB of JSON each, 9 KB serialized, which the size bound does not
  // foresee; then ordinary records, more than two commits' worth. All in one batch, so that the
  // commit after the first is full at once, before KV has answered for the first.
  const doubles = Array.from({ length: 100 }, (_, i) => {
    const e = commit(T0 + i, { collection: "com.example.weird" });
    (e as { commit: { record: Record<string, unknown> } }).commit.record.items = Array.from(
      { length: 1000 },
      () => 0.5,
    );
    return e;
  });
  const plain = Array.from({ length: 400 }, (_, i) => commit(T0 + 1000 + i, { text: "p".repeat(5000) }));
  const events = [...doubles, ...plain];
  const b = new Batcher("q", events.length);
  for (const e of events) b.add(e, JSON.stringify(e), "2026-11-27", undefined);
  await w.add(b.take()!);
  await w.flush();
  assert.ok(
    log.some((c) => c.ok === false),
    "no commit was refused: the test no longer exercises a repair",
  );
  // The commits that landed, in the order KV got them, stored the records in their order: none
  // of the later records went before the refused records were stored again.
  const landed = log.filter((c) => c.ok).flatMap((c) => c.times);
  assert.deepEqual(landed, events.map((e) => e.time_us));
  await assertStoredInOrder(db, events);
});

/**
 * `kv`, whose commits numbered in `busy` (counting from 1, the writer lock's included) fail once,
 * `afterMs` after they are issued, the way SQLite's "database is locked" does: without writing
 * anything. Any later commit of the same operation goes through.
 */
function busyKv(kv: Deno.Kv, busy: Set<number>, afterMs: number) {
  let n = 0;
  const failed: number[] = [];
  const proxy = patchAtomic(kv, (op, commit) => {
    let first = true;
    op.commit = () => {
      const number = first ? ++n : 0;
      first = false;
      if (!busy.has(number)) return commit();
      failed.push(number);
      return delay(afterMs).then(() => Promise.reject(new TypeError("database is locked")));
    };
  });
  return { kv: proxy, failed };
}

Deno.test("QueueWriter commits again what SQLite was too busy to take, in order, even after later commits landed", async () => {
  await using db = await tempKv();
  const { kv } = db;
  // Commit 2 (the first batch, alone) and commit 5 (in the middle of a burst, with later commits
  // in flight that land before it fails) are refused once.
  const { kv: flaky, failed } = busyKv(kv, new Set([2, 5]), 100);
  const w = new QueueWriter(flaky, "q", newCheckpoint("q"), () => {});
  // Batches of ten 10 KB events: about 100 KB each, so that commits fill up and overlap.
  const events = Array.from({ length: 400 }, (_, i) => commit(T0 + i, { text: "b".repeat(10_000) }));
  for (let i = 0; i < events.length; i += 10) {
    const b = new Batcher("q", 10);
    for (const e of events.slice(i, i + 10)) {
      b.add(e, JSON.stringify(e), "2026-11-27", "app.bsky.feed.post");
    }
    await w.add(b.take()!);
    if (i === 0) await delay(200);
  }
  await w.flush();
  assert.deepEqual(failed, [2, 5]);
  await assertStoredInOrder(db, events);
});

Deno.test("QueueWriter keeps writing while another connection writes to the same database", async () => {
  await using db = await tempKv();
  const { path, kv } = db;
  const other = await Deno.openKv(path);
  try {
    // Another connection writing all along, as a consumer acknowledging messages does: SQLite then
    // reports some of the writer's commits busy (measured: a few in a hundred).
    let stop = false;
    const writes = (async () => {
      let n = 0;
      while (!stop) {
        await retryWhileBusy(() => other.atomic().sum(["other"], 1n).commit(), 5000);
        n++;
      }
      return n;
    })();
    const w = new QueueWriter(kv, "q", newCheckpoint("q"), () => {});
    const events = Array.from({ length: 300 }, (_, i) => commit(T0 + i));
    for (let i = 0; i < events.length; i++) {
      const b = new Batcher("q", 1);
      b.add(events[i], JSON.stringify(events[i]), "2026-11-27", "app.bsky.feed.post");
      await w.add(b.take()!);
      if (i % 3 === 0) await delay(1);
    }
    await w.flush();
    stop = true;
    assert.ok(await writes > 0);
    await assertStoredInOrder(db, events);
  } finally {
    closeQuietly(other);
  }
});

Deno.test("QueueWriter keeps a v2 host's seq in the checkpoint when a record it gzips after a refusal is the last", async () => {
  await using db = await tempKv();
  const w = new QueueWriter(db.kv, "q", newCheckpoint("q"), () => {});
  const host = "ws://v2.example/subscribe";
  // 7,500 doubles: 30 KB of JSON, which the size bound lets into one message, but 67 KB serialized:
  // KV refuses the commit, and the record travels gzipped, alone.
  const weird = { ...commit(T0 + 2, { collection: "com.example.weird" }), cursor: 502 };
  (weird as { commit: { record: Record<string, unknown> } }).commit.record.items = Array.from(
    { length: 7500 },
    () => 0.5,
  );
  const events = [{ ...commit(T0), cursor: 500 }, { ...commit(T0 + 1), cursor: 501 }, weird];
  const b = new Batcher("q", events.length);
  b.host = host;
  for (const e of events) b.add(e, JSON.stringify(e), "2026-11-27", undefined);
  await w.add(b.take()!);
  await w.flush();
  const checkpoint = (await readCheckpoint(db.kv, "q")).value!;
  // (Before, the repaired message had no seq: the checkpoint forgot it, and a resume there went by
  // time_us, which a v2 host's imports do not keep in order.)
  assert.equal(checkpoint.run.seqCursor, 502);
  assert.equal(checkpoint.run.seqInstance, host);
  const stored = (await drainQueue(db.path, await queueLength(db.kv, "q")) as QueueMessage[]).sort((a, b) =>
    a.seq - b.seq
  );
  assert.ok(stored.some((m) => m.compressed?.length === 1), "the test no longer exercises a gzipped repair");
  assert.deepEqual(stored.flatMap((m) => decodeQueueMessage(m)), events);
});

Deno.test("repackMessage() copies a message read back from KV so that it serializes to its stored size, keeping its values", async () => {
  // (Times as real ones: V8 writes a small integer as a double where an earlier object of the same
  // shape held a larger number, so a time_us of 1 measured 7 bytes apart from one test order to another.)
  const text = '{"did":"did:plc:a","time_us":1700000000000000,"kind":"commit","commit":{"record":' +
    '{"__proto__":[1,2],"n":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"m":[[],[{"a":[1.5,"x"]}]],"1":null}}}';
  const stored: QueueMessage = {
    v: 1,
    queue: "q",
    seq: 1,
    cursor: 1700000000000000,
    records: [JSON.parse(text)],
    compressed: [compressEvent(text)],
  };
  const kv = await Deno.openKv(":memory:");
  await kv.set(["m"], stored);
  const read = (await kv.get<QueueMessage>(["m"])).value!;
  kv.close();
  assert.ok(
    serialize(read).length > serialize(stored).length,
    "a read message no longer grows: the test shows nothing",
  );
  const copy = repackMessage(read);
  assert.equal(serialize(copy).length, serialize(stored).length);
  assert.deepEqual(copy, stored);
  assert.equal(JSON.stringify(copy.records[0]), JSON.stringify(stored.records[0]));
  const record = (copy.records[0] as { commit: { record: object } }).commit.record;
  assert.ok(Object.hasOwn(record, "__proto__") && Object.getPrototypeOf(record) === Object.prototype);
  assert.ok(copy.compressed![0] instanceof Uint8Array);
  assert.equal(repackMessage("not a message"), "not a message");
});
