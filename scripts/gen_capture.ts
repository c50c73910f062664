/**
 * Writes a synthetic Jetstream capture (NDJSON) for `jetfill serve`, tests and benchmarks.
 *
 * ```sh
 * deno run -A scripts/gen_capture.ts --out capture.ndjson [--count 100000] [--seed 1] \
 *   [--start-us 1770000000000000] [--step-us 1000]
 * ```
 *
 * Without `--start-us` the capture starts 48 hours ago, so it spans calendar days and stays inside a
 * replay window; without `--step-us` it ends an hour ago on average (the gaps are random).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { generateCapture } from "../src/server/synth.ts";

const HELP = `Usage: deno run -A scripts/gen_capture.ts --out FILE [options]

Options:
  --out <file>       where to write the NDJSON capture (required)
  --count <n>        number of events (default: 100000)
  --seed <n>         PRNG seed; the same seed and options give the same file (default: 1)
  --start-us <us>    time_us of the first event (default: now - 48 h)
  --step-us <us>     mean gap between events in microseconds (default: 47 h / count)
  --dids <n>         number of distinct accounts (default: 500)
  -h, --help         show this help`;

function integer(name: string, raw: string | undefined, min: number): number | undefined {
  if (raw === undefined) return undefined;
  const value = Number(raw);
  if (!/^-?\d+$/.test(raw) || !Number.isSafeInteger(value) || value < min) {
    throw new Error(`'--${name}' must be an integer >= ${min}: current value is '${raw}'`);
  }
  return value;
}

/** Parses the arguments, writes the file, returns the exit code. */
async function main(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      out: { type: "string" },
      count: { type: "string" },
      seed: { type: "string" },
      "start-us": { type: "string" },
      "step-us": { type: "string" },
      dids: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  if (!values.out) throw new Error("'--out' is required: expected the path of the file to write");
  const count = integer("count", values.count, 0) ?? 100_000;
  const lines = generateCapture({
    count,
    seed: integer("seed", values.seed, -(2 ** 31)),
    startUs: integer("start-us", values["start-us"], 0),
    stepUs: integer("step-us", values["step-us"], 1),
    dids: integer("dids", values.dids, 1),
  });
  // Write in slices: a single string of the whole file could exceed V8's maximum string length.
  using file = await Deno.open(values.out, { write: true, create: true, truncate: true });
  const encoder = new TextEncoder();
  let bytes = 0;
  for (let i = 0; i < lines.length; i += 10_000) {
    const chunk = encoder.encode(lines.slice(i, i + 10_000).join("\n") + "\n");
    bytes += chunk.length;
    let off = 0;
    while (off < chunk.length) off += await file.write(chunk.subarray(off));
  }
  console.error(`wrote ${count} events (${bytes} bytes) to ${values.out}`);
  return 0;
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (err) {
    console.error(`gen_capture: ${err instanceof Error ? err.message : String(err)}`);
    Deno.exit(2);
  }
}
