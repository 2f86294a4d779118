import { CoordinatorError } from '../errors.ts';
import type { Logger } from '../../shared/log.ts';
import { engineRequest, grpcMessage } from './driver.ts';
import { continuation } from './healing.ts';
import type { Instance } from './instance.ts';
import type { GenerateEvent, GenerateRequest } from './types.ts';

/**
 * The request path of one instance: a slot, the head engine's token stream, and — when the
 * instance loses its engines mid-stream and heals — the same request continued on the new
 * engines with the tokens already delivered (healing.ts `continuation`), so the caller sees a
 * pause, not an error, and greedy output equals an undisturbed run.
 */
export interface RequestContext {
  readonly log: Logger;
  /** How long a request waits for a recovering instance. */
  readonly waitMs: number;
  /** A node's name for messages. */
  nodeName(nodeId: string): string;
  /** A stream continued on the healed instance. */
  resumed(model: string): void;
}

/** One request on `inst` (Runtime.generate says what it throws); resumes across a recovery. */
export async function* serveRequest(inst: Instance, req: GenerateRequest, signal: AbortSignal | undefined, ctx: RequestContext): AsyncGenerator<GenerateEvent> {
  const ctl = new AbortController();
  const onCallerAbort = () => ctl.abort(new CoordinatorError('CANCELLED', 'request cancelled by the client'));
  if (signal?.aborted) onCallerAbort();
  signal?.addEventListener('abort', onCallerAbort, { once: true });
  let release: (() => void) | undefined;
  inst.active.add(ctl);
  const base = engineRequest(req);
  const delivered: number[] = [];
  try {
    release = await inst.slots.acquire(ctl.signal);
    for (;;) {
      await whenServing(inst, ctl.signal, ctx.waitMs);
      const { epoch, group, failed } = inst;
      const head = group.head;
      if (!head) throw new CoordinatorError('UNAVAILABLE', inst.error || `model "${inst.name}" is not ready`);
      const next = continuation(base, delivered);
      if (!next) return;
      const before = delivered.length;
      const call = await group.generate(next);
      const cancel = () => call.cancel();
      ctl.signal.addEventListener('abort', cancel, { once: true });
      inst.calls.add(call);
      try {
        for await (const ev of call) {
          if (ctl.signal.aborted) break;
          if (ev.kind === 'token') delivered.push(...ev.tokenIds);
          yield ev.kind === 'done' && before > 0 ? { ...ev, completionTokens: ev.completionTokens + before, promptTokens: Math.max(0, ev.promptTokens - before) } : ev;
        }
        if (ctl.signal.aborted) throw ctl.signal.reason;
        return;
      } catch (err) {
        if (ctl.signal.aborted) throw ctl.signal.reason;
        const why = await streamError(failed, head.nodeId, err, ctx);
        // Lost with its engines while the instance heals: continue where it stopped.
        if (inst.epoch === epoch || (inst.state !== 'recovering' && inst.state !== 'ready')) throw why;
        ctx.log.info({ model: inst.name, delivered: delivered.length }, 'resuming a stream on the healed instance');
        ctx.resumed(inst.name);
      } finally {
        ctl.signal.removeEventListener('abort', cancel);
        inst.calls.delete(call);
        call.cancel();
      }
    }
  } finally {
    signal?.removeEventListener('abort', onCallerAbort);
    release?.();
    inst.active.delete(ctl);
  }
}

/** Returns once the instance is ready; waits (bounded) while it recovers; throws when it cannot serve. */
async function whenServing(inst: Instance, signal: AbortSignal, waitMs: number): Promise<void> {
  if (inst.state === 'recovering' && inst.serving) {
    let timer: NodeJS.Timeout | undefined;
    const waitS = Math.round(waitMs / 1000);
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new CoordinatorError('UNAVAILABLE', `model "${inst.name}" is still recovering after ${waitS} s: ${inst.error}`)), waitMs);
    });
    const aborted = new Promise<never>((_, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true }));
    try {
      await Promise.race([inst.serving.promise, late, aborted]);
    } finally {
      clearTimeout(timer);
    }
  }
  if (signal.aborted) throw signal.reason;
  if (inst.state === 'ready') return;
  if (inst.state === 'failed') throw new CoordinatorError('UNAVAILABLE', `model "${inst.name}" failed: ${inst.error}`);
  throw new CoordinatorError('UNAVAILABLE', inst.error || `model "${inst.name}" is ${inst.state}`);
}

/** Why the head's token stream broke, as the caller should hear it. */
async function streamError(failed: Promise<string>, headNodeId: string, err: unknown, ctx: RequestContext): Promise<unknown> {
  // The engine refused the request itself (e.g. a prompt longer than the context): the
  // caller's fault, not a broken stage.
  const code = (err as { code?: unknown }).code;
  if (code === 3) return new CoordinatorError('INVALID_ARGUMENT', grpcMessage(err));
  if (code === 8) return new CoordinatorError('RESOURCE_EXHAUSTED', grpcMessage(err));
  // The head's stream broke. Usually a stage died; give membership a moment to say which.
  const reason = await Promise.race([failed, new Promise<undefined>((r) => setTimeout(r, 1000))]);
  if (reason) return new CoordinatorError('UNAVAILABLE', reason);
  return new CoordinatorError('UNAVAILABLE', `generation on ${ctx.nodeName(headNodeId)} failed: ${grpcMessage(err)}`);
}

/** The instance a request names (or the only one serving); throws what Runtime.generate documents. */
export function pickInstance(instances: ReadonlyMap<string, Instance>, model: string | undefined): Instance {
    if (model) {
      const i = instances.get(model);
      if (!i) throw new CoordinatorError('NOT_FOUND', `no model named "${model}" (loaded: ${[...instances.keys()].join(', ') || 'none'})`);
      if (i.state === 'failed') throw new CoordinatorError('UNAVAILABLE', `model "${model}" failed: ${i.error}`);
      // A recovering instance takes requests: they wait (bounded) for it to serve again.
      if (i.state !== 'ready' && i.state !== 'recovering') throw new CoordinatorError('FAILED_PRECONDITION', `model "${model}" is ${i.state}`);
      return i;
    }
    const ready = [...instances.values()].filter((i) => i.state === 'ready' || i.state === 'recovering');
    if (ready.length === 1) return ready[0]!;
    if (ready.length === 0) {
      const failed = [...instances.values()].find((i) => i.state === 'failed');
      if (failed) throw new CoordinatorError('UNAVAILABLE', `model "${failed.name}" failed: ${failed.error}`);
      throw new CoordinatorError('FAILED_PRECONDITION', 'no model is loaded: run `orchard load MODEL.gguf` first');
    }
    throw new CoordinatorError('INVALID_ARGUMENT', `several models are loaded (${ready.map((i) => i.name).join(', ')}): choose one with --model`);
  }
