/**
 * Subscriber options of the legacy `/subscribe` wire (protocol doc §1.1, §2): parsing the query
 * string and `options_update` messages with the legacy server's validation, limits and error texts,
 * and the event filter they describe.
 *
 * @module
 */

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
 * import { MAX_WANTED_COLLECTIONS } from "./options.ts";
 * console.log(MAX_WANTED_COLLECTIONS); // 100
 * ```
 */
export const MAX_WANTED_COLLECTIONS = 100;
/**
 * Limit on unique wanted DIDs.
 *
 * @example
 * ```ts
 * import { MAX_WANTED_DIDS } from "./options.ts";
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

function stringArray(value: unknown, field: string): string[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value) || !value.every((v) => typeof v === "string")) {
    throw new Error(`'${field}' must be an array of strings`);
  }
  return value;
}

/**
 * Interprets a text message from a subscriber. An `options_update` yields the replacement filter; an
 * unknown `type` is ignored; anything malformed yields the legacy close reason.
 *
 * @example
 * ```ts
 * import { parseClientMessage } from "./options.ts";
 * const msg = parseClientMessage('{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post"]}}');
 * console.log(msg.type); // "options_update"
 * ```
 */
export function parseClientMessage(text: string): ClientMessage {
  let envelope: unknown;
  try {
    envelope = JSON.parse(text);
  } catch (err) {
    return {
      type: "invalid",
      reason: `failed to unmarshal subscriber sourced message: ${(err as Error).message}`,
    };
  }
  if (typeof envelope !== "object" || envelope === null || Array.isArray(envelope)) {
    return { type: "invalid", reason: "failed to unmarshal subscriber sourced message: not a JSON object" };
  }
  const { type, payload } = envelope as Record<string, unknown>;
  if (type !== undefined && typeof type !== "string") {
    return {
      type: "invalid",
      reason: "failed to unmarshal subscriber sourced message: 'type' must be a string",
    };
  }
  if (type !== "options_update") return { type: "ignored", messageType: type };
  let update: OptionsUpdatePayload;
  try {
    // Go unmarshals a missing payload as empty input, which is an error; `null` is an empty struct.
    if (payload === undefined) throw new Error("missing 'payload'");
    if (payload !== null && (typeof payload !== "object" || Array.isArray(payload))) {
      throw new Error("'payload' must be an object");
    }
    const body = (payload ?? {}) as Record<string, unknown>;
    const max = body.maxMessageSizeBytes;
    if (max !== undefined && max !== null && !Number.isInteger(max)) {
      throw new Error("'maxMessageSizeBytes' must be an integer");
    }
    update = {
      wantedCollections: stringArray(body.wantedCollections, "wantedCollections"),
      wantedDids: stringArray(body.wantedDids, "wantedDids"),
    };
    if (typeof max === "number") update.maxMessageSizeBytes = max;
  } catch (err) {
    return {
      type: "invalid",
      reason: `failed to unmarshal subscriber options update: ${(err as Error).message}`,
    };
  }
  try {
    const filter = parseFilter(update.wantedCollections ?? [], update.wantedDids ?? []);
    return { type: "options_update", payload: update, filter };
  } catch (err) {
    return { type: "invalid", reason: `failed to parse subscriber options: ${(err as Error).message}` };
  }
}
