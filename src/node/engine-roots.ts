import { realpath, stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { cacheRoot } from '../shared/cache-dir.ts';
import { EngineRequestError, type EngineSpec } from './engine-spec.ts';

/**
 * Where a caller may point an engine: every path in a StartEngine / PrepareCache request must
 * resolve, after symlinks, inside one of the agent's roots (--models-dir, --state-dir, Orchard's
 * cache). The engine then gets the resolved path, so a symlink swapped afterwards changes nothing
 * it was told. `..` and symlinks out of the roots are refused with INVALID_ARGUMENT.
 */
export interface EngineRoots {
  readonly modelsDirs: readonly string[];
  readonly stateDir: string;
  /** Orchard's cache (models `orchard pull` fetched, MLX venvs); default cacheRoot(process.env). */
  readonly cacheDir?: string | undefined;
}

/** At most this many engines run on one node at a time (a flood of StartEngine cannot fork-bomb it). */
export const MAX_ENGINES = 32;

export function defaultCacheDir(): string {
  return cacheRoot(process.env, process.platform, homedir());
}

async function realRoots(r: EngineRoots): Promise<string[]> {
  const all = [...r.modelsDirs, r.stateDir, r.cacheDir ?? defaultCacheDir()];
  const out: string[] = [];
  for (const d of all) {
    const real = await realpath(d).catch(() => undefined);
    if (real !== undefined) out.push(real);
  }
  return out;
}

/**
 * The real path of `p`. A path that does not exist yet (a cache dir the engine creates) resolves
 * through its nearest existing ancestor, so a symlinked parent is still followed.
 */
async function realPathOf(p: string): Promise<string> {
  const abs = resolve(p); // normalises `..` lexically; realpath below then follows symlinks
  try {
    return await realpath(abs);
  } catch {
    const parent = dirname(abs);
    if (parent === abs) return abs;
    return join(await realPathOf(parent), basename(abs));
  }
}

function inside(path: string, root: string): boolean {
  return path === root || path.startsWith(root.endsWith(sep) ? root : root + sep);
}

/** `p` resolved inside the roots, or INVALID_ARGUMENT naming the field. */
export async function confinePath(what: string, p: string, roots: EngineRoots): Promise<string> {
  const real = await realPathOf(p);
  const allowed = await realRoots(roots);
  if (!allowed.some((r) => inside(real, r))) {
    const named = real === resolve(p) ? `"${p}"` : `"${p}" (resolves to ${real})`;
    throw new EngineRequestError(
      'INVALID_ARGUMENT',
      `${what} ${named} is outside this node's roots (${allowed.join(', ')}); put the file under --models-dir`,
    );
  }
  return real;
}

/** The spec with every path resolved inside the roots; the model file must also fit the budget. */
export async function confineEngineSpec(spec: EngineSpec, roots: EngineRoots, budgetBytes: number): Promise<EngineSpec> {
  if (spec.kind === 'rpc-server') {
    return spec.cacheDir === '' ? spec : { ...spec, cacheDir: await confinePath('cache_dir', spec.cacheDir, roots) };
  }
  if (spec.llama) {
    const modelPath = await confinePath('llama.model_path', spec.llama.modelPath, roots);
    const st = await stat(modelPath).catch(() => undefined);
    if (!st?.isFile()) throw new EngineRequestError('INVALID_ARGUMENT', `llama.model_path "${spec.llama.modelPath}" is not a file on this node`);
    // Remote stages hold part of it; the whole file is what an all-local head could map at most.
    if (budgetBytes > 0 && spec.llama.rpc.length === 0 && st.size > budgetBytes) {
      throw new EngineRequestError('INVALID_ARGUMENT', `llama.model_path is ${st.size} bytes, over this node's budget of ${budgetBytes} bytes`);
    }
    return { ...spec, llama: { ...spec.llama, modelPath } };
  }
  if (spec.mlx) {
    const modelDir = await confinePath('mlx.model_dir', spec.mlx.modelDir, roots);
    return { ...spec, mlx: { ...spec.mlx, modelDir } };
  }
  return spec;
}
