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

  async function stored(): Promise<number> {
    const kv = await Deno.openKv(killed.path);
    try {
      return (await readCheckpoint(kv, "jetstream_sync")).value?.run.recordsStored ?? -1;
    } finally {
      kv.close();
    }
  }

  // Kill the sync a few times once it has made progress (at a random moment after that), then let
  // a last resumed run finish. Waiting for progress keeps a loaded machine's slow start-up from
  // turning every kill into a kill before the first commit.
  let partialKills = 0;
  for (let attempt = 0; attempt < 6; attempt++) {
    const before = await stored();
    const args = syncArgs(server.url, killed.path);
    if (before >= 0) args.push("--resume");
    const child = new Deno.Command(Deno.execPath(), { args, stdout: "null", stderr: "null" }).spawn();
    let exited = false;
    child.status.then(() => (exited = true));
    while (!exited && (await stored()) < before + 200) await new Promise((r) => setTimeout(r, 10));
    await new Promise((r) => setTimeout(r, Math.random() * 30));
    if (!exited) {
      child.kill("SIGKILL");
      const after = await stored();
      if (after > 0 && after < LIMIT) partialKills++;
    }
    await child.status;
  }
  const last = await new Deno.Command(Deno.execPath(), {
    args: [...syncArgs(server.url, killed.path), "--resume"],
    stdout: "null",
    stderr: "piped",
  }).output();
  assert.equal(last.code, 0, new TextDecoder().decode(last.stderr));
  assert.ok(partialKills >= 2, `only ${partialKills} kills landed mid-run`);

  const got = await queueEvents(killed.path);
  const expected = await queueEvents(whole.path);
  assert.equal(expected.length, LIMIT);
  assert.equal(got.length, LIMIT);
  assert.deepEqual(got, expected);
});
