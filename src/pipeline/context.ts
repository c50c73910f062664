/**
 * The state one sync run shares between its stages: options, counters, the writer and batcher, and
 * why it stops; plus what one connection knows about itself and the v2 sequence position.
 *
 * @module
 */
import type { ResolvedSyncOptions } from "../options.ts";
import type { StatsTracker, StopReason, SyncErrorReport } from "../stats.ts";
import type { QueueWriter } from "../queue/writer.ts";
import type { Connection } from "../jetstream/socket.ts";
import type { Batcher } from "./batch.ts";
import type { ReplayGuard } from "./filter.ts";
import { describeDuration, isoFromUs } from "../time.ts";
import { UsageError } from "../errors.ts";

/** What one connection needs to know about itself. */
export interface Session {
  /** The instance URL. */
  base: string;
  /** Whether it speaks the v2 wire. */
  v2: boolean;
  /** The zstd decoder for its binary frames. */
  decode: ((bytes: Uint8Array) => Uint8Array) | undefined;
  /** time_us already processed on this instance (inclusive replay). */
  floorUs: number;
  /**
   * Whether the replay guard knows every record stored at `floorUs` (this run stored them, or the
   * resumed checkpoint named them): events at that very time then go on to it, and only those it
   * knows are dropped. Otherwise every event at `floorUs` is taken for the replay.
   */
  floorKnown: boolean;
  /** seq already processed on this instance, or -1. */
  seqFloor: number;
  /**
   * The seq this connection asked for (its cursor), when it was taken up by seq from the last one
   * processed: a host that still holds it sends it again first (the cursor is inclusive).
   */
  askedSeq?: number;
  /**
   * Whether the event at `askedSeq` passes this connection's server-side filter, as it does when
   * this run received it: not on a resume with other DIDs, collections or kinds than the run had,
   * until it has a seq of its own. Only then does a later seq first say that events were lost.
   */
  askedSeqSelected: boolean;
  /** Events before this time_us are before the window (the start, or a little earlier: see consumeStream). */
  startUs: number;
  /**
   * Set where a search lined this instance's stream up (see RunContext.search): the start by its
   * clock, which the connections after this one keep to (`startUs` is set to it too).
   */
  linedStartUs?: number;
  /** An error frame came: the close that follows is not the end of the stream. */
  errorFrame: boolean;
  /** Why the run itself ended this connection to connect again, said with its reconnect. */
  handedBack?: string;
  /**
   * An OutdatedCursor info came: the next event shows where history starts. `fromUs` is what was
   * still needed (see {@link requestedUs}), `sentUs` the cursor sent, which the notice answers (a
   * rewind earlier).
   */
  outdatedFrom: { fromUs: number; sentUs: number } | undefined;
  /** v2 info frames received on this connection (a notice, not an event: no sign the stream flows). */
  infoFrames: number;
  /** The idle timeout to go back to at the first new event, when this connection's wait was doubled. */
  idleResetMs: number | undefined;
  /**
   * The time cursor sent, if any, for an OutdatedCursor to be measured from; undefined also when a
   * probe measured this instance's coverage for the point last checked (its OutdatedCursor then
   * says nothing new).
   */
  requestedUs: number | undefined;
  /** The time cursor sent (-1 by seq, or live); read only when {@link requestedUs} is set. */
  sentUs: number;
  /** The highest time_us processed on this connection (-1 before any). */
  maxUs: number;
  /** The first new time_us processed on this connection (-1 before any). */
  minUs: number;
  /** The highest time_us of a selected event on this connection (-1 before any). */
  maxSelectedUs: number;
}

/** The v2 sequence position: the host whose seq it is, and the last seq processed there. */
export interface SeqState {
  /** The instance that issued `floor`. */
  host: string | undefined;
  /** The last seq processed there, or -1. */
  floor: number;
  /**
   * The `time_us` of the event at `floor`, when known: the host sends that event again first, with
   * the same time (a v2 host's event keeps its time), unless its seqs are not those of the run.
   */
  floorUs?: number;
  /**
   * False while that host, taken up by time, still replays events below the run's time floor
   * (#343, or a rewind): the floor applies by time_us to a connection taken up by its seq too.
   */
  floorReached?: boolean;
  /**
   * That seq fell out of the host's window (`CursorTooOld`): the next connection asks for all the
   * host holds, and goes on by seq from there.
   */
  fromOldest?: boolean;
}

/** A run's shared state. */
export interface RunContext {
  /** The resolved options. */
  o: ResolvedSyncOptions;
  /** The run's counters. */
  stats: StatsTracker;
  /** Commits batches with the checkpoint. */
  writer: QueueWriter;
  /** Packs selected events into messages. */
  batcher: Batcher;
  /** Recognises events by content: what was stored comes again after a reconnect or a re-ingest. */
  guard: ReplayGuard;
  /** Why the run stops, once decided. */
  stop: StopReason | undefined;
  /** The message of an `error` stop. */
  error: string | undefined;
  /** Records handed to the batcher by this run and the runs it resumes (for the limit). */
  accepted: number;
  /** Aborted when the run stops, so that waits end at once. */
  internal: AbortController;
  /** Passes a report to `onError`. */
  report: (r: SyncErrorReport) => void;
  /** Decoder of legacy-dictionary zstd frames, when compressing on /subscribe. */
  decodeFrame: ((bytes: Uint8Array) => Uint8Array) | undefined;
  /**
   * Opens a second, short connection to the /subscribe instance `base` from `cursorUs`, with the
   * run's filters (`unfiltered`: none, every event), for a pass over a legacy server's
   * replay-to-live switch (see `passOverSeam()` in process.ts). Undefined: no such pass is made.
   */
  openSeamPass?: (
    base: string,
    cursorUs: number,
    unfiltered: boolean,
    signal: AbortSignal | undefined,
  ) => Promise<Connection>;
  /**
   * A resume whose server-side filter (DIDs, collections, kinds) differs from the resumed run's
   * (`force`): the event at its stored seq may not pass it (see Session.askedSeqSelected).
   */
  resumedFilterChanged: boolean;
  /**
   * The v2 hosts (instance URLs) whose connections no longer ask for zstd frames: one that has no
   * dictionary to give, or that refused the one it gave. Others still do.
   */
  v2Uncompressed: Set<string>;
  /** The v2 dictionary's decoder, once fetched. */
  v2Dictionary: { id: number; decode: (bytes: Uint8Array) => Uint8Array } | undefined;
  /**
   * On a resume on another instance, or after a failover: the `time_us` up to which a record stored
   * before is looked for, -1 once one is recognised (or otherwise). Past it without one, when one
   * was expected ({@link awaitWarns}), a coverage warning says that the instance lacks them, and may
   * lack events around the cursor.
   */
  awaitStoredUntilUs: number;
  /**
   * While {@link awaitStoredUntilUs} waits: the content keys of the events that this instance has
   * sent since, so that one it sends again (a reconnect's rewind here) is not taken for a record
   * stored before.
   */
  sentWhileAwaiting: Set<string> | undefined;
  /**
   * The coverage gap counted for the point the run starts from, before any event: replaced, not
   * added to, when an instance failed over to measures it again (see `coverageGap`).
   */
  initialGapUs: number;
  /**
   * While {@link awaitStoredUntilUs} waits: new events before this `time_us` are left out. Near the
   * start they can be ones the first instance had before it (its `time_us` differ by up to the
   * rewind, so only those before the start plus the rewind can be). Further on, they are ones it
   * left out, and are stored.
   */
  awaitDropsBelowUs: number;
  /** Whether a record stored before was expected to come again: one was selected within the rewind. */
  awaitWarns: boolean;
  /**
   * While {@link awaitStoredUntilUs} waits for a record that was expected ({@link awaitWarns}): the
   * last record stored (its content key, {@link lastStoredB} and {@link lastStoredA} when the wait
   * began) and `lastUs`, the time processed last on the instance that stored it. A failover before
   * the wait is over carries it on to the next instance (see {@link searchAgain}) rather than start
   * another from the time of the instance left, which may lack that record. Undefined otherwise.
   */
  awaited: {
    lastUs: number;
    lastB: number;
    lastA: number;
    /**
     * The instance where a search lined the streams up ({@link search}'s `linedUp`), and how far
     * back: a failover back to it looks there again (see {@link searchAgain}).
     */
    lined: { on: string; rewindUs: number } | undefined;
    /**
     * The first record stored before that came on `on` in the last connection of a search that
     * left new records out before it (see {@link search}), by its content key, and how far back
     * that search had taken the stream up: only further back does the same record say anything.
     */
    first: { on: string; b: number; a: number; rewindUs: number } | undefined;
  } | undefined;
  /**
   * While {@link awaited} is looked for: how far back from its `lastUs` the instance's stream is
   * taken up. A new record that comes before any stored one means the stream was taken up too late
   * (this instance's `time_us` run behind the other's by more than the rewind): the connection is
   * ended ({@link searchBack}) and the next one goes twice as far back, up to 64 rewinds, or until
   * it meets the beginning of the instance's history (`historyMet`: a v2 host said the cursor is
   * older, OutdatedCursor). Neither the start nor what the replay guard remembers bounds it: those
   * are times of the instance that stored the records, and this one's may run behind by more than
   * the run is long. New records before the start plus the rewind that come before a record stored
   * are left out ({@link awaitDropsBelowUs}), but they are before the start only by the other
   * instance's clock: the search goes back once more ({@link searchLeftOut}), and lines up when the
   * same record stored comes first again (they are then before the start here too), or on an
   * earlier one (they are then stored). Undefined when nothing is looked for, or once the search
   * has given up.
   */
  search: {
    rewindUs: number;
    historyMet: boolean;
    /**
     * Whether a record stored before, other than the last, came first: the streams are lined up,
     * and the last record stored must come too before a new one past the time processed last plus
     * the rewind, or the instance lacks it (and perhaps events around it).
     */
    linedUp: boolean;
  } | undefined;
  /** The content key of the last record stored (see `ReplayGuard.lastB`); (0, 0) when none is known. */
  lastStoredB: number;
  /** See {@link lastStoredB}. */
  lastStoredA: number;
  /** Set by the pipeline when the connection must end for {@link search} to look further back. */
  searchBack: boolean;
  /**
   * With {@link searchBack}: how many new records were left out before the first record stored
   * that came (0: a new record came first, past where they are left out).
   */
  searchLeftOut: number;
  /** How far back the last search looked before it gave up (0: none did): for the coverage warning. */
  searchedUs: number;
  /** {@link accepted} when the last search gave up (see {@link searchedUs}). */
  acceptedAtGiveUp: number;
  /**
   * A coverage gap measured where a resume point or a failover took the stream up on `base`, from
   * the `time_us` of its oldest event, which may run ahead of the other instance's: withdrawn if a
   * record stored before comes there before any new one is stored (see {@link withdrawGap}).
   */
  gapOnTrial: { base: string; gapUs: number; fromUs: number } | undefined;
  /** New events left out while waiting (see {@link awaitDropsBelowUs}). */
  awaitDropped: number;
  /**
   * Whether the run said that a v2 host sent, after events within the window, one whose display
   * time is before the start (said once a run).
   */
  toldBackdated: boolean;
  /**
   * Whether the server of a coverage probe still under way accepted its connection: a run stopped by
   * `maxTime` during it got an answer, even with no sync connection yet (a quiet server), and is not
   * one that never connected. Cleared when a probe ends before the run does: a probe answered
   * earlier says nothing of the sync's own connections, which may all have failed since.
   */
  probeAnswered: boolean;
  /** Whether a stream connection of the run was opened (a probe's does not count). */
  connected: boolean;
  /**
   * Called when a connection taken up by seq (see Session.askedSeq) got a later seq first, `firstSeq`:
   * the host no longer holds the one asked for, and a v2 server's `/subscribe` clamps such a cursor
   * without a word (protocol doc §1.2). `seqFrom` is the first seq still needed. Resolves once what
   * was lost is measured and reported (undefined: being measured already).
   */
  onSeqClamped?: (base: string, seqFrom: number, firstSeq: number) => Promise<void> | undefined;
  /** Aborts probes made beside the stream (see onSeqClamped) when the run ends by an error. */
  sideProbes: AbortController;
  /**
   * Set while a connection is read: starts its closing handshake (unless the connection is ending
   * already), whose end the run then waits for, storing what the server sent before it saw the
   * close; false when it cannot (a transport that drops what arrives once closing).
   */
  drain: (() => boolean) | undefined;
  /** The user aborted, and the connection being read is draining: the run stops once it ends. */
  draining: boolean;
}

/**
 * Stops the run for `reason` (the first reason wins) and aborts what is waiting. During a drain
 * (see {@link userAbort}) the user's abort came first: running out of time then stops it as
 * `aborted`, while the limit or the end, reached with what the server had sent, still say so.
 */
export function stopWith(ctx: RunContext, reason: StopReason): void {
  if (ctx.stop) return;
  ctx.stop = ctx.draining && reason === "max_time" ? "aborted" : reason;
  ctx.internal.abort();
}

/**
 * A connection draining after the user's abort is given up once reading it has waited this long in
 * all for the server (a server that does not answer the close), ms.
 */
export const DRAIN_WAIT_MS = 2000;

/**
 * …or this long after the abort, whatever holds the run up (ms): the time a busy database may take
 * to accept a commit (see `retryWhileBusy`), during which what the server sent waits in the socket.
 */
export const DRAIN_MAX_MS = 30_000;

/**
 * The user's abort. A connection being read is closed with the WebSocket closing handshake and read
 * to its end, so that the events the server sent before it saw the close are stored too (a server
 * without history could not send them again on a resume); the run stops once it ends (see
 * {@link DRAIN_WAIT_MS}). A connection that the server has closed already is read to its end too:
 * what it holds was received. Anything else (a connection attempt, a probe, a wait) stops at once.
 */
export function userAbort(ctx: RunContext): void {
  if (ctx.stop || ctx.draining) return;
  if (ctx.drain?.()) ctx.draining = true;
  else stopWith(ctx, "aborted");
}

/**
 * Records where the history of the instance measured begins (`firstUs`), and whether the measure is
 * the initial one. Before any event of the run, a measure is of the point the run starts from (the
 * start or the resume point), and a later one (on the instance failed over to) replaces it: the
 * history that counts is that of the instance the events come from.
 */
function noteHistoryStart(ctx: RunContext, firstUs: number): boolean {
  const { stats } = ctx;
  const initial = stats.lastProcessedUs === null;
  if (initial) {
    stats.coverageStart = firstUs;
    stats.coverageGapUs -= ctx.initialGapUs;
    ctx.initialGapUs = 0;
  } else stats.coverageStart ??= firstUs;
  return initial;
}

/**
 * Records that history before `firstUs` is missing where events from `fromUs` were asked for (the
 * requested start when `atStart`, else a resume point), reports it in plain words and, with
 * `strict`, refuses (before anything is stored) or stops the run. With `outdatedSentUs`, the cursor
 * sent (the host said that it was before its history), a first event not after that cursor is a gap
 * of unknown size; one after it but not after `fromUs` (within a rewind) is no gap.
 */
export function coverageGap(
  ctx: RunContext,
  base: string,
  fromUs: number,
  firstUs: number,
  atStart: boolean,
  outdatedSentUs?: number,
): void {
  const { stats } = ctx;
  const initial = noteHistoryStart(ctx, firstUs);
  if (initial && atStart) stats.startClamped = false;
  if (outdatedSentUs !== undefined && firstUs <= outdatedSentUs) {
    // The host said that it moved the cursor to its history's start (a v2 host's OutdatedCursor), yet
    // its first event is not after the cursor: the display time of an operator's import (protocol doc
    // §3.2), which says nothing of where the history begins. Events are missing; how many, no one can
    // tell, so no span is counted.
    endAwait(ctx);
    if (atStart) stats.startClamped = true;
    const asked = atStart ? "the requested start" : "the point to resume from";
    const message = `${new URL(base).host} said that its history begins after ${
      outdatedSentUs < fromUs
        ? `the cursor sent, ${describeDuration(fromUs - outdatedSentUs)} before ${asked}`
        : asked
    }, ${
      isoFromUs(outdatedSentUs)
    } (OutdatedCursor), though the first event it sent has an earlier display time, ${
      isoFromUs(firstUs)
    } (an import of older records): events after ${
      isoFromUs(fromUs)
    } cannot be had from this server, and how many cannot be told`;
    coverageProblem(ctx, base, message, message, atStart || initial);
    return;
  }
  if (firstUs <= fromUs) return;
  // The records stored last are before this history: none can come again to be recognised (see
  // `awaitStoredUntilUs`), and what comes is new.
  endAwait(ctx);
  // Only what was asked for is missing: up to the end, when there is one.
  const endUs = ctx.o.endUs ?? Number.POSITIVE_INFINITY;
  const gap = Math.min(firstUs, endUs) - fromUs;
  stats.coverageGapUs += gap;
  if (initial) ctx.initialGapUs = gap;
  ctx.gapOnTrial = atStart ? undefined : { base, gapUs: gap, fromUs };
  if (atStart) stats.startClamped = true;
  const what = atStart ? "the requested start" : "the point to resume from";
  const message = firstUs >= endUs
    ? `${new URL(base).host} only holds events from ${isoFromUs(firstUs)} on, after the requested end, ${
      isoFromUs(endUs)
    }: none of the ${describeDuration(gap)} from ${isoFromUs(fromUs)} can be had from this server`
    : `${new URL(base).host} only holds events from ${isoFromUs(firstUs)} on; ${what}, ${
      isoFromUs(fromUs)
    }, is ${describeDuration(gap)} earlier, so events in between cannot be had from this server`;
  // A refusal while nothing was stored: at the start, and at a resume point too.
  coverageProblem(ctx, base, message, message, atStart || initial);
  // A history that begins after the end, on the instance whose clock the start and end are: none of
  // the window can come, and no event may come to show the end (a narrow selection), so the run ends
  // here rather than wait for one until maxTime. (Elsewhere, after a failover or a resume on another
  // instance, its clock may run ahead: a record stored that comes first takes the gap back.)
  if (firstUs >= endUs && atStart) stopWith(ctx, "end");
}

/**
 * A record stored before came on the instance where {@link RunContext.gapOnTrial} was measured,
 * before any new record was stored there: its history holds that record, so it covers the point the
 * stream was taken up from after all (its `time_us` run ahead of the other instance's), and the gap
 * is taken back out of `coverageGapUs`, in a report that says so.
 */
export function withdrawGap(ctx: RunContext): void {
  const { base, gapUs, fromUs } = ctx.gapOnTrial!;
  ctx.gapOnTrial = undefined;
  ctx.stats.coverageGapUs -= gapUs;
  if (ctx.initialGapUs === gapUs) ctx.initialGapUs = 0;
  ctx.report({
    reason: "coverage",
    message: `on ${
      new URL(base).host
    }, a record stored before came again before any new one: its history covers ${
      isoFromUs(fromUs)
    } after all (its time_us run ahead of the other instance's), so the ${
      describeDuration(gapUs)
    } said to be missing there is not; coverageGapUs no longer counts it`,
    instance: base,
  });
}

/**
 * Records that a resume by seq on a v2 host (`fromSeq`, the first seq still needed) is older than
 * the history, which begins at `firstSeq` (`firstUs`): reported like {@link coverageGap}, as a count
 * of seqs, since display times cannot say how long a span it covers (protocol doc §3.2); not added
 * to `coverageGapUs`.
 */
export function coverageSeqGap(
  ctx: RunContext,
  base: string,
  fromSeq: number,
  firstSeq: number,
  firstUs: number,
): void {
  const initial = noteHistoryStart(ctx, firstUs);
  const message = `${
    new URL(base).host
  } only holds events from seq ${firstSeq} on; the point to resume from, seq ${fromSeq}, is ${
    firstSeq - fromSeq
  } seqs earlier, so events in between cannot be had from this server`;
  coverageProblem(ctx, base, message, message, initial);
}

/**
 * Reports events a host can no longer give (`message` says which), measured or not: a strict run
 * stops.
 */
export function coverageLoss(ctx: RunContext, base: string, message: string): void {
  coverageProblem(ctx, base, message, message, false);
}

/**
 * Records that where `base`'s history begins could not be found out (`message` says why): a start
 * older than it would be moved forward unseen. Reported; a strict run stops, before storing
 * anything when it has not started yet.
 */
export function coverageUnknown(ctx: RunContext, base: string, message: string): void {
  coverageProblem(ctx, base, `${message}; a start before it would go unnoticed`, message, true);
}

/**
 * Reports a coverage problem (`warning`) or, with `strict`, says it once in the run's error
 * (`message`): a refusal before anything is stored when `refusable`, else a stop.
 */
function coverageProblem(
  ctx: RunContext,
  base: string,
  warning: string,
  message: string,
  refusable: boolean,
): void {
  if (!ctx.o.strict) {
    ctx.report({ reason: "coverage", message: warning, instance: base });
    return;
  }
  if (
    refusable && ctx.stats.recordsStored === 0 && ctx.accepted === ctx.writer.checkpoint.run.recordsStored
  ) {
    throw new UsageError(`${message} (refused by --strict / strict: true)`);
  }
  stopWith(ctx, "error");
  ctx.error = `${message} (stopped by --strict / strict: true)`;
}

/**
 * Starts the wait for a record stored before to come again (see `RunContext.awaitStoredUntilUs`)
 * on an instance whose `time_us` differ from those of the one that stored it, taken up the rewind
 * before `lastUs`, its last time processed there, or before the last record selected there
 * (`selectedUs`) when that is earlier than the rewind but within a search's reach
 * ({@link SEARCH_MAX_REWINDS} rewinds): what came after it was not selected, and taken again is
 * left out again, while the record can line the two streams up. Returns that time (the anchor),
 * which the stream is taken up the rewind before:
 * - when a record was selected there within the rewind of the anchor, it is looked for up to the
 *   anchor plus the rewind, and its absence is warned of;
 * - new events before the start plus the rewind are left out until one is recognised: they can be
 *   ones the first instance had before the start;
 * - with neither, there is nothing to wait for.
 */
export function awaitStored(ctx: RunContext, lastUs: number, selectedUs: number): number {
  const { rewindUs, startUs } = ctx.o;
  const anchorUs = selectedUs >= 0 && selectedUs < lastUs - rewindUs &&
      lastUs - selectedUs <= SEARCH_MAX_REWINDS * rewindUs
    ? selectedUs
    : lastUs;
  const warns = selectedUs >= anchorUs - rewindUs;
  const dropsBelowUs = (startUs ?? Number.NEGATIVE_INFINITY) + rewindUs;
  if (!warns && dropsBelowUs <= anchorUs - rewindUs) {
    endAwait(ctx);
    return anchorUs;
  }
  ctx.awaitStoredUntilUs = warns ? anchorUs + rewindUs : dropsBelowUs;
  ctx.awaitDropsBelowUs = dropsBelowUs;
  ctx.awaitWarns = warns;
  ctx.awaitDropped = 0;
  ctx.sentWhileAwaiting = new Set();
  ctx.searchedUs = 0;
  ctx.search = undefined;
  ctx.awaited = undefined;
  if (warns) {
    ctx.awaited = {
      lastUs: anchorUs,
      lastB: ctx.lastStoredB,
      lastA: ctx.lastStoredA,
      lined: undefined,
      first: undefined,
    };
    searchAgain(ctx, undefined, false);
  }
  return anchorUs;
}

/**
 * Starts the search for {@link RunContext.awaited} on an instance: from the first rewind, or, on
 * the one where a search lined the streams up already, as far back as there: lined up still when
 * the stream is taken up by seq where it was (`bySeq`), else from before the record it lined up on,
 * which lines it up again. Returns how far back from its `lastUs` the stream is to be taken up.
 */
export function searchAgain(ctx: RunContext, instance: string | undefined, bySeq: boolean): number {
  const { rewindUs } = ctx.o;
  const lined = ctx.awaited!.lined;
  const again = lined !== undefined && lined.on === instance;
  ctx.searchedUs = 0;
  ctx.search = {
    rewindUs: again ? lined.rewindUs : rewindUs,
    historyMet: false,
    linedUp: again && bySeq,
  };
  return ctx.search.rewindUs;
}

/** Whether {@link searchFurther} would look further back, rather than give the search up. */
export function searchCanGoFurther(ctx: RunContext): boolean {
  const s = ctx.search!;
  return !s.historyMet && 2 * s.rewindUs <= SEARCH_MAX_REWINDS * ctx.o.rewindUs;
}

/** Ends the wait that {@link awaitStored} started: what comes from now on is new. */
export function endAwait(ctx: RunContext): void {
  ctx.awaitStoredUntilUs = -1;
  ctx.sentWhileAwaiting = undefined;
  ctx.awaited = undefined;
  ctx.search = undefined;
}

/**
 * At the end of the run: a wait for a record stored before (see `RunContext.awaitStoredUntilUs`) on
 * `instance`, the one the run was on, that is not over leaves events in doubt, which is said as the wait
 * would have said it: records stored last that did not come again (its stream was taken up too late
 * or it lacks them: events after them may be missing), or new records left out near the start that
 * no record stored came to tell from ones the first instance had before it. A search that lined the
 * streams up left nothing new out.
 */
export function reportUnfinishedAwait(ctx: RunContext, instance: string): void {
  if (ctx.awaitStoredUntilUs < 0 || ctx.search?.linedUp) return;
  const host = new URL(instance).host;
  const stopped = `the run stopped (${ctx.stop ?? "error"}) before`;
  if (ctx.awaited !== undefined) {
    const back = Math.max(ctx.search?.rewindUs ?? 0, ctx.searchedUs, ctx.o.rewindUs);
    ctx.report({
      reason: "coverage",
      message: `${stopped} any of the records stored last came again on ${host}, taken up ${
        back / 1_000_000
      } s before ${
        isoFromUs(ctx.awaited.lastUs)
      } by its time_us: it lacks them, or its time_us run more than ${
        back / 1_000_000
      } s behind the other instance's; either way, events after ${
        isoFromUs(ctx.awaited.lastUs)
      } (the other instance's time) may be missing`,
      instance,
    });
  } else if (ctx.awaitDropped > 0) {
    const n = ctx.awaitDropped;
    ctx.report({
      reason: "coverage",
      message: `${stopped} a record stored before came again on ${host}: ${n} new event${
        n === 1 ? "" : "s"
      } before ${isoFromUs(ctx.awaitDropsBelowUs)} ${
        n === 1 ? "was" : "were"
      } left out, as the first instance may have had ${n === 1 ? "it" : "them"} before the start; ${
        n === 1 ? "it" : "they"
      } may be missing`,
      instance,
    });
  }
}

/** The most rewinds a {@link RunContext.search} goes back. */
export const SEARCH_MAX_REWINDS = 64;

/**
 * After the pipeline ended a connection for {@link RunContext.search}: the `time_us` to take the
 * stream up from next, twice as far back as the last, or, when that one already met the beginning
 * of the instance's history or reached the limit, from the first rewind again with the search given
 * up (what comes is then stored, and a coverage warning follows if no record stored before does).
 */
export function searchFurther(ctx: RunContext): number {
  const s = ctx.search!;
  const { lastUs } = ctx.awaited!;
  const base = ctx.o.rewindUs;
  if (searchCanGoFurther(ctx)) {
    s.rewindUs *= 2;
    return lastUs - s.rewindUs;
  }
  ctx.searchedUs = s.rewindUs;
  ctx.acceptedAtGiveUp = ctx.accepted;
  ctx.search = undefined;
  return lastUs - base;
}
