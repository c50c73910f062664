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
    return envReadable(name) ? Deno.env.get(name) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Whether the env permission for `name` is granted already, so that {@linkcode readEnv} reads it.
 *
 * @example
 * ```ts
 * import { envReadable } from "./env.ts";
 * if (!envReadable("HOME")) console.error("HOME is not read without --allow-env");
 * ```
 */
export function envReadable(name: string): boolean {
  try {
    return Deno.permissions.querySync?.({ name: "env", variable: name }).state === "granted";
  } catch {
    return false;
  }
}
