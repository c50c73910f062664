/**
 * Types of the events Jetstream sends on the legacy `/subscribe` wire (protocol doc §3.1), and the
 * check that a parsed value is one ({@link shapeProblem}).
 *
 * These describe what arrives; jetfill stores the parsed JSON of each event unchanged, so extra
 * fields a server adds (for example the `cursor` of a v2 host) are kept as they came.
 *
 * @module
 */
import type { SkipReason } from "../stats.ts";
import { MIN_TIMESTAMP_US } from "../time.ts";

/** The three event kinds of the `/subscribe` wire. */
export type EventKind = "commit" | "identity" | "account";

/** The kinds jetfill can select, in the order they are documented. */
export const EVENT_KINDS: readonly EventKind[] = ["commit", "identity", "account"];

/** What a commit event does to its record. */
export type CommitOperation = "create" | "update" | "delete";

/** Every commit operation, in the order Jetstream documents them. */
export const COMMIT_OPERATIONS: readonly CommitOperation[] = ["create", "update", "delete"];

/** A repository operation, one per Jetstream event. */
export interface CommitData {
  /** Repository revision (a TID) shared by all operations of one relay commit. */
  rev: string;
  /** What happened to the record. */
  operation: CommitOperation;
  /** The record's collection NSID, for example `app.bsky.feed.post`. */
  collection: string;
  /** The record key. */
  rkey: string;
  /** The record in the atproto JSON data model; absent on deletes. */
  record?: Record<string, unknown>;
  /** The record's CID; absent on deletes. */
  cid?: string;
}

/** Fields every event carries. */
export interface EventBase {
  /** The repository DID. */
  did: string;
  /** Jetstream's own ingest time, unix microseconds. */
  time_us: number;
  /** The v2 server's sequence number, present only on v2 hosts. */
  cursor?: number;
}

/** A commit event: one record created, updated or deleted. */
export interface CommitEvent extends EventBase {
  /** Discriminant. */
  kind: "commit";
  /** The operation. */
  commit: CommitData;
}

/** An identity event (handle or DID document change), passed through from the relay. */
export interface IdentityEvent extends EventBase {
  /** Discriminant. */
  kind: "identity";
  /** The relay's `#identity` body. */
  identity: { did: string; handle?: string; seq: number; time: string };
}

/** An account event (activation status change), passed through from the relay. */
export interface AccountEvent extends EventBase {
  /** Discriminant. */
  kind: "account";
  /** The relay's `#account` body. */
  account: { did: string; active: boolean; seq: number; time: string; status?: string };
}

/**
 * Any event of the `/subscribe` wire.
 *
 * @example
 * ```ts
 * import type { JetstreamEvent } from "@jetfill/jetfill";
 * function describe(e: JetstreamEvent): string {
 *   switch (e.kind) {
 *     case "commit":
 *       return `${e.did} ${e.commit.operation} ${e.commit.collection}/${e.commit.rkey}`;
 *     case "identity":
 *       return `${e.did} is now ${e.identity.handle ?? "without a handle"}`;
 *     case "account":
 *       return `${e.did} is ${e.account.active ? "active" : "inactive"}`;
 *   }
 * }
 * ```
 */
export type JetstreamEvent = CommitEvent | IdentityEvent | AccountEvent;

/**
 * How far past this machine's clock a `time_us` may be, µs: a day, so that a clock running behind
 * (a VM resumed without a time sync) does not make every event look impossible.
 */
export const FUTURE_SLACK_US = 86_400_000_000;

/**
 * Which event this is, for a message about it: its time, account and, for a commit, record (the
 * event's shape checked already).
 *
 * @example
 * ```ts
 * import { describeEvent } from "./events.ts";
 * describeEvent({
 *   did: "did:plc:x",
 *   time_us: 1725911162329308,
 *   kind: "commit",
 *   commit: { rev: "r", operation: "create", collection: "app.bsky.feed.post", rkey: "3k" },
 * }); // "event at time_us 1725911162329308 (did:plc:x, app.bsky.feed.post/3k)"
 * ```
 */
export function describeEvent(event: JetstreamEvent): string {
  const what = event.kind === "commit" ? `${event.commit.collection}/${event.commit.rkey}` : event.kind;
  return `event at time_us ${event.time_us} (${event.did}, ${what})`;
}

/** The operations a commit event can carry (protocol doc §3.1). */
const OPERATIONS: ReadonlySet<unknown> = new Set(COMMIT_OPERATIONS);

/**
 * Whether `did` has the outline of a DID, `did:METHOD:ID` (at most 2,048 characters): a check
 * cheap enough for every event, which the empty or made-up values of a broken server fail.
 * Method-specific syntax is left to the DID filter (`isDid` in `validate.ts`).
 */
function looksLikeDid(did: string): boolean {
  const colon = did.indexOf(":", 4);
  return colon > 4 && colon < did.length - 1 && did.length <= 2048 && did.startsWith("did:");
}

/**
 * Why a parsed value cannot be treated as a Jetstream event, or undefined when it can. A `time_us`
 * is the time a server received the event, so it is a unix µs time from 10^15 (2001) on, and not
 * past `maxTimeUs` (by default this machine's clock plus {@link FUTURE_SLACK_US}); one outside
 * that is `bad_time` (a single event from the year 2100 would otherwise end a run at `--end`, or
 * move its reconnect cursor past everything). A field that is there but holds a value no
 * Jetstream sends is `bad_value`: a `did` without the `did:METHOD:ID` outline, a commit
 * `operation` other than `create`, `update` or `delete`, an empty collection or rkey, a `rev` that
 * is not text, an identity or account event's relay `time` that is not text or `seq` not a number.
 *
 * @example
 * ```ts
 * import { shapeProblem } from "./events.ts";
 * shapeProblem({ did: "did:plc:x", time_us: 1725911162329308, kind: "heartbeat" }); // "unknown_kind"
 * shapeProblem({ did: "did:plc:x", time_us: 0, kind: "identity", identity: {} }); // "bad_time"
 * shapeProblem({ did: "", time_us: 1725911162329308, kind: "identity", identity: {} }); // "bad_value"
 * ```
 */
export function shapeProblem(
  value: unknown,
  maxTimeUs: number = Date.now() * 1000 + FUTURE_SLACK_US,
): SkipReason | undefined {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return "missing_fields";
  const ev = value as Record<string, unknown>;
  const t = ev.time_us;
  if (typeof ev.did !== "string" || t === undefined || t === null) return "missing_fields";
  // A time_us that is there but no integer of µs (a string, a fraction, past 2^53): a bad time.
  if (typeof t !== "number" || !Number.isSafeInteger(t) || t < MIN_TIMESTAMP_US || t > maxTimeUs) {
    return "bad_time";
  }
  if (!looksLikeDid(ev.did)) return "bad_value";
  switch (ev.kind) {
    case "commit": {
      const c = ev.commit as Record<string, unknown> | null | undefined;
      if (
        typeof c !== "object" || c === null || typeof c.collection !== "string" ||
        typeof c.operation !== "string" ||
        typeof c.rkey !== "string"
      ) return "missing_fields";
      // The content key reads rev (absent when empty, Go's omitempty) as text.
      return OPERATIONS.has(c.operation) && c.collection !== "" && c.rkey !== "" &&
          (c.rev === undefined || typeof c.rev === "string")
        ? undefined
        : "bad_value";
    }
    case "identity":
    case "account": {
      const body = ev[ev.kind] as Record<string, unknown> | null | undefined;
      if (typeof body !== "object" || body === null || Array.isArray(body)) return "missing_fields";
      // The relay's time (text) and seq (a number), which the content key reads, when they are there.
      return (body.time === undefined || typeof body.time === "string") &&
          (body.seq === undefined || typeof body.seq === "number")
        ? undefined
        : "bad_value";
    }
    case undefined:
      return "missing_fields";
    default:
      return "unknown_kind";
  }
}
