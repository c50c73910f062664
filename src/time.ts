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
// The original's "%Y-%m-%d-%H:%M:%S", which strptime also reads without leading zeros (2024-1-5-9:5:0).
const LEGACY = /^(\d{4})-(\d{1,2})-(\d{1,2})-(\d{1,2}):(\d{1,2}):(\d{1,2})$/;
// ISO-8601's extended form (and RFC 3339's) and its basic form (20240101T123000Z); a decimal comma or
// point; an offset of hours alone or hours and minutes.
const ISO =
  /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)$/;
const ISO_BASIC =
  /^(\d{4})(\d{2})(\d{2})[Tt](\d{2})(\d{2})(?:(\d{2})(?:[.,](\d{1,9}))?)?(?:([Zz])|([+-])(\d{2})(\d{2})?)$/;
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
  // Not Date.UTC(y, …): it takes years 0 to 99 for 1900 to 1999.
  const back = new Date(0);
  back.setUTCFullYear(y, mo - 1, d);
  back.setUTCHours(h, mi, s, 0);
  const ms = back.getTime();
  // Date.UTC rolls 2024-02-30 over to March; a round trip catches impossible days.
  if (back.getUTCFullYear() !== y || back.getUTCMonth() !== mo - 1 || back.getUTCDate() !== d) {
    return undefined;
  }
  return ms * 1000 + fracUs;
}

/**
 * Parses a timestamp into unix microseconds, always as UTC. Returns `undefined` for text that is not
 * one of {@link TIMESTAMP_FORMATS}, and for a number that is not an integer from 10^15 on (unix
 * microseconds since 2001-09-09: a time in seconds or milliseconds is refused, not misread).
 *
 * @example
 * ```ts
 * import { parseTimestamp } from "@jetfill/jetfill";
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
  m = ISO.exec(text) ?? ISO_BASIC.exec(text);
  if (m) {
    // Past six digits a time falls between two microseconds: the later one, so that a start keeps
    // and an end (exclusive) leaves out exactly the events at or after the time given.
    const digits = m[7] ?? "";
    const frac = Number((digits + "000000").slice(0, 6)) + (/[1-9]/.test(digits.slice(6)) ? 1 : 0);
    const local = utcUs(+m[1], +m[2], +m[3], +m[4], +m[5], m[6] ? +m[6] : 0, frac);
    if (local === undefined) return undefined;
    if (m[8]) return local;
    const oh = +m[10], om = m[11] ? +m[11] : 0;
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
 * import { utcDate } from "@jetfill/jetfill";
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
 * import { isoFromUs } from "@jetfill/jetfill";
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
  return v2TimeUs(text) ?? (ISO.test(text) ? parseTimestamp(text) : undefined);
}

/** The value of the ASCII digits of `text` from `from` to `to` (exclusive), or -1 if one is not a digit. */
function digitsAt(text: string, from: number, to: number): number {
  let n = 0;
  for (let i = from; i < to; i++) {
    const d = text.charCodeAt(i) - 48;
    if (d < 0 || d > 9) return -1;
    n = n * 10 + d;
  }
  return n;
}

/** Days from 1970-01-01 to a proleptic Gregorian date (month 1–12), by whole-number arithmetic. */
function daysFromCivil(y: number, m: number, d: number): number {
  const yy = m <= 2 ? y - 1 : y;
  const era = Math.floor(yy / 400);
  const yoe = yy - era * 400;
  const doy = Math.floor((153 * (m > 2 ? m - 3 : m + 9) + 2) / 5) + d - 1;
  return era * 146_097 + yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy - 719_468;
}

const MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/**
 * The v2 wire's own spelling, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (protocol doc §3.3), read without a
 * regular expression or a `Date`: it comes with every v2 event. Undefined for any other text.
 */
function v2TimeUs(t: string): number | undefined {
  if (
    t.length !== 27 || t.charCodeAt(4) !== 45 || t.charCodeAt(7) !== 45 || t.charCodeAt(10) !== 84 ||
    t.charCodeAt(13) !== 58 || t.charCodeAt(16) !== 58 || t.charCodeAt(19) !== 46 || t.charCodeAt(26) !== 90
  ) return undefined;
  const y = digitsAt(t, 0, 4), mo = digitsAt(t, 5, 7), d = digitsAt(t, 8, 10);
  const h = digitsAt(t, 11, 13), mi = digitsAt(t, 14, 16), s = digitsAt(t, 17, 19);
  const frac = digitsAt(t, 20, 26);
  if (y < 0 || mo < 1 || mo > 12 || d < 1 || h < 0 || h > 23 || mi < 0 || mi > 59 || s < 0 || s > 59) {
    return undefined;
  }
  if (frac < 0) return undefined;
  const leap = mo === 2 && y % 4 === 0 && (y % 100 !== 0 || y % 400 === 0);
  if (d > MONTH_DAYS[mo - 1] + (leap ? 1 : 0)) return undefined;
  return ((daysFromCivil(y, mo, d) * 24 + h) * 60 + mi) * 60_000_000 + s * 1_000_000 + frac;
}

/**
 * A span of microseconds for people: µs or ms under a tenth of a second, then seconds, minutes,
 * hours or days, one decimal.
 *
 * @example
 * ```ts
 * import { describeDuration } from "./time.ts";
 * describeDuration(17_249); // "17 ms"
 * describeDuration(259_200_000_000); // "3.0 days"
 * ```
 */
export function describeDuration(us: number): string {
  const s = us / 1e6;
  // (Under a tenth of a second, "0.0 s" would read as no gap at all.)
  if (s < 0.001) return `${us} µs`;
  if (s < 0.1) return `${Math.round(us / 1000)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} days`;
}
