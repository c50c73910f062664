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
 * import { UsageError } from "./errors.ts";
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
