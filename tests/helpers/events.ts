/** Small event builders for tests. */
import type { JetstreamEvent } from "../../src/jetstream/events.ts";

/** A did:plc made from a number. */
export function did(n: number): string {
  const alphabet = "abcdefghijklmnopqrstuvwxyz234567";
  let s = "";
  for (let i = 0, x = n + 1; i < 24; i++, x = Math.floor(x / 32) + i * 7) s += alphabet[x % 32];
  return `did:plc:${s}`;
}

/** A commit event. */
export function commit(
  timeUs: number,
  opts: {
    did?: string;
    collection?: string;
    text?: string;
    rkey?: string;
    operation?: "create" | "update" | "delete";
  } = {},
): JetstreamEvent {
  const collection = opts.collection ?? "app.bsky.feed.post";
  const operation = opts.operation ?? "create";
  const base = {
    rev: `3l${timeUs.toString(32).slice(-11)}`,
    operation,
    collection,
    rkey: opts.rkey ?? `3k${timeUs.toString(32).slice(-11)}`,
  };
  const commit = operation === "delete" ? base : {
    ...base,
    record: {
      $type: collection,
      createdAt: new Date(timeUs / 1000).toISOString(),
      text: opts.text ?? "hello",
    },
    cid: "bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi",
  };
  return { did: opts.did ?? did(1), time_us: timeUs, kind: "commit", commit } as JetstreamEvent;
}

/** An identity event. */
export function identity(timeUs: number, didValue = did(2)): JetstreamEvent {
  return {
    did: didValue,
    time_us: timeUs,
    kind: "identity",
    identity: {
      did: didValue,
      handle: "someone.test",
      seq: timeUs % 1e9,
      time: new Date(timeUs / 1000).toISOString(),
    },
  };
}

/** An account event. */
export function account(timeUs: number, didValue = did(3)): JetstreamEvent {
  return {
    did: didValue,
    time_us: timeUs,
    kind: "account",
    account: { did: didValue, active: true, seq: timeUs % 1e9, time: new Date(timeUs / 1000).toISOString() },
  };
}

/** Reads every message of a KV database's queue with a plain listenQueue, until `count` messages arrived. */
export async function drainQueue(path: string, count: number, timeoutMs = 10_000): Promise<unknown[]> {
  const kv = await Deno.openKv(path);
  const got: unknown[] = [];
  let done!: () => void;
  const finished = new Promise<void>((r) => (done = r));
  const listening = kv.listenQueue((m) => {
    got.push(m);
    if (got.length >= count) done();
  });
  const timer = setTimeout(done, timeoutMs);
  if (count === 0) done();
  await finished;
  clearTimeout(timer);
  kv.close();
  await listening;
  return got;
}
