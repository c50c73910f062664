/**
 * The CLI in a process of its own, as a user runs it (`deno run -A cli.ts …`), and the waits on and
 * signals to child processes by which no test hangs on one, or fails for the wrong reason.
 */

/** The path of the project's `cli.ts`. */
export const CLI: string = new URL("../../cli.ts", import.meta.url).pathname;

/** The arguments of `jetfill sync` from `startUs` on `url` into the database at `kv`, then `more`. */
export function syncArgs(url: string, kv: string, startUs: number, ...more: string[]): string[] {
  return ["sync", "--instance", url, "--kv", kv, "--start", String(startUs), ...more];
}

/**
 * Starts the CLI with `args` (and Deno's own `flags`, such as permissions), its output piped, with
 * `env` on top of this process's environment. Deno's own check for a newer release is off: it would
 * open a connection of its own (to dl.deno.land, through any proxy the test sets) that is not the CLI's.
 */
export function spawnCli(
  args: string[],
  flags: string[] = [],
  env: Record<string, string> = {},
): Deno.ChildProcess {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ...flags, CLI, ...args],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1", ...env },
  }).spawn();
}

/**
 * Runs the CLI with `args` to its end, as {@link runCli} does, in a process that file modes bind: as
 * it is when this one is not root; as root, through util-linux's `setpriv` without the capabilities
 * by which root passes over modes (still uid 0, so it reads Deno's cache as before).
 */
export async function runCliUnprivileged(
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  if (Deno.uid() !== 0) return await runCli(args);
  const out = await new Deno.Command("setpriv", {
    args: [
      "--bounding-set=-dac_override,-dac_read_search,-fowner",
      Deno.execPath(),
      "run",
      "-A",
      CLI,
      ...args,
    ],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
  }).output().catch((err) => {
    throw new Error(`this test needs setpriv (util-linux) when it runs as root: ${err}`);
  });
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Runs the CLI with `args` to its end: its exit code and its output, decoded. */
export async function runCli(
  args: string[],
  flags: string[] = [],
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await spawnCli(args, flags, env).output();
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

/**
 * Sends `signal` to `child` if it still runs: false when it had ended already. Deno's `kill()`
 * throws "Child process has already terminated" (a TypeError) as soon as Deno has seen the exit,
 * which may be before the test's own look at `child.status`; a child that ended on its own then
 * shows how in the exit code and stderr that the caller checks next, not as that TypeError.
 */
export function killIfRunning(child: Deno.ChildProcess, signal: Deno.Signal = "SIGTERM"): boolean {
  try {
    child.kill(signal);
    return true;
  } catch (err) {
    if (err instanceof TypeError) return false;
    throw err;
  }
}

/**
 * The exit status of `child`, which is expected to end by itself within `ms`; past that it is
 * killed (SIGKILL) and this throws, saying what the child was doing (`what`), instead of waiting
 * for ever.
 */
export async function statusWithin(
  child: Deno.ChildProcess,
  ms: number,
  what: string,
): Promise<Deno.CommandStatus> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms));
  try {
    const status = await Promise.race([child.status, expired]);
    if (status) return status;
  } finally {
    clearTimeout(timer);
  }
  killIfRunning(child, "SIGKILL");
  await child.status;
  throw new Error(`the child process did not end within ${ms / 1000} s (killed): ${what}`);
}
