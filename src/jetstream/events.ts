/**
 * Types of the events Jetstream sends on the legacy `/subscribe` wire (protocol doc §3.1).
 *
 * These describe what arrives; jetfill stores the parsed JSON of each event unchanged, so extra
 * fields a server adds (for example the `cursor` of a v2 host) are kept as they came.
 *
 * @module
 */

/** The three event kinds of the `/subscribe` wire. */
export type EventKind = "commit" | "identity" | "account";

/** The kinds jetfill can select, in the order they are documented. */
export const EVENT_KINDS: readonly EventKind[] = ["commit", "identity", "account"];

/** A repository operation, one per Jetstream event. */
export interface CommitData {
  /** Repository revision (a TID) shared by all operations of one relay commit. */
  rev: string;
  /** What happened to the record. */
  operation: "create" | "update" | "delete";
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

/** Any event of the `/subscribe` wire. */
export type JetstreamEvent = CommitEvent | IdentityEvent | AccountEvent;
