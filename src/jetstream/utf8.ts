/**
 * UTF-8 decoding of Jetstream's text for the hot path: lenient decoding (Deno's fast path), checked
 * strictly only when the result holds U+FFFD, which invalid bytes turn into.
 *
 * @module
 */

const lenient = new TextDecoder();
const strict = new TextDecoder("utf-8", { fatal: true });

/**
 * The text of `bytes`, or `undefined` when they are not valid UTF-8 (a text that legitimately holds
 * U+FFFD is returned as it is).
 *
 * @example
 * ```ts
 * import { utf8Text } from "./utf8.ts";
 * utf8Text(new TextEncoder().encode("{}")); // "{}"
 * utf8Text(new Uint8Array([0x7b, 0xff, 0x7d])); // undefined
 * ```
 */
export function utf8Text(bytes: Uint8Array): string | undefined {
  const text = lenient.decode(bytes);
  if (text.indexOf("\uFFFD") === -1) return text;
  try {
    return strict.decode(bytes);
  } catch {
    return undefined;
  }
}
