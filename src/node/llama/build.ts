import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants, createWriteStream } from 'node:fs';
import { access, chmod, copyFile, mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { availableParallelism, homedir, hostname } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { z } from 'zod';
import { cacheRoot } from '../../shared/cache-dir.ts';
import { errorMessage, OrchardError } from '../../shared/errors.ts';
import { findLlamaSource, type LlamaSource } from '../../shared/llama-source.ts';

/*
 * Building llama.cpp engines with RPC from the source the node-llama-cpp package ships.
 *
 * Pure core first (cache layout, cmake arguments, progress parsing, version parsing), then the
 * I/O that drives git/cmake. Decisions worth knowing:
 *  - BUILD_SHARED_LIBS=OFF: the two executables are self-contained, so the cache entry can be
 *    built in a temp dir and renamed into place without rpaths pointing at a build tree.
 *  - LLAMA_USE_PREBUILT_UI=OFF: llama.cpp would otherwise try to download the web UI from
 *    Hugging Face during the build. Setup must work offline; Orchard uses the HTTP API only.
 *  - LLAMA_OPENSSL=OFF: llama-server is bound to 127.0.0.1 behind the node agent; TLS inside it
 *    is never used, and the result should not depend on whether libssl-dev happens to exist.
 *  - GGML_NATIVE stays at llama.cpp's default (ON): the cache is per user and per machine, and
 *    native code is markedly faster on CPU. The host architecture is part of the cache key.
 */

export const ENGINE_TARGETS = ['ggml-rpc-server', 'llama-server'] as const;
/** Names the RPC server has had: llama.cpp's own build calls it ggml-rpc-server, older builds and some packages rpc-server. */
export const RPC_SERVER_NAMES = ['ggml-rpc-server', 'rpc-server'] as const;

export interface BuildHost {
  readonly platform: NodeJS.Platform;
  readonly arch: string;
  /** A CUDA toolkit (nvcc) was found. */
  readonly cuda: boolean;
}

/** cmake cache definitions; the key is the variable name, the value what follows `=`. */
export type CmakeDefines = Readonly<Record<string, string>>;

export function cmakeDefines(host: BuildHost): CmakeDefines {
  const defines: Record<string, string> = {
    GGML_RPC: 'ON',
    LLAMA_CURL: 'OFF',
    LLAMA_BUILD_TESTS: 'OFF',
    LLAMA_BUILD_EXAMPLES: 'OFF',
    CMAKE_BUILD_TYPE: 'Release',
    BUILD_SHARED_LIBS: 'OFF',
    LLAMA_USE_PREBUILT_UI: 'OFF',
    LLAMA_OPENSSL: 'OFF',
  };
  // Metal is llama.cpp's default on macOS; stating it makes the cache key say what was built.
  if (host.platform === 'darwin') defines.GGML_METAL = 'ON';
  if (host.cuda) defines.GGML_CUDA = 'ON';
  return defines;
}

export type Generator = 'Ninja' | 'Unix Makefiles';

export function cmakeConfigureArgs(sourceDir: string, buildDir: string, defines: CmakeDefines, generator: Generator): string[] {
  const args = ['-S', sourceDir, '-B', buildDir, '-G', generator];
  for (const [name, value] of Object.entries(defines).sort(([a], [b]) => a.localeCompare(b))) args.push(`-D${name}=${value}`);
  return args;
}

export function cmakeBuildArgs(buildDir: string, jobs: number): string[] {
  return ['--build', buildDir, '--target', ...ENGINE_TARGETS, '--parallel', String(jobs)];
}

/**
 * Directory name of a cache entry: `<version>-<hash>`, where the hash covers everything that
 * changes the binaries (platform, architecture, cmake definitions) but not the generator or the
 * job count, which do not.
 */
export function cacheKey(version: string, host: Pick<BuildHost, 'platform' | 'arch'>, defines: CmakeDefines): string {
  const sorted = Object.fromEntries(Object.entries(defines).sort(([a], [b]) => a.localeCompare(b)));
  const digest = createHash('sha256')
    .update(JSON.stringify({ platform: host.platform, arch: host.arch, defines: sorted }))
    .digest('hex')
    .slice(0, 12);
  return `${safeName(version)}-${digest}`;
}

function safeName(s: string): string {
  return s.replace(/[^A-Za-z0-9._+]/g, '_');
}


/** Folder holding one directory per built engine version: `<root>/llama`. */
export function llamaCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  return join(cacheRoot(env, process.platform, homedir()), 'llama');
}

export type BuildProgress = { readonly done: number; readonly total: number } | { readonly percent: number };

/**
 * One line of build output → progress, if it carries any. Ninja prints `[12/345] Building CXX …`,
 * make prints `[ 45%] Building CXX …`. Both are what cmake --build passes through.
 */
export function parseProgressLine(line: string): BuildProgress | null {
  const ninja = /^\s*\[(\d+)\/(\d+)\]/.exec(line);
  if (ninja) {
    const done = Number(ninja[1]);
    const total = Number(ninja[2]);
    if (total > 0 && done <= total) return { done, total };
    return null;
  }
  const make = /^\s*\[\s*(\d{1,3})%\]/.exec(line);
  if (make) {
    const percent = Number(make[1]);
    if (percent <= 100) return { percent };
  }
  return null;
}

/** Progress as a fraction in [0, 1]. */
export function progressFraction(p: BuildProgress): number {
  return 'percent' in p ? p.percent / 100 : p.done / p.total;
}

export type Tool = 'cmake' | 'git' | 'c++ compiler';

/** What to install when a build tool is missing, as one line. */
export function missingToolMessage(missing: readonly Tool[], platform: NodeJS.Platform): string {
  const list = missing.join(', ');
  if (platform === 'darwin') {
    const steps: string[] = [];
    if (missing.includes('c++ compiler') || missing.includes('git')) steps.push('xcode-select --install');
    if (missing.includes('cmake')) steps.push('brew install cmake');
    return `cannot build llama.cpp: ${list} not found; install with: ${steps.join(' && ')}`;
  }
  const pkgs = missing.map((t) => (t === 'c++ compiler' ? 'g++' : t));
  return `cannot build llama.cpp: ${list} not found; install with: sudo apt-get install -y ${pkgs.join(' ')} (or your distribution's equivalent)`;
}

/** `llama-server --help` of a build with RPC lists the `--rpc` option. */
export function helpListsRpc(helpText: string): boolean {
  return /(^|[\s,])--rpc[\s,]/m.test(helpText);
}

/**
 * `llama-server --version` → a version string, or undefined. Two formats exist:
 * `version: 0.5.0-dev (build 1, commit de3ff81)` (semver releases) → `0.5.0-dev+de3ff81`,
 * `version: 6672 (de3ff81)` (build-number releases, e.g. Homebrew until 2026) → `b6672+de3ff81`.
 */
export function parseServerVersion(text: string): string | undefined {
  const semver = /version:\s*(\S+)\s*\(build\s*\d+,\s*commit\s*([0-9a-f]+)\)/.exec(text);
  if (semver) return `${semver[1]}+${semver[2]}`;
  const build = /version:\s*(\d+)\s*\(([0-9a-f]+)\)/.exec(text);
  return build ? `b${build[1]}+${build[2]}` : undefined;
}

/** What `orchard setup` records next to the binaries; also what findLlamaBinaries reads back. */
export const ManifestSchema = z.object({
  llamaCppVersion: z.string(),
  commit: z.string(),
  platform: z.string(),
  arch: z.string(),
  defines: z.record(z.string(), z.string()),
  builtAt: z.string(),
  buildSeconds: z.number(),
  llamaServer: z.string(),
  rpcServer: z.string(),
});
export type Manifest = z.infer<typeof ManifestSchema>;

// ───────────────────────────── I/O below ─────────────────────────────

const exec = promisify(execFile);

async function exists(p: string): Promise<boolean> {
  try {
    await access(p);
    return true;
  } catch {
    return false;
  }
}

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

async function isExecutable(p: string): Promise<boolean> {
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
async function findNvcc(env: NodeJS.ProcessEnv): Promise<string | undefined> {
  const onPath = await which('nvcc', env);
  if (onPath) return onPath;
  for (const root of [env.CUDA_PATH, env.CUDA_HOME, '/usr/local/cuda']) {
    if (root && (await isExecutable(join(root, 'bin', 'nvcc')))) return join(root, 'bin', 'nvcc');
  }
  return undefined;
}

/** Read a cache entry; undefined when absent, incomplete or for another platform. */
export async function readCacheEntry(dir: string): Promise<Manifest | undefined> {
  let manifest: Manifest;
  try {
    manifest = ManifestSchema.parse(JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8')));
  } catch {
    return undefined;
  }
  if (manifest.platform !== process.platform || manifest.arch !== process.arch) return undefined;
  for (const p of [manifest.llamaServer, manifest.rpcServer]) if (!(await isExecutable(join(dir, p)))) return undefined;
  return manifest;
}

/** All complete entries of the engine cache, newest build first. */
export async function listCacheEntries(root = llamaCacheDir()): Promise<Array<{ dir: string; manifest: Manifest }>> {
  let names: string[];
  try {
    names = await readdir(root);
  } catch {
    return [];
  }
  const entries: Array<{ dir: string; manifest: Manifest }> = [];
  for (const name of names) {
    if (name.startsWith('.') || name === 'logs') continue;
    const dir = join(root, name);
    const manifest = await readCacheEntry(dir);
    if (manifest) entries.push({ dir, manifest });
  }
  return entries.sort((a, b) => b.manifest.builtAt.localeCompare(a.manifest.builtAt));
}

export interface SetupResult {
  readonly llamaServer: string;
  readonly rpcServer: string;
  readonly llamaCppVersion: string;
  readonly binDir: string;
  readonly cached: boolean;
  readonly buildSeconds: number;
  readonly options: Record<string, string>;
}

export interface BuildEvents {
  /** A human-readable phase: cloning, configuring, building, installing. */
  phase?(name: string, detail?: string): void;
  progress?(p: BuildProgress): void;
  /** Another setup holds the lock; we wait for it. */
  waiting?(holder: LockHolder): void;
}

export interface BuildRequest {
  readonly force?: boolean;
  readonly jobs?: number;
  readonly env?: NodeJS.ProcessEnv;
  readonly events?: BuildEvents;
}

/** The cache entry this host and source would produce (no I/O beyond reading the bundle header and PATH). */
export async function expectedCacheEntry(env: NodeJS.ProcessEnv = process.env): Promise<{ dir: string; source: LlamaSource; defines: CmakeDefines }> {
  const source = await findLlamaSource();
  const cuda = (await findNvcc(env)) !== undefined;
  const defines = cmakeDefines({ platform: process.platform, arch: process.arch, cuda });
  return { dir: join(llamaCacheDir(env), cacheKey(source.version, process, defines)), source, defines };
}

/**
 * Build (or find in the cache) the llama.cpp engines. Concurrent callers serialise on a lock
 * file per cache entry; the one that waits finds the finished entry and returns it.
 */
export async function setupLlama(req: BuildRequest = {}): Promise<SetupResult> {
  const env = req.env ?? process.env;
  const events = req.events ?? {};
  const { dir, source, defines } = await expectedCacheEntry(env);
  if (!req.force) {
    const hit = await readCacheEntry(dir);
    if (hit) return resultFrom(dir, hit, true);
  }
  const toolchain = await detectToolchain(env);
  const root = dirname(dir);
  await mkdir(root, { recursive: true });
  const lock = await acquireLock(`${dir}.lock`, events);
  try {
    if (!req.force || lock.waited) {
      // Someone else may have built it while we waited (a forced run that waited accepts their fresh build too).
      const hit = await readCacheEntry(dir);
      if (hit) return resultFrom(dir, hit, true);
    }
    await removeStaleBuildDirs(root);
    const manifest = await buildInto(dir, source, defines, toolchain, req.jobs ?? availableParallelism(), events, `${dir}.lock`);
    return resultFrom(dir, manifest, false);
  } finally {
    await lock.release();
  }
}

function resultFrom(dir: string, m: Manifest, cached: boolean): SetupResult {
  return {
    llamaServer: join(dir, m.llamaServer),
    rpcServer: join(dir, m.rpcServer),
    llamaCppVersion: m.llamaCppVersion,
    binDir: join(dir, 'bin'),
    cached,
    buildSeconds: m.buildSeconds,
    options: { ...m.defines },
  };
}

async function buildInto(
  finalDir: string,
  source: LlamaSource,
  defines: CmakeDefines,
  tools: Toolchain,
  jobs: number,
  events: BuildEvents,
  lockPath: string,
): Promise<Manifest> {
  const root = dirname(finalDir);
  const started = Date.now();
  // Same filesystem as the final entry, so the last step is one atomic rename.
  const work = join(root, `.build-${process.pid}-${Date.now().toString(36)}`);
  const logsDir = join(root, 'logs');
  await mkdir(logsDir, { recursive: true });
  const logPath = join(logsDir, `${new Date().toISOString().replace(/[:.]/g, '-')}-${process.pid}.log`);
  const logFile = createWriteStream(logPath);
  const cleanup = () => rm(work, { recursive: true, force: true });
  // The running tool (git, cmake → ninja → compilers) sits in its own process group, so an
  // interrupt can stop the whole tree before the half-built folder and the lock are removed;
  // removing the folder while compilers still write into it would fail and leave it behind.
  const running: { child?: ChildProcess } = {};
  const onSignal = (sig: NodeJS.Signals) => {
    void (async () => {
      const child = running.child;
      if (child?.pid && child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((r) => child.once('close', r));
        try {
          process.kill(-child.pid, 'SIGTERM');
        } catch {
          // already gone
        }
        const timer = setTimeout(() => {
          try {
            process.kill(-child.pid!, 'SIGKILL');
          } catch {
            // already gone
          }
        }, 3000);
        await gone;
        clearTimeout(timer);
      }
      await cleanup().catch(() => undefined);
      await rm(lockPath, { force: true }).catch(() => undefined);
    })().finally(() => process.kill(process.pid, sig));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const src = join(work, 'src');
    const build = join(work, 'build');
    events.phase?.('clone', `${source.version} from ${source.bundle}`);
    await runLogged(tools.git, ['-c', 'advice.detachedHead=false', 'clone', '--quiet', source.bundle, src], logFile, logPath, 'git clone of the llama.cpp bundle', process.env, undefined, running);

    const generator: Generator = tools.ninja ? 'Ninja' : 'Unix Makefiles';
    events.phase?.('configure', `cmake (${generator})`);
    const cmakeEnv = { ...process.env, CXX: tools.cxx };
    await runLogged(tools.cmake, cmakeConfigureArgs(src, build, defines, generator), logFile, logPath, 'cmake configure', cmakeEnv, undefined, running);

    events.phase?.('build', `${ENGINE_TARGETS.join(' ')} with ${jobs} jobs`);
    await runLogged(
      tools.cmake,
      cmakeBuildArgs(build, jobs),
      logFile,
      logPath,
      'cmake build',
      cmakeEnv,
      (line) => {
        const p = parseProgressLine(line);
        if (p) events.progress?.(p);
      },
      running,
    );

    events.phase?.('install', finalDir);
    const dist = join(work, 'dist');
    await mkdir(join(dist, 'bin'), { recursive: true });
    for (const t of ENGINE_TARGETS) {
      await copyFile(join(build, 'bin', t), join(dist, 'bin', t));
      await chmod(join(dist, 'bin', t), 0o755);
    }
    const help = await runCapture(join(dist, 'bin', 'llama-server'), ['--help']);
    if (!helpListsRpc(help)) throw new OrchardError(`built llama-server does not list --rpc in --help (see ${logPath})`);
    const manifest: Manifest = {
      llamaCppVersion: source.version,
      commit: source.commit,
      platform: process.platform,
      arch: process.arch,
      defines: { ...defines },
      builtAt: new Date().toISOString(),
      buildSeconds: Math.round((Date.now() - started) / 100) / 10,
      llamaServer: 'bin/llama-server',
      rpcServer: 'bin/ggml-rpc-server',
    };
    await writeFile(join(dist, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
    if (await exists(finalDir)) {
      // --force over an existing entry: move the old one aside first (rename is atomic, rm is not).
      const old = join(root, `.old-${process.pid}-${Date.now().toString(36)}`);
      await rename(finalDir, old);
      await rm(old, { recursive: true, force: true });
    }
    await rename(dist, finalDir);
    return manifest;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await new Promise<void>((r) => logFile.end(r));
    await cleanup();
  }
}

/** Run a tool, appending its output to the build log; failure → one line pointing at the log. */
function runLogged(
  cmd: string,
  args: string[],
  log: NodeJS.WritableStream,
  logPath: string,
  what: string,
  env: NodeJS.ProcessEnv = process.env,
  onLine?: (line: string) => void,
  running?: { child?: ChildProcess },
): Promise<void> {
  log.write(`\n$ ${cmd} ${args.join(' ')}\n`);
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    if (running) running.child = child;
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

async function removeStaleBuildDirs(root: string): Promise<void> {
  for (const name of await readdir(root)) {
    const m = /^\.(?:build|old)-(\d+)-/.exec(name);
    if (m && !pidAlive(Number(m[1]))) await rm(join(root, name), { recursive: true, force: true });
  }
}

// ───────────── lock: one builder per cache entry ─────────────

export interface LockHolder {
  readonly pid: number;
  readonly host: string;
  readonly since: string;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * A lock file created with O_EXCL holding {pid, host}. A holder on this host whose pid is gone
 * left a stale lock (crash, kill -9): it is taken over. A holder on another host (shared home
 * over NFS) is waited for, since we cannot tell whether it lives.
 */
async function acquireLock(path: string, events: BuildEvents): Promise<{ release(): Promise<void>; waited: boolean }> {
  const me: LockHolder = { pid: process.pid, host: hostname(), since: new Date().toISOString() };
  let waited = false;
  let told = false;
  for (;;) {
    try {
      const fh = await open(path, 'wx');
      await fh.writeFile(JSON.stringify(me));
      await fh.close();
      return {
        waited,
        release: async () => {
          await rm(path, { force: true });
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    let holder: LockHolder | undefined;
    try {
      holder = JSON.parse(await readFile(path, 'utf8')) as LockHolder;
    } catch {
      holder = undefined; // being written right now, or garbage; look again shortly
    }
    if (holder && holder.host === me.host && !pidAlive(holder.pid)) {
      await rm(path, { force: true });
      continue;
    }
    if (holder && !told) {
      events.waiting?.(holder);
      told = true;
    }
    waited = true;
    await new Promise((r) => setTimeout(r, 500));
  }
}

// ───────────── existing binaries (Homebrew, a manual build) ─────────────

export interface ExternalBinaries {
  readonly llamaServer: string;
  readonly rpcServer: string;
  readonly llamaCppVersion: string;
  readonly binDir: string;
}

/** Locate llama-server and the RPC server in `dir` (executable files), without running them. */
export async function locateInDir(dir: string): Promise<{ llamaServer: string; rpcServer: string }> {
  const llamaServer = join(dir, 'llama-server');
  if (!(await isExecutable(llamaServer))) throw new OrchardError(`${dir} has no executable llama-server`);
  for (const name of RPC_SERVER_NAMES) {
    const rpcServer = join(dir, name);
    if (await isExecutable(rpcServer)) return { llamaServer, rpcServer };
  }
  throw new OrchardError(`${dir} has no executable ${RPC_SERVER_NAMES.join(' or ')} (llama.cpp built without -DGGML_RPC=ON?)`);
}

/** Check that binaries in `dir` run and support RPC; used for --bin-dir / ORCHARD_LLAMA_BIN_DIR. */
export async function checkExternalBinaries(dir: string): Promise<ExternalBinaries> {
  const { llamaServer, rpcServer } = await locateInDir(dir);
  const help = await runCapture(llamaServer, ['--help']);
  if (!helpListsRpc(help)) throw new OrchardError(`${llamaServer} has no --rpc option: it was built without RPC (-DGGML_RPC=ON)`);
  const rpcHelp = await runCapture(rpcServer, ['--help']);
  if (!/--port/.test(rpcHelp)) throw new OrchardError(`${rpcServer} --help does not look like ggml-rpc-server`);
  let version = 'external';
  try {
    version = parseServerVersion(await runCapture(llamaServer, ['--version'])) ?? version;
  } catch {
    // older builds may not know --version; the binaries still work
  }
  return { llamaServer, rpcServer, llamaCppVersion: version, binDir: dir };
}
