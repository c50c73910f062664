import assert from "node:assert/strict";
import type { JetstreamEvent } from "../src/jetstream/events.ts";
import { readCheckpoint } from "../src/queue/kv_queue.ts";
import { decodeQueueMessage, type QueueMessage } from "../src/queue/message.ts";
import { commit, did, drainQueue } from "./helpers/events.ts";
import { serveEvents, tempDb } from "./helpers/loopback.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;
const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const LIMIT = 20_000;

function capture(): JetstreamEvent[] {
  return Array.from({ length: 30_000 }, (_, i) =>
    commit(T0 + i * 1000, {
      did: did(i % 50),
      collection: i % 4 === 3 ? "app.bsky.feed.like" : "app.bsky.feed.post",
      text: `post ${i} ${"lorem ipsum ".repeat(i % 20)}`,
    }));
}

function syncArgs(url: string, kv: string): string[] {
  return [
    "run",
    "-A",
    CLI,
    "sync",
    "--instance",
    url,
    "--kv",
    kv,
    "--start",
    String(T0),
    "--limit",
    String(LIMIT),
    "--batch-size",
    "10",
    "--json",
  ];
}

async function queueEvents(path: string): Promise<JetstreamEvent[]> {
  const kv = await Deno.openKv(path);
  const seq = (await readCheckpoint(kv, "jetstream_sync")).value?.seq ?? 0;
  kv.close();
  const msgs = (await drainQueue(path, seq, 30_000)) as QueueMessage[];
  assert.equal(msgs.length, seq);
  msgs.sort((a, b) => a.seq - b.seq);
  assert.deepEqual(msgs.map((m) => m.seq), Array.from({ length: seq }, (_, i) => i + 1));
  return msgs.flatMap((m) => decodeQueueMessage(m));
}

Deno.test("a sync killed with SIGKILL at random moments and resumed stores what one uninterrupted run stores", async () => {
  const events = capture();
  await using server = serveEvents(events);
  await using killed = await tempDb();
  await using whole = await tempDb();

  const uninterrupted = await new Deno.Command(Deno.execPath(), {
    args: syncArgs(server.url, whole.path),
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(uninterrupted.code, 0, new TextDecoder().decode(uninterrupted.stderr));

  let kills = 0;
  let partialKills = 0;
  let finished = false;
  for (let attempt = 0; attempt < 25 && !finished; attempt++) {
    const kv = await Deno.openKv(killed.path);
    const before = (await readCheckpoint(kv, "jetstream_sync")).value;
    kv.close();
    const args = syncArgs(server.url, killed.path);
    if (before) args.push("--resume");
    const child = new Deno.Command(Deno.execPath(), { args, stdout: "null", stderr: "null" }).spawn();
    const timer = setTimeout(() => {
      try {
        child.kill("SIGKILL");
        kills++;
      } catch { /* already exited */ }
    }, 150 + Math.random() * 700);
    const status = await child.status;
    clearTimeout(timer);
    if (status.success) finished = true;
    else {
      const check = await Deno.openKv(killed.path);
      const after = (await readCheckpoint(check, "jetstream_sync")).value;
      check.close();
      if (after && after.run.recordsStored > 0 && after.run.recordsStored < LIMIT) partialKills++;
    }
  }
  assert.ok(finished, "the resumed sync never finished");
  assert.ok(partialKills > 0, `no kill landed mid-run (kills: ${kills})`);

  const got = await queueEvents(killed.path);
  const expected = await queueEvents(whole.path);
  assert.equal(expected.length, LIMIT);
  assert.equal(got.length, LIMIT);
  assert.deepEqual(got, expected);
});
