import { describe, expect, it } from 'vitest';
import type { AgentClient } from '../../src/coordinator/membership/agent-client.ts';
import type { NodeEntry } from '../../src/coordinator/membership/registry.ts';
import { type Cluster, type EngineExit, EngineRoster, type LoadContext } from '../../src/coordinator/instances/driver.ts';
import { LlamaDriver } from '../../src/coordinator/instances/llama/driver.ts';
import { MlxDriver } from '../../src/coordinator/instances/mlx/driver.ts';
import { DEFAULT_LOAD_OPTIONS } from '../../src/coordinator/instances/types.ts';
import { createLogger } from '../../src/shared/log.ts';
import { uniformSource } from '../../src/shared/testmodel/prng.ts';

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

describe('MLX launch: a ring port taken before the rank bound it', () => {
  /** Agents that answer StartEngine for MLX ranks; `fail(call)` makes a call fail with its message. */
  function mlxCluster(fail: (c: { engineId: string; port: number }) => string | undefined) {
    const calls: { engineId: string; port: number }[] = [];
    const stopped: string[] = [];
    const ids = ['a', 'b', 'c'];
    const node = (id: string) => (ids.includes(id) ? ({ nodeId: id, profile: { name: `n-${id}` }, state: 'up' } as unknown as NodeEntry) : undefined);
    const agent = (id: string) =>
      ({
        startMlxRank: async (o: { engineId: string; mlx: { rank: number; ringRanks: { enginePort: number }[] } }) => {
          const c = { engineId: o.engineId, port: o.mlx.ringRanks[o.mlx.rank]!.enginePort };
          calls.push(c);
          const why = fail(c);
          if (why) throw new Error(why);
          return { engine: { engineId: o.engineId, port: c.port }, logLines: [] };
        },
        stopEngine: async (engineId: string) => {
          stopped.push(`${id}:${engineId}`);
          return true;
        },
      }) as unknown as AgentClient;
    return { cluster: { log, node, agent } as Cluster, calls, stopped };
  }
  const load = {
    plan: {
      stages: ['a', 'b', 'c'].map((id, i) => ({ nodeId: id, nodeName: `n-${id}`, firstLayer: 2 * i, lastLayer: 2 * i + 1 })),
      parallelism: { mode: 'pipeline', reason: 'test' },
    },
    // b advertises a range of its own; a and c are older agents (the default range)
    nodes: ['a', 'b', 'c'].map((id) => ({ nodeId: id, address: '127.0.0.1:1', profile: { interfaces: [], tunnelPort: 7421, ...(id === 'b' ? { enginePorts: [24000, 24099] } : {}) } })),
    progress: () => {},
    assertLoading: () => {},
  } as unknown as LoadContext;
  const spec = { name: 'm', path: '/m', options: DEFAULT_LOAD_OPTIONS, engineIdPrefix: 'oc0ffee00-1', owner: 'c0ffee00', gone: () => {} };

  it('stops what started and launches every rank once more on fresh ports, under engine ids of their own', async () => {
    let failed = false;
    const f = mlxCluster((c) => {
      if (failed || !c.engineId.endsWith('-r1')) return undefined;
      failed = true;
      return "MLX rank 1 on n-b failed to start: [ring] Couldn't bind socket (error: 98)";
    });
    const g = new MlxDriver(f.cluster, { random: uniformSource(4) }).group(spec);
    await g.start(load);
    const first = f.calls.filter((c) => !/-\d$/.test(c.engineId));
    const second = f.calls.filter((c) => c.engineId.endsWith('-2'));
    // ranks 0..1 until "starting", then all three
    expect(second.map((c) => c.engineId).sort()).toEqual(['oc0ffee00-1-r0-2', 'oc0ffee00-1-r0-2', 'oc0ffee00-1-r1-2', 'oc0ffee00-1-r1-2', 'oc0ffee00-1-r2-2']);
    // every engine of the first launch was stopped before the second began
    expect(f.stopped.sort()).toEqual(['a:oc0ffee00-1-r2', 'b:oc0ffee00-1-r1', 'c:oc0ffee00-1-r0']);
    const portOf = (calls: typeof f.calls, rank: number) => calls.find((c) => c.engineId.includes(`-r${rank}`))!.port;
    // ranks 0 and 1 were started (rank 1 failed), rank 2 not yet: fresh ports for the two that were
    expect(first.map((c) => c.engineId)).toEqual(['oc0ffee00-1-r0', 'oc0ffee00-1-r1']);
    for (const r of [0, 1]) expect(portOf(second, r)).not.toBe(portOf(first, r));
    // each rank from its node's engine port range (rank 1 runs on b)
    expect(portOf(second, 1)).toBeGreaterThanOrEqual(24000);
    expect(portOf(second, 1)).toBeLessThanOrEqual(24099);
    for (const r of [0, 2]) expect(portOf(second, r)).toBeLessThanOrEqual(32767);
    expect(g.engines.map((e) => e.engineId).sort()).toEqual(['oc0ffee00-1-r0-2', 'oc0ffee00-1-r1-2', 'oc0ffee00-1-r2-2']);
    expect(g.endpoint(1)).toBe(`127.0.0.1:${portOf(second, 1)}`);
  });

  it('a second taken port is the load\'s one error; any other failure is not retried', async () => {
    const twice = mlxCluster((c) => (c.engineId.includes('-r1') ? 'port 24001 on 127.0.0.1 is already in use' : undefined));
    await expect(new MlxDriver(twice.cluster, { random: uniformSource(5) }).group(spec).start(load)).rejects.toThrow(/already in use/);
    expect(twice.calls.filter((c) => c.engineId.includes('-r1')).map((c) => c.engineId)).toEqual(['oc0ffee00-1-r1', 'oc0ffee00-1-r1-2']);
    const other = mlxCluster((c) => (c.engineId.includes('-r1') ? 'MLX is not set up on this node' : undefined));
    await expect(new MlxDriver(other.cluster, { random: uniformSource(6) }).group(spec).start(load)).rejects.toThrow(/not set up/);
    expect(other.calls.some((c) => c.engineId.endsWith('-2'))).toBe(false);
  });
});
