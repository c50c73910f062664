/**
 * Where a Jetstream server's history begins. A `/subscribe` cursor older than the retained history
 * is silently moved forward (protocol doc §1.1, §1.2), so a sync asked for last week would get
 * today's data and not know it. A short probe finds out first: `cursor=0` replays from the oldest
 * event the server holds (legacy: every key sorts after "0"; v2: seq 0 is floored to the oldest
 * available), and the first event's `time_us` is where coverage starts.
 *
 * @module
 */
import { openConnection } from "./socket.ts";
import { buildSubscribeRequest } from "./url.ts";

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
  const timeout = AbortSignal.timeout(options.timeoutMs ?? 10_000);
  const signal = options.signal ? AbortSignal.any([options.signal, timeout]) : timeout;
  const conn = await openConnection(url, {
    idleTimeoutMs: options.timeoutMs ?? 10_000,
    maxBufferedBytes: 1 << 20,
    signal,
  });
  try {
    for (let frames = await conn.next(); frames; frames = await conn.next()) {
      for (const frame of frames) {
        if (typeof frame !== "string") continue;
        try {
          const t = JSON.parse(frame).time_us;
          if (typeof t === "number" && Number.isSafeInteger(t)) return t;
        } catch { /* not an event; keep looking */ }
      }
    }
    return null;
  } finally {
    conn.close();
    await conn.closed();
  }
}
