/**
 * Joining byte arrays, as `@std/bytes`' `concat()` does (JSR is not reachable here; the signature is
 * the same, so moving to it is an import change).
 *
 * @module
 */

/**
 * One new array holding `buffers` one after the other.
 *
 * @example
 * ```ts
 * import { concat } from "./bytes.ts";
 * concat([new Uint8Array([1, 2]), new Uint8Array([3])]); // Uint8Array [1, 2, 3]
 * ```
 */
export function concat(buffers: readonly Uint8Array[]): Uint8Array<ArrayBuffer> {
  let length = 0;
  for (const b of buffers) length += b.length;
  const out = new Uint8Array(length);
  let at = 0;
  for (const b of buffers) {
    out.set(b, at);
    at += b.length;
  }
  return out;
}
