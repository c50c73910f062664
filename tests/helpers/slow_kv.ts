/**
 * A real Deno KV whose atomic commits each wait `delayMs` before they run: a slow disk, without
 * touching the code under test. Used by the writer's tests and the bench's slow sink.
 *
 * @module
 */

/** Hooks around each delayed commit. */
export interface SlowKvHooks {
  /** Called when a commit is issued, before its delay. */
  started?: () => void;
  /** Called when a commit has landed or failed. */
  ended?: () => void;
}

/** `kv` with every `atomic().commit()` delayed by `delayMs`. */
export function slowKv(kv: Deno.Kv, delayMs: number, hooks: SlowKvHooks = {}): Deno.Kv {
  return new Proxy(kv, {
    get(target, prop) {
      if (prop === "atomic") {
        return () => {
          const op = target.atomic();
          const commit = op.commit.bind(op);
          op.commit = async () => {
            hooks.started?.();
            try {
              await new Promise((r) => setTimeout(r, delayMs));
              return await commit();
            } finally {
              hooks.ended?.();
            }
          };
          return op;
        };
      }
      const v = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
}
