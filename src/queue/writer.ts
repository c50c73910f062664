/**
 * Writes batches to a queue in atomic commits: each commit holds its messages, the queue's
 * checkpoint and its counters, so a crash can never leave records without their checkpoint or a
 * checkpoint ahead of its records.
 *
 * Commits run one at a time, in order. While one is in flight, the batches that complete meanwhile
 * wait and then go together in the next commit (group commit): a batch is never split unless KV's
 * per-commit limits (1000 mutations, 800 KiB) force it, and a slow disk costs fewer, larger commits
 * instead of a growing backlog.
 *
 * @module
 */
import type { Batch, PackedMessage } from "../pipeline/batch.ts";
import { type Checkpoint, queueKey, type RunState } from "./kv_queue.ts";
import { KV_COMMIT_LIMIT, KV_MUTATION_LIMIT } from "./size.ts";

/** What a commit stored, for the statistics. */
export interface CommitReport {
  /** Records stored. */
  records: number;
  /** Messages enqueued. */
  messages: number;
  /** `time_us` of the last record. */
  cursor: number;
  /** Records per UTC day. */
  days: Map<string, number>;
  /** Collections of the records. */
  collections: Set<string>;
}

/** The queue was written by someone else while this writer held it. */
export class ConcurrentWriterError extends Error {
  /** Creates the error for `queue`. */
  constructor(queue: string) {
    super(
      `queue '${queue}' was changed by another writer during this run; stopping so that its checkpoint stays true`,
    );
    this.name = "ConcurrentWriterError";
  }
}

const COMMIT_BUDGET = KV_COMMIT_LIMIT - 16_384;
// Mutations besides the enqueues: the checkpoint, two counters and one counter a day.
const FIXED_MUTATIONS = 16;
// Past this many bytes of batches waiting for their commit, add() waits: the reader slows down.
const HIGH_WATER_BYTES = 2 << 20;

/** Writes batches of one queue. */
export class QueueWriter {
  readonly #kv: Deno.Kv;
  readonly #queue: string;
  readonly #onCommit: (report: CommitReport, checkpoint: Checkpoint) => void;
  #checkpoint: Checkpoint;
  #versionstamp: string | null;
  #pending: PackedMessage[][] = [];
  #pendingBytes = 0;
  #running: Promise<void> | undefined;
  #failure: unknown;
  #waiters: (() => void)[] = [];

  /**
   * A writer that continues from `checkpoint` (as read, with its versionstamp, or null for a new
   * queue) and calls `onCommit` after every durable commit.
   */
  constructor(
    kv: Deno.Kv,
    queue: string,
    start: { checkpoint: Checkpoint; versionstamp: string | null },
    onCommit: (report: CommitReport, checkpoint: Checkpoint) => void,
  ) {
    this.#kv = kv;
    this.#queue = queue;
    this.#checkpoint = start.checkpoint;
    this.#versionstamp = start.versionstamp;
    this.#onCommit = onCommit;
  }

  /** The checkpoint of the last durable commit. */
  get checkpoint(): Checkpoint {
    return this.#checkpoint;
  }

  /** Updates the run state written with the next commits (for example the instance in use). */
  setRun(run: Partial<RunState>): void {
    this.#checkpoint = { ...this.#checkpoint, run: { ...this.#checkpoint.run, ...run } };
  }

  /** Queues a batch for commit; waits only when too much is already waiting. Throws a past failure. */
  async add(batch: Batch): Promise<void> {
    if (this.#failure) throw this.#failure;
    this.#pending.push(batch.messages);
    for (const m of batch.messages) this.#pendingBytes += m.size;
    this.#running ??= this.#loop();
    while (this.#pendingBytes > HIGH_WATER_BYTES && this.#busy() && !this.#failure) {
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
    if (this.#failure) throw this.#failure;
  }

  #busy(): boolean {
    return this.#running !== undefined;
  }

  /** Waits until every added batch is committed; throws if a commit failed. */
  async flush(): Promise<void> {
    while (this.#running) await this.#running;
    if (this.#failure) throw this.#failure;
  }

  async #loop(): Promise<void> {
    try {
      while (this.#pending.length > 0) await this.#commit(this.#takeGroup());
    } catch (err) {
      this.#failure = err;
    } finally {
      this.#running = undefined;
      for (const w of this.#waiters.splice(0)) w();
    }
  }

  // Whole batches while they fit; a lone batch too large for one commit is split by messages.
  #takeGroup(): PackedMessage[] {
    const group: PackedMessage[] = [];
    let bytes = 0;
    while (this.#pending.length > 0) {
      const batch = this.#pending[0];
      let size = 0;
      for (const m of batch) size += m.size;
      if (
        group.length + batch.length + FIXED_MUTATIONS <= KV_MUTATION_LIMIT && bytes + size <= COMMIT_BUDGET
      ) {
        group.push(...batch);
        bytes += size;
        this.#pending.shift();
        continue;
      }
      if (group.length > 0) break;
      let taken = 0;
      while (
        taken < batch.length && taken + 1 + FIXED_MUTATIONS <= KV_MUTATION_LIMIT &&
        bytes + batch[taken].size <= COMMIT_BUDGET
      ) {
        bytes += batch[taken].size;
        taken++;
      }
      group.push(...batch.splice(0, Math.max(taken, 1)));
      break;
    }
    this.#pendingBytes -= bytes;
    return group;
  }

  async #commit(group: PackedMessage[]): Promise<void> {
    const q = this.#queue;
    const cpKey = queueKey(q, "checkpoint");
    const op = this.#kv.atomic().check({ key: cpKey, versionstamp: this.#versionstamp });
    let seq = this.#checkpoint.seq;
    let records = 0;
    let cursor = this.#checkpoint.cursor;
    let seqCursor = this.#checkpoint.run.seqCursor;
    let seqInstance = this.#checkpoint.run.seqInstance;
    const days = new Map<string, number>();
    const collections = new Set<string>();
    for (const m of group) {
      seq++;
      const message: Record<string, unknown> = { v: 1, queue: q, seq, cursor: m.cursor, records: m.records };
      if (m.compressed) message.compressed = m.compressed;
      op.enqueue(message, { keysIfUndelivered: [queueKey(q, "dead", seq)] });
      records += m.count;
      cursor = m.cursor;
      if (m.seq !== undefined) {
        seqCursor = m.seq;
        seqInstance = m.seqHost;
      }
      for (const [d, n] of m.days) days.set(d, (days.get(d) ?? 0) + n);
      for (const c of m.collections) collections.add(c);
    }
    op.sum(queueKey(q, "count", "messages"), BigInt(group.length));
    op.sum(queueKey(q, "count", "records"), BigInt(records));
    for (const [d, n] of days) op.sum(queueKey(q, "day", d), BigInt(n));
    const prev = this.#checkpoint;
    const checkpoint: Checkpoint = {
      ...prev,
      seq,
      cursor,
      recordsStored: prev.recordsStored + records,
      updatedAt: Date.now(),
      run: { ...prev.run, recordsStored: prev.run.recordsStored + records, seqCursor, seqInstance },
    };
    op.set(cpKey, checkpoint);
    const res = await op.commit();
    if (!res.ok) throw new ConcurrentWriterError(q);
    this.#versionstamp = res.versionstamp;
    // Run-state changes made while this commit was in flight (setRun) are kept for the next one.
    this.#checkpoint = {
      ...checkpoint,
      run: { ...this.#checkpoint.run, recordsStored: checkpoint.run.recordsStored },
    };
    for (const w of this.#waiters.splice(0)) w();
    this.#onCommit({ records, messages: group.length, cursor, days, collections }, checkpoint);
  }
}
