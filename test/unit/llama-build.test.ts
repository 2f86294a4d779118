import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  cacheKey,
  ccacheEnv,
  cmakeBuildArgs,
  cmakeConfigureArgs,
  cmakeDefines,
  helpListsRpc,
  missingToolMessage,
  parseProgressLine,
  parseServerVersion,
  progressFraction,
} from '../../src/node/llama/build-config.ts';
import { cacheRoot } from '../../src/shared/cache-dir.ts';
import { findLlamaSource, formatLlamaCppVersion, keepLlamaSourceFiles, LLAMA_SOURCE_FILES, llamaSourceDir, parseBundleHead } from '../../src/shared/llama-source.ts';

const linux = { platform: 'linux' as const, arch: 'x64', cuda: false };
const mac = { platform: 'darwin' as const, arch: 'arm64', cuda: false };

describe('cmake definitions', () => {
  it('always build RPC, offline, without tests/examples/curl, as static Release', () => {
    const d = cmakeDefines(linux);
    expect(d).toMatchObject({
      GGML_RPC: 'ON',
      LLAMA_CURL: 'OFF',
      LLAMA_BUILD_TESTS: 'OFF',
      LLAMA_BUILD_EXAMPLES: 'OFF',
      CMAKE_BUILD_TYPE: 'Release',
      BUILD_SHARED_LIBS: 'OFF',
      LLAMA_USE_PREBUILT_UI: 'OFF',
    });
    expect(d.GGML_METAL).toBeUndefined();
    expect(d.GGML_CUDA).toBeUndefined();
  });

  it('adds Metal on macOS and CUDA when a toolkit was found', () => {
    expect(cmakeDefines(mac).GGML_METAL).toBe('ON');
    expect(cmakeDefines({ ...linux, cuda: true }).GGML_CUDA).toBe('ON');
    expect(cmakeDefines({ ...mac, cuda: true })).toMatchObject({ GGML_METAL: 'ON', GGML_CUDA: 'ON' });
  });

  it('configure args name source, build dir, generator and every define once, sorted', () => {
    const args = cmakeConfigureArgs('/s', '/b', { B: '2', A: '1' }, 'Ninja');
    expect(args).toEqual(['-S', '/s', '-B', '/b', '-G', 'Ninja', '-DA=1', '-DB=2']);
    const full = cmakeConfigureArgs('/s', '/b', cmakeDefines(linux), 'Unix Makefiles');
    expect(full).toContain('-DGGML_RPC=ON');
    expect(full.filter((a) => a.startsWith('-D'))).toHaveLength(Object.keys(cmakeDefines(linux)).length);
  });

  it('build args ask for exactly the two engines with the job count', () => {
    expect(cmakeBuildArgs('/b', 3)).toEqual(['--build', '/b', '--target', 'ggml-rpc-server', 'llama-server', '--parallel', '3']);
  });
});

describe('ccache across scratch folders', () => {
  it('makes paths relative to the scratch folder and leaves the build dir out of the hash', () => {
    expect(ccacheEnv('/c/llama/.build-1-a')).toEqual({ CCACHE_BASEDIR: '/c/llama/.build-1-a', CCACHE_NOHASHDIR: '1' });
  });
});

describe('cache key', () => {
  const d = cmakeDefines(linux);
  it('is <version>-<12 hex> and stable', () => {
    const k = cacheKey('v0.5.0+de3ff815ea7d', linux, d);
    expect(k).toMatch(/^v0\.5\.0\+de3ff815ea7d-[0-9a-f]{12}$/);
    expect(cacheKey('v0.5.0+de3ff815ea7d', linux, d)).toBe(k);
  });

  it('does not depend on the order of defines', () => {
    const reversed = Object.fromEntries(Object.entries(d).reverse());
    expect(cacheKey('v1', linux, reversed)).toBe(cacheKey('v1', linux, d));
  });

  it('changes with version, options, platform and architecture', () => {
    const base = cacheKey('v1', linux, d);
    const others = [
      cacheKey('v2', linux, d),
      cacheKey('v1', linux, { ...d, GGML_CUDA: 'ON' }),
      cacheKey('v1', { platform: 'darwin', arch: 'x64' }, d),
      cacheKey('v1', { platform: 'linux', arch: 'arm64' }, d),
    ];
    expect(new Set([base, ...others]).size).toBe(5);
  });

  it('changes with the patches applied to the source (an unpatched or older-patch build is not reused)', () => {
    const plain = cacheKey('v1', linux, d);
    expect(cacheKey('v1', linux, d, [])).toBe(plain);
    const one = cacheKey('v1', linux, d, ['aa']);
    expect(new Set([plain, one, cacheKey('v1', linux, d, ['ab']), cacheKey('v1', linux, d, ['aa', 'bb'])]).size).toBe(4);
  });

  it('keeps the directory name free of path separators', () => {
    expect(cacheKey('a/b c', linux, d)).toMatch(/^a_b_c-/);
  });
});

describe('cache root', () => {
  it('ORCHARD_CACHE_DIR wins everywhere', () => {
    expect(cacheRoot({ ORCHARD_CACHE_DIR: '/x', XDG_CACHE_HOME: '/y' }, 'linux', '/home/u')).toBe('/x');
    expect(cacheRoot({ ORCHARD_CACHE_DIR: '/x' }, 'darwin', '/Users/u')).toBe('/x');
  });
  it('macOS uses ~/Library/Caches', () => {
    expect(cacheRoot({ XDG_CACHE_HOME: '/y' }, 'darwin', '/Users/u')).toBe('/Users/u/Library/Caches/orchard');
  });
  it('Linux uses XDG_CACHE_HOME, else ~/.cache', () => {
    expect(cacheRoot({ XDG_CACHE_HOME: '/y' }, 'linux', '/home/u')).toBe('/y/orchard');
    expect(cacheRoot({}, 'linux', '/home/u')).toBe('/home/u/.cache/orchard');
    expect(cacheRoot({ XDG_CACHE_HOME: '' }, 'linux', '/home/u')).toBe('/home/u/.cache/orchard');
  });
});

describe('git bundle header', () => {
  const sha = 'de3ff815ea7d559ee917f063901b8986f038abc6';
  it('reads the HEAD commit (as in node-llama-cpp 3.22.1)', () => {
    expect(parseBundleHead(`# v2 git bundle\n${sha} HEAD\n\nPACK\u0000\u0002`)).toBe(sha);
  });
  it('prefers HEAD over other refs and skips prerequisites and capabilities', () => {
    const other = '1'.repeat(40);
    const text = `# v3 git bundle\n@object-format=sha1\n-${'2'.repeat(40)} base\n${other} refs/heads/master\n${sha} HEAD\n\n`;
    expect(parseBundleHead(text)).toBe(sha);
  });
  it('falls back to the first ref without HEAD', () => {
    expect(parseBundleHead(`# v2 git bundle\n${sha} refs/tags/b1\n\n`)).toBe(sha);
  });
  it('rejects files that are not bundles or name no commit', () => {
    expect(() => parseBundleHead('PK\u0003\u0004')).toThrow(/not a git bundle/);
    expect(() => parseBundleHead('# v2 git bundle\n\nPACK')).toThrow(/no commit/);
  });
  it('version string = tag + 12 hex of the commit', () => {
    expect(formatLlamaCppVersion('v0.5.0', sha)).toBe('v0.5.0+de3ff815ea7d');
  });
});

describe('build progress lines', () => {
  it('parses ninja [n/m]', () => {
    expect(parseProgressLine('[12/209] Building CXX object ggml/src/CMakeFiles/ggml-base.dir/ggml.cpp.o')).toEqual({ done: 12, total: 209 });
    expect(parseProgressLine('[209/209] Linking CXX executable bin/llama-server')).toEqual({ done: 209, total: 209 });
  });
  it('parses make [ nn%]', () => {
    expect(parseProgressLine('[  4%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o')).toEqual({ percent: 4 });
    expect(parseProgressLine('[100%] Built target llama-server')).toEqual({ percent: 100 });
  });
  it('ignores everything else and impossible counts', () => {
    for (const line of [
      '',
      'ninja: Entering directory `build`',
      '/src/ggml.c:12:3: warning: unused [-Wunused]',
      '-- Configuring done',
      '[3/0] x',
      '[5/4] x',
      '[140%] x',
      'make[2]: Leaving directory',
    ]) {
      expect(parseProgressLine(line), line).toBeNull();
    }
  });
  it('fractions', () => {
    expect(progressFraction({ done: 50, total: 200 })).toBe(0.25);
    expect(progressFraction({ percent: 40 })).toBe(0.4);
  });
});

describe('messages and probes of external binaries', () => {
  it('missing tools on Linux name the apt packages', () => {
    expect(missingToolMessage(['cmake', 'c++ compiler'], 'linux')).toBe(
      "cannot build llama.cpp: cmake, c++ compiler not found; install with: sudo apt-get install -y cmake g++ (or your distribution's equivalent)",
    );
  });
  it('missing tools on macOS name xcode-select and brew', () => {
    expect(missingToolMessage(['cmake'], 'darwin')).toMatch(/install with: brew install cmake$/);
    expect(missingToolMessage(['c++ compiler', 'git', 'cmake'], 'darwin')).toMatch(/xcode-select --install && brew install cmake$/);
    expect(missingToolMessage(['git'], 'darwin')).not.toContain('brew');
  });
  it('detects --rpc in llama-server --help', () => {
    expect(helpListsRpc('--rpc SERVERS                           comma-separated list of RPC servers (host:port)')).toBe(true);
    expect(helpListsRpc('-ngl, --gpu-layers N   ...\n--rpc SERVERS                  comma separated list of RPC servers (env: LLAMA_ARG_RPC)\n')).toBe(true);
    expect(helpListsRpc('-h,    --help, --usage\n--rpc-foo\n--no-rpc-x N')).toBe(false);
    expect(helpListsRpc('--override-tensor, -ot  ...')).toBe(false);
  });
  it('parses llama-server --version', () => {
    expect(parseServerVersion('version: 6672 (de3ff81)\nbuilt with cc for x86_64')).toBe('b6672+de3ff81');
    expect(parseServerVersion('version: 0.5.0-dev (build 1, commit de3ff81)\nbuilt with GNU 12.2.0 for Linux x86_64')).toBe('0.5.0-dev+de3ff81');
    expect(parseServerVersion('garbage')).toBeUndefined();
  });
});

describe('source files kept next to the engines', () => {
  it('a cache without them (built before they were kept) gets them from the bundle; a complete one is left alone', async () => {
    const cache = await mkdtemp(join(tmpdir(), 'orchard-keep-'));
    try {
      const env = { ...process.env, ORCHARD_CACHE_DIR: cache };
      const source = await findLlamaSource();
      expect(await keepLlamaSourceFiles(source, env)).toEqual([...LLAMA_SOURCE_FILES]);
      const rpc = await readFile(join(llamaSourceDir(source, env), 'ggml/src/ggml-rpc/ggml-rpc.cpp'), 'utf8');
      expect(rpc).toContain('static uint64_t fnv_hash(');
      expect(await keepLlamaSourceFiles(source, env)).toEqual([]);
      // one file gone: only that one comes back, and from a checked-out tree when one is given
      await rm(join(llamaSourceDir(source, env), 'ggml/src/ggml-rpc/ggml-rpc.cpp'));
      const tree = join(cache, 'tree');
      await mkdir(join(tree, 'ggml/src/ggml-rpc'), { recursive: true });
      await writeFile(join(tree, 'ggml/src/ggml-rpc/ggml-rpc.cpp'), '// from the tree');
      expect(await keepLlamaSourceFiles(source, env, tree)).toEqual(['ggml/src/ggml-rpc/ggml-rpc.cpp']);
      expect(await readFile(join(llamaSourceDir(source, env), 'ggml/src/ggml-rpc/ggml-rpc.cpp'), 'utf8')).toBe('// from the tree');
      expect(dirname(llamaSourceDir(source, env))).toBe(join(cache, 'llama-source'));
    } finally {
      await rm(cache, { recursive: true, force: true });
    }
  });
});
