/**
 * Dead letters: the messages KV gave up delivering, which it writes to the keys given at enqueue time
 * (`["jetfill", queue, "dead", seq]` for jetfill's writer). {@link deadLetters} lists them and
 * {@link requeueDeadLetters} puts them back in the queue.
 *
 * @module
 */
import { queueKey, refuseQueueName } from "./kv_queue.ts";
import { decodeQueueMessage, repackMessage } from "./message.ts";

/** A message KV gave up delivering, as kept under `["jetfill", queue, "dead", seq]`. */
export interface DeadLetter {
  /** The message's `seq` (from its key). */
  seq: number;
  /** The message as enqueued (a `QueueMessage` for jetfill's own messages). */
  message: unknown;
  /** Events in the message (0 when it cannot be decoded). */
  records: number;
  /**
   * Whether the message was handled after all: its acknowledgement was lost on its last delivery.
   * Such a letter is a leftover, not a lost message; {@link requeueDeadLetters} deletes it.
   */
  handled: boolean;
}

/**
 * The dead letters of a queue, lowest `seq` first. A queue name that breaks `queueName`'s rule, or
 * that the database has never held when it holds other queues (a mistyped name), is refused with a
 * `UsageError`.
 *
 * @example
 * ```ts
 * import { deadLetters } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * for (const letter of await deadLetters(kv, "jetstream_sync")) {
 *   if (!letter.handled) console.log(`message ${letter.seq}: ${letter.records} events never handled`);
 * }
 * kv.close();
 * ```
 */
export async function deadLetters(kv: Deno.Kv, queue: string): Promise<DeadLetter[]> {
  await refuseQueueName(kv, queue, "list the dead letters");
  return await deadLettersOf(kv, queue);
}

/** {@link deadLetters} of a queue known to be there. */
export async function deadLettersOf(kv: Deno.Kv, queue: string): Promise<DeadLetter[]> {
  const letters: DeadLetter[] = [];
  for await (const entry of kv.list({ prefix: queueKey(queue, "dead") })) {
    const seq = entry.key[entry.key.length - 1];
    if (typeof seq !== "number") continue;
    let records = 0;
    try {
      records = decodeQueueMessage(entry.value).length;
    } catch {
      // Not a jetfill message: kept and listed, with no events to count.
    }
    letters.push({ seq, message: entry.value, records, handled: false });
  }
  for (let i = 0; i < letters.length; i += 10) {
    const chunk = letters.slice(i, i + 10);
    const marks = await kv.getMany(chunk.map((l) => queueKey(queue, "handled", l.seq)));
    marks.forEach((m, j) => chunk[j].handled = m.versionstamp !== null);
  }
  return letters;
}

/**
 * Puts a queue's dead letters back in the queue, for another round of deliveries (after fixing what
 * made the handler fail); each is deleted in the same commit that enqueues it again. Leftovers of
 * messages that were handled after all are deleted. Resolves to the number of messages requeued. A
 * queue name is refused as {@link deadLetters} refuses it.
 *
 * @example
 * ```ts
 * import { requeueDeadLetters } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * console.log(`${await requeueDeadLetters(kv, "jetstream_sync")} messages requeued`);
 * kv.close();
 * ```
 */
export async function requeueDeadLetters(kv: Deno.Kv, queue: string): Promise<number> {
  await refuseQueueName(kv, queue, "requeue the dead letters");
  let requeued = 0;
  for (const letter of await deadLettersOf(kv, queue)) {
    const key = queueKey(queue, "dead", letter.seq);
    const current = await kv.get(key);
    if (current.versionstamp === null) continue;
    const op = kv.atomic().check(current).delete(key);
    if (!letter.handled) op.enqueue(repackMessage(letter.message), { keysIfUndelivered: [key] });
    const res = await op.commit();
    if (res.ok && !letter.handled) requeued++;
  }
  return requeued;
}
