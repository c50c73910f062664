/**
 * A deterministic generator of synthetic Jetstream captures: NDJSON lines shaped like the legacy
 * `/subscribe` wire (protocol doc §3.1, §3.4), for tests, demos and benchmarks.
 *
 * Every account, handle, text and CID is made up from a seeded PRNG, so no real person's data is
 * ever used and the same options always give the same lines.
 *
 * @module
 */
import { show } from "../errors.ts";

/**
 * Options of {@linkcode generateCapture}.
 *
 * @example
 * ```ts
 * import type { GenerateCaptureOptions } from "./synth.ts";
 * const options: GenerateCaptureOptions = { count: 10_000, seed: 42, startUs: 1_770_000_000_000_000, stepUs: 2000 };
 * ```
 */
export interface GenerateCaptureOptions {
  /** How many events to generate. */
  count: number;
  /**
   * Seed of the PRNG; the same seed and options give the same lines.
   *
   * @default {1}
   */
  seed?: number;
  /**
   * `time_us` of the first event, unix microseconds.
   *
   * @default {Date.now() * 1000 - 48 hours}
   */
  startUs?: number;
  /**
   * Mean gap between consecutive events, microseconds (gaps are exponentially distributed, at least 1).
   *
   * The gaps are random, so where a capture ends varies by about 47 hours / √count either way (40
   * minutes for 5,000 events, 90 for 1,000).
   *
   * @default {47 hours / count, so a default capture ends an hour ago on average and spans two or three calendar days}
   */
  stepUs?: number;
  /**
   * How many distinct accounts act in the capture (see {@linkcode synthDids}).
   *
   * @default {500}
   */
  dids?: number;
}

const HOUR_US = 3_600_000_000;
const WINDOW_US = 48 * HOUR_US;
const BASE32_SORT = "234567abcdefghijklmnopqrstuvwxyz";
const BASE32 = "abcdefghijklmnopqrstuvwxyz234567";

/**
 * A small, fast, seedable PRNG (mulberry32) returning floats in [0, 1).
 *
 * @example
 * ```ts
 * import { mulberry32 } from "./synth.ts";
 * const random = mulberry32(42);
 * const x = random(); // the same sequence for the same seed
 * ```
 */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function randomChars(random: () => number, alphabet: string, length: number): string {
  let out = "";
  for (let i = 0; i < length; i++) out += alphabet[Math.floor(random() * alphabet.length)];
  return out;
}

/** All 1024 two-character base32 strings, so CIDs are built 10 bits at a time (the generator is hot). */
const BASE32_PAIRS: string[] = [];
for (let i = 0; i < 1024; i++) BASE32_PAIRS.push(BASE32[i >> 5] + BASE32[i & 31]);

/** `pairs * 2` random base32 characters, three pairs per PRNG draw. */
function randomBase32(random: () => number, pairs: number): string {
  let out = "";
  for (let i = 0; i < pairs; i += 3) {
    const u = Math.floor(random() * 1073741824); // 30 random bits
    out += BASE32_PAIRS[u & 1023];
    if (i + 1 < pairs) out += BASE32_PAIRS[(u >>> 10) & 1023];
    if (i + 2 < pairs) out += BASE32_PAIRS[u >>> 20];
  }
  return out;
}

/**
 * The DIDs {@linkcode generateCapture} draws its accounts from: mostly `did:plc:` followed by 24
 * characters of `[a-z2-7]`, and every 100th a `did:web:example-N.test`, so filters can be tested on
 * both methods.
 *
 * @example
 * ```ts
 * import { generateCapture, synthDids } from "./synth.ts";
 * const dids = synthDids(500, 7);
 * const lines = generateCapture({ count: 1000, seed: 7 });
 * const mine = lines.filter((line) => line.includes(dids[0]));
 * ```
 */
export function synthDids(count: number, seed = 1): string[] {
  if (!Number.isSafeInteger(count) || count < 1) {
    throw new RangeError(
      `Cannot make DIDs as 'count' must be a positive integer: current value is ${show(count)}`,
    );
  }
  // A separate stream from the event PRNG, so changing the event mix never changes the accounts.
  const random = mulberry32((seed ^ 0x5bd1e995) >>> 0);
  const dids: string[] = [];
  for (let i = 0; i < count; i++) {
    dids.push(i % 100 === 99 ? `did:web:example-${i}.test` : `did:plc:${randomChars(random, BASE32, 24)}`);
  }
  return dids;
}

/**
 * Encodes a TID (timestamp identifier): 53 bits of unix microseconds and a 10-bit clock id as 13
 * sortable base32 characters. Split in two so no BigInt is needed on the hot path.
 */
function tid(timeUs: number, clockId: number): string {
  const ts = Math.max(0, Math.floor(timeUs));
  const hi = Math.floor(ts / 1073741824); // top 23 bits, in five characters
  const lo = ts % 1073741824; // low 30 bits, in six characters
  const a = BASE32_SORT;
  return a[(hi >>> 20) & 31] + a[(hi >>> 15) & 31] + a[(hi >>> 10) & 31] + a[(hi >>> 5) & 31] + a[hi & 31] +
    a[lo >>> 25] + a[(lo >>> 20) & 31] + a[(lo >>> 15) & 31] + a[(lo >>> 10) & 31] + a[(lo >>> 5) & 31] +
    a[lo & 31] + a[(clockId >>> 5) & 31] + a[clockId & 31];
}

const WORDS = (
  "the a today just really new my this that what when how why love coffee morning night weekend " +
  "code bug release garden cat dog rain sun music album book movie walk train city river sky cloud " +
  "bread soup tea think feel want need made found lost finally again still always never maybe " +
  "great tiny huge quiet loud bright slow fast open close build ship test write read draw paint " +
  "friends team project idea question answer thread photo video link update weather season"
).split(" ");
const CJK = [
  "今日はいい天気ですね",
  "コーヒーを飲みながら作業中",
  "新しいプロジェクトを始めました",
  "猫がかわいい",
  "오늘 날씨가 정말 좋네요",
  "새로운 음악을 듣고 있어요",
  "今天的天气很好",
  "我们明天见",
  "週末は山に行きます",
];
const EMOJI = ["🦋", "✨", "😂", "🎉", "☕", "🌧️", "🐈", "❤️", "👀", "🔥", "🙏", "📷"];
const TAGS = ["photography", "gardening", "rustlang", "denoland", "music", "books", "art", "cats"];
const LANG_SETS = [["en"], ["en"], ["en"], ["ja"], ["pt"], ["de"], ["ko"], ["zh"], ["es"], ["en", "ja"]];
const MIME = ["image/jpeg", "image/png", "image/webp"];
const PROFILE_NOTES = [
  "Writes code, drinks tea, takes photos of clouds.",
  "Synthetic account for testing. Nothing here is real.",
  "写真と音楽が好きです 📷🎵",
  "Gardener, reader, occasional poster 🌱",
  "",
];

type Random = () => number;

function pick<T>(random: Random, items: readonly T[]): T {
  return items[Math.floor(random() * items.length)];
}

function cid(random: Random, prefix = "bafyrei"): string {
  return prefix + randomBase32(random, 26);
}

function isoMs(timeUs: number): string {
  return new Date(Math.floor(timeUs / 1000)).toISOString();
}

/** UTF-8 byte length, needed for facet byte offsets. */
function utf8Length(text: string): number {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

function blob(random: Random, mimeType: string, size: number): Record<string, unknown> {
  return { $type: "blob", ref: { $link: cid(random, "bafkrei") }, mimeType, size };
}

/** Generates events one by one; the state is the PRNG, the clock and the relay seq. */
class Generator {
  readonly #random: Random;
  readonly #dids: string[];
  #seq: number;

  constructor(seed: number, dids: string[]) {
    this.#random = mulberry32(seed);
    this.#dids = dids;
    this.#seq = 30_000_000_000 + Math.floor(this.#random() * 1_000_000_000);
  }

  /** Activity is skewed, as on the real network: a few accounts post most. */
  #actor(): string {
    const r = this.#random();
    return this.#dids[Math.floor(r * r * this.#dids.length)];
  }

  #postUri(timeUs: number): string {
    const back = Math.floor(this.#random() * 72 * HOUR_US);
    return `at://${this.#actor()}/app.bsky.feed.post/${tid(timeUs - back, this.#clock())}`;
  }

  #clock(): number {
    return Math.floor(this.#random() * 1024);
  }

  #text(): { text: string; facets?: unknown[] } {
    const random = this.#random;
    const parts: string[] = [];
    const r = random();
    if (r < 0.18) parts.push(pick(random, CJK));
    const words = 6 + Math.floor(random() * 44);
    const sentence: string[] = [];
    for (let i = 0; i < words; i++) sentence.push(pick(random, WORDS));
    parts.push(sentence.join(" "));
    if (r >= 0.18 && r < 0.3) parts.push(pick(random, CJK));
    if (random() < 0.35) parts.push(pick(random, EMOJI) + (random() < 0.3 ? pick(random, EMOJI) : ""));
    let text = parts.join(" ");
    const facets: unknown[] = [];
    const f = random();
    if (f < 0.12) {
      const tag = pick(random, TAGS);
      const byteStart = utf8Length(text) + 1;
      text += ` #${tag}`;
      facets.push({
        $type: "app.bsky.richtext.facet",
        features: [{ $type: "app.bsky.richtext.facet#tag", tag }],
        index: { byteEnd: byteStart + tag.length + 1, byteStart },
      });
    } else if (f < 0.2) {
      const uri = `https://example.com/${randomChars(random, BASE32, 8)}`;
      const byteStart = utf8Length(text) + 1;
      text += ` ${uri}`;
      facets.push({
        $type: "app.bsky.richtext.facet",
        features: [{ $type: "app.bsky.richtext.facet#link", uri }],
        index: { byteEnd: byteStart + uri.length, byteStart },
      });
    } else if (f < 0.25) {
      const handle = `user${Math.floor(random() * 10_000)}.test`;
      const byteStart = utf8Length(text) + 1;
      text += ` @${handle}`;
      facets.push({
        $type: "app.bsky.richtext.facet",
        features: [{ $type: "app.bsky.richtext.facet#mention", did: this.#actor() }],
        index: { byteEnd: byteStart + handle.length + 1, byteStart },
      });
    }
    return facets.length > 0 ? { text, facets } : { text };
  }

  #embed(timeUs: number): Record<string, unknown> | undefined {
    const random = this.#random;
    const r = random();
    if (r < 0.16) {
      const n = 1 + Math.floor(random() * (random() < 0.7 ? 1 : 4));
      const images = [];
      for (let i = 0; i < n; i++) {
        const width = 600 + Math.floor(random() * 1400);
        images.push({
          alt: random() < 0.5 ? "" : "a synthetic picture",
          aspectRatio: { height: Math.floor(width * (0.5 + random())), width },
          image: blob(random, pick(random, MIME), 50_000 + Math.floor(random() * 900_000)),
        });
      }
      return { $type: "app.bsky.embed.images", images };
    }
    if (r < 0.22) {
      return {
        $type: "app.bsky.embed.external",
        external: {
          description: "A page on an example site used only for synthetic data.",
          thumb: blob(random, "image/jpeg", 10_000 + Math.floor(random() * 200_000)),
          title: `Example article ${Math.floor(random() * 1000)}`,
          uri: `https://example.com/articles/${randomChars(random, BASE32, 10)}`,
        },
      };
    }
    if (r < 0.26) {
      return { $type: "app.bsky.embed.record", record: { cid: cid(random), uri: this.#postUri(timeUs) } };
    }
    return undefined;
  }

  #record(collection: string, timeUs: number, createdAt: string): Record<string, unknown> {
    const random = this.#random;
    switch (collection) {
      case "app.bsky.feed.post": {
        // Keys in lexicographic order, as Jetstream's CBOR-to-JSON output has them.
        const { text, facets } = this.#text();
        const embed = this.#embed(timeUs);
        const record: Record<string, unknown> = { $type: collection, createdAt };
        if (embed) record.embed = embed;
        if (facets) record.facets = facets;
        record.langs = pick(random, LANG_SETS);
        if (random() < 0.3) {
          const root = { cid: cid(random), uri: this.#postUri(timeUs) };
          const parent = random() < 0.5 ? root : { cid: cid(random), uri: this.#postUri(timeUs) };
          record.reply = { parent, root };
        }
        record.text = text;
        return record;
      }
      case "app.bsky.feed.like":
      case "app.bsky.feed.repost":
        return { $type: collection, createdAt, subject: { cid: cid(random), uri: this.#postUri(timeUs) } };
      case "app.bsky.graph.follow":
      case "app.bsky.graph.block":
        return { $type: collection, createdAt, subject: this.#actor() };
      default: {
        const record: Record<string, unknown> = {
          $type: collection,
          avatar: blob(random, "image/jpeg", 20_000 + Math.floor(random() * 800_000)),
        };
        if (random() < 0.6) {
          record.banner = blob(random, "image/jpeg", 50_000 + Math.floor(random() * 500_000));
        }
        record.createdAt = createdAt;
        record.description = pick(random, PROFILE_NOTES);
        record.displayName = `Synthetic ${pick(random, WORDS)} ${Math.floor(random() * 1000)}`;
        return record;
      }
    }
  }

  #commit(did: string, timeUs: number): Record<string, unknown> {
    const random = this.#random;
    const r = random();
    const collection = r < 0.32
      ? "app.bsky.feed.post"
      : r < 0.68
      ? "app.bsky.feed.like"
      : r < 0.79
      ? "app.bsky.feed.repost"
      : r < 0.95
      ? "app.bsky.graph.follow"
      : r < 0.97
      ? "app.bsky.graph.block"
      : "app.bsky.actor.profile";
    // The repo rev is stamped by the PDS a little before Jetstream sees the commit.
    const committedUs = timeUs - 50_000 - Math.floor(random() * 1_500_000);
    const rev = tid(committedUs, this.#clock());
    if (collection !== "app.bsky.actor.profile" && random() < 0.06) {
      const rkey = tid(committedUs - Math.floor(random() * 30 * 24 * HOUR_US), this.#clock());
      return { did, time_us: timeUs, kind: "commit", commit: { rev, operation: "delete", collection, rkey } };
    }
    const update = collection === "app.bsky.actor.profile";
    const rkey = update ? "self" : tid(committedUs - Math.floor(random() * 2000), this.#clock());
    const record = this.#record(collection, timeUs, isoMs(committedUs - Math.floor(random() * 500_000)));
    const operation = update ? "update" : "create";
    return {
      did,
      time_us: timeUs,
      kind: "commit",
      commit: { rev, operation, collection, rkey, record, cid: cid(random) },
    };
  }

  #identity(did: string, timeUs: number): Record<string, unknown> {
    const random = this.#random;
    this.#seq += 1 + Math.floor(random() * 500);
    const time = isoMs(timeUs - Math.floor(random() * 800_000));
    // Some identity events carry no handle, as on the real wire.
    const identity = random() < 0.85
      ? { did, handle: `${pick(random, WORDS)}${Math.floor(random() * 100_000)}.test`, seq: this.#seq, time }
      : { did, seq: this.#seq, time };
    return { did, time_us: timeUs, kind: "identity", identity };
  }

  #account(did: string, timeUs: number): Record<string, unknown> {
    const random = this.#random;
    this.#seq += 1 + Math.floor(random() * 500);
    const time = isoMs(timeUs - Math.floor(random() * 800_000));
    const account = random() < 0.7 ? { active: true, did, seq: this.#seq, time } : {
      active: false,
      did,
      seq: this.#seq,
      status: pick(random, ["deactivated", "deleted", "takendown", "suspended"]),
      time,
    };
    return { did, time_us: timeUs, kind: "account", account };
  }

  /** One event at the given time, as one JSON line (objects are built in Go field order). */
  next(timeUs: number): string {
    const did = this.#actor();
    const r = this.#random();
    const event = r < 0.02
      ? this.#identity(did, timeUs)
      : r < 0.03
      ? this.#account(did, timeUs)
      : this.#commit(did, timeUs);
    return JSON.stringify(event);
  }

  /** An exponentially distributed gap, at least 1 µs so `time_us` stays strictly increasing. */
  gap(meanUs: number): number {
    return Math.max(1, Math.round(-Math.log(1 - this.#random()) * meanUs));
  }
}

/**
 * Generates a synthetic capture: `count` NDJSON lines (without newlines), each one legacy-wire event
 * in Go field order (`did,time_us,kind,commit{rev,operation,collection,rkey,record,cid}`).
 *
 * About 97 % are commits (posts with multilingual text, facets, embeds and replies; likes, reposts,
 * follows, blocks, profile updates; about 6 % deletes), 2 % identity and 1 % account events. `time_us`
 * is strictly increasing from `startUs`. Events average roughly 500–600 bytes.
 *
 * @example
 * ```ts
 * import { generateCapture } from "@jetfill/jetfill";
 * const lines = generateCapture({ count: 1000, seed: 7, startUs: 1_770_000_000_000_000 });
 * await Deno.writeTextFile("capture.ndjson", lines.join("\n") + "\n");
 * ```
 */
export function generateCapture(options: GenerateCaptureOptions): string[] {
  if (typeof options !== "object" || options === null) {
    throw new TypeError(
      `Cannot generate a capture as the options must be an object: current value is ${show(options)}`,
    );
  }
  const { count, seed = 1, dids = 500 } = options;
  if (!Number.isSafeInteger(count) || count < 0) {
    throw new RangeError(
      `Cannot generate a capture as 'count' must be a non-negative integer: current value is ${show(count)}`,
    );
  }
  if (!Number.isSafeInteger(seed)) {
    throw new RangeError(
      `Cannot generate a capture as 'seed' must be an integer: current value is ${show(seed)}`,
    );
  }
  const startUs = options.startUs ?? Date.now() * 1000 - WINDOW_US;
  if (!Number.isSafeInteger(startUs) || startUs < 0) {
    throw new RangeError(
      `Cannot generate a capture as 'startUs' must be a non-negative integer of microseconds: current value is ${
        show(startUs)
      }`,
    );
  }
  // 47 h rather than 48 h, so the random walk of the gaps rarely ends past "now".
  const stepUs = options.stepUs ?? Math.max(1, Math.floor((WINDOW_US - HOUR_US) / Math.max(1, count)));
  if (!Number.isFinite(stepUs) || stepUs <= 0) {
    throw new RangeError(
      `Cannot generate a capture as 'stepUs' must be a positive number: current value is ${show(stepUs)}`,
    );
  }
  const generator = new Generator(seed, synthDids(dids, seed));
  const lines: string[] = new Array(count);
  let timeUs = startUs;
  for (let i = 0; i < count; i++) {
    if (i > 0) timeUs += generator.gap(stepUs);
    lines[i] = generator.next(timeUs);
  }
  return lines;
}
