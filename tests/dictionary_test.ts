import assert from "node:assert/strict";
import { legacyDictionary, v2Dictionary } from "./helpers/dictionaries.ts";
import { refusedPort, withSilentPort } from "./helpers/loopback.ts";
// The public API, as a library user imports it.
import {
  LEGACY_DICTIONARY_ID,
  LEGACY_DICTIONARY_SHA256,
  resolveZstdDictionary,
  type ResolveZstdDictionaryOptions,
  UsageError,
  V2_DICTIONARY_ID,
  ZSTD_DICTIONARY_ENV,
} from "../mod.ts";

const CACHE_NAME = `zstd-dictionary-${LEGACY_DICTIONARY_SHA256}.zdict`;

/** An environment with only the given variables, so the real one never leaks into a test. */
function envOf(vars: Record<string, string> = {}): (name: string) => string | undefined {
  return (name) => vars[name];
}

/** A loopback HTTP server; `routes` maps a path to the body served (404 otherwise). */
async function withServer(
  routes: Record<string, Uint8Array>,
  fn: (base: string, hits: string[]) => Promise<void>,
): Promise<void> {
  const hits: string[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (request) => {
    const path = new URL(request.url).pathname;
    hits.push(path);
    const body = routes[path];
    return body ? new Response(body as Uint8Array<ArrayBuffer>) : new Response("not found", { status: 404 });
  });
  try {
    await fn(`http://127.0.0.1:${server.addr.port}`, hits);
  } finally {
    await server.shutdown();
  }
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "jetfill_dictionary_test_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function listDir(dir: string): Promise<string[]> {
  try {
    return (await Array.fromAsync(Deno.readDir(dir))).map((entry) => entry.name).sort();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return [];
    throw error;
  }
}

/** Options that can reach nothing: no environment, an empty cache, no download URLs. */
function isolated(dir: string, extra: ResolveZstdDictionaryOptions = {}): ResolveZstdDictionaryOptions {
  return { env: envOf(), cacheDir: `${dir}/cache`, downloadUrls: [], ...extra };
}

Deno.test("`resolveZstdDictionary()` uses the dictionary option given as a path", async () => {
  const legacyDict = await legacyDictionary();
  const v2Dict = await v2Dictionary();
  await withTempDir(async (dir) => {
    const resolved = await resolveZstdDictionary(
      isolated(dir, { dictionary: v2Dict.path, env: envOf({ [ZSTD_DICTIONARY_ENV]: legacyDict.path }) }),
    );
    // Explicit dictionaries are not held to the legacy hash: a v2 dictionary is fine.
    assert.equal(resolved.source, "option");
    assert.equal(resolved.path, v2Dict.path);
    assert.equal(resolved.dictionaryId, V2_DICTIONARY_ID);
    assert.deepEqual(resolved.bytes, await Deno.readFile(v2Dict.path));
  });
});

Deno.test("`resolveZstdDictionary()` refuses a damaged copy of the legacy dictionary, from a path, the environment or bytes", async () => {
  const legacyDict = await legacyDictionary();
  await withTempDir(async (dir) => {
    // Cut off, as by an interrupted download: it still starts with the legacy dictionary's ID.
    const cut = legacyDict.bytes.slice(0, 100_000);
    const path = `${dir}/cut.zdict`;
    await Deno.writeFile(path, cut);
    const actual = Array.from(
      new Uint8Array(await crypto.subtle.digest("SHA-256", cut)),
      (b) => b.toString(16).padStart(2, "0"),
    ).join("");
    const says = (what: string) => (err: unknown) =>
      err instanceof UsageError &&
      err.message ===
        `${what} has the ID of the legacy Jetstream dictionary (1612007021) but not its contents: 100000 bytes of sha256 ${actual}, where legacy_subscribe.zdict has sha256 ${LEGACY_DICTIONARY_SHA256} (a damaged or cut-off copy?)`;
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { dictionary: path })),
      says(`The file '${path}' (from --zstd-dictionary / zstdDictionary)`),
    );
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { env: envOf({ [ZSTD_DICTIONARY_ENV]: path }) })),
      says(`The file '${path}' (from ${ZSTD_DICTIONARY_ENV})`),
    );
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { dictionary: cut })),
      says("The zstd dictionary given as bytes"),
    );
  });
});

Deno.test("`resolveZstdDictionary()` uses the dictionary option given as bytes", async () => {
  const legacyDict = await legacyDictionary();
  await withTempDir(async (dir) => {
    const resolved = await resolveZstdDictionary(isolated(dir, { dictionary: legacyDict.bytes }));
    assert.equal(resolved.source, "option");
    assert.equal(resolved.path, undefined);
    assert.equal(resolved.dictionaryId, LEGACY_DICTIONARY_ID);
    assert.equal(resolved.bytes, legacyDict.bytes);
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { dictionary: new TextEncoder().encode("{}") })),
      (error: unknown) =>
        error instanceof UsageError && /given as bytes is not a zstd dictionary/.test(error.message),
    );
  });
});

Deno.test("`resolveZstdDictionary()` names a missing or unusable dictionary path in a UsageError", async () => {
  await withTempDir(async (dir) => {
    // A folder that is not there, and a file where a folder of the path should be.
    await Deno.writeTextFile(`${dir}/notes.txt`, "x");
    for (const missing of [`${dir}/nope/legacy.zdict`, `${dir}/notes.txt/legacy.zdict`]) {
      await assert.rejects(
        () => resolveZstdDictionary(isolated(dir, { dictionary: missing })),
        (error: unknown) => {
          assert.ok(error instanceof UsageError);
          assert.equal(
            error.message,
            `Cannot read the zstd dictionary '${missing}' (from --zstd-dictionary / zstdDictionary): no such file`,
          );
          return true;
        },
      );
    }
    const missing = `${dir}/nope/legacy.zdict`;
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { env: envOf({ [ZSTD_DICTIONARY_ENV]: missing }) })),
      (error: unknown) =>
        error instanceof UsageError && error.message.includes(`'${missing}' (from ${ZSTD_DICTIONARY_ENV})`),
    );
    const notDictionary = `${dir}/events.json`;
    await Deno.writeTextFile(notDictionary, '{"did":"did:plc:x","kind":"commit"}\n');
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { dictionary: notDictionary })),
      (error: unknown) =>
        error instanceof UsageError &&
        error.message.startsWith(
          `The file '${notDictionary}' (from --zstd-dictionary / zstdDictionary) is not a zstd dictionary`,
        ),
    );
  });
});

Deno.test("`resolveZstdDictionary()` uses JETFILL_ZSTD_DICTIONARY when no option is given", async () => {
  const legacyDict = await legacyDictionary();
  await withTempDir(async (dir) => {
    const resolved = await resolveZstdDictionary(
      isolated(dir, { env: envOf({ [ZSTD_DICTIONARY_ENV]: legacyDict.path }) }),
    );
    assert.equal(resolved.source, "env");
    assert.equal(resolved.path, legacyDict.path);
    assert.equal(resolved.dictionaryId, LEGACY_DICTIONARY_ID);
  });
});

Deno.test("`resolveZstdDictionary()` uses a cached copy whose sha256 matches, before downloading", async () => {
  const legacyDict = await legacyDictionary();
  await withTempDir(async (dir) => {
    await Deno.mkdir(`${dir}/cache`);
    await Deno.writeFile(`${dir}/cache/${CACHE_NAME}`, legacyDict.bytes);
    await withServer({ "/dict": legacyDict.bytes }, async (base, hits) => {
      const resolved = await resolveZstdDictionary(isolated(dir, { downloadUrls: [`${base}/dict`] }));
      assert.equal(resolved.source, "cache");
      assert.equal(resolved.path, `${dir}/cache/${CACHE_NAME}`);
      assert.deepEqual(resolved.bytes, legacyDict.bytes);
      assert.deepEqual(hits, []);
    });
  });
});

Deno.test("`resolveZstdDictionary()` downloads, verifies and caches the dictionary atomically", async () => {
  const legacyDict = await legacyDictionary();
  await withTempDir(async (dir) => {
    await withServer({ "/jetstream/legacy_subscribe.zdict": legacyDict.bytes }, async (base, hits) => {
      const options = isolated(dir, {
        downloadUrls: [`${base}/missing.zdict`, `${base}/jetstream/legacy_subscribe.zdict`],
      });
      const resolved = await resolveZstdDictionary(options);
      assert.equal(resolved.source, "download");
      assert.equal(resolved.dictionaryId, LEGACY_DICTIONARY_ID);
      assert.deepEqual(resolved.bytes, legacyDict.bytes);
      assert.equal(resolved.path, `${dir}/cache/${CACHE_NAME}`);
      // The 404 was skipped; only the final file is left, no temporary one.
      assert.deepEqual(hits, ["/missing.zdict", "/jetstream/legacy_subscribe.zdict"]);
      assert.deepEqual(await listDir(`${dir}/cache`), [CACHE_NAME]);
      assert.deepEqual(await Deno.readFile(`${dir}/cache/${CACHE_NAME}`), legacyDict.bytes);

      const again = await resolveZstdDictionary(options);
      assert.equal(again.source, "cache");
      assert.equal(hits.length, 2);
    });
  });
});

Deno.test("`resolveZstdDictionary()` ignores a corrupt cache file and replaces it", async () => {
  const legacyDict = await legacyDictionary();
  await withTempDir(async (dir) => {
    await Deno.mkdir(`${dir}/cache`);
    await Deno.writeFile(`${dir}/cache/${CACHE_NAME}`, legacyDict.bytes.subarray(0, 5000));
    // Offline, the error says what the cache held and why it was not used.
    const url = `http://127.0.0.1:${await refusedPort()}/legacy.zdict`;
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { downloadUrls: [url] })),
      (err: unknown) =>
        err instanceof Error &&
        new RegExp(
          `The cached copy ${dir}/cache/${CACHE_NAME} is not the dictionary \\(5000 bytes of sha256 [0-9a-f]{64}\\), so it was not used\\. Downloading it failed: ${url}: `,
        ).test(err.message),
    );
    await withServer({ "/d": legacyDict.bytes }, async (base) => {
      const resolved = await resolveZstdDictionary(isolated(dir, { downloadUrls: [`${base}/d`] }));
      assert.equal(resolved.source, "download");
      assert.deepEqual(await Deno.readFile(`${dir}/cache/${CACHE_NAME}`), legacyDict.bytes);
    });
  });
});

Deno.test("`resolveZstdDictionary()` gives a download URL that never answers downloadTimeoutMs, then tries the next", async () => {
  const legacyDict = await legacyDictionary();
  await withTempDir(async (dir) => {
    await withSilentPort(async (port) => {
      await withServer({ "/d": legacyDict.bytes }, async (base) => {
        const silent = `http://127.0.0.1:${port}/legacy.zdict`;
        // (The refusal first: the download after it fills the cache.)
        await assert.rejects(
          () => resolveZstdDictionary(isolated(dir, { downloadUrls: [silent], downloadTimeoutMs: 300 })),
          (err: unknown) =>
            err instanceof Error && !(err instanceof UsageError) &&
            err.message.includes(`Downloading it failed: ${silent}: no answer within 0.3 s.`),
        );
        const resolved = await resolveZstdDictionary(
          isolated(dir, { downloadUrls: [silent, `${base}/d`], downloadTimeoutMs: 300 }),
        );
        assert.equal(resolved.source, "download");
        assert.deepEqual(resolved.bytes, legacyDict.bytes);
      });
    });
  });
});

Deno.test("`resolveZstdDictionary()` says why a download could not connect, not only that fetch failed", async () => {
  await withTempDir(async (dir) => {
    const url = `http://127.0.0.1:${await refusedPort()}/legacy.zdict`;
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { downloadUrls: [url] })),
      (err: unknown) =>
        err instanceof Error && !(err instanceof UsageError) &&
        new RegExp(`${url}: fetch failed \\(.*Connection refused`).test(err.message),
    );
  });
});

Deno.test("`resolveZstdDictionary()` refuses a download with the wrong sha256 and caches nothing", async () => {
  const v2Dict = await v2Dictionary();
  await withTempDir(async (dir) => {
    const v2 = await Deno.readFile(v2Dict.path);
    await withServer({ "/d": v2 }, async (base) => {
      await assert.rejects(
        () => resolveZstdDictionary(isolated(dir, { downloadUrls: [`${base}/d`] })),
        (error: unknown) => {
          assert.ok(error instanceof Error && !(error instanceof UsageError), String(error));
          assert.match(error.message, /--zstd-dictionary \/ zstdDictionary PATH/);
          assert.match(
            error.message,
            new RegExp(
              `${base}/d: sha256 mismatch: got f631a689a829b84b[0-9a-f]+, expected ${LEGACY_DICTIONARY_SHA256}`,
            ),
          );
          return true;
        },
      );
      assert.deepEqual(await listDir(`${dir}/cache`), []);
    });
  });
});

Deno.test("`resolveZstdDictionary()` says how to provide the dictionary when nothing works", async () => {
  await withTempDir(async (dir) => {
    // The connection is refused: a network error.
    const url = `http://127.0.0.1:${await refusedPort()}/legacy_subscribe.zdict`;
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir, { downloadUrls: [url] })),
      (error: unknown) => {
        // A failed download is the network's failure, not bad input (the CLI exits 1).
        assert.ok(error instanceof Error && !(error instanceof UsageError), String(error));
        assert.match(error.message, /--zstd-dictionary \/ zstdDictionary PATH/);
        assert.match(
          error.message,
          /with --zstd-dictionary \/ zstdDictionary PATH, or the JETFILL_ZSTD_DICTIONARY/,
        );
        assert.match(error.message, /JETFILL_ZSTD_DICTIONARY/);
        assert.ok(
          error.message.includes(
            `No cached copy at ${dir}/cache/${CACHE_NAME}. Downloading it failed: ${url}: `,
          ),
          error.message,
        );
        return true;
      },
    );
    await assert.rejects(
      () => resolveZstdDictionary(isolated(dir)),
      (error: unknown) => error instanceof UsageError && /No download URL was configured/.test(error.message),
    );
  });
});

Deno.test("`resolveZstdDictionary()` caches under $XDG_CACHE_HOME/jetfill, else $HOME/.cache/jetfill", async () => {
  const legacyDict = await legacyDictionary();
  await withTempDir(async (dir) => {
    await withServer({ "/d": legacyDict.bytes }, async (base) => {
      const xdg = await resolveZstdDictionary({
        env: envOf({ XDG_CACHE_HOME: `${dir}/xdg`, HOME: `${dir}/home` }),
        downloadUrls: [`${base}/d`],
      });
      assert.equal(xdg.path, `${dir}/xdg/jetfill/${CACHE_NAME}`);
      const home = await resolveZstdDictionary({
        env: envOf({ HOME: `${dir}/home` }),
        downloadUrls: [`${base}/d`],
      });
      assert.equal(home.source, "download");
      assert.equal(home.path, `${dir}/home/.cache/jetfill/${CACHE_NAME}`);
      const cached = await resolveZstdDictionary({ env: envOf({ HOME: `${dir}/home` }), downloadUrls: [] });
      assert.equal(cached.source, "cache");
    });
  });
});

Deno.test("`resolveZstdDictionary()` stops a download when its signal aborts", async () => {
  await withTempDir(async (dir) => {
    const controller = new AbortController();
    controller.abort(new Error("stopped by the user"));
    await assert.rejects(
      () =>
        resolveZstdDictionary(
          isolated(dir, { downloadUrls: ["http://127.0.0.1:9/d"], signal: controller.signal }),
        ),
      { message: "stopped by the user" },
    );
  });
});
