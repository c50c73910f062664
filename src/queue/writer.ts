/**
 * Writes batches to a queue in atomic commits: each commit holds its messages, the queue's
 * checkpoint and its counters, so a crash can never leave records without their checkpoint or a
 * checkpoint ahead of its records.
 *
 * Commits are issued in order, up to three in flight: Deno KV applies one process's writes in the
 * order they are issued, and overlapping them keeps its writer busy while the next commit is being
 * filled. (Measured end to end on this 2-core machine: one at a time was 4–6 % slower, six were no
 * faster; the main thread's parsing and serializing set the pace.) Each commit checks the queue's
 * writer lock, taken (by `claim()`, or else at the first commit) together with a check of the
 * checkpoint as read, so a second writer is noticed instead of corrupting the sequence. A sync given
 * a database path also holds the queue's lock file (`file_lock.ts`) around all of this. While
 * commits are in flight, the batches that complete meanwhile go together in the next one (group
 * commit, up to 32 messages: see MAX_MESSAGES_PER_COMMIT): a batch is never split unless KV's
 * per-commit limits (1000 mutations, 800 KiB) force it, and a slow disk costs fewer, larger commits
 * instead of a growing backlog.
 *
 * A commit is issued as soon as KV has none in hand, so a slow stream is stored batch by batch;
 * while KV is busy, the next commit is filled up to those limits first. KV on SQLite syncs its log
 * once per commit (1.3 ms at the median on this disk): issuing part-filled commits whenever a slot was free
 * made 40 % more of them for the same records.
 *
 * A batch's messages are enqueued into the next commit as soon as the batch is added, so parsed
 * events are garbage by the time their commit is issued; what waits is at most one commit's worth of
 * serialized bytes. When that commit is full and every slot is taken, `add()` waits: the reader
 * slows down instead of the heap growing.
 *
 * Messages are packed by an upper bound of their size, which only structures outside the atproto
 * data model beat (doubles serialize to 9 bytes). KV then refuses the commit as it takes it, before
 * writing anything. A commit is issued only once the event loop has turned since the one before, so
 * that refusal is known and nothing goes after it: its records are measured exactly and committed in
 * its place, and the commit being built meanwhile is numbered after them. Commits land in the order
 * of their records and seqs, each with a checkpoint true of what has landed, so a crash leaves a queue
 * that a resume continues without a gap.
 *
 * A commit that SQLite reports busy ("database is locked": another connection, such as a consumer
 * acknowledging messages, wrote between the commit's checks and its writes) wrote nothing. It is
 * committed again once the commits issued after it have settled, and none of those moves the
 * checkpoint back. Until it lands, a crash could leave its records behind a later checkpoint: the one
 * window left, as long as a retry takes. A commit that fails for good (busy past the retries, or
 * failed by KV otherwise) stops the sync, and the checkpoint is set back to before its records (see
 * #stopShort).
 *
 * @module
 */
import { serialize } from "node:v8";
import { type Batch, OversizedEventError, type PackedMessage } from "../pipeline/batch.ts";
import { isoFromUs, utcDate } from "../time.ts";
import { compressEvent, type QueueMessage } from "./message.ts";
import {
  type Checkpoint,
  isBusy,
  type KeyEntry,
  KEYS_SPAN_US,
  keysKey,
  queueKey,
  RECENT_KEYS,
  retryWhileBusy,
} from "./kv_queue.ts";
import { KV_COMMIT_LIMIT, KV_MUTATION_LIMIT, KV_VALUE_LIMIT } from "./size.ts";

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

/**
 * Another sync is writing the queue. `runBackfillSync()` rejects with it before connecting when a
 * sync that is running holds the queue, and a run stops with its message (`stopReason: "error"`)
 * when another writer took the queue during the run; what was stored stays as it is.
 *
 * @example
 * ```ts
 * import { ConcurrentWriterError, runBackfillSync } from "@jetfill/jetfill";
 * try {
 *   await runBackfillSync({ kv: "./jetfill-data/jetstream_sync.sqlite" });
 * } catch (err) {
 *   if (!(err instanceof ConcurrentWriterError)) throw err;
 *   console.error("another sync is writing this queue:", err.message);
 * }
 * ```
 */
export class ConcurrentWriterError extends Error {
  /**
   * Creates the error for `queue`, saying what happened: by default, that it was changed during
   * this run; with `refused`, why this run did not start.
   */
  constructor(queue: string, what = "was changed by another writer during this run", refused = false) {
    super(
      refused
        ? `queue '${queue}' ${what}: let that sync finish or stop it, then run again (--resume / resume: true continues its run); a separate run needs a database of its own (--kv / kv), as a database holds one queue`
        : `queue '${queue}' ${what} (another sync on the same database and queue name?); stopped so that its checkpoint stays true: run one sync per queue, then resume it (--resume / resume: true)`,
    );
    this.name = "ConcurrentWriterError";
  }
}

const COMMIT_BUDGET = KV_COMMIT_LIMIT - 16_384;
// Key entries (see KeyEntry) a commit deletes at most.
const KEY_DELETES = 16;
// Mutations besides the enqueues and the one counter a UTC day: the checkpoint, two counters, the
// commit's key entry and the key entries it deletes.
const FIXED_MUTATIONS = 4 + KEY_DELETES;
// Content keys a commit's key entry holds at most, as numbers (two a record): 56 KB, under the
// 64 KiB of a KV value.
const MAX_KEY_NUMBERS = 14_000;
// Messages a commit gathers from several batches at most (one batch alone may have more). Deno KV
// hands over the messages of one commit in random order, one every few milliseconds, so a consumer
// can put them back in seq order only when a commit holds few: with a --batch-size of 5, commits of
// ~200 messages came out of order hundreds of times in 4,000, and consume() took twice as long; with
// 32, none did. It binds only for small batches (the default's 64 KiB messages fill a commit at 12),
// where it costs the sync a quarter of its speed (70k events/s against 94k at --batch-size 5).
const MAX_MESSAGES_PER_COMMIT = 32;
// Commits in flight at once.
const DEPTH = 3;
// How long a commit is tried again while SQLite reports the database busy.
const BUSY_BUDGET_MS = 30_000;
// How long a sync stopping on such a commit tries to set the checkpoint back (see #stopShort).
const SET_BACK_BUDGET_MS = 5_000;

/**
 * How often a writer that holds its queue's lock shows that it is alive when it has not committed
 * meanwhile (a quiet live tail): it sets `["jetfill", queue, "alive"]`, which a sync starting beside
 * it watches.
 */
export const WRITER_HEARTBEAT_MS = 500;

/**
 * The next commit, built as batches arrive: each message is enqueued (serialized by KV) when its
 * batch is added, so that parsed events do not wait for a commit slot. Holding them until then kept
 * about a thousand events alive through every young-generation GC. Its checkpoint and counters are
 * added when it is issued.
 */
interface Building {
  op: Deno.AtomicOperation;
  /** The messages, without their records: a repair parses their texts again. */
  group: PackedMessage[];
  /** The seq of each message of `group`. */
  seqs: number[];
  /** Upper bound of the serialized bytes enqueued. */
  bytes: number;
  /** UTC days of the records (one counter mutation each). */
  days: Set<string>;
  /** The content keys of its records, as noted by the batcher: its key entry. */
  keys: number[];
}

/** A commit issued and not yet known to be durable. */
interface Inflight {
  /** The operation, committed again if SQLite was busy. */
  op: Deno.AtomicOperation;
  promise: Promise<Deno.KvCommitResult | Deno.KvCommitError>;
  /**
   * The messages, without their records (already serialized): rebuilt from their texts for a
   * repair. Emptied once vetted.
   */
  group: PackedMessage[];
  /** The seq of each message of `group`. */
  seqs: number[];
  checkpoint: Checkpoint;
  report: CommitReport;
  /** A repair, its sizes measured exactly: a refusal is not repaired again. */
  exact: boolean;
  /** KV refused it for its size. */
  refused: boolean;
  /** The event loop has turned since it was issued, so a refusal would be known. */
  vetted: boolean;
  /** Resolves when `vetted` turns true. */
  whenVetted: Promise<void>;
  /** Marks it vetted (at the turn of the event loop after it was issued, or once it completed). */
  vet: () => void;
}

/** Writes batches of one queue. */
export class QueueWriter {
  readonly #kv: Deno.Kv;
  readonly #queue: string;
  readonly #onCommit: (report: CommitReport, checkpoint: Checkpoint) => void;
  /** The state after the last commit issued (the next one builds on it). */
  #issued: Checkpoint;
  /** The state after the last commit known durable. */
  #durable: Checkpoint;
  /** The checkpoint's versionstamp as read, checked when the lock is taken. */
  #readVersionstamp: string | null;
  /** The writer lock's versionstamp, checked by every commit. */
  #lock: string | undefined;
  /**
   * The versionstamp of the checkpoint that taking the lock wrote for a run that had stored nothing
   * (see {@link claim}): {@link abandon} takes it back.
   */
  #placed: string | undefined;
  /** The seq of the last message in the queue when this writer started. */
  readonly #startSeq: number;
  /** The last seq given to a message (of the commit being built, or one issued). */
  #seq: number;
  #building: Building;
  #running: Promise<void> | undefined;
  #failure: unknown;
  /** add() calls waiting for the commit being built to be issued (it is full). */
  #waiters: (() => void)[] = [];
  #onFull: (() => void) | undefined;
  /** The writer lock's versionstamp as seen before this writer started, when it was looked at. */
  readonly #seenLock: string | null | undefined;
  /** The same for the queue's `alive` key. */
  readonly #seenAlive: string | null | undefined;
  /** This sync holds the queue's lock file too. */
  readonly #lockFile: boolean;
  readonly #lockFileId: string | undefined;
  /** The key entries kept, oldest first: each one's seq, the newest `time_us` of its records, and their count. */
  readonly #keyEntries: { seq: number; newestUs: number; count: number }[];
  /** Records whose keys the entries hold. */
  #keyRecords: number;
  /** The largest cursor of the entries. */
  #keysNewest: number;
  /** `Date.now()` of the last write that shows this writer alive (a commit, the lock, a heartbeat). */
  #lastWrite = 0;
  #heartbeat: ReturnType<typeof setInterval> | undefined;
  #beating: Promise<void> | undefined;
  /**
   * Called when a heartbeat finds that another writer took the queue's lock (this writer was
   * paused, say, and taken for dead): the run should stop, as its next commit would fail.
   */
  onLost: ((err: ConcurrentWriterError) => void) | undefined;
  /**
   * A live tail's first event processed (see `RunState.tailFrom`), set by the run: its first commit
   * records it, unless the run's state has one already (a resume).
   */
  tailFrom: { us: number; instance: string } | undefined;

  /**
   * A writer that continues from `checkpoint` (as read, with its versionstamp, or null for a new
   * queue) and calls `onCommit` after every durable commit. With `lock` (the writer lock's
   * versionstamp as seen, null when there was none), taking the lock also checks that nobody took it
   * since; with `alive`, that the sync holding it showed no sign of life since. `lockFile` says in
   * the writer lock that this sync also holds the queue's lock file (see `file_lock.ts`), and
   * `lockFileId` which file that is (see `QueueFileLock.id`).
   * `keyEntries` are the queue's key entries as read (see `KeyEntry`), which its commits then keep
   * up to date.
   */
  constructor(
    kv: Deno.Kv,
    queue: string,
    start: {
      checkpoint: Checkpoint;
      versionstamp: string | null;
      lock?: string | null;
      alive?: string | null;
      lockFile?: boolean;
      lockFileId?: string;
      keyEntries?: readonly KeyEntry[];
    },
    onCommit: (report: CommitReport, checkpoint: Checkpoint) => void,
  ) {
    this.#kv = kv;
    this.#queue = queue;
    this.#issued = start.checkpoint;
    this.#durable = start.checkpoint;
    this.#seq = start.checkpoint.seq;
    this.#startSeq = start.checkpoint.seq;
    this.#readVersionstamp = start.versionstamp;
    this.#seenLock = start.lock;
    this.#seenAlive = start.alive;
    this.#lockFile = start.lockFile === true;
    this.#lockFileId = start.lockFileId;
    this.#keyEntries = (start.keyEntries ?? []).map((e) => ({
      seq: e.seq,
      newestUs: e.maxUs ?? e.cursor,
      count: e.keys.length / 2,
    }));
    this.#keyRecords = this.#keyEntries.reduce((n, e) => n + e.count, 0);
    this.#keysNewest = this.#keyEntries.reduce((n, e) => Math.max(n, e.newestUs), -Infinity);
    this.#onCommit = onCommit;
    this.#building = this.#open();
  }

  /** The checkpoint of the last durable commit. */
  get checkpoint(): Checkpoint {
    return this.#durable;
  }

  /**
   * Enqueues a batch into the commit being built; waits only when that commit has no room left
   * and every commit slot is taken. Throws a past failure.
   */
  async add(batch: Batch): Promise<void> {
    if (this.#failure) throw this.#failure;
    // A batch goes whole into one commit unless it cannot fit even an empty one (KV's limits).
    while (
      this.#building.group.length > 0 &&
      (!fits(this.#building, batch.messages) ||
        this.#building.group.length + batch.messages.length > MAX_MESSAGES_PER_COMMIT)
    ) await this.#handOver();
    for (const m of batch.messages) {
      while (!fits(this.#building, [m])) await this.#handOver();
      this.#append(this.#building, m, ++this.#seq);
    }
    this.#running ??= this.#loop();
  }

  /** Waits until the commit being built is issued (or the writer failed). */
  async #handOver(): Promise<void> {
    this.#running ??= this.#loop();
    const wait = new Promise<void>((resolve) => this.#waiters.push(resolve));
    this.#onFull?.();
    this.#onFull = undefined;
    await wait;
    if (this.#failure) throw this.#failure;
  }

  /** Resolves once an add() waits for the commit being built. */
  #full(): Promise<false> {
    return new Promise((resolve) => this.#onFull = () => resolve(false));
  }

  /** Waits until every added batch is committed; throws if a commit failed. */
  async flush(): Promise<void> {
    while (this.#running) await this.#running;
    if (this.#failure) throw this.#failure;
  }

  /**
   * Takes the queue's writer lock now rather than at the first commit, and from then on shows that
   * this writer is alive: when it has not committed for {@link WRITER_HEARTBEAT_MS}, it sets the
   * queue's `alive` key. A sync that starts beside it, even while it is quiet, then sees it running.
   * Throws {@link ConcurrentWriterError} when another writer took the lock or moved the checkpoint
   * since they were read. {@link release} stops the heartbeat. For a run that has stored nothing yet
   * (a new one, say), the checkpoint (this run's, with nothing stored) is written with the lock, so
   * that a run stopped before its first commit is the one `--resume` continues.
   */
  async claim(): Promise<void> {
    if (this.#lock === undefined) await this.#acquire("is being written by another sync right now");
    this.#heartbeat ??= setInterval(() => this.#beat(), WRITER_HEARTBEAT_MS / 2);
  }

  #beat(): void {
    if (
      this.#beating || this.#lock === undefined || this.#failure ||
      Date.now() - this.#lastWrite < WRITER_HEARTBEAT_MS
    ) return;
    this.#lastWrite = Date.now();
    // Only while the lock is still ours: a writer that lost it must not look alive.
    const op = this.#kv.atomic()
      .check({ key: queueKey(this.#queue, "writer"), versionstamp: this.#lock })
      .set(queueKey(this.#queue, "alive"), { run: this.#issued.run.id, at: this.#lastWrite });
    // A consumer beside it can keep SQLite busy most of the time (a commit per message): the beat is
    // tried again like a commit, for up to two beats' time, or a sync started meanwhile would see
    // this one silent. Past that it is the next beat's to make.
    this.#beating = retryWhileBusy(() => op.commit(), 2 * WRITER_HEARTBEAT_MS)
      .then((res) => {
        if (res.ok || this.#failure) return;
        // Another sync took the lock: a quiet writer would only find out at its next commit.
        const lost = new ConcurrentWriterError(this.#queue);
        this.#failure = lost;
        clearInterval(this.#heartbeat);
        this.onLost?.(lost);
      }, () => {})
      .finally(() => this.#beating = undefined);
  }

  /**
   * Stops the heartbeat and gives the queue's writer lock back, if this writer still holds it: a
   * lock left in place says that a sync may be running (or crashed), which the next one watches
   * for. Failing to release it only costs the next sync that short watch. Call it once everything
   * is flushed (or the writer failed).
   *
   * `last`, writes to add to the same commit (the run's record for `jetfill status`), goes only
   * while the lock is still this writer's, so a sync that lost its queue cannot write over what the
   * one that took it records; release() then throws why it was not written.
   */
  async release(last?: (op: Deno.AtomicOperation) => void): Promise<void> {
    clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
    await this.#beating;
    const lock = this.#lock;
    this.#lock = undefined;
    if (last !== undefined) {
      const op = this.#kv.atomic();
      if (lock !== undefined) this.#giveBack(op, lock);
      last(op);
      let res: Deno.KvCommitResult | Deno.KvCommitError;
      try {
        res = await retryWhileBusy(() => op.commit(), 5000);
      } catch (err) {
        if (lock !== undefined) await this.#release(lock);
        throw err;
      }
      if (!res.ok) throw new ConcurrentWriterError(this.#queue, "was taken by another sync during this run");
    } else if (lock !== undefined) {
      await this.#release(lock);
    }
  }

  /**
   * Gives the lock back like {@link release}, for a run that was refused (a request the server
   * called invalid, say): the checkpoint that taking the lock wrote for a run that had stored nothing
   * is put back as it was found (`found`, the checkpoint read before, or null for none) when this
   * writer committed nothing, so that the queue is left as it was found. Best effort, like a release
   * without `last`.
   */
  async abandon(found: Checkpoint | null): Promise<void> {
    if (!this.#placedAlone) return await this.release();
    await this.release((op) => this.putBack(op, found)).catch(() => {});
  }

  /** Taking the lock wrote this run's checkpoint, and this writer committed nothing since. */
  get #placedAlone(): boolean {
    return this.#placed !== undefined && this.#durable.seq === this.#startSeq;
  }

  /**
   * Adds to `op` (a commit of {@link release}'s `last`) the putting back of `found`, as {@link abandon}
   * does, when taking the lock wrote this run's checkpoint and nothing was committed since.
   */
  putBack(op: Deno.AtomicOperation, found: Checkpoint | null): void {
    if (!this.#placedAlone) return;
    const key = queueKey(this.#queue, "checkpoint");
    op.check({ key, versionstamp: this.#placed! });
    if (found === null) op.delete(key);
    else op.set(key, found);
  }

  /** Deletes the writer lock and `alive`, if the lock is still `lock`. */
  #giveBack(op: Deno.AtomicOperation, lock: string): Deno.AtomicOperation {
    const key = queueKey(this.#queue, "writer");
    return op.check({ key, versionstamp: lock }).delete(key).delete(queueKey(this.#queue, "alive"));
  }

  /** Gives the lock back: best effort, and not worth a long wait at the end of a run. */
  async #release(lock: string): Promise<void> {
    const op = this.#giveBack(this.#kv.atomic(), lock);
    await retryWhileBusy(() => op.commit(), 2000).catch(() => {});
  }

  async #loop(): Promise<void> {
    const inflight: Inflight[] = [];
    try {
      if (this.#lock === undefined) await this.#acquire();
      while (this.#building.group.length > 0 || inflight.length > 0) {
        const building = this.#building;
        // Issued when KV has nothing in hand, or when it is full and a slot is free.
        const full = this.#waiters.length > 0;
        // Nothing goes after a commit that KV refused: it would land before the refused records are
        // stored again, and a crash in between would leave them out behind a checkpoint past them.
        // KV checks a commit's limits when it takes it, so the refusal is known once the event loop
        // has turned after the commit was issued.
        const refused = inflight.some((f) => f.refused);
        if (
          building.group.length > 0 && !refused &&
          (inflight.length === 0 || (full && inflight.length < DEPTH))
        ) {
          const last = inflight.at(-1);
          if (last && !last.vetted) {
            await last.whenVetted;
            continue;
          }
          this.#building = this.#open();
          inflight.push(this.#issue(building, false));
          for (const w of this.#waiters.splice(0)) w();
          continue;
        }
        if (inflight.length < DEPTH && !refused) {
          // A free slot: the commit being built goes when the oldest in flight lands, or earlier
          // if it fills up first.
          const head = inflight[0].promise.then(() => true, () => true);
          if (await Promise.race([head, this.#full()]) !== true) continue;
        }
        await this.#complete(inflight.shift()!, inflight);
      }
    } catch (err) {
      this.#failure = err;
      // Commits already issued land or fail on their own: count those that landed, so that the
      // statistics say what is stored.
      for (const rest of inflight) {
        const res = await rest.promise.catch(() => undefined);
        if (res?.ok) {
          this.#durable = rest.checkpoint;
          this.#onCommit(rest.report, rest.checkpoint);
        }
      }
    } finally {
      this.#running = undefined;
      for (const w of this.#waiters.splice(0)) w();
    }
  }

  /**
   * Takes the queue's writer lock, in one commit with a check that the checkpoint is still the one
   * read (and the lock the one seen, when it was looked at): a writer that started meanwhile, or a
   * later one, makes our commits fail their check.
   */
  async #acquire(refusal?: string): Promise<void> {
    const q = this.#queue;
    const op = this.#kv.atomic()
      .check({ key: queueKey(q, "checkpoint"), versionstamp: this.#readVersionstamp });
    if (this.#seenLock !== undefined) op.check({ key: queueKey(q, "writer"), versionstamp: this.#seenLock });
    if (this.#seenAlive !== undefined) op.check({ key: queueKey(q, "alive"), versionstamp: this.#seenAlive });
    op.set(queueKey(q, "writer"), {
      run: this.#issued.run.id,
      at: Date.now(),
      lockFile: this.#lockFile,
      ...(this.#lockFileId === undefined ? {} : { lockFileId: this.#lockFileId }),
    });
    // Until it stores a record, the checkpoint names this run from the moment it takes the queue: a
    // run stopped before its first commit can then be resumed too, rather than the one before it.
    const unstored = this.#issued.run.recordsStored === 0;
    if (unstored) op.set(queueKey(q, "checkpoint"), { ...this.#issued, updatedAt: Date.now() });
    const res = await retryWhileBusy(() => op.commit(), BUSY_BUDGET_MS);
    if (!res.ok) throw new ConcurrentWriterError(q, refusal, refusal !== undefined);
    this.#lock = res.versionstamp;
    if (unstored) this.#placed = res.versionstamp;
    this.#lastWrite = Date.now();
  }

  #open(): Building {
    return { op: this.#kv.atomic(), group: [], seqs: [], bytes: 0, days: new Set(), keys: [] };
  }

  /** Enqueues message `m` as `seq` into `b`; its parsed records are not kept. */
  #append(b: Building, m: PackedMessage, seq: number): void {
    b.op.enqueue(envelope(this.#queue, seq, m), { keysIfUndelivered: [queueKey(this.#queue, "dead", seq)] });
    b.group.push(m.records.length > 0 ? { ...m, records: [] } : m);
    b.seqs.push(seq);
    b.bytes += m.size;
    for (const d of m.days.keys()) b.days.add(d);
    for (const k of m.keys) b.keys.push(k);
  }

  /** Adds the checkpoint and counters to `b`, on top of the last commit issued, and sends it. */
  #issue(b: Building, exact: boolean): Inflight {
    const q = this.#queue;
    const { op, group, seqs } = b;
    op.check({ key: queueKey(q, "writer"), versionstamp: this.#lock! });
    const prev = this.#issued;
    let { cursor } = prev;
    let { seqCursor, seqInstance, instance, instanceStartUs, instanceMaxUs, firstInstance, maxUs } = prev.run;
    let records = 0;
    let last = cursor;
    // The newest time_us of this commit's records (its last one's may be an import's, years old).
    let commitMaxUs = -1;
    const days = new Map<string, number>();
    const collections = new Set<string>();
    for (const m of group) {
      records += m.count;
      last = m.cursor;
      for (const [d, n] of m.days) days.set(d, (days.get(d) ?? 0) + n);
      for (const c of m.collections) collections.add(c);
      cursor = m.cursor;
      if (m.maxUs > (maxUs ?? -1)) maxUs = m.maxUs;
      // (A time of the instance the records came from: another's run ahead or behind.)
      if (m.hostMaxUs !== undefined) {
        instanceMaxUs = m.host !== undefined && m.host !== instance
          ? m.hostMaxUs
          : Math.max(instanceMaxUs ?? -1, m.hostMaxUs);
      }
      if (m.maxUs > commitMaxUs) commitMaxUs = m.maxUs;
      // The checkpoint names the host of the last stored record, so a resume asks the right one.
      if (m.host !== undefined) {
        instance = m.host;
        instanceStartUs = m.hostStartUs;
      }
      if (firstInstance === undefined && prev.run.recordsStored === 0) firstInstance = m.host;
      if (m.seq !== undefined) {
        seqCursor = m.seq;
        seqInstance = m.seqHost;
      } else if (m.host !== undefined) {
        // Records of a host without seqs (a legacy one) came after: the seq of a v2 host is no
        // longer where the run is, and a resume there by it would store what came since again.
        seqCursor = undefined;
        seqInstance = undefined;
      }
    }
    op.sum(queueKey(q, "count", "messages"), BigInt(group.length));
    op.sum(queueKey(q, "count", "records"), BigInt(records));
    for (const [d, n] of days) op.sum(queueKey(q, "day", d), BigInt(n));
    const tail = group.at(-1)?.tail;
    // (Once this run stores records, the run before it is no longer what the queue is compared with.)
    const { priorRun: _prior, ...kept } = prev;
    const checkpoint: Checkpoint = {
      ...kept,
      // Only the keys of records at the checkpoint's own cursor (a batch split by KV's limits
      // leaves its first part without them: a resume there keeps every record at that time out).
      tail: tail?.us === cursor ? tail : undefined,
      seq: seqs.at(-1)!,
      cursor,
      recordsStored: prev.recordsStored + records,
      updatedAt: Date.now(),
      run: {
        ...prev.run,
        recordsStored: prev.run.recordsStored + records,
        seqCursor,
        seqInstance,
        instance,
        instanceStartUs,
        instanceMaxUs,
        ...(firstInstance === undefined ? {} : { firstInstance }),
        ...(maxUs === undefined ? {} : { maxUs }),
        ...(prev.run.tailFrom === undefined && this.tailFrom !== undefined
          ? { tailFrom: this.tailFrom }
          : {}),
      },
    };
    op.set(queueKey(q, "checkpoint"), checkpoint);
    this.#keepKeys(op, b.keys, checkpoint, Math.max(commitMaxUs, cursor));
    this.#issued = checkpoint;
    this.#lastWrite = checkpoint.updatedAt;
    const promise = op.commit();
    const report = { records, messages: group.length, cursor: last, days, collections };
    let vetted!: () => void;
    const issued: Inflight = {
      op,
      promise,
      group,
      seqs,
      checkpoint,
      report,
      exact,
      refused: false,
      vetted: false,
      whenVetted: new Promise((resolve) => vetted = resolve),
      vet: () => {
        if (issued.vetted) return;
        clearTimeout(timer);
        issued.vetted = true;
        // Taken by KV: the texts kept for a repair are not needed any more.
        if (!issued.refused) issued.group = [];
        vetted();
      },
    };
    // Cleared once the commit completes, so that no timer outlives the writer.
    const timer = setTimeout(issued.vet, 0);
    // Observed by #complete; until then a rejection must not count as unhandled.
    promise.catch((err) => issued.refused = tooLarge(err));
    return issued;
  }

  /**
   * Adds the commit's key entry to `op` (`newestUs`: the newest `time_us` of its records), and
   * deletes the oldest entries that are past both {@link KEYS_SPAN_US} and {@link RECENT_KEYS} records
   * (a few a commit). Entries within the span are kept where they are and passed over: after an
   * operator's import (records shown years back, protocol doc §3.2) the entries before it are the
   * newest by time, and the import's own, past the recent records, go all the same.
   */
  #keepKeys(op: Deno.AtomicOperation, keys: number[], checkpoint: Checkpoint, newestUs: number): void {
    const q = this.#queue;
    const entries = this.#keyEntries;
    if (keys.length > 0) {
      op.set(keysKey(q, checkpoint.seq), {
        v: 1,
        cursor: checkpoint.cursor,
        maxUs: newestUs,
        keys: Int32Array.from(keys),
        run: checkpoint.run.id,
      });
      entries.push({ seq: checkpoint.seq, newestUs, count: keys.length / 2 });
      this.#keyRecords += keys.length / 2;
    }
    // (time_us can go back, after a failover: the newest is the largest.)
    this.#keysNewest = Math.max(this.#keysNewest, newestUs);
    // Records in the entries after the one looked at.
    let after = this.#keyRecords;
    for (let i = 0, deleted = 0; i < entries.length - 1 && deleted < KEY_DELETES;) {
      const entry = entries[i];
      after -= entry.count;
      if (after < RECENT_KEYS) break;
      if (entry.newestUs >= this.#keysNewest - KEYS_SPAN_US) {
        i++;
        continue;
      }
      op.delete(keysKey(q, entry.seq));
      this.#keyRecords -= entry.count;
      entries.splice(i, 1);
      deleted++;
    }
  }

  /** Waits for the oldest commit in flight and reports it; repairs a size refusal. */
  async #complete(head: Inflight, later: Inflight[]): Promise<void> {
    let res: Deno.KvCommitResult | Deno.KvCommitError;
    try {
      res = await head.promise;
    } catch (err) {
      head.vet();
      if (isBusy(err)) return await this.#recommit(head, later);
      // The size bound was beaten (hostile structures serialize larger than their JSON), and KV
      // refused the commit: nothing of it was written. The loop issues nothing after a commit until
      // KV has taken it, so nothing later is in flight and every earlier commit has landed. Its
      // records are measured exactly, split or gzipped, and committed in its place, each commit
      // with a true checkpoint: a crash midway leaves a queue that a resume continues without a
      // gap.
      // (Deno KV checks a commit's limits before it writes anything, so a refusal cannot come later
      // than that. If one ever did, with commits after it or its texts let go, the sync stops with
      // KV's error rather than store the records out of place.)
      if (head.exact || later.length > 0 || head.group.length === 0 || !tooLarge(err)) {
        throw await this.#stopShort([head, ...later.splice(0)], 0, new Set([head]), undefined, err as Error);
      }
      const parts = head.group.flatMap((m) => fitExactly(this.#queue, restore(m)));
      // The repair takes the refused commit's seqs and, if it needs more, the next ones: the
      // messages of the commit being built, which took those, are numbered again after it.
      const pending = this.#building;
      this.#building = this.#open();
      let seq = head.seqs[0];
      this.#seq = seq - 1 + parts.length;
      for (const m of pending.group) this.#append(this.#building, restore(m), ++this.#seq);
      this.#issued = this.#durable;
      let b = this.#open();
      for (const m of parts) {
        if (b.group.length > 0 && !fits(b, [m])) {
          await this.#complete(this.#issue(b, true), []);
          b = this.#open();
        }
        this.#append(b, m, seq++);
      }
      await this.#complete(this.#issue(b, true), []);
      return;
    }
    head.vet();
    if (!res.ok) throw new ConcurrentWriterError(this.#queue);
    // Commits complete in the order they were issued, and each builds on the one issued before it:
    // the last to land is the newest state.
    this.#durable = head.checkpoint;
    this.#onCommit(head.report, head.checkpoint);
  }

  /**
   * SQLite could not give KV its write lock for `head`: another connection wrote between the
   * commit's checks and its writes (a consumer acknowledging messages, say), and nothing of it was
   * written. The commits issued after it may have landed meanwhile. They are awaited; then, in the
   * order they were issued, `head` and each of them that failed the same way are committed again,
   * none moving the checkpoint back from a later one that landed. All are reported once landed, in
   * their order. A commit refused for its size can only be the last issued: it is repaired after.
   */
  async #recommit(head: Inflight, later: Inflight[]): Promise<void> {
    const all = [head, ...later.splice(0)];
    const again = new Set([head]);
    let refused: Inflight | undefined;
    let newest: Checkpoint | undefined;
    for (const f of all.slice(1)) {
      try {
        const res = await f.promise;
        f.vet();
        if (!res.ok) throw new ConcurrentWriterError(this.#queue);
        newest = f.checkpoint;
      } catch (err) {
        f.vet();
        if (err instanceof ConcurrentWriterError) throw err;
        if (isBusy(err)) again.add(f);
        else if (f === all.at(-1) && f.refused) refused = f;
        else throw err;
      }
    }
    for (const [i, f] of all.entries()) {
      if (!again.has(f)) continue;
      if (newest !== undefined && newest.seq > f.checkpoint.seq) {
        f.op.set(queueKey(this.#queue, "checkpoint"), newest);
      } else newest = f.checkpoint;
      let res: Deno.KvCommitResult | Deno.KvCommitError;
      try {
        res = await retryWhileBusy(() => f.op.commit(), BUSY_BUDGET_MS);
      } catch (err) {
        throw await this.#stopShort(all, i, again, refused, err as Error);
      }
      if (!res.ok) throw new ConcurrentWriterError(this.#queue);
    }
    for (const f of all) {
      if (f === refused) continue;
      this.#durable = f.checkpoint;
      this.#onCommit(f.report, f.checkpoint);
    }
    if (refused) await this.#complete(refused, []);
  }

  /**
   * `all[failed]`, of the commits issued in the order of `all`, failed for good (the database stayed
   * busy, or KV failed it otherwise): the sync stops. The commits before it are stored, and so are
   * those after it that landed, the first time, but for those in `again` (which failed too and were
   * to be committed again) and `refused`. Those stored are reported, so that the statistics say what
   * is stored. The checkpoints of the ones after it count the records of those that failed, which
   * are not stored: the checkpoint is set back to the last record before them, so that a resume
   * takes them up again and recognises the later ones by their content keys (kept with them).
   * Returns the error to throw, which says so when that could not be written either.
   */
  async #stopShort(
    all: Inflight[],
    failed: number,
    again: Set<Inflight>,
    refused: Inflight | undefined,
    err: Error,
  ): Promise<Error> {
    // (Those before it landed, the first time or again.)
    const landed = await Promise.all(
      all.map((f, i) =>
        i < failed ||
        (i > failed && !again.has(f) && f !== refused && f.promise.then((res) => res.ok, () => false))
      ),
    );
    for (const f of all) f.vet();
    const stored = all.filter((_, i) => landed[i]);
    const after = stored.filter((f) => all.indexOf(f) > failed);
    const before = failed === 0 ? this.#durable : all[failed - 1].checkpoint;
    let message = err.message;
    if (after.length > 0) {
      const records = after.reduce((n, f) => n + f.report.records, 0);
      // With no record of this run before them, a resume takes the run up at its start.
      const startUs = before.run.recordsStored === 0 ? before.run.selection.startUs : undefined;
      const { priorRun: _prior, ...kept } = before;
      const checkpoint: Checkpoint = {
        ...kept,
        ...(typeof startUs === "number" ? { cursor: startUs - 1, tail: undefined } : {}),
        seq: after.at(-1)!.checkpoint.seq,
        recordsStored: before.recordsStored + records,
        updatedAt: Date.now(),
        run: { ...before.run, recordsStored: before.run.recordsStored + records },
      };
      const op = this.#kv.atomic()
        .check({ key: queueKey(this.#queue, "writer"), versionstamp: this.#lock! })
        .set(queueKey(this.#queue, "checkpoint"), checkpoint);
      const res = await retryWhileBusy(() => op.commit(), SET_BACK_BUDGET_MS).catch(() => undefined);
      this.#durable = res?.ok ? checkpoint : after.at(-1)!.checkpoint;
      if (!res?.ok) {
        const missing = all.filter((_, i) => i >= failed && !landed[i]);
        const lost = missing.reduce((n, f) => n + f.report.records, 0);
        const from = typeof startUs === "number"
          ? `from the run's start, ${isoFromUs(startUs)},`
          : `after ${isoFromUs(before.cursor)}`;
        message += `; and the queue's checkpoint, which counts the ${lost} record${
          lost === 1 ? "" : "s"
        } of the commits that failed, could not be set back: a --resume would leave out those ${from} up to ${
          isoFromUs(missing.at(-1)!.report.cursor)
        }, so sync that span again`;
      }
    }
    if (after.length === 0 && stored.length > 0) this.#durable = stored.at(-1)!.checkpoint;
    for (const f of stored) this.#onCommit(f.report, f.checkpoint);
    return message === err.message ? err : new Error(message, { cause: err });
  }
}

/** Whether KV refused a commit for its size (a message over 64 KiB, or the commit over 800 KiB). */
function tooLarge(err: unknown): boolean {
  return /too large/i.test(String((err as Error)?.message));
}

/** Whether `messages` fit in commit `b` too, within KV's per-commit limits. */
function fits(b: Building, messages: PackedMessage[]): boolean {
  let size = b.bytes;
  let keys = b.keys.length;
  let newDays: Set<string> | undefined;
  for (const m of messages) {
    size += m.size;
    keys += m.keys.length;
    for (const d of m.days.keys()) if (!b.days.has(d)) (newDays ??= new Set()).add(d);
  }
  const mutations = b.group.length + messages.length + FIXED_MUTATIONS + b.days.size + (newDays?.size ?? 0);
  // The key entry: four bytes a number.
  return mutations <= KV_MUTATION_LIMIT && size + 4 * keys <= COMMIT_BUDGET && keys <= MAX_KEY_NUMBERS;
}

/** A message with its records made again from their texts (the JSON they were parsed from, or v2 frames). */
function restore(m: PackedMessage): PackedMessage {
  if (m.records.length === m.texts.length) return m;
  return { ...m, records: m.texts.map(m.fromText ?? ((t) => JSON.parse(t))) };
}

/** The queue message that carries `m` as `seq`. */
function envelope(queue: string, seq: number, m: PackedMessage): QueueMessage {
  const message: QueueMessage = { v: 1, queue, seq, cursor: m.cursor, records: m.records };
  if (m.compressed) message.compressed = m.compressed;
  return message;
}

/** A message's exact serialized size, as Deno KV will see it (V8's serializer, plus a margin). */
function exactSize(queue: string, m: PackedMessage): number {
  return serialize(envelope(queue, Number.MAX_SAFE_INTEGER, m)).length + 64;
}

/** Splits a message until each part fits KV's value limit by exact measure; a lone record is gzipped. */
function fitExactly(queue: string, m: PackedMessage): PackedMessage[] {
  const size = exactSize(queue, m);
  if (size <= KV_VALUE_LIMIT - 256) return [{ ...m, size }];
  if (m.records.length > 1) {
    const half = m.records.length >> 1;
    return [
      ...fitExactly(queue, packRecords(m, 0, half)),
      ...fitExactly(queue, packRecords(m, half, m.records.length)),
    ];
  }
  const event = m.records[0];
  // The text as received, as the batcher gzips it: re-encoding the parsed event could change it (a
  // number written `0.50`, an integer beyond 2^53). A v2 frame's event was written out, as there.
  const gz = compressEvent(m.fromText ? JSON.stringify(event) : m.texts[0]);
  const packed = { ...packRecords(m, 0, 0), keys: m.keys, compressed: [gz], count: 1, cursor: event.time_us };
  // A v2 host's seq, which the checkpoint keeps for a resume there.
  if (typeof event.cursor === "number") {
    packed.seq = event.cursor;
    packed.seqHost = m.seqHost;
  }
  packed.days = new Map([[utcDate(event.time_us), 1]]);
  if (event.kind === "commit") packed.collections = new Set([event.commit.collection]);
  const again = exactSize(queue, packed);
  if (again > KV_VALUE_LIMIT - 256) {
    throw new OversizedEventError(event, gz.length, KV_VALUE_LIMIT - 256);
  }
  return [{ ...packed, size: again }];
}

/**
 * A message holding the records `from` to `to` (excluded) of message `m`, with their texts, keys and
 * counts.
 */
function packRecords(m: PackedMessage, from: number, to: number): PackedMessage {
  const records = m.records.slice(from, to);
  const texts = m.texts.slice(from, to);
  // Keys are noted for every record of a sync's messages; a message without them stays without.
  const keys = m.keys.length === 2 * m.records.length ? m.keys.slice(2 * from, 2 * to) : [];
  const days = new Map<string, number>();
  const collections = new Set<string>();
  let seq: number | undefined;
  let maxUs = -1;
  for (const r of records) {
    if (r.time_us > maxUs) maxUs = r.time_us;
    const d = utcDate(r.time_us);
    days.set(d, (days.get(d) ?? 0) + 1);
    if (r.kind === "commit") collections.add(r.commit.collection);
    // (Of the last record: one without a seq after one with it, a legacy host's, leaves none.)
    seq = typeof r.cursor === "number" ? r.cursor : undefined;
  }
  return {
    records,
    texts,
    fromText: m.fromText,
    keys,
    size: 0,
    count: records.length,
    cursor: records.at(-1)?.time_us ?? m.cursor,
    maxUs: records.length > 0 ? maxUs : m.maxUs,
    days,
    collections,
    seq,
    seqHost: seq === undefined ? undefined : m.seqHost,
    host: m.host,
    hostStartUs: m.hostStartUs,
    hostMaxUs: m.hostMaxUs,
  };
}
