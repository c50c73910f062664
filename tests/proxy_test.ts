import assert from "node:assert/strict";
import { parseProxy, permissionHost, proxyFor } from "../src/jetstream/proxy.ts";
import { openRawConnection } from "../src/jetstream/raw_ws.ts";
import { commit, drainQueue } from "./helpers/events.ts";
import { connectProxy, serveEvents, syncConnections, tempDb, tlsFront } from "./helpers/loopback.ts";
import { runCli, syncArgs } from "./helpers/cli.ts";

const T0 = Date.UTC(2026, 10, 27, 10) * 1000;

/** An environment reader over `vars`. */
const envOf = (vars: Record<string, string>) => (name: string) => vars[name];
/** A proxy environment for a child process: `vars`, with every other proxy variable emptied. */
const proxyEnv = (vars: Record<string, string>) => ({
  HTTP_PROXY: "",
  http_proxy: "",
  HTTPS_PROXY: "",
  https_proxy: "",
  NO_PROXY: "",
  no_proxy: "",
  ...vars,
});

Deno.test("proxyFor takes HTTPS_PROXY for wss:// and HTTP_PROXY for ws://, in either case, with defaults", () => {
  const env = envOf({ HTTPS_PROXY: "http://secure.example:3128", http_proxy: "plain.example" });
  const wss = proxyFor(new URL("wss://jetstream2.us-east.bsky.network/subscribe"), env);
  assert.deepEqual(wss, {
    hostname: "secure.example",
    port: 3128,
    label: "http://secure.example:3128 (HTTPS_PROXY)",
  });
  // A bare host:port means an http:// proxy; port 80 when none is given.
  assert.deepEqual(proxyFor(new URL("ws://jetstream.example/subscribe"), env), {
    hostname: "plain.example",
    port: 80,
    label: "http://plain.example (http_proxy)",
  });
  assert.equal(proxyFor(new URL("wss://a.example/"), envOf({ HTTP_PROXY: "http://p:1" })), undefined);
  assert.equal(proxyFor(new URL("ws://a.example/"), envOf({ HTTPS_PROXY: "http://p:1" })), undefined);
  assert.equal(proxyFor(new URL("ws://a.example/"), envOf({ HTTP_PROXY: "  " })), undefined);
});

Deno.test("proxyFor connects loopback hosts and those NO_PROXY names directly", () => {
  const via = { HTTPS_PROXY: "http://proxy.example:3128", HTTP_PROXY: "http://proxy.example:3128" };
  for (
    const url of [
      "ws://localhost:6008/subscribe",
      "wss://127.0.0.5/",
      "ws://[::1]:6008/",
      "ws://app.localhost/",
    ]
  ) {
    assert.equal(proxyFor(new URL(url), envOf(via)), undefined, url);
  }
  const cases: [string, string, boolean][] = [
    ["bsky.network", "wss://jetstream1.us-east.bsky.network/subscribe", false],
    [".bsky.network", "wss://jetstream1.us-east.bsky.network/subscribe", false],
    ["*.bsky.network", "wss://bsky.network/subscribe", false],
    ["other.example, bsky.network", "wss://jetstream1.us-east.bsky.network/", false],
    ["bsky.network:443", "wss://jetstream1.us-east.bsky.network/", false],
    ["bsky.network:8443", "wss://jetstream1.us-east.bsky.network/", true],
    ["network.example", "wss://bsky.network/", true],
    ["sky.network", "wss://bsky.network/", true],
    ["10.0.0.7", "ws://10.0.0.7:6008/subscribe", false],
    ["*", "wss://anything.example/", false],
  ];
  for (const [noProxy, url, proxied] of cases) {
    const route = proxyFor(new URL(url), envOf({ ...via, no_proxy: noProxy }));
    assert.equal(route !== undefined, proxied, `NO_PROXY=${noProxy} ${url}`);
  }
});

Deno.test("permissionHost names the host:port Deno's net permission must allow: the proxy's, when one is used", () => {
  const via = envOf({ HTTPS_PROXY: "http://user:pw@proxy.example:3128", HTTP_PROXY: "[2001:db8::7]:8080" });
  const cases: [string, string][] = [
    ["wss://jetstream1.us-east.bsky.network/subscribe", "proxy.example:3128"],
    ["ws://jetstream.internal:6008/subscribe", "[2001:db8::7]:8080"],
    ["ws://127.0.0.1:6008/subscribe", "127.0.0.1:6008"],
    ["ws://[::1]/subscribe", "[::1]:80"],
  ];
  for (const [url, host] of cases) assert.equal(permissionHost(new URL(url), via), host, url);
  const direct = envOf({});
  assert.equal(
    permissionHost(new URL("wss://jetstream2.us-west.bsky.network/subscribe"), direct),
    "jetstream2.us-west.bsky.network:443",
  );
  assert.equal(permissionHost(new URL("ws://host.example/subscribe"), direct), "host.example:80");
});

Deno.test("a proxy URL's credentials become a Basic Proxy-Authorization and never appear in messages", () => {
  const route = parseProxy("http://al%40ice:s%3Acret@proxy.example:8080", "HTTPS_PROXY");
  assert.equal(route.authorization, `Basic ${btoa("al@ice:s:cret")}`);
  assert.equal(route.label, "http://proxy.example:8080 (HTTPS_PROXY)");
  assert.throws(
    () => parseProxy("https://user:hunter2@proxy.example:443", "HTTPS_PROXY"),
    (err: Error) => {
      assert.ok(err instanceof TypeError);
      assert.match(
        err.message,
        /^Cannot use the proxy in HTTPS_PROXY as a proxy reached over TLS \(https:\/\/\)/,
      );
      assert.match(err.message, /current value is "https:\/\/proxy\.example"$/);
      return !err.message.includes("hunter2");
    },
  );
  // A % that starts no escape: the variable named, what to write instead, and no password shown.
  assert.throws(
    () => parseProxy("http://al:100%sure@proxy.example:8080", "HTTPS_PROXY"),
    (err: Error) =>
      err instanceof TypeError && !err.message.includes("100") &&
      /^Cannot use the proxy in HTTPS_PROXY as its user name or password holds a % that starts no %XX escape \(write % as %25\): current value is "http:\/\/proxy\.example:8080"$/
        .test(err.message),
  );
  assert.throws(
    () => parseProxy("socks5://proxy.example:1080", "HTTP_PROXY"),
    /Cannot use the proxy in HTTP_PROXY as socks5 proxies are not supported; it must be an http:\/\/ proxy URL/,
  );
  assert.throws(
    () => parseProxy("http://user:hunter2@[bad", "HTTP_PROXY"),
    (err: Error) =>
      /current value is "\*\*\*@\[bad"|current value is "http:\/\/\*\*\*@\[bad"/.test(err.message),
  );
});

Deno.test("openRawConnection tunnels through an HTTP proxy with CONNECT and reads as directly", async () => {
  const events = Array.from({ length: 500 }, (_, i) => commit(T0 + i, { text: `ü${i}` }));
  await using server = serveEvents(events, { closeAtEnd: true });
  const port = Number(new URL(server.url).port);
  await using proxy = connectProxy((authority) => authority === "jetstream.test:6008" ? port : undefined);
  const conn = await openRawConnection("ws://jetstream.test:6008/subscribe?cursor=0", { proxy: proxy.url });
  const got: unknown[] = [];
  for (let frames = await conn.next(); frames; frames = await conn.next()) {
    for (const f of frames) got.push(JSON.parse(f as string));
  }
  assert.deepEqual(got, events);
  assert.equal(proxy.requests.length, 1);
  assert.equal(proxy.requests[0].line, "CONNECT jetstream.test:6008 HTTP/1.1");
  assert.equal(proxy.requests[0].headers.get("host"), "jetstream.test:6008");
  assert.equal(proxy.requests[0].headers.get("proxy-authorization"), null);
});

Deno.test("a proxy that cannot reach the host (502) is a failed attempt that names the proxy", async () => {
  await using proxy = connectProxy(() => undefined);
  await assert.rejects(
    openRawConnection("ws://jetstream.test/subscribe", { proxy: proxy.url }),
    (err: Error & { status?: number }) => {
      assert.equal(err.status, 502);
      assert.match(
        err.message,
        /^cannot connect to ws:\/\/jetstream\.test\/subscribe: the proxy http:\/\/127\.0\.0\.1:\d+ \(the proxy option\) refused the tunnel to jetstream\.test:80: HTTP 502$/,
      );
      return true;
    },
  );
});

Deno.test("jetfill sync reaches a wss:// instance through HTTPS_PROXY, with its credentials, and stores every event", async () => {
  const events = Array.from({ length: 2000 }, (_, i) => commit(T0 + i * 1000, { text: `é${i}`.repeat(10) }));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using front = tlsFront(Number(new URL(server.url).port), "jetstream.test");
  await using proxy = connectProxy(
    (a) => a === "jetstream.test:443" ? front.port : undefined,
    "al@ice:s:cret",
  );
  await using db = await tempDb();
  const r = await runCli(
    syncArgs("wss://jetstream.test/subscribe", db.path, T0, "--json"),
    [`--cert=${front.ca}`],
    proxyEnv({ HTTPS_PROXY: `http://al%40ice:s%3Acret@127.0.0.1:${proxy.port}` }),
  );
  assert.equal(r.code, 0, r.stderr);
  const stats = JSON.parse(r.stdout);
  assert.equal(stats.recordsStored, 2000);
  assert.equal(stats.stopReason, "closed");
  const messages = await drainQueue(db.path, stats.queueLength) as { seq: number; records: unknown[] }[];
  assert.deepEqual(messages.sort((a, b) => a.seq - b.seq).flatMap((m) => m.records), events);
  // Every connection (the sync's, and its coverage probe) went through the proxy, with credentials.
  // (Under load, a connection can be given up before its upgrade: a tunnel without one.)
  assert.ok(syncConnections(server).length >= 1);
  assert.ok(proxy.requests.length >= server.connections.length, `${proxy.requests.length} tunnels`);
  for (const req of proxy.requests) {
    assert.equal(req.line, "CONNECT jetstream.test:443 HTTP/1.1");
    assert.equal(req.headers.get("proxy-authorization"), `Basic ${btoa("al@ice:s:cret")}`);
  }
});

Deno.test("jetfill sync through a proxy that wants credentials it lacks exits 2, naming the proxy and what to do", async () => {
  await using proxy = connectProxy(() => undefined, "al@ice:s:cret");
  await using db = await tempDb();
  const r = await runCli(
    syncArgs("ws://jetstream.test/subscribe", db.path, T0, "--json"),
    [],
    proxyEnv({ http_proxy: `127.0.0.1:${proxy.port}` }),
  );
  assert.equal(r.code, 2, r.stderr);
  assert.match(
    r.stderr,
    new RegExp(
      `the proxy http://127\\.0\\.0\\.1:${proxy.port} \\(http_proxy\\) refused the tunnel to jetstream\\.test:80: HTTP 407 \\(it wants credentials: give them in the proxy URL, http://user:password@host:port\\): credentials, please`,
    ),
  );
  assert.doesNotMatch(r.stderr, /\n\s+at /);
});

Deno.test("jetfill sync connects a loopback instance directly whatever HTTP_PROXY says, and refuses a proxy it cannot use", async () => {
  const events = Array.from({ length: 50 }, (_, i) => commit(T0 + i * 1000));
  await using server = serveEvents(events, { closeAtEnd: true });
  await using db = await tempDb();
  // Nothing listens on port 9 of this machine: a proxy there would fail every connection.
  const direct = await runCli(
    syncArgs(server.url, db.path, T0, "--json"),
    [],
    proxyEnv({ HTTP_PROXY: "http://127.0.0.1:9" }),
  );
  assert.equal(direct.code, 0, direct.stderr);
  assert.equal(JSON.parse(direct.stdout).recordsStored, 50);

  const refused = await runCli(
    syncArgs("wss://jetstream.test/subscribe", `${db.dir}/other.sqlite`, T0),
    [],
    proxyEnv({ HTTPS_PROXY: "socks5://user:hunter2@127.0.0.1:1080" }),
  );
  assert.equal(refused.code, 2, refused.stderr);
  assert.match(
    refused.stderr,
    /^jetfill sync: Cannot use the proxy in HTTPS_PROXY as socks5 proxies are not supported; it must be an http:\/\/ proxy URL such as http:\/\/proxy\.example:3128: current value is "socks5:\/\/127\.0\.0\.1:1080"\n$/,
  );
});

Deno.test("without the env permission, the proxy variables are left unread (a direct connection), not an error", async () => {
  await using db = await tempDb();
  const script = `${db.dir}/read_env.ts`;
  const env = new URL("../src/env.ts", import.meta.url).href;
  await Deno.writeTextFile(
    script,
    `import { readEnv } from "${env}";\nconsole.log(String(readEnv("HTTPS_PROXY")));\n`,
  );
  const run = async (...flags: string[]) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--no-prompt", "--allow-read", ...flags, script],
      env: { HTTPS_PROXY: "http://proxy.example:3128", DENO_NO_UPDATE_CHECK: "1" },
      stdin: "null",
    }).output();
    const dec = new TextDecoder();
    return { code: out.code, stdout: dec.decode(out.stdout).trim(), stderr: dec.decode(out.stderr) };
  };
  const allowed = await run("--allow-env");
  assert.equal(allowed.stdout, "http://proxy.example:3128", allowed.stderr);
  const unallowed = await run();
  assert.equal(unallowed.code, 0, unallowed.stderr);
  assert.equal(unallowed.stdout, "undefined");
});
