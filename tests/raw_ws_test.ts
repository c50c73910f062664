import assert from "node:assert/strict";
import {
  type CloseCause,
  CloseFrameFinder,
  ENDLESS_MESSAGE_BYTES,
  openRawConnection,
  RawConnection,
} from "../src/jetstream/raw_ws.ts";
import {
  ConnectError,
  type Connection,
  type Frame,
  InvalidTextFrame,
  openConnection,
  OversizedFrame,
} from "../src/jetstream/socket.ts";
import { runBackfillSync } from "../src/backfill.ts";
import { UsageError } from "../src/errors.ts";
import { parseCapture } from "../src/server/capture.ts";
import { acceptWebSocket, readRequestHead } from "../src/server/http1.ts";
import { serveJetstream } from "../src/server/server.ts";
import { generateCapture } from "../src/server/synth.ts";
import { commit, did } from "./helpers/events.ts";
import { encodeFrame } from "./helpers/raw_ws.ts";
import { bodyInMessage } from "../src/jetstream/utf8.ts";
import { refusedPort, syncReporting } from "./helpers/loopback.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const START_US = 1_770_000_000_000_000;
const LINES = generateCapture({ count: 3000, seed: 5, startUs: START_US, stepUs: 1000 });
const EVENTS = parseCapture(LINES);

/** Every frame until the end, and the cause. */
async function drain(conn: Connection): Promise<Frame[]> {
  const all: Frame[] = [];
  for (let frames = await conn.next(); frames; frames = await conn.next()) {
    all.push(...frames);
    if (conn instanceof RawConnection) {
      // Each message's payload size comes with it: a text's UTF-8 length, a binary's length.
      assert.deepEqual(
        conn.frameBytes,
        frames.map((f) => typeof f === "string" ? encoder.encode(f).length : f.byteLength),
      );
    }
  }
  return all;
}

// --- a scripted server on raw TCP, for what Deno.upgradeWebSocket cannot send -------------------

/** A server frame (unmasked unless `mask`), with 7-, 16- or 64-bit length as the payload needs. */
function frame(
  opcode: number,
  payload: Uint8Array | string,
  options: { fin?: boolean; rsv?: number; mask?: boolean } = {},
): Uint8Array {
  return encodeFrame(opcode, payload, { mask: false, ...options });
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

interface ClientFrame {
  fin: boolean;
  opcode: number;
  masked: boolean;
  payload: Uint8Array;
}

/** The server's end of one connection: the request, raw writes, and the client's frames. */
class Peer {
  readonly conn: Deno.Conn;
  readonly target: string;
  readonly headers: Headers;
  #buf: Uint8Array;

  constructor(conn: Deno.Conn, target: string, headers: Headers, rest: Uint8Array) {
    this.conn = conn;
    this.target = target;
    this.headers = headers;
    this.#buf = rest;
  }

  async write(...parts: Uint8Array[]): Promise<void> {
    const bytes = concat(...parts);
    let off = 0;
    while (off < bytes.length) off += await this.conn.write(bytes.subarray(off));
  }

  /** The next frame the client sent, or `null` at the end of the stream. */
  async readFrame(): Promise<ClientFrame | null> {
    for (;;) {
      const b = this.#buf;
      if (b.length >= 2) {
        let length = b[1] & 0x7f;
        let off = 2;
        if (length === 126) {
          length = (b[2] << 8) | b[3];
          off = 4;
        }
        const masked = (b[1] & 0x80) !== 0;
        const keyAt = off;
        if (masked) off += 4;
        if (b.length >= off + length) {
          const payload = b.slice(off, off + length);
          if (masked) { for (let i = 0; i < length; i++) payload[i] ^= b[keyAt + (i & 3)]; }
          this.#buf = b.slice(off + length);
          return { fin: (b[0] & 0x80) !== 0, opcode: b[0] & 0x0f, masked, payload };
        }
      }
      const chunk = new Uint8Array(65536);
      let n: number | null;
      try {
        n = await this.conn.read(chunk);
      } catch {
        n = null;
      }
      if (n === null) return null;
      this.#buf = concat(this.#buf, chunk.subarray(0, n));
    }
  }

  close(): void {
    try {
      this.conn.close();
    } catch { /* already closed */ }
  }
}

/** Answers the handshake on `conn` and runs `script` on it; `onPeer` gets the peer first. */
async function servePeer(
  conn: Deno.Conn,
  script: (peer: Peer, handshake: Uint8Array) => Promise<void>,
  onPeer: (peer: Peer) => void,
): Promise<void> {
  const head = await readRequestHead(conn);
  assert.ok(head);
  const peer = new Peer(conn, head.target, head.headers, head.rest);
  onPeer(peer);
  const accepted = await acceptWebSocket(head.headers);
  assert.ok("response" in accepted);
  try {
    await script(peer, accepted.response);
  } finally {
    peer.close();
  }
}

/**
 * Serves one connection on 127.0.0.1 with `script`. With `upgrade` (the default) the handshake is
 * answered first; the script may send more in the same write through `Peer.write`.
 */
function scripted(
  script: (peer: Peer, handshake: Uint8Array) => Promise<void>,
): { url: string; done: Promise<void> } & AsyncDisposable {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  let peer: Peer | undefined;
  const done = (async () => {
    const conn = await listener.accept();
    listener.close();
    await servePeer(conn, script, (p) => peer = p);
  })();
  return {
    url: `ws://127.0.0.1:${port}`,
    done,
    [Symbol.asyncDispose]: async () => {
      try {
        listener.close();
      } catch { /* closed after accept */ }
      peer?.close();
      await done.catch(() => {});
    },
  };
}

// --- a Deno.serve server ------------------------------------------------------------------------

function denoServer(
  onSocket: (socket: WebSocket, headers: Headers) => void,
): { url: string; server: Deno.HttpServer } & AsyncDisposable {
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (request) => {
    if (request.headers.get("upgrade") !== "websocket") {
      return new Response("not a websocket", { status: 400 });
    }
    // The request's headers cannot be read once it is upgraded.
    const headers = new Headers(request.headers);
    const { socket, response } = Deno.upgradeWebSocket(request);
    onSocket(socket, headers);
    return response;
  });
  return {
    url: `ws://127.0.0.1:${server.addr.port}`,
    server,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

// --- tests ---------------------------------------------------------------------------------------

Deno.test("`openRawConnection()` receives text and binary messages in order, then the server's close", async () => {
  let closedOnServer: { code: number; reason: string } | undefined;
  let userAgent: string | null = null;
  await using srv = denoServer((socket, headers) => {
    userAgent = headers.get("user-agent");
    socket.onopen = () => {
      socket.send("one");
      socket.send(new Uint8Array([1, 2, 3]));
      socket.send("ünïcödé ✓");
      socket.send(new Uint8Array(0));
      socket.send("");
      socket.close(4001, "done here");
    };
    socket.onclose = (e) => closedOnServer = { code: e.code, reason: e.reason };
  });
  const conn = await openRawConnection(`${srv.url}/x?y=1`, { idleTimeoutMs: 5000 });
  const frames = await drain(conn);
  assert.deepEqual(frames, ["one", new Uint8Array([1, 2, 3]), "ünïcödé ✓", new Uint8Array(0), ""]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 4001, reason: "done here" });
  assert.equal(conn.bytesReceived, 3 + 3 + encoder.encode("ünïcödé ✓").length);
  assert.equal(await conn.next(), null);
  await conn.closed();
  for (let i = 0; i < 100 && !closedOnServer; i++) await new Promise((r) => setTimeout(r, 10));
  // The close frame was echoed with the same code.
  assert.equal(closedOnServer?.code, 4001);
  assert.equal(userAgent, "jetfill");
});

Deno.test("`openRawConnection()` keeps frames sent in the same write as the 101 response", async () => {
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "first"), frame(1, "second"), frame(8, new Uint8Array([3, 232])));
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await drain(conn), ["first", "second"]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "" });
  await conn.closed();
});

Deno.test("`openRawConnection()` hands on a text message that is not UTF-8 as an InvalidTextFrame", async () => {
  const invalid = new Uint8Array([0x7b, 0x22, 0x61, 0x22, 0x3a, 0x22, 0xff, 0xfe, 0x22, 0x7d]); // {"a":"\xff\xfe"}
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(
      handshake,
      frame(1, "before"),
      frame(1, invalid),
      // A real U+FFFD (EF BF BD) is text like any other.
      frame(1, '{"text":"\uFFFD"}'),
      // Invalid across fragments: a two-byte sequence cut and followed by ASCII.
      frame(1, new Uint8Array([0x22, 0xc3]), { fin: false }),
      frame(0, new Uint8Array([0x28, 0x22])),
      frame(1, "after"),
      frame(8, new Uint8Array([3, 232])),
    );
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  const frames = await drain(conn);
  assert.deepEqual(frames, [
    "before",
    new InvalidTextFrame(invalid.length),
    '{"text":"\uFFFD"}',
    new InvalidTextFrame(4),
    "after",
  ]);
  assert.ok(frames[1] instanceof InvalidTextFrame);
  await conn.closed();
});

Deno.test("runBackfillSync() counts a text frame that is not UTF-8 as invalid_utf8 and stores the rest", async () => {
  // Posts with text beyond ASCII, so that bytes and characters differ.
  const [a, b, c] = LINES.filter((l) => l.includes('"app.bsky.feed.post"') && /[^ -~]/.test(l)).slice(
    0,
    3,
  );
  // The second event with a byte that is not UTF-8 inside its DID: decoded leniently, it would be
  // stored with U+FFFD in place of that byte.
  const bad = encoder.encode(b);
  bad[b.indexOf("did:") + 4] = 0xff;
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, a), frame(1, bad), frame(1, c));
    await peer.readFrame();
  });
  const dir = await Deno.makeTempDir();
  try {
    const { stats, reports } = await syncReporting({
      instance: `${srv.url}/subscribe`,
      kv: `${dir}/q.sqlite`,
      numRecords: 2,
    });
    assert.equal(stats.stopReason, "limit");
    assert.equal(stats.recordsStored, 2);
    assert.deepEqual(stats.skipped, { invalid_utf8: 1 });
    // Bytes on the wire, not characters.
    assert.equal(stats.bytesReceived, encoder.encode(a).length + bad.length + encoder.encode(c).length);
    assert.ok(reports.some((r) => r.reason === "invalid_utf8" && r.message.includes("not valid UTF-8")));
    const kv = await Deno.openKv(`${dir}/q.sqlite`);
    try {
      const got: unknown[] = [];
      const { promise, resolve } = Promise.withResolvers<void>();
      kv.listenQueue((m) => {
        got.push(...(m as { records: unknown[] }).records);
        if (got.length >= 2) resolve();
      });
      await promise;
      assert.deepEqual(got, [JSON.parse(a), JSON.parse(c)]);
    } finally {
      kv.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("`openRawConnection()` joins fragmented messages, with control frames between the fragments", async () => {
  const big = "x".repeat(70_000); // 64-bit length
  const mid = "y".repeat(300); // 16-bit length
  const seen: { pong?: { masked: boolean; payload: string }; close?: ClientFrame } = {};
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(
      handshake,
      frame(1, "he", { fin: false }),
      frame(0, "ll", { fin: false }),
      frame(9, "ping!"),
      frame(10, "unsolicited pong"),
      frame(0, "o"),
      frame(2, new Uint8Array([1, 2]), { fin: false }),
      frame(0, new Uint8Array([3]), { fin: true }),
      frame(1, mid),
    );
    // Split a frame across writes, header included, to exercise partial reads.
    const tail = concat(frame(1, big), frame(1, "after"));
    await peer.write(tail.subarray(0, 5));
    await new Promise((r) => setTimeout(r, 20));
    await peer.write(tail.subarray(5, 40_000));
    await new Promise((r) => setTimeout(r, 20));
    await peer.write(
      tail.subarray(40_000),
      frame(8, concat(new Uint8Array([3, 232]), encoder.encode("bye"))),
    );
    for (let f = await peer.readFrame(); f; f = await peer.readFrame()) {
      if (f.opcode === 10) seen.pong = { masked: f.masked, payload: decoder.decode(f.payload) };
      if (f.opcode === 8) {
        seen.close = f;
        break;
      }
    }
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  const frames = await drain(conn);
  assert.deepEqual(frames, ["hello", new Uint8Array([1, 2, 3]), mid, big, "after"]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "bye" });
  await srv.done;
  await conn.closed();
  assert.deepEqual(seen.pong, { masked: true, payload: "ping!" });
  assert.equal(seen.close?.masked, true);
  assert.deepEqual([...seen.close.payload], [3, 232]);
});

Deno.test("`openRawConnection()` answers a ping with a masked pong carrying its payload", async () => {
  const seen: { pong?: ClientFrame | null } = {};
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(9, new Uint8Array([0, 255, 7, 42, 9])));
    seen.pong = await peer.readFrame();
    await peer.write(frame(1, "done"), frame(8, new Uint8Array(0)));
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await drain(conn), ["done"]);
  // A close frame without a status code reports 1005.
  assert.deepEqual(conn.cause, { kind: "closed", code: 1005, reason: "" });
  await srv.done;
  await conn.closed();
  assert.equal(seen.pong?.opcode, 10);
  assert.equal(seen.pong.masked, true);
  assert.deepEqual([...seen.pong.payload], [0, 255, 7, 42, 9]);
});

Deno.test("`openRawConnection()` reports 1006 when the TCP connection ends without a close frame", async () => {
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "a"), frame(1, "b"), frame(1, "partial").subarray(0, 4));
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await drain(conn), ["a", "b"]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1006, reason: "" });
  await conn.closed();
});

/**
 * A server sends "fine", then `bad`, then "never": what the client took, why its connection ended,
 * and the code of the close frame it sent back.
 */
async function afterBadFrame(bad: Uint8Array): Promise<{ cause: CloseCause | undefined; closeCode: number }> {
  const seen: { close?: ClientFrame | null } = {};
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "fine"), bad, frame(1, "never"));
    seen.close = await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await drain(conn), ["fine"]);
  await srv.done;
  await conn.closed();
  assert.equal(seen.close!.opcode, 8);
  return { cause: conn.cause, closeCode: (seen.close!.payload[0] << 8) | seen.close!.payload[1] };
}

Deno.test("`openRawConnection()` closes with 1002 on a masked server frame, reserved bits and other protocol errors", async () => {
  for (
    const bad of [
      frame(1, "masked", { mask: true }),
      frame(1, "rsv", { rsv: 0x40 }),
      frame(9, "split ping", { fin: false }),
      frame(3, "unknown opcode"),
      frame(0, "continuation of nothing"),
      concat(frame(1, "a", { fin: false }), frame(1, "b")),
    ]
  ) {
    const { cause, closeCode } = await afterBadFrame(bad);
    assert.equal(cause?.kind === "closed" && cause.code, 1002);
    assert.equal(closeCode, 1002);
  }
});

Deno.test("`openRawConnection()` skips a message over `maxMessageBytes`, fragmented or not, and reads on", async () => {
  const big = '{"did":"did:plc:x","time_us":1764000000000001,"kind":"commit","commit":{"record":{"text":"' +
    "z".repeat(600_000) + '"}}}';
  const cases: { parts: Uint8Array[]; bytes: number; binary: boolean }[] = [
    { parts: [frame(1, "z".repeat(2000))], bytes: 2000, binary: false },
    { parts: [frame(2, new Uint8Array(1500).fill(7))], bytes: 1500, binary: true },
    // Fragmented: over the limit only with its second part, and ended by an empty last part.
    {
      parts: [
        frame(1, "z".repeat(600), { fin: false }),
        frame(0, "z".repeat(600), { fin: false }),
        frame(0, ""),
      ],
      bytes: 1200,
      binary: false,
    },
    // Larger than the read buffer: skipped across many reads.
    { parts: [frame(1, big)], bytes: big.length, binary: false },
  ];
  for (const { parts, bytes, binary } of cases) {
    await using srv = scripted(async (peer, handshake) => {
      await peer.write(
        handshake,
        frame(1, "small"),
        ...parts,
        frame(1, "after"),
        frame(8, new Uint8Array([3, 232])),
      );
      await peer.readFrame();
    });
    const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000, maxMessageBytes: 1000 });
    const frames = await drain(conn);
    assert.equal(frames.length, 3);
    assert.equal(frames[0], "small");
    const skipped = frames[1];
    assert.ok(skipped instanceof OversizedFrame);
    assert.deepEqual([skipped.byteLength, skipped.binary, skipped.limit], [bytes, binary, 1000]);
    assert.ok(skipped.head.length > 0 && skipped.head.length <= 512);
    assert.equal(frames[2], "after");
    assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "" });
    await srv.done;
    await conn.closed();
  }
});

Deno.test("runBackfillSync() counts an event too large to read as oversized and goes on past it", async () => {
  const T = 1764000000000000;
  const post = (i: number, text: string) => JSON.stringify(commit(T + i, { did: did(i), text }));
  // 40 MiB: over the 32 MiB a connection reads, so it is not even held.
  const lines = [post(1, "a"), post(2, "é".repeat(20 * 1024 * 1024)), post(3, "b")];
  await using server = serveJetstream({ events: parseCapture(lines), closeAtEnd: true });
  const dir = await Deno.makeTempDir();
  try {
    const { stats, reports } = await syncReporting({
      instance: server.url,
      kv: `${dir}/q.sqlite`,
      startTimestamp: T,
    });
    assert.equal(stats.stopReason, "closed");
    assert.equal(stats.recordsStored, 2);
    assert.deepEqual(stats.skipped, { oversized: 1 });
    assert.equal(stats.reconnects, 0);
    assert.ok(
      reports.some((r) =>
        r.reason === "oversized" &&
        /^event at time_us 1764000000000002 of 41943\d+ bytes is over the 33554432-byte limit of a message the connection reads; skipped unread$/
          .test(r.message)
      ),
      JSON.stringify(reports),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("`openRawConnection()` receives 2 MiB text and binary messages intact", async () => {
  const text = Array.from({ length: 2 * 1024 * 1024 / 16 }, (_, i) => i.toString(16).padStart(16, "-")).join(
    "",
  );
  const binary = new Uint8Array(2 * 1024 * 1024).map((_, i) => (i * 31) & 255);
  await using srv = denoServer((socket) => {
    socket.onopen = () => {
      socket.send("before");
      socket.send(text);
      socket.send(binary);
      socket.send("after");
      socket.close(1000);
    };
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  const frames = await drain(conn);
  assert.equal(frames.length, 4);
  assert.equal(frames[0], "before");
  assert.ok(frames[1] === text, "the 2 MiB text differs");
  assert.deepEqual(frames[2], binary);
  assert.equal(frames[3], "after");
  assert.equal(conn.cause?.kind, "closed");
  await conn.closed();
});

Deno.test("`openRawConnection()` hands out binary messages that later reads do not overwrite", async () => {
  await using srv = denoServer((socket) => {
    socket.onopen = async () => {
      for (let i = 0; i < 200; i++) {
        socket.send(new Uint8Array(4000).fill(i));
        if (i % 20 === 0) await new Promise((r) => setTimeout(r, 1));
      }
      socket.close(1000);
    };
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  const frames = await drain(conn);
  assert.equal(frames.length, 200);
  frames.forEach((f, i) => {
    assert.ok(f instanceof Uint8Array);
    assert.ok(f.every((b) => b === i), `message ${i} was overwritten`);
  });
  await conn.closed();
});

Deno.test("`openRawConnection()` throws a ConnectError with the status and body of a refused upgrade", async () => {
  await using server = serveJetstream({ events: EVENTS, closeAtEnd: true });
  const url = `${server.url}?cursor=abc`;
  const err = await openRawConnection(url, { idleTimeoutMs: 5000 }).then(
    () => assert.fail("expected a refusal"),
    (e: unknown) => e as ConnectError,
  );
  assert.ok(err instanceof ConnectError);
  assert.equal(err.status, 400);
  assert.ok(err.body && err.body.length > 0);
  assert.equal(err.body, server.connections[0].error);
  assert.equal(err.message, `${url} refused the connection: HTTP 400: ${err.body}`);

  // A chunked body (a streamed response) is read too.
  await using chunked = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, () => {
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(encoder.encode("service not ready: "));
        c.enqueue(encoder.encode("bootstrap in progress"));
        c.close();
      },
    });
    return new Response(body, { status: 503 });
  });
  const url2 = `ws://127.0.0.1:${chunked.addr.port}/subscribe`;
  const err2 = await openRawConnection(url2, { idleTimeoutMs: 5000 }).catch((e: unknown) =>
    e as ConnectError
  );
  assert.ok(err2 instanceof ConnectError);
  assert.equal(err2.status, 503);
  assert.equal(err2.body, "service not ready: bootstrap in progress");
  assert.equal(
    err2.message,
    `${url2} refused the connection: HTTP 503: service not ready: bootstrap in progress`,
  );
});

Deno.test("`openRawConnection()` throws a ConnectError without a status for network and handshake failures", async () => {
  const port = await refusedPort();
  const refused = await openRawConnection(`ws://127.0.0.1:${port}/`).catch((e: unknown) => e as ConnectError);
  assert.ok(refused instanceof ConnectError);
  assert.match(refused.message, new RegExp(`^cannot connect to ws://127.0.0.1:${port}/: `));
  assert.equal(refused.status, undefined);

  await using srv = scripted(async (peer) => {
    await peer.write(encoder.encode(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        "Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n",
    ));
    await peer.readFrame();
  });
  const bad = await openRawConnection(srv.url).catch((e: unknown) => e as ConnectError);
  assert.ok(bad instanceof ConnectError);
  assert.match(bad.message, /Sec-WebSocket-Accept/);
});

Deno.test("`openRawConnection()` ends an idle connection, and its pending `next()` resolves", async () => {
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "only"));
    await peer.readFrame(); // the client's close frame, or the end
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 150 });
  assert.deepEqual(await conn.next(), ["only"]);
  const t0 = performance.now();
  assert.equal(await conn.next(), null);
  const waited = performance.now() - t0;
  assert.deepEqual(conn.cause, { kind: "idle" });
  assert.ok(waited >= 140 && waited < 1000, `waited ${waited} ms`);
  await conn.closed();
});

Deno.test("`openRawConnection()` ends a connection that only pings: pings are not messages", async () => {
  let pongs = 0;
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "only"));
    // A stalled stream whose server still pings every 50 ms, as Jetstream pings every 30 s.
    const pinger = setInterval(() => peer.write(frame(9, "keepalive")).catch(() => {}), 50);
    try {
      for (let f = await peer.readFrame(); f; f = await peer.readFrame()) {
        if (f.opcode === 10) pongs++;
        if (f.opcode === 8) break;
      }
    } finally {
      clearInterval(pinger);
    }
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 400 });
  assert.deepEqual(await conn.next(), ["only"]);
  assert.equal(await conn.next(), null);
  assert.deepEqual(conn.cause, { kind: "idle" });
  await conn.closed();
  await srv.done;
  assert.ok(pongs >= 3, `answered ${pongs} pings`);
});

Deno.test("`openRawConnection()` does not count a busy consumer's time as idle", async () => {
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "one"), frame(1, "two"));
    await new Promise((r) => setTimeout(r, 50));
    await peer.write(frame(1, "three"), frame(8, new Uint8Array([3, 232])));
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 150 });
  assert.deepEqual(await conn.next(), ["one", "two"]);
  await new Promise((r) => setTimeout(r, 400)); // the consumer is busy, not the server idle
  assert.deepEqual(await drain(conn), ["three"]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "" });
  await conn.closed();
});

Deno.test("`openRawConnection()` closes on abort: a pending `next()` resolves and the server gets 1000", async () => {
  const seen: { close?: ClientFrame | null } = {};
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake);
    seen.close = await peer.readFrame();
  });
  const controller = new AbortController();
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000, signal: controller.signal });
  const pending = conn.next();
  setTimeout(() => controller.abort(), 30);
  assert.equal(await pending, null);
  assert.deepEqual(conn.cause, { kind: "aborted" });
  await srv.done;
  await conn.closed();
  assert.equal(seen.close!.opcode, 8);
  assert.equal(seen.close!.masked, true);
  assert.equal((seen.close!.payload[0] << 8) | seen.close!.payload[1], 1000);

  // Aborted before or during the handshake: a ConnectError.
  const already = await openRawConnection(srv.url, { signal: AbortSignal.abort() }).catch((e: unknown) => e);
  assert.ok(already instanceof ConnectError);
  await using silent = scripted(async (peer) => {
    await peer.readFrame(); // never answers the handshake
  });
  const during = new AbortController();
  setTimeout(() => during.abort(), 30);
  const cut = await openRawConnection(silent.url, { signal: during.signal }).catch((e: unknown) => e);
  assert.ok(cut instanceof ConnectError);
  assert.equal(cut.message, `cannot connect to ${silent.url}: aborted`);
});

Deno.test("`drain()` sends a close and reads on: what the server sent before it saw the close, then its close", async () => {
  const seen: { close?: ClientFrame | null } = {};
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "one"));
    seen.close = await peer.readFrame();
    // Sent after the client's close, before the server's answer: a server writing as it reads.
    await peer.write(frame(1, "two"), frame(1, "three"));
    await new Promise((r) => setTimeout(r, 50));
    await peer.write(frame(1, "four"), frame(8, new Uint8Array([3, 232])));
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await conn.next(), ["one"]);
  assert.equal(conn.drain(5000), true);
  assert.equal(conn.drain(5000), false, "a second drain does nothing");
  assert.equal(conn.sendText("{}"), false, "nothing goes out after the close");
  assert.deepEqual(await drain(conn), ["two", "three", "four"]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "" });
  await srv.done;
  await conn.closed();
  assert.equal(seen.close!.opcode, 8);
  assert.equal((seen.close!.payload[0] << 8) | seen.close!.payload[1], 1000);
});

Deno.test("`drain()` of a server that never answers the close ends after its time, keeping what was read", async () => {
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "one"));
    await peer.readFrame(); // the close, never answered
    await peer.write(frame(1, "two"));
    await peer.readFrame(); // until the client drops the connection
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await conn.next(), ["one"]);
  const t = performance.now();
  assert.equal(conn.drain(300, 5000), true);
  assert.deepEqual(await drain(conn), ["two"]);
  const took = performance.now() - t;
  assert.deepEqual(conn.cause, { kind: "aborted" });
  assert.ok(took >= 250, `ended after ${took} ms`);
  await srv.done;
  await conn.closed();
});

Deno.test("`drain()` counts only the time spent waiting for the server, up to its cap", async () => {
  // The server answers the close at once, after two more messages; the consumer takes 400 ms over
  // each message, more than the 300 ms the drain may wait for the server.
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "one"));
    await peer.readFrame();
    await peer.write(frame(1, "two"));
    await peer.write(frame(1, "three"), frame(8, new Uint8Array([3, 232])));
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await conn.next(), ["one"]);
  assert.equal(conn.drain(300, 5000), true);
  const got: Frame[] = [];
  for (let frames = await conn.next(); frames; frames = await conn.next()) {
    got.push(...frames);
    await new Promise((r) => setTimeout(r, 400)); // a consumer waiting for its own storage
  }
  assert.deepEqual(got, ["two", "three"]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "" });
  await srv.done;
  await conn.closed();

  // A server that streams on and never answers: given up at the cap, whatever the consumer does.
  await using endless = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "one"));
    await peer.readFrame();
    for (let i = 0; i < 50; i++) {
      await new Promise((r) => setTimeout(r, 20));
      if (!await peer.write(frame(1, `more ${i}`)).then(() => true, () => false)) break;
    }
  });
  const other = await openRawConnection(endless.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await other.next(), ["one"]);
  const t = performance.now();
  assert.equal(other.drain(5000, 300), true);
  const rest = await drain(other);
  const took = performance.now() - t;
  assert.ok(rest.length > 0 && rest.length < 50, `${rest.length} messages`);
  assert.deepEqual(other.cause, { kind: "aborted" });
  assert.ok(took >= 250 && took < 2000, `ended after ${took} ms`);
  await endless.done;
  await other.closed();
});

Deno.test("`openRawConnection()` gives up on a handshake after min(idleTimeoutMs, 30 s)", async () => {
  await using silent = scripted(async (peer) => {
    await peer.readFrame();
  });
  const err = await openRawConnection(silent.url, { idleTimeoutMs: 100 }).catch((e: unknown) => e);
  assert.ok(err instanceof ConnectError);
  assert.match(err.message, /no answer within/);
});

/**
 * A listener whose accept queue is full, so that the kernel drops the next SYN and a connect to it hangs:
 * filled with connections that are never accepted, until one does not complete within 300 ms.
 */
async function unansweredPort(): Promise<{ port: number } & AsyncDisposable> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const held: Deno.Conn[] = [];
  for (;;) {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port, signal: AbortSignal.timeout(300) })
      .catch(() => null);
    if (conn === null) break;
    held.push(conn);
    if (held.length > 10_000) throw new Error("the listener's accept queue never filled");
  }
  return {
    port,
    [Symbol.asyncDispose]: () => {
      for (const c of held) c.close();
      listener.close();
      return Promise.resolve();
    },
  };
}

// In a process of its own, which must end by itself: a connect left pending behind the deadline kept a
// library caller's process alive until the system gave up on it, minutes later.
for (const scheme of ["ws", "wss"]) {
  Deno.test(`\`openRawConnection()\` gives up on an unanswered ${scheme}:// connect and leaves nothing pending`, async () => {
    await using silent = await unansweredPort();
    const module = new URL("../src/jetstream/raw_ws.ts", import.meta.url).href;
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "eval",
        `const { openRawConnection } = await import(${JSON.stringify(module)});
         const err = await openRawConnection("${scheme}://127.0.0.1:${silent.port}/subscribe", { idleTimeoutMs: 300 })
           .catch((e) => e);
         console.log(err.name, err.message);`,
      ],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const t = performance.now();
    const killer = setTimeout(() => child.kill(), 8000);
    const out = await child.output();
    clearTimeout(killer);
    const printed = decoder.decode(out.stdout);
    assert.match(printed, /^ConnectError .*no answer within 0\.3 s/);
    assert.ok(out.success && performance.now() - t < 8000, `the process did not end by itself: ${printed}`);
  });
}

Deno.test("`openRawConnection()` gives up on a TLS handshake that gets no answer", async () => {
  // TCP is accepted, TLS never answered.
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const accepted = listener.accept();
  const url = `wss://127.0.0.1:${(listener.addr as Deno.NetAddr).port}/subscribe`;
  const err = await openRawConnection(url, { idleTimeoutMs: 300 }).catch((e: unknown) => e);
  assert.ok(err instanceof ConnectError, String(err));
  // A plain server given as wss:// (a bare host:port means wss://) is the likely cause: said so.
  const port = (listener.addr as Deno.NetAddr).port;
  assert.match(
    err.message,
    new RegExp(
      `no answer to the TLS handshake within 0\\.3 s; if this server speaks plain WebSocket, give ws://127\\.0\\.0\\.1:${port}/subscribe$`,
    ),
  );
  (await accepted).close();
});

Deno.test("`openRawConnection()` says a TLS handshake answered in plain HTTP may be a plain server's", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const serving = (async () => {
    const conn = await listener.accept();
    await conn.read(new Uint8Array(4096));
    await conn.write(new TextEncoder().encode("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"));
    conn.close();
  })();
  const err = await openRawConnection(`wss://127.0.0.1:${port}/subscribe`, { idleTimeoutMs: 5000 }).catch((
    e: unknown,
  ) => e);
  await serving;
  assert.ok(err instanceof ConnectError, String(err));
  assert.match(
    err.message,
    new RegExp(
      `TLS handshake failed: .*; if this server speaks plain WebSocket, give ws://127\\.0\\.0\\.1:${port}/subscribe$`,
    ),
  );
});

Deno.test("`openRawConnection()` sends `hello` and offers `protocols`", async () => {
  const got: string[] = [];
  let offered: string | null = null;
  await using srv = denoServer((socket, headers) => {
    offered = headers.get("sec-websocket-protocol");
    socket.onmessage = (e) => {
      got.push(e.data);
      socket.send(`echo ${e.data}`);
      socket.close(1000);
    };
  });
  const conn = await openRawConnection(srv.url, {
    idleTimeoutMs: 5000,
    hello: '{"type":"options_update"}',
    protocols: ["a", "b"],
  });
  assert.deepEqual(await drain(conn), ['echo {"type":"options_update"}']);
  assert.deepEqual(got, ['{"type":"options_update"}']);
  assert.equal(offered, "a, b");
  await conn.closed();
});

Deno.test("`openConnection()` uses the raw transport by default and replays the project server's capture", async () => {
  await using server = serveJetstream({ events: EVENTS, closeAtEnd: true });
  const hello = JSON.stringify({
    type: "options_update",
    payload: { wantedCollections: ["app.bsky.feed.post"], wantedDids: [] },
  });
  const conn = await openConnection(`${server.url}?requireHello=true`, {
    idleTimeoutMs: 5000,
    maxBufferedBytes: 1 << 20,
    hello,
  });
  assert.ok(conn instanceof RawConnection);
  const frames = await drain(conn);
  const wanted = LINES.filter((l) => {
    const e = JSON.parse(l);
    return e.kind !== "commit" || e.commit.collection === "app.bsky.feed.post";
  });
  assert.deepEqual(frames, wanted);
  assert.equal(conn.bytesReceived, wanted.reduce((n, l) => n + encoder.encode(l).length, 0));
  assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "" });
  await conn.closed();
  assert.deepEqual(server.connections[0].hellos, [{
    wantedCollections: ["app.bsky.feed.post"],
    wantedDids: [],
  }]);

  // The other transports stay available.
  for (
    const opts of [{ transport: "stream" as const }, { transport: "websocket" as const }, {
      forceBuffered: true,
    }]
  ) {
    const other = await openConnection(`${server.url}?cursor=${EVENTS[2990].timeUs}`, {
      idleTimeoutMs: 5000,
      maxBufferedBytes: 1 << 20,
      ...opts,
    });
    assert.ok(!(other instanceof RawConnection));
    assert.deepEqual(await drain(other), LINES.slice(2990));
    other.close();
    await other.closed();
  }
});

Deno.test("`openRawConnection()` reports 1006 when the project server drops the connection", async () => {
  await using server = serveJetstream({ events: EVENTS, closeAtEnd: true, faults: { dropEvery: 1234 } });
  const conn = await openRawConnection(server.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await drain(conn), LINES.slice(0, 1234));
  assert.deepEqual(conn.cause, { kind: "closed", code: 1006, reason: "" });
  await conn.closed();
});

Deno.test("`openRawConnection()` reads only when asked, so a slow consumer holds the server back", async () => {
  const seen: { wrote?: boolean } = {};
  const payload = frame(2, new Uint8Array(1 << 20));
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake);
    try {
      // 64 MiB: far more than the kernel's socket buffers hold.
      for (let i = 0; i < 64; i++) await peer.write(payload);
      seen.wrote = true;
    } catch {
      seen.wrote = false; // the client went away first
    }
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.ok(((await conn.next()) ?? []).length >= 1);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(seen.wrote, undefined, "the server could write everything: the client read ahead");
  // Once closed, the server's writes end: read and dropped while the close lingers, then refused.
  conn.close();
  await conn.closed();
  await srv.done;
  assert.notEqual(seen.wrote, undefined);
});

Deno.test("`openRawConnection()` answers a flood of pings with a few pongs, the last carrying the latest payload", async () => {
  const pongs: string[] = [];
  await using srv = scripted(async (peer, handshake) => {
    // 100,000 empty pings in one burst, then one with a payload: one pong pending at a time.
    const pings = new Uint8Array(200_000);
    for (let i = 0; i < pings.length; i += 2) pings[i] = 0x89;
    await peer.write(handshake, frame(1, "first"), pings, frame(9, "latest"), frame(1, "end"));
    await peer.write(frame(8, new Uint8Array([3, 232])));
    for (let f = await peer.readFrame(); f && f.opcode !== 8; f = await peer.readFrame()) {
      if (f.opcode === 10) pongs.push(decoder.decode(f.payload));
    }
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await drain(conn), ["first", "end"]);
  await srv.done;
  await conn.closed();
  assert.ok(pongs.length >= 1 && pongs.length <= 20, `${pongs.length} pongs`);
  assert.equal(pongs.at(-1), "latest");
});

Deno.test("`RawConnection.sendText()` refuses more text once 1 MiB waits for a server that does not read", async () => {
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake);
    await new Promise((r) => setTimeout(r, 200)); // reads nothing meanwhile
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  const big = "x".repeat(600_000);
  // The first goes to the socket at once; the second waits; a third would pass 1 MiB waiting.
  assert.deepEqual([conn.sendText(big), conn.sendText(big), conn.sendText(big)], [true, true, false]);
  conn.close();
  await conn.closed();
});

/**
 * Receives one message of 400,000 empty and 200,000 one-byte continuation frames (1.4 MB on the wire,
 * 200 kB of payload) and says how much memory stays held, after full collections, while its last
 * frame is still to come. Run in a child with `--expose-gc`: garbage of the frames read (up to 20
 * MiB, seen in a parallel run) would otherwise count as held.
 */
async function heldByFragments(): Promise<{ held: number; ok: boolean }> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error("run with --v8-flags=--expose-gc");
  const empty = new Uint8Array(800_000); // [0x00, 0x00]: an empty continuation, FIN clear
  const ones = new Uint8Array(600_000);
  for (let i = 0; i < ones.length; i += 3) [ones[i], ones[i + 1], ones[i + 2]] = [0x00, 1, 0x61];
  const { promise: sent, resolve: allSent } = Promise.withResolvers<void>();
  const { promise: measured, resolve: measuredDone } = Promise.withResolvers<void>();
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "{", { fin: false }), empty, ones);
    allSent();
    await measured;
    await peer.write(frame(0, "}"), frame(8, new Uint8Array([3, 232])));
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  const used = () => {
    gc();
    const m = Deno.memoryUsage();
    return m.heapUsed + m.external;
  };
  const before = used();
  const pending = conn.next();
  await sent;
  await new Promise((r) => setTimeout(r, 300)); // the client reads all of it meanwhile
  const held = used() - before;
  measuredDone();
  const frames = await pending;
  const ok = JSON.stringify(frames) === JSON.stringify(["{" + "a".repeat(200_000) + "}"]) &&
    await conn.next() === null;
  await conn.closed();
  return { held, ok };
}

Deno.test("`openRawConnection()` holds a message of many tiny fragments in memory proportional to its payload", async () => {
  const child = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--v8-flags=--expose-gc", new URL(import.meta.url).pathname, "fragments"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(child.stderr);
  assert.equal(child.code, 0, stderr);
  const { held, ok } = JSON.parse(new TextDecoder().decode(child.stdout));
  // Each fragment kept as its own array held 131 MiB here.
  assert.ok(held < 16 * 1024 * 1024, `${(held / 1048576).toFixed(1)} MiB held for 200 kB of payload`);
  assert.ok(ok, "the message and the end of the stream came as sent");
});

Deno.test("`openRawConnection()` fails with 1009 on a message skipped for its size that goes on without end", async () => {
  // Fragments of 1 MiB, never the last one: skipped past maxMessageBytes, then given up on.
  const part = frame(0, new Uint8Array(1 << 20).fill(0x7a), { fin: false });
  let sentBytes = 0;
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "small"), frame(1, "{", { fin: false }));
    try {
      // Until the client closes: up to four times the point where it must give up.
      while (sentBytes < 4 * ENDLESS_MESSAGE_BYTES) {
        await peer.write(part);
        sentBytes += part.length;
      }
    } catch {
      // The client closed the connection.
    }
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000, maxMessageBytes: 10_000 });
  const frames = await drain(conn);
  assert.deepEqual(frames, ["small"]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1009, reason: "message too big" });
  await conn.closed();
  await srv.done;
  assert.ok(sentBytes < 2 * ENDLESS_MESSAGE_BYTES, `the server could send ${sentBytes} bytes of one message`);
  // Not before it had skipped that much (what it held before skipping is not counted here).
  assert.ok(conn.bytesReceived >= ENDLESS_MESSAGE_BYTES - 10_000, `${conn.bytesReceived} bytes`);
});

Deno.test("`openRawConnection()` does not call a large message that trickles in idle, but ends on a stall inside one", async () => {
  const big = "t".repeat(20_000);
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake);
    // 20 kB at 100 bytes every 10 ms: 2 s for one message, with idleTimeoutMs 300.
    const whole = concat(frame(1, big), frame(1, "after"));
    for (let i = 0; i < whole.length; i += 100) {
      await peer.write(whole.subarray(i, i + 100));
      await new Promise((r) => setTimeout(r, 10));
    }
    // A fragmented message that trickles, then stalls halfway while pings and empty fragments
    // still come: no progress.
    await peer.write(frame(1, "a", { fin: false }));
    for (let i = 0; i < 10; i++) {
      await peer.write(frame(0, "b", { fin: false }));
      await new Promise((r) => setTimeout(r, 50));
    }
    for (let i = 0; i < 40; i++) {
      await peer.write(frame(9, "ping"), frame(0, "", { fin: false })).catch(() => {});
      await new Promise((r) => setTimeout(r, 25));
    }
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 300 });
  assert.deepEqual(await drain(conn), [big, "after"]);
  assert.deepEqual(conn.cause, { kind: "idle", partial: true });
  await conn.closed();
});

/** Serves every connection on 127.0.0.1 with `script`, until disposed. */
function scriptedEach(
  script: (peer: Peer, handshake: Uint8Array) => Promise<void>,
): { url: string; count: () => number } & AsyncDisposable {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const peers: Peer[] = [];
  const runs: Promise<void>[] = [];
  const accepting = (async () => {
    for await (const conn of listener) {
      runs.push(
        servePeer(conn, script, (peer) => peers.push(peer)).catch(() => {}),
      );
    }
  })();
  return {
    url: `ws://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`,
    count: () => peers.length,
    [Symbol.asyncDispose]: async () => {
      listener.close();
      await accepting.catch(() => {});
      for (const peer of peers) peer.close();
      await Promise.all(runs);
    },
  };
}

Deno.test("runBackfillSync() gives up on a server whose message stalls midway every time", async () => {
  const T = 1764000000000000;
  const event = JSON.stringify(commit(T + 1, { did: did(1), text: "x".repeat(2000) }));
  await using srv = scriptedEach(async (peer, handshake) => {
    await peer.write(handshake, frame(1, event).subarray(0, 1000));
    await peer.readFrame(); // stalls until the client gives up on it
  });
  const dir = await Deno.makeTempDir();
  try {
    const stats = await runBackfillSync({
      instance: `${srv.url}/subscribe`,
      kv: `${dir}/q.sqlite`,
      idleTimeout: 0.2,
      maxRetries: 1,
      maxTime: 20,
    });
    assert.equal(stats.stopReason, "error");
    assert.match(stats.error ?? "", /a message stopped arriving midway: no progress for 0.2 s/);
    assert.equal(srv.count(), 2);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("`openRawConnection()` fails with 1002 on a close code no endpoint may send, a reason not UTF-8 or a 64-bit length with its top bit set", async () => {
  const closeWith = (code: number, reason: Uint8Array = new Uint8Array(0)) =>
    frame(8, concat(new Uint8Array([code >> 8, code & 255]), reason));
  const cases: [string, Uint8Array][] = [
    ...[0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000].map((code): [string, Uint8Array] => [
      `invalid close code ${code}`,
      closeWith(code, encoder.encode("why")),
    ]),
    ["close reason is not UTF-8", closeWith(1000, new Uint8Array([0x62, 0x79, 0x65, 0x20, 0xff, 0xfe]))],
    [
      "64-bit payload length with the most significant bit set",
      concat(new Uint8Array([0x81, 127, 0x80, 0, 0, 0, 0, 0, 0, 5]), encoder.encode("hello")),
    ],
  ];
  for (const [reason, bad] of cases) {
    const { cause, closeCode } = await afterBadFrame(bad);
    assert.deepEqual(cause, { kind: "closed", code: 1002, reason });
    assert.equal(closeCode, 1002, reason);
  }
  // The codes a server may send are taken as they come, and echoed.
  for (const code of [1000, 1001, 1003, 1007, 1011, 1012, 1014, 3000, 4999]) {
    const seen: { close?: ClientFrame | null } = {};
    await using srv = scripted(async (peer, handshake) => {
      await peer.write(handshake, closeWith(code, encoder.encode("ok ✓")));
      seen.close = await peer.readFrame();
    });
    const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
    assert.deepEqual(await drain(conn), []);
    assert.deepEqual(conn.cause, { kind: "closed", code, reason: "ok ✓" });
    await srv.done;
    await conn.closed();
    assert.equal((seen.close!.payload[0] << 8) | seen.close!.payload[1], code);
  }
});

Deno.test("`openRawConnection()` skips an interim 1xx response before the 101", async () => {
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(encoder.encode("HTTP/1.1 100 Continue\r\n\r\n"));
    await new Promise((r) => setTimeout(r, 20));
    // Two interim responses and the 101 in one write, frames right behind.
    await peer.write(
      encoder.encode("HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"),
      handshake,
      frame(1, "hi"),
      frame(8, new Uint8Array([3, 232])),
    );
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await drain(conn), ["hi"]);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "" });
  await conn.closed();
});

Deno.test("`openRawConnection()` escapes control characters of a close reason and a refusal's body in messages", async () => {
  const ansi = "\x1b]0;owned\x07\x1b[2K\rdone, 0 errors\x9b8m";
  const escaped = "\\u001b]0;owned\\u0007\\u001b[2K\\u000ddone, 0 errors\\u009b8m";
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(8, concat(new Uint8Array([3, 232]), encoder.encode(ansi))));
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await drain(conn), []);
  assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: escaped });
  await conn.closed();

  await using refusing = scripted(async (peer) => {
    const body = encoder.encode(`\x1b[2Jinvalid\n${ansi}`);
    await peer.write(
      encoder.encode(`HTTP/1.1 400 Bad Request\r\nContent-Length: ${body.length}\r\n\r\n`),
      body,
    );
  });
  const err = await openRawConnection(refusing.url, { idleTimeoutMs: 5000 }).catch((e: unknown) => e);
  assert.ok(err instanceof ConnectError);
  assert.equal(
    err.message,
    // (Whitespace, the carriage return too, becomes single spaces: a body shows on one line.)
    `${refusing.url} refused the connection: HTTP 400: \\u001b[2Jinvalid ${escaped.replace("\\u000d", " ")}`,
  );
  assert.equal(err.body, `\x1b[2Jinvalid\n${ansi}`); // the body itself as it came (JSON to parse, say)
});

Deno.test("`openRawConnection()` shows a long refusal page in its message on one line, cut short, and keeps it whole in body", async () => {
  // A web server's or proxy's error page: lines of HTML, far longer than an error message's line.
  const page = `<!DOCTYPE html>\n<html>\n  <head><title>404 Not Found</title></head>\n  <body>\n${
    "    <p>nothing here</p>\n".repeat(60)
  }  </body>\n</html>\n`;
  await using refusing = scripted(async (peer) => {
    const body = encoder.encode(page);
    await peer.write(
      encoder.encode(`HTTP/1.1 404 Not Found\r\nContent-Length: ${body.length}\r\n\r\n`),
      body,
    );
  });
  const err = await openRawConnection(refusing.url, { idleTimeoutMs: 5000 }).catch((e: unknown) => e);
  assert.ok(err instanceof ConnectError);
  assert.equal(err.body, page.trim());
  const shown = err.message.slice(`${refusing.url} refused the connection: HTTP 404: `.length);
  assert.ok(
    shown.startsWith(
      "<!DOCTYPE html> <html> <head><title>404 Not Found</title></head> <body> <p>nothing here</p>",
    ),
    err.message,
  );
  assert.ok(shown.endsWith(`… (${page.trim().length} characters in all)`), err.message);
  assert.ok(shown.length < 360, err.message);
  assert.ok(!err.message.includes("\\u000a") && !err.message.includes("\n"), err.message);
});

Deno.test("`bodyInMessage()` keeps a short body as it is and cuts a long one between characters, never inside one", () => {
  assert.equal(bodyInMessage("invalid cursor: abc"), "invalid cursor: abc");
  assert.equal(bodyInMessage("a\n\t b\r\nc\x1b"), "a b c\\u001b");
  // A pair of UTF-16 halves across the 300th place: cut before it, not between its halves.
  const long = "a".repeat(299) + "😀" + "b".repeat(10);
  assert.equal(bodyInMessage(long), `${"a".repeat(299)}… (311 characters in all)`);
  assert.equal(bodyInMessage("a".repeat(301)), `${"a".repeat(300)}… (301 characters in all)`);
  // Control characters are escaped before the cut: the message stays as short, and no escape is cut.
  assert.equal(bodyInMessage("\x00".repeat(1000)), `${"\\u0000".repeat(50)}… (1000 characters in all)`);
  assert.equal(
    bodyInMessage("a".repeat(297) + "\x1b" + "b".repeat(10)),
    `${"a".repeat(297)}… (308 characters in all)`,
  );
});

Deno.test("`openRawConnection()` names where a redirect points, and runBackfillSync() stops on it as on a 4xx", async () => {
  const redirect = (peer: Peer) =>
    peer.write(encoder.encode(
      "HTTP/1.1 301 Moved Permanently\r\nLocation: ws://elsewhere.example/subscribe\r\n" +
        "Content-Length: 9\r\n\r\nmoved it\n",
    ));
  await using srv = scripted(redirect);
  const err = await openRawConnection(srv.url, { idleTimeoutMs: 5000 }).catch((e: unknown) => e);
  assert.ok(err instanceof ConnectError);
  assert.equal(err.status, 301);
  assert.equal(
    err.message,
    `${srv.url} refused the connection: HTTP 301 (a redirect to ws://elsewhere.example/subscribe, not followed): moved it`,
  );

  await using each = scriptedEach(redirect);
  const dir = await Deno.makeTempDir();
  try {
    const t0 = performance.now();
    const failure = await runBackfillSync({
      instance: `${each.url}/subscribe`,
      kv: `${dir}/q.sqlite`,
      maxTime: 10,
    })
      .then((stats) => stats, (e: unknown) => e);
    assert.ok(failure instanceof UsageError, JSON.stringify(failure));
    assert.match(
      failure.message,
      /HTTP 301 \(a redirect to ws:\/\/elsewhere\.example\/subscribe, not followed\)/,
    );
    assert.equal(each.count(), 1);
    assert.ok(performance.now() - t0 < 5000);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

if (import.meta.main && Deno.args[0] === "fragments") {
  console.log(JSON.stringify(await heldByFragments()));
}

/** Closes `conn` and resolves to how long it took until `closed()` resolved, ms. */
async function timedClose(conn: RawConnection): Promise<number> {
  const t = performance.now();
  conn.close();
  await conn.closed();
  return performance.now() - t;
}

Deno.test("`RawConnection.close()` soon lets go of a server that neither answers the close frame nor closes", async () => {
  const seen: { close?: number; eof?: boolean } = {};
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "hello"));
    const f = await peer.readFrame();
    seen.close = f?.opcode;
    // No answer, and the connection is held open: only the client can end it.
    seen.eof = (await peer.readFrame()) === null;
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await conn.next(), ["hello"]);
  // Once nothing has come for a moment, nothing is left unread: no need to wait the whole 500 ms.
  const took = await timedClose(conn);
  await srv.done;
  assert.deepEqual(seen, { close: 8, eof: true });
  assert.ok(took < 400, `closing took ${Math.round(took)} ms`);
});

Deno.test("`RawConnection.close()` after the server's close frame, parsed only after it, does not wait for another", async () => {
  // The server's close comes with the handshake; it then waits for the client to close TCP. The
  // client closes first and takes the close frame from its buffer afterwards: nothing is left to read.
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "hello"), frame(8, new Uint8Array([3, 232])));
    while (await peer.readFrame() !== null);
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  const t = performance.now();
  conn.close();
  assert.deepEqual(await conn.next(), ["hello"]);
  assert.equal(await conn.next(), null);
  await conn.closed();
  // The quiet wait (100 ms) would be for a close frame that came already.
  const took = performance.now() - t;
  await srv.done;
  assert.ok(took < 90, `closing took ${Math.round(took)} ms`);
});

Deno.test("`RawConnection.close()` ends at the server's close frame, not waiting for it to close TCP as well", async () => {
  // This server answers the close frame, then waits for the client to close the TCP connection
  // (RFC 6455 lets either side do it). Waiting for EOF would take the whole linger (500 ms).
  const seen: { answered?: boolean; eof?: boolean } = {};
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "hello"), frame(2, new Uint8Array(200_000)));
    const f = await peer.readFrame();
    await peer.write(frame(8, new Uint8Array([3, 232])));
    seen.answered = f?.opcode === 8;
    seen.eof = (await peer.readFrame()) === null;
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000 });
  assert.deepEqual(await conn.next(), ["hello"]);
  const took = await timedClose(conn);
  await srv.done;
  assert.deepEqual(seen, { answered: true, eof: true });
  assert.ok(took < 400, `closing took ${Math.round(took)} ms`);
});

Deno.test("an idle connection is let go at once: a server silent for the idle timeout leaves nothing unread", async () => {
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake);
    await peer.readFrame(); // the close frame, never answered
    await peer.readFrame();
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 200 });
  const t = performance.now();
  assert.equal(await conn.next(), null);
  assert.equal(conn.cause?.kind, "idle");
  await conn.closed();
  // The idle timeout, and not the 500 ms a close from here waits for the server's answer.
  const took = performance.now() - t;
  assert.ok(took < 600, `the idle end and the close took ${Math.round(took)} ms`);
});

Deno.test("a `next()` waiting when the connection is closed returns null, not what the server sends after the close", async () => {
  const abort = new AbortController();
  await using srv = scripted(async (peer, handshake) => {
    await peer.write(handshake, frame(1, "before"));
    await peer.readFrame(); // the close frame
    await peer.write(frame(1, "after"), frame(8, new Uint8Array([3, 232])));
  });
  const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000, signal: abort.signal });
  assert.deepEqual(await conn.next(), ["before"]);
  const waiting = conn.next();
  await new Promise((r) => setTimeout(r, 50));
  abort.abort();
  assert.equal(await waiting, null);
  await conn.closed();
  await srv.done;
});

Deno.test("`CloseFrameFinder` finds the server's whole close frame past frames of every length form, however the bytes are cut", () => {
  // Frames of 7-bit, 16-bit and 64-bit lengths (and a masked one, which a broken server may send),
  // then the close frame with its code and reason.
  const before = concat(
    frame(1, "short"),
    frame(2, new Uint8Array(300)),
    frame(2, new Uint8Array(70_000)),
    frame(9, "ping"),
    frame(1, "masked", { mask: true }),
  );
  const close = frame(8, concat(new Uint8Array([3, 232]), new TextEncoder().encode("bye")));
  const bytes = concat(before, close);
  for (const cut of [1, 2, 3, 7, 100, 65_536, bytes.length]) {
    const finder = new CloseFrameFinder(0);
    let found = -1;
    for (let at = 0; at < bytes.length && found < 0; at += cut) {
      if (finder.feed(bytes.subarray(at, Math.min(at + cut, bytes.length)))) {
        found = Math.min(at + cut, bytes.length);
      }
    }
    // Found once its last byte has come, and not before.
    assert.equal(found >= bytes.length, true, `cut ${cut}: found at ${found} of ${bytes.length}`);
    assert.equal(new CloseFrameFinder(0).feed(bytes.subarray(0, bytes.length - 1)), false, `cut ${cut}`);
  }
  // An empty close frame is whole with its header; the rest of a frame being skipped comes first.
  assert.equal(new CloseFrameFinder(0).feed(frame(8, new Uint8Array(0))), true);
  assert.equal(new CloseFrameFinder(5).feed(concat(new Uint8Array(5), frame(8, new Uint8Array(0)))), true);
  assert.equal(new CloseFrameFinder(5).feed(concat(new Uint8Array(4), frame(8, new Uint8Array(0)))), false);
});

Deno.test("`close()` ends with the closing handshake a connection the server floods; with `linger: false` it drops it at once", async () => {
  const closes: { linger: boolean; clean: boolean }[] = [];
  const filler = "x".repeat(1000);
  await using srv = denoServer((socket, headers) => {
    const linger = headers.get("sec-websocket-protocol") === "linger";
    socket.onopen = () => {
      for (let i = 0; i < 4000; i++) socket.send(filler);
    };
    socket.onclose = (e) => closes.push({ linger, clean: e.wasClean && e.code === 1000 });
  });
  for (const linger of [true, false]) {
    // The protocol offered only tells the server which connection this is.
    const protocols = [linger ? "linger" : "drop"];
    const conn = await openRawConnection(srv.url, { idleTimeoutMs: 5000, linger, protocols });
    assert.ok(((await conn.next()) ?? []).length > 0);
    conn.close();
    await conn.closed();
  }
  for (let i = 0; i < 100 && closes.length < 2; i++) await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(closes.sort((a, b) => Number(b.linger) - Number(a.linger)), [
    { linger: true, clean: true },
    { linger: false, clean: false },
  ]);
});
