/**
 * `deno task bench`: throughput and memory figures, printed (never asserted by tests).
 *
 * - ceiling: receive + `JSON.parse` only, from the project's server in another process;
 * - end to end: `runBackfillSync()` from the same server through to Deno KV, with its ratio to the ceiling
 *   (after one untimed warm-up sync; the ceiling and the first row alternate five times, each taking
 *   its best, so that the VM slowing down or speeding up between them moves the ratio less; the rounds
 *   are printed, so that a run where it did anyway can be told; the other rows are the best of two);
 * - the same with KV on a RAM disk (/dev/shm), to separate the pipeline from the disk;
 * - end to end on the v2 wire, from the same capture served as a v2 host;
 * - the sink alone (parsed events into KV, bench/sink_alone.ts), in a process of its own;
 * - Deno KV alone: ready-made payloads enqueued in commits like the writer's, the floor under all of it;
 * - peak RSS of a 200,000-event sync into a deliberately slow sink (KV commits delayed).
 *
 * `deno task bench --quick` uses fewer events.
 *
 * @module
 */
import { serialize } from "node:v8";
import { runBackfillSync } from "../src/backfill.ts";
import { generateCapture } from "../src/server/synth.ts";
import { openConnection } from "../src/jetstream/socket.ts";
import { benchZstd } from "./zstd_bench.ts";
import { spawnServer } from "../scripts/spawn_server.ts";
import { createZstdDecoder } from "../src/jetstream/zstd.ts";
import { openKvAt } from "../src/queue/kv_queue.ts";

if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
  console.log(
    "Usage: deno task bench [--quick]\n\nPrints throughput and memory figures (about a minute on 2 cores; --quick uses 50,000 events instead of 200,000).",
  );
  Deno.exit(0);
}
const quick = Deno.args.includes("--quick");
const EVENTS = quick ? 50_000 : 200_000;
const HOUR_US = 3_600_000_000;
// Interleaved rounds of the ceiling and the first end-to-end row.
const ROUNDS = 5;
const root = new URL("..", import.meta.url).pathname;
const work = `${root}.bench`;
await Deno.mkdir(work, { recursive: true });

const startUs = Date.now() * 1000 - 40 * HOUR_US;
const capturePath = `${work}/capture-${EVENTS}.ndjson`;
const lines = generateCapture({ count: EVENTS, seed: 11, startUs, stepUs: (30 * HOUR_US) / EVENTS });
await Deno.writeTextFile(capturePath, lines.join("\n") + "\n");
const avgChars = lines.reduce((n, l) => n + l.length, 0) / lines.length;
const utf8 = new TextEncoder();
const avgBytes = lines.reduce((n, l) => n + utf8.encode(l).byteLength, 0) / lines.length;
// What KV stores of an event: its parsed form, serialized by V8 (the first 20,000 are enough).
const sample = lines.slice(0, 20_000);
const serializedBytes = sample.reduce((n, l) => n + serialize(JSON.parse(l)).length, 0) / sample.length;

/**
 * The legacy zstd dictionary for the compressed rows, which this repository does not include: the file
 * `JETFILL_ZSTD_DICTIONARY` names, else `legacy_subscribe.zdict` in the folder `JETFILL_TEST_DICTIONARIES`
 * names or in `../shared/jetstream/` (where the tests look); undefined when none of them exists.
 */
function findDictionary(): string | undefined {
  const folder = Deno.env.get("JETFILL_TEST_DICTIONARIES")?.replace(/\/$/, "");
  const candidates = [
    Deno.env.get("JETFILL_ZSTD_DICTIONARY"),
    folder === undefined ? undefined : `${folder}/legacy_subscribe.zdict`,
    `${root}../shared/jetstream/legacy_subscribe.zdict`,
  ];
  return candidates.find((path) => {
    try {
      return path !== undefined && Deno.statSync(path).isFile;
    } catch {
      return false;
    }
  });
}
const dictionary = findDictionary();

/** Starts `jetfill serve` on the capture in its own process. */
function startServer(extra: string[] = []) {
  return spawnServer(["--file", capturePath, "--port", "0", "--close-at-end", ...extra]);
}

async function ceiling(url: string): Promise<number> {
  const t0 = performance.now();
  let n = 0;
  await new Promise<void>((resolve) => {
    const ws = new WebSocket(`${url}?cursor=0`);
    ws.onmessage = (e) => {
      JSON.parse(e.data);
      n++;
    };
    ws.onclose = () => resolve();
  });
  return n / ((performance.now() - t0) / 1000);
}

async function ownCeiling(url: string): Promise<number> {
  const t0 = performance.now();
  let n = 0;
  const conn = await openConnection(`${url}?cursor=0`, { idleTimeoutMs: 30_000, maxBufferedBytes: 16 << 20 });
  for (let frames = await conn.next(); frames; frames = await conn.next()) {
    for (const f of frames) JSON.parse(f as string);
    n += frames.length;
  }
  await conn.closed();
  return n / ((performance.now() - t0) / 1000);
}

async function compressedCeiling(url: string, dictionary: string): Promise<number> {
  const decoder = await createZstdDecoder(await Deno.readFile(dictionary));
  const text = new TextDecoder();
  const t0 = performance.now();
  let n = 0;
  await new Promise<void>((resolve) => {
    const ws = new WebSocket(`${url}?cursor=0&compress=true`);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (e) => {
      JSON.parse(text.decode(decoder.decode(new Uint8Array(e.data))));
      n++;
    };
    ws.onclose = () => resolve();
  });
  return n / ((performance.now() - t0) / 1000);
}

/**
 * Deno KV alone, on the disk under `path`, in a database created as a sync creates it: 48 KiB
 * payloads (bytes, which KV's serializer copies as they are), 16 to a commit and three commits in
 * flight, as the writer issues them. Returns bytes stored per second.
 */
async function kvAlone(path: string): Promise<number> {
  await Deno.remove(path).catch(() => {});
  const kv = await openKvAt(path);
  const payload = new Uint8Array(48 << 10).map((_, i) => i * 7);
  const commits = quick ? 40 : 130;
  const t0 = performance.now();
  const inflight: Promise<unknown>[] = [];
  for (let c = 0; c < commits; c++) {
    const op = kv.atomic();
    for (let i = 0; i < 16; i++) op.enqueue(payload);
    inflight.push(op.set(["checkpoint"], c).commit());
    if (inflight.length === 3) await inflight.shift();
  }
  await Promise.all(inflight);
  const rate = commits * 16 * payload.length / ((performance.now() - t0) / 1000);
  kv.close();
  await Deno.remove(path).catch(() => {});
  return rate;
}

/** The sink alone (bench/sink_alone.ts), in a process of its own. */
async function sinkAloneRate(path: string): Promise<number> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", `${root}bench/sink_alone.ts`, capturePath, path],
    stderr: "inherit",
  }).output();
  if (!out.success) throw new Error("bench/sink_alone.ts failed");
  return Number(new TextDecoder().decode(out.stdout).trim());
}

async function sync(url: string, kvPath: string, batchSize: number, compress = false) {
  await Deno.remove(kvPath).catch(() => {});
  return await runBackfillSync({
    compress,
    zstdDictionary: compress ? dictionary : undefined,
    instance: url,
    kv: kvPath,
    startTimestamp: startUs,
    wantedCollections: [],
    kinds: ["commit", "identity", "account"],
    numRecords: EVENTS,
    batchSize,
    queueName: "bench",
  });
}

/** Deletes a sync's database and the lock file it leaves beside it (/dev/shm is shared memory). */
async function removeDatabase(path: string): Promise<void> {
  for (const f of [path, `${path}@bench.lock`]) await Deno.remove(f).catch(() => {});
}

function fmt(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

console.log(
  `capture: ${fmt(EVENTS)} synthetic events, ${fmt(avgChars)} characters (${
    fmt(avgBytes)
  } bytes of UTF-8) on average\n`,
);
const server = await startServer();
try {
  const own = Math.max(await ownCeiling(server.url), await ownCeiling(server.url));
  const kvBytes = await kvAlone(`${work}/kv-alone.sqlite`);
  // One untimed sync first. The rows then measure the pipeline with its code compiled and V8's heap
  // grown to its working size, as in any sync that lasts more than a second: without it the first row
  // measured 10–25 % below the same sync run third (the ceilings' few lines warm up within their
  // first run).
  await sync(server.url, `${work}/bench.sqlite`, 100);
  // The best of two, after the warm-up: run first, while the capture just written was still going out
  // to the disk, it measured 230k–340k against 400k–450k later in the same bench.
  const sinkAlone = Math.max(
    await sinkAloneRate(`${work}/kv.sqlite`),
    await sinkAloneRate(`${work}/kv.sqlite`),
  );
  const rows = [
    ["end to end, KV on disk, batchSize 100", `${work}/bench.sqlite`, 100],
    ["end to end, KV on disk, batchSize 1000", `${work}/bench.sqlite`, 1000],
    ["end to end, KV in /dev/shm, batchSize 100", "/dev/shm/jetfill-bench.sqlite", 100],
  ] as const;
  const timedSync = async ([label, path, batch]: typeof rows[number]) => {
    const s = await sync(server.url, path, batch);
    if (s.recordsStored !== EVENTS) {
      throw new Error(`${label}: stored ${s.recordsStored} of ${EVENTS} (${s.stopReason})`);
    }
    return s.recordsStored / s.totalTime;
  };
  // The ceiling and the first row in turns: the best of each, the same statistic on both sides of
  // the ratio, measured over the same minute.
  const ceilings: number[] = [];
  const firsts: number[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    ceilings.push(await ceiling(server.url));
    firsts.push(await timedSync(rows[0]));
  }
  const ceil = Math.max(...ceilings);
  const first = Math.max(...firsts);
  console.log(`ceiling (WebSocket receive + JSON.parse, server in another process): ${fmt(ceil)} events/s`);
  console.log(`ceiling (jetfill's transport receive + JSON.parse): ${fmt(own)} events/s`);
  console.log(
    `Deno KV alone (ready-made 48 KiB messages, 16 a commit, on disk): ${(kvBytes / 1e6).toFixed(0)} MB/s, ` +
      `the bytes of ${fmt(kvBytes / serializedBytes)} events/s of this capture ` +
      `(${fmt(serializedBytes)} bytes each once serialized)`,
  );
  console.log(`sink alone (parsed events → Batcher → QueueWriter → KV on disk): ${fmt(sinkAlone)} events/s`);
  for (const row of rows) {
    const [label, path] = row;
    if (path.startsWith("/dev/shm") && !(await Deno.stat("/dev/shm").catch(() => null))) continue;
    const rate = row === rows[0] ? first : Math.max(await timedSync(row), await timedSync(row));
    console.log(
      `${label}: ${fmt(rate)} events/s (${(rate / ceil * 100).toFixed(0)}% of the WebSocket ceiling, ${
        (rate / own * 100).toFixed(0)
      }% of jetfill's)`,
    );
    if (row === rows[0]) {
      // The rounds themselves, so that a VM changing speed during the measurement can be seen.
      const k = (n: number) => `${Math.round(n / 1000)}k`;
      // Each round's own ratio (its ceiling and the sync right after it) and their median: a VM
      // that changed speed between rounds moves one ratio, not the median.
      const ratios = firsts.map((f, i) => f / ceilings[i]);
      const median = [...ratios].sort((a, b) => a - b)[ratios.length >> 1];
      const pct = (r: number) => `${(r * 100).toFixed(0)}%`;
      const turns = `ceiling ${ceilings.map(k).join(", ")}; end to end ${firsts.map(k).join(", ")}`;
      console.log(
        `  (rounds, in turns: ${turns}; ratios ${ratios.map(pct).join(", ")}, median ${pct(median)})`,
      );
    }
    await removeDatabase(path);
  }

  // The v2 wire (a v2 host's subscribeEvents): each frame is mapped to the stored /subscribe shape,
  // whose text is then written out for sizing, where /subscribe hands over the text it received.
  const v2server = await startServer(["--v2"]);
  try {
    const v2url = /\S+subscribeEvents/.exec(v2server.banner)?.[0];
    if (v2url === undefined) throw new Error(`no subscribeEvents URL in: ${v2server.banner}`);
    const path = `${work}/bench-v2.sqlite`;
    const rate = Math.max(...[await sync(v2url, path, 100), await sync(v2url, path, 100)].map((s) => {
      if (s.recordsStored !== EVENTS) {
        throw new Error(`v2 wire: stored ${s.recordsStored} of ${EVENTS} (${s.stopReason})`);
      }
      return s.recordsStored / s.totalTime;
    }));
    console.log(
      `end to end, v2 wire (subscribeEvents), KV on disk, batchSize 100: ${fmt(rate)} events/s (${
        (rate / first * 100).toFixed(0)
      }% of the /subscribe row)`,
    );
    await removeDatabase(path);
  } finally {
    await v2server.stop();
  }

  // Memory with a slow sink, in a process of its own so that nothing else counts in its RSS.
  // Once with V8's default heap sizing, once with the young generation the compiled CLI uses
  // (deno task compile): most of the difference is garbage V8 has not collected yet.
  for (const flags of [[], ["--v8-flags=--max-semi-space-size=4"]]) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        ...flags,
        `${root}bench/slow_sink.ts`,
        server.url,
        String(startUs),
        String(EVENTS),
        work,
      ],
      stderr: "inherit",
    }).output();
    console.log(
      `${new TextDecoder().decode(out.stdout).trim()}${flags.length ? ` [${flags[0]}]` : " [V8 defaults]"}`,
    );
  }
} finally {
  await server.stop();
}

if (dictionary === undefined) {
  console.log(
    "compressed rows and the zstd decoder: skipped, no legacy zstd dictionary found (set JETFILL_ZSTD_DICTIONARY " +
      "to its file, or JETFILL_TEST_DICTIONARIES to the folder that holds legacy_subscribe.zdict)",
  );
} else {
  // Compressed: the server sends zstd frames made with the legacy dictionary.
  const zserver = await startServer(["--zstd-dictionary", dictionary]);
  try {
    // The server compresses each event once, on first use (as the legacy server does at ingest);
    // the first pass warms it so that the figures below measure the client.
    await compressedCeiling(zserver.url, dictionary);
    const zceil = await compressedCeiling(zserver.url, dictionary);
    console.log(`ceiling, compressed (receive + zstd decode + JSON.parse): ${fmt(zceil)} events/s`);
    const path = `${work}/bench-z.sqlite`;
    const s = await sync(zserver.url, path, 100, true);
    if (s.recordsStored !== EVENTS) {
      throw new Error(`compressed: stored ${s.recordsStored} of ${EVENTS} (${s.stopReason})`);
    }
    console.log(
      `end to end, compressed, KV on disk, batchSize 100: ${fmt(s.recordsStored / s.totalTime)} events/s, ${
        (s.bytesDecoded / s.bytesReceived).toFixed(2)
      }x smaller on the wire (target 60,000 events/s)`,
    );
    await removeDatabase(path);
  } finally {
    await zserver.stop();
  }
  const z = await benchZstd({ dictionaryPath: dictionary });
  console.log(
    `zstd decoder: ${z.decoderMBps.toFixed(0)} MB/s, ${fmt(z.decoderFramesPerSec)} frames/s on ${
      fmt(z.avgEventBytes)
    }-byte events (target 100 MB/s), ${z.decoderNoSizeMBps.toFixed(0)} MB/s on ${
      (z.noSizeFrameBytes / 1000).toFixed(0)
    } KB frames without their size (${z.noSizeRatio.toFixed(0)}:1); zstd CLI on the same frames: ${
      z.cliMBps.toFixed(1)
    } MB/s (whole-file runs, mostly I/O)`,
  );
}
