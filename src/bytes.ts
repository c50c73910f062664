/**
 * Joining byte arrays, as `@std/bytes`' `concat()` does, and Base64, as `@std/encoding`'s
 * `encodeBase64()` does (JSR is not reachable here; the signatures are the same, so moving to them
 * is an import change), and the SHA-256 of bytes in hex.
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

/**
 * The lower-case hex SHA-256 of `data` (a string as its UTF-8 bytes).
 *
 * @example
 * ```ts
 * import { sha256Hex } from "./bytes.ts";
 * await sha256Hex("abc"); // "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
 * ```
 */
export async function sha256Hex(data: Uint8Array | string): Promise<string> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>));
  return Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * `data` (a string as its UTF-8 bytes) in standard Base64, with padding.
 *
 * @example
 * ```ts
 * import { encodeBase64 } from "./bytes.ts";
 * encodeBase64("al@ice:s:cret"); // "YWxAaWNlOnM6Y3JldA=="
 * ```
 */
export function encodeBase64(data: Uint8Array | string): string {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}
