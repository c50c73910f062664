/**
 * Group commits for consume(): writes that many messages need (put-backs, parkings) go to KV a few
 * messages a commit, in order, and each group's outcome is reported.
 *
 * @module
 */
import { retryBusy } from "./parking.ts";

// Put-backs or parked messages per atomic commit: 12 messages of 64 KiB stay under KV's 800 KiB.
const MESSAGES_PER_COMMIT = 12;

/**
 * Writes items in group commits, in order: up to MESSAGES_PER_COMMIT of one database a commit, the
 * items added during a turn together. `done` hears of each group's outcome (the failure, if any),
 * `idle` of the end of each run of commits.
 */
export class GroupWriter<T extends { kv: Deno.Kv }> {
  readonly #items: T[] = [];
  #flushing = false;

  constructor(
    readonly build: (op: Deno.AtomicOperation, group: T[]) => void,
    readonly done: (group: T[], outcome: CommitOutcome) => void,
    readonly idle: () => void,
  ) {}

  /** Something waits to be written, or is being written. */
  get busy(): boolean {
    return this.#flushing || this.#items.length > 0;
  }

  add(item: T): void {
    this.#items.push(item);
    if (!this.#flushing) void this.#flush();
  }

  async #flush(): Promise<void> {
    this.#flushing = true;
    try {
      // Let the items of this turn gather.
      await Promise.resolve();
      while (this.#items.length > 0) {
        const kv = this.#items[0].kv;
        const group: T[] = [];
        while (group.length < MESSAGES_PER_COMMIT && this.#items[0]?.kv === kv) {
          group.push(this.#items.shift()!);
        }
        this.done(group, await commitOutcome(kv, (op) => this.build(op, group)));
      }
    } finally {
      this.#flushing = false;
      this.idle();
    }
  }
}

/** What came of a commit: its versionstamp, or its failure (`refused` when a check failed). */
export interface CommitOutcome {
  versionstamp?: string;
  failure?: unknown;
  refused?: boolean;
}

/** Commits what `build` adds to an atomic operation (again while busy), and says what came of it. */
export async function commitOutcome(
  kv: Deno.Kv,
  build: (op: Deno.AtomicOperation) => void,
): Promise<CommitOutcome> {
  try {
    const res = await retryBusy(() => {
      const op = kv.atomic();
      build(op);
      return op.commit();
    });
    return res.ok
      ? { versionstamp: res.versionstamp }
      : { failure: new Error("the commit was refused"), refused: true };
  } catch (err) {
    return { failure: err ?? new Error("the commit failed") };
  }
}
