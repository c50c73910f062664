/**
 * Subscriber options of the legacy `/subscribe` wire (protocol doc §1.1, §2): parsing the query
 * string and `options_update` messages with the legacy server's validation, limits and error texts,
 * and the event filter they describe.
 *
 * @module
 */

import { goFieldOf, type GoJson, goKind, isGoNumber, isGoObject, parseGoJson } from "../go_json.ts";

/** A DID as the legacy server's `syntax.ParseDID` accepts it (generic DID syntax, at most 2048 chars). */
const DID_RE = /^did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]$/;
/** An NSID as `syntax.ParseNSID` accepts it: a domain authority, then a name of letters only. */
const NSID_RE =
  /^[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+(\.[a-zA-Z]([a-zA-Z]{0,61}[a-zA-Z])?)$/;

/**
 * The legacy server's base error text; its 400 bodies and close reasons start with it.
 *
 * @example
 * ```ts
 * import { INVALID_OPTIONS } from "./options.ts";
 * console.log(`${INVALID_OPTIONS}: too many wanted DIDs`);
 * ```
 */
export const INVALID_OPTIONS = "invalid subscriber options";
/**
 * Limit on wanted collections (prefixes plus unique full NSIDs).
 *
 * @example
 * ```ts
 * import { MAX_WANTED_COLLECTIONS } from "@jetfill/jetfill";
 * console.log(MAX_WANTED_COLLECTIONS); // 100
 * ```
 */
export const MAX_WANTED_COLLECTIONS = 100;
/**
 * Limit on unique wanted DIDs.
 *
 * @example
 * ```ts
 * import { MAX_WANTED_DIDS } from "@jetfill/jetfill";
 * console.log(MAX_WANTED_DIDS); // 10000
 * ```
 */
export const MAX_WANTED_DIDS = 10_000;

/**
 * Whether a string is a syntactically valid DID, by the rules the legacy server applies to
 * `wantedDids`.
 *
 * @example
 * ```ts
 * import { isValidDid } from "./options.ts";
 * isValidDid("did:plc:q6gjnaw2blty4crticxkmujt"); // true
 * isValidDid("alice.bsky.social"); // false
 * ```
 */
export function isValidDid(value: string): boolean {
  return value.length > 0 && value.length <= 2048 && DID_RE.test(value);
}

/**
 * Whether a string is a syntactically valid NSID, by the rules the legacy server applies to
 * `wantedCollections` entries that are not `.*` prefixes.
 *
 * @example
 * ```ts
 * import { isValidNsid } from "./options.ts";
 * isValidNsid("app.bsky.feed.post"); // true
 * isValidNsid("app.bsky.graph.fo*"); // false
 * ```
 */
export function isValidNsid(value: string): boolean {
  return value.length > 0 && value.length <= 317 && NSID_RE.test(value);
}

/**
 * The filter part of a subscriber's options, which an `options_update` replaces as a whole.
 * `null` means "no filter" for that dimension.
 *
 * @example
 * ```ts
 * import type { SubscriberFilter } from "./options.ts";
 * const onlyGraph: SubscriberFilter = { collections: new Set(), prefixes: ["app.bsky.graph."], dids: null };
 * ```
 */
export interface SubscriberFilter {
  /** Unique full collection NSIDs, or `null` when there is no collection filter. */
  collections: Set<string> | null;
  /** Prefixes from `<prefix>.*` entries (the `*` trimmed, the dot kept), in the order given. */
  prefixes: string[];
  /** Unique wanted DIDs, or `null` when there is no DID filter. */
  dids: Set<string> | null;
}

/**
 * Builds a filter from raw `wantedCollections` and `wantedDids` values with the legacy server's
 * rules, or throws an `Error` whose message is the legacy error text (used as the 400 body or, with a
 * prefix, as the close reason).
 *
 * @example
 * ```ts
 * import { parseFilter } from "./options.ts";
 * const filter = parseFilter(["app.bsky.graph.*", "app.bsky.feed.post"], []);
 * console.log(filter.prefixes); // ["app.bsky.graph."]
 * ```
 */
export function parseFilter(
  wantedCollections: readonly string[],
  wantedDids: readonly string[],
): SubscriberFilter {
  let collections: Set<string> | null = null;
  const prefixes: string[] = [];
  if (wantedCollections.length > 0) {
    collections = new Set();
    for (const value of wantedCollections) {
      // As in legacy: no validation of a prefix's head, and prefixes are not deduplicated.
      if (value.endsWith(".*")) {
        prefixes.push(value.slice(0, -1));
        continue;
      }
      if (!isValidNsid(value)) throw new Error(`${INVALID_OPTIONS}: invalid collection: ${value}`);
      collections.add(value);
    }
  }
  let dids: Set<string> | null = null;
  if (wantedDids.length > 0) {
    dids = new Set();
    for (const value of wantedDids) {
      // Legacy answers a bad DID with the bare text, without naming the value.
      if (!isValidDid(value)) throw new Error(INVALID_OPTIONS);
      dids.add(value);
    }
    if (dids.size > MAX_WANTED_DIDS) throw new Error(`${INVALID_OPTIONS}: too many wanted DIDs`);
  }
  if (collections !== null && collections.size + prefixes.length > MAX_WANTED_COLLECTIONS) {
    throw new Error(`${INVALID_OPTIONS}: too many wanted collections`);
  }
  return { collections, prefixes, dids };
}

/**
 * Whether an event passes a filter. The collection filter applies only to commit events (and a
 * commit without a collection passes it); the DID filter applies to every kind.
 *
 * @example
 * ```ts
 * import { parseFilter, wants } from "./options.ts";
 * const filter = parseFilter(["app.bsky.feed.post"], []);
 * wants(filter, "did:plc:abc", "identity", undefined); // true
 * wants(filter, "did:plc:abc", "commit", "app.bsky.feed.like"); // false
 * ```
 */
export function wants(
  filter: SubscriberFilter,
  did: string,
  kind: string,
  collection: string | undefined,
): boolean {
  if (filter.dids !== null && !filter.dids.has(did)) return false;
  if (filter.collections === null || kind !== "commit" || !collection) return true;
  if (filter.collections.has(collection)) return true;
  for (const prefix of filter.prefixes) {
    if (collection.startsWith(prefix)) return true;
  }
  return false;
}

/**
 * Checks a raw query string the way Go's `url.ParseQuery` does and returns its first error text,
 * or `undefined` when it parses: a `;` in a pair and a `%` not followed by two hex digits are errors.
 *
 * @example
 * ```ts
 * import { goQueryError } from "./options.ts";
 * goQueryError("cursor=1;x=2"); // "invalid semicolon separator in query"
 * goQueryError("dids=%zz"); // 'invalid URL escape "%zz"'
 * ```
 */
export function goQueryError(rawQuery: string): string | undefined {
  for (const pair of rawQuery.split("&")) {
    if (pair.includes(";")) return "invalid semicolon separator in query";
    for (let i = pair.indexOf("%"); i !== -1; i = pair.indexOf("%", i + 1)) {
      if (!/^%[0-9a-fA-F]{2}/.test(pair.slice(i, i + 3))) {
        return `invalid URL escape ${JSON.stringify(pair.slice(i, i + 3))}`;
      }
    }
  }
  return undefined;
}

/** Go's `url.QueryUnescape` of a text whose escapes {@link goQueryError} found valid: `+` is a space. */
function goUnescape(text: string): string {
  const spaced = text.replaceAll("+", " ");
  if (!spaced.includes("%")) return spaced;
  // Byte by byte: an escaped byte need not be part of valid UTF-8 (Go keeps it; here it decodes as U+FFFD).
  const bytes: number[] = [];
  for (let i = 0; i < spaced.length; i++) {
    if (spaced[i] === "%") {
      bytes.push(parseInt(spaced.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      bytes.push(...new TextEncoder().encode(spaced[i]));
    }
  }
  return new TextDecoder().decode(new Uint8Array(bytes));
}

/**
 * A raw query string as the legacy server reads it, with Go's `URL.Query()`: `&` separates pairs,
 * and a pair that `url.ParseQuery` finds malformed (a `;` in it, a `%` not followed by two hex
 * digits) is left out, silently. (The v2 server's compat `/subscribe` refuses such a query instead.)
 *
 * @example
 * ```ts
 * import { goQueryValues } from "./options.ts";
 * goQueryValues("cursor=%zz&wantedCollections=app.bsky.feed.post").get("cursor"); // null
 * ```
 */
export function goQueryValues(rawQuery: string): URLSearchParams {
  const values = new URLSearchParams();
  for (const pair of rawQuery.split("&")) {
    if (pair === "" || goQueryError(pair) !== undefined) continue;
    const eq = pair.indexOf("=");
    values.append(
      goUnescape(eq === -1 ? pair : pair.slice(0, eq)),
      goUnescape(eq === -1 ? "" : pair.slice(eq + 1)),
    );
  }
  return values;
}

/**
 * Options of one `/subscribe` request, resolved from its query string and headers.
 *
 * @example
 * ```ts
 * import { parseSubscribeRequest } from "./options.ts";
 * const { params } = parseSubscribeRequest(new URLSearchParams("cursor=5&requireHello=true"), new Headers());
 * console.log(params.cursor, params.requireHello); // 5 true
 * ```
 */
export interface SubscribeParams {
  /** Raw `wantedCollections` values, in order. */
  wantedCollections: string[];
  /** Raw `wantedDids` values, in order. */
  wantedDids: string[];
  /**
   * The parsed `cursor`, or `undefined` when absent or empty. A cursor in the future is kept here as
   * sent; the server decides that it means "live".
   */
  cursor: number | undefined;
  /** Whether compressed (binary) frames were asked for by `compress=true` or `Socket-Encoding: zstd`. */
  compress: boolean;
  /** `maxMessageSizeBytes` as the legacy server reads it: garbage, empty or negative is 0 (no limit). */
  maxMessageSizeBytes: number;
  /** Whether `requireHello=true` was given. */
  requireHello: boolean;
}

/**
 * The outcome of {@linkcode parseSubscribeRequest}: always the params, then the filter or the 400 text.
 *
 * @example
 * ```ts
 * import { parseSubscribeRequest } from "./options.ts";
 * const parsed = parseSubscribeRequest(new URLSearchParams("wantedDids=nope"), new Headers());
 * if (!parsed.ok) console.log(parsed.error); // "invalid subscriber options"
 * ```
 */
export type ParsedSubscribeRequest =
  | { ok: true; params: SubscribeParams; filter: SubscriberFilter }
  | { ok: false; params: SubscribeParams; error: string };

/**
 * Parses the query string and headers of a `/subscribe` request like the legacy server (repeated keys
 * for lists, cursor checked first), returning the params and either the validated filter or the exact
 * text of the legacy 400 body.
 *
 * @example
 * ```ts
 * import { parseSubscribeRequest } from "./options.ts";
 * const parsed = parseSubscribeRequest(new URLSearchParams("cursor=abc"), new Headers());
 * console.log(parsed.ok ? "ok" : parsed.error); // "invalid cursor: abc"
 * ```
 */
export function parseSubscribeRequest(query: URLSearchParams, headers: Headers): ParsedSubscribeRequest {
  const params: SubscribeParams = {
    wantedCollections: query.getAll("wantedCollections"),
    wantedDids: query.getAll("wantedDids"),
    cursor: undefined,
    compress: (headers.get("Socket-Encoding") ?? "").includes("zstd") || query.get("compress") === "true",
    maxMessageSizeBytes: parseMaxMessageSizeBytes(query.get("maxMessageSizeBytes") ?? ""),
    requireHello: query.get("requireHello") === "true",
  };
  const rawCursor = query.get("cursor") ?? "";
  if (rawCursor !== "") {
    // Go's strconv.ParseInt(s, 10, 64): an optional sign and decimal digits, within int64.
    const value = /^[+-]?\d+$/.test(rawCursor) ? BigInt(rawCursor) : undefined;
    if (value === undefined || value > 9223372036854775807n || value < -9223372036854775808n) {
      return { ok: false, params, error: `invalid cursor: ${rawCursor}` };
    }
    params.cursor = Number(value);
  }
  try {
    return { ok: true, params, filter: parseFilter(params.wantedCollections, params.wantedDids) };
  } catch (err) {
    return { ok: false, params, error: (err as Error).message };
  }
}

/**
 * Reads `maxMessageSizeBytes` like Go's `strconv.Atoi` in the legacy server: anything that is not a
 * non-negative integer becomes 0, which means no limit. Values beyond `uint32` wrap as in Go.
 *
 * @example
 * ```ts
 * import { parseMaxMessageSizeBytes } from "./options.ts";
 * parseMaxMessageSizeBytes("1000"); // 1000
 * parseMaxMessageSizeBytes("-5"); // 0
 * parseMaxMessageSizeBytes("1e3"); // 0
 * ```
 */
export function parseMaxMessageSizeBytes(raw: string): number {
  if (!/^[+-]?\d+$/.test(raw)) return 0;
  const value = BigInt(raw);
  if (value < 0n || value > 9223372036854775807n) return 0;
  return Number(value & 0xffffffffn);
}

/**
 * A valid `options_update` message's payload, as received.
 *
 * @example
 * ```ts
 * import type { OptionsUpdatePayload } from "./options.ts";
 * const hello: OptionsUpdatePayload = { wantedCollections: ["app.bsky.feed.post"], wantedDids: [] };
 * ```
 */
export interface OptionsUpdatePayload {
  /** Replacement collection filter; empty or absent means all collections. */
  wantedCollections?: string[];
  /** Replacement DID filter; empty or absent means all DIDs. */
  wantedDids?: string[];
  /** Parsed but ignored, as on the legacy server. */
  maxMessageSizeBytes?: number;
}

/**
 * What a client text message means.
 *
 * @example
 * ```ts
 * import { type ClientMessage, parseClientMessage } from "./options.ts";
 * const message: ClientMessage = parseClientMessage('{"type":"heartbeat"}');
 * console.log(message.type); // "ignored"
 * ```
 */
export type ClientMessage =
  | { type: "options_update"; payload: OptionsUpdatePayload; filter: SubscriberFilter }
  | { type: "ignored"; messageType: unknown }
  | { type: "invalid"; reason: string };

/** The Go types a client message is decoded into (protocol doc §2), as its errors name them. */
const SOURCED = "SubscriberSourcedMessage";
const UPDATE = "SubscriberOptionsUpdatePayload";

/** Go's `UnmarshalTypeError` text for `v` given to a field (or the whole value) of type `goType`. */
function typeError(v: GoJson, goType: string, struct: string, field?: string): string {
  const what = isGoNumber(v) && goType === "int" ? `number ${v.number}` : goKind(v);
  return field === undefined
    ? `json: cannot unmarshal ${what} into Go value of type server.${struct}`
    : `json: cannot unmarshal ${what} into Go struct field ${struct}.${field} of type ${goType}`;
}

/** Whether a JSON number's text is one Go's decoder stores in an `int` (64 bits). */
function goInt(text: string): boolean {
  return /^-?\d+$/.test(text) && BigInt(text) >= -(2n ** 63n) && BigInt(text) < 2n ** 63n;
}

/** A `[]string` field decoded as Go does: null elements are left "", others of another kind are errors. */
function goStrings(v: GoJson, field: string): { list?: string[]; error?: string } {
  if (v === null) return {}; // null sets a slice to nil
  if (!Array.isArray(v)) return { error: typeError(v, "[]string", UPDATE, field) };
  let error: string | undefined;
  const list = v.map((item) => {
    if (typeof item === "string") return item;
    if (item !== null) error ??= typeError(item, "string", UPDATE, field);
    return "";
  });
  return { list, error };
}

/**
 * Interprets a text message from a subscriber as the legacy server does: Go's `json.Unmarshal` into
 * `SubscriberSourcedMessage`, then its `payload` into `SubscriberOptionsUpdatePayload` for an
 * `options_update`. An `options_update` yields the replacement filter; another `type` is ignored;
 * anything malformed yields the legacy close reason, with Go's error text (keys match fields
 * without regard to case, null leaves a field as it is, the first type error is the one reported).
 *
 * @example
 * ```ts
 * import { parseClientMessage } from "./options.ts";
 * const msg = parseClientMessage('{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post"]}}');
 * console.log(msg.type); // "options_update"
 * ```
 */
export function parseClientMessage(text: string): ClientMessage {
  const invalid = (reason: string): ClientMessage => ({ type: "invalid", reason });
  let envelope: GoJson;
  try {
    envelope = parseGoJson(text);
  } catch (err) {
    return invalid(`failed to unmarshal subscriber sourced message: ${(err as Error).message}`);
  }
  let type = "";
  // A json.RawMessage: absent (nil), or the value's JSON, null included.
  let payload: GoJson | undefined;
  let error: string | undefined;
  if (envelope !== null) {
    if (!isGoObject(envelope)) error = typeError(envelope, "", SOURCED);
    else {
      for (const [key, v] of envelope.entries) {
        const field = goFieldOf(key, ["type", "payload"] as const);
        if (field === "payload") payload = v;
        else if (field === "type" && v !== null) {
          if (typeof v === "string") type = v;
          else error ??= typeError(v, "string", SOURCED, "type");
        }
      }
    }
  }
  if (error !== undefined) return invalid(`failed to unmarshal subscriber sourced message: ${error}`);
  if (type !== "options_update") return { type: "ignored", messageType: type };
  const update: OptionsUpdatePayload = {};
  // A payload left out is empty input to Unmarshal; null is an empty struct.
  if (payload === undefined) error = "unexpected end of JSON input";
  else if (payload !== null && !isGoObject(payload)) error = typeError(payload, "", UPDATE);
  else if (payload !== null) {
    for (const [key, v] of payload.entries) {
      const field = goFieldOf(key, ["wantedCollections", "wantedDids", "maxMessageSizeBytes"] as const);
      if (field === "maxMessageSizeBytes") {
        if (v === null) continue;
        if (isGoNumber(v) && goInt(v.number)) {
          update.maxMessageSizeBytes = Number(v.number);
        } else error ??= typeError(v, "int", UPDATE, field);
      } else if (field !== undefined) {
        const got = goStrings(v, field);
        error ??= got.error;
        update[field] = got.list;
      }
    }
  }
  if (error !== undefined) return invalid(`failed to unmarshal subscriber options update: ${error}`);
  try {
    const filter = parseFilter(update.wantedCollections ?? [], update.wantedDids ?? []);
    return { type: "options_update", payload: update, filter };
  } catch (err) {
    return { type: "invalid", reason: `failed to parse subscriber options: ${(err as Error).message}` };
  }
}
