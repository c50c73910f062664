/**
 * Where a Jetstream server's history begins. A `/subscribe` cursor older than the retained history
 * is silently moved forward (protocol doc §1.1, §1.2), so a sync asked for last week would get
 * today's data and not know it. A short probe finds out first: `cursor=0` replays from the oldest
 * event the server holds (legacy: every key sorts after "0"; v2: seq 0 is floored to the oldest
 * available), and the first event's `time_us` is where coverage starts (on a v2 host, the first one
 * that is no operator's import: see oldestOf). On the v2 wire (`subscribeEvents`), a time cursor
 * older than the history does the same. On a v2 host the first event's sequence `cursor` is where
 * its history begins too, which is what counts for a resume by seq: there `time_us` is a display
 * time, years old after an operator's import (protocol doc §3.2).
 *
 * @module
 */
import { type CloseCause, ConnectError, type Connection, type Frame, openConnection } from "./socket.ts";
import { buildSubscribeRequest } from "./url.ts";
import { buildV2Url, isV2Url, mapV2Frame, V2_PAYLOAD_TYPE, V2_SUBPROTOCOL } from "./v2.ts";
import { MIN_TIMESTAMP_US, usFromIso } from "../time.ts";
import { shapeProblem } from "./events.ts";

/** How long a probe waits for its first event, ms. */
export const PROBE_TIMEOUT_MS = 10_000;

/** Where a server's history begins: its oldest event's `time_us`, and on a v2 host its seq. */
export interface HistoryStart {
  /** The oldest event's `time_us`. */
  us: number;
  /** The oldest event's sequence `cursor` (v2 hosts, on either wire), else undefined. */
  seq: number | undefined;
}

/** The seq of an event that carries one (a v2 host's `cursor`), else undefined. */
function seqOf(v: unknown): number | undefined {
  return typeof v === "number" && Number.isSafeInteger(v) && v > 0 ? v : undefined;
}

/**
 * The oldest event `base` (a `/subscribe` URL) still serves, or `null` when no event came within
 * the timeout (or the server closed the connection normally first). A refused or failed connection
 * rejects with its error (a `ConnectError` carries the HTTP status of a refusal), so that the caller
 * can retry it, as does one dropped, shut down or failing to replay before any event came.
 *
 * @example
 * ```ts
 * import { probeCoverageStart } from "./coverage.ts";
 * const oldest = await probeCoverageStart("wss://jetstream1.us-east.bsky.network/subscribe");
 * ```
 */
export async function probeCoverageStart(
  base: string,
  options: ProbeOptions = {},
): Promise<HistoryStart | null> {
  const { url } = buildSubscribeRequest(base, { wantedDids: [], wantedCollections: [], cursor: 0 });
  return await oldestOf(await probe(url, options), legacyEvent);
}

/** A legacy frame's time and seq, when it is an event a sync would take too (else undefined). */
function legacyEvent(frame: unknown): HistoryStart | undefined {
  // A frame a sync skips says nothing of the history.
  if (shapeProblem(frame) !== undefined) return undefined;
  const { time_us: t, cursor } = frame as { time_us: number; cursor?: unknown };
  return { us: t, seq: seqOf(cursor) };
}

/**
 * The oldest event `base` (a v2 `subscribeEvents` URL) still serves, or `null` when no event came
 * within the timeout: {@link probeCoverageStart} for the v2 wire. A time cursor older than the
 * history is moved forward to its oldest event (protocol doc §1.3), so the probe asks for
 * every event from 10^15 µs (2001, the oldest a time cursor can be); it asks for every kind, DID and
 * collection, since on a filtered connection the first event can come hours after the history's
 * start. A refused or failed connection rejects with its error, as does an error frame before any
 * event.
 *
 * @example
 * ```ts
 * import { probeV2HistoryStart } from "./coverage.ts";
 * const oldest = await probeV2HistoryStart(
 *   "wss://jetstream.us-east.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents",
 * );
 * ```
 */
export async function probeV2HistoryStart(
  base: string,
  options: ProbeOptions = {},
): Promise<HistoryStart | null> {
  const url = buildV2Url(base, {
    kinds: [],
    wantedDids: [],
    wantedCollections: [],
    cursor: MIN_TIMESTAMP_US,
  });
  return await oldestOf(await probe(url, options, [V2_SUBPROTOCOL]), v2Event);
}

/**
 * A v2 frame's time and seq, when it is an event of the stream, one a sync takes or passes over (else
 * undefined); an error frame throws.
 */
function v2Event(frame: unknown): HistoryStart | undefined {
  const m = mapV2Frame(frame);
  if (m.type === "skip") {
    // A #sync event (or a kind to come) that a sync passes over is in the history all the same: where
    // it begins, when it comes first. (Not a frame of another type, or another namespace's.)
    const f = frame as { $type?: unknown; payload?: { $type?: unknown; seq?: unknown; time?: unknown } };
    const p = f.payload;
    if (f.$type !== "message" || typeof p?.$type !== "string" || !p.$type.startsWith(V2_PAYLOAD_TYPE)) {
      return undefined;
    }
    const us = typeof p.time === "string" ? usFromIso(p.time) : undefined;
    const seq = seqOf(p.seq);
    return us === undefined || seq === undefined ? undefined : { us, seq };
  }
  // Terminal for the connection (protocol doc §3.3): the server's trouble, retried as a drop is.
  if (m.type === "error") {
    throw new Error(
      `it sent an error frame before any event: ${m.error}${m.message ? `: ${m.message}` : ""}`,
    );
  }
  if (m.type !== "event" || shapeProblem(m.event) !== undefined) return undefined;
  return { us: m.event.time_us, seq: seqOf(m.event.cursor) };
}

/**
 * Whether the live stream of `base` (either wire) sends an event: a connection without a cursor, for
 * every event, gets what comes from then on, which on a healthy instance is the whole network's, many
 * events a second. False when none came within the timeout (or the server closed the connection
 * normally first): an instance whose own source stopped, which replays what it holds and has nothing
 * new. A refused or failed connection rejects with its error, as for {@link probeCoverageStart}.
 *
 * @example
 * ```ts
 * import { probeLiveEvent } from "./coverage.ts";
 * const live = await probeLiveEvent("wss://jetstream2.us-east.bsky.network/subscribe", { timeoutMs: 5000 });
 * ```
 */
export async function probeLiveEvent(base: string, options: ProbeOptions = {}): Promise<boolean> {
  if (isV2Url(base)) {
    const url = buildV2Url(base, { kinds: [], wantedDids: [], wantedCollections: [] });
    return await oldestOf(await probe(url, options, [V2_SUBPROTOCOL]), v2Event) !== null;
  }
  const { url } = buildSubscribeRequest(base, { wantedDids: [], wantedCollections: [] });
  return await oldestOf(await probe(url, options), legacyEvent) !== null;
}

/**
 * The oldest event the instance `base` still serves, by the probe of its wire: {@link probeV2HistoryStart}
 * for a v2 `subscribeEvents` URL, {@link probeCoverageStart} for a `/subscribe` one.
 *
 * @example
 * ```ts ignore
 * import { probeHistoryStart } from "./coverage.ts";
 * const oldest = await probeHistoryStart("wss://jetstream.us-east.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents");
 * ```
 */
export async function probeHistoryStart(
  base: string,
  options: ProbeOptions = {},
): Promise<HistoryStart | null> {
  return isV2Url(base) ? await probeV2HistoryStart(base, options) : await probeCoverageStart(base, options);
}

/** How a probe runs. */
export interface ProbeOptions {
  /** How long it waits, ms: {@link PROBE_TIMEOUT_MS} by default. */
  timeoutMs?: number;
  /** Stops it. */
  signal?: AbortSignal;
  /** Called once the server has accepted the probe's connection. */
  onOpen?: () => void;
}

/** Opens a probe's connection, which gives up after the timeout ({@link PROBE_TIMEOUT_MS} by default). */
async function probe(url: string, options: ProbeOptions, protocols?: string[]): Promise<Connection> {
  // A moment after the connection's own limit: that one says what it waited for (a TLS handshake
  // a plain server never answers, with its hint), this one only that time ran out.
  const timeout = AbortSignal.timeout((options.timeoutMs ?? PROBE_TIMEOUT_MS) + 100);
  const signal = options.signal ? AbortSignal.any([options.signal, timeout]) : timeout;
  let conn: Connection;
  try {
    conn = await openConnection(url, {
      idleTimeoutMs: options.timeoutMs ?? PROBE_TIMEOUT_MS,
      maxBufferedBytes: 1 << 20,
      signal,
      protocols,
      // The probe asks for the whole history and reads one event of it, or a few: reading on until
      // the server saw the close would take the replay in flight (MBs, on a fast link), and that
      // competes with the sync beside it (`deno task bench --quick`: end to end from about 50 % of the
      // ceiling to 43 %). The server sees the connection reset instead.
      linger: false,
    });
  } catch (err) {
    // Its own time ran out, not the caller's: said as a stream connection's would be, not "aborted".
    if (
      timeout.aborted && !options.signal?.aborted && err instanceof ConnectError &&
      err.message.endsWith(": aborted")
    ) {
      throw new ConnectError(
        err.message.replace(
          /: aborted$/,
          `: no answer within ${(options.timeoutMs ?? PROBE_TIMEOUT_MS) / 1000} s`,
        ),
        err.status,
        err.body,
        err.denied,
        err.retryAfterMs,
      );
    }
    throw err;
  }
  options.onOpen?.();
  return conn;
}

/** How many events, among those read with the oldest, a v2 host's history start is judged by. */
const DISPLAY_TIME_SAMPLE = 64;

/**
 * A display time this far before the latest of the events read with it is an operator's import
 * (those shown years back, as the records' own times): a v2 host keeps a few days of history at most
 * (a lookback of 36 h by default, protocol doc §1.2), so that many events of its oldest are never
 * this far apart, however quiet it is.
 */
const IMPORT_GAP_US = 7 * 86_400_000_000;

/**
 * Reads `conn` until `pick` returns a history start for a parsed text frame, closes it, and returns
 * that (null when the connection ended normally first; it throws when it ended otherwise).
 *
 * On a v2 host (events that carry a seq), `time_us` is a display time, which an operator's import
 * sets years back (protocol doc §3.2): an oldest event that is an import would make the history
 * seem to reach back years. So the events read together with it are looked at too (up to
 * {@link DISPLAY_TIME_SAMPLE}): an oldest event shown more than a week ({@link IMPORT_GAP_US}) before
 * the latest of them is an import, and the history start is the time of the first of them that is
 * not (within that week of the latest), which was witnessed right after it. Its seq stays the oldest
 * event's. (An import of records only days old goes unseen: its display time is taken as the start.)
 */
async function oldestOf(
  conn: Connection,
  pick: (frame: unknown) => HistoryStart | undefined,
): Promise<HistoryStart | null> {
  const sample: HistoryStart[] = [];
  // Once the oldest event has come: until when more are waited for.
  let deadline = Number.POSITIVE_INFINITY;
  try {
    for (;;) {
      const frames = await nextBefore(conn, deadline);
      if (!frames) break;
      for (const frame of frames) {
        if (typeof frame !== "string") continue;
        let parsed: unknown;
        try {
          parsed = JSON.parse(frame);
        } catch {
          continue; // not JSON; keep looking
        }
        if (typeof parsed !== "object" || parsed === null) continue;
        const picked = pick(parsed);
        if (picked === undefined) continue;
        // A legacy host's time_us is its own clock: the first event says it all.
        if (picked.seq === undefined && sample.length === 0) return picked;
        if (sample.length === 0) deadline = performance.now() + SAMPLE_WAIT_MS;
        sample.push(picked);
        if (sample.length >= DISPLAY_TIME_SAMPLE) break;
      }
      if (sample.length >= DISPLAY_TIME_SAMPLE) break;
    }
    if (sample.length === 0) {
      const cause = conn.cause;
      // Dropped (1006), shut down (1001), or a legacy server's failure to replay: the server's
      // trouble, worth retrying, not a history with nothing in it (protocol doc §5.3, §10.13).
      if (
        cause?.kind === "closed" && ((cause.code !== 1000 && cause.code !== 1005) || replayFailure(cause))
      ) {
        throw new Error(
          `its connection closed before any event came (code ${cause.code}${
            cause.reason ? `: ${cause.reason}` : ""
          })`,
        );
      }
      return null;
    }
    const latest = Math.max(...sample.map((e) => e.us));
    const witnessed = sample.find((e) => e.us >= latest - IMPORT_GAP_US)!;
    return { us: witnessed.us, seq: sample[0].seq };
  } finally {
    conn.close();
    await conn.closed();
  }
}

/**
 * How long a probe on a v2 host waits for the rest of its sample once the oldest event has come, ms:
 * a host replaying from its oldest event sends them at once, unless it holds fewer.
 */
const SAMPLE_WAIT_MS = 250;

/** The next frames of `conn`, or null when it ended or `deadline` (`performance.now()`) passed first. */
async function nextBefore(conn: Connection, deadline: number): Promise<Frame[] | null> {
  const next = conn.next();
  if (deadline === Number.POSITIVE_INFINITY) return await next;
  next.catch(() => {});
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<null>((resolve) =>
    timer = setTimeout(() => resolve(null), Math.max(0, deadline - performance.now()))
  );
  try {
    return await Promise.race([next, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A legacy server's failure to read its own history, which it reports as a normal close (1000
 * `failed to replay events`, protocol doc §5.3): the server's trouble, not the end of the stream, so
 * the connection is retried like a dropped one.
 */
export function replayFailure(cause: CloseCause): boolean {
  return cause.kind === "closed" && cause.code === 1000 && /^failed to replay/.test(cause.reason ?? "");
}
