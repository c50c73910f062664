import assert from "node:assert/strict";
import { runBackfillSync } from "../src/backfill.ts";
import type { BackfillSyncOptions } from "../src/options.ts";
import { UsageError } from "../src/errors.ts";
import type { JetstreamEvent } from "../src/jetstream/events.ts";
import { decodeQueueMessage, type QueueMessage } from "../src/queue/message.ts";
import type { SyncErrorReport, SyncStats } from "../src/stats.ts";
import { commit, did, drainQueue, identity } from "./helpers/events.ts";
import { refusedPort, serveEvents, syncConnections, tempDb, withSilentPort } from "./helpers/loopback.ts";
import { zstdFrames } from "./helpers/zstd_cli.ts";
import { legacyDictionary, v2Dictionary } from "./helpers/dictionaries.ts";
import { spawnServer } from "../scripts/spawn_server.ts";
import { readCheckpoint } from "../src/queue/kv_queue.ts";
import { relative } from "node:path";
import { killIfRunning, runCli, spawnCli } from "./helpers/cli.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;

function capture(n: number): JetstreamEvent[] {
  return Array.from({ length: n }, (_, i) =>
    i % 40 === 7 ? identity(T0 + i * 1000) : commit(T0 + i * 1000, {
      did: did(i % 5),
      collection: i % 2 ? "app.bsky.feed.like" : "app.bsky.feed.post",
      text: `投稿 number ${i} with some text 😀 `.repeat(1 + (i % 4)),
    }));
}

/** A compressor serving frames made by the zstd CLI, looked up by event text. */
async function cliCompressor(
  events: JetstreamEvent[],
  dict: string,
  noContentSize = false,
  noDictId = false,
) {
  const texts = events.map((e) => JSON.stringify(e));
  const frames = await zstdFrames(texts, dict, noContentSize, noDictId);
  const table = new Map(texts.map((t, i) => [t, frames[i]]));
  return (text: string) => {
    const frame = table.get(text);
    if (!frame) throw new Error("no frame for event");
    return frame;
  };
}

async function storedEvents(path: string, messages: number): Promise<JetstreamEvent[]> {
  const msgs = (await drainQueue(path, messages)) as QueueMessage[];
  return msgs.sort((a, b) => a.seq - b.seq).flatMap((m) => decodeQueueMessage(m));
}

for (const noContentSize of [false, true]) {
  Deno.test(`runBackfillSync() stores every event of a compressed stream of zstd CLI frames${noContentSize ? " without content size" : ""}`, async () => {
    const legacyDict = await legacyDictionary();
    const events = capture(300);
    await using server = serveEvents(events, {
      closeAtEnd: true,
      compressor: await cliCompressor(events, legacyDict.path, noContentSize),
    });
    await using db = await tempDb();
    const stats = await runBackfillSync({
      instance: server.url,
      kv: db.path,
      compress: true,
      zstdDictionary: legacyDict.path,
      startTimestamp: T0,
      wantedCollections: ["app.bsky.feed.post", "app.bsky.feed.like"],
    });
    assert.equal(stats.stopReason, "closed");
    assert.ok(syncConnections(server)[0].query.includes("compress=true"));
    const expected = events.filter((e) => e.kind === "commit");
    assert.equal(stats.recordsStored, expected.length);
    assert.deepEqual(await storedEvents(db.path, stats.queueLength), expected);
    assert.equal(stats.messagesReceived, 300);
    assert.ok(
      stats.bytesDecoded > stats.bytesReceived * 1.3,
      `${stats.bytesDecoded} decoded from ${stats.bytesReceived}`,
    );
    assert.deepEqual(stats.skipped, {});
  });
}

/**
 * A compressed sync of every commit and identity event from `url` with the legacy dictionary (as a
 * path, or as bytes), and what it reported.
 */
async function syncCompressed(
  url: string,
  dictionary?: string | Uint8Array,
  extra: BackfillSyncOptions = {},
): Promise<{ stats: SyncStats; errors: SyncErrorReport[] }> {
  dictionary ??= (await legacyDictionary()).path;
  await using db = await tempDb();
  const errors: SyncErrorReport[] = [];
  const stats = await runBackfillSync({
    instance: url,
    kv: db.path,
    compress: true,
    zstdDictionary: dictionary,
    startTimestamp: T0,
    kinds: ["commit", "identity"],
    wantedCollections: [],
    onError: (e) => errors.push(e),
    ...extra,
  });
  return { stats, errors };
}

/** The cache folder of this Deno (`deno info --json`). */
async function denoDir(): Promise<string> {
  const out = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"], stdout: "piped" }).output();
  return JSON.parse(new TextDecoder().decode(out.stdout)).denoDir;
}

/**
 * A compressed run stopped after 120 of 300 events, with nowhere to find the dictionary but the copy
 * it was given (no environment variable, an empty cache, and no network in tests): runs `body` with
 * the server, the database, the copy's path and the events, then puts the environment back.
 */
async function withStoppedCompressedRun(
  dictionaryOption: (copy: string) => string,
  body: (run: { db: string; dictionary: string; events: JetstreamEvent[] }) => Promise<void>,
): Promise<void> {
  const legacyDict = await legacyDictionary();
  const events = capture(300);
  // The first run's probe and connection stall after 120 events.
  await using server = serveEvents(events, {
    compressor: await cliCompressor(events, legacyDict.path),
    faults: { stallAfter: 120, stallConnections: 2 },
  });
  await using db = await tempDb();
  const dir = await Deno.makeTempDir();
  const saved = ["JETFILL_ZSTD_DICTIONARY", "XDG_CACHE_HOME", "DENO_DIR"].map((name) =>
    [name, Deno.env.get(name)] as const
  );
  try {
    const dictionary = `${dir}/legacy.zdict`;
    await Deno.copyFile(legacyDict.path, dictionary);
    // (Inherited by the CLI's processes too, whose Deno keeps using its own cache: DENO_DIR
    // otherwise follows XDG_CACHE_HOME, and the npm packages would be downloaded again.)
    Deno.env.set("DENO_DIR", await denoDir());
    Deno.env.delete("JETFILL_ZSTD_DICTIONARY");
    Deno.env.set("XDG_CACHE_HOME", `${dir}/cache`);
    const first = await runBackfillSync({
      kv: db.path,
      maxTime: 1.5,
      idleTimeout: 30,
      instance: server.url,
      compress: true,
      zstdDictionary: dictionaryOption(dictionary),
      startTimestamp: T0,
      kinds: ["commit", "identity"],
      wantedCollections: [],
    });
    assert.equal(first.stopReason, "max_time");
    assert.equal(first.recordsStored, 120);
    await body({ db: db.path, dictionary, events });
  } finally {
    for (const [name, value] of saved) {
      value === undefined ? Deno.env.delete(name) : Deno.env.set(name, value);
    }
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("a compressed run resumed with only --resume finds its dictionary again: the path given is remembered", async () => {
  const legacyDict = await legacyDictionary();
  // Given relative to the working directory; remembered as an absolute path.
  await withStoppedCompressedRun((copy) => relative(Deno.cwd(), copy), async ({ db, dictionary, events }) => {
    const kv = await Deno.openKv(db);
    const settings = (await readCheckpoint(kv, "jetstream_sync")).value?.run.settings;
    kv.close();
    assert.equal(settings?.zstdDictionary, dictionary);
    const common = { kv: db, maxTime: 1.5, idleTimeout: 30 };
    const second = await runBackfillSync({ ...common, resume: true });
    assert.equal(second.stopReason, "max_time", second.error);
    assert.ok(second.bytesDecoded > second.bytesReceived, "the resumed run is compressed too");
    assert.deepEqual(await storedEvents(db, second.queueLength), events);
    // A remembered file that has gone since is looked for as usual.
    await Deno.remove(dictionary);
    Deno.env.set("JETFILL_ZSTD_DICTIONARY", legacyDict.path);
    const third = await runBackfillSync({ ...common, resume: true });
    assert.equal(third.stopReason, "max_time", third.error);
    assert.equal(third.recordsStored, 0);
  });
});

Deno.test("a resume whose remembered dictionary file was replaced by a bad one blames that file, not the option", async () => {
  await withStoppedCompressedRun((copy) => copy, async ({ db, dictionary }) => {
    await Deno.chmod(dictionary, 0o644);
    await Deno.writeFile(dictionary, new Uint8Array(1000));
    const bad = await runCli(["sync", "--resume", "--kv", db, "--max-time", "1.5"]);
    assert.equal(bad.code, 2, bad.stderr);
    assert.match(
      bad.stderr,
      new RegExp(`dictionary that this queue's last run used, '${dictionary}', cannot be used now`),
    );
    assert.match(bad.stderr, /is not a zstd dictionary/);
    // The flag was not given this time: it is offered, not blamed.
    assert.doesNotMatch(bad.stderr, /\(from --zstd-dictionary/);
    assert.match(bad.stderr, /Give the legacy dictionary with --zstd-dictionary/);
  });
});

Deno.test("a resume whose dictionary file has gone names it, and --no-compress resumes uncompressed", async () => {
  await withStoppedCompressedRun((copy) => copy, async ({ db, dictionary, events }) => {
    await Deno.remove(dictionary);
    // The download it then tries cannot reach GitHub (denied, so that the test does not depend on
    // the network).
    const deny = ["--deny-net=raw.githubusercontent.com"];
    const lost = await runCli(["sync", "--resume", "--kv", db, "--max-time", "1.5"], deny);
    assert.equal(lost.code, 2, lost.stderr);
    assert.match(
      lost.stderr,
      new RegExp(`the zstd dictionary that this queue's last run used, '${dictionary}', is gone`, "i"),
    );
    assert.match(lost.stderr, /--zstd-dictionary PATH/);
    const plain = await runCli(
      ["sync", "--resume", "--no-compress", "--kv", db, "--max-time", "1.5", "--json"],
      deny,
    );
    const stats = JSON.parse(plain.stdout);
    assert.equal(stats.recordsStored, 180, plain.stderr);
    assert.equal(stats.bytesDecoded, 0);
    assert.deepEqual(await storedEvents(db, stats.queueLength), events);
    const both = await runCli(["sync", "--resume", "--compress", "--no-compress", "--kv", db]);
    assert.equal(both.code, 2);
    assert.match(both.stderr, /--compress and --no-compress contradict each other/);
    // Not a resume: the flag would do nothing. (Before, it was taken and ignored.)
    const fresh = await runCli(["sync", "--no-compress", "--kv", db, "--max-time", "1"]);
    assert.equal(fresh.code, 2, fresh.stderr);
    assert.match(
      fresh.stderr,
      /^jetfill sync: --no-compress is for --resume only .*; without --resume, leave out --compress\n$/,
    );
  });
});

Deno.test("sync --compress whose dictionary download fails exits 1 (the network's failure), saying how to give the dictionary", async () => {
  // HTTPS through a proxy whose port refuses: every download fails at once, as offline.
  const port = await refusedPort();
  const dir = await Deno.makeTempDir();
  try {
    const r = await runCli(
      ["sync", "--compress", "--instance", "ws://127.0.0.1:1/subscribe", "--kv", `${dir}/db.sqlite`],
      [],
      {
        HTTPS_PROXY: `http://127.0.0.1:${port}`,
        NO_PROXY: "127.0.0.1,localhost",
        XDG_CACHE_HOME: `${dir}/cache`,
        DENO_DIR: await denoDir(),
        JETFILL_ZSTD_DICTIONARY: "",
      },
    );
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /^jetfill sync: No zstd dictionary for Jetstream's compressed wire: /);
    assert.match(r.stderr, /with --zstd-dictionary PATH/);
    assert.match(r.stderr, /Downloading it failed: https:\/\//);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a resume whose dictionary download hangs stops at --max-time naming the missing file; Ctrl-C gives 130", async () => {
  await withStoppedCompressedRun((copy) => copy, async ({ db, dictionary }) => {
    await Deno.remove(dictionary);
    // HTTPS through a proxy that accepts and never answers: a network that hangs instead of failing.
    await withSilentPort(async (port) => {
      const saved = ["HTTPS_PROXY", "NO_PROXY"].map((name) => [name, Deno.env.get(name)] as const);
      Deno.env.set("HTTPS_PROXY", `http://127.0.0.1:${port}`);
      Deno.env.set("NO_PROXY", "registry.npmjs.org,localhost,127.0.0.1");
      try {
        const timedOut = await runCli(["sync", "--resume", "--kv", db, "--max-time", "1.5"]);
        assert.equal(timedOut.code, 2, timedOut.stderr);
        assert.match(timedOut.stderr, new RegExp(`last run used, '${dictionary}', is gone`));
        assert.match(
          timedOut.stderr,
          /\. Downloading it: https:\/\/\S+: not finished\. Its download had not finished when --max-time \(1\.5 s\) ran out/,
        );
        const child = spawnCli(["sync", "--resume", "--kv", db]);
        await new Promise((resolve) => setTimeout(resolve, 1500));
        killIfRunning(child, "SIGINT");
        const out = await child.output();
        assert.equal(out.code, 130, new TextDecoder().decode(out.stderr));
        // (Before: "… while starting (The signal has been aborted)".)
        assert.match(
          new TextDecoder().decode(out.stderr),
          /^jetfill sync: stopped by SIGINT before the sync was under way\n$/m,
        );
      } finally {
        for (const [name, value] of saved) {
          value === undefined ? Deno.env.delete(name) : Deno.env.set(name, value);
        }
      }
    });
  });
});

Deno.test("sync --compress without the env permission says that JETFILL_ZSTD_DICTIONARY and the cache's variables were not read", async () => {
  // (Before: "use the JETFILL_ZSTD_DICTIONARY environment variable", which was set, and "No cache
  // folder: set XDG_CACHE_HOME or HOME", which were set as well.)
  const legacyDict = await legacyDictionary();
  await using db = await tempDb();
  const out = await new Deno.Command(Deno.execPath(), {
    // No net access but to loopback: the downloads fail at once, with or without internet.
    args: [
      "run",
      "--no-prompt",
      "--unstable-kv",
      "--allow-read",
      "--allow-write",
      "--allow-net=127.0.0.1",
      new URL("../cli.ts", import.meta.url).pathname,
      ...["sync", "--compress", "--instance", "ws://127.0.0.1:1/subscribe", "--kv", db.path],
    ],
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1", JETFILL_ZSTD_DICTIONARY: legacyDict.path },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, stderr);
  assert.match(
    stderr,
    /^jetfill sync: No zstd dictionary for Jetstream's compressed wire: .* Without the env permission \(--allow-env\) JETFILL_ZSTD_DICTIONARY, XDG_CACHE_HOME, HOME were not read\. No cache folder either\. Downloading it failed: https:\/\/.*\n$/,
  );
});

Deno.test("a dictionary given without compression is refused before anything is made", async () => {
  const legacyDict = await legacyDictionary();
  await using db = await tempDb();
  const kv = `${db.dir}/never.sqlite`;
  await assert.rejects(
    () => runBackfillSync({ zstdDictionary: legacyDict.path, kv, instance: "ws://127.0.0.1:9/subscribe" }),
    (err: unknown) =>
      err instanceof UsageError &&
      err.message ===
        `Cannot sync as 'zstdDictionary' must be left out without 'compress' (it decodes compressed frames only): current value is ${
          JSON.stringify(legacyDict.path)
        }`,
  );
  const cli = await runCli(["sync", "--zstd-dictionary", legacyDict.path, "--kv", kv]);
  assert.equal(cli.code, 2);
  assert.match(
    cli.stderr,
    /sync: --zstd-dictionary must be left out without --compress \(it decodes compressed frames only\): current value is "/,
  );
  assert.equal(await Deno.stat(kv).catch(() => null), null);
});

Deno.test("the v2 dictionary given for /subscribe is refused before connecting, naming both dictionaries", async () => {
  const v2Dict = await v2Dictionary();
  await using server = serveEvents(capture(5), { closeAtEnd: true });
  await using db = await tempDb();
  await assert.rejects(
    () => runBackfillSync({ instance: server.url, kv: db.path, compress: true, zstdDictionary: v2Dict.path }),
    (err: unknown) =>
      err instanceof UsageError &&
      err.message.startsWith(
        `The zstd dictionary '${v2Dict.path}' has ID 20260811, but /subscribe connections`,
      ) &&
      err.message.includes("ID 1612007021 (legacy_subscribe.zdict, sha256 b8d77b46") &&
      err.message.includes("the v2 wire's dictionary"),
  );
  assert.equal(syncConnections(server).length, 0);
});

Deno.test("runBackfillSync() counts and reports a frame that fails to decode, and goes on", async () => {
  const legacyDict = await legacyDictionary();
  const events = capture(50);
  const good = await cliCompressor(events, legacyDict.path);
  const bad = JSON.stringify(events[20]);
  await using server = serveEvents(events, {
    closeAtEnd: true,
    // A frame with zstd's magic and garbage after it.
    compressor: (text) =>
      text === bad ? new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4, 5, 6, 7]) : good(text),
  });
  const { stats, errors } = await syncCompressed(server.url, legacyDict.bytes);
  assert.equal(stats.recordsStored, 49);
  assert.deepEqual(stats.skipped, { decode_failed: 1 });
  assert.equal(errors.filter((e) => e.reason === "decode_failed").length, 1);
  assert.match(errors.find((e) => e.reason === "decode_failed")!.message, /could not be decoded/);
});

Deno.test("runBackfillSync() counts a frame that decodes past the decoder's limit as oversized, always reported", async () => {
  const legacyDict = await legacyDictionary();
  const events = capture(30);
  // 40 MiB of one letter: a frame of a few kilobytes that would decode past the 32 MiB limit.
  const huge = commit(T0 + 15 * 1000 + 1, { did: did(1), text: "a".repeat(40 * 1024 * 1024) });
  const all = [...events.slice(0, 16), huge, ...events.slice(16)];
  await using server = serveEvents(all, {
    closeAtEnd: true,
    compressor: await cliCompressor(all, legacyDict.path),
  });
  const { stats, errors } = await syncCompressed(server.url);
  assert.equal(stats.recordsStored, 30);
  assert.deepEqual(stats.skipped, { oversized: 1 });
  assert.match(
    errors.find((e) => e.reason === "oversized")!.message,
    /^frame of \d+ bytes decodes to more than 33554432 bytes, over the 1048576-byte event limit \(--max-event-bytes \/ maxEventBytes\)$/,
  );
  // With the largest event limit, the decoder's own (the same 32 MiB), the frame is over that.
  const larger = await syncCompressed(server.url, undefined, { maxEventBytes: 32 * 1024 * 1024 });
  assert.deepEqual(larger.stats.skipped, { oversized: 1 });
  assert.match(
    larger.errors.find((e) => e.reason === "oversized")!.message,
    /^frame of \d+ bytes decodes to more than 33554432 bytes, the most a compressed frame is decoded to$/,
  );
});

/** A sync with the legacy dictionary of `n` events compressed with the v2 one (without its ID: `noDictId`). */
async function syncWithWrongDictionary(n: number, noDictId: boolean): Promise<SyncStats> {
  const legacyDict = await legacyDictionary();
  const v2Dict = await v2Dictionary();
  const events = capture(n);
  await using server = serveEvents(events, {
    closeAtEnd: true,
    compressor: await cliCompressor(events, v2Dict.path, false, noDictId),
  });
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: db.path,
    compress: true,
    zstdDictionary: legacyDict.path,
    startTimestamp: T0,
  });
  assert.equal(stats.stopReason, "error");
  assert.equal(stats.recordsStored, 0);
  return stats;
}

Deno.test("runBackfillSync() stops with a clear error when frames name another dictionary", async () => {
  const stats = await syncWithWrongDictionary(20, false);
  assert.match(
    stats.error!,
    /dictionary 20260811.*dictionary 1612007021.*; this host compresses with a dictionary other than Jetstream's legacy one: sync without compression \(without --compress \/ compress: true; on a resume, with --no-compress\)$/s,
  );
  // Five frames in a row naming it, each counted: the fifth stops the run.
  assert.equal(stats.skipped.decode_failed, 5);
});

Deno.test("runBackfillSync() stops with a clear error when frames without a dictionary ID were made with another one", async () => {
  // (Before, all 40 counted as decode_failed, one warning, and a run that "closed" with nothing stored.)
  const stats = await syncWithWrongDictionary(40, true);
  assert.match(
    stats.error!,
    /^20 frames in a row could not be decoded \(the last: .+\): the dictionary does not fit this host's frames; this host compresses with a dictionary other than Jetstream's legacy one: sync without compression \(without --compress \/ compress: true; on a resume, with --no-compress\)$/s,
  );
  assert.equal(stats.skipped.decode_failed, 20);
});

Deno.test("runBackfillSync() stops with a clear error when the binary frames are not zstd at all", async () => {
  // (Before, the error blamed the dictionary, which no dictionary could have mended.)
  const legacyDict = await legacyDictionary();
  const events = capture(40);
  const encoder = new TextEncoder();
  await using server = serveEvents(events, {
    closeAtEnd: true,
    // Binary frames of gzip-like bytes: no zstd frame magic number.
    compressor: (text) => new Uint8Array([0x1f, 0x8b, 8, 0, ...encoder.encode(text)]),
  });
  const { stats } = await syncCompressed(server.url, legacyDict.bytes);
  assert.equal(stats.stopReason, "error");
  assert.equal(stats.recordsStored, 0);
  assert.match(
    stats.error!,
    /^20 binary frames in a row were not zstd frames \(the last: .*0x00088b1f, not the zstd frame magic number 0xfd2fb528\): this host does not send Jetstream's zstd-compressed frames; sync without compression \(without --compress \/ compress: true; on a resume, with --no-compress\)$/s,
  );
  assert.equal(stats.skipped.decode_failed, 20);
});

Deno.test("runBackfillSync() names a missing or wrong dictionary file before it makes its database", async () => {
  const v2Dict = await v2Dictionary();
  await using db = await tempDb();
  const kv = `${db.dir}/new/queue.sqlite`;
  await assert.rejects(
    () => runBackfillSync({ compress: true, zstdDictionary: "/nonexistent/dict.zdict", kv }),
    (err: unknown) => err instanceof UsageError && err.message.includes("/nonexistent/dict.zdict"),
  );
  await assert.rejects(
    () => runBackfillSync({ compress: true, zstdDictionary: v2Dict.path, kv }),
    (err: unknown) =>
      err instanceof UsageError && /has ID 20260811, but \/subscribe connections/.test(err.message),
  );
  assert.deepEqual(await Array.fromAsync(Deno.readDir(db.dir)), []);
});

Deno.test("jetfill serve --zstd-dictionary serves compressed frames that jetfill sync stores", async () => {
  const legacyDict = await legacyDictionary();
  await using db = await tempDb();
  const events = capture(100);
  const file = `${db.dir}/capture.ndjson`;
  await Deno.writeTextFile(file, events.map((e) => JSON.stringify(e)).join("\n") + "\n");
  const cli = new URL("../cli.ts", import.meta.url).pathname;
  const server = await spawnServer(["--file", file, "--zstd-dictionary", legacyDict.path, "--close-at-end"]);
  const url = server.url;
  try {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        cli,
        "sync",
        "--instance",
        url,
        "--compress",
        "--zstd-dictionary",
        legacyDict.path,
        "--start",
        String(T0),
        "--collection",
        "app.bsky.feed.*",
        "--kv",
        db.path,
        "--json",
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    const stats = JSON.parse(new TextDecoder().decode(out.stdout));
    assert.equal(stats.recordsStored, events.filter((e) => e.kind === "commit").length);
    assert.ok(stats.bytesDecoded > stats.bytesReceived);
  } finally {
    await server.stop();
  }
});
