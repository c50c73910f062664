/**
 * Error classes shared by the library and the CLI.
 *
 * @module
 */

/**
 * Bad input from the user: an option value, a flag or a file that cannot be used as given.
 * The CLI prints its message alone and exits 2.
 *
 * @example
 * ```ts
 * import { UsageError } from "@jetfill/jetfill";
 * throw new UsageError("Cannot sync as 'batchSize' must be a positive integer: current value is 0");
 * ```
 */
export class UsageError extends Error {
  /** Creates the error with a message that names the value and what was expected. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "UsageError";
  }
}

/**
 * An error's message with its cause's, when the message alone does not say it: `fetch` throws
 * "fetch failed" and gives the reason (a refused connection, a DNS failure) only as its cause.
 *
 * @example
 * ```ts
 * import { messageWithCause } from "./errors.ts";
 * messageWithCause(new TypeError("fetch failed", { cause: new Error("Connection refused") }));
 * // "fetch failed (Connection refused)"
 * ```
 */
export function messageWithCause(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause instanceof Error ? error.cause.message : undefined;
  return cause && !error.message.includes(cause) ? `${error.message} (${cause})` : error.message;
}

/**
 * A value as an error message shows it: strings quoted, arrays by length, others as JSON.
 *
 * @example
 * ```ts
 * import { show } from "./errors.ts";
 * show("7440"); // "\"7440\""
 * show(7440); // "7440"
 * show(new URL("file:///tmp/q.sqlite")); // "URL(\"file:///tmp/q.sqlite\")"
 * ```
 */
export function show(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "bigint") return `${value}n`;
  // JSON would spell NaN and Infinity as null.
  if (typeof value === "number") return String(value);
  if (value instanceof Date) return `Date(${value.toString()})`;
  // (JSON would spell it as its text, as if a string had been given.)
  if (value instanceof URL) return `URL(${JSON.stringify(value.href)})`;
  if (Array.isArray(value)) return `an array of ${value.length}`;
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}
