/**
 * A real Deno KV whose atomic operations a test may patch as they are created: delay, log or fail
 * their commits, without touching the code under test.
 *
 * @module
 */

/** An atomic operation's own commit(). */
export type Commit = () => Promise<Deno.KvCommitResult | Deno.KvCommitError>;

/** `kv`, handing each new atomic operation and its own commit() to `patch` before returning it. */
export function patchAtomic(kv: Deno.Kv, patch: (op: Deno.AtomicOperation, commit: Commit) => void): Deno.Kv {
  return new Proxy(kv, {
    get(target, prop) {
      if (prop === "atomic") {
        return () => {
          const op = target.atomic();
          patch(op, op.commit.bind(op));
          return op;
        };
      }
      const v = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
}
