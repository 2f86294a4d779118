import { createPrivateKey, X509Certificate } from 'node:crypto';
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import { beforeAll, describe, expect, it } from 'vitest';
import { OrchardError } from '../../src/shared/errors.ts';
import { type ClusterCa, caClusterId, certificateFingerprint, createClusterCa, createCsr, createKeyAndCsr, issueCertificate } from '../../src/shared/pki/certificates.ts';
import { identityUri, parseIdentityUri } from '../../src/shared/pki/identity.ts';
import { loadNodeCredentials, loadOrCreateClusterCa, loadOrCreateNodeKey, pkiPaths, saveNodeCertificate } from '../../src/shared/pki/store.ts';
import { CertificateRejected, certificateIdentity, certificateValidity, needsRenewal, renewalDueAt, renewalStep, verifyCertificate } from '../../src/shared/pki/verify.ts';
import { x509 } from '../../src/shared/pki/x509.ts';
import { tempDir } from '../helpers/temp-dir.ts';

const DAY = 86_400_000;
let ca: ClusterCa;
let otherCa: ClusterCa;
beforeAll(async () => {
  ca = await createClusterCa('cluster-a');
  otherCa = await createClusterCa('cluster-b');
});

describe('identity URI', () => {
  it('round-trips every role and refuses anything else', () => {
    for (const role of ['node', 'coordinator', 'admin'] as const) {
      expect(parseIdentityUri(identityUri({ id: 'n-1', role }))).toEqual({ id: 'n-1', role });
    }
    expect(identityUri({ id: '0b5c2f7e-1d2a-4c1e-9f00-123456789abc', role: 'node' })).toBe('orchard://node/0b5c2f7e-1d2a-4c1e-9f00-123456789abc');
    for (const bad of ['orchard://root/x', 'orchard://node/', 'orchard://node/a/b', 'https://node/x', 'orchard://node/../x', 'orchard://node/-x']) {
      expect(parseIdentityUri(bad)).toBeUndefined();
    }
    expect(() => identityUri({ id: 'a/b', role: 'node' })).toThrow();
  });
});

describe('cluster CA', () => {
  it('is a self-signed P-256 CA naming its cluster, limited to end-entity certificates', () => {
    const c = new X509Certificate(ca.certPem);
    expect(c.ca).toBe(true);
    expect(c.checkIssued(c)).toBe(true);
    expect(c.verify(c.publicKey)).toBe(true);
    expect(c.publicKey.asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
    expect(caClusterId(ca.certPem)).toBe('cluster-a');
    const bc = new x509.X509Certificate(ca.certPem).getExtension(x509.BasicConstraintsExtension);
    expect(bc?.pathLength).toBe(0);
    expect(c.checkPrivateKey(createPrivateKey(ca.keyPem))).toBe(true);
  });

  it('fingerprint is sha256 of the DER, lower-case hex, stable and distinct per CA', () => {
    const fp = certificateFingerprint(ca.certPem);
    expect(fp).toMatch(/^[0-9a-f]{64}$/);
    expect(fp).toBe(new X509Certificate(ca.certPem).fingerprint256.replaceAll(':', '').toLowerCase());
    expect(certificateFingerprint(otherCa.certPem)).not.toBe(fp);
  });

  it('refuses a malformed cluster id', async () => {
    await expect(createClusterCa('bad id')).rejects.toThrow();
  });
});

describe('issuing from a CSR', () => {
  it('certifies the requester key with identity, role, both TLS usages and ~30 days', async () => {
    const now = new Date('2030-01-01T00:00:00Z');
    const { keyPem, csrPem } = await createKeyAndCsr('node-1');
    const issued = await issueCertificate(ca, csrPem, { role: 'node', now });
    expect(issued.identity).toEqual({ id: 'node-1', role: 'node' });
    const c = new X509Certificate(issued.certPem);
    expect(c.checkPrivateKey(createPrivateKey(keyPem))).toBe(true);
    expect(c.subjectAltName).toBe('URI:orchard://node/node-1');
    // The subject names the role, not the id: one NATS user for every node (coordinator/nats/auth.ts).
    expect(c.subject.split('\n')).toEqual(['OU=node', `O=Orchard cluster ${ca.clusterId}`]);
    expect(c.ca).toBe(false);
    expect(BigInt(`0x${c.serialNumber}`)).toBe(BigInt(`0x${issued.serial}`));
    const eku = new x509.X509Certificate(issued.certPem).getExtension(x509.ExtendedKeyUsageExtension);
    expect(eku?.usages).toEqual([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]);
    const v = certificateValidity(issued.certPem);
    expect(v.notAfter.getTime() - now.getTime()).toBe(30 * DAY);
    expect(now.getTime() - v.notBefore.getTime()).toBe(5 * 60_000);
  });

  it('the role is the issuer’s choice, not the requester’s', async () => {
    const { csrPem } = await createKeyAndCsr('ops');
    for (const role of ['coordinator', 'admin'] as const) {
      expect(verifyCertificate((await issueCertificate(ca, csrPem, { role })).certPem, ca.certPem).role).toBe(role);
    }
  });

  it('refuses a CSR whose signature does not verify, a non-CSR and an unexpected id', async () => {
    const { csrPem } = await createKeyAndCsr('node-2');
    const der = Buffer.from(x509.PemConverter.decodeFirst(csrPem));
    der[der.length - 5] = (der[der.length - 5] ?? 0) ^ 0xff; // inside the signature
    const tampered = x509.PemConverter.encode(der, 'CERTIFICATE REQUEST');
    await expect(issueCertificate(ca, tampered, { role: 'node' })).rejects.toThrow(/signature does not verify/);
    await expect(issueCertificate(ca, 'not a csr', { role: 'node' })).rejects.toThrow(/PKCS#10/);
    await expect(issueCertificate(ca, csrPem, { role: 'node', expectId: 'node-3' })).rejects.toThrow(/expected node-3/);
  });

  it('refuses a CSR naming an invalid id', async () => {
    const keys = (await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['sign', 'verify'])) as CryptoKeyPair;
    const csr = await x509.Pkcs10CertificateRequestGenerator.create({ name: [{ CN: ['../etc'] }], keys, signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' } });
    await expect(issueCertificate(ca, csr.toString('pem'), { role: 'node' })).rejects.toThrow(/valid id/);
  });

  it('a renewal CSR from the same key certifies the same key', async () => {
    const { keyPem } = await createKeyAndCsr('node-4');
    const issued = await issueCertificate(ca, await createCsr(keyPem, 'node-4'), { role: 'node' });
    expect(new X509Certificate(issued.certPem).checkPrivateKey(createPrivateKey(keyPem))).toBe(true);
  });
});

describe('verifying a peer', () => {
  it('returns identity, role, cluster and serial for a certificate of this cluster (PEM or DER)', async () => {
    const issued = await issueCertificate(ca, (await createKeyAndCsr('node-5')).csrPem, { role: 'node' });
    const peer = verifyCertificate(issued.certPem, ca.certPem);
    expect(peer).toMatchObject({ id: 'node-5', role: 'node', clusterId: 'cluster-a' });
    expect(peer.serial).toBe(issued.serial);
    expect(verifyCertificate(new X509Certificate(issued.certPem).raw, ca.certPem).id).toBe('node-5');
  });

  it('rejects another cluster’s certificate, the CA itself, expired and not-yet-valid ones, garbage', async () => {
    const csr = (await createKeyAndCsr('node-6')).csrPem;
    const foreign = await issueCertificate(otherCa, csr, { role: 'coordinator' });
    expect(() => verifyCertificate(foreign.certPem, ca.certPem)).toThrow(/not issued by this cluster/);
    expect(() => verifyCertificate(ca.certPem, ca.certPem)).toThrow(CertificateRejected);
    const old = await issueCertificate(ca, csr, { role: 'node', now: new Date(Date.now() - 31 * DAY) });
    expect(() => verifyCertificate(old.certPem, ca.certPem)).toThrow(/expired/);
    const future = await issueCertificate(ca, csr, { role: 'node', now: new Date(Date.now() + DAY) });
    expect(() => verifyCertificate(future.certPem, ca.certPem)).toThrow(/not yet valid/);
    expect(() => verifyCertificate('garbage', ca.certPem)).toThrow(/not an X.509/);
  });

  it('a certificate of the right CA without an Orchard SAN is no identity', async () => {
    const caKeys = await (await import('../../src/shared/pki/keys.ts')).keyPairFromPem(ca.keyPem);
    const leafKeys = (await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['sign', 'verify'])) as CryptoKeyPair;
    const cert = await x509.X509CertificateGenerator.create({
      subject: 'CN=node-7',
      issuer: new x509.X509Certificate(ca.certPem).subjectName,
      publicKey: leafKeys.publicKey,
      signingKey: caKeys.privateKey,
      signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
      extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'url', value: 'orchard://node/a' }, { type: 'url', value: 'orchard://admin/b' }])],
    });
    expect(() => verifyCertificate(cert.toString('pem'), ca.certPem)).toThrow(/single Orchard identity/);
    expect(() => certificateIdentity(new Uint8Array(cert.rawData))).toThrow(CertificateRejected);
  });
});

describe('renewal predicate', () => {
  const v = { notBefore: new Date(0), notAfter: new Date(30 * DAY) };
  it('renews in the last third of the lifetime', () => {
    expect(needsRenewal(v, new Date(19 * DAY))).toBe(false);
    expect(needsRenewal(v, new Date(20 * DAY + 1))).toBe(true);
    expect(needsRenewal(v, new Date(31 * DAY))).toBe(true);
    expect(needsRenewal(v, new Date(10 * DAY), 0.9)).toBe(true);
  });

  /** Drive the renewal loop's decisions with a simulated clock: the moment it first says renew. */
  function firesAt(validity: { notBefore: Date; notAfter: Date }, startMs: number, checkMs: number): { atMs: number; wakeups: number } {
    let t = startMs;
    for (let wakeups = 0; wakeups < 10_000; wakeups++) {
      const step = renewalStep(validity, new Date(t), checkMs);
      if (step.renew) return { atMs: t, wakeups };
      expect(step.waitMs).toBeGreaterThan(0);
      expect(step.waitMs).toBeLessThanOrEqual(checkMs);
      t += step.waitMs;
    }
    throw new Error('renewal never fired');
  }

  it('fires just past the two-thirds mark, whatever the check interval', () => {
    expect(renewalDueAt(v).getTime()).toBe(20 * DAY);
    // hourly checks from issue: the last wait is cut short to the due moment, not the next hour
    expect(firesAt(v, 0, 3_600_000)).toEqual({ atMs: 20 * DAY + 1, wakeups: 481 });
    // a check interval longer than the whole certificate still renews on time, after one sleep
    expect(firesAt(v, 0, 365 * DAY)).toEqual({ atMs: 20 * DAY + 1, wakeups: 1 });
    // started (or restarted) after the mark: renews at once
    expect(firesAt(v, 25 * DAY, 3_600_000)).toEqual({ atMs: 25 * DAY, wakeups: 0 });
    // a 30-second certificate with the default hourly check: renewed 20 s after issue
    const short = { notBefore: new Date(1000), notAfter: new Date(31_000) };
    expect(firesAt(short, 1000, 3_600_000).atMs).toBe(21_001);
  });
});

describe('credential files', () => {
  const tmp = tempDir('orchard-pki-', 'each');

  it('creates the CA once (key 0600, tmp.path 0700) and loads the same one afterwards', async () => {
    const first = await loadOrCreateClusterCa(tmp.path, 'c1');
    expect(first.created).toBe(true);
    const p = pkiPaths(tmp.path);
    expect((await stat(p.caKey)).mode & 0o777).toBe(0o600);
    expect((await stat(p.dir)).mode & 0o777).toBe(0o700);
    const again = await loadOrCreateClusterCa(tmp.path, 'c1');
    expect(again).toEqual({ ca: first.ca, created: false });
  });

  it('refuses half a CA, a CA of another cluster and a key that does not match', async () => {
    const { ca: c } = await loadOrCreateClusterCa(tmp.path, 'c1');
    await expect(loadOrCreateClusterCa(tmp.path, 'c2')).rejects.toThrow(/belongs to cluster c1/);
    const p = pkiPaths(tmp.path);
    await writeFile(p.caKey, (await createClusterCa('c1')).keyPem);
    await expect(loadOrCreateClusterCa(tmp.path, 'c1')).rejects.toThrow(/do not belong together/);
    await rm(p.caKey);
    await expect(loadOrCreateClusterCa(tmp.path, 'c1')).rejects.toThrow(OrchardError);
    expect(await readFile(p.caCert, 'utf8')).toBe(c.certPem);
  });

  it('node key is made once (0600); the certificate is accepted only for that key; credentials load', async () => {
    expect(await loadNodeCredentials(tmp.path)).toBeUndefined();
    const k = await loadOrCreateNodeKey(tmp.path, 'node-8');
    expect(k.created).toBe(true);
    expect((await stat(pkiPaths(tmp.path).nodeKey)).mode & 0o777).toBe(0o600);
    const k2 = await loadOrCreateNodeKey(tmp.path, 'node-8');
    expect(k2.keyPem).toBe(k.keyPem);
    expect(k2.created).toBe(false);
    const stranger = await issueCertificate(ca, (await createKeyAndCsr('node-8')).csrPem, { role: 'node' });
    await expect(saveNodeCertificate(tmp.path, stranger.certPem, ca.certPem)).rejects.toThrow(/do not belong together/);
    const mine = await issueCertificate(ca, k2.csrPem, { role: 'node', expectId: 'node-8' });
    await saveNodeCertificate(tmp.path, mine.certPem, ca.certPem);
    expect(await loadNodeCredentials(tmp.path)).toEqual({ keyPem: k.keyPem, certPem: mine.certPem, caCertPem: ca.certPem });
  });

  it('a certificate without its key is refused', async () => {
    const issued = await issueCertificate(ca, (await createKeyAndCsr('node-9')).csrPem, { role: 'node' });
    await expect(saveNodeCertificate(tmp.path, issued.certPem, ca.certPem)).rejects.toThrow(/missing/);
  });
});

describe('authenticate (gRPC peer check)', () => {
  const call = (raw: Buffer | undefined) => ({ getAuthContext: () => (raw ? { sslPeerCertificate: { raw } as never } : {}) });
  const der = (pem: string) => new X509Certificate(pem).raw;
  it('no certificate or a foreign one is UNAUTHENTICATED, a wrong role PERMISSION_DENIED, a revoked serial UNAUTHENTICATED', async () => {
    const { authenticate } = await import('../../src/shared/pki/grpc-tls.ts');
    const mk = async (c: ClusterCa, role: 'node' | 'coordinator') => {
      const { csrPem } = await createKeyAndCsr('peer-1');
      return issueCertificate(c, csrPem, { role });
    };
    const coord = await mk(ca, 'coordinator');
    const node = await mk(ca, 'node');
    const foreign = await mk(otherCa, 'coordinator');
    expect(authenticate(call(undefined), ca.certPem, ['coordinator'])).toMatchObject({ ok: false, code: 16 });
    expect(authenticate(call(der(foreign.certPem)), ca.certPem, ['coordinator'])).toMatchObject({ ok: false, code: 16, details: expect.stringMatching(/not issued by this cluster/) });
    expect(authenticate(call(der(node.certPem)), ca.certPem, ['coordinator'])).toMatchObject({ ok: false, code: 7 });
    expect(authenticate(call(der(coord.certPem)), ca.certPem, ['coordinator'])).toMatchObject({ ok: true, peer: { id: 'peer-1', role: 'coordinator' } });
    expect(authenticate(call(der(coord.certPem)), ca.certPem, ['coordinator'], (p) => p.serial === coord.serial)).toMatchObject({ ok: false, code: 16, details: expect.stringMatching(/revoked/) });
  });
});
