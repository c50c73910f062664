/**
 * The other end of the queue: {@link consume} hands every message of a jetfill queue to a handler,
 * once, and keeps the queue's counters true; {@link queueStatus}, {@link deadLetters} and
 * {@link requeueDeadLetters} read and repair what it leaves behind.
 *
 * What Deno KV queues do, measured on Deno 2.9.6 with the local SQLite backend
 * (the README's "Consuming the queue" and `deno-runtime.md` §1 have the figures), and what this module does about it:
 *
 * - **At-least-once.** A message can be delivered again: after its handler failed, after an
 *   acknowledgement was lost, or because it was "requeued" (below). Every jetfill message carries a
 *   `seq` unique in its queue, so consume() records each handled `seq` under
 *   `["jetfill", queue, "handled", seq]` in the same atomic commit that adds to the `messagesHandled`
 *   and `recordsHandled` counters, and skips a message whose `seq` is already recorded (a duplicate).
 *   The commit checks that the record is still absent, so two consumers racing on one message never
 *   count it twice. Records expire after {@link DEDUPE_WINDOW_MS}.
 * - **The 5 s rule.** When KV hands a message over, it marks it as running with a deadline of the
 *   time the message became ready (its enqueue time, plus any delay) + 5 s, and never extends it.
 *   Whenever any process opens the database (even just to read it) and every ~60 s in a process
 *   that has it open, running messages past their deadline are put back in the queue as if they had
 *   failed: each such requeue uses up one of the message's retries and makes a copy that is
 *   delivered again. A fresh message thus has 5 s minus its pickup latency; a message that waited in
 *   the queue (any backlog) is past its deadline the moment it is dequeued, and exposed to a requeue
 *   for as long as it is held. And `listenQueue` dequeues every ready message at once, however slow
 *   the handler. So consume() keeps what it holds small and short-lived: it holds only the messages
 *   it expects to finish within {@link HOLD_TARGET_MS} of their delivery (from the measured handling
 *   time), and puts the others back, highest `seq` first, each with a delay that brings it back about
 *   when a handler is free for it (a new enqueue of the same message: it uses up no retry, and comes
 *   back with a fresh deadline). Each handler runs at most `min(handlerTimeout, ACK_DEADLINE_MS
 *   after its delivery)`; one past its time is reported as a `timeout`, its `signal` is aborted and
 *   its message failed, for KV to redeliver. Copies that a requeue still makes are skipped by `seq`.
 * - **No cross-process wake-up.** A listener only sees another process's enqueues on a 60 s poll, but
 *   it takes everything that is ready when it opens the database. With a path, consume() therefore
 *   runs in sessions: open, listen, handle what arrives, and once idle and at least `pollInterval` old,
 *   close and open again. A session is only closed when nothing is in flight: acknowledgements made
 *   after `close()` are lost (measured), and such messages come back only after their deadline.
 * - **Handlers run `concurrency` at a time** (default 1), lowest `seq` first: messages enqueued in
 *   one commit are dequeued in random order, so consume() waits up to `reorderWindow` for a missing
 *   `seq` before it goes on without it. A missing `seq` that consume() put back itself is waited for
 *   until it is due back: the held messages that cannot wait that long are put back too, due after
 *   it, and every put-back is due in `seq` order, so a backlog put back comes out in order.
 * - **Failures and dead letters.** A handler that throws leaves its message to KV, which redelivers it
 *   on its backoff schedule; when the retries run out KV writes the message to the keys given at
 *   enqueue time, `["jetfill", queue, "dead", seq]` for jetfill's writer. Dead letters are not counted
 *   as handled; list them with {@link deadLetters} and retry them with {@link requeueDeadLetters}.
 * - **Messages that are not this queue's** (another queue name in the same database, or not a jetfill
 *   message at all) are put back with a delay and reported as `foreign`: a database has one KV queue,
 *   and consume() never drops a message it does not own.
 *
 * @module
 */
import type { JetstreamEvent } from "../jetstream/events.ts";
import {
  counterValue,
  defaultKvPath,
  localDatabasePath,
  openKvAt,
  queueKey,
  readCheckpoint,
  retryWhileBusy,
} from "./kv_queue.ts";
import { decodeQueueMessage, isQueueMessage, type QueueMessage } from "./message.ts";
import { isoFromUs } from "../time.ts";
import { pathExists } from "../fs.ts";
import { UsageError } from "../errors.ts";
import { isDenoKv, optionsObjectError, QUEUE_NAME, QUEUE_NAME_RULE, show } from "../options.ts";
import { z } from "zod";

/**
 * Deno KV's redelivery deadline: a message not acknowledged this long after it became ready (was
 * enqueued, or its delay ran out) is requeued by the next cleanup (any opening of the database).
 */
export const KV_REDELIVERY_DEADLINE_MS = 5_000;
/** consume() answers (acknowledges, fails or puts back) every delivery within this time of it. */
export const ACK_DEADLINE_MS = 4_000;
/** How long the record of a handled `seq` is kept for deduplication: 7 days. */
export const DEDUPE_WINDOW_MS = 7 * 24 * 3600_000;

// After the last handler settles, Deno still has to send the acknowledgement; closing the database
// before that loses it. A few milliseconds are enough on an idle backend; this leaves room.
const ACK_SETTLE_MS = 40;
// After a stop, KV goes on delivering a backlog, and each delivery is put back at once: a quiet
// spell of ACK_SETTLE_MS may never come. From this long after the stop, consume() returns at the
// first moment nothing is unsettled.
const STOP_GRACE_MS = 250;
// Deliveries received when no consumer is attached to a shared Kv come back after this delay.
const ORPHAN_DELAY_MS = 1_000;
// Messages of another queue come back after this delay, for their own consumer to take.
const FOREIGN_DELAY_MS = 2_000;
// Put-backs per atomic commit: 12 messages of 64 KiB stay under KV's 800 KiB per commit.
const PUT_BACKS_PER_COMMIT = 12;
// A handler is not started with less time than this before the deadline: it is put back instead.
const MIN_RUN_MS = 100;
// The handling time assumed before the first message is measured.
const INITIAL_SERVICE_MS = 10;
/**
 * consume() holds a delivered message only when it expects to finish it within this time of its
 * delivery; it puts the others back. KV's deadline is 5 s after a message became ready, which for a
 * fresh message picked up within a 1 s poll leaves about 4 s; this keeps a margin for slow turns of
 * the event loop and for handlers slower than their average.
 */
export const HOLD_TARGET_MS = 3_000;
// How long to keep waiting for a message put back here when it is the next seq.
const REORDER_GRACE_MS = 500;
const MIN_PUT_BACK_DELAY_MS = 100;
const MAX_PUT_BACK_DELAY_MS = 60_000;
// After a handler failure, KV redelivers after 100 ms and then 1 s (its default schedule).
const RETRY_EXPECTED_MS = 1_300;
// A session that is settled but expects messages back stays open at most this many poll intervals.
const MAX_SESSION_POLLS = 10;
// The main loop's longest sleep: how often deadlines and untilEmpty are looked at when nothing happens.
const TICK_MS = 100;
// untilEmpty looks at the counters only after a session had this long to receive what was ready.
const MIN_SESSION_FOR_EMPTY_MS = 250;

/** What a handler gets with the events of one message. */
export interface ConsumeContext {
  /** The queue's name. */
  queue: string;
  /** The message's `seq`: unique in its queue, the key of deduplication. */
  seq: number;
  /** `time_us` of the message's last event. */
  cursor: number;
  /**
   * Aborted when the handler runs out of time (see {@link ConsumeOptions.handlerTimeout}); the
   * message is then redelivered, so a handler that stops early loses nothing.
   */
  signal: AbortSignal;
  /** Milliseconds left before the handler is timed out, when it starts. */
  timeLeft: number;
}

/**
 * Handles the events of one queue message. Resolve when they are safely stored: the message is then
 * acknowledged. Throw (or reject) to have it redelivered later. A handler that throws once
 * consume() is stopping (its `signal` aborted, say by the handler itself when its output is gone)
 * has its message put back instead, like the messages held: it uses up no retry.
 */
export type ConsumeHandler = (events: JetstreamEvent[], context: ConsumeContext) => void | Promise<void>;

/** Why consume() reported a problem; none of them stops it. */
export type ConsumeErrorReason =
  /** The handler threw; KV will redeliver the message. */
  | "handler"
  /** The handler ran out of time; its signal was aborted and the message failed for redelivery. */
  | "timeout"
  /** A message of another queue, or not a jetfill message, was put back for its own consumer. */
  | "foreign"
  /** Recording a handled message, or putting one back, failed; KV will redeliver it. */
  | "storage";

/** A problem reported to {@link ConsumeOptions.onError}. */
export interface ConsumeErrorReport {
  /** What happened. */
  reason: ConsumeErrorReason;
  /** A sentence for people. */
  message: string;
  /** The message's `seq`, when known. */
  seq?: number;
  /** The error thrown, for `handler` and `storage`. */
  error?: unknown;
}

/** Options of {@link consume}. */
export interface ConsumeOptions {
  /** Called once per message with its events, in `seq` order as far as delivery allows. */
  handler: ConsumeHandler;
  /**
   * The database: a path, or an open `Deno.Kv`.
   *
   * With a path, consume() opens it in sessions (see `pollInterval`) and picks up messages that other
   * processes enqueue within about `pollInterval`. With a `Deno.Kv`, consume() starts one
   * `listenQueue` on it that lasts until you close it (do not call `listenQueue` on it yourself);
   * messages enqueued through the same `Deno.Kv` arrive at once, but those of other processes only
   * on KV's 60 s poll. While no consume() runs on that `Deno.Kv`, the messages it receives are put
   * back with a 1 s delay. A path that does not exist is refused with `untilEmpty` (a
   * {@link UsageError}: most likely a mistyped path); without it, consume() creates the database
   * and waits for a sync to fill it.
   *
   * @default {"./jetfill-data/<queueName>.sqlite"}
   */
  kv?: Deno.Kv | string;
  /** The queue's name. @default {"jetstream_sync"} */
  queueName?: string;
  /** Stops consume() when aborted: the running handlers finish, the messages held are put back. */
  signal?: AbortSignal;
  /**
   * Stop once no message of the queue is waiting: the counters show every enqueued message handled
   * or dead-lettered. Should messages be counted as waiting that never arrive (taken by a plain
   * `listenQueue` that keeps no counters), consume() stops after `emptyTimeout` without news.
   * @default {false}
   */
  untilEmpty?: boolean;
  /**
   * The most a handler may run, ms. It also never runs past {@link ACK_DEADLINE_MS} after its
   * message's delivery, whatever this says. A handler past its time has its signal aborted and its
   * message failed, for KV to redeliver; keep handlers well under this.
   * @default {3000}
   */
  handlerTimeout?: number;
  /** Handlers running at once, 1 to 100. @default {1} */
  concurrency?: number;
  /** With a path, how often an idle consumer reopens the database to see new messages, ms. @default {1000} */
  pollInterval?: number;
  /** With `untilEmpty`, stop after this long without a delivery or a change of the counters, ms. @default {10000} */
  emptyTimeout?: number;
  /** How long to wait for a missing lower `seq` before handling a higher one, ms. @default {250} */
  reorderWindow?: number;
  /** Told about every problem; consume() goes on. */
  onError?: (report: ConsumeErrorReport) => void;
}

/** Why consume() stopped. */
export type ConsumeStopReason =
  /** The signal was aborted. */
  | "aborted"
  /** `untilEmpty`: no message of the queue is waiting. */
  | "empty"
  /** `untilEmpty`: the counters show messages waiting, but nothing arrived for `emptyTimeout`. */
  | "idle";

/** What consume() did, when it stops. */
export interface ConsumeResult {
  /** Messages handled (handler resolved, recorded as handled). */
  messages: number;
  /** Events in those messages. */
  records: number;
  /** Deliveries skipped because their `seq` was already handled or being handled. */
  duplicates: number;
  /** Handler failures (thrown, or timed out), each leaving its message for redelivery. */
  failures: number;
  /** Of the failures, those that were timeouts. */
  timeouts: number;
  /** Messages of this queue put back with a delay, to keep within the 5 s deadline or on stop. */
  deferred: number;
  /** Messages of other queues (or not jetfill's) put back for their own consumers. */
  foreign: number;
  /** Times the database was opened (sessions). */
  sessions: number;
  /** Why it stopped. */
  stopReason: ConsumeStopReason;
  /** Seconds from start to stop. */
  elapsed: number;
}

/** One listenQueue delivery waiting for its outcome. */
interface Settle {
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** A message of this queue, held or being handled, with every delivery of it that awaits an answer. */
interface Delivery {
  message: QueueMessage;
  /** Answered: later copies must be judged afresh. */
  done: boolean;
  /** Whether its seq was found handled already; undefined until read. */
  handled?: boolean;
  kv: Deno.Kv;
  deliveredAt: number;
  settles: Settle[];
  /**
   * The first message started in its session: what it waits for in KV is KV's own start-up, so only
   * its handler's time (from `handlerStartedAt`, to `handlerMs`) is taken as a measure.
   */
  firstOfSession?: boolean;
  handlerStartedAt?: number;
  handlerMs?: number;
}

interface PutBack {
  kv: Deno.Kv;
  value: unknown;
  delay: number;
  keysIfUndelivered: Deno.KvKey[];
  settles: Settle[];
}

function because(name: string, expected: string) {
  return {
    error: (iss: { input?: unknown }) =>
      `Cannot consume as '${name}' must be ${expected}: current value is ${show(iss.input)}`,
  };
}

const positiveNumber = (name: string) =>
  z.number(because(name, "a positive number")).refine(
    (n) => Number.isFinite(n) && n > 0,
    because(name, "a positive number"),
  );

/** The shape of consume()'s options, checked before anything is opened. */
const ConsumeOptionsSchema = z.strictObject({
  handler: z.custom<ConsumeHandler>((v) => typeof v === "function", because("handler", "a function")),
  kv: z.union(
    [
      z.string().min(1, because("kv", "a Deno.Kv or a database path")),
      z.custom<Deno.Kv>(isDenoKv),
    ],
    because("kv", "a Deno.Kv or a database path"),
  ).optional(),
  queueName: z.string(because("queueName", "a queue name")).refine(
    (s) => QUEUE_NAME.test(s),
    because("queueName", QUEUE_NAME_RULE),
  ).optional(),
  signal: z.custom<AbortSignal>((v) => v instanceof AbortSignal, because("signal", "an AbortSignal"))
    .optional(),
  untilEmpty: z.boolean(because("untilEmpty", "a boolean")).optional(),
  handlerTimeout: positiveNumber("handlerTimeout").optional(),
  concurrency: z.number(because("concurrency", "an integer from 1 to 100")).refine(
    (n) => Number.isInteger(n) && n >= 1 && n <= 100,
    because("concurrency", "an integer from 1 to 100"),
  ).optional(),
  pollInterval: positiveNumber("pollInterval").optional(),
  emptyTimeout: positiveNumber("emptyTimeout").optional(),
  reorderWindow: z.number(because("reorderWindow", "a number of ms, 0 or more")).refine(
    (n) => Number.isFinite(n) && n >= 0,
    because("reorderWindow", "a number of ms, 0 or more"),
  ).optional(),
  onError: z.custom<(r: ConsumeErrorReport) => void>(
    (v) => typeof v === "function",
    because("onError", "a function"),
  ).optional(),
}, {
  error: optionsObjectError(
    "consume",
    "consume()",
    (): string[] => Object.keys(ConsumeOptionsSchema.shape),
    { timeout: "handlerTimeout", queue: "queueName" },
  ),
});

// Databases consume() closed: a delivery that still arrives from one is left to KV.
const closedKvs = new WeakSet<Deno.Kv>();
const registry = new WeakMap<Deno.Kv, { consumer: Consumer | undefined }>();

/** The delivery entry point of a shared Kv: routes to the attached consumer, or puts back. */
function attach(kv: Deno.Kv, consumer: Consumer): void {
  let entry = registry.get(kv);
  if (!entry) {
    const created: { consumer: Consumer | undefined } = { consumer: undefined };
    entry = created;
    registry.set(kv, created);
    kv.listenQueue((raw) =>
      created.consumer ? created.consumer.deliver(kv, raw) : putBackAlone(kv, raw, ORPHAN_DELAY_MS)
    ).catch((err) => {
      // Ends with the Kv. A failure to listen leaves the messages in the queue; a consumer attached
      // then is told, as it would otherwise wait for deliveries that never come.
      created.consumer?.failListening(err);
    });
  }
  if (entry.consumer) {
    throw new TypeError("Cannot consume as another consume() is already running on this Deno.Kv");
  }
  entry.consumer = consumer;
}

function detach(kv: Deno.Kv, consumer: Consumer): void {
  const entry = registry.get(kv);
  if (entry?.consumer === consumer) entry.consumer = undefined;
}

/** The keys a message should be written to when KV gives up on it: jetfill's dead-letter key. */
function deadKeysOf(value: unknown): Deno.KvKey[] {
  return isQueueMessage(value) ? [queueKey(value.queue, "dead", value.seq)] : [];
}

async function putBackAlone(kv: Deno.Kv, value: unknown, delay: number): Promise<void> {
  await kv.enqueue(value, { delay, keysIfUndelivered: deadKeysOf(value) });
}

class Consumer {
  readonly #o: Required<Omit<ConsumeOptions, "kv" | "signal" | "onError">>;
  readonly #onError: ((r: ConsumeErrorReport) => void) | undefined;
  readonly #queue: string;
  // Held deliveries, sorted by seq; and by seq, the held and running ones not yet answered, for
  // coalescing the copies KV may deliver meanwhile.
  readonly #held: Delivery[] = [];
  readonly #bySeq = new Map<number, Delivery>();
  // Deliveries being handled, with when they started; by delivery, not by seq, because a fresh
  // copy of a seq can start while the previous one is still finishing.
  readonly #running = new Map<Delivery, number>();
  readonly #putBacks: PutBack[] = [];
  // When the messages this consumer put back are due to come back, by seq (for ordering).
  readonly #due = new Map<number, number>();
  #flushing = false;
  #unsettled = 0;
  // Of #unsettled, the deliveries of other queues' messages.
  #foreignUnsettled = 0;
  #lastSettleAt = 0;
  #lastOwnSettleAt = 0;
  #lastDeliveryAt = performance.now();
  #lastStartedSeq: number | undefined;
  #serviceMs = INITIAL_SERVICE_MS;
  // The sessions (by their Deno.Kv) in which a message was started.
  readonly #sessionsStarted = new WeakSet<Deno.Kv>();
  #handlerMs = INITIAL_SERVICE_MS;
  // The end of the last slot given to a message put back (performance.now() time).
  #reservedUntil = 0;
  // Until when messages of this queue are expected back (put back, or failed and retried by KV):
  // a session stays open till then, as its own backend delivers them at once.
  #dueUntil = 0;
  #wakeAt = Number.POSITIVE_INFINITY;
  #wake: (() => void) | undefined;
  // untilEmpty: when the counters were last read, what they said, and when that last changed.
  lastCheck = 0;
  lastWaiting = -1;
  /** When stop() was first called (performance.now() time). */
  stoppedAt = 0;
  lastChange = performance.now();
  stopReason: ConsumeStopReason | undefined;
  readonly result: Omit<ConsumeResult, "stopReason" | "elapsed"> = {
    messages: 0,
    records: 0,
    duplicates: 0,
    failures: 0,
    timeouts: 0,
    deferred: 0,
    foreign: 0,
    sessions: 0,
  };

  constructor(options: ConsumeOptions, queue: string) {
    this.#queue = queue;
    this.#onError = options.onError;
    this.#o = {
      handler: options.handler,
      queueName: queue,
      untilEmpty: options.untilEmpty ?? false,
      handlerTimeout: options.handlerTimeout ?? 3_000,
      concurrency: options.concurrency ?? 1,
      pollInterval: options.pollInterval ?? 1_000,
      emptyTimeout: options.emptyTimeout ?? 10_000,
      reorderWindow: options.reorderWindow ?? 250,
    };
  }

  get options(): Readonly<Required<Omit<ConsumeOptions, "kv" | "signal" | "onError">>> {
    return this.#o;
  }

  get lastDeliveryAt(): number {
    return this.#lastDeliveryAt;
  }

  get dueUntil(): number {
    return this.#dueUntil;
  }

  notify(): void {
    const w = this.#wake;
    this.#wake = undefined;
    w?.();
  }

  /** Sleeps until something happens, or until the next thing pump() waits for (at most TICK_MS). */
  async sleep(): Promise<void> {
    const ms = Math.max(1, Math.min(TICK_MS, this.#wakeAt - performance.now()));
    let timer: ReturnType<typeof setTimeout> | undefined;
    await new Promise<void>((resolve) => {
      this.#wake = resolve;
      timer = setTimeout(resolve, ms);
    });
    clearTimeout(timer);
    this.#wake = undefined;
  }

  stop(reason: ConsumeStopReason): void {
    if (!this.stopReason) this.stoppedAt = performance.now();
    this.stopReason ??= reason;
    this.notify();
  }

  /** Why KV stopped delivering (its listener failed), which consume() then throws. */
  listenFailure: unknown;

  /** KV's listener failed (a message it could not read): consume() stops, and throws once done. */
  failListening(err: unknown): void {
    this.listenFailure ??= err;
    this.stop("aborted");
  }

  /** Stopped, and done with everything started: settled, or quiet after STOP_GRACE_MS. */
  finished(now: number): boolean {
    return this.stopReason !== undefined &&
      (this.settled(now) || (this.quiet() && now - this.stoppedAt >= STOP_GRACE_MS));
  }

  /** Nothing held, running, being put back or waiting for an answer. */
  quiet(): boolean {
    return this.#unsettled === 0 && this.#held.length === 0 && this.#running.size === 0 &&
      this.#putBacks.length === 0 && !this.#flushing;
  }

  /** Quiet long enough for Deno to have sent the last acknowledgement. */
  settled(now: number): boolean {
    return this.quiet() && now - this.#lastSettleAt >= ACK_SETTLE_MS;
  }

  /**
   * The same for this queue's own messages, whatever other queues' messages are doing: another
   * queue's backlog, put back every FOREIGN_DELAY_MS for its own consumer, may never let the
   * session be quiet, and must not keep `untilEmpty` from seeing this queue empty.
   */
  ownSettled(now: number): boolean {
    return this.#unsettled === this.#foreignUnsettled && this.#held.length === 0 &&
      this.#running.size === 0 &&
      now - this.#lastOwnSettleAt >= ACK_SETTLE_MS;
  }

  /** The listenQueue handler: resolves to acknowledge, rejects to have KV redeliver. */
  deliver(kv: Deno.Kv, raw: unknown): Promise<void> {
    // Deno can hand over a message it dequeued just as the session closed; its acknowledgement
    // cannot be sent any more, so it is left alone: KV delivers it again after its deadline.
    if (closedKvs.has(kv)) return Promise.resolve();
    const foreign = !isQueueMessage(raw) || raw.queue !== this.#queue;
    this.#unsettled++;
    if (foreign) this.#foreignUnsettled++;
    const now = performance.now();
    this.#lastDeliveryAt = now;
    return new Promise<void>((resolve, reject) => {
      const settle: Settle = {
        resolve: () => {
          this.#settled(foreign);
          resolve();
        },
        reject: (err) => {
          this.#settled(foreign);
          // Deno prints what a listenQueue handler rejects with ("Exception in queue handler …"),
          // with its stack for an Error: one line says it all (onError has the error itself).
          reject(`jetfill consume: a message was left for KV to redeliver (${errorText(err)})`);
        },
      };
      if (foreign) {
        this.result.foreign++;
        this.#report({
          reason: "foreign",
          message: isQueueMessage(raw)
            ? `message ${raw.seq} of queue '${raw.queue}' is not this queue's ('${this.#queue}'); put back for its consumer`
            : "a message that is not a jetfill queue message was put back for its consumer",
          seq: isQueueMessage(raw) ? raw.seq : undefined,
        });
        this.#putBack({
          kv,
          value: raw,
          delay: FOREIGN_DELAY_MS,
          keysIfUndelivered: deadKeysOf(raw),
          settles: [settle],
        });
        return;
      }
      const seq = raw.seq;
      this.#due.delete(seq);
      const known = this.#bySeq.get(seq);
      if (known && !known.done) {
        // A second copy of a message already here (requeued by KV): it shares the first one's fate.
        this.result.duplicates++;
        known.settles.push(settle);
        return;
      }
      const delivery: Delivery = { message: raw, done: false, kv, deliveredAt: now, settles: [settle] };
      if (this.stopReason) {
        this.#defer(delivery, ORPHAN_DELAY_MS);
        return;
      }
      this.#insert(delivery);
      this.pump();
    });
  }

  #settled(foreign: boolean): void {
    this.#unsettled--;
    this.#lastSettleAt = performance.now();
    if (foreign) this.#foreignUnsettled--;
    else this.#lastOwnSettleAt = this.#lastSettleAt;
    this.notify();
  }

  #report(r: ConsumeErrorReport): void {
    try {
      this.#onError?.(r);
    } catch {
      // A reporting callback must not break the consumer.
    }
  }

  #insert(d: Delivery): void {
    const seq = d.message.seq;
    let lo = 0;
    let hi = this.#held.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.#held[mid].message.seq < seq) lo = mid + 1;
      else hi = mid;
    }
    this.#held.splice(lo, 0, d);
    this.#bySeq.set(seq, d);
  }

  /** The delivery is answered (or about to be): a later copy of its seq is judged afresh. */
  #finish(d: Delivery): void {
    d.done = true;
    if (this.#bySeq.get(d.message.seq) === d) this.#bySeq.delete(d.message.seq);
  }

  /** Handling time to plan with: the recent average, or longer while a handler is slow right now. */
  #planMs(now: number): number {
    let ms = this.#serviceMs;
    for (const [d, startedAt] of this.#running) {
      const since = d.firstOfSession ? d.handlerStartedAt : startedAt;
      if (since !== undefined) ms = Math.max(ms, now - since);
    }
    return Math.max(1, ms);
  }

  /** Starts what can start, and puts back what would be held too long. */
  pump(): void {
    const now = performance.now();
    this.#wakeAt = Number.POSITIVE_INFINITY;
    if (this.stopReason) {
      while (this.#held.length > 0) this.#defer(this.#held.pop()!, ORPHAN_DELAY_MS);
      return;
    }
    const c = this.#o.concurrency;
    const plan = this.#planMs(now);
    // Put back, from the highest seq down, what is not expected to finish within HOLD_TARGET_MS
    // of its delivery (expected wait, its own handling, and half of that again as a margin).
    const busy = this.#running.size >= c ? 1 : 0;
    // A message put back here and not back yet holds up every higher seq: those that could not wait
    // for it go back too, due after it.
    const pending = this.#pendingBelow(now);
    // The lowest held message to put back, and with it every higher seq held: those would wait for it.
    let cut = this.#held.length;
    for (let k = 0; k < this.#held.length; k++) {
      const d = this.#held[k];
      const waitsFor = pending !== undefined && d.message.seq > pending.seq
        ? pending.due + REORDER_GRACE_MS > d.deliveredAt + HOLD_TARGET_MS / 2
        : false;
      if (k === 0 && !busy && !waitsFor) continue; // it starts now; #handle decides with the exact time left
      const wait = (Math.floor(k / c) + busy) * plan;
      if (waitsFor || now + wait + 1.5 * plan > d.deliveredAt + HOLD_TARGET_MS) {
        cut = k;
        break;
      }
    }
    // Highest seq first, as the slots below are given from the end.
    const evicted = this.#held.splice(cut).reverse();
    // Each one put back gets its own slot, lowest seq first, after what stays and what was put
    // back before: they come back one by one about when a handler is free for them, instead of
    // all at once (to be put back again). KV hands over the messages of a commit in random order,
    // so a slot is also kept between those of the lower and the higher seqs put back before: a
    // message must not come back after higher seqs, nor before lower ones.
    const freeAt = now + (Math.ceil(this.#held.length / c) + busy) * plan;
    for (let i = evicted.length - 1; i >= 0; i--) {
      const d = evicted[i];
      const base = Math.max(freeAt, this.#reservedUntil);
      const { below, above } = this.#dueAround(d.message.seq, now);
      let slot = below === undefined ? base : Math.max(base, below + 1);
      if (above !== undefined && slot > above - 1) {
        slot = below === undefined ? above - 1 : Math.max(below + 1, above - 1);
      }
      this.#reservedUntil = Math.max(this.#reservedUntil, slot + plan / c);
      this.#defer(d, slot - now);
    }
    while (this.#running.size < c && this.#held.length > 0) {
      const first = this.#held[0];
      const waitUntil = this.#orderWait(first, now);
      if (waitUntil > now) {
        this.#wakeAt = Math.min(this.#wakeAt, waitUntil);
        break;
      }
      this.#held.shift();
      this.#start(first, now);
    }
  }

  /**
   * Until when the lowest held message should wait for a lower seq to arrive (`now` or earlier:
   * go). Messages of one commit are dequeued in random order, so a gap after the last seq started
   * is given `reorderWindow` to fill, or a little longer when it is a message put back here and
   * due back any moment.
   */
  #orderWait(first: Delivery, now: number): number {
    const last = this.#lastStartedSeq;
    if (last !== undefined && first.message.seq <= last + 1) return now;
    let until = first.deliveredAt + this.#o.reorderWindow;
    if (last !== undefined) {
      // A seq put back here is waited for until it is due back (what is held and could not wait that
      // long was put back after it).
      const due = this.#due.get(last + 1);
      if (due !== undefined && due > now - REORDER_GRACE_MS) until = Math.max(until, due + REORDER_GRACE_MS);
    }
    // Never at the cost of the held messages' own deadline.
    return Math.min(until, first.deliveredAt + HOLD_TARGET_MS / 2);
  }

  /** The lowest seq put back here and not back yet (nor overdue), with when it is due. */
  #pendingBelow(now: number): { seq: number; due: number } | undefined {
    let lowest: { seq: number; due: number } | undefined;
    for (const [seq, due] of this.#due) {
      if (due > now - REORDER_GRACE_MS && (lowest === undefined || seq < lowest.seq)) lowest = { seq, due };
    }
    return lowest;
  }

  /**
   * Among the messages put back here and not back yet: the latest due of a lower seq than `seq`,
   * and the earliest due of a higher one.
   */
  #dueAround(seq: number, now: number): { below?: number; above?: number } {
    let below: number | undefined;
    let above: number | undefined;
    for (const [s, due] of this.#due) {
      if (due <= now) continue;
      if (s < seq && (below === undefined || due > below)) below = due;
      if (s > seq && (above === undefined || due < above)) above = due;
    }
    return { below, above };
  }

  #defer(d: Delivery, delay: number): void {
    this.#finish(d);
    this.result.deferred++;
    const ms = Math.round(Math.min(MAX_PUT_BACK_DELAY_MS, Math.max(MIN_PUT_BACK_DELAY_MS, delay)));
    const dueAt = performance.now() + ms;
    this.#due.set(d.message.seq, dueAt);
    this.#dueUntil = Math.max(this.#dueUntil, dueAt + 200);
    this.#putBack({
      kv: d.kv,
      value: d.message,
      delay: ms,
      keysIfUndelivered: [queueKey(this.#queue, "dead", d.message.seq)],
      settles: d.settles,
    });
  }

  #putBack(p: PutBack): void {
    this.#putBacks.push(p);
    if (!this.#flushing) void this.#flushPutBacks();
  }

  /** Group commits of put-backs: each message is back in the queue before its delivery is acknowledged. */
  async #flushPutBacks(): Promise<void> {
    this.#flushing = true;
    try {
      // Let the put-backs of this turn gather.
      await Promise.resolve();
      while (this.#putBacks.length > 0) {
        const kv = this.#putBacks[0].kv;
        const group: PutBack[] = [];
        while (
          group.length < PUT_BACKS_PER_COMMIT && this.#putBacks.length > 0 && this.#putBacks[0].kv === kv
        ) {
          group.push(this.#putBacks.shift()!);
        }
        let failure: unknown;
        try {
          const res = await retryBusy(() => {
            const op = kv.atomic();
            for (const p of group) {
              op.enqueue(p.value, { delay: p.delay, keysIfUndelivered: p.keysIfUndelivered });
            }
            return op.commit();
          });
          if (!res.ok) failure = new Error("the commit was refused");
        } catch (err) {
          failure = err;
        }
        for (const p of group) {
          for (const s of p.settles) {
            if (failure === undefined) s.resolve();
            else s.reject(failure);
          }
        }
        if (failure !== undefined) {
          this.#report({
            reason: "storage",
            message: `could not put ${group.length} message(s) back: ${
              errorText(failure)
            }; KV will redeliver them`,
            error: failure,
          });
        }
      }
    } finally {
      this.#flushing = false;
      this.notify();
    }
  }

  #start(d: Delivery, now: number): void {
    const seq = d.message.seq;
    if (this.#lastStartedSeq === undefined || seq > this.#lastStartedSeq) this.#lastStartedSeq = seq;
    this.#running.set(d, now);
    if (!this.#sessionsStarted.has(d.kv)) {
      this.#sessionsStarted.add(d.kv);
      d.firstOfSession = true;
    }
    void this.#handle(d).finally(() => {
      // When a session opens on a backlog, Deno KV first moves a burst of it into its running table, a
      // commit each, and the first message's read and commit wait behind that: hundreds of
      // milliseconds that, taken as its handling time, had most of a backlog put back (11,245
      // put-backs for 11,266 messages). Its handler's own time, and KV's usual share, stand for it.
      const sample = d.firstOfSession ? (d.handlerMs ?? 0) + INITIAL_SERVICE_MS : performance.now() - now;
      this.#serviceMs = 0.8 * this.#serviceMs + 0.2 * sample;
      this.#running.delete(d);
      this.pump();
      this.notify();
    });
  }

  /**
   * Whether `d` was handled already. One read answers for up to 10 held messages (KV's getMany
   * limit), so deduplication costs a tenth of a read a message; a message handled elsewhere
   * between this read and its own commit is caught by that commit's check.
   */
  async #alreadyHandled(d: Delivery): Promise<boolean> {
    if (d.handled === undefined) {
      const batch = [d];
      for (const h of this.#held) {
        if (batch.length >= 10) break;
        if (h.handled === undefined && h.kv === d.kv) batch.push(h);
      }
      const marks = await retryBusy(() =>
        d.kv.getMany(batch.map((b) => queueKey(this.#queue, "handled", b.message.seq)))
      );
      marks.forEach((m, i) => batch[i].handled = m.versionstamp !== null);
    }
    return d.handled === true;
  }

  async #handle(d: Delivery): Promise<void> {
    const { message, kv } = d;
    const seq = message.seq;
    const handledKey = queueKey(this.#queue, "handled", seq);
    const settleAll = (err?: unknown) => {
      this.#finish(d);
      if (err !== undefined) this.#dueUntil = Math.max(this.#dueUntil, performance.now() + RETRY_EXPECTED_MS);
      for (const s of d.settles) err === undefined ? s.resolve() : s.reject(err);
    };
    let events: JetstreamEvent[];
    try {
      if (await this.#alreadyHandled(d)) {
        this.result.duplicates++;
        settleAll();
        return;
      }
      events = decodeQueueMessage(message);
    } catch (err) {
      this.result.failures++;
      this.#report({
        reason: "handler",
        message: `message ${seq} could not be read: ${errorText(err)}`,
        seq,
        error: err,
      });
      settleAll(err);
      return;
    }
    const now = performance.now();
    const timeLeft = Math.min(this.#o.handlerTimeout, d.deliveredAt + ACK_DEADLINE_MS - now);
    // A message that lost time waiting here and is now unlikely to finish goes back rather than
    // time out (a timeout uses up one of its retries; a put-back does not). A fresh one always runs.
    const waited = now - d.deliveredAt;
    if (timeLeft < MIN_RUN_MS || (waited > 250 && timeLeft < 1.5 * this.#handlerMs)) {
      this.#defer(d, 0);
      return;
    }
    const controller = new AbortController();
    const context: ConsumeContext = {
      queue: this.#queue,
      seq,
      cursor: message.cursor,
      signal: controller.signal,
      timeLeft: Math.round(timeLeft),
    };
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), timeLeft);
    });
    let outcome: "ok" | "timeout";
    const started = performance.now();
    d.handlerStartedAt = started;
    try {
      const running = Promise.resolve().then(() => this.#o.handler(events, context));
      // A handler left behind by a timeout may still fail; that must not become an unhandled rejection.
      running.catch(() => {});
      outcome = await Promise.race([running.then(() => "ok" as const), timedOut]);
    } catch (err) {
      if (this.stopReason !== undefined) {
        // A handler that fails once consume() is stopping (say, it stopped it: its output is gone)
        // has its message put back, as the held ones are: no retry used up, no failure logged by Deno.
        this.#report({
          reason: "handler",
          message: `handler failed on message ${seq} while stopping: ${
            errorText(err)
          }; the message was put back`,
          seq,
          error: err,
        });
        this.#defer(d, 0);
        return;
      }
      this.result.failures++;
      this.#report({
        reason: "handler",
        message: `handler failed on message ${seq}: ${errorText(err)}`,
        seq,
        error: err,
      });
      settleAll(err);
      return;
    } finally {
      clearTimeout(timer);
      d.handlerMs = performance.now() - started;
      this.#handlerMs = 0.8 * this.#handlerMs + 0.2 * d.handlerMs;
    }
    if (outcome === "timeout") {
      const err = new Error(`handler of message ${seq} ran past its ${Math.round(timeLeft)} ms`);
      err.name = "TimeoutError";
      controller.abort(err);
      this.result.failures++;
      this.result.timeouts++;
      this.#report({
        reason: "timeout",
        message: `${err.message}; the message will be redelivered`,
        seq,
        error: err,
      });
      settleAll(err);
      return;
    }
    try {
      const res = await retryBusy(() =>
        kv.atomic()
          .check({ key: handledKey, versionstamp: null })
          .sum(queueKey(this.#queue, "count", "messagesHandled"), 1n)
          .sum(queueKey(this.#queue, "count", "recordsHandled"), BigInt(events.length))
          .set(handledKey, Date.now(), { expireIn: DEDUPE_WINDOW_MS })
          .commit()
      );
      if (res.ok) {
        this.result.messages++;
        this.result.records += events.length;
      } else {
        // Another consumer handled and recorded it while this handler ran.
        this.result.duplicates++;
      }
      settleAll();
    } catch (err) {
      this.result.failures++;
      this.#report({
        reason: "storage",
        message: `could not record message ${seq} as handled: ${errorText(err)}; KV will redeliver it`,
        seq,
        error: err,
      });
      settleAll(err);
    }
  }

  /** Messages of the queue still to come: enqueued, not handled, not dead-lettered. */
  async waiting(kv: Deno.Kv): Promise<number> {
    const [enq, handled] = await retryBusy(() =>
      kv.getMany([
        queueKey(this.#queue, "count", "messages"),
        queueKey(this.#queue, "count", "messagesHandled"),
      ])
    );
    const open = counterValue(enq) - counterValue(handled);
    if (open <= 0) return 0;
    let dead = 0;
    for (const letter of await deadLetters(kv, this.#queue)) if (!letter.handled) dead++;
    return Math.max(0, open - dead);
  }
}

/** A KV operation, run again a few times over about 350 ms while SQLite reports the database busy. */
function retryBusy<T>(op: () => Promise<T>): Promise<T> {
  return retryWhileBusy(op, 350);
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Consumes a jetfill queue: calls `options.handler` once per message with its decoded events,
 * records each handled message in the queue's counters, and resolves with what it did when it
 * stops (on `signal`, or with `untilEmpty` once nothing is waiting).
 *
 * Delivery is at least once; consume() makes duplicates rare (see the module documentation for
 * how): a message whose `seq` was handled already is skipped, but a process that dies between
 * storing a message's events and its acknowledgement, or two consumers both running a handler that
 * overran KV's 5 s deadline, can hand the same events over twice. Make the handler idempotent (for
 * example, key what you store by `did` + `commit.rev` + `commit.rkey`, or by `seq`).
 *
 * Handlers must finish well within {@link ACK_DEADLINE_MS} (default `handlerTimeout` 3 s): consume()
 * measures them and holds no more messages than it can finish in time, putting the rest back.
 *
 * Bad options (a value out of range, a name that is not an option, a queue name that a sync would
 * refuse) are rejected with a `UsageError` that names them, before anything is opened.
 *
 * @example
 * ```ts
 * import { consume } from "./consume.ts";
 * const controller = new AbortController();
 * Deno.addSignalListener("SIGINT", () => controller.abort());
 * const result = await consume({
 *   kv: "./jetfill-data/jetstream_sync.sqlite",
 *   signal: controller.signal,
 *   handler: async (events, { seq }) => {
 *     await Deno.writeTextFile(`./out/${seq}.json`, JSON.stringify(events)); // idempotent: keyed by seq
 *   },
 * });
 * console.log(`${result.records} events in ${result.messages} messages`);
 * ```
 */
export async function consume(options: ConsumeOptions): Promise<ConsumeResult> {
  const parsed = ConsumeOptionsSchema.safeParse(options);
  if (!parsed.success) throw new UsageError(parsed.error.issues[0].message);
  const queue = options.queueName ?? "jetstream_sync";
  const path = typeof options.kv === "object" && options.kv !== null
    ? undefined
    : options.kv ?? defaultKvPath(queue);
  // Until empty, a database that does not exist is a mistyped path, not a queue to wait for.
  if (path !== undefined && options.untilEmpty && !(await pathExists(localDatabasePath(path) ?? path))) {
    throw new UsageError(
      `Cannot consume as the database ${JSON.stringify(path)} does not exist (check 'kv' and 'queueName')`,
    );
  }
  const consumer = new Consumer(options, queue);
  const started = performance.now();
  const onAbort = () => consumer.stop("aborted");
  if (options.signal?.aborted) consumer.stop("aborted");
  options.signal?.addEventListener("abort", onAbort, { once: true });
  try {
    if (typeof options.kv === "object" && options.kv !== null) {
      const kv = options.kv;
      attach(kv, consumer);
      try {
        await session(consumer, kv, performance.now(), false);
      } finally {
        detach(kv, consumer);
      }
    } else {
      while (!consumer.stopReason) {
        const kv = await openKvAt(path!);
        consumer.result.sessions++;
        let closing = false;
        const listening = kv.listenQueue((raw) => consumer.deliver(kv, raw)).catch((err) => {
          if (!closing) consumer.failListening(err);
        });
        try {
          await session(consumer, kv, performance.now(), true);
        } finally {
          closing = true;
          closedKvs.add(kv);
          kv.close();
          await listening;
        }
      }
    }
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
  }
  if (consumer.listenFailure !== undefined) {
    const why = consumer.listenFailure instanceof Error
      ? consumer.listenFailure.message
      : String(consumer.listenFailure);
    throw new Error(
      `Deno KV stopped delivering the queue's messages: ${why}. A message it cannot read (a value nested thousands of levels deep, written by another program or by a jetfill before such records were gzipped) stays in the queue and stops every consumer; ${
        consumer.result.messages === 0
          ? "no message was handled before it"
          : `the ${consumer.result.messages} messages handled before it are done`
      }`,
      { cause: consumer.listenFailure },
    );
  }
  return {
    ...consumer.result,
    sessions: Math.max(1, consumer.result.sessions),
    stopReason: consumer.stopReason ?? "aborted",
    elapsed: (performance.now() - started) / 1000,
  };
}

/**
 * Runs one session: handles deliveries until consume() stops (and everything is settled), or, when
 * `reopen`, until the session is idle and `pollInterval` old.
 */
async function session(consumer: Consumer, kv: Deno.Kv, openedAt: number, reopen: boolean): Promise<void> {
  const o = consumer.options;
  while (true) {
    consumer.pump();
    const now = performance.now();
    if (consumer.finished(now)) return;
    if (
      o.untilEmpty && consumer.ownSettled(now) && now - openedAt >= MIN_SESSION_FOR_EMPTY_MS &&
      now - consumer.lastCheck >= TICK_MS
    ) {
      consumer.lastCheck = now;
      const waiting = await consumer.waiting(kv);
      if (waiting !== consumer.lastWaiting) {
        consumer.lastWaiting = waiting;
        consumer.lastChange = performance.now();
      }
      if (waiting === 0) consumer.stop("empty");
      else if (
        // Messages this consumer put back are news it waits for: the time runs from when the last is due.
        performance.now() - Math.max(consumer.lastChange, consumer.lastDeliveryAt, consumer.dueUntil) >=
          o.emptyTimeout
      ) {
        consumer.stop("idle");
      }
      // Deliveries may have come during the read: look again before closing anything.
      continue;
    }
    if (consumer.settled(now)) {
      // Reopen to see other processes' messages, unless this session's own backend is about to
      // deliver messages put back or retried: closing then could catch one in flight.
      const age = now - openedAt;
      if (
        reopen && age >= o.pollInterval &&
        (now >= consumer.dueUntil || age >= MAX_SESSION_POLLS * o.pollInterval)
      ) {
        return;
      }
    }
    await consumer.sleep();
  }
}

/** A message KV gave up delivering, as kept under `["jetfill", queue, "dead", seq]`. */
export interface DeadLetter {
  /** The message's `seq` (from its key). */
  seq: number;
  /** The message as enqueued (a {@link QueueMessage} for jetfill's own messages). */
  message: unknown;
  /** Events in the message (0 when it cannot be decoded). */
  records: number;
  /**
   * Whether the message was handled after all: its acknowledgement was lost on its last delivery.
   * Such a letter is a leftover, not a lost message; {@link requeueDeadLetters} deletes it.
   */
  handled: boolean;
}

/**
 * The dead letters of a queue, lowest `seq` first.
 *
 * @example
 * ```ts
 * import { deadLetters } from "./consume.ts";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * for (const letter of await deadLetters(kv, "jetstream_sync")) {
 *   if (!letter.handled) console.log(`message ${letter.seq}: ${letter.records} events never handled`);
 * }
 * kv.close();
 * ```
 */
export async function deadLetters(kv: Deno.Kv, queue: string): Promise<DeadLetter[]> {
  const letters: DeadLetter[] = [];
  for await (const entry of kv.list({ prefix: queueKey(queue, "dead") })) {
    const seq = entry.key[entry.key.length - 1];
    if (typeof seq !== "number") continue;
    let records = 0;
    try {
      records = decodeQueueMessage(entry.value).length;
    } catch {
      // Not a jetfill message: kept and listed, with no events to count.
    }
    letters.push({ seq, message: entry.value, records, handled: false });
  }
  for (let i = 0; i < letters.length; i += 10) {
    const chunk = letters.slice(i, i + 10);
    const marks = await kv.getMany(chunk.map((l) => queueKey(queue, "handled", l.seq)));
    marks.forEach((m, j) => chunk[j].handled = m.versionstamp !== null);
  }
  return letters;
}

/**
 * Puts a queue's dead letters back in the queue, for another round of deliveries (after fixing what
 * made the handler fail); each is deleted in the same commit that enqueues it again. Leftovers of
 * messages that were handled after all are deleted. Resolves to the number of messages requeued.
 *
 * @example
 * ```ts
 * import { requeueDeadLetters } from "./consume.ts";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * console.log(`${await requeueDeadLetters(kv, "jetstream_sync")} messages requeued`);
 * kv.close();
 * ```
 */
export async function requeueDeadLetters(kv: Deno.Kv, queue: string): Promise<number> {
  let requeued = 0;
  for (const letter of await deadLetters(kv, queue)) {
    const key = queueKey(queue, "dead", letter.seq);
    const current = await kv.get(key);
    if (current.versionstamp === null) continue;
    const op = kv.atomic().check(current).delete(key);
    if (!letter.handled) op.enqueue(letter.message, { keysIfUndelivered: [key] });
    const res = await op.commit();
    if (res.ok && !letter.handled) requeued++;
  }
  return requeued;
}

/** A queue's state, as `jetfill status` shows it. */
export interface QueueStatus {
  /** The queue's name. */
  queue: string;
  /** Seq of the last message enqueued (0 when none). */
  lastSeq: number;
  /** `time_us` of the last record stored, or null when none was. */
  latestCursor: number | null;
  /** `latestCursor` as an ISO 8601 UTC time, or null. */
  latestCursorTime: string | null;
  /** When the checkpoint was last written, ISO 8601 UTC, or null. */
  checkpointUpdatedAt: string | null;
  /** Records ever stored in the queue (all runs). */
  recordsStored: number;
  /** Messages ever enqueued. */
  messagesEnqueued: number;
  /** Messages handled by consumers. */
  messagesHandled: number;
  /** Records in the handled messages. */
  recordsHandled: number;
  /** Messages still to be handled: in the KV queue, neither handled nor dead-lettered. */
  messagesWaiting: number;
  /** Records in the waiting messages. */
  recordsWaiting: number;
  /** Dead letters not handled after all (see {@link deadLetters}). */
  deadLetters: number;
  /** Records in those dead letters. */
  deadRecords: number;
  /** Messages not handled, dead letters included: what `queueLength()` and a sync's `queueLength` report. */
  queueLength: number;
  /** Records stored per UTC day of their `time_us`, all runs together. */
  recordsPerDay: Record<string, number>;
  /**
   * The sync that holds the queue's writer lock, or null when none does (a sync gives it back when
   * it stops). A running sync shows it is alive by its commits, or every 0.5 s while quiet: a
   * `lastSeen` more than 10 s old is a sync that crashed, which the next one takes the lock over from
   * (one seen less long ago is watched for 2 s first).
   */
  writer: {
    /** Random id of its run. */
    run: string;
    /**
     * Whether that sync holds the queue's lock file too (it was given a database path): while a
     * process holds the lock file, it is running, however long ago it was last seen.
     */
    lockFile: boolean;
    /** When it took the lock, ISO 8601 UTC. */
    since: string;
    /** Its last commit or heartbeat, ISO 8601 UTC. */
    lastSeen: string;
  } | null;
  /** The last sync run, as it recorded itself when it finished, or null. */
  lastRun: {
    /** Random id of the run. */
    id: string;
    /** When it finished, ISO 8601 UTC. */
    finishedAt: string;
    /** The options it ran with. */
    options: Record<string, unknown>;
    /** Its statistics, as `jetfill sync --json` printed them. */
    stats: Record<string, unknown>;
  } | null;
}

/**
 * Reads a queue's checkpoint, counters, per-day counts, dead letters and last run. Reading takes
 * a consistent view of each part, not of all of them together: figures read while a sync or a
 * consumer runs may be a commit apart.
 *
 * @example
 * ```ts
 * import { queueStatus } from "./consume.ts";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * const s = await queueStatus(kv, "jetstream_sync");
 * console.log(`${s.messagesWaiting} messages (${s.recordsWaiting} records) waiting, ${s.deadLetters} dead`);
 * kv.close();
 * ```
 */
export async function queueStatus(kv: Deno.Kv, queue: string): Promise<QueueStatus> {
  const checkpoint = (await readCheckpoint(kv, queue)).value;
  const counts = await kv.getMany([
    queueKey(queue, "count", "messages"),
    queueKey(queue, "count", "records"),
    queueKey(queue, "count", "messagesHandled"),
    queueKey(queue, "count", "recordsHandled"),
  ]);
  const [messagesEnqueued, recordsEnqueued, messagesHandled, recordsHandled] = counts.map(counterValue);
  const recordsPerDay: Record<string, number> = {};
  for await (const entry of kv.list({ prefix: queueKey(queue, "day") })) {
    const day = entry.key[entry.key.length - 1];
    if (typeof day === "string") recordsPerDay[day] = counterValue(entry);
  }
  const dead = (await deadLetters(kv, queue)).filter((l) => !l.handled);
  const deadRecords = dead.reduce((n, l) => n + l.records, 0);
  const run = (await kv.get<{
    id: string;
    finishedAt: number;
    options: Record<string, unknown>;
    stats: Record<string, unknown>;
  }>(queueKey(queue, "run"))).value;
  const latest = checkpoint && checkpoint.recordsStored > 0 ? checkpoint.cursor : null;
  const [lock, alive] = await kv.getMany<
    [{ run?: string; at?: number; lockFile?: boolean }, { at?: number }]
  >([
    queueKey(queue, "writer"),
    queueKey(queue, "alive"),
  ]);
  let writer: QueueStatus["writer"] = null;
  if (lock.value && typeof lock.value.at === "number") {
    const at = lock.value.at;
    // Commits of the lock's run count as signs of life too.
    const committed = checkpoint && checkpoint.run.id === lock.value.run ? checkpoint.updatedAt : at;
    writer = {
      run: String(lock.value.run),
      lockFile: lock.value.lockFile === true,
      since: new Date(at).toISOString(),
      lastSeen: new Date(Math.max(at, committed, alive.value?.at ?? at)).toISOString(),
    };
  }
  return {
    queue,
    lastSeq: checkpoint?.seq ?? 0,
    latestCursor: latest,
    latestCursorTime: latest === null ? null : isoFromUs(latest),
    checkpointUpdatedAt: checkpoint ? new Date(checkpoint.updatedAt).toISOString() : null,
    recordsStored: checkpoint?.recordsStored ?? recordsEnqueued,
    messagesEnqueued,
    messagesHandled,
    recordsHandled,
    messagesWaiting: Math.max(0, messagesEnqueued - messagesHandled - dead.length),
    recordsWaiting: Math.max(0, recordsEnqueued - recordsHandled - deadRecords),
    deadLetters: dead.length,
    deadRecords,
    queueLength: Math.max(0, messagesEnqueued - messagesHandled),
    recordsPerDay,
    writer,
    lastRun: run
      ? {
        id: run.id,
        finishedAt: new Date(run.finishedAt).toISOString(),
        options: run.options,
        stats: run.stats,
      }
      : null,
  };
}
