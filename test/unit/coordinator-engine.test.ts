import { describe, expect, it } from 'vitest';
import { hostOf } from '../../src/coordinator/instances/llama/driver.ts';
import { headLayout } from '../../src/coordinator/instances/llama/layout.ts';
import { type PlannedDevice, parseEngineLog, verifyEngineReport } from '../../src/coordinator/instances/llama/verify.ts';
import { plannerNames } from '../../src/coordinator/instances/planner-adapter.ts';
import { enginePrefix, resolveLoadOptions } from '../../src/coordinator/instances/runtime.ts';
import { llamaServerToWire } from '../../src/coordinator/membership/agent-client.ts';
import { pickServiceAddress } from '../../src/coordinator/membership/discovery.ts';
import type { NodeEntry } from '../../src/coordinator/membership/registry.ts';
import { engineSpecFromRequest, llamaServerArgs } from '../../src/node/engine-spec.ts';
import { UsageError } from '../../src/shared/errors.ts';
import { profileFromWire, profileToWire } from '../../src/shared/hardware-wire.ts';
import { DEFAULT_MEMORY_OPTIONS } from '../../src/shared/memory/stage.ts';
import type { LlamaServerOptions } from '../../src/shared/placement/llama-args.ts';

// Recorded from this llama.cpp (llama-server -lv 5, two ggml-rpc-servers, --tensor-split 7,2,
// 8-layer test model): the lines the agent returns in StartEngineResponse.startup_log.
const LOG = `0.00.085.210 I llama_prepare_model_devices: using device RPC0 (127.0.0.1:47001) (unknown id) - 24105 MiB free
0.00.085.523 I llama_prepare_model_devices: using device RPC1 (127.0.0.1:47002) (unknown id) - 24105 MiB free
0.00.269.673 D load_tensors: layer   0 assigned to device RPC0, is_swa = 0
0.00.269.696 D load_tensors: layer   1 assigned to device RPC0, is_swa = 0
0.00.269.712 D load_tensors: layer   2 assigned to device RPC0, is_swa = 0
0.00.269.728 D load_tensors: layer   3 assigned to device RPC0, is_swa = 0
0.00.269.744 D load_tensors: layer   4 assigned to device RPC0, is_swa = 0
0.00.269.760 D load_tensors: layer   5 assigned to device RPC0, is_swa = 0
0.00.269.776 D load_tensors: layer   6 assigned to device RPC0, is_swa = 0
0.00.269.792 D load_tensors: layer   7 assigned to device RPC1, is_swa = 0
0.00.269.808 D load_tensors: layer   8 assigned to device RPC1, is_swa = 0
0.00.298.850 I load_tensors:   CPU_Mapped model buffer size =    15.62 MiB
0.00.298.869 I load_tensors: RPC0[127.0.0.1:47001] model buffer size =    10.51 MiB
0.00.298.885 I load_tensors: RPC0[127.0.0.1:47002] model buffer size =    17.13 MiB
0.00.687.177 I llama_context:        CPU  output buffer size =     0.12 MiB
0.00.724.248 I llama_kv_cache: RPC0[127.0.0.1:47001] KV buffer size =     7.00 MiB
0.00.724.511 I llama_kv_cache: RPC0[127.0.0.1:47002] KV buffer size =     1.00 MiB
0.00.793.004 I sched_reserve: RPC0[127.0.0.1:47001] compute buffer size =    16.04 MiB
0.00.793.049 I sched_reserve: RPC0[127.0.0.1:47002] compute buffer size =    11.54 MiB
0.00.793.068 I sched_reserve:        CPU compute buffer size =     9.05 MiB`.split('\n');

const MIB = 2 ** 20;
const A = 'RPC0[127.0.0.1:47001]';
const B = 'RPC0[127.0.0.1:47002]';
const planned = (over: Partial<PlannedDevice>[] = []): PlannedDevice[] => [
  { device: A, nodeName: 'bravo', firstLayer: 0, lastLayer: 6, holdsOutput: false, predicted: { model: 10.51 * MIB, kv: 7 * MIB, compute: 16 * MIB }, budgetBytes: 600 * MIB, ...over[0] },
  { device: B, nodeName: 'alpha', firstLayer: 7, lastLayer: 7, holdsOutput: true, predicted: { model: 17.13 * MIB, kv: 1 * MIB, compute: 12 * MIB }, budgetBytes: 600 * MIB, ...over[1] },
];

describe('parseEngineLog', () => {
  it('maps registered device names to endpoints and sums buffers per device', () => {
    const r = parseEngineLog(LOG);
    expect([...r.layerDevice]).toEqual([
      [0, A], [1, A], [2, A], [3, A], [4, A], [5, A], [6, A], [7, B], [8, B],
    ]);
    expect(r.modelBytes.get(A)).toBe(Math.round(10.51 * MIB));
    expect(r.modelBytes.get(B)).toBe(Math.round(17.13 * MIB));
    expect(r.modelBytes.get('CPU_Mapped')).toBe(Math.round(15.62 * MIB));
    expect(r.kvBytes.get(A)).toBe(7 * MIB);
    expect(r.computeBytes.get(B)).toBe(Math.round(11.54 * MIB));
  });

  it('adds up several buffers of one device (e.g. SWA and full KV caches)', () => {
    const r = parseEngineLog(['llama_kv_cache: MTL0 KV buffer size =     2.00 MiB', 'llama_kv_cache: MTL0 KV buffer size =     3.00 MiB']);
    expect(r.kvBytes.get('MTL0')).toBe(5 * MIB);
  });
});

describe('verifyEngineReport', () => {
  it('accepts the engine doing exactly what the plan says', () => {
    const v = verifyEngineReport(parseEngineLog(LOG), planned(), 8);
    // Host buffers (token embeddings in CPU_Mapped, the CPU compute buffer) are reported apart.
    expect(v.host).toEqual({ model: Math.round(15.62 * MIB), kv: 0, compute: Math.round(9.05 * MIB) });
    expect(v.problems).toEqual([]);
    expect(v.ok).toBe(true);
    expect(v.devices.map((d) => [d.plannedLayers, d.actualLayers])).toEqual([
      ['0-6', '0-6'],
      ['7-7+output', '7+output'],
    ]);
  });

  it('fails when a layer landed elsewhere, naming layer, device and node', () => {
    const v = verifyEngineReport(parseEngineLog(LOG), planned([{ lastLayer: 5 }, { firstLayer: 6 }]), 8);
    expect(v.ok).toBe(false);
    expect(v.problems).toContain(`layer 6: planned on ${B} (alpha), engine put it on ${A}`);
  });

  it('fails when the output layer is not on the head', () => {
    const v = verifyEngineReport(parseEngineLog(LOG), planned([{ holdsOutput: true }, { holdsOutput: false }]), 8);
    expect(v.problems.some((p) => p.startsWith('output layer: planned on'))).toBe(true);
  });

  it('fails on a weights mismatch beyond the tolerance, and on buffers over the stage budget', () => {
    const wrongWeights = verifyEngineReport(parseEngineLog(LOG), planned([{ predicted: { model: 20 * MIB, kv: 0, compute: 0 } }]), 8);
    expect(wrongWeights.problems.join()).toMatch(/model buffer 10\.51 MiB, plan said 20\.00 MiB/);
    const small = verifyEngineReport(parseEngineLog(LOG), planned([{ budgetBytes: 20 * MIB }]), 8);
    expect(small.problems.join()).toMatch(/exceed the stage budget/);
  });

  it('fails without assignment lines and without KV sizes to derive them, rather than passing blindly', () => {
    const v = verifyEngineReport(parseEngineLog(LOG.filter((l) => !l.includes('assigned'))), planned(), 8);
    expect(v.ok).toBe(false);
    expect(v.problems[0]).toMatch(/no layer assignment lines/);
  });

  // The same engine at INFO verbosity: no "assigned" lines, ranges derived from KV buffer sizes.
  const INFO = LOG.filter((l) => !l.includes('assigned'));
  const KV_PER_LAYER = Array.from({ length: 8 }, () => 1 * MIB);

  it('derives the ranges from KV buffer sizes when the debug lines are absent', () => {
    const v = verifyEngineReport(parseEngineLog(INFO), planned(), 8, KV_PER_LAYER);
    expect(v.problems).toEqual([]);
    expect(v.devices.map((d) => d.actualLayers)).toEqual(['0-6', '7+output']);
  });

  it('derived ranges still catch a split that differs from the plan', () => {
    const v = verifyEngineReport(parseEngineLog(INFO), planned([{ lastLayer: 5 }, { firstLayer: 6 }]), 8, KV_PER_LAYER);
    expect(v.ok).toBe(false);
    expect(v.problems).toContain(`layer 6: planned on ${B} (alpha), engine put it on ${A}`);
  });

  it('KV sizes that are no whole number of layers are reported', () => {
    const odd = INFO.map((l) => l.replace('KV buffer size =     7.00 MiB', 'KV buffer size =     6.50 MiB'));
    const v = verifyEngineReport(parseEngineLog(odd), planned(), 8, KV_PER_LAYER);
    expect(v.ok).toBe(false);
    expect(v.problems.join()).toMatch(/not a whole number of layers/);
  });
});

/** What the agent runs for the typed request the coordinator sends (the same path as StartEngine), given the endpoints it resolved. */
function agentArgv(llama: LlamaServerOptions, rpcEndpoints: readonly string[]): string[] {
  return llamaServerArgs(engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: llamaServerToWire(llama) }).llama!, rpcEndpoints);
}

describe('headLayout', () => {
  const stages = [
    { nodeId: 'b', nodeName: 'bravo', firstLayer: 0, lastLayer: 6 },
    { nodeId: 'a', nodeName: 'alpha', firstLayer: 7, lastLayer: 7 },
  ];
  const remote = { nodeId: 'b', tunnel: { host: '10.0.0.2', port: 7000 }, enginePort: 5000 };
  const local = { nodeId: 'a', enginePort: 5001 };
  it('CPU-only head: every stage is an RPC server; --rpc precedes --device; split counts the output unit', () => {
    const layout = headLayout(stages, [remote, local], { modelPath: '/m.gguf', nLayer: 8, memory: DEFAULT_MEMORY_OPTIONS, headHasGpu: false });
    // typed targets on the wire, in device order: the agent, not the coordinator, makes endpoints
    expect(layout.llama.rpc).toEqual([remote, local]);
    const args = agentArgv(layout.llama, ['127.0.0.1:41000', '127.0.0.1:5001']);
    const at = (f: string) => args[args.indexOf(f) + 1];
    expect(at('--rpc')).toBe('127.0.0.1:41000,127.0.0.1:5001');
    expect(at('--device')).toBe('RPC0,RPC1');
    expect(args.indexOf('--rpc')).toBeLessThan(args.indexOf('--device'));
    expect(at('--tensor-split')).toBe('7,2');
    expect(at('-ngl')).toBe('9');
    expect(at('-lv')).toBe('4'); // INFO (buffer sizes); DEBUG slows decode, only on request
    expect(at('-m')).toBe('/m.gguf');
    const dbg = headLayout(stages, [remote, local], { modelPath: '/m.gguf', nLayer: 8, memory: DEFAULT_MEMORY_OPTIONS, headHasGpu: false, debugLog: true });
    const dbgArgs = agentArgv(dbg.llama, ['127.0.0.1:1', '127.0.0.1:2']);
    expect(dbgArgs[dbgArgs.indexOf('-lv') + 1]).toBe('5');
    // devices are named by the endpoints the head reports (a forwarder port for the remote stage)
    const devices = layout.devices(['127.0.0.1:41000', '127.0.0.1:5001']);
    expect(devices.map((d) => d.device)).toEqual(['RPC0[127.0.0.1:41000]', 'RPC0[127.0.0.1:5001]']);
    expect(devices.map((d) => d.holdsOutput)).toEqual([false, true]);
    expect(() => layout.devices(['127.0.0.1:1'])).toThrow(/1 rpc endpoint/);
    expect(() => agentArgv(layout.llama, ['127.0.0.1:1'])).toThrow(/2 rpc target/);
  });

  it('Metal head: its stage is MTL0, last, with no rpc-server', () => {
    const layout = headLayout(stages, [remote, undefined], { modelPath: '/m.gguf', nLayer: 8, memory: DEFAULT_MEMORY_OPTIONS, headHasGpu: true });
    const args = agentArgv(layout.llama, ['127.0.0.1:41000']);
    expect(args[args.indexOf('--rpc') + 1]).toBe('127.0.0.1:41000');
    expect(args[args.indexOf('--device') + 1]).toBe('RPC0,MTL0');
    expect(layout.devices(['127.0.0.1:41000']).map((d) => d.device)).toEqual(['RPC0[127.0.0.1:41000]', 'MTL0']);
  });

  it('refuses stages that do not tile the model', () => {
    expect(() => headLayout([stages[0]!], [local], { modelPath: '/m', nLayer: 8, memory: DEFAULT_MEMORY_OPTIONS, headHasGpu: false })).toThrow(/cover/);
  });
});

describe('discovery address choice', () => {
  it('prefers the address the answer came from, then IPv4, and brackets IPv6', () => {
    expect(pickServiceAddress({ addresses: ['fe80::1', '10.0.0.2', '192.168.1.2'], referer: { address: '192.168.1.2' }, port: 50151 })).toBe('192.168.1.2:50151');
    expect(pickServiceAddress({ addresses: ['fe80::1', '10.0.0.2'], referer: { address: '10.9.9.9' }, port: 1 })).toBe('10.0.0.2:1');
    expect(pickServiceAddress({ addresses: ['fe80::1'], port: 2 })).toBe('[fe80::1]:2');
    expect(pickServiceAddress({ addresses: [], port: 2 })).toBeUndefined();
    expect(pickServiceAddress({ addresses: ['10.0.0.1'], port: 0 })).toBeUndefined();
  });
});

describe('runtime helpers', () => {
  it('planner names are unique even when node names collide', () => {
    const n = (id: string, name: string) => ({ nodeId: id, profile: { name } }) as unknown as NodeEntry;
    expect([...plannerNames([n('id-aaaaaaaa1', 'mac'), n('id-bbbbbbbb2', 'mac'), n('c', 'studio')]).keys()]).toEqual(['mac#id-aaaaa', 'mac#id-bbbbb', 'studio']);
  });

  it('load options: defaults, and usage errors for nonsense', () => {
    expect(resolveLoadOptions(undefined)).toEqual({ ctx: 4096, cacheType: 'f16', parallel: 1, pin: [], parallelism: 'auto', allowUntunnelledRdma: false });
    expect(resolveLoadOptions({ ctx: 0, cacheType: '', parallel: 0 })).toEqual({ ctx: 4096, cacheType: 'f16', parallel: 1, pin: [], parallelism: 'auto', allowUntunnelledRdma: false });
    expect(() => resolveLoadOptions({ cacheType: 'q5_9' })).toThrow(UsageError);
    expect(() => resolveLoadOptions({ parallel: 1000 })).toThrow(UsageError);
    expect(() => resolveLoadOptions({ ctx: 8 })).toThrow(UsageError);
  });

  it('engine ids carry a short cluster prefix valid for the agent', () => {
    const p = enginePrefix('80c3a268-01c6-4327-a275-427ebaf57f14');
    expect(p).toBe('o80c3a268-');
    expect(`${p}abcdef12-s0-rpc`).toMatch(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/);
  });

  it('hostOf handles IPv4, names and bracketed IPv6', () => {
    expect(hostOf('10.0.0.1:5')).toBe('10.0.0.1');
    expect(hostOf('mac.local:5')).toBe('mac.local');
    expect(hostOf('[fe80::1]:5')).toBe('fe80::1');
  });

  it('profiles survive the wire (64-bit sizes travel as strings)', () => {
    const p = profileFromWire({ nodeId: 'n', name: 'a', os: 'linux', memoryBytes: '68719476736', budgetBytes: '1', bandwidthBytesPerSecond: '400000000000', wiredLimitBytes: '0', engines: ['rpc-server'], interfaces: [{ name: 'en0', addresses: ['10.0.0.1'], thunderbolt: true }] });
    expect(p.memoryBytes).toBe(68719476736);
    expect(p.os).toBe('linux');
    expect(p.interfaces[0]).toEqual({ name: 'en0', addresses: ['10.0.0.1'], thunderbolt: true, rdma: false });
    expect(profileFromWire(profileToWire(p) as Record<string, unknown>)).toEqual(p);
  });
});
