/** Frames made by the real `zstd` command-line tool, in one run for many events. */

/**
 * Compresses each text as its own frame with `zstd -D dict`, like Jetstream does per event.
 * `noContentSize` makes frames without the content-size field, `noDictId` without the dictionary's ID.
 */
export async function zstdFrames(
  texts: string[],
  dict: string,
  noContentSize = false,
  noDictId = false,
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
      ...(noDictId ? ["--no-dictID"] : []),
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
