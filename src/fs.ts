/**
 * Small file-system helpers.
 *
 * @module
 */

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
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}
