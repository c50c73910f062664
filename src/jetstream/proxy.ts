/**
 * HTTP proxies for the WebSocket transport, from the environment as Deno's own `WebSocket` and
 * `fetch` take them: `HTTPS_PROXY` for `wss://`, `HTTP_PROXY` for `ws://` (either spelled in lower
 * case too), and `NO_PROXY` for the hosts reached directly. The connection is tunnelled with HTTP
 * `CONNECT` (RFC 9110 §9.3.6).
 *
 * @module
 */
import { show } from "../errors.ts";
import { readEnv } from "../env.ts";
import { encodeBase64 } from "../bytes.ts";

/** Where a proxied connection goes first, and how it says who it is. */
export interface ProxyRoute {
  /** The proxy's host name or IP address (without brackets). */
  hostname: string;
  /** The proxy's port. */
  port: number;
  /** The `Proxy-Authorization` header's value, when the proxy URL holds credentials. */
  authorization?: string;
  /** The proxy as messages name it: its URL without credentials, and the variable it came from. */
  label: string;
}

/** Reads an environment variable; `undefined` when unset. */
export type EnvReader = (name: string) => string | undefined;

/** Whether `hostname` (without brackets) is this machine: `localhost`, 127.0.0.0/8 or ::1. */
function isLoopback(hostname: string): boolean {
  const h = hostname.toLowerCase().replace(/\.$/, "");
  return h === "localhost" || h.endsWith(".localhost") || /^127\.\d+\.\d+\.\d+$/.test(h) ||
    h === "::1" || h === "0:0:0:0:0:0:0:1";
}

/**
 * Whether `NO_PROXY` exempts `hostname`:`port`. Entries are separated by commas or spaces: `*`
 * (every host), a host name (that host and its subdomains; a leading `.` or `*.` means the same), or
 * an IP address, each optionally with `:port`.
 */
function exempt(noProxy: string, hostname: string, port: number): boolean {
  const host = hostname.toLowerCase().replace(/\.$/, "");
  for (let entry of noProxy.split(/[\s,]+/)) {
    entry = entry.trim().toLowerCase();
    if (entry === "") continue;
    if (entry === "*") return true;
    let entryPort: number | undefined;
    const withPort = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(entry);
    if (withPort) {
      entry = withPort[1];
      entryPort = Number(withPort[2]);
    }
    if (entryPort !== undefined && entryPort !== port) continue;
    entry = entry.replace(/^\[(.*)\]$/, "$1").replace(/^\*?\./, "").replace(/\.$/, "");
    if (entry !== "" && (host === entry || host.endsWith(`.${entry}`))) return true;
  }
  return false;
}

/**
 * The proxy a connection to `url` (`ws://` or `wss://`) goes through, from the environment:
 * `HTTPS_PROXY` (or `https_proxy`) for `wss://`, `HTTP_PROXY` (or `http_proxy`) for `ws://`, unless
 * `NO_PROXY` (or `no_proxy`) exempts the host. A loopback host (`localhost`, 127.0.0.0/8, `::1`) is
 * always reached directly, as Go's HTTP client does: a proxy elsewhere could not reach it. The
 * proxy is an `http://` URL (a bare `host:port` means one), optionally with `user:password@`.
 * Throws a `TypeError` naming the variable for a value it cannot use (a proxy reached over TLS, a
 * SOCKS proxy, no host).
 *
 * @example
 * ```ts
 * import { proxyFor } from "./proxy.ts";
 * const env = { HTTPS_PROXY: "http://proxy.example:3128", NO_PROXY: ".internal" } as Record<string, string>;
 * proxyFor(new URL("wss://jetstream2.us-east.bsky.network/subscribe"), (n) => env[n]); // proxy.example:3128
 * proxyFor(new URL("wss://jetstream.internal/subscribe"), (n) => env[n]); // undefined
 * ```
 */
export function proxyFor(url: URL, env: EnvReader = readEnv): ProxyRoute | undefined {
  const secure = url.protocol === "wss:";
  const hostname = url.hostname.replace(/^\[(.*)\]$/, "$1");
  if (isLoopback(hostname)) return undefined;
  const names = secure ? ["HTTPS_PROXY", "https_proxy"] : ["HTTP_PROXY", "http_proxy"];
  const name = names.find((n) => (env(n) ?? "").trim() !== "");
  if (name === undefined) return undefined;
  const port = url.port ? Number(url.port) : secure ? 443 : 80;
  const noProxy = env("NO_PROXY") ?? env("no_proxy") ?? "";
  if (exempt(noProxy, hostname, port)) return undefined;
  return parseProxy(env(name)!.trim(), name);
}

/**
 * The host Deno's net permission must allow for a connection to `url` (`ws://` or `wss://`), as
 * `hostname:port`: the proxy's when the environment routes the connection through one (see
 * {@link proxyFor}), else the URL's own.
 */
export function permissionHost(url: URL, env: EnvReader = readEnv): string {
  const route = proxyFor(url, env);
  if (route) return `${route.hostname.includes(":") ? `[${route.hostname}]` : route.hostname}:${route.port}`;
  return `${url.hostname}:${url.port || (url.protocol === "wss:" ? 443 : 80)}`;
}

/** The route for a proxy URL given in variable `name`; see {@link proxyFor}. */
export function parseProxy(value: string, name: string): ProxyRoute {
  const expected = "an http:// proxy URL such as http://proxy.example:3128";
  let url: URL;
  try {
    url = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(value) ? value : `http://${value}`);
  } catch {
    throw new TypeError(
      `Cannot use the proxy in ${name} as it must be ${expected}: current value is ${show(masked(value))}`,
    );
  }
  if (url.protocol !== "http:") {
    const what = url.protocol === "https:"
      ? "a proxy reached over TLS (https://) is not supported"
      : `${url.protocol.slice(0, -1)} proxies are not supported`;
    throw new TypeError(
      `Cannot use the proxy in ${name} as ${what}; it must be ${expected}: current value is ${
        show(redact(url))
      }`,
    );
  }
  if (url.hostname === "") {
    throw new TypeError(
      `Cannot use the proxy in ${name} as it names no host: current value is ${show(masked(value))}`,
    );
  }
  const route: ProxyRoute = {
    hostname: url.hostname.replace(/^\[(.*)\]$/, "$1"),
    port: url.port ? Number(url.port) : 80,
    label: `${redact(url)} (${name})`,
  };
  if (url.username !== "" || url.password !== "") {
    let credentials: string;
    try {
      credentials = `${decodeURIComponent(url.username)}:${decodeURIComponent(url.password)}`;
    } catch {
      throw new TypeError(
        `Cannot use the proxy in ${name} as its user name or password holds a % that starts no %XX escape (write % as %25): current value is ${
          show(redact(url))
        }`,
      );
    }
    route.authorization = `Basic ${encodeBase64(credentials)}`;
  }
  return route;
}

/** `value` with any `user:password@` before its host hidden. */
function masked(value: string): string {
  return value.replace(/^([a-z][a-z0-9+.-]*:\/\/)?[^@/]*@/i, "$1***@");
}

/** `url`'s origin, without credentials: what a message may print. */
function redact(url: URL): string {
  return `${url.protocol}//${url.host}`;
}

/**
 * The request line and headers of a `CONNECT` to `hostname`:`port` (an IPv6 address goes in
 * brackets), with credentials when the route has them.
 */
export function connectRequest(route: ProxyRoute, hostname: string, port: number): string {
  const authority = authorityOf(hostname, port);
  return `CONNECT ${authority} HTTP/1.1\r\nHost: ${authority}\r\n` +
    (route.authorization ? `Proxy-Authorization: ${route.authorization}\r\n` : "") +
    "User-Agent: jetfill\r\n\r\n";
}

/**
 * `hostname`:`port` as a request target and a message name a host (an IPv6 address in brackets).
 *
 * @example
 * ```ts
 * import { authorityOf } from "./proxy.ts";
 * authorityOf("::1", 443); // "[::1]:443"
 * ```
 */
export function authorityOf(hostname: string, port: number): string {
  return `${hostname.includes(":") ? `[${hostname}]` : hostname}:${port}`;
}
