/**
 * Builds `/subscribe` URLs and the `options_update` hello of the legacy wire (protocol doc §1.1, §2).
 *
 * @module
 */

/** Above this many DIDs the filter goes in an `options_update` message instead of the URL. */
export const URL_DID_LIMIT = 50;
/**
 * Above this many characters of DIDs in all (what 50 `did:plc:` DIDs take), the filter goes in the
 * hello too, however few they are: a `did:web:` name can be hundreds of characters long, and servers
 * and proxies refuse URLs of about 8 KB (protocol doc §9, item 4).
 */
export const URL_DID_CHARS = 1_600;

/**
 * Whether `dids` go in an `options_update` hello rather than the URL: over {@link URL_DID_LIMIT} of
 * them, or over {@link URL_DID_CHARS} characters in all.
 *
 * @example
 * ```ts
 * import { didsNeedHello } from "./url.ts";
 * didsNeedHello(["did:plc:z72i7hdynmk6r22z27h6tvur"]); // false
 * ```
 */
export function didsNeedHello(dids: readonly string[]): boolean {
  if (dids.length > URL_DID_LIMIT) return true;
  let chars = 0;
  for (const d of dids) chars += d.length;
  return chars > URL_DID_CHARS;
}

/** What a subscription asks for. */
export interface SubscribeParams {
  /** DIDs; all when empty. */
  wantedDids: readonly string[];
  /** Collections or prefixes; all when empty. */
  wantedCollections: readonly string[];
  /** Inclusive cursor (unix µs on legacy servers); live when undefined. */
  cursor?: number;
  /** Ask for zstd frames. */
  compress?: boolean;
}

/** A subscription request: the URL and, when the filters are too large for it, the hello to send. */
export interface SubscribeRequest {
  /** The WebSocket URL. */
  url: string;
  /** An `options_update` text to send right after the socket opens, if any. */
  hello?: string;
}

/**
 * Builds the URL (repeated query parameters, as Jetstream reads them) and, for many DIDs, the
 * `options_update` hello with `requireHello=true`, so the URL never overflows.
 *
 * @example
 * ```ts
 * import { buildSubscribeRequest } from "./url.ts";
 * const req = buildSubscribeRequest("wss://jetstream1.us-east.bsky.network/subscribe", {
 *   wantedDids: [],
 *   wantedCollections: ["app.bsky.feed.post", "app.bsky.graph.*"],
 *   cursor: 1725911162329308,
 * });
 * req.url; // "wss://…/subscribe?wantedCollections=app.bsky.feed.post&wantedCollections=app.bsky.graph.*&cursor=1725911162329308"
 * ```
 */
export function buildSubscribeRequest(base: string, params: SubscribeParams): SubscribeRequest {
  const url = new URL(base);
  // A copy, written back once: each change to url.searchParams rewrites the whole URL.
  const q = new URLSearchParams(url.search);
  for (const key of ["wantedDids", "wantedCollections", "cursor", "compress", "requireHello"]) q.delete(key);
  for (const c of params.wantedCollections) q.append("wantedCollections", c);
  const viaHello = didsNeedHello(params.wantedDids);
  if (!viaHello) { for (const d of params.wantedDids) q.append("wantedDids", d); }
  // Always an integer of microseconds: a seconds value would be a sequence number on a v2 server.
  if (params.cursor !== undefined) q.set("cursor", String(Math.trunc(params.cursor)));
  if (params.compress) q.set("compress", "true");
  if (viaHello) q.set("requireHello", "true");
  url.search = q.toString();
  // URLSearchParams encodes '*' as %2A and ':' as %3A; Jetstream decodes both, but keeping them
  // literal makes logged URLs readable.
  const text = url.toString().replaceAll("%2A", "*").replaceAll("%3A", ":");
  if (!viaHello) return { url: text };
  // An update replaces the whole of a v2 server's options (protocol doc §2, §10.7): a size limit
  // given in the instance URL goes in it too, or the hello would lift it there (a legacy server
  // keeps the URL's and ignores it in the update).
  const size = q.get("maxMessageSizeBytes");
  const limit = size !== null && /^\+?\d{1,15}$/.test(size) ? Number(size) : undefined;
  const hello = JSON.stringify({
    type: "options_update",
    payload: {
      wantedCollections: params.wantedCollections,
      wantedDids: params.wantedDids,
      ...(limit === undefined ? {} : { maxMessageSizeBytes: limit }),
    },
  });
  return { url: text, hello };
}
