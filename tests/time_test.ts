import assert from "node:assert/strict";
import { describeDuration, isoFromUs, parseTimestamp, usFromIso, utcDate } from "../src/time.ts";

Deno.test("parseTimestamp() reads YYYY-MM-DD as UTC midnight", () => {
  assert.equal(parseTimestamp("2024-01-01"), Date.UTC(2024, 0, 1) * 1000);
});

Deno.test("parseTimestamp() reads the years 0 to 99 as they are, not as 1900 to 1999", () => {
  // Date.UTC's two-digit years refused these as not YYYY-MM-DD.
  assert.equal(parseTimestamp("0050-06-01"), new Date("0050-06-01T00:00:00Z").getTime() * 1000);
  assert.equal(parseTimestamp("0000-01-01-00:00:01"), new Date("0000-01-01T00:00:01Z").getTime() * 1000);
  assert.equal(parseTimestamp("0099-12-31T23:59:59Z"), new Date("0099-12-31T23:59:59Z").getTime() * 1000);
  assert.equal(parseTimestamp("0099-02-29"), undefined);
});

Deno.test("parseTimestamp() reads the original YYYY-MM-DD-HH:MM:SS format as UTC", () => {
  assert.equal(parseTimestamp("2024-01-01-12:30:00"), Date.UTC(2024, 0, 1, 12, 30) * 1000);
  // As the original's strptime reads it, without leading zeros too (before, refused).
  assert.equal(parseTimestamp("2024-01-01-1:2:3"), Date.UTC(2024, 0, 1, 1, 2, 3) * 1000);
  assert.equal(parseTimestamp("2024-1-5-12:30:00"), Date.UTC(2024, 0, 5, 12, 30) * 1000);
  // Its YYYY-MM-DD alone is tried only on ten characters, as the original does.
  assert.equal(parseTimestamp("2024-1-5"), undefined);
  assert.equal(parseTimestamp("2024-01-01-123:00:00"), undefined);
});

Deno.test("parseTimestamp() reads ISO-8601 with Z, with offsets and with microseconds", () => {
  const noon = Date.UTC(2024, 0, 1, 12, 30) * 1000;
  assert.equal(parseTimestamp("2024-01-01T12:30:00Z"), noon);
  assert.equal(parseTimestamp("2024-01-01T14:30:00+02:00"), noon);
  assert.equal(parseTimestamp("2024-01-01T07:30:00-0500"), noon);
  assert.equal(parseTimestamp("2024-01-01T12:30:00.123456Z"), noon + 123456);
  assert.equal(parseTimestamp("2024-01-01T12:30:00.1Z"), noon + 100000);
  assert.equal(parseTimestamp("2024-01-01T12:30Z"), noon);
  // An offset of hours alone, a decimal comma, and the basic form without separators.
  assert.equal(parseTimestamp("2024-01-01T14:30:00+02"), noon);
  assert.equal(parseTimestamp("2024-01-01T12:30:00,5Z"), noon + 500000);
  assert.equal(parseTimestamp("20240101T123000Z"), noon);
  assert.equal(parseTimestamp("20240101T143000.25+0200"), noon + 250000);
  assert.equal(parseTimestamp("20240101T0730-05"), noon);
});

Deno.test("parseTimestamp() takes a time between two microseconds as the later one", () => {
  // An exclusive end of .6820351 leaves out what is at .682036 and keeps .682035; a start keeps
  // .682036 and not .682035.
  const noon = Date.UTC(2024, 0, 1, 12, 30) * 1000;
  assert.equal(parseTimestamp("2024-01-01T12:30:00.6820351Z"), noon + 682036);
  assert.equal(parseTimestamp("2024-01-01T12:30:00.682035000Z"), noon + 682035);
  assert.equal(parseTimestamp("2024-01-01T12:30:00.999999001Z"), noon + 1_000_000);
});

Deno.test("parseTimestamp() reads integer unix microseconds and refuses seconds or milliseconds", () => {
  assert.equal(parseTimestamp("1725911162329308"), 1725911162329308);
  assert.equal(parseTimestamp(1725911162329308), 1725911162329308);
  assert.equal(parseTimestamp("1725911162"), undefined);
  assert.equal(parseTimestamp("1725911162329"), undefined);
});

Deno.test("parseTimestamp() does not depend on the host time zone", () => {
  // The original used naive local datetimes; the same text must give the same instant anywhere.
  const tz = Deno.env.get("TZ");
  try {
    Deno.env.set("TZ", "America/Los_Angeles");
    assert.equal(parseTimestamp("2024-07-01-00:00:00"), Date.UTC(2024, 6, 1) * 1000);
    assert.equal(utcDate(Date.UTC(2024, 6, 1, 3) * 1000), "2024-07-01");
  } finally {
    if (tz === undefined) Deno.env.delete("TZ");
    else Deno.env.set("TZ", tz);
  }
});

Deno.test("parseTimestamp() refuses impossible dates, local times and other text", () => {
  for (
    const bad of [
      "2024-02-30",
      "2024-13-01",
      "2024-01-01T25:00:00Z",
      "2024-01-01T12:00:00",
      "20240101T120000",
      "20240230T120000Z",
      "2024-01-01T12:00:00+2",
      "2024-01-01T12:00:00+24",
      "20240101T12:00:00Z",
      "yesterday",
      "",
    ]
  ) {
    assert.equal(parseTimestamp(bad), undefined, bad);
  }
});

Deno.test("parseTimestamp() accepts a Date", () => {
  assert.equal(parseTimestamp(new Date(Date.UTC(2024, 0, 1))), Date.UTC(2024, 0, 1) * 1000);
});

Deno.test("utcDate() and isoFromUs() format in UTC with microseconds", () => {
  assert.equal(utcDate(1725911162329308), "2024-09-09");
  assert.equal(isoFromUs(1725911162329308), "2024-09-09T19:46:02.329308Z");
  assert.equal(usFromIso("2024-09-09T19:46:02.329308Z"), 1725911162329308);
});

Deno.test("usFromIso() reads the v2 wire's times as parseTimestamp() does, and refuses impossible ones", () => {
  // Its own path for the v2 spelling agrees with the general parser, leap days and centuries included.
  for (
    const t of [
      "2024-09-09T19:46:02.329308Z",
      "2024-02-29T00:00:00.000000Z",
      "2000-02-29T23:59:59.999999Z",
      "1970-01-01T00:00:00.000001Z",
      "2026-12-31T23:59:59.000000Z",
      "2100-03-01T12:00:00.500000Z",
    ]
  ) {
    assert.equal(usFromIso(t), parseTimestamp(t), t);
  }
  for (let us = 1_600_000_000_000_000; us < 1_900_000_000_000_000; us += 987_654_321_987) {
    assert.equal(usFromIso(isoFromUs(us)), us, isoFromUs(us));
  }
  for (
    const t of [
      "2023-02-29T00:00:00.000000Z",
      "1900-02-29T00:00:00.000000Z",
      "2024-04-31T00:00:00.000000Z",
      "2024-13-01T00:00:00.000000Z",
      "2024-00-01T00:00:00.000000Z",
      "2024-01-00T00:00:00.000000Z",
      "2024-01-01T24:00:00.000000Z",
      "2024-01-01T00:60:00.000000Z",
      "2024-01-01T00:00:60.000000Z",
      "2024-01-01T00:00:00.00000aZ",
      "2024-01-01T00:00:00.000000+",
      "2024-01-01 00:00:00.000000X",
    ]
  ) {
    assert.equal(usFromIso(t), undefined, t);
  }
  // Other ISO-8601 spellings still go through the general parser.
  assert.equal(usFromIso("2024-09-09T19:46:02.329Z"), 1725911162329000);
  assert.equal(usFromIso("2024-09-09T21:46:02.329308+02:00"), 1725911162329308);
  assert.equal(usFromIso("2024-09-09"), undefined);
});

Deno.test("describeDuration() says a span in the unit that shows it, never 0.0 s", () => {
  const cases: [number, string][] = [
    [400, "400 µs"],
    [17_249, "17 ms"],
    [99_499, "99 ms"],
    [250_000, "0.3 s"],
    [119_000_000, "119.0 s"],
    [600_000_000, "10.0 min"],
    [36_000_000_000, "10.0 h"],
    [259_200_000_000, "3.0 days"],
  ];
  for (const [us, said] of cases) assert.equal(describeDuration(us), said, String(us));
});
