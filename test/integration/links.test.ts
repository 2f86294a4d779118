import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import { statusJson } from '../../src/cli/commands/status.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { decodeInputBytes } from '../../src/shared/placement/rpc-wire.ts';
import { ORCHARD_BIN, killGroup, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { modelThatMustSplit } from '../helpers/split-model.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * Measured links (issue #15, item 2) with real processes and no engines: a coordinator and two
 * agents that join it with a token on 127.0.0.1. Within seconds of coming up, each agent probes
 * the other's TLS tunnel listener at the coordinator's request; `orchard status --links` shows
 * both directions with a round trip and a throughput; each agent exports what it measured; and
 * the coordinator's Plan for a model that must split charges the boundary on that measured link
 * (rtt + 2 activation rows ÷ throughput) instead of the assumed 1 ms / 10 GbE.
 */

interface Link {
  from: string;
  fromName: string;
  to: string;
  toName: string;
  rttSeconds: number | null;
  bytesPerSecond: number | null;
  error?: string;
}

describe('measured links between joined agents', () => {
  const dir = tempDir('orchard-links-', 'all');
  const procs: Proc[] = [];
  let env: NodeJS.ProcessEnv;
  let coordAddr: string;
  let model: string;
  const metricsPorts = new Map<string, number>();

  beforeAll(async () => {
    env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_COORDINATOR_STATE_DIR: join(dir.path, 'coord') };
    const split = await modelThatMustSplit(['--layers', '8', '--seed', '3', '--header-only'], 2048);
    model = split.model;
    const budget = split.budget;
    const coordinator = spawnProc('coordinator', [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', join(dir.path, 'coord'), '--json'], env);
    procs.push(coordinator);
    coordAddr = `127.0.0.1:${String((await readyLine(coordinator)).grpcPort)}`;
    const t = await orchard(['coordinator', 'token', '--uses', '2', '--ttl', '10m'], env);
    expect(t.code, t.stderr).toBe(0);
    for (const name of ['alpha', 'bravo']) {
      const args = [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', String(budget), '--state-dir', join(dir.path, name), '--json', '--join', coordAddr];
      const proc = spawnProc(`node ${name}`, args, { ...env, ORCHARD_NODE_TOKEN: t.stdout.trim() });
      procs.push(proc);
      const ready = await readyLine(proc);
      expect(Number(ready.tunnelPort), `${name} joined and runs a tunnel`).toBeGreaterThan(0);
      metricsPorts.set(name, Number(ready.metricsPort));
    }
  }, 120_000);

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
  });

  // in-process (a CLI start costs seconds on a busy machine); the CLI's own output is checked below
  async function links(): Promise<Link[]> {
    const client = await localCoordinatorClient(coordAddr, join(dir.path, 'coord'));
    try {
      return (statusJson(await client.unary('status', {}, 5000)) as { links: Link[] }).links;
    } finally {
      client.close();
    }
  }

  it('both directions are measured over the tunnels, shown by status --links, exported by the agents and used by the planner', async () => {
    let measured: Link[] = [];
    for (const until = Date.now() + 30_000; Date.now() < until; await sleep(500)) {
      measured = (await links()).filter((l) => l.rttSeconds && l.bytesPerSecond);
      if (measured.length === 2) break;
    }
    expect(measured.map((l) => `${l.fromName}>${l.toName}`).sort()).toEqual(['alpha>bravo', 'bravo>alpha']);
    for (const l of measured) {
      // loopback through TLS and the agents' relays on a shared 2-core machine
      expect(l.rttSeconds!).toBeGreaterThan(0);
      expect(l.rttSeconds!).toBeLessThan(0.1);
      expect(l.bytesPerSecond!).toBeGreaterThan(5e6);
      expect(l.error).toBeUndefined();
    }

    const table = await orchard(['status', '--links', '--coordinator', coordAddr], env);
    expect(table.code, table.stderr).toBe(0);
    expect(table.stdout).toMatch(/alpha\s*│\s*bravo\s*│\s*[\d.]+ ms/);
    expect(table.stdout).toMatch(/bravo\s*│\s*alpha\s*│\s*[\d.]+ ms/);

    // each agent exports its own probe toward the other, under the peer's node id
    for (const l of measured) {
      const text = await (await fetch(`http://127.0.0.1:${metricsPorts.get(l.fromName)}/metrics`)).text();
      expect(text).toContain(`orchard_link_rtt_seconds{peer="${l.to}"}`);
      const tput = text.split('\n').find((x) => x.startsWith(`orchard_link_throughput_bytes_per_second{peer="${l.to}"}`));
      expect(Number(tput?.split(' ').pop())).toBeGreaterThan(0);
    }

    // the live plan splits over both and charges the measured link, not the assumed 1 ms
    const plan = await orchard(['plan', model, '--ctx', '2048', '--json', '--coordinator', coordAddr], env);
    expect(plan.code, plan.stderr).toBe(0);
    const p = JSON.parse(plan.stdout) as { stages: unknown[]; predicted: { hopSeconds: number } };
    expect(p.stages.length).toBe(2);
    const profile = modelProfile(await readGgufHeader(model));
    const embd = profile.embd;
    // besides the activations, each decoded token sends the worker its mask and inputs (rpc-wire.ts):
    // half of the 2048-cell cache attended (kvFill 0.5), flash attention on by default
    const inputs = decodeInputBytes(profile, 0.5 * 2048, { full: 2048, swa: 0 }, true);
    // the links may have been re-probed since: compare with the matrix as it is now
    const now = (await links()).filter((l) => l.rttSeconds && l.bytesPerSecond);
    const rtt = Math.max(...now.map((l) => l.rttSeconds!));
    const rate = Math.min(...now.map((l) => l.bytesPerSecond!));
    expect(p.predicted.hopSeconds).toBeCloseTo(rtt + (2 * embd * 4 + inputs) / rate, 9);
    expect(p.predicted.hopSeconds).not.toBeCloseTo(0.001 + (2 * embd * 4 + inputs) / 1.25e9, 6);
  }, 240_000);
});
