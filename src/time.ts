/**
 * Timestamp parsing and formatting. Everything is UTC and in unix microseconds, the unit of
 * Jetstream's `time_us` and of its `cursor` parameter.
 *
 * @module
 */

/** Microseconds in one day. */
export const DAY_US = 86_400_000_000;

/**
 * Integers below this are refused as timestamps: they are seconds, milliseconds or v2 sequence
 * numbers, never microseconds of the Bluesky era (the v2 server splits cursors at the same value).
 */
export const MIN_TIMESTAMP_US = 1_000_000_000_000_000;

const DATE = /^(\d{4})-(\d{2})-(\d{2})$/;
const LEGACY = /^(\d{4})-(\d{2})-(\d{2})-(\d{2}):(\d{2}):(\d{2})$/;
const ISO =
  /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(?:([Zz])|([+-])(\d{2}):?(\d{2}))$/;
const INTEGER = /^\d+$/;

/** The accepted timestamp formats, as the error messages and `--help` describe them. */
export const TIMESTAMP_FORMATS =
  "YYYY-MM-DD, YYYY-MM-DD-HH:MM:SS, ISO-8601 with Z or an offset (2024-01-01T12:30:00Z), or integer unix microseconds";

function utcUs(
  y: number,
  mo: number,
  d: number,
  h: number,
  mi: number,
  s: number,
  fracUs: number,
): number | undefined {
  if (mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || s > 59) return undefined;
  const ms = Date.UTC(y, mo - 1, d, h, mi, s);
  const back = new Date(ms);
  // Date.UTC rolls 2024-02-30 over to March; a round trip catches impossible days.
  if (back.getUTCFullYear() !== y || back.getUTCMonth() !== mo - 1 || back.getUTCDate() !== d) {
    return undefined;
  }
  return ms * 1000 + fracUs;
}

/**
 * Parses a timestamp into unix microseconds, always as UTC. Returns `undefined` for text that is not
 * one of {@link TIMESTAMP_FORMATS}; numbers are taken as microseconds.
 *
 * @example
 * ```ts
 * import { parseTimestamp } from "./time.ts";
 * parseTimestamp("2024-01-01"); // 1704067200000000
 * parseTimestamp("2024-01-01-12:30:00"); // 1704112200000000
 * parseTimestamp("2024-01-01T14:30:00+02:00"); // 1704112200000000
 * ```
 */
export function parseTimestamp(input: string | number | Date): number | undefined {
  if (input instanceof Date) {
    const ms = input.getTime();
    return Number.isFinite(ms) ? ms * 1000 : undefined;
  }
  if (typeof input === "number") {
    return Number.isSafeInteger(input) && input >= MIN_TIMESTAMP_US ? input : undefined;
  }
  const text = input.trim();
  let m = DATE.exec(text);
  if (m) return utcUs(+m[1], +m[2], +m[3], 0, 0, 0, 0);
  m = LEGACY.exec(text);
  if (m) return utcUs(+m[1], +m[2], +m[3], +m[4], +m[5], +m[6], 0);
  m = ISO.exec(text);
  if (m) {
    // Past six digits a time falls between two microseconds: the later one, so that a start keeps
    // and an end (exclusive) leaves out exactly the events at or after the time given.
    const digits = m[7] ?? "";
    const frac = Number((digits + "000000").slice(0, 6)) + (/[1-9]/.test(digits.slice(6)) ? 1 : 0);
    const local = utcUs(+m[1], +m[2], +m[3], +m[4], +m[5], m[6] ? +m[6] : 0, frac);
    if (local === undefined) return undefined;
    if (m[8]) return local;
    const oh = +m[10], om = +m[11];
    if (oh > 23 || om > 59) return undefined;
    const offsetUs = (oh * 60 + om) * 60_000_000;
    return m[9] === "+" ? local - offsetUs : local + offsetUs;
  }
  if (INTEGER.test(text)) {
    const n = Number(text);
    return Number.isSafeInteger(n) && n >= MIN_TIMESTAMP_US ? n : undefined;
  }
  return undefined;
}

/**
 * The UTC calendar date (`YYYY-MM-DD`) of a unix-microsecond time.
 *
 * @example
 * ```ts
 * import { utcDate } from "./time.ts";
 * utcDate(1725911162329308); // "2024-09-09"
 * ```
 */
export function utcDate(us: number): string {
  return new Date(Math.floor(us / 1000)).toISOString().slice(0, 10);
}

/**
 * ISO-8601 UTC text of a unix-microsecond time, with all six fractional digits.
 *
 * @example
 * ```ts
 * import { isoFromUs } from "./time.ts";
 * isoFromUs(1725911162329308); // "2024-09-09T19:46:02.329308Z"
 * ```
 */
export function isoFromUs(us: number): string {
  const base = new Date(Math.floor(us / 1000)).toISOString().slice(0, 19);
  const frac = String(((us % 1_000_000) + 1_000_000) % 1_000_000).padStart(6, "0");
  return `${base}.${frac}Z`;
}

/**
 * Parses the RFC 3339 time of a v2 event (six fractional digits) back to microseconds.
 *
 * @example
 * ```ts
 * import { usFromIso } from "./time.ts";
 * usFromIso("2024-09-09T19:46:02.329308Z"); // 1725911162329308
 * ```
 */
export function usFromIso(text: string): number | undefined {
  const m = ISO.exec(text);
  return m ? parseTimestamp(text) : undefined;
}
