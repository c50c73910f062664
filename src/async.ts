/**
 * The async helpers jetfill needs (`@std/async` is not reachable here): an abortable delay, an
 * exponential backoff with full jitter, and a timeout longer than `setTimeout` allows.
 *
 * @module
 */

/** The longest delay `setTimeout` takes (2^31 − 1 ms, about 24.8 days); a longer one fires at once. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Calls `fn` after `ms` milliseconds, however long: a delay over `step` (by default
 * {@link MAX_TIMER_MS}) is waited in steps. Returns a function that cancels it.
 *
 * @example
 * ```ts
 * import { longTimeout } from "./async.ts";
 * const cancel = longTimeout(() => console.log("thirty days later"), 30 * 86_400_000);
 * cancel();
 * ```
 */
export function longTimeout(fn: () => void, ms: number, step: number = MAX_TIMER_MS): () => void {
  const due = performance.now() + ms;
  let timer: ReturnType<typeof setTimeout>;
  const arm = () => {
    const left = due - performance.now();
    timer = left > step ? setTimeout(arm, step) : setTimeout(fn, Math.max(0, left));
  };
  arm();
  return () => clearTimeout(timer);
}

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
