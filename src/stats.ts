/**
 * Counters of a sync run and the statistics it returns. No timers and no I/O here: the pipeline
 * tells the tracker what happened and asks it for figures.
 *
 * @module
 */
import { utcDate } from "./time.ts";

/**
 * Why a run stopped.
 *
 * @example
 * ```ts
 * import { runBackfillSync } from "@jetfill/jetfill";
 * const { stopReason, error } = await runBackfillSync({ numRecords: 100 });
 * if (stopReason === "error") console.error(error);
 * ```
 */
export type StopReason = "limit" | "end" | "max_time" | "aborted" | "closed" | "error";

/** Why a frame was received but not stored. */
export type SkipReason =
  | "malformed_json"
  | "missing_fields"
  | "bad_time"
  | "bad_value"
  | "unknown_kind"
  | "binary_frame"
  | "invalid_utf8"
  | "decode_failed"
  | "oversized";

/**
 * The statistics of a run: the original specification's fields in camelCase, and more.
 *
 * @example
 * ```ts
 * import { runBackfillSync, type SyncStats } from "@jetfill/jetfill";
 * const stats: SyncStats = await runBackfillSync({ startTimestamp: "2026-11-28", numRecords: 1000 });
 * console.log(`${stats.recordsStored} records in ${stats.totalTime.toFixed(1)} s (${stats.stopReason})`);
 * for (const [day, n] of Object.entries(stats.recordsPerDay)) console.log(day, n);
 * ```
 */
export interface SyncStats {
  /** Records stored in the queue by this run (durably committed). */
  recordsStored: number;
  /**
   * WebSocket messages received from Jetstream, stored or not: on the sync's connections and its
   * second passes, not on the coverage probe's (see the README's "Coverage").
   */
  messagesReceived: number;
  /** Seconds from start to the end of the run. */
  totalTime: number;
  /** `recordsStored / totalTime`. */
  recordsPerSecond: number;
  /** Collections of the stored commit records, sorted. */
  collections: string[];
  /** Whether `numRecords` records were stored. */
  targetReached: boolean;
  /** `time_us` of the last record durably stored by this run (or, on resume, by the run it continues), or null. */
  latestCursor: number | null;
  /** Messages waiting in this queue after the run (see `queueLength()`). */
  queueLength: number;
  /** UTC date (`YYYY-MM-DD`) of the last event processed, or null. */
  currentDate: string | null;
  /**
   * Whether the run stopped at the end timestamp (also when the last `onProgress` call, made after the end
   * was reached, threw and made `stopReason` `error`).
   */
  endCursorReached: boolean;
  /** Why the run stopped. */
  stopReason: StopReason;
  /** Records stored by this run, per UTC day of their `time_us`. */
  recordsPerDay: Record<string, number>;
  /** Queue messages written by this run. */
  messagesEnqueued: number;
  /** Frames received but skipped, by reason. */
  skipped: Partial<Record<SkipReason, number>>;
  /**
   * Payload bytes of the messages the run took, as sent (compressed frames compressed), counted as
   * `messagesReceived` is: not those read ahead of the stop.
   */
  bytesReceived: number;
  /** Bytes after zstd decoding (0 when the stream was not compressed). */
  bytesDecoded: number;
  /** Connections opened again after the first one. */
  reconnects: number;
  /** Switches to another instance. */
  failovers: number;
  /** Events dropped because they were already processed (inclusive cursors, rewinds, replays). */
  duplicatesDropped: number;
  /** `time_us` of the oldest event the server still held when asked (probed when a start is given), or null. */
  coverageStart: number | null;
  /**
   * Whether the requested start was older than the server's history, so the server moved it forward
   * (a resume point moved forward counts in `coverageGapUs` alone).
   */
  startClamped: boolean;
  /**
   * Microseconds of requested time that the server could not provide, as a probe measured it (at the
   * start, a resume point, a failover and after long outages). The seconds that may be missing
   * around a switch of instance are said by a `coverage` report, not counted here.
   */
  coverageGapUs: number;
  /** The error that stopped the run, when `stopReason` is `error`. */
  error?: string;
}

/**
 * A progress report, sent while the run goes on.
 *
 * @example
 * ```ts
 * import { runBackfillSync, type SyncProgress } from "@jetfill/jetfill";
 * const show = (p: SyncProgress) =>
 *   console.error(`${p.recordsStored} records, ${p.rate.toFixed(0)}/s, ${p.percent ?? "?"} % of the window`);
 * await runBackfillSync({ startTimestamp: "2026-11-28", endTimestamp: "2026-11-29", onProgress: show });
 * ```
 */
export interface SyncProgress {
  /** Records durably stored so far. */
  recordsStored: number;
  /** Messages received so far. */
  messagesReceived: number;
  /** Records per second since the start. */
  rate: number;
  /** UTC date of the last event processed. */
  currentDate: string | null;
  /** `time_us` of the last event processed. */
  cursor: number | null;
  /** Seconds since the start. */
  elapsed: number;
  /** Share of the time window covered (0–100) when an end is given; the window starts at the start, or at the first event. */
  percent: number | null;
  /** Share of the record limit reached (0–100). */
  percentOfLimit: number;
}

/**
 * The UTC date of processed events moved from one day to another. For the first event processed,
 * the day before is the start timestamp's (on a resume, the last stored record's), as in the
 * original: a run that starts on a day with no event selected reports a change at its first one.
 *
 * @example
 * ```ts
 * import { type DateChange, runBackfillSync } from "@jetfill/jetfill";
 * const onDateChange = ({ from, to }: DateChange) => console.error(`${from} done, now ${to}`);
 * await runBackfillSync({ startTimestamp: "2026-11-27", endTimestamp: "2026-11-29", onDateChange });
 * ```
 */
export interface DateChange {
  /** The previous date: the last event processed's, or before the first, the start's (see above). */
  from: string;
  /** The new date. */
  to: string;
  /** `time_us` of the first event of the new date. */
  timeUs: number;
}

/**
 * Something went wrong with one frame or one connection; the run goes on unless it says otherwise.
 *
 * @example
 * ```ts
 * import { runBackfillSync, type SyncErrorReport } from "@jetfill/jetfill";
 * const onError = (r: SyncErrorReport) => {
 *   if (r.reason === "coverage") console.warn(`events may be missing: ${r.message}`);
 * };
 * await runBackfillSync({ startTimestamp: "2026-11-20", onError });
 * ```
 */
export interface SyncErrorReport {
  /** What kind of problem. */
  reason: SkipReason | "connection" | "retry" | "coverage" | "info" | "lock" | "queue";
  /** A readable explanation. */
  message: string;
  /** The instance concerned: its WebSocket URL, as resolved from the options (no query string). */
  instance?: string;
}

/** Mutable counters of one run. */
export class StatsTracker {
  /** Records durably stored. */
  recordsStored = 0;
  /** Messages received. */
  messagesReceived = 0;
  /** Queue messages written. */
  messagesEnqueued = 0;
  /** `time_us` of the last stored record. */
  latestCursor: number | null = null;
  /** `time_us` of the last processed event. */
  lastProcessedUs: number | null = null;
  /** `time_us` of the first processed event (the window's start when none was given). */
  firstProcessedUs: number | null = null;
  /** UTC date of the last processed event. */
  currentDate: string | null = null;
  /** Bytes received on the wire. */
  bytesReceived = 0;
  /** Bytes after decoding zstd frames. */
  bytesDecoded = 0;
  /** Reconnections. */
  reconnects = 0;
  /** Instance switches. */
  failovers = 0;
  /** Duplicates dropped. */
  duplicatesDropped = 0;
  /** Oldest event the server held. */
  coverageStart: number | null = null;
  /** The start was moved forward by the server. */
  startClamped = false;
  /** Requested time the server could not provide, µs. */
  coverageGapUs = 0;
  /** Skips by reason. */
  readonly skipped: Partial<Record<SkipReason, number>> = {};
  /** Stored records per UTC day. */
  readonly recordsPerDay: Record<string, number> = {};
  readonly #collections = new Set<string>();
  // Date strings are cached per UTC day so the hot path does not format a Date per event.
  #dayStart = Number.POSITIVE_INFINITY;
  #dayEnd = Number.NEGATIVE_INFINITY;
  #day = "";

  /** The date before the first event, for date changes: the start timestamp's, when there is one. */
  #dateBefore: string | null = null;

  /**
   * Creates a tracker. `currentDate` stays null until an event is processed; the first event on
   * another day than `startUs`'s (the start timestamp's, or on a resume the time stored last) is a
   * date change from that day, as in the original.
   */
  constructor(startUs?: number) {
    if (startUs !== undefined) this.#dateBefore = utcDate(startUs);
  }

  /** The UTC date of `us`, cheaply for runs of events on the same day. */
  dayOf(us: number): string {
    if (us >= this.#dayStart && us < this.#dayEnd) return this.#day;
    const day = utcDate(us);
    this.#dayStart = Date.parse(day) * 1000;
    this.#dayEnd = this.#dayStart + 86_400_000_000;
    this.#day = day;
    return day;
  }

  /** Records that an event was processed; returns the date change it caused, if any. */
  processed(us: number): DateChange | undefined {
    this.lastProcessedUs = us;
    this.firstProcessedUs ??= us;
    const day = this.dayOf(us);
    if (day === this.currentDate) return undefined;
    const from = this.currentDate ?? this.#dateBefore;
    this.currentDate = day;
    if (from === day) return undefined;
    return from === null ? undefined : { from, to: day, timeUs: us };
  }

  /** Counts a skipped frame. */
  skip(reason: SkipReason): void {
    this.skipped[reason] = (this.skipped[reason] ?? 0) + 1;
  }

  /** Records a durable commit of `records` records whose days and collections are given. */
  committed(
    records: number,
    lastUs: number,
    perDay: Map<string, number>,
    collections: Iterable<string>,
    messages: number,
  ): void {
    this.recordsStored += records;
    this.messagesEnqueued += messages;
    // Commits are reported in the order of their records, so this is the last record's time_us, as
    // the checkpoint has it: after a failover or a resume on another instance, whose time_us run a
    // little behind, it can be below the one before.
    this.latestCursor = lastUs;
    for (const [day, n] of perDay) this.recordsPerDay[day] = (this.recordsPerDay[day] ?? 0) + n;
    for (const c of collections) this.#collections.add(c);
  }

  /** Collections of the stored records, sorted. */
  collections(): string[] {
    return [...this.#collections].sort();
  }
}
