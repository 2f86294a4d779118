import { createServer as createTlsServer } from 'node:tls';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { csrNodeId, enroll } from '../../src/coordinator/membership/enroll.ts';
import { JoinTokenStore } from '../../src/coordinator/state/join-token-store.ts';
import { RevocationList } from '../../src/coordinator/state/revocations.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { type ClusterCa, certificateFingerprint, createKeyAndCsr } from '../../src/shared/pki/certificates.ts';
import { type TlsCredentials, clusterServerCredentials } from '../../src/shared/pki/grpc-tls.ts';
import { fetchPinnedCa } from '../../src/shared/pki/pin.ts';
import { verifyCertificate } from '../../src/shared/pki/verify.ts';
import { clientCredentials, testCa } from '../helpers/cluster-pki.ts';

/*
 * The coordinator's half of a join (token or node certificate → a node certificate for the
 * CSR's id), revocation, and the joining node's first step: pinning the coordinator's CA by the
 * fingerprint in the token before it sends anything.
 */

let dir = '';
let ca: ClusterCa;
let tokens: JoinTokenStore;
let revoked: RevocationList;
const HOUR = 3_600_000;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-enroll-'));
  ca = await testCa('enroll-cluster');
  tokens = new JoinTokenStore(join(dir, 'join-tokens.json'), certificateFingerprint(ca.certPem));
  revoked = await RevocationList.open(join(dir, 'revoked.json'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

const ctx = (now?: Date) => ({ ca, redeem: (t: string) => tokens.redeem(t, now), isRevoked: (id: string) => revoked.isRevoked(id) });

describe('enroll (Join with a CSR)', () => {
  it('a valid token buys a node certificate naming the CSR’s id; the key never travels', async () => {
    const { token } = await tokens.create({ ttlMs: HOUR, uses: 1 });
    const { csrPem, keyPem } = await createKeyAndCsr('node-a');
    const e = await enroll(ctx(), { csrPem, token });
    expect(e).toMatchObject({ nodeId: 'node-a', renewal: false, caCertPem: ca.certPem });
    expect(verifyCertificate(e.certPem, ca.certPem)).toMatchObject({ id: 'node-a', role: 'node', clusterId: 'enroll-cluster' });
    expect(csrPem).not.toContain(keyPem.split('\n')[1]);
  });

  it('an expired or used-up token is refused with a clear line', async () => {
    const { token: once } = await tokens.create({ ttlMs: HOUR, uses: 1 });
    await enroll(ctx(), { csrPem: (await createKeyAndCsr('node-a')).csrPem, token: once });
    await expect(enroll(ctx(), { csrPem: (await createKeyAndCsr('node-b')).csrPem, token: once })).rejects.toThrow(
      'join token has no uses left: create a new one with `orchard coordinator token --uses N`',
    );
    const { token: short } = await tokens.create({ ttlMs: HOUR });
    const later = new Date(Date.now() + 2 * HOUR);
    await expect(enroll(ctx(later), { csrPem: (await createKeyAndCsr('node-c')).csrPem, token: short })).rejects.toThrow(
      'join token has expired: create a new one with `orchard coordinator token`',
    );
    await expect(enroll(ctx(), { csrPem: (await createKeyAndCsr('node-d')).csrPem })).rejects.toMatchObject({ code: 'PERMISSION_DENIED' });
  });

  it('a revoked node cannot come back, and the refusal spends no token use', async () => {
    const { token } = await tokens.create({ ttlMs: HOUR, uses: 1 });
    expect(await revoked.revoke('node-r')).toBe(true);
    await expect(enroll(ctx(), { csrPem: (await createKeyAndCsr('node-r')).csrPem, token })).rejects.toThrow(/node node-r was revoked/);
    expect((await tokens.list())[0]?.usesLeft).toBe(1);
    // the list survives a restart, 0600
    expect((await RevocationList.open(join(dir, 'revoked.json'))).isRevoked('node-r')).toBe(true);
    expect((await stat(join(dir, 'revoked.json'))).mode & 0o777).toBe(0o600);
  });

  it('renewal: a node certificate vouches for a CSR of the same id only', async () => {
    const peer = verifyCertificate((await clientCredentials(ca, 'node', 'node-a')).certPem, ca.certPem);
    const e = await enroll(ctx(), { csrPem: (await createKeyAndCsr('node-a')).csrPem, peer });
    expect(e.renewal).toBe(true);
    await expect(enroll(ctx(), { csrPem: (await createKeyAndCsr('node-b')).csrPem, peer })).rejects.toThrow(/may renew only its own certificate/);
    expect(() => csrNodeId('not a csr')).toThrow(/PKCS#10/);
  });

  it('the coordinator certificate comes from the state dir’s CA, in the coordinator role', async () => {
    const state = new StateDir(join(dir, 'coord'));
    const creds = await state.coordinatorCredentials();
    expect(verifyCertificate(creds.certPem, creds.caCertPem)).toMatchObject({ role: 'coordinator', id: 'coordinator' });
    expect(creds.caCertPem).toBe((await state.clusterCa()).ca.certPem);
  });
});

describe('pinning the coordinator by the token’s CA fingerprint', () => {
  async function grpcTlsServer(creds: TlsCredentials): Promise<{ port: number; close: () => void }> {
    const server = new grpc.Server();
    const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', clusterServerCredentials(creds), (e, p) => (e ? reject(e) : resolve(p))));
    return { port, close: () => server.forceShutdown() };
  }

  it('accepts the CA whose sha256 the token carries, from a cluster gRPC server’s chain', async () => {
    const s = await grpcTlsServer(await clientCredentials(ca, 'coordinator', 'coordinator'));
    try {
      const pinned = await fetchPinnedCa('127.0.0.1', s.port, certificateFingerprint(ca.certPem));
      expect(certificateFingerprint(pinned.caCertPem)).toBe(certificateFingerprint(ca.certPem));
      expect(pinned.server).toMatchObject({ role: 'coordinator', id: 'coordinator' });
    } finally {
      s.close();
    }
  });

  it('refuses another cluster’s coordinator, and a fellow node posing as the coordinator', async () => {
    const rogueCa = await testCa('rogue');
    const rogue = await grpcTlsServer(await clientCredentials(rogueCa, 'coordinator', 'coordinator'));
    const node = await grpcTlsServer(await clientCredentials(ca, 'node', 'node-x'));
    try {
      await expect(fetchPinnedCa('127.0.0.1', rogue.port, certificateFingerprint(ca.certPem))).rejects.toThrow(/not the cluster this token is for/);
      await expect(fetchPinnedCa('127.0.0.1', node.port, certificateFingerprint(ca.certPem))).rejects.toThrow(/is a node of the cluster, not its coordinator/);
    } finally {
      rogue.close();
      node.close();
    }
  });

  it('sends nothing but the TLS handshake, pin matched or not: the server records zero application bytes', async () => {
    for (const serverCa of [await testCa('rogue'), ca]) {
      const rc = await clientCredentials(serverCa, 'coordinator', 'coordinator');
      let received = 0;
      const server = createTlsServer({ key: rc.keyPem, cert: `${rc.certPem.trim()}\n${rc.caCertPem}`, ALPNProtocols: ['h2'] }, (sock) => {
        sock.on('data', (b: Buffer) => {
          received += b.length;
        });
        sock.on('error', () => {});
      });
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
      try {
        const port = (server.address() as { port: number }).port;
        const pinned = fetchPinnedCa('127.0.0.1', port, certificateFingerprint(ca.certPem));
        if (serverCa === ca) await expect(pinned).resolves.toMatchObject({ server: { role: 'coordinator' } });
        else await expect(pinned).rejects.toThrow(/not the cluster this token is for/);
        await new Promise((r) => setTimeout(r, 200));
        expect(received).toBe(0);
      } finally {
        server.close();
      }
    }
  });
});
