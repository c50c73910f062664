import assert from "node:assert/strict";
import { queueKey } from "../src/queue/kv_queue.ts";
import { commit, drainQueue } from "./helpers/events.ts";
import type { CommitEvent } from "../src/jetstream/events.ts";
import { closeIgnoringServer, serveEvents, syncConnections, tempDb, tlsFront } from "./helpers/loopback.ts";
import { killIfRunning, runCli, spawnCli, statusWithin, syncArgs, whileRunning } from "./helpers/cli.ts";
import { asRun, counted, flagsOnly, programName } from "../src/cli/program.ts";
import { relative } from "node:path";
import { fileURLToPath as fromFileUrl } from "node:url";
import { isoFromUs } from "../src/time.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;
const run = runCli;

// A list of DIDs with one that is not a DID.
const DIDS_FILE = await Deno.makeTempFile({ prefix: "jetfill-dids-", suffix: ".txt" });
// Old Mac line endings, a comment after a DID, and a bad DID on line 3.
await Deno.writeTextFile(DIDS_FILE, "did:plc:q6gjnaw2blty4crticxkmujt # main\r# left\rbob\r");
globalThis.addEventListener("unload", () => Deno.removeSync(DIDS_FILE));
// A capture of one event, for serve's flags.
const CAPTURE_FILE = await Deno.makeTempFile({ prefix: "jetfill-capture-", suffix: ".ndjson" });
await Deno.writeTextFile(CAPTURE_FILE, JSON.stringify(commit(T0)) + "\n");
globalThis.addEventListener("unload", () => Deno.removeSync(CAPTURE_FILE));

const BAD: [string[], RegExp][] = [
  [["sync", "--bogus"], /Unknown option '--bogus'/],
  [
    ["sync", "--limit", "abc"],
    /--limit must be a positive integer written in decimal digits \(such as 5000\): current value is "abc"/,
  ],
  [["sync", "--limit", "0"], /--limit must be a positive integer: current value is "0"/],
  [["sync", "--batch-size=-3"], /--batch-size must be a positive integer: current value is "-3"/],
  [["sync", "--batch-size", "-3"], /--batch-size must be a positive integer: current value is "-3"/],
  // A rule of the library's, checked after the flag was read: the value still shown as typed.
  [["sync", "--batch-size", "10001"], /--batch-size must be at most 10000: current value is "10001"$/m],
  [
    ["sync", "--max-event-bytes", "33554433"],
    /--max-event-bytes must be at most 33554432 \(32 MiB, the largest message jetfill reads\): current value is "33554433"$/m,
  ],
  [
    ["sync", "--limit", "0x10"],
    /--limit must be a positive integer written in decimal digits .*: current value is "0x10"/,
  ],
  // Numbers too, but not as the flag takes them: the message says how it does.
  [
    ["sync", "--limit", "1e3"],
    /--limit must be a positive integer written in decimal digits .*: current value is "1e3"/,
  ],
  [
    ["sync", "--limit", "10_000"],
    /--limit must be a positive integer written in decimal digits .*: current value is "10_000"/,
  ],
  [
    ["sync", "--max-time", "1e1"],
    /--max-time must be a positive number written in decimal digits \(such as 90 or 2\.5\): current value is "1e1"$/m,
  ],
  [
    ["sync", "--max-time", "Infinity"],
    /--max-time must be a positive number written in decimal digits .*"Infinity"$/m,
  ],
  // An empty item of a comma list: the value as typed is named, not the empty item.
  [
    ["sync", "--collection", "app.bsky.feed.post,"],
    /: --collection must be one value or a list of them separated by commas, without an empty one: current value is "app.bsky.feed.post,"$/m,
  ],
  [
    ["sync", "-d", ",did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"],
    /: --did must be one value or a list .*: current value is ",did:plc:/,
  ],
  [
    ["sync", "--start", "1764000000"],
    /current value is "1764000000" \(1764000000 looks like seconds; in microseconds that is 1764000000000000\)/,
  ],
  [
    ["sync", "--max-time", "soon"],
    /--max-time must be a positive number written in decimal digits .*: current value is "soon"/,
  ],
  // The flag the user typed is named, not the library option it becomes.
  [["sync", "--start", "01/02/2024"], /^jetfill sync: --start must be YYYY-MM-DD.*"01\/02\/2024"/],
  [["sync", "--start", "2024-01-02", "--end", "2024-01-01"], /: --end must be after --start/],
  [
    ["sync", "--end", "2024-01-01"],
    /: --end must be in the future when no --start is given \(the run then follows the live stream from now; give a --start for a past window\): current value is 2024-01-01T00:00:00.000000Z$/m,
  ],
  [
    ["sync", "--did", "did:plc:bad"],
    /: --did must be did:plc: or did:web: DIDs \(did:plc: then 24 characters of a-z and 2-7; did:web: then a host name\): current value is "did:plc:bad"/,
  ],
  [
    ["sync", "--dids-file", DIDS_FILE],
    /: --dids-file ".*" line 3: "bob" is not a did:plc: or did:web: DID \(did:plc: then 24 characters of a-z and 2-7; did:web: then a host name; one a line; # starts a comment\)$/m,
  ],
  [["sync", "--collection", "app.bsky.feed.po*"], /: --collection must be NSIDs/],
  [["sync", "--kind", "sync"], /: --kind must be one of commit, identity, account: current value is "sync"/],
  [
    ["sync", "--operation", "remove"],
    /: --operation must be one of create, update, delete: current value is "remove"/,
  ],
  [["sync", "--instance", "127.0.0.1:70000"], /: --instance must be a host name .*"127.0.0.1:70000"/],
  [["sync", "--instance", "ftp://x"], /: --instance must be a host name or a ws:\/\/ or wss:\/\/ URL/],
  [
    ["sync", "--instance", "ws://127.0.0.1:1/subscribe?wantedDids=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"],
    /: --instance must be a URL without wantedDids in its query string \(jetfill sets it from --did\): /,
  ],
  [
    ["sync", "--instance", "ws://127.0.0.1:1/subscribe?cursor=5"],
    /: --instance must be a URL without cursor in its query string \(jetfill sets it from --start or --resume\): /,
  ],
  [
    ["sync", "--start", "2062-01-01"],
    /: --start must be before the run's time limit \(--max-time, 900 s\) is over/,
  ],
  // The command line gives a database by its path, never a Deno.Kv.
  [["sync", "--kv", ""], /: --kv must be a database path: current value is ""$/m],
  [
    ["sync", "--compress", "--zstd-dictionary", ""],
    /: --zstd-dictionary must be a file path: current value is ""$/m,
  ],
  [["sync", "--queue-name", "a b"], /: --queue-name must be /],
  // Gone, with what it stored, when the command ends.
  [["sync", "--kv", ":memory:"], /: --kv must be a database file: current value is ":memory:"/],
  [["status", "--kv", ":memory:"], /: --kv must be a database file: current value is ":memory:"/],
  [["sync", "--dids-file", "/nonexistent/dids.txt"], /--dids-file "\/nonexistent\/dids.txt" cannot be read/],
  // An empty list would mean every account.
  [["sync", "--dids-file", "/dev/null"], /--dids-file "\/dev\/null" holds no DIDs/],
  [
    ["sync", "--start", "2026-01-01", "--start", "2026-01-02"],
    /--start is given more than once; it takes one value/,
  ],
  [
    ["sync", "--limit", "99999999999999999999"],
    /--limit must be a positive integer up to 9007199254740991: current value is "99999999999999999999"/,
  ],
  [["sync", "stray"], /Unexpected argument 'stray'/],
  // serve checks its flags as the other commands do.
  [
    ["serve", "--file", CAPTURE_FILE, "--port", "-1"],
    /: --port must be an integer from 0 to 65535: current value is "-1"$/,
  ],
  [
    ["serve", "--file", CAPTURE_FILE, "--drop-every", "-3"],
    /: --drop-every must be a positive integer: current value is "-3"$/,
  ],
  [
    ["serve", "--file", CAPTURE_FILE, "--port", "1", "--port", "2"],
    /--port is given more than once; it takes one value/,
  ],
  [
    ["serve", "--file", CAPTURE_FILE, "--hostname", "no.such.host.invalid"],
    /: Cannot serve on no\.such\.host\.invalid:0: .* \(see --hostname and --port\)$/,
  ],
  [
    ["serve", "--file", CAPTURE_FILE, "--stall-connections", "3"],
    /: --stall-connections needs --stall-after$/,
  ],
  [
    ["serve", "--file", CAPTURE_FILE, "--retry-after", "3"],
    /: --retry-after needs --refuse-first$/,
  ],
  [
    ["serve", "--file", CAPTURE_FILE, "--refuse-first", "1", "--retry-after", "soon"],
    /--retry-after must be .*: current value is "soon"/,
  ],
  [["nosuchcommand"], /unknown command 'nosuchcommand'/],
];

for (const [args, pattern] of BAD) {
  // Named without the temporary files' random names, so that the name is the same in every run.
  const shown = args.map((a) => a === CAPTURE_FILE ? "capture.ndjson" : a === DIDS_FILE ? "dids.txt" : a);
  Deno.test(`jetfill ${shown.join(" ")} exits 2 with one clear line`, async () => {
    // Bounded: a command that took its bad flag and went on (a server listening) fails, not hangs.
    const child = spawnCli(args);
    const bound = setTimeout(() => killIfRunning(child, "SIGKILL"), 20_000);
    const out = await child.output();
    clearTimeout(bound);
    const r = { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
    assert.equal(r.code, 2, r.stderr);
    const lines = r.stderr.trim().split("\n");
    assert.equal(lines.length, 1, `expected one line, got:\n${r.stderr}`);
    assert.match(lines[0], pattern);
    assert.doesNotMatch(r.stderr, /\bat .*\.ts:\d+/);
  });
}

Deno.test("jetfill without a command prints its usage on stderr and exits 2", async () => {
  const r = await run([]);
  assert.equal(r.code, 2);
  assert.equal(r.stdout, "");
  assert.match(r.stderr, /^Usage: deno run -A \S*cli\.ts <command> \[options\]/);
});

Deno.test("jetfill help COMMAND prints that command's help, as COMMAND --help does", async () => {
  for (const command of ["sync", "serve", "export", "status"]) {
    const [help, flag] = await Promise.all([run(["help", command]), run([command, "--help"])]);
    assert.equal(help.code, 0, help.stderr);
    assert.equal(help.stdout, flag.stdout);
  }
  const sync = await run(["help", "sync"]);
  assert.match(sync.stdout, /^Usage: deno run -A \S*cli\.ts sync \[options\]/);
  const unknown = await run(["help", "nosuch"]);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown command 'nosuch'/);
  // (Before, the rest was ignored.)
  const extra = await run(["help", "sync", "extra"]);
  assert.equal(extra.code, 2);
  assert.equal(extra.stderr, "jetfill help: takes one command name, got 2: sync extra\n");
});

Deno.test("jetfill sync --help lists every option", async () => {
  const r = await run(["sync", "--help"]);
  assert.equal(r.code, 0);
  for (
    const flag of [
      "--did",
      "--dids-file",
      "--collection",
      "--kind",
      "--start",
      "--end",
      "--limit",
      "--instance",
      "--max-time",
      "--queue-name",
      "--batch-size",
      "--compress",
      "--kv",
      "--json",
      "--resume",
    ]
  ) {
    assert.ok(r.stdout.includes(flag), flag);
  }
});

Deno.test("deno task demo (the README's first command) syncs its synthetic capture and prints the statistics", async () => {
  await using db = await tempDb();
  const demo = new URL("../scripts/demo.ts", import.meta.url).pathname;
  const runDemo = async (...args: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", demo, ...args],
      cwd: db.dir,
      env: { NO_COLOR: "1" },
    }).output();
    const dec = new TextDecoder();
    return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
  };
  const help = await runDemo("--help");
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage: deno task demo/);
  // The CLI as this Deno runs it (through npx, "npx -y deno@… run -A …"), from where the demo was run.
  assert.match(help.stdout, /see 'deno run -A \S+\/cli\.ts --help'/);
  for (let round = 0; round < 2; round++) {
    // Twice: a second demo starts a fresh queue.
    const r = await runDemo();
    assert.equal(r.code, 0, r.stderr);
    const stored = Number(/records stored\s+(\d+)/.exec(r.stdout)?.[1]);
    assert.ok(stored > 1000, r.stdout);
    assert.match(r.stdout, /stop reason\s+end\n/);
    assert.match(r.stdout, /end reached\s+true\n/);
  }
});

Deno.test("a --dids-file comment starts at any #, right after a DID too", async () => {
  const { readListFile } = await import("../src/cli/args.ts");
  await using db = await tempDb();
  const path = `${db.dir}/dids.txt`;
  await Deno.writeTextFile(
    path,
    "#all of them\r\ndid:plc:q6gjnaw2blty4crticxkmujt# main account\n  did:web:example.com  #x\n#\n",
  );
  assert.deepEqual(await readListFile("dids-file", path), [
    { line: 2, value: "did:plc:q6gjnaw2blty4crticxkmujt" },
    { line: 3, value: "did:web:example.com" },
  ]);
});

Deno.test("jetfill sync --json prints exactly the statistics object on stdout", async () => {
  const events = Array.from({ length: 50 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events);
  await using db = await tempDb();
  const path = `${db.dir}/dids.txt`;
  await Deno.writeTextFile(path, `# accounts\n${events[0].did}  # the only one\n\n`);
  const r = await run(syncArgs(server.url, db.path, T0, "--limit", "20", "--dids-file", path, "--json"));
  assert.equal(r.code, 0, r.stderr);
  const stats = JSON.parse(r.stdout);
  assert.equal(stats.recordsStored, 20);
  assert.equal(stats.stopReason, "limit");
  assert.equal(stats.targetReached, true);
  assert.equal(stats.endCursorReached, false);
  assert.equal(typeof stats.totalTime, "number");
  assert.deepEqual(Object.keys(stats).slice(0, 10), [
    "recordsStored",
    "messagesReceived",
    "totalTime",
    "recordsPerSecond",
    "collections",
    "targetReached",
    "latestCursor",
    "queueLength",
    "currentDate",
    "endCursorReached",
  ]);
  assert.ok(syncConnections(server)[0].query.includes(`wantedDids=${events[0].did}`));
});

Deno.test("jetfill sync prints a readable summary without --json", async () => {
  const events = Array.from({ length: 10 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const r = await run(["sync", "--instance", server.url, "--kv", db.path, "--start", "2026-11-27T10:00:00Z"]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /records stored\s+10/);
  assert.match(r.stdout, /stop reason\s+closed/);
  assert.doesNotMatch(r.stdout, /coverage/);
  // A start three days before the server's history: the span said as the warning says it.
  await using older = await tempDb();
  const early = await run([
    "sync",
    "--instance",
    server.url,
    "--kv",
    older.path,
    "--start",
    "2026-11-24T10:00:00Z",
  ]);
  assert.equal(early.code, 0, early.stderr);
  assert.match(
    early.stdout,
    new RegExp(
      `\\ncoverage\\s+server history starts ${
        isoFromUs(T0).replaceAll(".", "\\.")
      }; 3\\.0 days of the requested time could not be had \\(start moved forward by the server\\)\\n`,
    ),
  );
  assert.match(early.stderr, /is 3\.0 days earlier, so events in between cannot be had/);
});

Deno.test("jetfill sync --resume refuses a queue without a checkpoint, and different filters unless forced", async () => {
  await using db = await tempDb();
  // No database: nothing is made.
  const missing = `${db.dir}/typo/queue.sqlite`;
  const nothing = await run([
    "sync",
    "--kv",
    missing,
    "--resume",
    "--instance",
    "ws://127.0.0.1:9/subscribe",
  ]);
  assert.equal(nothing.code, 2);
  assert.match(
    nothing.stderr,
    /Cannot resume queue 'jetstream_sync': the database ".*typo\/queue\.sqlite" does not exist/,
  );
  assert.deepEqual([...Deno.readDirSync(db.dir)], []);

  const events = Array.from({ length: 30 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events);
  // A database that holds another queue: it is named, and no lock file is made for this one.
  const otherQueue = await run([
    "sync",
    "--instance",
    server.url,
    "--kv",
    db.path,
    "--start",
    String(T0),
    "--limit",
    "5",
    "--queue-name",
    "other",
  ]);
  assert.equal(otherQueue.code, 0, otherQueue.stderr);
  const none = await run(["sync", "--kv", db.path, "--resume", "--instance", "ws://127.0.0.1:9/subscribe"]);
  assert.equal(none.code, 2);
  assert.match(
    none.stderr,
    /Cannot resume queue 'jetstream_sync': it has no checkpoint yet \(this database holds 'other': see --queue-name\); a first run of a queue is started without --resume/,
  );
  assert.ok(!(await Deno.stat(`${db.path}@jetstream_sync.lock`).then(() => true, () => false)));
  const base = ["sync", "--instance", server.url, "--kv", db.path, "--start", String(T0), "--limit", "10"];
  const first = await run([...base, "--json"]);
  assert.equal(first.code, 0, first.stderr);
  const other = await run([...base, "--collection", "app.bsky.feed.like", "--resume"]);
  assert.equal(other.code, 2);
  assert.match(
    other.stderr,
    /with different options: --collection was \["app.bsky.feed.post"\], now \["app.bsky.feed.like"\]/,
  );
  // Every collection ('*', recorded as none named) is said as such, not as a bare [].
  const all = await run([...base, "--collection", "*", "--resume"]);
  assert.equal(all.code, 2);
  assert.match(all.stderr, /--collection was \["app.bsky.feed.post"\], now \[\] \(all\)/);
  const later = await run([...base, "--end", "2026-11-28", "--resume"]);
  assert.equal(later.code, 2);
  assert.match(
    later.stderr,
    /--end was none, now 2026-11-28T00:00:00.000000Z \(pass --force to resume anyway\)/,
  );
});

for (const [signal, code] of [["SIGINT", 130], ["SIGTERM", 143], ["SIGHUP", 129]] as const) {
  Deno.test(`jetfill sync stores what it received, gives its queue back and exits ${code} on ${signal}`, async () => {
    // No end, no limit reached, a server that stays open: only the interrupt stops the run.
    const events = Array.from({ length: 500 }, (_, i) => commit(T0 + i * 1000));
    await using server = serveEvents(events);
    await using db = await tempDb();
    const child = spawnCli(syncArgs(server.url, db.path, T0, "--json"));
    // Wait until the whole capture was served, then interrupt.
    await whileRunning(child, () => syncConnections(server)[0]?.sent >= 500);
    await new Promise((r) => setTimeout(r, 300));
    killIfRunning(child, signal);
    const out = await child.output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, code, stderr);
    const stats = JSON.parse(new TextDecoder().decode(out.stdout));
    assert.equal(stats.stopReason, "aborted");
    // stdout is the statistics alone; how to go on is said on stderr.
    // The command to go on with, with the --kv given (before: "with the same --kv and --queue-name").
    assert.ok(
      stderr.split("\n").some((l) =>
        /^jetfill sync: note: continue with deno run -A \S*cli\.ts sync --resume --kv /.test(l) &&
        l.endsWith(`sync --resume --kv ${db.path}`)
      ),
      stderr,
    );
    assert.equal(stats.recordsStored, 500);
    assert.equal(stats.latestCursor, events[499].time_us);
    const kv = await Deno.openKv(db.path);
    const lock = await kv.get(queueKey("jetstream_sync", "writer"));
    kv.close();
    assert.equal(lock.versionstamp, null, "the writer lock was left behind");
  });
}

Deno.test("a second Ctrl-C exits at once while the stop waits for a server that does not answer the close", async () => {
  // A server that sends one event and then ignores everything, the close included: the first
  // SIGINT's drain would wait 2 s for it.
  await using server = closeIgnoringServer(commit(T0 + 1));
  await using db = await tempDb();
  // A path the resume command must quote for a shell.
  const path = `${db.dir}/it's here.sqlite`;
  const child = spawnCli([
    "sync",
    "--instance",
    server.url,
    "--kv",
    path,
    "--queue-name",
    "q1",
    "--json",
  ]);
  await whileRunning(child, server.connected);
  await new Promise((r) => setTimeout(r, 300));
  killIfRunning(child, "SIGINT");
  await new Promise((r) => setTimeout(r, 300));
  killIfRunning(child, "SIGINT");
  const out = await child.output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 130, stderr);
  const line = stderr.split("\n").find((l) => l.startsWith("jetfill sync: stopped at once"));
  assert.match(
    line ?? "",
    /^jetfill sync: stopped at once by a second SIGINT; continue with deno run -A \S*cli\.ts sync --resume /,
  );
  assert.ok(line!.endsWith(` sync --resume --kv '${db.dir}/it'\\''s here.sqlite' --queue-name q1`), line);
  // Not the statistics of a run that finished its stop.
  assert.equal(new TextDecoder().decode(out.stdout), "");
});

Deno.test("jetfill sync warns on stderr about each event it leaves out for size, naming it", async () => {
  const events = [commit(T0), commit(T0 + 1, { text: "x".repeat(3000) }), commit(T0 + 2)];
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const flags = ["--start", String(T0), "--max-event-bytes", "2000", "--json"];
  const r = await run(["sync", "--instance", server.url, "--kv", db.path, ...flags]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).skipped.oversized, 1);
  assert.match(
    r.stderr,
    new RegExp(
      `^jetfill sync: warning: event at time_us ${T0 + 1} \\(${events[1].did}, app\\.bsky\\.feed\\.post/${
        (events[1] as CommitEvent).commit.rkey
      }\\) of \\d+ (bytes|characters \\(so at least as many bytes\\)) is over the 2000-byte event limit \\(--max-event-bytes\\); skipped$`,
      "m",
    ),
  );
});

Deno.test("jetfill sync --resume on another instance says so without --verbose", async () => {
  const events = Array.from({ length: 30 }, (_, i) => commit(T0 + i * 1000));
  // The first instance goes away after 10 events; the second has them all.
  await using a = serveEvents(events.slice(0, 10), { closeAtEnd: true });
  await using b = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const first = await run(syncArgs(a.url, db.path, T0, "--json"));
  assert.equal(first.code, 0, first.stderr);
  const resumed = await run(["sync", "--resume", "--instance", b.url, "--kv", db.path, "--json"]);
  assert.equal(resumed.code, 0, resumed.stderr);
  assert.match(
    resumed.stderr,
    new RegExp(`^jetfill sync: resuming on ${new URL(b.url).host}, not ${new URL(a.url).host}`, "m"),
  );
  assert.equal(JSON.parse(resumed.stdout).recordsStored, 20);
});

Deno.test("jetfill sync refuses to store the same window again without --resume or --force, and notes a new run", async () => {
  const events = Array.from({ length: 20 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const args = syncArgs(server.url, db.path, T0, "--limit", "10", "--json");
  const first = await run(args);
  assert.equal(first.code, 0, first.stderr);
  assert.doesNotMatch(first.stderr, /note:/);
  // The same command again (after a Ctrl-C, say) would store the same events twice.
  const again = await run(args);
  assert.equal(again.code, 2, again.stderr);
  assert.equal(
    again.stderr.trim(),
    "jetfill sync: Cannot sync into queue 'jetstream_sync': it already holds 10 records of a run with these same options (the last from 2026-11-27T10:00:00.009000Z), and this run would store them again. Continue that run with --resume, or pass --force to store them a second time",
  );
  assert.equal(again.stdout, "");
  const forced = await run([...args, "--force"]);
  assert.equal(forced.code, 0, forced.stderr);
  assert.equal(JSON.parse(forced.stdout).recordsStored, 10);
  // Other options (a larger limit) make a new run, with a note.
  const other = await run(syncArgs(server.url, db.path, T0, "--limit", "12", "--json"));
  assert.equal(other.code, 0, other.stderr);
  assert.match(
    other.stderr,
    /^jetfill sync: note: queue 'jetstream_sync' already holds 20 records \(the last from 2026-11-27T10:00:00\.009000Z\); this run adds its own after them, as a new run: to continue the run that stored them instead, use --resume \(with --force to give it another limit or end\)$/m,
  );
  assert.equal(JSON.parse(other.stdout).recordsStored, 12);
  assert.equal(JSON.parse(other.stdout).queueLength, 3);
  // One record is one record.
  await using one = await tempDb();
  assert.equal((await run(syncArgs(server.url, one.path, T0, "--limit", "1"))).code, 0);
  const refusedOne = await run(syncArgs(server.url, one.path, T0, "--limit", "1"));
  assert.match(refusedOne.stderr, /it already holds 1 record of a run/);
  const afterOne = await run(syncArgs(server.url, one.path, T0, "--limit", "2"));
  assert.match(afterOne.stderr, /note: queue 'jetstream_sync' already holds 1 record \(the last from /);
  // A new run that stores nothing (its server cannot be reached) adds nothing, and says nothing of it.
  const unreachable = await run(
    syncArgs("ws://127.0.0.1:9/subscribe", db.path, T0, "--limit", "14", "--max-retries", "0", "--json"),
  );
  assert.equal(unreachable.code, 1, unreachable.stderr);
  assert.doesNotMatch(unreachable.stderr, /as a new run/);
  // A resume with other options names what differs by its flags.
  const resumed = await run(["sync", "--kv", db.path, "--resume", "--limit", "13", "--kind", "identity"]);
  assert.equal(resumed.code, 2, resumed.stderr);
  assert.match(
    resumed.stderr.trim(),
    /^jetfill sync: Cannot resume queue 'jetstream_sync' with different options: --kind was \["commit"\], now \["identity"\]; --limit was 12, now 13 \(pass --force/,
  );
});

Deno.test("help and suggested commands name the CLI as it is run: deno run -A cli.ts, or the binary", () => {
  const help =
    "Usage: jetfill sync [options]\n  --kv PATH   (default ./jetfill-data/x.sqlite)\nsee 'jetfill serve --file' or (jetfill status)";
  assert.equal(
    asRun(help, "deno run -A cli.ts"),
    "Usage: deno run -A cli.ts sync [options]\n  --kv PATH   (default ./jetfill-data/x.sqlite)\nsee 'deno run -A cli.ts serve --file' or (deno run -A cli.ts status)",
  );
  assert.equal(asRun(help, "jf$1"), help.replaceAll("jetfill ", "jf$1 "));
  assert.equal(asRun(help, "jetfill"), help);
  assert.deepEqual([counted(0, "message"), counted(1, "message"), counted(2, "message")], [
    "0 messages",
    "1 message",
    "2 messages",
  ]);
  assert.equal(counted(1, "failed delivery", "failed deliveries"), "1 failed delivery");
  assert.equal(counted(3, "failed delivery", "failed deliveries"), "3 failed deliveries");
});

Deno.test("messages on the command line name options by their flags alone, not as the library does too", () => {
  assert.equal(
    flagsOnly(
      "use --resume / resume: true (with --force / force: true), see --kv / kv and --compress / compress with --zstd-dictionary / zstdDictionary",
    ),
    "use --resume (with --force), see --kv and --compress with --zstd-dictionary",
  );
  // Text that only looks like it is left alone, and quoted values (a path, a server's text) whatever they hold.
  assert.equal(flagsOnly("a / b, --x /y, 10 / 2 s"), "a / b, --x /y, 10 / 2 s");
  assert.equal(
    flagsOnly('--dids-file "/tmp/my --notes / backup/dids.txt" cannot be read; see --kv / kv'),
    '--dids-file "/tmp/my --notes / backup/dids.txt" cannot be read; see --kv',
  );
  assert.equal(
    flagsOnly("the run's --old / path.txt and --a / b-c"),
    "the run's --old / path.txt and --a / b-c",
  );
  assert.equal(
    flagsOnly(
      "Cannot read the zstd dictionary '/tmp/my --notes / backup x.zdict' (from --zstd-dictionary / zstdDictionary)",
    ),
    "Cannot read the zstd dictionary '/tmp/my --notes / backup x.zdict' (from --zstd-dictionary)",
  );
  // At the end of a sentence too; never a pair said false (it would read as its opposite).
  assert.equal(flagsOnly("see --kv / kv. Then --strict / strict: true."), "see --kv. Then --strict.");
  assert.equal(flagsOnly("with --compress / compress: false"), "with --compress / compress: false");
  // An apostrophe is no quote: the server's --kv / kv is still a pair.
  assert.equal(flagsOnly("the server's --kv / kv, the run's"), "the server's --kv, the run's");
  assert.equal(
    flagsOnly(
      "sync without compression (without --compress / compress: true; on a resume, with --no-compress)",
    ),
    "sync without compression (without --compress; on a resume, with --no-compress)",
  );
});

Deno.test("the CLI run from a checkout says how to run it again: deno run -A and the path of cli.ts", async () => {
  const r = await runCli(["sync", "--bogus"]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /\(see 'deno run -A \S*cli\.ts sync --help'\)/);
  const help = await runCli(["serve", "--help"]);
  assert.match(help.stdout, /^Usage: deno run -A \S*cli\.ts serve --file/);
});

Deno.test("jetfill sync --collection '*' keeps every collection, and asks the server for all", async () => {
  const collections = [
    "app.bsky.feed.post",
    "app.bsky.feed.like",
    "app.bsky.graph.follow",
    "chat.bsky.actor.declaration",
  ];
  const events = collections.map((collection, i) => commit(T0 + i * 1000, { collection }));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  const r = await run(
    syncArgs(server.url, db.path, T0, "--json", "--collection", "*", "--collection", "app.bsky.feed.post"),
  );
  assert.equal(r.code, 0, r.stderr);
  const stats = JSON.parse(r.stdout);
  assert.equal(stats.recordsStored, 4);
  assert.deepEqual(stats.collections, [...collections].sort());
  for (const c of syncConnections(server)) assert.doesNotMatch(c.query, /wantedCollections/);
});

Deno.test("jetfill sync reads a wss:// instance (TLS, the public Jetstream's scheme) as it reads ws://", async () => {
  const events = Array.from({ length: 3000 }, (_, i) => commit(T0 + i * 1000, { text: `é${i}`.repeat(20) }));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using front = tlsFront(Number(new URL(server.url).port));
  await using db = await tempDb();
  const r = await runCli(
    syncArgs(`wss://localhost:${front.port}/subscribe`, db.path, T0, "--json"),
    [`--cert=${front.ca}`],
  );
  assert.equal(r.code, 0, r.stderr);
  const stats = JSON.parse(r.stdout);
  assert.equal(stats.stopReason, "closed");
  assert.equal(stats.recordsStored, 3000);
  assert.equal(stats.latestCursor, events[2999].time_us);
  const messages = await drainQueue(db.path, stats.queueLength) as { seq: number; records: unknown[] }[];
  assert.deepEqual(messages.sort((a, b) => a.seq - b.seq).flatMap((m) => m.records), events);
  assert.ok(syncConnections(server).length >= 1);
});

Deno.test("jetfill serve on a port another process holds exits 1 with one line that says to choose another", async () => {
  const capture = await Deno.makeTempFile({ suffix: ".ndjson" });
  try {
    await Deno.writeTextFile(capture, JSON.stringify(commit(T0)) + "\n");
    using holder = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const r = await run(["serve", "--file", capture, "--port", String(holder.addr.port)]);
    assert.equal(r.code, 1, r.stderr);
    const lines = r.stderr.trim().split("\n");
    assert.equal(lines.length, 1, r.stderr);
    assert.match(
      lines[0],
      new RegExp(
        `^jetfill serve: Cannot serve on 127\\.0\\.0\\.1:${holder.addr.port}: the port is in use .*choose another --port, or --port 0`,
      ),
    );
  } finally {
    await Deno.remove(capture);
  }
});

Deno.test("programName() spells the command as the user runs it: a binary, deno run, or npx's Deno", () => {
  const cli = new URL("../cli.ts", import.meta.url).href;
  const path = relative(Deno.cwd(), fromFileUrl(cli));
  assert.equal(programName("/usr/local/bin/deno", cli), `deno run -A ${path}`);
  // The README's first commands on a machine without Deno: npx's cache holds it, not the PATH.
  assert.equal(
    programName("/home/u/.npm/_npx/6a0d4f1c/node_modules/deno/deno", cli),
    `npx -y deno@${Deno.version.deno} run -A ${path}`,
  );
  assert.equal(programName("/opt/dist/jetfill", cli), "jetfill");
  assert.equal(programName("/usr/local/bin/deno", "file:///srv/app/main.ts"), "jetfill");
});

Deno.test("jetfill serve checks its dictionary paths before it loads the capture", async () => {
  // A large capture takes a while to load: a mistyped dictionary is said first (here the capture is
  // missing too, and not the one blamed).
  const r = await run([
    "serve",
    "--file",
    "/nonexistent/capture.ndjson",
    "--zstd-dictionary",
    "/nonexistent/d.zdict",
  ]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /\/nonexistent\/d\.zdict/);
  assert.doesNotMatch(r.stderr, /capture\.ndjson/);
  const v2 = await run([
    "serve",
    "--v2",
    "--file",
    "/nonexistent/capture.ndjson",
    "--v2-zstd-dictionary",
    "/nonexistent/v2.zdict",
  ]);
  assert.equal(v2.code, 2, v2.stderr);
  assert.match(
    v2.stderr,
    /^jetfill serve: --v2-zstd-dictionary "\/nonexistent\/v2\.zdict" is not a readable zstd dictionary/,
  );
});

Deno.test("every sync flag sets its library option, and an error about that option names the flag", async () => {
  const { inFlagTerms, syncOptionsFromFlags } = await import("../src/cli/sync.ts");
  const flags: Record<string, unknown> = {
    did: ["did:plc:q6gjnaw2blty4crticxkmujt"],
    collection: ["app.bsky.feed.like"],
    kind: ["identity"],
    start: "2026-11-01",
    end: "2026-11-02",
    limit: "5",
    instance: ["ws://127.0.0.1:1/subscribe"],
    compress: true,
    wire: "v2",
    "max-event-bytes": "1000",
    "zstd-dictionary": "/d.zdict",
    "idle-timeout": "3",
    "max-retries": "0",
    "max-time": "9.5",
    kv: "/k.sqlite",
    "queue-name": "q",
    "batch-size": "7",
    resume: true,
    strict: true,
    force: true,
  };
  const options = await syncOptionsFromFlags(flags);
  const expected: Record<string, [unknown, string]> = {
    wantedDids: [["did:plc:q6gjnaw2blty4crticxkmujt"], "--did"],
    wantedCollections: [["app.bsky.feed.like"], "--collection"],
    kinds: [["identity"], "--kind"],
    startTimestamp: ["2026-11-01", "--start"],
    endTimestamp: ["2026-11-02", "--end"],
    numRecords: [5, "--limit"],
    instance: [["ws://127.0.0.1:1/subscribe"], "--instance"],
    compress: [true, "--compress"],
    wire: ["v2", "--wire"],
    maxEventBytes: [1000, "--max-event-bytes"],
    zstdDictionary: ["/d.zdict", "--zstd-dictionary"],
    idleTimeout: [3, "--idle-timeout"],
    maxRetries: [0, "--max-retries"],
    maxTime: [9.5, "--max-time"],
    kv: ["/k.sqlite", "--kv"],
    queueName: ["q", "--queue-name"],
    batchSize: [7, "--batch-size"],
    resume: [true, "--resume"],
    strict: [true, "--strict"],
    force: [true, "--force"],
  };
  assert.deepEqual(options, Object.fromEntries(Object.entries(expected).map(([k, [v]]) => [k, v])));
  for (const [option, [, flag]] of Object.entries(expected)) {
    assert.equal(inFlagTerms(`Cannot sync as '${option}' must be x`, "--did"), `${flag} must be x`);
    assert.equal(
      inFlagTerms(`Cannot resume queue 'q' with different options: ${option} was 1, now 2`, "--did"),
      `Cannot resume queue 'q' with different options: ${flag} was 1, now 2`,
    );
  }
  // Flags left out set nothing, so that a resume takes the last run's options.
  assert.deepEqual(await syncOptionsFromFlags({}), {});
  assert.deepEqual(await syncOptionsFromFlags({ compress: false, json: true }), {});
});

Deno.test("jetfill sync warns of the first frame it skips for each reason; --verbose reports each", async () => {
  const events = Array.from({ length: 400 }, (_, i) => commit(T0 + i * 1000));
  // A bad frame after every 20 events, cycling through five kinds: four of each.
  await using server = serveEvents(events, { closeAtEnd: true, faults: { garbageEvery: 20 } });
  for (const verbose of [false, true]) {
    await using db = await tempDb();
    const r = await run(syncArgs(server.url, db.path, T0, "--json", ...(verbose ? ["--verbose"] : [])));
    const stats = JSON.parse(r.stdout);
    assert.equal(stats.recordsStored, 400, r.stderr);
    const lines = r.stderr.split("\n").filter((l) => l.startsWith("jetfill sync: "));
    for (
      const [reason, what] of [["malformed_json", /frame is not JSON/], [
        "unknown_kind",
        /unknown kind/,
      ]] as const
    ) {
      const said = lines.filter((l) => what.test(l));
      assert.ok(stats.skipped[reason] >= 3, JSON.stringify(stats.skipped));
      if (verbose) {
        assert.equal(said.length, stats.skipped[reason], r.stderr);
        // Each a warning that says it was skipped (before: bare lines).
        for (const l of said) assert.match(l, /^jetfill sync: warning: .*\(skipped\)$/);
      } else {
        assert.equal(said.length, 1, r.stderr);
        assert.match(
          said[0],
          new RegExp(`^jetfill sync: warning: .*\\(skipped; later ${reason} frames are only counted`),
        );
      }
    }
  }
});

Deno.test("whileRunning() (the tests' wait on a child process) fails with the child's stderr when it ends first", async () => {
  const child = spawnCli(["sync", "--bogus"]);
  await assert.rejects(
    () => whileRunning(child, () => false),
    /the process ended \(code 2\) before it got there: .*--bogus/s,
  );
});

Deno.test("killIfRunning() signals a child that runs and says false for one that ended, where kill() throws", async () => {
  const ended = new Deno.Command(Deno.execPath(), { args: ["eval", ""] }).spawn();
  await ended.status;
  assert.throws(() => ended.kill("SIGKILL"), TypeError);
  assert.equal(killIfRunning(ended, "SIGKILL"), false);
  const running = new Deno.Command(Deno.execPath(), { args: ["eval", "setTimeout(() => {}, 60_000)"] })
    .spawn();
  assert.equal(killIfRunning(running, "SIGKILL"), true);
  assert.equal((await running.status).signal, "SIGKILL");
});

Deno.test("statusWithin() (the tests' bounded wait on a child process) kills a child that outlives it and says what it waited for", async () => {
  const quick = new Deno.Command(Deno.execPath(), { args: ["eval", "Deno.exit(3)"] }).spawn();
  assert.equal((await statusWithin(quick, 30_000, "exiting")).code, 3);
  const stuck = new Deno.Command(Deno.execPath(), { args: ["eval", "setTimeout(() => {}, 60_000)"] }).spawn();
  await assert.rejects(
    () => statusWithin(stuck, 300, "the queue to be empty"),
    /^Error: the child process did not end within 0\.3 s \(killed\): the queue to be empty$/,
  );
  assert.equal((await stuck.status).signal, "SIGKILL");
});

Deno.test("the live progress line is cut to the terminal's width less one, so that it never wraps", async () => {
  const { progressLine } = await import("../src/cli/sync.ts");
  const p = {
    recordsStored: 148,
    messagesReceived: 191,
    rate: 32.4,
    currentDate: "2026-12-02",
    cursor: 1,
    elapsed: 5,
    percent: 11.1,
    percentOfLimit: 1.5,
  } as import("../src/stats.ts").SyncProgress;
  const whole = "148 records, 32/s, 191 messages, 2026-12-02 11.1% of window, 5 s";
  assert.equal(progressLine(p), whole);
  assert.equal(progressLine(p, whole.length + 1), whole);
  // (Before, the whole line at any width: at 50 columns it wrapped, and each update left a row.)
  assert.equal(progressLine(p, whole.length), whole.slice(0, -1));
  assert.equal(progressLine(p, 50), whole.slice(0, 49));
});

Deno.test("sync takes the original Python CLI's flags, and comma lists of DIDs and collections", async () => {
  const { syncOptionsFromFlags, withOriginalFlags } = await import("../src/cli/sync.ts");
  const { parseFlags } = await import("../src/cli/args.ts");
  const args = withOriginalFlags([
    "-c",
    "app.bsky.feed.like",
    "--wanted-collections=app.bsky.graph.follow,app.bsky.feed.post",
    "-d",
    "did:plc:q6gjnaw2blty4crticxkmujt,did:web:example.com",
    "-s",
    "2024-01-01",
    "--end-timestamp",
    "2024-01-02-12:00:00",
    "-n",
    "5",
    "-i",
    "ws://127.0.0.1:1/subscribe",
    "-t",
    "30",
  ]);
  // A value is never taken for a flag: a database named "-t" stays a value.
  assert.deepEqual(withOriginalFlags(["--kv", "-t", "-t", "-n"]), ["--kv", "-t", "--max-time", "-n"]);
  const options = await syncOptionsFromFlags(parseFlags("sync", args, {
    collection: { type: "string", multiple: true },
    did: { type: "string", multiple: true },
    start: { type: "string" },
    end: { type: "string" },
    limit: { type: "string" },
    instance: { type: "string", multiple: true },
    "max-time": { type: "string" },
  }));
  assert.deepEqual(options.wantedCollections, [
    "app.bsky.feed.like",
    "app.bsky.graph.follow",
    "app.bsky.feed.post",
  ]);
  assert.deepEqual(options.wantedDids, ["did:plc:q6gjnaw2blty4crticxkmujt", "did:web:example.com"]);
  assert.deepEqual(
    [options.startTimestamp, options.endTimestamp, options.numRecords, options.instance, options.maxTime],
    ["2024-01-01", "2024-01-02-12:00:00", 5, ["ws://127.0.0.1:1/subscribe"], 30],
  );
  assert.throws(
    () => withOriginalFlags(["-u", "alice.bsky.social"]),
    /^UsageError: -u \(the original CLI's user handles, which it took and ignored\) is not supported: give DIDs with --did or --dids-file$/,
  );
});

Deno.test("a switch given twice is taken once, while a flag with a value given twice is refused", async () => {
  const { parseFlags } = await import("../src/cli/args.ts");
  const spec = { json: { type: "boolean" }, start: { type: "string" } } as const;
  assert.deepEqual({ ...parseFlags("sync", ["--json", "--json"], spec) }, { json: true });
  assert.throws(
    () => parseFlags("sync", ["--start", "a", "--start", "b"], spec),
    /^UsageError: --start is given more than once; it takes one value/,
  );
});

Deno.test("jetfill sync says the first 20 selected events too large for it, then counts the rest (all with --verbose)", async () => {
  const events = Array.from(
    { length: 50 },
    (_, i) => commit(T0 + i * 1000, { text: `post ${i} ${"x".repeat(200)}` }),
  );
  await using server = serveEvents(events, { closeAtEnd: true });
  for (const verbose of [false, true]) {
    await using db = await tempDb();
    const run = await runCli(
      syncArgs(
        server.url,
        db.path,
        T0,
        "--max-event-bytes",
        "100",
        "--json",
        ...(verbose ? ["--verbose"] : []),
      ),
    );
    assert.equal(run.code, 0, run.stderr);
    assert.equal(JSON.parse(run.stdout).skipped.oversized, 50);
    const said = run.stderr.split("\n").filter((l) => /event limit/.test(l));
    // (Before: one line for each, however many; a run of thousands printed thousands.)
    assert.equal(said.length, verbose ? 50 : 20, run.stderr);
    if (!verbose) {
      assert.match(
        said[19],
        /\(--max-event-bytes\); skipped; later ones are only counted \(skipped oversized, in the statistics;/,
      );
    }
  }
});

Deno.test("--kind and --operation take comma lists, as --did and --collection do", async () => {
  const { syncOptionsFromFlags } = await import("../src/cli/sync.ts");
  const { parseFlags } = await import("../src/cli/args.ts");
  const spec = {
    kind: { type: "string", multiple: true },
    operation: { type: "string", multiple: true },
  } as const;
  const options = await syncOptionsFromFlags(
    parseFlags(
      "sync",
      ["--kind", "commit,identity", "--kind", "account", "--operation", "create, delete"],
      spec,
    ),
  );
  // (Before: --kind must be one of commit, identity, account: current value is "commit,identity".)
  assert.deepEqual(options.kinds, ["commit", "identity", "account"]);
  assert.deepEqual(options.operations, ["create", "delete"]);
});

Deno.test("jetfill serve without the permissions it needs says which, and nothing else (exit 2)", async () => {
  const cli = new URL("../cli.ts", import.meta.url).pathname;
  const run = async (...flags: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--no-prompt", ...flags, cli, "serve", "--file", CAPTURE_FILE, "--port", "0"],
      stdout: "piped",
      stderr: "piped",
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  };
  // (Before: "--file is not a valid capture: Requires read access …", of a valid capture.)
  const noRead = await run("--allow-net");
  assert.equal(noRead.code, 2, noRead.stderr);
  assert.match(
    noRead.stderr,
    /^jetfill serve: --file ".*" cannot be read: Requires read access to .*--allow-read flag\n$/,
  );
  // (Before: "… run again with the --allow-net flag (see --hostname and --port)".)
  const noNet = await run("--allow-read");
  assert.equal(noNet.code, 2, noNet.stderr);
  assert.match(
    noNet.stderr,
    /^jetfill serve: Cannot serve on 127\.0\.0\.1:0: Requires net access to .*--allow-net flag\n$/,
  );
});

Deno.test("jetfill sync's summary and --json error line name flags alone, as its other messages do", async () => {
  const { refusedPort } = await import("./helpers/loopback.ts");
  const url = `ws://127.0.0.1:${await refusedPort()}/subscribe`;
  await using db = await tempDb();
  for (const json of [false, true]) {
    const run = await runCli([
      "sync",
      "--instance",
      url,
      "--kv",
      db.path,
      "--max-time",
      "1",
      ...(json ? ["--json"] : []),
    ]);
    assert.equal(run.code, 1, run.stderr);
    // The statistics keep the library's words; what a person reads names the flag.
    const said = json ? run.stderr : run.stdout;
    assert.match(said, /no connection within --max-time \(1 s\); last error: /);
    assert.doesNotMatch(said, /maxTime/);
    if (json) assert.match(JSON.parse(run.stdout).error, /--max-time \/ maxTime \(1 s\)/);
  }
});
