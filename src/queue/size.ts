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
const WIDE = /[^\x00-\xff]|\\u(?!00[0-9a-fA-F]{2})/;

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
 * of many small arrays (`[[],[],…]`) serializes to far more than its text. Two-byte text is bounded
 * by twice its length. Non-integer numbers (9 bytes as doubles) are not counted: the atproto data
 * model has none, and the writer measures exactly if KV ever refuses a message.
 *
 * `utf8Bytes`, the text's UTF-8 length when the caller knows it, saves the search for wide
 * characters in an all-ASCII text (as many bytes as characters): only escapes are looked for.
 *
 * @example
 * ```ts
 * import { serializedSizeBound } from "./size.ts";
 * serializedSizeBound('{"did":"did:plc:x","time_us":1}'); // a little over 31
 * ```
 */
export function serializedSizeBound(text: string, utf8Bytes?: number): number {
  const n = text.length;
  const wide = utf8Bytes === n ? hasWideEscape(text) : WIDE.test(text);
  const base = wide ? 2 * n + 32 : n + (n >> 5) + 32;
  return base + 4 * occurrences(text, "[") + occurrences(text, "{");
}
