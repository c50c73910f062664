/**
 * Flag parsing shared by the subcommands, on `node:util` `parseArgs`, with errors that name the
 * flag, the value and what was expected.
 *
 * @module
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "../errors.ts";
import { defaultKvPath } from "../queue/kv_queue.ts";

/** Flag definitions in `parseArgs` form. */
export type FlagSpec = NonNullable<ParseArgsConfig["options"]>;

/** Parses `args` against `spec`; unknown flags and stray arguments are usage errors. */
export function parseFlags(command: string, args: string[], spec: FlagSpec): Record<string, unknown> {
  try {
    const { values } = parseArgs({ args, options: spec, strict: true, allowPositionals: false });
    return values as Record<string, unknown>;
  } catch (err) {
    // parseArgs explains some errors over several lines; the CLI promises one.
    const msg = (err as Error).message.replace(/\. To specify a positional argument.*$/s, "").replace(
      /\s*\n\s*/g,
      " ",
    );
    throw new UsageError(`${msg} (see 'jetfill ${command} --help')`);
  }
}

/** The queue (`--queue-name`, default `jetstream_sync`) and its database (`--kv`, default by queue). */
export function queueFlags(v: Record<string, unknown>): { queue: string; path: string } {
  const queue = (v["queue-name"] as string | undefined) ?? "jetstream_sync";
  if (queue === "") throw new UsageError("--queue-name must not be empty");
  return { queue, path: (v.kv as string | undefined) ?? defaultKvPath(queue) };
}

/** A number flag: integer or not, with a lower bound. */
export function numberFlag(
  flag: string,
  value: unknown,
  rule: { integer?: boolean; min?: number; positive?: boolean } = {},
): number | undefined {
  if (value === undefined) return undefined;
  const text = String(value);
  const n = Number(text);
  const expected = rule.integer
    ? rule.positive ? "a positive integer" : `an integer of at least ${rule.min ?? 0}`
    : rule.positive
    ? "a positive number"
    : "a number";
  const ok = text.trim() !== "" && Number.isFinite(n) && (!rule.integer || Number.isSafeInteger(n)) &&
    (!rule.positive || n > 0) && (rule.min === undefined || n >= rule.min);
  if (!ok) throw new UsageError(`--${flag} must be ${expected}: current value is ${JSON.stringify(text)}`);
  return n;
}

/** Reads a list file: one entry a line, blank lines and `#` comments skipped. */
export async function readListFile(flag: string, path: string): Promise<string[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw new UsageError(`--${flag} ${JSON.stringify(path)} cannot be read: ${(err as Error).message}`);
  }
  return text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== "" && !l.startsWith("#"));
}
