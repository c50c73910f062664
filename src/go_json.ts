/**
 * JSON read as Go's `encoding/json` reads it, for the legacy server's client messages (protocol doc
 * §2), and to tell the start of a JSON text from other text: its syntax errors word by word (a close reason must fit in 123 bytes, and JavaScript's
 * `JSON.parse` messages often do not, where Go's do), and a parse that keeps what `Unmarshal` looks
 * at: every key of an object in order (duplicates too) and the literal text of numbers.
 *
 * @module
 */

/** A JSON value as Go's decoder sees it: objects as their entries in order, numbers as their text. */
export type GoJson =
  | null
  | boolean
  | string
  | { number: string }
  | GoJson[]
  | { entries: [string, GoJson][] };

/** The message of Go's `*json.SyntaxError` for input that ends too soon: the start of a JSON text. */
export const GO_JSON_EOF = "unexpected end of JSON input";

class GoSyntaxError extends Error {}

/** The control characters `strconv.Quote` writes by letter. */
const NAMED_ESCAPES: Record<number, string> = { 7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r" };

/**
 * A byte as Go's `quoteChar` shows it in a syntax error: in single quotes, escaped as
 * `strconv.Quote` escapes the rune of that value.
 */
function quoteChar(c: number): string {
  if (c === 0x27) return `'\\''`;
  if (c === 0x22) return `'"'`;
  if (NAMED_ESCAPES[c]) return `'\\${NAMED_ESCAPES[c]}'`;
  if (c === 0x5c) return `'\\\\'`;
  if (c < 0x20 || c === 0x7f) return `'\\x${c.toString(16).padStart(2, "0")}'`;
  // Runes U+0080 to U+00FF: Go prints the letters and signs, and escapes controls and spaces.
  if ((c >= 0x80 && c <= 0xa0) || c === 0xad) return `'\\u00${c.toString(16).padStart(2, "0")}'`;
  return `'${String.fromCharCode(c)}'`;
}

/**
 * Parses `text` as Go's decoder does, or throws an `Error` whose message is the one Go's
 * `json.Unmarshal` gives for its first syntax error.
 *
 * @example
 * ```ts
 * import { parseGoJson } from "./go_json.ts";
 * try {
 *   parseGoJson('{"type":"options_update",}');
 * } catch (err) {
 *   console.log((err as Error).message); // "invalid character '}' looking for beginning of object key string"
 * }
 * ```
 */
export function parseGoJson(text: string): GoJson {
  const b = new TextEncoder().encode(text);
  const decoder = new TextDecoder();
  let i = 0;
  const fail = (context: string): never => {
    if (i >= b.length) throw new GoSyntaxError(GO_JSON_EOF);
    throw new GoSyntaxError(`invalid character ${quoteChar(b[i])} ${context}`);
  };
  const space = () => {
    while (i < b.length && (b[i] === 0x20 || b[i] === 0x09 || b[i] === 0x0a || b[i] === 0x0d)) i++;
  };
  const digit = () => i < b.length && b[i] >= 0x30 && b[i] <= 0x39;
  const hex = (c: number) => (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66);

  const literal = (word: string, value: GoJson): GoJson => {
    for (let k = 1; k < word.length; k++) {
      i++;
      if (b[i] !== word.charCodeAt(k)) {
        fail(`in literal ${word} (expecting ${quoteChar(word.charCodeAt(k))})`);
      }
    }
    i++;
    return value;
  };
  const number = (): GoJson => {
    const from = i;
    if (b[i] === 0x2d) {
      i++;
      if (!digit()) fail("in numeric literal");
    }
    if (b[i] === 0x30) i++;
    else while (digit()) i++;
    if (b[i] === 0x2e) {
      i++;
      if (!digit()) fail("after decimal point in numeric literal");
      while (digit()) i++;
    }
    if (b[i] === 0x65 || b[i] === 0x45) {
      i++;
      if (b[i] === 0x2b || b[i] === 0x2d) i++;
      if (!digit()) fail("in exponent of numeric literal");
      while (digit()) i++;
    }
    return { number: decoder.decode(b.subarray(from, i)) };
  };
  const string = (): string => {
    const from = ++i;
    for (;;) {
      if (i >= b.length) fail("");
      const c = b[i];
      if (c === 0x22) break;
      if (c === 0x5c) {
        i++;
        if (i >= b.length) fail("");
        if (b[i] === 0x75) {
          for (let k = 0; k < 4; k++) {
            i++;
            if (i >= b.length || !hex(b[i])) fail("in \\u hexadecimal character escape");
          }
        } else if (!`"\\/bfnrt`.includes(String.fromCharCode(b[i]))) fail("in string escape code");
      } else if (c < 0x20) fail("in string literal");
      i++;
    }
    const raw = decoder.decode(b.subarray(from - 1, ++i));
    return JSON.parse(raw) as string;
  };
  const value = (): GoJson => {
    space();
    const c = b[i];
    if (c === 0x7b) return object();
    if (c === 0x5b) return array();
    if (c === 0x22) return string();
    if (c === 0x2d || (c >= 0x30 && c <= 0x39)) return number();
    if (c === 0x74) return literal("true", true);
    if (c === 0x66) return literal("false", false);
    if (c === 0x6e) return literal("null", null);
    return fail("looking for beginning of value");
  };
  const object = (): GoJson => {
    i++;
    const entries: [string, GoJson][] = [];
    space();
    if (b[i] === 0x7d) {
      i++;
      return { entries };
    }
    for (;;) {
      space();
      if (b[i] !== 0x22) fail("looking for beginning of object key string");
      const key = string();
      space();
      if (b[i] !== 0x3a) fail("after object key");
      i++;
      entries.push([key, value()]);
      space();
      if (b[i] === 0x2c) {
        i++;
        continue;
      }
      if (b[i] === 0x7d) {
        i++;
        return { entries };
      }
      fail("after object key:value pair");
    }
  };
  const array = (): GoJson => {
    i++;
    const items: GoJson[] = [];
    space();
    if (b[i] === 0x5d) {
      i++;
      return items;
    }
    for (;;) {
      items.push(value());
      space();
      if (b[i] === 0x2c) {
        i++;
        continue;
      }
      if (b[i] === 0x5d) {
        i++;
        return items;
      }
      fail("after array element");
    }
  };

  try {
    const result = value();
    space();
    if (i < b.length) fail("after top-level value");
    return result;
  } catch (err) {
    if (err instanceof GoSyntaxError) throw new Error(err.message);
    throw err;
  }
}

/** The kind of a value as Go's `UnmarshalTypeError` names it. */
export function goKind(v: GoJson): string {
  if (v === null) return "null";
  if (typeof v === "boolean") return "bool";
  if (typeof v === "string") return "string";
  if (Array.isArray(v)) return "array";
  return "number" in v ? "number" : "object";
}

/** Whether `v` is a JSON number (its text). */
export function isGoNumber(v: GoJson | undefined): v is { number: string } {
  return typeof v === "object" && v !== null && !Array.isArray(v) && "number" in v;
}

/** Whether `v` is a JSON object. */
export function isGoObject(v: GoJson | undefined): v is { entries: [string, GoJson][] } {
  return typeof v === "object" && v !== null && !Array.isArray(v) && "entries" in v;
}

/**
 * The struct field among `fields` that Go's decoder takes the key `key` for (it matches keys to
 * fields without regard to case, folding the Kelvin sign and the long s too), or undefined.
 */
export function goFieldOf<F extends string>(key: string, fields: readonly F[]): F | undefined {
  const exact = fields.find((f) => f === key);
  if (exact) return exact;
  const folded = key.replaceAll("\u017f", "s").toLowerCase();
  return fields.find((f) => f.toLowerCase() === folded);
}
