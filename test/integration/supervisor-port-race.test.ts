import pino from 'pino';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { EngineExit } from '../../src/node/engine-info.ts';
import { type EngineBinaries, engineSpecFromRequest } from '../../src/node/engine-spec.ts';
import { EngineSupervisor } from '../../src/node/supervisor.ts';
import { describeWith, llamaEngines } from '../helpers/needs.ts';
import { ORACLE_PROMPT, plainLlamaTokens } from '../helpers/oracle.ts';
import { RacedPortAllocator } from '../helpers/raced-ports.ts';
import { testGguf } from '../helpers/test-models.ts';

/*
 * The supervisor picks an engine's port from the engine port range, checks it free and hands it
 * to the engine, which binds it a moment later. When another process takes the port in that
 * moment, the engine dies before it is ready and the launch runs once more on a fresh port. Here
 * a real listener takes the port right after the allocator handed it out (RacedPortAllocator), with
 * real engines: the launch succeeds on another port, reports no exit and no restart, and the head
 * decodes the same greedy tokens as one plain llama-server.
 */

const engines = await llamaEngines();
const CTX = 1024;
const N_PREDICT = 12;
let model = '';
let oracle: number[] = [];

beforeAll(async () => {
  if (!engines.ok) return;
  model = await testGguf(['--layers', '2', '--dim', '128', '--ffn', '384', '--heads', '4', '--kv-heads', '2', '--ctx', String(CTX)]);
  oracle = await plainLlamaTokens(engines.value, { model, ctx: CTX, prompt: ORACLE_PROMPT, nPredict: N_PREDICT, threads: 1 });
});

describeWith([engines], 'supervisor: an engine port another process takes before the engine binds it', () => {
  const supervisors: EngineSupervisor[] = [];
  const allocators: RacedPortAllocator[] = [];
  afterAll(async () => {
    await Promise.all(supervisors.map((s) => s.shutdown()));
    await Promise.all(allocators.map((a) => a.close()));
  });

  for (const [nth, raced] of [
    [2, 'llama-server'],
    [1, 'rpc-server'],
  ] as const) {
    it(`a port taken from the ${raced}: it starts once more on a fresh port if it binds one; the head's tokens equal one plain llama-server`, async () => {
      const bins: EngineBinaries = engines.ok ? engines.value : { llamaServer: '', rpcServer: '' };
      const ports = new RacedPortAllocator(nth);
      allocators.push(ports);
      const warnings: string[] = [];
      const log = pino({ level: 'warn' }, { write: (line: string) => warnings.push((JSON.parse(line) as { msg: string }).msg) });
      const supervisor = new EngineSupervisor({ binaries: async () => bins, log, ports, stopGraceMs: 2000 });
      supervisors.push(supervisor);
      const exits: EngineExit[] = [];
      supervisor.on('exited', (e) => exits.push(e));

      const rpc = await supervisor.start(engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'worker', threads: 1 }));
      const head = await supervisor.start({
        ...engineSpecFromRequest({
          kind: 'ENGINE_KIND_LLAMA_SERVER',
          engineId: 'head',
          threads: 1,
          llama: { modelPath: model, context: CTX, parallel: 1, kvUnified: true, cacheType: 'f16', ubatch: 512, flashAttention: true, gpuLayers: 99, rpc: [{ nodeId: 'self', enginePort: rpc.port }], devices: ['RPC0'] },
        }),
        rpcEndpoints: [`unix:${rpc.socket}`],
      });

      const [first, last] = await ports.range();
      for (const p of [rpc.port, head.port]) expect(p >= first && p <= last).toBe(true);
      expect(exits, 'an engine that never was ready is no exit to report').toEqual([]);
      if (raced === 'rpc-server') {
        // It binds no port (its Unix socket only): the taken port is only its identity, nothing to race.
        expect(ports.handedOut).toHaveLength(2);
        expect(rpc.port).toBe(ports.raced);
        expect(warnings).toEqual([]);
      } else {
        // Three ports handed out: the raced one, the one its engine got instead, and the other engine's.
        expect(ports.handedOut).toHaveLength(3);
        expect(ports.raced).toBe(ports.handedOut[nth - 1]);
        expect(head.port).not.toBe(ports.raced);
        expect(head.port).toBe(ports.handedOut[nth]);
        // The first engine's death (of the taken port), then the fresh start.
        expect(warnings).toEqual(['engine exited', "another process took the engine's port before it bound it: starting it again on a fresh port"]);
        expect(supervisor.restartsOf(head.engineId)).toBe(0);
      }

      const res = await fetch(`http://127.0.0.1:${head.port}/completion`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: ORACLE_PROMPT, n_predict: N_PREDICT, temperature: 0, return_tokens: true, cache_prompt: false }),
      });
      const tokens = ((await res.json()) as { tokens: number[] }).tokens;
      expect(new Set(oracle).size).toBeGreaterThan(3);
      expect(tokens).toEqual(oracle);
    }, 20_000);
  }
});
