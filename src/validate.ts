/**
 * Syntax checks for the identifiers jetfill sends to Jetstream. A value the server would answer
 * with HTTP 400 is refused here first, with a message that names it.
 *
 * @module
 */

const DID_PLC = /^did:plc:[a-z2-7]{24}$/;
// did:web is a host name, optionally with a percent-encoded port and colon-separated path segments.
const DID_WEB =
  /^did:web:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?:%3[aA]\d{1,5})?(?::[a-zA-Z0-9._~-]+)*$/;
const DOMAIN_SEGMENT = "[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?";
const NSID = new RegExp(
  `^[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\\.${DOMAIN_SEGMENT})+\\.[a-zA-Z][a-zA-Z0-9]{0,62}$`,
);
const NSID_PREFIX = new RegExp(`^[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\\.${DOMAIN_SEGMENT})*\\.\\*$`);

/** What {@link isDid} accepts, for messages. */
export const DID_FORMS =
  "did:plc: or did:web: DIDs (did:plc: then 24 characters of a-z and 2-7; did:web: then a host name)";

/**
 * Whether `did` is a `did:plc:` (24 base32 characters) or `did:web:` (a host name) DID.
 *
 * @example
 * ```ts
 * import { isDid } from "./validate.ts";
 * isDid("did:plc:q6gjnaw2blty4crticxkmujt"); // true
 * isDid("did:web:example.com"); // true
 * isDid("did:plc:short"); // false
 * ```
 */
export function isDid(did: string): boolean {
  return did.length <= 2048 && (DID_PLC.test(did) || DID_WEB.test(did));
}

/**
 * Whether `value` is a full NSID such as `app.bsky.feed.post`.
 *
 * @example
 * ```ts
 * import { isNsid } from "./validate.ts";
 * isNsid("app.bsky.feed.post"); // true
 * isNsid("app.bsky"); // false
 * ```
 */
export function isNsid(value: string): boolean {
  return value.length <= 317 && NSID.test(value);
}

/**
 * Whether `value` is a collection filter Jetstream accepts: a full NSID or a prefix ending in `.*`
 * at a segment boundary (`app.bsky.graph.*`).
 *
 * @example
 * ```ts
 * import { isCollectionFilter } from "./validate.ts";
 * isCollectionFilter("app.bsky.graph.*"); // true
 * isCollectionFilter("app.bsky.graph.fo*"); // false
 * ```
 */
export function isCollectionFilter(value: string): boolean {
  return isNsid(value) || (value.length <= 317 && NSID_PREFIX.test(value));
}

/**
 * A predicate for a list of collection filters, with prefix wildcards turned into prefix tests.
 * An empty list matches every collection.
 *
 * @example
 * ```ts
 * import { collectionMatcher } from "./validate.ts";
 * const wants = collectionMatcher(["app.bsky.graph.*", "app.bsky.feed.post"]);
 * wants("app.bsky.graph.follow"); // true
 * wants("app.bsky.feed.like"); // false
 * ```
 */
export function collectionMatcher(filters: readonly string[]): (collection: string) => boolean {
  if (filters.length === 0) return () => true;
  const exact = new Set<string>();
  const prefixes: string[] = [];
  for (const f of filters) {
    if (f.endsWith(".*")) prefixes.push(f.slice(0, -1));
    else exact.add(f);
  }
  if (prefixes.length === 0) return (c) => exact.has(c);
  return (c) => exact.has(c) || prefixes.some((p) => c.startsWith(p));
}
