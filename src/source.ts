/**
 * The connection loop of a sync: one connection at a time to the instances in order, reconnecting
 * with the cursor of the last event processed (or the v2 sequence on the host that issued it),
 * backing off with jitter, failing over with a rewind, checking coverage, and handing each
 * connection to the per-frame pipeline.
 *
 * @module
 */
import { backoffDelay, delay, MAX_TIMER_MS } from "./async.ts";
import { UsageError } from "./errors.ts";
import {
  type HistoryStart,
  PROBE_TIMEOUT_MS,
  probeHistoryStart,
  probeLiveEvent,
  replayFailure,
} from "./jetstream/coverage.ts";
import { resolveZstdDictionary } from "./jetstream/dictionary.ts";
import { type CloseCause, ConnectError, type Connection, openConnection } from "./jetstream/socket.ts";
import { buildSubscribeRequest } from "./jetstream/url.ts";
import {
  buildV2Url,
  fetchV2Dictionary,
  isV2Url,
  parseXrpcError,
  V2_DICTIONARY_TIMEOUT_MS,
  V2_SUBPROTOCOL,
  V2DictionaryError,
} from "./jetstream/v2.ts";
import { createServedDictionaryDecoder, createZstdDecoder } from "./jetstream/zstd.ts";
import type { BackfillSyncOptions } from "./options.ts";
import {
  awaitStored,
  coverageGap,
  coverageLoss,
  coverageSeqGap,
  coverageUnknown,
  DRAIN_MAX_MS,
  DRAIN_WAIT_MS,
  endAwait,
  reportUnfinishedAwait,
  type RunContext,
  SEARCH_MAX_REWINDS,
  searchAgain,
  searchFurther,
  type SeqState,
  type Session,
  stopWith,
} from "./pipeline/context.ts";
import { createSelector } from "./pipeline/filter.ts";
import { readConnection } from "./pipeline/process.ts";
import { type Checkpoint, KEYS_SPAN_US, type RecentKeys } from "./queue/kv_queue.ts";
import { isoFromUs, MIN_TIMESTAMP_US } from "./time.ts";

/** The decoder for a v2 host's dictionary, fetched from it once (or the one given, if its ID matches). */
async function v2Decoder(
  ctx: RunContext,
  base: string,
  options: BackfillSyncOptions,
): Promise<{ id: number; decode: (bytes: Uint8Array) => Uint8Array } | undefined> {
  if (ctx.v2Dictionary) return ctx.v2Dictionary;
  let bytes: Uint8Array;
  // What the host served is what it compresses with, whatever its ID: taken as it is.
  let served = true;
  try {
    const timeoutMs = Math.min(V2_DICTIONARY_TIMEOUT_MS, ctx.o.idleTimeoutMs);
    bytes = (await fetchV2Dictionary(base, ctx.internal.signal, timeoutMs)).bytes;
  } catch (err) {
    if (ctx.internal.signal.aborted) return undefined;
    if (options.zstdDictionary === undefined) {
      // A host that may answer later (warming up, or not answering now) is asked again by the next
      // connection; one that has no dictionary to give is not.
      const again = err instanceof V2DictionaryError && err.transient;
      ctx.report({
        reason: "connection",
        message: `cannot fetch the v2 zstd dictionary (${(err as Error).message}); ${
          again ? "this connection goes uncompressed, the next one asks again" : "continuing uncompressed"
        }`,
        instance: base,
      });
      if (!again) ctx.v2Uncompressed.add(base);
      return undefined;
    }
    bytes = (await resolveZstdDictionary({ dictionary: options.zstdDictionary })).bytes;
    served = false;
  }
  const decoder = served ? await createServedDictionaryDecoder(bytes) : await createZstdDecoder(bytes);
  ctx.v2Dictionary = { id: decoder.dictionaryId, decode: (b) => decoder.decode(b) };
  return ctx.v2Dictionary;
}

/**
 * A resolver's answer that the name does not exist (getaddrinfo's EAI_NONAME, in glibc's and macOS's
 * words), not that it could not ask ("Temporary failure in name resolution").
 */
const NO_SUCH_HOST = /Name or service not known|nodename nor servname provided/i;

/** The most times idleTimeout a connection waits after idle ends without a new event. */
const MAX_IDLE_SCALE = 16;

/**
 * Where a resume by time takes the stream up: the checkpoint's cursor, the `time_us` of the last
 * record stored, unless the run stored records much later than that (further than the span whose
 * content keys the queue keeps): the last one was then an operator's import on a v2 host, shown
 * with a display time years old (protocol doc §3.2), and the run was at its highest time, not there.
 * (Instances' clocks differ by seconds, so a last record a little behind the highest is no import.)
 */
function resumePointUs(cp: Checkpoint, there: boolean): number {
  // (On the instance the last record came from, its own highest time: another's run ahead or behind.)
  const maxUs = there ? cp.run.instanceMaxUs ?? cp.run.maxUs : cp.run.maxUs;
  return maxUs !== undefined && maxUs - cp.cursor > KEYS_SPAN_US ? maxUs : cp.cursor;
}

/** The reconnect loop: one connection at a time, until a stop condition. */
export async function consumeStream(
  ctx: RunContext,
  options: BackfillSyncOptions,
  resumeFrom: Checkpoint | undefined,
  recent: RecentKeys | undefined,
): Promise<void> {
  const { o, stats, guard } = ctx;
  const select = createSelector(o);
  // The second pass over a legacy server's replay-to-live switch (see passOverSeam in process.ts):
  // the run's own request, from another cursor, on a connection of its own.
  ctx.openSeamPass ??= (base, cursorUs, unfiltered, signal) => {
    const req = buildSubscribeRequest(base, {
      ...o,
      wantedDids: unfiltered ? [] : o.wantedDids,
      wantedCollections: unfiltered ? [] : o.wantedCollections,
      cursor: cursorUs,
      compress: o.compress,
    });
    return openConnection(req.url, {
      idleTimeoutMs: Math.min(o.idleTimeoutMs, MAX_TIMER_MS),
      maxBufferedBytes: o.maxBufferedBytes,
      hello: req.hello,
      signal,
    });
  };
  // The last records the queue stored, by content: a server's re-ingest of them under new time_us
  // is dropped, as within a run.
  if (recent) {
    guard.remember(recent.keys);
    // The last pair is the last record stored.
    ctx.lastStoredB = recent.keys[recent.keys.length - 2] ?? 0;
    ctx.lastStoredA = recent.keys[recent.keys.length - 1] ?? 0;
  }
  let instanceIndex = Math.max(0, resumeFrom ? o.instances.indexOf(resumeFrom.run.instance) : 0);
  let startUs = o.startUs ?? Number.NEGATIVE_INFINITY;
  // Events at or below this time_us were processed on the current instance (its cursor is inclusive).
  const resumedUs = resumeFrom && resumeFrom.run.recordsStored > 0
    ? resumePointUs(resumeFrom, o.instances.includes(resumeFrom.run.instance))
    : -1;
  let floorUs = resumedUs;
  // The instance whose own time_us floorUs is (undefined after a failover or a search moved it to
  // another instance's time): only there do events past it show progress.
  let floorOf = resumedUs >= 0 ? resumeFrom!.run.instance : undefined;
  // The instance whose time_us the end is a time of: the one the run's first events come from (on a
  // resume, its first records; where its last came from, in a checkpoint of an older version).
  let endInstance = floorUs >= 0 ? resumeFrom!.run.firstInstance ?? resumeFrom!.run.instance : undefined;
  const endWhere = floorUs >= 0 && resumeFrom!.run.firstInstance === undefined
    ? "where the queue's last record came from"
    : "where the run's first events came from";
  // Whether the guard knows the records stored at floorUs: a resume learns them from the checkpoint
  // (on the instance they came from), a run from storing them.
  let floorKnown = floorUs < 0;
  // Where the events still needed begin (-1: at the start): the floor before any rewind. A rewind
  // asks for more than is needed, so a server's history that begins within it is no gap.
  // (Never before the start: a checkpoint set back to before the run's first record is just before it.)
  let neededUs = floorUs >= 0 && o.startUs !== undefined ? Math.max(floorUs, o.startUs) : floorUs;
  const tail = resumeFrom?.tail;
  // The key entries (see KeyEntry), when the last of them is the checkpoint's own commit: they hold
  // every record stored at the cursor, however many (entries at the newest time_us are never
  // deleted), and the guard remembers them already.
  const recentAtCursor = recent !== undefined && recent.keys.length > 0 &&
    recent.cursor === resumeFrom?.cursor && recent.seq === resumeFrom.seq;
  if (floorUs >= 0 && o.instances.includes(resumeFrom!.run.instance)) {
    if (tail?.us === floorUs && tail.keys) {
      guard.remember(tail.keys);
      floorKnown = true;
    } else if (recentAtCursor) {
      // More records at the cursor than the checkpoint's tail names (MAX_TAIL_KEYS).
      floorKnown = true;
    }
  }
  if (floorUs >= 0 && !o.instances.includes(resumeFrom!.run.instance)) {
    // time_us is assigned by each instance: another one's cursor is only close. With the content of
    // the last records stored known (kept with them, see KeyEntry), the stream is taken up a few
    // seconds earlier, as on a failover, and what comes again is dropped. Without them (a queue
    // written by an older version) a rewind would only repeat events, so none is made; say so.
    const to = o.instances[0];
    if (recentAtCursor) {
      floorUs -= o.rewindUs;
      floorKnown = true;
      // The start too is a time of the first instance: here an event stored after it can come a
      // little before it. Within the rewind, what was stored is recognised. Near the start (a cursor
      // less than two rewinds after it, as the instances' time_us differ by up to one), new events
      // before the first of those and before the start plus the rewind can be ones the first
      // instance had before its start: they are left out, and the ones after it are let in whatever
      // their time here. Further on, new events are ones the first instance left out, and are
      // stored. (Past the cursor plus the rewind without a record recognised, the wait ends with a
      // warning: this instance lacks them, and may lack events around the cursor.)
      startUs -= o.rewindUs;
      awaitStored(ctx, resumedUs, resumedUs);
      // A "connection" report, as a failover's is: the CLI says it without --verbose.
      ctx.report({
        reason: "connection",
        message: `resuming on ${new URL(to).host}, not ${
          new URL(resumeFrom!.run.instance).host
        } where the queue's last record came from; time_us differ between instances, so the stream is taken up ${
          o.rewindUs / 1e6
        } s before ${
          isoFromUs(resumedUs)
        } and the events stored already are recognised by content (the last ${
          recent.keys.length / 2
        } records stored are known)`,
        instance: to,
      });
    } else {
      // Data that may be missing: said as a coverage warning is, always.
      ctx.report({
        reason: "coverage",
        message: `resuming on ${new URL(to).host}, not ${
          new URL(resumeFrom!.run.instance).host
        } where the queue's last record came from; time_us differ between instances, so events within a few seconds of ${
          isoFromUs(floorUs)
        } may be missing or repeated (resume with that instance listed to continue exactly)`,
        instance: to,
      });
    }
  }
  // On v2 hosts events carry the server's sequence number (`cursor`): it, not time_us, is the
  // exact resume position there, and it is only ever sent back to the host that issued it.
  const seq: SeqState = { host: undefined, floor: -1 };
  if (resumeFrom?.run.seqCursor !== undefined && resumeFrom.run.seqInstance !== undefined) {
    seq.host = resumeFrom.run.seqInstance;
    seq.floor = resumeFrom.run.seqCursor;
    // (The checkpoint's cursor is the time_us of its last record, whose seq that is.)
    seq.floorUs = resumeFrom.cursor;
  }
  // The seq the resumed run stored last, which a resume with another server-side filter may not
  // select: a later seq first then says nothing of a loss (see Session.askedSeqSelected).
  const resumedSeq = ctx.resumedFilterChanged ? { host: seq.host, floor: seq.floor } : undefined;
  // The host whose seq the run had when the wait for a record stored before began (see
  // awaitStored): the resume's, or a failover's.
  let seqHostAtAwait = seq.host;
  let failures = 0;
  // How many times idleTimeout the next connection waits: doubled after each idle end without a new
  // event, up to MAX_IDLE_SCALE, and back to 1 with one. Reconnected from its last event, a narrow
  // filter makes the server scan the history since (protocol doc §5.2: every row counts, filtered
  // or not); once that scan takes longer than idleTimeout, the same wait would cut it off every time
  // and the run would never get back to live. A failover keeps it: the scan is as long there, and a
  // first scan from the start brings no frame at all, so it fails over after every two waits.
  let idleScale = 1;
  let connections = 0;
  // For each v2 host, the IDs of the dictionaries it answered UnknownZstdDictionary to.
  const refusedDictionaries = new Map<string, Set<number>>();
  let lastFailure: string | undefined;
  // Whether a connection was made to the instance the run is on since the run began or failed over
  // to it: a wait for the records stored last says nothing of one never reached.
  let reached = false;
  // Whether the run stopped while a connection was open (or as it ended), not while connecting.
  let stoppedConnected = false;
  // The instance being connected to (its coverage probe, then its stream), until it answers.
  let connecting: string | undefined;
  let disconnectedAt = performance.now();
  // A resume on the instance its last records came from is a reconnect after a stop: taken up the
  // rewind before its cursor, as a reconnect is, when the content keys of the records stored last
  // are known to recognise them (a stop can come right after a replay-to-live switch dropped or
  // reordered events, jetstream-legacy#42). On another instance the failover's rewind applies.
  let lastSpanUs = floorKnown && floorUs >= 0 && recent !== undefined && recent.keys.length > 0 &&
      o.instances.includes(resumeFrom!.run.instance)
    ? 2 * o.rewindUs
    : 0;
  // A live tail (no start) begins with its first connection, which asks for no cursor: only what
  // comes after it. Until an event comes, a reconnect asks from the time the last connection was
  // opened, by this machine's clock: what came while the run was away is not lost, and a healthy
  // server that was quiet all along replays one connection's time at most (a cursor kept at the tail's
  // beginning would make it scan ever more history, which a narrow filter could keep from ever
  // getting back to live). A failover after quiet connections asks from the first of them, as
  // the server left may have been stalled. This machine's clock and the server's time_us differ:
  // the cursor goes back the rewind (5 s) further, and only events more than that before the tail
  // began are left out (a v2 host's replay from before a time cursor, protocol doc §9).
  // (A resume of a tail that stored nothing: from when that tail began, as its reconnects were.)
  const resumedTail =
    o.startUs === undefined && resumeFrom !== undefined && resumeFrom.run.recordsStored === 0
      ? resumeFrom.run.tailBeganUs
      : undefined;
  let tailBeganUs = resumedTail;
  let liveFromUs = resumedTail;
  // Connections in a row that the idle timeout ended after they brought nothing new (nothing at all,
  // or the replay of the event at the cursor): a quiet filter, or an instance that has nothing new;
  // and when the first of them was opened.
  let quietInARow = 0;
  let quietSinceUs = 0;

  // The floor on the instance that delivered last, while failovers since have not reached one that
  // delivers: each of them rewinds from it, not from the floor the one before rewound.
  let unrewoundUs: number | undefined;
  // The instance that delivered last, the latest time_us of a selected event there (-1: none), and
  // the start its events were held to (a failover moves it back by the rewind).
  let deliveredBy = resumedUs >= 0 ? resumeFrom!.run.instance : undefined;
  let selectedUs = resumedUs;
  let deliveredStartUs = startUs;
  // The start by the clock of each instance where a search lined the stream up (see
  // Session.linedStartUs): back on one by time, it is held to that, not to the start less the rewind,
  // which is another instance's time (one 30 s behind has its first 30 s of the window before it).
  const linedStarts = new Map<string, number>();
  // (A resume there too: the checkpoint keeps it.)
  const resumedStart = resumeFrom?.run.instanceStartUs;
  if (resumedUs >= 0 && resumedStart !== undefined && o.instances.includes(resumeFrom!.run.instance)) {
    linedStarts.set(resumeFrom!.run.instance, resumedStart);
    if (o.instances[instanceIndex] === resumeFrom!.run.instance) startUs = deliveredStartUs = resumedStart;
  }
  // A live tail resumed by time on the instance where it began is held to its first event there, as
  // the run was: the rewind before the cursor (5 s) would reach events from before the tail began
  // when it had run for less than that. (By seq, a v2 host takes the stream up exactly, and an
  // import's event, whose time_us is years old, is stored as the run stored it.)
  const tailFrom = resumeFrom?.run.tailFrom;
  if (
    o.startUs === undefined && resumedUs >= 0 && tailFrom !== undefined && resumedStart === undefined &&
    resumeFrom!.run.seqCursor === undefined && o.instances[instanceIndex] === tailFrom.instance
  ) {
    startUs = deliveredStartUs = tailFrom.us;
  }

  /**
   * Says that a failover from `from` to `to` after `lastUs` has no record to line the two
   * instances' `time_us` up on (`why`): the stream is taken up the rewind before, which covers
   * clocks that differ by less than that, and no search can tell more.
   */
  const unaligned = (from: string, to: string, instance: string, lastUs: number, why: string) =>
    ctx.report({
      reason: "coverage",
      message: `${why} ${
        isoFromUs(lastUs)
      }, to line the time_us of ${to} up with those of ${from}: if they run more than ${
        o.rewindUs / 1e6
      } s behind, selected events just after ${isoFromUs(lastUs)} may be missing${
        o.startUs === undefined ? "" : ", and if ahead, ones just before the start may be stored"
      }`,
      instance,
    });

  /**
   * Takes the stream up by time on `to` after `from`, a little earlier (`rewindUs`); when `other`
   * (another instance, whose time_us differ: a failover to another one, or a host at the same
   * address numbering anew), lined up with what was stored, as a resume on another instance is.
   * `names` say the two in messages. Returns the time processed last (-1: none).
   */
  const realign = (
    from: string,
    to: string,
    other: boolean,
    names = [from, to].map((u) => new URL(u).host),
  ) => {
    // A wait for the last record stored that is not over goes on there (see RunContext.awaited):
    // from the time processed last on the instance that stored it, not from that of one since,
    // which may lack it.
    const awaited = other ? ctx.awaited : undefined;
    const lastUs = awaited?.lastUs ?? unrewoundUs ?? floorUs;
    if (lastUs >= 0) {
      unrewoundUs = lastUs;
      floorUs = lastUs - o.rewindUs;
      floorOf = undefined;
      // That rewind covers what a reconnect's would (the same 5 s at most): not both.
      lastSpanUs = 0;
    }
    // With records stored to recognise, as on a resume on another instance (above): the start is
    // also a time of the instance left, so it moves back by the rewind, and new events before the
    // first record recognised are left out near the start (they can be ones the instance left had
    // before its start), stored further on; past the last time processed plus the rewind without
    // one recognised, a coverage warning.
    // (On one where a search lined the stream up, the start by its clock.)
    const linedStart = other ? linedStarts.get(to) : undefined;
    const known = ctx.accepted > 0 || (recent !== undefined && recent.keys.length > 0);
    if (lastUs >= 0 && known && other) {
      let anchorUs = lastUs;
      if (awaited !== undefined) {
        floorUs = lastUs - searchAgain(ctx, to, seq.host === to && seq.floor >= 0 && !seq.fromOldest);
      } else {
        // (From before the last record selected, when that is further back than the rewind.)
        anchorUs = awaitStored(ctx, lastUs, selectedUs);
        floorUs = anchorUs - o.rewindUs;
        seqHostAtAwait = seq.host;
        if (anchorUs === lastUs && selectedUs < lastUs - o.rewindUs) {
          unaligned(
            names[0],
            names[1],
            to,
            lastUs,
            `no record was selected on ${names[0]} in the ${SEARCH_MAX_REWINDS * o.rewindUs / 1e6} s before`,
          );
        }
      }
      // (Further back where a search lined the streams up already.)
      startUs = (o.startUs ?? Number.NEGATIVE_INFINITY) - (anchorUs - floorUs);
    } else if (lastUs >= 0 && other) {
      unaligned(names[0], names[1], to, lastUs, "no record was stored yet, before");
    }
    if (linedStart !== undefined) startUs = linedStart;
    return lastUs;
  };

  /** Moves on to the next instance, a little earlier in time (`rewindUs`): time_us differ between them. */
  const failOver = (toIndex = (instanceIndex + 1) % o.instances.length, lacks = false) => {
    const from = o.instances[instanceIndex];
    instanceIndex = toIndex;
    stats.failovers++;
    reached = false;
    quietInARow = 0;
    const to = o.instances[instanceIndex];
    const lastUs = realign(from, to, from !== to);
    ctx.report({
      reason: "connection",
      message: `failing over from ${new URL(from).host} to ${new URL(to).host}${
        seq.host === to && seq.floor >= 0 && !seq.fromOldest
          ? "; back on the host that delivered last, the stream is taken up by its seq, where it was"
          : lastUs >= 0
          ? `; time_us differ between instances, so the stream is taken up ${
            (lastUs - floorUs) / 1e6
          } s before ${isoFromUs(lastUs)} there and what was stored already is recognised by content`
          : ""
      }`,
      instance: to,
    });
    // Nothing came yet: the history that counts is the next instance's, checked before it is used.
    if (stats.lastProcessedUs === null) coverage = initialCoverage;
    else if (from !== to && neededUs >= 0) {
      // Whether the next instance still holds what is needed: a legacy server moves a cursor older
      // than its history to its oldest event without a word.
      coverage = { fromUs: neededUs, atStart: false };
      probed.clear();
    }
    if (coverage !== undefined && coverage.fromUs !== lackingFrom) newPoint(coverage.fromUs, from);
    else if (!lacks) {
      // Left for failing (or silence), not for its history: no longer one to go back to.
      lacking.delete(from);
      if (settleOn === from) settleOn = undefined;
    }
  };

  /**
   * The index of the next instance whose live stream sends an event, when that of `base` sends none
   * (said in a report); undefined when `base`'s does, when none does, or when a probe cannot tell.
   */
  const liveInstead = async (base: string): Promise<number | undefined> => {
    const timeoutMs = Math.min(PROBE_TIMEOUT_MS, o.idleTimeoutMs);
    const live = (url: string) =>
      probeLiveEvent(url, { timeoutMs, signal: ctx.internal.signal }).catch(() => undefined);
    if (await live(base) !== false) return undefined;
    for (let i = 1; i < o.instances.length && !ctx.stop; i++) {
      const index = (instanceIndex + i) % o.instances.length;
      if (await live(o.instances[index]) !== true) continue;
      ctx.report({
        reason: "connection",
        message: `${
          new URL(base).host
        } sends nothing new: its live stream, asked for every event, sent none in ${
          timeoutMs / 1000
        } s, while that of ${new URL(o.instances[index]).host} did (its source may have stopped)`,
        instance: base,
      });
      return index;
    }
    return undefined;
  };

  // For each instance whose refusal asked for a wait (Retry-After), when it is over (performance.now()
  // ms: a step of the wall clock changes nothing).
  const notBefore = new Map<string, number>();
  /** Counts a failed attempt and waits out its backoff, failing over on the way; false: give up. */
  const failedAttempt = async (base: string, failure: string, retryAfterMs?: number): Promise<boolean> => {
    // A name the resolver says does not exist: most likely a typo, but also a machine without its
    // network, or a service name not up yet; so it is retried like any failure, and said at once.
    const message = !NO_SUCH_HOST.test(failure)
      ? failure
      : / through the proxy /.test(failure)
      ? `${failure} (no such host: check the proxy, HTTPS_PROXY / HTTP_PROXY, or this machine's network)`
      : `${failure} (no such host: check --instance / instance, or this machine's network)`;
    failures++;
    lastFailure = message;
    connecting = undefined;
    const giveUp = failures > o.maxRetries;
    const backoff = giveUp ? 0 : backoffDelay(failures);
    // A refusal that asks for a longer wait (Retry-After) is taken at its word: that instance is not
    // asked again before it is over. A run with others goes to the next one meanwhile.
    const longer = retryAfterMs !== undefined && retryAfterMs > backoff;
    if (longer) notBefore.set(base, performance.now() + retryAfterMs);
    const switching = o.instances.length > 1 && (longer || failures % o.failoverAfter === 0);
    const next = switching ? o.instances[(instanceIndex + 1) % o.instances.length] : base;
    const held = Math.max(0, (notBefore.get(next) ?? 0) - performance.now());
    const asked = !giveUp && held > backoff;
    const wait = asked ? held : backoff;
    // Which try it was, and what comes next: a run that cannot connect is not silently stuck.
    ctx.report({
      reason: "connection",
      message: `${message} (attempt ${failures} of ${o.maxRetries + 1}${
        giveUp
          ? ""
          : `; ${switching ? `next, ${new URL(next).host}` : "trying again"} in ${
            (wait / 1000).toFixed(1)
          } s${asked ? `, as ${next === base ? "its" : "that one's"} Retry-After asks` : ""}`
      })`,
      instance: base,
    });
    if (giveUp) {
      ctx.stop = "error";
      ctx.error = `gave up after ${failures} connection attempt${
        failures === 1 ? "" : "s"
      } without progress; last error: ${message}`;
      return false;
    }
    if (switching) failOver();
    await delay(wait, ctx.internal.signal);
    return true;
  };

  // Coverage still to check: is the requested start (or the resume point) within the history of
  // the server about to be used? Checked before its first connection and after a long outage.
  // (Where a resumed tail that stored nothing is taken up: its cursor must be within the history too.)
  const from = neededUs >= 0
    ? neededUs
    : o.startUs ?? (resumedTail === undefined ? undefined : resumedTail - o.rewindUs);
  const initialCoverage = from === undefined
    ? undefined
    : { fromUs: from, atStart: neededUs < 0 && o.startUs !== undefined };
  let coverage = initialCoverage;
  // The instances whose coverage a probe measured for the point last checked: their connections'
  // own OutdatedCursor (v2 wire) says nothing more.
  const probed = new Set<string>();
  // With several instances, one whose probe finds that its history begins after the point needed
  // (`lackingFrom`) is left for the others until each was tried for that point (`visited`), and
  // then the one whose history begins first (`lacking`, its probe's oldest event) is taken
  // (`settleOn`, where the gap is taken whatever a probe finds, so that two instances never take
  // turns): another instance may hold what that one lacks.
  const lacking = new Map<string, number>();
  const visited = new Set<string>();
  let lackingFrom: number | undefined;
  let settleOn: string | undefined;
  /**
   * Starts over for a new point needed, `fromUs`; `left` is an instance the run failed over from
   * (it failed, or had nothing new), which counts as tried.
   */
  const newPoint = (fromUs: number, left?: string) => {
    lacking.clear();
    visited.clear();
    if (left !== undefined) visited.add(left);
    lackingFrom = fromUs;
    settleOn = undefined;
  };
  /** Whether to try another instance than `base`, whose history begins at `firstUs`, after the point needed. */
  const tryOthers = (base: string, firstUs: number): boolean => {
    if (o.instances.length === 1 || settleOn === base) return false;
    lacking.set(base, firstUs);
    return o.instances.some((other) => !visited.has(other)) ||
      [...lacking].some(([other, otherUs]) => other !== base && otherUs < firstUs);
  };
  // For each v2 host, the seq to resume from whose loss a probe last reported: a CursorTooOld for
  // that same seq is then no news, any other is (the window moved after a probe found it whole).
  const seqLossReported = new Map<string, number>();
  // A connection taken up by seq whose first event came later than the seq asked for: the host no
  // longer holds it (a v2 server's /subscribe clamps such a cursor without a word, protocol doc §1.2).
  // A probe beside the stream finds where its history begins now and reports the seqs lost, as the
  // probe before a connection does (a strict run stops).
  let seqProbe: Promise<void> | undefined;
  ctx.onSeqClamped = (base, seqFrom, firstSeq) => {
    if (seqLossReported.get(base) === seqFrom || seqProbe !== undefined) return undefined;
    seqLossReported.set(base, seqFrom);
    const host = new URL(base).host;
    // What the stream itself shows, said when the probe cannot tell more.
    const shown = (why: string) =>
      `${host} no longer holds seq ${
        seqFrom - 1
      }, asked for on reconnecting: it sent seq ${firstSeq} first, so events of seqs ${seqFrom} to ${
        firstSeq - 1
      } may be missing (${why})`;
    // Not cut short by the run's stop: its stream may end before the probe has answered, and what it
    // finds is said all the same (the user's abort says what the stream showed).
    const signal = AbortSignal.any([ctx.sideProbes.signal, ...(options.signal ? [options.signal] : [])]);
    const probeOptions = { timeoutMs: Math.min(PROBE_TIMEOUT_MS, o.idleTimeoutMs), signal };
    const probing = (async () => {
      let oldest: HistoryStart | null;
      try {
        oldest = await probeHistoryStart(base, probeOptions);
      } catch (err) {
        if (ctx.sideProbes.signal.aborted) return;
        const why = options.signal?.aborted
          ? "the run was stopped before the seqs lost were measured"
          : `where its history begins now could not be found: ${(err as Error).message}`;
        coverageLoss(ctx, base, shown(why));
        return;
      }
      if (oldest === null) {
        coverageLoss(ctx, base, shown("asked for all it holds, it sent nothing"));
      } else if (oldest.seq !== undefined && oldest.seq > seqFrom) {
        coverageSeqGap(ctx, base, seqFrom, oldest.seq, oldest.us);
      } else if (oldest.seq !== undefined && oldest.seq < seqFrom) {
        // It held the seq asked for (a history only moves on) and sent a later one first: it skipped
        // what came between, as a v2 server once did at a segment's seam (bluesky-social/jetstream#190).
        coverageLoss(
          ctx,
          base,
          `${host} skipped events on reconnecting: asked for seq ${
            seqFrom - 1
          } on, which it holds (its history begins at seq ${oldest.seq}), it sent seq ${firstSeq} first, so events of seqs ${seqFrom} to ${
            firstSeq - 1
          } may be missing (a server fault, as in bluesky-social/jetstream#190)`,
        );
      }
    })().catch((err) => {
      // A strict run's refusal, thrown where nothing was stored yet: here the run is under way.
      ctx.error ??= err instanceof Error ? err.message : String(err);
      stopWith(ctx, "error");
    }).finally(() => {
      // (A strict run waits for the probe it starts, see readConnection: its stop is the probe's.)
      seqProbe = undefined;
    });
    seqProbe = probing;
    return probing;
  };

  while (!ctx.stop) {
    const base = o.instances[instanceIndex];
    if (
      !coverage && floorUs >= 0 && connections > 0 && performance.now() - disconnectedAt > o.idleTimeoutMs
    ) {
      // After an outage longer than the idle timeout the cursor may have fallen out of history.
      coverage = { fromUs: neededUs, atStart: false };
      probed.clear();
    }
    connecting = base;
    if (coverage) {
      // Resuming by seq on this host: its seq, not a display time_us, says what is still there.
      const seqFrom = seq.host === base && seq.floor >= 0 ? seq.floor + 1 : undefined;
      if (coverage.fromUs !== lackingFrom) newPoint(coverage.fromUs);
      visited.add(base);
      const checked = await checkCoverage(ctx, base, coverage.fromUs, coverage.atStart, seqFrom, tryOthers);
      if (ctx.stop) break;
      if ("lacks" in checked) {
        // The next instance not tried yet for this point, else the one whose history begins first.
        let next = o.instances.findIndex((other) => !visited.has(other));
        if (next < 0) {
          const [first] = [...lacking].reduce((a, b) => (b[1] < a[1] ? b : a));
          next = o.instances.indexOf(first);
          settleOn = first;
        }
        const point = `${coverage.atStart ? "the requested start" : "the point to go on from"}, ${
          isoFromUs(coverage.fromUs)
        }`;
        const nextHost = new URL(o.instances[next]).host;
        ctx.report({
          reason: "connection",
          message: `${new URL(base).host} ${
            checked.lacks === Infinity
              ? `sent no event when asked for all it holds, so it may not hold ${point}`
              : `only holds events from ${isoFromUs(checked.lacks)} on, after ${point}`
          }: ${
            settleOn === undefined
              ? `trying ${nextHost}, which may hold it`
              : `back to ${nextHost}, whose history begins first`
          }`,
          instance: base,
        });
        connecting = undefined;
        failOver(next, true);
        continue;
      }
      if ("refused" in checked) {
        if (stats.recordsStored === 0 && connections === 0) throw new UsageError(checked.refused);
        ctx.stop = "error";
        ctx.error = checked.refused;
        break;
      }
      if ("retry" in checked) {
        // A probe refused for a while (a v2 host warming up) or lost is retried like a connection.
        if (!await failedAttempt(base, checked.retry, checked.retryAfterMs)) break;
        continue;
      }
      if (checked.measured) probed.add(base);
      if (checked.seqsLost && seqFrom !== undefined) seqLossReported.set(base, seqFrom);
      coverage = undefined;
    }
    const bySeq = seq.host === base && seq.floor >= 0;
    if (bySeq) {
      // On the host that delivered last (back after a failover, when none of the others delivered
      // since): its seq takes the stream up exactly where it was, so nothing stored comes again to
      // be recognised, and what comes is new, held to the start it was held to there.
      // (Not on the instance failed over to, whose seq came with the wait: a reconnect by it takes
      // that stream up where it was, and the wait goes on.)
      if (ctx.awaitStoredUntilUs >= 0 && base === seqHostAtAwait) endAwait(ctx);
      startUs = deliveredStartUs;
    }
    // Reconnecting by time, ask for a few seconds more than the inclusive cursor (the failover's
    // rewind, 5 s): a legacy server can drop or reorder events around its replay-to-live switch
    // (jetstream-legacy#42), and a connection can go on for seconds after that before it drops
    // (protocol doc §9.1: "rewind more than a few seconds"). What comes again is recognised by the
    // replay guard. At most half the time the last connection with events covered, so that a
    // server dropping every connection early still lets the sync move forward.
    const rewindUs = !bySeq && floorUs >= 0 ? Math.min(o.rewindUs, Math.floor(lastSpanUs / 2)) : 0;
    const sessionFloor = floorUs - rewindUs;
    const timeUs = sessionFloor >= 0
      ? sessionFloor
      : o.startUs ?? (liveFromUs === undefined ? undefined : liveFromUs - o.rewindUs);
    // A time before 2001-09-09 (under 10^15 µs) would be a prefix of the keys to a legacy server and a
    // seq to a v2 one (protocol doc §1): it goes as 10^15, earlier than any history, which asks for
    // all that is retained.
    const cursor = bySeq
      ? seq.fromOldest ? MIN_TIMESTAMP_US : seq.floor
      : timeUs === undefined
      ? undefined
      : Math.max(timeUs, MIN_TIMESTAMP_US);
    const v2 = isV2Url(base);
    let decode = ctx.decodeFrame;
    let req: { url: string; hello?: string };
    if (v2) {
      const dict = o.compress && !ctx.v2Uncompressed.has(base)
        ? await v2Decoder(ctx, base, options)
        : undefined;
      decode = dict?.decode;
      req = { url: buildV2Url(base, { ...o, cursor, zstdDictionary: dict?.id }) };
    } else {
      req = buildSubscribeRequest(base, { ...o, cursor, compress: o.compress });
    }
    let conn: Connection;
    const openedUs = Date.now() * 1000;
    try {
      conn = await openConnection(req.url, {
        idleTimeoutMs: Math.min(o.idleTimeoutMs * idleScale, MAX_TIMER_MS),
        maxBufferedBytes: o.maxBufferedBytes,
        hello: req.hello,
        signal: ctx.internal.signal,
        protocols: v2 ? [V2_SUBPROTOCOL] : undefined,
      });
    } catch (err) {
      if (ctx.stop) break;
      const e = err as ConnectError;
      const xrpc = v2 ? parseXrpcError(e.body) : undefined;
      if (xrpc?.error === "CursorTooOld" && bySeq && !seq.fromOldest) {
        // The seq fell out of the server's window. Resuming by time would be clamped to the window's
        // start, but then the time floor would drop new events whose display time is older than the
        // last one stored (years old after an operator's import, protocol doc §3.2). So the next
        // connection asks for all the server holds (a time before any history, which it moves to
        // its window's start) and goes on by seq; a probe first measures the seqs lost, unless one
        // just did for this very seq. (One that found them all still there was answered before
        // the window moved on.)
        ctx.report({
          reason: "retry",
          message: `CursorTooOld: ${xrpc.message}; resuming from the oldest event it holds`,
          instance: base,
        });
        seq.fromOldest = true;
        if (seqLossReported.get(base) !== seq.floor + 1) coverage = { fromUs: neededUs, atStart: false };
        continue;
      }
      if (xrpc?.error === "UnknownZstdDictionary" && ctx.v2Dictionary) {
        // The host moved on to another dictionary (or, after a failover, uses another than the last
        // host did): fetch it. One this host refused already means it serves a dictionary it cannot
        // compress with, so its connections go on uncompressed; other hosts' still ask. (Each refusal
        // either adds an ID to the host's or ends its compression: no loop, and no connection
        // attempt counted.)
        const refused = refusedDictionaries.get(base) ?? new Set<number>();
        refusedDictionaries.set(base, refused.add(ctx.v2Dictionary.id));
        ctx.v2Dictionary = undefined;
        const again = await v2Decoder(ctx, base, options);
        if (again && refused.has(again.id)) {
          ctx.v2Uncompressed.add(base);
          ctx.report({
            reason: "retry",
            message: `${xrpc.message}; continuing uncompressed`,
            instance: base,
          });
        }
        continue;
      }
      // A refusal (4xx but 429), a redirect (3xx, not followed: the URL is the user's to change) or
      // a connection Deno's permissions deny would come again: stop, as for bad input.
      if (e.denied || (e.status !== undefined && e.status >= 300 && e.status < 500 && e.status !== 429)) {
        if (stats.recordsStored === 0 && connections === 0) throw new UsageError(e.message);
        ctx.stop = "error";
        ctx.error = e.message;
        break;
      }
      if (!await failedAttempt(base, e.message, e.retryAfterMs)) break;
      continue;
    }
    connecting = undefined;
    connections++;
    ctx.connected = true;
    reached = true;
    if (connections > 1) stats.reconnects++;
    ctx.batcher.host = base;
    ctx.batcher.hostStartUs = linedStarts.get(base);
    const before = {
      us: stats.lastProcessedUs,
      // (Events past the floor are progress only on the instance whose time it is.)
      floorUs: floorOf === base ? floorUs : Number.POSITIVE_INFINITY,
      seq: seq.floor,
      seqHost: seq.host,
      accepted: ctx.accepted,
      messages: stats.messagesReceived,
    };
    const session: Session = {
      base,
      v2,
      decode,
      floorUs: sessionFloor,
      floorKnown,
      seqFloor: bySeq ? seq.floor : -1,
      askedSeq: bySeq && !seq.fromOldest ? seq.floor : undefined,
      askedSeqSelected: resumedSeq === undefined || resumedSeq.host !== seq.host ||
        resumedSeq.floor !== seq.floor,
      startUs: sessionFloor < 0 && tailBeganUs !== undefined
        ? Math.max(startUs, tailBeganUs - o.rewindUs)
        : startUs,
      errorFrame: false,
      outdatedFrom: undefined,
      infoFrames: 0,
      idleResetMs: idleScale > 1 ? o.idleTimeoutMs : undefined,
      // A history that begins within a rewind is no gap: measured from what is still needed. (A
      // search further back than the first rewind asks for more than is needed: see
      // RunContext.search for a history that begins after its cursor.)
      requestedUs: bySeq || timeUs === undefined || probed.has(base) ||
          (ctx.search !== undefined && ctx.search.rewindUs > o.rewindUs)
        ? undefined
        : Math.max(timeUs, neededUs),
      // (A seq when taken up by seq: then requestedUs is undefined, and this is not read.)
      sentUs: bySeq ? -1 : cursor ?? -1,
      maxUs: -1,
      minUs: -1,
      maxSelectedUs: -1,
    };
    ctx.drain = () => {
      if (!conn.drain) return false;
      // Ending already (the server closed): what was read is processed all the same.
      conn.drain(DRAIN_WAIT_MS, DRAIN_MAX_MS);
      return true;
    };
    try {
      await readConnection(ctx, conn, session, select, guard, seq, options);
    } finally {
      ctx.drain = undefined;
      conn.close();
      await conn.closed();
    }
    // (Moved where a search lined this instance's stream up further back than the rewind.)
    if (session.linedStartUs !== undefined) {
      startUs = session.linedStartUs;
      linedStarts.set(base, startUs);
    }
    if (o.startUs === undefined) {
      tailBeganUs ??= openedUs;
      liveFromUs ??= openedUs;
    }
    // A drain after the user's abort ended: what the server sent before the close was read.
    if (ctx.draining) stopWith(ctx, "aborted");
    if (session.handedBack !== undefined && !ctx.stop) {
      // Another numbering at this address (see readConnection): another instance, as after a
      // failover, though at the same place in the list. Its time_us are not those the floor is a
      // time of: the stream is taken up the rewind before it (what comes again is recognised by
      // content, and lined up with what was stored), and where its history begins is checked again
      // (a gap is reported; a strict run stops). The host answered: no failed attempt (nor are the
      // ones before it forgiven).
      ctx.report({ reason: "connection", message: session.handedBack, instance: base });
      const host = new URL(base).host;
      linedStarts.delete(base);
      realign(base, base, true, [`the earlier instance at ${host}`, "the new one"]);
      coverage = { fromUs: neededUs, atStart: false };
      probed.clear();
      disconnectedAt = performance.now();
      continue;
    }
    if (ctx.searchBack) {
      ctx.searchBack = false;
      if (!ctx.stop) {
        // A new record came here before any of those stored last (see RunContext.search): nothing
        // of this connection was stored, and the next goes further back on this instance.
        const { lastUs } = ctx.awaited!;
        const tried = ctx.search!.rewindUs;
        const leftOut = ctx.searchLeftOut;
        ctx.searchLeftOut = 0;
        floorUs = searchFurther(ctx);
        floorOf = undefined;
        lastSpanUs = 0;
        // The instance answered and sent events: no failed attempt.
        failures = 0;
        // (By time: a seq of this connection would take the stream up where it ended.)
        if (seq.host === base) {
          seq.host = undefined;
          seq.floor = -1;
          seq.floorUs = undefined;
        }
        disconnectedAt = performance.now();
        ctx.report({
          reason: "connection",
          message: leftOut > 0
            ? `on ${new URL(base).host}, ${leftOut} new record${
              leftOut === 1 ? "" : "s"
            } came before the first of those stored last, taken up ${tried / 1e6} s before ${
              isoFromUs(lastUs)
            }: before the start by the other instance's time_us, yet perhaps ones it lacked, as this one's may run behind; the stream is taken up ${
              (lastUs - floorUs) / 1e6
            } s before instead, to tell`
            : `on ${
              new URL(base).host
            }, a new record came before any of those stored last: its time_us may run more than ${
              tried / 1e6
            } s behind the other instance's, and events in between would be missing; ${
              ctx.search === undefined
                ? `no further search can tell, so the stream is taken up ${o.rewindUs / 1e6} s before ${
                  isoFromUs(lastUs)
                } again`
                : `the stream is taken up ${(lastUs - floorUs) / 1e6} s before ${isoFromUs(lastUs)} instead`
            }`,
          instance: base,
        });
        continue;
      }
    }
    if (session.maxUs >= 0) endInstance ??= base;
    if (ctx.stop === "end" && endInstance !== undefined && base !== endInstance) {
      // The end was compared with this instance's time_us, which differ from the other's by seconds,
      // or by as much as the two clocks differ: events that near the end may be on the wrong side of it. Data that may be
      // missing or extra is said as a coverage warning is, always.
      ctx.report({
        reason: "coverage",
        message: `the end, ${isoFromUs(o.endUs!)}, was reached on ${new URL(base).host}, not ${
          new URL(endInstance).host
        } ${endWhere}; time_us differ between instances, by seconds between healthy ones but by as much as their clocks differ, so events within that of the end may be missing or stored past it`,
        instance: base,
      });
    }
    // The floor is this instance's own clock: what this connection processed, not another
    // instance's time (after a failover the two differ by up to the rewind).
    if (session.maxUs >= 0) {
      // (Another instance's time_us are not this one's: a selection seen only there does not count.)
      selectedUs = base === deliveredBy ? Math.max(selectedUs, session.maxSelectedUs) : session.maxSelectedUs;
      deliveredBy = base;
      deliveredStartUs = startUs;
      unrewoundUs = undefined;
      floorUs = Math.max(session.floorUs, session.maxUs);
      floorOf = base;
      neededUs = Math.max(neededUs, floorUs);
      floorKnown = true;
    }
    // A connection without events leaves it: the next attempt covers the same drop again.
    if (session.maxUs >= 0 && session.minUs >= 0) lastSpanUs = session.maxUs - session.minUs;
    // Back in the window: later connections ask from the last seq again.
    if (seq.floor !== before.seq) seq.fromOldest = false;
    disconnectedAt = performance.now();
    if (ctx.stop) {
      stoppedConnected = true;
      break;
    }
    const cause = conn.cause!;
    if (stats.messagesReceived === before.messages && refusedSubscription(cause)) {
      // Closed before sending anything, for what was asked: retrying the same request is no use.
      const message = `${new URL(base).host} refused the subscription (close code ${cause.code}${
        cause.reason ? `: ${cause.reason}` : ""
      })`;
      if (connections === 1 && stats.recordsStored === 0 && ctx.accepted === before.accepted) {
        throw new UsageError(message);
      }
      ctx.stop = "error";
      ctx.error = message;
      break;
    }
    if (cause.kind === "closed" && cause.code === 1000 && !session.errorFrame && !replayFailure(cause)) {
      // A legacy server also closes with 1000 to refuse an options_update; say why it closed.
      if (cause.reason) {
        ctx.report({
          reason: "connection",
          message: `server closed the stream: ${cause.reason}`,
          instance: base,
        });
      }
      ctx.stop = "closed";
      break;
    }
    // Progress means new events, not the inclusive replay of the last one; or a later seq on the
    // same host (another host's seqs are another count); or events past the floor when it is this
    // instance's own time (failed over to one whose time_us run behind, its replay of what was stored
    // is all before the time processed last, yet moves on; past a floor rewound from another
    // instance's time, that replay alone would count).
    const progressed = stats.lastProcessedUs !== before.us ||
      (seq.floor !== before.seq && seq.host === before.seqHost) ||
      ctx.accepted !== before.accepted || session.maxUs > before.floorUs;
    // A quiet connection closed by the idle timeout had been accepted by the server: a narrow
    // filter can be silent for long, so it does not count as a failure. One that stalled in the
    // middle of a message does: the same message would stall again.
    const failed = !progressed && (cause.kind !== "idle" || cause.partial);
    // (An idle one does not add up with the failures of another instance before it either: a
    // quiet filter would otherwise end the run when one of its instances is down.)
    if (progressed || !failed) failures = 0;
    else failures++;
    // One that failed may have been cut short: the time it covered is in doubt.
    if (o.startUs === undefined && !failed) liveFromUs = openedUs;
    // (Back to idleTimeout once a new event came: see idleResetMs.)
    const waitedMs = idleScale > 1 && session.idleResetMs === undefined
      ? o.idleTimeoutMs
      : Math.min(o.idleTimeoutMs * idleScale, MAX_TIMER_MS);
    if (progressed) idleScale = 1;
    else if (cause.kind === "idle" && !cause.partial) idleScale = Math.min(2 * idleScale, MAX_IDLE_SCALE);
    const why = cause.kind === "closed"
      ? `connection closed (code ${cause.code}${cause.reason ? `: ${cause.reason}` : ""})`
      : cause.kind === "idle"
      ? cause.partial
        ? `a message stopped arriving midway: no progress for ${waitedMs / 1000} s`
        : `no message for ${waitedMs / 1000} s`
      : cause.kind === "overflow"
      ? "the pipeline fell behind the socket; reconnecting from the cursor"
      : "connection aborted";
    if (failed) lastFailure = why;
    ctx.report({ reason: "retry", message: `${why}; reconnecting`, instance: base });
    if (failures > o.maxRetries) {
      ctx.stop = "error";
      ctx.error = `gave up after ${failures} reconnects without progress; last: ${why}`;
      break;
    }
    if (o.instances.length > 1 && failed && failures % o.failoverAfter === 0) failOver();
    // Quiet connections in a row never stop the run. Whether they bring no frame at all (but
    // notices, a v2 host's #info) or only the event at their inclusive cursor, a narrow filter with
    // nothing new cannot be told by them from a server that accepts and sends nothing (protocol doc
    // §9, jetstream-legacy#48) or from an instance whose own source stopped (it replays what it
    // holds, and nothing new comes): its live stream, for every event, can. With other instances,
    // one that sends nothing there while another's does is left for it.
    const quiet = cause.kind === "idle" && !cause.partial && !progressed;
    quietInARow = quiet ? quietInARow + 1 : 0;
    if (quietInARow === 1) quietSinceUs = openedUs;
    if (o.instances.length > 1 && quiet && quietInARow % o.failoverAfter === 0) {
      const probing = performance.now();
      const to = await liveInstead(base);
      // (The probes' time is no outage: it does not call for a coverage probe, see above.)
      disconnectedAt += performance.now() - probing;
      if (to !== undefined) {
        if (liveFromUs !== undefined) liveFromUs = quietSinceUs;
        failOver(to);
      }
    }
    if (failures > 0 || cause.kind !== "overflow") {
      // A part-filled batch is stored before the wait, not kept for the next connection.
      const partial = ctx.batcher.take();
      if (partial) await ctx.writer.add(partial);
      // (Not before an instance's Retry-After is over: one failed over to may have asked for one.)
      const held = (notBefore.get(o.instances[instanceIndex]) ?? 0) - performance.now();
      await delay(Math.max(backoffDelay(Math.max(1, failures)), held), ctx.internal.signal);
    }
  }
  // What a probe beside the stream finds is part of the run's outcome.
  await seqProbe;
  if (
    ctx.stop === "max_time" && connections === 0 && !ctx.probeAnswered &&
    (lastFailure !== undefined || connecting !== undefined)
  ) {
    // Not a run that ran out of time, but one that never got a connection: attempts failed, or the
    // one under way had no answer yet (a server that accepts TCP but never answers the upgrade).
    ctx.stop = "error";
    const parts = [`no connection within --max-time / maxTime (${o.maxTimeMs / 1000} s)`];
    if (connecting !== undefined) parts.push(`${new URL(connecting).host} had not answered yet`);
    if (lastFailure !== undefined) parts.push(`last error: ${lastFailure}`);
    ctx.error = parts.join("; ");
  } else if (ctx.stop === "max_time" && connections > 0 && !stoppedConnected && failures > 0) {
    // Nor is one whose connection was lost and that could not get one back: every attempt since
    // failed (a drop alone, or a connection under way that has not answered yet, is not enough).
    ctx.stop = "error";
    ctx.error = `the connection was lost, and ${
      failures === 1 ? "the attempt" : `all ${failures} attempts`
    } to get one back failed before --max-time / maxTime (${
      o.maxTimeMs / 1000
    } s) ran out; last error: ${lastFailure}`;
  }
  // (On the instance the run was on, if it was reached since the run failed over to it.)
  if (stats.lastProcessedUs !== null && reached) reportUnfinishedAwait(ctx, o.instances[instanceIndex]);
}

/**
 * Whether a close says the server refused the subscription itself: 1007 or 1008 (the v2 server's
 * `/subscribe` on a bad or refused `options_update`), or 1000 with the legacy server's reasons for
 * refusing one (protocol doc §2).
 */
function refusedSubscription(cause: CloseCause): cause is Extract<CloseCause, { kind: "closed" }> {
  if (cause.kind !== "closed") return false;
  if (cause.code === 1007 || cause.code === 1008) return true;
  return cause.code === 1000 &&
    /^failed to (unmarshal subscriber|parse subscriber options)/.test(cause.reason ?? "");
}

/** What a coverage probe found: a failure worth retrying, or whether it measured coverage. */
type CoverageCheck =
  | { retry: string; retryAfterMs?: number }
  | { refused: string }
  | { lacks: number }
  | { measured: boolean; seqsLost: boolean };
const NOT_MEASURED: CoverageCheck = { measured: false, seqsLost: false };

/**
 * Probes where `base`'s history begins and compares it with `fromUs`, the requested start
 * (`atStart`) or a resume point; see {@link coverageGap}. A resume by seq on a v2 host (`seqFrom`,
 * the first seq still needed) is judged by the oldest seq instead: there `time_us` is a display
 * time, years old after an operator's import (protocol doc §3.2, §10.14), and a resume point within
 * the history by seq loses nothing whatever its time. Resolves to whether it measured coverage (and
 * found seqs lost), or to a message when the probe failed in a way worth retrying (a network error,
 * a timeout, a 5xx or 429 refusal). A legacy server that refuses the probe itself leaves coverage
 * unknown, which is reported (and stops a strict run); on the v2 wire, the sync connection's own `#info
 * OutdatedCursor` then measures it (late by what a filter leaves out). A probe answered with no
 * event at all (a server that does not replay, or holds nothing) leaves coverage unknown on either
 * wire for a point in the past (with several instances, tried after the others, as `lacks` of
 * `Infinity`: a host that accepts and never sends looks the same); one less than the probe's wait
 * before it began is no concern, as the probe saw the server quiet for as long. A history that
 * begins after `fromUs` resolves to where it begins (`lacks`), unreported, when `tryOthers` says to
 * try other instances first.
 */
async function checkCoverage(
  ctx: RunContext,
  base: string,
  fromUs: number,
  atStart: boolean,
  seqFrom: number | undefined,
  tryOthers: (base: string, firstUs: number) => boolean,
): Promise<CoverageCheck> {
  const v2 = isV2Url(base);
  if (!v2 && !new URL(base).pathname.endsWith("/subscribe")) return NOT_MEASURED;
  let oldest: HistoryStart | null;
  const askedUs = Date.now() * 1000;
  // A healthy server sends its oldest event at once; the idle timeout, when shorter, is what the
  // user takes for a server that has stalled.
  const timeoutMs = Math.min(PROBE_TIMEOUT_MS, ctx.o.idleTimeoutMs);
  try {
    const signal = ctx.internal.signal;
    const onOpen = () => ctx.probeAnswered = true;
    oldest = await probeHistoryStart(base, { signal, onOpen, timeoutMs });
  } catch (err) {
    if (ctx.stop) return NOT_MEASURED;
    ctx.probeAnswered = false;
    const status = err instanceof ConnectError ? err.status : undefined;
    // Denied by Deno's permissions: the stream's own connection would be too, and no retry helps.
    if (err instanceof ConnectError && err.denied) return { refused: err.message };
    const message = `could not find where ${new URL(base).host}'s history begins: ${(err as Error).message}`;
    if (status === undefined || status >= 500 || status === 429) {
      return { retry: message, retryAfterMs: (err as ConnectError).retryAfterMs };
    }
    if (v2) {
      ctx.report({ reason: "info", message: `${message}; OutdatedCursor will tell`, instance: base });
    } else coverageUnknown(ctx, base, message);
    return NOT_MEASURED;
  }
  if (ctx.stop) return NOT_MEASURED;
  // Over, and not stopped by the run's end: what it answered says nothing of the sync's connections.
  ctx.probeAnswered = false;
  if (oldest === null) {
    if (fromUs < askedUs - timeoutMs * 1000) {
      const message = `could not find where ${
        new URL(base).host
      }'s history begins: it sent no event when asked for all it holds`;
      // Another instance may hold it: tried first, as for a history that begins after the point (a
      // host that accepts and never sends would otherwise keep the run until its end, and a strict
      // run would refuse it while another instance holds the start).
      if (tryOthers(base, Infinity)) return { lacks: Infinity };
      coverageUnknown(ctx, base, message);
    }
    return NOT_MEASURED;
  }
  if (seqFrom !== undefined && oldest.seq !== undefined) {
    if (oldest.seq <= seqFrom) {
      // Nothing is missing: only where the history begins is recorded.
      coverageGap(ctx, base, oldest.us, oldest.us, atStart);
    } else {
      // Events are missing, and display times do not say how long a span they cover.
      coverageSeqGap(ctx, base, seqFrom, oldest.seq, oldest.us);
      return { measured: true, seqsLost: true };
    }
    return { measured: true, seqsLost: false };
  }
  if (oldest.us > fromUs && tryOthers(base, oldest.us)) return { lacks: oldest.us };
  coverageGap(ctx, base, fromUs, oldest.us, atStart);
  // A v2 host whose oldest event is not after the point asked for may still lack events after it: the
  // display time of an operator's import says nothing of where its history begins. Its connection's
  // own OutdatedCursor, if any, says so.
  return { measured: !(v2 && oldest.us <= fromUs), seqsLost: false };
}
