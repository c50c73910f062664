/**
 * Jetstream's zstd dictionaries, which this repository does not include, read when a test first asks:
 * a test file loads without them, and each test that needs one fails saying where it looked.
 */
import { fileURLToPath } from "node:url";

/** A Jetstream zstd dictionary the tests use. */
export interface TestDictionary {
  /** Its file. */
  path: string;
  /** Its contents, read once per test file and shared by that file's tests. */
  bytes: Uint8Array<ArrayBuffer>;
}

const FOLDER_ENV = "JETFILL_TEST_DICTIONARIES";
const folder = Deno.env.get(FOLDER_ENV)?.replace(/\/$/, "") ??
  fileURLToPath(new URL("../../../shared/jetstream", import.meta.url));
const reads = new Map<string, Promise<Uint8Array<ArrayBuffer> | undefined>>();

/** Dictionary `name` from the folder, or an error that says where it looked and how to provide it. */
async function dictionary(name: string): Promise<TestDictionary> {
  const path = `${folder}/${name}`;
  let read = reads.get(name);
  if (read === undefined) {
    read = Deno.readFile(path).catch((err) => {
      if (err instanceof Deno.errors.NotFound) return undefined;
      throw err;
    });
    reads.set(name, read);
  }
  const bytes = await read;
  // A new error for each test, so that its stack points at the test that asked.
  if (bytes === undefined) {
    const where = Deno.env.has(FOLDER_ENV)
      ? `the folder ${FOLDER_ENV} names`
      : `../shared/jetstream/ beside the checkout, as ${FOLDER_ENV} is not set`;
    throw new Error(
      `this test needs Jetstream's zstd dictionary ${name}, which this repository does not include, and ` +
        `there is no ${path} (${where}): copy it there from github.com/bluesky-social/jetstream ` +
        `(internal/subscribe/dictionaries/), or set ${FOLDER_ENV} to the folder that holds it`,
    );
  }
  return { path, bytes };
}

/** The legacy dictionary (`/subscribe`, ID 0x6015466D, sha256 b8d77b46…). */
export function legacyDictionary(): Promise<TestDictionary> {
  return dictionary("legacy_subscribe.zdict");
}

/** The v2 dictionary (`subscribeEvents`, ID 20260811). */
export function v2Dictionary(): Promise<TestDictionary> {
  return dictionary("subscribe_events_20260811.zdict");
}
