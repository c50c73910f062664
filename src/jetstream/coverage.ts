/**
 * Where a Jetstream server's history begins. A `/subscribe` cursor older than the retained history
 * is silently moved forward (protocol doc §1.1, §1.2), so a sync asked for last week would get
 * today's data and not know it. A short probe finds out first: `cursor=0` replays from the oldest
 * event the server holds (legacy: every key sorts after "0"; v2: seq 0 is floored to the oldest
 * available), and the first event's `time_us` is where coverage starts. On the v2 wire
 * (`subscribeEvents`), a probe from the requested time without filters shows it: the server says
 * when it moved the cursor forward, and its first event is the oldest it holds.
 *
 * @module
 */
import { type Connection, openConnection } from "./socket.ts";
import { buildSubscribeRequest } from "./url.ts";
import { buildV2Url, mapV2Frame } from "./v2.ts";
import { MIN_TIMESTAMP_US } from "../time.ts";

/**
 * The `time_us` of the oldest event `base` (a `/subscribe` URL) still serves, or `null` when no
 * event came within the timeout. A refused or failed connection rejects with its error (a
 * `ConnectError` carries the HTTP status of a refusal), so that the caller can retry it.
 *
 * @example
 * ```ts
 * import { probeCoverageStart } from "./coverage.ts";
 * const oldest = await probeCoverageStart("wss://jetstream1.us-east.bsky.network/subscribe");
 * ```
 */
export async function probeCoverageStart(
  base: string,
  options: { timeoutMs?: number; signal?: AbortSignal } = {},
): Promise<number | null> {
  const { url } = buildSubscribeRequest(base, { wantedDids: [], wantedCollections: [], cursor: 0 });
  return await firstOf(await probe(url, options), (frame) => {
    const t = (frame as { time_us?: unknown }).time_us;
    return typeof t === "number" && Number.isSafeInteger(t) ? t : undefined;
  });
}

/**
 * Where the history of `base` (a v2 `subscribeEvents` URL) begins when it does not reach back to
 * `fromUs`, or `null` when it does. A v2 host moves a time cursor older than its history forward to
 * the oldest event it holds, and says so at once with an `#info` `OutdatedCursor` as the first frame
 * (protocol doc §1.3). On a connection filtered by DIDs or collections, the first event after it can
 * come much later than that: the probe asks for every event, so that the first one shows where
 * history begins. No frame at all within {@link V2_PROBE_QUIET_MS} means no `OutdatedCursor`: the
 * history reaches back (the cursor is at the live tip). Rejects when the server refuses, or when the
 * connection ends before it tells.
 *
 * @example
 * ```ts
 * import { probeV2HistoryStart } from "./coverage.ts";
 * const start = await probeV2HistoryStart(
 *   "wss://jetstream.us-east.bsky.network/xrpc/network.bsky.jetstream.subscribeEvents",
 *   Date.UTC(2026, 0, 1) * 1000,
 * );
 * ```
 */
export async function probeV2HistoryStart(
  base: string,
  fromUs: number,
  options: { timeoutMs?: number; signal?: AbortSignal } = {},
): Promise<number | null> {
  // Every kind, DID and collection; a time before 10^15 µs would be read as a seq.
  const url = buildV2Url(base, {
    kinds: [],
    wantedDids: [],
    wantedCollections: [],
    cursor: Math.max(fromUs, MIN_TIMESTAMP_US),
  });
  let outdated = false;
  let frames = 0;
  const conn = await probe(url, { ...options, idleTimeoutMs: V2_PROBE_QUIET_MS });
  const found = await firstOf(conn, (frame) => {
    frames++;
    const m = mapV2Frame(frame);
    if (m.type === "info" && m.name === "OutdatedCursor") outdated = true;
    if (m.type !== "event") return undefined;
    // The first event settles it: without OutdatedCursor before it, history reaches back far enough.
    return outdated ? m.event.time_us : null;
  });
  if (found !== null || (frames > 0 && !outdated)) return found;
  if (frames === 0 && conn.cause?.kind === "idle") return null;
  throw new Error(
    outdated
      ? "the connection ended after OutdatedCursor, before any event"
      : `the connection ended before any frame (${JSON.stringify(conn.cause)})`,
  );
}

/**
 * How long a v2 probe waits for its first frame: a clamped cursor's `OutdatedCursor` comes at once,
 * so silence means the cursor is at the live tip of a quiet stream (ms).
 */
export const V2_PROBE_QUIET_MS = 3000;

/**
 * Opens a probe's connection, which gives up after the timeout (10 s by default) or after
 * `idleTimeoutMs` without a message (the timeout by default).
 */
async function probe(
  url: string,
  options: { timeoutMs?: number; idleTimeoutMs?: number; signal?: AbortSignal },
): Promise<Connection> {
  const timeout = AbortSignal.timeout(options.timeoutMs ?? 10_000);
  const signal = options.signal ? AbortSignal.any([options.signal, timeout]) : timeout;
  return await openConnection(url, {
    idleTimeoutMs: options.idleTimeoutMs ?? options.timeoutMs ?? 10_000,
    maxBufferedBytes: 1 << 20,
    signal,
  });
}

/**
 * Reads `conn` until `pick` returns something other than undefined for a parsed text frame, closes
 * it, and returns that (null when the connection ended first).
 */
async function firstOf<T>(conn: Connection, pick: (frame: unknown) => T | undefined): Promise<T | null> {
  try {
    for (let frames = await conn.next(); frames; frames = await conn.next()) {
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
        if (picked !== undefined) return picked;
      }
    }
    return null;
  } finally {
    conn.close();
    await conn.closed();
  }
}
