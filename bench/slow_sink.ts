/**
 * Part of `deno task bench`: a sync into a deliberately slow sink (real Deno KV whose commits wait
 * 20 ms more), reporting peak RSS. Run by bench.ts as its own process:
 * `slow_sink.ts URL START_US EVENTS WORKDIR`.
 *
 * @module
 */
import { runBackfillSync } from "../src/backfill.ts";
import { slowKv } from "../tests/helpers/slow_kv.ts";
import { openKvAt } from "../src/queue/kv_queue.ts";

const [url, startUs, events, work] = Deno.args;
const path = `${work}/bench-slow.sqlite`;
await Deno.remove(path).catch(() => {});
// Created as a sync creates its database.
const real = await openKvAt(path);

// The real KV, with every atomic commit delayed: a slow disk, without touching jetfill.
const slow = slowKv(real, 20);

let peak = Deno.memoryUsage().rss;
let heap = 0;
let external = 0;
const sampler = setInterval(() => {
  const m = Deno.memoryUsage();
  peak = Math.max(peak, m.rss);
  heap = Math.max(heap, m.heapUsed);
  external = Math.max(external, m.external);
}, 10);
const s = await runBackfillSync({
  instance: url,
  kv: slow,
  startTimestamp: Number(startUs),
  wantedCollections: [],
  kinds: ["commit", "identity", "account"],
  numRecords: Number(events),
  queueName: "slow",
});
clearInterval(sampler);
if (Deno.env.get("JETFILL_BENCH_DEBUG")) {
  console.error(
    Deno.readTextFileSync("/proc/self/status").split("\n").filter((l) =>
      /^(VmHWM|VmRSS|RssAnon|RssFile)/.test(l)
    ).join(" "),
  );
}
peak = Math.max(peak, Deno.memoryUsage().rss);
real.close();
await Deno.remove(path).catch(() => {});
console.log(
  `slow sink (commits delayed 20 ms): ${s.recordsStored} of ${events} events stored in ${
    s.totalTime.toFixed(1)
  } s, ${s.reconnects} reconnects to bound the buffer, peak RSS ${
    (peak / 2 ** 20).toFixed(0)
  } MB (target < 200 MB; V8 heap peak ${(heap / 2 ** 20).toFixed(0)} MB, external ${
    (external / 2 ** 20).toFixed(0)
  } MB)`,
);
