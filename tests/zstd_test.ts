import assert from "node:assert/strict";
// The dictionaries live beside the repository (never committed: the legacy one holds real events).
import { legacyDictionary, v2Dictionary } from "./helpers/dictionaries.ts";
// The public API, as a library user imports it.
import {
  createZstdDecoder,
  DEFAULT_MAX_DECODED_BYTES,
  dictionaryIdOf,
  frameDictionaryId,
  LEGACY_DICTIONARY_ID,
  V2_DICTIONARY_ID,
  ZstdDecodeError,
  ZstdDecompressionStream,
} from "../mod.ts";
import { createZstdEncoder } from "../src/jetstream/zstd.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A few events in the shapes Jetstream sends, with multi-byte text. */
function sampleEvents(): Uint8Array[] {
  const events: unknown[] = [];
  for (let i = 0; i < 6; i++) {
    events.push({
      did: `did:plc:${"abcdefghijklmnopqrstuvwx".slice(i)}${i}`,
      time_us: 1_725_911_162_329_308 + i * 1713,
      kind: "commit",
      commit: {
        rev: `3l3qo2vutsw2${i}`,
        operation: "create",
        collection: "app.bsky.feed.post",
        rkey: `3l3qo2vuowo2${i}`,
        record: {
          $type: "app.bsky.feed.post",
          createdAt: "2024-09-09T19:46:02.102Z",
          langs: ["en", "ja"],
          text: `post ${i}: good morning ☀️ おはようございます 🦋 `.repeat(i + 1),
        },
        cid: `bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcq${i}`,
      },
    });
  }
  events.push({ did: "did:plc:ewvi7nxzyoun6zhxrhs64oiz", time_us: 1725516666833633, kind: "identity" });
  events.push({ did: "did:plc:ewvi7nxzyoun6zhxrhs64oiz", time_us: 1725516666833634, kind: "account" });
  return events.map((event) => encoder.encode(JSON.stringify(event)));
}

/** Compresses each input as its own frame with one run of the real `zstd` CLI. */
async function zstdFrames(inputs: Uint8Array[], args: string[]): Promise<Uint8Array[]> {
  const dir = await Deno.makeTempDir({ prefix: "jetfill_zstd_test_" });
  try {
    await Deno.mkdir(`${dir}/in`);
    await Deno.mkdir(`${dir}/out`);
    const names = inputs.map((_, i) => `${String(i).padStart(4, "0")}.json`);
    await Promise.all(inputs.map((bytes, i) => Deno.writeFile(`${dir}/in/${names[i]}`, bytes)));
    const { code, stderr } = await new Deno.Command("zstd", {
      args: ["-q", ...args, "--output-dir-flat", `${dir}/out`, ...names.map((name) => `${dir}/in/${name}`)],
      stdout: "null",
      stderr: "piped",
    }).output();
    assert.equal(code, 0, decoder.decode(stderr));
    return await Promise.all(names.map((name) => Deno.readFile(`${dir}/out/${name}.zst`)));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Runs the `zstd` CLI with `input` on stdin and returns its stdout. */
async function zstdPipe(args: string[], input: Uint8Array): Promise<Uint8Array> {
  const child = new Deno.Command("zstd", {
    args: ["-q", ...args],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  })
    .spawn();
  const writer = child.stdin.getWriter();
  await writer.write(input);
  await writer.close();
  const { code, stdout, stderr } = await child.output();
  assert.equal(code, 0, decoder.decode(stderr));
  return stdout;
}

function decodeError(fn: () => unknown): ZstdDecodeError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof ZstdDecodeError, `expected ZstdDecodeError, got ${error}`);
    return error;
  }
  assert.fail("expected a ZstdDecodeError");
}

Deno.test("`createZstdDecoder()` decodes frames made by the zstd CLI with the legacy dictionary", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const frames = await zstdFrames(events, ["-D", legacyDict.path]);
  const zstd = await createZstdDecoder(legacyDict.bytes);
  assert.equal(zstd.dictionaryId, LEGACY_DICTIONARY_ID);
  assert.equal(zstd.maxDecodedBytes, DEFAULT_MAX_DECODED_BYTES);
  for (const [i, frame] of frames.entries()) {
    assert.equal(frameDictionaryId(frame), LEGACY_DICTIONARY_ID);
    assert.deepEqual(zstd.decode(frame), events[i]);
  }
  // Through a pipe as well, the way a single message would be made.
  const piped = await zstdPipe(["-D", legacyDict.path, "-c"], events[3]);
  assert.equal(decoder.decode(zstd.decode(piped)), decoder.decode(events[3]));
});

Deno.test("`createZstdDecoder()` decodes frames without a content-size field", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const frames = await zstdFrames(events, ["--no-content-size", "-D", legacyDict.path]);
  const zstd = await createZstdDecoder(legacyDict.bytes);
  for (const [i, frame] of frames.entries()) {
    // Frame_Content_Size_flag 0 and Single_Segment 0: the header records no size.
    assert.equal(frame[4] & 0xe0, 0);
    assert.deepEqual(zstd.decode(frame), events[i]);
  }
});

Deno.test("`createZstdDecoder()` decodes v2-dictionary frames with a v2 decoder", async () => {
  const v2Dict = await v2Dictionary();
  const events = sampleEvents();
  const frames = await zstdFrames(events, ["-D", v2Dict.path]);
  const zstd = await createZstdDecoder(v2Dict.bytes);
  assert.equal(zstd.dictionaryId, V2_DICTIONARY_ID);
  for (const [i, frame] of frames.entries()) {
    assert.equal(frameDictionaryId(frame), V2_DICTIONARY_ID);
    assert.deepEqual(zstd.decode(frame), events[i]);
  }
});

Deno.test("`ZstdDecoder.decode()` rejects a frame made with another dictionary, naming both IDs", async () => {
  const legacyDict = await legacyDictionary();
  const v2Dict = await v2Dictionary();
  const [event] = sampleEvents();
  const [v2Frame] = await zstdFrames([event], ["-D", v2Dict.path]);
  const legacy = await createZstdDecoder(legacyDict.bytes);
  const error = decodeError(() => legacy.decode(v2Frame));
  assert.equal(error.reason, "dictionary-mismatch");
  assert.equal(error.frameDictionaryId, V2_DICTIONARY_ID);
  assert.equal(error.decoderDictionaryId, LEGACY_DICTIONARY_ID);
  assert.match(
    error.message,
    /frame was compressed with dictionary 20260811, but the decoder has dictionary 1612007021/,
  );

  const [legacyFrame] = await zstdFrames([event], ["-D", legacyDict.path]);
  const v2 = await createZstdDecoder(v2Dict.bytes);
  assert.match(
    decodeError(() => v2.decode(legacyFrame)).message,
    /dictionary 1612007021, but the decoder has dictionary 20260811/,
  );
});

Deno.test("`createZstdDecoder()` decodes a frame compressed without a dictionary", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const frames = await zstdFrames(events, []);
  const zstd = await createZstdDecoder(legacyDict.bytes);
  for (const [i, frame] of frames.entries()) {
    assert.equal(frameDictionaryId(frame), undefined);
    assert.deepEqual(zstd.decode(frame), events[i]);
  }
});

Deno.test("`ZstdDecoder.decode()` results stay intact across later decodes", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const frames = await zstdFrames(events, ["-D", legacyDict.path]);
  const zstd = await createZstdDecoder(legacyDict.bytes);
  // Enough results to fill several 64 KiB pools.
  const kept: Uint8Array[] = [];
  for (let round = 0; round < 120; round++) for (const frame of frames) kept.push(zstd.decode(frame));
  kept.forEach((decoded, i) => assert.deepEqual(decoded, events[i % events.length]));
  // A caller that transfers a result's buffer detaches the pool; decoding carries on.
  const transferred = zstd.decode(frames[0]);
  structuredClone(transferred.buffer, { transfer: [transferred.buffer] });
  assert.equal(transferred.byteLength, 0);
  assert.deepEqual(zstd.decode(frames[1]), events[1]);
});

Deno.test("`ZstdDecoder.decode()` throws a corrupt ZstdDecodeError for damaged bytes and keeps working", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const [frame] = await zstdFrames([events[5]], ["-D", legacyDict.path]);
  const [unsized] = await zstdFrames([events[5]], ["--no-content-size", "-D", legacyDict.path]);
  const zstd = await createZstdDecoder(legacyDict.bytes);
  const flipped = frame.slice();
  for (let i = 20; i < flipped.length; i++) flipped[i] ^= 0x5a;
  const cases: [string, Uint8Array, RegExp][] = [
    ["truncated", frame.subarray(0, frame.length - 7), /corrupt or truncated/],
    ["truncated without a size", unsized.subarray(0, unsized.length - 7), /corrupt or truncated/],
    ["bit flips", flipped, /corrupt/],
    ["JSON text", encoder.encode('{"kind":"commit"}'), /not the zstd frame magic number/],
    ["too short", new Uint8Array([0x28, 0xb5, 0x2f]), /too short/],
    ["header only", frame.subarray(0, 8), /shorter than its \d+-byte header and first block header/],
  ];
  for (const [name, bytes, message] of cases) {
    const error = decodeError(() => zstd.decode(bytes));
    assert.equal(error.reason, "corrupt", name);
    assert.match(error.message, message, name);
  }
  assert.deepEqual(zstd.decode(frame), events[5]);
});

Deno.test("`ZstdDecoder.decode()` rejects frames over maxDecodedBytes as too-large", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const limit = events[0].length - 1;
  const small = await createZstdDecoder(legacyDict.bytes, { maxDecodedBytes: limit });
  assert.equal(small.maxDecodedBytes, limit);
  const [sized] = await zstdFrames([events[0]], ["-D", legacyDict.path]);
  const [unsized] = await zstdFrames([events[0]], ["--no-content-size", "-D", legacyDict.path]);
  const fromHeader = decodeError(() => small.decode(sized));
  assert.equal(fromHeader.reason, "too-large");
  assert.equal(
    fromHeader.message,
    `The zstd frame is too large: its header records ${
      events[0].length
    } decoded bytes, over the limit of ${limit} bytes (maxDecodedBytes)`,
  );
  const streamed = decodeError(() => small.decode(unsized));
  assert.equal(streamed.reason, "too-large");
  assert.match(streamed.message, new RegExp(`decodes to more than the limit of ${limit} bytes`));
  // A compressed frame longer than the limit cannot fit, whatever its header says.
  const tiny = await createZstdDecoder(legacyDict.bytes, { maxDecodedBytes: 100 });
  assert.match(
    decodeError(() => tiny.decode(unsized)).message,
    /bytes compressed, so it cannot decode within the limit/,
  );

  // 40 MiB of zeros compresses to about a kilobyte: a decompression bomb for the default 32 MiB cap,
  // with and without a recorded size.
  const zeros = new Uint8Array(40 * 1024 * 1024);
  const zstd = await createZstdDecoder(legacyDict.bytes);
  for (const args of [["-D", legacyDict.path], ["--no-content-size", "-D", legacyDict.path]]) {
    const [bomb] = await zstdFrames([zeros], args);
    assert.ok(bomb.length < 4096);
    assert.equal(decodeError(() => zstd.decode(bomb)).reason, "too-large");
  }
  // Just under the cap still decodes, again with and without a recorded size.
  const large = new Uint8Array(DEFAULT_MAX_DECODED_BYTES - 1024).fill(0x61);
  for (const args of [["-D", legacyDict.path], ["--no-content-size", "-D", legacyDict.path]]) {
    const [frame] = await zstdFrames([large], args);
    const decoded = zstd.decode(frame);
    assert.equal(decoded.length, large.length);
    assert.ok(decoded.every((byte) => byte === 0x61));
  }
  assert.deepEqual(zstd.decode(sized), events[0]);
});

Deno.test("`ZstdDecoder.decode()` decodes an empty frame", async () => {
  const legacyDict = await legacyDictionary();
  const zstd = await createZstdDecoder(legacyDict.bytes);
  for (const args of [["-D", legacyDict.path, "-c"], ["--no-content-size", "-D", legacyDict.path, "-c"]]) {
    const frame = await zstdPipe(args, new Uint8Array(0));
    assert.equal(zstd.decode(frame).length, 0);
  }
});

Deno.test("`createZstdDecoder()` checks its arguments", async () => {
  const legacyDict = await legacyDictionary();
  await assert.rejects(() => createZstdDecoder(encoder.encode("not a dictionary at all")), {
    name: "TypeError",
    message: /dictionary magic number 0xEC30A437/,
  });
  await assert.rejects(() => createZstdDecoder(legacyDict.bytes, { maxDecodedBytes: 0 }), {
    name: "RangeError",
    message: /'maxDecodedBytes' must be an integer from 1 to 33554432: current value is 0/,
  });
  await assert.rejects(
    () => createZstdDecoder(legacyDict.bytes, { maxDecodedBytes: 64 * 1024 * 1024 }),
    RangeError,
  );
});

Deno.test("a damaged copy of one of Jetstream's dictionaries is refused when the decoder is made, not blamed on each frame", async () => {
  const legacyDict = await legacyDictionary();
  const v2Dict = await v2Dictionary();
  const zeroed = legacyDict.bytes.slice();
  zeroed.fill(0, 8);
  for (
    const [bytes, file] of [
      [legacyDict.bytes.slice(0, 1000), "legacy_subscribe.zdict"],
      [zeroed, "legacy_subscribe.zdict"],
      [v2Dict.bytes.slice(0, 2000), "subscribe_events_20260811.zdict"],
    ] as const
  ) {
    const refused = new RegExp(
      `^Cannot use the bytes as a zstd dictionary: they carry the ID \\d+ of Jetstream's ${file}, but are not it \\(${bytes.byteLength} bytes of sha256 [0-9a-f]{64}; it has sha256 [0-9a-f]{64}\\): a damaged or cut-short copy$`,
    );
    // (Before: made without a word; then every frame failed as "corrupt or truncated".)
    await assert.rejects(() => createZstdDecoder(bytes), { name: "TypeError", message: refused });
    assert.throws(() => new ZstdDecompressionStream({ dictionary: bytes }), {
      name: "TypeError",
      message: refused,
    });
  }
  // The whole dictionaries are taken, as before.
  assert.equal((await createZstdDecoder(legacyDict.bytes)).dictionaryId, LEGACY_DICTIONARY_ID);
  assert.equal((await createZstdDecoder(v2Dict.bytes)).dictionaryId, V2_DICTIONARY_ID);
});

Deno.test("`createZstdDecoder()` creates independent decoders concurrently and restores WebAssembly.instantiate", async () => {
  const legacyDict = await legacyDictionary();
  const v2Dict = await v2Dictionary();
  const instantiate = WebAssembly.instantiate;
  const [a, b, c] = await Promise.all([
    createZstdDecoder(legacyDict.bytes),
    createZstdDecoder(v2Dict.bytes),
    createZstdDecoder(legacyDict.bytes),
  ]);
  assert.equal(WebAssembly.instantiate, instantiate);
  const [event] = sampleEvents();
  const [legacyFrame] = await zstdFrames([event], ["-D", legacyDict.path]);
  const [v2Frame] = await zstdFrames([event], ["-D", v2Dict.path]);
  assert.deepEqual(a.decode(legacyFrame), event);
  assert.deepEqual(b.decode(v2Frame), event);
  assert.deepEqual(c.decode(legacyFrame), event);
});

Deno.test("`frameDictionaryId()` reads the dictionary ID from the frame header", async () => {
  const legacyDict = await legacyDictionary();
  const v2Dict = await v2Dictionary();
  const [event] = sampleEvents();
  const [legacy] = await zstdFrames([event], ["-D", legacyDict.path]);
  const [v2] = await zstdFrames([event], ["-D", v2Dict.path]);
  const [plain] = await zstdFrames([event], []);
  const [noId] = await zstdFrames([event], ["--no-dictID", "-D", legacyDict.path]);
  assert.equal(frameDictionaryId(legacy), LEGACY_DICTIONARY_ID);
  assert.equal(frameDictionaryId(v2), V2_DICTIONARY_ID);
  assert.equal(frameDictionaryId(plain), undefined);
  assert.equal(frameDictionaryId(noId), undefined);
  assert.equal(frameDictionaryId(encoder.encode("{}")), undefined);
  assert.equal(frameDictionaryId(new Uint8Array(0)), undefined);
  // Hand-made headers with 1- and 2-byte Dictionary_ID fields (flag 1 and 2), window byte 0.
  const magic = [0x28, 0xb5, 0x2f, 0xfd];
  assert.equal(frameDictionaryId(new Uint8Array([...magic, 0x01, 0x00, 0x7b, 0, 0, 0])), 123);
  assert.equal(frameDictionaryId(new Uint8Array([...magic, 0x02, 0x00, 0x39, 0x30, 0, 0, 0])), 12345);
  // A frame whose header names dictionary 123 is refused before decoding.
  const zstd = await createZstdDecoder(legacyDict.bytes);
  assert.match(
    decodeError(() => zstd.decode(new Uint8Array([...magic, 0x01, 0x00, 0x7b, 0x01, 0, 0]))).message,
    /frame was compressed with dictionary 123, but the decoder has dictionary 1612007021/,
  );
});

Deno.test("`dictionaryIdOf()` reads a structured dictionary's ID and rejects other bytes", async () => {
  const legacyDict = await legacyDictionary();
  const v2Dict = await v2Dictionary();
  assert.equal(dictionaryIdOf(legacyDict.bytes), LEGACY_DICTIONARY_ID);
  assert.equal(dictionaryIdOf(v2Dict.bytes), V2_DICTIONARY_ID);
  assert.throws(() => dictionaryIdOf(encoder.encode('{"did":"did:plc:x","kind":"commit"}')), TypeError);
  assert.throws(() => dictionaryIdOf(new Uint8Array([0x37, 0xa4, 0x30, 0xec])), TypeError);
});

Deno.test("`ZstdDecompressionStream` decodes several frames in order", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const frames = await zstdFrames(events, ["-D", legacyDict.path]);
  const collect = async (stream: ReadableStream<Uint8Array>): Promise<string[]> => {
    const out: string[] = [];
    for await (const chunk of stream) out.push(decoder.decode(chunk));
    return out;
  };
  const expected = events.map((event) => decoder.decode(event));
  // From a dictionary: the WebAssembly loads while the first chunk waits.
  assert.deepEqual(
    await collect(
      ReadableStream.from(frames).pipeThrough(new ZstdDecompressionStream({ dictionary: legacyDict.bytes })),
    ),
    expected,
  );
  // From a ready decoder.
  const ready = await createZstdDecoder(legacyDict.bytes);
  assert.deepEqual(
    await collect(ReadableStream.from(frames).pipeThrough(new ZstdDecompressionStream(ready))),
    expected,
  );
});

Deno.test("`ZstdDecompressionStream` errors on a bad frame, like DecompressionStream", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const frames = await zstdFrames(events.slice(0, 2), ["-D", legacyDict.path]);
  const stream = ReadableStream.from([frames[0], encoder.encode("garbage!"), frames[1]])
    .pipeThrough(new ZstdDecompressionStream({ dictionary: legacyDict.bytes }));
  const seen: Uint8Array[] = [];
  await assert.rejects(async () => {
    for await (const chunk of stream) seen.push(chunk);
  }, (error: unknown) => error instanceof ZstdDecodeError && error.reason === "corrupt");
  assert.deepEqual(seen, [events[0]]);

  // A dictionary that is not one, or a limit out of range, throws in the constructor, as
  // DecompressionStream does for an unknown format.
  assert.throws(() => new ZstdDecompressionStream({ dictionary: new Uint8Array(8) }), TypeError);
  assert.throws(
    () => new ZstdDecompressionStream({ dictionary: legacyDict.bytes, maxDecodedBytes: 0 }),
    RangeError,
  );
});

Deno.test("`ZstdDecompressionStream` takes chunks and hands them out as DecompressionStream does", async () => {
  const legacyDict = await legacyDictionary();
  const events = sampleEvents();
  const frames = await zstdFrames(events, ["-D", legacyDict.path]);
  const [a, b, c] = frames;
  // Any BufferSource goes in: a Uint8Array, an ArrayBuffer, a DataView, another typed array's view of
  // a frame in the middle of a larger buffer. An empty chunk is ignored.
  const padded = new Uint8Array(c.byteLength + 16);
  padded.set(c, 8);
  const chunks: (ArrayBufferView | ArrayBuffer)[] = [
    a,
    new Uint8Array(0),
    b.slice().buffer,
    new DataView(padded.buffer, 8, c.byteLength),
    new ArrayBuffer(0),
  ];
  const out: Uint8Array<ArrayBuffer>[] = [];
  for await (
    const chunk of ReadableStream.from(chunks).pipeThrough(
      new ZstdDecompressionStream({ dictionary: legacyDict.bytes }),
    )
  ) out.push(chunk);
  assert.deepEqual(
    out.map((chunk) => decoder.decode(chunk)),
    events.slice(0, 3).map((e) => decoder.decode(e)),
  );
  // Each chunk owns its buffer: transferring one leaves the others whole.
  for (const chunk of out) {
    assert.equal(chunk.byteOffset, 0);
    assert.equal(chunk.buffer.byteLength, chunk.byteLength);
  }
  const before = decoder.decode(out[1]);
  structuredClone(out[0].buffer, { transfer: [out[0].buffer] });
  assert.equal(decoder.decode(out[1]), before);

  // Anything else errors the stream, naming what it got.
  const wrong = ReadableStream.from(["not bytes"]).pipeThrough(
    new ZstdDecompressionStream({ dictionary: legacyDict.bytes }) as unknown as TransformStream<
      string,
      Uint8Array
    >,
  );
  await assert.rejects(async () => {
    for await (const _ of wrong) { /* drain */ }
  }, /Cannot decode a chunk of type string/);
});

Deno.test("zstd frames after skippable frames decode; a cut-off skippable frame is corrupt", async () => {
  const legacyDict = await legacyDictionary();
  const [event] = sampleEvents();
  const [frame] = await zstdFrames([event], ["-D", legacyDict.path]);
  const skippable = (magicLowNibble: number, payload: number[]) =>
    new Uint8Array([0x50 | magicLowNibble, 0x2a, 0x4d, 0x18, payload.length, 0, 0, 0, ...payload]);
  const zstd = await createZstdDecoder(legacyDict.bytes);
  const message = new Uint8Array([...skippable(0, [1, 2, 3]), ...skippable(15, []), ...frame]);
  assert.equal(decoder.decode(zstd.decode(message)), decoder.decode(event));
  assert.equal(frameDictionaryId(message), LEGACY_DICTIONARY_ID);
  const cut = new Uint8Array([0x50, 0x2a, 0x4d, 0x18, 200, 0, 0, 0, ...frame.subarray(0, 20)]);
  const error = decodeError(() => zstd.decode(cut));
  assert.equal(error.reason, "corrupt");
  assert.match(error.message, /skippable frame of 208 bytes is cut off after 28/);
});

Deno.test("`createZstdEncoder()` frames round-trip through the zstd CLI and the decoder", async () => {
  const legacyDict = await legacyDictionary();
  const v2Dict = await v2Dictionary();
  const events = sampleEvents();
  const zstd = await createZstdEncoder(legacyDict.bytes);
  assert.equal(zstd.dictionaryId, LEGACY_DICTIONARY_ID);
  assert.equal(zstd.level, 3);
  const decoderForFrames = await createZstdDecoder(legacyDict.bytes);
  for (const event of events) {
    const frame = zstd.encode(event);
    assert.equal(frameDictionaryId(frame), LEGACY_DICTIONARY_ID);
    // Frame_Content_Size_flag is set, so the size is recorded.
    assert.ok(frame[4] >> 6 !== 0 || (frame[4] & 0x20) !== 0);
    assert.ok(frame.length < event.length);
    assert.deepEqual(await zstdPipe(["-d", "-D", legacyDict.path, "-c"], frame), event);
    assert.deepEqual(decoderForFrames.decode(frame), event);
  }
  // The CLI refuses the frame without the dictionary: it really depends on it.
  const child = new Deno.Command("zstd", {
    args: ["-q", "-d", "-c"],
    stdin: "piped",
    stdout: "null",
    stderr: "null",
  })
    .spawn();
  const writer = child.stdin.getWriter();
  await writer.write(zstd.encode(events[0]));
  await writer.close();
  assert.notEqual((await child.status).code, 0);

  const v2 = await createZstdEncoder(v2Dict.bytes, 1);
  const frame = v2.encode(events[2]);
  assert.equal(frameDictionaryId(frame), V2_DICTIONARY_ID);
  assert.deepEqual(await zstdPipe(["-d", "-D", v2Dict.path, "-c"], frame), events[2]);
  assert.deepEqual(v2.encode(new Uint8Array(0)).length > 0, true);
  await assert.rejects(() => createZstdEncoder(legacyDict.bytes, 0), RangeError);
});

Deno.test("the encoder stores an input over 32 MiB in raw blocks: a frame the zstd CLI reads, and the decoder calls too large", async () => {
  const legacyDict = await legacyDictionary();
  const zstd = await createZstdEncoder(legacyDict.bytes);
  const big = new Uint8Array(33 * 1024 * 1024 + 123).map((_, i) => (i * 7) & 0xff);
  // (Before, encode() threw, and the server dropped every compressed connection at such an event.)
  const frame = zstd.encode(big);
  assert.equal(frameDictionaryId(frame), LEGACY_DICTIONARY_ID);
  // (Through files: a pipe both ways would fill up, as this test writes all before it reads.)
  const dir = await Deno.makeTempDir({ prefix: "jetfill_zstd_raw_" });
  try {
    await Deno.writeFile(`${dir}/big.zst`, frame);
    const { code, stderr } = await new Deno.Command("zstd", {
      args: ["-q", "-d", "-D", legacyDict.path, "-o", `${dir}/big`, `${dir}/big.zst`],
      stderr: "piped",
    }).output();
    assert.equal(code, 0, decoder.decode(stderr));
    assert.deepEqual(await Deno.readFile(`${dir}/big`), big);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  const zstdDecoder = await createZstdDecoder(legacyDict.bytes);
  assert.equal(decodeError(() => zstdDecoder.decode(frame)).reason, "too-large");
});
