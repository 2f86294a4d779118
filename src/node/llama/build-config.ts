import { createHash } from 'node:crypto';

/*
 * Building llama.cpp engines with RPC from the source the node-llama-cpp package ships.
 *
 * This file is the pure core (cmake arguments, cache key, progress and version parsing);
 * build.ts drives git/cmake, cache.ts owns the cache layout and its lock. Decisions worth knowing:
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
 * Environment for cmake configure and build so that ccache (which ggml's CMake uses as the compiler
 * launcher whenever it is on PATH: GGML_CCACHE defaults ON) hits across builds. Each build clones
 * into a fresh scratch folder, and ccache hashes absolute paths and the working directory: with the
 * scratch folder as CCACHE_BASEDIR its paths become relative (the same from build to build) and
 * CCACHE_NOHASHDIR leaves the build directory's name out of the hash. A rebuild after a patch then
 * recompiles only the files the patch touches (minutes instead of ~45 on a 2-core machine). Not part
 * of the cache key: the compiler still sees the same code and flags (only __FILE__ strings become
 * relative paths). Without ccache installed the variables are simply unused.
 */
export function ccacheEnv(scratchDir: string): Record<string, string> {
  return { CCACHE_BASEDIR: scratchDir, CCACHE_NOHASHDIR: '1' };
}

/**
 * Directory name of a cache entry: `<version>-<hash>`, where the hash covers everything that
 * changes the binaries (platform, architecture, cmake definitions, the digests of the patches
 * applied to the source, in order) but not the generator or the job count, which do not.
 */
export function cacheKey(
  version: string,
  host: Pick<BuildHost, 'platform' | 'arch'>,
  defines: CmakeDefines,
  patchDigests: readonly string[] = [],
): string {
  const sorted = Object.fromEntries(Object.entries(defines).sort(([a], [b]) => a.localeCompare(b)));
  // Without patches the key is what it was before patches existed (an unpatched build keeps its name).
  const patches = patchDigests.length > 0 ? { patches: patchDigests } : {};
  const digest = createHash('sha256')
    .update(JSON.stringify({ platform: host.platform, arch: host.arch, defines: sorted, ...patches }))
    .digest('hex')
    .slice(0, 12);
  return `${safeName(version)}-${digest}`;
}

function safeName(s: string): string {
  return s.replace(/[^A-Za-z0-9._+]/g, '_');
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
