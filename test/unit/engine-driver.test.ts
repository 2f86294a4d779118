import { describe, expect, it } from 'vitest';
import type { AgentClient } from '../../src/coordinator/membership/agent-client.ts';
import type { NodeEntry } from '../../src/coordinator/membership/registry.ts';
import { type Cluster, type EngineExit, EngineRoster } from '../../src/coordinator/instances/driver.ts';
import { LlamaDriver } from '../../src/coordinator/instances/llama/driver.ts';
import { MlxDriver } from '../../src/coordinator/instances/mlx/driver.ts';
import { DEFAULT_LOAD_OPTIONS } from '../../src/coordinator/instances/types.ts';
import { createLogger } from '../../src/shared/log.ts';

// What every engine family does alike (record, attribute an exit, stop in order) and what the
// drivers decide before any engine starts; starting real engines is test/integration's job.
const log = createLogger('test', 'silent');

function fakeCluster(states: Record<string, NodeEntry['state']>) {
  const stopped: string[] = [];
  const node = (id: string) => (states[id] ? ({ nodeId: id, profile: { name: `n-${id}` }, state: states[id] } as unknown as NodeEntry) : undefined);
  const agent = (id: string) =>
    states[id]
      ? ({
          stopEngine: async (engineId: string) => {
            // the head's stop takes a while: the workers must still wait for it
            if (engineId.endsWith('-head')) await new Promise((r) => setTimeout(r, 20));
            stopped.push(engineId);
            return true;
          },
        } as unknown as AgentClient)
      : undefined;
  const cluster: Cluster = { log, node, agent };
  return { cluster, stopped };
}

const exit = (engineId: string, o: Partial<EngineExit> = {}): EngineExit => ({
  kind: 'engine-exited',
  engineId,
  engineKind: 'ENGINE_KIND_RPC_SERVER',
  exitCode: 1,
  signal: '',
  expected: false,
  lastStderrLines: [],
  ...o,
});

describe('EngineRoster', () => {
  it('names the engine, its node and how it ended when one of its own exits, and ignores others', () => {
    const gone: string[] = [];
    const { cluster } = fakeCluster({ a: 'up', b: 'up' });
    const r = new EngineRoster(cluster, (reason) => gone.push(reason), 'cluster-1');
    r.record({ nodeId: 'a', engineId: 'x-s0-rpc', label: 'rpc-server' });
    r.record({ nodeId: 'b', engineId: 'x-head', label: 'llama-server' }, true);
    r.exited('a', exit('x-head')); // right id, wrong node
    r.exited('b', exit('other'));
    expect(gone).toEqual([]);
    r.exited('a', exit('x-s0-rpc', { lastStderrLines: ['loading', 'out of memory  ', ' '] }));
    r.exited('b', exit('x-head', { signal: 'SIGKILL' }));
    expect(gone).toEqual(['rpc-server on node n-a (a) exited (exit code 1): out of memory', 'llama-server on node n-b (b) exited (signal SIGKILL)']);
    expect(r.head?.engineId).toBe('x-head');
  });

  it('stops the engines first chosen before the rest, skips nodes that are down, and forgets them all', async () => {
    const { cluster, stopped } = fakeCluster({ a: 'up', b: 'up', c: 'down' });
    const r = new EngineRoster(cluster, () => {}, 'cluster-1');
    r.record({ nodeId: 'a', engineId: 'x-s0-rpc', label: 'rpc-server' });
    r.record({ nodeId: 'c', engineId: 'x-s1-rpc', label: 'rpc-server' });
    r.record({ nodeId: 'b', engineId: 'x-s2-rpc', label: 'rpc-server' });
    r.record({ nodeId: 'b', engineId: 'x-head', label: 'llama-server' }, true);
    await r.stop((e) => e === r.head);
    expect(stopped).toEqual(['x-head', 'x-s0-rpc', 'x-s2-rpc']);
    expect(r.list).toEqual([]);
    await r.stop();
    expect(stopped).toHaveLength(3);
  });
});

describe('drivers before any engine starts', () => {
  const { cluster } = fakeCluster({});
  it('MLX serves one request at a time; llama.cpp keeps the parallel slots asked for', () => {
    const o = { ...DEFAULT_LOAD_OPTIONS, parallel: 4 };
    expect(new MlxDriver(cluster, {}).fitOptions(o, 'm').parallel).toBe(1);
    expect(new LlamaDriver(cluster, {}).fitOptions(o).parallel).toBe(4);
  });

  it('--allow-untunnelled-rdma is an MLX load flag (JACCL); a llama.cpp load refuses it, a new group is tunnelled', () => {
    const o = { ...DEFAULT_LOAD_OPTIONS, allowUntunnelledRdma: true };
    expect(new MlxDriver(cluster, {}).fitOptions(o, 'm').allowUntunnelledRdma).toBe(true);
    expect(() => new LlamaDriver(cluster, {}).fitOptions(o)).toThrow(/--allow-untunnelled-rdma is for MLX models/);
    for (const d of [new LlamaDriver(cluster, {}), new MlxDriver(cluster, {})]) {
      expect(d.group({ name: 'm', path: '/m', options: o, engineIdPrefix: 'oc0ffee00-1234', owner: 'c0ffee00', gone: () => {} }).untunnelledRdma).toBe(false);
    }
  });

  it('a new group has no engines, no head and no endpoints, and refuses to generate', async () => {
    for (const d of [new LlamaDriver(cluster, {}), new MlxDriver(cluster, {})]) {
      const g = d.group({ name: 'm', path: '/m', options: DEFAULT_LOAD_OPTIONS, engineIdPrefix: 'oc0ffee00-1234', owner: 'c0ffee00', gone: () => {} });
      expect([g.engines, g.head, g.endpoint(0), g.verification]).toEqual([[], undefined, '', undefined]);
      await expect(g.generate({ prompt: 'hi', maxTokens: 1, temperature: 0, topP: 0, seed: 0, stop: [], requestId: 'r' })).rejects.toThrow(/not ready/);
    }
  });
});
