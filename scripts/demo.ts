/**
 * `deno task demo`: generates a synthetic capture (made-up accounts, no real data), serves it as a
 * Jetstream `/subscribe` endpoint on loopback and runs `jetfill sync` against it, printing the
 * statistics. Everything stays on this machine.
 *
 * @module
 */
import { generateCapture } from "../src/server/synth.ts";
import { isoFromUs } from "../src/time.ts";
import { spawnServer } from "./spawn_server.ts";
import { programName } from "../src/cli/program.ts";

// How the user runs the CLI: `deno run -A cli.ts`, or through npx when Deno is not installed.
const cli = programName(Deno.execPath(), new URL("../cli.ts", import.meta.url).href);

if (Deno.args.length > 0) {
  const help = Deno.args.every((a) => a === "-h" || a === "--help");
  (help ? console.log : console.error)(
    `Usage: ${cli.slice(0, cli.indexOf(" run -A "))} task demo

Generates 40,000 synthetic events (made-up accounts) into ./jetfill-data/demo-capture.ndjson, serves
them on a free loopback port with 'jetfill serve', syncs them into ./jetfill-data/demo.sqlite with
'jetfill sync' and prints the statistics. It takes no options; see '${cli} --help'.`,
  );
  Deno.exit(help ? 0 : 2);
}

const HOUR_US = 3_600_000_000;
const dir = "./jetfill-data";
const capture = `${dir}/demo-capture.ndjson`;
const kvPath = `${dir}/demo.sqlite`;
await Deno.mkdir(dir, { recursive: true });

// Two days of synthetic firehose, ending an hour ago, 40,000 events.
const startUs = Date.now() * 1000 - 49 * HOUR_US;
const lines = generateCapture({ count: 40_000, seed: 7, startUs, stepUs: (48 * HOUR_US) / 40_000 });
await Deno.writeTextFile(capture, lines.join("\n") + "\n");
console.log(`wrote ${lines.length} synthetic events to ${capture}`);

const self = new URL("../cli.ts", import.meta.url).pathname;

// The server runs in its own process, as a real Jetstream would.
const server = await spawnServer(["--file", capture, "--port", "0"]);
const url = server.url;
console.log(`serving it at ${url}`);

// A window of one day that starts 6 hours into the capture: posts and likes, at most 20,000.
const start = isoFromUs(startUs + 6 * HOUR_US).replace(/\.\d+Z$/, "Z");
const end = isoFromUs(startUs + 30 * HOUR_US).replace(/\.\d+Z$/, "Z");
// A fresh queue each time (with what SQLite keeps beside the database).
for (const path of [kvPath, `${kvPath}-wal`, `${kvPath}-shm`]) await Deno.remove(path).catch(() => {});
const args = [
  "run",
  "-A",
  self,
  "sync",
  "--instance",
  url,
  "--collection",
  "app.bsky.feed.post",
  "--collection",
  "app.bsky.feed.like",
  "--start",
  start,
  "--end",
  end,
  "--limit",
  "20000",
  "--kv",
  kvPath,
  "--queue-name",
  "demo",
];
console.log(`\n$ ${cli} sync ${args.slice(4).join(" ")}\n`);
const sync = await new Deno.Command(Deno.execPath(), { args, stdout: "inherit", stderr: "inherit" }).output();
await server.stop();
console.log(
  `\nThe queue is in ${kvPath}; see it with: ${cli} status --kv ${kvPath} --queue-name demo\nand read it out (export takes each message off the queue as it writes it) with: ${cli} export --kv ${kvPath} --queue-name demo`,
);
Deno.exit(sync.code);
