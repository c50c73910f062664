/**
 * How the user runs this command line, for usage lines and for the commands that messages suggest:
 * `jetfill` as a compiled binary, `deno run -A cli.ts` from a checkout.
 *
 * @module
 */
import { relative } from "node:path";
import { fileURLToPath } from "node:url";

/**
 * The command that runs this CLI: the binary's own name when it is `deno compile`d, else
 * `deno run -A` and the path of `cli.ts` from the working directory (`npx -y deno@VERSION run -A`
 * when npx runs this Deno, as the README's first commands do on a machine without it); `jetfill`
 * when none applies (the CLI's functions called from another program).
 *
 * @example
 * ```ts ignore
 * import { programName } from "./program.ts";
 * programName(); // "deno run -A cli.ts" in a checkout
 * ```
 */
export function programName(execPath: string = Deno.execPath(), main: string = Deno.mainModule): string {
  const exe = execPath.split(/[\\/]/).at(-1)!.replace(/\.exe$/i, "");
  if (exe !== "deno") return exe;
  // npx keeps the packages it fetches under its cache's _npx folder: Deno is not on the PATH then.
  const deno = /[\\/]_npx[\\/]/.test(execPath) ? `npx -y deno@${Deno.version.deno}` : "deno";
  if (!main.startsWith("file:") || !main.endsWith("/cli.ts")) return "jetfill";
  let path = fileURLToPath(main);
  try {
    path = relative(Deno.cwd(), path);
  } catch {
    // No working directory (removed, or not readable): the absolute path.
  }
  return `${deno} run -A ${/^[\w./@+-]+$/.test(path) ? path : JSON.stringify(path)}`;
}

/**
 * `text` with the commands it names (`jetfill <command> …`) spelled as this CLI is run (`program`).
 *
 * @example
 * ```ts
 * import { asRun } from "./program.ts";
 * asRun("Usage: jetfill sync [options]", "deno run -A cli.ts"); // "Usage: deno run -A cli.ts sync [options]"
 * ```
 */
export function asRun(text: string, program: string = programName()): string {
  if (program === "jetfill") return text;
  return text.replace(/(^|[\s'`(])jetfill (?=<command>|[a-z]+\b)/gm, (_, before) => `${before}${program} `);
}

/**
 * `n` and the noun, singular for one: `counted(1, "message")` is "1 message", `counted(2, "message")`
 * "2 messages".
 */
export function counted(n: number, noun: string, plural = `${noun}s`): string {
  return `${n} ${n === 1 ? noun : plural}`;
}

/**
 * A library message as the command line says it: the library names an option by its flag and its own
 * name ("--resume / resume: true", "--kv / kv"), for both audiences; a person at the command line
 * typed the flag, so the flag alone.
 *
 * @example
 * ```ts
 * import { flagsOnly } from "./program.ts";
 * flagsOnly("continue it with --resume / resume: true (see --kv / kv)"); // "continue it with --resume (see --kv)"
 * ```
 */
export function flagsOnly(message: string): string {
  // Not within a quoted value (a path, a server's text), which is the user's or the server's.
  // A single quote opens or closes a value only where no letter touches it on that side: one within a
  // word ("the server's") is an apostrophe.
  return message.split(/("(?:[^"\\]|\\.)*"|(?<!\w)'[^']*'(?!\w))/).map((part, i) =>
    i % 2 === 1 ? part : part.replace(/(--[a-z][\w-]*) \/ [a-z]\w*(?:: true)?(?![\w/:-]|\.\w)/g, "$1")
  ).join("");
}
