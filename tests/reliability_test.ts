import assert from "node:assert/strict";
import { runBackfillSync } from "../src/backfill.ts";
import { UsageError } from "../src/errors.ts";
import type { JetstreamEvent } from "../src/jetstream/events.ts";
import { decodeQueueMessage, type QueueMessage } from "../src/queue/message.ts";
import type { SyncErrorReport, SyncStats } from "../src/stats.ts";
import type { BackfillSyncOptions } from "../src/options.ts";
import { commit, did, drainQueue, identity } from "./helpers/events.ts";
import {
  handServer,
  refusedPort,
  serveEvents,
  syncConnections,
  syncReporting,
  tcpRelay,
  tempDb,
  upgradeThenDropServer,
} from "./helpers/loopback.ts";
import { patchAtomic } from "./helpers/kv_patch.ts";
import { delay } from "../src/async.ts";
import { isoFromUs } from "../src/time.ts";
import { retryAfterMs } from "../src/jetstream/raw_ws.ts";
import type { ConnectionRecord, JetstreamServer } from "../src/server/server.ts";
import { runCli, whileRunning } from "./helpers/cli.ts";
import { waitFor } from "./helpers/ws_collect.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;

function capture(n = 2000): JetstreamEvent[] {
  return Array.from({ length: n }, (_, i) =>
    i % 97 === 5 ? identity(T0 + i * 1000) : commit(T0 + i * 1000, {
      did: did(i % 13),
      collection: i % 3 === 0 ? "app.bsky.feed.like" : "app.bsky.feed.post",
      text: `post ${i}`,
    }));
}

/** What an event says: a post's text (`p<i>` from {@link spaced}), or its kind. */
const text = (e: JetstreamEvent) => e.kind === "commit" ? (e.commit.record as { text: string }).text : e.kind;

/** `count` posts by five accounts from T0, `stepUs` apart (the i-th says `p<i>`). */
function spaced(count: number, stepUs: number): JetstreamEvent[] {
  return Array.from({ length: count }, (_, i) => commit(T0 + i * stepUs, { did: did(i % 5), text: `p${i}` }));
}

const posts = (events: JetstreamEvent[]) =>
  events.filter((e) => e.kind === "commit" && e.commit.collection === "app.bsky.feed.post");

async function stored(path: string, messages: number): Promise<JetstreamEvent[]> {
  const msgs = (await drainQueue(path, messages)) as QueueMessage[];
  msgs.sort((a, b) => a.seq - b.seq);
  assert.deepEqual(msgs.map((m) => m.seq), Array.from({ length: messages }, (_, i) => i + 1));
  return msgs.flatMap((m) => decodeQueueMessage(m));
}

Deno.test("runBackfillSync() reconnects after abrupt drops and stores every event exactly once", async () => {
  const events = capture();
  await using server = serveEvents(events, { closeAtEnd: true, faults: { dropEvery: 170 } });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    batchSize: 25,
  });
  assert.equal(stats.stopReason, "closed");
  assert.ok(stats.reconnects >= 5, `reconnects: ${stats.reconnects}`);
  assert.ok(stats.duplicatesDropped >= stats.reconnects, "the inclusive replay must be dropped");
  assert.ok(reports.some((r) => r.reason === "retry" && /code 1006/.test(r.message)));
  const got = await stored(db.path, stats.queueLength);
  assert.deepEqual(got, posts(events));
  assert.equal(stats.recordsStored, posts(events).length);
  // Each reconnect resumed from the last processed event, inclusive.
  const queries = syncConnections(server).map((c) => c.query);
  assert.ok(queries.slice(1).every((q) => /cursor=\d{16}/.test(q)));
});

Deno.test("runBackfillSync() held up by slow commits is dropped by the server's write deadline, and loses and repeats nothing", async () => {
  // 80,000 events (about 20 MB), well over what loopback's socket buffers can hold (up to 6 MB to
  // receive and 4 MB to send; 40,000 fitted now and then); each commit takes 250 ms, so the sync
  // stops reading for longer than the server's 200 ms write deadline, which drops it (1006).
  const events = capture(80_000);
  await using server = serveEvents(events, { closeAtEnd: true, writeTimeoutMs: 200 });
  await using db = await tempDb();
  const real = await Deno.openKv(db.path);
  try {
    const slow = patchAtomic(real, (op, commit) => {
      op.commit = async () => {
        await delay(250);
        return await commit();
      };
    });
    const stats = await runBackfillSync({
      instance: server.url,
      kv: slow,
      startTimestamp: T0,
      numRecords: 100_000,
      batchSize: 1000,
      onError: () => {},
    });
    assert.equal(stats.stopReason, "closed");
    assert.ok(stats.reconnects >= 1, `reconnects: ${stats.reconnects}`);
    assert.ok(server.connections.some((c) => c.closeCode === 1006), "the server dropped a slow reader");
    assert.equal(stats.recordsStored, posts(events).length);
    assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
  } finally {
    real.close();
  }
});

Deno.test("runBackfillSync() keeps an event that shares its time_us with the last one before a drop", async () => {
  // Events 5 and 6 share a time_us (a v2 host's display time can; two different records), and the
  // connection drops right after event 5. The reconnect asks from that time_us, inclusive.
  const events = Array.from(
    { length: 10 },
    (_, i) => commit(T0 + (i >= 5 ? i - 1 : i) * 1000, { did: did(i), rkey: `3ktie${i}` }),
  );
  assert.equal(events[4].time_us, events[5].time_us);
  await using server = serveEvents(events, { closeAtEnd: true, faults: { dropEvery: 5 } });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    batchSize: 3,
  });
  assert.equal(stats.stopReason, "closed");
  assert.ok(stats.reconnects >= 1);
  assert.deepEqual(await stored(db.path, stats.queueLength), events);
  assert.equal(stats.recordsStored, 10);
  // Event 5 came again with its replay and was recognised by content.
  assert.ok(stats.duplicatesDropped >= 1);
});

Deno.test("a refusal's Retry-After is waited for when longer than the backoff, on both wires", async () => {
  const events = capture(300);
  for (const version of ["legacy", "v2"] as const) {
    await using server = serveEvents(events, {
      closeAtEnd: true,
      version,
      faults: { refuseFirst: 1, retryAfter: 2 },
    });
    await using db = await tempDb();
    const reports: SyncErrorReport[] = [];
    const started = performance.now();
    const stats = await runBackfillSync({
      instance: server.url,
      kv: db.path,
      startTimestamp: T0,
      onError: (r) => reports.push(r),
    });
    // (Before, the first retry came after the backoff's 125 to 250 ms.)
    assert.ok(performance.now() - started >= 2_000, `${version}: the second attempt did not wait 2 s`);
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.equal(stats.recordsStored, posts(events).length);
    assert.match(
      reports.find((r) => r.reason === "connection")!.message,
      /HTTP 503.*\(attempt 1 of 11; trying again in 2\.0 s, as its Retry-After asks\)$/,
    );
  }
});

Deno.test("a refusal whose Retry-After asks for longer than the backoff sends a run with other instances to the next at once", async () => {
  const events = capture(300);
  await using busy = serveEvents(events, { closeAtEnd: true, faults: { refuseFirst: 100, retryAfter: 60 } });
  await using good = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const reports: SyncErrorReport[] = [];
  const started = performance.now();
  const stats = await runBackfillSync({
    instance: [busy.url, good.url],
    kv: db.path,
    startTimestamp: T0,
    onError: (r) => reports.push(r),
  });
  // (Before, it waited the 60 s the first instance asked for, then tried it again.)
  assert.ok(performance.now() - started < 30_000, "the run waited for the busy instance");
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.recordsStored, posts(events).length);
  assert.ok(!reports.some((r) => /Retry-After asks/.test(r.message)), JSON.stringify(reports));
});

Deno.test("a run with other instances asks none of them again before its Retry-After is over", async () => {
  const events = capture(300);
  const faults = { refuseFirst: 3, retryAfter: 2 };
  await using a = serveEvents(events, { closeAtEnd: true, faults });
  await using b = serveEvents(events, { closeAtEnd: true, faults });
  await using db = await tempDb();
  // When each instance refused, by this machine's clock.
  const refused = new Map<string, number[]>([[a.url, []], [b.url, []]]);
  const reports: string[] = [];
  const stats = await runBackfillSync({
    instance: [a.url, b.url],
    kv: db.path,
    startTimestamp: T0,
    onError: (r) => {
      reports.push(r.message);
      if (/HTTP 503/.test(r.message)) refused.get(r.instance!)!.push(performance.now());
    },
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.recordsStored, posts(events).length);
  for (const [url, times] of refused) {
    assert.ok(times.length >= 2, `${url}: ${times.length} refusals\n${reports.join("\n")}`);
    // (Before, the two were asked in turn on the backoff alone: 0.3, then 0.6 s apart, and so on.)
    for (let i = 1; i < times.length; i++) {
      assert.ok(times[i] - times[i - 1] >= 1_950, `${url} asked again after ${times[i] - times[i - 1]} ms`);
    }
  }
  assert.ok(
    reports.some((m) => /; next, 127\.0\.0\.1:\d+ in \d\.\d s, as that one's Retry-After asks\)$/.test(m)),
    reports.join("\n"),
  );
});

Deno.test("a sync given the bundled server as a bare host:port (so wss://) is told at once to give ws://", async () => {
  await using server = serveEvents(capture(10), { closeAtEnd: true });
  const hostPort = new URL(server.url).host;
  await using db = await tempDb();
  const started = performance.now();
  const { stats } = await syncReporting({ instance: hostPort, kv: db.path, maxRetries: 0, idleTimeout: 20 });
  // (Before: the server waited for a request head that a TLS handshake never ends, for the 20 s.)
  assert.ok(performance.now() - started < 10_000, `took ${performance.now() - started} ms`);
  assert.equal(stats.stopReason, "error");
  assert.match(
    stats.error!,
    new RegExp(`if this server speaks plain WebSocket, give ws://${hostPort}/subscribe`),
  );
});

Deno.test("retryAfterMs() reads seconds and HTTP dates, at most an hour, and nothing else", () => {
  const now = Date.parse("2026-12-02T08:00:00Z");
  assert.equal(retryAfterMs("120", now), 120_000);
  assert.equal(retryAfterMs(" 0 ", now), 0);
  assert.equal(retryAfterMs("Wed, 02 Dec 2026 08:00:30 GMT", now), 30_000);
  assert.equal(retryAfterMs("Wed, 02 Dec 2026 07:00:00 GMT", now), 0);
  assert.equal(retryAfterMs("999999", now), 3_600_000);
  for (const bad of [null, undefined, "", "soon", "-5", "1.5"]) {
    assert.equal(retryAfterMs(bad, now), undefined, String(bad));
  }
});

Deno.test("runBackfillSync() retries 503 refusals with backoff, then gives up after maxRetries with a clear error", async () => {
  const events = capture(300);
  {
    await using server = serveEvents(events, { closeAtEnd: true, faults: { refuseFirst: 3 } });
    await using db = await tempDb();
    const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 });
    assert.equal(stats.stopReason, "closed");
    assert.equal(stats.recordsStored, posts(events).length);
  }
  {
    await using server = serveEvents(events, { closeAtEnd: true, faults: { refuseFirst: 100 } });
    await using db = await tempDb();
    const stats = await runBackfillSync({ instance: server.url, kv: db.path, maxRetries: 2 });
    assert.equal(stats.stopReason, "error");
    assert.match(
      stats.error!,
      /gave up after 3 connection attempts without progress; last error: .*HTTP 503/,
    );
    assert.equal(stats.recordsStored, 0);
  }
  {
    // maxRetries 0: one attempt, said as one.
    await using server = serveEvents(events, { closeAtEnd: true, faults: { refuseFirst: 100 } });
    await using db = await tempDb();
    const stats = await runBackfillSync({ instance: server.url, kv: db.path, maxRetries: 0 });
    assert.match(
      stats.error!,
      /^gave up after 1 connection attempt without progress; last error: .*HTTP 503/,
    );
  }
});

Deno.test("runBackfillSync() reconnects a stalled connection after the idle timeout", async () => {
  const events = capture(600);
  await using server = serveEvents(events, { closeAtEnd: true, faults: { stallAfter: 200 } });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    idleTimeout: 0.3,
  });
  assert.equal(stats.stopReason, "closed");
  assert.ok(stats.reconnects >= 1);
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
});

Deno.test("runBackfillSync() counts hostile frames by reason, stores none of them and goes on", async () => {
  const events = capture(1000);
  await using server = serveEvents(events, { closeAtEnd: true, faults: { garbageEvery: 40 } });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    kinds: ["commit", "identity", "account"],
    wantedCollections: [],
  });
  assert.equal(stats.stopReason, "closed");
  const garbage = syncConnections(server).reduce((n, c) => n + (c.garbage ?? 0), 0);
  const skipped = Object.values(stats.skipped).reduce((a, b) => a + (b ?? 0), 0);
  assert.equal(skipped, garbage);
  for (
    const reason of ["malformed_json", "binary_frame", "unknown_kind", "missing_fields", "oversized"] as const
  ) {
    assert.ok((stats.skipped[reason] ?? 0) > 0, `no ${reason} counted: ${JSON.stringify(stats.skipped)}`);
    assert.ok(reports.some((r) => r.reason === reason), `no ${reason} reported`);
  }
  // Each names the instance as given, not the connection's URL with the run's query.
  assert.deepEqual([...new Set(reports.map((r) => r.instance))], [server.url]);
  assert.deepEqual(await stored(db.path, stats.queueLength), events);
});

Deno.test("a JSON value that is not an object is skipped as missing_fields, and said to be no object", async () => {
  const good = [commit(T0), commit(T0 + 1000)];
  const frames = [JSON.stringify(good[0]), "[1,2,3]", "42", "null", '"text"', JSON.stringify(good[1])];
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const { socket, response } = Deno.upgradeWebSocket(req);
    // (The coverage probe, cursor=0, is answered the same way.)
    socket.onopen = () => {
      for (const f of frames) socket.send(f);
      socket.close(1000, "done");
    };
    return response;
  });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
    kv: db.path,
    startTimestamp: T0,
  });
  assert.equal(stats.skipped.missing_fields, 4);
  // (Before: "missing fields in [1,2,3]".)
  assert.deepEqual(
    reports.filter((r) => r.reason === "missing_fields").map((r) => r.message),
    [
      "not a JSON object: [1,2,3]",
      "not a JSON object: 42",
      "not a JSON object: null",
      'not a JSON object: "text"',
    ],
  );
  assert.deepEqual(await stored(db.path, stats.queueLength), good);
});

Deno.test("an event with a time_us no server could give is skipped as bad_time: it neither ends the run nor moves its cursor", async () => {
  const events = capture(1500);
  const year2100 = { ...commit(4102444800000000, { did: did(1), text: "from the future" }) };
  const before2001 = { ...commit(0, { did: did(2), text: "from 1970" }) };
  // As a buggy server sends them, among good events (in file order: faults.fileOrder).
  const lines = [
    ...events.slice(0, 500),
    year2100,
    ...events.slice(500, 1000),
    before2001,
    ...events.slice(1000),
  ];
  await using server = serveEvents(lines, { closeAtEnd: true, faults: { dropEvery: 700, fileOrder: true } });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    endTimestamp: T0 + 1_000_000_000,
  });
  // Before, the year-2100 post was "the first event at or after the end" and stopped the run there.
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.deepEqual(stats.skipped, { bad_time: 2 });
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
  assert.match(
    reports.find((r) => r.reason === "bad_time")!.message,
    /^time_us that no server could have given/,
  );
});

Deno.test("an event holding a did, operation, collection, rkey, rev or relay time no Jetstream sends is skipped as bad_value", async () => {
  const events = capture(1200);
  const badRev = commit(T0 + 800_500, { did: did(5) }) as JetstreamEvent & { commit: { rev: unknown } };
  badRev.commit.rev = { toString: 1 };
  const broken = [
    { ...commit(T0 + 100_500, { did: did(1) }), did: "nobody" },
    { ...commit(T0 + 300_500, { did: did(2), operation: "explode" as "create" }) },
    commit(T0 + 500_500, { did: did(3), collection: "" }),
    commit(T0 + 700_500, { did: did(4), rkey: "" }),
    // (Before, these two stopped the run with "Cannot convert object to primitive value", the
    // first every time a run met it again.)
    badRev,
    { did: did(6), time_us: T0 + 900_500, kind: "identity", identity: { did: did(6), time: { valueOf: 1 } } },
  ] as JetstreamEvent[];
  const lines = [...events, ...broken].sort((a, b) => a.time_us - b.time_us);
  await using server = serveEvents(lines, { closeAtEnd: true });
  await using db = await tempDb();
  const reports: SyncErrorReport[] = [];
  // No collection filter: the empty collection must not pass as "every collection".
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    wantedCollections: [],
    kinds: ["commit", "identity"],
    onError: (r) => reports.push(r),
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.deepEqual(stats.skipped, { bad_value: 6 });
  assert.deepEqual(
    await stored(db.path, stats.queueLength),
    events.filter((e) => e.kind === "commit" || e.kind === "identity"),
  );
  assert.match(
    reports.find((r) => r.reason === "bad_value")!.message,
    /^a value no Jetstream sends .* in \{"did":"nobody"/,
  );
});

Deno.test("the coverage probe takes the first event a sync would take, not a bad frame's time_us", async () => {
  const events = capture(300);
  // The server's first frame: an unknown kind from the year 2100 (first in file order: faults.fileOrder).
  const bogus = JSON.stringify({ did: did(1), time_us: 4102444800000000, kind: "heartbeat" });
  await using server = serveEvents([bogus, ...events], { closeAtEnd: true, faults: { fileOrder: true } });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    strict: true,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.coverageStart, T0);
  assert.equal(stats.coverageGapUs, 0);
  assert.equal(stats.recordsStored, posts(events).length);
});

Deno.test("runBackfillSync() fails over to the next instance, rewinds and deduplicates by content", async () => {
  const events = capture(1200);
  const flaky = serveEvents(events);
  await using good = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  let stopped: Promise<void> | undefined;
  const stats = await runBackfillSync({
    instance: [flaky.url, good.url],
    kv: db.path,
    startTimestamp: T0,
    batchSize: 20,
    // The first instance goes away for good after the first commit.
    onProgress: () => {
      stopped ??= flaky.shutdown();
    },
  });
  await stopped;
  assert.equal(stats.stopReason, "closed");
  assert.ok(stats.failovers >= 1, `failovers: ${stats.failovers}`);
  assert.ok(stats.duplicatesDropped > 0, "the rewound replay must be deduplicated");
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
  const first = syncConnections(good)[0].query.match(/cursor=(\d+)/)![1];
  const flakyLast = Math.max(...syncConnections(flaky).map((c) => c.sent));
  assert.ok(Number(first) <= T0 + flakyLast * 1000, "the switch rewinds the cursor");
});

Deno.test("a failover after a drop takes the stream up the failover's rewind (5 s) before the last event, not that and the reconnect's", async () => {
  // 20 ms apart: the first instance's connection covers 20 s and drops after its 1,000th event; the
  // instance is gone from then on, and the sync fails over.
  const events = spaced(1500, 20_000);
  await using first = serveEvents(events, { faults: { dropEvery: 1000 } });
  await using good = serveEvents(events, { closeAtEnd: true });
  const gone = await refusedPort();
  await using relay = tcpRelay(() => syncConnections(first)[0]?.dropped ? gone : first.port);
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: [`ws://127.0.0.1:${relay.port}/subscribe`, good.url],
    kv: db.path,
    startTimestamp: T0,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  const cursor = /cursor=(\d+)/.exec(syncConnections(good)[0].query)?.[1];
  // Before, the reconnect's rewind came on top: 10 s.
  assert.equal(Number(cursor), T0 + 999 * 20_000 - 5_000_000);
  assert.deepEqual(await stored(db.path, stats.queueLength), events);
});

Deno.test("after a failover to an instance that lacks the records stored, its own events sent again by a reconnect do not end the wait for one", async () => {
  // 10 ms apart. The first instance goes away after 1,200 events; the second holds other records
  // (other rkeys) up to the 1,500th, and drops every connection after 600 events: its reconnect's
  // rewind sends some of its own events again. Before, such a repeat counted as a record stored
  // before, and the warning that the instance lacks them never came.
  const events = spaced(3000, 10_000);
  const other = events.map((e, i) =>
    i < 1500 ? commit(e.time_us, { did: e.did, text: `q${i}`, rkey: `3zz${i}` }) : e
  );
  const first = serveEvents(events.slice(0, 1500));
  await using second = serveEvents(other, { closeAtEnd: true, faults: { dropEvery: 600 } });
  await using db = await tempDb();
  try {
    const reports: SyncErrorReport[] = [];
    const sync = runBackfillSync({
      instance: [first.url, second.url],
      kv: db.path,
      startTimestamp: T0,
      onError: (r) => reports.push(r),
    });
    while (!(syncConnections(first)[0]?.sent >= 1200)) await delay(20);
    await first.shutdown();
    const stats = await sync;
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.equal(stats.failovers, 1);
    assert.ok(syncConnections(second).length >= 2, "the second instance's reconnect");
    assert.ok(
      reports.some((r) =>
        r.reason === "coverage" && r.message.startsWith("none of the records stored last came again") &&
        // It looked back 5, 10, 20, … 320 s: the start is no bound, as this instance's time_us could
        // run behind by more than the run is long.
        / s behind the other instance's \(the stream was taken up too late, even 320 s before\)/.test(
          r.message,
        )
      ),
      JSON.stringify(reports.map((r) => r.message)),
    );
  } finally {
    await first.shutdown();
  }
});

/** How a {@link failoverBehind} scenario's second instance differs from the plain one. */
interface SecondInstance {
  /** How much later its time_us are (earlier when negative). */
  skewUs: number;
  /** The spacing of the 3,000 posts. */
  stepUs?: number;
  /** Serves the v2 wire. */
  v2?: boolean;
  /** Which of the (skewed) events it holds. */
  holds?: (index: number) => boolean;
  /** How much later than the skew an event's time_us is (a reorder, with `fileOrder`). */
  jitterUs?: (index: number) => number;
  /** Its server's options (faults, history start). */
  server?: Parameters<typeof serveEvents>[1];
  /** A route to it in place of its own URL: a relay given its server. */
  via?: (server: JetstreamServer) => { port: number } & AsyncDisposable;
  /** More sync options. */
  options?: BackfillSyncOptions;
  /** Which of the posts the first instance holds (the first 1,200). */
  firstHolds?: (index: number) => boolean;
  /** The post the run starts at (the first). */
  startAt?: number;
  /** Whether it is a v2 host read on `/subscribe` (`v2`: on `subscribeEvents`). */
  v2Subscribe?: boolean;
}

/**
 * 3,000 posts `stepUs` apart (10 ms) from T0, synced from T0 (or `startAt`). The first instance
 * holds 1,200 of them (or `firstHolds`) and goes away once it has sent them; the second holds them
 * as `second` says, and so do the instances after it (their `stepUs`, `options`, `firstHolds` and
 * `startAt` are the second's).
 */
async function failoverBehind(second: SecondInstance, ...more: SecondInstance[]) {
  const events = spaced(3000, second.stepUs ?? 10_000);
  const firstHolds = second.firstHolds ?? ((i: number) => i < 1200);
  const startAt = second.startAt ?? 0;
  const first = serveEvents(events.filter((_, i) => firstHolds(i)));
  const firstSends = events.filter((_, i) => firstHolds(i) && i >= startAt).length;
  await using stack = new AsyncDisposableStack();
  const urls = [second, ...more].map((other) => {
    const held = events.map((e, i) => ({
      ...e,
      time_us: e.time_us + other.skewUs + (other.jitterUs?.(i) ?? 0),
    }))
      .filter((_, i) => other.holds?.(i) ?? true);
    const server = stack.use(serveEvents(held, {
      closeAtEnd: true,
      ...(other.v2 || other.v2Subscribe ? { version: "v2" as const } : {}),
      ...other.server,
    }));
    const relay = other.via && stack.use(other.via(server));
    const url = new URL(other.v2 ? server.v2Url : server.url);
    if (relay) url.port = String(relay.port);
    return url.href;
  });
  await using db = await tempDb();
  try {
    const reports: SyncErrorReport[] = [];
    const sync = runBackfillSync({
      instance: [first.url, ...urls],
      kv: db.path,
      startTimestamp: events[startAt].time_us,
      numRecords: 100_000,
      onError: (r) => reports.push(r),
      ...second.options,
    });
    while (!(syncConnections(first)[0]?.sent >= firstSends)) await delay(20);
    await first.shutdown();
    const stats = await sync;
    const got = await stored(db.path, stats.queueLength);
    return {
      stats,
      reports,
      stored: got.map(text),
      expected: events.slice(startAt).map(text),
      events,
      messages: (reason: string) => reports.filter((r) => r.reason === reason).map((r) => r.message),
    };
  } finally {
    await first.shutdown();
  }
}

/** A failover that must store every event once, with no coverage warning. */
async function failoverLosesNothing(second: SecondInstance) {
  const run = await failoverBehind(second);
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.equal(run.stats.failovers, 1);
  assert.deepEqual(run.stored, run.expected);
  assert.equal(run.stats.recordsStored, 3000);
  assert.deepEqual(run.messages("coverage"), []);
  return run;
}

const SEARCHED = / a new record came before any of those stored last/;

/** Orders posts `p<index>` by index. */
const byIndex = (a: string, b: string) => Number(a.slice(1)) - Number(b.slice(1));

for (
  const [name, skewUs, stepUs, v2] of [
    ["8 s behind", -8_000_000, 10_000, false],
    ["40 s behind", -40_000_000, 50_000, false],
    ["8 s ahead", 8_000_000, 10_000, false],
    ["8 s behind", -8_000_000, 10_000, true],
  ] as const
) {
  Deno.test(`a failover to a ${v2 ? "v2" : "legacy"} instance whose time_us run ${name} the first's stores every event once`, async () => {
    // Running behind by more than the rewind (5 s), the second's cursor fell after events the first
    // never sent: before, they were missing, with only a coverage warning. It now looks further back
    // until it meets a record stored before.
    const run = await failoverLosesNothing({ skewUs, stepUs, v2 });
    // Running ahead, a record stored came first at once.
    assert.equal(run.messages("connection").some((m) => SEARCHED.test(m)), skewUs < 0);
  });
}

Deno.test("a failover to an instance 30 s behind that sends nothing more before the run stops says that events may be missing", async () => {
  // The first instance goes away after 12 s of the 30 s of posts. Taken up 5 s before its last time
  // processed by its own clock, the second is past every post it holds (its copies are 30 s earlier),
  // and closes: no record came, neither stored nor new, for a search to look further back. Before,
  // the run ended with 1,800 posts missing and no word of it.
  const run = await failoverBehind({ skewUs: -30_000_000 });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.equal(run.stats.failovers, 1);
  assert.deepEqual(run.stored, run.expected.slice(0, 1200));
  const coverage = run.messages("coverage");
  assert.equal(coverage.length, 1, coverage.join("\n"));
  assert.match(
    coverage[0],
    new RegExp(
      `^the run stopped \\(closed\\) before any of the records stored last came again on 127\\.0\\.0\\.1:\\d+, taken up 5 s before ${
        isoFromUs(run.events[1199].time_us).replaceAll(".", "\\.")
      } by its time_us: it lacks them, or its time_us run more than 5 s behind the other instance's; either way, events after .* may be missing$`,
    ),
  );
});

/**
 * A sync from T0 on `servers` in turn, each but the last going away once it has sent its first sync
 * connection `sent[i]` events (a failover each time): the statistics, the reports, the coverage
 * warnings and the texts of what was stored, in order.
 */
async function failoverInTurn(servers: JetstreamServer[], sent: number[]) {
  await using db = await tempDb();
  const reports: SyncErrorReport[] = [];
  const sync = runBackfillSync({
    instance: servers.map((s) => s.url),
    kv: db.path,
    startTimestamp: T0,
    onError: (r) => reports.push(r),
  });
  for (const [i, n] of sent.entries()) {
    while (!(syncConnections(servers[i])[0]?.sent >= n)) await delay(20);
    await servers[i].shutdown();
  }
  const stats = await sync;
  return {
    stats,
    reports,
    coverage: reports.filter((r) => r.reason === "coverage").map((r) => r.message),
    stored: (await stored(db.path, stats.queueLength)).map(text),
  };
}

Deno.test("a failover near the start whose new event is left out, when the run stops before a record stored comes, says it may be missing", async () => {
  // The first instance stores p0 and goes away. The second's history begins after it (a gap: nothing
  // stored can come there), and the third's later still, so the second is taken (after a look at the
  // third). It sends identity events alone (not selected) before it goes away too: no record selected
  // there to line the third up on. The third, taken up 5 s before the second's last, sends p1, 4 s
  // after the start: new, yet perhaps one the second had before the start (their time_us differ), so
  // it is left out until a record stored comes to tell; the third closes first. Before, nothing was
  // said of it.
  const p0 = commit(T0, { text: "p0" });
  const p1 = commit(T0 + 4_000_000, { text: "p1" });
  const quiet = (from: number, n: number) =>
    Array.from({ length: n }, (_, i) => identity(from + 100_000 * i));
  await using first = serveEvents([p0, ...quiet(T0 + 100_000, 5)]);
  await using second = serveEvents(quiet(T0 + 1_000_000, 71));
  await using third = serveEvents([...quiet(T0 + 2_000_000, 20), p1], { closeAtEnd: true });
  const { stats, stored: got, coverage } = await failoverInTurn([first, second, third], [6, 71]);
  assert.equal(stats.stopReason, "closed", stats.error);
  // To the second, on to the third (its history begins later), back to the second, to the third.
  assert.equal(stats.failovers, 4);
  assert.deepEqual(got, ["p0"]);
  assert.equal(coverage.length, 3, coverage.join("\n"));
  assert.match(coverage[0], /only holds events from .* on; the point to resume from, .*, is 0\.5 s earlier/);
  assert.match(
    coverage[1],
    new RegExp(
      `^no record was selected on 127\\.0\\.0\\.1:\\d+ in the 320 s before ${
        isoFromUs(T0 + 8_000_000).replaceAll(".", "\\.")
      }, to line the time_us of 127\\.0\\.0\\.1:\\d+ up with those of 127\\.0\\.0\\.1:\\d+: if they run more than 5 s behind, selected events just after .* may be missing, and if ahead, ones just before the start may be stored$`,
    ),
  );
  assert.match(
    coverage[2],
    new RegExp(
      `^the run stopped \\(closed\\) before a record stored before came again on 127\\.0\\.0\\.1:\\d+: 1 new event before ${
        isoFromUs(T0 + 5_000_000).replaceAll(".", "\\.")
      } was left out, as the first instance may have had it before the start; it may be missing$`,
    ),
  );
});

Deno.test("a failover after a run of events not selected takes the next instance up before the last record selected, and finds one 8 s behind", async () => {
  // The first instance sends posts to 10 s, then only identity events (not selected) to 30 s, and
  // goes away; the second runs 8 s behind. Taken up 5 s before the last time processed (30 s), by
  // its clock the first's 33 s, it would miss the posts the first lacked between 30 and 33 s, with
  // no record selected within the rewind to tell: before, they were lost without a word. Now the
  // stream is taken up 5 s before the last post (10 s), a search finds it 8 s behind, and every
  // post is stored once.
  const posts = Array.from({ length: 100 }, (_, i) => commit(T0 + i * 100_000, { text: `p${i}` }));
  const later = Array.from(
    { length: 60 },
    (_, i) => commit(T0 + 30_500_000 + i * 100_000, { text: `q${i}` }),
  );
  const quiet = Array.from({ length: 200 }, (_, i) => identity(T0 + 10_000_000 + i * 100_000));
  const all = [...posts, ...quiet, ...later].sort((a, b) => a.time_us - b.time_us);
  await using first = serveEvents([...posts, ...quiet]);
  await using second = serveEvents(all.map((e) => ({ ...e, time_us: e.time_us - 8_000_000 })), {
    closeAtEnd: true,
  });
  const { stats, stored: got, coverage, reports } = await failoverInTurn([first, second], [300]);
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  assert.deepEqual(got, [...posts, ...later].map(text));
  assert.deepEqual(coverage, []);
  assert.ok(
    reports.some((r) => r.reason === "connection" && SEARCHED.test(r.message)),
    reports.map((r) => r.message).join("\n"),
  );
});

Deno.test("a failover before any record is stored says that the two instances cannot be lined up", async () => {
  // The first instance sends identity events alone (not selected) and goes away: no record to line
  // the second up on, which runs 8 s behind and so skips the posts of the first's 3 s after its last.
  // Before, they were lost without a word.
  const quiet = Array.from({ length: 20 }, (_, i) => identity(T0 + i * 100_000));
  const posts = Array.from({ length: 50 }, (_, i) => commit(T0 + 2_000_000 + i * 100_000, { text: `p${i}` }));
  await using first = serveEvents(quiet);
  await using second = serveEvents(
    [...quiet, ...posts].map((e) => ({ ...e, time_us: e.time_us - 8_000_000 })).sort((a, b) =>
      a.time_us - b.time_us
    ),
    { closeAtEnd: true },
  );
  const { stats, coverage } = await failoverInTurn([first, second], [20]);
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.deepEqual(
    coverage.map((m) => m.replace(/\d+\.\d+\.\d+\.\d+:\d+/g, "HOST")),
    [
      `no record was stored yet, before ${
        isoFromUs(T0 + 1_900_000)
      }, to line the time_us of HOST up with those of HOST: if they run more than 5 s behind, selected events just after ${
        isoFromUs(T0 + 1_900_000)
      } may be missing, and if ahead, ones just before the start may be stored`,
    ],
  );
});

for (const wire of ["subscribe", "subscribeEvents"] as const) {
  Deno.test(`a failover to a v2 host (${wire}) whose history begins within the rewind sees no gap`, async () => {
    // The first instance goes away at 11.99 s; the second is asked from 6.99 s, 5 s before, and its
    // history begins at 9 s: on subscribeEvents it says OutdatedCursor (on /subscribe it moves the
    // cursor without a word) and sends from 9 s on. That answers the cursor sent; the resume point,
    // 11.99 s, is within that history. Before, the first event, at 9 s, was compared with the resume
    // point and taken for an import's display time: a false warning that events cannot be had, and
    // with strict, a run stopped with 1,800 posts missing.
    for (const strict of [false, true]) {
      const run = await failoverLosesNothing({
        skewUs: 0,
        v2: wire === "subscribeEvents",
        v2Subscribe: wire === "subscribe",
        server: { historyStartUs: T0 + 9_000_000 },
        options: { strict },
      });
      assert.equal(
        run.messages("info").some((m) => m.startsWith("OutdatedCursor")),
        wire === "subscribeEvents",
        run.messages("info").join("\n"),
      );
      assert.equal(run.stats.coverageGapUs, 0);
    }
  });
}

Deno.test("a failover to a v2 host whose history begins with an import before the cursor sent says how many cannot be told", async () => {
  // Its history begins at post 900, whose copies there (900 to 949) are an operator's import shown a
  // day back: its first event after OutdatedCursor says nothing of where the history begins.
  const run = await failoverBehind({
    skewUs: 0,
    v2: true,
    jitterUs: (i) => i >= 900 && i < 950 ? -86_400_000_000 : 0,
    server: { lookbackFloorSeq: 1001 + 900 },
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.deepEqual(run.stored, run.expected);
  assert.deepEqual(run.messages("coverage"), [
    `127.0.0.1:${
      new URL(run.reports.find((r) => r.reason === "coverage")!.instance!).port
    } said that its history begins after the cursor sent, 5.0 s before the point to resume from, ${
      isoFromUs(T0 + 6_990_000)
    } (OutdatedCursor), though the first event it sent has an earlier display time, ${
      isoFromUs(T0 + 9_000_000 - 86_400_000_000)
    } (an import of older records): events after ${
      isoFromUs(T0 + 11_990_000)
    } cannot be had from this server, and how many cannot be told`,
  ]);
});

Deno.test("a failover to an instance 3 s ahead whose history begins after the resume point by its clock takes the gap back when a record stored comes first", async () => {
  // The second holds posts from 1000 on (the first's 10 s, its own 13 s): its oldest is 1.01 s after
  // the last time processed, 11.99 s, by the two clocks, a gap as its probe measures it. Yet the
  // first event it sends, post 1000, was stored: its history covers the resume point. Before, the gap
  // stayed in coverageGapUs and its warning stood, with every event stored.
  const run = await failoverBehind({ skewUs: 3_000_000, holds: (i) => i >= 1000 });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.deepEqual(run.stored, run.expected);
  assert.equal(run.stats.coverageGapUs, 0);
  const [gap, withdrawn, ...rest] = run.messages("coverage");
  assert.deepEqual(rest, []);
  assert.match(gap, /only holds events from .* on; the point to resume from, .*, is 1\.0 s earlier/);
  assert.match(
    withdrawn,
    new RegExp(
      `^on 127\\.0\\.0\\.1:\\d+, a record stored before came again before any new one: its history covers ${
        isoFromUs(T0 + 11_990_000).replaceAll(".", "\\.")
      } after all \\(its time_us run ahead of the other instance's\\), so the 1\\.0 s said to be missing there is not; coverageGapUs no longer counts it$`,
    ),
  );
});

Deno.test("a failover to an instance whose history begins after the resume point, and that sends new records first, keeps the gap", async () => {
  // The same by the second's clock, 3 s ahead, but it holds posts from 1300 on: nothing stored comes.
  const run = await failoverBehind({ skewUs: 3_000_000, holds: (i) => i >= 1300 });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.deepEqual(run.stored, [...run.expected.slice(0, 1200), ...run.expected.slice(1300)]);
  assert.equal(run.stats.coverageGapUs, 4_010_000);
  assert.equal(run.messages("coverage").length, 1);
});

Deno.test("a failover 24 s into the run to an instance 40 s behind stores every event once: the start is no bound on its clock", async () => {
  // Its copies of the records stored are 40 s before the first's times of them: the search meets
  // the last one 40 s back, 16 s before the start by its clock. Before, the search stopped at 20 s
  // back (past the start less the rewind, by the first instance's clock), and the start left out
  // the records stored and those that follow them by this instance's clock: the stream was taken up
  // 5 s back again, and 40 s of events were missing.
  const run = await failoverLosesNothing({ skewUs: -40_000_000, stepUs: 20_000 });
  assert.equal(run.messages("connection").filter((m) => SEARCHED.test(m)).length, 3);
});

Deno.test("a failover to an instance 8 s behind that drops every connection after 100 events goes on from it: its replay of what was stored is progress there", async () => {
  // Before, the replay from 10 s back, all before the time processed last, did not count as
  // progress: two drops failed over to the dead first instance and back, until the run gave up.
  await failoverLosesNothing({
    skewUs: -8_000_000,
    server: { faults: { dropEvery: 100 } },
    options: { maxRetries: 2 },
  });
});

Deno.test("a search step is no failed attempt: one refused connection after it does not end a maxRetries 2 run", async () => {
  const gone = await refusedPort();
  // The second instance's first connection is its coverage probe, the second the stream taken up
  // 5 s back; the third (10 s back) is refused once.
  await failoverLosesNothing({
    skewUs: -8_000_000,
    via: (server) => tcpRelay((n) => n === 3 ? gone : server.port),
    options: { maxRetries: 2 },
  });
});

for (const strict of [false, true]) {
  Deno.test(`a search further back than a v2 host's history is no coverage gap${strict ? " (strict)" : ""}`, async () => {
    // 8 s behind, its history begins 9 s (its time) before the last time processed: it answers the
    // search's 10 s cursor with OutdatedCursor and sends from there, the last second of what was
    // stored and all that follows. Before, that was measured from the time processed last, and its
    // first event, earlier, taken for an import of older records (a strict run stopped).
    await failoverLosesNothing({
      skewUs: -8_000_000,
      v2: true,
      server: { historyStartUs: T0 + 11_990_000 - 9_000_000 },
      options: { strict },
    });
  });
}

Deno.test("a search that meets the beginning of a v2 host's history looks no further back", async () => {
  // 8 s behind, its history begins at the first instance's 10.99 s, and it lacks events 1099 to 1199,
  // the last stored: taken up 10 s back, it says OutdatedCursor and sends event 1200 first, new.
  // Further back is the same history: the search gives up there, rather than at 320 s.
  const run = await failoverBehind({
    skewUs: -8_000_000,
    v2: true,
    holds: (i) => i < 1099 || i >= 1200,
    server: { historyStartUs: T0 + 10_990_000 - 8_000_000 },
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  const searches = run.messages("connection").filter((m) => SEARCHED.test(m));
  assert.equal(searches.length, 2, JSON.stringify(searches));
  assert.match(searches[1], /no further search can tell/);
  assert.ok(
    run.messages("coverage").some((m) => /\(the stream was taken up too late, even 10 s before\)/.test(m)),
    JSON.stringify(run.reports),
  );
});

Deno.test("a v2 instance 8 s behind that lacks the last records stored is warned of, though it drops every connection", async () => {
  // It lacks events 1180 to 1519, the last stored (1199) among them. Each of its reconnects (by seq)
  // goes on where it was; before, one ended the wait for the last record stored, without a warning.
  const run = await failoverBehind({
    skewUs: -8_000_000,
    v2: true,
    holds: (i) => i < 1180 || i >= 1520,
    server: { faults: { dropEvery: 100 } },
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.ok(
    run.messages("coverage").some((m) =>
      /: it lacks it, and events between the two times may be missing$/.test(m)
    ),
    JSON.stringify(run.reports),
  );
});

for (const v2 of [false, true]) {
  Deno.test(`a failover away and back to a ${v2 ? "v2" : "legacy"} instance that lacks the last record stored, after a search lined the streams up there, still warns of it`, async () => {
    // As above (it lacks events 1180 to 1519), and its connection after the one a search lined up
    // is refused: two failed attempts fail over to the first instance, gone, and two more back.
    // Before, the first instance was taken up from the second's time, and the second then from
    // its own: a record stored came first, which ended the wait without the warning (on the legacy
    // wire, each failover's floor went 5 s further back, until the run gave up).
    const gone = await refusedPort();
    const run = await failoverBehind({
      skewUs: -8_000_000,
      v2,
      holds: (i) => i < 1180 || i >= 1520,
      server: { faults: { dropEvery: 100 } },
      // Its connections: the coverage probe, the stream 5 s back (a new record first), 10 s back
      // (lined up, dropped after 100 events), then the refused one.
      via: (server) => tcpRelay((n) => n === 4 ? gone : server.port),
    });
    assert.equal(run.stats.stopReason, "closed", run.stats.error);
    assert.equal(run.stats.failovers, 3);
    assert.ok(
      run.messages("coverage").some((m) =>
        /: it lacks it, and events between the two times may be missing$/.test(m)
      ),
      JSON.stringify(run.reports),
    );
    // Back on the v2 host, by its seq: no time is rewound from (the report said one before).
    assert.equal(
      run.messages("connection").some((m) =>
        /^failing over .*; back on the host that delivered last, the stream is taken up by its seq, where it was$/
          .test(m)
      ),
      v2,
    );
    // What it lacks and the first had not sent yet is all that is missing, and nothing twice.
    assert.deepEqual(run.stored, run.expected.filter((_, i) => i < 1200 || i >= 1520));
  });
}

Deno.test("a wait carried on to a third instance is not ended by a record the second stored while it waited", async () => {
  // The second runs 8 s behind and lacks events 1180 to 1519; a search lines it up 10 s back, and
  // it stores from 1520 on, until it cannot be reached (once it was asked from 1950 on). The third
  // runs 12 s behind and holds every event: taken up 5 s before the first's last time processed,
  // it sends 1899 first, stored by the second. Before, that ended the wait as a record stored before
  // the switch, and the 320 events the third holds and the second lacks were lost without a word.
  const gone = await refusedPort();
  const queried = (server: JetstreamServer) =>
    syncConnections(server).map((c) => Number(/cursor=(\d+)/.exec(c.query)?.[1] ?? -1));
  const run = await failoverBehind(
    {
      skewUs: -8_000_000,
      holds: (i) => i < 1180 || i >= 1520,
      server: { faults: { dropEvery: 100 } },
      via: (server) =>
        tcpRelay(() =>
          queried(server).some((us) => us >= T0 + 1950 * 10_000 - 8_000_000) ? gone : server.port
        ),
    },
    { skewUs: -12_000_000 },
  );
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.equal(run.stats.failovers, 2);
  // Every event once; those the second lacked come after those it stored past them.
  assert.deepEqual(run.stored.toSorted(byIndex), run.expected);
  assert.equal(run.stored.length, 3000);
  assert.deepEqual(run.messages("coverage"), []);
});

Deno.test("a search far back on an instance 38 s behind stores what the first lacked, though by its clock that is before the start", async () => {
  // Posts 20 ms apart; the first lacks 1099 to 1149 and goes away 24 s in. Taken up 40 s back, the
  // second sends 1099 first, 16 s before the start by its clock, then 1150, stored. Before, new
  // records before the start plus the rewind were left out as ones the first may have had before
  // the start, by the first's clock: the 51 it lacked were lost without a word. Now a search that
  // left records out before the first one stored that came looks further back, and lines up once
  // the same one comes first.
  const run = await failoverBehind({
    skewUs: -38_000_000,
    stepUs: 20_000,
    firstHolds: (i) => i < 1200 && (i < 1099 || i > 1149),
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.deepEqual(run.stored.toSorted(byIndex), run.expected);
  assert.equal(run.stored.length, 3000);
  assert.deepEqual(run.messages("coverage"), []);
});

/** A relay to a server that refuses `n` connections once `after` holds for its connections. */
function refusingOnce(gone: number, after: (connections: ConnectionRecord[]) => boolean, n = 2) {
  let refused = 0;
  return (server: JetstreamServer) =>
    tcpRelay(() => {
      if (refused === n || !after(syncConnections(server))) return server.port;
      refused++;
      return gone;
    });
}

Deno.test("an event that follows the record a search lined up on, with a time_us a little before it, is stored", async () => {
  // Synced from post 1000 (posts 20 ms apart); the first lacks 1001 and goes away 3 s after the
  // start. The second runs 30 s behind, and sends 1001 right after 1000 with a time_us 25 ms
  // before it (a reorder). The search lines up on 1000 after the posts before the start: before,
  // the start moved to 1000's time_us at once, and 1001 was left out without a word.
  for (const v2 of [false, true]) {
    const run = await failoverBehind({
      skewUs: -30_000_000,
      stepUs: 20_000,
      startAt: 1000,
      firstHolds: (i) => i < 1150 && i !== 1001,
      jitterUs: (i) => i === 1001 ? -25_000 : 0,
      v2,
      server: v2 ? {} : { faults: { fileOrder: true } },
    });
    assert.equal(run.stats.stopReason, "closed", run.stats.error);
    assert.deepEqual(run.stored.toSorted(byIndex), run.expected, v2 ? "v2" : "legacy");
    assert.deepEqual(run.messages("coverage"), []);
  }
});

Deno.test("a search step interrupted by a failover away and back starts over: the record that came first before says nothing at the same rewind", async () => {
  // Synced from post 1000; the first lacks 1025 to 1099 and goes away 6 s after the start. Taken up
  // 5 s back, the second leaves 1049 to 1099 out and meets 1100, stored; the search's next
  // connection is refused twice, the run fails over to the first, gone, and back. Before, 1100
  // coming first again, 5 s back again, lined the search up there, and 1049 to 1099 were lost.
  const gone = await refusedPort();
  const lastUs = T0 + 1299 * 20_000;
  const run = await failoverBehind({
    skewUs: 0,
    stepUs: 20_000,
    startAt: 1000,
    firstHolds: (i) => i < 1300 && !(i >= 1025 && i < 1100),
    via: refusingOnce(gone, (cs) => cs.some((c) => (c.params.cursor ?? Infinity) <= lastUs - 5_000_000)),
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.equal(run.stats.failovers, 3, JSON.stringify(run.reports));
  assert.deepEqual(run.stored.toSorted(byIndex), run.expected);
  assert.deepEqual(run.messages("coverage"), []);
});

Deno.test("failed over away and back to an instance 30 s behind after a search lined it up, the run keeps to the start by its clock", async () => {
  // Synced from post 1000 (20 s in); the first goes away after 1299. A search lines the second,
  // 30 s behind, up 80 s back, and the wait for 1299 settles; it drops after 2,000 events (at post
  // 1999, 10 s after the start by its clock), then refuses two connections: the run fails over to the
  // first, gone, and back. Before, it was then held to the start less the rewind by the first's
  // clock, and posts 2000 to 2249, before that by the second's, were lost without a word.
  const gone = await refusedPort();
  const lastUs = T0 + 1299 * 20_000;
  const run = await failoverBehind({
    skewUs: -30_000_000,
    stepUs: 20_000,
    startAt: 1000,
    firstHolds: (i) => i < 1300,
    server: { faults: { dropEvery: 2000 } },
    // (Once the connection taken up 80 s back is made: the next one is refused.)
    via: refusingOnce(gone, (cs) => cs.some((c) => (c.params.cursor ?? Infinity) <= lastUs - 80_000_000)),
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.equal(run.stats.failovers, 3, JSON.stringify(run.reports));
  assert.deepEqual(run.stored, run.expected);
  assert.deepEqual(run.messages("coverage"), []);
});

Deno.test("a failover near the start to an instance more than the rewind ahead, whose search gives up, warns of what it stored before a record stored came", async () => {
  // Synced from post 1000 (20 s in); the first goes away after 1299, 6 s after the start. The second
  // runs 8 s ahead: its posts before the start are new records past the start plus the rewind by its
  // clock, and no search back shows a record stored first. Given up, the search stores them (they
  // cannot be told from ones the first lacked): before, without a word.
  const run = await failoverBehind({
    skewUs: 8_000_000,
    stepUs: 20_000,
    startAt: 1000,
    firstHolds: (i) => i < 1300,
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  const early = run.stored.filter((p) => Number(p.slice(1)) < 1000).length;
  assert.ok(early > 0, "the case this warning is for");
  assert.ok(
    run.messages("coverage").some((m) =>
      new RegExp(
        ` ${early} new records were stored before a record stored before came again \\(a search 320 s back had given up\\): `,
      )
        .test(m)
    ),
    JSON.stringify(run.reports),
  );
});

Deno.test("a resume on an instance 30 s behind, where a search lined the run up, stores what its clock puts before the start", async () => {
  // The first instance has posts 0 to 1199 (20 ms apart) and goes away; the second runs 30 s behind,
  // and a search lines it up. The run stops at 1,301 records: by the second's clock, post 1300 is
  // 4 s before the start. Before, the resume held that instance to the start by the first's clock,
  // and the 199 posts after 1300 that it puts before the start were lost without a word.
  const events = spaced(3000, 20_000);
  const first = serveEvents(events.slice(0, 1200));
  await using behind = serveEvents(events.map((e) => ({ ...e, time_us: e.time_us - 30_000_000 })), {
    closeAtEnd: true,
  });
  await using db = await tempDb();
  const base = { instance: [first.url, behind.url], kv: db.path, startTimestamp: T0 };
  try {
    const sync = runBackfillSync({ ...base, numRecords: 1301 });
    while (!(syncConnections(first)[0]?.sent >= 1200)) await delay(20);
    await first.shutdown();
    const one = await sync;
    assert.equal(one.stopReason, "limit", one.error);
    const reports: SyncErrorReport[] = [];
    const two = await runBackfillSync({
      ...base,
      numRecords: 100_000,
      resume: true,
      force: true,
      onError: (r) => reports.push(r),
    });
    assert.equal(two.stopReason, "closed", two.error);
    assert.equal(two.recordsStored, 1699, JSON.stringify(reports));
    assert.deepEqual((await stored(db.path, two.queueLength)).map(text), events.map(text));
  } finally {
    await first.shutdown();
  }
});

for (const resumeOn of ["another host", "the same host"]) {
  Deno.test(`an import right after a failover between v2 hosts, then a resume on ${resumeOn}, stores every event once`, async () => {
    // 16,000 posts 2 ms apart; the first host goes away after 14,000, and the second's next five
    // are an operator's import, display times two years back: the run stops on them. Resumed by
    // time on a third host, it takes the stream up at the highest time_us processed, not at the
    // imports' (a change of this session made the resume point the second host's highest time_us
    // of records stored, the imports': the third sent 400 posts stored already again); on the
    // second host, by its seq.
    const importedUs = 1714000000002255;
    const events = spaced(16_000, 2_000);
    const imported = (e: JetstreamEvent, i: number) =>
      i >= 14_000 && i < 14_005 ? { ...e, time_us: importedUs - (14_005 - i) } : e;
    const first = serveEvents(events.slice(0, 14_000), { version: "v2" });
    await using second = serveEvents(events.map(imported), {
      version: "v2",
      seqBase: 1000,
      closeAtEnd: true,
    });
    await using third = serveEvents(events.map(imported), {
      version: "v2",
      seqBase: 70_000,
      closeAtEnd: true,
    });
    await using db = await tempDb();
    try {
      const sync = runBackfillSync({
        instance: [first.v2Url, second.v2Url],
        kv: db.path,
        numRecords: 14_005,
      });
      while (!(syncConnections(first)[0]?.sent >= 14_000)) await delay(20);
      await first.shutdown();
      const one = await sync;
      assert.equal(one.stopReason, "limit", one.error);
      const reports: SyncErrorReport[] = [];
      const two = await runBackfillSync({
        instance: [resumeOn === "another host" ? third.v2Url : second.v2Url],
        kv: db.path,
        resume: true,
        force: true,
        numRecords: 100_000,
        onError: (r) => reports.push(r),
      });
      assert.equal(two.stopReason, "closed", two.error);
      assert.deepEqual((await stored(db.path, two.queueLength)).map(text), events.map(text));
      assert.deepEqual(reports.filter((r) => r.reason === "coverage"), []);
    } finally {
      await first.shutdown();
    }
  });
}

Deno.test("a failover 6 s into the run stores what the first lacked in the rewind before a record stored came", async () => {
  // Posts 5 ms apart; the first lacks 150 to 300 and goes away 6 s in. Taken up 5 s back, the
  // second, with the same clock, sends 199 to 300 first, before the start plus the rewind, then 301,
  // stored. Before, the first record stored lined the streams up within the first rewind, and what
  // came before it was lost without a word, as events the first may have had before the start.
  const run = await failoverBehind({
    skewUs: 0,
    stepUs: 5_000,
    firstHolds: (i) => i < 1200 && (i < 150 || i > 300),
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.deepEqual(run.stored.toSorted(byIndex), run.expected);
  assert.equal(run.stored.length, 3000);
  assert.deepEqual(run.messages("coverage"), []);
});

Deno.test("a search far back on an instance that holds events from before the start stores none of them, and all the first lacked", async () => {
  // Synced from post 100 (2 s in); the first lacks 150 to 1100. The second's clock is the first's:
  // the search goes 40 s back for a record stored, and meets the 100 posts before the start first.
  // They are left out, and looked past once more (80 s back) they still come before the first one
  // stored: they are before the start. Looking for more each time would have gone on to 320 s and
  // given up, with what the first lacked missing.
  const run = await failoverBehind({
    skewUs: 0,
    stepUs: 20_000,
    startAt: 100,
    firstHolds: (i) => i < 150 || (i > 1100 && i < 1200),
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.deepEqual(run.stored.toSorted(byIndex), run.expected);
  assert.equal(run.stored.length, 2900);
  assert.deepEqual(run.messages("coverage"), []);
});

Deno.test("failed over away from a legacy instance where a search lined up and back, the run stores nothing from before the start", async () => {
  // Posts 10 ms apart, synced from post 1000 (10 s in); the first holds them up to 2499. The
  // second's clock is the first's; it lacks 1300 to 2549, and drops every connection after 1,200
  // events. A search lines it up on post 1000, after the 1,000 before the start; dropped, two
  // connections refused, the run fails over to the first instance, gone, and back. Before, it came
  // back lined up while it was taken up by time, before post 1000: the posts before the start that
  // came were stored. Lined up, a reconnect's rewind brought more of them after a drop.
  const gone = await refusedPort();
  let refused = 0;
  const run = await failoverBehind({
    skewUs: 0,
    startAt: 1000,
    firstHolds: (i) => i < 2500,
    holds: (i) => i < 1300 || i >= 2550,
    server: { faults: { dropEvery: 1200 } },
    via: (server) =>
      tcpRelay(() => {
        if (refused === 2 || !syncConnections(server).some((c) => c.dropped)) return server.port;
        refused++;
        return gone;
      }),
  });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.equal(run.stats.failovers, 3, JSON.stringify(run.reports));
  // Missing: what the second lacks and the first had not sent.
  assert.deepEqual(run.stored, run.expected.filter((_, i) => i < 1500 || i >= 1550));
  assert.ok(
    run.messages("coverage").some((m) =>
      /: it lacks it, and events between the two times may be missing$/.test(m)
    ),
    JSON.stringify(run.reports),
  );
});

/**
 * 4,000 posts `apartUs` apart (1 ms), synced from the 1,000th on. The first instance has them up to
 * the 2,700th and goes away once it has sent them; the next instances hold what `others` gives for
 * each (null: a port where nothing listens).
 */
async function failingOver(
  others: (events: JetstreamEvent[]) => (JetstreamEvent[] | null)[],
  extra: BackfillSyncOptions = {},
  apartUs = 1000,
) {
  const events = Array.from(
    { length: 4000 },
    (_, i) => commit(T0 + i * apartUs, { did: did(i % 13), text: `p${i}` }),
  );
  const first = serveEvents(events.slice(0, 2700));
  const servers = others(events).map((held) => held && serveEvents(held, { closeAtEnd: true }));
  const deadPort = await refusedPort();
  const deadUrl = `ws://127.0.0.1:${deadPort}/subscribe`;
  await using db = await tempDb();
  try {
    const reports: SyncErrorReport[] = [];
    const sync = runBackfillSync({
      instance: [first.url, ...servers.map((s) => s?.url ?? deadUrl)],
      kv: db.path,
      startTimestamp: T0 + 1000 * apartUs,
      onError: (r) => reports.push(r),
      ...extra,
    });
    while (!(syncConnections(first)[0]?.sent >= 1700)) await delay(20);
    await first.shutdown();
    const stats = await sync;
    return { events, stats, reports, got: await stored(db.path, stats.queueLength) };
  } finally {
    for (const s of servers) await s?.shutdown();
  }
}

/**
 * {@link failingOver} to an instance that has all the events, each `shiftUs` later (time_us differ
 * between instances). Resolves to the reports.
 */
async function failoverNearStart(shiftUs: number) {
  const shift = (e: JetstreamEvent) => ({ ...e, time_us: e.time_us + shiftUs });
  const { events, stats, reports, got } = await failingOver((ev) => [ev.map(shift)]);
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  // By content, each event from the start on once: the first 1,700 as the first instance sent them,
  // the rest as the other did.
  assert.deepEqual(got, [...events.slice(1000, 2700), ...events.slice(2700).map(shift)]);
  assert.equal(stats.recordsStored, 3000);
  return reports;
}

Deno.test("a failover to an instance that lacks the last records stored, and events after them, warns", async () => {
  // 10 ms apart: 40 s of events. The next instance lacks the last 0.1 s the first sent and 1 s after.
  // (Before, the records stored before it that came again ended the wait, and the loss went without
  // a word.)
  const { events, stats, reports, got } = await failingOver(
    (ev) => [[...ev.slice(0, 2690), ...ev.slice(2800)]],
    {},
    10_000,
  );
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  assert.deepEqual(got, [...events.slice(1000, 2700), ...events.slice(2800)]);
  const coverage = reports.filter((r) => r.reason === "coverage").map((r) => r.message);
  assert.equal(coverage.length, 1, coverage.join("\n"));
  assert.match(
    coverage[0],
    new RegExp(
      `^on 127\\.0\\.0\\.1:\\d+, records stored before came again, taken up 5 s before ${
        isoFromUs(events[2699].time_us).replaceAll(".", "\\.")
      }, but not the last one stored before a new record at .*: it lacks it, and events between the two times may be missing$`,
    ),
  );
});

Deno.test("a failover passes over an instance whose history begins after the point needed, to one that holds it", async () => {
  // 10 ms apart: the next instance's history begins at 35 s, 8 s after the first's last event; the
  // third holds it all. (Before: the second's gap was warned of and taken, and 8 s of events lost.)
  const { events, stats, reports, got } = await failingOver((ev) => [ev.slice(3500), ev], {}, 10_000);
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.coverageGapUs, 0);
  assert.deepEqual(reports.filter((r) => r.reason === "coverage"), []);
  assert.ok(
    reports.some((r) =>
      r.reason === "connection" &&
      new RegExp(
        `^127\\.0\\.0\\.1:\\d+ only holds events from ${
          isoFromUs(events[3500].time_us).replaceAll(".", "\\.")
        } on, after the point to go on from, .*: trying 127\\.0\\.0\\.1:\\d+, which may hold it$`,
      ).test(r.message)
    ),
    JSON.stringify(reports),
  );
  assert.deepEqual(got, events.slice(1000));
});

Deno.test("a failover near the start to an instance whose time_us run behind loses nothing", async () => {
  // Before, the other's events under the start (2.37 s of them) were left out as before the start,
  // though the first instance had them after it.
  const reports = await failoverNearStart(-2_370_000);
  assert.ok(
    reports.some((r) =>
      r.reason === "connection" &&
      /^failing over from 127\.0\.0\.1:\d+ to 127\.0\.0\.1:\d+; time_us differ/.test(r.message)
    ),
    JSON.stringify(reports),
  );
});

Deno.test("a failover near the start to an instance whose time_us run ahead stores nothing the first had before the start", async () => {
  // Before, the other's events 100 to 999, which it puts after the start, were stored.
  await failoverNearStart(900_000);
});

Deno.test("runBackfillSync() does not count quiet idle reconnects as failures", async () => {
  // A cursor in the future: the server accepts and stays silent, like a narrow live filter.
  await using server = serveEvents(capture(10), { now: () => T0 });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0 + 3_600_000_000,
    idleTimeout: 0.1,
    maxRetries: 1,
    maxTime: 1.5,
  });
  assert.equal(stats.stopReason, "max_time");
  assert.ok(stats.reconnects >= 2, `reconnects: ${stats.reconnects}`);
});

Deno.test("a host name that does not resolve is said to be no such host at the first try, retried all the same, and failed over from", async () => {
  // (.invalid never resolves, RFC 2606.) What this machine's resolver says of such a name: one that
  // cannot ask at all ("Temporary failure in name resolution") gets no hint.
  const answer = await Deno.connect({ hostname: "nor-this.invalid", port: 6008 }).then(
    (c) => (c.close(), "connected"),
    (e: Error) => e.message,
  );
  const noSuchHost = /Name or service not known|nodename nor servname/.test(answer);
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: "ws://nor-this.invalid:6008/subscribe",
    kv: db.path,
    maxTime: 1.5,
  });
  // Retried (a machine without its network, a service not up yet), not refused.
  assert.equal(stats.stopReason, "error", stats.error);
  const tries = reports.filter((r) => r.reason === "connection");
  assert.ok(tries.length >= 2, JSON.stringify(reports));
  assert.equal(
    /\(no such host: check --instance \/ instance, or this machine's network\) \(attempt 1 of /.test(
      tries[0].message,
    ),
    noSuchHost,
    `${answer}: ${tries[0].message}`,
  );
  // Through a proxy whose name does not resolve, the proxy is the one to check.
  const viaProxy = await runCli(
    [
      "sync",
      "--instance",
      "ws://jetstream.example/subscribe",
      "--kv",
      `${db.path}.proxy.sqlite`,
      "--max-time",
      "1",
    ],
    [],
    { HTTP_PROXY: "http://no-such-proxy.invalid:3128" },
  );
  assert.equal(
    /through the proxy .*\(no such host: check the proxy, HTTPS_PROXY \/ HTTP_PROXY, or this machine's network\)/
      .test(viaProxy.stderr),
    noSuchHost,
    viaProxy.stderr,
  );
  const events = capture(300);
  await using good = serveEvents(events, { closeAtEnd: true });
  await using db2 = await tempDb();
  const run = await syncReporting({ instance: ["no-such-host.invalid", good.url], kv: db2.path });
  assert.equal(run.stats.stopReason, "closed", run.stats.error);
  assert.equal(run.stats.failovers, 1);
  assert.deepEqual(await stored(db2.path, run.stats.queueLength), posts(events));
});

Deno.test("runBackfillSync() fails over from an instance that accepts and then sends nothing at all", async () => {
  // Every connection to the first instance stays open and silent (jetstream-legacy#48). Before, its
  // idle reconnects were never failures: the run ended by maxTime with nothing stored. A live tail:
  // the events come after it began (a minute ahead, so that the next instance, asked from when the
  // first silent connection opened, replays them all).
  const ahead = Date.now() * 1000 + 60_000_000 - T0;
  const events = capture(600).map((e) => ({ ...e, time_us: e.time_us + ahead }));
  await using silent = serveEvents(events, { faults: { stallAfter: 0, stallConnections: 1000 } });
  await using good = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: [silent.url, good.url],
    kv: db.path,
    idleTimeout: 0.3,
    maxTime: 10,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  // Two stream connections, then the probe of its live stream (for everything: no query at all).
  const [first, second, live] = syncConnections(silent);
  assert.equal(syncConnections(silent).length, 3);
  assert.equal(live.query, "");
  assert.equal(first.params.cursor, undefined);
  // Both ask from when the first silent connection opened: the server left may have been stalled.
  const cursor = (c: { query: string }) => /cursor=(\d+)/.exec(c.query)?.[1];
  // (The other's live stream was probed first, which went on.)
  const [probe, taken] = syncConnections(good);
  assert.equal(probe.query, "");
  assert.equal(cursor(taken), cursor(second));
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
  assert.ok(
    reports.some((r) => r.reason === "connection" && r.message.startsWith("failing over from")),
    JSON.stringify(reports),
  );
});

Deno.test("runBackfillSync() with a quiet filter does not fail over once its instance has sent an event", async () => {
  // Both instances hold the events and then stay open with nothing new: each idle reconnect brings
  // back the event at its inclusive cursor, so the instance is alive however quiet the filter.
  const events = capture(100);
  await using first = serveEvents(events);
  await using second = serveEvents(events);
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: [first.url, second.url],
    kv: db.path,
    startTimestamp: T0,
    idleTimeout: 0.2,
    maxTime: 2,
  });
  assert.equal(stats.stopReason, "max_time", stats.error);
  assert.ok(stats.reconnects >= 2, `reconnects: ${stats.reconnects}`);
  assert.equal(stats.failovers, 0);
  assert.equal(syncConnections(second).length, 0);
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
});

Deno.test("runBackfillSync() leaves an instance that replays what it holds and has nothing new, for one whose live stream goes on", async () => {
  // The first instance's own source stopped after the 80th event: each reconnect brings back the event
  // at its cursor, and its live stream (no cursor) sends nothing. Before, that was taken for a quiet
  // filter, and the run stayed there until maxTime without the last 20 events.
  const events = capture(100);
  await using stale = handServer(events.slice(0, 80));
  await using good = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: [stale.instance, good.url],
    kv: db.path,
    startTimestamp: T0,
    idleTimeout: 0.2,
    maxTime: 10,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
  // Its live stream was asked (no cursor) after two quiet reconnects.
  assert.deepEqual(stale.cursors.slice(0, 3).map((c) => c !== null), [true, true, true]);
  assert.equal(stale.cursors[3], null);
  assert.ok(
    reports.some((r) =>
      r.reason === "connection" &&
      /^127\.0\.0\.1:\d+ sends nothing new: its live stream, asked for every event, sent none in 0\.2 s, while that of 127\.0\.0\.1:\d+ did/
        .test(r.message)
    ),
    JSON.stringify(reports),
  );
});

Deno.test("runBackfillSync() stays on its instance when no instance's live stream sends anything, and the probes' time asks for no coverage probe", async () => {
  // Both instances replay what they hold and have nothing new (or no live traffic at all).
  const events = capture(100);
  await using first = handServer(events);
  await using second = handServer(events);
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: [first.instance, second.instance],
    kv: db.path,
    startTimestamp: T0,
    // (Longer than a reconnect's backoff, 250 ms at most, by a margin for a loaded machine.)
    idleTimeout: 0.5,
    maxTime: 5,
  });
  assert.equal(stats.stopReason, "max_time", stats.error);
  assert.equal(stats.failovers, 0);
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
  // Both live streams were asked (no cursor), at least once.
  assert.ok(first.cursors.includes(null) && second.cursors.includes(null), JSON.stringify(first.cursors));
  // Only the run's first connection had a coverage probe: the live probes' seconds were no outage.
  // (Before, each round of them, longer than idleTimeout, made the next connection probe again.)
  assert.equal(first.probes, 1);
  assert.equal(second.probes, 0);
});

Deno.test("runBackfillSync() with a filter that has brought nothing yet stays on its instance, whose live stream goes on, and never gives up", async () => {
  // Nothing matches the DID: every connection is silent. They are no failures, so maxRetries does
  // not end the run; and as the instance's live stream sends events, they do not move the run to
  // the other instance. (Before, two of them in a row did, back and forth.)
  const events = capture(100);
  await using first = serveEvents(events);
  await using second = serveEvents(events);
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: [first.url, second.url],
    kv: db.path,
    wantedDids: [did(99)],
    idleTimeout: 0.15,
    maxRetries: 1,
    // (Each silent connection doubles the next one's wait: 0.15, 0.3, then 0.6, 1.2 s there.)
    maxTime: 5,
  });
  assert.equal(stats.stopReason, "max_time", stats.error);
  assert.equal(stats.error, undefined);
  assert.ok(stats.reconnects >= 3, `reconnects: ${stats.reconnects}`);
  assert.equal(stats.failovers, 0);
  assert.equal(second.connections.length, 0);
  // Its live stream was asked (for everything: no query at all).
  assert.ok(first.connections.some((c) => c.query === ""));
  assert.equal(stats.recordsStored, 0);
});

for (const skewMs of [0, -3000, 3000]) {
  Deno.test(`a live tail's reconnect before any event asks from when the last connection opened, so that an event that came in between is kept (server clock ${skewMs} ms off)`, async () => {
    // A legacy server's cursor semantics, by hand, with time_us from its own clock: no cursor, or
    // one in its future, gets only what comes later (nothing here); another cursor replays what
    // came from it on. The event comes while the client is away, after its third connection idled
    // out. (Before, the reconnect asked for no cursor: the event was lost; and with the server's
    // clock 3 s behind, a cursor by this machine's clock alone was in the server's future, and the
    // event was taken for one from before the tail began.)
    const serverNow = () => Date.now() * 1000 + skewMs * 1000;
    const queries: (string | null)[] = [];
    // When each connection came, by this machine's clock.
    const came: number[] = [];
    let arrived: JetstreamEvent | undefined;
    let closes = 0;
    await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
      const cursor = new URL(req.url).searchParams.get("cursor");
      queries.push(cursor);
      came.push(Date.now() * 1000);
      const { socket, response } = Deno.upgradeWebSocket(req);
      socket.onopen = () => {
        const replay = cursor !== null && Number(cursor) <= serverNow();
        if (replay && arrived && arrived.time_us >= Number(cursor)) socket.send(JSON.stringify(arrived));
      };
      socket.onclose = () => {
        if (++closes === 3) arrived = commit(serverNow(), { did: did(3) });
      };
      return response;
    });
    await using db = await tempDb();
    const stats = await runBackfillSync({
      instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
      kv: db.path,
      idleTimeout: 0.2,
      numRecords: 1,
      maxTime: 5,
    });
    assert.equal(stats.stopReason, "limit", stats.error);
    assert.equal(queries.length, 4);
    assert.equal(queries[0], null);
    // Each asks from when the one before opened, less 5 s for the clocks: a quiet server replays
    // one connection's time (and those 5 s) at most.
    const cursors = queries.slice(1).map(Number);
    cursors.forEach((cursor, i) => {
      const before = came[i] - 5_000_000;
      assert.ok(
        cursor <= before && cursor > before - 1_000_000,
        `${i}: ${JSON.stringify({ queries, came })}`,
      );
    });
    assert.ok(cursors[2] <= arrived!.time_us, JSON.stringify(queries));
    assert.deepEqual(await stored(db.path, stats.queueLength), [arrived]);
  });
}

Deno.test("a narrow filter whose server scans longer than idleTimeout for the next event gets it: each idle end without one doubles the wait", async () => {
  // A legacy server's replay for a narrow filter, by hand: from the cursor it sends the event there
  // at once (inclusive), then scans 1.2 s of history (every row counts, protocol doc §5.2) before the
  // next one it selects. (Before, every connection was ended after 0.4 s, the scan started over from
  // the same cursor each time, and the second event never came.)
  const first = commit(T0, { did: did(3) });
  const next = commit(T0 + 3_600_000_000, { did: did(3) });
  const cursors: number[] = [];
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const cursor = Number(new URL(req.url).searchParams.get("cursor"));
    // (cursor=0: the coverage probe, asking for the oldest event.)
    if (cursor !== 0) cursors.push(cursor);
    const { socket, response } = Deno.upgradeWebSocket(req);
    let timer: ReturnType<typeof setTimeout> | undefined;
    socket.onopen = () => {
      if (cursor <= first.time_us) socket.send(JSON.stringify(first));
      timer = setTimeout(() => socket.send(JSON.stringify(next)), 1200);
    };
    socket.onclose = () => clearTimeout(timer);
    return response;
  });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
    kv: db.path,
    startTimestamp: T0,
    idleTimeout: 0.4,
    numRecords: 2,
    maxTime: 8,
  });
  assert.equal(stats.stopReason, "limit", stats.error);
  assert.deepEqual(await stored(db.path, stats.queueLength), [first, next]);
  // The first brought an event; after it, 0.4, 0.8, then 1.6 s: the fourth waits long enough.
  assert.deepEqual(
    reports.filter((r) => r.reason === "retry").map((r) => r.message),
    [
      "no message for 0.4 s; reconnecting",
      "no message for 0.4 s; reconnecting",
      "no message for 0.8 s; reconnecting",
    ],
  );
  assert.deepEqual(cursors, [T0, T0, T0, T0]);
  // Once the next event came, the fourth waits 0.4 s again, at once: a stall after it is caught as
  // soon as ever. (Before, it was caught after the doubled 1.6 s.)
  await using db2 = await tempDb();
  const more = await syncReporting({
    instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
    kv: db2.path,
    startTimestamp: T0,
    idleTimeout: 0.4,
    numRecords: 3,
    maxTime: 6,
  });
  assert.deepEqual(
    more.reports.filter((r) => r.reason === "retry").map((r) => r.message).slice(0, 4),
    [
      "no message for 0.4 s; reconnecting",
      "no message for 0.4 s; reconnecting",
      "no message for 0.8 s; reconnecting",
      "no message for 0.4 s; reconnecting",
    ],
  );
});

Deno.test("a narrow filter's first scan, longer than idleTimeout, gets through after a failover: the failover keeps the doubled wait", async () => {
  // Both servers scan 1 s of history from the start before the one event the filter selects: every
  // connection before it is silent. The first one's live stream has nothing new, the second's has:
  // after two silent connections the run moves there, where it waits 1.2 s, and gets the event.
  // (Before, the failover reset the wait, which never went past 2 × 0.3 s, and nothing was stored.)
  const oldest = commit(T0, { did: did(4) });
  const event = commit(T0 + 3_600_000_000, { did: did(3) });
  const scanning = (live: boolean) =>
    Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
      const cursor = new URL(req.url).searchParams.get("cursor");
      const { socket, response } = Deno.upgradeWebSocket(req);
      let timer: ReturnType<typeof setTimeout> | undefined;
      socket.onopen = () => {
        // The coverage probe (cursor=0) gets the history's oldest event at once, the live stream (no
        // cursor) a new one at once if there is any, a sync's connection its event after the scan.
        if (cursor === null && !live) return;
        const sent = cursor === "0" ? oldest : cursor === null ? commit(Date.now() * 1000) : event;
        timer = setTimeout(
          () => socket.send(JSON.stringify(sent)),
          cursor === "0" || cursor === null ? 0 : 1000,
        );
      };
      socket.onclose = () => clearTimeout(timer);
      return response;
    });
  await using a = scanning(false);
  await using b = scanning(true);
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: [a, b].map((s) => `ws://127.0.0.1:${s.addr.port}/subscribe`),
    kv: db.path,
    startTimestamp: T0,
    idleTimeout: 0.3,
    numRecords: 1,
    maxTime: 10,
  });
  assert.equal(stats.stopReason, "limit", stats.error);
  assert.equal(stats.failovers, 1);
  // The second's first connection waited the doubled 1.2 s: no idle end there.
  assert.deepEqual(
    reports.filter((r) => r.reason === "retry").map((r) => r.message),
    ["no message for 0.3 s; reconnecting", "no message for 0.6 s; reconnecting"],
  );
  assert.deepEqual(await stored(db.path, stats.queueLength), [event]);
});

Deno.test("runBackfillSync() fails over from a v2 host whose connections bring an #info notice and then nothing", async () => {
  // The start is older than the first host's history: each connection there gets an OutdatedCursor
  // notice first, then nothing. (Before, the notice made it look alive, and it was never left.)
  const events = capture(600);
  const v2 = (options: Parameters<typeof serveEvents>[1]) =>
    serveEvents(events, { version: "v2", ...options });
  await using hung = v2({
    historyStartUs: T0 + 100_000,
    faults: { stallAfter: 0, stallConnections: 1000 },
  });
  await using good = v2({ closeAtEnd: true });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: [hung.v2Url, good.v2Url],
    kv: db.path,
    startTimestamp: T0,
    idleTimeout: 0.3,
    maxTime: 10,
    onError: () => {},
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  const got = (await stored(db.path, stats.queueLength)).map(({ cursor: _, ...e }) => e as JetstreamEvent);
  assert.deepEqual(got, posts(events));
});

Deno.test("runBackfillSync() with a quiet filter and another instance that is down does not give up, nor move there", async () => {
  // The first instance is healthy and has nothing for the filter; the second refuses every
  // connection. (Before, the run moved there after two quiet connections, and earlier still, the
  // second's failures added up across the first's quiet connections, and the run ended in an error
  // after maxRetries.)
  await using quiet = serveEvents(capture(100));
  const deadPort = await refusedPort();
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: [quiet.url, `ws://127.0.0.1:${deadPort}/subscribe`],
    kv: db.path,
    wantedDids: [did(99)],
    idleTimeout: 0.15,
    // (Three refusals in a row would end the run, were it to go there.)
    maxRetries: 2,
    maxTime: 6,
    onError: () => {},
  });
  assert.equal(stats.stopReason, "max_time", stats.error);
  // The first's live stream goes on; the second's cannot be reached.
  assert.equal(stats.failovers, 0);
  assert.ok(stats.reconnects >= 3, `reconnects: ${stats.reconnects}`);
});

Deno.test("a strict run whose first instance's probe gets nothing tries the next instance rather than refusing", async () => {
  // (Before, --strict refused the run, exit 2, as for a history it cannot know, and the next
  // instance was never tried.)
  const events = capture(600);
  await using silent = serveEvents(events, { faults: { stallAfter: 0, stallConnections: 1000 } });
  await using good = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: [silent.url, good.url],
    kv: db.path,
    startTimestamp: T0,
    strict: true,
    idleTimeout: 0.3,
    maxTime: 10,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 1);
  assert.equal(stats.coverageStart, T0);
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
  assert.ok(
    reports.some((r) =>
      r.reason === "connection" &&
      /^127\.0\.0\.1:\d+ sent no event when asked for all it holds, so it may not hold the requested start, .*: trying 127\.0\.0\.1:\d+, which may hold it$/
        .test(r.message)
    ),
    JSON.stringify(reports),
  );
});

Deno.test("runBackfillSync() rewinds 5 s on reconnect after a long connection, storing each event once", async () => {
  // 20 ms apart: the first connection covers 11 s before it is dropped, so the reconnect rewinds the
  // whole 5 s.
  const events = spaced(600, 20_000);
  await using server = serveEvents(events, { closeAtEnd: true, faults: { dropEvery: 550 } });
  await using db = await tempDb();
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 });
  assert.equal(stats.stopReason, "closed");
  const second = syncConnections(server)[1].query;
  assert.ok(second.includes(`cursor=${T0 + 549 * 20_000 - 5_000_000}`), second);
  assert.ok(stats.duplicatesDropped >= 250, `duplicates: ${stats.duplicatesDropped}`);
  assert.deepEqual(await stored(db.path, stats.queueLength), events);
});

Deno.test("runBackfillSync() recovers events a legacy server dropped at its replay-to-live switch seconds before the connection dropped", async () => {
  // jetstream-legacy#42: three events (at 9.90–9.92 s) are skipped at the switch and the connection
  // goes on for 2.2 s more before it drops. Protocol doc §9.1: rewind more than a few seconds. A
  // rewind of 1 s asked from 11.1 s and lost them for good; the replay from the store has them.
  const events = spaced(1300, 10_000);
  const lines = [...events.slice(0, 990), ...events.slice(993), ...events.slice(990, 993)];
  await using server = serveEvents(lines, { closeAtEnd: true, faults: { dropEvery: 1210, fileOrder: true } });
  await using db = await tempDb();
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(syncConnections(server).length, 2);
  const kept = await stored(db.path, stats.queueLength);
  assert.deepEqual(kept.map((e) => e.time_us).sort((a, b) => a - b), events.map((e) => e.time_us));
});

Deno.test("a stop while the pass over a switch waits, after the connection dropped, ends the run at once", async () => {
  // A live tail whose every connection drops after three events: a reconnect's (by time, from the
  // rewind) has a switch to pass over, which waits till 5 s after it (SEAM_PASS_AT_END_MS).
  const now = Date.now() * 1000;
  const events = Array.from({ length: 10 }, (_, i) => commit(now - 2_000_000 + i * 1000));
  await using server = serveEvents(events, { faults: { dropEvery: 3 } });
  await using db = await tempDb();
  const controller = new AbortController();
  const waiting = runBackfillSync({
    instance: server.url,
    kv: db.path,
    maxTime: 60,
    signal: controller.signal,
  });
  while (syncConnections(server)[1]?.closeCode === undefined) await delay(10);
  await delay(200);
  const stoppedAt = performance.now();
  controller.abort();
  const stats = await waiting;
  const stopMs = performance.now() - stoppedAt;
  // (Before: the wait went on, up to 5 s; only the run's own stops ended it.)
  assert.ok(stopMs < 2500, `the stop took ${Math.round(stopMs)} ms`);
  assert.equal(stats.stopReason, "aborted");
});

Deno.test("an event too large to store that a reconnect's rewind sends again is counted and reported once", async () => {
  // The 200th of 300 events, 10 ms apart, is over the run's 2,000-byte limit; the connection drops
  // after the 250th, and the rewind asks again from before the large one.
  const events = spaced(300, 10_000).map((e, i) =>
    i === 200 ? commit(e.time_us, { did: e.did, text: "x".repeat(3000) }) : e
  );
  await using server = serveEvents(events, { closeAtEnd: true, faults: { dropEvery: 250 } });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    maxEventBytes: 2000,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.ok(syncConnections(server)[1].query.includes(`cursor=${T0 + 249 * 10_000 - 1_245_000}`));
  assert.equal(stats.skipped.oversized, 1);
  assert.equal(reports.filter((r) => r.reason === "oversized").length, 1, JSON.stringify(reports));
  assert.deepEqual(await stored(db.path, stats.queueLength), events.filter((_, i) => i !== 200));
});

Deno.test("runBackfillSync() rewinds half of a short connection, so an event reordered just before a drop is kept", async () => {
  // A legacy server's replay-to-live switch can send events out of order (jetstream-legacy#42): here
  // the 12th before the 11th, and the connection drops after 11 events, 11 ms of time_us. A cursor
  // at the last event processed would skip the 11th for good.
  const events = spaced(40, 1000);
  const lines = [...events.slice(0, 10), events[11], events[10], ...events.slice(12)];
  await using server = serveEvents(lines, { closeAtEnd: true, faults: { dropEvery: 11, fileOrder: true } });
  await using db = await tempDb();
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 });
  assert.equal(stats.stopReason, "closed", stats.error);
  const kept = await stored(db.path, stats.queueLength);
  assert.deepEqual(kept.map((e) => e.time_us).sort((a, b) => a - b), events.map((e) => e.time_us));
  // Back half the 11 ms the first connection covered.
  assert.ok(
    syncConnections(server)[1].query.includes(`cursor=${T0 + 11_000 - 5_500}`),
    syncConnections(server)[1].query,
  );
});

Deno.test("runBackfillSync() rewinds after a drop even when the reconnect that follows brings nothing", async () => {
  const events = spaced(600, 20_000);
  await using server = serveEvents(events, { closeAtEnd: true, faults: { dropEvery: 550 } });
  // The first reconnect after the drop is upgraded and dropped at once, as by a server going down.
  await using dropping = upgradeThenDropServer();
  await using relay = tcpRelay(() => {
    const sync = syncConnections(server);
    return dropping.accepted() === 0 && sync.length === 1 && sync[0].dropped ? dropping.port : server.port;
  });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: `ws://127.0.0.1:${relay.port}/subscribe`,
    kv: db.path,
    startTimestamp: T0,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(dropping.accepted(), 1);
  // The connection after the empty one still covers the 5 s before the drop.
  const second = syncConnections(server)[1].query;
  assert.ok(second.includes(`cursor=${T0 + 549 * 20_000 - 5_000_000}`), second);
  assert.deepEqual(await stored(db.path, stats.queueLength), events);
});

/** A /subscribe endpoint that closes each connection with `code` and `reason` on its first message. */
function refusingServer(code: number, reason: string): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onmessage = () => socket.close(code, reason);
    return response;
  });
}

Deno.test("runBackfillSync() stops at once, with the server's reason, when an options_update is refused by a close", async () => {
  const dids = Array.from({ length: 60 }, (_, i) => did(i));
  for (
    const [code, reason] of [
      // The legacy server's refusal (protocol doc §2), and the v2 server's /subscribe.
      [1000, "failed to parse subscriber options: too many wanted DIDs"],
      [1008, "subscribe: invalid options: too many wanted DIDs: 60 > 50"],
    ] as const
  ) {
    await using server = refusingServer(code, reason);
    await using db = await tempDb();
    const started = performance.now();
    await assert.rejects(
      () =>
        runBackfillSync({
          instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
          kv: db.path,
          wantedDids: dids,
        }),
      (err: unknown) =>
        err instanceof UsageError &&
        err.message ===
          `127.0.0.1:${server.addr.port} refused the subscription (close code ${code}: ${reason})`,
    );
    assert.ok(performance.now() - started < 2000, "refused, not retried with backoff");
  }
});

Deno.test("runBackfillSync() reconnects when a legacy server fails its replay with close 1000 'failed to replay events'", async () => {
  const events = capture(300);
  const lines = events.map((e) => JSON.stringify(e));
  const cursors: (string | null)[] = [];
  // A legacy server (protocol doc §5.3) whose first replay fails after 40 events. Then it serves from
  // the cursor, inclusive, and closes normally at the end of its history.
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const cursor = new URL(req.url).searchParams.get("cursor");
    const { socket, response } = Deno.upgradeWebSocket(req);
    if (cursor === "0") {
      // The coverage probe: the oldest event.
      socket.onopen = () => socket.send(lines[0]);
      return response;
    }
    cursors.push(cursor);
    socket.onopen = () => {
      const from = events.findIndex((e) => e.time_us >= Number(cursor ?? 0));
      const failing = cursors.length === 1;
      const upTo = failing ? from + 40 : lines.length;
      for (let i = from; i < upTo; i++) socket.send(lines[i]);
      socket.close(1000, failing ? "failed to replay events" : "");
    };
    return response;
  });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
    kv: db.path,
    startTimestamp: T0,
    batchSize: 25,
  });
  // The second connection's normal close ends the run; the first one's failure was retried.
  assert.equal(stats.stopReason, "closed");
  assert.equal(stats.reconnects, 1);
  assert.equal(cursors.length, 2);
  // Back from the last event processed half of what the failing connection covered.
  assert.equal(Number(cursors[1]), events[39].time_us - (events[39].time_us - events[0].time_us) / 2);
  assert.ok(
    reports.some((r) => r.reason === "retry" && /code 1000: failed to replay events/.test(r.message)),
  );
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events));
  assert.equal(stats.recordsStored, posts(events).length);
});

Deno.test("runBackfillSync() that never gets a connection within maxTime stops with an error, not max_time", async () => {
  // Nothing listens there.
  const port = await refusedPort();
  await using db = await tempDb();
  const reports: string[] = [];
  const stats = await runBackfillSync({
    instance: `ws://127.0.0.1:${port}/subscribe`,
    kv: db.path,
    maxTime: 1,
    onError: (r) => reports.push(`${r.reason}: ${r.message}`),
  });
  assert.equal(stats.stopReason, "error");
  assert.match(
    stats.error!,
    /^no connection within --max-time \/ maxTime \(1 s\); last error: .*127\.0\.0\.1/,
  );
  // Each failed try says which it was and when the next comes.
  assert.match(
    reports[0],
    /^connection: cannot connect to .* \(attempt 1 of 11; trying again in \d+\.\d s\)$/,
  );
  assert.match(reports[1], /\(attempt 2 of 11; trying again in/);
  assert.equal(stats.recordsStored, 0);
});

Deno.test("runBackfillSync() whose server never answers the upgrade within maxTime stops with an error, not max_time", async () => {
  // Accepts TCP connections and never answers: the upgrade (and a coverage probe) hangs. maxTime
  // is far below the idle timeout, so no attempt fails before the run's time is up.
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) held.push(conn);
  })().catch(() => {});
  await using db = await tempDb();
  try {
    for (const startTimestamp of [undefined, Date.now() * 1000 - 3_600_000_000]) {
      const stats = await runBackfillSync({
        instance: `ws://127.0.0.1:${port}/subscribe`,
        kv: db.path,
        queueName: startTimestamp === undefined ? "live" : "history",
        startTimestamp,
        maxTime: 1,
        onError: () => {},
      });
      assert.equal(stats.stopReason, "error");
      assert.equal(
        stats.error,
        `no connection within --max-time / maxTime (1 s); 127.0.0.1:${port} had not answered yet`,
      );
      assert.equal(stats.recordsStored, 0);
    }
  } finally {
    listener.close();
    for (const conn of held) conn.close();
    await accepting;
  }
});

Deno.test("runBackfillSync() whose coverage probe was answered but whose own connections all failed stops with an error, not max_time", async () => {
  // Answers the probe (cursor=0) with its oldest event, and refuses every sync connection: an
  // answered probe is no connection of the run's. (Before: max_time, a clean stop, exit 0.)
  const oldest = commit(Date.now() * 1000 - 7_200_000_000);
  const asked: string[] = [];
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const cursor = new URL(req.url).searchParams.get("cursor");
    asked.push(cursor ?? "none");
    if (cursor !== "0") return new Response("busy", { status: 503 });
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onopen = () => socket.send(JSON.stringify(oldest));
    socket.onerror = () => {};
    return response;
  });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
    kv: db.path,
    startTimestamp: Date.now() * 1000 - 3_600_000_000,
    maxTime: 1.5,
    onError: () => {},
  });
  assert.ok(asked.includes("0") && asked.some((c) => c !== "0"), asked.join(" "));
  assert.equal(stats.stopReason, "error");
  assert.match(
    stats.error!,
    /^no connection within --max-time \/ maxTime \(1\.5 s\); last error: .*HTTP 503/,
  );
  assert.equal(stats.recordsStored, 0);
});

Deno.test("runBackfillSync() whose instances all go away after progress stops with an error at maxTime, not max_time", async () => {
  // The first instance sends its events and goes away; nothing listens at the second. (Before:
  // max_time, a clean stop, exit 0, and a warning that the instance never reached lacked the records
  // stored last.)
  const events = Array.from({ length: 300 }, (_, i) => commit(T0 + i * 1000, { did: did(i % 5) }));
  const first = serveEvents(events);
  const second = `ws://127.0.0.1:${await refusedPort()}/subscribe`;
  await using db = await tempDb();
  const reports: string[] = [];
  let storedAll = false;
  const run = runBackfillSync({
    instance: [first.url, second],
    kv: db.path,
    startTimestamp: T0,
    maxTime: 4,
    maxRetries: 100,
    onError: (r) => reports.push(`${r.reason}: ${r.message}`),
    onProgress: (p) => storedAll ||= p.recordsStored === events.length,
  });
  await waitFor(() => storedAll);
  await first.shutdown();
  const stats = await run;
  assert.equal(stats.stopReason, "error");
  assert.match(
    stats.error!,
    /^the connection was lost, and all \d+ attempts to get one back failed before --max-time \/ maxTime \(4 s\) ran out; last error: .*127\.0\.0\.1/,
  );
  assert.equal(stats.recordsStored, events.length);
  assert.ok(stats.failovers >= 1, reports.join("\n"));
  assert.deepEqual(reports.filter((r) => r.startsWith("coverage:")), []);
  assert.deepEqual(await stored(db.path, stats.queueLength), events);
});

Deno.test("runBackfillSync() stopped by maxTime on a connection made after failed attempts stops by max_time", async () => {
  // Three refusals, then a connection that sends its events and stays open, quiet: the failed
  // attempts before it do not make the run's end an error.
  const events = Array.from({ length: 50 }, (_, i) => commit(T0 + i * 1000, { did: did(i % 5) }));
  await using server = serveEvents(events, { faults: { refuseFirst: 3 } });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    maxTime: 4,
    onError: () => {},
  });
  assert.equal(server.connections.filter((c) => c.status === 503).length, 3);
  assert.equal(stats.stopReason, "max_time", stats.error);
  assert.equal(stats.error, undefined);
  assert.equal(stats.recordsStored, 50);
});

Deno.test("runBackfillSync() stores once what a server re-ingested under new time_us, within one connection", async () => {
  // A legacy server that restarted re-ingests its last seconds with new time_us (protocol doc §5.4):
  // a replay of its history then holds those events twice, with no reconnect on the client's side.
  const first = Array.from({ length: 100 }, (_, i) => commit(T0 + i * 1000, { did: did(i % 5) }));
  const again = first.slice(90).map((e, i) => ({ ...e, time_us: T0 + 200_000 + i * 1000 }));
  const after = Array.from({ length: 20 }, (_, i) => commit(T0 + 300_000 + i * 1000, { did: did(i % 5) }));
  await using server = serveEvents([...first, ...again, ...after], { closeAtEnd: true });
  await using db = await tempDb();
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 });
  assert.equal(stats.stopReason, "closed");
  assert.equal(stats.reconnects, 0);
  assert.equal(stats.duplicatesDropped, 10);
  assert.equal(stats.recordsStored, 120);
  assert.deepEqual(await stored(db.path, stats.queueLength), [...first, ...after]);
});

Deno.test("runBackfillSync() whose maxTime ends while a quiet server's coverage probe waits stops by max_time", async () => {
  // The server answers, and has nothing to send: the probe waits for a first event.
  await using server = serveEvents([]);
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: Date.now() * 1000 - 3_600_000_000,
    maxTime: 1,
    onError: () => {},
  });
  // (Before: an error, "no connection within --max-time / maxTime (1 s); … had not answered yet".)
  assert.equal(stats.stopReason, "max_time", stats.error);
  assert.equal(stats.error, undefined);
});

Deno.test("an end reached after a failover says that it was applied to the other instance's time_us", async () => {
  // The other instance's time_us run 0.3 s behind: the end, a time of the first, lets in 300 events
  // past it there. (Before, nothing said so.)
  const shift = (e: JetstreamEvent) => ({ ...e, time_us: e.time_us - 300_000 });
  const { events, stats, reports, got } = await failingOver((ev) => [ev.map(shift)], {
    endTimestamp: T0 + 3_500_000,
  });
  assert.equal(stats.stopReason, "end", stats.error);
  assert.equal(stats.endCursorReached, true);
  assert.deepEqual(got, [...events.slice(1000, 2700), ...events.slice(2700, 3800).map(shift)]);
  const warnings = reports.filter((r) => r.reason === "coverage");
  assert.equal(warnings.length, 1, JSON.stringify(warnings));
  assert.match(
    warnings[0].message,
    /^the end, 2026-11-27T10:00:03\.500000Z, was reached on 127\.0\.0\.1:\d+, not 127\.0\.0\.1:\d+ where the run's first events came from; time_us differ between instances, by seconds between healthy ones but by as much as their clocks differ, so events within that of the end may be missing or stored past it$/,
  );
});

Deno.test("an end reached on the instance failed over to before any event came gives no warning", async () => {
  // No event came from the first instance, which cannot be reached: the end is only ever compared
  // with the second one's time_us. (Before, it was said to be another instance's.)
  const events = capture(1000);
  const deadPort = await refusedPort();
  await using good = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: [`ws://127.0.0.1:${deadPort}/subscribe`, good.url],
    kv: db.path,
    startTimestamp: T0,
    endTimestamp: T0 + 500_000,
  });
  assert.equal(stats.stopReason, "end", stats.error);
  assert.equal(stats.failovers, 1);
  assert.deepEqual(await stored(db.path, stats.queueLength), posts(events.slice(0, 500)));
  assert.deepEqual(reports.filter((r) => r.reason === "coverage"), []);
});

Deno.test("an end reached on the resume of a run that failed over says that it was the other instance's time_us", async () => {
  // The run's first events came from the first instance, the end is one of its times, and the
  // second's time_us run 0.3 s behind. (Before, the resume compared the end with the instance of
  // the queue's last record, the second, and said nothing.)
  const events = Array.from(
    { length: 4000 },
    (_, i) => commit(T0 + i * 1000, { did: did(i % 13), text: `p${i}` }),
  );
  const shift = (e: JetstreamEvent) => ({ ...e, time_us: e.time_us - 300_000 });
  const first = serveEvents(events.slice(0, 2700));
  await using second = serveEvents(events.map(shift), { closeAtEnd: true });
  await using db = await tempDb();
  const window = { kv: db.path, startTimestamp: T0 + 1_000_000, endTimestamp: T0 + 3_500_000 };
  const sync = runBackfillSync({ ...window, instance: [first.url, second.url], numRecords: 2000 });
  while (!(syncConnections(first)[0]?.sent >= 1700)) await delay(20);
  await first.shutdown();
  assert.equal((await sync).stopReason, "limit");
  const { stats, reports } = await syncReporting({
    kv: db.path,
    resume: true,
    force: true,
    numRecords: 10_000,
  });
  assert.equal(stats.stopReason, "end", stats.error);
  const got = await stored(db.path, stats.queueLength);
  assert.deepEqual(got, [...events.slice(1000, 2700), ...events.slice(2700, 3800).map(shift)]);
  const warnings = reports.filter((r) => r.reason === "coverage");
  assert.equal(warnings.length, 1, JSON.stringify(warnings));
  assert.match(
    warnings[0].message,
    new RegExp(`not ${new URL(first.url).host} where the run's first events came from;`),
  );
});

Deno.test("a failover to an instance whose history begins after the switch says how much is missing", async () => {
  // The other instance's history begins 301 ms after the last event the first sent.
  const { events, stats, reports, got } = await failingOver((ev) => [ev.slice(3000)]);
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.deepEqual(got, [...events.slice(1000, 2700), ...events.slice(3000)]);
  // (Before, nothing was said: a legacy server moves an older cursor to its oldest event.)
  assert.equal(stats.coverageGapUs, events[3000].time_us - events[2699].time_us);
  assert.ok(
    reports.some((r) =>
      r.reason === "coverage" &&
      /only holds events from 2026-11-27T10:00:03\.000000Z on; .* is 0\.3 s earlier/.test(r.message)
    ),
    JSON.stringify(reports.filter((r) => r.reason === "coverage")),
  );
});

Deno.test("failovers one after another each take the stream up the rewind before the last event processed", async () => {
  // The second instance cannot be reached: the run fails over twice.
  const { events, stats, reports, got } = await failingOver((ev) => [null, ev]);
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 2);
  assert.deepEqual(got, events.slice(1000));
  const switches = reports.filter((r) => r.message.startsWith("failing over"));
  // (Before, the second was taken up 5 s before the first one's rewound time.)
  const last = new Date(events[2699].time_us / 1000).toISOString().replace("Z", "");
  assert.deepEqual(
    switches.map((r) => /taken up 5 s before (\S+) there/.exec(r.message)?.[1]?.startsWith(last)),
    [true, true],
    JSON.stringify(switches),
  );
});

/**
 * A sync from T0+0.5 s on two instances: the first sends `mine` and goes down, and the run fails over
 * to the other, which sends `theirs` and closes. Resolves to the statistics (checked closed), the
 * reports and the records stored.
 */
async function failOverFrom(mine: JetstreamEvent[], theirs: JetstreamEvent[]) {
  const first = serveEvents(mine);
  await using second = serveEvents(theirs, { closeAtEnd: true });
  await using db = await tempDb();
  const reports: SyncErrorReport[] = [];
  const sync = runBackfillSync({
    instance: [first.url, second.url],
    kv: db.path,
    startTimestamp: T0 + 500_000,
    maxTime: 30,
    onError: (r) => reports.push(r),
  });
  while (!(syncConnections(first)[0]?.sent >= mine.length)) await delay(20);
  await first.shutdown();
  const stats = await sync;
  assert.equal(stats.stopReason, "closed", stats.error);
  return { stats, reports, got: await stored(db.path, stats.queueLength) };
}

Deno.test("a failover near the start stores new events after it when no record stored lies within the rewind", async () => {
  // The first instance processed identity events (passed by Jetstream's collection filter, not
  // selected by the run's kinds) up to T0+6 s after its only post, at T0+0.5 s: taken up 5 s before
  // them, the other instance sends no record stored before. (Before, the run waited for one up to
  // T0+11 s and left out every new event until then, as possibly before the first instance's start.)
  const events = [
    commit(T0 + 500_000, { did: did(1), text: "first" }),
    ...Array.from({ length: 6 }, (_, i) => identity(T0 + (i + 1) * 1_000_000, did(7))),
    commit(T0 + 8_000_000, { did: did(2), text: "after all the first processed" }),
    ...Array.from(
      { length: 10 },
      (_, i) => commit(T0 + (10 + i) * 1_000_000, { did: did(3), text: `later ${i}` }),
    ),
  ];
  const { stats, reports, got } = await failOverFrom(events.slice(0, 7), events);
  assert.equal(stats.failovers, 1);
  assert.deepEqual(got, events.filter((e) => e.kind === "commit"));
  // Nothing was expected to come again, and nothing was left out: no coverage warning.
  assert.deepEqual(reports.filter((r) => r.reason === "coverage"), []);
});

Deno.test("a failover from a v2 host and back to it goes on by seq and loses nothing", async () => {
  // One post a second, seq 100 to 119, on /subscribe of a v2 host. Its first connection brings three
  // and fails; it then answers 503 twice, so the run fails over to an instance that is down and
  // back. There it asks by seq (cursor=102): nothing stored comes again to be recognised. (Before,
  // the failover's wait for one left out the new events of the first 5 s after the start.)
  const events = spaced(20, 1_000_000).map((e, i) => ({ ...e, cursor: 100 + i }));
  const cursors: number[] = [];
  await using host = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const cursor = Number(new URL(req.url).searchParams.get("cursor"));
    // The coverage probe (cursor 0) learns where the history begins.
    const probe = cursor === 0;
    if (!probe) cursors.push(cursor);
    if (!probe && (cursors.length === 2 || cursors.length === 3)) {
      return new Response("warming up", { status: 503 });
    }
    const { socket, response } = Deno.upgradeWebSocket(req);
    const at = (e: (typeof events)[number]) => cursor >= 1e15 ? e.time_us >= cursor : e.cursor >= cursor;
    const from = probe ? 0 : events.findIndex(at);
    const to = probe ? 1 : cursors.length === 1 ? from + 3 : events.length;
    socket.onopen = () => {
      for (let i = from; i < to; i++) socket.send(JSON.stringify(events[i]));
      setTimeout(() => socket.close(cursors.length === 1 && !probe ? 1011 : 1000), 100);
    };
    return response;
  });
  const down = await refusedPort();
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: [`ws://127.0.0.1:${host.addr.port}/subscribe`, `ws://127.0.0.1:${down}/subscribe`],
    kv: db.path,
    startTimestamp: T0,
    maxTime: 40,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.failovers, 2);
  assert.equal(cursors.at(-1), 102, JSON.stringify(cursors));
  assert.deepEqual(await stored(db.path, stats.queueLength), events);
});

/**
 * An instance that sends all it holds from the cursor (by time, or by seq when its events carry
 * `seqBase` + index as their `cursor`), then drops the connection (1011): nothing new, ever.
 */
function replayThenDrop(events: JetstreamEvent[], seqBase?: number) {
  const held = events.map((e, i) => seqBase === undefined ? e : { ...e, cursor: seqBase + i });
  return Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const cursor = Number(new URL(req.url).searchParams.get("cursor"));
    const { socket, response } = Deno.upgradeWebSocket(req);
    const from = cursor === 0
      ? 0 // The coverage probe: the oldest event.
      : held.findIndex((e) =>
        cursor >= 1e15 ? e.time_us >= cursor : (e as { cursor: number }).cursor > cursor
      );
    socket.onopen = () => {
      for (const e of cursor === 0 ? held.slice(0, 1) : from < 0 ? [] : held.slice(from)) {
        socket.send(JSON.stringify(e));
      }
      setTimeout(() => socket.close(cursor === 0 ? 1000 : 1011), 50);
    };
    return response;
  });
}

for (const v2 of [false, true]) {
  Deno.test(`two instances that only ever replay what they hold and drop the connection end the run after maxRetries${v2 ? " (by seq)" : ""}`, async () => {
    // Each failover's first connection brings events past the floor rewound from the other instance's
    // time, and each v2 host its own seqs: neither is progress (before, the run went on until maxTime).
    const events = spaced(100, 10_000);
    await using a = replayThenDrop(events, v2 ? 1000 : undefined);
    await using b = replayThenDrop(events, v2 ? 5000 : undefined);
    await using db = await tempDb();
    const stats = await runBackfillSync({
      instance: [`ws://127.0.0.1:${a.addr.port}/subscribe`, `ws://127.0.0.1:${b.addr.port}/subscribe`],
      kv: db.path,
      startTimestamp: T0,
      maxRetries: 3,
      maxTime: 30,
      onError: () => {},
    });
    assert.equal(stats.stopReason, "error");
    assert.match(stats.error ?? "", /^gave up after 4 reconnects without progress/);
    assert.equal(stats.recordsStored, 100);
  });
}

/** A sync from T0, a record a batch, into `kv` (a patched view of `real`, closed after it). */
async function syncInto(url: string, kv: Deno.Kv, real: Deno.Kv): Promise<SyncStats> {
  try {
    return await runBackfillSync({ instance: url, kv, startTimestamp: T0, batchSize: 1, onError: () => {} });
  } finally {
    real.close();
  }
}

Deno.test("a failover near the start to an instance without the records stored leaves out only what may be before the start", async () => {
  // The first instance stores posts from T0+0.5 s to T0+3 s and goes down; the other has none of
  // them, and new posts at T0+1, T0+4, T0+6 and T0+9 s. Taken up at T0-2 s, without a record to
  // line the two up, those before T0+5 s (the start plus the rewind) can be ones the first had
  // before the start; later ones cannot. (Before, new events were left out up to T0+8 s, the last
  // time processed plus the rewind.)
  const mine = Array.from(
    { length: 6 },
    (_, i) => commit(T0 + (i + 1) * 500_000, { did: did(1), text: `a${i}` }),
  );
  const theirs = [1, 4, 6, 9].map((s) => commit(T0 + s * 1_000_000, { did: did(2), text: `b${s}` }));
  const { reports, got } = await failOverFrom(mine, theirs);
  assert.deepEqual(got, [...mine, ...theirs.slice(2)]);
  const warnings = reports.filter((r) => r.reason === "coverage").map((r) => r.message);
  assert.ok(
    warnings.some((m) =>
      /^none of the records stored last came again on .* up to .*; 2 new events before 2026-11-27T10:00:05\.500000Z were left out, as the first instance may have had them before the start, so events just before may be missing$/
        .test(m)
    ),
    JSON.stringify(warnings),
  );
});

/**
 * `real`, patched so that its first commit with messages fails with `error` 300 ms after it is issued
 * (later commits are issued and land meanwhile); with `thenEvery`, every commit after it fails too.
 */
function firstCommitFailing(real: Deno.Kv, error: Error, thenEvery = false): Deno.Kv {
  let failing: Deno.AtomicOperation | undefined;
  let failed = false;
  return patchAtomic(real, (op, commit) => {
    const enqueue = op.enqueue.bind(op);
    op.enqueue = (...args: Parameters<Deno.AtomicOperation["enqueue"]>) => {
      failing ??= op;
      return enqueue(...args);
    };
    op.commit = async () => {
      if (op !== failing && !(thenEvery && failed)) return await commit();
      if (op === failing) await delay(300);
      failed = true;
      throw error;
    };
  });
}

/**
 * Syncs `events` into `path` through a KV whose first commit with messages fails, with `error`,
 * 300 ms after it is issued: later commits are issued and land meanwhile. Then checks that the
 * statistics say what the queue holds, and that a resume stores every event once.
 */
async function firstCommitFails(error: Error) {
  const events = spaced(80, 1000);
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const real = await Deno.openKv(db.path);
  const kv = firstCommitFailing(real, error);
  const stats = await syncInto(server.url, kv, real);
  assert.equal(stats.stopReason, "error");
  assert.match(stats.error ?? "", new RegExp(`^could not store (a|the last) batch: ${error.message}`));
  // Commits issued after the failed one landed: counted, as stored, though the one before failed.
  assert.ok(stats.recordsStored > 0 && stats.recordsStored < 80, String(stats.recordsStored));
  const counted = await Deno.openKv(db.path);
  try {
    const records = await counted.get<Deno.KvU64>(["jetfill", "jetstream_sync", "count", "records"]);
    assert.equal(Number(records.value?.value), stats.recordsStored);
  } finally {
    counted.close();
  }
  // The checkpoint goes back to before the records that were not stored: a resume stores them and
  // recognises the others.
  const { stats: resumed, reports } = await syncReporting({
    instance: server.url,
    kv: db.path,
    resume: true,
    batchSize: 1,
  });
  assert.deepEqual(reports, []);
  assert.equal(resumed.stopReason, "closed", resumed.error);
  assert.equal(resumed.recordsStored, 80 - stats.recordsStored);
  const all = (await drainQueue(db.path, resumed.queueLength) as QueueMessage[]).flatMap((m) =>
    decodeQueueMessage(m)
  );
  const times = (list: JetstreamEvent[]) => list.map((e) => e.time_us).sort((a, b) => a - b);
  assert.deepEqual(times(all), times(events));
}

Deno.test("a commit that KV fails while later ones land: statistics count those, and a resume stores the rest", async () => {
  // (Before, the later commits were neither counted nor undone: their checkpoint was past the
  // failed commit's records, and a resume left those out for good.)
  await firstCommitFails(new Error("disk I/O error"));
});

Deno.test("a commit that SQLite keeps busy while later ones land: statistics count those, and a resume stores the rest", async () => {
  // Committed again for 30 s (BUSY_BUDGET_MS), in vain.
  await firstCommitFails(new TypeError("database is locked"));
});

Deno.test("a commit that fails for good, when the checkpoint cannot be set back either, says which span to sync again", async () => {
  const events = spaced(80, 1000);
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const real = await Deno.openKv(db.path);
  // From the failure on every commit fails, the one that would set the checkpoint back too.
  const kv = firstCommitFailing(real, new Error("disk I/O error"), true);
  const stats = await syncInto(server.url, kv, real);
  assert.equal(stats.stopReason, "error");
  assert.ok(stats.recordsStored > 0, String(stats.recordsStored));
  // Nothing of the run was stored before the failed commit: the span begins at the run's start.
  assert.ok(
    stats.error?.endsWith(
      `; and the queue's checkpoint, which counts the 1 record of the commits that failed, could not be set back: ` +
        `a --resume would leave out those from the run's start, ${isoFromUs(T0)}, up to ${
          isoFromUs(events[0].time_us)
        }, so sync that span again`,
    ),
    stats.error,
  );
});

Deno.test("a sync that stops at its limit ends its connection with the closing handshake; its probe drops its own", async () => {
  // The server replays far more than the sync reads: a connection simply dropped with data unread is
  // reset, which the server sees as an abnormal close (1006), as it would a crash. The probe (cursor=0)
  // is dropped so: reading its replay on would compete with the sync.
  const closes: { probe: boolean; code: number; clean: boolean }[] = [];
  const texts = capture(4000).map((e) => JSON.stringify(e));
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    socket.onopen = () => texts.forEach((t) => socket.send(t));
    const probe = new URL(request.url).searchParams.get("cursor") === "0";
    socket.onclose = (e) => closes.push({ probe, code: e.code, clean: e.wasClean });
    return response;
  });
  try {
    await using db = await tempDb();
    const stats = await runBackfillSync({
      instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
      kv: db.path,
      startTimestamp: String(T0),
      numRecords: 5,
      wantedCollections: ["app.bsky.feed.like"],
    });
    assert.equal(stats.stopReason, "limit");
    for (let i = 0; i < 100 && closes.length < 2; i++) await delay(20);
    assert.deepEqual(closes.filter((c) => !c.probe), [{ probe: false, code: 1000, clean: true }]);
    assert.deepEqual(closes.filter((c) => c.probe).map((c) => c.clean), [false]);
  } finally {
    await server.shutdown();
  }
});

Deno.test("a connection Deno's permissions deny is refused at once, not retried as a network failure", async () => {
  // Before, a library user without --allow-net for the host saw eleven attempts over 72 s, then "gave
  // up". Each instance's permission is now asked for before the database is made; one taken away
  // during the run stops it at its failover.
  await using first = serveEvents(Array.from({ length: 50 }, (_, i) => commit(T0 + i * 1000)), {
    closeAtEnd: false,
  });
  await using db = await tempDb();
  const script = `${db.dir}/denied.ts`;
  const backfill = new URL("../src/backfill.ts", import.meta.url).href;
  const run = async (allowNet: string, instances: string[], start = true, revoke?: string) => {
    // (revoke: a host whose permission the script gives up once the run has stored something.)
    const onProgress = revoke === undefined
      ? ""
      : `onProgress: () => Deno.permissions.revokeSync({ name: "net", host: "${revoke}" }), `;
    await Deno.writeTextFile(
      script,
      `import { runBackfillSync } from "${backfill}";
try {
  const s = await runBackfillSync({ instance: ${
        JSON.stringify(instances)
      }, kv: "${db.dir}/q.sqlite", force: true, ${
        start ? `startTimestamp: ${T0}, ` : ""
      }${onProgress}idleTimeout: 1, maxTime: 15 });
  console.log(JSON.stringify({ stopReason: s.stopReason, error: s.error, recordsStored: s.recordsStored }));
} catch (err) {
  console.log(JSON.stringify({ thrown: (err as Error).name, message: (err as Error).message }));
}
`,
    );
    const config = new URL("../deno.json", import.meta.url).pathname;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--no-prompt", "--config", config, "--allow-read", "--allow-write", allowNet, script],
      env: { DENO_NO_UPDATE_CHECK: "1" },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    if (revoke !== undefined) {
      // The first instance goes away once it has sent its events: the run fails over.
      await whileRunning(child, () => syncConnections(first)[0]?.sent >= 50);
      await first.shutdown();
    }
    const out = await child.output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, stderr);
    return JSON.parse(new TextDecoder().decode(out.stdout));
  };
  const firstPort = new URL(first.url).port;
  // Its coverage probe, with a start; the stream's own connection, without.
  for (const start of [true, false]) {
    const none = await run("--allow-net=127.0.0.1:1", [first.url], start);
    assert.equal(none.thrown, "UsageError", JSON.stringify(none));
    assert.match(
      none.message,
      new RegExp(
        `^cannot connect to ws://127\\.0\\.0\\.1:${firstPort}/subscribe.*: Requires net access to "127\\.0\\.0\\.1:${firstPort}"`,
      ),
    );
    // Refused before the database (and its lock file) was made.
    assert.deepEqual(await Array.fromAsync(Deno.readDir(db.dir), (e) => e.name), ["denied.ts"]);
  }
  // A second instance this process may not reach (nothing listens there: it is never reached): the
  // run is refused before it begins, rather than at its first failover.
  const other = `ws://127.0.0.2:${firstPort}/subscribe`;
  const refused = await run(`--allow-net=127.0.0.1:${firstPort}`, [first.url, other]);
  assert.equal(refused.thrown, "UsageError", JSON.stringify(refused));
  assert.match(
    refused.message,
    /^cannot connect to ws:\/\/127\.0\.0\.2:\d+\/subscribe.*: Requires net access to "127\.0\.0\.2:\d+"/,
  );
  assert.equal(first.connections.length, 0);
  // Given up during the run: its failover stops it.
  const otherHost = `127.0.0.2:${firstPort}`;
  const half = await run(
    `--allow-net=127.0.0.1:${firstPort},${otherHost}`,
    [first.url, other],
    true,
    otherHost,
  );
  assert.equal(half.thrown, undefined, JSON.stringify(half));
  assert.equal(half.recordsStored, 50);
  assert.equal(half.stopReason, "error");
  assert.match(half.error, /Requires net access to "127\.0\.0\.2:\d+"/);
});
