import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { OrchardError } from '../../shared/errors.ts';
import { cacheRoot } from '../../shared/cache-dir.ts';

const run = promisify(execFile);

/**
 * The project-managed Python environment for the MLX engine: one venv per set of pins under
 * `<orchard cache>/mlx-venv-<hash of pins>`, so changing a pin never mutates a venv a running
 * worker uses; it makes a new one beside it.
 *
 * Pins: ≥ 0.32.1 because that release turns a silent ring hang on a lost peer into an exception
 * (notes/mlx-distributed.md). Linux has no binaries in plain `mlx` (they live in `mlx-cpu`,
 * pulled by the `[cpu]` extra); on macOS plain `mlx` carries Metal.
 */
export const MLX_VERSION = '0.32.4';
export const MLX_LM_VERSION = '0.32.2';

export function mlxPins(platform: NodeJS.Platform = process.platform): string[] {
  if (platform === 'darwin') return [`mlx==${MLX_VERSION}`, `mlx-lm==${MLX_LM_VERSION}`];
  return [`mlx[cpu]==${MLX_VERSION}`, `mlx-lm[cpu]==${MLX_LM_VERSION}`];
}

export function mlxVenvDir(env: NodeJS.ProcessEnv = process.env, platform: NodeJS.Platform = process.platform): string {
  const digest = createHash('sha256').update(mlxPins(platform).join('\n')).digest('hex').slice(0, 12);
  return join(cacheRoot(env, platform, homedir()), `mlx-venv-${digest}`);
}

export interface MlxEnv {
  /** The venv folder. */
  dir: string;
  /** The venv's Python interpreter; run workers with it. */
  python: string;
  mlxVersion: string;
  mlxLmVersion: string;
  pythonVersion: string;
  /** Whether `mx.distributed.is_available()` (ring backend compiled in). */
  distributed: boolean;
  /** The default MLX device as MLX names it (`Device(gpu, 0)` on Metal, `Device(cpu, 0)` on Linux). */
  device: string;
  pins: string[];
}

/**
 * Environment every MLX process gets on top of the caller's. On Linux the CPU JIT shells out to
 * g++ and has failed there, and the reference BLAS threads fight over the two cores; offline
 * flags make sure a model path never turns into a hub download.
 */
export function mlxProcessEnv(platform: NodeJS.Platform = process.platform): Record<string, string> {
  const env: Record<string, string> = {
    HF_HUB_OFFLINE: '1',
    TRANSFORMERS_OFFLINE: '1',
    TOKENIZERS_PARALLELISM: 'false',
    PYTHONUNBUFFERED: '1',
    PYTHONDONTWRITEBYTECODE: '1',
    // transformers warns on stderr when no torch/tf is installed; MLX needs neither.
    TRANSFORMERS_VERBOSITY: 'error',
  };
  if (platform !== 'darwin') {
    env.MLX_DISABLE_COMPILE = '1';
    env.OMP_NUM_THREADS = '1';
    env.OPENBLAS_NUM_THREADS = '1';
  }
  return env;
}

const PROBE = [
  'import json, sys, mlx.core as mx, mlx_lm',
  'print(json.dumps({"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,',
  ' "python": sys.version.split()[0], "distributed": bool(mx.distributed.is_available()),',
  ' "device": str(mx.default_device())}))',
].join('\n');

const probeSchema = (v: unknown): v is { mlx: string; mlx_lm: string; python: string; distributed: boolean; device: string } =>
  typeof v === 'object' && v !== null && 'mlx' in v && 'mlx_lm' in v && 'python' in v;

async function probe(dir: string, platform: NodeJS.Platform, python = venvPython(dir, platform)): Promise<MlxEnv> {
  const { stdout } = await run(python, ['-c', PROBE], {
    env: { ...process.env, ...mlxProcessEnv(platform) },
    timeout: 120_000,
  });
  const parsed: unknown = JSON.parse(stdout.trim().split('\n').pop() ?? '');
  if (!probeSchema(parsed)) throw new OrchardError(`MLX probe in ${dir} printed unexpected output: ${stdout.trim()}`);
  return {
    dir,
    python,
    mlxVersion: parsed.mlx,
    mlxLmVersion: parsed.mlx_lm,
    pythonVersion: parsed.python,
    distributed: parsed.distributed,
    device: parsed.device,
    pins: mlxPins(platform),
  };
}

function venvPython(dir: string, platform: NodeJS.Platform): string {
  return platform === 'win32' ? join(dir, 'Scripts', 'python.exe') : join(dir, 'bin', 'python');
}

/** A marker written only after the venv passed its import check, so a half-built venv is never used. */
const MARKER = 'orchard-mlx-env.json';

/**
 * The ready MLX env, or undefined when none is set up. `ORCHARD_MLX_PYTHON` points at an existing
 * interpreter instead (a user-managed venv); it is still verified by importing mlx.
 */
export async function findMlxEnv(
  env: NodeJS.ProcessEnv = process.env,
  platform: NodeJS.Platform = process.platform,
): Promise<MlxEnv | undefined> {
  if (env.ORCHARD_MLX_PYTHON) {
    const python = env.ORCHARD_MLX_PYTHON;
    try {
      // Verify the interpreter the user named, not whatever sits in a guessed venv folder.
      return await probe(join(python, '..', '..'), platform, python);
    } catch (err) {
      throw new OrchardError(`ORCHARD_MLX_PYTHON=${python} cannot import mlx/mlx_lm: ${firstLine(err)}`);
    }
  }
  const dir = mlxVenvDir(env, platform);
  if (!existsSync(join(dir, MARKER))) return undefined;
  try {
    return JSON.parse(await readFile(join(dir, MARKER), 'utf8')) as MlxEnv;
  } catch {
    return undefined;
  }
}

export interface EnsureMlxEnvOptions {
  env?: NodeJS.ProcessEnv;
  platform?: NodeJS.Platform;
  /** Python used to create the venv (default `python3`, or $ORCHARD_PYTHON). Needs ≥ 3.10. */
  basePython?: string;
  /** Called with one-line progress messages. */
  onProgress?: (message: string) => void;
  /** Recreate even when a verified venv exists. */
  force?: boolean;
}

/**
 * Find or create the pinned MLX venv: `python3 -m venv` into a temporary sibling folder, pip
 * install the pins, import-check, write the marker, then rename into place, so concurrent or
 * interrupted runs never leave a half-built venv under the final name.
 */
export async function ensureMlxEnv(opts: EnsureMlxEnvOptions = {}): Promise<MlxEnv> {
  const env = opts.env ?? process.env;
  const platform = opts.platform ?? process.platform;
  if (!opts.force) {
    const found = await findMlxEnv(env, platform);
    if (found) return found;
  }
  const dir = mlxVenvDir(env, platform);
  const tmp = `${dir}.tmp-${process.pid}-${Date.now()}`;
  const basePython = opts.basePython ?? env.ORCHARD_PYTHON ?? 'python3';
  const say = opts.onProgress ?? (() => {});
  await mkdir(join(dir, '..'), { recursive: true });
  try {
    say(`creating venv with ${basePython}`);
    await checkBasePython(basePython);
    await run(basePython, ['-m', 'venv', tmp], { timeout: 300_000 });
    const python = venvPython(tmp, platform);
    say(`installing ${mlxPins(platform).join(' ')}`);
    await run(python, ['-m', 'pip', 'install', '--disable-pip-version-check', '--no-input', '-q', ...mlxPins(platform)], {
      timeout: 1_800_000,
      maxBuffer: 64 * 1024 * 1024,
    }).catch((err: unknown) => {
      throw new OrchardError(`pip install of ${mlxPins(platform).join(' ')} failed: ${lastLines(err)}`);
    });
    say('checking that mlx imports');
    const checked = await probe(tmp, platform);
    if (checked.mlxVersion !== MLX_VERSION) {
      throw new OrchardError(`venv has mlx ${checked.mlxVersion}, expected the pinned ${MLX_VERSION}`);
    }
    const result = { ...checked, dir, python: venvPython(dir, platform) };
    await writeFile(join(tmp, MARKER), `${JSON.stringify(result, null, 2)}\n`);
    if (opts.force) await rm(dir, { recursive: true, force: true });
    // venvs hard-code their own path in scripts, but `bin/python` is a symlink and works from
    // anywhere; we only ever run `bin/python -c/-m ...`, never the console scripts.
    await rename(tmp, dir).catch(async (err: NodeJS.ErrnoException) => {
      // Someone else finished first: use theirs (it carries its own verified marker).
      if (err.code === 'ENOTEMPTY' || err.code === 'EEXIST') await rm(tmp, { recursive: true, force: true });
      else throw err;
    });
    return result;
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    if (err instanceof OrchardError) throw err;
    throw new OrchardError(`could not set up the MLX environment in ${dir}: ${firstLine(err)}`);
  }
}

async function checkBasePython(python: string): Promise<void> {
  let out: string;
  try {
    out = (await run(python, ['-c', 'import sys; print("%d.%d" % sys.version_info[:2])'])).stdout.trim();
  } catch (err) {
    throw new OrchardError(`cannot run ${python} to create the MLX venv: ${firstLine(err)}`);
  }
  const [major = 0, minor = 0] = out.split('.').map(Number);
  if (major < 3 || (major === 3 && minor < 10)) {
    throw new OrchardError(`MLX wheels need Python ≥ 3.10; ${python} is ${out} (set ORCHARD_PYTHON)`);
  }
}

function firstLine(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).split('\n')[0] ?? '';
}

function lastLines(err: unknown): string {
  const e = err as { stderr?: string; message?: string };
  const text = (e.stderr || e.message || String(err)).trim().split('\n');
  return text.slice(-3).join(' | ');
}
