import { join } from 'node:path';
import { afterAll, beforeAll, expect } from 'vitest';
import { statusJson } from '../../src/cli/commands/status.ts';
import { localCoordinatorClient } from '../../src/cli/credentials.ts';
import { createLan, deleteLan, inNamespace, shapeLink } from '../helpers/netns.ts';
import { describeWith, itWith, networkNamespaces } from '../helpers/needs.ts';
import { ORCHARD_BIN, killGroup, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * The simulated LAN bench:lan builds on (issue #15, item 5), kept from rotting: two joined agents,
 * each in its own network namespace on a bridge, the coordinator on the bridge's host address,
 * every node's link shaped with `tc tbf` to 100 Mbit/s both ways. The agents' link probes cross
 * the shaped veths through their TLS tunnels, so the link matrix must show the shaped rate — not
 * the gigabytes per second the same probe sees on loopback — and a round trip over the bridge.
 */

const needs = [networkNamespaces()];
const RATE_BITS = 100e6;
const tag = process.pid % 10_000;
const BRIDGE = `olt${tag}`;
const HOST_IP = '10.91.0.1';
const NODES = [
  { ns: `olt-${tag}-a`, veth: `olt${tag}a`, ip: '10.91.0.11', name: 'alpha' },
  { ns: `olt-${tag}-b`, veth: `olt${tag}b`, ip: '10.91.0.12', name: 'bravo' },
];

describeWith(needs, 'simulated LAN: namespaces on a bridge, links shaped by tc tbf', () => {
  const dir = tempDir('orchard-lan-shaping-', 'all');
  const procs: Proc[] = [];
  let env: NodeJS.ProcessEnv;
  let coordAddr: string;

  beforeAll(async () => {
    deleteLan(BRIDGE, NODES.map((n) => n.ns));
    const lan = createLan(BRIDGE, HOST_IP, NODES);
    for (const n of lan.nodes) shapeLink(n, RATE_BITS);
    env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_COORDINATOR_STATE_DIR: join(dir.path, 'coord') };
    const coordinator = spawnProc('coordinator', [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', HOST_IP, '--state-dir', join(dir.path, 'coord'), '--json'], env);
    procs.push(coordinator);
    coordAddr = `${HOST_IP}:${String((await readyLine(coordinator)).grpcPort)}`;
    const t = await orchard(['coordinator', 'token', '--uses', '2', '--ttl', '10m'], env);
    expect(t.code, t.stderr).toBe(0);
    for (const n of NODES) {
      const args = ['netns', 'exec', n.ns, process.execPath, ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', n.ip, '--name', n.name, '--state-dir', join(dir.path, n.name), '--json', '--join', coordAddr];
      const proc = spawnProc(`node ${n.name}`, args, { ...env, ORCHARD_NODE_TOKEN: t.stdout.trim() }, 'ip');
      procs.push(proc);
      expect(Number((await readyLine(proc)).tunnelPort)).toBeGreaterThan(0);
    }
  }, 120_000);

  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
    deleteLan(BRIDGE, NODES.map((n) => n.ns));
  });

  itWith(needs, 'the agents measure the shaped rate between their namespaces, over the bridge', async () => {
    type Link = { fromName: string; toName: string; rttSeconds: number | null; bytesPerSecond: number | null };
    let measured: Link[] = [];
    for (const until = Date.now() + 60_000; Date.now() < until && measured.length < 2; await sleep(500)) {
      const client = await localCoordinatorClient(coordAddr, join(dir.path, 'coord'));
      try {
        measured = (statusJson(await client.unary('status', {}, 5000)) as { links: Link[] }).links.filter((l) => l.bytesPerSecond);
      } finally {
        client.close();
      }
    }
    expect(measured.map((l) => `${l.fromName}>${l.toName}`).sort()).toEqual(['alpha>bravo', 'bravo>alpha']);
    // the numbers, for the transcript (the bounds below are what must hold)
    console.info(`shaped links: ${JSON.stringify(measured)}`);
    const rate = RATE_BITS / 8;
    for (const l of measured) {
      // payload over TLS and TCP under a 100 Mbit/s token bucket: below the line rate, and most of it
      expect(l.bytesPerSecond!, `${l.fromName}>${l.toName}`).toBeLessThan(rate * 1.05);
      expect(l.bytesPerSecond!, `${l.fromName}>${l.toName}`).toBeGreaterThan(rate * 0.5);
      expect(l.rttSeconds!).toBeGreaterThan(0);
      expect(l.rttSeconds!).toBeLessThan(0.05);
    }
  }, 120_000);

  itWith(needs, 'a small message crosses the shaped link at line rate, frame by frame, as on a wire', async () => {
    // A decode token's boundary traffic is a few KB each way; a token bucket that lets such a
    // message through at veth speed makes a slow link look free (session 12: 20 Mbit/s priced
    // ~9.6 ms per token, measured ~1.9). 16 KiB each way over 100 Mbit/s: ~2.7 ms on a wire, ~0.8
    // ms through tbf's 12.5 KB bucket without the per-frame peak rate (shapeLink).
    const [a, b] = NODES;
    const bytes = 16_384;
    const port = 9000 + (tag % 500);
    const echo = `const s=require('node:net').createServer((c)=>{c.setNoDelay(true);let n=0;c.on('data',(d)=>{n+=d.length;while(n>=${bytes}){n-=${bytes};c.write(Buffer.alloc(${bytes}));}});});s.listen(${port},'${b!.ip}',()=>console.log('{"event":"ready"}'));`;
    const server = spawnProc('echo', ['netns', 'exec', b!.ns, process.execPath, '-e', echo], env, 'ip');
    procs.push(server);
    await readyLine(server, 10_000);
    const client = `const c=require('node:net').connect(${port},'${b!.ip}');c.setNoDelay(true);const rtt=[];let t=0,n=0;
const go=()=>{if(rtt.length===25){rtt.sort((x,y)=>x-y);console.log(rtt[12]);c.destroy();return;}n=0;t=performance.now();c.write(Buffer.alloc(${bytes}));};
c.on('connect',go);c.on('data',(d)=>{n+=d.length;if(n>=${bytes}){rtt.push(performance.now()-t);setTimeout(go,20);}});`;
    const medianMs = Number(inNamespace(a!.ns, [process.execPath, '-e', client]).trim());
    // payload plus a 66-byte header per 1448-byte segment, both ways, at the shaped rate
    const wireMs = (2 * (bytes + 66 * Math.ceil(bytes / 1448)) * 8) / RATE_BITS * 1000;
    console.info(`16 KiB round trip over the shaped link: median ${medianMs.toFixed(2)} ms, an ideal wire ${wireMs.toFixed(2)} ms`);
    expect(medianMs).toBeGreaterThan(0.75 * wireMs);
  }, 60_000);
});
