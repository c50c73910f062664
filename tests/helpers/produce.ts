/**
 * Stores capture lines in a queue through the real Batcher and QueueWriter, as a sync does, for
 * tests of what reads the queue (consume, export, status).
 *
 * @module
 */
import type { JetstreamEvent } from "../../src/jetstream/events.ts";
import { Batcher } from "../../src/pipeline/batch.ts";
import { type Checkpoint, emptyCheckpoint, readCheckpoint } from "../../src/queue/kv_queue.ts";
import { QueueWriter } from "../../src/queue/writer.ts";
import { utcDate } from "../../src/time.ts";

/**
 * Stores `lines` in `queue` (default `jetstream_sync`), continuing its checkpoint, with `batchSize`
 * records a batch (default 50); returns the events as stored.
 */
export async function produce(
  kv: Deno.Kv,
  lines: string[],
  options: { queue?: string; batchSize?: number } = {},
): Promise<JetstreamEvent[]> {
  const queue = options.queue ?? "jetstream_sync";
  const existing = await readCheckpoint(kv, queue);
  const checkpoint: Checkpoint = existing.value ?? emptyCheckpoint(queue);
  const writer = new QueueWriter(kv, queue, { checkpoint, versionstamp: existing.versionstamp }, () => {});
  const batcher = new Batcher(queue, options.batchSize ?? 50);
  const events: JetstreamEvent[] = [];
  for (const line of lines) {
    const ev = JSON.parse(line) as JetstreamEvent;
    events.push(ev);
    const collection = ev.kind === "commit" ? ev.commit.collection : undefined;
    if (batcher.add(ev, line, utcDate(ev.time_us), collection)) await writer.add(batcher.take()!);
  }
  const last = batcher.take();
  if (last) await writer.add(last);
  await writer.flush();
  return events;
}
