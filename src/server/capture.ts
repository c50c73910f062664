/**
 * Reading capture files: NDJSON, one legacy-wire Jetstream event per line, as recorded from a real
 * `/subscribe` socket or made by `generateCapture()`; and putting them in `time_us` order for the
 * legacy server, since a capture joined from several files may not be.
 *
 * @module
 */
import { concat } from "../bytes.ts";

/**
 * One captured event: the exact line, to be sent byte for byte, plus the few fields the server
 * filters on, extracted once so that serving never parses JSON.
 *
 * @example
 * ```ts
 * import type { CaptureEvent } from "./capture.ts";
 * const event: CaptureEvent = {
 *   text: '{"did":"did:plc:abc","time_us":1,"kind":"commit","commit":{"collection":"app.bsky.feed.like"}}',
 *   timeUs: 1,
 *   did: "did:plc:abc",
 *   kind: "commit",
 *   collection: "app.bsky.feed.like",
 * };
 * ```
 */
export interface CaptureEvent {
  /** The exact captured line, without its newline. */
  text: string;
  /** `time_us` of the event, unix microseconds. */
  timeUs: number;
  /** The repository DID. */
  did: string;
  /** `commit`, `identity` or `account` (other kinds are kept and served as they are). */
  kind: string;
  /** `commit.collection` of commit events; absent for other kinds. */
  collection?: string;
}

function describe(value: unknown): string {
  if (value === undefined) return "missing";
  return `${JSON.stringify(value)} (${value === null ? "null" : typeof value})`;
}

/** Parses one line, or throws a message without location (the caller adds it). */
function parseLine(line: string): CaptureEvent {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch (err) {
    throw new Error(`invalid JSON: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Error(`expected a JSON object, got ${Array.isArray(value) ? "an array" : describe(value)}`);
  }
  const event = value as Record<string, unknown>;
  const timeUs = event.time_us;
  if (typeof timeUs !== "number" || !Number.isSafeInteger(timeUs)) {
    throw new Error(`'time_us' must be an integer of microseconds: got ${describe(timeUs)}`);
  }
  if (typeof event.did !== "string" || event.did === "") {
    throw new Error(`'did' must be a non-empty string: got ${describe(event.did)}`);
  }
  if (typeof event.kind !== "string") {
    throw new Error(`'kind' must be a string: got ${describe(event.kind)}`);
  }
  const parsed: CaptureEvent = { text: line, timeUs, did: event.did, kind: event.kind };
  if (event.kind === "commit") {
    const commit = event.commit;
    if (typeof commit !== "object" || commit === null) {
      throw new Error(`a commit event needs a 'commit' object: got ${describe(commit)}`);
    }
    const collection = (commit as Record<string, unknown>).collection;
    if (collection !== undefined && typeof collection !== "string") {
      throw new Error(`'commit.collection' must be a string: got ${describe(collection)}`);
    }
    if (collection !== undefined) parsed.collection = collection;
  }
  return parsed;
}

/**
 * Parses capture lines into events, in the given order: nothing is sorted here, as the two servers
 * order a capture differently (see {@linkcode inTimeOrder}). Blank lines are skipped; a malformed line
 * throws an `Error` naming the source, the 1-based line number and the problem.
 *
 * @param lines The lines, without newlines (a trailing `\r` is tolerated).
 * @param source What to call the input in error messages, usually the file path.
 *
 * @example
 * ```ts
 * import { parseCapture } from "@jetfill/jetfill";
 * const events = parseCapture([
 *   '{"did":"did:plc:abc","time_us":1725911162329308,"kind":"identity","identity":{"did":"did:plc:abc","seq":1,"time":"2024-09-09T19:46:02.102Z"}}',
 * ]);
 * console.log(events[0].timeUs); // 1725911162329308
 * ```
 */
export function parseCapture(lines: string[], source = "capture"): CaptureEvent[] {
  const events: CaptureEvent[] = [];
  for (let i = 0; i < lines.length; i++) {
    let line = lines[i];
    if (line.endsWith("\r")) line = line.slice(0, -1);
    if (line.trim() === "") continue;
    try {
      events.push(parseLine(line));
    } catch (err) {
      throw new Error(`${source}:${i + 1}: ${(err as Error).message}`);
    }
  }
  return events;
}

/**
 * Reads a capture file (NDJSON) and parses it with {@linkcode parseCapture}, in file order. The file
 * is streamed, so captures larger than the biggest JavaScript string (about 512 MB) load fine.
 *
 * Each line is decoded on its own: a line of ASCII becomes a one-byte string of its own, which the
 * server encodes into frames about 2.5 times faster than a slice of a larger decoded chunk (a chunk
 * holding a single non-Latin-1 character decodes to a two-byte string, and so do all its slices), and
 * which takes half the memory.
 *
 * @example
 * ```ts
 * import { loadCapture } from "@jetfill/jetfill";
 * const events = await loadCapture("capture.ndjson");
 * console.log(`${events.length} events`);
 * ```
 */
export async function loadCapture(path: string): Promise<CaptureEvent[]> {
  const events: CaptureEvent[] = [];
  let lineNo = 0;
  const decoder = new TextDecoder();
  const take = (bytes: Uint8Array): void => {
    lineNo++;
    // parseCapture with a one-line array would misnumber lines; do the same work here.
    let end = bytes.length;
    if (end > 0 && bytes[end - 1] === 13) end--; // a trailing \r
    const line = decoder.decode(bytes.subarray(0, end));
    if (line.trim() === "") return;
    try {
      events.push(parseLine(line));
    } catch (err) {
      throw new Error(`${path}:${lineNo}: ${(err as Error).message}`);
    }
  };
  // Plain reads into one reused buffer. A line cut by the end of a read waits in `rest`, in pieces
  // joined once its end arrives (a line longer than many reads is copied once, not once a read).
  using file = await Deno.open(path, { read: true });
  const buf = new Uint8Array(1 << 20);
  const rest: Uint8Array[] = [];
  const joinRest = (last: Uint8Array): Uint8Array => {
    rest.push(last);
    const joined = concat(rest);
    rest.length = 0;
    return joined;
  };
  for (;;) {
    const n = await file.read(buf);
    if (n === null) break;
    const chunk = buf.subarray(0, n);
    let start = 0;
    for (let end = chunk.indexOf(10); end !== -1; end = chunk.indexOf(10, start)) {
      take(rest.length > 0 ? joinRest(chunk.subarray(0, end)) : chunk.subarray(start, end));
      start = end + 1;
    }
    // Copied: the buffer is read into again.
    if (start < n) rest.push(chunk.slice(start));
  }
  if (rest.length > 0) take(joinRest(new Uint8Array()));
  return events;
}

/**
 * How many events have a `time_us` earlier than some event before them: 0 when the events are in
 * time order. Equal `time_us` values count as in order. Two exports concatenated the wrong way
 * round count every event of the earlier one; two instances' captures joined count the second's
 * events that overlap the first.
 *
 * @example
 * ```ts
 * import { countOutOfOrder, parseCapture } from "./capture.ts";
 * const events = parseCapture([3, 1, 2, 4].map((t) => `{"did":"did:plc:abc","time_us":${t},"kind":"identity"}`));
 * console.log(countOutOfOrder(events)); // 2
 * ```
 */
export function countOutOfOrder(events: readonly CaptureEvent[]): number {
  let count = 0;
  let latest = -Infinity;
  for (let i = 0; i < events.length; i++) {
    const timeUs = events[i].timeUs;
    if (timeUs < latest) count++;
    else latest = timeUs;
  }
  return count;
}

/**
 * The events in `time_us` order, as a legacy server replays them (its store is keyed by `time_us`,
 * protocol doc §5.1): `events` itself when they already are, which costs one pass over them, else a
 * sorted copy. The sort is stable, so events with equal `time_us` (which one real instance never
 * gives, two joined captures may) keep their capture order, where the legacy store would order them
 * by its keys' next part, the DID (`{time_us}_{did}…`): the capture's order is the one its maker
 * can see and choose.
 *
 * A v2 server does not sort: its order is that of its seqs, and its `time_us` is a display time that
 * may go backwards (protocol doc §3.2), so it serves a capture in capture order.
 *
 * @example
 * ```ts
 * import { inTimeOrder, parseCapture } from "./capture.ts";
 * const events = parseCapture([3, 1, 2].map((t) => `{"did":"did:plc:abc","time_us":${t},"kind":"identity"}`));
 * console.log(inTimeOrder(events).map((event) => event.timeUs)); // [1, 2, 3]
 * ```
 */
export function inTimeOrder(events: CaptureEvent[]): CaptureEvent[] {
  if (countOutOfOrder(events) === 0) return events;
  // Array.prototype.sort is stable (ES2019), and V8's TimSort merges the sorted runs of a capture
  // joined from a few sorted pieces rather than sorting it from scratch.
  return events.slice().sort((a, b) => a.timeUs - b.timeUs);
}
