/**
 * Finding the zstd dictionary for Jetstream's compressed wire.
 *
 * No Jetstream server serves the legacy dictionary (protocol doc §4.1), and jetfill does not ship
 * it (it holds verbatim events), so it comes from the user, from a cached copy, or from the public
 * Jetstream repositories, checked against its known sha256.
 *
 * @module
 */

import { concat, sha256Hex } from "../bytes.ts";
import { messageWithCause, UsageError } from "../errors.ts";
import { envReadable, readEnv } from "../env.ts";
import {
  dictionaryIdOf,
  LEGACY_DICTIONARY_ID,
  LEGACY_DICTIONARY_SHA256,
  publishedDictionary,
} from "./zstd.ts";
import { printable } from "./utf8.ts";
import { isNothingThere } from "../fs.ts";

export { LEGACY_DICTIONARY_SHA256 };

/**
 * The environment variable that names a dictionary file: `JETFILL_ZSTD_DICTIONARY`.
 *
 * @example
 * ```ts
 * import { ZSTD_DICTIONARY_ENV } from "@jetfill/jetfill";
 * Deno.env.set(ZSTD_DICTIONARY_ENV, "/etc/jetfill/legacy_subscribe.zdict");
 * ```
 */
export const ZSTD_DICTIONARY_ENV = "JETFILL_ZSTD_DICTIONARY";

/** How messages name the option that gives the dictionary: its flag and its library name. */
export const DICTIONARY_OPTION = "--zstd-dictionary / zstdDictionary";

/**
 * Where the legacy dictionary is downloaded from, in order: the v2 repository's copy, then the
 * legacy repository's original (the same bytes).
 *
 * @example
 * ```ts
 * import { DEFAULT_DICTIONARY_URLS, resolveZstdDictionary } from "@jetfill/jetfill";
 * const mirror = "https://mirror.example/legacy_subscribe.zdict";
 * await resolveZstdDictionary({ downloadUrls: [mirror, ...DEFAULT_DICTIONARY_URLS] });
 * ```
 */
export const DEFAULT_DICTIONARY_URLS: readonly string[] = [
  "https://raw.githubusercontent.com/bluesky-social/jetstream/main/internal/subscribe/dictionaries/legacy_subscribe.zdict",
  "https://raw.githubusercontent.com/bluesky-social/jetstream-legacy/main/pkg/models/zstd_dictionary",
];

// How long one download URL may take (ms) by default.
const DOWNLOAD_TIMEOUT_MS = 30_000;

// A dictionary is ~110 KB; refuse to buffer an unexpectedly huge download.
const MAX_DOWNLOAD_BYTES = 16 * 1024 * 1024;

/**
 * Options of {@linkcode resolveZstdDictionary}.
 *
 * @example
 * ```ts
 * import { resolveZstdDictionary, type ResolveZstdDictionaryOptions } from "@jetfill/jetfill";
 * const options: ResolveZstdDictionaryOptions = { cacheDir: "/var/cache/jetfill", signal: AbortSignal.timeout(30_000) };
 * await resolveZstdDictionary(options);
 * ```
 */
export interface ResolveZstdDictionaryOptions {
  /**
   * A dictionary given by the user: a file path or the bytes. Used as given (it may be another
   * dictionary than the legacy one, such as a v2 server's), after checking it is a zstd dictionary,
   * and, when it bears the legacy dictionary's ID, that it has the legacy dictionary's sha256.
   */
  dictionary?: string | Uint8Array;
  /**
   * Reads an environment variable (`JETFILL_ZSTD_DICTIONARY`, `XDG_CACHE_HOME`, `HOME`).
   *
   * @default {(name) => Deno.env.get(name)}, treating a permission not granted already as unset (no
   *   prompt)
   */
  env?: (name: string) => string | undefined;
  /**
   * Directory of the cached download; `undefined` when neither variable is set disables caching.
   *
   * @default {"$XDG_CACHE_HOME/jetfill" or "$HOME/.cache/jetfill"}
   */
  cacheDir?: string;
  /**
   * URLs to download the dictionary from, tried in order.
   *
   * @default {DEFAULT_DICTIONARY_URLS}
   */
  downloadUrls?: readonly string[];
  /**
   * How long one download URL may take, in milliseconds, before the next is tried: a network that
   * hangs instead of failing costs this, not the whole of `signal`'s time.
   *
   * @default {30000}
   */
  downloadTimeoutMs?: number;
  /**
   * Lower-case hex sha256 that a cached or downloaded dictionary must have.
   *
   * @default {LEGACY_DICTIONARY_SHA256}
   */
  expectedSha256?: string;
  /**
   * The `fetch` used for downloads.
   *
   * @default {globalThis.fetch}
   */
  fetch?: typeof fetch;
  /** Aborts a download; the abort reason is thrown as is. */
  signal?: AbortSignal;
}

/**
 * Where a dictionary came from: the `dictionary` option, `JETFILL_ZSTD_DICTIONARY`, the cache, or a
 * download.
 *
 * @example
 * ```ts
 * import { resolveZstdDictionary, type ZstdDictionarySource } from "@jetfill/jetfill";
 * const source: ZstdDictionarySource = (await resolveZstdDictionary()).source;
 * ```
 */
export type ZstdDictionarySource = "option" | "env" | "cache" | "download";

/**
 * A dictionary ready for `createZstdDecoder()`.
 *
 * @example
 * ```ts
 * import { resolveZstdDictionary, type ResolvedZstdDictionary } from "@jetfill/jetfill";
 * const resolved: ResolvedZstdDictionary = await resolveZstdDictionary();
 * console.log(`dictionary ${resolved.dictionaryId} from ${resolved.path ?? resolved.source}`);
 * ```
 */
export interface ResolvedZstdDictionary {
  /** The dictionary's bytes. */
  bytes: Uint8Array;
  /** The dictionary's ID, from its header. */
  dictionaryId: number;
  /** Which step found it. */
  source: ZstdDictionarySource;
  /** The file it was read from or cached to, if any. */
  path?: string;
}

/**
 * Finds the zstd dictionary, trying in order: the `dictionary` option (a path or bytes), the
 * `JETFILL_ZSTD_DICTIONARY` environment variable (a path), a cached copy whose sha256 matches, and
 * a download checked against the sha256 (then cached, written atomically).
 *
 * Throws {@linkcode UsageError} for an explicit path that does not exist or is not a zstd
 * dictionary, for a dictionary with the legacy ID but other contents (a damaged copy), and when no
 * download URL is configured; when the downloads fail, a plain `Error` that says how to provide the
 * dictionary and why each download failed.
 *
 * @example
 * ```ts
 * import { resolveZstdDictionary } from "@jetfill/jetfill";
 * import { createZstdDecoder } from "@jetfill/jetfill";
 * const { bytes, source } = await resolveZstdDictionary({ dictionary: "./legacy_subscribe.zdict" });
 * console.log(source); // "option"
 * const decoder = await createZstdDecoder(bytes);
 * ```
 */
export async function resolveZstdDictionary(
  options: ResolveZstdDictionaryOptions = {},
): Promise<ResolvedZstdDictionary> {
  return await searchZstdDictionary(options, { failures: [] });
}

/**
 * What a search for the dictionary found on its way: what it could not read, what the cache held,
 * why each download failed and which one it was waiting for. A caller whose own deadline cuts the
 * search short (`signal`) says from it why no dictionary was found.
 */
export interface DictionarySearch {
  /** The environment variables left unread for want of the env permission, as a sentence. */
  envNote?: string;
  /** What the cache held, as a sentence. */
  cacheNote?: string;
  /** Each failed download: its URL and why. */
  failures: string[];
  /** The URL being downloaded from, while it is. */
  downloading?: string;
}

/** Why `search` found no dictionary, in sentences, for the error that says so. */
export function searchFindings(search: DictionarySearch): string {
  const tried = [...search.failures];
  if (search.downloading !== undefined) tried.push(`${search.downloading}: not finished`);
  return [
    search.envNote,
    search.cacheNote,
    tried.length > 0
      ? `Downloading it${search.downloading === undefined ? " failed" : ""}: ${tried.join("; ")}.`
      : undefined,
  ].filter((part) => part !== undefined).join(" ");
}

/** {@linkcode resolveZstdDictionary}, writing what it finds on its way into `search`. */
export async function searchZstdDictionary(
  options: ResolveZstdDictionaryOptions,
  search: DictionarySearch,
): Promise<ResolvedZstdDictionary> {
  const env = options.env ?? readEnv;
  if (options.dictionary !== undefined) {
    if (typeof options.dictionary === "string") {
      return await readGivenDictionary(options.dictionary, "option", DICTIONARY_OPTION);
    }
    const what = "The zstd dictionary given as bytes";
    const dictionaryId = checkDictionary(options.dictionary, what);
    checkPublishedContents(options.dictionary, dictionaryId, what);
    return { bytes: options.dictionary, dictionaryId, source: "option" };
  }
  // Read as unset without the permission (no prompt): the error says so, since they may well be set.
  const unread = options.env !== undefined
    ? []
    : [ZSTD_DICTIONARY_ENV, "XDG_CACHE_HOME", "HOME"].filter((name) => !envReadable(name));
  if (unread.length > 0) {
    search.envNote = `Without the env permission (--allow-env) ${unread.join(", ")} ${
      unread.length === 1 ? "was" : "were"
    } not read.`;
  }
  const fromEnv = env(ZSTD_DICTIONARY_ENV);
  if (fromEnv) return await readGivenDictionary(fromEnv, "env", ZSTD_DICTIONARY_ENV);

  const expectedSha256 = (options.expectedSha256 ?? LEGACY_DICTIONARY_SHA256).toLowerCase();
  const cacheDir = options.cacheDir ?? defaultCacheDir(env);
  const cachePath = cacheDir === undefined
    ? undefined
    : joinPath(cacheDir, `zstd-dictionary-${expectedSha256}.zdict`);
  // What the cache held, for the error when no download works either.
  search.cacheNote = unread.includes("HOME")
    ? "No cache folder either."
    : "No cache folder: set XDG_CACHE_HOME or HOME.";
  if (cachePath !== undefined) {
    const cached = await readCached(cachePath, expectedSha256);
    if (cached instanceof Uint8Array) {
      return { bytes: cached, dictionaryId: dictionaryIdOf(cached), source: "cache", path: cachePath };
    }
    search.cacheNote = cached === undefined
      ? `No cached copy at ${cachePath}.`
      : `The cached copy ${cachePath} is not the dictionary (${cached.size} bytes of sha256 ${cached.sha256}), so it was not used.`;
  }

  const failures = search.failures;
  const doFetch = options.fetch ?? fetch;
  const timeoutMs = options.downloadTimeoutMs ?? DOWNLOAD_TIMEOUT_MS;
  for (const url of options.downloadUrls ?? DEFAULT_DICTIONARY_URLS) {
    options.signal?.throwIfAborted();
    const timeout = AbortSignal.timeout(timeoutMs);
    let bytes: Uint8Array;
    search.downloading = url;
    try {
      bytes = await download(
        doFetch,
        url,
        options.signal ? AbortSignal.any([options.signal, timeout]) : timeout,
      );
    } catch (error) {
      if (options.signal?.aborted) throw options.signal.reason;
      failures.push(
        `${url}: ${timeout.aborted ? `no answer within ${timeoutMs / 1000} s` : messageWithCause(error)}`,
      );
      continue;
    } finally {
      if (!options.signal?.aborted) search.downloading = undefined;
    }
    const actual = sha256Hex(bytes);
    if (actual !== expectedSha256) {
      failures.push(`${url}: sha256 mismatch: got ${actual}, expected ${expectedSha256}`);
      continue;
    }
    let dictionaryId: number;
    try {
      dictionaryId = dictionaryIdOf(bytes);
    } catch (error) {
      failures.push(`${url}: ${(error as Error).message}`);
      continue;
    }
    const written = cachePath !== undefined && await writeAtomically(cachePath, bytes);
    return { bytes, dictionaryId, source: "download", path: written ? cachePath : undefined };
  }

  if (failures.length === 0) {
    throw noDictionaryError(`${searchFindings(search)} No download URL was configured.`);
  }
  // The network's failure, not the input's: a runtime error (the CLI exits 1), saying all the same
  // how to give the dictionary.
  throw noDictionaryError(searchFindings(search), undefined, "runtime");
}

/**
 * The error for a compressed sync without the legacy dictionary, saying how to give it, then `why`
 * none was found (the download's failures, say): a {@linkcode UsageError}, or with `kind` "runtime"
 * (the download failed) a plain `Error`.
 */
export function noDictionaryError(why: string, cause?: unknown, kind: "usage" | "runtime" = "usage"): Error {
  const message = "No zstd dictionary for Jetstream's compressed wire: provide the legacy dictionary " +
    `(legacy_subscribe.zdict, sha256 ${LEGACY_DICTIONARY_SHA256}) with --zstd-dictionary / zstdDictionary PATH, ` +
    `or the ${ZSTD_DICTIONARY_ENV} environment variable, or connect without compression (without --compress; on a resume, with --no-compress). ` +
    why;
  return kind === "usage" ? new UsageError(message, { cause }) : new Error(message, { cause });
}

async function readGivenDictionary(
  path: string,
  source: "option" | "env",
  via: string,
): Promise<ResolvedZstdDictionary> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (error) {
    if (isNothingThere(error)) {
      throw new UsageError(`Cannot read the zstd dictionary '${path}' (from ${via}): no such file`, {
        cause: error,
      });
    }
    throw new UsageError(
      `Cannot read the zstd dictionary '${path}' (from ${via}): ${(error as Error).message}`,
      { cause: error },
    );
  }
  const what = `The file '${path}' (from ${via})`;
  const dictionaryId = checkDictionary(bytes, what);
  checkPublishedContents(bytes, dictionaryId, what);
  return { bytes, dictionaryId, source, path };
}

/**
 * Refuses a dictionary that bears the ID of one of Jetstream's published dictionaries (the legacy one,
 * the v2 one) without being it: a copy cut off or damaged on its way, with which every frame would
 * fail to decode, or decode to garbage.
 */
function checkPublishedContents(bytes: Uint8Array, dictionaryId: number, what: string): void {
  const published = publishedDictionary(dictionaryId);
  if (published === undefined) return;
  const actual = sha256Hex(bytes);
  if (actual === published.sha256) return;
  const name = dictionaryId === LEGACY_DICTIONARY_ID
    ? "the legacy Jetstream dictionary"
    : `Jetstream's ${published.file}`;
  throw new UsageError(
    `${what} has the ID of ${name} (${dictionaryId}) but not its contents: ` +
      `${bytes.byteLength} bytes of sha256 ${actual}, where ${published.file} has sha256 ${published.sha256} ` +
      "(a damaged or cut-off copy?)",
  );
}

function checkDictionary(bytes: Uint8Array, what: string): number {
  try {
    return dictionaryIdOf(bytes);
  } catch (error) {
    throw new UsageError(`${what} is not a zstd dictionary: ${(error as Error).message}`, { cause: error });
  }
}

/**
 * The cached dictionary at `path` when its sha256 is the one expected; undefined when there is none
 * to read; otherwise what the file is (a truncated or tampered copy: not used, and a successful
 * download replaces it).
 */
async function readCached(
  path: string,
  expectedSha256: string,
): Promise<Uint8Array | { size: number; sha256: string } | undefined> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch {
    return undefined;
  }
  const sha256 = sha256Hex(bytes);
  return sha256 === expectedSha256 ? bytes : { size: bytes.byteLength, sha256 };
}

async function download(doFetch: typeof fetch, url: string, signal?: AbortSignal): Promise<Uint8Array> {
  const response = await doFetch(url, { signal, redirect: "follow" });
  if (!response.ok) {
    await response.body?.cancel();
    throw new Error(`HTTP ${response.status} ${printable(response.statusText)}`.trimEnd());
  }
  const declared = Number(response.headers.get("content-length") ?? "0");
  if (declared > MAX_DOWNLOAD_BYTES) {
    await response.body?.cancel();
    throw new Error(`the response is ${declared} bytes, more than a dictionary can be`);
  }
  const chunks: Uint8Array[] = [];
  let length = 0;
  if (response.body) {
    for await (const chunk of response.body) {
      length += chunk.byteLength;
      if (length > MAX_DOWNLOAD_BYTES) throw new Error(`the response is over ${MAX_DOWNLOAD_BYTES} bytes`);
      chunks.push(chunk);
    }
  }
  return concat(chunks);
}

/** Writes via a temporary file and a rename, so readers never see a partial file. */
async function writeAtomically(path: string, bytes: Uint8Array): Promise<boolean> {
  const dir = path.slice(0, Math.max(path.lastIndexOf("/"), path.lastIndexOf("\\")));
  const temp = `${path}.${crypto.randomUUID()}.tmp`;
  try {
    if (dir) await Deno.mkdir(dir, { recursive: true });
    await Deno.writeFile(temp, bytes);
    await Deno.rename(temp, path);
    return true;
  } catch {
    // Caching is an optimisation: a read-only or denied cache directory must not fail the run.
    await Deno.remove(temp).catch(() => {});
    return false;
  }
}

function defaultCacheDir(env: (name: string) => string | undefined): string | undefined {
  const xdg = env("XDG_CACHE_HOME");
  if (xdg) return joinPath(xdg, "jetfill");
  const home = env("HOME") || env("USERPROFILE");
  return home ? joinPath(home, ".cache", "jetfill") : undefined;
}

function joinPath(...parts: string[]): string {
  return parts.map((part, i) => (i === 0 ? part.replace(/[/\\]+$/, "") : part)).join("/");
}
