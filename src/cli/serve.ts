/**
 * `jetfill serve`: serve a capture file as a legacy Jetstream `/subscribe` endpoint, for demos,
 * tests and benchmarks without the internet.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { UsageError } from "../errors.ts";
import { loadCapture } from "../server/capture.ts";
import { serveJetstream } from "../server/server.ts";
import type { ServerFaults } from "../server/faults.ts";
import { resolveZstdDictionary } from "../jetstream/dictionary.ts";
import { createZstdEncoder } from "../jetstream/zstd.ts";

const HELP = `Usage: jetfill serve --file <capture.ndjson> [options]

Serve a capture (NDJSON, one legacy-wire Jetstream event per line) on ws://HOST:PORT/subscribe with
the legacy server's query parameters (wantedCollections, wantedDids, cursor, maxMessageSizeBytes,
requireHello). A connection without a cursor gets the capture from its start, as if it were live.

Options:
  --file <path>       capture file to serve (required)
  --port <n>          port to listen on, 0 for any free port (default: 0)
  --hostname <host>   interface to listen on (default: 127.0.0.1)
  --close-at-end      close each connection (code 1000) once its events are sent
  --zstd-dictionary <path>
                      serve compress=true connections with zstd frames made with this
                      dictionary (without it such requests get HTTP 400)
  -h, --help          show this help

Faults (all off by default, all deterministic):
  --refuse-first <k>  answer the first k subscription requests with HTTP 503
                      "service not ready: bootstrap in progress"
  --drop-every <n>    drop every connection without a close frame (1006) after its n-th event
  --stall-after <n>   after its n-th event (0: at once), a connection goes quiet but stays open
  --stall-connections <m>
                      how many connections stall, the first m (default: 1)
  --garbage-every <n> after every n events, send one bad frame (malformed JSON, binary junk,
                      unknown kind, missing time_us, ~2 MiB), cycling through the kinds

Prints one line, "listening on ws://HOST:PORT/subscribe", once ready; runs until SIGINT or SIGTERM.`;

function parsePort(raw: string): number {
  if (!/^\d+$/.test(raw) || Number(raw) > 65535) {
    throw new UsageError(
      `Cannot serve as '--port' must be an integer from 0 to 65535: current value is '${raw}'`,
    );
  }
  return Number(raw);
}

function parseCount(flag: string, raw: string | undefined, min: number): number | undefined {
  if (raw === undefined) return undefined;
  if (!/^\d+$/.test(raw) || !Number.isSafeInteger(Number(raw)) || Number(raw) < min) {
    throw new UsageError(
      `Cannot serve as '--${flag}' must be ${
        min === 0 ? "a non-negative" : "a positive"
      } integer: current value is '${raw}'`,
    );
  }
  return Number(raw);
}

function urlHost(hostname: string): string {
  return hostname.includes(":") ? `[${hostname}]` : hostname;
}

/**
 * Runs `jetfill serve` with the arguments after the command name and resolves to the exit code
 * (0 after a clean shutdown on SIGINT or SIGTERM). Bad flags or an unreadable capture throw a
 * `UsageError`.
 *
 * @example
 * ```ts ignore
 * import { serveCommand } from "./serve.ts";
 * const code = await serveCommand(["--file", "capture.ndjson", "--port", "6008"]);
 * ```
 */
export async function serveCommand(args: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        file: { type: "string" },
        port: { type: "string" },
        hostname: { type: "string" },
        "close-at-end": { type: "boolean" },
        "zstd-dictionary": { type: "string" },
        "refuse-first": { type: "string" },
        "drop-every": { type: "string" },
        "stall-after": { type: "string" },
        "stall-connections": { type: "string" },
        "garbage-every": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    throw new UsageError(`${(err as Error).message}; see 'jetfill serve --help'`);
  }
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  if (values.file === undefined || values.file === "") {
    throw new UsageError("Cannot serve as '--file' is required: expected the path of an NDJSON capture");
  }
  const port = values.port === undefined ? 0 : parsePort(values.port);
  const hostname = values.hostname ?? "127.0.0.1";
  if (hostname === "") throw new UsageError("Cannot serve as '--hostname' must not be empty");
  const faults: ServerFaults = {
    refuseFirst: parseCount("refuse-first", values["refuse-first"], 0),
    dropEvery: parseCount("drop-every", values["drop-every"], 1),
    stallAfter: parseCount("stall-after", values["stall-after"], 0),
    stallConnections: parseCount("stall-connections", values["stall-connections"], 0),
    garbageEvery: parseCount("garbage-every", values["garbage-every"], 1),
  };

  let events;
  try {
    events = await loadCapture(values.file);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new UsageError(`Cannot serve as '--file' does not exist: '${values.file}'`, { cause: err });
    }
    if (err instanceof Deno.errors.PermissionDenied || err instanceof Deno.errors.IsADirectory) {
      throw new UsageError(
        `Cannot serve as '--file' cannot be read: '${values.file}' (${(err as Error).message})`,
        {
          cause: err,
        },
      );
    }
    // A malformed line: the message names the file, the line and the problem.
    throw new UsageError(`Cannot serve as '--file' is not a valid capture: ${(err as Error).message}`, {
      cause: err,
    });
  }

  let compressor: ((text: string) => Uint8Array) | undefined;
  if (values["zstd-dictionary"] !== undefined) {
    const dictionary = await resolveZstdDictionary({ dictionary: values["zstd-dictionary"] });
    const encoder = await createZstdEncoder(dictionary.bytes);
    const utf8 = new TextEncoder();
    // The server caches each event's frame, so the copy out of the encoder happens once per event.
    compressor = (text) => encoder.encode(utf8.encode(text)).slice();
  }

  const controller = new AbortController();
  let server;
  try {
    server = serveJetstream({
      events,
      hostname,
      port,
      closeAtEnd: values["close-at-end"] ?? false,
      compressor,
      faults,
      signal: controller.signal,
    });
  } catch (err) {
    if (err instanceof Deno.errors.AddrInUse || err instanceof Deno.errors.AddrNotAvailable) {
      throw new UsageError(`Cannot serve on ${hostname}:${port}: ${(err as Error).message}`, { cause: err });
    }
    throw err;
  }
  console.log(`listening on ws://${urlHost(hostname)}:${server.port}/subscribe`);

  const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
  const stop = (): void => controller.abort();
  for (const name of signals) Deno.addSignalListener(name, stop);
  try {
    await new Promise<void>((resolve) =>
      controller.signal.addEventListener("abort", () => resolve(), { once: true })
    );
    await server.shutdown();
  } finally {
    for (const name of signals) Deno.removeSignalListener(name, stop);
  }
  return 0;
}
