import type { ChildProcess } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { chmod, copyFile, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { OrchardError } from '../../shared/errors.ts';
import { findLlamaSource, keepLlamaSourceFiles, type LlamaSource } from '../../shared/llama-source.ts';
import {
  type BuildProgress,
  type CmakeDefines,
  cacheKey,
  ccacheEnv,
  cmakeBuildArgs,
  cmakeConfigureArgs,
  cmakeDefines,
  ENGINE_TARGETS,
  type Generator,
  helpListsRpc,
  parseProgressLine,
} from './build-config.ts';
import { applyLlamaPatches, type LlamaPatch, llamaPatches } from './patches.ts';
import { acquireLock, type LockHolder, llamaCacheDir, type Manifest, readCacheEntry, removeStaleBuildDirs } from './cache.ts';
import { type BuildLog, detectToolchain, findNvcc, runCapture, runLogged, type Toolchain } from './toolchain.ts';

/*
 * `orchard setup`: build llama.cpp's engines with RPC from the source the node-llama-cpp package
 * ships into the per-user cache (cmake arguments and the cache key: build-config.ts; the cache
 * layout and its lock: cache.ts), and keep next to them the files of the source tree that tests
 * and benches read (llama-source.ts).
 */

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
  /** A human-readable phase: cloning, configuring, building, installing, keeping source files. */
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
export async function expectedCacheEntry(
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ dir: string; source: LlamaSource; defines: CmakeDefines; patches: LlamaPatch[] }> {
  const source = await findLlamaSource();
  const cuda = (await findNvcc(env)) !== undefined;
  const defines = cmakeDefines({ platform: process.platform, arch: process.arch, cuda });
  const patches = await llamaPatches();
  const key = cacheKey(source.version, process, defines, patches.map((p) => p.sha256));
  return { dir: join(llamaCacheDir(env), key), source, defines, patches };
}

/**
 * Build (or find in the cache) the llama.cpp engines. Concurrent callers serialise on a lock
 * file per cache entry; the one that waits finds the finished entry and returns it. A cached
 * entry written before a source file joined the kept list gets that file now (from the bundle,
 * no rebuild).
 */
export async function setupLlama(req: BuildRequest = {}): Promise<SetupResult> {
  const env = req.env ?? process.env;
  const events = req.events ?? {};
  const { dir, source, defines, patches } = await expectedCacheEntry(env);
  const cachedHit = async (): Promise<SetupResult | undefined> => {
    const hit = await readCacheEntry(dir);
    if (!hit) return undefined;
    const added = await keepLlamaSourceFiles(source, env);
    if (added.length > 0) events.phase?.('keep', `added ${added.join(', ')} from the llama.cpp bundle`);
    return resultFrom(dir, hit, true);
  };
  if (!req.force) {
    const hit = await cachedHit();
    if (hit) return hit;
  }
  const toolchain = await detectToolchain(env);
  const root = dirname(dir);
  await mkdir(root, { recursive: true });
  const lock = await acquireLock(`${dir}.lock`, events);
  try {
    if (!req.force || lock.waited) {
      // Someone else may have built it while we waited (a forced run that waited accepts their fresh build too).
      const hit = await cachedHit();
      if (hit) return hit;
    }
    await removeStaleBuildDirs(root);
    const job: BuildJob = { finalDir: dir, source, defines, patches, tools: toolchain, jobs: req.jobs ?? availableParallelism(), events, env };
    const manifest = await buildInto(job, `${dir}.lock`);
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

interface BuildJob {
  readonly finalDir: string;
  readonly source: LlamaSource;
  readonly defines: CmakeDefines;
  readonly patches: readonly LlamaPatch[];
  readonly tools: Toolchain;
  readonly jobs: number;
  readonly events: BuildEvents;
  readonly env: NodeJS.ProcessEnv;
}

/** Build in a scratch folder beside the entry, then move the finished entry into place. */
async function buildInto(job: BuildJob, lockPath: string): Promise<Manifest> {
  const root = dirname(job.finalDir);
  const started = Date.now();
  // Same filesystem as the final entry, so the last step is one atomic rename.
  const work = join(root, `.build-${process.pid}-${Date.now().toString(36)}`);
  const log = await openBuildLog(root);
  const cleanup = () => rm(work, { recursive: true, force: true });
  const stopOnSignal = onInterrupt(log.running, async () => {
    await cleanup().catch(() => undefined);
    await rm(lockPath, { force: true }).catch(() => undefined);
  });
  try {
    const src = join(work, 'src');
    const build = join(work, 'build');
    await compile(job, src, build, log);
    job.events.phase?.('install', job.finalDir);
    const dist = await collectEngines(build, join(work, 'dist'), log.path);
    const manifest: Manifest = {
      llamaCppVersion: job.source.version,
      commit: job.source.commit,
      platform: process.platform,
      arch: process.arch,
      defines: { ...job.defines },
      patches: job.patches.map((p) => p.name),
      builtAt: new Date().toISOString(),
      buildSeconds: Math.round((Date.now() - started) / 100) / 10,
      llamaServer: 'bin/llama-server',
      rpcServer: 'bin/ggml-rpc-server',
    };
    await writeFile(join(dist, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
    await replaceEntry(dist, job.finalDir);
    return manifest;
  } finally {
    stopOnSignal();
    await new Promise<void>((r) => log.stream.end(r));
    await cleanup();
  }
}

/** git clone of the bundle, Orchard's patches (patches.ts), cmake configure, cmake build of the two targets (progress as events). */
async function compile(job: BuildJob, src: string, build: string, log: BuildLog): Promise<void> {
  const { tools, events, source } = job;
  events.phase?.('clone', `${source.version} from ${source.bundle}`);
  await runLogged(tools.git, ['-c', 'advice.detachedHead=false', 'clone', '--quiet', source.bundle, src], 'git clone of the llama.cpp bundle', log);
  // Kept before patching: the kept files are the bundle's (the same as when extracted from it later).
  await keepLlamaSourceFiles(source, job.env, src);
  if (job.patches.length > 0) {
    events.phase?.('patch', job.patches.map((p) => p.name).join(', '));
    await applyLlamaPatches(tools.git, src, job.patches, log);
  }

  const generator: Generator = tools.ninja ? 'Ninja' : 'Unix Makefiles';
  events.phase?.('configure', `cmake (${generator})`);
  const env = { ...process.env, CXX: tools.cxx, ...ccacheEnv(dirname(src)) };
  await runLogged(tools.cmake, cmakeConfigureArgs(src, build, job.defines, generator), 'cmake configure', log, { env });

  events.phase?.('build', `${ENGINE_TARGETS.join(' ')} with ${job.jobs} jobs`);
  const onLine = (line: string) => {
    const p = parseProgressLine(line);
    if (p) events.progress?.(p);
  };
  await runLogged(tools.cmake, cmakeBuildArgs(build, job.jobs), 'cmake build', log, { env, onLine });
}

/** Copy the built executables into `dist/bin` and check that llama-server was built with RPC. */
async function collectEngines(build: string, dist: string, logPath: string): Promise<string> {
  await mkdir(join(dist, 'bin'), { recursive: true });
  for (const t of ENGINE_TARGETS) {
    await copyFile(join(build, 'bin', t), join(dist, 'bin', t));
    await chmod(join(dist, 'bin', t), 0o755);
  }
  const help = await runCapture(join(dist, 'bin', 'llama-server'), ['--help']);
  if (!helpListsRpc(help)) throw new OrchardError(`built llama-server does not list --rpc in --help (see ${logPath})`);
  return dist;
}

/** Move `dist` to `finalDir`; an existing entry (--force) is moved aside first (rename is atomic, rm is not). */
async function replaceEntry(dist: string, finalDir: string): Promise<void> {
  const old = join(dirname(finalDir), `.old-${process.pid}-${Date.now().toString(36)}`);
  const movedAside = await rename(finalDir, old).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return false; // no entry yet: the usual first build
      throw err;
    },
  );
  if (movedAside) await rm(old, { recursive: true, force: true });
  await rename(dist, finalDir);
}

async function openBuildLog(root: string): Promise<BuildLog> {
  const logsDir = join(root, 'logs');
  await mkdir(logsDir, { recursive: true });
  const path = join(logsDir, `${new Date().toISOString().replace(/[:.]/g, '-')}-${process.pid}.log`);
  return { stream: createWriteStream(path), path, running: {} };
}

/**
 * On SIGINT/SIGTERM: stop the running tool's process group (git, cmake → ninja → compilers sit
 * in their own group), then clean up, then die of the same signal. Removing the half-built
 * folder while compilers still write into it would fail and leave it behind, hence the wait.
 * Returns the function that removes the handlers.
 */
function onInterrupt(running: { child?: ChildProcess }, cleanup: () => Promise<void>): () => void {
  const onSignal = (sig: NodeJS.Signals) => {
    void (async () => {
      const child = running.child;
      if (child?.pid && child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((r) => child.once('close', r));
        killGroup(child.pid, 'SIGTERM');
        const timer = setTimeout(() => killGroup(child.pid!, 'SIGKILL'), 3000);
        await gone;
        clearTimeout(timer);
      }
      await cleanup();
    })().finally(() => process.kill(process.pid, sig));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  return () => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  };
}

function killGroup(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pid, sig);
  } catch {
    // already gone
  }
}
