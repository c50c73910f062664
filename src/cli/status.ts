/**
 * `jetfill status`: what a queue holds and what its last run did.
 *
 * @module
 */
import { UsageError } from "../errors.ts";
import { isNothingThere } from "../fs.ts";
import { type QueueStatus, queueStatus } from "../queue/status.ts";
import { localDatabasePath, openKvAt, unknownQueue, unlockLogFiles } from "../queue/kv_queue.ts";
import { queueFileLocked, queueLockPath } from "../queue/file_lock.ts";
import { isoFromUs } from "../time.ts";
import { type FlagSpec, parseFlags, queueFlags } from "./args.ts";
import { asRun, counted, flagsOnly } from "./program.ts";

const HELP = `Usage: jetfill status [options]

Show a queue's checkpoint (last cursor and its UTC time), the messages and records enqueued,
handled, waiting and dead-lettered, the records stored per UTC day, and the last run's options
and statistics. Status only reads (but adds the queue indexes to a database without them), yet
needs write access to the file and its folder, as Deno KV opens every database for writing; and
like any opening of the database, it lets KV requeue messages that a consumer has held past KV's
5 s deadline (they are then delivered again).

Options:
  --kv PATH               Deno KV database (default ./jetfill-data/<queue-name>.sqlite)
  --queue-name NAME       queue name (default jetstream_sync)
  --json                  print one JSON object on stdout (fields below)
  -h, --help              show this help

JSON fields: kv (the database path), queue, lastSeq, latestCursor (time_us of the last record
stored, or null), latestCursorTime (its ISO 8601 UTC time), checkpointUpdatedAt, recordsStored,
messagesEnqueued, messagesHandled, recordsHandled, messagesWaiting and recordsWaiting (neither
handled nor dead-lettered), messagesParked (of those, parked by a consumer in KV keys, out of
KV's queue, for a consumer to take in seq order), deadLetters and deadRecords (messages KV gave up
delivering), queueLength (messages not handled, dead letters included, as a sync reports it;
the waiting ones are counted in Deno KV's queue, so those a plain listenQueue took do not count:
the text shows them as "taken elsewhere"), recordsPerDay ({ "YYYY-MM-DD": records }), steady
(false when a sync or a consumer changed the queue all through the reading: the figures may then
be apart by what was committed meanwhile, even messages waiting against records waiting), writer
(the sync holding the queue's writer lock: { run, since, lastSeen, lockFile }, or null when none
does; a lastSeen over 10 s old is a crashed sync, unless it holds the lock file (lockFile true)
and the lock file is held), lockFile ({ path, held }: held while a sync's process is alive, even
paused; null when there is none to look at), resumeRun (the run --resume continues, which the
checkpoint names: { id, recordsStored, selection }, or null), lastRun ({ id, finishedAt, options,
stats } with the sync's own statistics as 'jetfill sync --json' printed them, or null).

Exit codes: 0 done, 1 runtime failure, 2 bad input (such as a database that does not exist).`;

const FLAGS: FlagSpec = {
  kv: { type: "string" },
  "queue-name": { type: "string" },
  json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
};

/** `jetfill status --json`: the queue's status and the database it was read from. */
export type StatusJson = QueueStatus & {
  kv: string;
  /**
   * The queue's lock file, which a running sync holds (even while paused or kept from writing), or
   * null when there is none (no sync has run there since lock files came in).
   */
  lockFile: { path: string; held: boolean } | null;
};

function entries(o: Record<string, unknown>): string {
  return Object.entries(o).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(
    ", ",
  );
}

/**
 * A readable report of a queue's status.
 *
 * @example
 * ```ts
 * import { formatStatus } from "./status.ts";
 * import { queueStatus } from "@jetfill/jetfill";
 * const kv = await Deno.openKv("./jetfill-data/jetstream_sync.sqlite");
 * console.log(formatStatus(await queueStatus(kv, "jetstream_sync"), "./jetfill-data/jetstream_sync.sqlite"));
 * kv.close();
 * ```
 */
export function formatStatus(s: QueueStatus, path: string, lockFile: StatusJson["lockFile"] = null): string {
  const lines = [
    `queue               ${s.queue} (${path})`,
    `last cursor         ${
      s.latestCursor === null ? "- (nothing stored yet)" : `${s.latestCursor} (${s.latestCursorTime})`
    }`,
    `checkpoint          seq ${s.lastSeq}${
      s.checkpointUpdatedAt ? `, written ${s.checkpointUpdatedAt}` : ""
    }`,
    `stored              ${counted(s.recordsStored, "record")} in ${counted(s.messagesEnqueued, "message")}`,
    `handled             ${counted(s.recordsHandled, "record")} in ${counted(s.messagesHandled, "message")}`,
    `waiting             ${counted(s.recordsWaiting, "record")} in ${counted(s.messagesWaiting, "message")}${
      s.messagesParked > 0 ? ` (${s.messagesParked} parked by a consumer)` : ""
    }`,
    `dead letters        ${counted(s.deadLetters, "message")} (${counted(s.deadRecords, "record")})`,
  ];
  if (!s.steady) {
    lines.push(
      "note                the queue changed all through the reading (a sync or a consumer at work): these figures may be apart by what was committed meanwhile, and need not add up",
    );
  }
  // The rest left Deno KV's queue without consume(): a plain listenQueue, which keeps no counters.
  // (Not from figures of different moments.)
  const elsewhere = s.messagesEnqueued - s.messagesHandled - s.messagesWaiting - s.deadLetters;
  if (elsewhere > 0 && s.steady) {
    lines.push(
      `taken elsewhere     ${
        counted(s.recordsStored - s.recordsHandled - s.recordsWaiting - s.deadRecords, "record")
      } in ${
        counted(elsewhere, "message")
      } (by a reader other than jetfill export and consume(), such as a plain listenQueue)`,
    );
  }
  const days = Object.entries(s.recordsPerDay).sort();
  lines.push(
    `records per day     ${days.length === 0 ? "-" : days.map(([d, n]) => `${d}: ${n}`).join(", ")}`,
  );
  // A lock file held by the writer's process settles it: that process is alive, however long it has
  // been silent. (A writer without one, with a Deno.Kv handle, is judged by its signs of life.)
  const held = lockFile?.held === true;
  if (s.writer) {
    const ago = (Date.now() - Date.parse(s.writer.lastSeen)) / 1000;
    lines.push(
      `writer              ${
        held && s.writer.lockFile
          ? `a sync is running (its process holds ${lockFile!.path})`
          : s.writer.lockFile && lockFile?.held === false
          ? "left by a sync that did not stop cleanly (no process holds its lock file)"
          : ago < 2
          ? "a sync is running"
          : ago < 10
          ? "a sync is running, or crashed (no sign of life for a while)"
          : "left by a sync that did not stop cleanly"
      }: run ${s.writer.run} since ${s.writer.since}, last seen ${s.writer.lastSeen} (${
        Math.max(0, ago).toFixed(1)
      } s ago)`,
    );
    if (held && !s.writer.lockFile) {
      lines.push(`lock file           held by a running process: ${lockFile!.path}`);
    }
  } else if (held) {
    lines.push(`writer              a sync is starting or stopping (its process holds ${lockFile!.path})`);
  } else {
    lines.push(`writer              - (no sync running)`);
  }
  if (s.lastRun) {
    const st = s.lastRun.stats;
    const latest = typeof st.latestCursor === "number" ? ` up to ${isoFromUs(st.latestCursor)}` : "";
    lines.push(
      `last run            ${s.lastRun.id}, finished ${s.lastRun.finishedAt}`,
      `  stored            ${counted(Number(st.recordsStored), "record")} in ${
        counted(Number(st.messagesEnqueued), "message")
      }${latest}, ${
        typeof st.totalTime === "number" ? st.totalTime.toFixed(2) : "?"
      } s, stop reason ${st.stopReason}${st.error ? `: ${flagsOnly(String(st.error))}` : ""}`,
      `  options           ${entries(s.lastRun.options)}`,
    );
  } else {
    lines.push(`last run            -`);
  }
  if (s.resumeRun) {
    // Another run than the last one when that one put the checkpoint back (it never connected).
    lines.push(
      `resume continues    ${s.resumeRun.id}${
        s.resumeRun.id === s.lastRun?.id ? " (the last run)" : ""
      }, which stored ${counted(s.resumeRun.recordsStored, "record")}`,
    );
  }
  return lines.join("\n");
}

/**
 * Runs `jetfill status` with its arguments; resolves to the exit code.
 *
 * @example
 * ```ts
 * import { statusCommand } from "./status.ts";
 * const code = await statusCommand(["--kv", "./jetfill-data/jetstream_sync.sqlite", "--json"]);
 * ```
 */
export async function statusCommand(args: string[]): Promise<number> {
  const v = parseFlags("status", args, FLAGS);
  if (v.help) {
    console.log(asRun(HELP));
    return 0;
  }
  const { queue, path } = queueFlags(v);
  // Deno.openKv would create an empty database just to report that it is empty.
  try {
    const info = await Deno.stat(path);
    if (!info.isFile) {
      throw new UsageError(
        `Cannot show the status as ${
          JSON.stringify(path)
        } is not a file (--kv names a Deno KV database file)`,
      );
    }
    if (info.size === 0) {
      throw new UsageError(
        `Cannot show the status as ${
          JSON.stringify(path)
        } is an empty file, not a Deno KV database (check --kv)`,
      );
    }
  } catch (err) {
    if (isNothingThere(err)) {
      throw new UsageError(
        `Cannot show the status as the database ${
          JSON.stringify(path)
        } does not exist (check --kv and --queue-name)`,
      );
    }
    throw err;
  }
  const kv = await openKvAt(path);
  let status: QueueStatus;
  try {
    const unknown = await unknownQueue(kv, queue, path, "show the status");
    if (unknown) throw new UsageError(`Cannot show the status as ${unknown}: see --queue-name`);
    status = await queueStatus(kv, queue);
  } finally {
    kv.close();
    const file = localDatabasePath(path);
    if (file !== undefined) await unlockLogFiles(file);
  }
  const held = await queueFileLocked(path, queue);
  const lockFile = held === undefined ? null : { path: await queueLockPath(path, queue), held };
  if (v.json) console.log(JSON.stringify({ kv: path, ...status, lockFile } satisfies StatusJson));
  else console.log(formatStatus(status, path, lockFile));
  return 0;
}
