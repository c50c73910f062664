/**
 * `jetfill sync`: copy events from Jetstream into a Deno KV queue.
 *
 * @module
 */
import { runBackfillSync } from "../backfill.ts";
import type { BackfillSyncOptions } from "../options.ts";
import type { SkipReason, SyncProgress, SyncStats } from "../stats.ts";
import { describeDuration, isoFromUs, TIMESTAMP_FORMATS } from "../time.ts";
import { UsageError } from "../errors.ts";
import { isDid } from "../validate.ts";
import {
  type FlagSpec,
  interruptedExitCode,
  kvFlag,
  numberFlag,
  onStopSignals,
  parseFlags,
  readListFile,
  type StopSignal,
} from "./args.ts";
import { asRun, counted, flagsOnly, programName } from "./program.ts";

const HELP = `Usage: jetfill sync [options]

Copy the Jetstream events you select into a Deno KV queue, then print statistics.

Selection:
  --did DID               keep this DID (did:plc: or did:web:); repeatable, or a comma list
  --dids-file PATH        DIDs to keep, one per line (blank lines and # comments skipped)
  --collection NSID       keep this collection, or a prefix like app.bsky.graph.*; repeatable,
                          or a comma list; '*' keeps every collection
                          (default app.bsky.feed.post)
  --kind KIND             commit, identity or account; repeatable, or a comma list (default commit)
  --operation OP          keep commits of this operation: create, update or delete; repeatable,
                          or a comma list
                          (default all three: a deleted post is a delete commit, with no record)
  --start TIME            start here (sent as the cursor), in UTC: ${
  TIMESTAMP_FORMATS.replace(", ISO", ",\n                          ISO").replace(
    ", or integer",
    ",\n                          or integer",
  )
}
  --end TIME              stop at the first event at or after this time (not stored); Jetstream
                          filters on the server, so with a narrow selection that event can be
                          long in coming, and --max-time ends the run instead
  --limit N               stop after exactly N stored records (default 10000)
  --strict                refuse to run when the server's history starts after --start (it
                          would silently start later), and stop on a gap after a long outage
                          or in a v2 host's seqs

Connection:
  --instance HOST|URL     Jetstream host or ws:// / wss:// URL (no filters or cursor in its query:
                          the options set those); repeatable, tried in order
                          (default jetstream1.us-east.bsky.network)
  --wire v1|v2            /subscribe (v1, every server) or subscribeEvents (v2 servers); default
                          v2 for jetstream.us-east/us-west.bsky.network (v1 with over 50
                          DIDs or 1,600 characters of them, which v2 takes in the URL only),
                          v1 otherwise
  --compress              ask for zstd-compressed frames
  --no-compress           with --resume, do not (when the last run did)
  --zstd-dictionary PATH  the zstd dictionary for --compress (else $JETFILL_ZSTD_DICTIONARY, a
                          cached copy, or a download verified by its sha256)
  --idle-timeout SECONDS  reconnect when no progress (a message, or bytes of one) for this long
                          (default 60); doubled after each idle end without a new event, up to
                          16 times
  --max-retries N         retries in a row without progress before giving up (default 10)
  --max-time SECONDS      stop after this long, even when nothing arrives (default 900)
  --max-event-bytes N     skip (and count) selected events of more UTF-8 bytes (default 1048576,
                          at most 33554432)

Queue:
  --kv PATH               Deno KV database (default ./jetfill-data/<queue-name>.sqlite; missing
                          folders are made); while it runs, the sync holds PATH@<queue-name>.lock
                          beside it, and a second sync of the same queue is refused
  --queue-name NAME       queue name (default jetstream_sync)
  --batch-size N          records per batch and atomic commit (default 100); a batch not full
                          1 s after its first record is committed as it is
  --resume                continue this queue's last run (the one 'status' says it continues)
                          from its checkpoint: selection options and instances left out are
                          the last run's, different selection
                          options are refused; --max-time, --idle-timeout, --max-retries and
                          --strict are this run's own
  --force                 with --resume, accept different selection options; without it, store
                          again a window this queue's last run stored (refused otherwise)

The original Python CLI's flags are taken too: -c/--wanted-collections (--collection),
-d/--wanted-dids (--did; a comma list too, as --did, --collection, --kind and --operation take),
-s/--start-timestamp (--start), -e/--end-timestamp (--end), -n/--num-records (--limit),
-i (--instance), -t (--max-time).

Output:
  --json                  print the statistics as JSON on stdout
  --verbose               report every skipped frame on stderr (without it, the first of each
                          reason, and the first 20 selected events too large)
  -h, --help              show this help

Environment: HTTPS_PROXY (wss://) or HTTP_PROXY (ws://), an http:// proxy tunnelled with CONNECT
(http://user:password@host:port when it wants credentials), and NO_PROXY; loopback hosts never go
through a proxy.

Exit codes: 0 done, 1 runtime failure, 2 bad input, 130 interrupted by Ctrl-C (143 by SIGTERM,
129 by SIGHUP), after storing what the server sent before it saw the close (a second Ctrl-C exits
at once, leaving the rest to --resume).`;

/** The original Python CLI's flags (protocol doc's peers.md, `backfill_sync_cli`), and jetfill's. */
const ORIGINAL_FLAGS: Record<string, string> = {
  "-c": "collection",
  "--wanted-collections": "collection",
  "-d": "did",
  "--wanted-dids": "did",
  "-s": "start",
  "--start-timestamp": "start",
  "-e": "end",
  "--end-timestamp": "end",
  "-n": "limit",
  "--num-records": "limit",
  "-i": "instance",
  "-t": "max-time",
};

/**
 * The arguments with the original CLI's flags given jetfill's names (`-n 5` as `--limit 5`); a
 * value is never taken for a flag. Its `-u/--bluesky-user-handles`, which it took and ignored, is
 * refused.
 */
export function withOriginalFlags(args: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const eq = arg.startsWith("--") ? arg.indexOf("=") : -1;
    const name = eq === -1 ? arg : arg.slice(0, eq);
    if (name === "-u" || name === "--bluesky-user-handles") {
      throw new UsageError(
        `${name} (the original CLI's user handles, which it took and ignored) is not supported: give DIDs with --did or --dids-file`,
      );
    }
    const ours = ORIGINAL_FLAGS[name];
    out.push(ours === undefined ? arg : `--${ours}${eq === -1 ? "" : arg.slice(eq)}`);
    // A flag that takes a value, given apart: the next argument is its value, as it is.
    const flag = ours ?? (name.startsWith("--") ? name.slice(2) : undefined);
    if (eq === -1 && flag !== undefined && FLAGS[flag]?.type === "string" && i + 1 < args.length) {
      out.push(args[++i]);
    }
  }
  return out;
}

const FLAGS: FlagSpec = {
  did: { type: "string", multiple: true },
  "dids-file": { type: "string" },
  collection: { type: "string", multiple: true },
  kind: { type: "string", multiple: true },
  operation: { type: "string", multiple: true },
  start: { type: "string" },
  end: { type: "string" },
  limit: { type: "string" },
  instance: { type: "string", multiple: true },
  compress: { type: "boolean" },
  "no-compress": { type: "boolean" },
  wire: { type: "string" },
  "max-event-bytes": { type: "string" },
  "zstd-dictionary": { type: "string" },
  "idle-timeout": { type: "string" },
  "max-retries": { type: "string" },
  "max-time": { type: "string" },
  kv: { type: "string" },
  "queue-name": { type: "string" },
  "batch-size": { type: "string" },
  resume: { type: "boolean" },
  strict: { type: "boolean" },
  force: { type: "boolean" },
  json: { type: "boolean" },
  verbose: { type: "boolean" },
  help: { type: "boolean", short: "h" },
};

/** A flag's value as given (a string, or the list of a repeatable flag), or undefined when absent. */
const given = (_flag: string, value: unknown) => value;
/** A boolean flag: true when given. */
const yes = (_flag: string, value: unknown) => value === true ? true : undefined;
/** A number flag, checked against `rule` (see numberFlag). */
const num = (rule: Parameters<typeof numberFlag>[2]) => (flag: string, value: unknown) =>
  numberFlag(flag, value, rule);

/**
 * Each library option and the flag it comes from (but `wantedDids`, which `--did` and `--dids-file`
 * both give): `syncOptionsFromFlags` reads them, and error messages name the flags by it.
 */
const OPTION_FLAGS: readonly {
  option: Exclude<keyof BackfillSyncOptions, "wantedDids">;
  flag: string;
  read: (flag: string, value: unknown) => unknown;
}[] = [
  { option: "wantedCollections", flag: "collection", read: given },
  { option: "kinds", flag: "kind", read: given },
  { option: "operations", flag: "operation", read: given },
  { option: "startTimestamp", flag: "start", read: given },
  { option: "endTimestamp", flag: "end", read: given },
  { option: "instance", flag: "instance", read: given },
  { option: "kv", flag: "kv", read: kvFlag },
  { option: "queueName", flag: "queue-name", read: given },
  // (Before --compress: the flag that error messages name for compress is the last one listed.)
  { option: "compress", flag: "no-compress", read: (_flag, value) => value === true ? false : undefined },
  { option: "compress", flag: "compress", read: yes },
  { option: "wire", flag: "wire", read: given },
  { option: "maxEventBytes", flag: "max-event-bytes", read: num({ integer: true, positive: true }) },
  { option: "zstdDictionary", flag: "zstd-dictionary", read: given },
  { option: "resume", flag: "resume", read: yes },
  { option: "force", flag: "force", read: yes },
  { option: "strict", flag: "strict", read: yes },
  { option: "numRecords", flag: "limit", read: num({ integer: true, positive: true }) },
  { option: "batchSize", flag: "batch-size", read: num({ integer: true, positive: true }) },
  { option: "maxTime", flag: "max-time", read: num({ positive: true }) },
  { option: "idleTimeout", flag: "idle-timeout", read: num({ positive: true }) },
  { option: "maxRetries", flag: "max-retries", read: num({ integer: true, min: 0 }) },
];

/** The values of a repeatable flag, each split at its commas. */
function commaLists(flag: string, values: unknown): string[] {
  return ((values as string[] | undefined) ?? []).flatMap((v) => {
    if (!v.includes(",")) return [v];
    const items = v.split(",").map((p) => p.trim());
    // Named as typed: the empty item alone ("") would not show which value held it.
    if (items.includes("")) {
      throw new UsageError(
        `--${flag} must be one value or a list of them separated by commas, without an empty one: current value is ${
          JSON.stringify(v)
        }`,
      );
    }
    return items;
  });
}

/** Turns the flags of `jetfill sync` into library options. */
export async function syncOptionsFromFlags(v: Record<string, unknown>): Promise<BackfillSyncOptions> {
  // A comma list, as the original's --wanted-dids took (no DID or NSID holds a comma).
  const dids = commaLists("did", v.did);
  for (const flag of ["collection", "kind", "operation"] as const) {
    if (v[flag] !== undefined) v[flag] = commaLists(flag, v[flag]);
  }
  if (v["dids-file"] !== undefined) {
    const path = v["dids-file"] as string;
    const listed = await readListFile("dids-file", path);
    // An empty list means every account: never what a file of DIDs was given for.
    if (listed.length === 0) {
      throw new UsageError(
        `--dids-file ${
          JSON.stringify(path)
        } holds no DIDs (one a line; blank lines and # comments are skipped)`,
      );
    }
    // Named by its line: a list of thousands is otherwise hard to mend.
    const bad = listed.find((l) => !isDid(l.value));
    if (bad) {
      throw new UsageError(
        `--dids-file ${JSON.stringify(path)} line ${bad.line}: ${
          JSON.stringify(bad.value)
        } is not a did:plc: or did:web: DID (did:plc: then 24 characters of a-z and 2-7; did:web: then a host name; one a line; # starts a comment)`,
      );
    }
    dids.push(...listed.map((l) => l.value));
  }
  if (v.compress && v["no-compress"]) {
    throw new UsageError("--compress and --no-compress contradict each other");
  }
  if (v["no-compress"] && !v.resume) {
    // Without a resume, no compression is the default: a flag that does nothing is a mistake.
    throw new UsageError(
      "--no-compress is for --resume only (it turns off the compression of the run resumed); without --resume, leave out --compress",
    );
  }
  const options: BackfillSyncOptions = {};
  if (dids.length > 0) options.wantedDids = dids;
  const set = options as Record<string, unknown>;
  for (const { option, flag, read } of OPTION_FLAGS) {
    const value = read(flag, v[flag]);
    if (value !== undefined) set[option] = value;
  }
  return options;
}

/**
 * The live progress line, cut to `columns - 1` characters: a line as wide as the terminal or wider
 * wraps, and the next update's clear (`\r`, erase line) would leave its first rows behind.
 */
export function progressLine(p: SyncProgress, columns = Number.POSITIVE_INFINITY): string {
  const pct = p.percent !== null ? ` ${p.percent.toFixed(1)}% of window` : "";
  const line = `${p.recordsStored} records, ${Math.round(p.rate)}/s, ${p.messagesReceived} messages, ${
    p.currentDate ?? "-"
  }${pct}, ${p.elapsed.toFixed(0)} s`;
  return line.length < columns ? line : line.slice(0, Math.max(0, columns - 1));
}

/** The width of the terminal on stderr, or Infinity when it cannot be read. */
function stderrColumns(): number {
  try {
    return Deno.consoleSize().columns || Number.POSITIVE_INFINITY;
  } catch {
    return Number.POSITIVE_INFINITY;
  }
}

/** How many selected events left out as too large `sync` reports one by one without --verbose. */
const OVERSIZED_SAID = 20;

/** Erases the progress line, when there is one, before a line of text goes to stderr. */
const CLEAR_LINE = new TextEncoder().encode("\r\x1b[2K");

/** A readable summary of the statistics. */
export function formatSummary(s: SyncStats, resume = `${programName()} sync --resume`): string {
  const lines = [
    `records stored      ${s.recordsStored}`,
    `messages received   ${s.messagesReceived}`,
    `total time          ${s.totalTime.toFixed(2)} s (${Math.round(s.recordsPerSecond)} records/s)`,
    `stop reason         ${s.stopReason}${s.error ? `: ${flagsOnly(s.error)}` : ""}`,
    `target reached      ${s.targetReached}`,
    `end reached         ${s.endCursorReached}`,
    `collections         ${s.collections.join(", ") || "-"}`,
    `latest cursor       ${
      s.latestCursor === null ? "-" : `${s.latestCursor} (${isoFromUs(s.latestCursor)})`
    }`,
    `current date        ${s.currentDate ?? "-"}`,
    `queue length        ${counted(s.queueLength, "message")} waiting`,
  ];
  const days = Object.entries(s.recordsPerDay).sort();
  if (days.length > 0) lines.push(`records per day     ${days.map(([d, n]) => `${d}: ${n}`).join(", ")}`);
  const skipped = Object.entries(s.skipped);
  if (skipped.length > 0) {
    lines.push(`skipped frames      ${skipped.map(([r, n]) => `${r}: ${n}`).join(", ")}`);
  }
  if (s.reconnects || s.failovers || s.duplicatesDropped) {
    lines.push(
      `reconnects          ${s.reconnects} (failovers ${s.failovers}, duplicates dropped ${s.duplicatesDropped})`,
    );
  }
  if (s.startClamped || s.coverageGapUs > 0) {
    lines.push(
      `coverage            server history starts ${
        s.coverageStart === null ? "?" : isoFromUs(s.coverageStart)
      }; ${describeDuration(s.coverageGapUs)} of the requested time could not be had${
        s.startClamped ? " (start moved forward by the server)" : ""
      }`,
    );
  }
  if (s.bytesDecoded > 0) {
    lines.push(
      `compression         ${s.bytesReceived} bytes on the wire, ${s.bytesDecoded} decoded (${
        (s.bytesDecoded / Math.max(1, s.bytesReceived)).toFixed(2)
      }x)`,
    );
  }
  const hint = resumeHint(s, resume);
  if (hint) lines.push(`continue with       ${hint}`);
  return lines.join("\n");
}

/** The flag of each library option that `sync` sets from one, as its error messages name it. */
const FLAG_OF: Readonly<Record<string, string>> = Object.fromEntries(
  OPTION_FLAGS.map(({ option, flag }) => [option, `--${flag}`]),
);

/**
 * A library error about an option ("Cannot sync as 'startTimestamp' must be …", or a resume's
 * "numRecords was 50, now 60") as the command line says it: by the flag the user typed ("--start
 * must be …", "--limit was 50, now 60"). `didsFlag` is the flag the DIDs came from (`--did`,
 * `--dids-file`, or both).
 *
 * @example
 * ```ts
 * import { inFlagTerms } from "./sync.ts";
 * inFlagTerms("Cannot sync as 'kinds' must be one of commit, identity, account: current value is \"x\"", "--did");
 * // '--kind must be one of commit, identity, account: current value is "x"'
 * ```
 */
export function inFlagTerms(message: string, didsFlag: string): string {
  const flag = (name: string): string | undefined => name === "wantedDids" ? didsFlag : FLAG_OF[name];
  const named = /^Cannot sync as '(\w+)' must/.exec(message);
  if (named && flag(named[1])) {
    // The rule may name other options ("must be after 'startTimestamp'"): by their flags too, but
    // not in the value quoted after it.
    // The command line gives the database and the dictionary as paths only.
    const rule = message.replace("a Deno.Kv or a database path", "a database path")
      .replace("a file path or the dictionary's bytes", "a file path");
    const cut = rule.includes(": current value is ") ? rule.indexOf(": current value is ") : rule.length;
    // A number checked by the library was typed as text: quoted, as the command line's own checks do.
    return rule.slice(0, cut)
      .replace(/^Cannot sync as '\w+'/, flag(named[1])!)
      .replace(/'(\w+)'/g, (whole, name: string) => flag(name) ?? whole) +
      rule.slice(cut).replace(/^(: current value is )(-?\d+(?:\.\d+)?)$/, '$1"$2"');
  }
  // "Cannot resume queue 'q' with different options: numRecords was 50, now 60; kinds was …"
  if (!message.startsWith("Cannot resume queue ")) return message;
  return message.replace(
    /(different options: |; )(\w+) was /g,
    (whole, before: string, name: string) => flag(name) ? `${before}${flag(name)} was ` : whole,
  );
}

/** The reasons a frame is skipped (counted in `skipped`), as reported: every one, or it does not compile. */
const SKIP_REASONS: Readonly<Record<SkipReason, true>> = {
  malformed_json: true,
  missing_fields: true,
  bad_time: true,
  bad_value: true,
  unknown_kind: true,
  binary_frame: true,
  invalid_utf8: true,
  decode_failed: true,
  oversized: true,
};

function isSkipReason(reason: string): boolean {
  return Object.hasOwn(SKIP_REASONS, reason);
}

/** How to continue a run that stopped short of its limit and end, or undefined when it did not. */
function resumeHint(s: SyncStats, command: string): string | undefined {
  if (s.stopReason === "limit" || s.stopReason === "end" || s.latestCursor === null) return undefined;
  return command;
}

/** The command that resumes the queue this sync writes: `--resume` with the `--kv` and `--queue-name` given. */
function resumeCommand(v: { kv?: string; "queue-name"?: string }): string {
  const flags = [
    v.kv === undefined ? "" : ` --kv ${shellWord(v.kv)}`,
    v["queue-name"] === undefined ? "" : ` --queue-name ${shellWord(v["queue-name"])}`,
  ];
  return `${programName()} sync --resume${flags.join("")}`;
}

/** `word` as a POSIX shell reads it back: as it is when plain, else in single quotes. */
function shellWord(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}

/**
 * Runs `jetfill sync` with its arguments; resolves to the exit code.
 *
 * @example
 * ```ts ignore
 * import { syncCommand } from "./sync.ts";
 * const code = await syncCommand(["--instance", "ws://127.0.0.1:6008", "--limit", "100", "--json"]);
 * ```
 */
export async function syncCommand(args: string[]): Promise<number> {
  const v = parseFlags("sync", withOriginalFlags(args), FLAGS);
  if (v.help) {
    console.log(asRun(HELP));
    return 0;
  }
  const options = await syncOptionsFromFlags(v);
  const controller = new AbortController();
  let stoppedBy: StopSignal = "SIGINT";
  const live = Deno.stderr.isTerminal() && !v.json;
  const removeSignals = onStopSignals((signal) => {
    if (controller.signal.aborted) {
      // A second signal while the stop stores what the server had sent (a slow database, say):
      // out at once. Each commit is atomic, so the queue holds whole batches; what was not stored
      // yet is left for --resume.
      if (live) Deno.stderr.writeSync(CLEAR_LINE);
      console.error(
        `jetfill sync: stopped at once by a second ${signal}; continue with ${resumeCommand(v)}`,
      );
      Deno.exit(interruptedExitCode(signal));
    }
    stoppedBy = signal;
    controller.abort();
  });
  const enc = new TextEncoder();
  options.signal = controller.signal;
  if (live) {
    options.onProgress = (p) =>
      Deno.stderr.writeSync(enc.encode(`\r\x1b[2K${progressLine(p, stderrColumns())}`));
  }
  // Skip reasons already warned of, without --verbose.
  const warned = new Set<string>();
  // Selected events left out as too large, said so far without --verbose.
  let oversized = 0;
  options.onError = (r) => {
    // Data that cannot be had or is left out, and a queue that already holds records: always said
    // (selected events too large for the queue: the first OVERSIZED_SAID, then only counted).
    // Other frames skipped: the first of each reason, then only counted (every one with --verbose).
    const first = !v.verbose && isSkipReason(r.reason) && r.reason !== "oversized" && !warned.has(r.reason);
    if (first) warned.add(r.reason);
    const lastOversized = !v.verbose && r.reason === "oversized" && ++oversized === OVERSIZED_SAID;
    // With --verbose, every frame skipped is a warning that says so.
    const skippedToo = v.verbose && isSkipReason(r.reason);
    const label = r.reason === "queue" ? "note: " : r.reason === "coverage" || r.reason === "lock" || first ||
        skippedToo || (r.reason === "oversized" && oversized <= OVERSIZED_SAID)
      ? "warning: "
      : r.reason === "connection" || r.reason === "retry" || v.verbose
      ? ""
      : undefined;
    if (label === undefined) return;
    if (live) Deno.stderr.writeSync(CLEAR_LINE);
    const more = first
      ? ` (skipped; later ${r.reason} frames are only counted, in the statistics' skipped: --verbose reports each)`
      : lastOversized
      ? `; later ones are only counted (skipped oversized, in the statistics; --verbose reports each)`
      : skippedToo && !/skipped( unread)?$/.test(r.message)
      ? " (skipped)"
      : "";
    console.error(`jetfill sync: ${label}${flagsOnly(r.message)}${more}`);
  };
  let stats: SyncStats;
  try {
    stats = await runBackfillSync(options);
  } catch (err) {
    if (controller.signal.aborted && !(err instanceof UsageError)) {
      // Stopped while the sync was still being set up (a dictionary download, say). The abort's own
      // words ("The signal has been aborted") say nothing more.
      const why = (err as Error)?.name === "AbortError" ? undefined : (err as Error)?.message ?? String(err);
      console.error(
        `jetfill sync: stopped by ${stoppedBy}${
          why === undefined ? " before the sync was under way" : ` (${flagsOnly(why)})`
        }`,
      );
      return interruptedExitCode(stoppedBy);
    }
    if (!(err instanceof UsageError)) throw err;
    const didsFlag = v.did && v["dids-file"] !== undefined
      ? "--did / --dids-file"
      : v["dids-file"] !== undefined
      ? "--dids-file"
      : "--did";
    throw new UsageError(inFlagTerms(err.message, didsFlag), { cause: err });
  } finally {
    removeSignals();
    if (live) Deno.stderr.writeSync(CLEAR_LINE);
  }
  if (v.json) {
    console.log(JSON.stringify(stats));
    // stdout holds the statistics alone; what a person needs to go on goes to stderr.
    if (stats.stopReason === "error") console.error(`jetfill sync: ${flagsOnly(stats.error ?? "")}`);
    const resume = resumeHint(stats, resumeCommand(v));
    if (resume) console.error(`jetfill sync: note: continue with ${resume}`);
  } else console.log(formatSummary(stats, resumeCommand(v)));
  if (stats.stopReason === "error") return 1;
  return stats.stopReason === "aborted" ? interruptedExitCode(stoppedBy) : 0;
}
