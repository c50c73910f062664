/**
 * The queue's public contract: the shape of each message jetfill enqueues, and how to read it back.
 *
 * @module
 */
import { gunzipSync, gzipSync } from "node:zlib";
import type { JetstreamEvent } from "../jetstream/events.ts";

/**
 * One message of a jetfill queue, as enqueued in Deno KV.
 *
 * `records` are Jetstream events exactly as received (parsed JSON). An event too large to fit in a
 * message on its own, or nested deeper than Deno KV can read back (over 256 levels of objects and
 * arrays), travels alone under `compressed`, as the gzip of its UTF-8 JSON; use
 * {@link decodeQueueMessage} to get every event whatever the form.
 *
 * @example
 * ```ts
 * import { decodeQueueMessage, isQueueMessage, type QueueMessage } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * await kv.listenQueue((value: unknown) => {
 *   if (!isQueueMessage(value)) return; // another program's message
 *   const m: QueueMessage = value;
 *   console.log(`message ${m.seq} of '${m.queue}':`, decodeQueueMessage(m).length, "events");
 * });
 * ```
 */
export interface QueueMessage {
  /** Format version. */
  v: 1;
  /** The queue's name. */
  queue: string;
  /** Position of this message in its queue, counting from 1, never reused. */
  seq: number;
  /** `time_us` of the message's last record. */
  cursor: number;
  /** The events, as received. */
  records: JetstreamEvent[];
  /** Events too large for a message (or nested too deep), each the gzip of its UTF-8 JSON. */
  compressed?: Uint8Array[];
}

/**
 * Whether `value` has the shape of a {@link QueueMessage}: `v` 1, a `queue` name, a `seq` counted
 * from 1, a numeric `cursor`, a `records` array and, if any, `compressed` entries that are bytes.
 *
 * @example
 * ```ts
 * import { isQueueMessage } from "@jetfill/jetfill";
 * isQueueMessage({ v: 1, queue: "q", seq: 1, cursor: 1, records: [] }); // true
 * ```
 */
export function isQueueMessage(value: unknown): value is QueueMessage {
  if (typeof value !== "object" || value === null) return false;
  const m = value as Record<string, unknown>;
  return m.v === 1 && typeof m.queue === "string" && Number.isSafeInteger(m.seq) && (m.seq as number) >= 1 &&
    typeof m.cursor === "number" && Array.isArray(m.records) &&
    (m.compressed === undefined || Array.isArray(m.compressed) && m.compressed.every(isBytes));
}

function isBytes(value: unknown): boolean {
  return value instanceof Uint8Array;
}

/**
 * A copy of a queue message that Deno KV handed over (a delivery, or a read), to be written again:
 * V8 reads every array back as one that may have holes and writes such an array element by element
 * with its index, so the message as it came can be half as large again as when it was stored (an
 * array of small numbers: from 2 bytes an element to 6) and over KV's 64 KiB limit though it was
 * stored under it. The copy's arrays are built anew, as `JSON.parse` builds them, and serialize to
 * the size stored. Its `compressed` entries are the same `Uint8Array`s; any other value is returned
 * as it is.
 *
 * @example
 * ```ts
 * import { repackMessage } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * // A message that an application of its own kept aside under a key of its own, back into the queue:
 * const kept = await kv.get(["my-app", "kept", 1]);
 * if (kept.value !== null) await kv.enqueue(repackMessage(kept.value));
 * ```
 */
export function repackMessage<T>(value: T): T {
  if (!isQueueMessage(value)) return value;
  const m = { ...value, records: rebuilt(value.records) as JetstreamEvent[] };
  if (value.compressed) m.compressed = rebuilt(value.compressed) as Uint8Array[];
  return m as T;
}

/** `value` with its arrays and plain objects built anew, recursively (JSON values only). */
function rebuilt(value: unknown): unknown {
  if (typeof value !== "object" || value === null) return value;
  if (Array.isArray(value)) {
    const out: unknown[] = [];
    for (let i = 0; i < value.length; i++) out.push(rebuilt(value[i]));
    return out;
  }
  if (Object.getPrototypeOf(value) !== Object.prototype) return value;
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(value)) {
    const v = rebuilt((value as Record<string, unknown>)[key]);
    // A "__proto__" key of the JSON is an own property, as JSON.parse makes it, not the prototype.
    if (key === "__proto__") {
      Object.defineProperty(out, key, { value: v, enumerable: true, writable: true, configurable: true });
    } else out[key] = v;
  }
  return out;
}

/**
 * Every event of a queue message, in order, with `compressed` events unpacked.
 * Throws a `TypeError` for a value that is not a jetfill message (naming the field that is not as
 * expected), one whose records are not all JSON objects, or one with a `compressed` entry that is
 * not the gzip of an event's JSON (naming the message's seq and the entry).
 *
 * @example
 * ```ts
 * import { decodeQueueMessage } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * // Takes the messages as they come, until Ctrl-C (kv.close() ends the listener).
 * Deno.addSignalListener("SIGINT", () => kv.close());
 * await kv.listenQueue((msg) => {
 *   for (const event of decodeQueueMessage(msg)) console.log(event.did, event.time_us);
 * });
 * ```
 */
export function decodeQueueMessage(message: unknown): JetstreamEvent[] {
  if (!isQueueMessage(message)) {
    throw new TypeError(`Cannot decode queue message: ${shapeProblem(message)}`);
  }
  const where = `queue message ${message.seq} of queue '${message.queue}'`;
  const bad = message.records.findIndex(notAnObject);
  if (bad !== -1) {
    throw new TypeError(
      `Cannot decode ${where}: records[${bad}] is ${
        describe(message.records[bad])
      }, expected an event (an object)`,
    );
  }
  if (!message.compressed || message.compressed.length === 0) return message.records;
  const out = message.records.slice();
  for (let i = 0; i < message.compressed.length; i++) {
    const entry: unknown = message.compressed[i];
    let event: unknown;
    try {
      event = JSON.parse(TEXT.decode(gunzipSync(message.compressed[i])));
      if (notAnObject(event)) throw new Error(`it holds ${describe(event)}, not an object`);
    } catch (err) {
      const what = entry instanceof Uint8Array ? `${entry.byteLength} bytes` : describe(entry);
      throw new TypeError(
        `Cannot decode ${where}: compressed[${i}] (${what}) is not the gzip of an event's JSON: ${
          (err as Error).message
        }`,
        { cause: err },
      );
    }
    out.push(event as JetstreamEvent);
  }
  return out;
}

function notAnObject(value: unknown): boolean {
  return typeof value !== "object" || value === null || Array.isArray(value);
}

/** What makes `value` no jetfill message, field by field as {@link isQueueMessage} checks them. */
function shapeProblem(value: unknown): string {
  const expected = "expected { v: 1, queue, seq, cursor, records }";
  if (typeof value !== "object" || value === null) return `${expected}, got ${describe(value)}`;
  const m = value as Record<string, unknown>;
  const field = (name: string, want: string) =>
    `${expected}: '${name}' is ${describe(m[name])}, expected ${want}`;
  if (m.v !== 1) return field("v", "1");
  if (typeof m.queue !== "string") return field("queue", "a string");
  if (!Number.isSafeInteger(m.seq) || (m.seq as number) < 1) return field("seq", "a whole number from 1");
  if (typeof m.cursor !== "number") return field("cursor", "a number");
  if (!Array.isArray(m.records)) return field("records", "an array");
  if (!Array.isArray(m.compressed)) return field("compressed", "an array, or nothing");
  const at = m.compressed.findIndex((e) => !isBytes(e));
  return `${expected}: 'compressed[${at}]' is ${describe(m.compressed[at])}, expected bytes (a Uint8Array)`;
}

/** A value, shortly, for an error message: strings quoted, objects by their first keys. */
function describe(value: unknown): string {
  if (value === undefined) return "missing";
  if (typeof value === "string") {
    return value.length > 40
      ? `${JSON.stringify(value.slice(0, 40))}… (a string)`
      : `${JSON.stringify(value)} (a string)`;
  }
  if (typeof value !== "object" || value === null) return String(value);
  if (Array.isArray(value)) return `an array of ${value.length}`;
  if (value instanceof Uint8Array) return `${value.byteLength} bytes`;
  const keys = Object.keys(value);
  const shown = keys.slice(0, 8).join(", ");
  return keys.length === 0
    ? "an object without keys"
    : `an object with keys ${shown}${keys.length > 8 ? `, … (${keys.length} in all)` : ""}`;
}

const TEXT = new TextDecoder();
const UTF8 = new TextEncoder();

/** Gzip of an event's UTF-8 JSON text, as stored under `compressed`. */
export function compressEvent(text: string): Uint8Array {
  return new Uint8Array(gzipSync(UTF8.encode(text), { level: 9 }));
}
