/**
 * The v2 wire, `GET /xrpc/network.bsky.jetstream.subscribeEvents` (protocol doc §1.3, §3.3, §4.2).
 *
 * Its message frames are mapped to the same {@link JetstreamEvent} shape the `/subscribe` wire of a
 * v2 server sends, so the queue holds one format whatever the wire:
 *
 * | v2 payload | stored event |
 * |---|---|
 * | `#commit` `{seq, did, time, rev, operation, collection, rkey, record?, cid?}` | `{did, time_us, cursor: seq, kind: "commit", commit: {rev, operation, collection, rkey, record?, cid?}}` |
 * | `#identity` `{seq, did, time, identity}` | `{did, time_us, cursor: seq, kind: "identity", identity}` |
 * | `#account` `{seq, did, time, account}` | `{did, time_us, cursor: seq, kind: "account", account}` |
 *
 * `time_us` is `time` (RFC 3339 with six fractional digits) in microseconds. `#sync` events and
 * unknown types are skipped, `#info` frames are surfaced, error frames end the connection.
 *
 * @module
 */
import { messageWithCause } from "../errors.ts";
import type { EventKind, JetstreamEvent } from "./events.ts";
import { usFromIso } from "../time.ts";
import { printable } from "./utf8.ts";

/** Path of the v2 subscription endpoint. */
export const V2_SUBSCRIBE_PATH = "/xrpc/network.bsky.jetstream.subscribeEvents";
/**
 * The v2 wire's WebSocket subprotocol (atproto proposal 0015, protocol doc §1.3), which jetfill
 * offers: a server echoes it, and its framing is the same either way.
 */
export const V2_SUBPROTOCOL = "xrpc.v1.json";
/** What a v2 message frame's payload `$type` begins with: the kind follows (`#commit`, `#info`, …). */
export const V2_PAYLOAD_TYPE = "network.bsky.jetstream.subscribeEvents#";
/** Path of the v2 dictionary endpoint. */
export const V2_DICTIONARY_PATH = "/xrpc/network.bsky.jetstream.getZstdDictionary";
/** Hosts that run the v2 server, where the v2 wire is the default. */
export const V2_HOSTS: readonly string[] = [
  "jetstream.us-east.bsky.network",
  "jetstream.us-west.bsky.network",
];

/** Whether a WebSocket URL is the v2 wire's endpoint. */
export function isV2Url(url: string): boolean {
  return new URL(url).pathname.endsWith(V2_SUBSCRIBE_PATH);
}

/** What a v2 subscription asks for. */
export interface V2Params {
  /** Kinds; all four when empty. */
  kinds: readonly EventKind[];
  /** DIDs; all when empty. */
  wantedDids: readonly string[];
  /** Collections of commits; all when empty. */
  wantedCollections: readonly string[];
  /** Inclusive cursor: a seq below 1e15, unix µs above. */
  cursor?: number;
  /** Dictionary ID for zstd frames. */
  zstdDictionary?: number;
}

/**
 * The v2 subscription URL (repeated `kinds`, `dids`, `collections`; the legacy names are refused
 * by v2 servers).
 *
 * @example
 * ```ts
 * import { buildV2Url } from "./v2.ts";
 * buildV2Url("wss://jetstream.us-east.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents", {
 *   kinds: ["commit"], wantedDids: [], wantedCollections: ["app.bsky.feed.post"], cursor: 123,
 * });
 * ```
 */
export function buildV2Url(base: string, p: V2Params): string {
  const url = new URL(base);
  // A copy, written back once: each change to url.searchParams rewrites the whole URL, which made
  // 10,000 DIDs take half a minute.
  const q = new URLSearchParams(url.search);
  for (const key of ["kinds", "dids", "collections", "cursor", "zstdDictionary"]) q.delete(key);
  for (const k of p.kinds) q.append("kinds", k);
  for (const d of p.wantedDids) q.append("dids", d);
  // Collections constrain commits only, and are refused when commits are not asked for.
  if (p.kinds.includes("commit")) { for (const c of p.wantedCollections) q.append("collections", c); }
  if (p.cursor !== undefined) q.set("cursor", String(Math.trunc(p.cursor)));
  if (p.zstdDictionary !== undefined) q.set("zstdDictionary", String(p.zstdDictionary));
  url.search = q.toString();
  return url.toString().replaceAll("%2A", "*").replaceAll("%3A", ":");
}

/** One v2 frame, classified. */
export type V2Frame =
  | {
    type: "event";
    event: JetstreamEvent;
    /**
     * How many characters at least the stored event's JSON text (`JSON.stringify(event)`) is
     * shorter than the frame's text: see {@link envelopeLength}.
     */
    shorterBy: number;
  }
  | { type: "info"; name: string; message: string }
  | { type: "error"; error: string; message: string }
  | { type: "skip"; reason: string }
  | { type: "invalid"; reason: string };

const KINDS = new Set(["commit", "identity", "account"]);

/**
 * Maps a parsed v2 frame to an event (see the module's table), or says what else it is.
 *
 * @example
 * ```ts
 * import { mapV2Frame } from "./v2.ts";
 * mapV2Frame({ $type: "message", payload: { $type: "network.bsky.jetstream.subscribeEvents#identity",
 *   seq: 7, did: "did:plc:x", time: "2024-09-09T19:46:02.329308Z", identity: { did: "did:plc:x", seq: 1, time: "t" } } });
 * // { type: "event", event: { did: "did:plc:x", time_us: 1725911162329308, cursor: 7, kind: "identity", identity: {…} } }
 * ```
 */
export function mapV2Frame(frame: unknown): V2Frame {
  if (typeof frame !== "object" || frame === null) return { type: "invalid", reason: "not an object" };
  const f = frame as Record<string, unknown>;
  if (f.$type === "error") {
    return { type: "error", error: String(f.error ?? "unknown"), message: String(f.message ?? "") };
  }
  if (f.$type !== "message") return { type: "skip", reason: `frame type ${String(f.$type)}` };
  const p = f.payload as Record<string, unknown> | undefined;
  if (typeof p !== "object" || p === null || typeof p.$type !== "string") {
    return { type: "invalid", reason: "message without payload" };
  }
  // Another namespace's `#commit` is no event of this wire: skipped, as any unknown payload type.
  if (!p.$type.startsWith(V2_PAYLOAD_TYPE)) return { type: "skip", reason: `payload type ${p.$type}` };
  const kind = p.$type.slice(V2_PAYLOAD_TYPE.length);
  if (kind === "info") return { type: "info", name: String(p.name ?? ""), message: String(p.message ?? "") };
  if (!KINDS.has(kind)) return { type: "skip", reason: `payload type ${p.$type}` };
  const timeUs = typeof p.time === "string" ? usFromIso(p.time) : undefined;
  if (typeof p.did !== "string" || typeof p.seq !== "number" || timeUs === undefined) {
    return { type: "invalid", reason: "missing did, seq or time" };
  }
  if (kind === "commit") {
    if (typeof p.collection !== "string" || typeof p.rkey !== "string" || typeof p.operation !== "string") {
      return { type: "invalid", reason: "commit without collection, rkey or operation" };
    }
    const commit: Record<string, unknown> = {
      rev: p.rev,
      operation: p.operation,
      collection: p.collection,
      rkey: p.rkey,
    };
    if (p.record !== undefined) commit.record = p.record;
    if (p.cid !== undefined) commit.cid = p.cid;
    return {
      type: "event",
      event: {
        did: p.did,
        time_us: timeUs,
        cursor: p.seq,
        kind: "commit",
        commit,
      } as unknown as JetstreamEvent,
      shorterBy: envelopeLength(p.$type, p.time as string, timeUs, p.seq, kind),
    };
  }
  const body = p[kind];
  if (typeof body !== "object" || body === null) {
    return { type: "invalid", reason: `${kind} without its body` };
  }
  return {
    type: "event",
    event: { did: p.did, time_us: timeUs, cursor: p.seq, kind, [kind]: body } as unknown as JetstreamEvent,
    shorterBy: envelopeLength(p.$type, p.time as string, timeUs, p.seq, kind),
  };
}

/**
 * The event a v2 frame's text maps to, for a frame already mapped once (the writer keeps frames'
 * texts rather than events, and rebuilds a commit KV refused from them).
 *
 * @example
 * ```ts
 * import { eventFromV2Text } from "./v2.ts";
 * eventFromV2Text('{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#account","seq":3,"did":"did:plc:x","time":"2024-09-09T19:46:02.329308Z","account":{"active":true}}}');
 * // { did: "did:plc:x", time_us: 1725911162329308, cursor: 3, kind: "account", account: { active: true } }
 * ```
 */
export function eventFromV2Text(text: string): JetstreamEvent {
  const m = mapV2Frame(JSON.parse(text));
  if (m.type !== "event") throw new Error(`not a v2 event frame (${m.type}): ${text.slice(0, 80)}`);
  return m.event;
}

/** How many characters `String(n)` has, without building it (for the integers of a frame). */
function decimalLength(n: number): number {
  if (!Number.isSafeInteger(n) || n < 0) return String(n).length;
  let digits = 1;
  for (let x = n; x >= 10; x = Math.floor(x / 10)) digits++;
  return digits;
}

/**
 * How many characters the text of a v2 message frame has at least beyond its event's stored text
 * (`JSON.stringify` of what {@link mapV2Frame} makes of it), so that the stored text's size can be
 * bounded from the frame's without writing it out.
 *
 * - Only in the frame, each at least as long as spelled here: `"$type":"message"` (17),
 *   `"payload":` (10), `"$type":P` (10 + P), `"seq":N` (7: N may be spelled short, `1e3`) and
 *   `"time":T` (9 + T), and one comma more (the frame's two objects hold at least 5 + c members
 *   between them, the stored event's 5 and c, c being a commit's fields or 1).
 * - Only in the stored text, exactly: `"time_us":` and its digits, `"cursor":` and the seq's digits,
 *   `"kind":K` (9 + K) and `"K":` (3 + K).
 * - The rest is the same values under the same keys: `did` and a commit's fields or the body of an
 *   identity or account, and `JSON.stringify` writes a string as short as JSON can. Numbers aside:
 *   one spelled with an exponent can be shorter in the frame, as a float is shorter as text than
 *   serialized, which the size bound leaves to the writer's repair (see `serializedSizeBound`).
 */
function envelopeLength(
  payloadType: string,
  time: string,
  timeUs: number,
  seq: number,
  kind: string,
): number {
  const frameOnly = 17 + 10 + 10 + payloadType.length + 7 + 9 + time.length + 1;
  const storedOnly = 10 + decimalLength(timeUs) + 9 + decimalLength(seq) + 9 + kind.length + 3 + kind.length;
  return frameOnly - storedOnly;
}

/** The XRPC error name and message of a refused request body, when it is one. */
export function parseXrpcError(body: string | undefined): { error: string; message: string } | undefined {
  if (!body) return undefined;
  try {
    const v = JSON.parse(body);
    if (typeof v?.error === "string") return { error: v.error, message: String(v.message ?? "") };
  } catch { /* plain text */ }
  return undefined;
}

/** How long {@link fetchV2Dictionary} waits for the dictionary by default, ms. */
export const V2_DICTIONARY_TIMEOUT_MS = 30_000;

/**
 * A v2 dictionary that could not be fetched; `transient` when asking again later may work (no
 * answer, a network error, HTTP 5xx or 429).
 *
 * @example
 * ```ts
 * import { V2DictionaryError } from "./v2.ts";
 * const err = new V2DictionaryError("https://host/… answered HTTP 503: warming up", true);
 * console.log(err.transient); // true
 * ```
 */
export class V2DictionaryError extends Error {
  /** Whether asking again later may work. */
  readonly transient: boolean;

  /** `message` says which URL and what went wrong. */
  constructor(message: string, transient: boolean, options?: ErrorOptions) {
    super(message, options);
    this.name = "V2DictionaryError";
    this.transient = transient;
  }
}

/**
 * Fetches the server's current v2 zstd dictionary (`getZstdDictionary`), with its ID. Only the
 * method in `wsUrl`'s path is replaced, so a host served under a path prefix
 * (`…/prefix/xrpc/network.bsky.jetstream.subscribeEvents`) is asked under that prefix too. A
 * failure, no answer within `timeoutMs` included, throws a {@link V2DictionaryError}; an abort by
 * `signal` throws its reason.
 *
 * @example
 * ```ts
 * import { fetchV2Dictionary } from "./v2.ts";
 * const { id, bytes } = await fetchV2Dictionary("wss://jetstream.us-east.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents");
 * ```
 */
export async function fetchV2Dictionary(
  wsUrl: string,
  signal?: AbortSignal,
  timeoutMs: number = V2_DICTIONARY_TIMEOUT_MS,
): Promise<{ id: number; bytes: Uint8Array }> {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  const path = url.pathname;
  url.pathname = path.endsWith(V2_SUBSCRIBE_PATH)
    ? path.slice(0, -V2_SUBSCRIBE_PATH.length) + V2_DICTIONARY_PATH
    : V2_DICTIONARY_PATH;
  url.search = "";
  // The caller's signal stops it at once; the timeout, whatever the caller's signal, stops a host
  // that takes the request and never answers.
  const timeout = AbortSignal.timeout(timeoutMs);
  let res: Response;
  let bytes: Uint8Array;
  try {
    res = await fetch(url, { signal: signal ? AbortSignal.any([signal, timeout]) : timeout });
    if (!res.ok) {
      const body = printable((await res.text()).slice(0, 200));
      throw new V2DictionaryError(
        `${url} answered HTTP ${res.status}: ${body}`,
        res.status >= 500 || res.status === 429,
      );
    }
    bytes = new Uint8Array(await res.arrayBuffer());
  } catch (err) {
    if (err instanceof V2DictionaryError || signal?.aborted) throw err;
    const message = timeout.aborted ? `no answer within ${timeoutMs / 1000} s` : messageWithCause(err);
    throw new V2DictionaryError(`${url}: ${message}`, true, { cause: err });
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const id = bytes.byteLength >= 8 && view.getUint32(0, true) === 0xec30a437
    ? view.getUint32(4, true)
    : Number(res.headers.get("x-zstd-dictionary-id"));
  if (!Number.isSafeInteger(id) || id <= 0) {
    throw new V2DictionaryError(`${url} did not send a zstd dictionary`, false);
  }
  return { id, bytes };
}
