/**
 * Request parsing of the v2 Jetstream server (protocol doc §1.2, §1.3, §2): its re-implementation of
 * the v1 `/subscribe` wire (same parameters, its own validation and error texts, `options_update`
 * with close codes 1007/1008) and the v2 wire `subscribeEvents` (`kinds`, `dids`, `collections`,
 * `cursor`, `maxMessageSizeBytes`, `zstdDictionary`, errors as XRPC JSON envelopes).
 *
 * Texts follow `bluesky-social/jetstream` (`internal/subscribe/filter.go`, `filterv2.go`,
 * `cursor.go`, `handler.go`).
 *
 * @module
 */
import {
  goQueryError,
  isValidDid,
  isValidNsid,
  type OptionsUpdatePayload,
  type ParsedSubscribeRequest,
  type SubscribeParams,
  type SubscriberFilter,
  wants,
} from "./options.ts";
import { V2_SUBPROTOCOL } from "../jetstream/v2.ts";

/**
 * The prefix of the v2 server's option errors (`ErrInvalidOptions`).
 *
 * @example
 * ```ts
 * import { V2_INVALID_OPTIONS } from "./v2_options.ts";
 * console.log(`${V2_INVALID_OPTIONS}: invalid DID: bob`);
 * ```
 */
export const V2_INVALID_OPTIONS = "subscribe: invalid options";

/**
 * Cursors below this are v2 seqs, cursors at or above it unix microseconds (`CursorSeqMaxThreshold`).
 *
 * @example
 * ```ts
 * import { CURSOR_SEQ_MAX } from "./v2_options.ts";
 * console.log(1_725_911_162_329_308 >= CURSOR_SEQ_MAX); // true: a time_us
 * ```
 */
export const CURSOR_SEQ_MAX = 1_000_000_000_000_000;

/**
 * The v2 server's read limit on client messages of the v1 wire (`MaxSubscriberMessageBytes`); a
 * bigger message closes the connection with 1009.
 *
 * @example
 * ```ts
 * import { V2_MAX_CLIENT_MESSAGE_BYTES } from "./v2_options.ts";
 * console.log(V2_MAX_CLIENT_MESSAGE_BYTES); // 10000000
 * ```
 */
export const V2_MAX_CLIENT_MESSAGE_BYTES = 10_000_000;

/** The only WebSocket subprotocol of `subscribeEvents`, echoed when offered (the client's constant). */
export { V2_SUBPROTOCOL };

const KINDS = ["commit", "identity", "account", "sync"] as const;
const MAX_DIDS = 10_000;
const MAX_COLLECTIONS = 100;

/**
 * Parses a cursor like the v2 server's `ResolveCursor`: empty is `undefined` (live), otherwise a
 * non-negative int64, else an error text.
 *
 * @example
 * ```ts
 * import { parseV2Cursor } from "./v2_options.ts";
 * parseV2Cursor("42"); // { cursor: 42 }
 * parseV2Cursor("-1"); // { error: "subscribe: invalid cursor: negative value -1" }
 * ```
 */
export function parseV2Cursor(raw: string): { cursor: number | undefined } | { error: string } {
  if (raw === "") return { cursor: undefined };
  const value = /^[+-]?\d+$/.test(raw) ? BigInt(raw) : undefined;
  if (value === undefined || value > 9223372036854775807n || value < -9223372036854775808n) {
    return { error: `subscribe: invalid cursor: ${JSON.stringify(raw)}` };
  }
  if (value < 0n) return { error: `subscribe: invalid cursor: negative value ${value}` };
  return { cursor: Number(value) };
}

/** The v2 server's `parseWantedCollections`: prefixes deduplicated, caps after dedupe. */
function parseCollections(values: readonly string[]): Pick<SubscriberFilter, "collections" | "prefixes"> {
  if (values.length === 0) return { collections: null, prefixes: [] };
  if (values.length > MAX_COLLECTIONS * 100) {
    throw new Error(`${V2_INVALID_OPTIONS}: too many wanted collections: ${values.length}`);
  }
  const collections = new Set<string>();
  const prefixes: string[] = [];
  for (const raw of values) {
    if (raw.endsWith(".*")) {
      const head = raw.slice(0, -1);
      if (!prefixes.includes(head)) prefixes.push(head);
    } else {
      if (!isValidNsid(raw)) throw new Error(`${V2_INVALID_OPTIONS}: invalid collection: ${raw}`);
      collections.add(raw);
    }
    if (collections.size + prefixes.length > MAX_COLLECTIONS) {
      throw new Error(`${V2_INVALID_OPTIONS}: too many wanted collections: > ${MAX_COLLECTIONS}`);
    }
  }
  return { collections, prefixes };
}

/** The v2 server's `parseWantedDIDs`. */
function parseDids(values: readonly string[]): Set<string> | null {
  if (values.length === 0) return null;
  if (values.length > MAX_DIDS * 100) {
    throw new Error(`${V2_INVALID_OPTIONS}: too many wanted DIDs: ${values.length}`);
  }
  const dids = new Set<string>();
  for (const raw of values) {
    if (!isValidDid(raw)) throw new Error(`${V2_INVALID_OPTIONS}: invalid DID: ${raw}`);
    dids.add(raw);
  }
  if (dids.size > MAX_DIDS) {
    throw new Error(`${V2_INVALID_OPTIONS}: too many wanted DIDs: ${dids.size} > ${MAX_DIDS}`);
  }
  return dids;
}

/**
 * `maxMessageSizeBytes` as the v2 server's `/subscribe` reads it: like legacy, garbage, empty and
 * negative values are 0 (no limit), but values beyond `uint32` are 0 too instead of wrapping.
 *
 * @example
 * ```ts
 * import { parseV2ServerMaxMessageSize } from "./v2_options.ts";
 * parseV2ServerMaxMessageSize("4294967296"); // 0
 * ```
 */
export function parseV2ServerMaxMessageSize(raw: string): number {
  if (!/^[+-]?\d+$/.test(raw)) return 0;
  const value = BigInt(raw);
  return value < 0n || value > 0xffffffffn ? 0 : Number(value);
}

/**
 * Parses a `/subscribe` request the way the v2 server does (§1.2): Go query syntax first, then
 * the choice of compression, the filter (collections, then DIDs), and the cursor; texts are the v2
 * server's. Returns the same shape as the legacy `parseSubscribeRequest()`.
 *
 * @example
 * ```ts
 * import { parseV2ServerSubscribe } from "./v2_options.ts";
 * const parsed = parseV2ServerSubscribe("cursor=-1", new Headers());
 * if (!parsed.ok) console.log(parsed.error); // "subscribe: invalid cursor: negative value -1"
 * ```
 */
export function parseV2ServerSubscribe(rawQuery: string, headers: Headers): ParsedSubscribeRequest {
  const query = new URLSearchParams(rawQuery);
  const params: SubscribeParams = {
    wantedCollections: query.getAll("wantedCollections"),
    wantedDids: query.getAll("wantedDids"),
    cursor: undefined,
    compress: (headers.get("Socket-Encoding") ?? "").includes("zstd") || query.get("compress") === "true",
    maxMessageSizeBytes: parseV2ServerMaxMessageSize(query.get("maxMessageSizeBytes") ?? ""),
    requireHello: query.get("requireHello") === "true",
  };
  const syntax = goQueryError(rawQuery);
  if (syntax) return { ok: false, params, error: `${V2_INVALID_OPTIONS}: ${syntax}` };
  if (params.compress && (headers.get("Sec-WebSocket-Extensions") ?? "").includes("permessage-deflate")) {
    return {
      ok: false,
      params,
      error: "choose one compression scheme: custom zstd (compress=true / Socket-Encoding: zstd) or " +
        "RFC 7692 permessage-deflate, not both",
    };
  }
  let filter: SubscriberFilter;
  try {
    filter = { ...parseCollections(params.wantedCollections), dids: parseDids(params.wantedDids) };
  } catch (err) {
    return { ok: false, params, error: (err as Error).message };
  }
  const cursor = parseV2Cursor(query.get("cursor") ?? "");
  if ("error" in cursor) return { ok: false, params, error: cursor.error };
  params.cursor = cursor.cursor;
  return { ok: true, params, filter };
}

/**
 * What a text message from a `/subscribe` client means to the v2 server: an `options_update`
 * replaces the filter and the size limit; a malformed one closes the connection with `code` and
 * `reason` (1007 for bad JSON, 1008 for invalid options, the reason cut to 123 bytes with `...`).
 *
 * @example
 * ```ts
 * import type { V2ClientMessage } from "./v2_options.ts";
 * const message: V2ClientMessage = { type: "invalid", code: 1007, reason: "bad options_update payload" };
 * ```
 */
export type V2ClientMessage =
  | {
    type: "options_update";
    payload: OptionsUpdatePayload;
    filter: SubscriberFilter;
    maxMessageSizeBytes: number;
  }
  | { type: "ignored"; messageType: unknown }
  | { type: "invalid"; code: number; reason: string };

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function optionalStrings(value: unknown): string[] | undefined {
  if (value === undefined || value === null) return [];
  return Array.isArray(value) && value.every((v) => typeof v === "string") ? value : undefined;
}

/** Go's `truncateCloseReason`: at most 123 bytes, cut on a character boundary, marked with `...`. */
function truncateCloseReason(reason: string): string {
  const bytes = new TextEncoder().encode(reason);
  if (bytes.length <= 123) return reason;
  let cut = 120;
  while (cut > 0 && (bytes[cut] & 0xc0) === 0x80) cut--;
  return new TextDecoder().decode(bytes.subarray(0, cut)) + "...";
}

/**
 * Interprets a client text message on the v2 server's `/subscribe` like its `runReader`: JSON that
 * is not an envelope object closes with 1007 `bad SubscriberSourcedMessage envelope`, a bad
 * payload with 1007 `bad options_update payload`, invalid options with 1008 and the error text;
 * unknown types are ignored.
 *
 * @example
 * ```ts
 * import { parseV2ClientMessage } from "./v2_options.ts";
 * const message = parseV2ClientMessage('{"type":"options_update","payload":{"wantedDids":["nope"]}}');
 * if (message.type === "invalid") console.log(message.code, message.reason);
 * // 1008 "subscribe: invalid options: invalid DID: nope"
 * ```
 */
export function parseV2ClientMessage(text: string): V2ClientMessage {
  const badEnvelope = {
    type: "invalid",
    code: 1007,
    reason: "bad SubscriberSourcedMessage envelope",
  } as const;
  let envelope: unknown;
  try {
    envelope = JSON.parse(text);
  } catch {
    return badEnvelope;
  }
  // Go unmarshals `null` into an empty struct (type ""), which is then ignored.
  if (envelope === null) return { type: "ignored", messageType: undefined };
  if (!isRecord(envelope)) return badEnvelope;
  const { type, payload } = envelope;
  if (type !== undefined && type !== null && typeof type !== "string") return badEnvelope;
  if (type !== "options_update") return { type: "ignored", messageType: type };
  const badPayload = { type: "invalid", code: 1007, reason: "bad options_update payload" } as const;
  // A missing payload is empty input to Go's json.Unmarshal, an error; `null` is an empty struct.
  if (payload === undefined || (payload !== null && !isRecord(payload))) return badPayload;
  const body = payload ?? {};
  const wantedCollections = optionalStrings(body.wantedCollections);
  const wantedDids = optionalStrings(body.wantedDids);
  const max = body.maxMessageSizeBytes;
  if (
    wantedCollections === undefined || wantedDids === undefined ||
    (max !== undefined && max !== null && !Number.isSafeInteger(max))
  ) {
    return badPayload;
  }
  const update: OptionsUpdatePayload = { wantedCollections, wantedDids };
  if (typeof max === "number") update.maxMessageSizeBytes = max;
  try {
    const filter = { ...parseCollections(wantedCollections), dids: parseDids(wantedDids) };
    // Go's clampMaxMsgSize: negative is 0, the rest converts to uint32.
    const limit = typeof max === "number" && max > 0 ? max % 2 ** 32 : 0;
    return { type: "options_update", payload: update, filter, maxMessageSizeBytes: limit };
  } catch (err) {
    return { type: "invalid", code: 1008, reason: truncateCloseReason((err as Error).message) };
  }
}

/**
 * Options of one `subscribeEvents` request, as read from its query string.
 *
 * @example
 * ```ts
 * import type { SubscribeEventsParams } from "./v2_options.ts";
 * const params: SubscribeEventsParams = {
 *   kinds: ["commit"], dids: [], collections: ["app.bsky.feed.*"], cursor: 1234,
 *   maxMessageSizeBytes: 0, zstdDictionary: undefined, subprotocol: true,
 * };
 * ```
 */
export interface SubscribeEventsParams {
  /** Raw `kinds` values. */
  kinds: string[];
  /** Raw `dids` values. */
  dids: string[];
  /** Raw `collections` values. */
  collections: string[];
  /** The parsed `cursor` (seq below 1e15, unix µs at or above), or `undefined` for the live tip. */
  cursor: number | undefined;
  /** `maxMessageSizeBytes`; 0 = no limit. */
  maxMessageSizeBytes: number;
  /** `zstdDictionary`, when given and valid. */
  zstdDictionary: number | undefined;
  /** Whether the client offered the `xrpc.v1.json` subprotocol (it is then echoed). */
  subprotocol: boolean;
}

/**
 * The filter of a `subscribeEvents` connection: three AND-composed axes, each `null` for match-all.
 * The collection axis constrains commits only.
 *
 * @example
 * ```ts
 * import type { V2Filter } from "./v2_options.ts";
 * const commitsOnly: V2Filter = { kinds: new Set(["commit"]), dids: null, collections: null, prefixes: [] };
 * ```
 */
export interface V2Filter {
  /** Selected kinds, or `null` for all (including kinds this server cannot name). */
  kinds: Set<string> | null;
  /** Selected DIDs, or `null` for all. */
  dids: Set<string> | null;
  /** Full collection NSIDs, or `null` for no collection filter. */
  collections: Set<string> | null;
  /** `<prefix>.*` entries with the `*` trimmed. */
  prefixes: string[];
}

/**
 * Whether an event passes a `subscribeEvents` filter (`FilterV2.Wants`).
 *
 * @example
 * ```ts
 * import { wantsV2 } from "./v2_options.ts";
 * const filter = { kinds: new Set(["commit"]), dids: null, collections: null, prefixes: [] };
 * wantsV2(filter, "did:plc:abc", "identity", undefined); // false
 * ```
 */
export function wantsV2(
  filter: V2Filter,
  did: string,
  kind: string,
  collection: string | undefined,
): boolean {
  if (filter.kinds !== null && !filter.kinds.has(kind)) return false;
  // Past the kinds, DIDs and collections select as on the legacy wire.
  return wants(filter, did, kind, collection);
}

/**
 * The outcome of {@linkcode parseSubscribeEventsRequest}: the params, then the filter or the XRPC
 * error (always HTTP 400: `InvalidRequest` or `UnknownZstdDictionary`).
 *
 * @example
 * ```ts
 * import { parseSubscribeEventsRequest } from "./v2_options.ts";
 * const parsed = parseSubscribeEventsRequest("kinds=nope", new Headers(), 20260811);
 * if (!parsed.ok) console.log(parsed.name); // "InvalidRequest"
 * ```
 */
export type ParsedSubscribeEventsRequest =
  | { ok: true; params: SubscribeEventsParams; filter: V2Filter }
  | {
    ok: false;
    params: SubscribeEventsParams;
    name: "InvalidRequest" | "UnknownZstdDictionary";
    message: string;
  };

/**
 * Parses a `subscribeEvents` request like the v2 server (§1.3): Go query syntax, the v1
 * compression opt-ins (rejected), `zstdDictionary` (which must equal `dictionaryId`), the legacy
 * parameter names (rejected, naming the replacement), `kinds`, `dids`, `collections` (a wildcard's
 * head must be an NSID prefix), `maxMessageSizeBytes` (one uint32) and `cursor`.
 *
 * @param dictionaryId The ID of the dictionary the server compresses with, if any.
 *
 * @example
 * ```ts
 * import { parseSubscribeEventsRequest } from "./v2_options.ts";
 * const parsed = parseSubscribeEventsRequest("wantedDids=did:plc:abc", new Headers(), undefined);
 * if (!parsed.ok) console.log(parsed.message);
 * // "subscribe: invalid options: wantedDids is the legacy /subscribe parameter; use dids"
 * ```
 */
export function parseSubscribeEventsRequest(
  rawQuery: string,
  headers: Headers,
  dictionaryId: number | undefined,
): ParsedSubscribeEventsRequest {
  const query = new URLSearchParams(rawQuery);
  const offered = (headers.get("Sec-WebSocket-Protocol") ?? "").split(",").map((t) => t.trim());
  const params: SubscribeEventsParams = {
    kinds: query.getAll("kinds"),
    dids: query.getAll("dids"),
    collections: query.getAll("collections"),
    cursor: undefined,
    maxMessageSizeBytes: 0,
    zstdDictionary: undefined,
    subprotocol: offered.includes(V2_SUBPROTOCOL),
  };
  const invalid = (message: string): ParsedSubscribeEventsRequest => ({
    ok: false,
    params,
    name: "InvalidRequest",
    message,
  });
  const syntax = goQueryError(rawQuery);
  if (syntax) return invalid(`${V2_INVALID_OPTIONS}: ${syntax}`);
  if (query.get("compress") === "true" || (headers.get("Socket-Encoding") ?? "").includes("zstd")) {
    return invalid(
      "compress=true / Socket-Encoding: zstd is the /subscribe (v1) opt-in; this endpoint uses " +
        "zstdDictionary=<id> with the dictionary from getZstdDictionary",
    );
  }
  const rawDictionary = query.get("zstdDictionary") ?? "";
  if (rawDictionary !== "") {
    const id = /^\+?\d+$/.test(rawDictionary) ? Number(rawDictionary) : NaN;
    if (!(id >= 1 && id <= 0xffffffff)) {
      return invalid("zstdDictionary must be a positive integer zstd dictionary ID");
    }
    if (id !== dictionaryId) {
      return {
        ok: false,
        params,
        name: "UnknownZstdDictionary",
        message: dictionaryId === undefined
          ? `unknown zstd dictionary id ${id}; this server has no zstd dictionary (connect without zstdDictionary)`
          : `unknown zstd dictionary id ${id}; current dictionary id is ${dictionaryId} ` +
            "(fetch it via getZstdDictionary and reconnect)",
      };
    }
    params.zstdDictionary = id;
  }
  if (query.has("wantedDids")) {
    return invalid(`${V2_INVALID_OPTIONS}: wantedDids is the legacy /subscribe parameter; use dids`);
  }
  if (query.has("wantedCollections")) {
    return invalid(
      `${V2_INVALID_OPTIONS}: wantedCollections is the legacy /subscribe parameter; use collections`,
    );
  }
  if (query.has("requireHello")) {
    return invalid(
      `${V2_INVALID_OPTIONS}: requireHello is not supported on this endpoint; it is server-push only ` +
        "(subscriber-sourced messages were removed)",
    );
  }
  let kinds: Set<string> | null = null;
  if (params.kinds.length > 0) {
    if (params.kinds.length > KINDS.length) {
      return invalid(
        `${V2_INVALID_OPTIONS}: too many kinds values: ${params.kinds.length} > ${KINDS.length}`,
      );
    }
    kinds = new Set();
    for (const kind of params.kinds) {
      if (!(KINDS as readonly string[]).includes(kind)) {
        return invalid(
          `${V2_INVALID_OPTIONS}: unknown kind ${JSON.stringify(kind)} (valid: ${KINDS.join(", ")})`,
        );
      }
      kinds.add(kind);
    }
  }
  if (params.dids.length > MAX_DIDS) {
    return invalid(`${V2_INVALID_OPTIONS}: too many dids values: ${params.dids.length} > ${MAX_DIDS}`);
  }
  if (params.collections.length > MAX_COLLECTIONS) {
    return invalid(
      `${V2_INVALID_OPTIONS}: too many collections values: ${params.collections.length} > ${MAX_COLLECTIONS}`,
    );
  }
  let filter: V2Filter;
  try {
    const dids = parseDids(params.dids);
    for (const raw of params.collections) {
      // The head must be an NSID prefix: probe it with the shortest valid name segment.
      if (raw.endsWith(".*") && !isValidNsid(`${raw.slice(0, -2)}.x`)) {
        throw new Error(`${V2_INVALID_OPTIONS}: invalid collection wildcard: ${raw}`);
      }
    }
    filter = { kinds, dids, ...parseCollections(params.collections) };
  } catch (err) {
    return invalid((err as Error).message);
  }
  if (filter.collections !== null && kinds !== null && !kinds.has("commit")) {
    return invalid(`${V2_INVALID_OPTIONS}: collections filter can never apply: kinds excludes commit`);
  }
  const rawMax = query.getAll("maxMessageSizeBytes");
  if (rawMax.length > 0) {
    const value = rawMax.length === 1 && /^\d+$/.test(rawMax[0]) ? Number(rawMax[0]) : NaN;
    if (!(value <= 0xffffffff)) {
      return invalid(
        `${V2_INVALID_OPTIONS}: maxMessageSizeBytes must be one unsigned 32-bit integer: ${
          JSON.stringify(rawMax.join(","))
        }`,
      );
    }
    params.maxMessageSizeBytes = value;
  }
  const cursor = parseV2Cursor(query.get("cursor") ?? "");
  if ("error" in cursor) return invalid(cursor.error);
  params.cursor = cursor.cursor;
  return { ok: true, params, filter };
}
