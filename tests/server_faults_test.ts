import { spawnServer } from "../scripts/spawn_server.ts";
import assert from "node:assert/strict";
import { generateCapture } from "../src/server/synth.ts";
import { parseCapture } from "../src/server/capture.ts";
import { type JetstreamServerOptions, serveJetstream } from "../src/server/server.ts";
import { GARBAGE_KINDS, garbageKind, junkBytes, OVERSIZED_TEXT_CHARS } from "../src/server/faults.ts";
import { serveCommand } from "../src/cli/serve.ts";
import { UsageError } from "../src/errors.ts";
import { collectMessages, waitFor } from "./helpers/ws_collect.ts";
import { closeCode, RawWebSocket } from "./helpers/raw_ws.ts";

const START_US = 1_770_000_000_000_000;
const LINES = generateCapture({ count: 1000, seed: 7, startUs: START_US, stepUs: 1000 });
const EVENTS = parseCapture(LINES);
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function serve(options: Partial<JetstreamServerOptions> = {}): ReturnType<typeof serveJetstream> {
  return serveJetstream({ events: EVENTS, closeAtEnd: true, ...options });
}

function text(message: string | Uint8Array): string {
  return typeof message === "string" ? message : decoder.decode(message);
}

// --- refuseFirst ---------------------------------------------------------------------------------

Deno.test("`serveJetstream()` refuses the first K subscriptions with 503 when `faults.refuseFirst` is set", async () => {
  await using server = serve({ faults: { refuseFirst: 2 } });
  const http = server.url.replace(/^ws:/, "http:");
  for (const query of ["", "?cursor=abc"]) {
    // Even a request with bad parameters gets the 503: the server is not reading anything yet.
    const response = await fetch(http + query);
    assert.equal(response.status, 503);
    assert.match(response.headers.get("content-type") ?? "", /^text\/plain/);
    assert.equal(await response.text(), "service not ready: bootstrap in progress");
  }
  const { messages, code } = await collectMessages(`${server.url}?cursor=${EVENTS[990].timeUs}`);
  assert.equal(code, 1000);
  assert.deepEqual(messages, LINES.slice(990));
  assert.deepEqual(server.connections.map((c) => c.status), [503, 503, 101]);
  assert.equal(server.connections[0].error, "service not ready: bootstrap in progress");
  // A WebSocket client sees the refusal as a failed handshake.
  await using again = serve({ faults: { refuseFirst: 1 } });
  const refused = await collectMessages(again.url);
  assert.equal(refused.code, 1006);
  assert.deepEqual(refused.messages, []);
  assert.equal(again.connections[0].status, 503);
});

// --- dropEvery -----------------------------------------------------------------------------------

Deno.test("`serveJetstream()` drops every connection without a close frame after N events when `faults.dropEvery` is set", async () => {
  await using server = serve({ faults: { dropEvery: 300 } });
  const first = await collectMessages(server.url);
  assert.equal(first.code, 1006);
  assert.equal(first.closedByClient, false);
  assert.deepEqual(first.messages, LINES.slice(0, 300));
  // Resuming after the last event gets exactly the next 300, then the same drop.
  const second = await collectMessages(`${server.url}?cursor=${EVENTS[299].timeUs + 1}`);
  assert.equal(second.code, 1006);
  assert.deepEqual(second.messages, LINES.slice(300, 600));
  // Fewer events than N: a normal end.
  const tail = await collectMessages(`${server.url}?cursor=${EVENTS[800].timeUs}`);
  assert.equal(tail.code, 1000);
  assert.deepEqual(tail.messages, LINES.slice(800));
  await waitFor(() => server.connections.every((c) => c.closeCode !== undefined));
  assert.deepEqual(server.connections.map((c) => [c.dropped, c.sent, c.closeCode]), [
    [true, 300, 1006],
    [true, 300, 1006],
    [false, 200, 1000],
  ]);
});

Deno.test("`serveJetstream()` counts only the events a connection selected towards `faults.dropEvery`", async () => {
  await using server = serve({ faults: { dropEvery: 20 } });
  const { messages, code } = await collectMessages(`${server.url}?wantedCollections=app.bsky.feed.repost`);
  const selected = LINES.filter((line) => {
    const event = JSON.parse(line);
    return event.kind !== "commit" || event.commit.collection === "app.bsky.feed.repost";
  });
  assert.equal(code, 1006);
  assert.deepEqual(messages, selected.slice(0, 20));
});

// --- stallAfter ----------------------------------------------------------------------------------

Deno.test("`serveJetstream()` stalls the first connection after N events, without a close, when `faults.stallAfter` is set", async () => {
  await using server = serve({ faults: { stallAfter: 5 } });
  const ws = await RawWebSocket.connect(server.port, "/subscribe");
  try {
    const texts: string[] = [];
    for (let i = 0; i < 5; i++) texts.push(decoder.decode((await ws.next())!.payload));
    assert.deepEqual(texts, LINES.slice(0, 5));
    await waitFor(() => server.connections[0].stalled);
    // Nothing more, not even a pong, yet the connection stays open.
    await ws.send(9, encoder.encode("ping"));
    const next = ws.next();
    const quiet = await Promise.race([next, new Promise((r) => setTimeout(() => r("quiet"), 300))]);
    assert.equal(quiet, "quiet");
    assert.equal(server.connections[0].closeCode, undefined);
    assert.equal(server.connections[0].sent, 5);
    // A client that gives up can still leave with a closing handshake.
    await ws.send(8, new Uint8Array([0x03, 0xe8]));
    const close = await next;
    assert.equal(close?.opcode, 8);
    assert.equal(closeCode(close!), 1000);
    assert.equal(await ws.next(), null);
  } finally {
    ws.close();
  }
  await waitFor(() => server.connections[0].closeCode !== undefined);
  assert.equal(server.connections[0].closeCode, 1000);
  // Only the first connection stalls (stallConnections defaults to 1).
  const { messages, code } = await collectMessages(`${server.url}?cursor=${EVENTS[5].timeUs}`);
  assert.equal(code, 1000);
  assert.deepEqual(messages, LINES.slice(5));
  assert.equal(server.connections[1].stalled, false);
});

Deno.test("`serveJetstream()` stalls the first M connections with `faults.stallConnections`, and at once for `stallAfter: 0`", async () => {
  await using server = serve({ faults: { stallAfter: 0, stallConnections: 2, refuseFirst: 1 } });
  // The refused request does not count as a stalled connection.
  assert.equal((await collectMessages(server.url)).code, 1006);
  for (let i = 0; i < 2; i++) {
    // A WebSocket client sees silence and can still close (the server echoes its close frame).
    const { messages, timedOut, code } = await collectMessages(server.url, { timeoutMs: 200 });
    assert.equal(timedOut, true);
    assert.equal(code, 1005);
    assert.deepEqual(messages, []);
  }
  const healthy = await collectMessages(`${server.url}?cursor=${EVENTS[999].timeUs}`);
  assert.deepEqual(healthy.messages, [LINES[999]]);
  await waitFor(() => server.connections.every((c) => c.status !== 101 || c.closeCode !== undefined));
  assert.deepEqual(server.connections.map((c) => c.stalled), [false, true, true, false]);
});

Deno.test("`serveJetstream()` drops a stalled connection on shutdown", async () => {
  const server = serve({ faults: { stallAfter: 1 } });
  const ws = await RawWebSocket.connect(server.port, "/subscribe");
  try {
    assert.equal(decoder.decode((await ws.next())!.payload), LINES[0]);
    await waitFor(() => server.connections[0].stalled);
    await server.shutdown();
    // No close frame: the TCP connection just ends.
    assert.equal(await ws.next(), null);
  } finally {
    ws.close();
  }
  assert.equal(server.connections[0].closeCode, 1006);
});

// --- garbageEvery --------------------------------------------------------------------------------

Deno.test("`serveJetstream()` injects a bad frame after every N events, cycling kinds, when `faults.garbageEvery` is set", async () => {
  await using server = serve({ faults: { garbageEvery: 100 } });
  const { messages, code } = await collectMessages(`${server.url}?cursor=${EVENTS[400].timeUs}`, {
    timeoutMs: 10_000,
  });
  assert.equal(code, 1000);
  // 600 events and 6 bad frames, each right after the 100th, 200th, ... event of the connection.
  assert.equal(messages.length, 606);
  const events = messages.filter((_, i) => (i + 1) % 101 !== 0);
  assert.deepEqual(events, LINES.slice(400));
  const bad = messages.filter((_, i) => (i + 1) % 101 === 0);
  const after = (k: number) => JSON.parse(LINES[400 + 100 * (k + 1) - 1]);
  // Connection 1 starts the cycle at malformed JSON.
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((j) => garbageKind(1, j)), [...GARBAGE_KINDS, "malformed-json"]);
  assert.equal(typeof bad[0], "string");
  assert.throws(() => JSON.parse(bad[0] as string), SyntaxError);
  assert.ok(LINES[499].startsWith(bad[0] as string));
  assert.ok(bad[1] instanceof Uint8Array);
  assert.deepEqual(bad[1], junkBytes(1, 1));
  assert.deepEqual([...(bad[1] as Uint8Array).subarray(0, 4)], [0xde, 0xad, 0xbe, 0xef]);
  assert.deepEqual(JSON.parse(bad[2] as string), {
    did: after(2).did,
    time_us: after(2).time_us,
    kind: "heartbeat",
  });
  const missing = JSON.parse(bad[3] as string);
  const expected = after(3);
  delete expected.time_us;
  assert.deepEqual(missing, expected);
  assert.equal("time_us" in missing, false);
  const oversized = bad[4] as string;
  assert.ok(encoder.encode(oversized).length > 2_000_000);
  const big = JSON.parse(oversized);
  assert.equal(big.kind, "commit");
  assert.equal(big.time_us, after(4).time_us);
  assert.equal(big.commit.record.text.length, OVERSIZED_TEXT_CHARS);
  assert.equal(big.commit.rkey, "garbage-1-4");
  assert.throws(() => JSON.parse(bad[5] as string), SyntaxError);
  await waitFor(() => server.connections[0].closeCode !== undefined);
  assert.equal(server.connections[0].garbage, 6);
  assert.equal(server.connections[0].sent, 600);
  // The next connection starts one kind later, so reconnecting clients meet every kind.
  const second = await collectMessages(`${server.url}?cursor=${EVENTS[800].timeUs}`);
  assert.ok(second.messages[100] instanceof Uint8Array);
  assert.deepEqual(second.messages[100], junkBytes(2, 0));
});

Deno.test("`serveJetstream()` compresses JSON garbage on compressed connections", async () => {
  const compressor = (text: string): Uint8Array => encoder.encode(`Z:${text}`);
  await using server = serve({ compressor, faults: { garbageEvery: 2 } });
  const { messages } = await collectMessages(`${server.url}?compress=true&cursor=${EVENTS[994].timeUs}`);
  // Connection 1: events 994, 995, malformed; 996, 997, junk; 998, 999, unknown kind.
  assert.equal(messages.length, 9);
  assert.deepEqual(messages[0], compressor(LINES[994]));
  assert.equal(text(messages[2]), `Z:${LINES[995].slice(0, LINES[995].length >> 1)}`);
  assert.deepEqual(messages[5], junkBytes(1, 1));
  const unknown = JSON.parse(text(messages[8]).slice(2));
  assert.equal(unknown.kind, "heartbeat");
  assert.equal(unknown.time_us, EVENTS[999].timeUs);
});

Deno.test("`serveJetstream()` applies garbage before the drop when both are due", async () => {
  await using server = serve({ faults: { garbageEvery: 3, dropEvery: 6 } });
  const { messages, code } = await collectMessages(server.url);
  assert.equal(code, 1006);
  assert.equal(messages.length, 8);
  assert.deepEqual(messages.slice(0, 3), LINES.slice(0, 3));
  assert.deepEqual(messages.slice(4, 7), LINES.slice(3, 6));
  assert.ok(messages[7] instanceof Uint8Array);
  assert.equal(server.connections[0].garbage, 2);
  assert.equal(server.connections[0].dropped, true);
});

// --- fileOrder -----------------------------------------------------------------------------------

Deno.test("`serveJetstream()` serves a capture out of order as it is, skipping events before the cursor in time, when `faults.fileOrder` is set", async () => {
  // As a buggy legacy server might; without the fault the capture is served in time_us order.
  const shuffled = [EVENTS[5], EVENTS[1], EVENTS[9], EVENTS[3], EVENTS[7]];
  await using server = serve({ events: shuffled, faults: { fileOrder: true } });
  const { messages } = await collectMessages(`${server.url}?cursor=${EVENTS[4].timeUs}`);
  assert.deepEqual(messages, [LINES[5], LINES[9], LINES[7]]);
  const all = await collectMessages(server.url);
  assert.deepEqual(all.messages, [LINES[5], LINES[1], LINES[9], LINES[3], LINES[7]]);
  await using sorted = serve({ events: shuffled });
  assert.deepEqual((await collectMessages(sorted.url)).messages, [
    LINES[1],
    LINES[3],
    LINES[5],
    LINES[7],
    LINES[9],
  ]);
});

// --- validation and CLI --------------------------------------------------------------------------

Deno.test("`serveJetstream()` throws RangeError for bad fault counts", () => {
  const cases: [JetstreamServerOptions["faults"], RegExp][] = [
    [{ dropEvery: 0 }, /'faults\.dropEvery' must be a positive integer: current value is 0/],
    [{ garbageEvery: 1.5 }, /'faults\.garbageEvery' must be a positive integer: current value is 1\.5/],
    [{ refuseFirst: -1 }, /'faults\.refuseFirst' must be a non-negative integer/],
    [{ stallAfter: NaN }, /'faults\.stallAfter' must be a non-negative integer/],
  ];
  for (const [faults, message] of cases) {
    assert.throws(() => serveJetstream({ events: EVENTS, faults }), message);
  }
});

Deno.test("`serveJetstream()` throws TypeError for a `faults.fileOrder` that is no boolean", () => {
  assert.throws(
    () => serveJetstream({ events: EVENTS, faults: { fileOrder: "yes" as unknown as boolean } }),
    (err: Error) =>
      err instanceof TypeError &&
      err.message === `Cannot serve as 'faults.fileOrder' must be a boolean: current value is "yes"`,
  );
});

Deno.test("`serveCommand()` rejects bad fault flags with UsageError", async () => {
  for (
    const [flag, value] of [
      ["--drop-every", "0"],
      ["--garbage-every", "x"],
      ["--refuse-first", "-1"],
      ["--stall-after", "1.5"],
    ]
  ) {
    await assert.rejects(
      serveCommand(["--file", "x.ndjson", flag, value]),
      (err: Error) =>
        err instanceof UsageError && err.message.startsWith(`${flag} must be `) &&
        err.message.endsWith(`: current value is ${JSON.stringify(value)}`),
    );
  }
});

Deno.test("`serveCommand()` passes fault flags to the server", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/capture.ndjson`;
    await Deno.writeTextFile(file, LINES.slice(0, 100).join("\n") + "\n");
    const server = await spawnServer(
      [
        "--file",
        file,
        "--close-at-end",
        "--refuse-first",
        "1",
        "--drop-every",
        "40",
        "--garbage-every",
        "30",
      ],
      { stderr: "null" },
    );
    const url = server.url;

    const refused = await fetch(url.replace(/^ws:/, "http:"));
    assert.equal(refused.status, 503);
    await refused.body?.cancel();
    const { messages, code } = await collectMessages(url);
    assert.equal(code, 1006);
    assert.equal(messages.length, 41);
    assert.deepEqual(messages.slice(0, 30), LINES.slice(0, 30));
    assert.ok(messages[30] instanceof Uint8Array, "connection 2 starts the cycle at binary junk");
    assert.deepEqual(messages.slice(31), LINES.slice(30, 40));
    assert.equal(await server.stop(), 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
