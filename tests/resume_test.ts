import assert from "node:assert/strict";
import { runBackfillSync } from "../src/backfill.ts";
import type { JetstreamEvent } from "../src/jetstream/events.ts";
import type { SyncStats } from "../src/stats.ts";
import type { BackfillSyncOptions } from "../src/options.ts";
import { type Checkpoint, openKvAt, queueKey, readCheckpoint } from "../src/queue/kv_queue.ts";
import { UsageError } from "../src/errors.ts";
import type { SyncErrorReport } from "../src/stats.ts";
import { decodeQueueMessage, type QueueMessage } from "../src/queue/message.ts";
import { commit, did, drainQueue } from "./helpers/events.ts";
import { isoFromUs } from "../src/time.ts";
import { queueStatus } from "../src/queue/status.ts";
import { CLI, killIfRunning, runCli, spawnCli, syncArgs, whileRunning } from "./helpers/cli.ts";
import { handServer, refusedPort, serveEvents, tcpRelay, tempDb } from "./helpers/loopback.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const LIMIT = 20_000;

function capture(): JetstreamEvent[] {
  return Array.from({ length: 30_000 }, (_, i) =>
    commit(T0 + i * 1000, {
      did: did(i % 50),
      collection: i % 4 === 3 ? "app.bsky.feed.like" : "app.bsky.feed.post",
      text: `post ${i} ${"lorem ipsum ".repeat(i % 20)}`,
    }));
}

/** `deno run` arguments of a sync of the first LIMIT events, in batches of 10. */
function limitedSync(url: string, kv: string): string[] {
  return [
    "run",
    "-A",
    CLI,
    ...syncArgs(url, kv, T0, "--limit", String(LIMIT), "--batch-size", "10", "--json"),
  ];
}

async function queueEvents(path: string): Promise<JetstreamEvent[]> {
  const seq = (await checkpointAt(path))?.seq ?? 0;
  const msgs = (await drainQueue(path, seq, 30_000)) as QueueMessage[];
  assert.equal(msgs.length, seq);
  msgs.sort((a, b) => a.seq - b.seq);
  assert.deepEqual(msgs.map((m) => m.seq), Array.from({ length: seq }, (_, i) => i + 1));
  return msgs.flatMap((m) => decodeQueueMessage(m));
}

Deno.test("a sync killed with SIGKILL at random moments and resumed stores what one uninterrupted run stores", async () => {
  const events = capture();
  await using server = serveEvents(events);
  await using killed = await tempDb();
  await using whole = await tempDb();

  const uninterrupted = await new Deno.Command(Deno.execPath(), {
    args: limitedSync(server.url, whole.path),
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(uninterrupted.code, 0, new TextDecoder().decode(uninterrupted.stderr));

  // One handle, held: opening the database for each look took long enough on a loaded machine for
  // a sync to finish between two looks, and no kill then landed mid-run.
  const watcher = await Deno.openKv(killed.path);
  async function stored(): Promise<number> {
    return (await readCheckpoint(watcher, "jetstream_sync")).value?.run.recordsStored ?? -1;
  }

  // Kill the sync a few times once it has made progress (at a random moment after that), then let
  // a last resumed run finish. Waiting for progress keeps a loaded machine's slow start-up from
  // turning every kill into a kill before the first commit.
  let partialKills = 0;
  for (let attempt = 0; attempt < 6; attempt++) {
    const before = await stored();
    const args = limitedSync(server.url, killed.path);
    if (before >= 0) args.push("--resume");
    const child = new Deno.Command(Deno.execPath(), { args, stdout: "null", stderr: "null" }).spawn();
    let exited = false;
    child.status.then(() => (exited = true));
    while (!exited && (await stored()) < before + 200) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, Math.random() * 30));
    if (!exited) {
      if (!killIfRunning(child, "SIGKILL")) {
        // It ended between the check and the kill (its status not yet seen): not a kill.
        await child.status;
        continue;
      }
      const after = await stored();
      if (after > 0 && after < LIMIT) partialKills++;
    }
    await child.status;
  }
  watcher.close();
  const last = await new Deno.Command(Deno.execPath(), {
    args: [...limitedSync(server.url, killed.path), "--resume"],
    stdout: "null",
    stderr: "piped",
  }).output();
  assert.equal(last.code, 0, new TextDecoder().decode(last.stderr));
  assert.ok(partialKills >= 2, `only ${partialKills} kills landed mid-run`);

  const got = await queueEvents(killed.path);
  const expected = await queueEvents(whole.path);
  assert.equal(expected.length, LIMIT);
  assert.equal(got.length, LIMIT);
  assert.deepEqual(got, expected);
});

Deno.test("a resume drops a server's re-ingest, under new time_us, of records the queue stored before it stopped", async () => {
  const at = (i: number) => T0 + i * 1000;
  const originals = Array.from(
    { length: 15 },
    (_, i) => commit(at(i), { did: did(i), rkey: `3kreingest${i}` }),
  );
  // The server restarted after event 9 and re-ingested events 5 to 9 with new time_us.
  const copies = originals.slice(5, 10).map((e, k) => ({ ...e, time_us: at(9) + 100 * (k + 1) }));
  const served = [...originals.slice(0, 10), ...copies, ...originals.slice(10)];
  await using server = serveEvents(served, { closeAtEnd: true });
  await using db = await tempDb();
  const first = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0,
    numRecords: 10,
  });
  assert.equal(first.stopReason, "limit");
  assert.equal(first.latestCursor, at(9));
  const resumed = await runBackfillSync({ kv: db.path, resume: true, force: true, numRecords: 100 });
  assert.equal(resumed.stopReason, "closed");
  assert.equal(resumed.recordsStored, 5);
  // The five copies, and events 0 to 9 again (taken up the rewind, 5 s, before the cursor).
  assert.equal(resumed.duplicatesDropped, 15);
  assert.deepEqual(await queueEvents(db.path), originals);
});

/** Resumes the queue at `path` on `instance`, with a higher limit; the run's reports as "reason: message". */
async function resumeOn(
  path: string,
  instance: string | string[],
  numRecords = 100,
): Promise<{ resumed: SyncStats; reports: string[] }> {
  const reports: string[] = [];
  const resumed = await runBackfillSync({
    kv: path,
    resume: true,
    force: true,
    numRecords,
    instance,
    onError: (r) => reports.push(`${r.reason}: ${r.message}`),
  });
  return { resumed, reports };
}

/**
 * The same `count` events, `stepUs` apart from T0, served by two instances: `a` with these time_us,
 * `b` with time_us `skewUs` later (earlier when negative), as instances of one relay differ.
 */
function twoInstances(count: number, stepUs: number, skewUs: number) {
  const events = Array.from({ length: count }, (_, i) => commit(T0 + i * stepUs, { did: did(i) }));
  const other = events.map((e) => ({ ...e, time_us: e.time_us + skewUs }));
  const a = serveEvents(events, { closeAtEnd: true });
  const b = serveEvents(other, { closeAtEnd: true });
  return {
    events,
    other,
    a,
    b,
    [Symbol.asyncDispose]: async () => {
      await a.shutdown();
      await b.shutdown();
    },
  };
}

for (const skewMs of [1500, -1500, 8000, -8000]) {
  Deno.test(`a resume on another instance, whose time_us are ${skewMs} ms off, stores each event once`, async () => {
    await using pair = twoInstances(20, 1_000_000, skewMs * 1000);
    const { events, other, a, b } = pair;
    await using db = await tempDb();
    const first = await runBackfillSync({ instance: a.url, kv: db.path, startTimestamp: T0, numRecords: 10 });
    assert.equal(first.stopReason, "limit");
    const { resumed, reports } = await resumeOn(db.path, b.url);
    assert.equal(resumed.stopReason, "closed");
    assert.equal(resumed.recordsStored, 10);
    assert.ok(
      reports.some((m) =>
        /^connection: resuming on .* the stream is taken up 5 s before .* recognised by content/.test(m)
      ),
      reports.join("\n"),
    );
    const stored = await queueEvents(db.path);
    assert.deepEqual(
      stored.map((e) => (e as { commit: { rkey: string } }).commit.rkey),
      events.map((e) => (e as { commit: { rkey: string } }).commit.rkey),
    );
    assert.deepEqual(stored.slice(0, 10), events.slice(0, 10));
    assert.deepEqual(stored.slice(10), other.slice(10));
  });
}

Deno.test("a resume elsewhere that fails over to an instance that lacks the last record stored warns of it", async () => {
  // 10 ms apart; the first run stores 1,200 from `x`. The resume lists an instance that cannot be
  // reached and then `c`, 8 s behind, which lacks events 1180 to 1519. Before, `c` was taken up from
  // the resume's floor, already rewound, so the first record within 5 s of it ended the wait for the
  // last one stored, and that `c` lacks it went unsaid.
  const events = Array.from({ length: 3000 }, (_, i) => commit(T0 + i * 10_000, { did: did(i % 5) }));
  await using x = serveEvents(events.slice(0, 1200), { closeAtEnd: true });
  await using c = serveEvents(
    events.map((e) => ({ ...e, time_us: e.time_us - 8_000_000 })).filter((_, i) => i < 1180 || i >= 1520),
    { closeAtEnd: true },
  );
  await using db = await tempDb();
  const first = await runBackfillSync({ instance: x.url, kv: db.path, startTimestamp: T0 });
  assert.equal(first.recordsStored, 1200);
  const gone = `ws://127.0.0.1:${await refusedPort()}/subscribe`;
  const { resumed, reports } = await resumeOn(db.path, [gone, c.url], 100_000);
  assert.equal(resumed.stopReason, "closed", resumed.error);
  assert.equal(resumed.recordsStored, 3000 - 1520);
  assert.ok(
    reports.some((m) =>
      /^coverage: .*: it lacks it, and events between the two times may be missing$/.test(m)
    ),
    reports.join("\n"),
  );
});

Deno.test("a resume on another instance without the keys of the last records stored (a queue of an older version) says what it cannot do", async () => {
  const events = Array.from({ length: 20 }, (_, i) => commit(T0 + i * 1_000_000, { did: did(i) }));
  await using a = serveEvents(events, { closeAtEnd: true });
  await using b = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  await runBackfillSync({ instance: a.url, kv: db.path, startTimestamp: T0, numRecords: 10 });
  const kv = await Deno.openKv(db.path);
  for await (const e of kv.list({ prefix: ["jetfill", "jetstream_sync", "keys"] })) await kv.delete(e.key);
  kv.close();
  const { resumed, reports } = await resumeOn(db.path, b.url);
  assert.equal(resumed.recordsStored, 10);
  assert.ok(
    reports.some((m) => /^coverage: resuming on .* may be missing or repeated/.test(m)),
    reports.join("\n"),
  );
});

Deno.test("a sync killed with SIGKILL leaves the keys of what it stored: a resume elsewhere drops a re-ingest of it", async () => {
  const at = (i: number) => T0 + i * 1000;
  const originals = Array.from(
    { length: 15 },
    (_, i) => commit(at(i), { did: did(i), rkey: `3kkilled${i}` }),
  );
  // The first instance stays open after event 9; the other re-ingested events 5 to 9 with new time_us.
  await using first = serveEvents(originals.slice(0, 10));
  const copies = originals.slice(5, 10).map((e, k) => ({ ...e, time_us: at(9) + 100 * (k + 1) }));
  await using other = serveEvents([...originals.slice(0, 10), ...copies, ...originals.slice(10)], {
    closeAtEnd: true,
  });
  await using db = await tempDb();
  const child = spawnCli(syncArgs(first.url, db.path, T0, "--limit", "100"));
  const kv = await Deno.openKv(db.path);
  try {
    await whileRunning(
      child,
      async () => ((await readCheckpoint(kv, "jetstream_sync")).value?.recordsStored ?? 0) >= 10,
    );
  } finally {
    kv.close();
  }
  killIfRunning(child, "SIGKILL");
  await child.output();
  const { resumed, reports } = await resumeOn(db.path, other.url);
  assert.equal(resumed.recordsStored, 5, reports.join("\n"));
  assert.deepEqual(await queueEvents(db.path), originals);
});

Deno.test("a resume on an instance whose time_us run behind, right after the start, loses nothing, and its latestCursor is its last record's", async () => {
  // Two events a second from the start; the other instance is 1.5 s behind, so the third event, not
  // stored yet, comes there before the start.
  await using pair = twoInstances(12, 500_000, -1_500_000);
  const { events, other, a, b } = pair;
  await using db = await tempDb();
  await runBackfillSync({ instance: a.url, kv: db.path, startTimestamp: T0, numRecords: 2 });
  const { resumed, reports } = await resumeOn(db.path, b.url);
  assert.equal(resumed.recordsStored, 10, reports.join("\n"));
  const stored = await queueEvents(db.path);
  assert.deepEqual(stored, [...events.slice(0, 2), ...other.slice(2)]);
  // The last record stored, as the checkpoint has it: not the first instance's later cursor.
  assert.equal(resumed.latestCursor, other[11].time_us);
});

Deno.test("a resume's latestCursor is the time_us of its last record even when that is below the previous cursor", async () => {
  await using pair = twoInstances(11, 500_000, -1_500_000);
  const { events, other, a, b } = pair;
  await using db = await tempDb();
  const first = await runBackfillSync({ instance: a.url, kv: db.path, startTimestamp: T0, numRecords: 10 });
  assert.equal(first.latestCursor, events[9].time_us);
  const { resumed } = await resumeOn(db.path, b.url);
  assert.equal(resumed.recordsStored, 1);
  assert.ok(other[10].time_us < events[9].time_us);
  assert.equal(resumed.latestCursor, other[10].time_us);
  const kv = await Deno.openKv(db.path);
  assert.equal((await readCheckpoint(kv, "jetstream_sync")).value?.cursor, other[10].time_us);
  kv.close();
});

Deno.test("a resume on an instance whose time_us run ahead, right after the start, stores nothing the first instance had before it", async () => {
  // The first instance is 1.5 s behind: it puts the first three events before the start, and never
  // stores them; on the other, they come after it, and before the first event stored.
  // (The pair's second instance is the one behind, synced first here.)
  await using pair = twoInstances(12, 500_000, -1_500_000);
  const { events, other: behind, a: b, b: a } = pair;
  await using db = await tempDb();
  const first = await runBackfillSync({ instance: a.url, kv: db.path, startTimestamp: T0, numRecords: 2 });
  assert.equal(first.latestCursor, behind[4].time_us);
  const { resumed, reports } = await resumeOn(db.path, b.url);
  assert.equal(resumed.recordsStored, 7, reports.join("\n"));
  assert.deepEqual(await queueEvents(db.path), [...behind.slice(3, 5), ...events.slice(5)]);
});

Deno.test("an end reached on a resume on another instance says that it was applied to that instance's time_us", async () => {
  // The other instance is 1.5 s behind: the end, 15 s after the start, lets in its events 15 and 16.
  await using pair = twoInstances(20, 1_000_000, -1_500_000);
  const { events, other, a, b } = pair;
  await using db = await tempDb();
  const end = T0 + 15_000_000;
  await runBackfillSync({
    instance: a.url,
    kv: db.path,
    startTimestamp: T0,
    endTimestamp: end,
    numRecords: 10,
  });
  const { resumed, reports } = await resumeOn(db.path, b.url);
  assert.equal(resumed.stopReason, "end");
  assert.deepEqual(await queueEvents(db.path), [...events.slice(0, 10), ...other.slice(10, 17)]);
  assert.ok(
    reports.some((m) =>
      /^coverage: the end, 2026-11-27T10:00:15\.000000Z, was reached on 127\.0\.0\.1:\d+, not 127\.0\.0\.1:\d+ where the run's first events came from;/
        .test(m)
    ),
    reports.join("\n"),
  );
});

Deno.test("a resume on another instance whose history begins after the point to resume from says how much is missing, and stores what it holds", async () => {
  const events = Array.from({ length: 30 }, (_, i) => commit(T0 + i * 1_000_000, { did: did(i) }));
  await using a = serveEvents(events, { closeAtEnd: true });
  // The other instance lost the first twelve events (an outage of its own).
  await using b = serveEvents(events.slice(12), { closeAtEnd: true });
  await using db = await tempDb();
  await runBackfillSync({ instance: a.url, kv: db.path, startTimestamp: T0, numRecords: 10 });
  const { resumed, reports } = await resumeOn(db.path, b.url);
  assert.ok(
    reports.some((m) =>
      /^coverage: 127\.0\.0\.1:\d+ only holds events from 2026-11-27T10:00:12\.000000Z on; the point to resume from, 2026-11-27T10:00:09\.000000Z, is 3\.0 s earlier/
        .test(m)
    ),
    reports.join("\n"),
  );
  // None of the records stored last can come again there: what it holds is new, events 12 on. (Before,
  // the resume waited for one up to 5 s past the cursor, and left events 12 and 13 out.)
  assert.ok(
    !reports.some((m) => m.includes("none of the records stored last came again")),
    reports.join("\n"),
  );
  assert.equal(resumed.recordsStored, 18);
});

Deno.test("a resume on another instance far from the start stores the events the first one left out, even when none of its records come again", async () => {
  const events = Array.from({ length: 30 }, (_, i) => commit(T0 + i * 1_000_000, { did: did(i) }));
  // An event the first instance never had, and the other instance lost 9 to 14 (an outage of its
  // own), the last records stored: none of them comes again there.
  const extra = commit(T0 + 12_500_000, { did: did(99), rkey: "3kextra" });
  await using a = serveEvents(events, { closeAtEnd: true });
  await using b = serveEvents([...events.slice(0, 9), extra, ...events.slice(15)], { closeAtEnd: true });
  await using db = await tempDb();
  // Stored up to event 14, 14 s after the start: new events there cannot be from before it.
  await runBackfillSync({ instance: a.url, kv: db.path, startTimestamp: T0, numRecords: 15 });
  const { resumed, reports } = await resumeOn(db.path, b.url);
  assert.equal(resumed.recordsStored, 16, reports.join("\n"));
  assert.deepEqual(await queueEvents(db.path), [...events.slice(0, 15), extra, ...events.slice(15)]);
  assert.ok(
    // Taken up 5 s before, the extra event came first; 10 s before, event 4 did, but not event 14,
    // the last stored, up to 5 s after it.
    reports.some((m) =>
      /^coverage: on .*, records stored before came again, taken up 10 s before .*, but not the last one stored before a new record at .*: it lacks it, and events between the two times may be missing$/
        .test(m)
    ),
    reports.join("\n"),
  );
});

Deno.test("a resume on another instance 8 s behind, which has an event the first lacked among those stored, stores it and warns of nothing", async () => {
  const events = Array.from({ length: 20 }, (_, i) => commit(T0 + i * 1_000_000, { did: did(i) }));
  const behind = (e: JetstreamEvent) => ({ ...e, time_us: e.time_us - 8_000_000 });
  // Between events 12 and 13, which the first instance never sent.
  const extra = behind(commit(T0 + 12_500_000, { did: did(99), rkey: "3kextra" }));
  await using a = serveEvents(events, { closeAtEnd: true });
  await using b = serveEvents([...events.slice(0, 13).map(behind), extra, ...events.slice(13).map(behind)], {
    closeAtEnd: true,
  });
  await using db = await tempDb();
  await runBackfillSync({ instance: a.url, kv: db.path, startTimestamp: T0, numRecords: 15 });
  const { resumed, reports } = await resumeOn(db.path, b.url);
  // Taken up 5 s before event 14, event 17 came first; 10 s before, event 12 did, then the extra
  // one, and event 14, the last stored.
  assert.ok(
    reports.some((m) => / the stream is taken up 10 s before .* instead$/.test(m)),
    reports.join("\n"),
  );
  assert.deepEqual(reports.filter((m) => m.startsWith("coverage:")), []);
  assert.equal(resumed.recordsStored, 6);
  assert.deepEqual(await queueEvents(db.path), [
    ...events.slice(0, 15),
    extra,
    ...events.slice(15).map(behind),
  ]);
});

for (const version of ["v1", "v2"] as const) {
  Deno.test(`a resume on another ${version} instance whose history begins within the rewind reports no gap`, async () => {
    const events = Array.from({ length: 30 }, (_, i) => commit(T0 + i * 1_000_000, { did: did(i) }));
    const serve = (historyStartUs?: number) =>
      serveEvents(events, { version: version === "v2" ? "v2" : undefined, closeAtEnd: true, historyStartUs });
    const url = (s: ReturnType<typeof serve>) => version === "v2" ? s.v2Url : s.url;
    await using a = serve();
    // Its history begins 3 s before the last record stored (event 14): inside the 5 s rewind, and
    // nothing after that record is missing there.
    await using b = serve(T0 + 11_000_000);
    await using db = await tempDb();
    await runBackfillSync({ instance: url(a), kv: db.path, startTimestamp: T0, numRecords: 15 });
    const { resumed, reports } = await resumeOn(db.path, url(b));
    assert.equal(resumed.coverageGapUs, 0, reports.join("\n"));
    assert.equal(resumed.startClamped, false);
    assert.ok(!reports.some((m) => /only holds events from/.test(m)), reports.join("\n"));
    // (A v2 host's events carry its seq as `cursor`.)
    const stored = (await queueEvents(db.path)).map(({ cursor: _, ...e }) => e as JetstreamEvent);
    assert.deepEqual(stored, events);
  });
}

Deno.test("a resume at a time_us shared by more records than the checkpoint's tail names stores the rest of them, once", async () => {
  // 100 posts, then 350 at one time_us (more than MAX_TAIL_KEYS), then 100 more.
  const tie = T0 + 500_000;
  const events = [
    ...Array.from({ length: 100 }, (_, i) => commit(T0 + i * 1000, { did: did(i % 7), rkey: `a${i}` })),
    ...Array.from({ length: 350 }, (_, i) => commit(tie, { did: did(i % 11), rkey: `tie${i}` })),
    ...Array.from(
      { length: 100 },
      (_, i) => commit(tie + 1000 + i * 1000, { did: did(i % 5), rkey: `b${i}` }),
    ),
  ];
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const base = { instance: server.url, kv: db.path, startTimestamp: T0, batchSize: 50 };
  // Stopped 300 records into the tie.
  const first = await runBackfillSync({ ...base, numRecords: 400 });
  assert.equal(first.recordsStored, 400);
  assert.equal(first.latestCursor, tie);
  const second = await runBackfillSync({ ...base, numRecords: 550, resume: true, force: true });
  assert.equal(second.recordsStored, 150);
  // Taken up 5 s before the tie: the 100 before it and the 300 of it stored come again, known.
  assert.equal(second.duplicatesDropped, 400);
  assert.deepEqual(await queueEvents(db.path), events);
});

Deno.test("a resume of a new run on a queue that holds another run's records stores what the new run selects, theirs too", async () => {
  const events = capture().slice(0, 2_000);
  await using half = serveEvents(events.slice(0, 1_000), { closeAtEnd: true });
  await using all = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  // One instance: first a server that has the first half, then one that has everything.
  let whole = false;
  await using relay = tcpRelay(() => Number(new URL((whole ? all : half).url).port));
  const base = { instance: `ws://127.0.0.1:${relay.port}/subscribe`, kv: db.path, startTimestamp: T0 };
  whole = true;
  // A first run stores the posts.
  const posts = await runBackfillSync({ ...base, wantedCollections: ["app.bsky.feed.post"] });
  assert.equal(posts.recordsStored, 1_500);
  // A new run, of posts and likes, stops halfway (its server closes), and is resumed.
  whole = false;
  const both = { ...base, wantedCollections: ["app.bsky.feed.post", "app.bsky.feed.like"] };
  const first = await runBackfillSync(both);
  assert.equal(first.stopReason, "closed");
  assert.equal(first.recordsStored, 1_000);
  whole = true;
  const second = await runBackfillSync({ kv: db.path, resume: true });
  // Only this run's records, which the server sends again from the rewind (5 s, all 1,000 of them)
  // before the cursor. (Before, the resume also took the first run's posts for records it had
  // stored, and dropped 750 of them.)
  assert.equal(second.duplicatesDropped, 1_000);
  assert.equal(second.recordsStored, 1_000);
  const stored = await queueEvents(db.path);
  assert.deepEqual(stored, [
    ...events.filter((e) => e.kind === "commit" && e.commit.collection === "app.bsky.feed.post"),
    ...events,
  ]);
});

/** 100 posts a millisecond apart from T0, each with an rkey of its own. */
function hundredPosts(): JetstreamEvent[] {
  return Array.from({ length: 100 }, (_, i) => commit(T0 + i * 1000, { did: did(i % 9), rkey: `r${i}` }));
}

/** A sync from T0, a record a batch, stopped (as by a kill) when its connection first drops. */
async function syncUntilDropped(url: string, path: string): Promise<SyncStats> {
  const controller = new AbortController();
  return await runBackfillSync({
    instance: url,
    kv: path,
    startTimestamp: T0,
    batchSize: 1,
    signal: controller.signal,
    onError: (r) => r.reason === "retry" && controller.abort(),
  });
}

/** The events' time_us, sorted. */
const byTime = (list: { time_us: number }[]) => list.map((e) => e.time_us).sort((a, b) => a - b);

Deno.test("a resume takes the stream up the rewind before its cursor, so an event a server reordered at the stop is kept", async () => {
  // A legacy server's replay-to-live switch sends event 50 after event 51 (jetstream-legacy#42), and
  // the connection drops right after 51; the run is stopped there (as by a kill) and resumed. An
  // uninterrupted run gets 50 back by its reconnect's rewind: so must the resume. (Before, it asked
  // from 51 exactly and lost 50.)
  const events = hundredPosts();
  [events[50], events[51]] = [events[51], events[50]];
  await using server = serveEvents(events, { closeAtEnd: true, faults: { fileOrder: true, dropEvery: 51 } });
  await using db = await tempDb();
  const first = await syncUntilDropped(server.url, db.path);
  assert.equal(first.recordsStored, 51);
  const resumed = await runBackfillSync({ kv: db.path, resume: true });
  assert.equal(resumed.stopReason, "closed", resumed.error);
  assert.equal(resumed.recordsStored, 49);
  assert.deepEqual(byTime(await queueEvents(db.path)), byTime(events));
});

Deno.test("a queue whose checkpoint names its instance with a query string (as versions before 2026-12-01 kept it) resumes as it did", async () => {
  const events = hundredPosts();
  await using server = serveEvents(events, { closeAtEnd: true, faults: { dropEvery: 40 } });
  await using db = await tempDb();
  const first = await syncUntilDropped(server.url, db.path);
  assert.equal(first.recordsStored, 40);
  // What an older version wrote: the URL as given, with the filter the run replaced on connecting.
  const asGiven = `${server.url}?wantedCollections=app.bsky.feed.post`;
  const kv = await Deno.openKv(db.path);
  const key = ["jetfill", "jetstream_sync", "checkpoint"];
  const stored = (await kv.get<{ run: Record<string, unknown> }>(key)).value!;
  await kv.set(key, {
    ...stored,
    run: { ...stored.run, instance: asGiven, firstInstance: asGiven, instances: [asGiven] },
  });
  assert.equal((await readCheckpoint(kv, "jetstream_sync")).value?.run.instance, server.url);
  kv.close();
  const resumed = await runBackfillSync({ kv: db.path, resume: true, onError: () => {} });
  assert.equal(resumed.stopReason, "closed", resumed.error);
  assert.equal(resumed.recordsStored, 60);
  assert.deepEqual(byTime(await queueEvents(db.path)), byTime(events));
});

Deno.test("--resume of a run killed before it took the queue (a database without a checkpoint) starts that run with the options given", async () => {
  const events = Array.from({ length: 40 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  // What a kill -9 in a sync's first moments leaves: the database, made, and nothing in it.
  (await openKvAt(db.path)).close();
  // --resume alone has nothing to go on.
  await assert.rejects(
    () => runBackfillSync({ kv: db.path, resume: true, instance: server.url }),
    (err) =>
      err instanceof UsageError &&
      /Cannot resume queue 'jetstream_sync': it has no checkpoint yet/.test(err.message),
  );
  // With the run's options, as a script that resumes after a kill gives them: that run, from its start.
  const reports: SyncErrorReport[] = [];
  const stats = await runBackfillSync({
    kv: db.path,
    resume: true,
    instance: server.url,
    startTimestamp: T0,
    onError: (r) => reports.push(r),
  });
  // (Before: "Cannot resume queue 'jetstream_sync': it has no checkpoint yet; a first run of a queue is
  // started without --resume", where the README says a kill -9 at any moment can be followed by --resume.)
  assert.equal(stats.recordsStored, 40);
  assert.deepEqual(reports.map((r) => r.reason), ["queue"]);
  assert.match(
    reports[0].message,
    /^queue 'jetstream_sync' has no checkpoint yet .* this run starts it with the options given$/,
  );
  // And the CLI the same way.
  await using db2 = await tempDb();
  (await openKvAt(db2.path)).close();
  const cli = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      CLI,
      "sync",
      "--resume",
      "--kv",
      db2.path,
      "--instance",
      server.url,
      "--start",
      String(T0),
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(cli.stderr);
  assert.equal(cli.code, 0, stderr);
  assert.match(stderr, /has no checkpoint yet .* this run starts it with the options given/);
  assert.match(new TextDecoder().decode(cli.stdout), /records stored\s+40\n/);
});

Deno.test("--resume of a live tail stores nothing from before the tail began, though it ran for less than the rewind", async () => {
  // A legacy server by hand, with time_us from its own clock: 60 events of the 3 s before the tail
  // began, then one every 20 ms (while the run is away too). No cursor: what comes from now on; a cursor:
  // what it holds from it on (inclusive), then what comes. (Before, the resume asked from its last
  // record less 5 s and stored the events from before the tail began.)
  const held: JetstreamEvent[] = [];
  const nowUs = () => Date.now() * 1000;
  const began = nowUs();
  for (let i = 0; i < 60; i++) held.push(commit(began - 3_000_000 + i * 50_000, { did: did(i % 5) }));
  await using server = handServer(held);
  let n = 0;
  const ticker = setInterval(() => {
    const ev = commit(Math.max(nowUs(), held.at(-1)!.time_us + 1), { did: did(n++ % 5) });
    held.push(ev);
    for (const s of server.listening) if (s.readyState === WebSocket.OPEN) s.send(JSON.stringify(ev));
  }, 20);
  try {
    await using db = await tempDb();
    const { instance } = server;
    // A tail stopped after 1 s, then resumed for 1 s.
    const first = await runBackfillSync({ instance, kv: db.path, signal: AbortSignal.timeout(1000) });
    assert.equal(first.stopReason, "aborted", first.error);
    assert.ok(first.recordsStored > 10, String(first.recordsStored));
    const resumed = await runBackfillSync({ kv: db.path, resume: true, signal: AbortSignal.timeout(1000) });
    assert.equal(resumed.stopReason, "aborted", resumed.error);
    const got = await queueEvents(db.path);
    // From the tail's first record on, every event the server made, once, and none from before.
    const from = held.findIndex((e) => e.time_us === got[0].time_us);
    assert.ok(got[0].time_us >= began, `${got[0].time_us} is before the tail began, ${began}`);
    assert.deepEqual(got, held.slice(from, from + got.length));
    assert.equal(got.length, first.recordsStored + resumed.recordsStored);
  } finally {
    clearInterval(ticker);
  }
});

/** A {@link handServer} whose first connection gets one new event (by this machine's clock), then held. */
function oneNewEvent() {
  const held: JetstreamEvent[] = [];
  const server = handServer(held, (socket) => {
    if (held.length > 0) return;
    held.push(commit(Date.now() * 1000, { did: did(1) }));
    socket.send(JSON.stringify(held[0]));
  });
  return Object.assign(server, { held });
}

Deno.test("a new live tail on a queue whose last run stored an event a moment before does not store it again on a reconnect's rewind", async () => {
  // A legacy server by hand, with time_us from this machine's clock: no cursor gets what comes from
  // now on; a cursor, what it holds from it on (inclusive). The first tail stores one event and
  // stops; the next, at once, has a quiet first connection, and its reconnect asks from 5 s before
  // it opened. (Before: the event came again in that rewind and was stored a second time.)
  await using server = oneNewEvent();
  const { held } = server;
  await using db = await tempDb();
  const { instance } = server;
  const first = await runBackfillSync({ instance, kv: db.path, numRecords: 1 });
  assert.equal(first.stopReason, "limit", first.error);
  const next = await runBackfillSync({ instance, kv: db.path, idleTimeout: 0.2, maxTime: 1.5 });
  assert.equal(next.stopReason, "max_time", next.error);
  assert.ok(next.reconnects >= 1, String(next.reconnects));
  assert.equal(next.recordsStored, 0);
  assert.equal(next.duplicatesDropped, 1);
  assert.deepEqual(await queueEvents(db.path), held);
});

Deno.test("--resume of a live tail that stored nothing asks from when that tail began: an event that came in between is stored", async () => {
  // A legacy server by hand, as above. The first tail gets nothing and stops; an event comes while
  // no run is there; the resume's first connection asks from 5 s before the first tail began.
  // (Before: the resume asked for no cursor, and the event was lost without a word.)
  const held: JetstreamEvent[] = [];
  await using server = handServer(held);
  const { instance, cursors } = server;
  await using db = await tempDb();
  const began = Date.now() * 1000;
  const first = await runBackfillSync({ instance, kv: db.path, maxTime: 0.5 });
  assert.equal(first.stopReason, "max_time", first.error);
  assert.equal(first.recordsStored, 0);
  const between = commit(Date.now() * 1000, { did: did(9) });
  held.push(between);
  await new Promise((resolve) => setTimeout(resolve, 100));
  const resumed = await runBackfillSync({ kv: db.path, resume: true, maxTime: 1 });
  assert.equal(resumed.recordsStored, 1, JSON.stringify({ resumed, cursors }));
  assert.deepEqual(await queueEvents(db.path), [between]);
  // The first tail's connection asked for no cursor; the resume's, from when that tail began.
  assert.equal(cursors[0], null);
  const asked = Number(cursors[1]);
  assert.ok(asked >= began - 5_000_000 && asked <= began - 4_000_000, JSON.stringify({ cursors, began }));
});

/** 30 posts by 30 accounts, 0.1 s apart, from a minute ago (time_us by this machine's clock). */
function lastMinute(): JetstreamEvent[] {
  const nowUs = Date.now() * 1000;
  return Array.from({ length: 30 }, (_, i) => commit(nowUs - 60_000_000 + i * 100_000, { did: did(i) }));
}

/** The checkpoint of the default queue in the database at `path`, or null. */
async function checkpointAt(path: string): Promise<Checkpoint | null> {
  const kv = await Deno.openKv(path);
  try {
    return (await readCheckpoint(kv, "jetstream_sync")).value;
  } finally {
    kv.close();
  }
}

Deno.test("--resume after a run that stored nothing in a queue that held records continues that run, not the one before it", async () => {
  // Run A stores 20 records and reaches its limit; tail B stores nothing; an event comes; --resume.
  // (Before: B left the checkpoint to A, and the resume said that A had reached its limit, storing
  // nothing: the event was lost.)
  const held = lastMinute();
  await using server = handServer(held);
  const { instance, cursors } = server;
  await using db = await tempDb();
  const a = { instance, kv: db.path, startTimestamp: held[0].time_us, numRecords: 20 };
  assert.equal((await runBackfillSync(a)).stopReason, "limit");
  const began = Date.now() * 1000;
  const b = await runBackfillSync({ instance, kv: db.path, maxTime: 0.5 });
  assert.equal(b.recordsStored, 0, b.error);
  const checkpoint = async () => (await checkpointAt(db.path))!;
  // The checkpoint names B, and A as the run before it that stored records.
  const afterB = await checkpoint();
  assert.equal(afterB.run.recordsStored, 0);
  assert.equal(afterB.run.selection.startUs, null);
  assert.equal(afterB.priorRun?.recordsStored, 20);
  assert.equal(afterB.recordsStored, 20);
  // A's command again is still refused: it would store A's records a second time. (--resume now
  // continues B, which the refusal says, rather than offer it for A.)
  await assert.rejects(
    () => runBackfillSync(a),
    (err) =>
      err instanceof UsageError &&
      /already holds 20 records of a run with these same options .*A later run, which stored nothing, took the queue since, so --resume \/ resume: true would continue that one, not this: pass --force/
        .test(err.message),
  );
  // A run the server refuses leaves the checkpoint as it was.
  await using refusing = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    () => new Response("bad request", { status: 400 }),
  );
  await assert.rejects(
    () =>
      runBackfillSync({
        instance: `ws://127.0.0.1:${refusing.addr.port}/subscribe`,
        kv: db.path,
        wantedCollections: ["app.bsky.feed.like"],
      }),
    UsageError,
  );
  assert.deepEqual(await checkpoint(), afterB);
  const between = commit(Date.now() * 1000, { did: did(40) });
  held.push(between);
  const resumed = await runBackfillSync({ kv: db.path, resume: true, maxTime: 1 });
  assert.equal(resumed.recordsStored, 1, JSON.stringify({ resumed, cursors }));
  assert.deepEqual(await queueEvents(db.path), [...held.slice(0, 20), between]);
  // B's tail was taken up from when it began, less 5 s.
  const asked = Number(cursors.at(-1));
  assert.ok(asked >= began - 5_000_000 && asked <= began - 4_000_000, JSON.stringify({ cursors, began }));
  // Once it stored a record, the run before it is no longer named.
  assert.equal((await checkpoint()).priorRun, undefined);
});

Deno.test("a new run's note offers --resume for the run that stored the records only when --resume would continue that one", async () => {
  const held = lastMinute();
  await using server = handServer(held);
  await using db = await tempDb();
  const { instance } = server;
  const notes = async (options: Partial<BackfillSyncOptions>) => {
    const reports: SyncErrorReport[] = [];
    await runBackfillSync({ instance, kv: db.path, maxTime: 1, ...options, onError: (r) => reports.push(r) });
    return reports.filter((r) => r.reason === "queue").map((r) => r.message);
  };
  await notes({ startTimestamp: held[0].time_us, numRecords: 20 });
  // A new run right after it: --resume would continue the run that stored them.
  const [offered] = await notes({ startTimestamp: held[0].time_us, wantedDids: [did(20)] });
  assert.match(offered, /as a new run: to continue the run that stored them instead, use --resume/);
  // A quiet tail takes the queue: --resume would continue it, so the next new run's note offers nothing.
  await notes({ maxTime: 0.3 });
  const [plain] = await notes({ startTimestamp: held[0].time_us, wantedDids: [did(21)] });
  assert.match(plain, /this run adds its own after them, as a new run$/);
});

Deno.test("a run that never gets a connection leaves the checkpoint of the run before it, and status names that one for --resume", async () => {
  await using server = oneNewEvent();
  await using db = await tempDb();
  const checkpoint = () => checkpointAt(db.path);
  // A live tail that stored that event.
  const a = await runBackfillSync({ instance: server.instance, kv: db.path, numRecords: 1 });
  assert.equal(a.recordsStored, 1, a.error);
  const afterA = await checkpoint();
  assert.ok(afterA);
  // Its server cannot be reached (a typo in --instance, say).
  const b = await runBackfillSync({
    instance: `ws://127.0.0.1:${await refusedPort()}/subscribe`,
    kv: db.path,
    wantedCollections: ["app.bsky.feed.like"],
    maxRetries: 0,
  });
  assert.equal(b.stopReason, "error");
  assert.deepEqual(await checkpoint(), afterA);
  // Status says so: the last run is B, the one --resume continues A.
  const kv = await Deno.openKv(db.path);
  const status = await queueStatus(kv, "jetstream_sync");
  kv.close();
  assert.equal(status.resumeRun?.id, afterA!.run.id);
  assert.notEqual(status.lastRun?.id, afterA!.run.id);
  const text = await runCli(["status", "--kv", db.path]);
  assert.match(text.stdout, new RegExp(`\nresume continues    ${afterA!.run.id}, which stored 1 record\n`));
});

Deno.test("--resume of a live tail that stored nothing, after a run that stored an event a moment before it began, does not store that event again", async () => {
  // As above: the first tail stores one event; the next stores nothing; its resume asks from 5 s
  // before it began, which brings that event back.
  await using server = oneNewEvent();
  const { held } = server;
  await using db = await tempDb();
  const { instance } = server;
  assert.equal((await runBackfillSync({ instance, kv: db.path, numRecords: 1 })).stopReason, "limit");
  const quiet = await runBackfillSync({ instance, kv: db.path, maxTime: 0.3 });
  assert.equal(quiet.recordsStored, 0, quiet.error);
  const resumed = await runBackfillSync({ kv: db.path, resume: true, maxTime: 1 });
  assert.equal(resumed.stopReason, "max_time", resumed.error);
  assert.equal(resumed.recordsStored, 0);
  assert.equal(resumed.duplicatesDropped, 1);
  assert.deepEqual(await queueEvents(db.path), held);
});

Deno.test("--resume of a live tail that stored nothing, begun before the server's history, says what cannot be had", async () => {
  const held = [commit(Date.now() * 1000 - 10_000_000, { did: did(2) })];
  await using server = handServer(held);
  await using db = await tempDb();
  const first = await runBackfillSync({ instance: server.instance, kv: db.path, maxTime: 0.5 });
  assert.equal(first.recordsStored, 0);
  // As if that tail had begun two days ago.
  const kv = await Deno.openKv(db.path);
  const { value } = await readCheckpoint(kv, "jetstream_sync");
  const beganUs = Date.now() * 1000 - 2 * 86_400_000_000;
  await kv.set(queueKey("jetstream_sync", "checkpoint"), {
    ...value!,
    run: { ...value!.run, tailBeganUs: beganUs },
  });
  kv.close();
  const reports: SyncErrorReport[] = [];
  const resumed = await runBackfillSync({
    kv: db.path,
    resume: true,
    maxTime: 1,
    onError: (r) => reports.push(r),
  });
  assert.equal(resumed.recordsStored, 1, resumed.error);
  assert.equal(resumed.startClamped, false);
  assert.equal(resumed.coverageGapUs, held[0].time_us - (beganUs - 5_000_000));
  assert.deepEqual(
    reports.filter((r) => r.reason === "coverage").map((r) => r.message),
    [
      `127.0.0.1:${new URL(server.instance).port} only holds events from ${
        isoFromUs(held[0].time_us)
      } on; the point to resume from, ${
        isoFromUs(beganUs - 5_000_000)
      }, is 48.0 h earlier, so events in between cannot be had from this server`,
    ],
  );
});
