/**
 * `runBackfillSync()`: connects to Jetstream, keeps the events the options select, stores them in
 * batches in a Deno KV queue and returns honest statistics.
 *
 * The pipeline is pulled end to end: socket frames → decode → filter → batch → atomic commit. A
 * slow commit slows the reader; the socket's buffer is bounded and reconnecting from the cursor
 * replaces unbounded buffering.
 *
 * @module
 */
import { backoffDelay, delay } from "./async.ts";
import { UsageError } from "./errors.ts";
import { resolveZstdDictionary } from "./jetstream/dictionary.ts";
import { createZstdDecoder, ZstdDecodeError } from "./jetstream/zstd.ts";
import type { JetstreamEvent } from "./jetstream/events.ts";
import { type ConnectError, type Connection, type Frame, openConnection } from "./jetstream/socket.ts";
import { buildSubscribeRequest } from "./jetstream/url.ts";
import { probeCoverageStart } from "./jetstream/coverage.ts";
import {
  buildV2Url,
  fetchV2Dictionary,
  isV2Url,
  mapV2Frame,
  parseXrpcError,
  type V2Frame,
} from "./jetstream/v2.ts";
import { isoFromUs } from "./time.ts";
import { type BackfillSyncOptions, type ResolvedSyncOptions, resolveSyncOptions } from "./options.ts";
import { Batcher } from "./pipeline/batch.ts";
import { createSelector, ReplayGuard, shapeProblem } from "./pipeline/filter.ts";
import {
  type Checkpoint,
  defaultKvPath,
  openKvAt,
  queueKey,
  queueLength,
  readCheckpoint,
  type RunState,
} from "./queue/kv_queue.ts";
import { QueueWriter } from "./queue/writer.ts";
import {
  type SkipReason,
  StatsTracker,
  type StopReason,
  type SyncErrorReport,
  type SyncStats,
} from "./stats.ts";

const TEXT = new TextDecoder();
const PROGRESS_INTERVAL_MS = 250;

/** The options that decide which events a run stores; a resumed run must have the same. */
export function selectionOf(o: ResolvedSyncOptions): Record<string, unknown> {
  return {
    wantedDids: [...o.wantedDids].sort(),
    wantedCollections: [...o.wantedCollections].sort(),
    kinds: [...o.kinds].sort(),
    startUs: o.startUs ?? null,
    endUs: o.endUs ?? null,
    numRecords: o.numRecords,
  };
}

function differences(a: Record<string, unknown>, b: Record<string, unknown>): string[] {
  const names = new Set([...Object.keys(a), ...Object.keys(b)]);
  return [...names].filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k]));
}

/** What one connection needs to know about itself. */
interface Session {
  /** The instance URL. */
  base: string;
  /** Whether it speaks the v2 wire. */
  v2: boolean;
  /** The zstd decoder for its binary frames. */
  decode: ((bytes: Uint8Array) => Uint8Array) | undefined;
  /** time_us already processed on this instance (inclusive replay). */
  floorUs: number;
  /** seq already processed on this instance, or -1. */
  seqFloor: number;
  /** An error frame came: the close that follows is not the end of the stream. */
  errorFrame: boolean;
  /** An OutdatedCursor info came: the next event shows where history starts. */
  outdatedFrom: number | undefined;
  /** The time cursor sent, if any. */
  requestedUs: number | undefined;
}

/** Handles a v2 info, error or other non-event frame; true when the connection is done. */
function handleV2Frame(ctx: RunContext, session: Session, m: Exclude<V2Frame, { type: "event" }>): boolean {
  switch (m.type) {
    case "info":
      ctx.report({ reason: "info", message: `${m.name}: ${m.message}`, instance: session.base });
      if (m.name === "OutdatedCursor" && session.requestedUs !== undefined) {
        session.outdatedFrom = session.requestedUs;
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

/** The first event after an OutdatedCursor shows where the server's history starts. */
function noteOutdated(ctx: RunContext, session: Session, firstUs: number): void {
  const from = session.outdatedFrom!;
  session.outdatedFrom = undefined;
  const { stats } = ctx;
  stats.coverageStart ??= firstUs;
  if (firstUs <= from) return;
  const atStart = stats.lastProcessedUs === null;
  if (atStart) stats.startClamped = true;
  stats.coverageGapUs += firstUs - from;
  const what = atStart ? "the requested start" : "the point to resume from";
  const message = `${new URL(session.base).host} only holds events from ${isoFromUs(firstUs)} on; ${what}, ${
    isoFromUs(from)
  }, is ${describeDuration(firstUs - from)} earlier, so events in between cannot be had from this server`;
  ctx.report({ reason: "coverage", message, instance: session.base });
  if (!ctx.o.strict) return;
  if (atStart && stats.recordsStored === 0 && ctx.accepted === ctx.writer.checkpoint.run.recordsStored) {
    throw new UsageError(`${message} (refused by --strict)`);
  }
  stopWith(ctx, "error");
  ctx.error = `${message} (stopped by --strict)`;
}

/** The decoder for a v2 host's dictionary, fetched from it once (or the one given, if its ID matches). */
async function v2Decoder(
  ctx: RunContext,
  base: string,
  options: BackfillSyncOptions,
): Promise<{ id: number; decode: (bytes: Uint8Array) => Uint8Array } | undefined> {
  if (ctx.v2Dictionary) return ctx.v2Dictionary;
  let bytes: Uint8Array;
  try {
    bytes = (await fetchV2Dictionary(base, ctx.internal.signal)).bytes;
  } catch (err) {
    if (options.zstdDictionary === undefined) {
      ctx.report({
        reason: "connection",
        message: `cannot fetch the v2 zstd dictionary (${(err as Error).message}); continuing uncompressed`,
        instance: base,
      });
      ctx.v2Compress = false;
      return undefined;
    }
    bytes = (await resolveZstdDictionary({ dictionary: options.zstdDictionary })).bytes;
  }
  const decoder = await createZstdDecoder(bytes);
  ctx.v2Dictionary = { id: decoder.dictionaryId, decode: (b) => decoder.decode(b) };
  return ctx.v2Dictionary;
}

/** The v2 sequence position: the host whose seq it is, and the last seq processed there. */
interface SeqState {
  host: string | undefined;
  floor: number;
}

interface RunContext {
  o: ResolvedSyncOptions;
  stats: StatsTracker;
  writer: QueueWriter;
  batcher: Batcher;
  stop: StopReason | undefined;
  error: string | undefined;
  accepted: number;
  internal: AbortController;
  report: (r: SyncErrorReport) => void;
  decodeFrame: ((bytes: Uint8Array) => Uint8Array) | undefined;
  /** Whether v2 connections still ask for zstd frames. */
  v2Compress: boolean;
  /** The v2 dictionary's decoder, once fetched. */
  v2Dictionary: { id: number; decode: (bytes: Uint8Array) => Uint8Array } | undefined;
}

/**
 * Copies the events that `options` select from Jetstream into a Deno KV queue and resolves to the
 * run's statistics. Bad options are rejected with a {@link UsageError} before connecting.
 *
 * @example
 * ```ts
 * import { runBackfillSync } from "./backfill.ts";
 * const stats = await runBackfillSync({
 *   wantedCollections: ["app.bsky.feed.post", "app.bsky.feed.like"],
 *   startTimestamp: "2024-01-01",
 *   endTimestamp: "2024-01-02",
 *   numRecords: 5000,
 * });
 * console.log(`stored ${stats.recordsStored} records, stopped by ${stats.stopReason}`);
 * ```
 */
export async function runBackfillSync(options: BackfillSyncOptions = {}): Promise<SyncStats> {
  let o = resolveSyncOptions(options);
  const started = performance.now();
  const kv = typeof o.kv === "object" ? o.kv : await openKvAt(o.kv ?? defaultKvPath(o.queueName));
  const ownsKv = typeof o.kv !== "object";
  try {
    if (o.resume) {
      // Options left out on resume are the checkpoint's: `--resume` alone continues the same run.
      const previous = (await readCheckpoint(kv, o.queueName)).value?.run;
      if (previous) {
        options = inheritOptions(options, previous);
        o = resolveSyncOptions(options);
      }
    }
    // The legacy dictionary is only needed for /subscribe connections; v2 hosts serve their own.
    const decodeFrame = o.compress && o.instances.some((u) => !isV2Url(u))
      ? await loadDecoder(options)
      : undefined;
    return await run(o, options, kv, started, decodeFrame);
  } finally {
    if (ownsKv) kv.close();
  }
}

function inheritOptions(options: BackfillSyncOptions, run: RunState): BackfillSyncOptions {
  const sel = run.selection as {
    wantedDids?: string[];
    wantedCollections?: string[];
    kinds?: BackfillSyncOptions["kinds"];
    startUs?: number | null;
    endUs?: number | null;
    numRecords?: number;
  };
  return {
    ...options,
    wantedDids: options.wantedDids ?? sel.wantedDids,
    wantedCollections: options.wantedCollections ?? sel.wantedCollections,
    kinds: options.kinds ?? sel.kinds,
    startTimestamp: options.startTimestamp ?? sel.startUs ?? undefined,
    endTimestamp: options.endTimestamp ?? sel.endUs ?? undefined,
    numRecords: options.numRecords ?? sel.numRecords,
    instance: options.instance ?? run.instances,
  };
}

async function run(
  o: ResolvedSyncOptions,
  options: BackfillSyncOptions,
  kv: Deno.Kv,
  started: number,
  decodeFrame: ((bytes: Uint8Array) => Uint8Array) | undefined,
): Promise<SyncStats> {
  const selection = selectionOf(o);
  const existing = await readCheckpoint(kv, o.queueName);
  let resumeFrom: Checkpoint | undefined;
  if (o.resume) {
    if (!existing.value) {
      throw new UsageError(
        `Cannot resume queue '${o.queueName}': it has no checkpoint yet (start it without --resume)`,
      );
    }
    const diff = differences(existing.value.run.selection, selection);
    if (diff.length > 0 && !o.force) {
      throw new UsageError(
        `Cannot resume queue '${o.queueName}' with different options: ${
          diff.map((k) =>
            `${k} was ${JSON.stringify(existing.value!.run.selection[k])}, now ${
              JSON.stringify(selection[k])
            }`
          ).join("; ")
        } (pass --force to resume anyway)`,
      );
    }
    resumeFrom = existing.value;
  }
  const runState: RunState = resumeFrom ? { ...resumeFrom.run, selection, instances: o.instances } : {
    id: crypto.randomUUID(),
    selection,
    recordsStored: 0,
    instance: o.instances[0],
    instances: o.instances,
  };
  const checkpoint: Checkpoint = existing.value
    ? { ...existing.value, run: runState }
    : { v: 1, queue: o.queueName, seq: 0, cursor: 0, recordsStored: 0, updatedAt: Date.now(), run: runState };

  const stats = new StatsTracker(o.startUs);
  if (resumeFrom && resumeFrom.run.recordsStored > 0) stats.latestCursor = resumeFrom.cursor;
  const internal = new AbortController();
  const onUserAbort = () => stopWith(ctx, "aborted");
  options.signal?.addEventListener("abort", onUserAbort, { once: true });
  const timer = setTimeout(() => stopWith(ctx, "max_time"), o.maxTimeMs);

  let lastProgress = 0;
  const progress = (force: boolean) => {
    if (!options.onProgress) return;
    const now = performance.now();
    if (!force && now - lastProgress < PROGRESS_INTERVAL_MS) return;
    lastProgress = now;
    const elapsed = (now - started) / 1000;
    const cursor = stats.lastProcessedUs;
    options.onProgress({
      recordsStored: stats.recordsStored,
      messagesReceived: stats.messagesReceived,
      rate: elapsed > 0 ? stats.recordsStored / elapsed : 0,
      currentDate: stats.currentDate,
      cursor,
      elapsed,
      percent: o.startUs !== undefined && o.endUs !== undefined && cursor !== null
        ? Math.max(0, Math.min(100, ((cursor - o.startUs) / (o.endUs - o.startUs)) * 100))
        : null,
      percentOfLimit: Math.min(100, ((ctx.writer.checkpoint.run.recordsStored) / o.numRecords) * 100),
    });
  };

  const writer = new QueueWriter(
    kv,
    o.queueName,
    { checkpoint, versionstamp: existing.versionstamp },
    (r) => {
      stats.committed(r.records, r.cursor, r.days, r.collections, r.messages);
      progress(false);
    },
  );
  const ctx: RunContext = {
    o,
    stats,
    writer,
    batcher: new Batcher(o.queueName, o.batchSize),
    stop: undefined,
    error: undefined,
    accepted: runState.recordsStored,
    internal,
    report: (r) => options.onError?.(r),
    decodeFrame,
    v2Compress: true,
    v2Dictionary: undefined,
  };
  if (options.signal?.aborted) stopWith(ctx, "aborted");
  if (ctx.accepted >= o.numRecords) stopWith(ctx, "limit");

  try {
    await consumeStream(ctx, options, resumeFrom);
  } catch (err) {
    if (err instanceof UsageError) throw err;
    ctx.stop ??= "error";
    ctx.error ??= err instanceof Error ? err.message : String(err);
  } finally {
    clearTimeout(timer);
    options.signal?.removeEventListener("abort", onUserAbort);
  }
  try {
    const last = ctx.batcher.take();
    if (last) await writer.add(last);
    await writer.flush();
  } catch (err) {
    ctx.stop = "error";
    ctx.error = `could not store the last batch: ${err instanceof Error ? err.message : String(err)}`;
  }
  progress(true);

  const totalTime = (performance.now() - started) / 1000;
  const result: SyncStats = {
    recordsStored: stats.recordsStored,
    messagesReceived: stats.messagesReceived,
    totalTime,
    recordsPerSecond: totalTime > 0 ? stats.recordsStored / totalTime : 0,
    collections: stats.collections(),
    targetReached: writer.checkpoint.run.recordsStored >= o.numRecords,
    latestCursor: stats.latestCursor,
    queueLength: await queueLength(kv, o.queueName),
    currentDate: stats.currentDate,
    endCursorReached: ctx.stop === "end",
    stopReason: ctx.stop ?? "closed",
    recordsPerDay: stats.recordsPerDay,
    messagesEnqueued: stats.messagesEnqueued,
    skipped: stats.skipped,
    bytesReceived: stats.bytesReceived,
    bytesDecoded: stats.bytesDecoded,
    reconnects: stats.reconnects,
    failovers: stats.failovers,
    duplicatesDropped: stats.duplicatesDropped,
    coverageStart: stats.coverageStart,
    startClamped: stats.startClamped,
    coverageGapUs: stats.coverageGapUs,
  };
  if (ctx.error !== undefined) result.error = ctx.error;
  await kv.set(queueKey(o.queueName, "run"), {
    id: writer.checkpoint.run.id,
    finishedAt: Date.now(),
    options: {
      ...selection,
      instances: o.instances,
      queueName: o.queueName,
      batchSize: o.batchSize,
      compress: o.compress,
    },
    stats: result,
  });
  return result;
}

/** Resolves the dictionary (option, environment, cache, verified download) and prepares a decoder. */
async function loadDecoder(options: BackfillSyncOptions): Promise<(bytes: Uint8Array) => Uint8Array> {
  const dictionary = await resolveZstdDictionary({
    dictionary: options.zstdDictionary,
    signal: options.signal,
  });
  const decoder = await createZstdDecoder(dictionary.bytes);
  return (bytes) => decoder.decode(bytes);
}

function stopWith(ctx: RunContext, reason: StopReason): void {
  if (ctx.stop) return;
  ctx.stop = reason;
  ctx.internal.abort();
}

/** The reconnect loop: one connection at a time, until a stop condition. */
async function consumeStream(
  ctx: RunContext,
  options: BackfillSyncOptions,
  resumeFrom: Checkpoint | undefined,
): Promise<void> {
  const { o, stats } = ctx;
  const select = createSelector(o);
  const guard = new ReplayGuard(o.dedupeWindow);
  let instanceIndex = Math.max(0, resumeFrom ? o.instances.indexOf(resumeFrom.run.instance) : 0);
  // Events at or below this time_us were processed on the current instance (its cursor is inclusive).
  let floorUs = resumeFrom && resumeFrom.run.recordsStored > 0 ? resumeFrom.cursor : -1;
  // On v2 hosts events carry the server's sequence number (`cursor`): it, not time_us, is the
  // exact resume position there, and it is only ever sent back to the host that issued it.
  const seq: SeqState = { host: undefined, floor: -1 };
  if (resumeFrom?.run.seqCursor !== undefined && resumeFrom.run.seqInstance !== undefined) {
    seq.host = resumeFrom.run.seqInstance;
    seq.floor = resumeFrom.run.seqCursor;
  }
  let failures = 0;
  let connections = 0;
  let disconnectedAt = performance.now();

  // Coverage: is the requested start (or the resume point) still within the server's history?
  const from = floorUs >= 0 ? floorUs : o.startUs;
  if (from !== undefined) await checkCoverage(ctx, o.instances[instanceIndex], from, floorUs < 0);

  while (!ctx.stop) {
    const base = o.instances[instanceIndex];
    if (floorUs >= 0 && connections > 0 && performance.now() - disconnectedAt > o.idleTimeoutMs) {
      // After an outage longer than the idle timeout the cursor may have fallen out of history.
      await checkCoverage(ctx, base, floorUs, false);
      if (ctx.stop) break;
    }
    const bySeq = seq.host === base && seq.floor >= 0;
    const cursor = bySeq ? seq.floor : floorUs >= 0 ? floorUs : o.startUs;
    const v2 = isV2Url(base);
    let decode = ctx.decodeFrame;
    let req: { url: string; hello?: string };
    if (v2) {
      const dict = o.compress && ctx.v2Compress ? await v2Decoder(ctx, base, options) : undefined;
      decode = dict?.decode;
      req = { url: buildV2Url(base, { ...o, cursor, zstdDictionary: dict?.id }) };
    } else {
      req = buildSubscribeRequest(base, { ...o, cursor, compress: o.compress });
    }
    let conn: Connection;
    try {
      conn = await openConnection(req.url, {
        idleTimeoutMs: o.idleTimeoutMs,
        maxBufferedBytes: o.maxBufferedBytes,
        hello: req.hello,
        signal: ctx.internal.signal,
      });
    } catch (err) {
      if (ctx.stop) break;
      const e = err as ConnectError;
      const xrpc = v2 ? parseXrpcError(e.body) : undefined;
      if (xrpc?.error === "CursorTooOld" && bySeq) {
        // The seq fell out of the server's window: go on from the time cursor, which the server
        // clamps and reports (#info OutdatedCursor), so the gap is measured.
        ctx.report({ reason: "retry", message: `${xrpc.message}; resuming by time instead`, instance: base });
        seq.host = undefined;
        seq.floor = -1;
        continue;
      }
      if (xrpc?.error === "UnknownZstdDictionary" && ctx.v2Dictionary) {
        const known = ctx.v2Dictionary.id;
        ctx.v2Dictionary = undefined;
        const again = await v2Decoder(ctx, base, options);
        if (!again || again.id === known) {
          ctx.v2Compress = false;
          ctx.report({
            reason: "retry",
            message: `${xrpc.message}; continuing uncompressed`,
            instance: base,
          });
        }
        continue;
      }
      if (e.status !== undefined && e.status >= 400 && e.status < 500 && e.status !== 429) {
        if (stats.recordsStored === 0 && connections === 0) throw new UsageError(e.message);
        ctx.stop = "error";
        ctx.error = e.message;
        break;
      }
      failures++;
      ctx.report({ reason: "connection", message: e.message, instance: base });
      if (failures > o.maxRetries) {
        ctx.stop = "error";
        ctx.error =
          `gave up after ${failures} connection attempts without progress; last error: ${e.message}`;
        break;
      }
      if (o.instances.length > 1 && failures % o.failoverAfter === 0) {
        instanceIndex = (instanceIndex + 1) % o.instances.length;
        stats.failovers++;
        if (floorUs >= 0) floorUs -= o.rewindUs;
      }
      await delay(backoffDelay(failures), ctx.internal.signal);
      continue;
    }
    connections++;
    if (connections > 1) {
      stats.reconnects++;
      // What follows may repeat what was processed: an inclusive cursor, a rewind after a
      // failover, a restarted server re-sending events under new time_us.
      guard.arm();
    }
    ctx.writer.setRun({ instance: base });
    ctx.batcher.host = base;
    const before = { us: stats.lastProcessedUs, seq: seq.floor, accepted: ctx.accepted };
    const session: Session = {
      base,
      v2,
      decode,
      floorUs,
      seqFloor: bySeq ? seq.floor : -1,
      errorFrame: false,
      outdatedFrom: undefined,
      requestedUs: bySeq ? undefined : cursor,
    };
    try {
      await readConnection(ctx, conn, session, select, guard, seq, options);
    } finally {
      conn.close();
      await conn.closed();
    }
    if (stats.lastProcessedUs !== null) floorUs = Math.max(floorUs, stats.lastProcessedUs);
    disconnectedAt = performance.now();
    if (ctx.stop) break;
    const cause = conn.cause!;
    if (cause.kind === "closed" && cause.code === 1000 && !session.errorFrame) {
      ctx.stop = "closed";
      break;
    }
    // Progress means new events, not the inclusive replay of the last one.
    const progressed = stats.lastProcessedUs !== before.us || seq.floor !== before.seq ||
      ctx.accepted !== before.accepted;
    // A quiet connection closed by the idle timeout had been accepted by the server: a narrow
    // filter can be silent for long, so it does not count as a failure.
    if (progressed) failures = 0;
    else if (cause.kind !== "idle") failures++;
    const why = cause.kind === "closed"
      ? `connection closed (code ${cause.code}${cause.reason ? `: ${cause.reason}` : ""})`
      : cause.kind === "idle"
      ? `no message for ${o.idleTimeoutMs / 1000} s`
      : cause.kind === "overflow"
      ? "the pipeline fell behind the socket; reconnecting from the cursor"
      : "connection aborted";
    ctx.report({ reason: "retry", message: `${why}; reconnecting`, instance: base });
    if (failures > o.maxRetries) {
      ctx.stop = "error";
      ctx.error = `gave up after ${failures} reconnects without progress; last: ${why}`;
      break;
    }
    if (o.instances.length > 1 && failures > 0 && failures % o.failoverAfter === 0) {
      instanceIndex = (instanceIndex + 1) % o.instances.length;
      stats.failovers++;
      if (floorUs >= 0) floorUs -= o.rewindUs;
    }
    if (failures > 0 || cause.kind !== "overflow") {
      await delay(backoffDelay(Math.max(1, failures)), ctx.internal.signal);
    }
  }
}

/**
 * Probes where `base`'s history begins and compares it with `fromUs`, the requested start
 * (`atStart`) or a resume point. A gap is counted and reported; with `strict` it stops the run,
 * before anything is stored when it is found at the start.
 */
async function checkCoverage(ctx: RunContext, base: string, fromUs: number, atStart: boolean): Promise<void> {
  if (!new URL(base).pathname.endsWith("/subscribe")) return;
  const oldest = await probeCoverageStart(base, { signal: ctx.internal.signal });
  if (oldest === null || ctx.stop) return;
  ctx.stats.coverageStart ??= oldest;
  if (oldest <= fromUs) return;
  const gap = oldest - fromUs;
  ctx.stats.coverageGapUs += gap;
  if (atStart) ctx.stats.startClamped = true;
  const what = atStart ? "the requested start" : "the point to resume from";
  const message = `${new URL(base).host} only holds events from ${isoFromUs(oldest)} on; ${what}, ${
    isoFromUs(fromUs)
  }, is ${describeDuration(gap)} earlier, so events in between cannot be had from this server`;
  ctx.report({ reason: "coverage", message, instance: base });
  if (!ctx.o.strict) return;
  if (atStart && ctx.stats.recordsStored === 0) throw new UsageError(`${message} (refused by --strict)`);
  ctx.stop = "error";
  ctx.error = `${message} (stopped by --strict)`;
}

function describeDuration(us: number): string {
  const s = us / 1e6;
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} days`;
}

/** Reads one connection until it ends or the run stops. */
async function readConnection(
  ctx: RunContext,
  conn: Connection,
  session: Session,
  select: (ev: JetstreamEvent) => boolean,
  guard: ReplayGuard,
  seq: SeqState,
  options: BackfillSyncOptions,
): Promise<void> {
  const { o, stats, batcher } = ctx;
  const { base, decode, floorUs, seqFloor } = session;
  const endUs = o.endUs ?? Number.POSITIVE_INFINITY;
  const startUs = o.startUs ?? Number.NEGATIVE_INFINITY;
  const skip = (reason: SkipReason, message: string) => {
    stats.skip(reason);
    ctx.report({ reason, message, instance: conn.url });
  };
  let bytesBefore = 0;
  let mismatches = 0;
  for (let frames: Frame[] | null = await conn.next(); frames !== null; frames = await conn.next()) {
    if (ctx.stop) return;
    stats.messagesReceived += frames.length;
    stats.bytesReceived += conn.bytesReceived - bytesBefore;
    bytesBefore = conn.bytesReceived;
    for (let i = 0; i < frames.length; i++) {
      const frame = frames[i];
      let text: string;
      if (typeof frame === "string") {
        text = frame;
      } else if (decode) {
        try {
          const raw = decode(frame instanceof Uint8Array ? frame : new Uint8Array(frame));
          mismatches = 0;
          stats.bytesDecoded += raw.byteLength;
          text = TEXT.decode(raw);
        } catch (err) {
          if (err instanceof ZstdDecodeError && err.reason === "dictionary-mismatch" && ++mismatches >= 5) {
            // Frame after frame naming another dictionary: a wrong dictionary, not a bad frame.
            stats.skip("decode_failed");
            throw new Error(`${err.message}; give the matching dictionary with --zstd-dictionary`);
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
      if (text.length > o.maxEventBytes) {
        skip(
          "oversized",
          `frame of ${text.length} characters is over the ${o.maxEventBytes}-byte event limit`,
        );
        continue;
      }
      let ev: JetstreamEvent;
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
        // Sizing and the gzip of an oversized event need the stored form's text.
        text = JSON.stringify(ev);
        if (session.outdatedFrom !== undefined) noteOutdated(ctx, session, ev.time_us);
        if (ctx.stop) return;
      }
      const problem = shapeProblem(ev);
      if (problem) {
        skip(
          problem,
          `${problem === "unknown_kind" ? "unknown kind" : "missing fields"} in ${text.slice(0, 120)}`,
        );
        continue;
      }
      const t = ev.time_us;
      if (t >= endUs) {
        stopWith(ctx, "end");
        return;
      }
      // Below the floor: the inclusive replay of a reconnect. Below the start: a server that
      // replays from before the requested cursor (bluesky-social/jetstream#343).
      const evSeq = (ev as { cursor?: unknown }).cursor;
      if (typeof evSeq === "number") {
        // A v2 host: its seq orders events; time_us may not (protocol doc §3.2).
        if (evSeq <= seqFloor) {
          stats.duplicatesDropped++;
          continue;
        }
        if (seq.host !== base) {
          seq.host = base;
          seq.floor = -1;
        }
        seq.floor = Math.max(seq.floor, evSeq);
        if (t < startUs) continue;
      } else if (t <= floorUs || t < startUs) {
        if (t <= floorUs) stats.duplicatesDropped++;
        continue;
      }
      // A rewound replay after a failover must not move the date backwards.
      if (stats.lastProcessedUs === null || t > stats.lastProcessedUs) {
        const change = stats.processed(t);
        if (change) options.onDateChange?.(change);
      }
      if (!select(ev)) continue;
      if (guard.isReplay(ev)) {
        stats.duplicatesDropped++;
        continue;
      }
      guard.record(ev);
      const collection = ev.kind === "commit" ? ev.commit.collection : undefined;
      const full = batcher.add(ev, text, stats.dayOf(t), collection);
      ctx.accepted++;
      if (ctx.accepted >= o.numRecords) {
        stopWith(ctx, "limit");
        return;
      }
      if (full) await ctx.writer.add(batcher.take()!);
      if (ctx.stop) return;
    }
  }
}
