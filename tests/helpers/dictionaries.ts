/**
 * Jetstream's zstd dictionaries, which this repository does not include, read when a test first asks
 * (from `../shared/jetstream/`, the folder `JETFILL_TEST_DICTIONARIES` names, or a download checked
 * against their sha256): a test file loads without them, and each test that needs one fails saying
 * where it looked.
 */
import { fileURLToPath } from "node:url";
import { LEGACY_DICTIONARY_SHA256, resolveZstdDictionary } from "../../src/jetstream/dictionary.ts";

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
const reads = new Map<string, Promise<TestDictionary | string>>();

/** Where the Jetstream repository keeps its dictionaries. */
const UPSTREAM =
  "https://raw.githubusercontent.com/bluesky-social/jetstream/main/internal/subscribe/dictionaries";

/**
 * Dictionary `name` from the folder; failing that (and unless `JETFILL_TEST_DICTIONARIES` names the
 * folder), from the Jetstream repository, checked against `sha256` and cached as jetfill caches its
 * own download (`$XDG_CACHE_HOME/jetfill` or `~/.cache/jetfill`); or an error that says where it
 * looked and how to provide it.
 */
async function dictionary(name: string, sha256: string): Promise<TestDictionary> {
  let read = reads.get(name);
  if (read === undefined) {
    read = find(name, sha256);
    reads.set(name, read);
  }
  const found = await read;
  // A new error for each test, so that its stack points at the test that asked.
  if (typeof found === "string") throw new Error(found);
  return found;
}

async function find(name: string, sha256: string): Promise<TestDictionary | string> {
  const path = `${folder}/${name}`;
  try {
    return { path, bytes: await Deno.readFile(path) };
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  const given = Deno.env.has(FOLDER_ENV);
  let downloadFailure = "";
  if (!given) {
    try {
      const got = await resolveZstdDictionary({
        // Not the user's own dictionary: the one the tests name, by its sha256.
        env: (v) => v === "JETFILL_ZSTD_DICTIONARY" ? undefined : Deno.env.get(v),
        downloadUrls: [`${UPSTREAM}/${name}`],
        expectedSha256: sha256,
      });
      if (got.path !== undefined) return { path: got.path, bytes: new Uint8Array(got.bytes) };
      downloadFailure = "; it was downloaded but could not be cached (set XDG_CACHE_HOME or HOME)";
    } catch (err) {
      const message = (err as Error).message;
      // (The library's own message says how to give a dictionary to a sync; only the cause counts here.)
      downloadFailure = `; nor could it be downloaded: ${
        message.includes("Downloading it failed: ")
          ? message.slice(message.indexOf("Downloading it failed: ") + 23)
          : message
      }`;
    }
  }
  const where = given
    ? `the folder ${FOLDER_ENV} names`
    : `../shared/jetstream/ beside the checkout, as ${FOLDER_ENV} is not set`;
  return `this test needs Jetstream's zstd dictionary ${name}, which this repository does not include, and ` +
    `there is no ${path} (${where})${downloadFailure}: copy it there from github.com/bluesky-social/jetstream ` +
    `(internal/subscribe/dictionaries/), or set ${FOLDER_ENV} to the folder that holds it`;
}

/** The legacy dictionary (`/subscribe`, ID 0x6015466D, sha256 b8d77b46…). */
export function legacyDictionary(): Promise<TestDictionary> {
  return dictionary("legacy_subscribe.zdict", LEGACY_DICTIONARY_SHA256);
}

/** sha256 of the v2 dictionary, `subscribe_events_20260811.zdict`. */
const V2_DICTIONARY_SHA256 = "f631a689a829b84b042ba45bcd7a7c2f792467192c5832fcfc1fc48afbec96aa";

/** The v2 dictionary (`subscribeEvents`, ID 20260811, sha256 f631a689…). */
export function v2Dictionary(): Promise<TestDictionary> {
  return dictionary("subscribe_events_20260811.zdict", V2_DICTIONARY_SHA256);
}
