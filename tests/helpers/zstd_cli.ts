/** Frames made by the real `zstd` command-line tool, in one run for many events. */
import { fileURLToPath } from "node:url";

/**
 * Where the tests find Jetstream's zstd dictionaries, which this repository does not include:
 * `$JETFILL_TEST_DICTIONARIES`, else `../shared/jetstream/` beside the checkout.
 */
const DICTIONARIES = Deno.env.get("JETFILL_TEST_DICTIONARIES") ??
  fileURLToPath(new URL("../../../shared/jetstream/", import.meta.url));

/** The path of dictionary `name`, or an error that says where to put it. */
function dictionary(name: string): string {
  const path = `${DICTIONARIES.replace(/\/$/, "")}/${name}`;
  try {
    Deno.statSync(path);
  } catch {
    throw new Error(
      `the tests need Jetstream's zstd dictionary ${name}, which this repository does not include: copy it ` +
        `(from github.com/bluesky-social/jetstream, internal/subscribe/dictionaries/) to ${path}, or set ` +
        "JETFILL_TEST_DICTIONARIES to the folder that holds it",
    );
  }
  return path;
}

/** The legacy dictionary (`/subscribe`), sha256 b8d77b46…. */
export const LEGACY_DICT: string = dictionary("legacy_subscribe.zdict");
/** The v2 dictionary (`subscribeEvents`). */
export const V2_DICT: string = dictionary("subscribe_events_20260811.zdict");

/**
 * Compresses each text as its own frame with `zstd -D dict`, like Jetstream does per event.
 * `noContentSize` makes frames without the content-size field.
 */
export async function zstdFrames(
  texts: string[],
  dict: string,
  noContentSize = false,
): Promise<Uint8Array[]> {
  const dir = await Deno.makeTempDir({ prefix: "jetfill-zstd-" });
  try {
    const names = texts.map((_, i) => `${dir}/in/${String(i).padStart(6, "0")}.json`);
    await Deno.mkdir(`${dir}/in`);
    await Deno.mkdir(`${dir}/out`);
    await Promise.all(texts.map((t, i) => Deno.writeTextFile(names[i], t)));
    const args = [
      "-q",
      "-D",
      dict,
      "--output-dir-flat",
      `${dir}/out`,
      ...(noContentSize ? ["--no-content-size"] : []),
    ];
    const out = await new Deno.Command("zstd", { args: [...args, ...names], stderr: "piped" }).output();
    if (!out.success) throw new Error(`zstd failed: ${new TextDecoder().decode(out.stderr)}`);
    return await Promise.all(
      texts.map((_, i) => Deno.readFile(`${dir}/out/${String(i).padStart(6, "0")}.json.zst`)),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
