/**
 * The per-frame hot path of a sync: decode (zstd), parse, map v2 frames, check the shape, apply the
 * window and deduplication, select, batch, and hand full batches to the writer. One connection at a
 * time; the reconnect loop is in `../source.ts`.
 *
 * @module
 */
import { describeEvent, FUTURE_SLACK_US, type JetstreamEvent, shapeProblem } from "../jetstream/events.ts";
import { type Connection, type Frame, InvalidTextFrame, OversizedFrame } from "../jetstream/socket.ts";
import { utf8Length, utf8Text } from "../jetstream/utf8.ts";
import { mapV2Frame, V2_HOSTS, type V2Frame } from "../jetstream/v2.ts";
import { DEFAULT_MAX_DECODED_BYTES, startsAsZstdFrame, ZstdDecodeError } from "../jetstream/zstd.ts";
import type { BackfillSyncOptions } from "../options.ts";
import type { SkipReason } from "../stats.ts";
import {
  coverageGap,
  DRAIN_WAIT_MS,
  endAwait,
  type RunContext,
  searchCanGoFurther,
  type SeqState,
  type Session,
  stopWith,
  withdrawGap,
} from "./context.ts";
import type { ReplayGuard } from "./filter.ts";
import { OversizedEventError } from "./batch.ts";
import { isoFromUs } from "../time.ts";
import { delay } from "../async.ts";

/** Handles a v2 info, error or other non-event frame; true when the connection is done. */
function handleV2Frame(ctx: RunContext, session: Session, m: Exclude<V2Frame, { type: "event" }>): boolean {
  switch (m.type) {
    case "info":
      session.infoFrames++;
      ctx.report({ reason: "info", message: `${m.name}: ${m.message}`, instance: session.base });
      if (m.name === "OutdatedCursor" && session.requestedUs !== undefined) {
        session.outdatedFrom = { fromUs: session.requestedUs, sentUs: session.sentUs };
      }
      // The host's history begins after the cursor: a search looks no further back there.
      if (m.name === "OutdatedCursor" && ctx.search !== undefined) {
        ctx.search.historyMet = true;
      }
      return false;
    case "error":
      session.errorFrame = true;
      ctx.report({
        reason: "retry",
        message: `server error ${m.error}: ${m.message}`,
        instance: session.base,
      });
      return false;
    case "invalid":
      ctx.stats.skip("missing_fields");
      ctx.report({ reason: "missing_fields", message: `v2 frame ${m.reason}`, instance: session.base });
      return false;
    default:
      return false;
  }
}

/**
 * Whether a search looks for a record stored before and has not lined the streams up yet (see
 * `RunContext.search`): this instance's `time_us` may run behind by more than the run is long, so
 * that events before the start by its clock are records stored. (Those that are not are left out
 * all the same, new events near the start being left out while it looks.)
 */
function lookingBack(ctx: RunContext): boolean {
  return ctx.search !== undefined && !ctx.search.linedUp;
}

/**
 * Whether a new event on a resume on another instance, or after a failover, is stored while no
 * record stored before was recognised yet (see `RunContext.awaitStoredUntilUs` and
 * `awaitDropsBelowUs`). Once the wait is over, a coverage warning says that none came, when one was
 * expected, or that new events were left out.
 */
function storedYet(ctx: RunContext, t: number, instance: string): boolean {
  if (t < ctx.awaitStoredUntilUs) {
    if (t >= ctx.awaitDropsBelowUs) return true;
    ctx.awaitDropped++;
    return false;
  }
  const { awaitWarns: warns, awaitDropped: dropped, awaitDropsBelowUs: dropsBelowUs } = ctx;
  endAwait(ctx);
  if (!warns && dropped === 0) return true;
  const host = new URL(instance).host;
  const left = dropped === 0
    ? ""
    : `${dropped} new event${dropped === 1 ? "" : "s"} before ${isoFromUs(dropsBelowUs)} ${
      dropped === 1 ? "was" : "were"
    } left out, as the first instance may have had ${dropped === 1 ? "it" : "them"} before the start`;
  ctx.report({
    reason: "coverage",
    message: !warns
      ? `on ${host}, ${left} (no record stored before was within the rewind, to line the two instances' time_us up); they may be missing`
      : dropped > 0
      ? `none of the records stored last came again on ${host} up to ${
        isoFromUs(t)
      }; ${left}, so events just before may be missing`
      : `none of the records stored last came again on ${host} up to ${
        isoFromUs(t)
      }: it lacks them, or its time_us run more than ${
        Math.max(ctx.o.rewindUs, ctx.searchedUs) / 1_000_000
      } s behind the other instance's (the stream was taken up too late${
        ctx.searchedUs > 0 ? `, even ${ctx.searchedUs / 1_000_000} s before` : ""
      }); either way, events around them may be missing`,
    instance,
  });
  return true;
}

/** The content key of the event last checked by `guard`, as `RunContext.sentWhileAwaiting` holds it. */
function lastKey(guard: ReplayGuard): string {
  return `${guard.lastB},${guard.lastA}`;
}

/** What a message too large to read was, as far as its start says. */
function oversizedFrameMessage(frame: OversizedFrame): string {
  const at = frame.binary ? undefined : /"time_us":(\d+)/.exec(new TextDecoder().decode(frame.head))?.[1];
  return `${
    frame.binary ? "binary frame" : `event ${at ? `at time_us ${at} ` : ""}`
  }of ${frame.byteLength} bytes is over the ${frame.limit}-byte limit of a message the connection reads; skipped unread`;
}

/** What an event over `maxEventBytes` was. */
function oversizedEventMessage(event: JetstreamEvent, size: number, chars: boolean, limit: number): string {
  return `${describeEvent(event)} of ${
    chars ? `${size} characters (so at least as many bytes)` : `${size} bytes`
  } is over the ${limit}-byte event limit (--max-event-bytes / maxEventBytes); skipped`;
}

/**
 * What is wrong with an event that {@link shapeProblem} refuses (`maxTimeUs` as given to it), said
 * before its text.
 */
function shapeExplanation(problem: SkipReason, maxTimeUs: number, value: unknown): string {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return "not a JSON object:";
  return `${explainProblem(problem, maxTimeUs)} in`;
}

/** What is wrong with an event object that {@link shapeProblem} refuses. */
function explainProblem(problem: SkipReason, maxTimeUs: number): string {
  switch (problem) {
    case "unknown_kind":
      return "unknown kind";
    case "bad_time":
      return `time_us that no server could have given (no integer of µs, before 2001, or over a day ahead of this machine's clock, ${
        isoFromUs(maxTimeUs - FUTURE_SLACK_US)
      })`;
    case "bad_value":
      return "a value no Jetstream sends (a did not of the form did:METHOD:ID, an operation other than create, update or delete, an empty collection or rkey, a rev that is not text, or a relay time or seq that is not text or a number)";
    default:
      return "missing fields";
  }
}

/**
 * How far before the start an event that a v2 host sends after events in the window must be for
 * {@link tellBackdated}: a margin, so that an event a little before the start is not taken for an
 * import, whose display times are hours or years earlier.
 */
const BACKDATED_US = 60_000_000;

/**
 * Compressed frames in a row that cannot be decoded (corrupt by the dictionary's reading) after
 * which a run stops: frames made with another dictionary and without its ID fail that way, every
 * one of them.
 */
const UNDECODABLE_STOP = 20;

/** What to do about frames compressed with a dictionary this run does not have. */
function wrongDictionaryAdvice(v2: boolean): string {
  // On /subscribe only Jetstream's legacy dictionary is taken: no other could be given.
  return `${
    v2
      ? "give the dictionary this host uses (--zstd-dictionary / zstdDictionary), or sync"
      : "this host compresses with a dictionary other than Jetstream's legacy one: sync"
  } without compression (without --compress / compress: true; on a resume, with --no-compress)`;
}

/**
 * Says once a run that a v2 host sent, after events within the window, one whose display time
 * (`time_us`) is before the start: an operator's import of older records (protocol doc §3.2), which
 * the window, going by `time_us`, leaves out like the filters do.
 */
function tellBackdated(ctx: RunContext, instance: string, t: number): void {
  ctx.toldBackdated = true;
  ctx.report({
    reason: "coverage",
    message: `${
      new URL(instance).host
    } sends, after events from the start on, events whose display time is before the start (the first: ${
      isoFromUs(t)
    }, an import of older records, protocol doc §3.2); the window goes by time_us (display time), so they are left out, as the filters leave events out`,
    instance,
  });
}

/** The first event after an OutdatedCursor shows where the server's history starts. */
function noteOutdated(ctx: RunContext, session: Session, firstUs: number): void {
  const { fromUs, sentUs } = session.outdatedFrom!;
  session.outdatedFrom = undefined;
  // The requested start when nothing came before it, in this run or the one it resumes.
  coverageGap(
    ctx,
    session.base,
    fromUs,
    firstUs,
    ctx.stats.lastProcessedUs === null && ctx.accepted === 0,
    sentUs,
  );
}

/**
 * How long a part-filled batch waits for more records before it is committed as it is: a quiet
 * stream's records are stored, visible to consumers and safe from a crash within about this long,
 * not only once `batchSize` of them have come.
 */
export const FLUSH_AFTER_MS = 1000;

/** How often a connection's reader looks for a part-filled batch that is due (ms). */
const FLUSH_CHECK_MS = 250;

/** The timer that commits a due part-filled batch while the reader waits (see readConnection). */
interface Flusher {
  /** The reader is parked, waiting for frames: a flush cannot come between its batches. */
  waiting: boolean;
  /** The flush in progress, which the reader's next commit waits for. */
  flushing: Promise<void> | undefined;
  timer: ReturnType<typeof setInterval>;
}

// At module level, so that the hot loop's own variables are not captured by the timer's closure
// (captured variables live in a context object, slower to reach on every event).
function startFlusher(ctx: RunContext): Flusher {
  const { batcher } = ctx;
  const flusher: Flusher = { waiting: false, flushing: undefined, timer: 0 as unknown as Flusher["timer"] };
  flusher.timer = setInterval(() => {
    if (
      !flusher.waiting || flusher.flushing || ctx.stop || batcher.records === 0 ||
      performance.now() - batcher.startedAt < FLUSH_AFTER_MS
    ) return;
    flusher.flushing = ctx.writer.add(batcher.take()!).catch((err) => {
      ctx.error ??= `could not store a batch: ${err instanceof Error ? err.message : String(err)}`;
      stopWith(ctx, "error");
    }).finally(() => flusher.flushing = undefined);
  }, FLUSH_CHECK_MS);
  return flusher;
}

/**
 * How close to this machine's clock (µs) a legacy connection's replay comes before its switch to
 * live is watched for: from the first event processed that close, the point is moved on each time
 * the stream comes SEAM_STEP_US closer to this machine's clock (see passOverSeam). Wide enough for a
 * server's clock some seconds behind this machine's.
 */
const SEAM_EDGE_US = 10_000_000;
/**
 * How much closer to this machine's clock (µs) the stream must come to move the point on: the stream
 * stops coming closer once the server has switched to live (a step at the switch itself, as the
 * newest event is sent then), while a stall of this machine's only takes it further away.
 */
const SEAM_STEP_US = 250_000;
/**
 * How long after the point's last move the second pass over the switch is made (ms): by then the
 * stream has been as close to live as it comes for a while, past the switch even where the server
 * replays slowly or this machine's clock is behind or ahead of the server's.
 */
const SEAM_PASS_AFTER_MS = 10_000;
/**
 * On a connection that ends sooner (it dropped, or the run's end came), the pass is made once this
 * long has gone by since the point's last move (ms): the live edge is then some seconds past what
 * the pass reads.
 */
const SEAM_PASS_AT_END_MS = 5_000;
/**
 * How far past the point the second pass reads at least (µs): the switch sends the newest event, so
 * the stream comes closer to live by up to a second there and the point moves to it; the skipped
 * events are before it. (Not much further: made SEAM_PASS_AT_END_MS after the point, the pass must
 * stay some seconds behind live, where the server skips nothing.)...
 */
const SEAM_AFTER_US = 2_000_000;
/**
 * ...and up to this far behind the newest event the connection processed (µs), so that a switch a
 * little after the point (a replay closing in on live too slowly to move it) is passed too, while the
 * pass stays behind live, where the server skips nothing...
 */
const SEAM_BEHIND_NEWEST_US = 3_000_000;
/** ...but no further past the point than this (µs). */
const SEAM_AFTER_MAX_US = 30_000_000;
/**
 * How far before the point the second pass begins (µs): a point moved late (this machine processing
 * events some seconds after the server sent them) is still passed over. From the newest event before
 * the frames that moved it when that is earlier (a narrow filter's), but never more than
 * SEAM_BEFORE_MAX_US.
 */
const SEAM_BEFORE_US = 15_000_000;
const SEAM_BEFORE_MAX_US = 60_000_000;
/** A jump forward in a connection's stream that the second pass reads from before (µs; see Seam.jumps)... */
const SEAM_JUMP_US = 100_000;
/**
 * ...when it is no further before the point than this (µs): a switch read that late from the server's
 * outbox is passed over, while a bursty stream's pauses do not make every pass as long as it can be
 * (the main connection is not read meanwhile).
 */
const SEAM_JUMP_REACH_US = 30_000_000;
/** How long the second pass may take (ms). */
const SEAM_PASS_MS = 30_000;

/** Where a legacy connection's replay came near live (see passOverSeam). */
interface Seam {
  /**
   * The newest event processed when the stream last came SEAM_STEP_US closer to this machine's clock
   * (at first, the first event within SEAM_EDGE_US of it).
   */
  us: number;
  /** The highest time_us processed on the connection before the frames that brought it (-1: none). */
  beforeUs: number;
  /** When it came (performance.now()). */
  at: number;
  /** How far behind this machine's clock the stream was then (µs; below zero: ahead). */
  lagUs: number;
  /**
   * Pairs of (time_us, records stored by the run then) on the connection, about one a second of its
   * stream, oldest first: the pass begins no earlier than the replay guard remembers.
   */
  marks: number[];
  /**
   * Pairs of (time_us, time_us) of the connection's jumps forward of SEAM_JUMP_US or more, from the
   * newest event before to the event: the latest 16 to 32 of them.
   */
  jumps: number[];
  /**
   * How far a pass on the connection read to (µs; -1: none did): every selected event up to it is
   * stored, so a pass after it reads from there.
   */
  readToUs: number;
}

/**
 * A second pass over a legacy server's replay-to-live switch. While a subscriber replays, the legacy
 * server already sends it live events once it is within a second of them, and then skips the older
 * ones it had still to replay (they are at or below the last time it sent): up to about a second of
 * events lost, with no sign (protocol doc §5.2, jetstream-legacy#42). A reconnect's rewind recovers
 * them only if the connection drops. So once the stream is well past the switch, a short connection
 * replays from a little before it to a little after it, far behind live (where nothing is skipped),
 * and the selected events the replay guard does not know are stored, after later ones. Reported when
 * it finds any, or cannot be made. Made after the run's end came too (`ctx.stop` "end"): then only
 * the user's signal cuts it short. After the connection `dropped`, it reads no further than the
 * newest event the connection had: what came after was not sent yet, not skipped, and the reconnect
 * brings it.
 */
async function passOverSeam(
  ctx: RunContext,
  session: Session,
  select: (ev: JetstreamEvent) => boolean,
  guard: ReplayGuard,
  seam: Seam,
  flusher: Flusher,
  signal: AbortSignal | undefined,
  dropped = false,
): Promise<void> {
  const { o } = ctx;
  // (A stop that came before the pass, the run's end, does not end it; one that comes during it does.)
  const stopAtStart = ctx.stop;
  const halted = () => ctx.stop !== stopAtStart;
  let before = seam.beforeUs >= 0
    ? Math.min(seam.beforeUs, seam.us - SEAM_BEFORE_US)
    : seam.us - SEAM_BEFORE_US;
  // From before a jump forward in the stream too (the switch sends the newest event, past the ones it
  // skips): when this machine read the switch from a backlog, some seconds late, the point came to
  // rest further on than the 15 s reach back.
  for (let i = 0; i < seam.jumps.length; i += 2) {
    if (seam.jumps[i + 1] >= seam.us - SEAM_JUMP_REACH_US) before = Math.min(before, seam.jumps[i]);
  }
  // Not before the connection's own cursor (the switch came after it), nor, on a live tail, before its
  // first event; and no further back than the replay guard remembers the records stored since (with a
  // fifth to spare), or what it forgot would be stored again.
  let fromUs = Math.max(before, seam.us - SEAM_BEFORE_MAX_US, session.sentUs, seam.readToUs);
  const tail = ctx.writer.tailFrom;
  if (o.startUs === undefined && tail !== undefined && tail.instance === session.base) {
    fromUs = Math.max(fromUs, tail.us);
  }
  const room = o.dedupeWindow * 0.8;
  for (let i = 0; i < seam.marks.length; i += 2) {
    if (ctx.accepted - seam.marks[i + 1] <= room) {
      fromUs = Math.max(fromUs, seam.marks[i]);
      break;
    }
  }
  let toUs = Math.max(
    seam.us + SEAM_AFTER_US,
    Math.min(session.maxUs - SEAM_BEHIND_NEWEST_US, seam.us + SEAM_AFTER_MAX_US),
  );
  // (Then the pass is done at the newest event, which comes again.)
  if (dropped) toUs = Math.min(toUs, session.maxUs - 1);
  const host = new URL(session.base).host;
  const where = `the replay-to-live switch near ${isoFromUs(seam.us)}`;
  // The pass has read far enough once an event past toUs comes. When the connection had none (a few
  // DIDs' or a rare collection's stream, quiet since), the pass might wait for one until it is cut
  // off, and warn. It then reads in two legs: with the run's filter up to the newest event the
  // connection had, which comes again, and from there with none (those selected are picked here), a
  // stream that comes past toUs in seconds.
  // (A leg with nothing to read is left out: a pass after another can begin past toUs.)
  const legs =
    (session.maxUs > toUs || (o.wantedDids.length === 0 && o.wantedCollections.length === 0)
      ? [{ fromUs, doneAtUs: toUs + 1, unfiltered: false }]
      : [
        { fromUs, doneAtUs: session.maxUs, unfiltered: false },
        { fromUs: Math.max(fromUs, session.maxUs), doneAtUs: toUs + 1, unfiltered: true },
      ]).filter((leg) => leg.fromUs < leg.doneAtUs);
  const passEndsAt = performance.now() + SEAM_PASS_MS;
  let found = 0;
  let reached = true;
  let openError: unknown;
  for (const leg of legs) {
    reached = false;
    let conn: Connection;
    try {
      conn = await ctx.openSeamPass!(
        session.base,
        leg.fromUs,
        leg.unfiltered,
        stopAtStart ? signal : ctx.internal.signal,
      );
    } catch (err) {
      openError = err;
      break;
    }
    const deadline = setTimeout(() => conn.close(), Math.max(0, passEndsAt - performance.now()));
    try {
      const done = await readPassLeg(ctx, conn, leg, session, select, guard, flusher, halted);
      found += done.found;
      reached = done.reached;
    } finally {
      clearTimeout(deadline);
      conn.close();
      await conn.closed();
    }
    if (!reached) break;
  }
  if (found > 0) {
    ctx.report({
      reason: "connection",
      message: `on ${host}, a second pass over ${where} found ${found} selected event${
        found === 1 ? "" : "s"
      } the connection was not sent (jetstream-legacy#42): stored, after later ones`,
      instance: session.base,
    });
  }
  if (reached) {
    seam.readToUs = toUs;
  } else if (halted() || signal?.aborted) {
    // Stopped during the pass (its limit, its time, the user, a failure): said, as a pass the run
    // stopped before is.
    ctx.report({
      reason: "coverage",
      message: `on ${host}, the run stopped during the second pass over ${where}, before it read to ${
        isoFromUs(toUs)
      }: events a legacy server skips there (jetstream-legacy#42) may be missing${
        ctx.stop === "limit" ? " from the records stored" : ""
      }, and a resume does not go back to them`,
      instance: session.base,
    });
  } else if (openError !== undefined) {
    ctx.report({
      reason: "coverage",
      message: `on ${host}, could not make a second pass over ${where} (${
        (openError as Error).message
      }): events a legacy server skips there (jetstream-legacy#42) may be missing`,
      instance: session.base,
    });
  } else {
    ctx.report({
      reason: "coverage",
      message: `on ${host}, the second pass over ${where} ended (or was cut off after ${
        SEAM_PASS_MS / 1000
      } s) before ${
        isoFromUs(toUs)
      }: events a legacy server skips there (jetstream-legacy#42) may be missing`,
      instance: session.base,
    });
  }
}

/**
 * Reads one leg of a second pass (see passOverSeam): the selected events from `leg.fromUs` on that
 * the replay guard does not know are stored, until an event at or after `leg.doneAtUs` comes
 * (`reached`), the connection ends or the run stops.
 */
async function readPassLeg(
  ctx: RunContext,
  conn: Connection,
  leg: { fromUs: number; doneAtUs: number },
  session: Session,
  select: (ev: JetstreamEvent) => boolean,
  guard: ReplayGuard,
  flusher: Flusher,
  halted: () => boolean,
): Promise<{ reached: boolean; found: number }> {
  const { o, stats, batcher } = ctx;
  const endUs = o.endUs ?? Number.POSITIVE_INFINITY;
  let found = 0;
  read: for (;;) {
    const frames = await conn.next();
    if (frames === null || halted()) break;
    const sizes = conn.frameBytes;
    for (let i = 0; i < frames.length; i++) {
      const frame = frames[i];
      stats.messagesReceived++;
      stats.bytesReceived += sizes?.[i] ?? frameLength(frame);
      let text: string | undefined;
      if (typeof frame === "string") text = frame;
      else if (session.decode && (frame instanceof Uint8Array || frame instanceof ArrayBuffer)) {
        try {
          text = utf8Text(session.decode(frame instanceof Uint8Array ? frame : new Uint8Array(frame)));
        } catch {
          // (Counted and reported by the stream's own connection, which had the same frame.)
        }
      }
      if (text === undefined) continue;
      let ev: JetstreamEvent;
      try {
        ev = JSON.parse(text);
      } catch {
        continue;
      }
      if (shapeProblem(ev) !== undefined) continue;
      const t = ev.time_us;
      if (t >= leg.doneAtUs) return { reached: true, found };
      if (t < leg.fromUs || t < session.startUs || t >= endUs || !select(ev)) continue;
      if (guard.repeats(ev)) {
        stats.duplicatesDropped++;
        continue;
      }
      if (utf8Length(text) > o.maxEventBytes) {
        stats.skip("oversized");
        ctx.report({
          reason: "oversized",
          message: oversizedEventMessage(ev, utf8Length(text), false, o.maxEventBytes),
          instance: session.base,
        });
        continue;
      }
      let full: boolean;
      try {
        batcher.seenUs = session.maxUs;
        full = batcher.add(
          ev,
          text,
          stats.dayOf(t),
          ev.kind === "commit" ? ev.commit.collection : undefined,
        );
      } catch (err) {
        if (!(err instanceof OversizedEventError)) throw err;
        stats.skip("oversized");
        ctx.report({ reason: "oversized", message: err.message, instance: session.base });
        continue;
      }
      batcher.noteKey(t, guard.lastB, guard.lastA);
      ctx.accepted++;
      found++;
      if (ctx.accepted >= o.numRecords) {
        // (After the end: the limit is reached too, and the end stays the reason.)
        stopWith(ctx, "limit");
        break read;
      }
      if (full) {
        const batch = batcher.take()!;
        if (flusher.flushing) await flusher.flushing;
        await ctx.writer.add(batch);
      }
      if (halted()) break read;
    }
  }
  return { reached: false, found };
}

/** The frames `pending` brings, or undefined if `ms` go by first (`pending` is then still to come). */
function framesOrTimeout<T>(pending: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms));
  return Promise.race([pending, timeout]).finally(() => clearTimeout(timer));
}

/** A frame's payload size: bytes, or for text from a transport that does not count them, characters. */
function frameLength(frame: Frame): number {
  return typeof frame === "string" ? frame.length : frame.byteLength;
}

/**
 * Reads one connection until it ends or the run stops. A batch whose first record is
 * {@link FLUSH_AFTER_MS} old is committed as it is while the reader waits for frames.
 */
export async function readConnection(
  ctx: RunContext,
  conn: Connection,
  session: Session,
  select: (ev: JetstreamEvent) => boolean,
  guard: ReplayGuard,
  seq: SeqState,
  options: BackfillSyncOptions,
): Promise<void> {
  const { o, stats, batcher } = ctx;
  const { base, decode, floorUs, floorKnown, seqFloor } = session;
  const endUs = o.endUs ?? Number.POSITIVE_INFINITY;
  let startUs = session.startUs;
  const skip = (reason: SkipReason, message: string) => {
    stats.skip(reason);
    ctx.report({ reason, message, instance: session.base });
  };
  // Frames in a row that named another dictionary, that could not be decoded for any reason, and,
  // of those, that were not zstd frames at all.
  let mismatches = 0;
  let undecodable = 0;
  let notZstd = 0;
  // New records a search left out on this connection before a record stored came (see RunContext.search).
  let leftOut = 0;
  let askedSeq = session.askedSeq;
  // On a v2 host: whether an event at or after the time floor has come (on this connection, or,
  // taken up by seq, on the host since it was taken up by time: see SeqState.floorReached).
  let reachedFloor = seqFloor >= 0 && seq.floorReached !== false;
  // On a v2 host: whether an event at or after the start has come on this connection.
  let inWindow = false;
  // A part-filled batch that is due is committed by a timer, and only while the loop waits for
  // frames: the loop itself is then parked, and before its own next commit it waits for that one,
  // so batches stay in order. (Racing each wait against a timer instead cost a third of the
  // throughput with KV on disk.)
  const flusher = startFlusher(ctx);
  // A legacy host's replay by time comes to live through its replay-to-live switch: watched for,
  // and passed over a second time (see passOverSeam).
  let seam: Seam | undefined;
  // (Not a v2 host's: the v2 server has no such switch, on either wire, protocol doc §5.2.)
  let seamPassed = session.v2 || V2_HOSTS.includes(new URL(session.base).hostname) || session.sentUs < 0 ||
    ctx.openSeamPass === undefined;
  // (See Seam.marks and Seam.jumps: kept on a connection whose switch is watched for.)
  const watched = !seamPassed;
  const marks: number[] = [];
  const jumps: number[] = [];
  let markedUs = Number.NEGATIVE_INFINITY;
  let failed = false;
  // During a drain (the user's stop): since when nothing was stored, and what had been by then.
  let drainQuietFrom: number | undefined;
  let drainAccepted = 0;
  let pending = conn.next();
  try {
    for (;;) {
      // The second pass, once due (not during a failover's search). Due while no frame comes (a
      // narrow filter's stream, live), it is made on time: the wait is raced against it, only then.
      const passInMs = seam !== undefined && !seamPassed
        ? seam.at + SEAM_PASS_AFTER_MS - performance.now()
        : Number.POSITIVE_INFINITY;
      if (passInMs <= 0 && ctx.awaitStoredUntilUs < 0 && !ctx.stop) {
        seamPassed = true;
        await passOverSeam(ctx, session, select, guard, seam!, flusher, options.signal);
        if (ctx.stop) return;
        continue;
      }
      flusher.waiting = true;
      const got = passInMs > 0 && passInMs < Number.POSITIVE_INFINITY
        ? await framesOrTimeout(pending, passInMs)
        : await pending;
      flusher.waiting = false;
      // (The pass is due; the frames asked for are still to come.)
      if (got === undefined) continue;
      if (got === null) return;
      const frames = got;
      const sizes = conn.frameBytes;
      if (ctx.stop) return;
      if (ctx.draining) {
        const now = performance.now();
        if (drainQuietFrom === undefined || ctx.accepted !== drainAccepted) {
          drainQuietFrom = now;
          drainAccepted = ctx.accepted;
        } else if (now - drainQuietFrom > DRAIN_WAIT_MS) {
          // A server that goes on sending what this run does not store (frames it skips, events its
          // filters leave out), the close ignored, is given up as one that does not answer is: the
          // frames read so far are still taken.
          conn.close();
        }
      }
      // The latest time_us a server could give (see shapeProblem), once for the frames read together.
      const nowUs = Date.now() * 1000;
      const maxTimeUs = nowUs + FUTURE_SLACK_US;
      let seamEdgeUs = seamPassed || seam !== undefined ? Number.POSITIVE_INFINITY : nowUs - SEAM_EDGE_US;
      // (The newest time_us before these frames: where a switch among them may have skipped from.)
      const maxBeforeUs = session.maxUs;
      if (watched && session.maxUs >= markedUs + 1_000_000) {
        markedUs = session.maxUs;
        marks.push(markedUs, ctx.accepted);
        // (A long replay: the first ones are of no use, a pass reads about a minute at most.)
        if (marks.length > 1024) marks.splice(0, 512);
      }
      // Counted as the loop takes them, as the original did: frames read ahead of a stop are not
      // "received" by the run.
      for (let i = 0; i < frames.length; i++) {
        const frame = frames[i];
        stats.messagesReceived++;
        // Counted with the message, as it is: payload bytes as sent (a text frame's in UTF-8 when
        // the transport knows them), not those of frames read ahead of a stop.
        stats.bytesReceived += sizes?.[i] ?? frameLength(frame);
        let text: string;
        // The text's UTF-8 length, when known: it makes sizing cheaper.
        let utf8Bytes: number | undefined;
        if (typeof frame === "string") {
          text = frame;
          utf8Bytes = sizes?.[i];
          // A run that asked for compression and got text frames (a connection that fell back to
          // none): counted as decoded too, so that the two counts give the ratio of the whole run.
          if (o.compress) stats.bytesDecoded += utf8Bytes ?? frame.length;
        } else if (frame instanceof InvalidTextFrame) {
          skip("invalid_utf8", `text frame of ${frame.byteLength} bytes is not valid UTF-8`);
          continue;
        } else if (frame instanceof OversizedFrame) {
          skip("oversized", oversizedFrameMessage(frame));
          continue;
        } else if (decode) {
          const binary = frame instanceof Uint8Array ? frame : new Uint8Array(frame);
          try {
            const raw = decode(binary);
            mismatches = 0;
            undecodable = 0;
            notZstd = 0;
            stats.bytesDecoded += raw.byteLength;
            const decoded = utf8Text(raw);
            if (decoded === undefined) {
              skip("invalid_utf8", `decompressed frame of ${raw.byteLength} bytes is not valid UTF-8`);
              continue;
            }
            text = decoded;
            utf8Bytes = raw.byteLength;
          } catch (err) {
            if (err instanceof ZstdDecodeError && err.reason === "too-large") {
              // An event over any size this run stores: the event limit's business, not a bad frame.
              skip(
                "oversized",
                `frame of ${frame.byteLength} bytes decodes to more than ${DEFAULT_MAX_DECODED_BYTES} bytes, ${
                  o.maxEventBytes < DEFAULT_MAX_DECODED_BYTES
                    ? `over the ${o.maxEventBytes}-byte event limit (--max-event-bytes / maxEventBytes)`
                    : "the most a compressed frame is decoded to"
                }`,
              );
              continue;
            }
            if (err instanceof ZstdDecodeError && err.reason === "dictionary-mismatch" && ++mismatches >= 5) {
              // Frame after frame naming another dictionary: a wrong dictionary, not a bad frame.
              stats.skip("decode_failed");
              throw new Error(`${err.message}; ${wrongDictionaryAdvice(session.v2)}`);
            }
            if (err instanceof ZstdDecodeError) notZstd = startsAsZstdFrame(binary) ? 0 : notZstd + 1;
            if (err instanceof ZstdDecodeError && ++undecodable >= UNDECODABLE_STOP) {
              stats.skip("decode_failed");
              // Binary frames that are not zstd at all: no dictionary would decode them.
              if (notZstd >= UNDECODABLE_STOP) {
                throw new Error(
                  `${UNDECODABLE_STOP} binary frames in a row were not zstd frames (the last: ${err.message}): this host does not send Jetstream's zstd-compressed frames; sync without compression (without --compress / compress: true; on a resume, with --no-compress)`,
                );
              }
              // Frames without a dictionary ID made with another dictionary fail as corrupt: a
              // connection's frames are whole (TCP, TLS), so so many in a row are the dictionary's fault.
              throw new Error(
                `${UNDECODABLE_STOP} frames in a row could not be decoded (the last: ${err.message}): the dictionary does not fit this host's frames; ${
                  wrongDictionaryAdvice(session.v2)
                }`,
              );
            }
            skip(
              "decode_failed",
              `frame of ${frame.byteLength} bytes could not be decoded: ${(err as Error).message}`,
            );
            continue;
          }
        } else {
          skip(
            "binary_frame",
            `unexpected binary frame of ${frame.byteLength} bytes on an uncompressed connection`,
          );
          continue;
        }
        // In bytes of UTF-8: counted only when the characters alone do not settle it.
        // A v2 frame over the limit is not yet an event over it: the envelope around the event is
        // not stored, so the event is measured once mapped, below (only for such frames).
        let frameOver = false;
        // An event over the limit is parsed all the same (the transport bounds what it holds), so
        // that the window, the end and the filters apply to it as to any other: it is skipped, and
        // counted, only if the run selects it (one that the filters leave out is no loss).
        let over: { bytes: number; chars: boolean } | undefined;
        if (text.length * 3 > o.maxEventBytes) {
          const bytes = utf8Bytes ?? (text.length > o.maxEventBytes ? text.length : utf8Length(text));
          if (bytes > o.maxEventBytes && session.v2) frameOver = true;
          else if (bytes > o.maxEventBytes) over = { bytes, chars: bytes === text.length };
        }
        let ev: JetstreamEvent;
        // Set for an event mapped from a v2 frame: see Batcher.add().
        let shorterBy: number | undefined;
        try {
          ev = JSON.parse(text);
        } catch {
          skip("malformed_json", `frame is not JSON: ${text.slice(0, 80)}`);
          continue;
        }
        if (session.v2) {
          const m = mapV2Frame(ev);
          if (m.type !== "event") {
            if (handleV2Frame(ctx, session, m)) return;
            continue;
          }
          ev = m.event;
          // The batcher sizes the event from its frame's text, which stands for the stored JSON.
          shorterBy = m.shorterBy;
          if (session.outdatedFrom !== undefined) noteOutdated(ctx, session, ev.time_us);
          if (ctx.stop) return;
          if (frameOver) {
            // The limit is on the event as stored, the same on both wires.
            text = JSON.stringify(ev);
            shorterBy = undefined;
            const bytes = utf8Length(text);
            if (bytes > o.maxEventBytes) over = { bytes, chars: false };
            else utf8Bytes = bytes;
          }
        }
        const problem = shapeProblem(ev, maxTimeUs);
        if (problem) {
          skip(problem, `${shapeExplanation(problem, maxTimeUs, ev)} ${text.slice(0, 120)}`);
          continue;
        }
        const t = ev.time_us;
        const evSeq = (ev as { cursor?: unknown }).cursor;
        // The first event of a connection taken up by seq, before the end is looked at: what it
        // says of the host (numbered anew, or events lost) holds whatever its time.
        if (typeof evSeq === "number" && askedSeq !== undefined) {
          // An earlier seq than the one asked for, first, or that seq with another time_us than the
          // event the run had at it (a v2 host's event keeps its time): not the numbering the run's
          // seq came from (a new instance at the same address, which took that seq for a future one
          // and sent what is live, or numbered other events with it). Its events would look stored
          // already, or come from elsewhere in its history: the stream is taken up again by time, as
          // on another host, and what comes again is recognised by content.
          const renumbered = evSeq < askedSeq
            ? `sent seq ${evSeq} first, asked for seq ${askedSeq}`
            : evSeq === askedSeq && seq.floorUs !== undefined && t !== seq.floorUs
            ? `sent seq ${evSeq} first, as asked, but with time_us ${t}, not the ${seq.floorUs} of the event at that seq before`
            : undefined;
          if (renumbered !== undefined) {
            session.handedBack = `${
              new URL(base).host
            } ${renumbered}: its seqs are not those of the events stored from it (a new instance at the same address?), so the stream is taken up again by time`;
            seq.host = undefined;
            seq.floor = -1;
            seq.floorUs = undefined;
            seq.floorReached = false;
            return;
          }
          // The one asked for, unless the host no longer holds it. A strict run stores nothing after
          // a loss it would stop for: it waits for the measure. (The next seq first: the one asked
          // for was not sent again, but it is stored, and nothing is missing.)
          const clamped = evSeq > askedSeq + 1 && session.askedSeqSelected
            ? ctx.onSeqClamped?.(base, askedSeq + 1, evSeq)
            : undefined;
          askedSeq = undefined;
          if (clamped && o.strict) {
            await clamped;
            if (ctx.stop) return;
          }
        }
        if (t >= endUs) {
          stopWith(ctx, "end");
          return;
        }
        // Below the floor: the inclusive replay of a reconnect. Below the start: a server that
        // replays from before the requested cursor (bluesky-social/jetstream#343).
        if (typeof evSeq === "number") {
          // A v2 host: its seq orders events; time_us may not (protocol doc §3.2).
          if (evSeq <= seqFloor) {
            stats.duplicatesDropped++;
            continue;
          }
          if (seq.host !== base) {
            seq.host = base;
            seq.floor = -1;
            seq.floorUs = undefined;
            seq.floorReached = false;
          }
          if (evSeq > seq.floor) {
            seq.floor = evSeq;
            seq.floorUs = t;
          }
          // Connected by time (no seq of this host yet): the floor applies by time_us, which also
          // drops a v2 host's replay from before the cursor (#343), until the stream reaches it;
          // and so it does on the connections taken up by seq after one that dropped before then.
          // From there the host's seq order is its witness order: a later event is new whatever its
          // display time (an operator's import gives years-old ones, protocol doc §3.2), and what
          // the rewind sends again is recognised by content below.
          if (!reachedFloor) {
            if (t < floorUs || (t === floorUs && !floorKnown)) {
              stats.duplicatesDropped++;
              continue;
            }
            reachedFloor = true;
            seq.floorReached = true;
          }
          if (t < startUs && !lookingBack(ctx)) {
            if (inWindow && !ctx.toldBackdated && t < startUs - BACKDATED_US) {
              tellBackdated(ctx, session.base, t);
            }
            continue;
          }
          inWindow = true;
        } else {
          if (seq.host !== undefined) {
            // An event of a host without seqs (a legacy one, after a failover): a v2 host's last seq
            // is no longer where the run is. Going back there, the run asks by time.
            seq.host = undefined;
            seq.floor = -1;
            seq.floorUs = undefined;
          }
          if (t < floorUs || (t === floorUs && !floorKnown) || (t < startUs && !lookingBack(ctx))) {
            // (At the floor itself, with the guard knowing what was stored there, only what it knows is
            // a repeat: two events can share a time_us, and the second may not be stored yet.)
            if (t <= floorUs) stats.duplicatesDropped++;
            continue;
          }
        }
        if (t >= seamEdgeUs && evSeq === undefined) {
          seam = {
            us: t,
            beforeUs: session.maxUs,
            at: performance.now(),
            lagUs: nowUs - t,
            marks,
            jumps,
            readToUs: -1,
          };
          seamEdgeUs = Number.POSITIVE_INFINITY;
        }
        if (t > session.maxUs) {
          if (watched && t - session.maxUs >= SEAM_JUMP_US && session.maxUs >= 0) {
            jumps.push(session.maxUs, t);
            if (jumps.length > 64) jumps.splice(0, 32);
          }
          session.maxUs = t;
        }
        if (session.minUs < 0) {
          session.minUs = t;
          // A live tail begins with the first event it processes (a resume is held to it).
          if (o.startUs === undefined) ctx.writer.tailFrom ??= { us: t, instance: base };
        }
        // A rewound replay after a failover must not move the date backwards.
        if (stats.lastProcessedUs === null || t > stats.lastProcessedUs) {
          const change = stats.processed(t);
          if (change) options.onDateChange?.(change);
          // A new event: a wait that idle ends had doubled is back to idleTimeout at once, so that a
          // stall that follows is caught as soon as ever.
          if (session.idleResetMs !== undefined) {
            conn.setIdleTimeout?.(session.idleResetMs);
            session.idleResetMs = undefined;
          }
        }
        if (!select(ev)) continue;
        if (t > session.maxSelectedUs) session.maxSelectedUs = t;
        const search = ctx.search;
        if (search !== undefined) {
          // Looking for a record stored before (see `RunContext.search`); no new one is remembered
          // until one is found, so one recognised was stored (or selected) before the switch, or
          // while waiting (on an instance failed over from since, or here): only the first kind
          // lines the streams up.
          if (guard.seen(ev)) {
            stats.duplicatesDropped++;
            if (ctx.sentWhileAwaiting?.has(lastKey(guard))) continue;
            const awaited = ctx.awaited!;
            if (!search.linedUp) {
              // Records left out before it are before the start by the other instance's clock, and
              // this one's may run behind: they may be ones the other lacked. Looked for further
              // back, the same record comes first again when they are before the start here too.
              const first = awaited.first;
              if (
                leftOut > 0 && searchCanGoFurther(ctx) &&
                !(first?.on === session.base && first.b === guard.lastB && first.a === guard.lastA &&
                  first.rewindUs < search.rewindUs)
              ) {
                awaited.first = {
                  on: session.base,
                  b: guard.lastB,
                  a: guard.lastA,
                  rewindUs: search.rewindUs,
                };
                ctx.searchLeftOut = leftOut;
                ctx.searchBack = true;
                return;
              }
              // What came before it was before the start: later connections keep to its time_us,
              // and this one to the stream's order (what follows it with a smaller time_us, a
              // reorder, is within the window). Else, further back than the first rewind, this
              // instance's time_us run behind by up to the search's rewind: what follows a record
              // stored is within the window, though its time_us be that much before the start.
              if (leftOut > 0) {
                session.startUs = session.linedStartUs = batcher.hostStartUs = t;
                startUs = Number.NEGATIVE_INFINITY;
              } else if (search.rewindUs > o.rewindUs) {
                startUs =
                  session.startUs =
                  session.linedStartUs =
                  batcher.hostStartUs =
                    (o.startUs ?? Number.NEGATIVE_INFINITY) - search.rewindUs;
              }
            }
            if (guard.lastB === awaited.lastB && guard.lastA === awaited.lastA) {
              // The last record stored: the streams are lined up, and nothing before it is lacked.
              endAwait(ctx);
            } else if (!search.linedUp) {
              // Another: lined up, and the last one must come too before a new record past the
              // time processed last plus the rewind, or this instance lacks it (and perhaps the
              // events after it).
              search.linedUp = true;
              awaited.lined = { on: session.base, rewindUs: search.rewindUs };
            }
            continue;
          }
          if (search.linedUp) {
            // Lined up: what is new is stored, and the last record stored is looked for up to the
            // time processed last there plus the rewind.
            if (t >= ctx.awaitStoredUntilUs) {
              const { lastUs } = ctx.awaited!;
              endAwait(ctx);
              ctx.report({
                reason: "coverage",
                message: `on ${new URL(session.base).host}, records stored before came again, taken up ${
                  search.rewindUs / 1e6
                } s before ${isoFromUs(lastUs)}, but not the last one stored before a new record at ${
                  isoFromUs(t)
                }: it lacks it, and events between the two times may be missing`,
                instance: session.base,
              });
            }
          } else if (t < ctx.awaitDropsBelowUs) {
            // Near the start, a new record may be one the other instance had before its start (see
            // `storedYet()`): left out, but not remembered, so that it is judged again once a record
            // stored before is recognised.
            leftOut++;
            continue;
          } else {
            // The stream was taken up too late here: the next connection goes further back.
            ctx.searchBack = true;
            return;
          }
        }
        // The same content again: a replay, a rewind, or a server's re-ingest under new time_us.
        // (An event too large to store is remembered too, so that a replay does not count and
        // report it twice.)
        if (guard.repeats(ev)) {
          stats.duplicatesDropped++;
          if (ctx.gapOnTrial?.base === session.base) withdrawGap(ctx);
          // An event processed before the switch to this instance: what comes after it here is new.
          // (One this instance sent already, again after a reconnect, says nothing of that.)
          if (ctx.awaitStoredUntilUs >= 0 && !ctx.sentWhileAwaiting?.has(lastKey(guard))) {
            // After a search gave up, new records stored before this one are before a record stored
            // on the other instance: ones it lacked, or, near the start, ones it had before the start
            // (this instance's time_us run ahead of its by more than the rewind).
            const before = ctx.searchedUs > 0 ? ctx.accepted - ctx.acceptedAtGiveUp : 0;
            const searchedUs = ctx.searchedUs;
            endAwait(ctx);
            if (before > 0) {
              ctx.report({
                reason: "coverage",
                message: `on ${new URL(session.base).host}, ${before} new record${
                  before === 1 ? " was" : "s were"
                } stored before a record stored before came again (a search ${
                  searchedUs / 1e6
                } s back had given up): ones the other instance lacked, or, near the start, ones from before the start, if this one's time_us run ahead of its by more than ${
                  o.rewindUs / 1e6
                } s`,
                instance: session.base,
              });
            }
          }
          continue;
        }
        if (ctx.awaitStoredUntilUs >= 0) ctx.sentWhileAwaiting?.add(lastKey(guard));
        if (over !== undefined) {
          skip("oversized", oversizedEventMessage(ev, over.bytes, over.chars, o.maxEventBytes));
          continue;
        }
        // (Lined up by a search, what is new is stored.)
        if (ctx.awaitStoredUntilUs >= 0 && ctx.search === undefined && !storedYet(ctx, t, session.base)) {
          continue;
        }
        const collection = ev.kind === "commit" ? ev.commit.collection : undefined;
        let full: boolean;
        try {
          batcher.seenUs = session.maxUs;
          full = batcher.add(ev, text, stats.dayOf(t), collection, utf8Bytes, shorterBy);
        } catch (err) {
          if (!(err instanceof OversizedEventError)) throw err;
          // Too large for a queue message even gzipped: counted and reported, and the run goes on.
          skip("oversized", err.message);
          continue;
        }
        batcher.noteKey(t, guard.lastB, guard.lastA);
        ctx.accepted++;
        if (ctx.gapOnTrial !== undefined) ctx.gapOnTrial = undefined;
        ctx.lastStoredB = guard.lastB;
        ctx.lastStoredA = guard.lastA;
        if (ctx.accepted >= o.numRecords) {
          stopWith(ctx, "limit");
          return;
        }
        if (full) {
          const batch = batcher.take()!;
          if (flusher.flushing) await flusher.flushing;
          await ctx.writer.add(batch);
        }
        if (ctx.stop) return;
      }
      // Still coming closer to live: the switch is not behind yet (a slow replay, a server clock
      // ahead of this machine's), and the point moves on; after a pass too, which was then made too
      // soon (a replay closing in on live by less than SEAM_STEP_US in SEAM_PASS_AFTER_MS): another
      // one is due.
      if (seam !== undefined && nowUs - session.maxUs < seam.lagUs - SEAM_STEP_US) {
        seamPassed = false;
        seam.us = session.maxUs;
        seam.beforeUs = maxBeforeUs;
        seam.at = performance.now();
        seam.lagUs = nowUs - session.maxUs;
      }
      pending = conn.next();
    }
  } catch (err) {
    failed = true;
    throw err;
  } finally {
    clearInterval(flusher.timer);
    // Left behind when the run stops before the connection ends: its end is no one's error.
    pending.catch(() => {});
    // What comes next (a reconnect's flush, the run's last batch) goes after it.
    if (flusher.flushing) await flusher.flushing;
    // A switch not passed over yet, on a connection that ended (it dropped, or the run's end came):
    // once the live edge is far enough past it. (Not after a limit, a stop by time or by the user,
    // or a failure; nor during a failover's search.)
    if (
      seam !== undefined && !seamPassed && !failed && (ctx.stop === undefined || ctx.stop === "end") &&
      ctx.awaitStoredUntilUs < 0 && !ctx.draining && !options.signal?.aborted
    ) {
      seamPassed = true;
      const wait = SEAM_PASS_AT_END_MS - (performance.now() - seam.at);
      // (The user's stop ends it too: with the connection over, it has no drain to wait for.)
      const stops = [ctx.stop === "end" ? undefined : ctx.internal.signal, options.signal];
      if (wait > 0) await delay(wait, AbortSignal.any(stops.filter((s) => s !== undefined)));
      if (!options.signal?.aborted && (ctx.stop === undefined || ctx.stop === "end")) {
        await passOverSeam(
          ctx,
          session,
          select,
          guard,
          seam,
          flusher,
          options.signal,
          ctx.stop === undefined,
        );
      } else {
        seamPassed = false;
      }
    }
    // One the run stopped before (its limit, its time, the user, a failure): said, as what the server
    // skipped there may be missing, and a resume does not go back to it.
    if (seam !== undefined && !seamPassed && ctx.awaitStoredUntilUs < 0) {
      ctx.report({
        reason: "coverage",
        message: `on ${
          new URL(session.base).host
        }, the run stopped before a second pass over the replay-to-live switch near ${
          isoFromUs(seam.us)
        }: events a legacy server skips there (jetstream-legacy#42) may be missing${
          ctx.stop === "limit" ? " from the records stored" : ""
        }, and a resume does not go back to them`,
        instance: session.base,
      });
    }
  }
}
