/**
 * Flag parsing shared by the subcommands, on `node:util` `parseArgs`, with errors that name the
 * flag, the value and what was expected.
 *
 * @module
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "../errors.ts";
import { defaultKvPath, localDatabasePath } from "../queue/kv_queue.ts";
import { QUEUE_NAME, QUEUE_NAME_RULE } from "../options.ts";
import { programName } from "./program.ts";

/** Flag definitions in `parseArgs` form. */
export type FlagSpec = NonNullable<ParseArgsConfig["options"]>;

/** Parses `args` against `spec`; unknown flags and stray arguments are usage errors. */
export function parseFlags(command: string, args: string[], spec: FlagSpec): Record<string, unknown> {
  let parsed;
  try {
    parsed = parseArgs({
      args: attachNegatives(args, spec),
      options: spec,
      strict: true,
      allowPositionals: false,
      tokens: true,
    });
  } catch (err) {
    // parseArgs explains some errors over several lines; the CLI promises one.
    const msg = (err as Error).message.replace(/\. To specify a positional argument.*$/s, "").replace(
      /\s*\n\s*/g,
      " ",
    );
    throw new UsageError(`${msg} (see '${programName()} ${command} --help')`);
  }
  // parseArgs keeps the last of a flag given twice; a second --start is more likely a slip than a
  // change of mind, so say so rather than drop the first silently.
  const seen = new Set<string>();
  for (const token of parsed.tokens ?? []) {
    // A switch given twice (--json --json) says the same thing twice: nothing to choose between.
    if (token.kind !== "option" || spec[token.name]?.multiple || spec[token.name]?.type === "boolean") {
      continue;
    }
    if (seen.has(token.name)) {
      throw new UsageError(
        `--${token.name} is given more than once; it takes one value (see '${programName()} ${command} --help')`,
      );
    }
    seen.add(token.name);
  }
  return parsed.values as Record<string, unknown>;
}

/**
 * `--limit -5` as `--limit=-5`: `parseArgs` takes a value that starts with a dash for a flag and
 * reports it as ambiguous, while the value's own check says what was expected.
 */
function attachNegatives(args: string[], spec: FlagSpec): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const name = args[i].startsWith("--") ? args[i].slice(2) : undefined;
    const next = args[i + 1];
    if (name && spec[name]?.type === "string" && next !== undefined && /^-[\d.]/.test(next)) {
      out.push(`${args[i]}=${next}`);
      i++;
    } else {
      out.push(args[i]);
    }
  }
  return out;
}

/**
 * A `--kv` value as given, refusing `:memory:`: Deno KV's in-memory database is gone when the command
 * ends, with what a sync stored in it (the library takes one, as a `Deno.Kv` a program keeps open).
 */
export function kvFlag(flag: string, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  const path = String(value);
  if (path === ":memory:") {
    throw new UsageError(
      `--${flag} must be a database file: current value is ":memory:", a database in memory that is gone when the command ends`,
    );
  }
  // Deno.openKv would take a URL as a remote database (KV Connect), over the network.
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(path) && !/^file:/i.test(path)) {
    throw new UsageError(
      `--${flag} must be a database file's path or a file: URL: current value is ${
        JSON.stringify(path)
      }, a remote database, which the command line does not open (from code, open it with Deno.openKv and pass that Deno.Kv as kv)`,
    );
  }
  return path;
}

/** The queue (`--queue-name`, default `jetstream_sync`) and its database (`--kv`, default by queue). */
export function queueFlags(v: Record<string, unknown>): { queue: string; path: string } {
  const queue = (v["queue-name"] as string | undefined) ?? "jetstream_sync";
  if (!QUEUE_NAME.test(queue)) {
    throw new UsageError(
      `--queue-name must be ${QUEUE_NAME_RULE}: current value is ${JSON.stringify(queue)}`,
    );
  }
  const given = kvFlag("kv", v.kv) ?? defaultKvPath(queue);
  // A file: URL names a file like its path does (Deno.openKv takes both).
  return { queue, path: localDatabasePath(given) ?? given };
}

/** A number flag: integer or not, with a lower bound. */
export function numberFlag(
  flag: string,
  value: unknown,
  rule: { integer?: boolean; min?: number; positive?: boolean } = {},
): number | undefined {
  if (value === undefined) return undefined;
  const text = String(value);
  // Plain decimal only: Number() would also take "0x10", "0b11", "1e1" and " 5 ".
  const n = /^(\d+(\.\d*)?|\.\d+)$/.test(text) ? Number(text) : NaN;
  const expected = rule.integer
    ? `${rule.positive ? "a positive integer" : `an integer of at least ${rule.min ?? 0}`}${
      Number.isFinite(n) && Number.isInteger(n) && !Number.isSafeInteger(n)
        ? ` up to ${Number.MAX_SAFE_INTEGER}`
        : ""
    }`
    : rule.positive
    ? "a positive number"
    : "a number";
  // "1e1" and "Infinity" are numbers too, but not written as this flag takes them.
  const written = text !== "" && !/^-?(\d+(\.\d*)?|\.\d+)$/.test(text)
    ? ` written in decimal digits (such as ${rule.integer ? "5000" : "90 or 2.5"})`
    : "";
  const ok = Number.isFinite(n) && (!rule.integer || Number.isSafeInteger(n)) &&
    (!rule.positive || n > 0) && (rule.min === undefined || n >= rule.min);
  if (!ok) {
    throw new UsageError(`--${flag} must be ${expected}${written}: current value is ${JSON.stringify(text)}`);
  }
  return n;
}

/** Reads a list file: one entry a line, blank lines and `#` comments skipped. */
export async function readListFile(flag: string, path: string): Promise<{ line: number; value: string }[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw new UsageError(`--${flag} ${JSON.stringify(path)} cannot be read: ${(err as Error).message}`);
  }
  // Any line ending (\r alone too); a # starts a comment wherever it is (no DID holds one).
  return text.split(/\r\n|\r|\n/)
    .map((l, i) => ({ line: i + 1, value: l.replace(/#.*$/, "").trim() }))
    .filter((l) => l.value !== "");
}

/**
 * Calls `stop` with the signal's name on the signals that ask a command to stop: Ctrl-C (SIGINT)
 * everywhere, and on other systems than Windows SIGTERM (`kill`, service managers) and SIGHUP (the
 * terminal closed). Returns a function that removes the listeners.
 *
 * @example
 * ```ts ignore
 * import { onStopSignals } from "./args.ts";
 * const controller = new AbortController();
 * const remove = onStopSignals(() => controller.abort());
 * remove();
 * ```
 */
export function onStopSignals(stop: (signal: StopSignal) => void): () => void {
  const signals: StopSignal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM", "SIGHUP"];
  const listeners = signals.map((name) => [name, () => stop(name)] as const);
  for (const [name, listener] of listeners) Deno.addSignalListener(name, listener);
  return () => {
    for (const [name, listener] of listeners) Deno.removeSignalListener(name, listener);
  };
}

/** The signals that {@link onStopSignals} listens to. */
export type StopSignal = "SIGINT" | "SIGTERM" | "SIGHUP";

/**
 * The exit code of a command stopped by `signal` after a clean stop, as shells report a process
 * that a signal ended: 128 plus its number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).
 */
export function interruptedExitCode(signal: StopSignal): number {
  return 128 + { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 }[signal];
}
