import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { Socket } from 'node:net';
import { hostname, tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { findLlamaBinaries, type LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { expectedCacheEntry } from '../../src/node/llama/build.ts';
import { freePort } from '../helpers/processes.ts';

/*
 * Real llama.cpp engines on a generated model. The oracle Orchard relies on everywhere: greedy
 * decoding is deterministic, and splitting the model over ggml-rpc-server processes changes
 * nothing in the token ids. Token ids are compared, not text, and the model must produce varied
 * tokens, or "equal" would prove little.
 */

const execFileP = promisify(execFile);
const ROOT = new URL('../..', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');

// ───────────── process bookkeeping: every child dies, even when a test fails ─────────────

interface Proc {
  readonly child: ChildProcess;
  readonly name: string;
  output: string;
  readonly exited: Promise<void>;
}

const procs: Proc[] = [];

function start(name: string, cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Proc {
  // Own process group, so kill(-pid) also reaches anything the engine forks.
  const child = spawn(cmd, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env });
  const p: Proc = {
    child,
    name,
    output: '',
    exited: new Promise((resolve) => child.once('exit', () => resolve())),
  };
  const keep = (chunk: Buffer) => {
    p.output += chunk.toString('utf8');
    if (p.output.length > 4_000_000) p.output = p.output.slice(-2_000_000);
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  procs.push(p);
  return p;
}

async function stop(p: Proc): Promise<void> {
  if (p.child.exitCode === null && p.child.signalCode === null && p.child.pid) {
    try {
      process.kill(-p.child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await p.exited;
}

async function stopAll(): Promise<void> {
  await Promise.all(procs.splice(0).map(stop));
}

async function until<T>(what: string, p: Proc, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (p.child.exitCode !== null || p.child.signalCode !== null) {
      throw new Error(`${p.name} exited (${p.child.exitCode ?? p.child.signalCode}) before ${what}:\n${p.output.slice(-3000)}`);
    }
    const v = await probe().catch(() => undefined);
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`timed out waiting for ${what} of ${p.name}:\n${p.output.slice(-3000)}`);
}

function tcpOpen(port: number): Promise<true | undefined> {
  return new Promise((resolve) => {
    const s = new Socket();
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(undefined));
    s.connect(port, '127.0.0.1');
  });
}

// ───────────── engines ─────────────

async function startRpcServer(bins: LlamaBinaries, name: string): Promise<{ proc: Proc; endpoint: string }> {
  const port = await freePort();
  const proc = start(name, bins.rpcServer, ['-H', '127.0.0.1', '-p', String(port), '-t', '1']);
  // Its banner goes to a block-buffered stdout when piped, so readiness = the port accepts. The
  // server drops a connection that sends no hello and keeps serving.
  await until('its port', proc, () => tcpOpen(port), 30_000);
  return { proc, endpoint: `127.0.0.1:${port}` };
}

async function startLlamaServer(bins: LlamaBinaries, model: string, name: string, extra: string[] = []): Promise<{ proc: Proc; url: string }> {
  const port = await freePort();
  const args = ['-m', model, '--host', '127.0.0.1', '--port', String(port), '-c', '512', '-np', '1', '-t', '2', '--seed', '1', '-lv', '4', ...extra];
  const proc = start(name, bins.llamaServer, args);
  const url = `http://127.0.0.1:${port}`;
  await until(
    'health',
    proc,
    async () => {
      const r = await fetch(`${url}/health`);
      return r.ok ? true : undefined;
    },
    120_000,
  );
  return { proc, url };
}

const PROMPT = 'Once upon a time in a small orchard, there was';
const N_PREDICT = 48;

async function greedy(url: string, prompt = PROMPT): Promise<number[]> {
  const r = await fetch(`${url}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      prompt,
      n_predict: N_PREDICT,
      // Greedy: only top-k 1 in the sampler chain; temperature is irrelevant then.
      samplers: ['top_k'],
      top_k: 1,
      temperature: 0,
      seed: 1,
      cache_prompt: false,
      return_tokens: true,
      ignore_eos: true,
    }),
  });
  const body = (await r.json()) as { tokens?: number[]; content?: string; error?: unknown };
  if (!r.ok || !Array.isArray(body.tokens)) throw new Error(`completion failed: ${r.status} ${JSON.stringify(body).slice(0, 500)}`);
  return body.tokens;
}

/** Per-device model buffer sizes (MiB) from llama.cpp's load log: `load_tensors: RPC0[…] model buffer size = 1.2 MiB`. */
function modelBuffers(log: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of log.matchAll(/load_tensors:\s+(\S+)\s+model buffer size\s*=\s*([\d.]+) MiB/g)) {
    out.set(m[1]!, (out.get(m[1]!) ?? 0) + Number(m[2]));
  }
  return out;
}

let bins: LlamaBinaries;
let work: string;
let model: string;

beforeAll(async () => {
  bins = await findLlamaBinaries();
  work = await mkdtemp(join(tmpdir(), 'orchard-engines-'));
});

afterAll(async () => {
  await stopAll();
  if (work) await rm(work, { recursive: true, force: true });
});

describe('llama.cpp engines (real binaries)', () => {
  let single: number[];

  beforeAll(async () => {
    model = join(work, 'tiny.gguf');
    // The project's own deterministic writer; a real llama tokenizer from the llama.cpp bundle.
    await execFileP(process.execPath, [BIN, 'testmodel', 'gguf', '--out', model, '--layers', '8', '--dim', '256', '--type', 'f16', '--seed', '7'], {
      cwd: ROOT,
    });
  }, 300_000);

  it('greedy decoding is deterministic and the model does not degenerate', async () => {
    const server = await startLlamaServer(bins, model, 'llama-server (local)');
    try {
      single = await greedy(server.url);
      const again = await greedy(server.url);
      expect(single).toHaveLength(N_PREDICT);
      expect(again).toEqual(single);
      // A random model that repeats one token would make "same tokens" a weak oracle.
      const distinct = new Set(single).size;
      expect(distinct, `tokens: ${single.join(',')}`).toBeGreaterThanOrEqual(12);
      // A different prompt must change the continuation, else the model ignores its input.
      const other = await greedy(server.url, 'The capital of a faraway kingdom is');
      expect(other).not.toEqual(single);
    } finally {
      await stopAll();
    }
  });

  it('splitting the model over two ggml-rpc-server processes gives the same token ids', async () => {
    expect(single, 'the single-node run must have produced tokens').toBeDefined();
    const a = await startRpcServer(bins, 'ggml-rpc-server A');
    const b = await startRpcServer(bins, 'ggml-rpc-server B');
    try {
      const server = await startLlamaServer(bins, model, 'llama-server (rpc)', ['--rpc', `${a.endpoint},${b.endpoint}`, '-ngl', '99', '--tensor-split', '1,1']);
      const split = await greedy(server.url);
      // Both remote servers really hold weights: the split is not a no-op. llama.cpp names a
      // remote device `RPC<index on that server>[host:port]`, so both show up as RPC0[…].
      const buffers = modelBuffers(server.proc.output);
      const loaded = [...buffers].filter(([, mib]) => mib > 0).map(([dev]) => /^RPC\d+\[(.+)\]$/.exec(dev)?.[1]);
      const described = [...buffers].map(([d, m]) => `${d}=${m}`).join(' ');
      expect(loaded.filter((e) => e !== undefined).sort(), described).toEqual([a.endpoint, b.endpoint].sort());
      expect(split).toEqual(single);
    } finally {
      await stopAll();
    }
  });
});

// ───────────── orchard setup: the CLI edges, against the real cache and real tools ─────────────

async function orchard(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [BIN, ...args], { env, cwd: ROOT });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

function baseEnv(extra: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ...extra };
  for (const [k, v] of Object.entries(extra)) if (v === undefined) delete env[k];
  return env;
}

describe('orchard setup', () => {
  it('--bin-dir checks existing binaries for RPC support and reports them', async () => {
    const r = await orchard(['setup', '--json', '--bin-dir', dirname(bins.llamaServer)], baseEnv({}));
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(out).toMatchObject({ llamaServer: bins.llamaServer, binDir: dirname(bins.llamaServer), source: 'external', cached: false });
    expect(out.rpcServer).toMatch(/(ggml-)?rpc-server$/);
    expect(out.llamaCppVersion).toMatch(/\+[0-9a-f]{7,}$/);
  });

  it('rejects a bin dir whose llama-server lacks --rpc, and a missing dir, with one line and exit 1', async () => {
    const fake = join(work, 'fake-bin');
    await mkdir(fake, { recursive: true });
    await writeFile(join(fake, 'llama-server'), '#!/bin/sh\necho "usage: llama-server -m MODEL --port N"\n', { mode: 0o755 });
    await writeFile(join(fake, 'ggml-rpc-server'), '#!/bin/sh\necho "-p, --port PORT"\n', { mode: 0o755 });
    const r = await orchard(['setup', '--bin-dir', fake], baseEnv({}));
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/no --rpc option.*-DGGML_RPC=ON/);

    const missing = await orchard(['setup', '--bin-dir', join(work, 'nope')], baseEnv({}));
    expect(missing.code).toBe(1);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
    expect(missing.stderr).toMatch(/no executable llama-server/);
  });

  it('rejects a bin dir whose rpc-server cannot listen on a Unix socket (unpatched llama.cpp), with one line and exit 1', async () => {
    const fake = join(work, 'fake-bin-tcp-only');
    await mkdir(fake, { recursive: true });
    await writeFile(join(fake, 'llama-server'), '#!/bin/sh\necho "--rpc SERVERS  comma separated list of RPC servers"\n', { mode: 0o755 });
    await writeFile(join(fake, 'ggml-rpc-server'), '#!/bin/sh\necho "-H, --host HOST  host to bind to"; echo "-p, --port PORT"\n', { mode: 0o755 });
    const r = await orchard(['setup', '--bin-dir', fake], baseEnv({}));
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/cannot listen on a Unix-domain socket \(-H unix:<path>\)/);
  });

  it('invalid --jobs is a usage error (exit 2)', async () => {
    const r = await orchard(['setup', '--jobs', '0'], baseEnv({}));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--jobs/);
  });

  it('without cmake, a compiler or git: one line saying what to install, exit 1, nothing written', async () => {
    const cache = join(work, 'cache-notools');
    const path = join(work, 'path-notools');
    await mkdir(path, { recursive: true });
    await symlink(process.execPath, join(path, 'node'));
    const r = await orchard(['setup'], baseEnv({ ORCHARD_CACHE_DIR: cache, ORCHARD_LLAMA_BIN_DIR: undefined, PATH: path, CXX: undefined }));
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/cmake, c\+\+ compiler, git not found; install with: (sudo apt-get install -y cmake g\+\+ git|xcode-select --install && brew install cmake)/);
    await expect(readFile(join(cache, 'llama'))).rejects.toThrow();
  });

  it('a second setup waits for the one holding the lock, then returns its build from the cache', async () => {
    const cache = join(work, 'cache-lock');
    const env = baseEnv({ ORCHARD_CACHE_DIR: cache, ORCHARD_LLAMA_BIN_DIR: undefined });
    const { dir } = await expectedCacheEntry(env);
    await mkdir(dirname(dir), { recursive: true });
    // The "other builder": a live process on this host holding the entry's lock.
    const holder = start('lock holder', 'sleep', ['120']);
    await writeFile(`${dir}.lock`, JSON.stringify({ pid: holder.child.pid, host: hostname(), since: new Date().toISOString() }));
    const waiter = start('orchard setup (waiting)', process.execPath, [BIN, 'setup', '--json'], env);
    try {
      await until('the waiting message', waiter, async () => (/is building; waiting for it/.test(waiter.output) ? true : undefined), 60_000);
      expect(waiter.child.exitCode).toBeNull();
      // The holder "finishes": its entry appears (binaries copied from the real engines), then the lock goes.
      await mkdir(join(dir, 'bin'), { recursive: true });
      await copyFile(bins.llamaServer, join(dir, 'bin', 'llama-server'));
      await copyFile(bins.rpcServer, join(dir, 'bin', 'ggml-rpc-server'));
      const manifest = {
        llamaCppVersion: 'test-entry',
        commit: '0'.repeat(40),
        platform: process.platform,
        arch: process.arch,
        defines: { GGML_RPC: 'ON' },
        builtAt: new Date().toISOString(),
        buildSeconds: 1.5,
        llamaServer: 'bin/llama-server',
        rpcServer: 'bin/ggml-rpc-server',
      };
      await writeFile(join(dir, 'manifest.json'), JSON.stringify(manifest));
      await rm(`${dir}.lock`);
      await waiter.exited;
      expect(waiter.child.exitCode, waiter.output).toBe(0);
      const line = waiter.output.split('\n').find((l) => l.startsWith('{"llamaServer"'));
      expect(JSON.parse(line ?? '{}')).toMatchObject({
        llamaServer: join(dir, 'bin', 'llama-server'),
        rpcServer: join(dir, 'bin', 'ggml-rpc-server'),
        llamaCppVersion: 'test-entry',
        cached: true,
        buildSeconds: 1.5,
        source: 'cache',
      });
      // findLlamaBinaries reads the same entry.
      const found = await findLlamaBinaries(env);
      expect(found.llamaServer).toBe(join(dir, 'bin', 'llama-server'));
      // Its build is the entry's name (version + hash of platform, defines, patches): what the calibration is keyed by.
      expect(found.build).toBe(basename(dir));
    } finally {
      await stopAll();
    }
  });
});
