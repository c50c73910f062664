/**
 * Pure per-event stages: selection by kind, DID and collection, and content keys for
 * deduplication. Each takes one event and returns one answer.
 *
 * @module
 */
import {
  COMMIT_OPERATIONS,
  type CommitOperation,
  type EventKind,
  type JetstreamEvent,
} from "../jetstream/events.ts";
import { collectionMatcher } from "../validate.ts";

/** What to keep. */
export interface Selection {
  /** Kinds to keep. */
  kinds: readonly EventKind[];
  /** DIDs to keep; all when empty. */
  wantedDids: readonly string[];
  /** Collections (or `prefix.*`) of commits to keep; all when empty. */
  wantedCollections: readonly string[];
  /** Operations of commits to keep; all when absent. */
  operations?: readonly CommitOperation[];
}

/**
 * A predicate for well-formed events: the kind must be wanted, the DID too (when a DID filter is
 * set) and, for commits, the collection and the operation. Identity and account events are not
 * subject to the collection filter, as on Jetstream, but only pass when their kind is wanted.
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
  const ops = selection.operations && selection.operations.length < COMMIT_OPERATIONS.length
    ? new Set<string>(selection.operations)
    : undefined;
  return (ev) => {
    if (!kinds.has(ev.kind)) return false;
    if (dids && !dids.has(ev.did)) return false;
    return ev.kind !== "commit" || (wants(ev.commit.collection) && (!ops || ops.has(ev.commit.operation)));
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
 * Deduplication by content, over the last `capacity` selected events.
 *
 * What can come twice: the inclusive replay of a reconnect, a rewind on failover, and events a
 * restarted server re-ingested under new `time_us` or seqs (protocol doc §5.4), which a replay of
 * history can hold within one connection. Each selected event leaves two 32-bit hashes of its
 * content's identity in a ring (the order to forget them in) and in an open-addressing table (to
 * find them), both typed arrays: remembering keeps no string and no event alive, and a check costs
 * a hash and a probe or two, with nothing for the garbage collector.
 *
 * @example
 * ```ts
 * import { ReplayGuard } from "./filter.ts";
 * const guard = new ReplayGuard(1000);
 * const ev = { did: "did:plc:x", time_us: 1, kind: "identity" as const, identity: { did: "did:plc:x", seq: 1, time: "t" } };
 * guard.repeats(ev); // false: remembered now
 * guard.repeats({ ...ev, time_us: 2 }); // true: the same event under another time_us
 * ```
 */
export class ReplayGuard {
  readonly #capacity: number;
  /** The remembered events' hashes in arrival order, as (b, a) pairs: what to forget next. */
  readonly #ring: Int32Array;
  /** The same pairs by hash, with linear probing; (0, 0) is an empty slot. */
  readonly #table: Int32Array;
  readonly #mask: number;
  #next = 0;
  #count = 0;
  /** The content key of the event last passed to {@link repeats}: its two hashes. */
  lastB = 0;
  /** See {@link lastB}. */
  lastA = 0;

  /** Remembers the last `capacity` selected events. */
  constructor(capacity: number) {
    this.#capacity = Math.max(1, capacity);
    this.#ring = new Int32Array(2 * this.#capacity);
    // At most half full, so that probes stay short.
    let size = 2;
    while (size < 2 * this.#capacity) size *= 2;
    this.#table = new Int32Array(2 * size);
    this.#mask = size - 1;
  }

  /** Whether `ev` repeats one of the last `capacity` events passed here; if not, it is remembered. */
  repeats(ev: JetstreamEvent): boolean {
    if (this.seen(ev)) return true;
    this.#insert(this.lastB, this.lastA);
    return false;
  }

  /**
   * Whether `ev` repeats one of the events remembered, without remembering it: its content key is
   * left in {@link lastB} and {@link lastA} all the same.
   */
  seen(ev: JetstreamEvent): boolean {
    hashContent(ev);
    const b = hashB;
    // (0, 0) marks an empty slot.
    const a = hashA === 0 && b === 0 ? 1 : hashA;
    this.lastB = b;
    this.lastA = a;
    return this.#has(b, a);
  }

  #has(b: number, a: number): boolean {
    const table = this.#table, mask = this.#mask;
    for (let slot = b & mask;; slot = (slot + 1) & mask) {
      const tb = table[2 * slot], ta = table[2 * slot + 1];
      if (tb === b && ta === a) return true;
      if (tb === 0 && ta === 0) return false;
    }
  }

  /**
   * Remembers content keys as (b, a) pairs, as {@link repeats} leaves them in {@link lastB} and
   * {@link lastA}: a resume gives the keys of the records its queue stored last. Keys already
   * remembered are not remembered twice.
   */
  remember(keys: ArrayLike<number>): void {
    for (let k = 0; k + 1 < keys.length; k += 2) {
      if (!this.#has(keys[k], keys[k + 1])) this.#insert(keys[k], keys[k + 1]);
    }
  }

  #insert(b: number, a: number): void {
    const table = this.#table, mask = this.#mask;
    const ring = this.#ring, i = this.#next;
    if (this.#count === this.#capacity) {
      this.#forget(ring[2 * i], ring[2 * i + 1]);
    } else this.#count++;
    ring[2 * i] = b;
    ring[2 * i + 1] = a;
    let slot = b & mask;
    while (table[2 * slot] !== 0 || table[2 * slot + 1] !== 0) slot = (slot + 1) & mask;
    table[2 * slot] = b;
    table[2 * slot + 1] = a;
    this.#next = i + 1 === this.#capacity ? 0 : i + 1;
  }

  /** Removes the pair (b, a) from the table, closing the gap (backward-shift deletion). */
  #forget(b: number, a: number): void {
    const table = this.#table, mask = this.#mask;
    let hole = b & mask;
    while (table[2 * hole] !== b || table[2 * hole + 1] !== a) hole = (hole + 1) & mask;
    for (let j = (hole + 1) & mask;; j = (j + 1) & mask) {
      const tb = table[2 * j], ta = table[2 * j + 1];
      if (tb === 0 && ta === 0) break;
      // An entry may move back to the hole only if its home slot is not after the hole (cyclically,
      // on the way from its home to where it sits).
      if (((j - (tb & mask)) & mask) >= ((j - hole) & mask)) {
        table[2 * hole] = tb;
        table[2 * hole + 1] = ta;
        hole = j;
      }
    }
    table[2 * hole] = 0;
    table[2 * hole + 1] = 0;
  }
}
