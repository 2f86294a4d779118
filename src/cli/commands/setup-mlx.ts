import type { Logger } from '../../shared/log.ts';
import { ensureMlxEnv, findMlxEnv, type MlxEnv } from '../../node/mlx/env.ts';

export interface MlxSetupOutput extends MlxEnv {
  /** created: made now; cache: an existing verified venv. */
  source: 'created' | 'cache' | 'external';
  seconds: number;
}

/**
 * The MLX part of `orchard setup`: with --mlx, find or create the pinned venv; without it, only
 * report an existing one (null when there is none), so `setup --json` always says whether the
 * MLX engine is available.
 */
export async function setupMlx(create: boolean, force: boolean, log: Logger): Promise<MlxSetupOutput | null> {
  const t0 = Date.now();
  const existing = force ? undefined : await findMlxEnv();
  if (existing) return { ...existing, source: process.env.ORCHARD_MLX_PYTHON ? 'external' : 'cache', seconds: 0 };
  if (!create) return null;
  const env = await ensureMlxEnv({ force, onProgress: (m) => log.info({ phase: 'mlx' }, m) });
  return { ...env, source: 'created', seconds: (Date.now() - t0) / 1000 };
}

export function describeMlx(m: MlxSetupOutput | null): string {
  if (!m) return 'MLX: not set up (run `orchard setup --mlx`)\n';
  const how = m.source === 'created' ? `created in ${m.seconds.toFixed(1)}s` : m.source === 'external' ? 'ORCHARD_MLX_PYTHON' : 'cached';
  return `MLX ${m.mlxVersion}, mlx-lm ${m.mlxLmVersion} on ${m.device} (${how})\n  python           ${m.python}\n`;
}
