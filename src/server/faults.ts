/**
 * Deliberate misbehaviour for the replay server, to test how a client copes with what public
 * Jetstream hosts actually do (protocol doc §5.3, §9): refusals while bootstrapping (HTTP 503),
 * connections dropped without a close frame (1006, jetstream-legacy#27), connections that go quiet
 * but stay open (jetstream-legacy#48), frames a client cannot use, and `time_us` going backwards.
 *
 * Every fault is a pure function of the connection's own history (its record id, its ordinal among
 * WebSocket connections and the number of events it was sent) or of the capture, never of timing or
 * randomness, so a test that replays the same requests sees the same faults.
 *
 * @module
 */
import { show } from "../errors.ts";
import { objectMembers } from "./json_scan.ts";

/**
 * Faults to inject; every field is optional and off when absent. When several fire after the same
 * event, they apply in this order: a garbage frame, then the server option `errorAfter` (error
 * frame and drop), then the drop, then the stall.
 *
 * @example
 * ```ts
 * import type { ServerFaults } from "./faults.ts";
 * // Two 503s, then every connection dies after 500 events, with a bad frame after every 100.
 * const faults: ServerFaults = { refuseFirst: 2, dropEvery: 500, garbageEvery: 100 };
 * ```
 */
export interface ServerFaults {
  /**
   * The first K subscription requests (on `/subscribe` and, on a v2 server, on `subscribeEvents`
   * too; counted together in arrival order, whatever their parameters) are refused with HTTP 503
   * `service not ready: bootstrap in progress`, as a v2 server answers while it bootstraps: as
   * `text/plain` on `/subscribe`, as a `ServiceUnavailable` JSON envelope on `subscribeEvents`.
   * They are recorded in `connections` with status 503.
   *
   * @default {0}
   */
  refuseFirst?: number;
  /**
   * Seconds that the refusals of {@linkcode refuseFirst} ask a client to wait, in a `Retry-After`
   * header (RFC 9110 §10.2.3), as a server or a proxy in front of it may; none when absent.
   */
  retryAfter?: number;
  /**
   * Every WebSocket connection is dropped after its N-th event: the events are flushed to the
   * socket, then the TCP connection is closed without a close frame, so the client sees 1006 after
   * exactly N events (the legacy server's slow-consumer drop). Connections that select fewer
   * events end normally. Sets `ConnectionRecord.dropped`.
   */
  dropEvery?: number;
  /**
   * After its N-th event (0: before any event), a stalling connection sends nothing more and stays
   * open: no events, no close, and no answers to pings, like jetstream-legacy#48. It only ends when
   * the client goes away or the server shuts down (then without a close frame). A close frame from
   * the client is still echoed, because Deno's `WebSocket` never reports `close` without the echo
   * and the legacy server's reader (which answers it) kept running. Sets `ConnectionRecord.stalled`.
   */
  stallAfter?: number;
  /**
   * How many connections stall with `stallAfter`: the first M WebSocket connections, in order of
   * upgrade (refused requests do not count), so that a client reconnecting after it detects the
   * stall gets a healthy connection. A `runBackfillSync()` given a start first opens a short coverage
   * probe (`cursor=0`), which counts: to stall its first stream connection, give 2.
   *
   * @default {1}
   */
  stallConnections?: number;
  /**
   * After every N events of a connection, one bad frame is sent, cycling through
   * {@linkcode GARBAGE_KINDS}: the j-th bad frame (from 0) of the connection with record id k is of
   * kind `GARBAGE_KINDS[(k - 1 + j) % 5]`, so a client that reconnects meets every kind. Bad frames
   * ignore filters and `maxMessageSizeBytes`, and reuse the DID and `time_us` of the event just sent
   * (never a later `time_us`, so a client that deduplicates on it cannot lose a real event). On
   * compressed connections the JSON kinds are compressed like events. Counted in
   * `ConnectionRecord.garbage`.
   */
  garbageEvery?: number;
  /**
   * The legacy server sends the events in the order given even where `time_us` goes backwards,
   * which no healthy legacy server does (its store is keyed by `time_us`), rather than sorting
   * them: a buggy or hostile server's impossible `time_us` among good events, or the reordering at
   * the legacy server's replay→live cutover (jetstream-legacy#42, protocol doc §5.2). A cursor then
   * starts at the first event and skips those before it in time. A v2 server always keeps the
   * order given, its seq order, so this changes nothing there.
   *
   * @default {false}
   */
  fileOrder?: boolean;
}

/**
 * The kinds of bad frame `garbageEvery` sends, in cycle order:
 *
 * - `malformed-json`: the first half of the event just sent, cut mid-JSON;
 * - `binary-junk`: a binary frame of 64 pseudo-random bytes (not JSON, not a zstd frame);
 * - `unknown-kind`: `{"did":…,"time_us":…,"kind":"heartbeat"}` (on the v2 wire, a message whose
 *   payload `$type` is `…subscribeEvents#heartbeat`);
 * - `missing-time-us`: the event just sent without its `time_us` (on the v2 wire, without `seq`);
 * - `oversized`: a well-formed commit (v2: `#commit` message) whose post text makes the frame
 *   about 2 MiB.
 *
 * @example
 * ```ts
 * import { GARBAGE_KINDS } from "./faults.ts";
 * console.log(GARBAGE_KINDS[0]); // "malformed-json"
 * ```
 */
export const GARBAGE_KINDS = [
  "malformed-json",
  "binary-junk",
  "unknown-kind",
  "missing-time-us",
  "oversized",
] as const;

/**
 * One of {@linkcode GARBAGE_KINDS}.
 *
 * @example
 * ```ts
 * import type { GarbageKind } from "./faults.ts";
 * const kind: GarbageKind = "binary-junk";
 * ```
 */
export type GarbageKind = typeof GARBAGE_KINDS[number];

/**
 * Size of the post text in an `oversized` garbage frame.
 *
 * @example
 * ```ts
 * import { OVERSIZED_TEXT_CHARS } from "./faults.ts";
 * console.log(OVERSIZED_TEXT_CHARS); // 2097152
 * ```
 */
export const OVERSIZED_TEXT_CHARS = 2 * 1024 * 1024;

/**
 * {@linkcode ServerFaults} with every default applied; a fault that is off has the count
 * `Infinity` (or 0 for `refuseFirst`).
 *
 * @example
 * ```ts
 * import { resolveFaults, type ResolvedFaults } from "./faults.ts";
 * const faults: ResolvedFaults = resolveFaults({ stallAfter: 0 });
 * console.log(faults.stallConnections); // 1
 * ```
 */
export interface ResolvedFaults {
  /** See {@linkcode ServerFaults.refuseFirst}. */
  refuseFirst: number;
  /** See {@linkcode ServerFaults.retryAfter}. */
  retryAfter: number | undefined;
  /** See {@linkcode ServerFaults.dropEvery}. */
  dropEvery: number;
  /** See {@linkcode ServerFaults.stallAfter}. */
  stallAfter: number;
  /** See {@linkcode ServerFaults.stallConnections}. */
  stallConnections: number;
  /** See {@linkcode ServerFaults.garbageEvery}. */
  garbageEvery: number;
  /** See {@linkcode ServerFaults.fileOrder}. */
  fileOrder: boolean;
}

function check(
  faults: ServerFaults,
  field: Exclude<keyof ServerFaults, "fileOrder">,
  min: number,
  what: string,
): number | undefined {
  const value = faults[field];
  if (value === undefined) return undefined;
  if (!Number.isSafeInteger(value) || value < min) {
    throw new RangeError(
      `Cannot serve as 'faults.${field}' must be ${what}: current value is ${show(value)}`,
    );
  }
  return value;
}

/**
 * Validates faults and applies defaults (absent counts are 0 or `Infinity`, meaning off). Throws
 * `RangeError` (`TypeError` for a `fileOrder` that is no boolean) naming the bad field.
 *
 * @example
 * ```ts
 * import { resolveFaults } from "./faults.ts";
 * resolveFaults({ dropEvery: 10 }).dropEvery; // 10
 * resolveFaults({}).dropEvery; // Infinity
 * ```
 */
export function resolveFaults(faults: ServerFaults = {}): ResolvedFaults {
  if (typeof faults !== "object" || faults === null) {
    throw new TypeError("Cannot serve as 'faults' must be an object");
  }
  const { fileOrder = false } = faults;
  if (typeof fileOrder !== "boolean") {
    throw new TypeError(
      `Cannot serve as 'faults.fileOrder' must be a boolean: current value is ${show(fileOrder)}`,
    );
  }
  return {
    refuseFirst: check(faults, "refuseFirst", 0, "a non-negative integer") ?? 0,
    retryAfter: check(faults, "retryAfter", 0, "a non-negative integer of seconds"),
    dropEvery: check(faults, "dropEvery", 1, "a positive integer") ?? Infinity,
    stallAfter: check(faults, "stallAfter", 0, "a non-negative integer") ?? Infinity,
    stallConnections: check(faults, "stallConnections", 0, "a non-negative integer") ?? 1,
    garbageEvery: check(faults, "garbageEvery", 1, "a positive integer") ?? Infinity,
    fileOrder,
  };
}

/**
 * The kind of the j-th bad frame (from 0) of the connection with record id `connectionId`.
 *
 * @example
 * ```ts
 * import { garbageKind } from "./faults.ts";
 * garbageKind(1, 0); // "malformed-json"
 * garbageKind(2, 0); // "binary-junk"
 * ```
 */
export function garbageKind(connectionId: number, index: number): GarbageKind {
  return GARBAGE_KINDS[(connectionId - 1 + index) % GARBAGE_KINDS.length];
}

/**
 * 64 junk bytes, the same for the same arguments: they start with `0xDEADBEEF` (so they are neither
 * JSON nor a zstd frame) and continue with xorshift32 output.
 *
 * @example
 * ```ts
 * import { junkBytes } from "./faults.ts";
 * junkBytes(1, 0)[0]; // 0xde
 * ```
 */
export function junkBytes(connectionId: number, index: number): Uint8Array {
  const bytes = new Uint8Array(64);
  bytes.set([0xde, 0xad, 0xbe, 0xef]);
  let x = (Math.imul(connectionId, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b)) | 1;
  for (let i = 4; i < bytes.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    bytes[i] = x & 255;
  }
  return bytes;
}

let oversizedText: string | undefined;

/**
 * The post text of an `oversized` frame ({@linkcode OVERSIZED_TEXT_CHARS} letters), made once.
 *
 * @example
 * ```ts
 * import { oversizedPostText } from "./faults.ts";
 * console.log(oversizedPostText().length); // 2097152
 * ```
 */
export function oversizedPostText(): string {
  oversizedText ??= "x".repeat(OVERSIZED_TEXT_CHARS);
  return oversizedText;
}

/**
 * A v1-wire (legacy `/subscribe`) bad frame of a JSON kind, built from the event just sent. Returns
 * a string to send as text (or to compress).
 *
 * @param kind Any kind but `binary-junk`.
 * @param lastText The exact text of the event just sent (with `cursor` on a v2 server).
 * @param tag Makes the oversized frame's rkey unique, e.g. `"3-2"` for connection 3, frame 2.
 *
 * @example
 * ```ts
 * import { v1Garbage } from "./faults.ts";
 * v1Garbage("unknown-kind", '{"did":"did:plc:abc","time_us":5,"kind":"commit","commit":{}}', "1-0");
 * // '{"did":"did:plc:abc","time_us":5,"kind":"heartbeat"}'
 * ```
 */
export function v1Garbage(kind: Exclude<GarbageKind, "binary-junk">, lastText: string, tag: string): string {
  const members = objectMembers(lastText);
  const raw = (key: string): string => {
    const span = members.get(key);
    return span === undefined ? "null" : lastText.slice(span.valueStart, span.valueEnd);
  };
  switch (kind) {
    case "malformed-json":
      return lastText.slice(0, Math.max(1, lastText.length >> 1));
    case "unknown-kind":
      return `{"did":${raw("did")},"time_us":${raw("time_us")},"kind":"heartbeat"}`;
    case "missing-time-us": {
      const kept = [...members].filter(([key]) => key !== "time_us");
      return `{${kept.map(([, span]) => lastText.slice(span.keyStart, span.valueEnd)).join(",")}}`;
    }
    case "oversized":
      return `{"did":${raw("did")},"time_us":${raw("time_us")},"kind":"commit","commit":{` +
        `"rev":"3lgarbage2mib","operation":"create","collection":"app.bsky.feed.post",` +
        `"rkey":"garbage-${tag}","record":{"$type":"app.bsky.feed.post",` +
        `"createdAt":"2024-09-09T19:46:02.102Z","text":"${oversizedPostText()}"},` +
        `"cid":"bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"}}`;
  }
}
