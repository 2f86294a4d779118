import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { promisify } from 'node:util';
import { errorMessage, OrchardError } from '../../shared/errors.ts';
import { missingToolMessage, type Tool } from './build-config.ts';

/** The tools a llama.cpp build needs, found on PATH, and how the build runs them. */

const exec = promisify(execFile);

/** First executable named `name` on PATH, or undefined. */
export async function which(name: string, env: NodeJS.ProcessEnv = process.env): Promise<string | undefined> {
  if (name.includes('/')) return (await isExecutable(name)) ? name : undefined;
  for (const dir of (env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, name);
    if (await isExecutable(p)) return p;
  }
  return undefined;
}

export async function isExecutable(p: string): Promise<boolean> {
  try {
    await access(p, constants.X_OK);
    return (await stat(p)).isFile();
  } catch {
    return false;
  }
}

export interface Toolchain {
  readonly cmake: string;
  readonly git: string;
  readonly cxx: string;
  readonly ninja: string | undefined;
  readonly nvcc: string | undefined;
}

/** Find the build tools; missing essentials → one OrchardError line naming what to install. */
export async function detectToolchain(env: NodeJS.ProcessEnv = process.env): Promise<Toolchain> {
  const [cmake, git, ninja, nvcc] = await Promise.all([which('cmake', env), which('git', env), which('ninja', env), findNvcc(env)]);
  let cxx: string | undefined;
  for (const c of [env.CXX, 'c++', 'g++', 'clang++']) {
    if (c && !cxx) cxx = await which(c, env);
  }
  const missing: Tool[] = [];
  if (!cmake) missing.push('cmake');
  if (!cxx) missing.push('c++ compiler');
  if (!git) missing.push('git');
  if (!cmake || !cxx || !git) throw new OrchardError(missingToolMessage(missing, process.platform));
  return { cmake, git, cxx, ninja, nvcc };
}

/** nvcc on PATH, or in CUDA_PATH / the usual /usr/local/cuda (often not on PATH). */
export async function findNvcc(env: NodeJS.ProcessEnv): Promise<string | undefined> {
  const onPath = await which('nvcc', env);
  if (onPath) return onPath;
  for (const root of [env.CUDA_PATH, env.CUDA_HOME, '/usr/local/cuda']) {
    if (root && (await isExecutable(join(root, 'bin', 'nvcc')))) return join(root, 'bin', 'nvcc');
  }
  return undefined;
}

/** Where a build's tools write, and the one tool running now (an interrupt stops its process group). */
export interface BuildLog {
  readonly stream: NodeJS.WritableStream;
  readonly path: string;
  readonly running: { child?: ChildProcess };
}

/** Run a tool, appending its output to the build log; failure → one line pointing at the log. */
export function runLogged(
  cmd: string,
  args: string[],
  what: string,
  buildLog: BuildLog,
  opts: { env?: NodeJS.ProcessEnv; onLine?: (line: string) => void } = {},
): Promise<void> {
  const { stream: log, path: logPath, running } = buildLog;
  const { env = process.env, onLine } = opts;
  log.write(`\n$ ${cmd} ${args.join(' ')}\n`);
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    running.child = child;
    const tail: string[] = [];
    const feed = (stream: NodeJS.ReadableStream) => {
      let rest = '';
      stream.on('data', (chunk: Buffer) => {
        log.write(chunk);
        const text = rest + chunk.toString('utf8');
        const lines = text.split(/\r?\n/);
        rest = lines.pop() ?? '';
        for (const line of lines) {
          onLine?.(line);
          tail.push(line);
          if (tail.length > 5) tail.shift();
        }
      });
    };
    feed(child.stdout);
    feed(child.stderr);
    child.on('error', (err) => reject(new OrchardError(`${what} could not start: ${errorMessage(err)}`)));
    child.on('close', (code, signal) => {
      if (code === 0) return resolve();
      const hint = tail.find((l) => /error/i.test(l))?.trim();
      reject(new OrchardError(`${what} failed (${signal ?? `exit ${code}`})${hint ? `: ${hint.slice(0, 200)}` : ''}; full log: ${logPath}`));
    });
  });
}

/** Run a binary and return stdout+stderr (llama.cpp tools print help on either). */
export async function runCapture(cmd: string, args: string[], timeoutMs = 15_000): Promise<string> {
  try {
    const { stdout, stderr } = await exec(cmd, args, { timeout: timeoutMs, maxBuffer: 8 * 2 ** 20 });
    return `${stdout}${stderr}`;
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; code?: unknown };
    throw new OrchardError(`${cmd} ${args.join(' ')} failed (${String(e.code ?? errorMessage(err))}): ${(e.stderr ?? '').trim().split('\n')[0] ?? ''}`);
  }
}
