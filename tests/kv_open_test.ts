import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { runBackfillSync } from "../src/backfill.ts";
import { KV_PAGE_SIZE, openKvAt, retryWhileBusy } from "../src/queue/kv_queue.ts";
import type { QueueMessage } from "../src/queue/message.ts";
import { commit, did, drainQueue } from "./helpers/events.ts";
import { serveEvents, tempDb } from "./helpers/loopback.ts";
import { UsageError } from "../src/errors.ts";
import { runCli, runCliUnprivileged } from "./helpers/cli.ts";

const T0 = Date.UTC(2026, 10, 27) * 1000;

/** The page size and journal mode SQLite reads from the file at `path`. */
function pragmas(path: string): { pageSize: number; journal: string } {
  const db = new DatabaseSync(path);
  try {
    const { page_size } = db.prepare("PRAGMA page_size").get() as { page_size: number };
    const { journal_mode } = db.prepare("PRAGMA journal_mode").get() as { journal_mode: string };
    return { pageSize: page_size, journal: journal_mode };
  } finally {
    db.close();
  }
}

/** The records of a queue's `count` messages, read with a plain listenQueue, in seq order. */
async function storedRecords(path: string, count: number) {
  const msgs = (await drainQueue(path, count)) as QueueMessage[];
  assert.equal(msgs.length, count);
  return msgs.sort((a, b) => a.seq - b.seq).flatMap((m) => m.records);
}

/** Posts one a second, each of about 3 KB, so that a message spans several pages of either size. */
function posts(n: number) {
  return Array.from(
    { length: n },
    (_, i) => commit(T0 + i * 1e6, { did: did(i), text: `${i} `.repeat(1000) }),
  );
}

Deno.test("a sync creates its database with 16 KiB pages in WAL mode, and a plain Deno.openKv reads it", async () => {
  const events = posts(120);
  await using server = serveEvents(events);
  await using db = await tempDb();
  const stats = await runBackfillSync({
    instance: server.url,
    kv: `${db.dir}/new/q.sqlite`,
    batchSize: 50,
    numRecords: 120,
  });
  assert.equal(stats.recordsStored, 120);
  assert.deepEqual(pragmas(`${db.dir}/new/q.sqlite`), { pageSize: KV_PAGE_SIZE, journal: "wal" });
  assert.deepEqual(await storedRecords(`${db.dir}/new/q.sqlite`, stats.queueLength), events);
  // Nothing is left of the database made under another name; the queue's lock file stays.
  assert.deepEqual([...Deno.readDirSync(`${db.dir}/new`)].map((e) => e.name).sort(), [
    "q.sqlite",
    "q.sqlite@jetstream_sync.lock",
  ]);
});

Deno.test("a sync into a database that Deno KV created keeps its pages and adds to its queue", async () => {
  const events = posts(60);
  await using server = serveEvents(events);
  await using db = await tempDb();
  const kv = await Deno.openKv(db.path);
  await kv.set(["mine"], "kept");
  kv.close();
  const before = pragmas(db.path).pageSize;
  assert.notEqual(before, KV_PAGE_SIZE);
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, batchSize: 30, numRecords: 60 });
  assert.equal(stats.recordsStored, 60);
  assert.equal(pragmas(db.path).pageSize, before);
  assert.deepEqual(await storedRecords(db.path, stats.queueLength), events);
  const again = await Deno.openKv(db.path);
  assert.equal((await again.get(["mine"])).value, "kept");
  again.close();
});

Deno.test("openKvAt() called at once from several places creates one database that they all share", async () => {
  await using db = await tempDb();
  const handles = await Promise.all(Array.from({ length: 4 }, () => openKvAt(db.path)));
  try {
    await handles[0].set(["k"], 1);
    for (const kv of handles) assert.equal((await kv.get(["k"])).value, 1);
  } finally {
    for (const kv of handles) kv.close();
  }
  assert.equal(pragmas(db.path).pageSize, KV_PAGE_SIZE);
  const names = [...Deno.readDirSync(db.dir)].map((e) => e.name);
  assert.ok(!names.some((n) => n.includes(".new")), `leftovers: ${names.join(", ")}`);
});

Deno.test("openKvAt() creates its database with 16 KiB pages under permissions scoped to its folder", async () => {
  await using db = await tempDb();
  // A process allowed to read and write only that folder, as a careful user would run it.
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--unstable-kv",
      `--allow-read=${db.dir}`,
      `--allow-write=${db.dir}`,
      import.meta.filename!,
      "open",
      db.path,
    ],
    stderr: "inherit",
  }).output();
  assert.ok(out.success);
  assert.equal(pragmas(db.path).pageSize, KV_PAGE_SIZE);
});

Deno.test("retryWhileBusy() tries again every few milliseconds, so that short gaps in another writer's lock are caught", async () => {
  // Busy for 40 tries, as under a consumer in another process that holds the write lock for most of
  // each second: tries every few milliseconds get there in well under a second, while a growing
  // backoff (50, 100, 200, 400 ms…) would spend the whole 5 s budget on the first seven.
  let calls = 0;
  const result = await retryWhileBusy(
    () => ++calls <= 40 ? Promise.reject(new TypeError("database is locked")) : Promise.resolve("done"),
    5000,
  );
  assert.equal(result, "done");
  assert.equal(calls, 41);
});

Deno.test("retryWhileBusy() runs again while the database is busy, then says for how long it waited", async () => {
  let calls = 0;
  const busy = () => Promise.reject(new TypeError("database is locked"));
  assert.equal(await retryWhileBusy(() => ++calls < 3 ? busy() : Promise.resolve("done"), 1000), "done");
  assert.equal(calls, 3);
  await assert.rejects(
    () => retryWhileBusy(busy, 100),
    /database is locked: another connection kept the database busy for 0\.\d s .*run again/,
  );
  calls = 0;
  await assert.rejects(
    () => retryWhileBusy(() => (calls++, Promise.reject(new Error("disk full"))), 1000),
    /disk full/,
  );
  assert.equal(calls, 1);
});

// The subprocess of the tests above and below.
if (import.meta.main && Deno.args[0] === "open") {
  const kv = await openKvAt(Deno.args[1]);
  await kv.set(["k"], 1);
  kv.close();
}
if (import.meta.main && Deno.args[0] === "open-denied") {
  for (const path of Deno.args.slice(1)) {
    try {
      (await openKvAt(path)).close();
      console.log("opened");
    } catch (err) {
      console.log(JSON.stringify({ name: (err as Error).name, message: (err as Error).message }));
    }
  }
}

Deno.test("openKvAt() says that Deno's permissions refused the database, as bad input (a UsageError)", async () => {
  await using db = await tempDb();
  // Allowed to read the folder, not to write it: neither a new subfolder nor the file can be made.
  const paths = [`${db.dir}/sub/q.sqlite`, db.path];
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--no-prompt",
      "--unstable-kv",
      `--allow-read=${db.dir}`,
      import.meta.filename!,
      "open-denied",
      ...paths,
    ],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  const lines = new TextDecoder().decode(out.stdout).trim().split("\n").map((l) => JSON.parse(l));
  assert.equal(lines.length, 2);
  for (const [i, { name, message }] of lines.entries()) {
    assert.equal(name, "UsageError", message);
    assert.ok(message.includes(JSON.stringify(paths[i])), message);
    assert.match(message, /Requires write access to .*--allow-write/);
  }
  // A folder that exists is not made again (which Deno's permissions refuse all the same).
  assert.match(lines[1].message, /^cannot open the Deno KV database /);
  // The command line says so as bad input: exit 2, one line.
  const cli = new URL("../cli.ts", import.meta.url).pathname;
  const status = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--no-prompt", "--unstable-kv", cli, "status", "--kv", db.path],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(status.code, 2, new TextDecoder().decode(status.stderr));
  assert.match(
    new TextDecoder().decode(status.stderr),
    /^jetfill status: Requires read access to .*--allow-read flag\n$/,
  );
});

Deno.test("openKvAt() without read access to an existing folder says so, not that it could not make it", async () => {
  await using db = await tempDb();
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--no-prompt", "--unstable-kv", import.meta.filename!, "open-denied", db.path],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  const { name, message } = JSON.parse(new TextDecoder().decode(out.stdout));
  assert.equal(name, "UsageError", message);
  // (Before: "cannot make the folder of the Deno KV database …: Requires write access to" the folder,
  // which was there all along.)
  assert.equal(
    message,
    `Cannot open the Deno KV database ${JSON.stringify(db.path)}: Requires read access to ${
      JSON.stringify(db.dir)
    }, run again with the --allow-read flag`,
  );
  assert.deepEqual([...Deno.readDirSync(db.dir)], []);
  // Allowed to write, and to read the database file alone: it opens, as it did before the look at
  // the folder was said as a refusal.
  const allowed = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--no-prompt",
      "--unstable-kv",
      `--allow-read=${db.path}`,
      "--allow-write",
      import.meta.filename!,
      "open-denied",
      db.path,
    ],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  assert.equal(new TextDecoder().decode(allowed.stdout).trim(), "opened");
});

Deno.test("openKvAt() names a database it cannot open, and why when it can tell", async () => {
  const dir = await Deno.makeTempDir({ prefix: "jetfill-test-" });
  try {
    await assert.rejects(
      () => openKvAt(dir),
      (err: unknown) =>
        err instanceof UsageError &&
        err.message.startsWith(`cannot open the Deno KV database ${JSON.stringify(dir)}: `) &&
        err.message.endsWith("(it is a folder: give the database file's path)"),
    );
    // Bad input, as the CLI says it: exit 2, for every command.
    for (const args of [["export", "--out", `${dir}/x.ndjson`], ["sync", "--max-time", "1"], ["status"]]) {
      const r = await runCli([...args, "--kv", dir]);
      assert.equal(r.code, 2, `${args[0]}: ${r.stderr}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a database path through a file (not a folder) is bad input for every command, naming the file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "jetfill-test-" });
  try {
    const file = `${dir}/notes.txt`;
    await Deno.writeTextFile(file, "not a folder");
    await assert.rejects(
      () => openKvAt(`${file}/sub/q.sqlite`),
      (err: unknown) =>
        err instanceof UsageError && err.message.endsWith(`${JSON.stringify(file)} is a file, not a folder`),
    );
    for (const args of [["export", "--out", `${dir}/x.ndjson`], ["sync", "--max-time", "1"], ["status"]]) {
      const r = await runCli([...args, "--kv", `${file}/q.sqlite`]);
      assert.equal(r.code, 2, `${args[0]}: ${r.stderr}`);
      assert.match(r.stderr, /notes\.txt/, args[0]);
    }
    assert.equal(await Deno.readTextFile(file), "not a folder");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** What SQLite plans for the statement Deno KV runs to take a message out of its ready table. */
function dequeuePlan(path: string): string {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    return (db.prepare("explain query plan delete from queue where id = ?").all("x") as { detail: string }[])
      .map((r) => r.detail).join("; ");
  } finally {
    db.close();
  }
}

Deno.test("openKvAt() indexes Deno KV's queue tables by message id, in a new database and in one Deno KV made", async () => {
  await using db = await tempDb();
  // Made by Deno KV itself, with messages already waiting: the index is added when jetfill opens it.
  const old = `${db.dir}/old.sqlite`;
  const plain = await Deno.openKv(old);
  await plain.enqueue({ n: 1 });
  plain.close();
  assert.match(dequeuePlan(old), /SCAN queue/, "Deno KV alone reads the whole table to remove one message");
  for (const path of [old, `${db.dir}/new.sqlite`]) {
    const kv = await openKvAt(path);
    try {
      assert.match(dequeuePlan(path), /USING INDEX jetfill_queue_id/, path);
      const indexes = new DatabaseSync(path, { readOnly: true });
      const names = (indexes.prepare("select name, tbl_name from sqlite_master where name like 'jetfill_%'")
        .all() as { name: string; tbl_name: string }[]).map((r) => `${r.tbl_name}.${r.name}`).sort();
      indexes.close();
      assert.deepEqual(names, ["queue.jetfill_queue_id", "queue_running.jetfill_queue_running_id"], path);
      // Deno KV goes on using the database: a message enqueued before is still delivered.
      if (path === old) {
        const got = await new Promise<unknown>((resolve) => kv.listenQueue(resolve));
        assert.deepEqual(got, { n: 1 });
      }
    } finally {
      kv.close();
    }
  }
});

Deno.test("`openKvAt()` in a program without Deno KV enabled says how to enable it, and makes nothing", async () => {
  await using db = await tempDb();
  const dir = db.dir;
  const mod = new URL("../mod.ts", import.meta.url).pathname;
  // A project of a user who left "unstable": ["kv"] out of its deno.json.
  await Deno.writeTextFile(`${dir}/deno.json`, JSON.stringify({ imports: { "@jetfill/jetfill": mod } }));
  await Deno.writeTextFile(
    `${dir}/main.ts`,
    `import { runBackfillSync } from "@jetfill/jetfill";
try {
  await runBackfillSync({ instance: "ws://127.0.0.1:9/subscribe", kv: "./data/q.sqlite" });
} catch (err) {
  console.log((err as Error).name, (err as Error).message);
}
`,
  );
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--no-lock", "main.ts"],
    cwd: dir,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(
    new TextDecoder().decode(out.stdout).trim(),
    'UsageError Cannot open the Deno KV database "./data/q.sqlite": Deno KV is not enabled; run with --unstable-kv, or add "unstable": ["kv"] to deno.json',
    new TextDecoder().decode(out.stderr),
  );
  assert.equal(await Deno.stat(`${dir}/data`).catch(() => null), null);
});

Deno.test("openKvAt() and the commands refuse a device or a named pipe as the database, as bad input", async () => {
  await using db = await tempDb();
  const fifo = `${db.dir}/pipe`;
  assert.ok((await new Deno.Command("mkfifo", { args: [fifo] }).output()).success);
  for (const path of ["/dev/null", fifo]) {
    await assert.rejects(
      () => openKvAt(path),
      (err: unknown) =>
        err instanceof UsageError &&
        err.message ===
          `Cannot open the Deno KV database ${
            JSON.stringify(path)
          }: it is not a file (a device, a pipe or a socket); give a Deno KV database file`,
    );
  }
  // (Before: "disk I/O error", exit 1.)
  for (const args of [["sync", "--max-time", "1"], ["export"]]) {
    const r = await runCli([...args, "--kv", fifo]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /it is not a file \(a device, a pipe or a socket\)/);
  }
});

/** The mode bits (no file type) of `path`, or null when there is no such file. */
function modeOf(path: string): number | null {
  try {
    return Deno.lstatSync(path).mode! & 0o777;
  } catch {
    return null;
  }
}

Deno.test("status on a read-only database leaves SQLite's files beside it writable, and a read-only one left by another is named", async () => {
  await using server = serveEvents(posts(3));
  await using db = await tempDb();
  const stats = await runBackfillSync({ instance: server.url, kv: db.path, numRecords: 3, maxTime: 30 });
  assert.equal(stats.recordsStored, 3);
  // Shown while read-only: SQLite makes its -wal and -shm with the database's mode (r--r--r--), which
  // would keep every writer out once the database is writable again, and Deno KV would then panic.
  await Deno.chmod(db.path, 0o444);
  const looked = await runCliUnprivileged(["status", "--kv", db.path]);
  assert.equal(looked.code, 0, looked.stderr);
  assert.match(looked.stdout, /3 records/);
  for (const suffix of ["-wal", "-shm"]) {
    const mode = modeOf(db.path + suffix);
    assert.ok(mode === null || (mode & 0o200) !== 0, `${suffix} left with mode ${mode?.toString(8)}`);
  }
  await Deno.chmod(db.path, 0o644);
  const again = await runCliUnprivileged(["status", "--kv", db.path]);
  assert.equal(again.code, 0, again.stderr);
  assert.doesNotMatch(again.stderr, /panicked/);
  // The same files made read-only by another program: bad input, naming the file and what to do.
  await Deno.writeFile(`${db.path}-shm`, new Uint8Array(0), { append: true });
  await Deno.chmod(`${db.path}-shm`, 0o444);
  for (const args of [["status"], ["sync", "--resume", "--max-time", "5"]]) {
    const r = await runCliUnprivileged([...args, "--kv", db.path]);
    assert.equal(r.code, 2, `${args[0]}: ${r.stderr}`);
    assert.match(
      r.stderr,
      new RegExp(
        `its SQLite file "${db.path}-shm" cannot be written by this process while the database can.*chmod u\\+w`,
      ),
    );
    assert.doesNotMatch(r.stderr, /panicked/);
  }
  // Nothing stored was lost.
  await Deno.chmod(`${db.path}-shm`, 0o644);
  const after = await runCliUnprivileged(["status", "--kv", db.path]);
  assert.equal(after.code, 0, after.stderr);
  assert.match(after.stdout, /3 records/);
});

Deno.test("a database folder that cannot be written, or made, is bad input (exit 2), named", async () => {
  await using db = await tempDb();
  const folder = `${db.dir}/ro`;
  await Deno.mkdir(folder);
  await Deno.chmod(folder, 0o555);
  try {
    const opened = await runCliUnprivileged(["sync", "--kv", `${folder}/q.sqlite`, "--max-time", "1"]);
    assert.equal(opened.code, 2, opened.stderr);
    assert.match(opened.stderr, new RegExp(`its folder "${folder}" cannot be written by this process`));
    const made = await runCliUnprivileged(["sync", "--kv", `${folder}/sub/q.sqlite`, "--max-time", "1"]);
    assert.equal(made.code, 2, made.stderr);
    assert.match(
      made.stderr,
      new RegExp(`cannot make the folder of the Deno KV database "${folder}/sub/q.sqlite"`),
    );
  } finally {
    await Deno.chmod(folder, 0o755);
  }
});

Deno.test("a database path that cannot mean what was meant is bad input for every command, and nothing is made", async () => {
  await using db = await tempDb();
  const name = `jetfill-test-${crypto.randomUUID()}.sqlite`;
  const cases: [string, RegExp][] = [
    [`${db.dir}/new.sqlite/`, /ends in "\/", so it names a folder/],
    [`${db.dir}/n1/.`, /ends in "\.", so it names a folder/],
    [`${db.dir}/n2/x/..`, /ends in "\.\.", so it names a folder/],
    [`~/${name}`, /begins with "~", which only a shell expands/],
    // (file:NAME is file:///NAME: a database at the root, before.)
    [`file:${name}`, /a file: URL without "\/" after "file:" names a file from the root/],
  ];
  try {
    for (const [path, why] of cases) {
      for (
        const args of [["sync", "--max-time", "1"], ["status"], ["export", "--out", `${db.dir}/out.ndjson`]]
      ) {
        const r = await runCli([...args, "--kv", path]);
        assert.equal(r.code, 2, `${args[0]} ${path}: ${r.stderr}`);
        assert.match(
          r.stderr,
          new RegExp(
            `^jetfill ${args[0]}: "${
              path.replace(/[/.]/g, "\\$&")
            }" is not a usable database path: (it )?${why.source}`,
          ),
        );
      }
      await assert.rejects(
        () => openKvAt(path),
        (err: unknown) => err instanceof UsageError && why.test(err.message),
      );
    }
    assert.deepEqual([...Deno.readDirSync(db.dir)].map((e) => e.name), []);
    // A file: URL with one slash is absolute as it is written.
    (await openKvAt(`file:${db.dir}/abs.sqlite`)).close();
    assert.ok(Deno.statSync(`${db.dir}/abs.sqlite`).isFile);
    // (The command line says an empty --kv is not a path before.)
    await assert.rejects(
      () => openKvAt(""),
      (err: unknown) => err instanceof UsageError && /is empty/.test(err.message),
    );
    // A remote database (KV Connect) is not opened by the command line, nor is the network used.
    const remote = await runCli(["sync", "--kv", "http://127.0.0.1:9/db", "--max-time", "1"]);
    assert.equal(remote.code, 2, remote.stderr);
    assert.match(
      remote.stderr,
      /--kv must be a database file's path or a file: URL: current value is "http:\/\/127\.0\.0\.1:9\/db", a remote database/,
    );
  } finally {
    for (const left of [`/${name}`, `/${name}@jetstream_sync.lock`]) await Deno.remove(left).catch(() => {});
  }
});
