import assert from "node:assert/strict";
import { V2_SUBSCRIBE_PATH } from "../src/jetstream/v2.ts";
import { UsageError } from "../src/errors.ts";
import { instanceUrl, PUBLIC_INSTANCES, resolveSyncOptions } from "../src/options.ts";
import type { BackfillSyncOptions } from "../src/options.ts";

function rejects(options: unknown, pattern: RegExp): void {
  assert.throws(() => resolveSyncOptions(options as BackfillSyncOptions), (err: unknown) => {
    assert.ok(err instanceof UsageError, `expected a UsageError, got ${err}`);
    assert.match(err.message, pattern);
    return true;
  });
}

Deno.test("resolveSyncOptions() fills in the original's defaults", () => {
  const o = resolveSyncOptions();
  assert.deepEqual(o.wantedCollections, ["app.bsky.feed.post"]);
  assert.deepEqual(o.kinds, ["commit"]);
  assert.equal(o.numRecords, 10000);
  assert.equal(o.maxTimeMs, 900_000);
  assert.equal(o.queueName, "jetstream_sync");
  assert.equal(o.batchSize, 100);
  assert.equal(o.compress, false);
  assert.deepEqual(o.instances, [`wss://${PUBLIC_INSTANCES[0]}/subscribe`]);
  assert.equal(o.startUs, undefined);
});

Deno.test("PUBLIC_INSTANCES lists the four legacy hosts and the two v2 hosts", () => {
  assert.equal(PUBLIC_INSTANCES.length, 6);
  assert.equal(PUBLIC_INSTANCES.filter((h) => /^jetstream\d\./.test(h)).length, 4);
  assert.ok(PUBLIC_INSTANCES.includes("jetstream.us-east.bsky.network"));
  assert.ok(PUBLIC_INSTANCES.includes("jetstream.us-west.bsky.network"));
});

Deno.test("resolveSyncOptions() converts the window to UTC microseconds", () => {
  const o = resolveSyncOptions({ startTimestamp: "2024-01-01", endTimestamp: "2024-01-07-12:00:00" });
  assert.equal(o.startUs, Date.UTC(2024, 0, 1) * 1000);
  assert.equal(o.endUs, Date.UTC(2024, 0, 7, 12) * 1000);
});

Deno.test("resolveSyncOptions() names the bad value and what was expected", () => {
  rejects({ batchSize: 0 }, /'batchSize' must be a positive integer: current value is 0/);
  rejects({ numRecords: -5 }, /'numRecords' must be a positive integer: current value is -5/);
  rejects({ numRecords: 1.5 }, /'numRecords' must be a positive integer: current value is 1.5/);
  rejects({ numRecords: NaN }, /'numRecords' must be a positive integer: current value is NaN/);
  rejects({ maxTime: Infinity }, /'maxTime' must be a positive number of seconds: current value is Infinity/);
  rejects({ maxTime: 0 }, /'maxTime' must be a positive number of seconds: current value is 0/);
  rejects({ kv: "" }, /'kv' must be a Deno.Kv or a database path: current value is ""/);
  rejects(
    { zstdDictionary: "" },
    /'zstdDictionary' must be a file path or the dictionary's bytes: current value is ""/,
  );
  rejects(
    { startTimestamp: "01/02/2024" },
    /'startTimestamp' must be YYYY-MM-DD.*current value is "01\/02\/2024"/,
  );
  rejects({ endTimestamp: "2024-02-30" }, /'endTimestamp' must be .*"2024-02-30"/);
  rejects(
    { wantedDids: ["did:plc:nope"] },
    /'wantedDids' must be did:plc: or did:web: DIDs \(did:plc: then 24 characters of a-z and 2-7; did:web: then a host name\): current value is "did:plc:nope"/,
  );
  rejects(
    { wantedCollections: ["app.bsky.graph.fo*"] },
    /'wantedCollections' must be NSIDs.*"app.bsky.graph.fo\*"/,
  );
  // A one-segment prefix: the legacy wire takes it, the v2 wire answers 400 (protocol doc §1.3).
  assert.deepEqual(resolveSyncOptions({ wantedCollections: ["app.*"] }).wantedCollections, ["app.*"]);
  rejects(
    { wantedCollections: ["app.*"], instance: "jetstream.us-east.bsky.network" },
    /'wantedCollections' must be prefixes of at least two segments such as app.bsky.\* on the v2 wire \(jetstream.us-east.bsky.network\): current value is "app.\*"/,
  );
  assert.deepEqual(
    resolveSyncOptions({ wantedCollections: ["app.bsky.*"], instance: "jetstream.us-east.bsky.network" })
      .wantedCollections,
    ["app.bsky.*"],
  );
  rejects(
    { kinds: ["heartbeat"] },
    /'kinds' must be one of commit, identity, account: current value is "heartbeat"/,
  );
  rejects({ kinds: [] }, /'kinds' must be at least one/);
  rejects(
    { instance: "http://example.com" },
    /'instance' must be a host name or a ws:\/\/ or wss:\/\/ URL: current value is "http:\/\/example.com"/,
  );
  // No host: the URL parser takes the path for one (before, a host "subscribe" was tried 11 times).
  rejects(
    { instance: "ws:///subscribe" },
    /'instance' must be a ws:\/\/ or wss:\/\/ URL with a host after the \/\/: current value is "ws:\/\/\/subscribe"/,
  );
  // A host with a port no URL can hold (a TypeError from URL before).
  rejects(
    { instance: "127.0.0.1:70000" },
    /'instance' must be a host name or a ws:\/\/ or wss:\/\/ URL: current value is "127.0.0.1:70000"/,
  );
  // A filter or cursor in the URL's query string would be replaced by jetfill's own without a word.
  rejects(
    { instance: "ws://127.0.0.1:6008/subscribe?wantedCollections=app.bsky.feed.like" },
    /'instance' must be a URL without wantedCollections in its query string \(jetfill sets it from --collection \/ wantedCollections\): current value is "ws:/,
  );
  rejects(
    {
      instance: [
        "ws://127.0.0.1:6008/subscribe",
        "wss://h.example/xrpc/network.bsky.jetstream.subscribeEvents?cursor=5",
      ],
    },
    /'instance' must be a URL without cursor in its query string \(jetfill sets it from --start/,
  );
  rejects({ queueName: "../etc" }, /'queueName' must be .*"..\/etc"/);
  rejects({ batchSize: "100" }, /'batchSize' must be a positive integer: current value is "100"/);
  rejects({ bogus: 1 }, /'bogus' is not an option of runBackfillSync\(\)$/);
  // A misspelling, or the CLI's name for it, gets the option it most likely meant.
  rejects(
    { wantedDid: [] },
    /'wantedDid' is not an option of runBackfillSync\(\) \(did you mean 'wantedDids'\?\)$/,
  );
  rejects({ numrecords: 5 }, /\(did you mean 'numRecords'\?\)$/);
  rejects({ limit: 5 }, /\(did you mean 'numRecords'\?\)$/);
  rejects({ collections: [] }, /\(did you mean 'wantedCollections'\?\)$/);
  rejects({ queue: "q" }, /\(did you mean 'queueName'\?\)$/);
});

Deno.test("resolveSyncOptions() says what a refused integer timestamp looks like, or what an integer is taken as", () => {
  rejects(
    { startTimestamp: "0" },
    /current value is "0" \(an integer is taken as unix microseconds, from 1000000000000000 on: 16 digits/,
  );
  rejects({ startTimestamp: 42 }, /current value is 42 \(an integer is taken as unix microseconds/);
  rejects(
    { startTimestamp: 1764000000 },
    /\(1764000000 looks like seconds; in microseconds that is 1764000000000000\)/,
  );
  rejects(
    { endTimestamp: "1764000000123" },
    /\(1764000000123 looks like milliseconds; in microseconds that is 1764000000123000\)/,
  );
  rejects(
    { startTimestamp: "1764000000123456789" },
    /\(1764000000123456789 looks like nanoseconds; in microseconds that is 1764000000123456\)/,
  );
  rejects({ startTimestamp: "17640000001234567" }, /\(an integer is taken as unix microseconds/);
});

Deno.test("resolveSyncOptions() takes force with or without resume", () => {
  assert.equal(resolveSyncOptions({ force: true }).force, true);
  assert.equal(resolveSyncOptions({ force: true, resume: true }).force, true);
});

Deno.test("resolveSyncOptions() refuses an end that is not after the start", () => {
  rejects(
    { startTimestamp: "2024-01-07", endTimestamp: "2024-01-01" },
    /'endTimestamp' must be after 'startTimestamp': 2024-01-01T00:00:00.000000Z is not after 2024-01-07T00:00:00.000000Z/,
  );
});

Deno.test("resolveSyncOptions() refuses an end in the past without a start: the live stream is past it", () => {
  rejects(
    { endTimestamp: "2020-01-01" },
    /'endTimestamp' must be in the future when no 'startTimestamp' is given \(the run then follows the live stream from now; give a 'startTimestamp' for a past window\): current value is 2020-01-01T00:00:00.000000Z$/,
  );
  const soon = Date.now() * 1000 + 3_600_000_000;
  assert.equal(resolveSyncOptions({ endTimestamp: soon }).endUs, soon);
  // A resume starts where its queue stopped, not from now.
  assert.equal(resolveSyncOptions({ endTimestamp: "2020-01-01", resume: true }).endUs, 1_577_836_800_000_000);
});

Deno.test("resolveSyncOptions() refuses a start after the run's time limit: it could store nothing", () => {
  rejects(
    { startTimestamp: "2062-01-01" },
    /'startTimestamp' must be before the run's time limit \('maxTime', 900 s\) is over: current value is 2062-01-01T00:00:00.000000Z, later than that, so no event could be stored$/,
  );
  const inAMinute = Date.now() * 1000 + 60_000_000;
  rejects({ startTimestamp: inAMinute, maxTime: 30 }, /\('maxTime', 30 s\)/);
  // Within the time limit: the run waits for the window to begin, on the live stream.
  assert.equal(resolveSyncOptions({ startTimestamp: inAMinute, maxTime: 120 }).startUs, inAMinute);
  // A bad maxTime is named as such, not taken for a reason to refuse the start.
  rejects({ startTimestamp: inAMinute, maxTime: -1 }, /'maxTime' must be a positive number of seconds/);
});

Deno.test("resolveSyncOptions() enforces Jetstream's DID and collection limits", () => {
  const dids = Array.from({ length: 10_001 }, (_, i) => `did:web:host${i}.example`);
  rejects({ wantedDids: dids }, /at most 10000 DIDs.*has 10001/);
  const colls = Array.from({ length: 101 }, (_, i) => `app.bsky.c${i}.x`);
  rejects({ wantedCollections: colls }, /at most 100 collections.*has 101/);
  assert.equal(resolveSyncOptions({ wantedDids: dids.slice(0, 10_000) }).wantedDids.length, 10_000);
});

Deno.test("instanceUrl() turns hosts into wss URLs and keeps given URLs", () => {
  assert.equal(
    instanceUrl("jetstream2.us-west.bsky.network"),
    "wss://jetstream2.us-west.bsky.network/subscribe",
  );
  assert.equal(instanceUrl("ws://127.0.0.1:6008"), "ws://127.0.0.1:6008/subscribe");
  assert.equal(instanceUrl("ws://127.0.0.1:6008/subscribe"), "ws://127.0.0.1:6008/subscribe");
  assert.equal(instanceUrl("localhost:6008"), "wss://localhost:6008/subscribe");
});

Deno.test("instanceUrl() gives the v2 hosts the v2 wire by default, and `wire` overrides it", () => {
  const v2 = V2_SUBSCRIBE_PATH;
  assert.equal(instanceUrl("jetstream.us-east.bsky.network"), `wss://jetstream.us-east.bsky.network${v2}`);
  assert.equal(
    instanceUrl("jetstream.us-west.bsky.network", "v1"),
    "wss://jetstream.us-west.bsky.network/subscribe",
  );
  assert.equal(instanceUrl("ws://127.0.0.1:6008/subscribe", "v2"), `ws://127.0.0.1:6008${v2}`);
  assert.equal(instanceUrl(`ws://127.0.0.1:6008${v2}`), `ws://127.0.0.1:6008${v2}`);
  assert.deepEqual(resolveSyncOptions({ instance: "jetstream.us-east.bsky.network", wire: "v1" }).instances, [
    "wss://jetstream.us-east.bsky.network/subscribe",
  ]);
});

Deno.test("with over 50 DIDs the v2 hosts' default is /subscribe, whose hello takes them; a v2 wire asked for stays", () => {
  const dids = (n: number) => Array.from({ length: n }, (_, i) => `did:web:a${i}.example`);
  const hosts = ["jetstream.us-east.bsky.network", "jetstream1.us-east.bsky.network", "ws://127.0.0.1:6008"];
  const v2 = `wss://jetstream.us-east.bsky.network${V2_SUBSCRIBE_PATH}`;
  // (Before: the v2 wire, whatever the count, and so 51 DIDs or 10,000 in the URL.)
  assert.deepEqual(resolveSyncOptions({ instance: hosts, wantedDids: dids(51) }).instances, [
    "wss://jetstream.us-east.bsky.network/subscribe",
    "wss://jetstream1.us-east.bsky.network/subscribe",
    "ws://127.0.0.1:6008/subscribe",
  ]);
  assert.equal(resolveSyncOptions({ instance: hosts[0], wantedDids: dids(50) }).instances[0], v2);
  assert.equal(resolveSyncOptions({ instance: hosts[0], wantedDids: dids(51), wire: "v2" }).instances[0], v2);
  assert.equal(resolveSyncOptions({ instance: v2, wantedDids: dids(51) }).instances[0], v2);
  // Few but long: over 1,600 characters of DIDs go in the hello as well.
  const long = Array.from({ length: 8 }, (_, i) => `did:web:${"l".repeat(200)}${i}.example`);
  assert.equal(
    resolveSyncOptions({ instance: hosts[0], wantedDids: long }).instances[0],
    "wss://jetstream.us-east.bsky.network/subscribe",
  );
  assert.equal(resolveSyncOptions({ instance: hosts[0], wantedDids: long.slice(0, 7) }).instances[0], v2);
});
