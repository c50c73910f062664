/**
 * The other end of the queue: {@link consume} hands every message of a jetfill queue to a handler,
 * once, and keeps the queue's counters true. What it leaves behind is read and repaired by
 * `queueStatus()` (`status.ts`), `deadLetters()` and `requeueDeadLetters()` (`dead_letters.ts`) and
 * `requeueParked()` (`parking.ts`, which also holds the keys of parked messages).
 *
 * What Deno KV queues do, measured on Deno 2.9.6 with the local SQLite backend
 * (`docs/consuming.md` and `deno-runtime.md` §1 have the figures), and what this module does about it:
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
 *   time), and **parks** the others: one commit writes each message to
 *   `["jetfill", queue, "parked", run, seq]` (with a small index entry under `"parkedSeq"`), and its
 *   delivery is acknowledged. A parked message is out of KV's queue and its deadlines: it is read
 *   back when a handler is free for it, lowest `seq` first, and deleted in the commit that records it
 *   handled. Each handler of a delivery runs at most `min(handlerTimeout, ACK_DEADLINE_MS after its
 *   delivery)`, one of a parked message `handlerTimeout`; one past its time is reported as a
 *   `timeout`, its `signal` is aborted and its message failed: a delivery for KV to redeliver, a
 *   parked message to be tried again on KV's default schedule, then written to its dead letter as KV
 *   would. Copies that a requeue still makes are skipped by `seq`.
 * - **Parked messages outlive their consumer.** A consumer that holds parked messages says it is
 *   alive under `["jetfill", queue, "consumer", run]` every {@link PARK_HEARTBEAT_MS} and deletes
 *   that key when it stops; another consumer takes over the messages of a run whose key is gone (a
 *   stopped consumer) or stale (a crashed one: written `PARK_STALE_MS` ago by the wall clock, then
 *   seen unchanged for `PARK_CONFIRM_MS` on the taker's monotonic clock, so that a step of the wall
 *   clock never makes a live consumer look gone) by a checked commit of that key, which it then keeps
 *   alive (so one consumer takes them, and `requeueParked()` leaves them alone), and handles them in
 *   `seq` order with the rest. Each write of that key checks the writer's last one, and parked
 *   messages start only within `PARK_START_WITHIN_MS` of its last write that landed, less than
 *   anyone waits before taking the run over: a consumer paused past that finds its run taken over
 *   when it resumes, and leaves the run's messages alone. Signs of life of runs with nothing parked
 *   are deleted once stale. A copy KV delivers of a message parked here is acknowledged only while
 *   the parked entry is there. A plain `listenQueue` does not see parked messages: `jetfill status`
 *   counts them.
 * - **No cross-process wake-up.** A listener only sees another process's enqueues on a 60 s poll, but
 *   it takes everything that is ready when it opens the database. With a path, consume() therefore
 *   runs in sessions: open, listen, handle what arrives, and once idle and at least `pollInterval` old,
 *   close and open again. A session is only closed when nothing is in flight: acknowledgements made
 *   after `close()` are lost (measured), and such messages come back only after their deadline.
 * - **Handlers run `concurrency` at a time** (default 1), lowest `seq` first, parked messages and
 *   deliveries together: messages enqueued in one commit are dequeued in random order, so consume()
 *   waits up to `reorderWindow` for a missing `seq` before it goes on without it.
 * - **Failures and dead letters.** A handler that throws leaves its message to KV, which redelivers it
 *   on its backoff schedule; when the retries run out KV writes the message to the keys given at
 *   enqueue time, `["jetfill", queue, "dead", seq]` for jetfill's writer. Dead letters are not counted
 *   as handled; list them with {@link deadLetters} and retry them with `requeueDeadLetters()`.
 * - **Messages that are not this queue's** (another queue name in the same database, or not a jetfill
 *   message at all) are put back with a delay and reported as `foreign`: a database has one KV queue,
 *   and consume() never drops a message it does not own. A put-back is a new enqueue: KV does not hand
 *   a listener the options a message was enqueued with, so a jetfill message gets its dead-letter key
 *   again, but another program's loses its `keysIfUndelivered` and `backoffSchedule` (keep such a
 *   queue in a database of its own). With `untilEmpty`, a `queueName` the database
 *   has never held, when it holds other queues, is refused with a `UsageError` (a mistyped name would
 *   take theirs).
 *
 * @module
 */
import type { JetstreamEvent } from "../jetstream/events.ts";
import {
  counterValue,
  defaultKvPath,
  ensureOpenKv,
  kvQueueOf,
  localDatabasePath,
  openKvAt,
  queueKey,
  requireWritable,
  retryWhileBusy,
  unknownQueue,
} from "./kv_queue.ts";
import { parkedWaiting } from "./status.ts";
import { decodeQueueMessage, isQueueMessage, type QueueMessage, repackMessage } from "./message.ts";
import { databaseExists, pathExists } from "../fs.ts";
import { dirname } from "node:path";
import { deadLettersOf } from "./dead_letters.ts";
import { commitOutcome, GroupWriter } from "./group_writer.ts";
import {
  BUSY_RETRY_MS,
  claimSignOfLife,
  dropStaleSignsOfLife,
  LifeWatch,
  PARK_CONFIRM_MS,
  PARK_HEARTBEAT_MS,
  PARK_START_WITHIN_MS,
  parkedByRun,
  parkedKey,
  parkedSeqKey,
  readSignOfLife,
  retryBusy,
  signOfLifeKey,
} from "./parking.ts";
import { show, UsageError } from "../errors.ts";
import { longTimeout } from "../async.ts";
import {
  inMemoryPathRefusal,
  isDenoKv,
  optionsObjectError,
  QUEUE_NAME,
  QUEUE_NAME_RULE,
} from "../options.ts";
import { z } from "zod";

/**
 * Deno KV's redelivery deadline: a message not acknowledged this long after it became ready (was
 * enqueued, or its delay ran out) is requeued by the next cleanup (any opening of the database).
 */
export const KV_REDELIVERY_DEADLINE_MS = 5_000;
/** consume() answers (acknowledges, fails, parks or puts back) every delivery within this time of it. */
export const ACK_DEADLINE_MS = 4_000;
/** How long the record of a handled `seq` is kept for deduplication: 7 days. */
export const DEDUPE_WINDOW_MS = 7 * 24 * 3600_000;

// After the last handler settles, Deno still has to send the acknowledgement; closing the database
// before that loses it. A few milliseconds are enough on an idle backend; this leaves room.
const ACK_SETTLE_MS = 40;
// After a stop, KV goes on delivering a backlog, and each delivery is parked at once: a quiet
// spell of ACK_SETTLE_MS may never come. From this long after the stop, consume() returns at the
// first moment nothing is unsettled.
const STOP_GRACE_MS = 250;
// Deliveries received when no consumer is attached to a shared Kv come back after this delay.
const ORPHAN_DELAY_MS = 1_000;
// Messages of another queue come back after this delay, for their own consumer to take.
const FOREIGN_DELAY_MS = 2_000;
// A handler is not started with less time than this before the deadline: it is parked instead.
const MIN_RUN_MS = 100;
// The handling time assumed before the first message is measured.
const INITIAL_SERVICE_MS = 10;
/**
 * consume() holds a delivered message only when it expects to finish it within this time of its
 * delivery; it parks the others. KV's deadline is 5 s after a message became ready, which for a
 * fresh message picked up within a 1 s poll leaves about 4 s; this keeps a margin for slow turns of
 * the event loop and for handlers slower than their average.
 */
export const HOLD_TARGET_MS = 3_000;
// A parked message whose handler failed is tried again after these delays (KV's default backoff),
// then written to its dead letter: six tries, as KV gives a delivery.
const PARKED_RETRY_MS = [100, 1_000, 5_000, 30_000, 60_000];
// Parked messages are read back this many at once (KV's getMany limit), as their turn comes.
const PARKED_READ_AHEAD = 10;
// How often a running consumer looks for parked messages that a stopped or crashed one left, ms.
const ADOPT_EVERY_MS = 5_000;
// After a handler failure, KV redelivers after 100 ms and then 1 s (its default schedule).
const RETRY_EXPECTED_MS = 1_300;
// A session that is settled but expects messages back stays open at most this many poll intervals.
const MAX_SESSION_POLLS = 10;
// The main loop's longest sleep: how often deadlines and untilEmpty are looked at when nothing happens.
const TICK_MS = 100;
// untilEmpty looks at the counters only after a session had this long to receive what was ready.
const MIN_SESSION_FOR_EMPTY_MS = 250;
// untilEmpty reads Deno KV's queue itself (a scan of its table) only after this long without a
// delivery, and at most this often.
const KV_READ_QUIET_MS = 1_000;
const KV_READ_EVERY_MS = 2_000;
// After a retry that Deno KV's queue says is due, untilEmpty waits this much longer for it.
const RETRY_SLACK_MS = 1_000;

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
 * has its message parked for the next consumer instead, like the messages held: it uses up no retry.
 *
 * The array is the handler's own: taking events out of it changes nothing else. The events in it
 * are best left as they are: a message KV redelivers comes with its own copy, and so does every
 * try of a parked message, but one parked by a handler that changed its events and then failed
 * while consume() stopped keeps those changes.
 */
export type ConsumeHandler = (events: JetstreamEvent[], context: ConsumeContext) => void | Promise<void>;

/** Why consume() reported a problem; none of them stops it. */
export type ConsumeErrorReason =
  /** The handler threw; KV will redeliver the message (a parked one is tried again). */
  | "handler"
  /** The handler ran out of time; its signal was aborted and the message failed, as with `handler`. */
  | "timeout"
  /** A message of another queue, or not a jetfill message, was put back for its own consumer. */
  | "foreign"
  /** Recording a handled message, parking or reading one, or putting one back, failed; nothing is lost. */
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

/**
 * Options of {@link consume}.
 *
 * @example
 * ```ts
 * import { consume, type ConsumeOptions } from "@jetfill/jetfill";
 * // What is waiting in the queue, then stop.
 * const options: ConsumeOptions = {
 *   kv: "./jetfill-data/jetstream_sync.sqlite",
 *   untilEmpty: true,
 *   handler: (events, { seq }) => console.log(seq, events.length),
 * };
 * await consume(options);
 * ```
 */
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
   * back with a 1 s delay. A path that does not exist (or is an empty file) is refused with
   * `untilEmpty` (a {@link UsageError}: most likely a mistyped path); without it, consume() creates
   * the database and waits for a sync to fill it, if its folder exists (else a `UsageError` too).
   * A file that is not a Deno KV database is refused.
   *
   * @default {"./jetfill-data/<queueName>.sqlite"}
   */
  kv?: Deno.Kv | string;
  /** The queue's name. @default {"jetstream_sync"} */
  queueName?: string;
  /** Stops consume() when aborted: the running handlers finish, the messages held are parked. */
  signal?: AbortSignal;
  /**
   * Stop once no message of the queue is waiting: the counters show every enqueued message handled
   * or dead-lettered, or (when they do not, after a second without a delivery) Deno KV's queue,
   * read in the database file, holds none of the queue's messages and none is parked: a plain
   * `listenQueue`, which keeps no counters, took them. With a `Deno.Kv` opened elsewhere, whose
   * file is not known, messages counted as waiting that never arrive stop consume() after
   * `emptyTimeout` without news.
   * @default {false}
   */
  untilEmpty?: boolean;
  /**
   * The most a handler may run, ms. A handler of a delivery also never runs past
   * {@link ACK_DEADLINE_MS} after it, whatever this says (one of a parked message gets all of it:
   * a delivery cut short there while this allows more has its message parked, and once handlers are
   * seen to take that long, deliveries are parked before they run). A handler past its time has its
   * signal aborted and its message failed, for KV to redeliver (or consume() to try again, when
   * parked); keep handlers well under this.
   * @default {3000}
   */
  handlerTimeout?: number;
  /** Handlers running at once, 1 to 100. @default {1} */
  concurrency?: number;
  /** With a path, how often an idle consumer reopens the database to see new messages, ms. @default {1000} */
  pollInterval?: number;
  /**
   * With `untilEmpty`, stop after this long without a delivery of this queue's messages or a change of
   * the counters, counted from when the last retry that Deno KV's queue holds for them is due (read in
   * the database file, when it is known), ms.
   * @default {10000}
   */
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

/**
 * What consume() did, when it stops.
 *
 * @example
 * ```ts
 * import { consume } from "@jetfill/jetfill";
 * const result = await consume({ untilEmpty: true, handler: () => {} });
 * console.log(`${result.messages} messages handled, ${result.failures} failures (${result.stopReason})`);
 * ```
 */
export interface ConsumeResult {
  /** Messages handled (handler resolved, recorded as handled). */
  messages: number;
  /** Events in those messages. */
  records: number;
  /**
   * Deliveries skipped because their `seq` was already handled or being handled, and messages whose
   * handler ran here while another consumer handled and recorded them first (those events were
   * handed over twice).
   */
  duplicates: number;
  /**
   * Failed handlings, each leaving its message for redelivery: the handler threw or timed out, or the
   * database refused to say or to record whether it was handled (reported as `storage`).
   */
  failures: number;
  /** Of the failures, those that were timeouts. */
  timeouts: number;
  /**
   * Messages of this queue set aside for later: parked in KV keys, out of KV's queue and its 5 s
   * deadline, to be handled in `seq` order when a handler is free (by this consumer, or by the next).
   */
  deferred: number;
  /**
   * Put-backs of messages of other queues (or not jetfill's) for their own consumers: one message
   * comes back, and is counted, as often as KV delivers it to this consumer.
   */
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
  /** Set when the message is handled from where it was parked: it has no delivery to answer. */
  parked?: Parked;
}

/** A message parked in KV keys and not handled yet, by this consumer or by one that left. */
interface Parked {
  seq: number;
  /** The consumer run that parked it: part of its keys. */
  run: string;
  /** The message, once read back for its turn. */
  message?: QueueMessage;
  /** Since when it is known here (performance.now() time), for the reorder wait. */
  since: number;
  /** Failed handlings so far, and when it may be tried again (performance.now() time). */
  failures: number;
  retryAt: number;
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
      z.string().min(1, because("kv", "a Deno.Kv or a database path")).refine(
        (path) => path !== ":memory:",
        { error: () => inMemoryPathRefusal("consume") },
      ),
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
    throw new UsageError(
      "Cannot consume as another consume() is already running on this Deno.Kv (one at a time on a Deno.Kv; use `concurrency` for handlers in parallel)",
    );
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
  await kv.enqueue(repackMessage(value), { delay, keysIfUndelivered: deadKeysOf(value) });
}

class Consumer {
  readonly #o: Required<Omit<ConsumeOptions, "kv" | "signal" | "onError">>;
  readonly #onError: ((r: ConsumeErrorReport) => void) | undefined;
  readonly #queue: string;
  /** This consumer's run: the keys of what it parks, and of its sign of life (new if it is taken over). */
  #run = crypto.randomUUID();
  // Held deliveries, sorted by seq; and by seq, the held and running ones not yet answered, for
  // coalescing the copies KV may deliver meanwhile.
  readonly #held: Delivery[] = [];
  readonly #bySeq = new Map<number, Delivery>();
  // Deliveries being handled, with when they started; by delivery, not by seq, because a fresh
  // copy of a seq can start while the previous one is still finishing.
  readonly #running = new Map<Delivery, number>();
  // Messages of other queues put back for their consumers, in group commits.
  readonly #putBacks = new GroupWriter<PutBack>(
    (op, group) => {
      for (const p of group) {
        op.enqueue(repackMessage(p.value), { delay: p.delay, keysIfUndelivered: p.keysIfUndelivered });
      }
    },
    (group, { failure }) => {
      for (const p of group) {
        for (const s of p.settles) {
          failure === undefined ? s.resolve() : s.reject(failure);
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
    },
    () => this.notify(),
  );
  // Parked messages waiting for a handler, sorted by seq; and by seq, those and the running ones.
  readonly #parked: Parked[] = [];
  readonly #parkedBySeq = new Map<number, Parked>();
  /**
   * Messages whose handler succeeded here but whose record as handled could not be committed (the
   * database stayed busy): their next try records them without running the handler again. By seq,
   * with the message's cursor, so that another message under the same seq (the database made anew
   * at the same path) is not taken for it.
   */
  readonly #unrecorded = new Map<number, number>();
  // Deliveries being parked, in group commits, each with this consumer's sign of life (none once
  // stopping: its parked messages are then the next consumer's at once). A delivery is acknowledged
  // once parked; until then it stays in #bySeq, so that a copy KV delivers meanwhile shares its fate.
  readonly #parking = new GroupWriter<Delivery>(
    (op, group) => {
      const run = this.#parkingRun = this.#run;
      for (const d of group) {
        const at = { run, seq: d.message.seq };
        op.set(parkedKey(this.#queue, at), repackMessage(d.message)).set(parkedSeqKey(this.#queue, at), true);
      }
      // The run's first sign of life; keepAlive() writes the next ones.
      this.#parkingBeats = !this.stopReason && !this.#heldRuns.has(run);
      this.#parkingIssuedAt = performance.now();
      if (this.#parkingBeats) {
        const key = signOfLifeKey(this.#queue, run);
        op.check({ key, versionstamp: null }).set(key, { at: Date.now(), by: run });
      }
    },
    (group, { failure, refused, versionstamp }) => {
      const now = performance.now();
      const run = this.#parkingRun;
      if (refused) {
        // Only the sign-of-life check refuses: the run was taken over while this consumer seemed
        // gone. The messages are parked again under a new run.
        this.#lose(run);
        for (const d of group) this.#parking.add(d);
        return;
      }
      if (failure === undefined && this.#parkingBeats) {
        this.#heldRuns.set(run, { versionstamp: versionstamp!, okAt: this.#parkingIssuedAt });
        this.#beatAt = now;
      }
      for (const d of group) {
        this.#finish(d);
        if (failure === undefined) {
          this.result.deferred++;
          this.#insertParked({ seq: d.message.seq, run, since: now, failures: 0, retryAt: 0 });
        }
        for (const s of d.settles) failure === undefined ? s.resolve() : s.reject(failure);
      }
      if (failure !== undefined) {
        this.#report({
          reason: "storage",
          message: `could not park ${group.length} message(s): ${errorText(failure)}; KV will redeliver them`,
          error: failure,
        });
      }
    },
    () => this.notify(),
  );
  #reading = false;
  #readRetryAt = 0;
  // The open database of the current session: where parked messages are read and recorded.
  #kv: Deno.Kv | undefined;
  // Whether parked messages left by other consumers were looked for: nothing starts before.
  #ready = false;
  // When to look for them next, and when it first looked.
  #adoptAt = Number.NEGATIVE_INFINITY;
  #firstLookAt: number | undefined;
  // Judges, from their signs of life, whether the consumers of the runs found parked are gone.
  readonly #watch = new LifeWatch();
  // The runs whose parked messages this consumer holds (its own, and those it took over): the
  // versionstamp of its last write of each one's sign of life, which the next write checks (a
  // refusal means the run was taken over), and when that write was issued (it landed later). And
  // when it last wrote.
  readonly #heldRuns = new Map<string, { versionstamp: string; okAt: number }>();
  #beatAt = 0;
  // The run the parking commit in flight writes under, whether it writes its sign of life, and when
  // it was issued.
  #parkingRun = "";
  #parkingBeats = false;
  #parkingIssuedAt = 0;
  #unsettled = 0;
  // Of #unsettled, the deliveries of other queues' messages.
  #foreignUnsettled = 0;
  #lastSettleAt = 0;
  #lastOwnSettleAt = 0;
  /** When a message of this queue was last delivered (another queue's do not count). */
  #lastDeliveryAt = performance.now();
  #lastStartedSeq: number | undefined;
  #serviceMs = INITIAL_SERVICE_MS;
  // The sessions (by their Deno.Kv) in which a message was started.
  readonly #sessionsStarted = new WeakSet<Deno.Kv>();
  #handlerMs = INITIAL_SERVICE_MS;
  // Until when messages of this queue are expected back (failed and retried by KV, parked ones
  // retried, or another consumer's parked ones to take over): a session stays open till then, as its
  // own backend delivers KV's retries at once, and untilEmpty waits for them.
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

  /** When a message of this queue was last delivered. */
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

  /** Nothing held, running, being put back, parked or read, or waiting for an answer. */
  quiet(): boolean {
    return this.#unsettled === 0 && this.#held.length === 0 && this.#running.size === 0 &&
      !this.#putBacks.busy && this.#parkingIdle();
  }

  #parkingIdle(): boolean {
    return !this.#parking.busy && !this.#reading;
  }

  /** Quiet long enough for Deno to have sent the last acknowledgement. */
  settled(now: number): boolean {
    return this.quiet() && now - this.#lastSettleAt >= ACK_SETTLE_MS;
  }

  /**
   * The same for this queue's own messages, whatever other queues' messages are doing: another
   * queue's backlog, put back every FOREIGN_DELAY_MS for its own consumer, may never let the
   * session be quiet, and must not keep `untilEmpty` from seeing this queue empty. Parked messages
   * it holds count too: the counters may say none is waiting while it holds parked copies of
   * messages handled elsewhere, whose entries it deletes once it finds them handled.
   */
  ownSettled(now: number): boolean {
    return this.#unsettled === this.#foreignUnsettled && this.#held.length === 0 &&
      this.#running.size === 0 && this.#parked.length === 0 && this.#parkingIdle() &&
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
    // Another queue's messages, put back again and again, are no news for this one.
    if (!foreign) this.#lastDeliveryAt = now;
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
        this.#putBacks.add({
          kv,
          value: raw,
          delay: FOREIGN_DELAY_MS,
          keysIfUndelivered: deadKeysOf(raw),
          settles: [settle],
        });
        return;
      }
      const seq = raw.seq;
      const known = this.#bySeq.get(seq);
      if (known && !known.done) {
        // A second copy of a message already here (requeued by KV): it shares the first one's fate.
        this.result.duplicates++;
        known.settles.push(settle);
        return;
      }
      const delivery: Delivery = { message: raw, done: false, kv, deliveredAt: now, settles: [settle] };
      const parked = this.#parkedBySeq.get(seq);
      if (parked) void this.#copyOfParked(delivery, parked);
      else this.#take(delivery);
    });
  }

  /** Holds a delivery of this queue, or parks it once stopping. */
  #take(d: Delivery): void {
    if (this.stopReason) {
      this.#bySeq.set(d.message.seq, d);
      this.#parking.add(d);
      return;
    }
    this.#insert(d);
    this.pump();
  }

  /**
   * A delivery of a message known here as parked (KV requeued it after its parking, say). While its
   * parked entry is there (or it is handled), the entry stands for it and the copy is acknowledged;
   * an entry gone unhandled was handed back to KV's queue (`requeueParked()`, while this consumer
   * seemed gone), and this delivery is the message now.
   */
  async #copyOfParked(d: Delivery, p: Parked): Promise<void> {
    const settle = d.settles[0];
    try {
      const [entry, handled] = await retryBusy(() =>
        d.kv.getMany([parkedKey(this.#queue, p), queueKey(this.#queue, "handled", p.seq)])
      );
      if (entry.versionstamp !== null || handled.versionstamp !== null) {
        this.result.duplicates++;
        settle.resolve();
        return;
      }
    } catch (err) {
      settle.reject(err);
      return;
    }
    if (this.#parked.includes(p)) this.#dropParked(p);
    this.#take(d);
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
    this.#held.splice(lowerBound(this.#held, d.message.seq, (h) => h.message.seq), 0, d);
    this.#bySeq.set(d.message.seq, d);
  }

  /**
   * Keeps a parked message for its turn, unless its run was taken over meanwhile: keepAlive() can
   * find that out while the message's handler runs (a paused consumer's, which times out as it
   * resumes) or while its parking commit is on its way, after #lose() let go of the run's other
   * messages. It is then the run's new holder's too. Kept here, it would never start (its run is
   * never surely held again), and untilEmpty, which waits for the parked messages it holds, would
   * never stop. Once stopping, they are kept: copies that KV delivers are then known for what they are.
   */
  #insertParked(p: Parked): void {
    if (this.#takenOver(p.run)) {
      this.#dropParked(p);
      return;
    }
    this.#parked.splice(lowerBound(this.#parked, p.seq, (q) => q.seq), 0, p);
    this.#parkedBySeq.set(p.seq, p);
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

  /** Uses `kv` for parked messages from now on: the current session's database. */
  useKv(kv: Deno.Kv): void {
    this.#kv = kv;
  }

  /** Starts what can start, parks what would be held too long. */
  pump(): void {
    const now = performance.now();
    this.#wakeAt = Number.POSITIVE_INFINITY;
    if (this.stopReason) {
      // Left for the next consumer, in seq order with the rest.
      for (const d of this.#held.splice(0)) this.#parking.add(d);
      return;
    }
    if (!this.#ready) return;
    const c = this.#o.concurrency;
    const plan = this.#planMs(now);
    // Park what is not expected to finish within HOLD_TARGET_MS of its delivery (expected wait,
    // its own handling, and half of that again as a margin), counting the parked messages of lower
    // seqs, which go first. The lowest held message to park, and with it every higher one: those
    // would wait for it.
    const busy = this.#running.size >= c ? 1 : 0;
    let cut = this.#held.length;
    let below = 0;
    for (let k = 0; k < this.#held.length; k++) {
      const d = this.#held[k];
      while (below < this.#parked.length && this.#parked[below].seq < d.message.seq) below++;
      const ahead = k + below;
      if (ahead === 0 && !busy) continue; // it starts now; #handle decides with the exact time left
      const wait = (Math.floor(ahead / c) + busy) * plan;
      if (now + wait + 1.5 * plan > d.deliveredAt + HOLD_TARGET_MS) {
        cut = k;
        break;
      }
    }
    for (const d of this.#held.splice(cut)) this.#parking.add(d);
    while (this.#running.size < c) {
      const held = this.#held[0];
      const parkedAt = this.#nextParked(now);
      const parked = parkedAt === -1 ? undefined : this.#parked[parkedAt];
      if (parked && (!held || parked.seq < held.message.seq)) {
        const kv = this.#kv;
        if (!kv || closedKvs.has(kv)) break;
        // Only while its run is surely this consumer's: a consumer that was paused (its signs of
        // life stale) waits for keepAlive() to find out whether another took the run over meanwhile.
        if (!this.#surelyHeld(parked.run, now)) {
          this.#wakeAt = Math.min(this.#wakeAt, now + TICK_MS);
          break;
        }
        if (!parked.message) {
          // A read in flight wakes the loop when done; one that failed is tried again later.
          if (now < this.#readRetryAt) this.#wakeAt = Math.min(this.#wakeAt, this.#readRetryAt);
          else if (!this.#reading) void this.#readParked(kv, parkedAt);
          break;
        }
        const waitUntil = this.#orderWait(parked.seq, parked.since, now);
        if (waitUntil > now) {
          this.#wakeAt = Math.min(this.#wakeAt, waitUntil);
          break;
        }
        this.#parked.splice(parkedAt, 1);
        const message = parked.message;
        parked.message = undefined; // the delivery holds it while it runs
        this.#start({ message, done: false, kv, deliveredAt: now, settles: [], parked }, now);
        continue;
      }
      if (!held) break;
      // Never at the cost of the held messages' own deadline.
      const waitUntil = Math.min(
        this.#orderWait(held.message.seq, held.deliveredAt, now),
        held.deliveredAt + HOLD_TARGET_MS / 2,
      );
      if (waitUntil > now) {
        this.#wakeAt = Math.min(this.#wakeAt, waitUntil);
        break;
      }
      this.#held.shift();
      this.#start(held, now);
    }
  }

  /**
   * Whether `run` is surely still this consumer's: held, with a sign of life issued within
   * PARK_START_WITHIN_MS that landed (another consumer waits longer before taking a run over).
   */
  #surelyHeld(run: string, now: number): boolean {
    const held = this.#heldRuns.get(run);
    return held !== undefined && now - held.okAt <= PARK_START_WITHIN_MS;
  }

  /**
   * Whether `run`'s parked messages are another's now: it is not held here, taken over while this
   * consumer seemed gone. (Once stopping, nothing more starts, and every run is the next consumer's.)
   */
  #takenOver(run: string): boolean {
    return this.stopReason === undefined && !this.#heldRuns.has(run);
  }

  /** Index in #parked of the lowest seq that may be tried now (-1: none), noting when the next may. */
  #nextParked(now: number): number {
    for (let i = 0; i < this.#parked.length; i++) {
      const p = this.#parked[i];
      if (p.retryAt <= now) return i;
      this.#wakeAt = Math.min(this.#wakeAt, p.retryAt);
    }
    return -1;
  }

  /**
   * Until when a message known `since` should wait for a lower seq to arrive (`now` or earlier: go).
   * Messages of one commit are dequeued in random order, so a gap after the last seq started is given
   * `reorderWindow` to fill.
   */
  #orderWait(seq: number, since: number, now: number): number {
    const last = this.#lastStartedSeq;
    if (last !== undefined && seq <= last + 1) return now;
    return since + this.#o.reorderWindow;
  }

  /** Reads back the parked messages from #parked[from] on whose turn is near (up to PARKED_READ_AHEAD). */
  async #readParked(kv: Deno.Kv, from: number): Promise<void> {
    this.#reading = true;
    const batch: Parked[] = [];
    for (let i = from; i < this.#parked.length && batch.length < PARKED_READ_AHEAD; i++) {
      if (!this.#parked[i].message) batch.push(this.#parked[i]);
    }
    try {
      const entries = await retryBusy(() => kv.getMany(batch.map((p) => parkedKey(this.#queue, p))));
      entries.forEach((entry, i) => {
        const p = batch[i];
        if (isQueueMessage(entry.value) && entry.value.queue === this.#queue && entry.value.seq === p.seq) {
          p.message = entry.value;
          return;
        }
        // Handled and deleted by another consumer meanwhile (or not a message: left where it is,
        // for `jetfill status` to count).
        this.#dropParked(p);
        if (entry.versionstamp !== null) {
          this.#report({
            reason: "storage",
            message: `the parked entry of message ${p.seq} is not a message of this queue; left in place`,
            seq: p.seq,
          });
        }
      });
    } catch (err) {
      this.#readRetryAt = performance.now() + 1_000;
      this.#report({
        reason: "storage",
        message: `could not read parked messages: ${errorText(err)}; trying again`,
        error: err,
      });
    } finally {
      this.#reading = false;
      this.pump();
      this.notify();
    }
  }

  #dropParked(p: Parked): void {
    const i = this.#parked.indexOf(p);
    if (i !== -1) this.#parked.splice(i, 1);
    if (this.#parkedBySeq.get(p.seq) === p) this.#parkedBySeq.delete(p.seq);
  }

  /**
   * Takes over the parked messages of consumers that left (their sign of life is gone or stale), and
   * lets messages start once it has looked the first time. Cheap when nothing is parked: one list of
   * small index entries.
   */
  async adopt(kv: Deno.Kv): Promise<void> {
    const now = performance.now();
    if (now < this.#adoptAt) return;
    this.#adoptAt = now + ADOPT_EVERY_MS;
    // A run that may be judged gone within PARK_CONFIRM_MS is looked at again then; the first look
    // waits for it, so that its messages, of lower seqs, go first.
    let confirm = Number.POSITIVE_INFINITY;
    try {
      const runs = await retryBusy(() => parkedByRun(kv, this.#queue));
      await dropStaleSignsOfLife(kv, this.#queue, runs, this.#watch);
      for (const run of this.#heldRuns.keys()) runs.delete(run);
      for (const [run, seqs] of runs) {
        const sign = await readSignOfLife(kv, this.#queue, run);
        const wait = this.#watch.wait(run, sign);
        if (wait > 0) {
          // Its messages are news to wait for (untilEmpty): taken over here if it is not seen again.
          this.#dueUntil = Math.max(this.#dueUntil, performance.now() + wait + ADOPT_EVERY_MS);
          confirm = Math.min(confirm, wait);
          continue;
        }
        // Claimed by a checked commit of its sign of life, now written by this consumer: another
        // consumer, or requeueParked(), then sees the run alive and leaves its messages alone.
        const issuedAt = performance.now();
        const claim = await claimSignOfLife(kv, this.#queue, run, sign.versionstamp, this.#run);
        if (!claim.ok) continue;
        this.#heldRuns.set(run, { versionstamp: claim.versionstamp, okAt: issuedAt });
        for (const seq of seqs) {
          // A delivery of it here now is handled first; a later look finds the leftover handled.
          if (this.#parkedBySeq.has(seq) || this.#bySeq.has(seq)) continue;
          this.#insertParked({ seq, run, since: performance.now(), failures: 0, retryAt: 0 });
        }
      }
      this.#watch.prune();
    } catch (err) {
      this.#report({
        reason: "storage",
        message: `could not look for parked messages: ${errorText(err)}; looking again later`,
        error: err,
      });
    }
    if (confirm <= PARK_CONFIRM_MS) this.#adoptAt = Math.min(this.#adoptAt, performance.now() + confirm);
    // Once: a live consumer's sign of life that this clock calls stale keeps changing, and is never
    // confirmed. (The main loop wakes every TICK_MS: in time for the next look.)
    this.#firstLookAt ??= now;
    if (!this.#ready && confirm <= PARK_CONFIRM_MS && now - this.#firstLookAt < PARK_CONFIRM_MS) return;
    this.#ready = true;
  }

  /**
   * Writes that this consumer is alive, every PARK_HEARTBEAT_MS, under each run whose parked
   * messages it holds, each write checked against its last one: a refusal means the run was taken
   * over (this consumer seemed gone), and its messages are left to their new
   * holder. A run taken over here loses its key once none of its messages are left.
   */
  async keepAlive(kv: Deno.Kv): Promise<void> {
    const now = performance.now();
    if (this.#heldRuns.size === 0 || now - this.#beatAt < PARK_HEARTBEAT_MS) return;
    this.#beatAt = now;
    const left = new Set<string>();
    for (const p of this.#parkedBySeq.values()) left.add(p.run);
    for (const [run, held] of [...this.#heldRuns]) {
      const key = signOfLifeKey(this.#queue, run);
      // Its own run keeps its key while it runs: a parking may be on its way.
      const keep = run === this.#run || left.has(run);
      let issuedAt = 0;
      const { failure, refused, versionstamp } = await commitOutcome(kv, (op) => {
        issuedAt = performance.now();
        op.check({ key, versionstamp: held.versionstamp });
        if (keep) op.set(key, { at: Date.now(), by: this.#run });
        else op.delete(key);
      });
      if (this.#heldRuns.get(run) !== held) continue;
      if (refused) this.#lose(run);
      else if (failure !== undefined) continue; // tried again at the next beat
      else if (keep) this.#heldRuns.set(run, { versionstamp: versionstamp!, okAt: issuedAt });
      else this.#heldRuns.delete(run);
    }
  }

  /** A run this consumer held was taken over: its messages not started here are its new holder's. */
  #lose(run: string): void {
    this.#heldRuns.delete(run);
    for (const p of this.#parked.filter((q) => q.run === run)) this.#dropParked(p);
    if (run === this.#run) this.#run = crypto.randomUUID();
  }

  /** Stopping: the parked messages this consumer holds are left for the next consumer, at once. */
  async leave(kv: Deno.Kv): Promise<void> {
    const runs = [...this.#heldRuns];
    this.#heldRuns.clear();
    for (const [run, held] of runs) {
      // Checked: a run taken over meanwhile is its new holder's to keep alive.
      await commitOutcome(kv, (op) => {
        const key = signOfLifeKey(this.#queue, run);
        op.check({ key, versionstamp: held.versionstamp }).delete(key);
      });
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
  async #alreadyHandled(d: Delivery, busyBudgetMs: number): Promise<boolean> {
    if (d.handled === undefined) {
      const batch = [d];
      for (const h of this.#held) {
        if (batch.length >= 10) break;
        if (h.handled === undefined && h.kv === d.kv) batch.push(h);
      }
      const marks = await retryWhileBusy(
        () => d.kv.getMany(batch.map((b) => queueKey(this.#queue, "handled", b.message.seq))),
        busyBudgetMs,
        "",
      );
      marks.forEach((m, i) => batch[i].handled = m.versionstamp !== null);
    }
    return d.handled === true;
  }

  /** What becomes of a parked message whose handling failed (see #failed), said in its report. */
  #fate(d: Delivery): string {
    const p = d.parked;
    if (!p) return "";
    if (this.#takenOver(p.run)) return "; its run was taken over meanwhile: it is left to its new holder";
    return p.failures < PARKED_RETRY_MS.length
      ? `; it stays parked, to be tried again in ${PARKED_RETRY_MS[p.failures]} ms`
      : `; it failed ${p.failures + 1} times and goes to its dead letter`;
  }

  /**
   * A failed handling: a delivery is left to KV (rejected, for redelivery on its schedule); a parked
   * message is tried again on KV's default schedule, and after its sixth failure written to its dead
   * letter, as KV does with a delivery; one whose run was taken over meanwhile is its new holder's.
   */
  async #failed(d: Delivery, err: unknown): Promise<void> {
    const p = d.parked;
    if (!p) {
      this.#finish(d);
      this.#dueUntil = Math.max(this.#dueUntil, performance.now() + RETRY_EXPECTED_MS);
      for (const s of d.settles) s.reject(err);
      return;
    }
    // Neither tried again nor written to its dead letter here: its new holder tries it.
    if (this.#takenOver(p.run)) {
      this.#dropParked(p);
      return;
    }
    p.failures++;
    if (p.failures <= PARKED_RETRY_MS.length) {
      // Kept at hand: its entry may be gone by its next try (handed back to KV's queue).
      p.message = d.message;
      p.retryAt = performance.now() + PARKED_RETRY_MS[p.failures - 1];
      this.#dueUntil = Math.max(this.#dueUntil, p.retryAt + 200);
      this.#insertParked(p);
      return;
    }
    const { failure } = await commitOutcome(d.kv, (op) => {
      op.set(queueKey(this.#queue, "dead", p.seq), repackMessage(d.message))
        .delete(parkedKey(this.#queue, p))
        .delete(parkedSeqKey(this.#queue, p));
    });
    if (failure === undefined) {
      this.#parkedBySeq.delete(p.seq);
    } else {
      p.retryAt = performance.now() + PARKED_RETRY_MS.at(-1)!;
      this.#insertParked(p);
      this.#report({
        reason: "storage",
        message: `could not write message ${p.seq} to its dead letter: ${
          errorText(failure)
        }; it stays parked`,
        seq: p.seq,
        error: failure,
      });
    }
  }

  /** Answers `d` as done: its delivery acknowledged, or its parked keys deleted. */
  async #done(d: Delivery): Promise<void> {
    this.#finish(d);
    for (const s of d.settles) s.resolve();
    const p = d.parked;
    if (!p) return;
    if (this.#parkedBySeq.get(p.seq) === p) this.#parkedBySeq.delete(p.seq);
    await commitOutcome(d.kv, (op) => {
      op.delete(parkedKey(this.#queue, p)).delete(parkedSeqKey(this.#queue, p));
    });
  }

  async #handle(d: Delivery): Promise<void> {
    const { message, parked } = d;
    const seq = message.seq;
    let events: JetstreamEvent[];
    try {
      if (await this.#alreadyHandled(d, this.#busyBudget(d))) {
        this.#unrecorded.delete(seq);
        this.result.duplicates++;
        await this.#done(d);
        return;
      }
    } catch (err) {
      this.result.failures++;
      this.#report({
        reason: "storage",
        message: `could not read whether message ${seq} was handled: ${errorText(err)}${
          parked ? this.#fate(d) : "; KV will redeliver it"
        }`,
        seq,
        error: err,
      });
      await this.#failed(d, err);
      return;
    }
    try {
      events = decodeQueueMessage(message);
    } catch (err) {
      this.result.failures++;
      this.#report({
        reason: "handler",
        message: `message ${seq} could not be read: ${errorText(err)}${this.#fate(d)}`,
        seq,
        error: err,
      });
      await this.#failed(d, err);
      return;
    }
    if (parked) {
      // The read above took time: a parked message starts only while its run is surely still this
      // consumer's (as in pump()). Otherwise it waits for the next sign of life, or is left to the
      // run's new holder.
      if (!this.#surelyHeld(parked.run, performance.now())) {
        if (this.#heldRuns.has(parked.run)) {
          parked.message = message;
          this.#insertParked(parked);
        } else if (this.#parkedBySeq.get(seq) === parked) {
          this.#parkedBySeq.delete(seq);
        }
        return;
      }
    }
    // Handled here already, but not recorded: only the record is made again.
    if (this.#unrecorded.get(seq) === message.cursor) return await this.#record(d, events);
    const now = performance.now();
    const timeLeft = parked
      ? this.#o.handlerTimeout
      : Math.min(this.#o.handlerTimeout, d.deliveredAt + ACK_DEADLINE_MS - now);
    // A message that lost time waiting here and is now unlikely to finish is parked rather than
    // timed out (a timeout uses up one of its retries). A fresh one runs, unless handlers take longer
    // than a delivery can give and handlerTimeout more: parked, it gets all of handlerTimeout.
    const waited = now - d.deliveredAt;
    const cut = this.#o.handlerTimeout > timeLeft;
    if (
      !parked && (timeLeft < MIN_RUN_MS || ((waited > 250 || cut) && timeLeft < 1.5 * this.#handlerMs))
    ) {
      this.#parking.add(d);
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
    let cancelTimer = () => {};
    const timedOut = new Promise<"timeout">((resolve) => {
      // A handlerTimeout beyond setTimeout's range (about 24.8 days) would fire at once.
      cancelTimer = longTimeout(() => resolve("timeout"), timeLeft);
    });
    let outcome: "ok" | "timeout";
    const started = performance.now();
    d.handlerStartedAt = started;
    // The handler gets its own array, so that what it does to it changes neither the counts below
    // nor the message; a parked message, which consume() keeps for its next try and its dead letter
    // (KV's own copy is gone), gets its own copy of the events too.
    const given = parked ? structuredClone(events) : events.slice();
    try {
      const running = Promise.resolve().then(() => this.#o.handler(given, context));
      // A handler left behind by a timeout may still fail; that must not become an unhandled rejection.
      running.catch(() => {});
      outcome = await Promise.race([running.then(() => "ok" as const), timedOut]);
    } catch (err) {
      if (this.stopReason !== undefined) {
        // A handler that fails once consume() is stopping (say, it stopped it: its output is gone)
        // has its message parked for the next consumer, as the held ones are: no retry used up, no
        // failure logged by Deno.
        this.#report({
          reason: "handler",
          message: `handler failed on message ${seq} while stopping: ${
            errorText(err)
          }; the message was parked`,
          seq,
          error: err,
        });
        if (parked) this.#insertParked(parked);
        else this.#parking.add(d);
        return;
      }
      this.result.failures++;
      this.#report({
        reason: "handler",
        message: `handler failed on message ${seq}: ${errorText(err)}${this.#fate(d)}`,
        seq,
        error: err,
      });
      await this.#failed(d, err);
      return;
    } finally {
      cancelTimer();
      d.handlerMs = performance.now() - started;
      this.#handlerMs = 0.8 * this.#handlerMs + 0.2 * d.handlerMs;
    }
    if (outcome === "timeout") {
      const err = new Error(`handler of message ${seq} ran past its ${Math.round(timeLeft)} ms`);
      err.name = "TimeoutError";
      controller.abort(err);
      this.result.failures++;
      this.result.timeouts++;
      // Cut short by the delivery's deadline, not by handlerTimeout: parked (which answers the
      // delivery), its next try gets the whole of handlerTimeout, and none of KV's retries is used.
      const park = !parked && cut && !this.stopReason;
      this.#report({
        reason: "timeout",
        message: `${err.message}${
          parked
            ? this.#fate(d)
            : park
            ? "; parked: its next try gets the whole handlerTimeout"
            : "; the message will be redelivered"
        }`,
        seq,
        error: err,
      });
      if (park) this.#parking.add(d);
      else await this.#failed(d, err);
      return;
    }
    await this.#record(d, events);
  }

  /** The most a KV operation on `d`'s behalf retries while the database is busy: to its deadline. */
  #busyBudget(d: Delivery): number {
    return d.parked
      ? ACK_DEADLINE_MS
      : Math.max(BUSY_RETRY_MS, d.deliveredAt + ACK_DEADLINE_MS - performance.now());
  }

  /**
   * Records `d`'s message as handled (its handler succeeded) and acknowledges it. While the database
   * is busy, tried again until the delivery's deadline; past it the message fails, to come again,
   * and is only recorded then: its handler is not run again here.
   */
  async #record(d: Delivery, events: JetstreamEvent[]): Promise<void> {
    const { message, kv, parked } = d;
    const seq = message.seq;
    const handledKey = queueKey(this.#queue, "handled", seq);
    try {
      const res = await retryWhileBusy(
        () => {
          const op = kv.atomic()
            .check({ key: handledKey, versionstamp: null })
            .sum(queueKey(this.#queue, "count", "messagesHandled"), 1n)
            .sum(queueKey(this.#queue, "count", "recordsHandled"), BigInt(events.length))
            .set(handledKey, Date.now(), { expireIn: DEDUPE_WINDOW_MS });
          if (parked) op.delete(parkedKey(this.#queue, parked)).delete(parkedSeqKey(this.#queue, parked));
          return op.commit();
        },
        this.#busyBudget(d),
        "",
      );
      this.#unrecorded.delete(seq);
      if (res.ok) {
        this.result.messages++;
        this.result.records += events.length;
        this.#finish(d);
        for (const s of d.settles) s.resolve();
        if (parked && this.#parkedBySeq.get(seq) === parked) this.#parkedBySeq.delete(seq);
      } else {
        // Another consumer handled and recorded it while this handler ran.
        this.result.duplicates++;
        await this.#done(d);
      }
    } catch (err) {
      this.#unrecorded.set(seq, message.cursor);
      this.result.failures++;
      this.#report({
        reason: "storage",
        message: `could not record message ${seq} as handled: ${errorText(err)}${
          parked ? this.#fate(d) : "; KV will redeliver it"
        }; its handler succeeded and is not run again for it here: its next try only records it`,
        seq,
        error: err,
      });
      await this.#failed(d, err);
    }
  }

  /** When {@link waiting} last read Deno KV's queue itself, and what it found then. */
  #lastKvRead = Number.NEGATIVE_INFINITY;
  #lastKvFigure: number | undefined;

  /**
   * Messages of the queue still to come: enqueued, not handled, not dead-lettered, by the counters.
   * Those a plain `listenQueue` took are counted there still, so when the counters say some wait and
   * nothing has come for a while, Deno KV's queue (read in the database file, when it is known) and
   * the parked messages say what is really left. Their figure is taken when it is the smaller and
   * two reads in a row, with no delivery between, found it: a message that another consumer moves
   * between KV's queue and its parked keys during a read can be missed by that read.
   */
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
    for (const letter of await deadLettersOf(kv, this.#queue)) if (!letter.handled) dead++;
    const byCounters = Math.max(0, open - dead);
    const now = performance.now();
    if (
      byCounters === 0 || now - this.#lastDeliveryAt < KV_READ_QUIET_MS ||
      now - this.#lastKvRead < KV_READ_EVERY_MS
    ) {
      return byCounters;
    }
    const before = this.#lastDeliveryAt < this.#lastKvRead ? this.#lastKvFigure : undefined;
    this.#lastKvRead = now;
    // KV's queue before the parked messages: a message being parked is then seen twice, not missed.
    const inKv = await kvQueueOf(kv, this.#queue);
    const parked = await retryBusy(() => parkedWaiting(kv, this.#queue));
    // A delivery during the reads may have moved a message between them: the figure is not taken.
    this.#lastKvFigure = inKv === undefined || this.#lastDeliveryAt >= now
      ? undefined
      : inKv.messages + parked.size;
    // A message KV retries after a failure waits in its queue for up to a minute: news to wait for.
    const dueInMs = (inKv?.latestDueMs ?? 0) - Date.now();
    if (dueInMs > 0) this.#dueUntil = Math.max(this.#dueUntil, performance.now() + dueInMs + RETRY_SLACK_MS);
    return this.#lastKvFigure !== undefined && this.#lastKvFigure === before && before < byCounters
      ? before
      : byCounters;
  }
}

/** Index of the first element of `sorted` whose `seqOf` is not below `seq`. */
function lowerBound<T>(sorted: T[], seq: number, seqOf: (t: T) => number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (seqOf(sorted[mid]) < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Refuses to drain (`untilEmpty`) a queue never written in a database that holds others: most likely
 * a mistyped name, and a consumer of it would take the others' messages from KV's queue, which they
 * share, and put them back behind the rest. (A consumer that waits may be waiting for a sync.)
 */
async function refuseUnknownQueue(kv: Deno.Kv, queue: string, where: string): Promise<void> {
  const unknown = await unknownQueue(kv, queue, where, "consume");
  if (unknown) throw new UsageError(`Cannot consume as ${unknown} (check 'queueName')`);
}

/**
 * Consumes a jetfill queue: calls `options.handler` once per message with its decoded events,
 * records each handled message in the queue's counters, and resolves with what it did when it
 * stops (on `signal`, or with `untilEmpty` once nothing is waiting).
 *
 * Delivery is at least once; consume() makes duplicates rare (see the module documentation for
 * how): a message whose `seq` was handled already is skipped, but a process that dies between
 * storing a message's events and its acknowledgement can hand the same events over twice, and so can
 * two consumers at once on one queue: each opening of the database by one puts back in KV's queue
 * the messages the other holds past KV's deadline, which for a backlog are all it holds (the
 * deadline runs from the enqueue time). Run one consume() a queue, with `concurrency` for handlers
 * in parallel, and make the handler idempotent (for example, key what you store by `did` +
 * `commit.rev` + `commit.rkey`, or by `seq`).
 *
 * A handler of a fresh delivery must finish within {@link ACK_DEADLINE_MS} of it (default
 * `handlerTimeout` 3 s): consume() measures handlers, holds no more messages than it can finish in
 * time, and parks the rest, whose handlers then get all of `handlerTimeout`.
 *
 * Bad options (a value out of range, a name that is not an option, a queue name that a sync would
 * refuse) are rejected with a `UsageError` that names them, before anything is opened.
 *
 * @example
 * ```ts
 * import { consume } from "@jetfill/jetfill";
 * const controller = new AbortController();
 * Deno.addSignalListener("SIGINT", () => controller.abort());
 * await Deno.mkdir("./out", { recursive: true });
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
  // Until empty, a database that does not exist is a mistyped path, not a queue to wait for; and
  // a sync, not a consumer, makes the folder it goes in.
  const file = path === undefined ? undefined : localDatabasePath(path);
  if (file !== undefined && !(await databaseExists(file))) {
    if (options.untilEmpty) {
      throw new UsageError(
        `Cannot consume as the database ${
          JSON.stringify(path)
        } does not exist or is an empty file (check 'kv' and 'queueName')`,
      );
    }
    const folder = dirname(file);
    if (!(await pathExists(folder))) {
      throw new UsageError(
        `Cannot consume as neither the database ${JSON.stringify(path)} nor its folder ${
          JSON.stringify(folder)
        } exists (check the path): a consumer waits for a sync only in an existing folder`,
      );
    }
  }
  const consumer = new Consumer(options, queue);
  const started = performance.now();
  const onAbort = () => consumer.stop("aborted");
  if (options.signal?.aborted) consumer.stop("aborted");
  options.signal?.addEventListener("abort", onAbort, { once: true });
  try {
    if (typeof options.kv === "object" && options.kv !== null) {
      const kv = await ensureOpenKv(options.kv, "consume");
      if (options.untilEmpty) await refuseUnknownQueue(kv, queue, "the database");
      attach(kv, consumer);
      try {
        await session(consumer, kv, performance.now(), false);
      } finally {
        detach(kv, consumer);
      }
    } else {
      await requireWritable(path!, "Cannot consume", "consume() records in it each message it takes");
      while (!consumer.stopReason) {
        const kv = await openKvAt(path!);
        if (consumer.result.sessions === 0 && options.untilEmpty) {
          await refuseUnknownQueue(kv, queue, path!).catch((err) => {
            kv.close();
            throw err;
          });
        }
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
  consumer.useKv(kv);
  while (true) {
    // Parked messages that a stopped or crashed consumer left go in seq order with the rest.
    if (!consumer.stopReason) await consumer.adopt(kv);
    consumer.pump();
    const now = performance.now();
    if (consumer.finished(now)) {
      await consumer.leave(kv);
      // A delivery that came meanwhile is parked before the database closes.
      if (consumer.finished(performance.now())) return;
      continue;
    }
    await consumer.keepAlive(kv);
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
        // Retries and parked messages to take over are news it waits for: the time runs from when the last is due.
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
      // deliver messages retried: closing then could catch one in flight.
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
