/** The CLI in a process of its own, as a user runs it: `deno run -A cli.ts …`. */

/** The path of the project's `cli.ts`. */
export const CLI: string = new URL("../../cli.ts", import.meta.url).pathname;

/** The arguments of `jetfill sync` from `startUs` on `url` into the database at `kv`, then `more`. */
export function syncArgs(url: string, kv: string, startUs: number, ...more: string[]): string[] {
  return ["sync", "--instance", url, "--kv", kv, "--start", String(startUs), ...more];
}

/** Starts the CLI with `args` (and Deno's own `flags`, such as permissions), its output piped. */
export function spawnCli(args: string[], flags: string[] = []): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ...flags, CLI, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
}

/** Runs the CLI with `args` to its end: its exit code and its output, decoded. */
export async function runCli(
  args: string[],
  flags: string[] = [],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await spawnCli(args, flags).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/**
 * Polls `ready` every 50 ms until it holds while `child` runs; if the child ends first, throws with
 * its exit code and stderr instead of waiting for ever.
 */
export async function whileRunning(
  child: Deno.ChildProcess,
  ready: () => boolean | Promise<boolean>,
): Promise<void> {
  let ended = false;
  child.status.then(() => ended = true, () => ended = true);
  while (!(await ready())) {
    if (ended) {
      const out = await child.output();
      throw new Error(
        `the process ended (code ${out.code}) before it got there: ${new TextDecoder().decode(out.stderr)}`,
      );
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
