import { describe, expect, it } from 'vitest';
import {
  engineForModel,
  freshPorts,
  ipv4Of,
  jacclMatrix,
  looksLikeMlxModelDir,
  type MlxStageNode,
  mlxInstanceLaunch,
  rdmaDeviceBetween,
  ringRanks,
} from '../../src/coordinator/instances/mlx/launch.ts';
import { checkRankReport } from '../../src/coordinator/instances/mlx/instance.ts';
import { jacclDevicesFile, rankEnv } from '../../src/node/mlx/launch.ts';
import { DEFAULT_MLX_MAX_TOKENS, mlxRankSpecFromRequest, mlxRequestOf, sameMlxRank, StopScanner, withRingEndpoints } from '../../src/node/mlx/rank-spec.ts';
import { launchFiles } from '../../src/node/mlx/launch.ts';
import { requestLine } from '../../src/node/mlx/protocol.ts';
import type { NetworkInterfaceInfo } from '../../src/shared/hardware.ts';
import { uniformSource } from '../../src/shared/testmodel/prng.ts';

const lan = (ip: string): NetworkInterfaceInfo => ({ name: 'en0', addresses: [ip], thunderbolt: false, rdma: false });
const tb = (name: string, ip: string, rdma = true): NetworkInterfaceInfo => ({ name, addresses: [ip], thunderbolt: true, rdma });

function node(id: string, address: string, interfaces: NetworkInterfaceInfo[], layers = 2, tunnelPort: number | undefined = 7421): MlxStageNode {
  return { nodeId: id, nodeName: id, agentAddress: address, interfaces, layers, tunnelPort };
}

const opts = { modelDir: '/models/m', maxTokens: 4096, stallTimeoutSeconds: 30, random: uniformSource(1) };

describe('mlxInstanceLaunch: ranks, backend, ports', () => {
  it('assigns ranks in reverse plan order: rank 0 runs the last stage (head), split stays in plan order', () => {
    const stages = [node('a', '10.0.0.1:50151', [lan('10.0.0.1')], 3), node('b', '10.0.0.2:50151', [lan('10.0.0.2')], 2), node('c', '10.0.0.3:50151', [lan('10.0.0.3')], 1)];
    const l = mlxInstanceLaunch(stages, opts);
    expect(l.backend).toBe('ring');
    expect(l.ranks.map((r) => [r.rank, r.stage, r.nodeId])).toEqual([
      [0, 2, 'c'],
      [1, 1, 'b'],
      [2, 0, 'a'],
    ]);
    for (const r of l.ranks) {
      expect(r.mlx.split).toEqual([3, 2, 1]);
      expect(r.mlx.worldSize).toBe(3);
      expect(r.mlx.mode).toBe('pipeline');
      expect(r.mlx.returnWhenStarting).toBe(false);
    }
    // ring_ranks: one typed target per rank in rank order — its node, that node's tunnel at the
    // address its agent answers on, its ring port — and no address a rank would listen on
    const ring = l.ranks[0]!.mlx.ringRanks;
    expect(ring.map((t) => [t.nodeId, t.tunnelHost, t.tunnelPort])).toEqual([
      ['c', '10.0.0.3', 7421],
      ['b', '10.0.0.2', 7421],
      ['a', '10.0.0.1', 7421],
    ]);
    // the same ring for every rank, and distinct ports
    for (const r of l.ranks) expect(r.mlx.ringRanks).toEqual(ring);
    const ports = ring.map((t) => t.enginePort);
    expect(new Set(ports).size).toBe(3);
    expect(l.reason).toMatch(/through the TLS tunnels/);
    expect(l.untunnelledRdma).toBe(false);
    // the default engine port range: below Linux's (32768-) and macOS's (49152-) ephemeral ranges
    for (const p of ports) expect(p >= 20000 && p <= 32767).toBe(true);
  });

  it('every launch gets fresh ports', () => {
    const stages = [node('a', '127.0.0.1:1', []), node('b', '127.0.0.1:2', [])];
    const random = uniformSource(7);
    const a = mlxInstanceLaunch(stages, { ...opts, random });
    const b = mlxInstanceLaunch(stages, { ...opts, random });
    expect(a.ranks[0]!.mlx.ringRanks).not.toEqual(b.ranks[0]!.mlx.ringRanks);
  });

  it('one stage is a single process with no distributed environment', () => {
    const l = mlxInstanceLaunch([node('a', '127.0.0.1:1', [], 6)], opts);
    expect(l.backend).toBe('none');
    expect(l.ranks).toHaveLength(1);
    expect(l.ranks[0]!.mlx).toMatchObject({ rank: 0, worldSize: 1, mode: 'single', backend: '', ringRanks: [], split: [] });
  });

  // a–b on 169.254.1/…, a–c and b–c on configured /24s: a full mesh of cables.
  const mesh = () => [
    node('a', '192.168.1.10:50151', [lan('192.168.1.10'), tb('en2', '169.254.1.1'), tb('en3', '10.10.1.1')]),
    node('b', '192.168.1.11:50151', [lan('192.168.1.11'), tb('en2', '169.254.1.2'), tb('en4', '10.10.2.1')]),
    node('c', '192.168.1.12:50151', [lan('192.168.1.12'), tb('en3', '10.10.1.2'), tb('en5', '10.10.2.2')]),
  ];

  it('a full RDMA mesh still runs the tunnelled ring unless the load allows untunnelled RDMA, and says how', () => {
    for (const allow of [undefined, false]) {
      const l = mlxInstanceLaunch(mesh(), { ...opts, allowUntunnelledRdma: allow });
      expect(l.backend).toBe('ring');
      expect(l.untunnelledRdma).toBe(false);
      expect(l.reason).toMatch(/--allow-untunnelled-rdma/);
      expect(l.ranks[0]!.mlx.jacclDevices).toEqual([]);
    }
  });

  it('uses JACCL, untunnelled, when the load allows it and every pair of nodes has an RDMA Thunderbolt link (N×N matrix, rank 0 coordinates)', () => {
    const l = mlxInstanceLaunch(mesh(), { ...opts, allowUntunnelledRdma: true });
    expect(l.backend).toBe('jaccl');
    expect(l.untunnelledRdma).toBe(true);
    expect(l.ranks[0]!.mlx.ringRanks).toEqual([]);
    // rank order is c, b, a
    const m = l.ranks[0]!.mlx.jacclDevices.map((r) => r.devices);
    expect(m).toEqual([
      ['', 'rdma_en5', 'rdma_en3'],
      ['rdma_en4', '', 'rdma_en2'],
      ['rdma_en3', 'rdma_en2', ''],
    ]);
    expect(l.ranks[0]!.mlx.jacclCoordinator).toMatch(/^192\.168\.1\.12:\d+$/);
    // what the agent will write and export (the wire's "" diagonal becomes null)
    const spec = mlxRankSpecFromRequest({ ...l.ranks[1]!.mlx });
    expect(spec.launch).toMatchObject({ backend: 'jaccl' });
    expect(JSON.parse(jacclDevicesFile((spec.launch as { devices: (string | null)[][] }).devices))).toEqual([
      [null, 'rdma_en5', 'rdma_en3'],
      ['rdma_en4', null, 'rdma_en2'],
      ['rdma_en3', 'rdma_en2', null],
    ]);
    expect(rankEnv(spec.launch, 1, '/tmp/d.json')).toEqual({ MLX_RANK: '1', MLX_IBV_DEVICES: '/tmp/d.json', MLX_JACCL_COORDINATOR: l.ranks[0]!.mlx.jacclCoordinator });
  });

  it('falls back to the tunnelled ring when one pair lacks RDMA, even when untunnelled RDMA is allowed (and says why)', () => {
    const a = node('a', '192.168.1.10:1', [lan('192.168.1.10'), tb('en2', '10.9.0.1', false)]);
    const b = node('b', '192.168.1.11:1', [lan('192.168.1.11'), tb('en2', '10.9.0.2', true)]);
    const l = mlxInstanceLaunch([a, b], { ...opts, allowUntunnelledRdma: true });
    expect(l.backend).toBe('ring');
    expect(l.untunnelledRdma).toBe(false);
    expect(l.reason).toMatch(/RDMA/);
    // the tunnels listen where the agents answer: the ring's links go there
    expect(l.ranks[0]!.mlx.ringRanks.map((t) => t.tunnelHost)).toEqual(['192.168.1.11', '192.168.1.10']);
  });

  it('a node with two ranks forces the ring', () => {
    const a = node('a', '127.0.0.1:1', [tb('en2', '169.254.0.1')]);
    const l = mlxInstanceLaunch([a, a], { ...opts, allowUntunnelledRdma: true });
    expect(l.backend).toBe('ring');
    expect(l.reason).toMatch(/more than one rank/);
  });
});

describe('link detection', () => {
  it('rdmaDeviceBetween needs RDMA on the sending side and a shared subnet', () => {
    expect(rdmaDeviceBetween([tb('en2', '169.254.3.4')], [tb('en7', '169.254.200.1')])).toEqual({ device: 'rdma_en2', address: '169.254.3.4' });
    expect(rdmaDeviceBetween([tb('en2', '10.1.1.1', false)], [tb('en2', '10.1.1.2')])).toBeUndefined();
    expect(rdmaDeviceBetween([tb('en2', '10.1.1.1')], [tb('en2', '10.1.2.2')])).toBeUndefined();
    expect(rdmaDeviceBetween([tb('en2', '10.1.1.1')], [lan('10.1.1.2')])).toBeUndefined();
  });

  it('jacclMatrix is undefined when any pair is unlinked', () => {
    expect(jacclMatrix([{ interfaces: [tb('en2', '10.0.0.1')] }, { interfaces: [tb('en2', '10.0.0.2')] }, { interfaces: [lan('10.0.0.3')] }])).toBeUndefined();
    expect(jacclMatrix([{ interfaces: [tb('en2', '10.0.0.1')] }, { interfaces: [tb('en3', '10.0.0.2')] }])).toEqual([
      [null, 'rdma_en2'],
      ['rdma_en3', null],
    ]);
  });

  it('ringRanks: a node without a tunnel (no credentials) gets none, IPv6 agent addresses lose their brackets', () => {
    expect(ringRanks([node('a', '10.0.0.1:9', [], 2, 0), node('b', '[fd00::2]:9', [], 2, 7500)], [21000, 21001])).toEqual([
      { nodeId: 'a', tunnelHost: '', tunnelPort: 0, enginePort: 21000 },
      { nodeId: 'b', tunnelHost: 'fd00::2', tunnelPort: 7500, enginePort: 21001 },
    ]);
  });

  it('ipv4Of takes literal IPv4 only', () => {
    expect(ipv4Of('127.0.0.1:50151')).toBe('127.0.0.1');
    expect(() => ipv4Of('[::1]:50151')).toThrow(/literal IPv4/);
    expect(() => ipv4Of('studio.local:50151')).toThrow(/literal IPv4/);
  });

  it('freshPorts: one per rank from its node\'s engine port range, distinct, refuses an impossible range', () => {
    const ranks = Array.from({ length: 50 }, () => ({ enginePorts: [30000, 30060] as const }));
    const p = freshPorts(ranks, uniformSource(3));
    expect(new Set(p).size).toBe(50);
    for (const x of p) expect(x >= 30000 && x <= 30060).toBe(true);
    // each rank from its own node's range; an agent that advertises none: the default 20000-32767
    const mixed = freshPorts([{ enginePorts: [21000, 21001] }, { enginePorts: [40000, 40000] }, {}], uniformSource(5));
    expect(mixed[0]! >= 21000 && mixed[0]! <= 21001).toBe(true);
    expect(mixed[1]).toBe(40000);
    expect(mixed[2]! >= 20000 && mixed[2]! <= 32767).toBe(true);
    expect(() => freshPorts([{ enginePorts: [21000, 21001] }, { enginePorts: [21000, 21001] }, { enginePorts: [21000, 21001] }], uniformSource(1))).toThrow(/no 1 free port/);
  });
});

describe('engineForModel', () => {
  it('auto by format, explicit choices checked against it', () => {
    expect(engineForModel('/m', true, '')).toBe('mlx');
    expect(engineForModel('/m.gguf', false, undefined)).toBe('llama');
    expect(engineForModel('/m', true, 'auto')).toBe('mlx');
    expect(engineForModel('/m', true, 'mlx')).toBe('mlx');
    expect(() => engineForModel('/m.gguf', false, 'mlx')).toThrow(/needs an MLX model directory/);
    expect(() => engineForModel('/m', true, 'llama')).toThrow(/needs a \.gguf/);
    expect(() => engineForModel('/m', true, 'vllm')).toThrow(/unknown engine/);
  });
});

describe('mlxRankSpecFromRequest (agent edge)', () => {
  const ringRanksWire = [
    { nodeId: 'n0', tunnelHost: '10.0.0.1', tunnelPort: 7421, enginePort: 41000 },
    { nodeId: 'n1', enginePort: 41001 },
  ];
  const ring = { modelDir: '/m', rank: 1, worldSize: 2, backend: 'ring', ringRanks: ringRanksWire, split: [3, 3], mode: 'pipeline' };

  it('accepts a ring rank as typed targets and fills defaults; its hostfile waits for the agent', () => {
    const s = mlxRankSpecFromRequest(ring);
    expect(s).toMatchObject({ rank: 1, worldSize: 2, mode: 'pipeline', split: [3, 3], maxTokens: DEFAULT_MLX_MAX_TOKENS, stallTimeoutMs: 30_000, returnWhenStarting: false });
    expect(s.ring).toEqual([
      { nodeId: 'n0', enginePort: 41000, tunnel: { host: '10.0.0.1', port: 7421 } },
      { nodeId: 'n1', enginePort: 41001 },
    ]);
    expect(s.launch).toBeUndefined();
  });

  it.each([
    [{ ...ring, modelDir: 'rel/m' }, /absolute path/],
    [{ ...ring, rank: 2 }, /outside 0\.\.1/],
    [{ ...ring, backend: 'tcp' }, /ring or jaccl/],
    [{ ...ring, ringRanks: [ringRanksWire[0]] }, /2 ring_ranks/],
    // an old coordinator's free-form hosts are gone (reserved): the ring is missing, nothing starts
    [{ ...ring, ringRanks: undefined, hosts: [{ endpoints: ['10.0.0.1:41000'] }, { endpoints: ['10.0.0.2:41001'] }] }, /2 ring_ranks/],
    [{ ...ring, ringRanks: [{ ...ringRanksWire[0], tunnelHost: '10.0.0.1:9' }, ringRanksWire[1]] }, /tunnel_host: an IP address or host name/],
    [{ ...ring, ringRanks: [{ ...ringRanksWire[0], tunnelPort: 0 }, ringRanksWire[1]] }, /go together/],
    [{ ...ring, ringRanks: [{ ...ringRanksWire[0], address: '0.0.0.0:41000' }, ringRanksWire[1]] }, /Unrecognized key/],
    [{ ...ring, ringRanks: [ringRanksWire[1], ringRanksWire[1]] }, /used twice/],
    [{ ...ring, split: [6] }, /2 positive layer counts/],
    [{ ...ring, split: [6, 0] }, /2 positive layer counts/],
    [{ ...ring, mode: 'tensor' }, /pipeline mode only/],
    [{ ...ring, mode: 'expert' }, /pipeline, tensor or single/],
    [{ modelDir: '/m', worldSize: 1, backend: 'ring' }, /takes no backend/],
    [{ modelDir: '/m', worldSize: 2, rank: 0, mode: 'single', backend: 'ring', ringRanks: ringRanksWire }, /single needs world_size 1/],
    [{ ...ring, stallTimeoutSeconds: -1 }, /stall_timeout_seconds/],
    [{ ...ring, backend: 'jaccl', jacclDevices: [{ devices: ['', 'x'] }, { devices: ['y', 'z'] }], jacclCoordinator: '10.0.0.1:1' }, /diagonal/],
  ])('refuses %j', (req, msg) => {
    expect(() => mlxRankSpecFromRequest(req)).toThrow(msg);
  });

  it('needs the mlx field', () => {
    expect(() => mlxRankSpecFromRequest(null)).toThrow(/needs the mlx field/);
  });

  it('the "wait for ready" repeat is the same rank; another launch is not', () => {
    const a = mlxRankSpecFromRequest({ ...ring, returnWhenStarting: true });
    const b = mlxRankSpecFromRequest(ring);
    expect(sameMlxRank(a, b)).toBe(true);
    const c = mlxRankSpecFromRequest({ ...ring, ringRanks: ringRanksWire.map((t) => ({ ...t, enginePort: t.enginePort + 1000 })) });
    expect(sameMlxRank(b, c)).toBe(false);
  });
});

describe('withRingEndpoints: the rank hostfile the agent writes', () => {
  // rank 1 on n1 (127.0.0.1:41001), rank 0 on another node, reached through a forwarder on 127.0.0.1:38111
  const spec = mlxRankSpecFromRequest({ modelDir: '/m', rank: 1, worldSize: 2, backend: 'ring', ringRanks: [{ nodeId: 'n0', tunnelHost: '10.0.0.1', tunnelPort: 7421, enginePort: 41000 }, { nodeId: 'n1', enginePort: 41001 }] });

  it('own entry = the rank\'s 127.0.0.1 bind address, remote entries = the forwarders', () => {
    const s = withRingEndpoints(spec, ['127.0.0.1:38111', '127.0.0.1:41001']);
    expect(s.launch).toEqual({ backend: 'ring', endpoints: [['127.0.0.1:38111'], ['127.0.0.1:41001']] });
    expect(launchFiles(s.launch!)).toEqual({ name: 'MLX_HOSTFILE', content: '[["127.0.0.1:38111"],["127.0.0.1:41001"]]\n' });
    expect(sameMlxRank(s, withRingEndpoints(spec, ['127.0.0.1:38111', '127.0.0.1:41001']))).toBe(true);
  });

  it.each([
    [['127.0.0.1:38111', '10.0.0.2:41001'], /must bind 127\.0\.0\.1:41001/],
    [['127.0.0.1:38111', '127.0.0.1:41002'], /must bind 127\.0\.0\.1:41001/],
    [['10.0.0.1:41000', '127.0.0.1:41001'], /not on this machine's loopback/],
    [['127.0.0.1:41001', '127.0.0.1:41001'], /used twice/],
    [['127.0.0.1:41001'], /got 1 endpoints/],
  ])('refuses %j', (endpoints, msg) => {
    expect(() => withRingEndpoints(spec, endpoints)).toThrow(msg);
  });

  it('has nothing to resolve for JACCL or one process', () => {
    expect(() => withRingEndpoints(mlxRankSpecFromRequest({ modelDir: '/m' }), [])).toThrow(/no ring/);
  });
});

describe('mlxRequestOf: every agent builds the identical worker request', () => {
  it('maps llama semantics (0 = until stop, top_p 0 = default) and is deterministic', () => {
    const p = { prompt: 'hi', maxTokens: 0, temperature: 0, topP: 0, seed: 5 };
    const a = mlxRequestOf(p, 'r1', 512);
    expect(a).toEqual({ id: 'r1', prompt: 'hi', maxTokens: 512, temperature: 0, topP: 1, seed: 5 });
    expect(requestLine(a)).toBe(requestLine(mlxRequestOf({ ...p }, 'r1', 512)));
    expect(mlxRequestOf({ ...p, maxTokens: 9000 }, 'r', 512).maxTokens).toBe(512);
    expect(mlxRequestOf({ ...p, maxTokens: 7 }, 'r', 512).maxTokens).toBe(7);
  });

  it('chat messages replace the prompt', () => {
    const r = mlxRequestOf({ prompt: '', messagesJson: '[{"role":"user","content":"x"}]', maxTokens: 4, temperature: 0, topP: 0, seed: 0 }, 'c', 64);
    expect(r.messages).toEqual([{ role: 'user', content: 'x' }]);
    expect(r.prompt).toBeUndefined();
  });
});

describe('StopScanner', () => {
  const run = (stops: string[], pieces: string[]) => {
    const s = new StopScanner(stops);
    let out = '';
    for (const p of pieces) {
      const r = s.push(p);
      out += r.release;
      if (r.stopped) return { out, stopped: true };
    }
    return { out: out + s.flush(), stopped: false };
  };

  it('passes text through without stop strings', () => {
    expect(run([], ['a', 'b'])).toEqual({ out: 'ab', stopped: false });
  });

  it('cuts at a stop string split over tokens and holds back possible prefixes', () => {
    expect(run(['END'], ['hello E', 'N', 'D more'])).toEqual({ out: 'hello ', stopped: true });
    const s = new StopScanner(['END']);
    expect(s.push('abcE')).toEqual({ release: 'abc', stopped: false });
    expect(s.push('x')).toEqual({ release: 'Ex', stopped: false });
  });

  it('the earliest of several stop strings wins; a false start is released at the end', () => {
    expect(run(['yz', 'b'], ['a', 'bxyz'])).toEqual({ out: 'a', stopped: true });
    expect(run(['END'], ['x', 'EN'])).toEqual({ out: 'xEN', stopped: false });
  });
});

describe('checkRankReport: the worker’s own layer range against the plan', () => {
  const l = mlxInstanceLaunch([node('a', '127.0.0.1:1', [], 4), node('b', '127.0.0.1:2', [], 2)], opts);
  const report = (o: Record<string, unknown>) => [`mlx-ready ${JSON.stringify(o)}`];

  it('accepts the planned ranges (rank 0 = last layers)', () => {
    expect(checkRankReport(l.ranks[0]!, report({ rank: 0, size: 2, mode: 'pipeline', layers: [4, 6] }))).toBeUndefined();
    expect(checkRankReport(l.ranks[1]!, report({ rank: 1, size: 2, mode: 'pipeline', layers: [0, 4] }))).toBeUndefined();
  });

  it('names a rank that runs other layers, the wrong rank, or sent nothing', () => {
    expect(checkRankReport(l.ranks[0]!, report({ rank: 0, size: 2, layers: [3, 6] }))).toMatch(/runs layers \[3, 6\), the plan says \[4, 6\)/);
    expect(checkRankReport(l.ranks[1]!, report({ rank: 0, size: 2, layers: [0, 4] }))).toMatch(/reports rank 0 of 2/);
    expect(checkRankReport(l.ranks[1]!, [])).toMatch(/no ready report/);
    expect(checkRankReport(l.ranks[1]!, ['mlx-ready {'])).toMatch(/unreadable/);
  });
});

describe('looksLikeMlxModelDir', () => {
  it('needs a directory with config.json and a .safetensors file', async () => {
    const { mkdtemp, writeFile, rm } = await import('node:fs/promises');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const dir = await mkdtemp(join(tmpdir(), 'orchard-mlx-dir-'));
    try {
      expect(looksLikeMlxModelDir(dir)).toBe(false);
      await writeFile(join(dir, 'config.json'), '{}');
      expect(looksLikeMlxModelDir(dir)).toBe(false);
      await writeFile(join(dir, 'model.safetensors'), '');
      expect(looksLikeMlxModelDir(dir)).toBe(true);
      expect(looksLikeMlxModelDir(join(dir, 'config.json'))).toBe(false);
      expect(looksLikeMlxModelDir(join(dir, 'missing'))).toBe(false);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
