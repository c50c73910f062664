/**
 * A real Deno KV whose atomic commits each wait `delayMs` before they run: a slow disk, without
 * touching the code under test. Used by the writer's tests and the bench's slow sink.
 *
 * @module
 */
import { patchAtomic } from "./kv_patch.ts";

/** Hooks around each delayed commit. */
export interface SlowKvHooks {
  /** Called when a commit is issued, before its delay. */
  started?: () => void;
  /** Called when a commit has landed or failed. */
  ended?: () => void;
}

/** `kv` with every `atomic().commit()` delayed by `delayMs`. */
export function slowKv(kv: Deno.Kv, delayMs: number, hooks: SlowKvHooks = {}): Deno.Kv {
  return patchAtomic(kv, (op, commit) => {
    op.commit = async () => {
      hooks.started?.();
      try {
        await new Promise((r) => setTimeout(r, delayMs));
        return await commit();
      } finally {
        hooks.ended?.();
      }
    };
  });
}
