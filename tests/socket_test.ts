import assert from "node:assert/strict";
import { openConnection } from "../src/jetstream/socket.ts";
import { commit } from "./helpers/events.ts";
import { serveEvents } from "./helpers/loopback.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const events = Array.from({ length: 300 }, (_, i) => commit(T0 + i * 1000));

for (const transport of ["raw", "stream", "websocket"] as const) {
  Deno.test(`openConnection({ transport: "${transport}" }) delivers every frame in order, then the close`, async () => {
    await using server = serveEvents(events, { closeAtEnd: true });
    const conn = await openConnection(`${server.url}?cursor=0`, {
      idleTimeoutMs: 5000,
      maxBufferedBytes: 1 << 20,
      transport,
    });
    const got: string[] = [];
    for (let frames = await conn.next(); frames; frames = await conn.next()) {
      got.push(...(frames as string[]));
    }
    await conn.closed();
    assert.deepEqual(got, events.map((e) => JSON.stringify(e)));
    assert.deepEqual(conn.cause, { kind: "closed", code: 1000, reason: "" });
  });

  Deno.test(`openConnection({ transport: "${transport}" }) reports an abrupt drop as 1006`, async () => {
    await using server = serveEvents(events, { faults: { dropEvery: 100 } });
    const conn = await openConnection(`${server.url}?cursor=0`, {
      idleTimeoutMs: 5000,
      maxBufferedBytes: 1 << 20,
      transport,
    });
    let n = 0;
    for (let frames = await conn.next(); frames; frames = await conn.next()) n += frames.length;
    await conn.closed();
    assert.equal(n, 100);
    assert.equal(conn.cause?.kind, "closed");
    assert.equal(conn.cause?.kind === "closed" && conn.cause.code, 1006);
  });

  Deno.test(`openConnection({ transport: "${transport}" }) ends a silent connection after the idle timeout`, async () => {
    await using server = serveEvents(events, { faults: { stallAfter: 10 } });
    const conn = await openConnection(`${server.url}?cursor=0`, {
      idleTimeoutMs: 200,
      maxBufferedBytes: 1 << 20,
      transport,
    });
    let n = 0;
    for (let frames = await conn.next(); frames; frames = await conn.next()) n += frames.length;
    conn.close();
    await conn.closed();
    assert.equal(n, 10);
    assert.deepEqual(conn.cause, { kind: "idle" });
  });
}

Deno.test("openConnection() ends a connection that only pings after the idle timeout", async () => {
  // Deno's server pings every idleTimeout seconds; the client answers, but no message comes.
  await using server = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, (req) => {
    const { socket, response } = Deno.upgradeWebSocket(req, { idleTimeout: 0.1 });
    socket.onopen = () => socket.send("one event");
    return response;
  });
  const conn = await openConnection(`ws://127.0.0.1:${server.addr.port}/subscribe`, {
    idleTimeoutMs: 600,
    maxBufferedBytes: 1 << 20,
  });
  const t0 = performance.now();
  const got: unknown[] = [];
  for (let frames = await conn.next(); frames; frames = await conn.next()) got.push(...frames);
  conn.close();
  await conn.closed();
  assert.deepEqual(got, ["one event"]);
  assert.deepEqual(conn.cause, { kind: "idle" });
  assert.ok(performance.now() - t0 < 3000);
});
