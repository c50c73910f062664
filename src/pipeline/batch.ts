/**
 * Packs selected events into queue messages: at most `batchSize` records a message, and never more
 * than Deno KV's 64 KiB a message, measured by an upper bound on the serialized size.
 *
 * @module
 */
import { describeEvent, type JetstreamEvent } from "../jetstream/events.ts";
import { compressEvent } from "../queue/message.ts";
import {
  KV_VALUE_LIMIT,
  MAX_RECORD_DEPTH,
  nestedTooDeep,
  openingsOfLastBound,
  serializedSizeBound,
} from "../queue/size.ts";
import type { TailKeys } from "../queue/kv_queue.ts";
import { eventFromV2Text } from "../jetstream/v2.ts";

/** The most content keys of records at one `time_us` that a checkpoint keeps. */
export const MAX_TAIL_KEYS = 256;

/** A packed message with what it counts for. */
export interface PackedMessage {
  /** The events, as received. */
  records: JetstreamEvent[];
  /**
   * The JSON text of each record. Once a message is serialized into its commit, the writer keeps
   * these, not the records: strings cost the garbage collector far less than parsed events, and a
   * commit refused for size is rebuilt from them.
   */
  texts: string[];
  /**
   * Set when `texts` are not the records' own JSON but the v2 frames they were mapped from: it makes
   * a record again from its frame's text (the stored JSON is then `JSON.stringify` of that record).
   */
  fromText?: (text: string) => JetstreamEvent;
  /** Gzip of an event too large to travel as a record. */
  compressed?: Uint8Array[];
  /**
   * The content keys (see `ReplayGuard`) of its events, in order, as (b, a) pairs, when they were
   * noted: the writer keeps the last ones in the queue, so that a resume knows what is stored.
   */
  keys: number[];
  /** Upper bound on the serialized size of the whole message. */
  size: number;
  /** Number of events. */
  count: number;
  /** `time_us` of the last event. */
  cursor: number;
  /**
   * The highest `time_us` of its events (-1 for none): after an operator's import on a v2 host, the
   * last event's display time can be years older (protocol doc §3.2).
   */
  maxUs: number;
  /**
   * The highest `time_us` processed on `host` up to its last event (see Batcher.seenUs), or -1: a
   * time of that instance, where another's (before a failover) run ahead or behind.
   */
  hostMaxUs?: number;
  /** The v2 server's sequence number (`cursor` field) of the last event that had one. */
  seq?: number;
  /** The instance that issued `seq` (sequence numbers are only meaningful there). */
  seqHost?: string;
  /** The instance the last event came from. */
  host?: string;
  /**
   * The start by the clock of `host`, where a search lined its stream up (see
   * `Session.linedStartUs`); undefined: the run's start.
   */
  hostStartUs?: number;
  /** Events per UTC day. */
  days: Map<string, number>;
  /** Collections of the commit events. */
  collections: Set<string>;
  /**
   * On the last message of a batch: the content keys of the records added at `cursor`, in this
   * batch and the ones before it, for the checkpoint.
   */
  tail?: TailKeys;
}

/** A batch: `batchSize` records (fewer for the last one), as consecutive messages. */
export interface Batch {
  /** The messages, in order. */
  messages: PackedMessage[];
  /** Number of records. */
  records: number;
}

/** An event that is too large for a queue message even when gzipped. */
export class OversizedEventError extends Error {
  /** Creates the error for `event`, `bytes` long once gzipped. */
  constructor(event: JetstreamEvent, bytes: number, limit: number) {
    super(
      `${
        describeEvent(event)
      } is ${bytes} bytes after gzip, more than the ${limit} bytes a Deno KV queue message can hold; skipped`,
    );
    this.name = "OversizedEventError";
  }
}

/**
 * Accumulates events into batches of messages.
 *
 * @example
 * ```ts
 * import { Batcher } from "./batch.ts";
 * const b = new Batcher("jetstream_sync", 100);
 * const text = '{"did":"did:plc:aaaaaaaaaaaaaaaaaaaaaaaa","time_us":1725911162329308,"kind":"commit"}';
 * b.add(JSON.parse(text), text, "2024-09-09", undefined); // false: the batch is not full yet
 * b.take()?.records; // 1
 * ```
 */
export class Batcher {
  readonly #batchSize: number;
  readonly #budget: number;
  readonly #overhead: number;
  #messages: PackedMessage[] = [];
  #current: PackedMessage | undefined;
  #records = 0;
  /** The instance events are coming from now, recorded with their sequence numbers. */
  host: string | undefined;
  /** The start by the clock of {@link host}, where a search moved it (see PackedMessage.hostStartUs). */
  hostStartUs: number | undefined;
  /**
   * The highest `time_us` processed on {@link host}'s connection so far, records recognised and
   * events not selected too (set before each record is added; -1: none).
   */
  seenUs = -1;
  /** `performance.now()` when the batch being built got its first record. */
  startedAt = 0;
  #tailUs = -1;
  /** Content keys, as (b, a) pairs, of the records added at `#tailUs` (no allocation per record). */
  readonly #tailKeys = new Int32Array(2 * MAX_TAIL_KEYS);
  #tailLength = 0;
  /** More records at `#tailUs` than MAX_TAIL_KEYS. */
  #tailOverflow = false;

  /** A batcher for `queue` with `batchSize` records a batch. */
  constructor(queue: string, batchSize: number, messageLimit = KV_VALUE_LIMIT) {
    this.#batchSize = batchSize;
    // Room for the envelope { v, queue, seq, cursor, records } and KV's own framing.
    this.#overhead = 96 + 2 * queue.length;
    this.#budget = messageLimit - 512;
  }

  /** Records in the batch being built. */
  get records(): number {
    return this.#records;
  }

  /** The largest size bound (see `serializedSizeBound`) of a record that travels in a message. */
  get recordRoom(): number {
    return this.#budget - this.#overhead;
  }

  /**
   * Whether a record of size bound `size` and JSON `text` (just measured: see openingsOfLastBound)
   * must travel alone, gzipped: too large for a message, or nested too deep for KV to read back.
   */
  #alone(size: number, text: string): boolean {
    return size > this.recordRoom || (openingsOfLastBound() > MAX_RECORD_DEPTH && nestedTooDeep(text));
  }

  #fresh(): PackedMessage {
    return {
      records: [],
      texts: [],
      keys: [],
      size: this.#overhead,
      count: 0,
      cursor: 0,
      maxUs: -1,
      days: new Map(),
      collections: new Set(),
    };
  }

  #note(m: PackedMessage, event: JetstreamEvent, day: string, collection: string | undefined): void {
    m.count++;
    m.cursor = event.time_us;
    if (event.time_us > m.maxUs) m.maxUs = event.time_us;
    // (Of the instance the last event came from: another's time_us run ahead or behind.)
    if (m.host !== this.host || m.hostMaxUs === undefined) m.hostMaxUs = -1;
    m.hostMaxUs = Math.max(m.hostMaxUs, event.time_us, this.seenUs);
    m.host = this.host;
    m.hostStartUs = this.hostStartUs;
    // The seq of the message's last record, so that it goes with the cursor (its time_us): none
    // when that record has none (a legacy host's, after a v2 host's).
    if (typeof event.cursor === "number") {
      m.seq = event.cursor;
      m.seqHost = this.host;
    } else {
      m.seq = undefined;
      m.seqHost = undefined;
    }
    m.days.set(day, (m.days.get(day) ?? 0) + 1);
    if (collection !== undefined) m.collections.add(collection);
  }

  /**
   * Adds an event with its JSON text (for sizing), UTC day and collection, and the text's UTF-8
   * length when known (it makes sizing cheaper). Returns true when the batch is full and should be
   * taken.
   *
   * An event mapped from a v2 frame comes with the frame's text instead, and `shorterBy`, how many
   * characters at least its own JSON is shorter (see `mapV2Frame`): it is sized from the frame, and
   * its JSON is written out only when that size is too large or the frame nests too deep for it to
   * travel as a record.
   */
  add(
    event: JetstreamEvent,
    text: string,
    day: string,
    collection: string | undefined,
    utf8Bytes?: number,
    shorterBy?: number,
  ): boolean {
    if (this.#records === 0) this.startedAt = performance.now();
    let size = serializedSizeBound(text, utf8Bytes, shorterBy);
    let alone = this.#alone(size, text);
    let framed = shorterBy !== undefined;
    if (alone && framed) {
      // Judged from a frame, which is larger and may nest deeper: judged again by its own JSON.
      text = JSON.stringify(event);
      framed = false;
      size = serializedSizeBound(text);
      alone = this.#alone(size, text);
    }
    if (alone) {
      // Too large to travel as a record, or nested too deep for KV to read back: it goes alone,
      // gzipped.
      if (this.#current) this.#messages.push(this.#current);
      this.#current = undefined;
      const gz = compressEvent(text);
      const m = this.#fresh();
      m.compressed = [gz];
      m.size += gz.length + 16;
      if (m.size > this.#budget) {
        throw new OversizedEventError(event, gz.length, this.recordRoom);
      }
      this.#note(m, event, day, collection);
      this.#messages.push(m);
    } else {
      const fromText = framed ? eventFromV2Text : undefined;
      let m = this.#current;
      // A message keeps texts of one kind: a failover between the wires starts another.
      if (m && (m.size + size > this.#budget || m.fromText !== fromText)) {
        this.#messages.push(m);
        m = undefined;
      }
      if (!m) {
        m = this.#current = this.#fresh();
        if (fromText) m.fromText = fromText;
      }
      m.records.push(event);
      m.texts.push(text);
      m.size += size;
      this.#note(m, event, day, collection);
    }
    return ++this.#records >= this.#batchSize;
  }

  /**
   * Notes the content key (see `ReplayGuard`) of the record just added, at `timeUs`: it goes with
   * its message to the writer, and the keys of the records at the last `time_us` go with the batch
   * into the checkpoint.
   */
  noteKey(timeUs: number, b: number, a: number): void {
    (this.#current ?? this.#messages.at(-1))?.keys.push(b, a);
    if (timeUs !== this.#tailUs) {
      this.#tailUs = timeUs;
      this.#tailLength = 0;
      this.#tailOverflow = false;
    }
    const n = this.#tailLength;
    if (n === this.#tailKeys.length) {
      this.#tailOverflow = true;
      return;
    }
    this.#tailKeys[n] = b;
    this.#tailKeys[n + 1] = a;
    this.#tailLength = n + 2;
  }

  /** Takes the batch built so far, or undefined when it is empty. */
  take(): Batch | undefined {
    if (this.#current) this.#messages.push(this.#current);
    this.#current = undefined;
    if (this.#records === 0) return undefined;
    const last = this.#messages.at(-1)!;
    if (last.cursor === this.#tailUs) {
      last.tail = {
        us: this.#tailUs,
        keys: this.#tailOverflow ? null : Array.from(this.#tailKeys.subarray(0, this.#tailLength)),
      };
    }
    const batch = { messages: this.#messages, records: this.#records };
    this.#messages = [];
    this.#records = 0;
    return batch;
  }
}
