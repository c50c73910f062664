/**
 * zstd with a pre-shared dictionary, for Jetstream's compressed wire (protocol doc §4).
 *
 * Jetstream sends each event as one complete, independent zstd frame per binary WebSocket message,
 * compressed with a dictionary that the client must already have: the legacy dictionary (ID
 * {@link LEGACY_DICTIONARY_ID}) on the v1 wire, and a numbered dictionary such as
 * {@link V2_DICTIONARY_ID} on the v2 wire. Deno has no built-in zstd with dictionaries
 * (`DecompressionStream("zstd")` is unsupported and `node:zlib` ignores the dictionary), so this
 * module wraps the WebAssembly build of libzstd in `npm:zstd-codec@0.1.5`, which is the fastest
 * correct option measured here because it can prepare the dictionary once (a `ZSTD_DDict`) instead
 * of re-digesting it for every frame.
 *
 * The WebAssembly code is embedded in the npm package, so decoding needs no network and no
 * permissions at run time.
 *
 * @module
 */
import { sha256Hex } from "../bytes.ts";
import { show } from "../errors.ts";

/**
 * Dictionary ID of the legacy Jetstream dictionary (`legacy_subscribe.zdict`, `0x6015466D`), used on
 * the v1 wire (`/subscribe?compress=true`).
 *
 * @example
 * ```ts
 * import { frameDictionaryId, LEGACY_DICTIONARY_ID } from "@jetfill/jetfill";
 * const frame = await Deno.readFile("event.json.zst");
 * console.log(frameDictionaryId(frame) === LEGACY_DICTIONARY_ID);
 * ```
 */
export const LEGACY_DICTIONARY_ID = 1612007021;

/**
 * Dictionary ID of the v2 wire's `subscribe_events_20260811.zdict` (`?zstdDictionary=20260811`).
 *
 * @example
 * ```ts
 * import { dictionaryIdOf, V2_DICTIONARY_ID } from "@jetfill/jetfill";
 * const dictionary = await Deno.readFile("subscribe_events_20260811.zdict");
 * console.log(dictionaryIdOf(dictionary) === V2_DICTIONARY_ID); // true
 * ```
 */
export const V2_DICTIONARY_ID = 20260811;

/**
 * Jetstream's published dictionaries by ID: their file names and sha256. Bytes that carry one of
 * these IDs with another sha256 are a damaged or cut-short copy, which would decode nothing (each
 * frame would fail as corrupt), so they are refused as a dictionary.
 */
const JETSTREAM_DICTIONARIES: ReadonlyMap<number, { file: string; sha256: string }> = new Map([
  [LEGACY_DICTIONARY_ID, {
    file: "legacy_subscribe.zdict",
    sha256: "b8d77b46933aceecbdd5275a01241efc985c970c78162b8150cf67a26522f70c",
  }],
  [V2_DICTIONARY_ID, {
    file: "subscribe_events_20260811.zdict",
    sha256: "f631a689a829b84b042ba45bcd7a7c2f792467192c5832fcfc1fc48afbec96aa",
  }],
]);

/**
 * sha256 of the legacy Jetstream dictionary (`legacy_subscribe.zdict`, 112,640 bytes), the same
 * bytes in the v2 repository and the legacy one.
 *
 * @example
 * ```ts
 * import { LEGACY_DICTIONARY_SHA256 } from "@jetfill/jetfill";
 * const bytes = await Deno.readFile("legacy_subscribe.zdict");
 * const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
 * console.log(Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("") === LEGACY_DICTIONARY_SHA256);
 * ```
 */
export const LEGACY_DICTIONARY_SHA256: string = JETSTREAM_DICTIONARIES.get(LEGACY_DICTIONARY_ID)!.sha256;

/**
 * The file name and sha256 of the Jetstream dictionary published under `dictionaryId`, if any.
 *
 * @example
 * ```ts
 * import { LEGACY_DICTIONARY_ID, publishedDictionary } from "./zstd.ts";
 * publishedDictionary(LEGACY_DICTIONARY_ID)?.file; // "legacy_subscribe.zdict"
 * ```
 */
export function publishedDictionary(dictionaryId: number): { file: string; sha256: string } | undefined {
  return JETSTREAM_DICTIONARIES.get(dictionaryId);
}

/**
 * The default and the largest `maxDecodedBytes`: 32 MiB, the read limit the official Go client
 * applies to decoded messages.
 *
 * @example
 * ```ts
 * import { createZstdDecoder, DEFAULT_MAX_DECODED_BYTES } from "@jetfill/jetfill";
 * const dictionary = await Deno.readFile("legacy_subscribe.zdict");
 * const decoder = await createZstdDecoder(dictionary, { maxDecodedBytes: DEFAULT_MAX_DECODED_BYTES / 4 });
 * ```
 */
export const DEFAULT_MAX_DECODED_BYTES: number = 32 * 1024 * 1024;

/**
 * Why a frame could not be decoded: it names another dictionary than the decoder's, it is not a
 * valid zstd frame (corrupt, truncated or not zstd at all), or it decodes past `maxDecodedBytes`.
 *
 * @example
 * ```ts
 * import type { ZstdDecodeErrorReason } from "./zstd.ts";
 * const counts: Record<ZstdDecodeErrorReason, number> = { "dictionary-mismatch": 0, corrupt: 0, "too-large": 0 };
 * ```
 */
export type ZstdDecodeErrorReason = "dictionary-mismatch" | "corrupt" | "too-large";

/**
 * A frame that cannot be decoded. Thrown by {@linkcode ZstdDecoder.decode} for one bad message;
 * the decoder stays usable for the next one.
 *
 * @example
 * ```ts
 * import { createZstdDecoder, ZstdDecodeError } from "@jetfill/jetfill";
 * const decoder = await createZstdDecoder(await Deno.readFile("legacy_subscribe.zdict"));
 * try {
 *   decoder.decode(new Uint8Array([1, 2, 3]));
 * } catch (error) {
 *   if (error instanceof ZstdDecodeError) console.log(error.reason); // "corrupt"
 * }
 * ```
 */
export class ZstdDecodeError extends Error {
  /** What was wrong with the frame. */
  readonly reason: ZstdDecodeErrorReason;
  /** The dictionary ID the frame names, when it names one. */
  readonly frameDictionaryId: number | undefined;
  /** The dictionary ID of the decoder that rejected the frame. */
  readonly decoderDictionaryId: number;

  /** Creates the error; `message` says what happened in terms of the frame. */
  constructor(
    reason: ZstdDecodeErrorReason,
    message: string,
    ids: { frameDictionaryId?: number; decoderDictionaryId: number },
  ) {
    super(message);
    this.name = "ZstdDecodeError";
    this.reason = reason;
    this.frameDictionaryId = ids.frameDictionaryId;
    this.decoderDictionaryId = ids.decoderDictionaryId;
  }
}

/**
 * Options of {@linkcode createZstdDecoder}.
 *
 * @example
 * ```ts
 * import { createZstdDecoder, type ZstdDecoderOptions } from "@jetfill/jetfill";
 * const options: ZstdDecoderOptions = { maxDecodedBytes: 4 * 1024 * 1024 };
 * const decoder = await createZstdDecoder(await Deno.readFile("legacy_subscribe.zdict"), options);
 * ```
 */
export interface ZstdDecoderOptions {
  /**
   * Largest decoded size accepted for one frame, in bytes; larger frames throw a
   * {@linkcode ZstdDecodeError} with reason `"too-large"` instead of being inflated. At most
   * {@linkcode DEFAULT_MAX_DECODED_BYTES}.
   *
   * @default {32 * 1024 * 1024}
   */
  maxDecodedBytes?: number;
}

/**
 * A decoder bound to one dictionary, made by {@linkcode createZstdDecoder}. Create it once and
 * reuse it across messages and reconnections: each one holds its own WebAssembly instance.
 *
 * @example
 * ```ts
 * import { createZstdDecoder, type ZstdDecoder } from "@jetfill/jetfill";
 * const decoder: ZstdDecoder = await createZstdDecoder(await Deno.readFile("legacy_subscribe.zdict"));
 * const json = new TextDecoder().decode(decoder.decode(await Deno.readFile("event.json.zst")));
 * ```
 */
export interface ZstdDecoder {
  /** The ID of the decoder's dictionary, as written in its header. */
  readonly dictionaryId: number;
  /** The largest decoded frame accepted, in bytes. */
  readonly maxDecodedBytes: number;
  /**
   * Decodes one complete zstd frame (one Jetstream binary message; skippable frames before it are
   * skipped) and returns the decoded bytes.
   * Throws {@linkcode ZstdDecodeError} for a frame compressed with another dictionary, a corrupt or
   * truncated frame, or one larger than `maxDecodedBytes`.
   *
   * The result is never overwritten, but results up to 4 KiB are views into a shared 64 KiB
   * `ArrayBuffer` (as Node's small `Buffer`s are): use `result.slice()` before transferring or
   * keeping `result.buffer` itself.
   */
  decode(frame: Uint8Array): Uint8Array<ArrayBuffer>;
}

/**
 * An encoder bound to one dictionary, made by {@linkcode createZstdEncoder}.
 *
 * @example
 * ```ts
 * import { createZstdEncoder, type ZstdEncoder } from "@jetfill/jetfill";
 * const encoder: ZstdEncoder = await createZstdEncoder(await Deno.readFile("legacy_subscribe.zdict"));
 * const frame = encoder.encode(new TextEncoder().encode('{"kind":"commit"}'));
 * ```
 */
export interface ZstdEncoder {
  /** The ID of the encoder's dictionary; every frame names it in its header. */
  readonly dictionaryId: number;
  /** The compression level. */
  readonly level: number;
  /**
   * Compresses `bytes` into one zstd frame that records the content size and the dictionary ID,
   * as Jetstream does for each message. Above 32 MiB, more than the WASM heap holds, the frame
   * stores `bytes` in raw blocks, uncompressed (still a valid frame naming the dictionary). Small
   * frames share a pooled `ArrayBuffer`, as {@linkcode ZstdDecoder.decode}'s results do.
   */
  encode(bytes: Uint8Array): Uint8Array<ArrayBuffer>;
}

const FRAME_MAGIC = 0xfd2fb528;
// Skippable frames: 0x184D2A50 to 0x184D2A5F.
const SKIPPABLE_MAGIC = 0x184d2a50;
const DICTIONARY_MAGIC = 0xec30a437;

/**
 * Reads the dictionary ID that a zstd frame header names.
 *
 * Returns `undefined` when the frame names no dictionary (its Dictionary_ID field is absent or
 * zero), and also when the bytes do not start with a complete zstd frame header.
 *
 * @example
 * ```ts
 * import { frameDictionaryId, LEGACY_DICTIONARY_ID } from "@jetfill/jetfill";
 * const frame = await Deno.readFile("event.json.zst");
 * if (frameDictionaryId(frame) === LEGACY_DICTIONARY_ID) console.log("needs the legacy dictionary");
 * ```
 */
export function frameDictionaryId(frame: Uint8Array): number | undefined {
  const start = afterSkippableFrames(frame);
  const header = typeof start === "string" ? start : readFrameHeader(start);
  return typeof header === "string" ? undefined : header.dictionaryId;
}

/**
 * Whether the bytes start as a zstd frame does, past any skippable frames: with the frame magic
 * number `0xFD2FB528`. Bytes that do not are not zstd at all, whatever the dictionary.
 *
 * @example
 * ```ts
 * import { startsAsZstdFrame } from "./zstd.ts";
 * console.log(startsAsZstdFrame(new TextEncoder().encode("{}"))); // false
 * ```
 */
export function startsAsZstdFrame(bytes: Uint8Array): boolean {
  const start = afterSkippableFrames(bytes);
  return typeof start !== "string" && start.byteLength >= 4 && readU32(start, 0) === FRAME_MAGIC;
}

/**
 * Reads the ID of a structured zstd dictionary (magic `0xEC30A437`, ID in bytes 4..8,
 * little-endian). Throws `TypeError` for bytes that are not a structured zstd dictionary.
 *
 * @example
 * ```ts
 * import { dictionaryIdOf, LEGACY_DICTIONARY_ID } from "@jetfill/jetfill";
 * const dictionary = await Deno.readFile("legacy_subscribe.zdict");
 * console.log(dictionaryIdOf(dictionary) === LEGACY_DICTIONARY_ID); // true
 * ```
 */
export function dictionaryIdOf(dictionary: Uint8Array): number {
  // A dictionary is its header plus entropy tables; anything this short cannot be one.
  if (dictionary.byteLength < 16 || readU32(dictionary, 0) !== DICTIONARY_MAGIC) {
    throw new TypeError(
      `Cannot use the bytes as a zstd dictionary: they do not start with the dictionary magic number 0xEC30A437 (length ${dictionary.byteLength})`,
    );
  }
  return readU32(dictionary, 4);
}

/**
 * Creates a decoder for frames compressed with `dictionary` (a structured zstd dictionary such as
 * `legacy_subscribe.zdict`). Each decoder owns its own WebAssembly instance, so it is freed with
 * the decoder.
 *
 * Frames that name no dictionary are decoded with this one too; frames that name another
 * dictionary are rejected before decoding, naming both IDs. Rejects with a `TypeError` bytes that
 * are not a structured zstd dictionary, or that carry the ID of one of Jetstream's published
 * dictionaries without being it (a damaged or cut-short copy), and with a `RangeError` a
 * `maxDecodedBytes` out of range.
 *
 * @example
 * ```ts
 * import { createZstdDecoder } from "@jetfill/jetfill";
 * const decoder = await createZstdDecoder(await Deno.readFile("legacy_subscribe.zdict"));
 * const socket = new WebSocket("wss://jetstream1.us-east.bsky.network/subscribe?compress=true");
 * socket.binaryType = "arraybuffer";
 * const text = new TextDecoder();
 * socket.onmessage = (message) => {
 *   const event = JSON.parse(text.decode(decoder.decode(new Uint8Array(message.data))));
 *   console.log(event.kind);
 * };
 * ```
 */
export async function createZstdDecoder(
  dictionary: Uint8Array,
  options: ZstdDecoderOptions = {},
): Promise<ZstdDecoder> {
  const { dictionaryId, maxDecodedBytes } = decoderSettings(dictionary, options);
  const wasm = await instantiate();
  return new WasmDecoder(wasm, dictionary, dictionaryId, maxDecodedBytes);
}

/**
 * A decoder for the dictionary a host served (a v2 host's `getZstdDictionary`): the host compresses
 * with what it serves, so bytes under the ID of a published dictionary are taken as they are, where
 * {@linkcode createZstdDecoder} refuses a copy that is not the published one.
 */
export async function createServedDictionaryDecoder(dictionary: Uint8Array): Promise<ZstdDecoder> {
  const { dictionaryId, maxDecodedBytes } = decoderSettings(dictionary, {}, false);
  return new WasmDecoder(await instantiate(), dictionary, dictionaryId, maxDecodedBytes);
}

/**
 * A decoder's dictionary ID and limit, checked; throws as {@linkcode createZstdDecoder} documents
 * (`published` false: without comparing bytes under a published dictionary's ID with it).
 */
function decoderSettings(
  dictionary: Uint8Array,
  options: ZstdDecoderOptions,
  published = true,
): { dictionaryId: number; maxDecodedBytes: number } {
  const dictionaryId = dictionaryIdOf(dictionary);
  const known = published ? JETSTREAM_DICTIONARIES.get(dictionaryId) : undefined;
  if (known) {
    const sha256 = sha256Hex(dictionary);
    if (sha256 !== known.sha256) {
      throw new TypeError(
        `Cannot use the bytes as a zstd dictionary: they carry the ID ${dictionaryId} of Jetstream's ${known.file}, but are not it (${dictionary.byteLength} bytes of sha256 ${sha256}; it has sha256 ${known.sha256}): a damaged or cut-short copy`,
      );
    }
  }
  const maxDecodedBytes = options.maxDecodedBytes ?? DEFAULT_MAX_DECODED_BYTES;
  if (
    !Number.isSafeInteger(maxDecodedBytes) || maxDecodedBytes < 1 ||
    maxDecodedBytes > DEFAULT_MAX_DECODED_BYTES
  ) {
    throw new RangeError(
      `Cannot create a zstd decoder as 'maxDecodedBytes' must be an integer from 1 to ${DEFAULT_MAX_DECODED_BYTES}: current value is ${
        show(maxDecodedBytes)
      }`,
    );
  }
  return { dictionaryId, maxDecodedBytes };
}

/**
 * Creates an encoder that writes frames like Jetstream's: one frame per call, with the content
 * size and the dictionary ID in the header: the replay server's `compressor` (see `serveJetstream()`)
 * and the tests use it.
 * Throws `RangeError` for a level outside 1..19.
 *
 * @example
 * ```ts
 * import { createZstdDecoder, createZstdEncoder } from "@jetfill/jetfill";
 * const dictionary = await Deno.readFile("legacy_subscribe.zdict");
 * const encoder = await createZstdEncoder(dictionary);
 * const decoder = await createZstdDecoder(dictionary);
 * const frame = encoder.encode(new TextEncoder().encode('{"kind":"commit"}'));
 * console.log(new TextDecoder().decode(decoder.decode(frame))); // {"kind":"commit"}
 * ```
 */
export async function createZstdEncoder(dictionary: Uint8Array, level = 3): Promise<ZstdEncoder> {
  const dictionaryId = dictionaryIdOf(dictionary);
  if (!Number.isInteger(level) || level < 1 || level > 19) {
    throw new RangeError(
      `Cannot create a zstd encoder as 'level' must be an integer from 1 to 19: current value is ${
        show(level)
      }`,
    );
  }
  const wasm = await instantiate();
  return new WasmEncoder(wasm, dictionary, dictionaryId, level);
}

/**
 * What {@linkcode ZstdDecompressionStream} decodes with: a dictionary (and decoder options), or a
 * decoder made earlier.
 *
 * @example
 * ```ts
 * import type { ZstdDecompressionStreamInit } from "./zstd.ts";
 * const init: ZstdDecompressionStreamInit = { dictionary: await Deno.readFile("legacy_subscribe.zdict") };
 * ```
 */
export type ZstdDecompressionStreamInit =
  | ({ dictionary: Uint8Array } & ZstdDecoderOptions)
  | ZstdDecoder;

/**
 * The zstd-with-dictionary counterpart of `DecompressionStream`, for Jetstream's wire: **each chunk
 * written must be one complete zstd frame** (Jetstream sends one frame per WebSocket message, with
 * no state carried between messages), and each decoded frame comes out as one chunk.
 *
 * As with `DecompressionStream`: a chunk may be any `BufferSource` (a `Uint8Array` or other typed
 * array, a `DataView`, an `ArrayBuffer`), an empty chunk is ignored, each chunk that comes out owns
 * its `ArrayBuffer` (it can be transferred), a dictionary that is not one throws in the constructor,
 * and a bad frame errors the stream. To skip bad frames and keep going, call
 * {@linkcode ZstdDecoder.decode} per message instead.
 *
 * @example
 * ```ts
 * import { ZstdDecompressionStream } from "@jetfill/jetfill";
 * const dictionary = await Deno.readFile("legacy_subscribe.zdict");
 * const frames = ReadableStream.from([await Deno.readFile("event.json.zst")]);
 * for await (const json of frames.pipeThrough(new ZstdDecompressionStream({ dictionary }))) {
 *   console.log(new TextDecoder().decode(json));
 * }
 * ```
 */
export class ZstdDecompressionStream
  extends TransformStream<ArrayBufferView | ArrayBuffer, Uint8Array<ArrayBuffer>> {
  /**
   * Creates the stream; WebAssembly starts loading at once and the first chunk waits for it. Throws
   * `TypeError` for a dictionary that is not a structured zstd dictionary (or carries the ID of one
   * of Jetstream's published dictionaries without being it) and `RangeError` for a `maxDecodedBytes`
   * out of range.
   */
  constructor(init: ZstdDecompressionStreamInit) {
    let decoder: ZstdDecoder | undefined;
    let ready: Promise<ZstdDecoder>;
    if ("decode" in init) {
      decoder = init;
      ready = Promise.resolve(init);
    } else {
      // Checked now, as `DecompressionStream` checks its format; only the WebAssembly is awaited.
      decoderSettings(init.dictionary, init);
      ready = createZstdDecoder(init.dictionary, init);
    }
    // A stream that is never written to must not leave a rejected promise unhandled; writes and
    // the close still see the rejection through their own `then`.
    ready.catch(() => {});
    const emit = (
      d: ZstdDecoder,
      frame: Uint8Array,
      controller: TransformStreamDefaultController<Uint8Array>,
    ) => {
      const out = d.decode(frame);
      // Small results share a pooled buffer (see ZstdDecoder.decode): a chunk handed out owns its own.
      controller.enqueue(
        out.byteOffset === 0 && out.byteLength === out.buffer.byteLength ? out : out.slice(),
      );
    };
    super({
      transform(chunk, controller): void | Promise<void> {
        const frame = bufferSourceBytes(chunk);
        if (frame.byteLength === 0) return;
        if (decoder) return emit(decoder, frame, controller);
        return ready.then((ready) => {
          decoder = ready;
          emit(ready, frame, controller);
        });
      },
      flush(): void | Promise<void> {
        // A stream closed before any write still reports a decoder that could not be made.
        if (!decoder) return ready.then(() => {});
      },
    });
  }
}

/** The bytes of a chunk written to a stream, as `DecompressionStream` takes them (any `BufferSource`). */
function bufferSourceBytes(chunk: ArrayBufferView | ArrayBuffer): Uint8Array {
  if (chunk instanceof Uint8Array) return chunk;
  if (ArrayBuffer.isView(chunk)) return new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  if (chunk instanceof ArrayBuffer) return new Uint8Array(chunk);
  throw new TypeError(
    `Cannot decode a chunk of type ${
      chunk === null
        ? "null"
        : typeof chunk === "object"
        ? (chunk as object).constructor?.name ?? "object"
        : typeof chunk
    }: each chunk must be one zstd frame as a BufferSource (Uint8Array, ArrayBuffer or another ArrayBufferView)`,
  );
}

// ---------------------------------------------------------------------------------------------
// Frame header (RFC 8878 §3.1.1)

interface FrameHeader {
  dictionaryId: number | undefined;
  /** Decoded size, when the frame records it. */
  contentSize: number | undefined;
  /** Window size; equal to the content size for single-segment frames. */
  windowSize: number;
}

/**
 * The bytes from the first zstd frame on, past any skippable frames before it (RFC 8878 §3.1.2:
 * magic `0x184D2A5?`, a 4-byte length, that many bytes of anything), or why they cannot be skipped.
 */
function afterSkippableFrames(bytes: Uint8Array): Uint8Array | string {
  let at = 0;
  while (bytes.byteLength - at >= 8 && (readU32(bytes, at) & 0xfffffff0) === SKIPPABLE_MAGIC) {
    const end = at + 8 + readU32(bytes, at + 4);
    if (end > bytes.byteLength) {
      return `its skippable frame of ${end - at} bytes is cut off after ${bytes.byteLength - at}`;
    }
    at = end;
  }
  return at === 0 ? bytes : bytes.subarray(at);
}

/** Parses the frame header, or returns why the bytes are not a zstd frame. */
function readFrameHeader(frame: Uint8Array): FrameHeader | string {
  if (frame.byteLength < 6) return `it is ${frame.byteLength} bytes long, too short for a zstd frame`;
  const magic = readU32(frame, 0);
  if (magic !== FRAME_MAGIC) {
    return `it starts with 0x${
      magic.toString(16).padStart(8, "0")
    }, not the zstd frame magic number 0xfd2fb528`;
  }
  const descriptor = frame[4];
  if (descriptor & 0x08) return "its frame header descriptor has the reserved bit set";
  const singleSegment = (descriptor & 0x20) !== 0;
  const dictionaryIdSize = [0, 1, 2, 4][descriptor & 0x03];
  const contentSizeFlag = descriptor >> 6;
  const contentSizeSize = [singleSegment ? 1 : 0, 2, 4, 8][contentSizeFlag];
  let offset = 5;
  const headerSize = offset + (singleSegment ? 0 : 1) + dictionaryIdSize + contentSizeSize;
  // Every frame has at least one 3-byte block header after its frame header.
  if (frame.byteLength < headerSize + 3) {
    return `it is ${frame.byteLength} bytes long, shorter than its ${headerSize}-byte header and first block header`;
  }

  let windowSize = 0;
  if (!singleSegment) {
    const exponent = (frame[offset] >> 3) + 10;
    windowSize = 2 ** exponent + (2 ** exponent / 8) * (frame[offset] & 7);
    offset += 1;
  }
  let dictionaryId: number | undefined;
  switch (dictionaryIdSize) {
    case 1:
      dictionaryId = frame[offset];
      break;
    case 2:
      dictionaryId = frame[offset] | (frame[offset + 1] << 8);
      break;
    case 4:
      dictionaryId = readU32(frame, offset);
      break;
  }
  offset += dictionaryIdSize;
  let contentSize: number | undefined;
  switch (contentSizeSize) {
    case 1:
      contentSize = frame[offset];
      break;
    case 2:
      contentSize = (frame[offset] | (frame[offset + 1] << 8)) + 256;
      break;
    case 4:
      contentSize = readU32(frame, offset);
      break;
    case 8:
      // Exact below 2^53; anything above is far past any limit anyway.
      contentSize = readU32(frame, offset) + readU32(frame, offset + 4) * 2 ** 32;
      break;
  }
  if (singleSegment) windowSize = contentSize ?? 0;
  return { dictionaryId: dictionaryId === 0 ? undefined : dictionaryId, contentSize, windowSize };
}

function readU32(bytes: Uint8Array, offset: number): number {
  return (bytes[offset] | (bytes[offset + 1] << 8) | (bytes[offset + 2] << 16) |
    (bytes[offset + 3] << 24)) >>>
    0;
}

// ---------------------------------------------------------------------------------------------
// The zstd-codec WebAssembly binding

/** An embind `std::vector<uint8_t>`. */
interface WasmVector {
  resize(size: number, fill: number): void;
  size(): number;
  set(index: number, value: number): boolean;
  delete(): void;
  /** embind's handle; `ptr` is the address of the `std::vector` itself. */
  $$: { ptr: number };
}

/** A native object (ZSTD_DDict or ZSTD_CDict wrapper) freed with `delete()`. */
interface WasmHandle {
  delete(): void;
}

interface WasmCodec {
  /** Returns the compressed size, or a negative number on error. */
  compressUsingDict(dest: WasmVector, src: WasmVector, cdict: WasmHandle): number;
  /** Returns the decoded size, or a negative number on any zstd error. */
  decompressUsingDict(dest: WasmVector, src: WasmVector, ddict: WasmHandle): number;
  compressBound(size: number): number;
}

interface WasmDecompressStream {
  beginUsingDict(ddict: WasmHandle): boolean;
  transform(chunk: Uint8Array, callback: (decoded: Uint8Array) => void): boolean;
  end(callback: (decoded: Uint8Array) => void): boolean;
  delete(): void;
}

/** The parts of the Emscripten module that this file uses. */
interface WasmBinding {
  HEAPU8: Uint8Array<ArrayBuffer>;
  HEAPU32: Uint32Array;
  VectorU8: new () => WasmVector;
  ZstdCodec: new () => WasmCodec;
  ZstdDecompressStreamBinding: new () => WasmDecompressStream;
  createDecompressionDict(dictionary: Uint8Array): WasmHandle;
  createCompressionDict(dictionary: Uint8Array, level: number): WasmHandle;
}

/** What the Emscripten factory of zstd-codec reads from the object it is given. */
interface EmscriptenInit {
  wasmMemory: WebAssembly.Memory;
  print(text: string): void;
  printErr(text: string): void;
  onAbort(what: unknown): void;
  onRuntimeInitialized(): void;
  instantiateWasm?(
    imports: WebAssembly.Imports,
    receiveInstance: (instance: WebAssembly.Instance, module: WebAssembly.Module) => void,
  ): Record<string, never>;
}

type EmscriptenFactory = (init: EmscriptenInit) => unknown;

/**
 * Size of each instance's WebAssembly memory. zstd-codec's build fixes its memory at 16 MiB and
 * cannot grow it, which leaves about 10 MiB of heap: too little for a 32 MiB frame plus its input.
 * Each instance therefore gets 96 MiB (address space; pages are only backed once touched): the
 * static data and stack (~6 MiB), a 32 MiB input, a 32 MiB output, the dictionary and the
 * decompression context, with room to spare for allocator fragmentation.
 */
const HEAP_PAGES = (96 * 1024 * 1024) / 65536;

let compiledModule: Promise<WebAssembly.Module> | undefined;

/** Creates a new zstd-codec instance with a {@link HEAP_PAGES} memory. */
async function instantiate(): Promise<WasmBinding> {
  const { default: factory } = await import("zstd-codec/lib/zstd-codec-binding-wasm.js") as {
    default: EmscriptenFactory;
  };
  const memory = new WebAssembly.Memory({ initial: HEAP_PAGES, maximum: HEAP_PAGES });
  const first = compiledModule === undefined;
  let restore = (): void => {};
  if (first) {
    compiledModule = new Promise<WebAssembly.Module>((resolve, reject) => {
      restore = interceptInstantiate(memory, resolve, reject);
    });
    // Whoever made the first attempt reports its failure; later callers may try again.
    compiledModule.catch(() => {
      compiledModule = undefined;
    });
  }
  const module = first ? undefined : await compiledModule;
  try {
    return await new Promise<WasmBinding>((resolve, reject) => {
      const init: EmscriptenInit = {
        wasmMemory: memory,
        // The library never logs; Emscripten would print on abort.
        print: () => {},
        printErr: () => {},
        onAbort: (what) => reject(new Error(`zstd WebAssembly module failed to start: ${String(what)}`)),
        onRuntimeInitialized: () => {
          // Emscripten fills in the object it is given and makes it the module.
          const binding = init as unknown as WasmBinding & { then?: unknown };
          // Its `then` method would keep a promise that resolves to the module from ever settling.
          delete binding.then;
          try {
            checkVectorLayout(binding);
            resolve(binding);
          } catch (error) {
            reject(error);
          }
        },
      };
      if (module) {
        init.instantiateWasm = (imports, receiveInstance) => {
          WebAssembly.instantiate(module, imports).then(
            (instance) => receiveInstance(instance, module),
            reject,
          );
          return {};
        };
      } else {
        compiledModule?.catch(reject);
      }
      factory(init);
    });
  } finally {
    restore();
  }
}

/**
 * Makes the next `WebAssembly.instantiate` call that imports `memory` (zstd-codec's own, made from
 * the WebAssembly bytes embedded in its JavaScript) compile a copy whose memory import allows
 * {@link HEAP_PAGES} pages, since the bytes are not reachable any other way. Other calls pass
 * through untouched, and the original function is put back at the first matching call (or by the
 * returned function, if that call never comes). Later instances reuse the compiled module through
 * Emscripten's `instantiateWasm` hook and do not come here.
 */
function interceptInstantiate(
  memory: WebAssembly.Memory,
  resolve: (module: WebAssembly.Module) => void,
  reject: (error: unknown) => void,
): () => void {
  const original = WebAssembly.instantiate;
  const restore = (): void => {
    if (WebAssembly.instantiate === intercept) WebAssembly.instantiate = original;
  };
  const intercept = function (
    source: BufferSource | WebAssembly.Module,
    imports?: WebAssembly.Imports,
  ): Promise<unknown> {
    if (imports?.env?.memory !== memory || source instanceof WebAssembly.Module) {
      return (original as (...args: unknown[]) => Promise<unknown>).call(WebAssembly, source, imports);
    }
    restore();
    const bytes = ArrayBuffer.isView(source)
      ? new Uint8Array(source.buffer, source.byteOffset, source.byteLength)
      : new Uint8Array(source);
    let module: WebAssembly.Module;
    try {
      module = new WebAssembly.Module(withMemoryPages(bytes, HEAP_PAGES));
    } catch (error) {
      reject(error);
      return Promise.reject(error);
    }
    resolve(module);
    return original(module, imports).then((instance) => ({ module, instance }));
  } as typeof WebAssembly.instantiate;
  WebAssembly.instantiate = intercept;
  return restore;
}

/** Returns a copy of a WebAssembly binary whose imported memory has `pages` as minimum and maximum. */
function withMemoryPages(wasm: Uint8Array, pages: number): Uint8Array<ArrayBuffer> {
  const readVarUint = (at: number): [value: number, next: number] => {
    let value = 0;
    let shift = 0;
    let byte: number;
    do {
      byte = wasm[at++];
      value += (byte & 0x7f) * 2 ** shift;
      shift += 7;
    } while (byte & 0x80);
    return [value, at];
  };
  const varUint = (value: number): number[] => {
    const out: number[] = [];
    do {
      let byte = value & 0x7f;
      value = Math.floor(value / 128);
      if (value) byte |= 0x80;
      out.push(byte);
    } while (value);
    return out;
  };
  let at = 8;
  while (at < wasm.length) {
    const id = wasm[at];
    const [size, body] = readVarUint(at + 1);
    if (id === 2) {
      let [count, p] = readVarUint(body);
      for (; count > 0; count--) {
        let length;
        [length, p] = readVarUint(p);
        p += length;
        [length, p] = readVarUint(p);
        p += length;
        const kind = wasm[p++];
        if (kind === 0) {
          [, p] = readVarUint(p);
        } else if (kind === 1) {
          const flags = wasm[p + 1];
          [, p] = readVarUint(p + 2);
          if (flags & 1) [, p] = readVarUint(p);
        } else if (kind === 3) {
          p += 2;
        } else if (kind === 2) {
          const limitsStart = p;
          const flags = wasm[p];
          [, p] = readVarUint(p + 1);
          if (flags & 1) [, p] = readVarUint(p);
          const newBody = [
            ...wasm.subarray(body, limitsStart),
            1,
            ...varUint(pages),
            ...varUint(pages),
            ...wasm.subarray(p, body + size),
          ];
          const sizeBytes = varUint(newBody.length);
          const rest = wasm.subarray(body + size);
          const out = new Uint8Array(at + 1 + sizeBytes.length + newBody.length + rest.length);
          out.set(wasm.subarray(0, at + 1));
          out.set(sizeBytes, at + 1);
          out.set(newBody, at + 1 + sizeBytes.length);
          out.set(rest, at + 1 + sizeBytes.length + newBody.length);
          return out;
        }
      }
    }
    at = body + size;
  }
  throw new Error("zstd-codec's WebAssembly binary has no memory import to resize");
}

/**
 * The hot path writes frames straight into the vectors' storage, reading the storage address from
 * the `std::vector` object (libc++ keeps `begin` first). Checks that once per instance, so a
 * different build fails loudly instead of corrupting memory.
 */
function checkVectorLayout(wasm: WasmBinding): void {
  const vector = new wasm.VectorU8();
  try {
    vector.resize(4, 0);
    vector.set(3, 0xa5);
    const begin = dataAddress(wasm, vector);
    const words = vector.$$.ptr >>> 2;
    if (
      wasm.HEAPU8[begin + 3] !== 0xa5 || wasm.HEAPU32[words + 1] - begin !== 4 ||
      wasm.HEAPU32[words + 2] - begin < 4
    ) {
      throw new Error("zstd-codec's std::vector layout is not the expected one (begin, end, capacity end)");
    }
  } finally {
    vector.delete();
  }
}

function dataAddress(wasm: WasmBinding, vector: WasmVector): number {
  return wasm.HEAPU32[vector.$$.ptr >>> 2];
}

const POOL_BYTES = 64 * 1024;
const POOLED_MAX_BYTES = 4096;

/**
 * A reusable byte buffer in the WebAssembly heap (a `std::vector<uint8_t>`), which zstd-codec takes
 * as input and output. Reused across calls because allocating embind vectors per frame halves
 * throughput.
 */
class HeapBuffer {
  #wasm: WasmBinding;
  #vector: WasmVector;
  #pool = new Uint8Array(0);
  #poolOffset = 0;

  constructor(wasm: WasmBinding) {
    this.#wasm = wasm;
    this.#vector = new wasm.VectorU8();
  }

  get vector(): WasmVector {
    return this.#vector;
  }

  /** Sets the size to `size` bytes (zero-filling growth); the contents are not kept. */
  resize(size: number): void {
    const wasm = this.#wasm;
    const begin = dataAddress(wasm, this.#vector);
    const capacity = wasm.HEAPU32[(this.#vector.$$.ptr >>> 2) + 2] - begin;
    // std::vector grows to twice its old capacity: from a 32 MiB buffer that is 64 MiB, more than
    // the fixed heap has. A new vector allocates exactly the size asked for.
    if (size > capacity && capacity > 0) this.release();
    this.#vector.resize(size, 0);
  }

  /** Frees the storage (after a rare large frame, so the heap does not stay committed to it). */
  release(): void {
    this.#vector.delete();
    this.#vector = new this.#wasm.VectorU8();
  }

  /** Copies `bytes` in, resizing to their length. */
  fill(bytes: Uint8Array): void {
    this.resize(bytes.byteLength);
    if (bytes.byteLength > 0) this.#wasm.HEAPU8.set(bytes, dataAddress(this.#wasm, this.#vector));
  }

  /**
   * Copies the first `length` bytes out of the heap. Small results are carved from a shared 64 KiB
   * pool, as Node does for small `Buffer`s: allocating a separate `ArrayBuffer` per ~600-byte event
   * costs about 2 µs, more than decompressing it.
   */
  take(length: number): Uint8Array<ArrayBuffer> {
    const start = dataAddress(this.#wasm, this.#vector);
    const bytes = this.#wasm.HEAPU8.subarray(start, start + length);
    if (length > POOLED_MAX_BYTES) return bytes.slice();
    // A detached pool (its buffer transferred by a caller) has length 0 and is replaced here too.
    if (this.#poolOffset + length > this.#pool.length) {
      this.#pool = new Uint8Array(POOL_BYTES);
      this.#poolOffset = 0;
    }
    const out = this.#pool.subarray(this.#poolOffset, this.#poolOffset + length);
    out.set(bytes);
    // 8-byte aligned, so a caller can still view a result as wider typed arrays.
    this.#poolOffset += (length + 7) & ~7;
    return out;
  }
}

// Largest window the error classifier will stream through; Jetstream uses 128 KiB windows and the
// zstd CLI at most 8 MiB at its usual levels. A bigger allocation would exhaust the fixed heap.
const CLASSIFY_MAX_WINDOW = 8 * 1024 * 1024;
// Input slice for the classifier, small so that a decompression bomb overshoots the limit by at
// most ~16 MiB (an RLE block of 4 bytes expands to 128 KiB) before it is stopped.
const CLASSIFY_SLICE = 512;

class WasmDecoder implements ZstdDecoder {
  readonly dictionaryId: number;
  readonly maxDecodedBytes: number;
  #wasm: WasmBinding;
  #codec: WasmCodec;
  #ddict: WasmHandle;
  #src: HeapBuffer;
  #dest: HeapBuffer;
  #maxFrameBytes: number;

  constructor(wasm: WasmBinding, dictionary: Uint8Array, dictionaryId: number, maxDecodedBytes: number) {
    this.dictionaryId = dictionaryId;
    this.maxDecodedBytes = maxDecodedBytes;
    this.#wasm = wasm;
    this.#codec = new wasm.ZstdCodec();
    this.#ddict = wasm.createDecompressionDict(dictionary);
    this.#src = new HeapBuffer(wasm);
    this.#dest = new HeapBuffer(wasm);
    // zstd never expands data by more than a 3-byte block header per 128 KiB block plus the frame
    // header and checksum, so a longer frame cannot decode within the limit.
    this.#maxFrameBytes = maxDecodedBytes + Math.ceil(maxDecodedBytes / 131072) * 3 + 32;
  }

  decode(bytes: Uint8Array): Uint8Array<ArrayBuffer> {
    const frame = afterSkippableFrames(bytes);
    if (typeof frame === "string") throw this.#error("corrupt", `The zstd frame is corrupt: ${frame}`);
    const header = readFrameHeader(frame);
    if (typeof header === "string") throw this.#error("corrupt", `The zstd frame is corrupt: ${header}`);
    const frameId = header.dictionaryId;
    if (frameId !== undefined && frameId !== this.dictionaryId) {
      throw this.#error(
        "dictionary-mismatch",
        `The zstd frame was compressed with dictionary ${frameId}, but the decoder has dictionary ${this.dictionaryId}${
          frameId === LEGACY_DICTIONARY_ID
            ? " (the frame needs the legacy Jetstream dictionary)"
            : this.dictionaryId === LEGACY_DICTIONARY_ID
            ? " (the legacy Jetstream dictionary; the frame needs the server's own dictionary)"
            : ""
        }`,
        frameId,
      );
    }
    if (header.contentSize !== undefined && header.contentSize > this.maxDecodedBytes) {
      throw this.#tooLarge(`its header records ${header.contentSize} decoded bytes, over`, frameId);
    }
    if (frame.byteLength > this.#maxFrameBytes) {
      throw this.#tooLarge(`it is ${frame.byteLength} bytes compressed, so it cannot decode within`, frameId);
    }

    this.#src.fill(frame);
    if (header.contentSize !== undefined) {
      const decoded = this.#decodeInto(header.contentSize, header.contentSize);
      if (decoded) return decoded;
      throw this.#error("corrupt", "The zstd frame is corrupt or truncated: it does not decode", frameId);
    }
    // Without a recorded size, guess generously (JSON events rarely compress beyond 4:1), then
    // four times more each time, up to the whole allowance, before deciding what is wrong: zstd
    // says only that it failed, not whether for room, and each try costs its buffer's size (a frame
    // that decodes to 60 KB took 70 ms when the second try was the whole 32 MiB).
    let decoded: Uint8Array<ArrayBuffer> | undefined;
    for (let capacity = Math.max(16384, frame.byteLength * 8);; capacity *= 4) {
      decoded = this.#decodeInto(Math.min(capacity, this.maxDecodedBytes));
      if (decoded || capacity >= this.maxDecodedBytes) break;
    }
    if (decoded) return decoded;
    // The full-size output vector is not needed any more; give its memory back to the heap.
    this.#dest.release();
    if (header.windowSize <= CLASSIFY_MAX_WINDOW && this.#streamedSizeExceedsLimit(frame)) {
      throw this.#tooLarge("it decodes to more than", frameId);
    }
    throw this.#error(
      "corrupt",
      `The zstd frame is corrupt or truncated: it does not decode within ${this.maxDecodedBytes} bytes`,
      frameId,
    );
  }

  /**
   * One-shot decode into a `capacity`-byte buffer; `undefined` on any zstd error or when the size
   * differs from `expected`.
   */
  #decodeInto(capacity: number, expected?: number): Uint8Array<ArrayBuffer> | undefined {
    // Never a zero-length vector: its data pointer would be null, which zstd refuses as output.
    this.#dest.resize(Math.max(capacity, 1));
    const size = this.#codec.decompressUsingDict(this.#dest.vector, this.#src.vector, this.#ddict);
    if (size < 0 || size > capacity || (expected !== undefined && size !== expected)) return undefined;
    return this.#dest.take(size);
  }

  /**
   * Streams the frame through zstd only to count its output, stopping once it passes the limit.
   * zstd-codec's streaming path is not trusted for content (it does not report truncated input),
   * only for "more than the limit".
   */
  #streamedSizeExceedsLimit(frame: Uint8Array): boolean {
    const stream = new this.#wasm.ZstdDecompressStreamBinding();
    let total = 0;
    const count = (decoded: Uint8Array): void => {
      total += decoded.byteLength;
    };
    try {
      if (!stream.beginUsingDict(this.#ddict)) return false;
      for (let at = 0; at < frame.byteLength && total <= this.maxDecodedBytes; at += CLASSIFY_SLICE) {
        if (!stream.transform(frame.subarray(at, at + CLASSIFY_SLICE), count)) break;
      }
      if (total <= this.maxDecodedBytes) stream.end(count);
      return total > this.maxDecodedBytes;
    } finally {
      stream.delete();
    }
  }

  #tooLarge(why: string, frameId: number | undefined): ZstdDecodeError {
    return this.#error(
      "too-large",
      `The zstd frame is too large: ${why} the limit of ${this.maxDecodedBytes} bytes (maxDecodedBytes)`,
      frameId,
    );
  }

  #error(reason: ZstdDecodeErrorReason, message: string, frameId?: number): ZstdDecodeError {
    return new ZstdDecodeError(reason, message, {
      frameDictionaryId: frameId,
      decoderDictionaryId: this.dictionaryId,
    });
  }
}

// Largest input the encoder accepts: its input, output and workspace must fit the fixed heap.
const MAX_ENCODE_BYTES = DEFAULT_MAX_DECODED_BYTES;

// A raw block holds at most this much (RFC 8878 §3.1.1.2.4: the block maximum size, 128 KiB).
const RAW_BLOCK_BYTES = 128 * 1024;

/**
 * A zstd frame (RFC 8878) holding `bytes` in raw blocks, uncompressed: an 8-byte content size, the
 * dictionary ID, and a 128 KiB window, which a raw block needs at most.
 */
function rawFrame(bytes: Uint8Array, dictionaryId: number): Uint8Array<ArrayBuffer> {
  const blocks = Math.max(1, Math.ceil(bytes.byteLength / RAW_BLOCK_BYTES));
  const out = new Uint8Array(4 + 1 + 1 + 4 + 8 + 3 * blocks + bytes.byteLength);
  const view = new DataView(out.buffer);
  view.setUint32(0, FRAME_MAGIC, true);
  // Frame header descriptor: a content size of 8 bytes (0b11), not a single segment, a 4-byte
  // dictionary ID (0b11), no checksum.
  out[4] = 0b1100_0011;
  // Window descriptor: exponent 7, mantissa 0 (2^(10+7) = 128 KiB).
  out[5] = 7 << 3;
  view.setUint32(6, dictionaryId, true);
  view.setBigUint64(10, BigInt(bytes.byteLength), true);
  let at = 18;
  for (let i = 0; i < blocks; i++) {
    const start = i * RAW_BLOCK_BYTES;
    const size = Math.min(RAW_BLOCK_BYTES, bytes.byteLength - start);
    // Block header, 3 bytes little-endian: last block (1 bit), type 0 = raw (2 bits), size (21 bits).
    const header = (size << 3) | (i === blocks - 1 ? 1 : 0);
    out[at] = header & 0xff;
    out[at + 1] = (header >>> 8) & 0xff;
    out[at + 2] = (header >>> 16) & 0xff;
    out.set(bytes.subarray(start, start + size), at + 3);
    at += 3 + size;
  }
  return out;
}

class WasmEncoder implements ZstdEncoder {
  readonly dictionaryId: number;
  readonly level: number;
  #wasm: WasmBinding;
  #codec: WasmCodec;
  #cdict: WasmHandle;
  #src: HeapBuffer;
  #dest: HeapBuffer;

  constructor(wasm: WasmBinding, dictionary: Uint8Array, dictionaryId: number, level: number) {
    this.dictionaryId = dictionaryId;
    this.level = level;
    this.#wasm = wasm;
    this.#codec = new wasm.ZstdCodec();
    this.#cdict = wasm.createCompressionDict(dictionary, level);
    this.#src = new HeapBuffer(wasm);
    this.#dest = new HeapBuffer(wasm);
  }

  encode(bytes: Uint8Array): Uint8Array<ArrayBuffer> {
    if (bytes.byteLength > MAX_ENCODE_BYTES) return rawFrame(bytes, this.dictionaryId);
    this.#src.fill(bytes);
    this.#dest.resize(this.#codec.compressBound(bytes.byteLength));
    const size = this.#codec.compressUsingDict(this.#dest.vector, this.#src.vector, this.#cdict);
    if (size < 0) throw new Error(`zstd compression failed (code ${size})`);
    return this.#dest.take(size);
  }
}
