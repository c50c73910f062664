/**
 * UTF-8 decoding of Jetstream's text for the hot path: lenient decoding (Deno's fast path), checked
 * strictly only when the result holds U+FFFD, which invalid bytes turn into.
 *
 * @module
 */

const lenient = new TextDecoder();
const strict = new TextDecoder("utf-8", { fatal: true });

/**
 * The text of `bytes`, or `undefined` when they are not valid UTF-8 (a text that legitimately holds
 * U+FFFD is returned as it is).
 *
 * @example
 * ```ts
 * import { utf8Text } from "./utf8.ts";
 * utf8Text(new TextEncoder().encode("{}")); // "{}"
 * utf8Text(new Uint8Array([0x7b, 0xff, 0x7d])); // undefined
 * ```
 */
export function utf8Text(bytes: Uint8Array): string | undefined {
  const text = lenient.decode(bytes);
  if (text.indexOf("\uFFFD") === -1) return text;
  try {
    return strict.decode(bytes);
  } catch {
    return undefined;
  }
}

/**
 * The UTF-8 length of `text` in bytes (a lone surrogate counts as the 3 bytes of U+FFFD).
 *
 * @example
 * ```ts
 * import { utf8Length } from "./utf8.ts";
 * utf8Length("é✓😀"); // 2 + 3 + 4
 * ```
 */
export function utf8Length(text: string): number {
  let n = text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) continue;
    if (c < 0x800) n += 1;
    else if (
      c >= 0xd800 && c <= 0xdbff && i + 1 < text.length && (text.charCodeAt(i + 1) & 0xfc00) === 0xdc00
    ) {
      // A surrogate pair: two UTF-16 units, four bytes.
      n += 2;
      i++;
    } else n += 2;
  }
  return n;
}

/** C0 controls but tab, DEL, and C1 controls: what a terminal may read as a command. */
// deno-lint-ignore no-control-regex
const CONTROLS = /[\u0000-\u0008\u000a-\u001f\u007f-\u009f]/g;

/**
 * `text` (from a server: a close reason, an HTTP refusal's body) made safe to print: control
 * characters but tab are written as `\uXXXX` escapes, so that a server cannot move the cursor,
 * retitle the terminal or forge lines of output.
 *
 * @example
 * ```ts
 * import { printable } from "./utf8.ts";
 * printable("bye\x1b[2J\r\n"); // "bye\\u001b[2J\\u000d\\u000a"
 * ```
 */
export function printable(text: string): string {
  return text.replace(CONTROLS, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

/** Characters of a refusal's body that an error message shows at most (the error keeps it whole). */
const BODY_IN_MESSAGE_CHARS = 300;

/**
 * A refused request's body (from a server) as one line of an error message: Jetstream's own
 * refusals are a line of text or JSON, shown as they are; a proxy's or web server's HTML page has
 * its whitespace runs made single spaces and is cut short, with its length said. Made
 * {@link printable} before the cut, so that a body of control characters is cut at the same length
 * (never inside an escape or between the two halves of a surrogate pair).
 *
 * @example
 * ```ts
 * import { bodyInMessage } from "./utf8.ts";
 * bodyInMessage("<html>\n  <body>gone</body>\n</html>"); // "<html> <body>gone</body> </html>"
 * ```
 */
export function bodyInMessage(body: string): string {
  const line = printable(body.replace(/\s+/g, " "));
  if (line.length <= BODY_IN_MESSAGE_CHARS) return line;
  let cut = BODY_IN_MESSAGE_CHARS;
  // Not inside a \uXXXX escape that printable() wrote.
  const escape = line.lastIndexOf("\\u", cut - 1);
  if (escape >= 0 && escape > cut - 6) cut = escape;
  // Not between the two halves of a surrogate pair.
  if (/[\ud800-\udbff]/.test(line[cut - 1])) cut--;
  return `${line.slice(0, cut)}… (${body.length} characters in all)`;
}

/** How many characters of a URL a message shows before it cuts the query short. */
const URL_IN_MESSAGE_CHARS = 300;

/**
 * A connection's URL as an error message shows it: whole, unless its query makes it long (thousands
 * of DIDs in the URL of the v2 wire), when the middle of the query gives way to its length, and the
 * end, where the cursor is, is kept.
 *
 * @example
 * ```ts
 * import { urlInMessage } from "./utf8.ts";
 * urlInMessage("wss://host/subscribe?cursor=1"); // "wss://host/subscribe?cursor=1"
 * ```
 */
export function urlInMessage(url: string): string {
  if (url.length <= URL_IN_MESSAGE_CHARS) return url;
  return `${url.slice(0, URL_IN_MESSAGE_CHARS - 60)}…${url.slice(-60)} (a URL of ${url.length} characters)`;
}
