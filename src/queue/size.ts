/**
 * Upper bounds on the size Deno KV gives a value when it serializes it (V8's value serializer), so
 * that messages can be packed under KV's 64 KiB limit without serializing twice.
 *
 * @module
 */

/** Deno KV's limit on one enqueued message, serialized. */
export const KV_VALUE_LIMIT = 65_536;
/** Deno KV's limit on the total size of one atomic commit. */
export const KV_COMMIT_LIMIT = 819_200;
/** Deno KV's limit on mutations (enqueues included) in one atomic commit. */
export const KV_MUTATION_LIMIT = 1000;

// A string holding any character above U+00FF is stored as UTF-16 (two bytes a character). The
// JSON text may spell such characters as \uXXXX escapes, so those count too.
// deno-lint-ignore no-control-regex
const WIDE = /[^\x00-\xff]|\\u(?!00[0-9a-fA-F]{2})/g;

/** Whether the quote at `i` is escaped (preceded by an odd number of backslashes). */
function escapedQuote(text: string, i: number): boolean {
  let n = 0;
  while (i - n - 1 >= 0 && text.charCodeAt(i - n - 1) === 92) n++;
  return (n & 1) === 1;
}

/**
 * What the strings of a valid JSON text that hold a wide character (or a wide escape) add when V8
 * stores them as UTF-16: each such string costs at most twice its length plus 5 bytes of tag,
 * length and padding, of which the one-byte bound already counts its JSON length and quotes. The
 * JSON length is never below the string's own (escapes only lengthen it).
 */
function wideExtra(text: string): number {
  let extra = 0;
  WIDE.lastIndex = 0;
  // test() with the global flag moves lastIndex past each match without building a match array.
  while (WIDE.test(text)) {
    const after = WIDE.lastIndex;
    // The enclosing string: wide characters and escapes occur only inside strings.
    let open = text.lastIndexOf('"', after - 1);
    while (open > 0 && escapedQuote(text, open)) open = text.lastIndexOf('"', open - 1);
    let close = text.indexOf('"', after);
    while (close !== -1 && escapedQuote(text, close)) close = text.indexOf('"', close + 1);
    if (open < 0 || close < 0) return text.length + 32; // not inside a string: the old bound
    extra += close - open + 4;
    WIDE.lastIndex = close + 1;
  }
  return extra;
}

/**
 * The deepest nesting of objects and arrays that a stored record may have. Deno KV stores deeper
 * values but cannot read them back (V8's deserializer gives up at about 2,700 levels, fewer on a
 * deeper stack, and the serializer overflows the stack at a few thousand): such an event travels
 * gzipped, as its JSON text, like one too large for a message.
 */
export const MAX_RECORD_DEPTH = 256;

/**
 * Whether the JSON text nests objects and arrays deeper than {@link MAX_RECORD_DEPTH}. It follows
 * the text through its strings: on the hot path, only for a text that
 * {@link openingsOfLastBound} says has enough brackets.
 *
 * @example
 * ```ts
 * import { nestedTooDeep } from "./size.ts";
 * nestedTooDeep('{"a":[1,{"b":2}]}'); // false
 * ```
 */
export function nestedTooDeep(text: string): boolean {
  let depth = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 34) {
      // A string: brackets inside it do not nest.
      for (i++; i < text.length; i++) {
        const d = text.charCodeAt(i);
        if (d === 92) i++;
        else if (d === 34) break;
      }
    } else if (c === 123 || c === 91) {
      if (++depth > MAX_RECORD_DEPTH) return true;
    } else if (c === 125 || c === 93) depth--;
  }
  return false;
}

function occurrences(text: string, char: string): number {
  let n = 0;
  for (let i = text.indexOf(char); i !== -1; i = text.indexOf(char, i + 1)) n++;
  return n;
}

/** Whether an all-ASCII JSON text holds a `\uXXXX` escape of a character above U+00FF. */
function hasWideEscape(text: string): boolean {
  for (let i = text.indexOf("\\u"); i !== -1; i = text.indexOf("\\u", i + 2)) {
    // \u00XX stays one byte; anything else (or an escaped backslash before a "u") counts as wide.
    if (
      text.charCodeAt(i + 2) !== 48 || text.charCodeAt(i + 3) !== 48 || !HEX2.test(text.slice(i + 4, i + 6))
    ) {
      return true;
    }
  }
  return false;
}
const HEX2 = /^[0-9a-fA-F]{2}$/;

/**
 * An upper bound on the serialized size of the parsed form of one JSON event text.
 *
 * V8 writes one-byte strings at one byte a character plus a tag and a length, which the quotes,
 * colons and commas of the JSON text pay for. Arrays cost up to 4 bytes more than their brackets
 * and objects 1 more (tags, lengths and counts), hence the per-bracket terms: without them, a record
 * of many small arrays (`[[],[],…]`) serializes to far more than its text. A string holding a
 * character above U+00FF is stored as UTF-16: it adds at most its JSON length plus 5 bytes, found by
 * locating the strings around such characters (only those strings are two-byte, not the whole text;
 * counting the whole text twice overestimated non-Latin-1 events by 75 %). Non-integer numbers
 * (9 bytes as doubles) are not counted: the atproto data model has none, and the writer measures
 * exactly if KV ever refuses a message.
 *
 * `utf8Bytes`, the text's UTF-8 length when the caller knows it, saves the search for wide
 * characters in an all-ASCII text (as many bytes as characters): only escapes are looked for.
 *
 * With `shorterBy`, `text` stands for another JSON text, at least that many characters shorter, whose
 * wide strings, arrays and objects are all among this one's: the bound is then the other's (a v2
 * frame's text stands for the event mapped from it).
 *
 * @example
 * ```ts
 * import { serializedSizeBound } from "./size.ts";
 * serializedSizeBound('{"did":"did:plc:x","time_us":1}'); // a little over 31
 * ```
 */
export function serializedSizeBound(text: string, utf8Bytes?: number, shorterBy = 0): number {
  // One pass finds the wide strings; an all-ASCII text can only have wide escapes.
  const wide = utf8Bytes === text.length && !hasWideEscape(text) ? 0 : wideExtra(text);
  const n = text.length - shorterBy;
  const base = n + (n >> 5) + 32 + wide;
  const arrays = occurrences(text, "[");
  const objects = occurrences(text, "{");
  lastOpenings = arrays + objects;
  return base + 4 * arrays + objects;
}

// The brackets of the text last measured (module state: no allocation per event).
let lastOpenings = 0;

/**
 * How many `[` and `{` the text last given to {@link serializedSizeBound} holds, strings included:
 * a text can only nest deeper than {@link MAX_RECORD_DEPTH} with more than that many.
 *
 * @example
 * ```ts
 * import { openingsOfLastBound, serializedSizeBound } from "./size.ts";
 * serializedSizeBound('{"a":[1,{"b":2}]}');
 * openingsOfLastBound(); // 3
 * ```
 */
export function openingsOfLastBound(): number {
  return lastOpenings;
}
