/**
 * The two async helpers jetfill needs (`@std/async` is not reachable here): an abortable delay and
 * an exponential backoff with full jitter.
 *
 * @module
 */

/**
 * Resolves after `ms` milliseconds, or early (without error) when `signal` aborts.
 *
 * @example
 * ```ts
 * import { delay } from "./async.ts";
 * await delay(10);
 * ```
 */
export function delay(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** Options of {@link backoffDelay}. */
export interface BackoffOptions {
  /** First ceiling, ms. @default {250} */
  baseMs?: number;
  /** Largest ceiling, ms. @default {30000} */
  maxMs?: number;
  /** Source of randomness in [0, 1). @default {Math.random} */
  random?: () => number;
}

/**
 * The wait before retry number `attempt` (1 for the first retry): a random time between half the
 * ceiling and the ceiling, where the ceiling doubles each attempt from `baseMs` up to `maxMs`.
 * The jitter keeps many clients from reconnecting in step (the legacy servers rate-limit storms).
 *
 * @example
 * ```ts
 * import { backoffDelay } from "./async.ts";
 * backoffDelay(1, { random: () => 0 }); // 125
 * backoffDelay(10, { random: () => 0.999 }); // just under 30000
 * ```
 */
export function backoffDelay(attempt: number, options: BackoffOptions = {}): number {
  const base = options.baseMs ?? 250;
  const max = options.maxMs ?? 30_000;
  const random = options.random ?? Math.random;
  const ceiling = Math.min(max, base * 2 ** Math.max(0, attempt - 1));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
