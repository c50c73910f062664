/**
 * Pure per-event stages: shape checks, selection by kind, DID and collection, and content keys for
 * deduplication. Each takes one event and returns one answer.
 *
 * @module
 */
import type { EventKind, JetstreamEvent } from "../jetstream/events.ts";
import type { SkipReason } from "../stats.ts";
import { collectionMatcher } from "../validate.ts";

/**
 * Why a parsed value cannot be treated as a Jetstream event, or undefined when it can.
 *
 * @example
 * ```ts
 * import { shapeProblem } from "./filter.ts";
 * shapeProblem({ did: "did:plc:x", time_us: 1, kind: "heartbeat" }); // "unknown_kind"
 * ```
 */
export function shapeProblem(value: unknown): SkipReason | undefined {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return "missing_fields";
  const ev = value as Record<string, unknown>;
  if (typeof ev.did !== "string" || typeof ev.time_us !== "number" || !Number.isSafeInteger(ev.time_us)) {
    return "missing_fields";
  }
  switch (ev.kind) {
    case "commit": {
      const c = ev.commit as Record<string, unknown> | null | undefined;
      if (
        typeof c !== "object" || c === null || typeof c.collection !== "string" ||
        typeof c.operation !== "string" ||
        typeof c.rkey !== "string"
      ) return "missing_fields";
      return undefined;
    }
    case "identity":
    case "account":
      return typeof ev[ev.kind] === "object" && ev[ev.kind] !== null ? undefined : "missing_fields";
    case undefined:
      return "missing_fields";
    default:
      return "unknown_kind";
  }
}

/** What to keep. */
export interface Selection {
  /** Kinds to keep. */
  kinds: readonly EventKind[];
  /** DIDs to keep; all when empty. */
  wantedDids: readonly string[];
  /** Collections (or `prefix.*`) of commits to keep; all when empty. */
  wantedCollections: readonly string[];
}

/**
 * A predicate for well-formed events: the kind must be wanted, the DID too (when a DID filter is
 * set) and, for commits, the collection. Identity and account events are not subject to the
 * collection filter, as on Jetstream, but only pass when their kind is wanted.
 *
 * @example
 * ```ts
 * import { createSelector } from "./filter.ts";
 * const keep = createSelector({ kinds: ["commit"], wantedDids: [], wantedCollections: ["app.bsky.feed.*"] });
 * ```
 */
export function createSelector(selection: Selection): (event: JetstreamEvent) => boolean {
  const kinds = new Set<string>(selection.kinds);
  const dids = selection.wantedDids.length > 0 ? new Set(selection.wantedDids) : undefined;
  const wants = collectionMatcher(selection.wantedCollections);
  return (ev) => {
    if (!kinds.has(ev.kind)) return false;
    if (dids && !dids.has(ev.did)) return false;
    return ev.kind !== "commit" || wants(ev.commit.collection);
  };
}

/**
 * The identity of an event's content, the same on every Jetstream instance: `did`, collection,
 * rkey, rev and operation for commits; `did`, kind and the relay's time and seq otherwise.
 *
 * @example
 * ```ts
 * import { contentKey } from "./filter.ts";
 * contentKey({
 *   did: "did:plc:x", time_us: 1, kind: "commit",
 *   commit: { rev: "3l3", operation: "create", collection: "app.bsky.feed.like", rkey: "3l4" },
 * }); // "did:plc:x app.bsky.feed.like 3l4 3l3 create"
 * ```
 */
export function contentKey(ev: JetstreamEvent): string {
  if (ev.kind === "commit") {
    const c = ev.commit;
    return `${ev.did} ${c.collection} ${c.rkey} ${c.rev} ${c.operation}`;
  }
  const body = (ev.kind === "identity" ? ev.identity : ev.account) as { time?: unknown; seq?: unknown };
  return `${ev.did} ${ev.kind} ${body.time ?? ev.time_us} ${body.seq ?? ""}`;
}

/**
 * A bounded set of recently seen keys. Keys live in two generations: when the newer one is full it
 * becomes the older one and the oldest generation is dropped, so at least `capacity / 2` and at most
 * `capacity` of the latest keys are remembered, at O(1) a key.
 *
 * @example
 * ```ts
 * import { RecentKeys } from "./filter.ts";
 * const seen = new RecentKeys(4);
 * seen.add("a"); // true: new
 * seen.add("a"); // false: seen
 * ```
 */
export class RecentKeys {
  readonly #half: number;
  #current = new Set<string>();
  #previous = new Set<string>();

  /** Remembers about `capacity` keys. */
  constructor(capacity: number) {
    this.#half = Math.max(1, Math.ceil(capacity / 2));
  }

  /** Adds `key`; false when it was already there. */
  add(key: string): boolean {
    if (this.#current.has(key) || this.#previous.has(key)) return false;
    if (this.#current.size >= this.#half) {
      this.#previous = this.#current;
      this.#current = new Set();
    }
    this.#current.add(key);
    return true;
  }
}
