/**
 * Joining byte arrays, as `@std/bytes`' `concat()` does, and Base64, as `@std/encoding`'s
 * `encodeBase64()` does (JSR is not reachable here; the signatures are the same, so moving to them
 * is an import change), and the SHA-256 of bytes in hex.
 *
 * @module
 */
import { createHash } from "node:crypto";

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
 * sha256Hex("abc"); // "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
 * ```
 */
export function sha256Hex(data: Uint8Array | string): string {
  // (Synchronous, for the zstd decoder's constructor, which checks a dictionary's bytes.)
  return createHash("sha256").update(data).digest("hex");
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
