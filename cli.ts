/**
 * The `jetfill` command line: `deno run -A cli.ts <command> [options]`.
 *
 * @module
 */
import { UsageError } from "./src/errors.ts";
import { flagsOnly, programName } from "./src/cli/program.ts";

type Command = (args: string[]) => Promise<number>;

const COMMANDS: Record<string, { summary: string; load: () => Promise<Command> }> = {
  sync: {
    summary: "copy events from Jetstream into a Deno KV queue",
    load: async () => (await import("./src/cli/sync.ts")).syncCommand,
  },
  serve: {
    summary: "serve a capture file as a Jetstream-compatible /subscribe endpoint",
    load: async () => (await import("./src/cli/serve.ts")).serveCommand,
  },
  export: {
    summary: "write a queue's events as NDJSON (consumes the queue)",
    load: async () => (await import("./src/cli/export.ts")).exportCommand,
  },
  status: {
    summary: "show a queue's checkpoint, counts, dead letters and last run",
    load: async () => (await import("./src/cli/status.ts")).statusCommand,
  },
};

function usage(): string {
  const lines = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(8)} ${c.summary}`);
  const program = programName();
  return [
    `Usage: ${program} <command> [options]`,
    "",
    "Commands:",
    ...lines,
    "",
    `Run '${program} <command> --help' (or '${program} help <command>') for the options of a command.`,
  ].join("\n");
}

/**
 * Runs the CLI with the given arguments and resolves to the process exit code:
 * 0 success, 1 runtime failure, 2 usage or validation error, 130 interrupted by Ctrl-C after a clean
 * flush (143 by SIGTERM, 129 by SIGHUP).
 *
 * @example
 * ```ts
 * import { main } from "./cli.ts";
 * const code = await main(["--help"]);
 * ```
 */
export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (name === undefined) {
    // Not what was asked for: the usage goes where errors go.
    console.error(usage());
    return 2;
  }
  if (name === "help" && rest.length > 0) {
    // `jetfill help sync` as `jetfill sync --help`.
    if (rest.length > 1) {
      console.error(`jetfill help: takes one command name, got ${rest.length}: ${rest.join(" ")}`);
      return 2;
    }
    return await main([rest[0], "--help"]);
  }
  if (name === "--help" || name === "-h" || name === "help") {
    console.log(usage());
    return 0;
  }
  const command = COMMANDS[name];
  if (!command) {
    console.error(`jetfill: unknown command '${name}': expected one of ${Object.keys(COMMANDS).join(", ")}`);
    return 2;
  }
  try {
    return await (await command.load())(rest);
  } catch (err) {
    // Deno's permissions refusing something is how the command was started: bad input too.
    if (err instanceof UsageError || err instanceof Deno.errors.NotCapable) {
      console.error(`jetfill ${name}: ${flagsOnly(err.message)}`);
      return 2;
    }
    console.error(`jetfill ${name}: ${flagsOnly(err instanceof Error ? err.message : String(err))}`);
    return 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
