import { cp, mkdtemp, rm } from 'node:fs/promises';
import { type Server, type Socket, connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AgentClient } from '../../src/coordinator/membership/agent-client.ts';
import { Membership } from '../../src/coordinator/membership/membership.ts';
import { DEFAULT_REGISTRY_OPTIONS } from '../../src/coordinator/membership/registry.ts';
import type { ClusterCa } from '../../src/shared/pki/certificates.ts';
import { CLUSTER_CHANNEL_OPTIONS, type TlsCredentials, clusterChannelCredentials } from '../../src/shared/pki/grpc-tls.ts';
import { createLogger } from '../../src/shared/log.ts';
import { orchardV1 } from '../../src/shared/proto.ts';
import { clientCredentials, enrollNode, testCa } from '../helpers/cluster-pki.ts';
import { nodesToWire } from '../../src/coordinator/api/grpc-server.ts';
import { statusJson } from '../../src/cli/commands/status.ts';
import { type Agent, agentCa, runCli, startAgent, stopAll, waitFor } from '../helpers/node-agent.ts';

/*
 * Red team, cluster identity: an agent that holds cluster credentials answers nobody but this
 * cluster's coordinator. Every method of the NodeAgent service (enumerated from the loaded
 * proto, not a hand list) is called without a certificate, with a certificate from another
 * CA and with a fellow node's certificate; and a node id cannot be taken over by copying
 * identity.json.
 */

type Method = { path: string; requestStream: boolean; responseStream: boolean; requestSerialize: (v: unknown) => Buffer; responseDeserialize: (b: Buffer) => unknown };
const SERVICE = orchardV1().NodeAgent!.service as unknown as Record<string, Method>;
const METHODS = Object.keys(SERVICE);

/** Call one method with an empty request; the status it ends with (OK when it answered). */
function callStatus(address: string, credentials: grpc.ChannelCredentials, name: string): Promise<{ code: grpc.status; details: string }> {
  const m = SERVICE[name]!;
  const client = new grpc.Client(address, credentials, CLUSTER_CHANNEL_OPTIONS);
  const deadline = Date.now() + 10_000;
  return new Promise((resolve) => {
    const done = (code: grpc.status, details: string) => {
      client.close();
      resolve({ code, details });
    };
    const ser = (v: unknown) => m.requestSerialize(v);
    const de = (b: Buffer) => m.responseDeserialize(b);
    if (!m.responseStream) {
      client.makeUnaryRequest(m.path, ser, de, {}, new grpc.Metadata(), { deadline }, (err) => (err ? done(err.code, err.details) : done(grpc.status.OK, '')));
      return;
    }
    const call = client.makeServerStreamRequest(m.path, ser, de, {}, new grpc.Metadata(), { deadline });
    call.on('data', () => {
      // A stream that sends anything was served: record it and stop.
      call.cancel();
      done(grpc.status.OK, 'answered');
    });
    call.on('error', (err: grpc.ServiceError) => done(err.code, err.details));
    call.on('end', () => done(grpc.status.OK, 'ended'));
  });
}

const log = createLogger('identity-test', 'silent');
let tmp = '';
let ca: ClusterCa;
let agent: Agent;
let nodeId = '';
let address = '';
let coordinator: TlsCredentials;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'orchard-identity-'));
  // startAgent enrols the state dir with this file's CA (node-agent.ts), as a join would.
  ca = await agentCa();
  agent = await startAgent(join(tmp, 'alpha'), ['--name', 'alpha']);
  nodeId = agent.ready.nodeId;
  address = `127.0.0.1:${agent.ready.grpcPort}`;
  coordinator = await clientCredentials(ca, 'coordinator', 'coordinator-1');
});

afterAll(async () => {
  stopAll();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('agent gRPC: mutual TLS with the cluster CA', () => {
  it('the proto lists the nine NodeAgent methods this suite attacks', () => {
    expect(METHODS.sort()).toEqual(['Describe', 'Generate', 'MeasureLinks', 'PrepareCache', 'SetEventBus', 'SetRevocations', 'StartEngine', 'StopEngine', 'Watch']);
  });

  it('TLS without a client certificate: every method UNAUTHENTICATED', async () => {
    const creds = clusterChannelCredentials({ caCertPem: ca.certPem }, { role: 'node' });
    for (const name of METHODS) {
      const r = await callStatus(address, creds, name);
      expect(r.code, `${name}: ${r.details}`).toBe(grpc.status.UNAUTHENTICATED);
      expect(r.details).toMatch(/client certificate from this cluster is required/);
    }
  });

  it('plaintext gRPC (today’s attacker): no method is served — the TLS server drops the connection, grpc-js says UNAVAILABLE', async () => {
    for (const name of METHODS) {
      const r = await callStatus(address, grpc.credentials.createInsecure(), name);
      expect(r.code, `${name}: ${r.details}`).toBe(grpc.status.UNAVAILABLE);
    }
  });

  it('a certificate from another cluster’s CA: every method UNAUTHENTICATED', async () => {
    const foreignCa = await testCa('other-cluster');
    const foreign = await clientCredentials(foreignCa, 'coordinator', 'coordinator-1');
    // The attacker trusts our CA for the server side; only its own certificate is foreign.
    const creds = clusterChannelCredentials({ ...foreign, caCertPem: ca.certPem }, { role: 'node' });
    for (const name of METHODS) {
      const r = await callStatus(address, creds, name);
      expect(r.code, `${name}: ${r.details}`).toBe(grpc.status.UNAUTHENTICATED);
      // The server's CertificateRequest names our CA, so the TLS client may withhold a
      // certificate that CA did not issue; sent or withheld, it never counts.
      expect(r.details).toMatch(/client certificate from this cluster is required|not issued by this cluster/);
    }
  });

  it('a fellow node’s certificate: every method PERMISSION_DENIED (StartEngine included)', async () => {
    const node = await clientCredentials(ca, 'node', 'other-node');
    const creds = clusterChannelCredentials(node, { role: 'node' });
    for (const name of METHODS) {
      const r = await callStatus(address, creds, name);
      expect(r.code, `${name}: ${r.details}`).toBe(grpc.status.PERMISSION_DENIED);
      expect(r.details).toMatch(/node other-node may not call this method/);
    }
  });

  it('the coordinator’s certificate is served, and the agent is who its certificate says', async () => {
    const client = new AgentClient(address, coordinator);
    try {
      const d = await client.describe();
      expect(d.profile.nodeId).toBe(nodeId);
      expect(client.peer).toMatchObject({ id: nodeId, role: 'node', clusterId: 'agent-tests' });
    } finally {
      client.close();
    }
  });
});

describe('node identity comes from the certificate', () => {
  it('identity.json copied without key and certificate cannot take the node’s place', async () => {
    // An impostor state dir: alpha's identity.json, no pki/ (the key never left alpha).
    const impostorDir = join(tmp, 'impostor');
    await cp(join(tmp, 'alpha', 'identity.json'), join(impostorDir, 'identity.json'), { recursive: true }).catch(async () => {
      const { mkdir, copyFile } = await import('node:fs/promises');
      await mkdir(impostorDir, { recursive: true });
      await copyFile(join(tmp, 'alpha', 'identity.json'), join(impostorDir, 'identity.json'));
    });
    const impostor = await startAgent(impostorDir, ['--name', 'impostor'], undefined, { joined: false });
    expect(impostor.ready.nodeId).toBe(nodeId); // it claims alpha's id…
    const membership = new Membership(DEFAULT_REGISTRY_OPTIONS, log, coordinator);
    try {
      await expect(membership.add(`127.0.0.1:${impostor.ready.grpcPort}`, 'join')).rejects.toThrow();
      expect(membership.registry.nodes()).toEqual([]); // …and is never taken for alpha
      const real = await membership.add(address, 'join');
      expect(real.nodeId).toBe(nodeId);
    } finally {
      membership.close();
    }
  });

  it('identity.json replaced next to a node’s own certificate: the agent refuses to start, one clear line', async () => {
    const bravo = join(tmp, 'bravo');
    await enrollNode(bravo, ca);
    const { copyFile } = await import('node:fs/promises');
    await copyFile(join(tmp, 'alpha', 'identity.json'), join(bravo, 'identity.json'));
    const r = await runCli(['node', '--no-mdns', '--bind', '127.0.0.1', '--grpc-port', '0', '--metrics-port', '0', '--state-dir', bravo]);
    expect(r.code).toBe(1);
    const human = r.stderr.split('\n').filter((l) => l.trim() !== '' && !l.startsWith('{'));
    expect(human).toHaveLength(1);
    expect(human[0]).toMatch(new RegExp(`names node ${nodeId} but this node's certificate names`));
  });
});

/**
 * A TCP relay in front of an agent that keeps every byte the coordinator side sends, per
 * connection: what a listener at that address learns.
 */
async function recordingRelay(targetPort: number): Promise<{ port: number; sent: Buffer[]; close: () => Promise<void> }> {
  const sent: Buffer[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((inbound) => {
    const i = sent.push(Buffer.alloc(0)) - 1;
    const outbound = connect(targetPort, '127.0.0.1');
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on('error', () => {});
      s.once('close', () => sockets.delete(s));
    }
    inbound.on('data', (d: Buffer) => {
      sent[i] = Buffer.concat([sent[i]!, d]);
    });
    inbound.pipe(outbound).pipe(inbound);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as { port: number }).port,
    sent,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

describe('Bonjour sightings: who is a member, who is only discovered', () => {
  it('an agent without credentials next to a joined one is listed as discovered and sent nothing but TLS handshakes', async () => {
    const unjoined = await startAgent(join(tmp, 'unjoined'), ['--name', 'unjoined'], undefined, { joined: false });
    const relay = await recordingRelay(unjoined.ready.grpcPort);
    const membership = new Membership(DEFAULT_REGISTRY_OPTIONS, log, coordinator);
    try {
      membership.sighted(address, { nodeId, name: 'alpha' });
      membership.sighted(`127.0.0.1:${relay.port}`, { nodeId: unjoined.ready.nodeId, name: 'unjoined', chip: 'Claimed M9', memoryBytes: 8 * 2 ** 30 });
      const found = await waitFor('alpha up and unjoined discovered', () => (membership.registry.upNodes().length === 1 && membership.discovered().length === 1 ? membership.discovered() : undefined), 20_000);
      expect(found[0]).toMatchObject({ address: `127.0.0.1:${relay.port}`, nodeId: unjoined.ready.nodeId, name: 'unjoined', chip: 'Claimed M9' });
      expect(membership.registry.nodes().map((n) => n.nodeId)).toEqual([nodeId]);
      // What `orchard status --json` prints from the gRPC Status answer.
      const status = statusJson({ nodes: nodesToWire(membership) }) as { nodes: { name: string; state: string; hardware: { chip: string } }[] };
      expect(status.nodes.map((n) => [n.name, n.state])).toEqual([
        ['alpha', 'up'],
        ['unjoined', 'discovered'],
      ]);
      // Dialled (and re-dialled), but every connection opened with a TLS ClientHello that the
      // plaintext agent could not answer: no HTTP/2 frame, no metadata, no credential.
      await waitFor('the unjoined agent dialled twice', () => relay.sent.filter((b) => b.length > 0).length >= 2 || undefined, 20_000);
      for (const bytes of relay.sent.filter((b) => b.length > 0)) {
        expect([...bytes.subarray(0, 3)]).toEqual([0x16, 0x03, 0x01]); // TLS handshake record
        expect(bytes.includes('PRI * HTTP/2')).toBe(false);
        expect(bytes.toString('latin1')).not.toMatch(/authorization|bearer|orchard1\.|PRIVATE KEY/i);
      }
    } finally {
      membership.close();
      await relay.close();
      unjoined.child.kill('SIGTERM');
      await unjoined.exited;
    }
  });

  it('a revoked node is not re-dialled: its announced id is skipped, and an address that proves to be it is dropped', async () => {
    const relay = await recordingRelay(agent.ready.grpcPort);
    const membership = new Membership(DEFAULT_REGISTRY_OPTIONS, log, coordinator, () => [nodeId]);
    try {
      membership.sighted(address, { nodeId, name: 'alpha' });
      expect(membership.addresses()).toEqual([]); // announced as alpha: not dialled at all
      // An announcement without the id: dialled once, its certificate names alpha → dropped.
      membership.sighted(`127.0.0.1:${relay.port}`, { name: 'anonymous' });
      await waitFor('the anonymous sighting dialled', () => relay.sent.length >= 1 || undefined, 10_000);
      await waitFor('the revoked link dropped', () => membership.addresses().length === 0 || undefined, 10_000);
      const dials = relay.sent.length;
      // Before, a refused link was re-dialled with a 200 ms → 2 s backoff, forever.
      await new Promise((r) => setTimeout(r, 2500));
      expect(relay.sent.length).toBe(dials);
      expect(membership.registry.nodes()).toEqual([]);
      expect(membership.discovered()).toEqual([]);
    } finally {
      membership.close();
      await relay.close();
    }
  });
});
