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

// The two 32-bit hashes of the last hashContent() call (module state: no allocation per event).
let hashA = 0;
let hashB = 0;

function mix(s: unknown): void {
  const str = typeof s === "string" ? s : String(s);
  let a = hashA;
  let b = hashB;
  for (let i = 0; i < str.length; i++) {
    const c = str.charCodeAt(i);
    a = Math.imul(a ^ c, 0x01000193);
    b = Math.imul(b + c, 0x5bd1e995);
    b ^= b >>> 13;
  }
  // A separator no character can produce, so that field boundaries count.
  hashA = Math.imul(a ^ 0x10000, 0x01000193);
  hashB = Math.imul(b + 0x10000, 0x5bd1e995);
}

/**
 * Two independent 32-bit hashes, into `hashA` and `hashB`, of the identity of an event's content,
 * the same on every Jetstream instance: `did`, collection, rkey, rev and operation for commits;
 * `did`, kind and the relay's time and seq otherwise. 64 bits together: a false match between two
 * different events is about 1 in 10^9 for a whole window checked against a whole window.
 */
function hashContent(ev: JetstreamEvent): void {
  hashA = 0x811c9dc5 | 0;
  hashB = 0x9747b28c | 0;
  mix(ev.did);
  if (ev.kind === "commit") {
    const c = ev.commit;
    mix(c.collection);
    mix(c.rkey);
    mix(c.rev);
    mix(c.operation);
  } else {
    const body = (ev.kind === "identity" ? ev.identity : ev.account) as { time?: unknown; seq?: unknown };
    mix(ev.kind);
    mix(body.time ?? ev.time_us);
    mix(body.seq ?? "");
  }
  hashB = Math.imul(hashB ^ (hashB >>> 15), 0x27d4eb2d);
}

/**
 * Deduplication of replays, at almost no cost while nothing is replayed.
 *
 * Each selected event leaves two 32-bit hashes of its content's identity in a ring of typed
 * arrays: remembering keeps no string and no event alive, so it adds nothing for the garbage
 * collector to copy or keep. When a replay may follow — a reconnect with an inclusive cursor, a
 * rewind on failover, a server that restarted and re-ingested events under new `time_us` —
 * `arm()` turns the ring into a set, and the next `capacity` events are checked against it.
 *
 * @example
 * ```ts
 * import { ReplayGuard } from "./filter.ts";
 * const guard = new ReplayGuard(1000);
 * const ev = { did: "did:plc:x", time_us: 1, kind: "identity" as const, identity: { did: "did:plc:x", seq: 1, time: "t" } };
 * guard.record(ev);
 * guard.arm();
 * guard.isReplay(ev); // true
 * ```
 */
export class ReplayGuard {
  readonly #capacity: number;
  readonly #a: Int32Array;
  readonly #b: Int32Array;
  #next = 0;
  #count = 0;
  #keys: Set<string> | undefined;
  #remaining = 0;

  /** Remembers the last `capacity` events and checks as many after `arm()`. */
  constructor(capacity: number) {
    this.#capacity = Math.max(1, capacity);
    this.#a = new Int32Array(this.#capacity);
    this.#b = new Int32Array(this.#capacity);
  }

  /** Whether replays are being checked. */
  get armed(): boolean {
    return this.#keys !== undefined;
  }

  /** Remembers a selected event (after {@link isReplay} said it is new). */
  record(ev: JetstreamEvent): void {
    hashContent(ev);
    const i = this.#next;
    this.#a[i] = hashA;
    this.#b[i] = hashB;
    this.#next = (i + 1) % this.#capacity;
    if (this.#count < this.#capacity) this.#count++;
  }

  /** Starts checking: what follows may repeat what was recorded. */
  arm(): void {
    const keys = this.#keys ?? new Set<string>();
    for (let i = 0; i < this.#count; i++) keys.add(`${this.#a[i]}:${this.#b[i]}`);
    this.#keys = keys;
    this.#remaining = this.#capacity;
  }

  /** Whether `ev` repeats a recorded event; only ever true while armed. */
  isReplay(ev: JetstreamEvent): boolean {
    const keys = this.#keys;
    if (!keys) return false;
    hashContent(ev);
    const key = `${hashA}:${hashB}`;
    if (keys.has(key)) return true;
    keys.add(key);
    if (--this.#remaining <= 0) this.#keys = undefined;
    return false;
  }
}
