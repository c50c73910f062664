import { spawnServer } from "../scripts/spawn_server.ts";
import { V2_SUBSCRIBE_PATH } from "../src/jetstream/v2.ts";
import assert from "node:assert/strict";
import { generateCapture } from "../src/server/synth.ts";
import { parseCapture } from "../src/server/capture.ts";
import { type JetstreamServerOptions, serveJetstream } from "../src/server/server.ts";
import { rfc3339Micros, SUBSCRIBE_EVENTS_NSID, withCursor } from "../src/server/v2_frames.ts";
import { objectMembers } from "../src/server/json_scan.ts";
import { OVERSIZED_TEXT_CHARS } from "../src/server/faults.ts";
import {
  createZstdDecoder,
  createZstdEncoder,
  frameDictionaryId,
  V2_DICTIONARY_ID,
} from "../src/jetstream/zstd.ts";
import { serveCommand } from "../src/cli/serve.ts";
import { UsageError } from "../src/errors.ts";
import { collectMessages, rawGet, waitFor } from "./helpers/ws_collect.ts";
import { closeCode, encodeFrame, RawWebSocket } from "./helpers/raw_ws.ts";
import { v2Dictionary } from "./helpers/dictionaries.ts";

const START_US = 1_770_000_000_000_000; // 2026-02-02, safely in the past
const STEP_US = 1000;
const LINES = generateCapture({ count: 2000, seed: 13, startUs: START_US, stepUs: STEP_US });
const EVENTS = parseCapture(LINES);
const SEQ0 = 1001; // seq of EVENTS[0] with the default seqBase
const encoder = new TextEncoder();
const decoder = new TextDecoder();
const V2_PATH = V2_SUBSCRIBE_PATH;
const DICT_PATH = "/xrpc/network.bsky.jetstream.getZstdDictionary";

function serve(options: Partial<JetstreamServerOptions> = {}): ReturnType<typeof serveJetstream> {
  return serveJetstream({ events: EVENTS, closeAtEnd: true, version: "v2", ...options });
}

/** The `/subscribe` line of event `i` on a v2 server. */
function v1Line(i: number, seqBase = 1000): string {
  const timeUs = `"time_us":${EVENTS[i].timeUs},`;
  assert.ok(LINES[i].includes(timeUs));
  return LINES[i].replace(timeUs, `"time_us":${EVENTS[i].timeUs},"cursor":${seqBase + 1 + i},`);
}

/** An independent RFC 3339 formatting with six fractional digits. */
function isoMicros(timeUs: number): string {
  return `${new Date(Math.floor(timeUs / 1000)).toISOString().slice(0, 19)}.${
    String(timeUs % 1_000_000).padStart(6, "0")
  }Z`;
}

/** The `subscribeEvents` frame of event `i`, built from the parsed line. */
function v2Frame(i: number): string {
  const event = JSON.parse(LINES[i]);
  const payload: Record<string, unknown> = {
    $type: `${SUBSCRIBE_EVENTS_NSID}#${event.kind}`,
    seq: SEQ0 + i,
    did: event.did,
    time: isoMicros(event.time_us),
  };
  if (event.kind === "commit") Object.assign(payload, event.commit);
  else payload[event.kind] = event[event.kind];
  return JSON.stringify({ $type: "message", payload });
}

function indexes(filter: (i: number) => boolean, from = 0): number[] {
  return EVENTS.map((_, i) => i).filter((i) => i >= from && filter(i));
}

async function xrpcError(port: number, target: string, headers: Record<string, string> = {}) {
  const response = await rawGet(port, target, headers);
  assert.equal(response.headers.get("content-type"), "application/json", target);
  return { status: response.status, ...JSON.parse(response.body) };
}

// --- frames ---------------------------------------------------------------------------------------

Deno.test("`rfc3339Micros()` prints exactly six fractional digits in UTC", () => {
  assert.equal(rfc3339Micros(1725911162329308), "2024-09-09T19:46:02.329308Z");
  assert.equal(rfc3339Micros(1725911162000007), "2024-09-09T19:46:02.000007Z");
  assert.equal(rfc3339Micros(0), "1970-01-01T00:00:00.000000Z");
  for (const event of EVENTS.slice(0, 50)) assert.equal(rfc3339Micros(event.timeUs), isoMicros(event.timeUs));
});

Deno.test("`withCursor()` inserts the seq after time_us once, or replaces a captured one", () => {
  assert.equal(
    withCursor('{"did":"did:plc:a","time_us":5,"kind":"identity","identity":{"time_us":1}}', 7),
    '{"did":"did:plc:a","time_us":5,"cursor":7,"kind":"identity","identity":{"time_us":1}}',
  );
  assert.equal(
    withCursor('{"did":"x","time_us":5,"cursor":3,"kind":"k"}', 9),
    '{"did":"x","time_us":5,"cursor":9,"kind":"k"}',
  );
});

Deno.test("`objectMembers()` finds raw values, keeping big numbers and escapes as written", () => {
  const text =
    '{ "a\\"b" : "x\\\\\\"}" , "n": 12345678901234567890, "o": {"k": [1, {"z": "}"}]}, "t": true }';
  const members = objectMembers(text);
  assert.deepEqual([...members.keys()], ['a"b', "n", "o", "t"]);
  const raw = (key: string) => text.slice(members.get(key)!.valueStart, members.get(key)!.valueEnd);
  assert.equal(raw('a"b'), '"x\\\\\\"}"');
  assert.equal(raw("n"), "12345678901234567890");
  assert.equal(raw("o"), '{"k": [1, {"z": "}"}]}');
  assert.equal(raw("t"), "true");
  assert.throws(() => objectMembers("[1]"), SyntaxError);
});

// --- /subscribe on a v2 server -------------------------------------------------------------------

Deno.test("`serveJetstream()` v2 adds the seq as `cursor` right after time_us on /subscribe", async () => {
  await using server = serve();
  const { messages, code } = await collectMessages(server.url);
  assert.equal(code, 1000);
  assert.deepEqual(messages, EVENTS.map((_, i) => v1Line(i)));
  assert.equal(JSON.parse(messages[1999] as string).cursor, SEQ0 + 1999);
  assert.equal(server.connections[0].startSeq, SEQ0);
  assert.equal(server.connections[0].lastSeq, SEQ0 + 1999);
  await using based = serve({ seqBase: 0 });
  const first = await collectMessages(based.url, { count: 1 });
  assert.equal(first.messages[0], v1Line(0, 0));
});

Deno.test("`serveJetstream()` v2 reads /subscribe cursors below 1e15 as inclusive seqs", async () => {
  await using server = serve();
  const last = SEQ0 + 1999;
  const cases: [string, number[]][] = [
    [`${SEQ0 + 500}`, indexes(() => true, 500)],
    ["0", indexes(() => true)], // everything
    ["5", indexes(() => true)], // below the floor: clamped silently
    [`${last}`, [1999]],
    [`${last + 1}`, []], // the next seq: live, nothing new
  ];
  for (const [cursor, expected] of cases) {
    const { messages, code } = await collectMessages(`${server.url}?cursor=${cursor}`);
    assert.equal(code, 1000, cursor);
    assert.deepEqual(messages, expected.map((i) => v1Line(i)), cursor);
  }
});

Deno.test("`serveJetstream()` v2 reads /subscribe cursors from 1e15 as unix µs", async () => {
  await using server = serve({ now: () => EVENTS[1500].timeUs });
  const exact = await collectMessages(`${server.url}?cursor=${EVENTS[700].timeUs}`);
  assert.deepEqual(exact.messages, indexes(() => true, 700).map((i) => v1Line(i)));
  const between = await collectMessages(`${server.url}?cursor=${EVENTS[700].timeUs + 1}`);
  assert.equal(between.messages[0], v1Line(701));
  const older = await collectMessages(`${server.url}?cursor=${START_US - 86_400_000_000}`);
  assert.equal(older.messages.length, 2000);
  const future = await collectMessages(`${server.url}?cursor=${EVENTS[1600].timeUs}`);
  assert.deepEqual(future.messages, []);
});

Deno.test("`serveJetstream()` v2 starts a µs cursor `earlyReplayUs` early, silently (jetstream#343)", async () => {
  const early = 100 * STEP_US;
  await using server = serve({ earlyReplayUs: early });
  // time_us steps are jittered around STEP_US: find where "100 events' worth" earlier really is.
  const start = EVENTS.findIndex((event) => event.timeUs >= EVENTS[700].timeUs - early);
  assert.ok(start > 550 && start < 650, `start ${start}`);
  const { messages } = await collectMessages(`${server.url}?cursor=${EVENTS[700].timeUs}`);
  assert.deepEqual(messages, indexes(() => true, start).map((i) => v1Line(i)));
  // Seq cursors are exact.
  const seq = await collectMessages(`${server.url}?cursor=${SEQ0 + 700}`);
  assert.equal(seq.messages[0], v1Line(700));
  const v2 = await collectMessages(`${server.v2Url}?cursor=${EVENTS[700].timeUs}`);
  assert.equal(v2.messages[0], v2Frame(start));
});

Deno.test("`serveJetstream()` v2 refuses bad /subscribe options with the v2 server's 400 texts", async () => {
  await using server = serve();
  const cases: [string, string, Record<string, string>?][] = [
    ["cursor=-5", "subscribe: invalid cursor: negative value -5"],
    ["cursor=abc", 'subscribe: invalid cursor: "abc"'],
    ["cursor=1.5", 'subscribe: invalid cursor: "1.5"'],
    ["cursor=99999999999999999999", 'subscribe: invalid cursor: "99999999999999999999"'],
    ["wantedDids=nope", "subscribe: invalid options: invalid DID: nope"],
    [
      "wantedCollections=app.bsky.feed.po*",
      "subscribe: invalid options: invalid collection: app.bsky.feed.po*",
    ],
    [
      Array.from({ length: 101 }, (_, i) => `wantedCollections=app.bsky.c${i}.*`).join("&"),
      "subscribe: invalid options: too many wanted collections: > 100",
    ],
    [
      Array.from({ length: 10_001 }, (_, i) => `wantedDids=did:web:d${i}.test`).join("&"),
      "subscribe: invalid options: too many wanted DIDs: 10001 > 10000",
    ],
    ["cursor=1;x=2", "subscribe: invalid options: invalid semicolon separator in query"],
    ["wantedDids=%zz", 'subscribe: invalid options: invalid URL escape "%zz"'],
    ["compress=true", "compression not available on this server"],
    [
      "compress=true",
      "choose one compression scheme: custom zstd (compress=true / Socket-Encoding: zstd) or RFC 7692 " +
      "permessage-deflate, not both",
      { "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits" },
    ],
  ];
  for (const [query, body, headers] of cases) {
    const response = await rawGet(server.port, `/subscribe?${query}`, headers);
    // As Go's http.Error writes them (protocol doc §1.2): a newline after the text.
    assert.deepEqual(
      { status: response.status, body: response.body },
      { status: 400, body: `${body}\n` },
      query.slice(0, 60),
    );
    assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
    assert.equal(response.headers.get("x-content-type-options"), "nosniff");
  }
  // Unlike legacy, repeated prefixes are deduplicated, and a cursor is checked after the filter.
  const fine = Array.from({ length: 101 }, () => "wantedCollections=app.bsky.*").join("&");
  assert.match(
    (await rawGet(server.port, `/subscribe?${fine}`)).body,
    /^WebSocket protocol violation: Connection/,
  );
  assert.equal(
    (await rawGet(server.port, "/subscribe?wantedDids=x&cursor=x")).body,
    "subscribe: invalid options: invalid DID: x\n",
  );
});

Deno.test("`serveJetstream()` v2 never sends #sync events on /subscribe but does on subscribeEvents", async () => {
  const sync = `{"did":"did:plc:q6gjnaw2blty4crticxkmujt","time_us":${START_US + 1},"kind":"sync",` +
    `"sync":{"$type":"com.atproto.sync.subscribeRepos#sync","blocks":{"$bytes":"AAEC"},` +
    `"did":"did:plc:q6gjnaw2blty4crticxkmujt","rev":"3l3qo2vutsw2b","seq":5,"time":"2026-02-02T00:00:00.000Z"}}`;
  const events = parseCapture([LINES[0], sync, LINES[1]]);
  await using server = serve({ events });
  const v1 = await collectMessages(server.url);
  assert.deepEqual(v1.messages.map((m) => JSON.parse(m as string).cursor), [SEQ0, SEQ0 + 2]);
  const v2 = await collectMessages(server.v2Url);
  const payload = JSON.parse(v2.messages[1] as string).payload;
  assert.equal(payload.$type, `${SUBSCRIBE_EVENTS_NSID}#sync`);
  assert.equal(payload.seq, SEQ0 + 1);
  assert.deepEqual(payload.sync, JSON.parse(sync).sync);
  const commits = await collectMessages(`${server.v2Url}?kinds=commit`);
  assert.equal(commits.messages.length, 2);
});

Deno.test("`serveJetstream()` v2 clamps /subscribe cursors to the history window, silently", async () => {
  await using byFloor = serve({ lookbackFloorSeq: SEQ0 + 500 });
  for (const query of ["", "?cursor=0", `?cursor=${SEQ0}`, `?cursor=${EVENTS[10].timeUs}`]) {
    const { messages } = await collectMessages(byFloor.url + query);
    assert.equal(messages.length, 1500, query);
    assert.equal(messages[0], v1Line(500), query);
  }
  await using byTime = serve({ historyStartUs: EVENTS[300].timeUs - 1 });
  assert.equal((await collectMessages(`${byTime.url}?cursor=0`)).messages[0], v1Line(300));
  // A legacy server keeps the same window on its time cursors.
  await using legacy = serveJetstream({
    events: EVENTS,
    closeAtEnd: true,
    historyStartUs: EVENTS[300].timeUs,
  });
  const { messages } = await collectMessages(`${legacy.url}?cursor=${START_US}`);
  assert.deepEqual(messages, LINES.slice(300));
  assert.deepEqual((await collectMessages(legacy.url)).messages, LINES.slice(300));
});

Deno.test("`serveJetstream()` v2 handles options_update like the v2 server (1007, 1008, size limit)", async () => {
  await using server = serve();
  const long = `app.bsky.${"x".repeat(200)}.po*`;
  const cases: [string, number, string][] = [
    ["{nope", 1007, "bad SubscriberSourcedMessage envelope"],
    ["[1]", 1007, "bad SubscriberSourcedMessage envelope"],
    ['{"type":"options_update","payload":{"wantedDids":"did:plc:abc"}}', 1007, "bad options_update payload"],
    ['{"type":"options_update"}', 1007, "bad options_update payload"],
    [
      '{"type":"options_update","payload":{"wantedDids":["nope"]}}',
      1008,
      "subscribe: invalid options: invalid DID: nope",
    ],
  ];
  for (const [message, code, reason] of cases) {
    const result = await collectMessages(`${server.url}?requireHello=true`, { send: [message] });
    assert.deepEqual([result.code, result.reason, result.messages], [code, reason, []], message);
  }
  const truncated = await collectMessages(`${server.url}?requireHello=true`, {
    send: [JSON.stringify({ type: "options_update", payload: { wantedCollections: [long] } })],
  });
  assert.equal(truncated.code, 1008);
  assert.ok(truncated.reason.endsWith("..."));
  assert.equal(encoder.encode(truncated.reason).length, 123);
  assert.ok(truncated.reason.startsWith("subscribe: invalid options: invalid collection: app.bsky.xxx"));
  // Unlike legacy, maxMessageSizeBytes in an update applies.
  const limit = 450;
  const hello = JSON.stringify({ type: "options_update", payload: { maxMessageSizeBytes: limit } });
  const limited = await collectMessages(`${server.url}?requireHello=true`, {
    send: ['{"type":"other"}', hello],
  });
  const expected = EVENTS.map((_, i) => v1Line(i)).filter((line) => encoder.encode(line).length <= limit);
  assert.ok(expected.length > 100 && expected.length < 1900);
  assert.deepEqual(limited.messages, expected);
  assert.deepEqual(server.connections.at(-1)!.hellos, [{
    wantedCollections: [],
    wantedDids: [],
    maxMessageSizeBytes: limit,
  }]);
});

Deno.test("`serveJetstream()` v2 closes /subscribe with 1009 on a client message over 10,000,000 bytes, and the close arrives", async () => {
  await using server = serve({ closeAtEnd: false });
  const ws = await RawWebSocket.connect(server.port, "/subscribe?requireHello=true");
  try {
    const hello = JSON.stringify({ type: "options_update", payload: {}, padding: "x".repeat(10_000_000) });
    // The server stops at the frame's header; the rest of it is still on its way when it closes.
    const sending = ws.send(1, encoder.encode(hello)).catch((err) => err);
    const { frames, close } = await ws.untilClose();
    assert.deepEqual(frames, []);
    assert.ok(close, "a close frame, not a reset");
    assert.equal(closeCode(close), 1009);
    assert.equal(await sending, undefined, "the whole message could be written");
  } finally {
    ws.close();
  }
  await waitFor(() => server.connections[0].closeCode !== undefined);
  assert.equal(server.connections[0].closeCode, 1009);
});

Deno.test("`serveJetstream()` v2 answers subscribeEvents data sent with the handshake by 101, then 1008", async () => {
  await using server = serve({ closeAtEnd: false });
  const ws = await RawWebSocket.connect(
    server.port,
    `${V2_PATH}?cursor=${SEQ0 + 1999}`,
    encodeFrame(1, encoder.encode("hello")),
  );
  try {
    const { close } = await ws.untilClose();
    assert.equal(closeCode(close!), 1008);
  } finally {
    ws.close();
  }
});

Deno.test("`serveJetstream()` v2 refuses a request that is no WebSocket handshake as coder/websocket does", async () => {
  await using server = serve();
  const upgrade = {
    Upgrade: "websocket",
    Connection: "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
  };
  const cases: [Record<string, string>, number, string, Record<string, string>][] = [
    [{}, 426, 'WebSocket protocol violation: Connection header "" does not contain Upgrade\n', {
      upgrade: "websocket",
      connection: "Upgrade, close",
    }],
    [
      { ...upgrade, Connection: "keep-alive", "Sec-WebSocket-Version": "13" },
      426,
      'WebSocket protocol violation: Connection header "keep-alive" does not contain Upgrade\n',
      { upgrade: "websocket" },
    ],
    [
      { ...upgrade, Upgrade: "h2c", "Sec-WebSocket-Version": "13" },
      426,
      'WebSocket protocol violation: Upgrade header "h2c" does not contain websocket\n',
      { upgrade: "websocket" },
    ],
    [
      { ...upgrade, "Sec-WebSocket-Version": "8" },
      400,
      'unsupported WebSocket protocol version (only 13 is supported): "8"\n',
      { "sec-websocket-version": "13" },
    ],
    [
      { Upgrade: "websocket", Connection: "Upgrade", "Sec-WebSocket-Version": "13" },
      400,
      "WebSocket protocol violation: missing Sec-WebSocket-Key\n",
      {},
    ],
  ];
  for (const path of ["/subscribe", `${V2_PATH}?cursor=${SEQ0}`]) {
    for (const [headers, status, body, fields] of cases) {
      const response = await rawGet(server.port, path, headers);
      assert.deepEqual({ status: response.status, body: response.body }, { status, body }, `${path} ${body}`);
      assert.match(response.headers.get("content-type") ?? "", /^text\/plain/);
      for (const [name, value] of Object.entries(fields)) {
        assert.equal(response.headers.get(name), value, name);
      }
    }
  }
});

Deno.test("`serveJetstream()` v2 compresses /subscribe events with the cursor and limits by uncompressed size", async () => {
  // A "compressor" that shrinks everything, so only the uncompressed size can exceed the limit.
  const compressor = (text: string): Uint8Array => encoder.encode(`Z${text.length}`);
  await using server = serve({ compressor });
  const limit = 450;
  const { messages } = await collectMessages(`${server.url}?compress=true&maxMessageSizeBytes=${limit}`);
  const expected = EVENTS.map((_, i) => v1Line(i)).filter((line) => encoder.encode(line).length <= limit);
  assert.deepEqual(messages, expected.map(compressor));
});

// --- subscribeEvents -----------------------------------------------------------------------------

Deno.test("`serveJetstream()` v2 sends xrpc.v1.json message frames on subscribeEvents", async () => {
  await using server = serve();
  const { messages, code, protocol } = await collectMessages(server.v2Url, { protocols: ["xrpc.v1.json"] });
  assert.equal(code, 1000);
  assert.equal(protocol, "xrpc.v1.json");
  assert.deepEqual(messages, EVENTS.map((_, i) => v2Frame(i)));
  const kinds = new Set(messages.map((m) => JSON.parse(m as string).payload.$type));
  assert.deepEqual(
    [...kinds].sort(),
    ["account", "commit", "identity"].map((k) => `${SUBSCRIBE_EVENTS_NSID}#${k}`),
  );
  // Field order: seq, did, time, then the commit's own fields; deletes have no record or cid.
  const del = messages.map((m) => JSON.parse(m as string).payload).find((p) => p.operation === "delete");
  assert.deepEqual(Object.keys(del), [
    "$type",
    "seq",
    "did",
    "time",
    "rev",
    "operation",
    "collection",
    "rkey",
  ]);
  const create = JSON.parse(messages[EVENTS.findIndex((e) => e.kind === "commit")] as string).payload;
  assert.deepEqual(Object.keys(create), [
    "$type",
    "seq",
    "did",
    "time",
    "rev",
    "operation",
    "collection",
    "rkey",
    "record",
    "cid",
  ]);
  assert.match(create.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/);
  // Without the offer, no subprotocol is echoed (the framing is the same).
  assert.equal((await collectMessages(server.v2Url, { count: 1 })).protocol, "");
  assert.equal(server.connections[0].v2?.subprotocol, true);
});

Deno.test("`serveJetstream()` v2 filters subscribeEvents by kinds, dids and collections", async () => {
  await using server = serve();
  const did = EVENTS.find((e) => e.kind === "identity")!.did;
  const cases: [string, (i: number) => boolean][] = [
    [
      "kinds=commit&collections=app.bsky.feed.*",
      (i) => EVENTS[i].kind === "commit" && EVENTS[i].collection!.startsWith("app.bsky.feed."),
    ],
    ["kinds=identity&kinds=account", (i) => EVENTS[i].kind !== "commit"],
    // collections constrains commits only.
    [
      "collections=app.bsky.graph.follow",
      (i) => EVENTS[i].kind !== "commit" || EVENTS[i].collection === "app.bsky.graph.follow",
    ],
    [`dids=${did}`, (i) => EVENTS[i].did === did],
  ];
  for (const [query, wanted] of cases) {
    const { messages } = await collectMessages(`${server.v2Url}?${query}`);
    const expected = indexes(wanted);
    assert.ok(expected.length > 0, query);
    assert.deepEqual(messages, expected.map(v2Frame), query);
  }
});

Deno.test("`serveJetstream()` v2 refuses bad subscribeEvents requests with XRPC JSON errors", async () => {
  await using server = serve();
  const invalid = (message: string) => ({ status: 400, error: "InvalidRequest", message });
  const options = "subscribe: invalid options";
  const cases: [string, Record<string, unknown>, Record<string, string>?][] = [
    ["kinds=nope", invalid(`${options}: unknown kind "nope" (valid: commit, identity, account, sync)`)],
    [
      "kinds=commit&kinds=commit&kinds=commit&kinds=commit&kinds=commit",
      invalid(`${options}: too many kinds values: 5 > 4`),
    ],
    ["collections=app.*", invalid(`${options}: invalid collection wildcard: app.*`)],
    ["collections=single.*", invalid(`${options}: invalid collection wildcard: single.*`)],
    ["collections=app.bsky.feed.po*", invalid(`${options}: invalid collection: app.bsky.feed.po*`)],
    [
      "kinds=identity&collections=app.bsky.feed.post",
      invalid(`${options}: collections filter can never apply: kinds excludes commit`),
    ],
    [
      Array.from({ length: 101 }, (_, i) => `collections=app.bsky.c${i}.post`).join("&"),
      invalid(`${options}: too many collections values: 101 > 100`),
    ],
    [
      Array.from({ length: 10_001 }, () => "dids=did:plc:abc").join("&"),
      invalid(`${options}: too many dids values: 10001 > 10000`),
    ],
    ["dids=nope", invalid(`${options}: invalid DID: nope`)],
    [
      "wantedDids=did:plc:abc",
      invalid(`${options}: wantedDids is the legacy /subscribe parameter; use dids`),
    ],
    [
      "wantedCollections=app.bsky.feed.post",
      invalid(`${options}: wantedCollections is the legacy /subscribe parameter; use collections`),
    ],
    [
      "requireHello=true",
      invalid(
        `${options}: requireHello is not supported on this endpoint; it is server-push only (subscriber-sourced messages were removed)`,
      ),
    ],
    [
      "compress=true",
      invalid(
        "compress=true / Socket-Encoding: zstd is the /subscribe (v1) opt-in; this endpoint uses zstdDictionary=<id> with the dictionary from getZstdDictionary",
      ),
    ],
    [
      "",
      invalid(
        "compress=true / Socket-Encoding: zstd is the /subscribe (v1) opt-in; this endpoint uses zstdDictionary=<id> with the dictionary from getZstdDictionary",
      ),
      { "Socket-Encoding": "zstd" },
    ],
    [
      "maxMessageSizeBytes=abc",
      invalid(`${options}: maxMessageSizeBytes must be one unsigned 32-bit integer: "abc"`),
    ],
    [
      "maxMessageSizeBytes=4294967296",
      invalid(`${options}: maxMessageSizeBytes must be one unsigned 32-bit integer: "4294967296"`),
    ],
    ["cursor=-1", invalid("subscribe: invalid cursor: negative value -1")],
    ["cursor=soon", invalid('subscribe: invalid cursor: "soon"')],
    ["zstdDictionary=0", invalid("zstdDictionary must be a positive integer zstd dictionary ID")],
    [
      "zstdDictionary=20260811",
      {
        status: 400,
        error: "UnknownZstdDictionary",
        message:
          "unknown zstd dictionary id 20260811; this server has no zstd dictionary (connect without zstdDictionary)",
      },
    ],
    [
      "cursor=5",
      {
        status: 400,
        error: "CursorTooOld",
        message: `cursor 5 is older than the oldest available seq ${SEQ0}`,
      },
    ],
    [
      "cursor=0",
      {
        status: 400,
        error: "CursorTooOld",
        message: `cursor 0 is older than the oldest available seq ${SEQ0}`,
      },
    ],
  ];
  for (const [query, expected, headers] of cases) {
    assert.deepEqual(
      await xrpcError(server.port, `${V2_PATH}?${query}`, headers),
      expected,
      query.slice(0, 60),
    );
  }
  const refused = server.connections.at(-1)!;
  assert.equal(refused.endpoint, "subscribeEvents");
  assert.equal(refused.errorName, "CursorTooOld");
  assert.equal(refused.params.cursor, 0);
  // Other parameters are ignored, and a legacy server has no such endpoint.
  assert.match(
    (await rawGet(server.port, `${V2_PATH}?maxSize=5&collections=app.bsky.*`)).body,
    /^WebSocket protocol violation: Connection header "" does not contain Upgrade\n$/,
  );
  await using legacy = serveJetstream({ events: EVENTS });
  assert.equal((await rawGet(legacy.port, V2_PATH)).status, 404);
});

Deno.test("`serveJetstream()` v2 answers subscribeEvents 503 ServiceUnavailable for `faults.refuseFirst`", async () => {
  await using server = serve({ faults: { refuseFirst: 2 } });
  assert.deepEqual(await xrpcError(server.port, V2_PATH), {
    status: 503,
    error: "ServiceUnavailable",
    message: "service not ready: bootstrap in progress",
  });
  // The count is shared with /subscribe.
  assert.equal((await rawGet(server.port, "/subscribe")).status, 503);
  const { messages } = await collectMessages(`${server.v2Url}?cursor=${SEQ0 + 1999}`);
  assert.deepEqual(messages, [v2Frame(1999)]);
});

Deno.test("`serveJetstream()` v2 resolves subscribeEvents cursors: seqs, µs, floor and notices", async () => {
  await using server = serve({ lookbackFloorSeq: SEQ0 + 500, now: () => EVENTS[1999].timeUs });
  const info = (name: string, message: string) =>
    JSON.stringify({ $type: "message", payload: { $type: `${SUBSCRIBE_EVENTS_NSID}#info`, name, message } });
  const seq = await collectMessages(`${server.v2Url}?cursor=${SEQ0 + 1990}`);
  assert.deepEqual(seq.messages, indexes(() => true, 1990).map(v2Frame));
  assert.deepEqual(await xrpcError(server.port, `${V2_PATH}?cursor=${SEQ0 + 499}`), {
    status: 400,
    error: "CursorTooOld",
    message: `cursor ${SEQ0 + 499} is older than the oldest available seq ${SEQ0 + 500}`,
  });
  // A time below the floor is clamped, and the first frame says so.
  const old = await collectMessages(`${server.v2Url}?cursor=${EVENTS[100].timeUs}`);
  assert.equal(
    old.messages[0],
    info("OutdatedCursor", `requested timestamp cursor below retention floor; starting at seq ${SEQ0 + 500}`),
  );
  assert.deepEqual(old.messages.slice(1), indexes(() => true, 500).map(v2Frame));
  assert.equal(server.connections.at(-1)!.notice?.name, "OutdatedCursor");
  const exact = await collectMessages(`${server.v2Url}?cursor=${EVENTS[1995].timeUs}`);
  assert.deepEqual(exact.messages, indexes(() => true, 1995).map(v2Frame));
  // A seq past the last one: live, silently (§1.3: "Future → live"; #info is only OutdatedCursor).
  const future = await collectMessages(`${server.v2Url}?cursor=${SEQ0 + 5000}`);
  assert.deepEqual(future.messages, []);
  // A time cursor in the future: live, silently.
  assert.deepEqual((await collectMessages(`${server.v2Url}?cursor=${EVENTS[1999].timeUs + 1}`)).messages, []);
  // Without a floor, a time before the capture is announced as preceding the archive.
  await using whole = serve();
  const before = await collectMessages(`${whole.v2Url}?cursor=${START_US - 1}&kinds=identity`);
  assert.equal(
    before.messages[0],
    info(
      "OutdatedCursor",
      `requested timestamp cursor precedes the oldest archived event; starting at seq ${SEQ0}`,
    ),
  );
});

Deno.test("`serveJetstream()` v2 applies maxMessageSizeBytes to the whole subscribeEvents frame", async () => {
  await using server = serve();
  const limit = 600;
  const { messages } = await collectMessages(`${server.v2Url}?maxMessageSizeBytes=${limit}`);
  const expected = EVENTS.map((_, i) => v2Frame(i)).filter((frame) => encoder.encode(frame).length <= limit);
  assert.ok(expected.length > 100 && expected.length < 1900);
  assert.deepEqual(messages, expected);
});

Deno.test("`serveJetstream()` v2 closes subscribeEvents with 1008 on any client data frame", async () => {
  await using server = serve({ closeAtEnd: false });
  for (const message of ["hello", new Uint8Array([1, 2])]) {
    const { code, reason } = await collectMessages(`${server.v2Url}?cursor=${SEQ0 + 1999}`, {
      send: [message],
    });
    assert.deepEqual([code, reason], [1008, "unexpected data message"]);
  }
});

Deno.test("`serveJetstream()` v2 sends a terminal error frame after `errorAfter` events, then drops", async () => {
  await using server = serve({ errorAfter: { events: 100, error: "ConsumerTooSlow" } });
  const { messages, code } = await collectMessages(`${server.v2Url}?kinds=commit&cursor=${SEQ0 + 1000}`);
  assert.equal(code, 1006);
  const commits = indexes((i) => EVENTS[i].kind === "commit", 1000);
  assert.deepEqual(messages.slice(0, 100), commits.slice(0, 100).map(v2Frame));
  const next = SEQ0 + commits[99] + 1;
  assert.deepEqual(JSON.parse(messages[100] as string), {
    $type: "error",
    error: "ConsumerTooSlow",
    message: `reading below the floor rate ${
      SEQ0 + 2000 - next
    } events behind the tip; reconnect with cursor=${next}`,
  });
  assert.equal(messages.length, 101);
  const record = server.connections[0];
  assert.deepEqual([record.errorFrame, record.dropped, record.sent], ["ConsumerTooSlow", true, 100]);
  // Reconnecting where the message says continues without a gap.
  const resumed = await collectMessages(`${server.v2Url}?kinds=commit&cursor=${next}`, { count: 1 });
  assert.equal(resumed.messages[0], v2Frame(commits[100]));
  // /subscribe has no error frames: it just drops.
  const v1 = await collectMessages(`${server.url}?cursor=${SEQ0}`);
  assert.deepEqual([v1.code, v1.messages.length], [1006, 100]);
  await using failing = serve({ errorAfter: { events: 0, error: "InternalError" } });
  const internal = await collectMessages(failing.v2Url);
  assert.deepEqual(internal.messages, [
    '{"$type":"error","error":"InternalError","message":"stream read failed; reconnect"}',
  ]);
});

Deno.test("`serveJetstream()` v2 injects v2-shaped garbage on subscribeEvents", async () => {
  await using server = serve({ faults: { garbageEvery: 1 } });
  const { messages } = await collectMessages(`${server.v2Url}?cursor=${SEQ0 + 1995}`, { timeoutMs: 10_000 });
  assert.equal(messages.length, 10);
  assert.deepEqual(messages.filter((_, i) => i % 2 === 0), indexes(() => true, 1995).map(v2Frame));
  const [malformed, junk, unknown, noSeq, big] = messages.filter((_, i) => i % 2 === 1);
  assert.throws(() => JSON.parse(malformed as string), SyntaxError);
  assert.ok(junk instanceof Uint8Array);
  assert.deepEqual(JSON.parse(unknown as string).payload, {
    $type: `${SUBSCRIBE_EVENTS_NSID}#heartbeat`,
    seq: SEQ0 + 1997,
    did: EVENTS[1997].did,
    time: isoMicros(EVENTS[1997].timeUs),
  });
  const expected = JSON.parse(v2Frame(1998));
  delete expected.payload.seq;
  assert.deepEqual(JSON.parse(noSeq as string), expected);
  const oversized = JSON.parse(big as string).payload;
  assert.equal(oversized.seq, SEQ0 + 1999);
  assert.equal(oversized.record.text.length, OVERSIZED_TEXT_CHARS);
  assert.equal(server.connections[0].garbage, 5);
});

// --- zstd and getZstdDictionary ------------------------------------------------------------------

Deno.test({
  name: "`serveJetstream()` v2 compresses every subscribeEvents frame with the v2 dictionary",
  async fn() {
    const dictionary = (await v2Dictionary()).bytes;
    const zstd = await createZstdEncoder(dictionary, 1);
    const v2Compressor = (text: string): Uint8Array => zstd.encode(encoder.encode(text)).slice();
    const zdecoder = await createZstdDecoder(dictionary);
    await using server = serve({
      v2Compressor,
      v2Dictionary: dictionary,
      lookbackFloorSeq: SEQ0 + 1990,
      errorAfter: { events: 5, error: "InternalError" },
    });
    const { messages } = await collectMessages(
      `${server.v2Url}?zstdDictionary=${V2_DICTIONARY_ID}&cursor=${START_US}`,
    );
    assert.equal(messages.length, 7);
    for (const message of messages) {
      assert.ok(message instanceof Uint8Array);
      assert.equal(frameDictionaryId(message), V2_DICTIONARY_ID);
    }
    const texts = messages.map((m) => decoder.decode(zdecoder.decode(m as Uint8Array)));
    assert.equal(JSON.parse(texts[0]).payload.name, "OutdatedCursor");
    assert.deepEqual(texts.slice(1, 6), [1990, 1991, 1992, 1993, 1994].map(v2Frame));
    assert.equal(JSON.parse(texts[6]).error, "InternalError");
    // Another dictionary ID is refused, naming the current one.
    assert.deepEqual(await xrpcError(server.port, `${V2_PATH}?zstdDictionary=1612007021`), {
      status: 400,
      error: "UnknownZstdDictionary",
      message:
        `unknown zstd dictionary id 1612007021; current dictionary id is ${V2_DICTIONARY_ID} (fetch it via getZstdDictionary and reconnect)`,
    });
    // getZstdDictionary serves the bytes, with and without the id.
    for (const query of ["", `?id=${V2_DICTIONARY_ID}`]) {
      const response = await fetch(`${server.httpUrl}${DICT_PATH}${query}`);
      assert.equal(response.status, 200);
      assert.equal(response.headers.get("content-type"), "application/octet-stream");
      assert.equal(response.headers.get("x-zstd-dictionary-id"), String(V2_DICTIONARY_ID));
      assert.equal(response.headers.get("etag"), `"zstd-dict-${V2_DICTIONARY_ID}"`);
      assert.equal(response.headers.get("cache-control"), "public, max-age=31536000, immutable");
      assert.deepEqual(new Uint8Array(await response.arrayBuffer()), dictionary);
    }
    const cached = await rawGet(server.port, DICT_PATH, {
      "If-None-Match": `"zstd-dict-${V2_DICTIONARY_ID}"`,
    });
    assert.deepEqual([cached.status, cached.body], [304, ""]);
  },
});

Deno.test("`serveJetstream()` v2 answers getZstdDictionary errors as XRPC JSON", async () => {
  const dictionary = new Uint8Array(64);
  new DataView(dictionary.buffer).setUint32(0, 0xec30a437, true);
  new DataView(dictionary.buffer).setUint32(4, 77, true);
  await using server = serve({ v2Dictionary: dictionary });
  assert.deepEqual(await xrpcError(server.port, `${DICT_PATH}?id=5`), {
    status: 404,
    error: "DictionaryNotFound",
    message: "no dictionary with id 5; current dictionary id is 77",
  });
  assert.deepEqual(await xrpcError(server.port, `${DICT_PATH}?id=x`), {
    status: 400,
    error: "InvalidRequest",
    message: "id must be an integer zstd dictionary ID",
  });
  assert.equal((await rawGet(server.port, `${DICT_PATH}?id=77`)).headers.get("x-zstd-dictionary-id"), "77");
  await using bare = serve();
  assert.deepEqual(await xrpcError(bare.port, DICT_PATH), {
    status: 404,
    error: "DictionaryNotFound",
    message: "this server publishes no zstd dictionary",
  });
});

// --- options and CLI -----------------------------------------------------------------------------

Deno.test("`serveJetstream()` validates the v2 options", () => {
  assert.throws(() => serveJetstream({ events: EVENTS, version: "v3" as "v2" }), TypeError);
  assert.throws(
    () => serveJetstream({ events: EVENTS, earlyReplayUs: 5 }),
    /'earlyReplayUs' needs version "v2"/,
  );
  assert.throws(() => serve({ seqBase: -1 }), /'seqBase' must be a non-negative integer/);
  assert.throws(() => serve({ lookbackFloorSeq: 0 }), /'lookbackFloorSeq' must be a positive integer/);
  assert.throws(() => serve({ earlyReplayUs: -1 }), /'earlyReplayUs' must be a non-negative integer/);
  assert.throws(
    () => serve({ errorAfter: { events: 1, error: "Nope" as "InternalError" } }),
    /'errorAfter\.error' must be "ConsumerTooSlow" or "InternalError"/,
  );
  const dictionary = new Uint8Array(64);
  new DataView(dictionary.buffer).setUint32(0, 0xec30a437, true);
  new DataView(dictionary.buffer).setUint32(4, 77, true);
  assert.throws(
    () => serve({ v2Dictionary: dictionary, v2DictionaryId: 78 }),
    /differs from the ID in v2Dictionary/,
  );
});

Deno.test("`serveCommand()` rejects v2 flags without --v2 and bad v2 values", async () => {
  const cases: [string[], RegExp][] = [
    [["--seq-base", "5"], /--seq-base needs --v2/],
    [["--early-replay-us", "5"], /--early-replay-us needs --v2/],
    [["--v2", "--error-name", "InternalError"], /--error-name needs --error-after/],
    [["--v2", "--error-after", "1", "--error-name", "Oops"], /--error-name must be ConsumerTooSlow/],
    [["--v2", "--lookback-floor-seq", "0"], /--lookback-floor-seq must be a positive integer/],
  ];
  for (const [args, message] of cases) {
    await assert.rejects(
      serveCommand(["--file", "x.ndjson", ...args]),
      (err: Error) => err instanceof UsageError && message.test(err.message),
      args.join(" "),
    );
  }
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/capture.ndjson`, LINES[0]);
    await assert.rejects(
      serveCommand(["--file", `${dir}/capture.ndjson`, "--v2", "--v2-zstd-dictionary", `${dir}/none.zdict`]),
      (err: Error) =>
        err instanceof UsageError &&
        /^--v2-zstd-dictionary ".*none\.zdict" is not a readable zstd dictionary \(/.test(err.message),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name: "`serveCommand()` runs a v2 server with --v2 and its flags",
  async fn() {
    const v2Dict = await v2Dictionary();
    const dir = await Deno.makeTempDir();
    try {
      const file = `${dir}/capture.ndjson`;
      await Deno.writeTextFile(file, LINES.slice(0, 100).join("\n") + "\n");
      const server = await spawnServer([
        "--file",
        file,
        "--close-at-end",
        "--v2",
        "--seq-base",
        "0",
        "--lookback-floor-seq",
        "51",
        "--v2-zstd-dictionary",
        v2Dict.path,
        "--error-after",
        "10",
      ], { stderr: "null" });
      const out = `${server.banner}`;
      const match = /^listening on (ws:\/\/127\.0\.0\.1:(\d+)\/subscribe) and (ws:\/\/\S+subscribeEvents)\n$/
        .exec(out);
      assert.ok(match, out);
      const port = Number(match[2]);
      assert.deepEqual(await xrpcError(port, `${V2_PATH}?cursor=50`), {
        status: 400,
        error: "CursorTooOld",
        message: "cursor 50 is older than the oldest available seq 51",
      });
      const { messages, code } = await collectMessages(match[3]);
      assert.equal(code, 1006);
      assert.equal(messages.length, 11);
      assert.equal(JSON.parse(messages[0] as string).payload.seq, 51);
      assert.equal(JSON.parse(messages[10] as string).error, "ConsumerTooSlow");
      const dictionary = await rawGet(port, DICT_PATH);
      assert.equal(dictionary.headers.get("x-zstd-dictionary-id"), String(V2_DICTIONARY_ID));
      const v1 = await collectMessages(`${match[1]}?cursor=60`, { count: 1 });
      assert.equal(JSON.parse(v1.messages[0] as string).cursor, 60);
      assert.equal(await server.stop(), 0);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("`serveJetstream()` v2 records endpoint, v2 params and seqs", async () => {
  await using server = serve();
  await collectMessages(
    `${server.v2Url}?kinds=account&dids=did:plc:abc&cursor=${SEQ0 + 10}&maxMessageSizeBytes=9000`,
  );
  await waitFor(() => server.connections[0].closeCode !== undefined);
  const [record] = server.connections;
  assert.equal(record.endpoint, "subscribeEvents");
  assert.deepEqual(record.v2, {
    kinds: ["account"],
    dids: ["did:plc:abc"],
    collections: [],
    cursor: SEQ0 + 10,
    maxMessageSizeBytes: 9000,
    zstdDictionary: undefined,
    subprotocol: false,
  });
  assert.equal(record.params.cursor, SEQ0 + 10);
  assert.deepEqual(record.params.wantedDids, ["did:plc:abc"]);
  assert.equal(record.startSeq, SEQ0 + 10);
  assert.equal(record.closeCode, 1000);
});
