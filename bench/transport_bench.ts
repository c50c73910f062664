/**
 * Receive speed of each WebSocket transport of `openConnection()`: `raw` (this project's client),
 * `stream` (`WebSocketStream`) and `websocket` (`WebSocket`), each receiving a whole capture from
 * `jetfill serve` in another process and `JSON.parse`-ing every message, as the pipeline does.
 * Two rounds each, printed; nothing is asserted.
 *
 * `deno run -A bench/transport_bench.ts [--events N] [--rounds R]`
 *
 * @module
 */
import { spawnServer } from "../scripts/spawn_server.ts";
import { type ConnectionOptions, openConnection } from "../src/jetstream/socket.ts";
import { generateCapture } from "../src/server/synth.ts";

function flag(name: string, fallback: number): number {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Number(Deno.args[i + 1]) : fallback;
}

const EVENTS = flag("--events", 200_000);
const ROUNDS = flag("--rounds", 2);
const HOUR_US = 3_600_000_000;
const root = new URL("..", import.meta.url).pathname;
const work = `${root}.bench`;
await Deno.mkdir(work, { recursive: true });

const capturePath = `${work}/transport-capture-${EVENTS}.ndjson`;
const lines = generateCapture({
  count: EVENTS,
  seed: 11,
  startUs: Date.now() * 1000 - 40 * HOUR_US,
  stepUs: (30 * HOUR_US) / EVENTS,
});
await Deno.writeTextFile(capturePath, lines.join("\n") + "\n");
const avgBytes = lines.reduce((n, l) => n + l.length, 0) / lines.length;

/** Starts `jetfill serve` in its own process, so that the server does not share our thread. */
function startServer() {
  return spawnServer(["--file", capturePath, "--port", "0", "--close-at-end"]);
}

type Transport = NonNullable<ConnectionOptions["transport"]>;

async function receiveAll(url: string, transport: Transport): Promise<{ rate: number; batches: number }> {
  const t0 = performance.now();
  const conn = await openConnection(`${url}?cursor=0`, {
    idleTimeoutMs: 30_000,
    maxBufferedBytes: 1 << 30,
    transport,
  });
  let n = 0;
  let batches = 0;
  try {
    for (let frames = await conn.next(); frames; frames = await conn.next()) {
      batches++;
      for (let i = 0; i < frames.length; i++) {
        JSON.parse(frames[i] as string);
        n++;
      }
    }
  } finally {
    conn.close();
    await conn.closed();
  }
  const seconds = (performance.now() - t0) / 1000;
  if (n !== EVENTS) {
    throw new Error(`${transport}: received ${n} of ${EVENTS} (${JSON.stringify(conn.cause)})`);
  }
  return { rate: n / seconds, batches };
}

function fmt(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

console.log(`capture: ${fmt(EVENTS)} synthetic events, ${fmt(avgBytes)} bytes on average`);
console.log("receive + JSON.parse, server in another process:");
const server = await startServer();
try {
  // One untimed pass warms the server's page cache and both JITs.
  await receiveAll(server.url, "raw");
  for (const transport of ["raw", "stream", "websocket"] as const) {
    const rates: string[] = [];
    let batches = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const r = await receiveAll(server.url, transport);
      rates.push(`${fmt(r.rate)} events/s`);
      batches = r.batches;
    }
    console.log(
      `  ${transport.padEnd(9)} ${rates.join(", ")} (${(EVENTS / batches).toFixed(1)} messages per next())`,
    );
  }
} finally {
  await server.stop();
}
