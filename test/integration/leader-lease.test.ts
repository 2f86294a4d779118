import { join } from 'node:path';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { afterAll, afterEach, beforeAll, expect } from 'vitest';
import { KvLeaderLease, type LeaseView } from '../../src/coordinator/leader/kv-lease.ts';
import type { LeaseHolder } from '../../src/coordinator/leader/lease.ts';
import { KvInstanceStore } from '../../src/coordinator/state/kv-instance-store.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { natsClientTls } from '../../src/shared/pki/nats-tls.ts';
import { sampleRecord } from '../helpers/instance-store-contract.ts';
import { natsConfigFiles, testNats } from '../helpers/nats.ts';
import { describeWith, itWith, natsServer } from '../helpers/needs.ts';
import { freePort } from '../helpers/processes.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * The leader lease on a real nats-server -js: two contenders on their own connections (two
 * coordinators), one leads and the other knows who; a leader cut off from NATS (its connection
 * closed, as when its machine dies) is replaced once its key ages out and stops calling itself
 * leader before that; a clean stop hands over at once. Then a three-server NATS cluster with
 * replicas 3 loses one server: the KV contents survive and the lease keeps being renewed. Those
 * three run as a user runs them, with `orchard coordinator nats-config`'s TLS and users, and the
 * coordinator's certificate is the only way in.
 */

const nats = natsServer();
const TTL = 1500;
/**
 * `--lease-ttl`'s default. Losing a NATS server costs the leader's client a reconnect (1.1–1.4 s
 * here under load, TLS included) and maybe a stream leader election: the renewal in flight is
 * lost and the retry must land within the term, which 1.5 s does not leave room for.
 */
const CLUSTER_TTL = 5000;
const holder = (id: string): LeaseHolder => ({ coordinatorId: id, addresses: { http: `https://127.0.0.1:1${id.length}`, grpc: `127.0.0.1:2${id.length}` } });

async function until(what: string, ok: () => boolean, timeoutMs: number): Promise<number> {
  const start = performance.now();
  while (!ok()) {
    if (performance.now() - start > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return performance.now() - start;
}

describeWith([nats], 'leader lease on a real nats-server', () => {
  let server: Awaited<ReturnType<typeof testNats>>;
  const conns: NatsConnection[] = [];
  const leases: KvLeaderLease[] = [];
  const contender = async (clusterId: string, id: string, url = server.url, replicas = 1) => {
    const nc = await connect({ servers: url });
    conns.push(nc);
    const views: LeaseView[] = [];
    const lease = await KvLeaderLease.start(nc, { clusterId, self: holder(id), ttlMs: TTL, replicas, onChange: (v) => views.push(v) });
    leases.push(lease);
    return { nc, lease, views };
  };

  beforeAll(async () => {
    server = await testNats((nats as { value: string }).value);
  });
  afterEach(async () => {
    await Promise.all(leases.splice(0).map((l) => l.stop()));
    await Promise.all(conns.splice(0).map((c) => c.close().catch(() => {})));
  });
  afterAll(async () => {
    await server?.stop();
  });

  itWith([nats], 'one of two leads, the other names it; a leader cut off is replaced after the TTL and steps down first', async () => {
    const a = await contender('lease-0001', 'alpha');
    await until('alpha leads', () => a.lease.isLeader(), 5000);
    const b = await contender('lease-0001', 'bravo');
    await until('bravo sees alpha', () => b.lease.view().role === 'standby' && (b.lease.view() as { leader: LeaseHolder | null }).leader?.coordinatorId === 'alpha', 5000);
    // Renewals keep alpha leading well past several TTLs.
    await new Promise((r) => setTimeout(r, TTL * 2));
    expect(a.lease.isLeader()).toBe(true);
    expect(b.lease.isLeader()).toBe(false);

    await a.nc.close(); // alpha's machine is gone as far as NATS is concerned
    let overlap = false;
    const took = await until(
      'bravo leads',
      () => {
        overlap ||= a.lease.isLeader() && b.lease.isLeader();
        return b.lease.isLeader();
      },
      TTL * 3,
    );
    expect(overlap).toBe(false);
    expect(a.lease.isLeader()).toBe(false);
    expect(took).toBeGreaterThan(TTL * 0.5); // it waited for the key to age out
    expect(took).toBeLessThan(TTL + TTL / 3 + 1000);
    expect(b.views.at(-1)).toEqual({ role: 'leader' });
  });

  itWith([nats], 'a clean stop hands the lease over at once', async () => {
    const a = await contender('lease-0002', 'alpha');
    await until('alpha leads', () => a.lease.isLeader(), 5000);
    const b = await contender('lease-0002', 'bravo');
    await until('bravo reads', () => b.views.some((v) => v.role === 'standby' && v.leader !== null), 5000);
    await a.lease.stop();
    const took = await until('bravo leads', () => b.lease.isLeader(), TTL * 3);
    expect(took).toBeLessThan(TTL / 3 + 500); // its next read, not the TTL
  });
});

describeWith([nats], 'three-server NATS cluster (JetStream replicas 3)', () => {
  const dir = tempDir('orchard-nats-cluster-', 'all');
  const servers: Awaited<ReturnType<typeof testNats>>[] = [];
  const conns: NatsConnection[] = [];
  const leases: KvLeaderLease[] = [];

  afterAll(async () => {
    await Promise.all(leases.map((l) => l.stop()));
    await Promise.all(conns.map((c) => c.close().catch(() => {})));
    await Promise.all(servers.map((s) => s.stop()));
  });

  itWith([nats], 'loses one server without losing KV state, and the lease keeps being renewed', async () => {
    const binary = (nats as { value: string }).value;
    const state = new StateDir(join(dir.path, 'coordinator'));
    const { include } = await natsConfigFiles(state.dir, join(dir.path, 'nats-files'));
    const routePorts = [await freePort(), await freePort(), await freePort()];
    const routes = routePorts.map((p) => `nats-route://127.0.0.1:${p}`);
    servers.push(
      ...(await Promise.all(routePorts.map((port, i) => testNats(binary, { serverName: `n${i}`, cluster: { name: 'orchard-test', port, routes }, include })))),
    );
    const urls = servers.map((s) => s.url);
    const plain = await connect({ servers: urls[0], reconnect: false, timeout: 5000 }).then((c) => c.close().then(() => 'connected'), String);
    expect(plain, 'a client without a cluster certificate got in').not.toBe('connected');
    const tls = natsClientTls(await state.coordinatorCredentials());
    const nc = await connect({ servers: urls, tls });
    conns.push(nc);
    // JetStream elects its meta leader after the routes form; until then stream creation fails.
    let store: KvInstanceStore | undefined;
    const start = performance.now();
    while (!store) {
      store = await KvInstanceStore.open(nc, { clusterId: 'ha-0003', replicas: 3 }).catch((err) => {
        if (performance.now() - start > 30_000) throw err;
        return undefined;
      });
      if (!store) await new Promise((r) => setTimeout(r, 250));
    }
    await store.putInstance(sampleRecord('kept'), 0);
    const views: LeaseView[] = [];
    const lease = await KvLeaderLease.start(nc, { clusterId: 'ha-0003', self: holder('alpha'), ttlMs: CLUSTER_TTL, replicas: 3, onChange: (v) => views.push(v) });
    leases.push(lease);
    await until('alpha leads', () => lease.isLeader(), 10_000);

    // Lose the server this connection is on (the client reconnects to another one).
    const port = nc.getServer().split(':').at(-1);
    const onPort = servers.findIndex((s) => s.url.endsWith(`:${port}`));
    expect(onPort).toBeGreaterThanOrEqual(0);
    await servers[onPort]!.stop();
    servers.splice(onPort, 1);

    await new Promise((r) => setTimeout(r, CLUSTER_TTL * 3));
    // Nobody else contends, so alpha leads throughout unless NATS lost the key or stopped
    // answering for longer than a term; either would show as a step down here.
    expect(views).toEqual([{ role: 'standby', leader: null }, { role: 'leader' }]);
    const nc2 = await connect({ servers: servers.map((s) => s.url), tls });
    conns.push(nc2);
    const again = await KvInstanceStore.open(nc2, { clusterId: 'ha-0003', replicas: 3 });
    // Listing the bucket makes a consumer, which waits for the cluster to settle after the loss
    // (a meta leader election on 2.9, slow on a loaded machine): the state must be there once it has.
    let kept: unknown;
    const settle = performance.now();
    while (kept === undefined) {
      kept = await again.instances().then(
        (list) => list.map((v) => v.value),
        (err: unknown) => {
          if (performance.now() - settle > 30_000) throw err;
          return undefined;
        },
      );
    }
    expect(kept).toEqual([sampleRecord('kept')]);
    // Still renewed: a second contender on the surviving servers sees alpha and does not take over.
    const b = await KvLeaderLease.start(nc2, { clusterId: 'ha-0003', self: holder('bravo'), ttlMs: CLUSTER_TTL, replicas: 3 });
    leases.push(b);
    await new Promise((r) => setTimeout(r, CLUSTER_TTL * 2));
    expect(b.view()).toEqual({ role: 'standby', leader: holder('alpha') });
    expect(lease.isLeader()).toBe(true);
  }, 120_000);
});
