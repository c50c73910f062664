/**
 * jetfill: a faithful slice of the Bluesky firehose, from Jetstream into a Deno KV queue.
 *
 * @example
 * ```ts
 * import { consume, runBackfillSync } from "@jetfill/jetfill";
 *
 * const stats = await runBackfillSync({
 *   wantedCollections: ["app.bsky.feed.post"],
 *   startTimestamp: "2026-11-28",
 *   numRecords: 1000,
 *   kv: "./posts.sqlite",
 * });
 * console.log(stats.recordsStored, stats.stopReason);
 *
 * // Take the events out again: one handler call per queue message, at least once.
 * await consume({
 *   kv: "./posts.sqlite",
 *   untilEmpty: true,
 *   handler: (events) => {
 *     for (const event of events) console.log(event.did, event.time_us);
 *   },
 * });
 * ```
 *
 * @module
 */
export { runBackfillSync } from "./src/backfill.ts";
export {
  type BackfillSyncOptions,
  instanceUrl,
  MAX_WANTED_COLLECTIONS,
  MAX_WANTED_DIDS,
  PUBLIC_INSTANCES,
  type ResolvedSyncOptions,
  resolveSyncOptions,
} from "./src/options.ts";
export type {
  DateChange,
  SkipReason,
  StopReason,
  SyncErrorReport,
  SyncProgress,
  SyncStats,
} from "./src/stats.ts";
export { decodeQueueMessage, isQueueMessage, type QueueMessage, repackMessage } from "./src/queue/message.ts";
export {
  type Checkpoint,
  KV_PAGE_SIZE,
  openKvAt,
  readCheckpoint,
  type RunState,
  type TailKeys,
} from "./src/queue/kv_queue.ts";
export {
  ACK_DEADLINE_MS,
  consume,
  type ConsumeContext,
  type ConsumeErrorReason,
  type ConsumeErrorReport,
  type ConsumeHandler,
  type ConsumeOptions,
  type ConsumeResult,
  type ConsumeStopReason,
  DEDUPE_WINDOW_MS,
  HOLD_TARGET_MS,
  KV_REDELIVERY_DEADLINE_MS,
} from "./src/queue/consume.ts";
export { type DeadLetter, deadLetters, requeueDeadLetters } from "./src/queue/dead_letters.ts";
export { PARK_CONFIRM_MS, PARK_HEARTBEAT_MS, PARK_STALE_MS, requeueParked } from "./src/queue/parking.ts";
export { queueLength, type QueueStatus, queueStatus } from "./src/queue/status.ts";
export type {
  AccountEvent,
  CommitData,
  CommitEvent,
  CommitOperation,
  EventBase,
  EventKind,
  IdentityEvent,
  JetstreamEvent,
} from "./src/jetstream/events.ts";
export {
  createZstdDecoder,
  createZstdEncoder,
  DEFAULT_MAX_DECODED_BYTES,
  dictionaryIdOf,
  frameDictionaryId,
  LEGACY_DICTIONARY_ID,
  V2_DICTIONARY_ID,
  ZstdDecodeError,
  type ZstdDecodeErrorReason,
  type ZstdDecoder,
  type ZstdDecoderOptions,
  ZstdDecompressionStream,
  type ZstdDecompressionStreamInit,
  type ZstdEncoder,
} from "./src/jetstream/zstd.ts";
export {
  DEFAULT_DICTIONARY_URLS,
  LEGACY_DICTIONARY_SHA256,
  type ResolvedZstdDictionary,
  resolveZstdDictionary,
  type ResolveZstdDictionaryOptions,
  ZSTD_DICTIONARY_ENV,
  type ZstdDictionarySource,
} from "./src/jetstream/dictionary.ts";
export { UsageError } from "./src/errors.ts";
export { ConcurrentWriterError } from "./src/queue/writer.ts";
export { isoFromUs, parseTimestamp, TIMESTAMP_FORMATS, utcDate } from "./src/time.ts";
export {
  type ConnectionRecord,
  type ErrorAfter,
  type JetstreamServer,
  type JetstreamServerOptions,
  serveJetstream,
  type ServerVersion,
} from "./src/server/server.ts";
export type { ServerFaults } from "./src/server/faults.ts";
export type { OptionsUpdatePayload, SubscribeParams } from "./src/server/options.ts";
export type { SubscribeEventsParams } from "./src/server/v2_options.ts";
export type { V2ErrorName } from "./src/server/v2_frames.ts";
export { type CaptureEvent, loadCapture, parseCapture } from "./src/server/capture.ts";
export { generateCapture, type GenerateCaptureOptions } from "./src/server/synth.ts";
