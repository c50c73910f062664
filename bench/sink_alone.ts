/**
 * Part of `deno task bench`: the sink alone. The capture's events, parsed beforehand, go through
 * Batcher and QueueWriter into Deno KV on disk; it prints events per second. Run by bench.ts as its
 * own process (`sink_alone.ts CAPTURE KV_PATH`), so that the 200,000 parsed events it holds do not
 * weigh on the garbage collection of the end-to-end runs measured after it.
 *
 * @module
 */
import { Batcher } from "../src/pipeline/batch.ts";
import { QueueWriter } from "../src/queue/writer.ts";
import { emptyCheckpoint, openKvAt } from "../src/queue/kv_queue.ts";

const [capture, path] = Deno.args;
const lines = (await Deno.readTextFile(capture)).trimEnd().split("\n");
const events = lines.map((l) => JSON.parse(l));
const encoder = new TextEncoder();
const utf8 = lines.map((l) => encoder.encode(l).length);
await Deno.remove(path).catch(() => {});
const kv = await openKvAt(path);
const writer = new QueueWriter(kv, "kv", { checkpoint: emptyCheckpoint("kv"), versionstamp: null }, () => {});
const batcher = new Batcher("kv", 100);
const t0 = performance.now();
for (let i = 0; i < events.length; i++) {
  if (batcher.add(events[i], lines[i], "2026-11-28", events[i].commit?.collection, utf8[i])) {
    await writer.add(batcher.take()!);
  }
}
const last = batcher.take();
if (last) await writer.add(last);
await writer.flush();
const rate = events.length / ((performance.now() - t0) / 1000);
kv.close();
await Deno.remove(path).catch(() => {});
console.log(Math.round(rate));
