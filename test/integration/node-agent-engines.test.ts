import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { lstat, mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, expect, it } from 'vitest';
import {
  AGENT_ENV,
  type Agent,
  alive,
  type EngineInfo,
  freeListener,
  generate,
  grpcError,
  killGroup,
  metricsText,
  runCli,
  startAgent,
  startEngine,
  stopAll,
  unary,
  waitFor,
} from '../helpers/node-agent.ts';
import { listensOn } from '../../src/node/ports.ts';
import { describeWith, llamaEngines } from '../helpers/needs.ts';
import { canConnect } from '../helpers/processes.ts';

/*
 * The node agent as a real process (`orchard node --json`), driven over real gRPC, running real
 * llama.cpp engines (from `orchard setup`'s cache) on a generated model: StartEngine, Generate,
 * cancellation, bad requests, and how engines end when the agent stops, is killed or loses its
 * watchdog. Every process started here is killed in afterAll (process groups), also when a test
 * fails.
 */

const engines = await llamaEngines(AGENT_ENV);
let tmp = '';
let model = '';

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'orchard-node-engines-'));
  if (!engines.ok) return;
  model = join(tmp, 'model.gguf');
  // Small enough to load in a second on 2 cores, big enough to decode thousands of tokens.
  const r = await runCli(['testmodel', 'gguf', '--out', model, '--layers', '4', '--dim', '128', '--ffn', '384', '--heads', '4', '--kv-heads', '2', '--ctx', '8192']);
  if (r.code !== 0) throw new Error(`testmodel failed: ${r.stderr}`);
});

afterAll(async () => {
  stopAll();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

/** A typed head request (proto LlamaServerOptions): what the coordinator sends, defaults of a plain load. */
function headOptions(modelPath: string, o: Record<string, unknown> = {}): Record<string, unknown> {
  return { modelPath, context: 8192, parallel: 1, kvUnified: true, cacheType: 'f16', ubatch: 512, flashAttention: true, gpuLayers: 99, ...o };
}

describeWith([engines], 'node agent with real llama.cpp engines', () => {
  let agent: Agent;
  const events: { event: string; [k: string]: unknown }[] = [];
  let watch: grpc.ClientReadableStream<{ event: string }> | undefined;

  beforeAll(async () => {
    agent = await startAgent(join(tmp, 'engines'), ['--name', 'engine-node', '--models-dir', tmp]);
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
    // only on its Unix socket in the agent's private socket directory: no TCP listener at all
    const socketDir = join(tmp, 'engines', 'run', 'sockets');
    const socket = join(socketDir, `rpc-${rpc.port}.sock`);
    expect(rpc.argv.slice(1)).toEqual(['-H', `unix:${socket}`, '-t', '1']);
    expect(alive(rpc.pid)).toBe(true);
    expect((await stat(socketDir)).mode & 0o777).toBe(0o700);
    expect((await lstat(socket)).isSocket()).toBe(true);
    expect(await listensOn(rpc.pid)).toBe(false);
    expect(await canConnect('127.0.0.1', rpc.port)).toBe(false);
    // idempotent retry: same id, same request → the same engine
    const again = await startEngine(agent, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'worker-0', port: 0, threads: 1, model: 'tiny' });
    expect(again.pid).toBe(rpc.pid);

    // All layers on the RPC device: -ngl 99 with --rpc and no local GPU puts every layer on RPC0.
    const head = await startEngine(agent, {
      kind: 'ENGINE_KIND_LLAMA_SERVER',
      engineId: 'head',
      llama: headOptions(model, { rpc: [{ nodeId: agent.ready.nodeId, enginePort: rpc.port }], devices: ['RPC0'] }),
      threads: 1,
      model: 'tiny',
    });
    expect(head.argv.slice(1, 3)).toEqual(['-m', model]);
    expect(head.argv[head.argv.indexOf('--rpc') + 1]).toBe(`unix:${socket}`);
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
    const missingModel = await grpcError(unary(agent, 'startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', llama: headOptions(join(tmp, 'no-such-model.gguf')) }));
    expect(missingModel.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(missingModel.details).toMatch(/is not a file on this node/);

    // An engine that exits at once: the error carries its stderr.
    const junk = join(tmp, 'junk.gguf');
    writeFileSync(junk, 'not a gguf file');
    const broken = await grpcError(unary(agent, 'startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', llama: headOptions(junk) }));
    expect(broken.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(broken.details).toMatch(/llama-server .* exited with code \d+ before it was ready: .+/);

    // Not ready within the timeout: DEADLINE_EXCEEDED, and the half-started engine is stopped.
    const slow = await grpcError(
      unary(agent, 'startEngine', { kind: 'ENGINE_KIND_LLAMA_SERVER', engineId: 'too-slow', llama: headOptions(model, { context: 512 }), threads: 1, readyTimeoutSeconds: 0.001 }),
    );
    expect(slow.code).toBe(grpc.status.DEADLINE_EXCEEDED);
    expect(slow.details).toMatch(/^llama-server too-slow did not accept connections within 0.001 s/);
    expect(() => execFileSync('pgrep', ['-f', `llama-server -m ${model} -c 512 `])).toThrow(); // pgrep: no match

    const conflict = await grpcError(unary(agent, 'startEngine', { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'worker-0', threads: 2 }));
    expect(conflict.code).toBe(grpc.status.ALREADY_EXISTS);

    // Somebody else's engine: only the owner that started it may stop it.
    await startEngine(agent, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'owned', threads: 1, owner: 'cluster-a' });
    const foreign = await grpcError(unary(agent, 'stopEngine', { engineId: 'owned', owner: 'cluster-b' }));
    expect(foreign.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(await unary(agent, 'stopEngine', { engineId: 'owned', owner: 'cluster-a' })).toEqual({ stopped: true });

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
      const w2 = await startEngine(victim, { kind: 'ENGINE_KIND_RPC_SERVER', threads: 1 });
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
