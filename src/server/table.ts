/**
 * The events a server plays, with what every connection shares: seq numbers, the history floor,
 * cursor resolution, and each event's frames per wire, made once on first use and cached (so a
 * thousand connections compress an event once).
 *
 * @module
 */
import { show } from "../errors.ts";
import type { CaptureEvent } from "./capture.ts";
import { v2Message, withCursor } from "./v2_frames.ts";
import { CURSOR_SEQ_MAX } from "./v2_options.ts";

/**
 * Which wire a connection speaks: the legacy server's `/subscribe`, the v2 server's `/subscribe`
 * (events carry `cursor`), or the v2 server's `subscribeEvents`.
 *
 * @example
 * ```ts
 * import type { Wire } from "./table.ts";
 * const wire: Wire = "v2";
 * ```
 */
export type Wire = "legacy" | "v1" | "v2";

/**
 * Options of {@linkcode EventTable}.
 *
 * @example
 * ```ts
 * import type { EventTableOptions } from "./table.ts";
 * const options: EventTableOptions = { seqBase: 1000, lookbackFloorSeq: 1500 };
 * ```
 */
export interface EventTableOptions {
  /** Encoder of v1-wire compressed frames. */
  compressor?: (text: string) => Uint8Array;
  /** Encoder of `subscribeEvents` compressed frames. */
  v2Compressor?: (text: string) => Uint8Array;
  /** Event `i` (from 0) has seq `seqBase + 1 + i`. */
  seqBase?: number;
  /** Events before this seq are outside the history window. */
  lookbackFloorSeq?: number;
  /** Events before the first one with `time_us >= historyStartUs` are outside the history window. */
  historyStartUs?: number;
}

/**
 * Where a connection starts, or why it cannot: the result of cursor resolution.
 *
 * @example
 * ```ts
 * import type { StartPlan } from "./table.ts";
 * const plan: StartPlan = { start: 0, minTimeUs: -Infinity };
 * ```
 */
export interface StartPlan {
  /** First index to consider. */
  start: number;
  /**
   * Events with a smaller `time_us` are skipped (a legacy server serving a capture out of order on
   * purpose, `faults.fileOrder`; else -Infinity).
   */
  minTimeUs: number;
  /** An `#info` frame to send first (`subscribeEvents` only). */
  notice?: { name: string; message: string };
  /** A `CursorTooOld` refusal (`subscribeEvents` only). */
  tooOld?: string;
}

/** UTF-8 length of a string without encoding it. */
function utf8Length(text: string): number {
  let bytes = text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) continue;
    if (c < 0x800) bytes += 1;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length) {
      const next = text.charCodeAt(i + 1);
      if (next >= 0xdc00 && next <= 0xdfff) {
        bytes += 2; // four bytes for two UTF-16 units
        i++;
      } else bytes += 2;
    } else bytes += 2;
  }
  return bytes;
}

/**
 * The shared, lazily built per-event data of one server.
 *
 * @example
 * ```ts
 * import { parseCapture } from "@jetfill/jetfill";
 * import { generateCapture } from "@jetfill/jetfill";
 * import { EventTable } from "./table.ts";
 * const table = new EventTable(parseCapture(generateCapture({ count: 10, seed: 1 })), { seqBase: 1000 });
 * console.log(table.seq(0), table.v1Text(0).includes('"cursor":1001')); // 1001 true
 * ```
 */
export class EventTable {
  /**
   * The events, in seq order: in `time_us` order on a legacy server (`serveJetstream()` sorts them
   * for it, unless `faults.fileOrder`), in capture order on a v2 server, whose display times may go
   * backwards.
   */
  readonly events: CaptureEvent[];
  /** Whether `time_us` never decreases, so a cursor can be found by binary search. */
  readonly sorted: boolean;
  /** Event `i` has seq `seqBase + 1 + i`. */
  readonly seqBase: number;
  /** Index of the first event inside the history window. */
  readonly floor: number;
  readonly #compressor: ((text: string) => Uint8Array) | undefined;
  readonly #v2Compressor: ((text: string) => Uint8Array) | undefined;
  readonly #compressed: (Uint8Array | undefined)[] = [];
  readonly #v1Texts: (string | undefined)[] = [];
  readonly #v2Texts: (string | undefined)[] = [];
  readonly #v2Compressed: (Uint8Array | undefined)[] = [];
  #v1Bytes: Int32Array | undefined;
  #v2Bytes: Int32Array | undefined;
  readonly #minTimeUs: number;

  /** Indexes the events; throws `RangeError` for bad seq or history options. */
  constructor(events: CaptureEvent[], options: EventTableOptions = {}) {
    this.events = events;
    this.#compressor = options.compressor;
    this.#v2Compressor = options.v2Compressor;
    let sorted = true;
    let minTimeUs = Infinity;
    for (let i = 0; i < events.length; i++) {
      if (i > 0 && events[i].timeUs < events[i - 1].timeUs) sorted = false;
      if (events[i].timeUs < minTimeUs) minTimeUs = events[i].timeUs;
    }
    this.sorted = sorted;
    this.#minTimeUs = minTimeUs;
    const { seqBase = 1000, lookbackFloorSeq, historyStartUs } = options;
    if (!Number.isSafeInteger(seqBase) || seqBase < 0 || seqBase + events.length >= CURSOR_SEQ_MAX) {
      throw new RangeError(
        `Cannot serve as 'seqBase' must be a non-negative integer keeping seqs below 1e15: current value is ${
          show(seqBase)
        }`,
      );
    }
    this.seqBase = seqBase;
    let floor = 0;
    if (historyStartUs !== undefined) {
      if (!Number.isSafeInteger(historyStartUs)) {
        throw new RangeError(
          `Cannot serve as 'historyStartUs' must be an integer of microseconds: current value is ${
            show(historyStartUs)
          }`,
        );
      }
      floor = this.firstAtOrAfter(historyStartUs);
    }
    if (lookbackFloorSeq !== undefined) {
      if (!Number.isSafeInteger(lookbackFloorSeq) || lookbackFloorSeq < 1) {
        throw new RangeError(
          `Cannot serve as 'lookbackFloorSeq' must be a positive integer: current value is ${
            show(lookbackFloorSeq)
          }`,
        );
      }
      floor = Math.max(floor, Math.min(events.length, Math.max(0, lookbackFloorSeq - seqBase - 1)));
    }
    this.floor = floor;
  }

  /** Whether v1-wire compression is available. */
  get canCompress(): boolean {
    return this.#compressor !== undefined;
  }

  /** The seq of event `index`. */
  seq(index: number): number {
    return this.seqBase + 1 + index;
  }

  /** The seq of the first event inside the history window (the lookback floor). */
  get floorSeq(): number {
    return this.seq(this.floor);
  }

  /** The seq the next event would get: cursors at or above it mean live. */
  get nextSeq(): number {
    return this.seq(this.events.length);
  }

  /**
   * First index whose `time_us >= cursor`: by binary search when sorted, else by scanning, as a v2
   * host translates a time to the first seq at or after it.
   */
  firstAtOrAfter(timeUs: number): number {
    const events = this.events;
    if (!this.sorted) {
      const index = events.findIndex((event) => event.timeUs >= timeUs);
      return index === -1 ? events.length : index;
    }
    let lo = 0;
    let hi = events.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (events[mid].timeUs < timeUs) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /**
   * Resolves a legacy-server `/subscribe` cursor (unix µs, inclusive): none → the floor ("live"
   * from the start of the history window), in the future → nothing, else the first event at or
   * after it, never before the floor; on a table out of `time_us` order (`faults.fileOrder`), the
   * floor, skipping the events before the cursor in time. The legacy store compares its keys,
   * `time_us` in decimal, as strings (protocol doc §1.1): a shorter cursor (seconds, milliseconds)
   * acts as a prefix, that is, as if padded with zeros to the keys' 16 digits.
   */
  resolveLegacy(cursor: number | undefined, nowUs: number): StartPlan {
    if (cursor === undefined) return { start: this.floor, minTimeUs: -Infinity };
    if (cursor > nowUs) return { start: this.events.length, minTimeUs: -Infinity };
    const bound = cursor > 0 && cursor < 1e15 ? cursor * 10 ** (16 - String(cursor).length) : cursor;
    if (!this.sorted) return { start: this.floor, minTimeUs: bound };
    return { start: Math.max(this.floor, this.firstAtOrAfter(bound)), minTimeUs: -Infinity };
  }

  /**
   * Resolves a v2-server cursor (protocol doc §1.2, §1.3): below 1e15 a seq (0 means seq 1), else
   * unix µs. A seq below the floor is clamped on `/subscribe` and refused (`tooOld`) on
   * `subscribeEvents`; a time before the floor or before the capture is clamped, announced on
   * `subscribeEvents` by an `OutdatedCursor` notice; a future seq means live (§1.3: no notice).
   * `earlyReplayUs` reproduces
   * bluesky-social/jetstream#343: a time cursor starts that much earlier, silently.
   */
  resolveV2(cursor: number | undefined, wire: "v1" | "v2", nowUs: number, earlyReplayUs: number): StartPlan {
    const end = this.events.length;
    const plan: StartPlan = { start: this.floor, minTimeUs: -Infinity };
    if (cursor === undefined) return plan;
    if (cursor < CURSOR_SEQ_MAX) {
      const seq = Math.max(cursor, 1);
      if (seq >= this.nextSeq) {
        plan.start = end;
      } else if (seq < this.floorSeq) {
        if (wire === "v2") {
          plan.tooOld = `cursor ${cursor} is older than the oldest available seq ${this.floorSeq}`;
        }
      } else {
        plan.start = seq - this.seqBase - 1;
      }
      return plan;
    }
    if (cursor > nowUs) {
      plan.start = end;
      return plan;
    }
    const asked = this.firstAtOrAfter(cursor);
    const start = earlyReplayUs > 0 ? this.firstAtOrAfter(cursor - earlyReplayUs) : asked;
    plan.start = Math.max(this.floor, start);
    if (wire === "v2" && plan.start < end) {
      if (asked < this.floor) {
        plan.notice = {
          name: "OutdatedCursor",
          message: `requested timestamp cursor below retention floor; starting at seq ${
            this.seq(plan.start)
          }`,
        };
      } else if (cursor < this.#minTimeUs) {
        plan.notice = {
          name: "OutdatedCursor",
          message: `requested timestamp cursor precedes the oldest archived event; starting at seq ${
            this.seq(plan.start)
          }`,
        };
      }
    }
    return plan;
  }

  /** The v1-wire text of an event: as captured on a legacy server, with `cursor` on a v2 server. */
  v1Text(index: number): string {
    let text = this.#v1Texts[index];
    if (text === undefined) {
      text = withCursor(this.events[index].text, this.seq(index));
      this.#v1Texts[index] = text;
    }
    return text;
  }

  /** The `subscribeEvents` message frame of an event. */
  v2Text(index: number): string {
    let text = this.#v2Texts[index];
    if (text === undefined) {
      text = v2Message(this.events[index].text, this.seq(index));
      this.#v2Texts[index] = text;
    }
    return text;
  }

  /** UTF-8 length of an event's uncompressed frame on a v2-server wire. */
  byteLength(wire: "v1" | "v2", index: number): number {
    const lengths = wire === "v1"
      ? (this.#v1Bytes ??= new Int32Array(this.events.length))
      : (this.#v2Bytes ??= new Int32Array(this.events.length));
    let length = lengths[index];
    if (length === 0) {
      length = utf8Length(wire === "v1" ? this.v1Text(index) : this.v2Text(index));
      lengths[index] = length;
    }
    return length;
  }

  /** The compressed v1-wire frame of an event (legacy: the captured line; v2 server: with `cursor`). */
  compressed(index: number, wire: "legacy" | "v1"): Uint8Array {
    let frame = this.#compressed[index];
    if (frame === undefined) {
      frame = this.#compressor!(wire === "legacy" ? this.events[index].text : this.v1Text(index));
      this.#compressed[index] = frame;
    }
    return frame;
  }

  /** The compressed `subscribeEvents` frame of an event. */
  v2Compressed(index: number): Uint8Array {
    let frame = this.#v2Compressed[index];
    if (frame === undefined) {
      frame = this.#v2Compressor!(this.v2Text(index));
      this.#v2Compressed[index] = frame;
    }
    return frame;
  }

  /** Compresses a one-off frame (info, error, garbage) for a wire, uncached. */
  compressText(text: string, wire: Wire): Uint8Array {
    return wire === "v2" ? this.#v2Compressor!(text) : this.#compressor!(text);
  }
}
