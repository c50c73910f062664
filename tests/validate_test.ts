import assert from "node:assert/strict";
import { collectionMatcher, isCollectionFilter, isDid, isNsid } from "../src/validate.ts";

Deno.test("isDid() accepts did:plc and did:web and refuses the rest", () => {
  assert.ok(isDid("did:plc:q6gjnaw2blty4crticxkmujt"));
  assert.ok(isDid("did:web:example.com"));
  assert.ok(isDid("did:web:localhost%3A8080"));
  for (
    const bad of [
      "did:plc:short",
      "did:plc:Q6GJNAW2BLTY4CRTICXKMUJT",
      "did:key:z6Mk",
      "plc:abc",
      "did:web:",
      "",
    ]
  ) {
    assert.ok(!isDid(bad), bad);
  }
});

Deno.test("isNsid() and isCollectionFilter() follow Jetstream's rules", () => {
  assert.ok(isNsid("app.bsky.feed.post"));
  assert.ok(!isNsid("app.bsky"));
  assert.ok(!isNsid("app.bsky.feed.post-x"));
  assert.ok(isCollectionFilter("app.bsky.graph.*"));
  assert.ok(isCollectionFilter("app.*"));
  assert.ok(!isCollectionFilter("app.bsky.graph.fo*"));
  assert.ok(!isCollectionFilter("*"));
});

Deno.test("collectionMatcher() matches exact names and prefixes", () => {
  const m = collectionMatcher(["app.bsky.graph.*", "app.bsky.feed.post"]);
  assert.ok(m("app.bsky.graph.follow"));
  assert.ok(m("app.bsky.feed.post"));
  assert.ok(!m("app.bsky.feed.like"));
  assert.ok(collectionMatcher([])("anything.at.all"));
});
