import { existsSync, readlinkSync, realpathSync } from 'node:fs';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { headLayout } from '../../src/coordinator/instances/llama/layout.ts';
import { llamaServerToWire } from '../../src/coordinator/membership/agent-client.ts';
import type { LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { canConnectSocket, listensOn } from '../../src/node/ports.ts';
import { findTunnelRelay } from '../../src/node/tunnel/native-forwarder.ts';
import { DEFAULT_MEMORY_OPTIONS } from '../../src/shared/memory/stage.ts';
import type { ClusterCa } from '../../src/shared/pki/certificates.ts';
import { CLUSTER_CHANNEL_OPTIONS, type TlsCredentials, clusterChannelCredentials } from '../../src/shared/pki/grpc-tls.ts';
import type { RpcTarget } from '../../src/shared/placement/llama-args.ts';
import { orchardV1 } from '../../src/shared/proto.ts';
import { clientCredentials, enrollNode, testCa } from '../helpers/cluster-pki.ts';
import { deleteNamespaces, facingTheNetwork, inNamespace, linkNamespaceToHost, listenersOn, reachableFrom } from '../helpers/netns.ts';
import { describeWith, llamaEngines, networkNamespaces } from '../helpers/needs.ts';
import { ORACLE_PROMPT, plainLlamaTokens } from '../helpers/oracle.ts';
import { ORCHARD_BIN, canConnect, killGroup, orchard, type Proc, readyLine, spawnProc } from '../helpers/processes.ts';
import { SecretAudit } from '../helpers/secret-audit.ts';

/*
 * Engine traffic never on the open network (issue #12, item 3), with real processes: three
 * `orchard node` agents holding node certificates of one cluster CA listen on a veth address
 * (10.77.0.1) that a second network namespace — the attacker "on the LAN", 10.77.0.2 — can reach.
 * The test plays the coordinator (a `coordinator` certificate, mTLS): rpc-servers on all three
 * nodes, a llama-server on alpha whose typed rpc targets name bravo's and charlie's tunnels, so
 * two stages cross TLS tunnels and alpha's own stage stays direct on loopback. Then:
 *   * generation returns the same greedy token ids as one plain llama-server (the oracle);
 *   * from the attacker namespace no rpc-server, llama-server or forwarder port accepts a
 *     connection, and the tunnel port yields nothing without a cluster certificate;
 *   * orchard_rpc_bytes_total > 0 and equal on both ends of each tunnel;
 *   * no private key (CA, coordinator, nodes) in the agents' logs or in `ps`, sampled throughout.
 */

const needs = [await llamaEngines(), networkNamespaces()];
const NS = `orch-att-${process.pid}`;
const HOST = { veth: `orh${process.pid % 100000}`, ip: '10.77.0.1' };
const ATTACKER = { ns: NS, veth: `ora${process.pid % 100000}`, ip: '10.77.0.2' };
const CTX = 2048;
const N_PREDICT = 32;
const OWNER = 'engine-network-test';

type Client = grpc.Client & Record<string, (...a: unknown[]) => unknown>;
interface Node {
  readonly name: string;
  readonly proc: Proc;
  readonly nodeId: string;
  readonly tunnelPort: number;
  readonly metricsPort: number;
  readonly client: Client;
}

function unary<T>(c: Client, method: string, req: unknown, timeoutMs = 180_000): Promise<T> {
  return new Promise((resolve, reject) => {
    c[method]!(req, { deadline: Date.now() + timeoutMs }, (err: grpc.ServiceError | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}

function generateTokens(c: Client, engineId: string): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const call = c.generate!({ engineId, prompt: ORACLE_PROMPT, maxTokens: N_PREDICT, temperature: 0 }) as grpc.ClientReadableStream<{ token?: { tokenIds: number[] } }>;
    const tokens: number[] = [];
    call.on('data', (ev) => tokens.push(...(ev.token?.tokenIds ?? [])));
    call.on('error', reject);
    call.on('end', () => resolve(tokens));
  });
}

/** orchard_rpc_bytes_total{peer, direction} of one agent, from its real /metrics. */
async function rpcBytes(n: Node, peer: string, direction: 'sent' | 'received'): Promise<number> {
  const text = await (await fetch(`http://${HOST.ip}:${n.metricsPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`orchard_rpc_bytes_total{peer="${peer}",direction="${direction}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** From the attacker namespace: a TLS client without a certificate asks the tunnel for `enginePort`; what comes back. */
function tunnelWithoutCertificate(port: number, enginePort: number): string {
  const script = `const tls=require('node:tls');let got='';const s=tls.connect({host:${JSON.stringify(HOST.ip)},port:${port},rejectUnauthorized:false,minVersion:'TLSv1.3'});
s.on('secureConnect',()=>s.write(JSON.stringify({v:1,port:${enginePort}})+'\\n'));s.on('data',(d)=>{got+=d.toString('latin1')});
const end=(why)=>{console.log(JSON.stringify({got,why}));process.exit(0)};s.on('error',(e)=>end('error: '+e.code));s.on('close',()=>end('closed'));setTimeout(()=>end('timeout'),5000);`;
  return inNamespace(NS, [process.execPath, '-e', script]).trim();
}

describeWith(needs, 'engine network: tunnels between nodes, nothing reachable from the LAN', () => {
  let dir: string;
  let bins: LlamaBinaries;
  let ca: ClusterCa;
  let coordinator: TlsCredentials;
  let model: string;
  const nodes: Node[] = [];
  const audit = new SecretAudit();

  beforeAll(async () => {
    audit.start();
    bins = needs[0]!.ok ? (needs[0] as { value: LlamaBinaries }).value : (undefined as never);
    deleteNamespaces(NS);
    linkNamespaceToHost(HOST, ATTACKER);
    dir = await mkdtemp(join(tmpdir(), 'orchard-engine-net-'));
    const env = { ...process.env, ORCHARD_LLAMA_BIN_DIR: bins.binDir, ORCHARD_LOG_FORMAT: 'json' };
    model = join(dir, 'm8.gguf');
    const made = await orchard(['testmodel', 'gguf', '--out', model, '--layers', '8', '--seed', '7'], env);
    expect(made.code, made.stderr).toBe(0);
    ca = await testCa('engine-network');
    coordinator = await clientCredentials(ca, 'coordinator', 'coordinator');
    audit.privateKey('cluster CA key', ca.keyPem);
    audit.privateKey('coordinator key', coordinator.keyPem);
    const NodeAgent = orchardV1().NodeAgent!;
    for (const name of ['alpha', 'bravo', 'charlie']) {
      const stateDir = join(dir, name);
      const nodeId = await enrollNode(stateDir, ca);
      const proc = spawnProc(`node ${name}`, [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', HOST.ip, '--name', name, '--state-dir', stateDir, '--models-dir', dir, '--json'], env);
      audit.log(`node ${name}`, proc);
      const ready = await readyLine(proc);
      expect(ready.tunnelPort, `${name} runs a tunnel listener once it holds credentials`).toBeGreaterThan(0);
      const creds = clusterChannelCredentials(coordinator, { role: 'node', id: nodeId });
      const client = new NodeAgent(`${HOST.ip}:${String(ready.grpcPort)}`, creds, CLUSTER_CHANNEL_OPTIONS) as unknown as Client;
      nodes.push({ name, proc, nodeId, tunnelPort: Number(ready.tunnelPort), metricsPort: Number(ready.metricsPort), client });
    }
  }, 180_000);

  afterAll(async () => {
    await audit.stop();
    for (const n of nodes) {
      n.client.close();
      await killGroup(n.proc);
    }
    deleteNamespaces(NS);
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('a split over three nodes crosses the tunnels, gives the oracle tokens, and no engine port faces the LAN', async () => {
    const [alpha, bravo, charlie] = nodes as [Node, Node, Node];
    // Describe carries the tunnel port under the one name it has everywhere (proto, TXT, ready line)
    const described = await unary<{ profile: { tunnelPort: number } }>(bravo.client, 'describe', {});
    expect(described.profile.tunnelPort).toBe(bravo.tunnelPort);

    // stage order: bravo (layers 0-2), charlie (3-5), alpha (6-7, the head; CPU-only here, so its own rpc-server)
    const order = [bravo, charlie, alpha];
    const targets: RpcTarget[] = [];
    const rpcPids: number[] = [];
    for (const [i, n] of order.entries()) {
      const r = await unary<{ engine: { port: number; host: string; pid: number } }>(n.client, 'startEngine', { kind: 'ENGINE_KIND_RPC_SERVER', engineId: `s${i}-rpc`, threads: 1, owner: OWNER });
      expect(r.engine.host).toBe('127.0.0.1');
      targets.push({ nodeId: n.nodeId, tunnel: { host: HOST.ip, port: n.tunnelPort }, enginePort: r.engine.port });
      rpcPids.push(r.engine.pid);
    }
    // every rpc-server listens only on its Unix socket in its agent's 0700 directory: no TCP at all
    const socketDir = (n: Node) => join(dir, n.name, 'run', 'sockets');
    for (const [i, n] of order.entries()) {
      expect((await stat(socketDir(n))).mode & 0o777).toBe(0o700);
      expect(await canConnectSocket(join(socketDir(n), `rpc-${targets[i]!.enginePort}.sock`))).toBe(true);
      expect(await listensOn(rpcPids[i]!), `rpc-server of ${n.name} listens on no TCP port`).toBe(false);
    }
    const stages = [
      { nodeId: bravo.nodeId, nodeName: 'bravo', firstLayer: 0, lastLayer: 2 },
      { nodeId: charlie.nodeId, nodeName: 'charlie', firstLayer: 3, lastLayer: 5 },
      { nodeId: alpha.nodeId, nodeName: 'alpha', firstLayer: 6, lastLayer: 7 },
    ];
    const layout = headLayout(stages, targets, { modelPath: model, nLayer: 8, memory: { ...DEFAULT_MEMORY_OPTIONS, ctx: CTX }, headHasGpu: false });
    const head = await unary<{ engine: { port: number }; rpcEndpoints: string[] }>(alpha.client, 'startEngine', {
      kind: 'ENGINE_KIND_LLAMA_SERVER',
      engineId: 'head',
      threads: 1,
      owner: OWNER,
      llama: llamaServerToWire(layout.llama),
    });
    // bravo and charlie through local forwarders on sockets in alpha's directory, alpha's own stage at its rpc-server's socket
    const [viaBravo, viaCharlie, own] = head.rpcEndpoints;
    expect(own).toBe(`unix:${join(socketDir(alpha), `rpc-${targets[2]!.enginePort}.sock`)}`);
    for (const ep of [viaBravo, viaCharlie]) expect(ep).toMatch(new RegExp(`^unix:${socketDir(alpha)}/fwd-[0-9a-f]{8}\\.sock$`));

    const oracle = await plainLlamaTokens(bins, { model, ctx: CTX, prompt: ORACLE_PROMPT, nPredict: N_PREDICT, threads: 2 });
    const tokens = await generateTokens(alpha.client, 'head');
    expect(tokens.length).toBeGreaterThan(0);
    expect(tokens).toEqual(oracle);

    // The head's port and every forwarder socket are real and listening on this host; the head's
    // port and the rpc-servers' engine ports (their identities) are closed to the attacker on the LAN address.
    const forwarders = [viaBravo!, viaCharlie!].map((ep) => ep.slice('unix:'.length));
    for (const f of forwarders) expect(await canConnectSocket(f), `${f} accepts`).toBe(true);
    expect(await canConnect('127.0.0.1', head.engine.port)).toBe(true);
    const enginePorts = [...targets.map((t) => t.enginePort), head.engine.port];
    expect(facingTheNetwork(NS, HOST.ip, enginePorts)).toEqual([]);
    // the tunnel port is reachable (it is the one door) but opens nothing without a cluster certificate
    expect(reachableFrom(NS, HOST.ip, [bravo.tunnelPort])).toEqual([bravo.tunnelPort]);
    const attempt = JSON.parse(tunnelWithoutCertificate(bravo.tunnelPort, targets[0]!.enginePort)) as { got: string; why: string };
    expect(attempt.got).not.toContain('"ok":true');
    // the door is the relay the agent chose: native/tunnel-relay when built, else the agent's own
    // Node process (ORCHARD_TUNNEL_RELAY=node runs this whole test on that fallback)
    const relay = findTunnelRelay();
    const doorExes = listenersOn(bravo.tunnelPort).flatMap((l) => l.pids.map((pid) => readlinkSync(`/proc/${pid}/exe`)));
    expect(doorExes).toEqual([relay ? realpathSync(relay) : realpathSync(process.execPath)]);

    // bytes through each tunnel: > 0 and the same on both ends (head sent = worker received, and back)
    // (the native head side reports its counts every 250 ms: both ends agree once the last report is in)
    for (const w of [bravo, charlie]) {
      const ends = async () => ({
        sent: await rpcBytes(alpha, w.nodeId, 'sent'),
        workerReceived: await rpcBytes(w, alpha.nodeId, 'received'),
        received: await rpcBytes(alpha, w.nodeId, 'received'),
        workerSent: await rpcBytes(w, alpha.nodeId, 'sent'),
      });
      await expect.poll(async () => { const e = await ends(); return e.sent === e.workerReceived && e.received === e.workerSent; }, { timeout: 3000, interval: 100 }).toBe(true);
      const e = await ends();
      expect(e.sent, `alpha → ${w.name}`).toBeGreaterThan(0);
      expect(e.received, `${w.name} → alpha`).toBeGreaterThan(0);
      expect(e.workerReceived).toBe(e.sent);
      expect(e.workerSent).toBe(e.received);
    }
    // alpha's own stage is not tunnelled: nothing counted toward alpha itself
    expect(await rpcBytes(alpha, alpha.nodeId, 'sent')).toBe(0);

    // stopping the head closes its forwarders with it
    await unary(alpha.client, 'stopEngine', { engineId: 'head', owner: OWNER });
    for (const f of forwarders) await expect.poll(() => existsSync(f), { timeout: 5000 }).toBe(false);
  }, 600_000);

  it('no private key in any agent log or in `ps` while the cluster ran', async () => {
    // each node's key (the CA's and the coordinator's are in memory, added at the start)
    await audit.expectNoLeaks(nodes.map((n) => join(dir, n.name)), 3);
  });
});
