/**
 * Frames of the v2 Jetstream server (protocol doc §3.2, §3.3): v1-wire events with the `cursor`
 * (seq) field, and the `xrpc.v1.json` message, info and error frames of `subscribeEvents`. Each is
 * built from the captured line by splicing raw JSON, so records keep every byte as captured.
 *
 * @module
 */
import { type GarbageKind, oversizedPostText } from "./faults.ts";
import { objectMembers } from "./json_scan.ts";

/**
 * The lexicon of the v2 wire; payload `$type`s are `<nsid>#<kind>`.
 *
 * @example
 * ```ts
 * import { SUBSCRIBE_EVENTS_NSID } from "./v2_frames.ts";
 * console.log(`/xrpc/${SUBSCRIBE_EVENTS_NSID}`);
 * ```
 */
export const SUBSCRIBE_EVENTS_NSID = "network.bsky.jetstream.subscribeEvents";

/**
 * The names of the v2 wire's terminal error frames.
 *
 * @example
 * ```ts
 * import type { V2ErrorName } from "./v2_frames.ts";
 * const name: V2ErrorName = "ConsumerTooSlow";
 * ```
 */
export type V2ErrorName = "ConsumerTooSlow" | "InternalError";

function pad(value: number, width: number): string {
  return String(value).padStart(width, "0");
}

/**
 * Formats unix microseconds as RFC 3339 UTC with exactly six fractional digits, as the v2 wire's
 * `time` field.
 *
 * @example
 * ```ts
 * import { rfc3339Micros } from "./v2_frames.ts";
 * rfc3339Micros(1725911162329308); // "2024-09-09T19:46:02.329308Z"
 * ```
 */
export function rfc3339Micros(timeUs: number): string {
  const micros = ((timeUs % 1_000_000) + 1_000_000) % 1_000_000;
  const seconds = (timeUs - micros) / 1_000_000;
  const date = new Date(seconds * 1000);
  return `${pad(date.getUTCFullYear(), 4)}-${pad(date.getUTCMonth() + 1, 2)}-${pad(date.getUTCDate(), 2)}T` +
    `${pad(date.getUTCHours(), 2)}:${pad(date.getUTCMinutes(), 2)}:${pad(date.getUTCSeconds(), 2)}.` +
    `${pad(micros, 6)}Z`;
}

/**
 * A v1-wire event line with `"cursor":<seq>` right after `time_us`, as the v2 server sends it on
 * `/subscribe` (a `cursor` already in the line, from a capture of a v2 host, is replaced).
 *
 * @example
 * ```ts
 * import { withCursor } from "./v2_frames.ts";
 * withCursor('{"did":"did:plc:abc","time_us":5,"kind":"commit"}', 1001);
 * // '{"did":"did:plc:abc","time_us":5,"cursor":1001,"kind":"commit"}'
 * ```
 */
export function withCursor(text: string, seq: number): string {
  const members = objectMembers(text);
  const existing = members.get("cursor");
  if (existing !== undefined) {
    return text.slice(0, existing.valueStart) + seq + text.slice(existing.valueEnd);
  }
  const timeUs = members.get("time_us");
  if (timeUs === undefined) return text;
  return `${text.slice(0, timeUs.valueEnd)},"cursor":${seq}${text.slice(timeUs.valueEnd)}`;
}

const COMMIT_FIELDS = ["rev", "operation", "collection", "rkey", "record", "cid"] as const;

/**
 * The `subscribeEvents` message frame of a captured v1-wire event: `#commit` with the commit's
 * fields flattened into the payload, other kinds (`#identity`, `#account`, `#sync`, …) with the
 * upstream body under their kind's name.
 *
 * @param omitSeq Leave `seq` out (for garbage frames).
 *
 * @example
 * ```ts
 * import { v2Message } from "./v2_frames.ts";
 * v2Message('{"did":"did:plc:abc","time_us":1725911162329308,"kind":"identity","identity":{"seq":1}}', 1001);
 * // '{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#identity","seq":1001,
 * //   "did":"did:plc:abc","time":"2024-09-09T19:46:02.329308Z","identity":{"seq":1}}}' (one line)
 * ```
 */
export function v2Message(text: string, seq: number, omitSeq = false): string {
  const members = objectMembers(text);
  const raw = (key: string): string | undefined => {
    const span = members.get(key);
    return span === undefined ? undefined : text.slice(span.valueStart, span.valueEnd);
  };
  const kind = JSON.parse(raw("kind") ?? '""') as string;
  const timeUs = Number(raw("time_us"));
  let frame = `{"$type":"message","payload":{"$type":${JSON.stringify(`${SUBSCRIBE_EVENTS_NSID}#${kind}`)}` +
    (omitSeq ? "" : `,"seq":${seq}`) + `,"did":${raw("did")},"time":"${rfc3339Micros(timeUs)}"`;
  const body = members.get(kind);
  if (kind === "commit" && body !== undefined) {
    const commit = objectMembers(text, body.valueStart);
    for (const field of COMMIT_FIELDS) {
      const span = commit.get(field);
      if (span !== undefined) frame += `,"${field}":${text.slice(span.valueStart, span.valueEnd)}`;
    }
  } else if (body !== undefined) {
    frame += `,${JSON.stringify(kind)}:${text.slice(body.valueStart, body.valueEnd)}`;
  }
  return `${frame}}}`;
}

/**
 * An `#info` frame (no seq; does not advance a cursor).
 *
 * @example
 * ```ts
 * import { v2Info } from "./v2_frames.ts";
 * v2Info("OutdatedCursor", "requested timestamp cursor below retention floor; starting at seq 1500");
 * ```
 */
export function v2Info(name: string, message: string): string {
  return JSON.stringify({
    $type: "message",
    payload: { $type: `${SUBSCRIBE_EVENTS_NSID}#info`, name, message },
  });
}

/**
 * A terminal error frame; the server closes the connection right after it.
 *
 * @example
 * ```ts
 * import { v2Error } from "./v2_frames.ts";
 * v2Error("InternalError", "stream read failed; reconnect");
 * // '{"$type":"error","error":"InternalError","message":"stream read failed; reconnect"}'
 * ```
 */
export function v2Error(error: V2ErrorName, message: string): string {
  return JSON.stringify({ $type: "error", error, message });
}

/**
 * A `subscribeEvents` bad frame of a JSON kind (see `GARBAGE_KINDS`), built from the frame just sent.
 *
 * @param lastFrame The message frame just sent.
 * @param lastText The captured line it was made from.
 * @param lastSeq Its seq.
 * @param tag Makes the oversized frame's rkey unique.
 *
 * @example
 * ```ts ignore
 * import { v2Garbage } from "./v2_frames.ts";
 * const frame = v2Garbage("missing-time-us", v2Message(line, 1001), line, 1001, "1-3");
 * ```
 */
export function v2Garbage(
  kind: Exclude<GarbageKind, "binary-junk">,
  lastFrame: string,
  lastText: string,
  lastSeq: number,
  tag: string,
): string {
  const members = objectMembers(lastText);
  const span = members.get("did")!;
  const did = lastText.slice(span.valueStart, span.valueEnd);
  const timeSpan = members.get("time_us")!;
  const time = rfc3339Micros(Number(lastText.slice(timeSpan.valueStart, timeSpan.valueEnd)));
  const head = (type: string): string =>
    `{"$type":"message","payload":{"$type":"${SUBSCRIBE_EVENTS_NSID}#${type}","seq":${lastSeq},` +
    `"did":${did},"time":"${time}"`;
  switch (kind) {
    case "malformed-json":
      return lastFrame.slice(0, Math.max(1, lastFrame.length >> 1));
    case "unknown-kind":
      return `${head("heartbeat")}}}`;
    case "missing-time-us":
      return v2Message(lastText, lastSeq, true);
    case "oversized":
      return `${head("commit")},"rev":"3lgarbage2mib","operation":"create",` +
        `"collection":"app.bsky.feed.post","rkey":"garbage-${tag}","record":{"$type":"app.bsky.feed.post",` +
        `"createdAt":"2024-09-09T19:46:02.102Z","text":"${oversizedPostText()}"},` +
        `"cid":"bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"}}`;
  }
}
