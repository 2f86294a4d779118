import { cp, mkdtemp, rm } from 'node:fs/promises';
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
import { type Agent, agentCa, runCli, startAgent, stopAll } from '../helpers/node-agent.ts';

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
  it('the proto lists the seven NodeAgent methods this suite attacks', () => {
    expect(METHODS.sort()).toEqual(['Describe', 'Generate', 'PrepareCache', 'SetRevocations', 'StartEngine', 'StopEngine', 'Watch']);
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
