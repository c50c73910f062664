/**
 * Throughput of the zstd dictionary decoder and encoder (`src/jetstream/zstd.ts`) on
 * Jetstream-sized events, with the `zstd` CLI's decompression of the same frames for comparison.
 *
 * Run: `deno run -A bench/zstd_bench.ts` (needs the `zstd` CLI and `../shared/jetstream/legacy_subscribe.zdict`,
 * or a dictionary path in `JETFILL_ZSTD_DICTIONARY`).
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import { createZstdDecoder, createZstdEncoder } from "../src/jetstream/zstd.ts";

/** Options of {@linkcode benchZstd}. */
export interface BenchZstdOptions {
  /**
   * The legacy dictionary file.
   *
   * @default {"$JETFILL_ZSTD_DICTIONARY" or "../shared/jetstream/legacy_subscribe.zdict" beside the repository}
   */
  dictionaryPath?: string;
  /**
   * How many events to generate, each compressed as its own frame.
   *
   * @default {10000}
   */
  events?: number;
  /**
   * Minimum duration of each timed loop, in milliseconds.
   *
   * @default {1000}
   */
  minMillis?: number;
}

/** What {@linkcode benchZstd} measured. */
export interface BenchZstdResult {
  /** Our decoder: decompressed megabytes (10^6 bytes) per second. */
  decoderMBps: number;
  /** Our decoder: frames per second. */
  decoderFramesPerSec: number;
  /**
   * Our decoder on frames without the content-size field (as a streaming encoder makes them), each
   * 64 copies of one of the events as NDJSON: decompressed MB/s.
   */
  decoderNoSizeMBps: number;
  /** Decoded over compressed size of those frames. */
  noSizeRatio: number;
  /** Their average decoded size in bytes. */
  noSizeFrameBytes: number;
  /** Our encoder (level 3, the server's setting): frames per second. */
  encoderFramesPerSec: number;
  /** `zstd -d -D` over the same frames as files: decompressed megabytes per second, wall time. */
  cliMBps: number;
  /** Frames measured. */
  frames: number;
  /** Average decoded event size in bytes. */
  avgEventBytes: number;
  /** Average frame size in bytes. */
  avgFrameBytes: number;
}

/**
 * Builds deterministic Jetstream-like events (about 600 bytes: posts with replies and multi-byte
 * text, likes, follows, identity events), compresses each as one frame with the `zstd` CLI and the
 * legacy dictionary in a single run, then times our decoder and encoder in loops of at least
 * `minMillis` and the CLI's decompression of the same files.
 *
 * @example
 * ```ts
 * import { benchZstd } from "./zstd_bench.ts";
 * const { decoderMBps, cliMBps } = await benchZstd({ events: 2000 });
 * console.log(`decoder ${decoderMBps.toFixed(0)} MB/s, zstd CLI ${cliMBps.toFixed(0)} MB/s`);
 * ```
 */
export async function benchZstd(options: BenchZstdOptions = {}): Promise<BenchZstdResult> {
  const dictionaryPath = options.dictionaryPath ?? Deno.env.get("JETFILL_ZSTD_DICTIONARY") ??
    fileURLToPath(new URL("../../shared/jetstream/legacy_subscribe.zdict", import.meta.url));
  const count = options.events ?? 10_000;
  const minMillis = options.minMillis ?? 1000;
  const dictionary = await Deno.readFile(dictionaryPath);
  const events = syntheticEvents(count);
  const eventBytes = events.reduce((sum, event) => sum + event.byteLength, 0);

  const dir = await Deno.makeTempDir({ prefix: "jetfill_zstd_bench_" });
  try {
    for (const sub of ["in", "zst", "big", "nosize", "out"]) await Deno.mkdir(`${dir}/${sub}`);
    const names = events.map((_, i) => `${String(i).padStart(6, "0")}.json`);
    await Promise.all(events.map((event, i) => Deno.writeFile(`${dir}/in/${names[i]}`, event)));
    // One CLI run for all files (default level 3), not one process per event.
    await zstd(["-q", "-D", dictionaryPath, "-r", `${dir}/in`, "--output-dir-flat", `${dir}/zst`]);
    // 64 copies of an event as NDJSON, framed without the content-size field: a frame that
    // decodes to far more than 8 times its size, which the decoder cannot size at its first try.
    const text = new TextDecoder();
    const groups: Uint8Array[] = [];
    for (let i = 0; i < events.length; i += 64) {
      groups.push(new TextEncoder().encode(Array(64).fill(text.decode(events[i])).join("\n")));
    }
    const groupNames = groups.map((_, i) => `${String(i).padStart(6, "0")}.ndjson`);
    await Promise.all(groups.map((group, i) => Deno.writeFile(`${dir}/big/${groupNames[i]}`, group)));
    const unsizedArgs = ["-q", "-D", dictionaryPath, "--no-content-size", "-r", `${dir}/big`];
    await zstd([...unsizedArgs, "--output-dir-flat", `${dir}/nosize`]);
    const frames = await Promise.all(names.map((name) => Deno.readFile(`${dir}/zst/${name}.zst`)));
    const unsized = await Promise.all(groupNames.map((name) => Deno.readFile(`${dir}/nosize/${name}.zst`)));
    const frameBytes = frames.reduce((sum, frame) => sum + frame.byteLength, 0);
    const total = (all: Uint8Array[]) => all.reduce((sum, bytes) => sum + bytes.byteLength, 0);

    const decoder = await createZstdDecoder(dictionary);
    const timed = (all: Uint8Array[], expected: Uint8Array[]) => {
      // One full verified pass first, so the timed loop measures correct decoding only.
      for (const [i, frame] of all.entries()) {
        if (!sameBytes(decoder.decode(frame), expected[i])) {
          throw new Error(`frame ${i} decoded to different bytes`);
        }
      }
      let bytes = 0;
      let count = 0;
      const start = performance.now();
      while (performance.now() - start < minMillis) {
        for (const frame of all) bytes += decoder.decode(frame).byteLength;
        count += all.length;
      }
      const seconds = (performance.now() - start) / 1000;
      return { MBps: bytes / seconds / 1e6, framesPerSec: count / seconds };
    };
    const sized = timed(frames, events);
    const noSize = timed(unsized, groups);

    const encoder = await createZstdEncoder(dictionary);
    let encodedFrames = 0;
    const encodeStart = performance.now();
    while (performance.now() - encodeStart < minMillis) {
      for (const event of events) encoder.encode(event);
      encodedFrames += events.length;
    }
    const encodeSeconds = (performance.now() - encodeStart) / 1000;

    const cliStart = performance.now();
    await zstd(["-d", "-q", "-D", dictionaryPath, "-r", `${dir}/zst`, "--output-dir-flat", `${dir}/out`]);
    const cliSeconds = (performance.now() - cliStart) / 1000;

    return {
      decoderMBps: sized.MBps,
      decoderFramesPerSec: sized.framesPerSec,
      decoderNoSizeMBps: noSize.MBps,
      noSizeRatio: total(groups) / total(unsized),
      noSizeFrameBytes: total(groups) / groups.length,
      encoderFramesPerSec: encodedFrames / encodeSeconds,
      cliMBps: eventBytes / cliSeconds / 1e6,
      frames: frames.length,
      avgEventBytes: eventBytes / events.length,
      avgFrameBytes: frameBytes / frames.length,
    };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function zstd(args: string[]): Promise<void> {
  const { code, stderr } = await new Deno.Command("zstd", { args, stdout: "null", stderr: "piped" }).output();
  if (code !== 0) throw new Error(`zstd ${args.join(" ")} failed: ${new TextDecoder().decode(stderr)}`);
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.byteLength !== b.byteLength) return false;
  for (let i = 0; i < a.byteLength; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** Deterministic events in the legacy `/subscribe` shapes, about 600 bytes on average. */
function syntheticEvents(count: number): Uint8Array[] {
  // mulberry32: tiny, seedable, good enough to make varied identifiers.
  let state = 0x5eed;
  const random = (): number => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const base32 = "abcdefghijklmnopqrstuvwxyz234567";
  const id = (length: number): string => {
    let out = "";
    for (let i = 0; i < length; i++) out += base32[Math.floor(random() * 32)];
    return out;
  };
  const did = (): string => `did:plc:${id(24)}`;
  const cid = (): string => `bafyrei${id(52)}`;
  const tid = (): string => `3l${id(11)}`;
  const postRef = (): { cid: string; uri: string } => ({
    cid: cid(),
    uri: `at://${did()}/app.bsky.feed.post/${tid()}`,
  });
  const words = [
    "the",
    "a",
    "bluesky",
    "post",
    "today",
    "really",
    "love",
    "this",
    "new",
    "feed",
    "art",
    "coffee",
    "morning",
    "what",
    "think",
    "about",
    "weather",
    "game",
    "music",
    "photo",
    "🦋",
    "✨",
    "日本語",
    "おはよう",
    "😂",
    "you",
    "we",
    "just",
    "finally",
    "open",
    "source",
    "and",
    "of",
    "is",
  ];
  const text = (length: number): string =>
    Array.from({ length }, () => words[Math.floor(random() * words.length)]).join(" ");
  const encoder = new TextEncoder();
  const events: Uint8Array[] = [];
  let timeUs = 1_725_000_000_000_000;
  for (let i = 0; i < count; i++) {
    timeUs += Math.floor(random() * 2000);
    const createdAt = new Date(timeUs / 1000).toISOString();
    const author = did();
    const pick = random();
    let event: unknown;
    if (pick < 0.45) {
      const reply = random() < 0.4 ? { reply: { parent: postRef(), root: postRef() } } : {};
      event = {
        did: author,
        time_us: timeUs,
        kind: "commit",
        commit: {
          rev: tid(),
          operation: "create",
          collection: "app.bsky.feed.post",
          rkey: tid(),
          record: {
            $type: "app.bsky.feed.post",
            createdAt,
            langs: ["en"],
            text: text(14 + Math.floor(random() * 44)),
            ...reply,
          },
          cid: cid(),
        },
      };
    } else if (pick < 0.8) {
      event = {
        did: author,
        time_us: timeUs,
        kind: "commit",
        commit: {
          rev: tid(),
          operation: "create",
          collection: "app.bsky.feed.like",
          rkey: tid(),
          record: { $type: "app.bsky.feed.like", createdAt, subject: postRef() },
          cid: cid(),
        },
      };
    } else if (pick < 0.95) {
      event = {
        did: author,
        time_us: timeUs,
        kind: "commit",
        commit: {
          rev: tid(),
          operation: "create",
          collection: "app.bsky.graph.follow",
          rkey: tid(),
          record: { $type: "app.bsky.graph.follow", createdAt, subject: did() },
          cid: cid(),
        },
      };
    } else {
      event = {
        did: author,
        time_us: timeUs,
        kind: "identity",
        identity: { did: author, handle: `${id(8)}.bsky.social`, seq: 1_000_000 + i, time: createdAt },
      };
    }
    events.push(encoder.encode(JSON.stringify(event)));
  }
  return events;
}

if (import.meta.main) {
  const result = await benchZstd();
  console.log(
    `zstd with the legacy dictionary: ${result.frames} frames, avg event ${
      result.avgEventBytes.toFixed(0)
    } B, ` +
      `avg frame ${result.avgFrameBytes.toFixed(0)} B`,
  );
  console.log(
    `  decoder (zstd-codec WASM): ${result.decoderMBps.toFixed(1)} MB/s, ${
      Math.round(result.decoderFramesPerSec).toLocaleString("en-US")
    } frames/s`,
  );
  console.log(
    `  encoder (level 3):         ${Math.round(result.encoderFramesPerSec).toLocaleString("en-US")} frames/s`,
  );
  console.log(
    `  decoder, ${(result.noSizeFrameBytes / 1000).toFixed(0)} KB frames without their size (${
      result.noSizeRatio.toFixed(0)
    }:1): ${result.decoderNoSizeMBps.toFixed(1)} MB/s`,
  );
  console.log(`  zstd CLI (files, wall):    ${result.cliMBps.toFixed(1)} MB/s`);
}
