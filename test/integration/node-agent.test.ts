import { type ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { type Server, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NodeAgent } from '../../src/node/agent.ts';
import { probeHardware, readLiveStats } from '../../src/node/hardware/probe.ts';
import { findLlamaBinaries } from '../../src/node/llama/binaries.ts';
import { createLogger } from '../../src/shared/log.ts';
import { orchardV1 } from '../../src/shared/proto.ts';

/*
 * The node agent as a real process (`orchard node --json`), driven over real gRPC, running real
 * llama.cpp engines on a generated model. Every process started here is killed in afterAll
 * (process groups), also when a test fails.
 */

const execFileP = promisify(execFile);
const ROOT = new URL('../..', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');
const MANUAL_BIN_DIR = '/tmp/llsrc/src/build/bin';

// JSON logs whatever the caller's terminal or CI sets: the tests tell log lines from the one human error line.
const binEnv: NodeJS.ProcessEnv = { ...process.env, ORCHARD_LOG_FORMAT: 'json' };
// Engines: ORCHARD_LLAMA_BIN_DIR, else the manual build, else `orchard setup`'s cache.
if (!binEnv.ORCHARD_LLAMA_BIN_DIR && existsSync(join(MANUAL_BIN_DIR, 'ggml-rpc-server'))) binEnv.ORCHARD_LLAMA_BIN_DIR = MANUAL_BIN_DIR;
const engines = await findLlamaBinaries(binEnv).then(
  () => true,
  (err: Error) => {
    console.warn(`skipping node agent engine tests: ${err.message}`);
    return false;
  },
);

// ───────────── processes ─────────────

interface Agent {
  readonly child: ChildProcess;
  readonly ready: { nodeId: string; name: string; grpcPort: number; metricsPort: number; pid: number };
  readonly client: grpc.Client & Record<string, (...a: unknown[]) => unknown>;
  stderr: string;
  stdout: string;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const children: ChildProcess[] = [];
const enginePidsSeen = new Set<number>();
let tmp = '';

function killGroup(child: ChildProcess): void {
  if (child.pid && child.exitCode === null && child.signalCode === null) {
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
}

/** True while the process exists and is not a zombie (an unreaped engine is dead for us). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    if (existsSync('/proc/self')) return false;
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  }
}

function runCli(args: string[], env: NodeJS.ProcessEnv = binEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  return execFileP(process.execPath, [BIN, ...args], { env, timeout: 60_000 }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => ({ code: e.code, stdout: e.stdout, stderr: e.stderr }),
  );
}

async function startAgent(stateDir: string, extra: string[] = [], env: NodeJS.ProcessEnv = binEnv): Promise<Agent> {
  const args = [BIN, 'node', '--grpc-port', '0', '--metrics-port', '0', '--json', '--no-mdns', '--bind', '127.0.0.1', '--state-dir', stateDir, ...extra];
  // Own process group so cleanup reaches the agent, its watchdog and its engines at once.
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env });
  children.push(child);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  let stdout = '';
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => {
    stderr += b.toString();
  });
  const ready = await new Promise<Agent['ready']>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`agent not ready in 30 s:\n${stderr}`)), 30_000);
    child.stdout?.on('data', (b: Buffer) => {
      stdout += b.toString();
      const line = stdout.split('\n').find((l) => l.startsWith('{"event":"ready"'));
      if (line) {
        clearTimeout(timer);
        resolve(JSON.parse(line) as Agent['ready']);
      }
    });
    void exited.then(({ code }) => reject(new Error(`agent exited (${code}) before ready:\n${stderr}`)));
  });
  const NodeAgent = orchardV1().NodeAgent!;
  const client = new NodeAgent(`127.0.0.1:${ready.grpcPort}`, grpc.credentials.createInsecure()) as unknown as Agent['client'];
  const agent: Agent = {
    child,
    ready,
    client,
    exited,
    get stderr() {
      return stderr;
    },
    get stdout() {
      return stdout;
    },
  } as Agent;
  return agent;
}

function unary<T>(agent: Agent, method: string, req: unknown, timeoutMs = 120_000): Promise<T> {
  return new Promise((resolve, reject) => {
    agent.client[method]!(req, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}

async function grpcError(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (err) {
    return err as grpc.ServiceError;
  }
  throw new Error('call succeeded but an error was expected');
}

interface EngineInfo {
  engineId: string;
  kind: string;
  host: string;
  port: number;
  pid: number;
  argv: string[];
}

async function startEngine(agent: Agent, req: Record<string, unknown>): Promise<EngineInfo> {
  const res = await unary<{ engine: EngineInfo }>(agent, 'startEngine', req);
  enginePidsSeen.add(res.engine.pid);
  return res.engine;
}

interface GenResult {
  tokens: number[];
  text: string;
  done: { finishReason: string; promptTokens: number; completionTokens: number; timings: { firstTokenMs: number; predictedTokensPerSecond: number } };
}

function generate(agent: Agent, req: Record<string, unknown>): Promise<GenResult> {
  return new Promise((resolve, reject) => {
    const call = agent.client.generate!(req) as grpc.ClientReadableStream<{ event: string; token?: { text: string; tokenIds: number[] }; done?: GenResult['done'] }>;
    const out: GenResult = { tokens: [], text: '', done: undefined as unknown as GenResult['done'] };
    call.on('data', (ev) => {
      if (ev.token) {
        out.tokens.push(...ev.token.tokenIds);
        out.text += ev.token.text;
      }
      if (ev.done) out.done = ev.done;
    });
    call.on('error', reject);
    call.on('end', () => resolve(out));
  });
}

async function metricsText(agent: Agent): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${agent.ready.metricsPort}/metrics`);
  return res.text();
}

function freeListener(): Promise<Server> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => resolve(s));
  });
}

async function waitFor<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

let model = '';

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'orchard-node-agent-'));
  if (!engines) return;
  model = join(tmp, 'model.gguf');
  // Small enough to load in a second on 2 cores, big enough to decode thousands of tokens.
  const r = await runCli(['testmodel', 'gguf', '--out', model, '--layers', '4', '--dim', '128', '--ffn', '384', '--heads', '4', '--kv-heads', '2', '--ctx', '8192']);
  if (r.code !== 0) throw new Error(`testmodel failed: ${r.stderr}`);
});

afterAll(async () => {
  for (const c of children) killGroup(c);
  // Engines left by a failed SIGKILL test would outlive their group only through a bug; kill them too.
  for (const pid of enginePidsSeen) {
    try {
      if (alive(pid)) process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('orchard node CLI', () => {
  it('rejects invalid sizes, bandwidths and ports with one line and exit 2', async () => {
    for (const args of [
      ['--memory-limit', '12XB'],
      ['--budget', 'lots'],
      ['--bandwidth', '-3'],
      ['--grpc-port', '70000'],
      ['--bind', 'not-an-ip'],
    ]) {
      const r = await runCli(['node', '--no-mdns', '--state-dir', join(tmp, 'cli-bad'), ...args]);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(r.stderr).toMatch(/^orchard: invalid/);
    }
  });

  it('a gRPC port in use is a one-line failure with exit 1', async () => {
    const taken = await freeListener();
    try {
      const port = (taken.address() as { port: number }).port;
      const r = await runCli(['node', '--no-mdns', '--bind', '127.0.0.1', '--grpc-port', String(port), '--metrics-port', '0', '--state-dir', join(tmp, 'cli-port')]);
      expect(r.code).toBe(1);
      // stderr carries pino JSON log lines plus exactly one human line: the error.
      const human = r.stderr.split('\n').filter((l) => l.trim() !== '' && !l.startsWith('{'));
      expect(human).toEqual([`orchard: gRPC port ${port} on 127.0.0.1 is already in use`]);
    } finally {
      taken.close();
    }
  });

  it('with --token (ORCHARD_NODE_TOKEN) every call needs the bearer token', async () => {
    const token = 'orchard-test-token-0123456789';
    const agent = await startAgent(join(tmp, 'token'), [], { ...binEnv, ORCHARD_NODE_TOKEN: token });
    try {
      const denied = await grpcError(unary(agent, 'describe', {}));
      expect(denied.code).toBe(grpc.status.UNAUTHENTICATED);
      const wrong = new grpc.Metadata();
      wrong.set('authorization', 'Bearer nope');
      const deniedWrong = await grpcError(
        new Promise((resolve, reject) => agent.client.describe!({}, wrong, (e: Error | null, r: unknown) => (e ? reject(e) : resolve(r)))),
      );
      expect(deniedWrong.code).toBe(grpc.status.UNAUTHENTICATED);
      const streamDenied = await grpcError(generate(agent, { engineId: 'x', prompt: 'x' }));
      expect(streamDenied.code).toBe(grpc.status.UNAUTHENTICATED);
      const md = new grpc.Metadata();
      md.set('authorization', `Bearer ${token}`);
      const ok = await new Promise<{ profile: { nodeId: string } }>((resolve, reject) =>
        agent.client.describe!({}, md, (e: Error | null, r: { profile: { nodeId: string } }) => (e ? reject(e) : resolve(r))),
      );
      expect(ok.profile.nodeId).toBe(agent.ready.nodeId);
    } finally {
      agent.client.close();
      agent.child.kill('SIGTERM');
      await agent.exited;
    }
  });

  it('a restart with the same state dir keeps the node id (seen in orchard_node_info)', async () => {
    const dir = join(tmp, 'restart');
    const ids: string[] = [];
    for (let i = 0; i < 2; i++) {
      const agent = await startAgent(dir, ['--name', 'restart-node', '--memory-limit', '8GiB', '--budget', '6GiB', '--bandwidth', '100']);
      const text = await metricsText(agent);
      const m = /^orchard_node_info\{id="([^"]+)",name="restart-node",chip="[^"]*",os="(linux|macos)",version="[^"]+"/m.exec(text);
      expect(m, text.slice(0, 2000)).not.toBeNull();
      ids.push(m![1]!);
      expect(m![1]).toBe(agent.ready.nodeId);
      // the overrides reach the profile and the gauges
      expect(text).toMatch(/^orchard_node_memory_bytes 8589934592$/m);
      expect(text).toMatch(/^orchard_node_usable_memory_bytes 6442450944$/m);
      expect(text).toMatch(/^orchard_node_bandwidth_bytes_per_second 100000000000$/m);
      expect(text).toMatch(/^orchard_node_available_memory_bytes \d+/m);
      expect(text).toMatch(/^process_cpu_seconds_total /m);
      expect((await fetch(`http://127.0.0.1:${agent.ready.metricsPort}/healthz`)).status).toBe(200);
      agent.child.kill('SIGTERM');
      expect(await agent.exited).toEqual({ code: 0, signal: null });
      expect(agent.stdout).toContain('{"event":"stopped"');
    }
    expect(ids[0]).toBe(ids[1]);
    const other = await startAgent(join(tmp, 'restart-other'));
    expect(other.ready.nodeId).not.toBe(ids[0]);
    other.child.kill('SIGTERM');
    await other.exited;
  });
});

describe('profile changes (agent in-process)', () => {
  it('a re-probe that finds a change is pushed to Watch streams and metrics; shutdown ends the streams', async () => {
    // Hardware cannot change under a test, so the probe is the real one plus a mutable override.
    let budget = 6 * 2 ** 30;
    const agent = new NodeAgent({
      stateDir: join(tmp, 'inproc'),
      name: 'inproc',
      bindHost: '127.0.0.1',
      grpcPort: 0,
      metricsPort: 0,
      mdns: false,
      probe: (o) => probeHardware({ ...o, budgetBytes: budget }),
      readLive: readLiveStats,
      binaries: () => findLlamaBinaries(binEnv),
      log: createLogger('test', 'warn'),
      profileRefreshMs: 0,
    });
    const ready = await agent.start();
    const NodeAgentClient = orchardV1().NodeAgent!;
    const client = new NodeAgentClient(`127.0.0.1:${ready.grpcPort}`, grpc.credentials.createInsecure()) as unknown as Agent['client'];
    try {
      const events: { event: string; profileChanged?: { usableBytes: string } }[] = [];
      const watch = client.watch!({ intervalSeconds: 0.1 }) as grpc.ClientReadableStream<{ event: string }>;
      const ended = new Promise<void>((resolve) => watch.on('end', () => resolve()));
      watch.on('error', () => {});
      watch.on('data', (e: { event: string }) => events.push(e));
      await waitFor('first stats', () => events.length > 0 || undefined);
      expect(await agent.refreshProfile()).toBe(false); // nothing changed: no event
      budget = 5 * 2 ** 30;
      expect(await agent.refreshProfile()).toBe(true);
      const changed = await waitFor('profileChanged', () => events.find((e) => e.event === 'profileChanged'));
      expect(changed.profileChanged!.usableBytes).toBe(String(5 * 2 ** 30));
      const text = await (await fetch(`http://127.0.0.1:${ready.metricsPort}/metrics`)).text();
      expect(text).toMatch(/^orchard_node_usable_memory_bytes 5368709120$/m);
      await agent.stop();
      await ended; // the stream ends cleanly instead of erroring out
    } finally {
      client.close();
      await agent.stop();
    }
  });
});

describe('engine watchdog (the SIGKILL guarantee, without engines)', () => {
  it('kills registered processes when its owner is SIGKILLed: TERM first, KILL for those that ignore it', async () => {
    const script = join(tmp, 'watchdog-owner.ts');
    await writeFile(
      script,
      [
        `import { EngineWatchdog } from ${JSON.stringify(join(ROOT, 'src/node/watchdog.ts'))};`,
        'const [keep, ...pids] = process.argv.slice(2).map(Number);',
        'const w = new EngineWatchdog();',
        'w.add(keep!);',
        'w.remove(keep!);',
        'for (const p of pids) w.add(p);',
        "process.stdout.write('ready ' + w.pid + '\\n');",
        'setInterval(() => {}, 1000);',
      ].join('\n'),
    );
    // Stand-ins for engines, not children of the owner (so nothing but the watchdog can end them).
    const spawnSleeper = (cmd: string) => {
      const c = spawn('/bin/sh', ['-c', cmd], { detached: true, stdio: 'ignore' });
      children.push(c);
      return c.pid!;
    };
    const polite = spawnSleeper('exec sleep 300');
    const stubborn = spawnSleeper('trap "" TERM; exec sleep 300');
    const unrelated = spawnSleeper('exec sleep 300');
    const owner = spawn(process.execPath, ['--import', 'tsx', script, String(unrelated), String(polite), String(stubborn)], {
      cwd: ROOT,
      detached: true,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    children.push(owner);
    const line = await new Promise<string>((resolve) => owner.stdout!.on('data', (b: Buffer) => resolve(b.toString())));
    const watchdogPid = Number(/ready (\d+)/.exec(line)![1]);
    expect(alive(watchdogPid)).toBe(true);
    process.kill(owner.pid!, 'SIGKILL');
    const t0 = Date.now();
    await waitFor('polite engine gone', () => !alive(polite) || undefined, 5000);
    const politeMs = Date.now() - t0;
    // SIGTERM reached both; the one that ignores it is still there until the grace period ends.
    expect(alive(stubborn)).toBe(true);
    await waitFor('stubborn engine gone', () => !alive(stubborn) || undefined, 5000);
    const stubbornMs = Date.now() - t0;
    console.info(`watchdog: TERM-abiding process gone after ${politeMs} ms, TERM-ignoring after ${stubbornMs} ms`);
    // a pid that was deregistered (its engine exited; the pid could be recycled) is left alone
    expect(alive(unrelated)).toBe(true);
    await waitFor('watchdog exits', () => !alive(watchdogPid) || undefined, 5000);
    process.kill(unrelated, 'SIGKILL');
  });
});

describe.skipIf(!engines)('node agent with real llama.cpp engines', () => {
  let agent: Agent;
  const events: { event: string; [k: string]: unknown }[] = [];
  let watch: grpc.ClientReadableStream<{ event: string }> | undefined;

  beforeAll(async () => {
    agent = await startAgent(join(tmp, 'engines'), ['--name', 'engine-node']);
    watch = agent.client.watch!({ intervalSeconds: 0.2 }) as grpc.ClientReadableStream<{ event: string }>;
    watch.on('data', (ev: { event: string }) => events.push(ev));
    watch.on('error', () => {});
  });
  afterAll(() => {
    watch?.cancel();
    agent?.client.close();
  });

  it('Describe returns the profile with the persisted id and live stats; Watch streams stats', async () => {
    const d = await unary<{ profile: { nodeId: string; name: string; memoryBytes: string; engines: string[] }; live: { availableBytes: string } }>(agent, 'describe', {});
    expect(d.profile.nodeId).toBe(agent.ready.nodeId);
    expect(d.profile.name).toBe('engine-node');
    expect(Number(d.profile.memoryBytes)).toBeGreaterThan(0);
    expect(Number(d.live.availableBytes)).toBeGreaterThan(0);
    await waitFor('two stats events', () => events.filter((e) => e.event === 'stats').length >= 2 || undefined, 5000);
  });

  it('StartEngine an rpc-server; a llama-server head started through the agent generates over it; Generate streams tokens', async () => {
    const rpc = await startEngine(agent, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'worker-0', port: 0, threads: 1, model: 'tiny' });
    expect(rpc.kind).toBe('ENGINE_KIND_RPC_SERVER');
    expect(rpc.host).toBe('127.0.0.1');
    expect(rpc.port).toBeGreaterThan(0);
    expect(rpc.argv.slice(1)).toEqual(['-H', '127.0.0.1', '-p', String(rpc.port), '-t', '1']);
    expect(alive(rpc.pid)).toBe(true);
    // idempotent retry: same id, same request → the same engine
    const again = await startEngine(agent, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'worker-0', port: 0, threads: 1, model: 'tiny' });
    expect(again.pid).toBe(rpc.pid);

    // All layers on the RPC device: -ngl 99 with --rpc and no local GPU puts every layer on RPC0.
    const head = await startEngine(agent, {
      kind: 'ENGINE_KIND_LLAMA_SERVER',
      engineId: 'head',
      args: ['-m', model, '--rpc', `127.0.0.1:${rpc.port}`, '-ngl', '99', '-c', '8192', '-np', '1', '-t', '1', '--no-warmup', '--metrics'],
      model: 'tiny',
    });
    expect(head.host).toBe('127.0.0.1');
    expect(head.argv.slice(-4)).toEqual(['--host', '127.0.0.1', '--port', String(head.port)]);
    const health = await fetch(`http://127.0.0.1:${head.port}/health`);
    expect(health.status).toBe(200);

    const req = { engineId: 'head', prompt: 'The quick brown fox', maxTokens: 24, temperature: 0, requestId: 'r1' };
    const a = await generate(agent, req);
    expect(a.tokens).toHaveLength(24);
    expect(a.done.finishReason).toBe('length');
    expect(a.done.completionTokens).toBe(24);
    expect(a.done.promptTokens).toBeGreaterThan(0);
    expect(a.done.timings.firstTokenMs).toBeGreaterThan(0);
    expect(new Set(a.tokens).size).toBeGreaterThan(3); // not one token repeated: a real model ran
    // greedy is deterministic through the relay
    const b = await generate(agent, req);
    expect(b.tokens).toEqual(a.tokens);

    const text = await metricsText(agent);
    // No port label (a restart on a new port would start a new series): kind and model.
    expect(text).toMatch(/^orchard_engine_up\{engine="rpc-server",model="tiny"\} 1$/m);
    expect(text).toMatch(/^orchard_engine_up\{engine="llama-server",model="tiny"\} 1$/m);
    expect(events.some((e) => e.event === 'engineStarted' && (e.engineStarted as EngineInfo).engineId === 'head')).toBe(true);
  });

  it('client cancellation stops decoding: the llama-server slot goes idle', async () => {
    const head = (await unary<{ engines: EngineInfo[] }>(agent, 'describe', {})).engines.find((e) => e.engineId === 'head')!;
    // llama.cpp counts every llama_decode() call (one per generated token at batch 1), cancelled
    // requests included; /slots resets its per-slot counters when a slot is released.
    const decodes = async () => {
      const text = await (await fetch(`http://127.0.0.1:${head.port}/metrics`)).text();
      return Number(/^llamacpp:n_decode_total (\d+)/m.exec(text)![1]);
    };
    const before = await decodes();
    const call = agent.client.generate!({ engineId: 'head', prompt: 'Once upon a time', maxTokens: 7000, temperature: 0 }) as grpc.ClientReadableStream<{ event: string }>;
    let got = 0;
    call.on('error', () => {});
    await new Promise<void>((resolve) => call.on('data', () => ++got >= 5 && resolve()));
    const slotsBusy = (await (await fetch(`http://127.0.0.1:${head.port}/slots`)).json()) as { is_processing: boolean }[];
    expect(slotsBusy[0]!.is_processing).toBe(true);
    call.cancel();
    await waitFor(
      'slot idle after cancel',
      async () => {
        const slots = (await (await fetch(`http://127.0.0.1:${head.port}/slots`)).json()) as { is_processing: boolean }[];
        return slots[0]!.is_processing ? undefined : true;
      },
      5000,
    );
    const atIdle = await decodes();
    await new Promise((r) => setTimeout(r, 500));
    expect(await decodes()).toBe(atIdle); // nothing decodes any more
    const decoded = atIdle - before;
    expect(decoded).toBeGreaterThanOrEqual(5);
    // It stopped because of the cancel, far before the 7000-token budget.
    expect(decoded).toBeLessThan(7000);
    console.info(`cancelled generation stopped after ${decoded} llama_decode calls (budget 7000 tokens)`);
  });

  it('bad requests get clear gRPC statuses and the agent stays up', async () => {
    const unknown = await grpcError(unary(agent, 'startEngine', { kind: 'ENGINE_KIND_BOGUS' }));
    expect(unknown.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(unknown.details).toMatch(/unknown engine kind/);

    const taken = await freeListener();
    try {
      const port = (taken.address() as { port: number }).port;
      const inUse = await grpcError(unary(agent, 'startEngine', { kind: 'ENGINE_KIND_RPC_SERVER', port }));
      expect(inUse.code).toBe(grpc.status.FAILED_PRECONDITION);
      expect(inUse.details).toBe(`port ${port} on 127.0.0.1 is already in use`);
    } finally {
      taken.close();
    }

    const host = await grpcError(unary(agent, 'startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['--host', '0.0.0.0'] }));
    expect(host.code).toBe(grpc.status.INVALID_ARGUMENT);

    // An engine that exits at once: the error carries its stderr.
    const broken = await grpcError(unary(agent, 'startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['-m', join(tmp, 'no-such-model.gguf')] }));
    expect(broken.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(broken.details).toMatch(/llama-server .* exited with code \d+ before it was ready: .+/);

    // Not ready within the timeout: DEADLINE_EXCEEDED, and the half-started engine is stopped.
    const slow = await grpcError(
      unary(agent, 'startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', engineId: 'too-slow', args: ['-m', model, '-c', '512', '-t', '1'], readyTimeoutSeconds: 0.001 }),
    );
    expect(slow.code).toBe(grpc.status.DEADLINE_EXCEEDED);
    expect(slow.details).toMatch(/^llama-server too-slow did not accept connections within 0.001 s/);
    expect(() => execFileSync('pgrep', ['-f', `llama-server -m ${model} -c 512 -t 1 --host`])).toThrow(); // pgrep: no match

    const conflict = await grpcError(unary(agent, 'startEngine', { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'worker-0', threads: 2 }));
    expect(conflict.code).toBe(grpc.status.ALREADY_EXISTS);

    const noEngine = await grpcError(unary(agent, 'stopEngine', { engineId: 'nope' }));
    expect(noEngine.code).toBe(grpc.status.NOT_FOUND);
    const genNoEngine = await grpcError(generate(agent, { engineId: 'nope', prompt: 'x' }));
    expect(genNoEngine.code).toBe(grpc.status.NOT_FOUND);
    const genOnRpc = await grpcError(generate(agent, { engineId: 'worker-0', prompt: 'x' }));
    expect(genOnRpc.code).toBe(grpc.status.FAILED_PRECONDITION);

    const d = await unary<{ engines: EngineInfo[] }>(agent, 'describe', {});
    expect(d.engines.map((e) => e.engineId).sort()).toEqual(['head', 'worker-0']);
  });

  it('StartEngine with a missing binary is a clear error', async () => {
    const missing = await startAgent(join(tmp, 'missing-bin'), [], { ...process.env, ORCHARD_LLAMA_BIN_DIR: join(tmp, 'no-bin-dir') });
    try {
      const err = await grpcError(unary(missing, 'startEngine', { kind: 'ENGINE_KIND_RPC_SERVER' }));
      expect(err.code).toBe(grpc.status.FAILED_PRECONDITION);
      expect(err.details).toContain(`ORCHARD_LLAMA_BIN_DIR=${join(tmp, 'no-bin-dir')}`);
      expect((await unary<{ profile: { nodeId: string } }>(missing, 'describe', {})).profile.nodeId).toBe(missing.ready.nodeId);
    } finally {
      missing.client.close();
      missing.child.kill('SIGTERM');
      await missing.exited;
    }
  });

  it('StopEngine ends the worker; the head that depended on it dies and its exit is reported with stderr', async () => {
    const d = await unary<{ engines: EngineInfo[] }>(agent, 'describe', {});
    const worker = d.engines.find((e) => e.engineId === 'worker-0')!;
    const head = d.engines.find((e) => e.engineId === 'head')!;
    expect(await unary(agent, 'stopEngine', { engineId: 'worker-0' })).toEqual({ stopped: true });
    expect(alive(worker.pid)).toBe(false);
    const exitOf = (id: string) => events.find((e) => e.event === 'engineExited' && (e.engineExited as { engineId: string }).engineId === id)?.engineExited as
      | { expected: boolean; lastStderrLines: string[]; port: number; exitCode: number; signal: string }
      | undefined;
    const wexit = await waitFor('worker exit event', () => exitOf('worker-0'));
    expect(wexit.expected).toBe(true);
    expect(wexit.port).toBe(worker.port);

    // llama.cpp has no recovery from a dead RPC worker: the head fails on its next use.
    await generate(agent, { engineId: 'head', prompt: 'again', maxTokens: 4, temperature: 0 }).catch(() => undefined);
    const hexit = await waitFor('head exit event', () => exitOf('head'), 20_000);
    expect(hexit.expected).toBe(false);
    expect(hexit.lastStderrLines.length).toBeGreaterThan(0);
    expect(hexit.lastStderrLines.length).toBeLessThanOrEqual(20);
    expect(alive(head.pid)).toBe(false);
    expect(await metricsText(agent)).toMatch(/^orchard_engine_exits_total\{engine="llama-server",expected="false"\} 1$/m);
  });

  it('an engine killed from outside is reported as unexpected with its signal', async () => {
    const rpc = await startEngine(agent, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'victim', threads: 1 });
    process.kill(rpc.pid, 'SIGKILL');
    const exit = await waitFor('victim exit', () =>
      events.find((e) => e.event === 'engineExited' && (e.engineExited as { engineId: string }).engineId === 'victim'),
    );
    expect(exit.engineExited).toMatchObject({ engineId: 'victim', expected: false, signal: 'SIGKILL', exitCode: -1 });
    const d = await unary<{ engines: EngineInfo[] }>(agent, 'describe', {});
    expect(d.engines.find((e) => e.engineId === 'victim')).toBeUndefined();
  });

  it('SIGTERM stops the engines, then the agent exits 0', async () => {
    const rpc = await startEngine(agent, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w-term', threads: 1 });
    agent.child.kill('SIGTERM');
    expect(await agent.exited).toEqual({ code: 0, signal: null });
    expect(alive(rpc.pid)).toBe(false);
  });

  it("SIGKILL of the agent's whole process group: engines (own groups) are still ended by the watchdog", async () => {
    const victim = await startAgent(join(tmp, 'sigkill-group'));
    try {
      const w = await startEngine(victim, { kind: 'ENGINE_KIND_RPC_SERVER', threads: 1 });
      victim.client.close();
      process.kill(-victim.ready.pid, 'SIGKILL'); // the agent was spawned as a group leader
      await victim.exited;
      await waitFor('engine gone', () => !alive(w.pid) || undefined, 5000);
    } finally {
      killGroup(victim.child);
    }
  });

  it('SIGINT (Ctrl-C) stops the engines in order: their exits are expected', async () => {
    const a = await startAgent(join(tmp, 'sigint'));
    const seen: { event: string; engineExited?: { expected: boolean } }[] = [];
    try {
      const w = await startEngine(a, { kind: 'ENGINE_KIND_RPC_SERVER', threads: 1 });
      const watch = a.client.watch!({}) as grpc.ClientReadableStream<{ event: string }>;
      watch.on('data', (e: { event: string }) => seen.push(e));
      watch.on('error', () => {});
      await waitFor('watch open', () => seen.length > 0 || undefined);
      process.kill(-a.ready.pid, 'SIGINT'); // what a terminal sends: the whole foreground group
      expect(await a.exited).toEqual({ code: 0, signal: null });
      expect(alive(w.pid)).toBe(false);
      expect(seen.filter((e) => e.event === 'engineExited').map((e) => e.engineExited!.expected)).toEqual([true]);
    } finally {
      a.client.close();
      killGroup(a.child);
    }
  });

  it('a killed watchdog is replaced and still guards the engines', async () => {
    const victim = await startAgent(join(tmp, 'watchdog-respawn'));
    try {
      const w = await startEngine(victim, { kind: 'ENGINE_KIND_RPC_SERVER', threads: 1 });
      const watchdogs = () =>
        execFileSync('pgrep', ['-P', String(victim.ready.pid), '-f', 'orchard-engine-watchdog'], { encoding: 'utf8' })
          .split('\n')
          .filter(Boolean)
          .map(Number);
      const [first] = watchdogs();
      expect(first).toBeGreaterThan(0);
      process.kill(first!, 'SIGKILL');
      const second = await waitFor('a new watchdog', () => {
        try {
          return watchdogs().find((p) => p !== first);
        } catch {
          return undefined; // pgrep exits 1 while none runs
        }
      });
      expect(second).not.toBe(first);
      victim.client.close();
      process.kill(victim.ready.pid, 'SIGKILL');
      await victim.exited;
      await waitFor('engine gone', () => !alive(w.pid) || undefined, 5000);
    } finally {
      killGroup(victim.child);
    }
  });

  it('SIGKILL of the agent: its engines are gone within 5 s (watchdog)', async () => {
    const victim = await startAgent(join(tmp, 'sigkill'));
    try {
      const w1 = await startEngine(victim, { kind: 'ENGINE_KIND_RPC_SERVER', threads: 1 });
      const w2 = await startEngine(victim, { kind: 'ENGINE_KIND_RPC_SERVER', threads: 1, bindHost: '0.0.0.0' });
      expect(alive(w1.pid) && alive(w2.pid)).toBe(true);
      victim.client.close();
      process.kill(victim.ready.pid, 'SIGKILL'); // the agent only, not its process group
      await victim.exited;
      const t0 = Date.now();
      await waitFor('engines gone', () => (!alive(w1.pid) && !alive(w2.pid)) || undefined, 5000);
      console.info(`engines gone ${Date.now() - t0} ms after the agent's SIGKILL`);
    } finally {
      killGroup(victim.child);
    }
  });
});
