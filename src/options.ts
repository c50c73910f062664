/**
 * The options of {@link runBackfillSync} and their validation. `resolveSyncOptions()` turns what a
 * user gave into checked, UTC, microsecond values before anything connects.
 *
 * @module
 */
import { z } from "zod";
import { show, UsageError } from "./errors.ts";
import { MAX_TIMER_MS } from "./async.ts";
import { COMMIT_OPERATIONS, type CommitOperation, EVENT_KINDS, type EventKind } from "./jetstream/events.ts";
import { DID_FORMS, isCollectionFilter, isDid, isNsid } from "./validate.ts";
import { isV2Url, V2_HOSTS, V2_SUBSCRIBE_PATH } from "./jetstream/v2.ts";
import { proxyFor } from "./jetstream/proxy.ts";
import { DEFAULT_MAX_MESSAGE_BYTES } from "./jetstream/raw_ws.ts";
import { didsNeedHello } from "./jetstream/url.ts";
import { DEFAULT_MAX_DECODED_BYTES } from "./jetstream/zstd.ts";
import { isoFromUs, MIN_TIMESTAMP_US, parseTimestamp, TIMESTAMP_FORMATS } from "./time.ts";
import type { DateChange, SyncErrorReport, SyncProgress } from "./stats.ts";

/**
 * The public Jetstream hosts: the four numbered legacy hosts (v1 wire, µs cursors), then the two
 * v2 hosts (protocol doc §0). The first is the default instance.
 *
 * @example
 * ```ts
 * import { PUBLIC_INSTANCES, runBackfillSync } from "@jetfill/jetfill";
 * // Every legacy host in turn, should one be down.
 * await runBackfillSync({ instance: PUBLIC_INSTANCES.slice(0, 4), numRecords: 100 });
 * ```
 */
export const PUBLIC_INSTANCES: readonly string[] = [
  "jetstream1.us-east.bsky.network",
  "jetstream2.us-east.bsky.network",
  "jetstream1.us-west.bsky.network",
  "jetstream2.us-west.bsky.network",
  "jetstream.us-east.bsky.network",
  "jetstream.us-west.bsky.network",
];

/** Jetstream's own limits on one subscription (protocol doc §1.1). */
export const MAX_WANTED_DIDS = 10_000;
/** Jetstream's own limits on one subscription (protocol doc §1.1). */
export const MAX_WANTED_COLLECTIONS = 100;

/**
 * Options of {@link runBackfillSync}. Every field is optional.
 *
 * @example
 * ```ts
 * import { type BackfillSyncOptions, runBackfillSync } from "@jetfill/jetfill";
 * // Every post and like of two accounts over two days, into ./likes.sqlite.
 * const options: BackfillSyncOptions = {
 *   wantedDids: ["did:plc:z72i7hdynmk6r22z27h6tvur", "did:web:example.com"],
 *   wantedCollections: ["app.bsky.feed.post", "app.bsky.feed.like"],
 *   startTimestamp: "2026-11-23",
 *   endTimestamp: "2026-11-25",
 *   numRecords: 50_000,
 *   kv: "./likes.sqlite",
 * };
 * const stats = await runBackfillSync(options);
 * ```
 */
export interface BackfillSyncOptions {
  /** DIDs to keep (`did:plc:` or `did:web:`); all accounts when empty. At most 10,000. */
  wantedDids?: readonly string[];
  /**
   * Collection NSIDs, or prefixes such as `app.bsky.graph.*`. At most 100. Empty, or holding `"*"`:
   * every collection.
   * @default {["app.bsky.feed.post"]}
   */
  wantedCollections?: readonly string[];
  /**
   * Event kinds to store. Identity and account events pass Jetstream's collection filter, so they
   * are only stored when asked for here.
   * @default {["commit"]}
   */
  kinds?: readonly EventKind[];
  /**
   * Commit operations to store: `create`, `update`, `delete`. Jetstream sends all three (a deleted
   * post comes as a `delete` commit of `app.bsky.feed.post`, with no record); leaving some out is
   * done here, as no server filters by operation, and only the kept commits count toward
   * `numRecords`. Identity and account events have no operation.
   * @default {["create", "update", "delete"]}
   */
  operations?: readonly CommitOperation[];
  /**
   * Where to start: `YYYY-MM-DD`, `YYYY-MM-DD-HH:MM:SS`, ISO-8601 with `Z` or an offset, integer unix
   * microseconds, or a `Date`. Always UTC. Sent as Jetstream's `cursor`. Live tail when absent.
   */
  startTimestamp?: string | number | Date;
  /**
   * Exclusive end, same formats: the first event at or after it stops the run and is not stored. After
   * the start, or without one (a live tail) after now.
   */
  endTimestamp?: string | number | Date;
  /**
   * Stop after exactly this many stored records.
   * @default {10000}
   */
  numRecords?: number;
  /**
   * A host (`jetstream1.us-east.bsky.network` means `wss://HOST/subscribe`) or a full `ws://`/`wss://`
   * URL; several are tried in order when one fails.
   * @default {PUBLIC_INSTANCES[0]}
   */
  instance?: string | readonly string[];
  /**
   * Stop after this many seconds, even when no message arrives.
   * @default {900}
   */
  maxTime?: number;
  /**
   * The queue's name: 1 to 100 letters, digits, `_`, `.` or `-`, starting with a letter or digit. It
   * also names the default database file.
   * @default {"jetstream_sync"}
   */
  queueName?: string;
  /**
   * Records per batch: each batch is committed atomically with the queue's checkpoint, and no queue
   * message holds more records than this. A batch that has not filled one second after its first
   * record is committed as it is, so a quiet stream's records are stored within about a second.
   * @default {100}
   */
  batchSize?: number;
  /**
   * Ask Jetstream for zstd-compressed frames.
   * @default {false}
   */
  compress?: boolean;
  /**
   * The wire to speak: `v1` is `/subscribe` (every server), `v2` is
   * `/xrpc/network.bsky.jetstream.subscribeEvents` (v2 servers only). By default the v2 hosts get v2
   * (v1 with more than 50 DIDs, or over 1,600 characters of them: the v2 wire takes them in the URL
   * only) and everything else v1; a URL with a path keeps its path.
   */
  wire?: "v1" | "v2";
  /**
   * The zstd dictionary for `compress`: a path or the bytes. Otherwise `JETFILL_ZSTD_DICTIONARY`, a
   * cached copy, or a download from the public Jetstream repository verified by its sha256.
   */
  zstdDictionary?: string | Uint8Array;
  /**
   * A `Deno.Kv` to write to, or a database path (its folders are made when missing). Default
   * `./jetfill-data/<queueName>.sqlite`. The path `:memory:` is refused, as that database would be gone
   * when the run closes it: pass a `Deno.Kv` opened on it instead.
   */
  kv?: Deno.Kv | string;
  /**
   * Aborting stops the run: a connection being read is closed with the WebSocket closing handshake,
   * and the events the server sent before it saw the close are processed too (a server that does
   * not answer is given up after 2 s of waiting for it), so that none it sent is lost; pending
   * records are flushed, then the statistics are returned. A connection attempt, a probe or a wait
   * between attempts stops at once.
   */
  signal?: AbortSignal;
  /**
   * Called with progress figures about four times a second while the run goes on, events or none
   * (and after each commit, at most as often), and once at the end. Like `onDateChange` and
   * `onError`, a callback that throws stops the run as an error (`stopReason: "error"`, `error`
   * naming the callback), after what was received is stored.
   */
  onProgress?: (progress: SyncProgress) => void;
  /**
   * Called when the UTC date of the events being processed changes; for the first event, from the
   * start timestamp's date (see {@link DateChange}).
   */
  onDateChange?: (change: DateChange) => void;
  /** Called for every frame that is skipped (malformed, unknown kind…) and every connection problem. */
  onError?: (report: SyncErrorReport) => void;
  /**
   * Continue the queue's last run from its checkpoint: same filters and window, starting after the
   * last stored event, counting toward the same limit.
   * @default {false}
   */
  resume?: boolean;
  /**
   * With `resume`, accept options that differ from the checkpoint's run. Without it, run again the
   * same options from the same start into a queue whose last run stored records with them, storing
   * those events a second time (refused otherwise: that is `resume`'s job).
   * @default {false}
   */
  force?: boolean;
  /**
   * Seconds without any message before a connection is taken for dead and reopened. Narrow filters
   * can be quiet for long; the reconnect is harmless (the cursor makes it lossless). Each idle end
   * without a new event doubles the next connection's wait, up to 16 times this (a new event brings
   * it back), so that a server scanning a long history for a narrow filter is not cut short every time.
   * @default {60}
   */
  idleTimeout?: number;
  /**
   * Retries in a row without progress (attempts after the first) before the run stops with an error.
   * @default {10}
   */
  maxRetries?: number;
  /**
   * Events of more UTF-8 bytes than this (after any zstd decoding; on the v2 wire, the event as
   * stored, without the frame's envelope) are skipped (counted as `oversized` and reported), not
   * stored. Real Jetstream events are a few KB; records are far
   * below 1 MiB. At most 33554432 (32 MiB): no larger message is read.
   * @default {1048576}
   */
  maxEventBytes?: number;
  /**
   * Refuse to run (before storing anything) when the server's history starts after the requested
   * start, and stop when an outage outlasts it; by default both are reported and the run goes on.
   * @default {false}
   */
  strict?: boolean;
}

/** The options after validation, in the units the pipeline uses. */
export interface ResolvedSyncOptions {
  /** Unique DIDs in the order given. */
  wantedDids: string[];
  /** Unique collection filters in the order given. */
  wantedCollections: string[];
  /** Unique kinds. */
  kinds: EventKind[];
  /** Unique commit operations; all three when none were named. */
  operations: CommitOperation[];
  /** Start, unix µs. */
  startUs: number | undefined;
  /** Exclusive end, unix µs. */
  endUs: number | undefined;
  /** Record limit. */
  numRecords: number;
  /** WebSocket URLs, in the order to try them. */
  instances: string[];
  /** Wall-clock limit in milliseconds. */
  maxTimeMs: number;
  /** Queue name. */
  queueName: string;
  /** Records per batch. */
  batchSize: number;
  /** Ask for zstd frames. */
  compress: boolean;
  /** The database given by the user, if any. */
  kv: Deno.Kv | string | undefined;
  /** Continue the last run. */
  resume: boolean;
  /** Resume even with other options. */
  force: boolean;
  /** Idle timeout, ms. */
  idleTimeoutMs: number;
  /** Retries without progress before giving up. */
  maxRetries: number;
  /** Failed attempts on one instance before trying the next. */
  failoverAfter: number;
  /** How far to rewind the cursor when switching instance, µs. */
  rewindUs: number;
  /** Refuse gaps in coverage. */
  strict: boolean;
  /** Frames above this size are skipped. */
  maxEventBytes: number;
  /** Content keys remembered for deduplication. */
  dedupeWindow: number;
  /** Bytes of received frames a connection may hold before it closes itself. */
  maxBufferedBytes: number;
}

const KIND_SET = new Set<string>(EVENT_KINDS);
const OPERATION_SET = new Set<string>(COMMIT_OPERATIONS);
/** The largest `maxEventBytes`: the largest message a connection reads, and a frame is decoded to. */
export const MAX_EVENT_BYTES_LIMIT: number = Math.min(DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_DECODED_BYTES);
/** The default of `maxEventBytes`: 1 MiB of UTF-8. */
export const DEFAULT_MAX_EVENT_BYTES = 1_048_576;

/** What a queue name may be: it also names the default database file. */
export const QUEUE_NAME: RegExp = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$/;
/** {@link QUEUE_NAME} in words, for error messages. */
export const QUEUE_NAME_RULE = "1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit";

/** Whether `v` is a `Deno.Kv` (false where KV is not enabled, as no `Deno.Kv` can exist there). */
export function isDenoKv(v: unknown): v is Deno.Kv {
  return typeof Deno.Kv === "function" && v instanceof Deno.Kv;
}

/**
 * The option a misspelt or shortened name most likely meant, as " (did you mean 'x'?)", or "" when
 * none is close: one `aliases` gives for it (such as a CLI flag's name), one at most two edits
 * away, or one the name begins (or that begins the name).
 */
function didYouMean(
  name: string,
  options: readonly string[],
  aliases: Readonly<Record<string, string>> = {},
): string {
  const lower = name.toLowerCase();
  if (Object.hasOwn(aliases, lower)) return ` (did you mean '${aliases[lower]}'?)`;
  let best: string | undefined;
  let bestDistance = 3;
  for (const option of options) {
    const o = option.toLowerCase();
    const d = lower.length >= 3 && (o.startsWith(lower) || lower.startsWith(o)) ? 1 : editDistance(lower, o);
    if (d < bestDistance) {
      best = option;
      bestDistance = d;
    }
  }
  return best === undefined ? "" : ` (did you mean '${best}'?)`;
}

/** Levenshtein distance between `a` and `b`. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(
        previous[j] + 1,
        current[j - 1] + 1,
        previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    previous = current;
  }
  return previous[b.length];
}

/**
 * The error of an options object's schema for what is wrong with the object itself: a name that is
 * not an option (with the one it most likely meant), or not an object at all. "Cannot `verb` as …".
 */
export function optionsObjectError(
  verb: string,
  fn: string,
  options: () => readonly string[],
  aliases: Readonly<Record<string, string>> = {},
): (issue: { code?: string; keys?: string[]; expected?: string; input?: unknown }) => string | undefined {
  return (iss) => {
    if (iss.code === "unrecognized_keys" && iss.keys) {
      return `Cannot ${verb} as ${iss.keys.map((k) => `'${k}'`).join(", ")} ${
        iss.keys.length === 1 ? "is not an option" : "are not options"
      } of ${fn}${didYouMean(iss.keys[0], options(), aliases)}`;
    }
    if (iss.code === "invalid_type" && iss.expected === "object") {
      return `Cannot ${verb} as the options must be an object: current value is ${show(iss.input)}`;
    }
    return undefined;
  };
}

function because(name: string, expected: string, value: unknown): string {
  return `Cannot sync as '${name}' must be ${expected}: current value is ${show(value)}`;
}

/**
 * Why a `kv` of ":memory:" is refused: a database this call opens is closed when it returns, and an
 * in-memory one goes with everything it holds. `verb` is the call's ("sync", "consume").
 */
export function inMemoryPathRefusal(verb: string): string {
  return `Cannot ${verb} as 'kv' must be a Deno.Kv or a database path: current value is ":memory:", ` +
    "a database in memory that would be gone when the call returns " +
    '(open it with Deno.openKv(":memory:") and pass that Deno.Kv)';
}

function err(name: string, expected: string) {
  return { error: (iss: { input?: unknown }) => because(name, expected, iss.input) };
}

const positiveInt = (name: string) =>
  z.number(err(name, "a positive integer")).refine((n) => Number.isSafeInteger(n) && n > 0, {
    // An integer too large for a double to count by ones is still an integer: say where they end.
    error: (iss: { input?: unknown }) =>
      because(
        name,
        Number.isInteger(iss.input) && (iss.input as number) > 0
          ? `a positive integer up to ${Number.MAX_SAFE_INTEGER}`
          : "a positive integer",
        iss.input,
      ),
  });

const stringList = (name: string) =>
  z.array(z.string(err(name, "an array of strings")), err(name, "an array of strings"));

const timestamp = (name: string) => z.union([z.string(), z.number(), z.date()], err(name, TIMESTAMP_FORMATS));

const fn = (name: string) =>
  z.custom<(arg: never) => void>((v) => typeof v === "function", err(name, "a function"));

/** The options that the CLI's flags (and other likely names) stand for. */
const CLI_NAMES: Record<string, string> = {
  did: "wantedDids",
  dids: "wantedDids",
  collection: "wantedCollections",
  collections: "wantedCollections",
  kind: "kinds",
  operation: "operations",
  start: "startTimestamp",
  end: "endTimestamp",
  limit: "numRecords",
  queue: "queueName",
  db: "kv",
  database: "kv",
  path: "kv",
  instances: "instance",
  url: "instance",
};

/** The shape of the options object; value-level checks follow in {@link resolveSyncOptions}. */
export const SyncOptionsSchema = z.strictObject({
  wantedDids: stringList("wantedDids").optional(),
  wantedCollections: stringList("wantedCollections").optional(),
  kinds: stringList("kinds").optional(),
  operations: stringList("operations").optional(),
  startTimestamp: timestamp("startTimestamp").optional(),
  endTimestamp: timestamp("endTimestamp").optional(),
  numRecords: positiveInt("numRecords").optional(),
  instance: z.union([z.string(), z.array(z.string())], err("instance", "a host or URL, or an array of them"))
    .optional(),
  maxTime: z.number(err("maxTime", "a positive number of seconds")).refine(
    (n) => Number.isFinite(n) && n > 0,
    err("maxTime", "a positive number of seconds"),
  ).optional(),
  queueName: z.string(err("queueName", "a name of letters, digits, '_', '.' or '-'")).refine(
    (s) => QUEUE_NAME.test(s),
    err("queueName", QUEUE_NAME_RULE),
  ).optional(),
  batchSize: positiveInt("batchSize").refine((n) => n <= 10_000, err("batchSize", "at most 10000"))
    .optional(),
  compress: z.boolean(err("compress", "a boolean")).optional(),
  wire: z.enum(["v1", "v2"], err("wire", '"v1" or "v2"')).optional(),
  zstdDictionary: z.union(
    [
      z.string().min(1, err("zstdDictionary", "a file path or the dictionary's bytes")),
      z.instanceof(Uint8Array),
    ],
    err(
      "zstdDictionary",
      "a file path or the dictionary's bytes",
    ),
  ).optional(),
  kv: z.union(
    [
      z.string().min(1, err("kv", "a Deno.Kv or a database path")).refine(
        (path) => path !== ":memory:",
        { error: () => inMemoryPathRefusal("sync") },
      ),
      z.custom<Deno.Kv>(isDenoKv),
    ],
    err(
      "kv",
      "a Deno.Kv or a database path",
    ),
  ).optional(),
  signal: z.custom<AbortSignal>((v) => v instanceof AbortSignal, err("signal", "an AbortSignal")).optional(),
  onProgress: fn("onProgress").optional(),
  onDateChange: fn("onDateChange").optional(),
  onError: fn("onError").optional(),
  resume: z.boolean(err("resume", "a boolean")).optional(),
  force: z.boolean(err("force", "a boolean")).optional(),
  idleTimeout: z.number(err("idleTimeout", "a positive number of seconds")).refine(
    (n) => n > 0,
    err("idleTimeout", "a positive number of seconds"),
  ).optional(),
  strict: z.boolean(err("strict", "a boolean")).optional(),
  // No message over 32 MiB is read (nor a compressed frame decoded past it): a larger limit would
  // say more than a run does.
  maxEventBytes: positiveInt("maxEventBytes").refine(
    (n) => n <= MAX_EVENT_BYTES_LIMIT,
    err("maxEventBytes", `at most ${MAX_EVENT_BYTES_LIMIT} (32 MiB, the largest message jetfill reads)`),
  ).optional(),
  maxRetries: z.number(err("maxRetries", "a non-negative integer")).refine(
    (n) => Number.isSafeInteger(n) && n >= 0,
    err("maxRetries", "a non-negative integer"),
  ).optional(),
}, {
  error: optionsObjectError(
    "sync",
    "runBackfillSync()",
    (): string[] => Object.keys(SyncOptionsSchema.shape),
    CLI_NAMES,
  ),
});

/**
 * Turns a host, or a `ws://`/`wss://` URL, into the WebSocket URL to connect to. A bare host means
 * `wss://HOST/subscribe`, except the v2 hosts, whose default is the v2 wire
 * (`/xrpc/network.bsky.jetstream.subscribeEvents`) unless `manyDids`: that wire has no
 * `options_update`, so more DIDs than a URL holds go in a hello on `/subscribe`, which v2 hosts serve
 * too. A URL without a path gets the same default. `wire` forces one wire: `/subscribe` (v1) or
 * `subscribeEvents` (v2).
 *
 * @example
 * ```ts
 * import { instanceUrl } from "@jetfill/jetfill";
 * instanceUrl("jetstream2.us-west.bsky.network"); // "wss://jetstream2.us-west.bsky.network/subscribe"
 * instanceUrl("ws://127.0.0.1:6008"); // "ws://127.0.0.1:6008/subscribe"
 * instanceUrl("jetstream.us-east.bsky.network"); // "wss://jetstream.us-east.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents"
 * ```
 */
export function instanceUrl(value: string, wire?: "v1" | "v2", manyDids = false): string {
  const text = value.trim();
  const expected = "a host name or a ws:// or wss:// URL";
  let url: URL;
  if (HAS_SCHEME.test(text)) {
    try {
      url = new URL(text);
    } catch {
      throw new UsageError(because("instance", expected, value));
    }
    if (url.protocol !== "ws:" && url.protocol !== "wss:") {
      throw new UsageError(because("instance", expected, value));
    }
    // (`ws:///subscribe` parses as the host "subscribe": the URL parser passes over extra slashes.)
    if (/^wss?:\/\/[/\\]/i.test(text)) {
      throw new UsageError(because("instance", "a ws:// or wss:// URL with a host after the //", value));
    }
  } else {
    if (!/^[a-zA-Z0-9.-]+(:\d{1,5})?$/.test(text) || text.startsWith(".") || text.length === 0) {
      throw new UsageError(because("instance", expected, value));
    }
    try {
      url = new URL(`wss://${text}/`);
    } catch {
      // A port over 65535.
      throw new UsageError(because("instance", expected, value));
    }
  }
  url.hash = "";
  for (const key of url.searchParams.keys()) {
    const option = OWN_PARAMS.get(key);
    if (option !== undefined) {
      throw new UsageError(
        because(
          "instance",
          `a URL without ${key} in its query string (jetfill sets it from ${option})`,
          value,
        ),
      );
    }
  }
  const bare = isBareInstance(text);
  const v2 = wire === "v2" || (wire === undefined && bare && !manyDids && V2_HOSTS.includes(url.hostname));
  if (bare || wire !== undefined) {
    if (v2) url.pathname = V2_SUBSCRIBE_PATH;
    else if (bare || url.pathname.endsWith(V2_SUBSCRIBE_PATH)) url.pathname = "/subscribe";
  }
  return url.toString();
}

const HAS_SCHEME = /^[a-z][a-z0-9+.-]*:\/\//i;

/**
 * `url` without the query parameters jetfill writes itself (see {@link OWN_PARAMS}); `url` itself when
 * it has none of them (or is not a URL). Versions before 2026-12-01 kept an instance's query string
 * as given, and a resume takes the instances its checkpoint names.
 *
 * @example
 * ```ts
 * import { withoutOwnParams } from "./options.ts";
 * withoutOwnParams("ws://127.0.0.1:6008/subscribe?wantedCollections=app.bsky.feed.post"); // "ws://127.0.0.1:6008/subscribe"
 * ```
 */
export function withoutOwnParams(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return url;
  }
  const own = [...new Set(parsed.searchParams.keys())].filter((k) => OWN_PARAMS.has(k));
  if (own.length === 0) return url;
  for (const key of own) parsed.searchParams.delete(key);
  return parsed.toString();
}

/**
 * The query parameters of either wire that jetfill writes from its own options (protocol doc §1.1,
 * §1.3), with the option to give instead: one left in an instance's URL would be replaced without
 * a word, and the run would not select what its user asked for.
 */
const OWN_PARAMS = new Map<string, string>([
  ["wantedDids", "--did / wantedDids"],
  ["dids", "--did / wantedDids"],
  ["wantedCollections", "--collection / wantedCollections"],
  ["collections", "--collection / wantedCollections"],
  ["kinds", "--kind / kinds"],
  ["cursor", "--start / startTimestamp or --resume / resume: true"],
  ["compress", "--compress / compress"],
  ["zstdDictionary", "--compress / compress with --zstd-dictionary / zstdDictionary"],
]);

/**
 * Whether an `instance` value names no path (a host, or a URL of just a host), so that its wire is
 * its host's default unless `wire` says otherwise (see {@link instanceUrl}). False for a value that
 * is not a URL at all (which `instanceUrl()` refuses).
 *
 * @example
 * ```ts
 * import { isBareInstance } from "./options.ts";
 * isBareInstance("ws://127.0.0.1:6008"); // true
 * isBareInstance("ws://127.0.0.1:6008/subscribe"); // false
 * ```
 */
export function isBareInstance(value: string): boolean {
  const text = value.trim();
  if (!HAS_SCHEME.test(text)) return true;
  try {
    const { pathname } = new URL(text);
    return pathname === "" || pathname === "/";
  } catch {
    return false;
  }
}

function unique<T>(values: readonly T[]): T[] {
  return [...new Set(values)];
}

function toUs(name: string, value: string | number | Date | undefined): number | undefined {
  if (value === undefined) return undefined;
  const us = parseTimestamp(value);
  if (us === undefined) throw new UsageError(because(name, TIMESTAMP_FORMATS, value) + unitHint(value));
  return us;
}

/**
 * For an integer that is not microseconds of the Bluesky era: the unit it looks like (seconds,
 * milliseconds, nanoseconds) and its value in µs, or what an integer is taken as.
 */
function unitHint(value: string | number | Date): string {
  const digits = typeof value === "string" ? value.trim() : typeof value === "number" ? String(value) : "";
  if (!/^\d+$/.test(digits)) return "";
  // Nanoseconds are past what a double holds exactly: their microseconds are their first digits.
  if (digits.length === 19) {
    return ` (${digits} looks like nanoseconds; in microseconds that is ${digits.slice(0, 16)})`;
  }
  const n = Number(digits);
  const scale = digits.length <= 10 ? 1_000_000 : digits.length <= 13 ? 1000 : 1;
  if (scale > 1 && n * scale >= MIN_TIMESTAMP_US && Number.isSafeInteger(n * scale)) {
    return ` (${n} looks like ${scale === 1000 ? "milliseconds" : "seconds"}; in microseconds that is ${
      n * scale
    })`;
  }
  return ` (an integer is taken as unix microseconds, from ${MIN_TIMESTAMP_US} on: 16 digits, such as 1725911162329308)`;
}

/**
 * Validates `options` and fills in defaults. Throws a {@link UsageError} naming the first value that
 * cannot be used and what was expected.
 *
 * @example
 * ```ts
 * import { resolveSyncOptions } from "@jetfill/jetfill";
 * const o = resolveSyncOptions({ startTimestamp: "2024-01-01", numRecords: 50 });
 * o.startUs; // 1704067200000000
 * ```
 */
export function resolveSyncOptions(options: BackfillSyncOptions = {}): ResolvedSyncOptions {
  const parsed = SyncOptionsSchema.safeParse(options);
  if (!parsed.success) throw new UsageError(parsed.error.issues[0].message);
  const o = parsed.data;

  const wantedDids = unique(o.wantedDids ?? []);
  for (const did of wantedDids) {
    if (!isDid(did)) throw new UsageError(because("wantedDids", DID_FORMS, did));
  }
  if (wantedDids.length > MAX_WANTED_DIDS) {
    throw new UsageError(
      `Cannot sync as 'wantedDids' must hold at most ${MAX_WANTED_DIDS} DIDs (Jetstream's limit): current value has ${wantedDids.length}`,
    );
  }
  // "*" (how the command line asks for every collection, --collection '*') covers all the others.
  const wantedCollections = o.wantedCollections?.includes("*")
    ? []
    : unique(o.wantedCollections ?? ["app.bsky.feed.post"]);
  for (const c of wantedCollections) {
    if (!isCollectionFilter(c)) {
      throw new UsageError(
        because(
          "wantedCollections",
          "NSIDs such as app.bsky.feed.post or prefixes such as app.bsky.graph.*",
          c,
        ),
      );
    }
  }
  if (wantedCollections.length > MAX_WANTED_COLLECTIONS) {
    throw new UsageError(
      `Cannot sync as 'wantedCollections' must hold at most ${MAX_WANTED_COLLECTIONS} collections (Jetstream's limit): current value has ${wantedCollections.length}`,
    );
  }
  const kinds = unique(o.kinds ?? ["commit"]);
  for (const k of kinds) {
    if (!KIND_SET.has(k)) throw new UsageError(because("kinds", `one of ${EVENT_KINDS.join(", ")}`, k));
  }
  if (kinds.length === 0) {
    throw new UsageError(because("kinds", `at least one of ${EVENT_KINDS.join(", ")}`, []));
  }
  const operations = unique(o.operations ?? COMMIT_OPERATIONS);
  for (const op of operations) {
    if (!OPERATION_SET.has(op)) {
      throw new UsageError(because("operations", `one of ${COMMIT_OPERATIONS.join(", ")}`, op));
    }
  }
  if (operations.length === 0) {
    throw new UsageError(because("operations", `at least one of ${COMMIT_OPERATIONS.join(", ")}`, []));
  }

  const startUs = toUs("startTimestamp", o.startTimestamp);
  const endUs = toUs("endTimestamp", o.endTimestamp);
  if (startUs !== undefined && endUs !== undefined && endUs <= startUs) {
    throw new UsageError(
      `Cannot sync as 'endTimestamp' must be after 'startTimestamp': ${isoFromUs(endUs)} is not after ${
        isoFromUs(startUs)
      }`,
    );
  }
  if (startUs === undefined && endUs !== undefined && !o.resume && endUs <= Date.now() * 1000) {
    // Without a start the run follows the live stream, whose first event is already past the end.
    throw new UsageError(
      `Cannot sync as 'endTimestamp' must be in the future when no 'startTimestamp' is given (the run then follows the live stream from now; give a 'startTimestamp' for a past window): current value is ${
        isoFromUs(endUs)
      }`,
    );
  }
  const maxTimeS = o.maxTime ?? 900;
  if (startUs !== undefined && !o.resume && startUs > Date.now() * 1000 + maxTimeS * 1e6) {
    // Jetstream sends the live stream for a cursor in the future: the run would wait out its maxTime
    // and store nothing (a mistyped year, most likely).
    throw new UsageError(
      `Cannot sync as 'startTimestamp' must be before the run's time limit ('maxTime', ${maxTimeS} s) is over: current value is ${
        isoFromUs(startUs)
      }, later than that, so no event could be stored`,
    );
  }
  const given = o.instance === undefined
    ? [PUBLIC_INSTANCES[0]]
    : typeof o.instance === "string"
    ? [o.instance]
    : o.instance;
  if (given.length === 0) throw new UsageError(because("instance", "at least one host or URL", []));
  const instances = unique(given.map((i) => instanceUrl(i, o.wire, didsNeedHello(wantedDids))));
  for (const instance of instances) {
    // A proxy in the environment that cannot be used is the user's to fix, before connecting.
    try {
      proxyFor(new URL(instance));
    } catch (err) {
      throw new UsageError((err as Error).message);
    }
  }
  const v2 = instances.find(isV2Url);
  if (v2 !== undefined) {
    // The v2 wire checks a prefix's head as an NSID prefix (`app.*` is refused there, accepted on
    // /subscribe): refuse it here, before connecting (protocol doc §1.3).
    const bad = wantedCollections.find((c) => c.endsWith(".*") && !isNsid(`${c.slice(0, -2)}.x`));
    if (bad !== undefined) {
      throw new UsageError(
        because(
          "wantedCollections",
          `prefixes of at least two segments such as app.bsky.* on the v2 wire (${new URL(v2).host})`,
          bad,
        ),
      );
    }
  }

  return {
    wantedDids,
    wantedCollections,
    kinds: kinds as EventKind[],
    operations: operations as CommitOperation[],
    startUs,
    endUs,
    numRecords: o.numRecords ?? 10_000,
    instances,
    maxTimeMs: maxTimeS * 1000,
    queueName: o.queueName ?? "jetstream_sync",
    batchSize: o.batchSize ?? 100,
    compress: o.compress ?? false,
    kv: o.kv,
    resume: o.resume ?? false,
    force: o.force ?? false,
    // Beyond what a timer can wait, an idle timeout is no timeout.
    idleTimeoutMs: Math.min((o.idleTimeout ?? 60) * 1000, MAX_TIMER_MS),
    maxRetries: o.maxRetries ?? 10,
    strict: o.strict ?? false,
    maxEventBytes: o.maxEventBytes ?? DEFAULT_MAX_EVENT_BYTES,
    failoverAfter: 2,
    rewindUs: 5_000_000,
    dedupeWindow: 100_000,
    maxBufferedBytes: 8 << 20,
  };
}
