/**
 * Starts `jetfill serve` in a process of its own (as a real Jetstream would be) and reads its URL
 * from the first line it prints. Used by the demo, the benches and tests.
 *
 * @module
 */

/** A `jetfill serve` child process. */
export interface SpawnedServer {
  /** The `/subscribe` URL it listens on. */
  url: string;
  /** The whole first line it printed (a v2 server names its subscribeEvents URL there too). */
  banner: string;
  /** Stops it (SIGTERM), waits for it to exit and resolves to its exit code. */
  stop(): Promise<number>;
}

const CLI = new URL("../cli.ts", import.meta.url).pathname;

/**
 * Runs `jetfill serve` with `args` (for example `["--file", path, "--port", "0"]`) and resolves once
 * it listens.
 *
 * @example
 * ```ts ignore
 * import { spawnServer } from "./spawn_server.ts";
 * const server = await spawnServer(["--file", "capture.ndjson", "--port", "0"]);
 * console.log(server.url);
 * await server.stop();
 * ```
 */
export async function spawnServer(
  args: string[],
  options: { stderr?: "inherit" | "null" } = {},
): Promise<SpawnedServer> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI, "serve", ...args],
    stdout: "piped",
    stderr: options.stderr ?? "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let banner = "";
  while (!banner.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`jetfill serve exited before listening: ${banner}`);
    banner += value;
  }
  const url = /listening on (\S+)/.exec(banner)?.[1];
  if (!url) throw new Error(`unexpected banner from jetfill serve: ${banner}`);
  return {
    url,
    banner,
    stop: async () => {
      child.kill("SIGTERM");
      await reader.cancel();
      return (await child.status).code;
    },
  };
}
