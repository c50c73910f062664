import assert from "node:assert/strict";
import { fetchV2Dictionary, mapV2Frame, V2_DICTIONARY_PATH, V2_SUBSCRIBE_PATH } from "../src/jetstream/v2.ts";
import { runBackfillSync } from "../src/backfill.ts";
import { openKvAt, readCheckpoint } from "../src/queue/kv_queue.ts";
import { UsageError } from "../src/errors.ts";
import type { JetstreamEvent } from "../src/jetstream/events.ts";
import { createZstdEncoder } from "../src/jetstream/zstd.ts";
import { decodeQueueMessage, type QueueMessage } from "../src/queue/message.ts";
import type { SyncErrorReport, SyncStats } from "../src/stats.ts";
import { account, commit, did, drainQueue, identity } from "./helpers/events.ts";
import {
  isCoverageProbe,
  refusedPort,
  serveEvents,
  syncConnections,
  syncReporting,
  tcpRelay,
  tempDb,
  withSilentPort,
} from "./helpers/loopback.ts";
import { v2Dictionary } from "./helpers/dictionaries.ts";
import { MAX_RECORD_DEPTH } from "../src/queue/size.ts";
import { isoFromUs } from "../src/time.ts";
import type { JetstreamServer } from "../src/server/server.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const V2_PATH = V2_SUBSCRIBE_PATH;

function capture(n = 600): JetstreamEvent[] {
  return Array.from(
    { length: n },
    (_, i) =>
      i % 50 === 7 ? identity(T0 + i * 1000) : i % 50 === 9 ? account(T0 + i * 1000) : commit(T0 + i * 1000, {
        did: did(i % 9),
        collection: i % 3 === 0 ? "app.bsky.feed.like" : "app.bsky.feed.post",
        text: `v2 post ${i} 😀`,
      }),
  );
}

async function stored(path: string, messages: number): Promise<JetstreamEvent[]> {
  const msgs = (await drainQueue(path, messages)) as QueueMessage[];
  return msgs.sort((a, b) => a.seq - b.seq).flatMap((m) => decodeQueueMessage(m));
}

const v2Url = (url: string) => url.replace(/\/subscribe$/, V2_PATH);

/** The port of a server started by serveEvents(). */
const portOf = (server: { url: string }) => Number(new URL(server.url).port);

/**
 * Asserts that the queue at `path` holds, in `messages` messages, the events of seqs 1001 to 1150
 * and from 1300 on: what a run gets when its host's window moves to seq 1300 after its first 150.
 */
async function assertAroundGap(path: string, messages: number, events: JetstreamEvent[]): Promise<void> {
  const got = await stored(path, messages);
  assert.deepEqual(
    got.map((e) => e.cursor),
    events.map((_, i) => 1001 + i).filter((s) => s <= 1150 || s >= 1300),
  );
}
/** How many of `events` are posts: what a sync with the default collection stores. */
function postCount(events: JetstreamEvent[]): number {
  return events.filter((e) => e.kind === "commit" && e.commit.collection === "app.bsky.feed.post").length;
}

/** Asserts that the queue at `path` holds, in `messages` messages, every event of `events` (seqs from 1001). */
async function assertAllStored(path: string, messages: number, events: JetstreamEvent[]): Promise<void> {
  assert.deepEqual((await stored(path, messages)).map((e) => e.cursor), events.map((_, i) => 1001 + i));
}
const ALL = { kinds: ["commit", "identity", "account"] as const, wantedCollections: [] as string[] };

Deno.test("mapV2Frame() takes a payload only of this wire's own type: another namespace's #commit is skipped", () => {
  // (Before: the text after "#" alone was read, so these were stored as events.)
  const payload = { seq: 5, did: "did:plc:x", time: "2026-11-27T10:00:00.000000Z" };
  const commitBody = { rev: "r", operation: "create", collection: "app.bsky.feed.post", rkey: "k" };
  const frame = ($type: string, body: Record<string, unknown>) => ({
    $type: "message",
    payload: { $type, ...payload, ...body },
  });
  for (
    const [kind, body] of [["commit", commitBody], ["identity", { identity: {} }], ["account", {
      account: {},
    }]] as const
  ) {
    assert.equal(
      mapV2Frame(frame(`network.bsky.jetstream.subscribeEvents#${kind}`, body)).type,
      "event",
      kind,
    );
    for (
      const $type of [
        `com.example.other#${kind}`,
        kind,
        `#${kind}`,
        `network.bsky.jetstream.subscribeEventsX#${kind}`,
      ]
    ) {
      assert.deepEqual(mapV2Frame(frame($type, body)), { type: "skip", reason: `payload type ${$type}` });
    }
  }
  assert.equal(mapV2Frame(frame("com.example.other#info", { name: "OutdatedCursor" })).type, "skip");
});

Deno.test("a v1-wire sync on a v2 host reconnects by sequence cursor and stores each event once", async () => {
  const events = capture();
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true, faults: { dropEvery: 130 } });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    ...ALL,
    kinds: ["commit", "identity", "account"],
  });
  assert.equal(stats.stopReason, "closed");
  assert.ok(stats.reconnects >= 3);
  const got = await stored(db.path, stats.queueLength);
  assert.equal(got.length, events.length);
  assert.deepEqual(got.map((e) => e.cursor), events.map((_, i) => 1001 + i));
  const later = syncConnections(server).slice(1).map((c) => Number(/cursor=(\d+)/.exec(c.query)![1]));
  assert.ok(later.every((c) => c < 1e15 && c > 1000), `seq cursors expected, got ${later}`);
});

Deno.test("a v2 host's early replay from before the requested start (jetstream#343) is dropped", async () => {
  const events = capture();
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true, earlyReplayUs: 200_000 });
  await using db = await tempDb();
  const start = T0 + 300 * 1000;
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: start,
    ...ALL,
    kinds: ["commit", "identity", "account"],
  });
  const got = await stored(db.path, stats.queueLength);
  assert.ok(syncConnections(server)[0].sent > events.length - 300, "the server replayed early");
  assert.deepEqual(got.map((e) => e.time_us), events.filter((e) => e.time_us >= start).map((e) => e.time_us));
});

Deno.test("a v2 host's events after the start whose display time is before it are left out by the window, and said so once", async () => {
  for (const wire of ["/subscribe", V2_PATH]) {
    // An operator's import: by the host's order after the start, by display time long before it.
    const events = capture();
    for (const i of [400, 450]) events[i] = { ...events[i], time_us: IMPORTED_US - i };
    const start = T0 + 300 * 1000;
    // And one a little before the start, which is left out too, but is not said to be an import.
    events[350] = { ...events[350], time_us: start - 10_000_000 };
    await using server = serveEvents(events, { version: "v2", closeAtEnd: true, earlyReplayUs: 200_000 });
    await using db = await tempDb();
    const { stats, reports } = await syncReporting({
      instance: server.url.replace(/\/subscribe$/, wire),
      kv: db.path,
      startTimestamp: start,
      ...ALL,
    });
    const got = await stored(db.path, stats.queueLength);
    assert.deepEqual(
      got.map((e) => e.time_us),
      events.filter((e) => e.time_us >= start).map((e) => e.time_us),
    );
    // The early replay (jetstream#343) before the first event in the window is not what is said.
    const told = reports.filter((r) => r.message.includes("display time is before the start"));
    assert.equal(told.length, 1, wire);
    assert.equal(told[0].reason, "coverage");
    assert.ok(told[0].message.includes(isoFromUs(IMPORTED_US - 400)), told[0].message);
  }
});

Deno.test("the v2 wire stores the same events as /subscribe on a v2 server", async () => {
  const events = capture();
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true });
  await using a = await tempDb();
  await using b = await tempDb();
  const opts = {
    startTimestamp: T0,
    kinds: ["commit", "identity", "account"] as ("commit" | "identity" | "account")[],
    wantedCollections: ["app.bsky.feed.post"],
  };
  const v1 = await runBackfillSync({ instance: server.url, kv: a.path, ...opts });
  const v2 = await runBackfillSync({ instance: v2Url(server.url), kv: b.path, ...opts });
  assert.equal(v2.stopReason, "closed");
  const q = syncConnections(server).at(-1)!.query;
  assert.ok(
    /kinds=commit&kinds=identity&kinds=account/.test(q) && /collections=app.bsky.feed.post/.test(q),
    q,
  );
  assert.ok(v1.recordsStored > 0);
  assert.deepEqual(await stored(b.path, v2.queueLength), await stored(a.path, v1.queueLength));
  // Its connections, the coverage probe's too, offer the v2 wire's subprotocol (protocol doc §1.3).
  const onV2 = server.connections.filter((c) => c.endpoint === "subscribeEvents");
  assert.equal(onV2.length, 2);
  assert.deepEqual(onV2.map((c) => c.v2?.subprotocol), [true, true]);
});

Deno.test("the v2 wire reconnects after an error frame and resumes by seq", async () => {
  const events = capture();
  await using server = serveEvents(events, {
    version: "v2",
    closeAtEnd: true,
    errorAfter: { events: 200, error: "ConsumerTooSlow" },
  });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: v2Url(server.url),
    kv: db.path,
    startTimestamp: T0,
    ...ALL,
    kinds: ["commit", "identity", "account"],
  });
  assert.equal(stats.stopReason, "closed");
  assert.ok(reports.some((r) => /ConsumerTooSlow/.test(r.message)));
  assert.equal((await stored(db.path, stats.queueLength)).length, events.length);
});

Deno.test("the v2 wire reports OutdatedCursor as a clamped start, and --strict refuses it", async () => {
  const events = capture();
  const history = T0 + 100 * 1000;
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true, historyStartUs: history });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: v2Url(server.url),
    kv: db.path,
    startTimestamp: T0,
  });
  assert.equal(stats.startClamped, true);
  assert.equal(stats.coverageStart, history);
  assert.equal(stats.coverageGapUs, history - T0);
  assert.ok(reports.some((r) => r.reason === "info" && /OutdatedCursor/.test(r.message)));
  await assert.rejects(
    () =>
      runBackfillSync({
        instance: v2Url(server.url),
        kv: db.path,
        queueName: "strict",
        startTimestamp: T0,
        strict: true,
      }),
    (err: unknown) => err instanceof UsageError && /refused by --strict \/ strict: true/.test(err.message),
  );
});

Deno.test("the v2 wire measures a clamped start from where history begins, not from the first event a filter lets through", async () => {
  const events = capture();
  const history = T0 + 100 * 1000;
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true, historyStartUs: history });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: v2Url(server.url),
    kv: db.path,
    startTimestamp: T0,
    wantedDids: [did(5)],
    ...ALL,
  });
  const kept = await stored(db.path, stats.queueLength);
  // did(5)'s first event in the history is the fifth of it, 4 ms after its start.
  assert.equal(kept[0].time_us, history + 4000);
  assert.equal(stats.startClamped, true);
  assert.equal(stats.coverageStart, history);
  assert.equal(stats.coverageGapUs, history - T0);
  // One probe, unfiltered, from the oldest time a cursor can name; the sync's own connection is filtered.
  const probes = server.connections.filter(isCoverageProbe);
  assert.deepEqual(probes.map((c) => c.query), ["cursor=1000000000000000"]);
  assert.ok(syncConnections(server).every((c) => c.params.wantedDids.includes(did(5))));
});

Deno.test("a v2 host whose oldest event is an operator's import: its history start is the next event's time, on both wires, and --strict refuses a start before it", async () => {
  for (const wire of ["/subscribe", V2_PATH]) {
    const events = capture();
    // The history begins at events[100] (seq 1101), an import shown years back.
    events[100] = { ...events[100], time_us: IMPORTED_US };
    await using server = serveEvents(events, { version: "v2", closeAtEnd: true, lookbackFloorSeq: 1101 });
    await using db = await tempDb();
    const instance = server.url.replace(/\/subscribe$/, wire);
    const stats = await runBackfillSync({
      instance,
      kv: db.path,
      startTimestamp: T0,
      ...ALL,
      onError: () => {},
    });
    assert.equal(stats.startClamped, true, wire);
    assert.equal(stats.coverageStart, events[101].time_us, wire);
    await assert.rejects(
      () => runBackfillSync({ instance, kv: db.path, queueName: "strict", startTimestamp: T0, strict: true }),
      (err: unknown) => err instanceof UsageError && /refused by --strict \/ strict: true/.test(err.message),
      wire,
    );
    // A start within the history is covered, and said to be.
    const within = await runBackfillSync({
      instance,
      kv: db.path,
      queueName: "within",
      startTimestamp: events[300].time_us,
      strict: true,
      ...ALL,
    });
    assert.equal(within.startClamped, false, wire);
    assert.equal(within.coverageStart, events[101].time_us, wire);
  }
});

Deno.test("a v2 host whose oldest event is a #sync: its history begins there on the v2 wire, and a start after it is covered", async () => {
  // Before, the v2 wire's probe passed over the #sync (as a sync does) and took the next event for
  // where the history begins: a start between the two was said to be moved forward, with a gap, and
  // --strict refused it.
  const events = capture();
  const syncUs = T0 - 30_000_000;
  events.unshift({
    did: did(1),
    time_us: syncUs,
    kind: "sync",
    sync: { $type: "com.atproto.sync.subscribeRepos#sync", did: did(1), rev: "3l3qo2vutsw2b", seq: 5 },
  } as unknown as JetstreamEvent);
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url.replace(/\/subscribe$/, V2_PATH),
    kv: db.path,
    startTimestamp: T0 - 10_000_000,
    strict: true,
    ...ALL,
  });
  assert.equal(stats.startClamped, false);
  assert.equal(stats.coverageStart, syncUs);
  assert.equal(stats.recordsStored, events.length - 1);
});

Deno.test("the v2 wire takes 10,000 DIDs in its URL on every connection", async () => {
  const events = capture();
  // The capture's nine DIDs among 10,000: the most a run takes, all of them in each URL.
  const dids = [
    ...Array.from({ length: 9_991 }, (_, i) => `did:web:d${i}.example`),
    ...[0, 1, 2, 3, 4, 5, 6, 7, 8].map(did),
  ];
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true, faults: { dropEvery: 200 } });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: v2Url(server.url),
    kv: db.path,
    startTimestamp: T0,
    wantedDids: dids,
    ...ALL,
    // Far more than the run needs: building each URL took 30 s before, and the run ended by max_time.
    maxTime: 20,
  });
  assert.equal(stats.stopReason, "closed");
  assert.ok(stats.reconnects >= 2);
  const kept = await stored(db.path, stats.queueLength);
  assert.deepEqual(kept.map((e) => e.time_us), events.map((e) => e.time_us));
  const connections = syncConnections(server);
  assert.equal(connections.length, stats.reconnects + 1);
  for (const c of connections) assert.deepEqual(c.params.wantedDids, dids);
});

Deno.test("failing over before any event, the next instance's history is checked and the gap counted once", async () => {
  const events = capture();
  const history = T0 + 100 * 1000;
  // A v2 host that refuses everything, its probe included, then a legacy host whose history starts late.
  await using refusing = serveEvents(events, { version: "v2", faults: { refuseFirst: 1000 } });
  await using legacy = serveEvents(events, { closeAtEnd: true, historyStartUs: history });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: [v2Url(refusing.url), legacy.url],
    kv: db.path,
    startTimestamp: T0,
    ...ALL,
  });
  assert.equal(stats.stopReason, "closed");
  assert.ok(stats.failovers >= 1);
  assert.equal(stats.coverageStart, history);
  assert.equal(stats.coverageGapUs, history - T0);
  assert.equal(stats.startClamped, true);
  assert.equal(reports.filter((r) => r.reason === "coverage").length, 1);
  assert.equal(legacy.connections.filter(isCoverageProbe).length, 1);
});

Deno.test("the v2 wire's InvalidRequest is the user's to fix: it fails fast with the server's message", async () => {
  await using server = serveEvents(capture(10), { version: "v2", closeAtEnd: true });
  await using db = await tempDb();
  await assert.rejects(
    // A v1 parameter left in the URL: the v2 wire refuses it, naming its replacement.
    () =>
      runBackfillSync({
        instance: `${v2Url(server.url)}?requireHello=true`,
        kv: db.path,
        // Over 100 DIDs: a list kept apart from the checkpoint, which goes with it.
        wantedDids: Array.from({ length: 150 }, (_, i) => `did:web:a${i}.example`),
      }),
    (err: unknown) => err instanceof UsageError && /HTTP 400.*InvalidRequest.*requireHello/.test(err.message),
  );
  // A refused run leaves the queue as it found it: no checkpoint for a resume to take up.
  const kv = await Deno.openKv(db.path);
  const left = await Array.fromAsync(kv.list({ prefix: ["jetfill"] })).finally(() => kv.close());
  assert.deepEqual(left.map((e) => e.key), []);
});

/** A v2 server compressing with the v2 dictionary, which it serves; `faults` as the server takes them. */
async function compressingV2Server(
  events: JetstreamEvent[],
  options: { dropEvery?: number; dictionary?: Uint8Array } = {},
) {
  const dictionary = options.dictionary ?? (await v2Dictionary()).bytes;
  const encoder = await createZstdEncoder(dictionary);
  const utf8 = new TextEncoder();
  return serveEvents(events, {
    version: "v2",
    closeAtEnd: true,
    v2Dictionary: dictionary,
    v2Compressor: (text) => encoder.encode(utf8.encode(text)).slice(),
    faults: options.dropEvery ? { dropEvery: options.dropEvery } : undefined,
  });
}

Deno.test("a compressed v2-wire sync fetches the v2 dictionary and decodes its frames", async () => {
  const events = capture();
  await using server = await compressingV2Server(events);
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: v2Url(server.url),
    kv: db.path,
    startTimestamp: T0,
    compress: true,
    ...ALL,
    kinds: ["commit", "identity", "account"],
  });
  assert.equal(stats.stopReason, "closed");
  assert.ok(syncConnections(server)[0].query.includes("zstdDictionary=20260811"));
  assert.ok(stats.bytesDecoded > stats.bytesReceived);
  assert.deepEqual(
    (await stored(db.path, stats.queueLength)).map((e) => e.time_us),
    events.map((e) => e.time_us),
  );
});

Deno.test("a v2 host's own dictionary under the published ID is taken as it serves it, while one given for it is checked", async () => {
  // A byte near the end changed: not the published subscribe_events_20260811.zdict, but what this
  // host compresses with, so its frames decode with it.
  const own = (await v2Dictionary()).bytes.slice();
  own[own.length - 10] ^= 0x20;
  const events = capture(300);
  await using server = await compressingV2Server(events, { dictionary: own });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: v2Url(server.url),
    kv: db.path,
    startTimestamp: T0,
    compress: true,
  });
  // (Before this was allowed for: an error stop, "a damaged or cut-short copy", nothing stored.)
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(
    stats.recordsStored,
    postCount(events),
  );
  assert.ok(stats.bytesDecoded > stats.bytesReceived);
  // Given by the user, the same bytes are a damaged copy: refused before anything is opened.
  await using other = await tempDb();
  await assert.rejects(
    () =>
      runBackfillSync({ instance: v2Url(server.url), kv: other.path, compress: true, zstdDictionary: own }),
    (err: unknown) =>
      err instanceof UsageError &&
      /has the ID of Jetstream's subscribe_events_20260811\.zdict \(20260811\) but not its contents: \d+ bytes of sha256 [0-9a-f]{64}, where subscribe_events_20260811\.zdict has sha256 f631a689/
        .test(err.message),
  );
});

Deno.test("a v2 host whose dictionary request never gets an answer: after the idle timeout the connection goes uncompressed", async () => {
  const events = capture(100);
  await using server = await compressingV2Server(events);
  await withSilentPort(async (silent) => {
    // The first connection (no start: no probe) is the dictionary's request, to a port that never answers.
    await using relay = tcpRelay((n) => n === 1 ? silent : Number(new URL(server.url).port));
    await using db = await tempDb();
    const { stats, reports } = await syncReporting({
      instance: `ws://127.0.0.1:${relay.port}${V2_PATH}`,
      kv: db.path,
      compress: true,
      idleTimeout: 1,
      maxTime: 30,
      ...ALL,
    });
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.equal(stats.recordsStored, 100);
    assert.match(
      reports[0].message,
      /^cannot fetch the v2 zstd dictionary \(.*getZstdDictionary: no answer within 1 s\); this connection goes uncompressed, the next one asks again$/,
    );
    assert.doesNotMatch(syncConnections(server)[0].query, /zstdDictionary/);
  });
});

Deno.test("a v2 host that cannot give its dictionary for a while (503) is asked again by the next connection", async () => {
  const events = capture(300);
  await using server = await compressingV2Server(events, { dropEvery: 200 });
  await using warming = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    // (Closing the connection, so that the next request makes a new one, to the host.)
    () =>
      new Response("service not ready: bootstrap in progress", {
        status: 503,
        headers: { connection: "close" },
      }),
  );
  // The first connection, the dictionary's request, meets the 503; later ones reach the host.
  await using relay = tcpRelay((n) => n === 1 ? warming.addr.port : Number(new URL(server.url).port));
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: `ws://127.0.0.1:${relay.port}${V2_PATH}`,
    kv: db.path,
    compress: true,
    ...ALL,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.match(
    reports[0].message,
    /HTTP 503: service not ready.*this connection goes uncompressed, the next one asks again$/,
  );
  // Dropped after 200 events, the sync reconnects: that connection fetches the dictionary and uses it.
  const queries = syncConnections(server).map((c) => c.query);
  assert.equal(queries.length, 2);
  assert.doesNotMatch(queries[0], /zstdDictionary/);
  assert.match(queries[1], /zstdDictionary=20260811/);
  await assertAllStored(db.path, stats.queueLength, events);
});

Deno.test("a v2 server that does not know the fetched dictionary ID is read uncompressed", async () => {
  const events = capture(100);
  const dictionary = (await v2Dictionary()).bytes;
  // It serves a dictionary but cannot compress with it: zstdDictionary=<id> gets UnknownZstdDictionary.
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true, v2Dictionary: dictionary });
  // Fetching the dictionary again is not a connection retry: none allowed makes no difference.
  for (const maxRetries of [undefined, 0]) {
    await using db = await tempDb();
    const { stats, reports } = await syncReporting({
      instance: v2Url(server.url),
      kv: db.path,
      startTimestamp: T0,
      compress: true,
      maxRetries,
      ...ALL,
    });
    assert.equal(stats.recordsStored, 100, stats.error);
    assert.ok(
      reports.some((r) =>
        /UnknownZstdDictionary|unknown.*dictionary.*continuing uncompressed/i.test(r.message)
      ),
      JSON.stringify(reports),
    );
    // Text frames count as decoded as they are: the ratio of the run is 1. (Before, bytesDecoded was 0,
    // and a run with some connections compressed showed a ratio too low.)
    assert.ok(stats.bytesReceived > 0);
    assert.equal(stats.bytesDecoded, stats.bytesReceived);
  }
});

Deno.test("a v2 host that refuses its own dictionary goes uncompressed, and the next host is still asked for zstd frames", async () => {
  const events = capture(300);
  const dictionary = (await v2Dictionary()).bytes;
  // A serves a dictionary it cannot compress with (its connections go uncompressed), drops its
  // stream after 50 events and is gone after that; B serves the same dictionary and compresses.
  await using broken = serveEvents(events, {
    version: "v2",
    v2Dictionary: dictionary,
    faults: { dropEvery: 50 },
  });
  await using b = await compressingV2Server(events);
  const gone = await refusedPort();
  let dropped = false;
  await using a = tcpRelay(() => dropped ? gone : portOf(broken));
  await using db = await tempDb();
  const reports: SyncErrorReport[] = [];
  const stats = await runBackfillSync({
    instance: [`ws://127.0.0.1:${a.port}${V2_PATH}`, v2Url(b.url)],
    kv: db.path,
    startTimestamp: T0,
    compress: true,
    ...ALL,
    onError: (r) => {
      reports.push(r);
      if (/code 1006/.test(r.message)) dropped = true;
    },
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  assert.ok(reports.some((r) => /unknown.*dictionary.*continuing uncompressed/i.test(r.message)));
  // (Before: B's connection went uncompressed too, as if B had refused the dictionary.)
  const onB = syncConnections(b);
  assert.equal(onB.length, 1);
  assert.match(onB[0].query, /zstdDictionary=20260811/);
  assert.ok(stats.bytesDecoded > stats.bytesReceived, `${stats.bytesDecoded} ≤ ${stats.bytesReceived}`);
  await assertAllStored(db.path, stats.queueLength, events);
});

Deno.test("failing over A → B → A between v2 hosts with different dictionaries keeps zstd frames on both", async () => {
  const events = capture(300);
  const d1 = (await v2Dictionary()).bytes;
  // B's dictionary: the same, with another ID in its header (424242), as after a rotation on B only.
  const d2 = d1.slice();
  new DataView(d2.buffer).setUint32(4, 424242, true);
  await using a1 = await compressingV2Server(events, { dropEvery: 50 });
  await using a2 = await compressingV2Server(events);
  await using b1 = await compressingV2Server(events, { dropEvery: 50, dictionary: d2 });
  const gone = await refusedPort();
  // A's stream drops, and A is gone until B's drops too; then A is back (a2), and B gone.
  let drops = 0;
  await using a = tcpRelay(() => drops === 0 ? portOf(a1) : drops === 1 ? gone : portOf(a2));
  await using b = tcpRelay(() => drops <= 1 ? portOf(b1) : gone);
  await using db = await tempDb();
  const reports: SyncErrorReport[] = [];
  const stats = await runBackfillSync({
    instance: [`ws://127.0.0.1:${a.port}${V2_PATH}`, `ws://127.0.0.1:${b.port}${V2_PATH}`],
    kv: db.path,
    startTimestamp: T0,
    compress: true,
    ...ALL,
    onError: (r) => {
      reports.push(r);
      if (/code 1006/.test(r.message)) drops++;
    },
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 2, JSON.stringify(reports));
  // (Before: back on A, which refused B's dictionary, the one A gave again counted as refused too,
  // and the rest of the run went uncompressed.)
  assert.ok(!reports.some((r) => /uncompressed/.test(r.message)), JSON.stringify(reports));
  // Each host refuses the other's dictionary once (UnknownZstdDictionary), then gets its own.
  const asked = (server: JetstreamServer) =>
    syncConnections(server).map((c) => /zstdDictionary=(\d+)/.exec(c.query)?.[1]);
  assert.deepEqual(asked(b1), ["20260811", "424242"]);
  assert.deepEqual(asked(a2), ["424242", "20260811"]);
  await assertAllStored(db.path, stats.queueLength, events);
});

/**
 * A new instance at one address, numbering from `seqBase` + 1 the events of `events` from index
 * `from` on (its history), its time_us `skewUs` off: a seq past its last is live, and it sends what
 * comes from now on, here the events from the 151st; a time cursor replays from that time (clamped
 * to its history). Then it closes.
 */
function renumberedHost(events: JetstreamEvent[], from: number, seqBase = 0, skewUs = 0) {
  const seqOf = (i: number) => seqBase + i - from + 1;
  const shown = events.map((e) => ({ ...e, time_us: e.time_us + skewUs }));
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const cursor = Number(new URL(req.url).searchParams.get("cursor"));
    const first = cursor >= 1e15
      ? shown.findIndex((e) => e.time_us >= cursor)
      : cursor > seqOf(events.length - 1)
      ? 150
      : from + cursor - seqBase - 1;
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onopen = () => {
      for (let i = Math.max(from, first); i < events.length; i++) {
        socket.send(JSON.stringify({ ...shown[i], cursor: seqOf(i) }));
      }
      socket.close(1000, "done");
    };
    return response;
  });
}

Deno.test("a renumbered host is said before the end is looked at, and lined up with what was stored as another instance is", async () => {
  // 30 s of events, one each 100 ms.
  const events = capture(300).map((e, i) => ({ ...e, time_us: T0 + i * 100_000 }));
  // Its seq 1150 is the 200th event, past the end (the 181st); then, one whose time_us run 10 s
  // behind the first instance's (twice the rewind).
  for (const [seqBase, skewUs, endIndex] of [[950, 0, 180], [0, -10_000_000, undefined]] as const) {
    await using db = await tempDb();
    let instance: "old" | "new" = "old";
    await using old = serveEvents(events.slice(0, 150), { version: "v2", closeAtEnd: true });
    await using rebuilt = renumberedHost(events, 0, seqBase, skewUs);
    await using relay = tcpRelay(() => instance === "old" ? portOf(old) : rebuilt.addr.port);
    const url = `ws://127.0.0.1:${relay.port}/subscribe`;
    const endTimestamp = endIndex === undefined ? undefined : events[endIndex].time_us;
    const first = await runBackfillSync({
      instance: url,
      kv: db.path,
      startTimestamp: T0,
      endTimestamp,
      ...ALL,
    });
    assert.equal(first.recordsStored, 150);
    instance = "new";
    const { stats, reports } = await syncReporting({ kv: db.path, resume: true });
    const said = JSON.stringify(reports);
    assert.ok(
      reports.some((r) => /its seqs are not those of the events stored from it/.test(r.message)),
      said,
    );
    // (Before: the run stopped at the end with nothing stored and nothing said; or, 10 s behind, the
    // 151st to the 199th were missing, unsaid.)
    assert.equal(stats.stopReason, endIndex === undefined ? "closed" : "end", stats.error);
    const wanted = events.slice(0, endIndex ?? events.length);
    const got = await stored(db.path, stats.queueLength);
    assert.deepEqual(
      got.map((e) => e.time_us - (got.indexOf(e) < 150 ? 0 : skewUs)),
      wanted.map((e) => e.time_us),
      said,
    );
  }
});

Deno.test("a resume by seq meeting a new instance at the same address whose seq asked for is another event takes the stream up by time", async () => {
  const events = capture(300);
  await using db = await tempDb();
  let instance: "old" | "new" = "old";
  await using old = serveEvents(events.slice(0, 150), { version: "v2", closeAtEnd: true });
  // Seqs 951 to 1250: its seq 1150 is the 200th event, not the 150th that the run stored at it.
  await using rebuilt = renumberedHost(events, 0, 950);
  await using relay = tcpRelay(() => instance === "old" ? portOf(old) : rebuilt.addr.port);
  const url = `ws://127.0.0.1:${relay.port}/subscribe`;
  assert.equal(
    (await runBackfillSync({ instance: url, kv: db.path, startTimestamp: T0, ...ALL })).recordsStored,
    150,
  );
  instance = "new";
  const { stats, reports } = await syncReporting({ kv: db.path, resume: true });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.ok(
    reports.some((r) =>
      new RegExp(
        `sent seq 1150 first, as asked, but with time_us ${events[199].time_us}, not the ${
          events[149].time_us
        } of the event at that seq before: its seqs are not those`,
      ).test(r.message)
    ),
    JSON.stringify(reports),
  );
  // (Before: the stream went on from its seq 1150, and the 151st to the 199th were missing, unsaid.)
  assert.equal(stats.recordsStored, 150);
  const got = await stored(db.path, stats.queueLength);
  assert.deepEqual(got.map((e) => e.time_us), events.map((e) => e.time_us));
});

Deno.test("a resume by seq meeting a new instance at the same address (its seqs lower) takes the stream up by time, losing nothing", async () => {
  const events = capture(300);
  // Its history: all of it; from the 201st event (a gap after the 150 stored); the same, strict.
  for (const [from, strict] of [[0, false], [200, false], [200, true]] as const) {
    await using db = await tempDb();
    // The first instance: the first 150 events, seqs 1001 to 1150.
    let instance: "old" | "new" = "old";
    await using old = serveEvents(events.slice(0, 150), { version: "v2", closeAtEnd: true });
    await using rebuilt = renumberedHost(events, from);
    await using relay = tcpRelay(() => instance === "old" ? portOf(old) : rebuilt.addr.port);
    const url = `ws://127.0.0.1:${relay.port}/subscribe`;
    const first = await runBackfillSync({ instance: url, kv: db.path, startTimestamp: T0, ...ALL });
    assert.equal(first.recordsStored, 150);
    instance = "new";
    // (No retry allowed: the host answered, and taking it up by time is no failed attempt.)
    const reports: SyncErrorReport[] = [];
    const run = runBackfillSync({
      kv: db.path,
      resume: true,
      maxRetries: 0,
      strict,
      onError: (r) => reports.push(r),
    });
    // A strict run stops for the gap before it stores anything: refused, as a resume into a gap is.
    const stats = strict ? undefined : await run;
    if (strict) {
      await assert.rejects(
        run,
        (err) => err instanceof UsageError && /only holds events from .* on/.test(err.message),
      );
    }
    const said = JSON.stringify(reports);
    // (Before: its events, seqs 1 to 150, all below the 1150 stored last, were dropped as repeats.)
    assert.ok(
      reports.some((r) =>
        r.reason === "connection" &&
        new RegExp(
          `sent seq ${
            Math.max(from, 150) - from + 1
          } first, asked for seq 1150: its seqs are not those of the events stored from it .*, so the stream is taken up again by time$`,
        ).test(r.message)
      ),
      said,
    );
    if (stats === undefined) continue;
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.equal(stats.recordsStored, 300 - Math.max(from, 150), said);
    // Where the new instance's history begins is checked again: the gap is said.
    const gaps = reports.filter((r) => r.reason === "coverage");
    assert.equal(gaps.length, from === 0 ? 0 : 1, said);
    const got = await stored(db.path, stats.queueLength);
    assert.deepEqual(
      got.map((e) => e.time_us),
      events.filter((_, i) => i < 150 || i >= from).map((e) => e.time_us),
    );
  }
});

Deno.test("over 50 DIDs with --compress on a v2 host given by name: a refused dictionary's message says why /subscribe", async () => {
  const dids = Array.from({ length: 51 }, (_, i) => `did:web:a${i}.example`);
  const v2Bytes = (await v2Dictionary()).bytes;
  await using db = await tempDb();
  // A new run; and a --resume that finds no checkpoint (a run killed in its first moments) and so
  // starts the run with the options given (before, without the reason).
  for (const resume of [false, true]) {
    if (resume) (await openKvAt(db.path)).close();
    await assert.rejects(
      () =>
        runBackfillSync({
          instance: "jetstream.us-east.bsky.network",
          wantedDids: dids,
          compress: true,
          zstdDictionary: v2Bytes,
          kv: db.path,
          resume,
          onError: () => {},
        }),
      (err) =>
        err instanceof UsageError &&
        err.message.startsWith(
          "The zstd dictionary given as bytes has ID 20260811, but /subscribe connections",
        ) &&
        err.message.endsWith(
          '(with over 50 DIDs, or over 1600 characters of them, the v2 hosts are spoken to on /subscribe, whose hello carries them; --wire v2 / wire: "v2" keeps their own wire, with the DIDs in its URL)',
        ),
      `resume: ${resume}`,
    );
  }
});

Deno.test("over 50 DIDs on the v2 wire go in its URL, as they must there, with a warning that says so", async () => {
  const events = capture(90);
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true });
  await using db = await tempDb();
  // The capture's nine accounts, and 51 more that post nothing.
  const dids = [
    ...Array.from({ length: 9 }, (_, i) => did(i)),
    ...Array.from({ length: 51 }, (_, i) => `did:web:q${i}.example`),
  ];
  const { stats, reports } = await syncReporting({
    instance: v2Url(server.url),
    kv: db.path,
    startTimestamp: T0,
    wantedDids: dids,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(
    stats.recordsStored,
    postCount(events),
  );
  const [warning, ...rest] = reports.filter((r) => /DIDs go in the URL/.test(r.message));
  assert.equal(rest.length, 0);
  assert.equal(
    warning.message,
    `the 60 DIDs go in the URL on the v2 wire (127.0.0.1:${
      portOf(server)
    }), which takes no options_update: a server or a proxy may refuse a URL this long (HTTP 414 or 431); --wire v1 / wire: "v1" sends them in a hello on /subscribe, which v2 hosts serve too`,
  );
  assert.equal(syncConnections(server)[0].query.match(/dids=/g)?.length, 60);
});

Deno.test("--resume on a v2 host continues by the stored sequence cursor", async () => {
  const events = capture();
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true, faults: { dropEvery: 150 } });
  await using db = await tempDb();
  const controller = new AbortController();
  const kinds: ("commit" | "identity" | "account")[] = ["commit", "identity", "account"];
  const first = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    kinds,
    wantedCollections: [],
    signal: controller.signal,
    // Stop at the first drop, as a crash would.
    onError: (r) => r.reason === "retry" && controller.abort(),
  });
  assert.equal(first.stopReason, "aborted");
  assert.equal(first.recordsStored, 150);
  const before = syncConnections(server).length;
  const second = await runBackfillSync({ kv: db.path, resume: true });
  assert.equal(second.stopReason, "closed");
  const resumed = syncConnections(server)[before].query;
  assert.match(resumed, /cursor=1150(&|$)/, resumed);
  const got = await stored(db.path, first.queueLength + second.messagesEnqueued);
  assert.deepEqual(got.map((e) => e.cursor), events.map((_, i) => 1001 + i));
});

Deno.test("--resume on a v2 host whose seq fell out of its window goes on by seq from the oldest event it holds, and reports the seqs lost", async () => {
  const events = capture();
  const db = await tempDb();
  await using _db = db;
  const controller = new AbortController();
  let port: number;
  {
    await using server = serveEvents(events, { version: "v2", faults: { dropEvery: 150 } });
    port = Number(new URL(server.url).port);
    const first = await runBackfillSync({
      instance: v2Url(server.url),
      kv: db.path,
      startTimestamp: T0,
      kinds: ["commit", "identity", "account"],
      wantedCollections: [],
      signal: controller.signal,
      onError: (r) => r.reason === "retry" && controller.abort(),
    });
    assert.equal(first.stopReason, "aborted");
    assert.equal(first.recordsStored, 150, "seqs 1001 to 1150");
  }
  // The same host later: its window now starts at seq 1300, after the stored seq (1150).
  await using _server = serveEvents(events, {
    version: "v2",
    closeAtEnd: true,
    port,
    lookbackFloorSeq: 1300,
  });
  const reports: SyncErrorReport[] = [];
  const second = await runBackfillSync({ kv: db.path, resume: true, onError: (r) => reports.push(r) });
  assert.equal(second.stopReason, "closed");
  assert.equal(second.startClamped, false, "the requested start was not what the server moved");
  // Counted in seqs, from the last one stored (1150) to the first the server still holds (1300):
  // display times cannot say how long a span that is (protocol doc §3.2).
  assert.equal(second.coverageGapUs, 0);
  const gap = reports.find((r) => r.reason === "coverage");
  assert.match(
    gap!.message,
    /only holds events from seq 1300 on; the point to resume from, seq 1151, is 149 seqs/,
  );
  assert.ok(reports.some((r) => /CursorTooOld.*resuming from the oldest event it holds/.test(r.message)));
  const asked = syncConnections(_server).map((c) => /cursor=(\d+)/.exec(c.query)?.[1]);
  assert.deepEqual(asked, ["1150", "1000000000000000"], "by seq, then from the oldest event held");
  await assertAroundGap(db.path, second.queueLength, events);
});

Deno.test("a v2 host whose window moves on between the probe that found the resume seq and the connection: the seqs lost are still reported", async () => {
  const events = capture();
  await using db = await tempDb();
  // One host address, three servers behind it: the first run's, one whose window still holds the
  // seq to resume from (seen by the probe), and one whose window has moved past it (all later).
  await using first = serveEvents(events, { version: "v2", faults: { dropEvery: 150 } });
  await using whole = serveEvents(events, { version: "v2", lookbackFloorSeq: 1100 });
  await using moved = serveEvents(events, { version: "v2", closeAtEnd: true, lookbackFloorSeq: 1300 });
  let route = (_: number) => portOf(first);
  await using relay = tcpRelay((n) => route(n));
  const controller = new AbortController();
  const stopped = await runBackfillSync({
    instance: `ws://127.0.0.1:${relay.port}${V2_PATH}`,
    kv: db.path,
    ...ALL,
    startTimestamp: T0,
    signal: controller.signal,
    onError: (r) => r.reason === "retry" && controller.abort(),
  });
  assert.equal(stopped.recordsStored, 150, "seqs 1001 to 1150");
  // The resume's first connection (its probe) reaches the whole window, every later one the moved.
  route = (n) => n === 1 + first.connections.length ? portOf(whole) : portOf(moved);
  const reports: SyncErrorReport[] = [];
  const second = await runBackfillSync({ kv: db.path, resume: true, onError: (r) => reports.push(r) });
  assert.equal(second.stopReason, "closed");
  assert.equal(whole.connections.length, 1, "the probe");
  assert.ok(isCoverageProbe(whole.connections[0]));
  assert.ok(reports.some((r) => /CursorTooOld.*resuming from the oldest event it holds/.test(r.message)));
  const gaps = reports.filter((r) => r.reason === "coverage");
  assert.equal(gaps.length, 1, JSON.stringify(reports));
  assert.match(
    gaps[0].message,
    /only holds events from seq 1300 on; the point to resume from, seq 1151, is 149 seqs/,
  );
  await assertAroundGap(db.path, second.queueLength, events);
});

Deno.test("a v2 server's /subscribe that clamps a reconnect's seq cursor without a word: the seqs lost are reported, and --strict stops", async () => {
  for (const strict of [false, true]) {
    const events = capture();
    await using db = await tempDb();
    // One host address: the server of the first connections drops after 150 events; the one after
    // it no longer holds seqs before 1300, and (as the v2 server's /subscribe does) clamps silently.
    await using first = serveEvents(events, { version: "v2", faults: { dropEvery: 150 } });
    await using moved = serveEvents(events, { version: "v2", closeAtEnd: true, lookbackFloorSeq: 1300 });
    // The coverage probe and the first sync connection reach the first server.
    await using relay = tcpRelay((n) => n <= 2 ? portOf(first) : portOf(moved));
    const { stats, reports } = await syncReporting({
      instance: `ws://127.0.0.1:${relay.port}/subscribe`,
      kv: db.path,
      ...ALL,
      startTimestamp: T0,
      strict,
    });
    const gaps = reports.filter((r) => r.reason === "coverage");
    const said =
      /only holds events from seq 1300 on; the point to resume from, seq 1151, is 149 seqs earlier/;
    if (strict) {
      assert.equal(stats.stopReason, "error");
      assert.match(stats.error ?? "", said);
      // Nothing after the loss it stops for is stored: a resume would meet it again.
      assert.equal(stats.recordsStored, 150);
      const got = await stored(db.path, stats.queueLength);
      assert.deepEqual(got.map((e) => e.cursor), events.slice(0, 150).map((_, i) => 1001 + i));
    } else {
      assert.equal(gaps.length, 1, JSON.stringify(reports));
      assert.match(gaps[0].message, said);
      assert.equal(stats.stopReason, "closed");
      await assertAroundGap(db.path, stats.queueLength, events);
    }
  }
});

Deno.test("a later seq first that loses nothing is not reported: the next seq, or a resume with a narrower filter", async () => {
  const events = capture();
  const posts = ["app.bsky.feed.post"];
  // The host sends seq 1151 first for seq 1150 asked for (its event is one the filter leaves out
  // there): that seq is stored already, and 1151 on come.
  {
    const other = events.map((e, i) =>
      i === 149 ? commit(e.time_us, { collection: "app.bsky.graph.block" }) : e
    );
    await using db = await tempDb();
    await using first = serveEvents(events, { version: "v2", faults: { dropEvery: 150 } });
    await using next = serveEvents(other, { version: "v2", closeAtEnd: true });
    await using relay = tcpRelay((n) => n <= 2 ? portOf(first) : portOf(next));
    const { stats, reports } = await syncReporting({
      instance: `ws://127.0.0.1:${relay.port}/subscribe`,
      kv: db.path,
      kinds: ALL.kinds,
      wantedCollections: [...posts, "app.bsky.feed.like"],
      startTimestamp: T0,
      strict: true,
    });
    // (Before: "events of seqs 1151 to 1150 may be missing", and the strict run stopped.)
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.deepEqual(reports.filter((r) => r.reason === "coverage"), []);
    assert.equal(stats.recordsStored, events.length);
  }
  // A resume, with --force, for one account's records alone: the host sends that account's next
  // one first (seq 1154, for 1151 asked for), which is what the new filter asks for.
  {
    await using db = await tempDb();
    await using server = serveEvents(events, { version: "v2", closeAtEnd: true });
    const first = await runBackfillSync({
      instance: server.url,
      kv: db.path,
      ...ALL,
      startTimestamp: T0,
      numRecords: 151,
    });
    assert.equal((await stored(db.path, first.queueLength)).at(-1)!.cursor, 1151);
    const { stats, reports } = await syncReporting({
      kv: db.path,
      resume: true,
      force: true,
      wantedDids: [did(0)],
      numRecords: 10_000,
      strict: true,
    });
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.deepEqual(reports.filter((r) => r.reason === "coverage"), [], JSON.stringify(reports));
  }
});

Deno.test("a v2 host that skips seqs it still holds when a reconnect takes the stream up: reported, and --strict stops", async () => {
  // What a sync of posts and likes gets from a host that still holds seqs 1150 to 1299 but skips
  // them on the reconnect (bluesky-social/jetstream#190): the second server's events of those seqs
  // are of a collection the filter leaves out, so it sends seq 1300 first, and its history begins
  // at seq 1001.
  const events = capture();
  const skipped = events.map((e, i) =>
    i >= 149 && i < 299 ? commit(e.time_us, { collection: "app.bsky.graph.block" }) : e
  );
  for (const [wire, strict] of [["/subscribe", false], ["/subscribe", true], [V2_PATH, false]] as const) {
    await using db = await tempDb();
    await using first = serveEvents(events, { version: "v2", faults: { dropEvery: 150 } });
    await using skipping = serveEvents(skipped, { version: "v2", closeAtEnd: true });
    // The start's probe and the first sync connection reach the first server, the rest the other.
    await using relay = tcpRelay((n) => n <= 2 ? portOf(first) : portOf(skipping));
    const { stats, reports } = await syncReporting({
      instance: `ws://127.0.0.1:${relay.port}${wire}`,
      kv: db.path,
      kinds: ALL.kinds,
      wantedCollections: ["app.bsky.feed.post", "app.bsky.feed.like"],
      startTimestamp: T0,
      strict,
    });
    const said =
      /skipped events on reconnecting: asked for seq 1150 on, which it holds \(its history begins at seq 1001\), it sent seq 1300 first, so events of seqs 1151 to 1299 may be missing/;
    // (Before: nothing said, and a strict run went on to the end.)
    if (strict) {
      assert.equal(stats.stopReason, "error");
      assert.match(stats.error ?? "", said);
      assert.equal(stats.recordsStored, 150);
    } else {
      const gaps = reports.filter((r) => r.reason === "coverage");
      assert.equal(gaps.length, 1, JSON.stringify(reports));
      assert.match(gaps[0].message, said);
      assert.equal(stats.stopReason, "closed");
      await assertAroundGap(db.path, stats.queueLength, events);
    }
  }
});

Deno.test("a seq cursor clamped without a word, where the probe then gets no answer or the user stops the run: what the stream showed is reported", async () => {
  const events = capture();
  for (const userStops of [false, true]) {
    await withSilentPort(async (silent) => {
      await using db = await tempDb();
      await using first = serveEvents(events, { version: "v2", faults: { dropEvery: 150 } });
      await using moved = serveEvents(events, {
        version: "v2",
        closeAtEnd: !userStops,
        lookbackFloorSeq: 1300,
      });
      // The start's probe and the first sync connection, then the moved server, then silence.
      await using relay = tcpRelay((n) => n <= 2 ? portOf(first) : n === 3 ? portOf(moved) : silent);
      const controller = new AbortController();
      const reports: SyncErrorReport[] = [];
      const stats = await runBackfillSync({
        instance: `ws://127.0.0.1:${relay.port}/subscribe`,
        kv: db.path,
        ...ALL,
        startTimestamp: T0,
        // The probe waits this long for its answer: stopped by the user well before, when they do.
        idleTimeout: userStops ? 30 : 0.5,
        signal: controller.signal,
        onError: (r) => {
          reports.push(r);
          if (userStops && r.reason === "retry") setTimeout(() => controller.abort(), 1000);
        },
      });
      assert.equal(stats.stopReason, userStops ? "aborted" : "closed", stats.error);
      const gaps = reports.filter((r) => r.reason === "coverage");
      assert.equal(gaps.length, 1, JSON.stringify(reports));
      assert.match(
        gaps[0].message,
        new RegExp(
          "no longer holds seq 1150, asked for on reconnecting: it sent seq 1300 first, so events of seqs 1151 to 1299 may be missing \\(" +
            (userStops
              ? "the run was stopped before the seqs lost were measured"
              : "where its history begins now could not be found: "),
        ),
      );
    });
  }
});

/**
 * A resume of the queue at `path`, to the end, on another v2 host serving `events` on `wire` with
 * seqs of its own (from `seqBase` + 1).
 */
async function resumeOnAnotherHost(
  events: JetstreamEvent[],
  path: string,
  wire: string,
  seqBase: number,
): Promise<SyncStats> {
  await using other = serveEvents(events, { version: "v2", seqBase, closeAtEnd: true });
  return await runBackfillSync({
    kv: path,
    resume: true,
    instance: other.url.replace(/\/subscribe$/, wire),
    onError: () => {},
  });
}

/** 2024-04-24T23:06:40.002255Z: a display time an operator's import gave an event (protocol doc §3.2). */
const IMPORTED_US = 1714000000002255;

/**
 * A first run on a v2 host on `wire` stopped after 150 events (seqs 1001 to 1150), the last of
 * them showing an imported display time; returns the port for the host to come back on.
 */
async function stoppedOnImportedTime(events: JetstreamEvent[], path: string, wire: string): Promise<number> {
  await using server = serveEvents(events, { version: "v2", faults: { dropEvery: 150 } });
  const controller = new AbortController();
  const first = await runBackfillSync({
    instance: server.url.replace(/\/subscribe$/, wire),
    kv: path,
    ...ALL,
    signal: controller.signal,
    onError: (r) => r.reason === "retry" && controller.abort(),
  });
  assert.equal(first.stopReason, "aborted");
  assert.equal(first.recordsStored, 150);
  return Number(new URL(server.url).port);
}

Deno.test("--resume by seq on a v2 host is judged by the seq, not by a display time_us years old: no gap, and --strict goes on", async () => {
  for (const wire of ["/subscribe", V2_PATH]) {
    const events = capture();
    events[149] = { ...events[149], time_us: IMPORTED_US };
    await using db = await tempDb();
    const port = await stoppedOnImportedTime(events, db.path, wire);
    // The host later: its history starts at seq 1100 (2026), before the seq to resume from.
    await using _server = serveEvents(events, {
      version: "v2",
      closeAtEnd: true,
      port,
      lookbackFloorSeq: 1100,
    });
    const { stats: second, reports } = await syncReporting({
      kv: db.path,
      resume: true,
      strict: true,
    });
    assert.equal(second.stopReason, "closed", wire);
    assert.equal(second.coverageGapUs, 0);
    assert.equal(second.coverageStart, events[99].time_us);
    assert.deepEqual(reports.filter((r) => r.reason === "coverage"), []);
    const got = await stored(db.path, second.queueLength);
    assert.deepEqual(got.map((e) => e.cursor), events.map((_, i) => 1001 + i));
  }
});

Deno.test("--resume by seq on a v2 host reports a seq that fell out of the history even when display times hide it", async () => {
  for (const wire of ["/subscribe", V2_PATH]) {
    const events = capture();
    events[149] = { ...events[149], time_us: IMPORTED_US };
    // The first event the host still holds shows an even older imported time.
    events[299] = { ...events[299], time_us: IMPORTED_US - 86_400_000_000 };
    await using db = await tempDb();
    const port = await stoppedOnImportedTime(events, db.path, wire);
    await using _server = serveEvents(events, {
      version: "v2",
      closeAtEnd: true,
      port,
      lookbackFloorSeq: 1300,
    });
    const message =
      /only holds events from seq 1300 on; the point to resume from, seq 1151, is 149 seqs earlier/;
    await assert.rejects(
      () => runBackfillSync({ kv: db.path, resume: true, strict: true }),
      (err: unknown) => err instanceof UsageError && message.test(err.message),
    );
    const reports: SyncErrorReport[] = [];
    const second = await runBackfillSync({ kv: db.path, resume: true, onError: (r) => reports.push(r) });
    assert.equal(second.stopReason, "closed", wire);
    assert.match(reports.find((r) => r.reason === "coverage")!.message, message);
    // Every event the host still holds is new, whatever its display time: the first (seq 1300) shows
    // one older than the last stored. (After the v2 wire's CursorTooOld, a resume by time dropped it.)
    const got = await stored(db.path, second.queueLength);
    assert.deepEqual(
      got.map((e) => e.cursor),
      events.map((_, i) => 1001 + i).filter((s) => s <= 1150 || s >= 1300),
      wire,
    );
  }
});

Deno.test("resuming on another v2 host (by time: seqs are not portable), new events with imported display times older than the resume point are kept", async () => {
  for (const wire of ["/subscribe", V2_PATH]) {
    const events = capture();
    for (const i of [60, 200, 300, 400]) events[i] = { ...events[i], time_us: IMPORTED_US - i };
    await using db = await tempDb();
    await using first = serveEvents(events, { version: "v2", faults: { dropEvery: 150 } });
    const controller = new AbortController();
    const stopped = await runBackfillSync({
      instance: first.url.replace(/\/subscribe$/, wire),
      kv: db.path,
      ...ALL,
      signal: controller.signal,
      onError: (r) => r.reason === "retry" && controller.abort(),
    });
    assert.equal(stopped.recordsStored, 150, wire);
    // Another host, with its own seqs: the resume asks it by time, from a little before the last
    // stored event, and it sends everything from there on, imported display times included.
    const second = await resumeOnAnotherHost(events, db.path, wire, 7000);
    assert.equal(second.stopReason, "closed", wire);
    const got = await stored(db.path, second.queueLength);
    // Each event once: the first 150 from the first host, the rest from the other.
    assert.deepEqual(got.map(({ cursor: _, ...event }) => event), events, wire);
    assert.deepEqual(
      got.map((e) => e.cursor),
      events.map((_, i) => i < 150 ? 1001 + i : 7001 + i),
      wire,
    );
  }
});

Deno.test("resuming on another v2 host after a run whose last record showed an imported display time takes the stream up where the run was, not years back", async () => {
  // More records than the queue keeps the content keys of (RECENT_KEYS), so that a replay from the
  // imported time would bring back records no longer recognised.
  const N = 16_000, STOP = 14_000;
  for (const wire of ["/subscribe", V2_PATH]) {
    const events = capture(N);
    events[STOP - 1] = { ...events[STOP - 1], time_us: IMPORTED_US };
    await using db = await tempDb();
    await using first = serveEvents(events, { version: "v2", faults: { dropEvery: STOP } });
    const controller = new AbortController();
    const stopped = await runBackfillSync({
      instance: first.url.replace(/\/subscribe$/, wire),
      kv: db.path,
      ...ALL,
      numRecords: 2 * N,
      signal: controller.signal,
      onError: (r) => r.reason === "retry" && controller.abort(),
    });
    assert.equal(stopped.recordsStored, STOP, wire);
    assert.equal(stopped.latestCursor, IMPORTED_US, wire);
    const second = await resumeOnAnotherHost(events, db.path, wire, 70_000);
    assert.equal(second.stopReason, "closed", wire);
    assert.equal(second.recordsStored, N - STOP, wire);
    const got = await stored(db.path, second.queueLength);
    assert.deepEqual(got.map(({ cursor: _, ...event }) => event), events, wire);
  }
});

Deno.test("maxEventBytes on the v2 wire limits the event as stored, not the frame and its envelope", async () => {
  const events = capture(20);
  events[10] = commit(events[10].time_us, { did: did(1), text: "é".repeat(3000) });
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true });
  const sync = async (wire: string, maxEventBytes?: number) => {
    await using db = await tempDb();
    const stats = await runBackfillSync({
      instance: server.url.replace(/\/subscribe$/, wire),
      kv: db.path,
      startTimestamp: T0,
      maxEventBytes,
      ...ALL,
    });
    return { stats, got: await stored(db.path, stats.queueLength) };
  };
  const { got } = await sync(V2_PATH);
  const big = new TextEncoder().encode(JSON.stringify(got[10])).byteLength;
  // The same event on /subscribe is no larger (the v2 server's v1 text), so both wires store it.
  for (const wire of ["/subscribe", V2_PATH]) {
    const at = await sync(wire, big);
    assert.equal(at.stats.recordsStored, 20, wire);
    assert.deepEqual(at.stats.skipped, {}, wire);
    assert.deepEqual(at.got[10], got[10]);
  }
  const over = await sync(V2_PATH, big - 1);
  assert.equal(over.stats.recordsStored, 19);
  assert.equal(over.stats.skipped.oversized, 1);
});

Deno.test("the v2 wire stores events too large, too deep or larger than their bound once parsed as /subscribe does", async () => {
  const events = capture(60);
  // Over a message: gzipped. Nested deeper than a record may be: gzipped. Floats, which the size
  // bound does not foresee: KV refuses the commit, which is rebuilt from what was kept of its records.
  events[10] = commit(events[10].time_us, { did: did(1), text: "big ".repeat(20_000) });
  let deep: unknown = {};
  for (let i = 0; i < MAX_RECORD_DEPTH + 10; i++) deep = [deep];
  (events[20] as { commit: { record: Record<string, unknown> } }).commit.record.deep = deep;
  (events[30] as { commit: { record: Record<string, unknown> } }).commit.record.items = Array.from(
    { length: 9_000 },
    () => 0.5,
  );
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true });
  const sync = async (wire: string) => {
    await using db = await tempDb();
    const stats = await runBackfillSync({
      instance: server.url.replace(/\/subscribe$/, wire),
      kv: db.path,
      startTimestamp: T0,
      batchSize: 10,
      ...ALL,
    });
    assert.equal(stats.recordsStored, 60, wire);
    assert.deepEqual(stats.skipped, {}, wire);
    const msgs = (await drainQueue(db.path, stats.queueLength)) as QueueMessage[];
    msgs.sort((a, b) => a.seq - b.seq);
    assert.deepEqual(msgs.map((m) => m.seq), Array.from({ length: msgs.length }, (_, i) => i + 1));
    return msgs;
  };
  const v1 = await sync("/subscribe");
  const v2 = await sync(V2_PATH);
  assert.deepEqual(v2.map((m) => decodeQueueMessage(m)), v1.map((m) => decodeQueueMessage(m)));
  assert.equal(v2.filter((m) => m.compressed).length, 3);
});

Deno.test("fetchV2Dictionary() asks a v2 host served under a path prefix under that prefix", async () => {
  const dictionary = (await v2Dictionary()).bytes;
  const paths: string[] = [];
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    const { pathname } = new URL(req.url);
    paths.push(pathname);
    return pathname === `/jetstream${V2_DICTIONARY_PATH}`
      ? new Response(dictionary)
      : Response.json({ error: "MethodNotImplemented" }, { status: 404 });
  });
  const got = await fetchV2Dictionary(`ws://127.0.0.1:${server.addr.port}/jetstream${V2_PATH}?cursor=5`);
  assert.equal(got.id, 20260811);
  assert.deepEqual(got.bytes, dictionary);
  assert.deepEqual(paths, [`/jetstream${V2_DICTIONARY_PATH}`]);
});

Deno.test("a v2 host's seq is not used again once records came from a legacy instance after it", async () => {
  const events = Array.from(
    { length: 900 },
    (_, i) => commit(T0 + i * 1000, { did: did(i % 9), text: `p${i}` }),
  );
  // One v2 host, first holding the first 300 events, later all of them.
  await using early = serveEvents(events.slice(0, 300), { version: "v2", closeAtEnd: true });
  await using later = serveEvents(events, { version: "v2", closeAtEnd: true });
  let grown = false;
  await using relay = tcpRelay(() => Number(new URL((grown ? later : early).url).port));
  const host = `ws://127.0.0.1:${relay.port}${V2_PATH}`;
  await using legacy = serveEvents(events.slice(0, 600), { closeAtEnd: true });
  await using db = await tempDb();
  const seqOf = async () => {
    const kv = await Deno.openKv(db.path);
    try {
      return (await readCheckpoint(kv, "jetstream_sync")).value?.run.seqCursor;
    } finally {
      kv.close();
    }
  };
  const first = await runBackfillSync({ instance: host, kv: db.path, startTimestamp: T0 });
  assert.equal(first.recordsStored, 300);
  const seq = await seqOf();
  assert.ok(seq !== undefined && seq > 0);
  // Resumed on a legacy instance, which stores 300 more: the v2 seq is no longer where the run is.
  const second = await runBackfillSync({
    instance: legacy.url,
    kv: db.path,
    resume: true,
    onError: () => {},
  });
  assert.equal(second.recordsStored, 300);
  assert.equal(await seqOf(), undefined);
  // Back on the v2 host, the run asks by time. (Before, by that seq: everything after it again.)
  grown = true;
  const third = await runBackfillSync({ instance: host, kv: db.path, resume: true, onError: () => {} });
  assert.equal(third.recordsStored, 300);
  const cursor = Number(/(?:^|&)cursor=(\d+)/.exec(syncConnections(later).at(-1)!.query)![1]);
  assert.ok(cursor >= 1e15, `cursor=${cursor}, the seq was ${seq}`);
});

Deno.test("within a run, a v2 host's seq is not used again once records came from a legacy instance after it", async () => {
  const events = Array.from(
    { length: 900 },
    (_, i) => commit(T0 + i * 1000, { did: did(i % 9), text: `p${i}` }),
  );
  // A v2 host that serves 300 events and fails, then cannot be reached until a legacy instance has
  // served 600 (and failed, and cannot be reached either); by then the v2 host holds all 900.
  const refusedAt = await refusedPort();
  await using early = serveEvents(events.slice(0, 300), {
    version: "v2",
    errorAfter: { events: 300, error: "InternalError" },
  });
  await using later = serveEvents(events, { version: "v2", closeAtEnd: true });
  await using legacy = serveEvents(events.slice(0, 600), {
    errorAfter: { events: 600, error: "InternalError" },
  });
  const served = (server: typeof early, n: number) => syncConnections(server).some((c) => c.sent >= n);
  await using relayA = tcpRelay(() =>
    served(legacy, 600) ? portOf(later) : served(early, 300) ? refusedAt : portOf(early)
  );
  await using relayB = tcpRelay(() => served(legacy, 600) ? refusedAt : portOf(legacy));
  const hostA = `ws://127.0.0.1:${relayA.port}${V2_PATH}`;
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: [hostA, `ws://127.0.0.1:${relayB.port}/subscribe`],
    kv: db.path,
    startTimestamp: T0,
    onError: () => {},
  });
  assert.equal(stats.stopReason, "closed");
  // Each event once, in order, from whichever instance it came.
  const got = await stored(db.path, stats.queueLength);
  assert.deepEqual(got.map((e) => e.time_us), events.map((e) => e.time_us));
  assert.equal(syncConnections(later).length, 1);
  // Back on the v2 host, the run asks by time. (Before, by the seq it had there.)
  const cursor = Number(/(?:^|&)cursor=(\d+)/.exec(syncConnections(later)[0].query)![1]);
  assert.ok(cursor >= 1e15, `cursor=${cursor}`);
});

Deno.test("a resume given another v2 server by its address alone stays on the v2 wire (wire is taken from the checkpoint)", async () => {
  const events = capture(300);
  await using first = serveEvents(events, { version: "v2", closeAtEnd: true });
  await using other = serveEvents(events, { version: "v2", closeAtEnd: true });
  await using db = await tempDb();
  const a = await runBackfillSync({
    instance: v2Url(first.url),
    kv: db.path,
    startTimestamp: T0,
    numRecords: 100,
  });
  assert.equal(a.recordsStored, 100);
  const b = await runBackfillSync({
    instance: new URL(other.url).origin, // ws://127.0.0.1:PORT, no path
    kv: db.path,
    resume: true,
    force: true,
    numRecords: 200,
    onError: () => {},
  });
  assert.ok(b.recordsStored > 0);
  // (Before, a path-less URL meant /subscribe: the resume went on over the v1 wire.)
  assert.ok(other.connections.length > 0);
  assert.ok(
    other.connections.every((c) => c.endpoint === "subscribeEvents"),
    JSON.stringify(other.connections.map((c) => c.endpoint)),
  );
});

Deno.test("on v2 hosts alone, a bad zstdDictionary is refused before anything is opened", async () => {
  await using server = serveEvents(capture(10), { version: "v2", closeAtEnd: true });
  await using db = await tempDb();
  for (
    const [dictionary, why] of [["/nonexistent.zdict", /no such file/], [
      new Uint8Array(10),
      /not a zstd dictionary|magic/,
    ]] as const
  ) {
    await assert.rejects(
      () =>
        runBackfillSync({
          instance: v2Url(server.url),
          kv: db.path,
          compress: true,
          zstdDictionary: dictionary,
        }),
      (err: unknown) => err instanceof UsageError && why.test(err.message),
    );
  }
  // (Before, it was only read once a host had no dictionary to give, and the run went on without it.)
  assert.equal(server.connections.length, 0);
  assert.equal(await Deno.stat(db.path).then(() => true, () => false), false);
});

for (const wire of ["/subscribe", "subscribeEvents"] as const) {
  Deno.test(`a resume on another v2 host whose early replay (#343) drops midway stores nothing twice (${wire})`, async () => {
    // The first host stores 15,000 posts and the run stops there. The other replays from 10 s before
    // the cursor asked (bluesky-social/jetstream#343) and drops every 1,000 events, so the replay
    // below the run's floor spans connections. (Before, the next connection went on from the seq of
    // the last event left out below the floor, with no floor: the replay's events older than the
    // 12,288 records whose keys the resume knows were stored again, 1,500 of them.)
    const events = Array.from(
      { length: 20_000 },
      (_, i) => commit(T0 + i * 1000, { did: did(i % 50), text: `p${i}` }),
    );
    await using db = await tempDb();
    await using first = serveEvents(events, { version: "v2", faults: { dropEvery: 15_000 } });
    const controller = new AbortController();
    const a = await runBackfillSync({
      instance: first.url,
      kv: db.path,
      ...ALL,
      startTimestamp: T0 - 60_000_000,
      numRecords: 1_000_000,
      signal: controller.signal,
      onError: (r) => r.reason === "retry" && controller.abort(),
    });
    assert.equal(a.recordsStored, 15_000);
    await using other = serveEvents(events, {
      version: "v2",
      seqBase: 70_000,
      closeAtEnd: true,
      earlyReplayUs: 10_000_000,
      faults: { dropEvery: 1000 },
    });
    const b = await runBackfillSync({
      kv: db.path,
      resume: true,
      instance: wire === "/subscribe" ? other.url : v2Url(other.url),
      onError: () => {},
    });
    assert.equal(b.stopReason, "closed", b.error);
    assert.equal(b.recordsStored, 5000);
    // Taken up by seq after the first drop, still below the floor.
    assert.ok(syncConnections(other).some((c) => /cursor=7\d{4}(&|$)/.test(c.query)));
    const got = await stored(db.path, b.queueLength);
    assert.deepEqual(got.map((e) => e.time_us), events.map((e) => e.time_us));
  });
}

Deno.test("a refusal of a v2-wire URL thousands of characters long shows the URL cut short, with its length", async () => {
  // (Before: the whole URL, 150 DIDs, was in the message.)
  await using server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () => new Response("URI Too Long", { status: 414 }),
  );
  await using db = await tempDb();
  const dids = Array.from({ length: 150 }, (_, i) => did(i));
  const err = await runBackfillSync({
    instance: `ws://127.0.0.1:${server.addr.port}${V2_PATH}`,
    kv: db.path,
    startTimestamp: T0,
    wantedDids: dids,
  }).then(() => undefined, (e: unknown) => e as Error);
  assert.ok(err instanceof UsageError, String(err));
  assert.match(err.message, /refused the connection: HTTP 414: URI Too Long/);
  assert.match(err.message, /\(a URL of \d{4} characters\)/);
  assert.ok(err.message.length < 1000, `${err.message.length} characters`);
});
