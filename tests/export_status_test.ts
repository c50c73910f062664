/**
 * `jetfill export` and `jetfill status`, run as real processes against real KV files; the
 * end-to-end test syncs from the project's loopback server with `jetfill sync`.
 */
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { deserialize } from "node:v8";
import type { JetstreamEvent } from "../src/jetstream/events.ts";
import { decodeQueueMessage, type QueueMessage } from "../src/queue/message.ts";
import { generateCapture } from "../src/server/synth.ts";
import { serveEvents } from "./helpers/loopback.ts";
import { commit } from "./helpers/events.ts";
import { killIfRunning } from "./helpers/cli.ts";
import { produce } from "./helpers/produce.ts";
import { isoFromUs, utcDate } from "../src/time.ts";
import { queueKey } from "../src/queue/kv_queue.ts";
import { pathExists } from "../src/fs.ts";
import { type QueueStatus, queueStatus } from "../src/queue/status.ts";
import { formatStatus } from "../src/cli/status.ts";
import { exportSummary } from "../src/cli/export.ts";
import type { ConsumeResult } from "../src/queue/consume.ts";
import { eachLine } from "./helpers/consume.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;
const TEXT = new TextDecoder();

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function jetfill(...args: string[]): Promise<Run> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--unstable-kv", CLI, ...args],
    stdout: "piped",
    stderr: "piped",
    // None of these runs waits for anything: one that does (a regression) is killed, not waited on.
    signal: AbortSignal.timeout(60_000),
  }).output();
  return { code: out.code, stdout: TEXT.decode(out.stdout), stderr: TEXT.decode(out.stderr) };
}

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "jetfill_export_" });
}

/** Stores `lines` in the default queue of the database at `path`, as a sync does. */
async function store(path: string, lines: string[], batchSize = 100): Promise<JetstreamEvent[]> {
  const kv = await Deno.openKv(path);
  try {
    return await produce(kv, lines, { batchSize });
  } finally {
    kv.close();
  }
}

/** Reads a queue the plain way, independently of consume(): every message, by seq. */
async function readQueue(path: string, messages: number): Promise<QueueMessage[]> {
  const kv = await Deno.openKv(path);
  const got: QueueMessage[] = [];
  let done!: () => void;
  const all = new Promise<void>((r) => done = r);
  const listening = kv.listenQueue((m) => {
    got.push(m as QueueMessage);
    if (got.length === messages) done();
  });
  const timer = setTimeout(done, 10_000);
  await all;
  clearTimeout(timer);
  await new Promise((r) => setTimeout(r, 50));
  kv.close();
  await listening;
  return got.sort((a, b) => a.seq - b.seq);
}

const lines = (text: string) => text.split("\n").filter((l) => l !== "");

Deno.test("jetfill export writes exactly the stored events, in order, and leaves nothing for a second export", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    const stored = await store(path, generateCapture({ count: 2500, seed: 21 }));
    const out = `${dir}/out.ndjson`;
    const first = await jetfill("export", "--kv", path, "--out", out);
    assert.equal(first.code, 0, first.stderr);
    assert.equal(first.stdout, "");
    assert.match(first.stderr, /^jetfill export: 2500 events from \d+ messages appended to .*out\.ndjson \(/);
    const written = lines(await Deno.readTextFile(out));
    assert.deepEqual(written, stored.map((e) => JSON.stringify(e)));
    const before = await Deno.readTextFile(out);
    const second = await jetfill("export", "--kv", path, "--out", out);
    assert.equal(second.code, 0);
    assert.match(second.stderr, /0 events from 0 messages/);
    assert.equal(await Deno.readTextFile(out), before, "appends, never truncates");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export keeps U+2028 and U+2029 escaped, as Jetstream sends them: a line reader splitting on them cuts no event", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    const texts = ["one\u2028two", "para\u2029graph", "plain ✓"];
    const sent = texts.map((text, i) => JSON.stringify(commit(1_725_000_000_000_000 + i, { text })));
    const stored = await store(path, sent);
    const r = await jetfill("export", "--kv", path);
    assert.equal(r.code, 0, r.stderr);
    // (Before: written raw, valid JSON that Python's splitlines(), for one, cuts in two.)
    assert.ok(!/[\u2028\u2029]/.test(r.stdout), r.stdout);
    assert.deepEqual(
      r.stdout.split(/\r?\n|\r|\u2028|\u2029/).filter((l) => l !== "").map((l) => JSON.parse(l)),
      stored,
    );
    assert.equal(lines(r.stdout)[0], sent[0].replace("\u2028", "\\u2028"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export writes to stdout, and cuts a partial last line before appending to --out", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    const stored = await store(path, generateCapture({ count: 300, seed: 22 }), 50);
    const half = await jetfill("export", "--kv", path);
    assert.equal(half.code, 0, half.stderr);
    assert.deepEqual(lines(half.stdout), stored.map((e) => JSON.stringify(e)));
    // `--out -` is stdout too (before, a file named "-" in the working directory).
    const dashed = await store(path, generateCapture({ count: 30, seed: 24 }), 50);
    const dash = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", CLI, "export", "--kv", path, "--out", "-"],
      cwd: dir,
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(60_000),
    }).output();
    assert.equal(dash.code, 0, TEXT.decode(dash.stderr));
    assert.deepEqual(lines(TEXT.decode(dash.stdout)), dashed.map((e) => JSON.stringify(e)));
    assert.equal(await pathExists(`${dir}/-`), false);

    const more = await store(path, generateCapture({ count: 40, seed: 23 }), 50);
    const out = `${dir}/out.ndjson`;
    const kept = JSON.stringify(commit(1_725_000_000_000_000));
    await Deno.writeTextFile(out, `${kept}\n{"did":"did:plc:cut-in-the-middle`);
    const run = await jetfill("export", "--kv", path, "--out", out);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stderr, /removed a partial last line \(33 bytes\)/);
    assert.deepEqual(lines(await Deno.readTextFile(out)), [kept, ...more.map((e) => JSON.stringify(e))]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export --out writes to a named pipe or a device as to stdout (nothing to cut, nothing to fsync)", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    await store(path, generateCapture({ count: 100, seed: 24 }), 50);
    // (Before: exit 1, "cannot write /dev/null: Invalid argument", from the fsync, and every message left.)
    const nowhere = await jetfill("export", "--kv", path, "--out", "/dev/null");
    assert.equal(nowhere.code, 0, nowhere.stderr);
    assert.match(nowhere.stderr, /: 100 events from 2 messages written to \/dev\/null/);
    const stored = await store(path, generateCapture({ count: 200, seed: 26 }), 50);
    const fifo = `${dir}/pipe`;
    assert.ok((await new Deno.Command("mkfifo", { args: [fifo] }).output()).success);
    const reading = Deno.readFile(fifo);
    const piped = await jetfill("export", "--kv", path, "--out", fifo);
    assert.equal(piped.code, 0, piped.stderr);
    assert.deepEqual(lines(TEXT.decode(await reading)), stored.map((e) => JSON.stringify(e)));
    assert.match((await jetfill("export", "--kv", path)).stderr, /0 events from 0 messages/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export --out to a named pipe whose reader closes early ends as for stdout: exit 0", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    // More than a pipe holds (64 KiB): the export is still writing when the reader leaves.
    await store(path, generateCapture({ count: 1000, seed: 27 }), 50);
    const fifo = `${dir}/pipe`;
    assert.ok((await new Deno.Command("mkfifo", { args: [fifo] }).output()).success);
    const reading = (async () => {
      const f = await Deno.open(fifo, { read: true });
      await f.read(new Uint8Array(100));
      f.close();
    })();
    const run = await jetfill("export", "--kv", path, "--out", fifo);
    await reading;
    // (Before: exit 1, "stopped: cannot write …: Broken pipe".)
    assert.equal(run.code, 0, run.stderr);
    assert.match(
      run.stderr,
      /: .*\/pipe was closed by its reader; the message being written stays in the queue/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export says a partial last line of one byte in the singular", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    await store(path, generateCapture({ count: 10, seed: 25 }));
    const out = `${dir}/out.ndjson`;
    await Deno.writeTextFile(out, "{");
    const run = await jetfill("export", "--kv", path, "--out", out);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stderr, /removed a partial last line \(1 byte\) from /);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export keeps a whole last event without its newline, and refuses a file that is no export's output", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    const stored = await store(path, generateCapture({ count: 40, seed: 25 }), 50);
    const out = `${dir}/out.ndjson`;
    const kept = [commit(1_725_000_000_000_000), commit(1_725_000_000_000_001)].map((e) => JSON.stringify(e));
    // A JSON object that is no Jetstream event is not taken for one (before, any object was kept).
    const object = `${dir}/object.ndjson`;
    await Deno.writeTextFile(object, '{"a":1}');
    const notEvent = await jetfill("export", "--kv", path, "--out", object);
    assert.equal(notEvent.code, 2, notEvent.stderr);
    assert.match(notEvent.stderr, /its last 7 bytes are no event and no part of one/);
    assert.equal(await Deno.readTextFile(object), '{"a":1}');
    await Deno.writeTextFile(out, `${kept[0]}\n${kept[1]}`);
    const run = await jetfill("export", "--kv", path, "--out", out);
    assert.equal(run.code, 0, run.stderr);
    assert.doesNotMatch(run.stderr, /removed/);
    assert.deepEqual(lines(await Deno.readTextFile(out)), [...kept, ...stored.map((e) => JSON.stringify(e))]);
    // Not an export's output: left as it is, and nothing leaves the queue.
    const more = await store(path, generateCapture({ count: 10, seed: 26 }), 50);
    const notes = `${dir}/notes.txt`;
    await Deno.writeTextFile(notes, "my notes, no newline");
    // Another queue's name: refused, nothing taken (nor put back, which would reorder the queue
    // the database holds), and a pointer to that queue.
    const other = await jetfill("export", "--kv", path, "--queue-name", "other");
    assert.equal(other.code, 2);
    assert.equal(other.stdout, "");
    assert.equal(
      other.stderr.trim(),
      `jetfill export: Cannot export as queue 'other' has nothing in ${path}, which holds 'jetstream_sync': see --queue-name`,
    );
    const refused = await jetfill("export", "--kv", path, "--out", notes);
    assert.equal(refused.code, 2);
    assert.match(
      refused.stderr,
      /--out ".*notes\.txt" does not end as an export's output \(its last 20 bytes are no event and no part of one\); nothing was changed/,
    );
    assert.equal(await Deno.readTextFile(notes), "my notes, no newline");
    // A last line that starts like JSON, after a line that is no event: no export wrote it.
    await Deno.writeTextFile(notes, '# my notes\n{"not an event, and cut');
    const cut = await jetfill("export", "--kv", path, "--out", notes);
    assert.equal(cut.code, 2);
    assert.match(cut.stderr, /\(its last 23 bytes begin an event but follow a line that is no event\)/);
    await Deno.writeTextFile(notes, "# my notes\n{not json at all");
    assert.equal((await jetfill("export", "--kv", path, "--out", notes)).code, 2);
    assert.equal(await Deno.readTextFile(notes), "# my notes\n{not json at all");
    // After an event, a last line that is an object and more is no part of one either. (Before, any
    // line starting with '{"' that did not parse was cut as the start of an event.)
    const junk = `${JSON.stringify(stored[0])}\n{"did":"a"}}`;
    await Deno.writeTextFile(notes, junk);
    assert.equal((await jetfill("export", "--kv", path, "--out", notes)).code, 2);
    assert.equal(await Deno.readTextFile(notes), junk);
    const rest = await jetfill("export", "--kv", path);
    assert.deepEqual(lines(rest.stdout), more.map((e) => JSON.stringify(e)));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export whose reader closes stdout (export | head) exits 0 quietly and keeps the message it was writing", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    const stored = await store(path, generateCapture({ count: 2500, seed: 24 }));
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", CLI, "export", "--kv", path],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    // Read a first chunk, then close the pipe, as `head` does.
    const reader = child.stdout.getReader();
    const first = await reader.read();
    assert.ok(!first.done && first.value.length > 0);
    await reader.cancel();
    const [status, err] = await Promise.all([child.status, new Response(child.stderr).text()]);
    assert.equal(status.code, 0, err);
    assert.doesNotMatch(err, /Exception in queue handler|failed deliveries/);
    assert.match(err, /stdout was closed by its reader; the message being written stays in the queue/);
    const written = Number(/: (\d+) events? from \d+ messages? written/.exec(err)?.[1]);
    assert.ok(written < stored.length, err);
    // What the first export did not write is all there, in order, and nothing more.
    const rest = await jetfill("export", "--kv", path);
    assert.equal(rest.code, 0, rest.stderr);
    assert.deepEqual(lines(rest.stdout), stored.slice(written).map((e) => JSON.stringify(e)));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export --follow picks up what another process enqueues and exits 130 on SIGINT", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    const out = `${dir}/follow.ndjson`;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", CLI, "export", "--kv", path, "--out", out, "--follow"],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const expected: string[] = [];
    for (let i = 0; i < 3; i++) {
      await new Promise((r) => setTimeout(r, 400));
      const evs = await store(path, generateCapture({ count: 30, seed: 30 + i }), 10);
      expected.push(...evs.map((e) => JSON.stringify(e)));
    }
    const deadline = Date.now() + 5_000;
    while (Date.now() < deadline) {
      const text = await Deno.readTextFile(out).catch(() => "");
      if (lines(text).length >= expected.length) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    killIfRunning(child, "SIGINT");
    const result = await child.output();
    const stderr = TEXT.decode(result.stderr);
    assert.equal(result.code, 130, stderr);
    assert.match(
      stderr,
      /^jetfill export: no database at \S*q\.sqlite yet; made an empty one, and waiting for a sync to write queue 'jetstream_sync' there/,
    );
    // (Before: the same words as an export that finished.)
    assert.match(
      stderr,
      /90 events from 9 messages appended to \S+; stopped by SIGINT: what was not written stays in the queue \(/,
    );
    assert.deepEqual(lines(await Deno.readTextFile(out)), expected);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export --follow on an empty file says it made the file a database, not that there was none", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    await Deno.writeFile(path, new Uint8Array());
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--unstable-kv", CLI, "export", "--kv", path, "--follow"],
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const said: string[] = [];
    await eachLine(child.stderr, (line) => {
      said.push(line);
      if (said.length === 1) killIfRunning(child, "SIGINT");
    });
    assert.equal((await child.status).code, 130);
    assert.equal(
      said[0],
      `jetfill export: the database ${path} is an empty file; made it an empty database, and waiting for a sync to write queue 'jetstream_sync' there (Ctrl-C stops)`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the export summary says how many events it wrote for deliveries it could not record as handled, and how many of another queue's messages it put back", () => {
  const result = {
    messages: 3,
    records: 300,
    duplicates: 0,
    failures: 1,
    foreign: 0,
    elapsed: 1.2,
  } as ConsumeResult;
  assert.equal(
    exportSummary(result, "a.ndjson", 400),
    "jetfill export: 300 events from 3 messages appended to a.ndjson; 1 failed delivery left to KV; 100 more events written for deliveries that could not be recorded as handled: KV delivers them again, so they are written twice (here or by the next export) (1.2 s)",
  );
  assert.equal(
    exportSummary(result, undefined),
    "jetfill export: 300 events from 3 messages written; 1 failed delivery left to KV (1.2 s)",
  );
  // (Before, another queue's messages taken and put back went unsaid.)
  assert.equal(
    exportSummary({ ...result, failures: 0, foreign: 2 }, undefined),
    "jetfill export: 300 events from 3 messages written; 2 deliveries of another queue's messages put back for its consumer (1.2 s)",
  );
});

Deno.test("jetfill export and status refuse a missing database and bad flags with exit code 2", async () => {
  const dir = await tempDir();
  try {
    const missing = `${dir}/missing.sqlite`;
    const exp = await jetfill("export", "--kv", missing);
    assert.equal(exp.code, 2);
    assert.match(
      exp.stderr,
      /jetfill export: Cannot export as the database ".*missing\.sqlite" does not exist/,
    );
    const st = await jetfill("status", "--kv", missing);
    assert.equal(st.code, 2);
    assert.match(
      st.stderr,
      /jetfill status: Cannot show the status as the database ".*missing\.sqlite" does not exist/,
    );
    assert.equal((await Array.fromAsync(Deno.readDir(dir))).length, 0, "no database was created");
    const folder = await jetfill("status", "--kv", dir);
    assert.equal(folder.code, 2);
    assert.equal(
      folder.stderr.trim(),
      `jetfill status: Cannot show the status as ${
        JSON.stringify(dir)
      } is not a file (--kv names a Deno KV database file)`,
    );
    for (const command of ["export", "status"]) {
      for (const name of ["", "bad/name"]) {
        const refused = await jetfill(command, "--queue-name", name);
        assert.equal(refused.code, 2);
        assert.match(
          refused.stderr,
          new RegExp(
            `jetfill ${command}: --queue-name must be 1 to 100 letters.*: current value is "${name}"`,
          ),
        );
      }
    }
    const bad = await jetfill("export", "--nope");
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /see 'deno run -A \S*cli\.ts export --help'/);
    const help = await jetfill("export", "--help");
    assert.equal(help.code, 0);
    assert.match(help.stdout, /Export consumes the queue/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill status shows the queue's counts, per-day records and dead letters, in text and JSON", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    const stored = await store(path, generateCapture({ count: 450, seed: 24 }), 100);
    const days: Record<string, number> = {};
    for (const e of stored) {
      const d = utcDate(e.time_us);
      days[d] = (days[d] ?? 0) + 1;
    }
    // A dead letter, as KV makes it when a message's retries run out: out of its queue, into the key.
    const db = new DatabaseSync(path);
    for (const row of db.prepare("select id, data from queue").all() as { id: string; data: Uint8Array }[]) {
      if ((deserialize(row.data) as QueueMessage).seq === 2) {
        db.prepare("delete from queue where id = ?").run(row.id);
      }
    }
    db.close();
    const kv = await Deno.openKv(path);
    const enqueued = await kv.get(["jetfill", "jetstream_sync", "count", "messages"]);
    const messages = Number((enqueued.value as Deno.KvU64).value);
    await kv.set(["jetfill", "jetstream_sync", "dead", 2], {
      v: 1,
      queue: "jetstream_sync",
      seq: 2,
      cursor: 0,
      records: stored.slice(0, 7),
    });
    // The writer lock of a sync killed a minute ago.
    const killedAt = Date.now() - 60_000;
    await kv.set(queueKey("jetstream_sync", "writer"), { run: "killed-run", at: killedAt });
    kv.close();
    const run = await jetfill("status", "--kv", path, "--json");
    assert.equal(run.code, 0, run.stderr);
    const s = JSON.parse(run.stdout);
    assert.equal(s.kv, path);
    assert.equal(s.latestCursor, stored.at(-1)!.time_us);
    assert.equal(s.latestCursorTime, isoFromUs(stored.at(-1)!.time_us));
    assert.equal(s.recordsStored, 450);
    assert.equal(s.messagesEnqueued, messages);
    assert.equal(s.messagesWaiting, messages - 1);
    assert.equal(s.recordsWaiting, 450 - 7);
    assert.equal(s.deadLetters, 1);
    assert.equal(s.deadRecords, 7);
    assert.equal(s.queueLength, messages);
    assert.deepEqual(s.recordsPerDay, days);
    assert.equal(s.lastRun, null);
    const killed = new Date(killedAt).toISOString();
    assert.deepEqual(s.writer, { run: "killed-run", since: killed, lastSeen: killed, lockFile: false });
    const text = await jetfill("status", "--kv", path);
    assert.match(text.stdout, /writer\s+left by a sync that did not stop cleanly: run killed-run since /);
    assert.equal(text.code, 0);
    assert.match(text.stdout, new RegExp(`waiting\\s+443 records in ${messages - 1} messages`));
    assert.match(text.stdout, /dead letters\s+1 message \(7 records\)/);
    assert.match(text.stdout, /last cursor\s+\d+ \(\d{4}-\d\d-\d\dT[\d:.]+Z\)/);
    assert.equal(text.stderr, "");
    // Another queue's name: refused, with a pointer to the queue the database holds.
    const other = await jetfill("status", "--kv", path, "--queue-name", "other");
    assert.equal(other.code, 2);
    assert.equal(other.stdout, "");
    assert.equal(
      other.stderr.trim(),
      `jetfill status: Cannot show the status as queue 'other' has nothing in ${path}, which holds 'jetstream_sync': see --queue-name`,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a finished jetfill sync: status --json matches its statistics, export matches an independent reading", async () => {
  const dir = await tempDir();
  try {
    const capture = generateCapture({ count: 3000, seed: 25 });
    await using server = serveEvents(capture, { closeAtEnd: true });
    const path = `${dir}/sync.sqlite`;
    const sync = await jetfill(
      "sync",
      "--instance",
      server.url,
      "--kv",
      path,
      "--collection",
      "app.bsky.feed.*",
      "--limit",
      "100000",
      "--json",
    );
    assert.equal(sync.code, 0, sync.stderr);
    const stats = JSON.parse(sync.stdout);
    assert.equal(stats.stopReason, "closed");
    assert.ok(stats.recordsStored > 500);

    const status = await jetfill("status", "--kv", path, "--json");
    assert.equal(status.code, 0, status.stderr);
    const s = JSON.parse(status.stdout);
    assert.deepEqual(s.lastRun.stats, stats);
    assert.equal(s.writer, null, "the sync gave its writer lock back");
    assert.equal(s.recordsStored, stats.recordsStored);
    assert.equal(s.messagesEnqueued, stats.messagesEnqueued);
    assert.equal(s.messagesWaiting, stats.messagesEnqueued);
    assert.equal(s.queueLength, stats.queueLength);
    assert.equal(s.latestCursor, stats.latestCursor);
    assert.deepEqual(s.recordsPerDay, stats.recordsPerDay);
    // Nothing wrote while it read.
    assert.equal(s.steady, true);
    assert.equal(s.lastRun.options.queueName, "jetstream_sync");
    // Every option it ran with, the event size limit's default included.
    assert.equal(s.lastRun.options.maxEventBytes, 1048576);

    // An independent reading of the same queue, from a copy of the database.
    const copy = `${dir}/copy.sqlite`;
    await Deno.copyFile(path, copy);
    const independent = (await readQueue(copy, stats.messagesEnqueued)).flatMap((m) => decodeQueueMessage(m));
    const out = `${dir}/export.ndjson`;
    const exp = await jetfill("export", "--kv", path, "--out", out);
    assert.equal(exp.code, 0, exp.stderr);
    const exported = lines(await Deno.readTextFile(out));
    assert.equal(exported.length, stats.recordsStored);
    assert.deepEqual(exported, independent.map((e) => JSON.stringify(e)));
    const selected = capture.filter((l) =>
      (JSON.parse(l) as JetstreamEvent).kind === "commit" &&
      (JSON.parse(l) as { commit: { collection: string } }).commit.collection.startsWith("app.bsky.feed.")
    );
    assert.deepEqual(exported, selected.map((l) => JSON.stringify(JSON.parse(l))));

    const after = JSON.parse((await jetfill("status", "--kv", path, "--json")).stdout);
    assert.deepEqual(
      [after.messagesHandled, after.recordsHandled, after.messagesWaiting, after.queueLength],
      [stats.messagesEnqueued, stats.recordsStored, 0, 0],
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("queueStatus() reads the checkpoint with the counters: a sync's commit between them leaves stored = handled + waiting", async () => {
  const dir = await tempDir();
  const kv = await Deno.openKv(`${dir}/q.sqlite`);
  try {
    await produce(kv, generateCapture({ count: 300, seed: 31 }), { batchSize: 50 });
    const checkpoint = JSON.stringify(queueKey("jetstream_sync", "checkpoint"));
    let committed = false;
    // A sync that commits 50 more records just after the status read the checkpoint.
    const busy = new Proxy(kv, {
      get(target, prop) {
        if (prop === "get") {
          return async (key: Deno.KvKey) => {
            const entry = await target.get(key);
            if (!committed && JSON.stringify(key) === checkpoint) {
              committed = true;
              await produce(target, generateCapture({ count: 50, seed: 32 }), { batchSize: 50 });
            }
            return entry;
          };
        }
        const value = Reflect.get(target, prop);
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
    const s = await queueStatus(busy, "jetstream_sync");
    assert.ok(committed);
    // (Before: the checkpoint's 300 records stored against the counters' 350 waiting.)
    assert.equal(s.recordsStored, 350);
    assert.equal(s.recordsStored, s.recordsHandled + s.recordsWaiting + s.deadRecords);
    assert.equal(s.messagesEnqueued, s.messagesHandled + s.messagesWaiting + s.deadLetters);
    assert.equal(s.steady, true);
    assert.equal(Object.values(s.recordsPerDay).reduce((a, b) => a + b, 0), s.recordsStored);
  } finally {
    kv.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("queueStatus() under a sync that commits at every reading says its figures are not steady", async () => {
  const dir = await tempDir();
  const kv = await Deno.openKv(`${dir}/q.sqlite`);
  try {
    await produce(kv, generateCapture({ count: 100, seed: 33 }), { batchSize: 50 });
    const counters = JSON.stringify(queueKey("jetstream_sync", "count", "messages"));
    let commits = 0;
    // A commit of 10 more records after each reading of the counters.
    const busy = new Proxy(kv, {
      get(target, prop) {
        if (prop === "getMany") {
          return async (keys: Deno.KvKey[]) => {
            const entries = await target.getMany(keys);
            if (JSON.stringify(keys[0]) === counters) {
              commits++;
              await produce(target, generateCapture({ count: 10, seed: 100 + commits }), { batchSize: 10 });
            }
            return entries;
          };
        }
        const value = Reflect.get(target, prop);
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
    const s = await queueStatus(busy, "jetstream_sync");
    assert.ok(commits >= 5, `${commits} commits`);
    assert.equal(s.steady, false);
  } finally {
    kv.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("status says when the queue changed all through the reading, and then draws nothing from the difference", () => {
  const moving: QueueStatus = {
    queue: "q",
    lastSeq: 10,
    latestCursor: null,
    latestCursorTime: null,
    checkpointUpdatedAt: null,
    recordsStored: 1000,
    messagesEnqueued: 10,
    messagesHandled: 2,
    recordsHandled: 200,
    messagesWaiting: 7,
    recordsWaiting: 700,
    messagesParked: 0,
    deadLetters: 0,
    deadRecords: 0,
    queueLength: 7,
    recordsPerDay: {},
    steady: false,
    writer: null,
    resumeRun: null,
    lastRun: null,
  };
  const text = formatStatus(moving, "q.sqlite");
  assert.match(text, /^note +the queue changed all through the reading \(a sync or a consumer at work\)/m);
  assert.doesNotMatch(text, /taken elsewhere/);
  const still = formatStatus({ ...moving, steady: true }, "q.sqlite");
  assert.doesNotMatch(still, /^note /m);
  assert.match(still, /^taken elsewhere +100 records in 1 message /m);
  // The last run's line counts in the singular too. (Before: "1 records in 1 messages".)
  const one = formatStatus({
    ...moving,
    lastRun: {
      id: "r1",
      finishedAt: "2026-12-02T10:00:00.000Z",
      options: {},
      stats: { recordsStored: 1, messagesEnqueued: 1, totalTime: 0.5, stopReason: "limit" },
    },
  }, "q.sqlite");
  assert.match(one, /^ {2}stored +1 record in 1 message, 0\.50 s, stop reason limit$/m);
});

Deno.test("status ties a held lock file to the writer only when the writer said it holds one", () => {
  const long = new Date(Date.now() - 60_000).toISOString();
  const base: QueueStatus = {
    queue: "q",
    lastSeq: 0,
    latestCursor: null,
    latestCursorTime: null,
    checkpointUpdatedAt: null,
    recordsStored: 0,
    messagesEnqueued: 0,
    messagesHandled: 0,
    recordsHandled: 0,
    messagesWaiting: 0,
    recordsWaiting: 0,
    messagesParked: 0,
    deadLetters: 0,
    deadRecords: 0,
    queueLength: 0,
    recordsPerDay: {},
    steady: true,
    writer: { run: "r1", since: long, lastSeen: long, lockFile: true },
    resumeRun: null,
    lastRun: null,
  };
  const held = { path: "/d/q.sqlite@q.lock", held: true };
  // Silent for a minute, but its process holds the lock file: running (paused, say).
  assert.match(
    formatStatus(base, "q.sqlite", held),
    /^writer +a sync is running \(its process holds \/d\/q\.sqlite@q\.lock\): run r1/m,
  );
  assert.match(
    formatStatus(base, "q.sqlite", { ...held, held: false }),
    /^writer +left by a sync that did not stop cleanly/m,
  );
  // Seen a moment ago, but its lock file is free: it is gone (killed), not running.
  const now = new Date().toISOString();
  assert.match(
    formatStatus({ ...base, writer: { ...base.writer!, lastSeen: now } }, "q.sqlite", {
      ...held,
      held: false,
    }),
    /^writer +left by a sync that did not stop cleanly \(no process holds its lock file\)/m,
  );
  // A writer with a Deno.Kv handle has no lock file: the one held is another process's.
  const handle = { ...base, writer: { ...base.writer!, lockFile: false } };
  const text = formatStatus(handle, "q.sqlite", held);
  assert.match(text, /^writer +left by a sync that did not stop cleanly: run r1/m);
  assert.match(text, /^lock file +held by a running process: \/d\/q\.sqlite@q\.lock$/m);
  assert.match(
    formatStatus({ ...base, writer: null }, "q.sqlite", held),
    /^writer +a sync is starting or stopping/m,
  );
});

Deno.test("status, export and sync refuse a file that is not a Deno KV database, and leave it as it was", async () => {
  const dir = await tempDir();
  try {
    const { DatabaseSync } = await import("node:sqlite");
    const other = `${dir}/other.db`;
    const db = new DatabaseSync(other);
    db.exec("CREATE TABLE notes (x); INSERT INTO notes VALUES (1)");
    db.close();
    const text = `${dir}/notes.txt`;
    await Deno.writeTextFile(text, "not a database at all");
    const empty = `${dir}/empty.sqlite`;
    await Deno.writeTextFile(empty, "");
    const files = [other, text, empty];
    const before = await Promise.all(files.map((f) => Deno.readFile(f)));
    const sqlite = /"\S*other\.db" is a SQLite database but not a Deno KV one \(its tables: notes\)/;
    const notSqlite = /"\S*notes\.txt" is not a Deno KV database \(SQLite says: file is not a database\)/;
    const cases: [string[], RegExp][] = [
      [["status", "--kv", other], sqlite],
      [["export", "--kv", other], sqlite],
      [["sync", "--kv", other, "--instance", "ws://127.0.0.1:9/subscribe"], sqlite],
      [["status", "--kv", text], notSqlite],
      [["export", "--kv", text], notSqlite],
      [["status", "--kv", empty], /"\S*empty\.sqlite" is an empty file, not a Deno KV database/],
      [["export", "--kv", empty], /"\S*empty\.sqlite" does not exist or is an empty file/],
    ];
    for (const [args, message] of cases) {
      const run = await jetfill(...args);
      assert.equal(run.code, 2, `${args.join(" ")}: ${run.stderr}`);
      assert.match(run.stderr, message, args.join(" "));
    }
    const after = await Promise.all(files.map((f) => Deno.readFile(f)));
    assert.deepEqual(after, before);
    assert.deepEqual((await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort(), [
      "empty.sqlite",
      "notes.txt",
      "other.db",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export --follow waits for a database that a sync will make, but not in a folder that does not exist", async () => {
  const dir = await tempDir();
  try {
    const missing = `${dir}/typo/q.sqlite`;
    const run = await jetfill("export", "--kv", missing, "--follow");
    assert.equal(run.code, 2);
    assert.match(
      run.stderr,
      /^jetfill export: Cannot export as neither the database ".*typo\/q\.sqlite" nor its folder ".*typo" exists \(check --kv\): --follow waits for a sync only in an existing folder\n$/,
    );
    assert.equal(await pathExists(`${dir}/typo`), false);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export says what it leaves aside: the dead letters", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    const stored = await store(path, generateCapture({ count: 30, seed: 31 }), 10);
    // Message 2's retries ran out: KV took it out of its queue and wrote it under the dead key.
    const messages = await readQueue(path, 3);
    const kv = await Deno.openKv(path);
    for (const m of messages) {
      if (m.seq === 2) await kv.set(["jetfill", "jetstream_sync", "dead", 2], m);
      else await kv.enqueue(m);
    }
    kv.close();
    const exported = await jetfill("export", "--kv", path);
    assert.equal(exported.code, 0, exported.stderr);
    assert.deepEqual(
      lines(exported.stdout),
      [...stored.slice(0, 10), ...stored.slice(20)].map((e) => JSON.stringify(e)),
    );
    assert.match(
      exported.stderr,
      /^jetfill export: 1 dead-lettered message \(10 records\) not exported: they failed every retry in an earlier consumer; the library's requeueDeadLetters\(kv, queue\) puts them back \(docs\/consuming\.md\)$/m,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export --follow of a queue name the database never held says so, and waits for it without taking the others' messages", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    await store(path, generateCapture({ count: 20, seed: 32 }), 10);
    const waited = `${dir}/other.ndjson`;
    /** An export --follow of 'other', with its stderr line by line. */
    const follow = () => {
      const child = new Deno.Command(Deno.execPath(), {
        args: [
          ...["run", "-A", "--unstable-kv", CLI, "export", "--kv", path, "--queue-name", "other", "--follow"],
          ...["--out", waited],
        ],
        stdout: "null",
        stderr: "piped",
        signal: AbortSignal.timeout(60_000),
      }).spawn();
      const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
      let stderr = "";
      const readLine = async () => {
        while (!stderr.includes("\n")) {
          const { value, done } = await reader.read();
          if (done) break;
          stderr += value;
        }
        const [line] = stderr.split("\n");
        stderr = stderr.slice(line.length + 1);
        return line;
      };
      const stop = async () => {
        killIfRunning(child, "SIGINT");
        const { code } = await child.status;
        const summary = await readLine();
        reader.releaseLock();
        await child.stderr.cancel().catch(() => {});
        return { code, summary };
      };
      return { readLine, stop };
    };
    const waiting =
      `jetfill export: queue 'other' has nothing in ${path}, which holds 'jetstream_sync'; waiting for a sync to write 'other' (see --queue-name)`;
    // Stopped while it waits: it took nothing. (Before: it listened, and took the other queue's
    // messages and put them back, over and over, hundreds a second.)
    const idle = follow();
    assert.equal(await idle.readLine(), waiting);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const stopped = await idle.stop();
    assert.equal(stopped.code, 130);
    assert.match(
      stopped.summary,
      /^jetfill export: 0 events from 0 messages appended to .*\/other\.ndjson; stopped by SIGINT: what was not written stays in the queue \(\d+\.\d s\)$/,
    );
    // Once a sync writes the queue, what comes is exported.
    const picking = follow();
    assert.equal(await picking.readLine(), waiting);
    const kv = await Deno.openKv(path);
    const theirs = await produce(kv, generateCapture({ count: 5, seed: 33 }), { queue: "other" })
      .finally(() => kv.close());
    for (let i = 0; i < 100 && lines(await Deno.readTextFile(waited)).length < 5; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const picked = await picking.stop();
    assert.equal(picked.code, 130);
    assert.match(picked.summary, /^jetfill export: 5 events from 1 message appended to /);
    assert.deepEqual(lines(await Deno.readTextFile(waited)), theirs.map((e) => JSON.stringify(e)));
    // The queue it does hold is all still there.
    const rest = await jetfill("export", "--kv", path);
    assert.equal(lines(rest.stdout).length, 20);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("jetfill export refuses an --out that is the database or a file kept beside it, and changes nothing", async () => {
  const dir = await tempDir();
  try {
    const path = `${dir}/q.sqlite`;
    await store(path, generateCapture({ count: 20, seed: 27 }));
    await Deno.writeTextFile(`${path}@jetstream_sync.lock`, "");
    await Deno.symlink(dir, `${dir}/link`);
    const before = await Deno.readFile(path);
    // (Before: the lock file became the export's output, and the database was refused as "no event".)
    for (
      const [out, what] of [
        [path, "the database itself"],
        [`${dir}/link/q.sqlite`, "the database itself"],
        [`${path}@jetstream_sync.lock`, "a file kept beside the database"],
        [`${path}-wal`, "a file kept beside the database"],
      ]
    ) {
      const r = await jetfill("export", "--kv", path, "--out", out);
      assert.equal(r.code, 2, r.stderr);
      assert.equal(
        r.stderr.trim(),
        `jetfill export: --out ${JSON.stringify(out)} is ${what} (--kv ${
          JSON.stringify(path)
        }), which export must not write into: give another file`,
      );
    }
    assert.equal(await Deno.readTextFile(`${path}@jetstream_sync.lock`), "");
    assert.deepEqual(await Deno.readFile(path), before);
    // Nothing left the queue.
    const all = await jetfill("export", "--kv", path);
    assert.equal(lines(all.stdout).length, 20);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("status, export and consume refuse a database that holds no jetfill queue but another program's data, and leave its queue as it was", async () => {
  // Before, they took it for an empty jetfill database: status showed an empty queue, and export and
  // consume took the other program's messages and put them back without their keysIfUndelivered.
  const dir = await tempDir();
  const withKeys = `${dir}/app.sqlite`;
  const queueOnly = `${dir}/jobs.sqlite`;
  for (const path of [withKeys, queueOnly]) {
    const kv = await Deno.openKv(path);
    if (path === withKeys) await kv.set(["users", 1], "someone");
    for (let i = 0; i < 3; i++) await kv.enqueue({ job: i }, { keysIfUndelivered: [["failed", i]] });
    kv.close();
  }
  const kept = (path: string) => {
    const db = new DatabaseSync(path, { readOnly: true });
    try {
      return db.prepare("select keys_if_undelivered as k from queue").all().map((r) => String(r.k));
    } finally {
      db.close();
    }
  };
  const before = [kept(withKeys), kept(queueOnly)];
  assert.equal(before[0].length, 3);
  // (The key ["failed", i], encoded: "failed" is 102,97,105,108,101,100.)
  assert.ok(before.flat().every((k) => k.includes("2,102,97,105,108,101,100,0")), JSON.stringify(before));
  const refusal = (command: string, path: string, held: string) =>
    `jetfill ${command}: Cannot ${
      command === "status" ? "show the status" : command
    } as ${path} holds no jetfill queue but another program's data (${held}): give the path of a jetfill database`;
  const status = await jetfill("status", "--kv", withKeys);
  assert.equal(status.code, 2, status.stderr);
  assert.equal(status.stderr.trim(), refusal("status", withKeys, `the key ["users", 1]`));
  const exported = await jetfill("export", "--kv", queueOnly, "--out", `${dir}/out.ndjson`);
  assert.equal(exported.code, 2, exported.stderr);
  assert.equal(exported.stderr.trim(), refusal("export", queueOnly, "3 queued messages"));
  assert.equal(await pathExists(`${dir}/out.ndjson`), false);
  const { consume } = await import("../src/queue/consume.ts");
  await assert.rejects(
    consume({ kv: withKeys, untilEmpty: true, handler: () => {} }),
    (err: Error) =>
      err.name === "UsageError" && /holds no jetfill queue but another program's data/.test(err.message),
  );
  const { queueLength } = await import("../src/queue/status.ts");
  const kv = await Deno.openKv(withKeys);
  try {
    await assert.rejects(
      queueLength(kv, "jetstream_sync"),
      (err: Error) =>
        err.message ===
          `Cannot count the messages waiting as this database holds no jetfill queue but another program's data (the key ["users", 1]): give the path of a jetfill database`,
    );
  } finally {
    kv.close();
  }
  assert.deepEqual([kept(withKeys), kept(queueOnly)], before);
  await Deno.remove(dir, { recursive: true });
});
