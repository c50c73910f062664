/**
 * `jetfill serve`: serve a capture file as a legacy (or, with `--v2`, a v2) Jetstream server, for
 * demos, tests and benchmarks without the internet.
 *
 * @module
 */
import { UsageError } from "../errors.ts";
import { isNothingThere } from "../fs.ts";
import { countOutOfOrder, loadCapture } from "../server/capture.ts";
import { type ErrorAfter, serveJetstream } from "../server/server.ts";
import type { ServerFaults } from "../server/faults.ts";
import { resolveZstdDictionary } from "../jetstream/dictionary.ts";
import { createZstdEncoder, dictionaryIdOf } from "../jetstream/zstd.ts";
import { type FlagSpec, onStopSignals, parseFlags } from "./args.ts";
import { asRun } from "./program.ts";

const HELP = `Usage: jetfill serve --file <capture.ndjson> [options]

Serve a capture (NDJSON, one legacy-wire Jetstream event per line) on ws://HOST:PORT/subscribe with
the legacy server's query parameters (wantedCollections, wantedDids, cursor, maxMessageSizeBytes,
requireHello). A connection without a cursor gets the capture from its start, as if it were live.
A capture not in time_us order is served sorted by time_us, as the legacy server's store holds
events (one line on stderr says so; see --file-order); a v2 server (--v2) serves it in file order,
its seq order.

Options:
  --file <path>       capture file to serve (required)
  --port <n>          port to listen on, 0 for any free port (default: 0)
  --hostname <host>   interface to listen on (default: 127.0.0.1)
  --close-at-end      close each connection (code 1000) once its events are sent
  --zstd-dictionary <path>
                      serve compress=true connections with zstd frames made with this
                      dictionary (without it such requests get HTTP 400)
  -h, --help          show this help

v2 server (protocol doc §1.2, §1.3):
  --v2                imitate the v2 server: seqs, "cursor" on /subscribe events, v2 cursor
                      rules and errors, and /xrpc/network.bsky.jetstream.subscribeEvents and
                      /xrpc/network.bsky.jetstream.getZstdDictionary
  --seq-base <n>      the first event gets seq n+1 (default: 1000)
  --lookback-floor-seq <seq>
                      events before this seq are outside the history window (both versions)
  --history-start-us <µs>
                      events before this time_us are outside the history window (both versions)
  --early-replay-us <µs>
                      time cursors start this much earlier than asked (bluesky-social/jetstream#343)
  --v2-zstd-dictionary <path>
                      serve subscribeEvents?zstdDictionary=<id> with zstd frames made with this
                      dictionary, and the dictionary itself on getZstdDictionary
  --error-after <n>   end each connection after n events: on subscribeEvents with an error frame,
                      on /subscribe (with or without --v2) by dropping it (1006)
  --error-name <name> ConsumerTooSlow (default) or InternalError

Faults (all off by default, all deterministic):
  --refuse-first <k>  answer the first k subscription requests with HTTP 503
                      "service not ready: bootstrap in progress"
  --retry-after <s>   with --refuse-first, a Retry-After header of s seconds on those refusals
  --drop-every <n>    drop every connection without a close frame (1006) after its n-th event
  --stall-after <n>   after its n-th event (0: at once), a connection goes quiet but stays open
  --stall-connections <m>
                      how many connections stall, the first m (default: 1)
  --garbage-every <n> after every n events, send one bad frame (malformed JSON, binary junk,
                      unknown kind, missing time_us, ~2 MiB), cycling through the kinds
  --file-order        serve the capture in file order even where time_us goes backwards, as no
                      healthy legacy server does (a cursor skips the events before it in time)

Prints one line, "listening on ws://HOST:PORT/subscribe" (with --v2, "... and
ws://HOST:PORT/xrpc/network.bsky.jetstream.subscribeEvents"), once ready, on stdout; a capture
out of time_us order, or empty, is said on stderr. Runs until SIGINT, SIGTERM or SIGHUP.`;

const FLAGS: FlagSpec = {
  file: { type: "string" },
  port: { type: "string" },
  hostname: { type: "string" },
  "close-at-end": { type: "boolean" },
  "zstd-dictionary": { type: "string" },
  "refuse-first": { type: "string" },
  "retry-after": { type: "string" },
  "drop-every": { type: "string" },
  "stall-after": { type: "string" },
  "stall-connections": { type: "string" },
  "garbage-every": { type: "string" },
  "file-order": { type: "boolean" },
  v2: { type: "boolean" },
  "seq-base": { type: "string" },
  "lookback-floor-seq": { type: "string" },
  "history-start-us": { type: "string" },
  "early-replay-us": { type: "string" },
  "v2-zstd-dictionary": { type: "string" },
  "error-after": { type: "string" },
  "error-name": { type: "string" },
  help: { type: "boolean", short: "h" },
};

function parsePort(raw: string): number {
  if (!/^\d+$/.test(raw) || Number(raw) > 65535) {
    throw new UsageError(
      `--port must be an integer from 0 to 65535: current value is ${JSON.stringify(raw)}`,
    );
  }
  return Number(raw);
}

function parseCount(flag: string, raw: string | undefined, min: number): number | undefined {
  if (raw === undefined) return undefined;
  if (!/^\d+$/.test(raw) || !Number.isSafeInteger(Number(raw)) || Number(raw) < min) {
    throw new UsageError(
      `--${flag} must be ${min === 0 ? "a non-negative" : "a positive"} integer: current value is ${
        JSON.stringify(raw)
      }`,
    );
  }
  return Number(raw);
}

/** The line on stderr about a capture not in `time_us` order, served in `order`. */
function outOfOrderNote(
  file: string,
  outOfOrder: number,
  total: number,
  order: "time" | "file" | "v2",
): string {
  const how = {
    time:
      "serving it sorted by time_us, as the legacy server's store holds events (equal time_us keep their file order)",
    file:
      "serving it in file order as --file-order asks, time_us going backwards as no healthy legacy server's does",
    v2:
      "the v2 server serves it in file order, which its seqs follow, with time_us as display times that may go backwards",
  }[order];
  return `jetfill serve: '${file}' is not in time_us order (${outOfOrder} of ${total} events ${
    outOfOrder === 1 ? "follows" : "follow"
  } one with a later time_us); ${how}`;
}

/**
 * Runs `jetfill serve` with the arguments after the command name and resolves to the exit code
 * (0 after a clean shutdown on SIGINT, SIGTERM or SIGHUP). Bad flags or an unreadable capture throw a
 * `UsageError`.
 *
 * @example
 * ```ts ignore
 * import { serveCommand } from "./serve.ts";
 * const code = await serveCommand(["--file", "capture.ndjson", "--port", "6008"]);
 * ```
 */
export async function serveCommand(args: string[]): Promise<number> {
  // The shared parser: one line for a bad flag, `--port -1` checked as a value, a flag given twice refused.
  const parsed = parseFlags("serve", args, FLAGS);
  // The values of the flags that take one; the switches are read with on().
  const values = parsed as Record<string, string | undefined>;
  const on = (flag: string): boolean => parsed[flag] === true;
  if (on("help")) {
    console.log(asRun(HELP));
    return 0;
  }
  if (values.file === undefined || values.file === "") {
    throw new UsageError("--file is required: expected the path of an NDJSON capture");
  }
  const port = values.port === undefined ? 0 : parsePort(values.port);
  const hostname = values.hostname ?? "127.0.0.1";
  if (hostname === "") throw new UsageError("--hostname must not be empty");
  if (values["stall-connections"] !== undefined && values["stall-after"] === undefined) {
    throw new UsageError("--stall-connections needs --stall-after");
  }
  if (values["retry-after"] !== undefined && values["refuse-first"] === undefined) {
    throw new UsageError("--retry-after needs --refuse-first");
  }
  const faults: ServerFaults = {
    refuseFirst: parseCount("refuse-first", values["refuse-first"], 0),
    ...(values["retry-after"] === undefined
      ? {}
      : { retryAfter: parseCount("retry-after", values["retry-after"], 0) }),
    dropEvery: parseCount("drop-every", values["drop-every"], 1),
    stallAfter: parseCount("stall-after", values["stall-after"], 0),
    stallConnections: parseCount("stall-connections", values["stall-connections"], 0),
    garbageEvery: parseCount("garbage-every", values["garbage-every"], 1),
    fileOrder: on("file-order"),
  };
  const v2 = on("v2");
  for (const flag of ["seq-base", "early-replay-us", "v2-zstd-dictionary"] as const) {
    if (!v2 && values[flag] !== undefined) throw new UsageError(`--${flag} needs --v2`);
  }
  const seqBase = parseCount("seq-base", values["seq-base"], 0);
  const lookbackFloorSeq = parseCount("lookback-floor-seq", values["lookback-floor-seq"], 1);
  const historyStartUs = parseCount("history-start-us", values["history-start-us"], 0);
  const earlyReplayUs = parseCount("early-replay-us", values["early-replay-us"], 0);
  const errorEvents = parseCount("error-after", values["error-after"], 0);
  const errorName = values["error-name"] ?? "ConsumerTooSlow";
  if (errorName !== "ConsumerTooSlow" && errorName !== "InternalError") {
    throw new UsageError(
      `--error-name must be ConsumerTooSlow or InternalError: current value is ${JSON.stringify(errorName)}`,
    );
  }
  if (values["error-name"] !== undefined && errorEvents === undefined) {
    throw new UsageError("--error-name needs --error-after");
  }
  const errorAfter: ErrorAfter | undefined = errorEvents === undefined
    ? undefined
    : { events: errorEvents, error: errorName };

  // The dictionaries first: a capture can take a while to load, and a mistyped path is cheap to tell.
  let compressor: ((text: string) => Uint8Array) | undefined;
  if (values["zstd-dictionary"] !== undefined) {
    const dictionary = await resolveZstdDictionary({ dictionary: values["zstd-dictionary"] });
    const encoder = await createZstdEncoder(dictionary.bytes);
    const utf8 = new TextEncoder();
    // The server caches each event's frame, so the copy out of the encoder happens once per event.
    compressor = (text) => encoder.encode(utf8.encode(text)).slice();
  }

  let v2Dictionary: Uint8Array | undefined;
  let v2Compressor: ((text: string) => Uint8Array) | undefined;
  const v2Path = values["v2-zstd-dictionary"];
  if (v2Path !== undefined) {
    try {
      v2Dictionary = await Deno.readFile(v2Path);
      dictionaryIdOf(v2Dictionary);
    } catch (err) {
      throw new UsageError(
        `--v2-zstd-dictionary ${JSON.stringify(v2Path)} is not a readable zstd dictionary (${
          (err as Error).message
        })`,
        { cause: err },
      );
    }
    const encoder = await createZstdEncoder(v2Dictionary, 1);
    const utf8 = new TextEncoder();
    v2Compressor = (text) => encoder.encode(utf8.encode(text)).slice();
  }

  let events;
  try {
    events = await loadCapture(values.file);
  } catch (err) {
    if (isNothingThere(err)) {
      throw new UsageError(`--file ${JSON.stringify(values.file)} does not exist`, { cause: err });
    }
    if (
      err instanceof Deno.errors.PermissionDenied || err instanceof Deno.errors.IsADirectory ||
      err instanceof Deno.errors.NotCapable
    ) {
      throw new UsageError(
        `--file ${JSON.stringify(values.file)} cannot be read: ${(err as Error).message}`,
        {
          cause: err,
        },
      );
    }
    // A malformed line: the message names the file, the line and the problem.
    throw new UsageError(`--file is not a valid capture: ${(err as Error).message}`, {
      cause: err,
    });
  }
  // Served all the same (a live stream with nothing yet), but most likely not the capture meant.
  if (events.length === 0) {
    console.error(`jetfill serve: '${values.file}' holds no events: every connection gets none`);
  }
  // serveJetstream() sorts for the legacy server (without --file-order); this only tells the user,
  // who may expect the capture played in file order, or not know that the file is out of order.
  const outOfOrder = countOutOfOrder(events);
  if (outOfOrder > 0) {
    console.error(
      outOfOrderNote(values.file, outOfOrder, events.length, v2 ? "v2" : faults.fileOrder ? "file" : "time"),
    );
  }

  const controller = new AbortController();
  let server;
  try {
    server = serveJetstream({
      events,
      hostname,
      port,
      closeAtEnd: on("close-at-end"),
      compressor,
      faults,
      version: v2 ? "v2" : "legacy",
      seqBase,
      lookbackFloorSeq,
      historyStartUs,
      earlyReplayUs,
      v2Compressor,
      v2Dictionary,
      errorAfter,
      signal: controller.signal,
    });
  } catch (err) {
    // A port another process holds is a runtime failure (exit 1); an address this machine does
    // not have, or a name that does not resolve, is bad input (exit 2).
    if (err instanceof Deno.errors.AddrInUse) {
      throw new Error(
        `Cannot serve on ${hostname}:${port}: the port is in use (${
          (err as Error).message
        }); choose another --port, or --port 0 for any free one`,
        { cause: err },
      );
    }
    if (err instanceof UsageError) throw err;
    // Anything else the listener refuses is the address given: one this machine does not have, a
    // --hostname that does not resolve, a port it may not use; or Deno's permissions (no
    // --allow-net), which say what to do themselves.
    throw new UsageError(
      `Cannot serve on ${hostname}:${port}: ${(err as Error).message}${
        err instanceof Deno.errors.NotCapable ? "" : " (see --hostname and --port)"
      }`,
      { cause: err },
    );
  }
  // Listening for the stop signals before saying so: a supervisor that sends SIGTERM as soon as it
  // reads the line must get a clean stop (exit 0), not Deno's default 143.
  const removeSignals = onStopSignals(() => controller.abort());
  try {
    // One line; on a v2 server it names the v2 wire too.
    console.log(`listening on ${server.url}${v2 ? ` and ${server.v2Url}` : ""}`);
    await new Promise<void>((resolve) =>
      controller.signal.addEventListener("abort", () => resolve(), { once: true })
    );
    await server.shutdown();
  } finally {
    removeSignals();
  }
  return 0;
}
