/**
 * Reading the environment without asking for it.
 *
 * @module
 */

/**
 * The environment variable `name`, or `undefined` when it is unset or the env permission for it is
 * not granted already: a library run without `--allow-env` goes on without it, rather than fail or
 * prompt the user for access.
 *
 * @example
 * ```ts
 * import { readEnv } from "./env.ts";
 * readEnv("HTTPS_PROXY"); // undefined unless set and allowed
 * ```
 */
export function readEnv(name: string): string | undefined {
  try {
    if (Deno.permissions.querySync?.({ name: "env", variable: name }).state !== "granted") return undefined;
    return Deno.env.get(name);
  } catch {
    return undefined;
  }
}
