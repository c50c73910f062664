/**
 * Small file-system helpers.
 *
 * @module
 */

/**
 * Whether `err` says that nothing is at a path: not found, or a file where a folder of the path
 * should be (`notes.txt/q.sqlite`).
 *
 * @example
 * ```ts
 * import { isNothingThere } from "./fs.ts";
 * await Deno.stat("./no/such/file").catch((err) => isNothingThere(err)); // true
 * ```
 */
export function isNothingThere(err: unknown): boolean {
  return err instanceof Deno.errors.NotFound || err instanceof Deno.errors.NotADirectory;
}

/**
 * Whether something exists at `path` (a file, a folder, or a link to one); errors other than "not
 * found", such as a denied permission, go through.
 *
 * @example
 * ```ts
 * import { pathExists } from "./fs.ts";
 * await pathExists("./deno.json"); // true in the project's folder
 * ```
 */
export async function pathExists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (err) {
    if (isNothingThere(err)) return false;
    throw err;
  }
}

/**
 * Whether a database may be at `path`: something exists there other than an empty file, which
 * Deno KV would make into a new database. Errors other than "not found" go through.
 *
 * @example
 * ```ts
 * import { databaseExists } from "./fs.ts";
 * await databaseExists("./jetfill-data/jetstream_sync.sqlite"); // false before the first sync
 * ```
 */
export async function databaseExists(path: string): Promise<boolean> {
  try {
    const info = await Deno.stat(path);
    return !info.isFile || info.size > 0;
  } catch (err) {
    if (isNothingThere(err)) return false;
    throw err;
  }
}
