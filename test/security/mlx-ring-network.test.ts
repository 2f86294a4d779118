import { execFileSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ensureMlxEnv } from '../../src/node/mlx/env.ts';
import { collect, MlxGroup } from '../../src/node/mlx/group.ts';
import { mlxRequestOf } from '../../src/node/mlx/rank-spec.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { mlxPlacementOptions } from '../../src/shared/placement/types.ts';
import { deleteNamespaces, facingTheNetwork, linkNamespaceToHost } from '../helpers/netns.ts';
import { describeWith, networkNamespaces } from '../helpers/needs.ts';
import { JoinedCluster } from '../helpers/joined-cluster.ts';
import { orchard } from '../helpers/processes.ts';
import { SecretAudit } from '../helpers/secret-audit.ts';

/*
 * MLX ring links never on the open network (issue #12, item 3), with real processes: a
 * coordinator and two `orchard node` agents (joined with a token) whose gRPC, metrics and tunnel
 * ports face a veth address (10.79.0.1) that a second network namespace — the attacker "on the
 * LAN", 10.79.0.2 — can reach. A 2-rank MLX pipeline split over alpha and bravo (real MLX CPU
 * wheels) then:
 *   * returns the greedy token ids of one MLX process of the same directory (the oracle);
 *   * every TCP socket of both rank processes is on 127.0.0.1 at both ends (ranks bind loopback
 *     and dial their remote neighbour through a local forwarder), and from the attacker
 *     namespace no ring or forwarder port accepts a connection;
 *   * orchard_rpc_bytes_total > 0 on both agents and equal at the two ends of the tunnel;
 *   * the join token, the coordinator's keys and the nodes' keys appear in no log and in no
 *     `ps` output, sampled while the cluster ran.
 */

const needs = [networkNamespaces()];
const NS = `orch-mlx-${process.pid}`;
const HOST = { veth: `omh${process.pid % 100000}`, ip: '10.79.0.1' };
const ATTACKER = { ns: NS, veth: `oma${process.pid % 100000}`, ip: '10.79.0.2' };
const CTX = 512;
const PROMPT = 'The orchard has apples and pears. Once upon a time';
const N = 20;

interface Agent {
  readonly name: string;
  readonly nodeId: string;
  readonly metricsPort: number;
}

/** orchard_rpc_bytes_total{peer, direction} of one agent, from its real /metrics. */
async function tunnelBytes(a: Agent, peer: string, direction: 'sent' | 'received'): Promise<number> {
  const text = await (await fetch(`http://${HOST.ip}:${a.metricsPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`orchard_rpc_bytes_total{peer="${peer}",direction="${direction}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** TCP sockets (listening or connected) of the MLX workers serving `modelDir`, from `ss`. */
function rankSockets(modelDir: string): { local: string; peer: string }[] {
  const pids = execFileSync('pgrep', ['-f', `mlx_worker.py --model ${modelDir}`], { encoding: 'utf8' }).split('\n').filter(Boolean);
  const out = execFileSync('ss', ['-Htanp'], { encoding: 'utf8' });
  return out
    .split('\n')
    .filter((l) => pids.some((p) => l.includes(`pid=${p},`)))
    .map((l) => {
      const f = l.trim().split(/\s+/);
      return { local: f[3]!, peer: f[4]! };
    });
}

/** Budgets (64 KiB steps) for which the coordinator's own planner must use both nodes. */
async function splittingBudgets(model: string): Promise<{ alpha: number; bravo: number }> {
  const profile = await readMlxModelProfile(model);
  const plan = (b: Record<string, number>) =>
    planPlacement(profile, Object.entries(b).map(([name, budgetBytes]) => ({ name, budgetBytes, bandwidthBytesPerSecond: 100e9 })), { ctx: CTX, ...mlxPlacementOptions() });
  const least = (fits: (b: number) => boolean): number => {
    let lo = 1;
    let hi = 2 ** 32;
    while (hi - lo > 65_536) {
      const mid = Math.floor((lo + hi) / 2);
      if (fits(mid)) hi = mid;
      else lo = mid;
    }
    return hi;
  };
  const alpha = least((b) => plan({ alpha: b }).fits) - Math.max(...profile.layers.map((l) => l.weightBytes));
  const bravo = least((b) => plan({ alpha, bravo: b }).fits);
  const two = plan({ alpha, bravo });
  expect(two.fits && two.stages.length, 'the planner cannot split the model over 2 nodes').toBe(2);
  return { alpha, bravo };
}

describeWith(needs, 'MLX ring links: through the agents\' TLS tunnels, nothing reachable from the LAN', () => {
  let dir: string;
  let model: string;
  let oracle: number[];
  let env: NodeJS.ProcessEnv;
  let coordAddr: string;
  let cluster: JoinedCluster;
  const agents: Agent[] = [];
  const audit = new SecretAudit();

  beforeAll(async () => {
    audit.start();
    deleteNamespaces(NS);
    linkNamespaceToHost(HOST, ATTACKER);
    const mlx = await ensureMlxEnv();
    dir = await mkdtemp(join(tmpdir(), 'orchard-mlx-ring-net-'));
    model = join(dir, 'ring4');
    // Wide FFNs: layer bytes, not fixed overheads, decide the placement.
    await writeMlxTestModel(mlx.python, { out: model, arch: 'qwen3_moe', layers: 4, hidden: 64, heads: 4, intermediate: 2048, experts: 4, activeExperts: 2, seed: 3 });
    const single = await MlxGroup.start({ python: mlx.python, model, mode: 'single', startupTimeoutMs: 120_000 });
    try {
      oracle = (await collect(single.generate(mlxRequestOf({ prompt: PROMPT, maxTokens: N, temperature: 0, topP: 0, seed: 0 }, 'oracle', CTX)))).tokens;
    } finally {
      await single.close();
    }
    const budgets = await splittingBudgets(model);

    cluster = new JoinedCluster({ dir, env: { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_MLX_READY_TIMEOUT: '60', ORCHARD_MLX_STALL_TIMEOUT: '20' }, bind: HOST.ip });
    await cluster.startCoordinator(['--heal', 'off']);
    ({ env, grpcAddress: coordAddr } = cluster);
    audit.secret('join token', await cluster.mintToken(2));
    for (const name of ['alpha', 'bravo'] as const) {
      const { ready } = await cluster.startAgent(name, ['--budget', String(budgets[name])]);
      expect(ready.tunnelPort, `${name} runs a tunnel listener once it joined`).toBeGreaterThan(0);
      agents.push({ name, nodeId: String(ready.nodeId), metricsPort: Number(ready.metricsPort) });
    }
    for (const p of cluster.procs) audit.log(p.name, p);
    await cluster.waitUp(2, 10_000);
  }, 600_000);

  afterAll(async () => {
    await audit.stop();
    await cluster?.stop();
    deleteNamespaces(NS);
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('a 2-rank split across two nodes gives the oracle tokens over the tunnels, and no ring port faces the LAN', async () => {
    const [alpha, bravo] = agents as [Agent, Agent];
    // A non-trivial oracle: a broken ring or a lost step must change it.
    expect(oracle.length).toBe(N);
    expect(new Set(oracle).size).toBeGreaterThan(3);

    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'ring4', '--pin', 'alpha', 'bravo', '--coordinator', coordAddr], env);
    expect(load.code, load.stderr).toBe(0);
    const s = await orchard(['status', '--json', '--coordinator', coordAddr], env);
    const m = (JSON.parse(s.stdout) as { models: { name: string; engine: string; untunnelledRdma: boolean; stages: { nodeId: string; endpoint: string }[] }[] }).models.find((x) => x.name === 'ring4')!;
    expect(m.engine).toBe('mlx');
    expect(new Set(m.stages.map((st) => st.nodeId))).toEqual(new Set([alpha.nodeId, bravo.nodeId]));
    expect(m.untunnelledRdma).toBe(false);
    const ringPorts = m.stages.map((st) => {
      expect(st.endpoint).toMatch(/^127\.0\.0\.1:\d+$/);
      return Number(st.endpoint.split(':')[1]);
    });

    const g = await orchard(['generate', '--model', 'ring4', '--prompt', PROMPT, '--max-tokens', String(N), '--temperature', '0', '--json', '--coordinator', coordAddr], env);
    expect(g.code, g.stderr).toBe(0);
    expect((JSON.parse(g.stdout) as { tokens: number[] }).tokens).toEqual(oracle);

    // Both ranks' ring sockets: each rank accepted its left neighbour on its own ring port and
    // dialled its right one through a forwarder — all of it on loopback, none on the LAN address.
    const sockets = rankSockets(model);
    expect(sockets.length, JSON.stringify(sockets)).toBe(4);
    for (const x of sockets) {
      expect(x.local, JSON.stringify(x)).toMatch(/^127\.0\.0\.1:/);
      expect(x.peer, JSON.stringify(x)).toMatch(/^127\.0\.0\.1:\d+$/);
    }
    const accepted = sockets.filter((x) => ringPorts.some((p) => x.local === `127.0.0.1:${p}`));
    expect(accepted.length, 'each rank accepted its left neighbour on its ring port').toBe(2);
    // what each rank dialled: a forwarder on its own machine, never the other rank's ring port
    const dialled = sockets
      .filter((x) => !ringPorts.some((p) => x.local === `127.0.0.1:${p}`))
      .map((x) => Number(x.peer.split(':')[1]));
    expect(dialled).toHaveLength(2);
    for (const p of dialled) expect(ringPorts).not.toContain(p);
    expect(facingTheNetwork(NS, HOST.ip, [...ringPorts, ...dialled])).toEqual([]);

    // bytes through the tunnel between alpha and bravo: > 0 both ways, and the same at both ends
    // (the native head side reports its counts every 250 ms: both ends agree once the last report is in)
    const ends = async () => ({
      alphaSent: await tunnelBytes(alpha, bravo.nodeId, 'sent'),
      bravoReceived: await tunnelBytes(bravo, alpha.nodeId, 'received'),
      alphaReceived: await tunnelBytes(alpha, bravo.nodeId, 'received'),
      bravoSent: await tunnelBytes(bravo, alpha.nodeId, 'sent'),
    });
    await expect.poll(async () => { const e = await ends(); return e.alphaSent === e.bravoReceived && e.alphaReceived === e.bravoSent; }, { timeout: 3000, interval: 100 }).toBe(true);
    const e = await ends();
    expect(e.alphaSent, 'alpha → bravo').toBeGreaterThan(0);
    expect(e.alphaReceived, 'bravo → alpha').toBeGreaterThan(0);
    expect(e.bravoReceived).toBe(e.alphaSent);
    expect(e.bravoSent).toBe(e.alphaReceived);

    const u = await orchard(['unload', 'ring4', '--coordinator', coordAddr], env);
    expect(u.code, u.stderr).toBe(0);
  }, 300_000);

  it('no join token, key or private key in any log or in `ps` while the cluster ran', async () => {
    // the coordinator's CA key and admin key, each node's key (written by the join)
    await audit.expectNoLeaks([join(dir, 'coord'), join(dir, 'alpha'), join(dir, 'bravo')], 4);
  });
});
