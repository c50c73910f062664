/**
 * `jetfill export`: write a queue's events as NDJSON, to stdout or a file, consuming the queue.
 *
 * @module
 */
import { UsageError } from "../errors.ts";
import { GO_JSON_EOF, parseGoJson } from "../go_json.ts";
import { shapeProblem } from "../jetstream/events.ts";
import { consume, type ConsumeResult } from "../queue/consume.ts";
import { localDatabasePath, openKvAt, requireWritable, unknownQueue } from "../queue/kv_queue.ts";
import { deadLettersOf } from "../queue/dead_letters.ts";
import {
  type FlagSpec,
  interruptedExitCode,
  onStopSignals,
  parseFlags,
  queueFlags,
  type StopSignal,
} from "./args.ts";
import { databaseExists, pathExists } from "../fs.ts";
import { delay } from "../async.ts";
import { basename, dirname, join, resolve } from "node:path";
import { asRun, counted, flagsOnly, programName } from "./program.ts";

/** Line and paragraph separators, which JSON allows raw in strings but some line readers split on. */
const SEPARATORS = /[\u2028\u2029]/g;

/** An event as one NDJSON line: `JSON.stringify`, with U+2028 and U+2029 escaped as Go's encoder does. */
function ndjsonLine(event: unknown): string {
  return JSON.stringify(event).replace(SEPARATORS, (c) => c === "\u2028" ? "\\u2028" : "\\u2029") + "\n";
}

const HELP = `Usage: jetfill export [options]

Write the events of a queue as NDJSON, one Jetstream event per line, to stdout or to a file: the
event as stored, written by JSON.stringify (the same values as received; an escape such as \\u003c
in a string comes out as the character it stands for, but U+2028 and U+2029 stay escaped, as
Jetstream writes them, for readers that split lines on them). The output is a capture for
'jetfill serve --file', so a sync can be replayed.

Export consumes the queue: a Deno KV queue cannot be read without taking its messages, so the
events written leave the queue and a second export will not find them again. To keep the queue,
export a copy of the database file (made while no sync writes to it).

Options:
  --kv PATH               Deno KV database (default ./jetfill-data/<queue-name>.sqlite)
  --queue-name NAME       queue name (default jetstream_sync)
  --out FILE              append to FILE instead of writing to stdout ('-': stdout); FILE is
                          created when missing and never truncated, as the events in it have
                          left the queue
  --follow                keep waiting for new messages until interrupted (default: stop once
                          no message of the queue is waiting); also waits for a database or a
                          queue no sync has made yet, in an existing folder
  -h, --help              show this help

Each message's events are written, flushed and synced to disk before the message is acknowledged,
so an interrupted export loses nothing (to a pipe or a device, stdout or an --out naming one,
there is no disk to sync: what the pipe accepted has left the queue). Delivery is at least once:
an export killed between the sync and the acknowledgement writes that message's events again next
time. A partial last line, left by an export killed (or stopped by a full disk) in the middle of
a write, is removed before --out appends (that message's whole lines before it stay, and come
again with the message); a whole event without its newline is kept, and a file that ends in anything else is
refused.

Prints a summary on stderr. Exit codes: 0 done (also when the reader of stdout, or of a named
pipe given to --out, closes it early, as 'export | head' does: the message being written then
stays in the queue, but the ones written before it have left it, read or not: what the pipe held
when its reader quit is gone from the queue, so export a copy of the database to peek),
1 runtime failure (such as a write error), 2 bad input, 130 interrupted by Ctrl-C (143 by
SIGTERM, 129 by SIGHUP), after a clean stop.`;

const FLAGS: FlagSpec = {
  kv: { type: "string" },
  "queue-name": { type: "string" },
  out: { type: "string" },
  follow: { type: "boolean" },
  help: { type: "boolean", short: "h" },
};

const UTF8 = new TextEncoder();

/** Where the lines go: writes that complete, and a sync that makes them durable. */
interface Sink {
  /** Whether it is a pipe or a device (stdout, or `--out` naming one): nothing is synced to disk. */
  stream?: boolean;
  write(bytes: Uint8Array): void;
  sync(): Promise<void>;
  close(): void;
}

function writeAll(w: { writeSync(p: Uint8Array): number }, bytes: Uint8Array): void {
  let off = 0;
  while (off < bytes.length) off += w.writeSync(bytes.subarray(off));
}

/** Stdout; synced when it is a regular file (a redirection), through a second handle on it. */
function stdoutSink(): Sink {
  let file: Deno.FsFile | undefined;
  try {
    // A pipe or a terminal has nothing to sync; a file does, and fsync works on any handle to it.
    if (Deno.statSync("/dev/stdout").isFile) file = Deno.openSync("/dev/stdout", { read: true });
  } catch {
    file = undefined;
  }
  return {
    stream: file === undefined,
    write: (bytes) => writeAll(Deno.stdout, bytes),
    sync: async () => await file?.sync(),
    close: () => file?.close(),
  };
}

/** `path` with its folder's symbolic links resolved (and itself too, when it exists). */
async function realPathOf(path: string): Promise<string> {
  return await Deno.realPath(path).catch(async () =>
    join(await Deno.realPath(dirname(path)).catch(() => resolve(dirname(path))), basename(path))
  );
}

/**
 * Refuses an `--out` that is the database (`path`) or a file kept beside it: SQLite's `-wal`,
 * `-shm` and `-journal`, and the queues' lock files (`<database>@<queue>.lock`).
 */
async function refuseDatabaseFiles(out: string, path: string): Promise<void> {
  const file = localDatabasePath(path);
  if (file === undefined) return;
  const db = await realPathOf(file);
  const target = await realPathOf(out);
  const beside = ["-wal", "-shm", "-journal"].some((s) => target === db + s) ||
    (target.startsWith(`${db}@`) && target.endsWith(".lock"));
  if (target !== db && !beside) return;
  throw new UsageError(
    `--out ${JSON.stringify(out)} is ${
      target === db ? "the database itself" : "a file kept beside the database"
    } (--kv ${JSON.stringify(path)}), which export must not write into: give another file`,
  );
}

/**
 * Opens `path` for appending, first cutting a partial last line: it can only come from an export
 * killed during a write, whose message was therefore not acknowledged and will be written again. A
 * complete event without its newline is kept (the newline is added); a file whose last line is no
 * event nor the start of one is not an export's output, and is refused unchanged.
 */
async function fileSink(path: string): Promise<{ sink: Sink; removed: number }> {
  // A named pipe or a device (/dev/null, a FIFO a reader waits on) is written as stdout is: nothing to
  // cut, and nothing to sync (fsync fails on them). Opened for writing only, so that a pipe waits for
  // its reader as a shell's redirection does.
  const special = await Deno.stat(path).then((info) => !info.isFile && !info.isDirectory, () => false);
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, special ? { write: true } : { read: true, append: true, create: true });
  } catch (err) {
    throw new UsageError(`--out ${JSON.stringify(path)} cannot be opened: ${(err as Error).message}`);
  }
  if (special) {
    return {
      sink: {
        stream: true,
        write: (bytes) => writeAll(file, bytes),
        sync: async () => {},
        close: () => file.close(),
      },
      removed: 0,
    };
  }
  let removed = 0;
  const size = (await file.stat()).size;
  if (size > 0) {
    const keep = await lineStart(file, size);
    if (keep < size) {
      const tail = await lastLine(file, keep, size);
      // What an export killed during a write leaves follows an event, or nothing.
      const after = keep === 0 || (await lastLine(file, await lineStart(file, keep - 1), keep - 1)).complete;
      if (tail.complete) {
        // A whole event without its newline (not written by an export): kept, and ended.
        writeAll(file, UTF8.encode("\n"));
        await file.sync();
      } else if (tail.partial && after) {
        removed = size - keep;
        await file.truncate(keep);
        await file.sync();
      } else {
        file.close();
        throw new UsageError(
          `--out ${JSON.stringify(path)} does not end as an export's output (its last ${size - keep} bytes ${
            tail.partial
              ? "begin an event but follow a line that is no event"
              : "are no event and no part of one"
          }); nothing was changed: give another file`,
        );
      }
    }
  }
  return {
    sink: { write: (bytes) => writeAll(file, bytes), sync: () => file.sync(), close: () => file.close() },
    removed,
  };
}

/** Where the line that ends at `end` (at a newline, or the end of the file) begins. */
async function lineStart(file: Deno.FsFile, end: number): Promise<number> {
  const chunk = new Uint8Array(64 * 1024);
  while (end > 0) {
    const start = Math.max(0, end - chunk.length);
    await file.seek(start, Deno.SeekMode.Start);
    const view = chunk.subarray(0, end - start);
    let got = 0;
    while (got < view.length) {
      const n = await file.read(view.subarray(got));
      if (n === null) break;
      got += n;
    }
    const nl = view.subarray(0, got).lastIndexOf(10);
    if (nl >= 0) return start + nl + 1;
    end = start;
  }
  return 0;
}

/**
 * What the bytes from `from` to `to` (a line without its newline) are: a complete JSON object (an
 * event), the start of one, cut short (what an export killed during a write leaves), or something
 * else.
 */
async function lastLine(
  file: Deno.FsFile,
  from: number,
  to: number,
): Promise<{ complete: boolean; partial: boolean }> {
  // An event line is at most a few MiB; anything longer is not one.
  if (to - from > 64 << 20) return { complete: false, partial: false };
  const bytes = new Uint8Array(to - from);
  await file.seek(from, Deno.SeekMode.Start);
  let got = 0;
  while (got < bytes.length) {
    const n = await file.read(bytes.subarray(got));
    if (n === null) break;
    got += n;
  }
  const text = new TextDecoder().decode(bytes.subarray(0, got));
  try {
    const value = JSON.parse(text);
    // (A Jetstream event, as every line an export writes is: not any JSON object.)
    return { complete: shapeProblem(value) === undefined, partial: false };
  } catch {
    // Not whole: the start of an event, or not an event at all.
  }
  try {
    parseGoJson(text);
  } catch (err) {
    // Text that only ends too soon is the start of a JSON text; of an object, it is an event's.
    return { complete: false, partial: text.startsWith("{") && (err as Error).message === GO_JSON_EOF };
  }
  return { complete: false, partial: false };
}

/**
 * The summary line printed on stderr. `written` counts the events the handler wrote and synced:
 * more than `r.records` when a delivery's handling could not be recorded after its events were
 * written (KV delivers it again). `stoppedBy`: the signal that stopped the export.
 */
export function exportSummary(
  r: ConsumeResult,
  out: string | undefined,
  written = r.records,
  stream = false,
  stoppedBy?: StopSignal,
): string {
  const parts = [
    `${counted(r.records, "event")} from ${counted(r.messages, "message")} ${
      out ? `${stream ? "written" : "appended"} to ${out}` : "written"
    }`,
  ];
  if (r.duplicates > 0) {
    parts.push(`${counted(r.duplicates, "duplicate delivery", "duplicate deliveries")} skipped`);
  }
  if (r.failures > 0) {
    parts.push(`${counted(r.failures, "failed delivery", "failed deliveries")} left to KV`);
  }
  if (r.foreign > 0) {
    parts.push(
      `${counted(r.foreign, "delivery", "deliveries")} of another queue's messages put back for its consumer`,
    );
  }
  if (written > r.records) {
    parts.push(
      `${
        counted(written - r.records, "more event")
      } written for deliveries that could not be recorded as handled: KV delivers them again, so they are written twice (here or by the next export)`,
    );
  }
  if (stoppedBy !== undefined) parts.push(`stopped by ${stoppedBy}: what was not written stays in the queue`);
  return `jetfill export: ${parts.join("; ")} (${r.elapsed.toFixed(1)} s)`;
}

/** How often `export --follow` looks whether a queue the database has never held was written, ms. */
const QUEUE_POLL_MS = 1000;

/**
 * Runs `jetfill export` with its arguments; resolves to the exit code.
 *
 * @example
 * ```ts
 * import { exportCommand } from "./export.ts";
 * const code = await exportCommand(["--kv", "./jetfill-data/jetstream_sync.sqlite", "--out", "capture.ndjson"]);
 * ```
 */
export async function exportCommand(args: string[]): Promise<number> {
  const v = parseFlags("export", args, FLAGS);
  if (v.help) {
    console.log(asRun(HELP));
    return 0;
  }
  // From the start: a stop signal while it checks the database or waits for the queue stops it as one
  // during the export does, with its summary.
  const controller = new AbortController();
  let interrupted: StopSignal | undefined;
  const removeSignals = onStopSignals((signal) => {
    interrupted = signal;
    controller.abort();
  });
  try {
    return await exportWith(v, controller, () => interrupted);
  } finally {
    removeSignals();
  }
}

/** {@link exportCommand} once its flags are read, its stop signals going to `controller`. */
async function exportWith(
  v: Record<string, unknown>,
  controller: AbortController,
  interrupted: () => StopSignal | undefined,
): Promise<number> {
  const { queue, path } = queueFlags(v);
  // ("-": stdout, as without --out.)
  const out = v.out === "-" ? undefined : v.out as string | undefined;
  if (out === "") throw new UsageError("--out must name a file");
  if (out !== undefined) await refuseDatabaseFiles(out, path);
  // Without --follow there is nothing to wait for in a database that does not exist; with it, the
  // export may well start before the sync that creates it.
  const exists = await databaseExists(path);
  if (!v.follow && !exists) {
    throw new UsageError(
      `Cannot export as the database ${
        JSON.stringify(path)
      } does not exist or is an empty file (check --kv and --queue-name)`,
    );
  }
  if (exists) {
    // Before --out is opened.
    await requireWritable(path, "Cannot export", "export records in it each message it takes");
    // A queue never written where others are: refused (as consume() would) before --out is opened.
    const kv = await openKvAt(path);
    try {
      const unknown = await unknownQueue(kv, queue, path, "export");
      if (unknown && !v.follow) throw new UsageError(`Cannot export as ${unknown}: see --queue-name`);
      // Following, it may be waiting for a sync; but a mistyped name waits for ever. It waits for the
      // queue to be written before it listens: listening would take the other queues' messages (KV's
      // queue is one for the database) and put them back behind the rest, over and over.
      if (unknown) {
        console.error(
          `jetfill export: ${unknown}; waiting for a sync to write '${queue}' (see --queue-name)`,
        );
        while (!controller.signal.aborted && await unknownQueue(kv, queue, path, "export") !== undefined) {
          await delay(QUEUE_POLL_MS, controller.signal);
        }
      }
    } finally {
      kv.close();
    }
  } else if (!(await pathExists(dirname(path)))) {
    throw new UsageError(
      `Cannot export as neither the database ${JSON.stringify(path)} nor its folder ${
        JSON.stringify(dirname(path))
      } exists (check --kv): --follow waits for a sync only in an existing folder`,
    );
  } else {
    // consume() opens it, which makes it (an empty file too): a sync then writes into it as it is.
    console.error(
      `jetfill export: ${
        (await pathExists(path))
          ? `the database ${path} is an empty file; made it an empty database`
          : `no database at ${path} yet; made an empty one`
      }, and waiting for a sync to write queue '${queue}' there (Ctrl-C stops)`,
    );
  }
  let sink: Sink;
  if (out !== undefined) {
    const opened = await fileSink(out);
    sink = opened.sink;
    if (opened.removed > 0) {
      console.error(
        `jetfill export: removed a partial last line (${
          counted(opened.removed, "byte")
        }) from ${out}, left by an interrupted export; its events are written again`,
      );
    }
  } else {
    sink = stdoutSink();
  }

  let writeError: unknown;
  let written = 0;
  let result: ConsumeResult;
  try {
    result = await consume({
      kv: path,
      queueName: queue,
      untilEmpty: !v.follow,
      signal: controller.signal,
      handler: async (events) => {
        if (writeError !== undefined) throw writeError;
        let text = "";
        for (const event of events) text += ndjsonLine(event);
        try {
          sink.write(UTF8.encode(text));
          await sink.sync();
          written += events.length;
        } catch (err) {
          // Every later message would fail the same way (a full disk, a closed pipe): stop, and
          // leave this one unacknowledged for the next export.
          writeError = err;
          controller.abort();
          throw err;
        }
      },
      onError: (r) => {
        if (r.reason !== "foreign" && writeError === undefined) {
          console.error(`jetfill export: ${flagsOnly(r.message)}`);
        }
      },
    });
  } finally {
    sink.close();
  }
  console.error(exportSummary(result, out, written, sink.stream, interrupted()));
  if (await databaseExists(path)) {
    // Messages whose handling failed every retry are kept aside, not exported: say so.
    const kv = await openKvAt(path);
    try {
      const dead = (await deadLettersOf(kv, queue)).filter((l) => !l.handled);
      const deadRecords = dead.reduce((n, l) => n + l.records, 0);
      if (dead.length > 0) {
        console.error(
          `jetfill export: ${counted(dead.length, "dead-lettered message")} (${
            counted(deadRecords, "record")
          }) not exported: they failed every retry in an earlier consumer; the library's requeueDeadLetters(kv, queue) puts them back (docs/consuming.md)`,
        );
      }
    } finally {
      kv.close();
    }
  }
  if (writeError instanceof Deno.errors.BrokenPipe && sink.stream) {
    // The reader closed the pipe (`export | head`): it has what it wanted. The message being
    // written went back to the queue; the ones written before it have left it.
    console.error(
      `jetfill export: ${
        out === undefined ? "stdout" : out
      } was closed by its reader; the message being written stays in the queue${
        result.messages === 1
          ? "; the message written before it has left it"
          : result.messages > 1
          ? `; the ${result.messages} messages written before it have left it`
          : ""
      }`,
    );
    return 0;
  }
  if (writeError !== undefined) {
    console.error(
      `jetfill export: stopped: cannot write ${out ?? "to stdout"}: ${
        writeError instanceof Error ? writeError.message : String(writeError)
      }`,
    );
    return 1;
  }
  if (result.stopReason === "idle") {
    console.error(
      `jetfill export: stopped after 10 s without a message although the counters show messages waiting: a message whose handling failed comes back only at KV's next retry (up to a minute later), and a consumer that keeps no counters may have taken them; try again later (see '${programName()} status')`,
    );
  }
  const signal = interrupted();
  return signal ? interruptedExitCode(signal) : 0;
}
