/**
 * Finding the members of a JSON object in its text without parsing it into values, so the server
 * can rewrite captured events (insert a field, rewrap a record) and keep every other byte as
 * captured: numbers beyond 2^53, key order and escapes survive untouched.
 *
 * @module
 */

/**
 * Where one member of a JSON object sits in the text: `text.slice(keyStart, valueEnd)` is
 * `"key":value` (with any whitespace around the colon), `text.slice(valueStart, valueEnd)` the raw
 * value.
 *
 * @example
 * ```ts
 * import { objectMembers } from "./json_scan.ts";
 * const text = '{"did":"did:plc:abc","time_us":1}';
 * const span = objectMembers(text).get("time_us")!;
 * console.log(text.slice(span.valueStart, span.valueEnd)); // "1"
 * ```
 */
export interface MemberSpan {
  /** Index of the key's opening quote. */
  keyStart: number;
  /** Index of the value's first character. */
  valueStart: number;
  /** Index just past the value's last character. */
  valueEnd: number;
}

function skipSpace(text: string, i: number): number {
  for (;;) {
    const c = text.charCodeAt(i);
    if (c !== 0x20 && c !== 0x0a && c !== 0x0d && c !== 0x09) return i;
    i++;
  }
}

/** Index just past the string whose opening quote is at `i`. */
function skipString(text: string, i: number): number {
  i++;
  for (;;) {
    const c = text.charCodeAt(i);
    if (Number.isNaN(c)) throw new SyntaxError("unterminated string");
    if (c === 0x5c) i += 2; // backslash: skip the escaped character
    else if (c === 0x22) return i + 1;
    else i++;
  }
}

/** Index just past the value starting at `i`. */
function skipValue(text: string, i: number): number {
  const first = text.charCodeAt(i);
  if (first === 0x22) return skipString(text, i);
  if (first === 0x7b || first === 0x5b) {
    let depth = 0;
    for (;;) {
      const c = text.charCodeAt(i);
      if (Number.isNaN(c)) throw new SyntaxError("unterminated object or array");
      if (c === 0x22) {
        i = skipString(text, i);
        continue;
      }
      if (c === 0x7b || c === 0x5b) depth++;
      else if (c === 0x7d || c === 0x5d) {
        depth--;
        if (depth === 0) return i + 1;
      }
      i++;
    }
  }
  // A number, true, false or null: runs until a delimiter.
  for (;;) {
    const c = text.charCodeAt(i);
    if (
      Number.isNaN(c) || c === 0x2c || c === 0x7d || c === 0x5d || c === 0x20 || c === 0x0a ||
      c === 0x0d || c === 0x09
    ) {
      return i;
    }
    i++;
  }
}

/**
 * Lists the members of the JSON object that starts at `start` (after optional whitespace), in
 * text order, keyed by their decoded names (a repeated key keeps its last span, as `JSON.parse`
 * keeps the last value). The text must be valid JSON there; a `SyntaxError` is thrown otherwise.
 *
 * @example
 * ```ts
 * import { objectMembers } from "./json_scan.ts";
 * const text = '{"did":"did:plc:abc","commit":{"rkey":"x","record":{"a":[1,2]}}}';
 * const commit = objectMembers(text).get("commit")!;
 * const record = objectMembers(text, commit.valueStart).get("record")!;
 * console.log(text.slice(record.valueStart, record.valueEnd)); // {"a":[1,2]}
 * ```
 */
export function objectMembers(text: string, start = 0): Map<string, MemberSpan> {
  const members = new Map<string, MemberSpan>();
  let i = skipSpace(text, start);
  if (text.charCodeAt(i) !== 0x7b) throw new SyntaxError(`expected '{' at ${i}`);
  i = skipSpace(text, i + 1);
  if (text.charCodeAt(i) === 0x7d) return members;
  for (;;) {
    if (text.charCodeAt(i) !== 0x22) throw new SyntaxError(`expected a key at ${i}`);
    const keyStart = i;
    i = skipString(text, i);
    const rawKey = text.slice(keyStart + 1, i - 1);
    const key = rawKey.includes("\\") ? JSON.parse(text.slice(keyStart, i)) as string : rawKey;
    i = skipSpace(text, i);
    if (text.charCodeAt(i) !== 0x3a) throw new SyntaxError(`expected ':' at ${i}`);
    const valueStart = skipSpace(text, i + 1);
    const valueEnd = skipValue(text, valueStart);
    members.set(key, { keyStart, valueStart, valueEnd });
    i = skipSpace(text, valueEnd);
    const c = text.charCodeAt(i);
    if (c === 0x7d) return members;
    if (c !== 0x2c) throw new SyntaxError(`expected ',' or '}' at ${i}`);
    i = skipSpace(text, i + 1);
  }
}

/**
 * The raw text of member `key` of the object starting at `start`, or `undefined` when absent.
 *
 * @example
 * ```ts
 * import { rawMember } from "./json_scan.ts";
 * rawMember('{"time_us":1725911162329308}', "time_us"); // "1725911162329308"
 * ```
 */
export function rawMember(text: string, key: string, start = 0): string | undefined {
  const span = objectMembers(text, start).get(key);
  return span === undefined ? undefined : text.slice(span.valueStart, span.valueEnd);
}
