import { basename } from 'node:path';
import { UsageError } from '../../shared/errors.ts';
import { OBJECTIVES } from '../../shared/placement/types.ts';
import { DEFAULT_LOAD_OPTIONS, type LoadOptions } from './types.ts';

/** What a load request may name and ask for, checked before anything is reserved (pure). */
export const NAME = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

export function defaultModelName(path: string): string {
  return basename(path).replace(/\.gguf$/i, '');
}

export function resolveLoadOptions(o: Partial<LoadOptions> | undefined): LoadOptions {
  const r: LoadOptions = {
    ctx: o?.ctx || DEFAULT_LOAD_OPTIONS.ctx,
    cacheType: o?.cacheType || DEFAULT_LOAD_OPTIONS.cacheType,
    parallel: o?.parallel || DEFAULT_LOAD_OPTIONS.parallel,
    pin: o?.pin ?? [],
    parallelism: o?.parallelism ?? DEFAULT_LOAD_OPTIONS.parallelism,
    allowUntunnelledRdma: o?.allowUntunnelledRdma ?? DEFAULT_LOAD_OPTIONS.allowUntunnelledRdma,
    ...(o?.promptTokens ? { promptTokens: o.promptTokens } : {}),
    ...(o?.objective ? { objective: o.objective } : {}),
  };
  if (!Number.isInteger(r.ctx) || r.ctx < 16 || r.ctx > 16_777_216) throw new UsageError(`invalid ctx ${r.ctx}: 16–16777216`);
  if (!Number.isInteger(r.parallel) || r.parallel < 1 || r.parallel > 256) throw new UsageError(`invalid parallel ${r.parallel}: 1–256`);
  if (r.promptTokens !== undefined && (!Number.isInteger(r.promptTokens) || r.promptTokens < 0 || r.promptTokens > 16_777_216)) throw new UsageError(`invalid prompt tokens ${r.promptTokens}: 0–16777216`);
  if (r.objective !== undefined && !OBJECTIVES.includes(r.objective)) throw new UsageError(`invalid objective "${r.objective}": ${OBJECTIVES.join(', ')}`);
  if (r.objective !== undefined && r.objective !== 'decode' && !r.promptTokens) throw new UsageError(`objective ${r.objective} needs a prompt length (prompt tokens)`);
  if (!['f16', 'q8_0', 'q4_0', 'f32', 'bf16'].includes(r.cacheType)) {
    throw new UsageError(`invalid cache type "${r.cacheType}": f16, q8_0, q4_0, f32 or bf16`);
  }
  return r;
}

/** Short, engine-id-safe prefix of this cluster's engines (engine ids: ≤ 64 of [A-Za-z0-9._-]). */
export function enginePrefix(clusterId: string): string {
  return `o${clusterId.replace(/[^A-Za-z0-9]/g, '').slice(0, 8)}-`;
}

