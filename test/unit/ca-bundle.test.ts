import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * `orchard coordinator export-ca | import-ca`: a second coordinator's state dir gets the same
 * cluster id and CA (key 0600); the same bundle again changes nothing; a state dir that already
 * holds another cluster or another CA refuses it (replacing a CA would orphan its nodes).
 */
describe('cluster CA bundle (export-ca / import-ca)', () => {
  const dir = tempDir('orchard-ca-bundle-');

  it('a fresh state dir takes the cluster id and CA; the coordinator certificate it issues chains to the same CA', async () => {
    const a = new StateDir(join(dir.path, 'a'));
    await a.clusterCa();
    const bundle = await a.exportCa();
    const b = new StateDir(join(dir.path, 'b'));
    expect(await b.importCa(bundle)).toEqual({ installed: true });
    expect((await b.cluster()).clusterId).toBe((await a.cluster()).clusterId);
    expect((await b.clusterCa()).ca.certPem).toBe((await a.clusterCa()).ca.certPem);
    expect((await stat(join(b.dir, 'pki', 'ca.key'))).mode & 0o777).toBe(0o600);
    expect((await stat(b.clusterPath)).mode & 0o777).toBe(0o600);
    expect((await b.coordinatorCredentials()).caCertPem).toBe(bundle.caCertPem);
    expect(await b.importCa(bundle)).toEqual({ installed: false });
  });

  it('refuses a state dir of another cluster, and a bundle whose key or cluster id does not match its certificate', async () => {
    const a = new StateDir(join(dir.path, 'a'));
    await a.clusterCa();
    const other = new StateDir(join(dir.path, 'other'));
    await other.clusterCa();
    const bundle = await a.exportCa();
    await expect(other.importCa(bundle)).rejects.toThrow(/belongs to cluster/);
    const otherBundle = await other.exportCa();
    const fresh = new StateDir(join(dir.path, 'fresh'));
    await expect(fresh.importCa({ ...bundle, caKeyPem: otherBundle.caKeyPem })).rejects.toThrow(/do not belong together/);
    await expect(fresh.importCa({ ...bundle, clusterId: otherBundle.clusterId })).rejects.toThrow(/names/);
    await expect(new StateDir(join(dir.path, 'empty')).exportCa()).rejects.toThrow(/no cluster yet/);
  });
});
