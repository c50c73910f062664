import assert from "node:assert/strict";
import { V2_SUBSCRIBE_PATH } from "../src/jetstream/v2.ts";
import { probeCoverageStart, probeHistoryStart, probeLiveEvent } from "../src/jetstream/coverage.ts";
import { ConnectError } from "../src/jetstream/socket.ts";
import { runBackfillSync } from "../src/backfill.ts";
import { UsageError } from "../src/errors.ts";
import type { SyncErrorReport, SyncStats } from "../src/stats.ts";
import type { BackfillSyncOptions } from "../src/options.ts";
import { commit } from "./helpers/events.ts";
import { isoFromUs } from "../src/time.ts";
import {
  handServer,
  serveEvents,
  tcpRelay,
  tempDb,
  upgradeThenDropServer,
  withSilentPort,
} from "./helpers/loopback.ts";

// The server's history starts at T0; the requests below ask for two days earlier.
const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const DAY = 86_400_000_000;
const events = Array.from({ length: 100 }, (_, i) => commit(T0 + i * 1_000_000));
const CLI = new URL("../cli.ts", import.meta.url).pathname;

/** Runs a sync with `options`, collecting what it reports. */
async function syncReporting(
  options: BackfillSyncOptions,
): Promise<{ stats: SyncStats; reports: SyncErrorReport[] }> {
  const reports: SyncErrorReport[] = [];
  const stats = await runBackfillSync({ ...options, onError: (r) => reports.push(r) });
  return { stats, reports };
}

Deno.test("runBackfillSync() reports a start older than the server's history as clamped, with the gap", async () => {
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0 - 2 * DAY,
  });
  assert.equal(stats.startClamped, true);
  assert.equal(stats.coverageStart, T0);
  assert.equal(stats.coverageGapUs, 2 * DAY);
  assert.equal(stats.recordsStored, 100);
  const warning = reports.find((r) => r.reason === "coverage");
  assert.match(
    warning!.message,
    /only holds events from 2026-11-27T10:00:00.000000Z on; the requested start, 2026-11-25T10:00:00.000000Z, is 2.0 days earlier/,
  );
});

Deno.test("probeLiveEvent() asks for the live stream, without a cursor, on either wire, and is false for one that sends nothing", async () => {
  for (const [version, wire] of [["legacy", "/subscribe"], ["v2", V2_SUBSCRIBE_PATH]] as const) {
    // (The project's server sends a connection without a cursor its capture, as if live.)
    await using server = serveEvents(events, { version });
    assert.equal(await probeLiveEvent(server.url.replace(/\/subscribe$/, wire), { timeoutMs: 2000 }), true);
    const asked = server.connections.map((c) => new URLSearchParams(c.query).get("cursor"));
    assert.deepEqual(asked, [null], `${version} ${wire}`);
  }
  // One that replays what it holds from a cursor, and has nothing new.
  await using stale = handServer(events);
  assert.equal(await probeLiveEvent(stale.instance, { timeoutMs: 300 }), false);
  assert.deepEqual(stale.cursors, [null]);
});

Deno.test("runBackfillSync() sends a start before 2001-09-09 as 10^15 µs, which every wire reads as a time", async () => {
  // Under 10^15 a cursor is a prefix of the keys to a legacy server and a seq to a v2 one (protocol
  // doc §1): 2000-01-01 (946684800000000) would have been a future, live-only cursor on each.
  for (
    const [version, wire] of [["legacy", "/subscribe"], ["v2", "/subscribe"], [
      "v2",
      V2_SUBSCRIBE_PATH,
    ]] as const
  ) {
    await using server = serveEvents(events, { closeAtEnd: true, version });
    await using db = await tempDb();
    const { stats } = await syncReporting({
      instance: server.url.replace(/\/subscribe$/, wire),
      kv: db.path,
      startTimestamp: "2000-01-01",
    });
    const label = `${version} ${wire}`;
    assert.equal(stats.recordsStored, 100, label);
    assert.equal(stats.startClamped, true, label);
    assert.equal(stats.coverageStart, T0, label);
    assert.equal(stats.coverageGapUs, T0 - Date.UTC(2000, 0, 1) * 1000, label);
    const asked = server.connections.map((c) => new URLSearchParams(c.query).get("cursor"));
    assert.ok(asked.includes("1000000000000000"), `${label}: ${asked}`);
  }
});

Deno.test("a window that ends before the server's history ends the run at once, though no event would come to show the end", async () => {
  // A narrow selection (an account that posted nothing) gets no event at all from the server: before,
  // the run waited for one until maxTime, knowing that nothing of the window could be had.
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: server.url,
    kv: db.path,
    wantedDids: ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"],
    startTimestamp: T0 - 2 * DAY,
    endTimestamp: T0 - DAY,
    maxTime: 30,
  });
  assert.equal(stats.stopReason, "end");
  assert.equal(stats.endCursorReached, true);
  assert.equal(stats.recordsStored, 0);
  assert.equal(stats.coverageGapUs, DAY);
  // Its probe alone: the stream was never asked for.
  assert.equal(server.connections.length, 1);
  assert.equal(new URLSearchParams(server.connections[0].query).get("cursor"), "0");
  assert.equal(reports.filter((r) => r.reason === "coverage").length, 1);
});

Deno.test("runBackfillSync() counts as missing only the requested window, not the time after its end", async () => {
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: server.url,
    kv: db.path,
    startTimestamp: T0 - 2 * DAY,
    endTimestamp: T0 - DAY,
  });
  assert.equal(stats.startClamped, true);
  assert.equal(stats.coverageGapUs, DAY);
  assert.equal(stats.recordsStored, 0);
  assert.equal(stats.stopReason, "end");
  assert.match(
    reports.find((r) => r.reason === "coverage")!.message,
    /only holds events from 2026-11-27T10:00:00.000000Z on, after the requested end, 2026-11-26T10:00:00.000000Z: none of the 24.0 h from 2026-11-25T10:00:00.000000Z can be had/,
  );
  // An end within the history: the gap runs to where the history starts.
  const within = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    queueName: "within",
    startTimestamp: T0 - DAY,
    endTimestamp: T0 + 10_000_000,
  });
  assert.equal(within.coverageGapUs, DAY);
  assert.equal(within.recordsStored, 10);
});

Deno.test("runBackfillSync() reports full coverage when the start is within the history", async () => {
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 + 10_000_000 });
  assert.equal(stats.startClamped, false);
  assert.equal(stats.coverageStart, T0);
  assert.equal(stats.coverageGapUs, 0);
  assert.equal(stats.recordsStored, 90);
});

Deno.test("runBackfillSync({ strict: true }) refuses a clamped start before storing anything", async () => {
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  await assert.rejects(
    () => runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 - DAY, strict: true }),
    (err: unknown) => err instanceof UsageError && /refused by --strict \/ strict: true/.test(err.message),
  );
  const kv = await Deno.openKv(db.path);
  const entries = await Array.fromAsync(kv.list({ prefix: ["jetfill"] }));
  kv.close();
  assert.deepEqual(entries, []);
});

Deno.test("jetfill sync warns in plain words about a clamped start, and --strict exits 2", async () => {
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const args = [
    "run",
    "-A",
    CLI,
    "sync",
    "--instance",
    server.url,
    "--kv",
    db.path,
    "--start",
    "2026-11-20",
    "--json",
  ];
  const warned = await new Deno.Command(Deno.execPath(), { args, stdout: "piped", stderr: "piped" }).output();
  assert.equal(warned.code, 0);
  const stderr = new TextDecoder().decode(warned.stderr);
  assert.match(
    stderr,
    /warning: 127\.0\.0\.1:\d+ only holds events from 2026-11-27T10:00:00.000000Z on; the requested start, 2026-11-20T00:00:00.000000Z, is 7.4 days earlier/,
  );
  const stats = JSON.parse(new TextDecoder().decode(warned.stdout));
  assert.equal(stats.startClamped, true);

  const strict = await new Deno.Command(Deno.execPath(), {
    args: [...args, "--strict", "--queue-name", "s"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(strict.code, 2);
  assert.match(new TextDecoder().decode(strict.stderr), /\(refused by --strict\)$/m);
});

Deno.test("runBackfillSync() retries a coverage probe refused with 503 instead of skipping the check", async () => {
  // The first two subscription requests (probes) are refused, as by a v2 host warming up.
  await using server = serveEvents(events, { closeAtEnd: true, faults: { refuseFirst: 2 } });
  await using db = await tempDb();
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, startTimestamp: T0 - 2 * DAY });
  assert.equal(stats.startClamped, true);
  assert.equal(stats.coverageStart, T0);
  assert.equal(stats.coverageGapUs, 2 * DAY);
  assert.equal(stats.recordsStored, 100);
  // Two refused probes, the third answered, then the sync's own connection.
  assert.deepEqual(server.connections.map((c) => c.query === "cursor=0"), [true, true, true, false]);
});

Deno.test("runBackfillSync({ strict: true }) refuses to run when the server will not say where its history begins", async () => {
  // A server that refuses every request with 400: the probe cannot tell, and a strict run must know.
  await using server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () => new Response("invalid subscriber options", { status: 400 }),
  );
  await using db = await tempDb();
  await assert.rejects(
    () =>
      runBackfillSync({
        instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
        kv: db.path,
        startTimestamp: T0,
        strict: true,
      }),
    (err: unknown) =>
      err instanceof UsageError &&
      /could not find where 127\.0\.0\.1:\d+'s history begins: .*HTTP 400.*\(refused by --strict \/ strict: true\)/
        .test(
          err.message,
        ),
  );
});

Deno.test("runBackfillSync() warns when a server refuses the coverage probe, and goes on", async () => {
  // 400 for the probe (cursor=0, no filters); the sync's own connection is accepted and closed.
  await using server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    if (new URL(req.url).searchParams.get("cursor") === "0") return new Response("no", { status: 400 });
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onopen = () => socket.close(1000, "done");
    return response;
  });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: `ws://127.0.0.1:${server.addr.port}/subscribe`,
    kv: db.path,
    startTimestamp: T0,
  });
  assert.equal(stats.stopReason, "closed");
  assert.equal(stats.coverageStart, null);
  const warning = reports.find((r) => r.reason === "coverage");
  assert.match(
    warning!.message,
    /^could not find where 127\.0\.0\.1:\d+'s history begins: .*HTTP 400.*; a start before it would go unnoticed$/,
  );
});

Deno.test("runBackfillSync({ strict: true, resume: true }) refuses a resume point older than the server's history, storing nothing", async () => {
  await using db = await tempDb();
  {
    // The first 30 events, then the server closes: a run to resume.
    await using server = serveEvents(events.slice(0, 30), { closeAtEnd: true });
    const stats = await runBackfillSync({
      instance: server.url,
      kv: db.path,
      startTimestamp: T0,
      numRecords: 200,
    });
    assert.equal(stats.recordsStored, 30);
  }
  // This server's history begins 20 s after the resume point.
  await using later = serveEvents(events, { closeAtEnd: true, historyStartUs: T0 + 50 * 1_000_000 });
  await assert.rejects(
    () => runBackfillSync({ instance: later.url, kv: db.path, resume: true, strict: true }),
    (err: unknown) =>
      err instanceof UsageError &&
      /the point to resume from.*\(refused by --strict \/ strict: true\)/.test(err.message),
  );
});

Deno.test("runBackfillSync() failing over before any event measures the next instance's history, replacing the first measure", async () => {
  // The first instance answers its coverage probe (history from T0 + 10 s), then refuses the sync with 503.
  const firstHistory = T0 + 10_000_000;
  await using refusing = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    if (new URL(req.url).search !== "?cursor=0") return new Response("warming up", { status: 503 });
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onopen = () => socket.send(JSON.stringify(commit(firstHistory)));
    return response;
  });
  // The second holds events from T0 + 40 s on.
  await using server = serveEvents(events, { closeAtEnd: true, historyStartUs: T0 + 40_000_000 });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: [`ws://127.0.0.1:${refusing.addr.port}/subscribe`, server.url],
    kv: db.path,
    startTimestamp: T0,
  });
  assert.equal(stats.stopReason, "closed");
  // To the second (the first's history begins after the start: the second may hold it), back to
  // the first (the second's begins later still), which refuses the sync: to the second again.
  assert.equal(stats.failovers, 3);
  assert.equal(stats.coverageStart, T0 + 40_000_000);
  assert.equal(stats.coverageGapUs, 40_000_000);
  assert.equal(stats.startClamped, true);
  // Both said what they hold; the statistics are the second's, where the events came from.
  assert.equal(reports.filter((r) => r.reason === "coverage").length, 2);
  assert.equal(stats.recordsStored, 60);
});

Deno.test("runBackfillSync() on a v2 host that refuses the coverage probe measures the gap from the sync's own OutdatedCursor", async () => {
  const history = T0 + 30_000_000;
  const requests: string[] = [];
  await using v2 = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    const query = new URL(req.url).search;
    requests.push(query);
    // The probe (a cursor and nothing else) is refused as a client error.
    if (/^\?cursor=\d+$/.test(query)) {
      return Response.json({ error: "InvalidRequest", message: "no" }, { status: 400 });
    }
    const { socket, response } = Deno.upgradeWebSocket(req);
    socket.onopen = () => {
      const info = { name: "OutdatedCursor", message: "cursor below the lookback floor" };
      socket.send(JSON.stringify({
        $type: "message",
        payload: { $type: "network.bsky.jetstream.subscribeEvents#info", ...info },
      }));
      const event = commit(history);
      socket.send(JSON.stringify({
        $type: "message",
        payload: {
          $type: "network.bsky.jetstream.subscribeEvents#commit",
          seq: 5001,
          did: event.did,
          time: isoFromUs(history),
          ...(event.kind === "commit" ? event.commit : {}),
        },
      }));
      socket.close(1000);
    };
    return response;
  });
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: `ws://127.0.0.1:${v2.addr.port}${V2_SUBSCRIBE_PATH}`,
    kv: db.path,
    startTimestamp: T0,
    maxRetries: 0,
  });
  assert.equal(stats.recordsStored, 1);
  assert.equal(stats.coverageStart, history);
  assert.equal(stats.coverageGapUs, 30_000_000);
  assert.equal(stats.startClamped, true);
  assert.ok(
    reports.some((r) =>
      r.reason === "info" && /history begins: .*400.*OutdatedCursor will tell/.test(r.message)
    ),
  );
  assert.equal(reports.filter((r) => r.reason === "coverage").length, 1);
  assert.equal(requests.length, 2);
});

Deno.test("runBackfillSync() reports coverage unknown when the probe gets no event for a start in the past, and --strict refuses it", async () => {
  // A server that holds nothing to replay (protocol doc §1.2: a lookback of 0), on each wire.
  for (const [version, wire] of [["legacy", "/subscribe"], ["v2", V2_SUBSCRIBE_PATH]] as const) {
    await using server = serveEvents([], { closeAtEnd: true, version });
    const instance = server.url.replace(/\/subscribe$/, wire);
    await using db = await tempDb();
    const start = Date.now() * 1000 - 3 * DAY;
    const { stats, reports } = await syncReporting({ instance, kv: db.path, startTimestamp: start });
    assert.equal(stats.stopReason, "closed");
    assert.equal(stats.coverageStart, null);
    const warnings = reports.filter((r) => r.reason === "coverage");
    assert.equal(warnings.length, 1, JSON.stringify(reports));
    assert.match(
      warnings[0].message,
      /^could not find where 127\.0\.0\.1:\d+'s history begins: it sent no event when asked for all it holds; a start before it would go unnoticed$/,
    );
    await assert.rejects(
      () => runBackfillSync({ instance, kv: db.path, queueName: "s", startTimestamp: start, strict: true }),
      (err: unknown) =>
        err instanceof UsageError &&
        /history begins: it sent no event .*\(refused by --strict \/ strict: true\)$/.test(err.message),
    );
  }
});

Deno.test("runBackfillSync() leaves a start near now alone when the probe gets no event, strict or not", async () => {
  for (const [version, wire] of [["legacy", "/subscribe"], ["v2", V2_SUBSCRIBE_PATH]] as const) {
    await using server = serveEvents([], { closeAtEnd: true, version });
    await using db = await tempDb();
    const { stats, reports } = await syncReporting({
      instance: server.url.replace(/\/subscribe$/, wire),
      kv: db.path,
      startTimestamp: Date.now() * 1000 - 2_000_000,
      strict: true,
    });
    assert.equal(stats.stopReason, "closed");
    assert.deepEqual(reports.filter((r) => r.reason === "coverage"), []);
  }
});

Deno.test("a v2 host whose oldest event is an import still has its OutdatedCursor heard: the start was clamped", async () => {
  // The host holds seqs from 1101 on (the 100 events before are gone), and its oldest hundred, from
  // seq 1101, are an operator's import with display times a day before the start: more than the
  // probe looks at to tell an import from the history's start, so by display time it finds the start
  // covered; the connection's OutdatedCursor says otherwise. (Before, it was not heard once the probe
  // had measured: no warning, startClamped false, and --strict stored all the same.)
  const events = Array.from({ length: 600 }, (_, i) => commit(T0 + i * 1000, { text: `p${i}` }));
  for (let j = 0; j < 100; j++) {
    events[100 + j] = { ...events[100 + j], time_us: T0 - 86_400_000_000 + 7 + j };
  }
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true, lookbackFloorSeq: 1101 });
  await using db = await tempDb();
  const reports: SyncErrorReport[] = [];
  const options = {
    instance: server.url.replace(/\/subscribe$/, V2_SUBSCRIBE_PATH),
    kv: db.path,
    startTimestamp: T0,
    wantedCollections: [],
    onError: (r: SyncErrorReport) => reports.push(r),
  };
  const stats = await runBackfillSync(options);
  assert.equal(stats.startClamped, true);
  assert.equal(stats.recordsStored, 400);
  const said = `said that its history begins after the requested start, ${
    isoFromUs(T0)
  } (OutdatedCursor), though the first event it sent has an earlier display time, ${
    isoFromUs(T0 - 86_400_000_000 + 7)
  } (an import of older records): events after ${
    isoFromUs(T0)
  } cannot be had from this server, and how many cannot be told`;
  assert.ok(
    reports.some((r) => r.reason === "coverage" && r.message.endsWith(said)),
    JSON.stringify(reports.map((r) => r.message)),
  );
  await using strictDb = await tempDb();
  await assert.rejects(
    () => runBackfillSync({ ...options, kv: strictDb.path, strict: true }),
    (err: unknown) => err instanceof UsageError && err.message.includes("(OutdatedCursor)"),
  );
});

Deno.test("probeCoverageStart() on a v2 host waits a moment for more events than the oldest, and takes an import's display time for none", async () => {
  // The oldest event (seq 7), an import shown a year back, comes alone; the next ones 30 ms later,
  // as separate reads. Legacy events (no seq) are judged by the first alone.
  const year = 365 * 86_400_000_000;
  const frames = (seq: number, us: number) => JSON.stringify({ ...commit(us, { text: "x" }), cursor: seq });
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    const legacy = new URL(request.url).searchParams.has("legacy");
    socket.onopen = () => {
      socket.send(legacy ? JSON.stringify(commit(T0 - year, { text: "x" })) : frames(7, T0 - year));
      setTimeout(() => {
        for (let i = 1; i <= 5; i++) {
          socket.send(legacy ? JSON.stringify(commit(T0 + i, { text: "x" })) : frames(7 + i, T0 + i));
        }
      }, 30);
    };
    return response;
  });
  try {
    const base = `ws://127.0.0.1:${server.addr.port}/subscribe`;
    assert.deepEqual(await probeCoverageStart(base), { us: T0 + 1, seq: 7 });
    assert.deepEqual(await probeCoverageStart(`${base}?legacy`), { us: T0 - year, seq: undefined });
  } finally {
    await server.shutdown();
  }
});

Deno.test("a quiet v2 host, its events hours apart, is not taken for one whose oldest event is an import", async () => {
  // One event every 2 hours, all shown when witnessed: the start at the oldest is covered, on both wires.
  const H = 3_600_000_000;
  const first = Date.now() * 1000 - 80 * H;
  const events = Array.from({ length: 40 }, (_, i) => commit(first + i * 2 * H, { text: `p${i}` }));
  await using server = serveEvents(events, { version: "v2", closeAtEnd: true });
  assert.deepEqual(await probeCoverageStart(server.url), { us: first, seq: 1001 });
  for (const wire of ["/subscribe", V2_SUBSCRIBE_PATH]) {
    await using db = await tempDb();
    const stats = await runBackfillSync({
      instance: server.url.replace(/\/subscribe$/, wire),
      kv: db.path,
      startTimestamp: first,
      strict: true,
    });
    assert.equal(stats.recordsStored, 40, wire);
    assert.equal(stats.startClamped, false, wire);
    assert.equal(stats.coverageStart, first, wire);
  }
});

Deno.test("a start a moment before a server's oldest event says how long a moment, never 0.0 s", async () => {
  for (
    const [afterUs, said] of [[17_249, "17 ms"], [400, "400 µs"], [250_000, "0.3 s"]] as const
  ) {
    await using server = serveEvents([commit(T0 + afterUs), commit(T0 + afterUs + 1000)], {
      closeAtEnd: true,
    });
    await using db = await tempDb();
    const { stats, reports } = await syncReporting({ instance: server.url, kv: db.path, startTimestamp: T0 });
    assert.equal(stats.coverageGapUs, afterUs);
    assert.deepEqual(reports.filter((r) => r.reason === "coverage").map((r) => r.message), [
      `127.0.0.1:${new URL(server.url).port} only holds events from ${
        isoFromUs(T0 + afterUs)
      } on; the requested start, ${
        isoFromUs(T0)
      }, is ${said} earlier, so events in between cannot be had from this server`,
    ]);
  }
});

Deno.test("probeCoverageStart() that has no answer in its time says so, not 'aborted'", async () => {
  // Accepts TCP connections and never answers the upgrade.
  await withSilentPort(async (port) => {
    const url = `ws://127.0.0.1:${port}/subscribe`;
    await assert.rejects(() => probeCoverageStart(url, { timeoutMs: 300 }), /: no answer within 0\.3 s$/);
    // The caller's own abort is still an abort.
    await assert.rejects(
      () => probeCoverageStart(url, { timeoutMs: 5000, signal: AbortSignal.timeout(200) }),
      /: aborted$/,
    );
  });
});

Deno.test("probeCoverageStart() refused near the end of its time keeps the refusal's status and Retry-After", async () => {
  // A 503 whose body never comes whole: the client reads it for a while, past the probe's time.
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held: Deno.Conn[] = [];
  const serving = (async () => {
    for await (const conn of listener) {
      held.push(conn);
      await conn.read(new Uint8Array(4096));
      await conn.write(
        new TextEncoder().encode(
          "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\nContent-Length: 100\r\n\r\nbusy",
        ),
      );
    }
  })().catch(() => {});
  try {
    const url = `ws://127.0.0.1:${(listener.addr as Deno.NetAddr).port}/subscribe`;
    const err = await probeCoverageStart(url, { timeoutMs: 500 }).catch((e: unknown) => e);
    // (Before: a ConnectError with the text alone, which a sync retried as a network failure.)
    assert.ok(err instanceof ConnectError, String(err));
    assert.equal(err.status, 503, err.message);
    assert.equal(err.retryAfterMs, 30_000);
  } finally {
    listener.close();
    for (const conn of held) conn.close();
    await serving;
  }
});

Deno.test("probeCoverageStart() over wss:// to a server that never answers the TLS handshake says what a plain server needs", async () => {
  await withSilentPort(async (port) => {
    await assert.rejects(
      () => probeCoverageStart(`wss://127.0.0.1:${port}/subscribe`, { timeoutMs: 300 }),
      new RegExp(
        `no answer to the TLS handshake within 0\\.3 s; if this server speaks plain WebSocket, give ws://127\\.0\\.0\\.1:${port}/subscribe`,
      ),
    );
  });
});

Deno.test("runBackfillSync() with several instances takes the one that holds the start over one whose history begins after it", async () => {
  // (Before: the first instance's gap was warned of and taken, though the second held it all.)
  await using late = serveEvents(events.slice(30), { closeAtEnd: true });
  await using whole = serveEvents(events, { closeAtEnd: true });
  for (const strict of [false, true]) {
    await using db = await tempDb();
    const { stats, reports } = await syncReporting({
      instance: [late.url, whole.url],
      kv: db.path,
      startTimestamp: T0,
      strict,
    });
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.equal(stats.recordsStored, 100);
    assert.equal(stats.coverageGapUs, 0);
    assert.equal(stats.startClamped, false);
    assert.deepEqual(reports.filter((r) => r.reason === "coverage"), []);
    assert.ok(
      reports.some((r) =>
        r.reason === "connection" &&
        r.message ===
          `127.0.0.1:${new URL(late.url).port} only holds events from ${
            isoFromUs(T0 + 30_000_000)
          } on, after the requested start, ${isoFromUs(T0)}: trying 127.0.0.1:${
            new URL(whole.url).port
          }, which may hold it`
      ),
      JSON.stringify(reports),
    );
  }
});

Deno.test("runBackfillSync() with several instances that all begin after the start takes the one whose history begins first", async () => {
  await using from10 = serveEvents(events.slice(10), { closeAtEnd: true });
  await using from30 = serveEvents(events.slice(30), { closeAtEnd: true });
  for (const order of [[from30, from10], [from10, from30]]) {
    await using db = await tempDb();
    const { stats, reports } = await syncReporting({
      instance: order.map((s) => s.url),
      kv: db.path,
      startTimestamp: T0,
    });
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.equal(stats.recordsStored, 90);
    assert.equal(stats.coverageGapUs, 10_000_000);
    assert.equal(stats.startClamped, true);
    const coverage = reports.filter((r) => r.reason === "coverage");
    assert.equal(coverage.length, 1, JSON.stringify(reports));
    assert.match(
      coverage[0].message,
      new RegExp(`^127\\.0\\.0\\.1:${new URL(from10.url).port} only holds events from `),
    );
    // Tried first, and left, the one whose history begins first is gone back to.
    const back = reports.filter((r) => r.reason === "connection" && /: back to /.test(r.message));
    assert.deepEqual(
      back.map((r) => r.message.replace(/^.*: back to /, "")),
      order[0] === from10 ? [`127.0.0.1:${new URL(from10.url).port}, whose history begins first`] : [],
    );
  }
});

Deno.test("runBackfillSync() with several instances leaves one that sends no event when asked for all it holds for the others", async () => {
  // (Before: coverage was reported unknown and the quiet instance kept the run until its end.)
  // It accepts and never sends: a host that holds nothing, or has hung, looks the same.
  await using quiet = serveEvents([]);
  await using whole = serveEvents(events, { closeAtEnd: true });
  await using late = serveEvents(events.slice(30), { closeAtEnd: true });
  const host = (s: { url: string }) => `127.0.0.1:${new URL(s.url).port}`;
  const quietSaid = `${host(quiet)} sent no event when asked for all it holds, so it may not hold the ` +
    `requested start, ${isoFromUs(T0)}: `;
  const cases = [
    { order: [quiet, whole], stored: 100, then: `trying ${host(whole)}, which may hold it` },
    // Tried after the late one, the quiet one is left for it: its history is known to begin first.
    { order: [late, quiet], stored: 70, then: `back to ${host(late)}, whose history begins first` },
  ];
  for (const { order, stored, then } of cases) {
    await using db = await tempDb();
    const { stats, reports } = await syncReporting({
      instance: order.map((s) => s.url),
      kv: db.path,
      startTimestamp: T0,
      idleTimeout: 1,
      maxTime: 30,
    });
    assert.equal(stats.stopReason, "closed", stats.error);
    assert.equal(stats.recordsStored, stored);
    const said = reports.filter((r) => r.reason === "connection" && r.message.startsWith(quietSaid));
    assert.deepEqual(said.map((r) => r.message.slice(quietSaid.length)), [then], JSON.stringify(reports));
    // The late one's gap is the only coverage warning: the quiet one's is not given, as it was left.
    assert.deepEqual(
      reports.filter((r) => r.reason === "coverage").map((r) => r.message.split(" ")[0]),
      stored === 70 ? [host(late)] : [],
      JSON.stringify(reports),
    );
  }
});

Deno.test("a strict run whose instances all send no event when asked for all they hold is refused once each was tried", async () => {
  await using first = serveEvents([]);
  await using second = serveEvents([]);
  await using db = await tempDb();
  const reports: SyncErrorReport[] = [];
  await assert.rejects(
    () =>
      runBackfillSync({
        instance: [first.url, second.url],
        kv: db.path,
        startTimestamp: T0,
        strict: true,
        idleTimeout: 1,
        maxTime: 30,
        onError: (r) => reports.push(r),
      }),
    (err: unknown) =>
      err instanceof UsageError &&
      new RegExp(
        `^could not find where 127\\.0\\.0\\.1:${
          new URL(second.url).port
        }'s history begins: it sent no event .*\\(refused by --strict / strict: true\\)$`,
      )
        .test(err.message),
  );
  // The first was left for the second, which was then the last to try.
  assert.equal(
    reports.filter((r) => r.reason === "connection" && / sent no event .*: trying /.test(r.message)).length,
    1,
  );
});

Deno.test("a coverage probe whose connection ends in trouble before any event rejects, to be retried: a normal close alone is an empty history", async () => {
  // (Before: each of these was taken for a server that holds nothing.)
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (request) => {
    const { socket, response } = Deno.upgradeWebSocket(request);
    const how = new URL(request.url).searchParams.get("how");
    socket.onopen = () => {
      if (how === "error") {
        socket.send(JSON.stringify({ $type: "error", error: "InternalError", message: "read failed" }));
        socket.close(1000);
      } else if (how === "foreign") {
        // Another namespace's commit, older: no event of this wire, so not where its history begins.
        const frame = ($type: string, seq: number, us: number) =>
          JSON.stringify({
            $type: "message",
            payload: {
              $type,
              seq,
              did: "did:plc:x",
              time: isoFromUs(us),
              ...{ rev: "r", operation: "create", collection: "app.bsky.feed.post", rkey: "k" },
            },
          });
        socket.send(frame("com.example.other#commit", 1, T0 - DAY));
        socket.send(frame("network.bsky.jetstream.subscribeEvents#commit", 9, T0));
        socket.close(1000);
      } else if (how === "replay") socket.close(1000, "failed to replay events");
      else if (how === "away") socket.close(1001, "server shutting down");
      else socket.close(1000);
    };
    return response;
  });
  try {
    const base = `ws://127.0.0.1:${server.addr.port}/subscribe`;
    const v2 = `ws://127.0.0.1:${server.addr.port}${V2_SUBSCRIBE_PATH}`;
    assert.equal(await probeCoverageStart(base), null);
    await assert.rejects(
      () => probeCoverageStart(`${base}?how=replay`),
      /^Error: its connection closed before any event came \(code 1000: failed to replay events\)$/,
    );
    await assert.rejects(
      () => probeCoverageStart(`${base}?how=away`),
      /^Error: its connection closed before any event came \(code 1001: server shutting down\)$/,
    );
    await assert.rejects(
      () => probeHistoryStart(`${v2}?how=error`),
      /^Error: it sent an error frame before any event: InternalError: read failed$/,
    );
    assert.deepEqual(await probeHistoryStart(`${v2}?how=foreign`), { us: T0, seq: 9 });
  } finally {
    await server.shutdown();
  }
});

Deno.test("a coverage probe dropped before any event is retried, and --strict goes on once one answers", async () => {
  // (Before: taken for a server that sent nothing when asked for all it holds, so strict refused.)
  await using whole = serveEvents(events, { closeAtEnd: true });
  await using dropping = upgradeThenDropServer();
  await using relay = tcpRelay((n) => n === 1 ? dropping.port : Number(new URL(whole.url).port));
  await using db = await tempDb();
  const { stats, reports } = await syncReporting({
    instance: `ws://127.0.0.1:${relay.port}/subscribe`,
    kv: db.path,
    startTimestamp: T0,
    strict: true,
  });
  assert.equal(stats.stopReason, "closed", stats.error);
  assert.equal(stats.recordsStored, 100);
  assert.equal(stats.coverageStart, T0);
  assert.equal(dropping.accepted(), 1);
  assert.ok(
    reports.some((r) =>
      /history begins: its connection closed before any event came \(code 1006/.test(r.message)
    ),
    JSON.stringify(reports),
  );
});
