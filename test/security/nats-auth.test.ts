import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Kvm } from '@nats-io/kv';
import { connect, type NatsConnection, type NodeConnectionOptions } from '@nats-io/transport-node';
import { afterAll, beforeAll, describe, expect } from 'vitest';
import { natsAuthorization, writeNatsServerTls } from '../../src/coordinator/nats/auth.ts';
import { type LocalNats, startLocalNats } from '../../src/coordinator/nats/server.ts';
import { bucketName } from '../../src/coordinator/state/kv-instance-store.ts';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { agentEventSubject, eventsPrefix, parseEvent } from '../../src/shared/events.ts';
import type { ClusterCa } from '../../src/shared/pki/certificates.ts';
import type { TlsCredentials } from '../../src/shared/pki/grpc-tls.ts';
import { natsClientTls } from '../../src/shared/pki/nats-tls.ts';
import { clientCredentials, testCa } from '../helpers/cluster-pki.ts';
import { joinToken } from '../helpers/join.ts';
import { natsConfigFiles, testNats } from '../helpers/nats.ts';
import { describeWith, itWith, natsServer } from '../helpers/needs.ts';
import { killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * NATS credentials from the cluster CA, on a real nats-server (Debian's 2.9 in CI:
 * ORCHARD_NATS_SERVER=/usr/sbin/nats-server). The server the coordinator starts requires a client
 * certificate from the cluster CA and maps it to a user by its orchard:// identity; a node may
 * publish only on orchard.<c>.agent.<its id>.> and subscribe to nothing. First the server alone
 * (configured by the coordinator's own code), then a coordinator and a joined agent started as
 * users start them: the agent publishes its own health with its node certificate.
 */

const nats = natsServer();
const CLUSTER = 'nats-auth-cluster';

/** A connection attempt's outcome: the error text, or the open connection. */
async function attempt(server: LocalNats, tls: NodeConnectionOptions['tls']): Promise<NatsConnection | string> {
  try {
    return await connect({ servers: server.url, tls, reconnect: false, timeout: 5000 });
  } catch (err) {
    return String(err);
  }
}

/** Wait until every text appears among what the server reported (bounded). */
async function reported(seen: string[], texts: string[]): Promise<string> {
  const deadline = Date.now() + 5000;
  while (!texts.every((t) => seen.join('\n').includes(t)) && Date.now() < deadline) await sleep(50);
  return seen.join('\n');
}

/** Every asynchronous error the server reports on this connection (permission violations). */
function violations(nc: NatsConnection): string[] {
  const seen: string[] = [];
  void (async () => {
    for await (const s of nc.status()) if (s.type === 'error') seen.push(String((s as { error?: unknown }).error));
  })();
  return seen;
}

/** A suite's connections as cluster identities (each must get in), closed after the suite. */
function connectionsAs(server: () => LocalNats): (creds: TlsCredentials) => Promise<NatsConnection> {
  const open: NatsConnection[] = [];
  afterAll(async () => {
    await Promise.all(open.map((nc) => nc.close().catch(() => {})));
  });
  return async (creds) => {
    const nc = await attempt(server(), natsClientTls(creds));
    if (typeof nc === 'string') throw new Error(nc);
    open.push(nc);
    return nc;
  };
}

describeWith([nats], 'NATS: client certificates from the cluster CA, per-identity permissions', () => {
  let dir = '';
  let server: LocalNats;
  let ca: ClusterCa;
  let coordinator: TlsCredentials;
  let nodeA: TlsCredentials;
  let nodeB: TlsCredentials;
  const as = connectionsAs(() => server);

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'orchard-nats-auth-'));
    ca = await testCa(CLUSTER);
    [coordinator, nodeA, nodeB] = await Promise.all([clientCredentials(ca, 'coordinator', 'coordinator'), clientCredentials(ca, 'node', 'node-a'), clientCredentials(ca, 'node', 'node-b')]);
    const tls = await writeNatsServerTls(join(dir, 'nats', 'tls'), ca);
    server = await startLocalNats({ stateDir: dir, binary: (nats as { value: string }).value, auth: { tls, authorization: natsAuthorization(CLUSTER, ['node-a', 'node-b']) } });
  });
  afterAll(async () => {
    await server?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  itWith([nats], 'an outsider is refused: no client certificate, plaintext, another CA’s certificate, or a member the server has not admitted', async () => {
    const trustOnly = { ca: ca.certPem, checkServerIdentity: () => undefined };
    expect(await attempt(server, trustOnly)).toMatch(/certificate|handshake|ECONNRESET|closed/i);
    expect(await attempt(server, null)).toMatch(/certificate|TLS|self-signed|closed/i);
    const foreign = await clientCredentials(await testCa('other-cluster'), 'coordinator', 'coordinator');
    expect(await attempt(server, { ...natsClientTls(foreign), ca: ca.certPem })).toMatch(/certificate|handshake|closed/i);
    // A real member of this cluster, but not in the server's user list (joined after the last reload, or revoked).
    const stranger = await clientCredentials(ca, 'node', 'node-c');
    expect(await attempt(server, natsClientTls(stranger))).toMatch(/Authorization Violation/);
  });

  itWith([nats], 'a node publishes on its own subject; as another node, or as the coordinator, it is refused and nothing arrives', async () => {
    const watcher = await as(coordinator);
    const seen: string[] = [];
    watcher.subscribe(`${eventsPrefix(CLUSTER)}.>`, {
      callback: (_e, m) => {
        seen.push(m.subject);
      },
    });
    await watcher.flush();
    const a = await as(nodeA);
    const refused = violations(a);
    const own = agentEventSubject(CLUSTER, { kind: 'node.health', nodeId: 'node-a', engines: 0, availableBytes: 1, memoryPressure: 'normal', thermalState: 'nominal' });
    const asB = agentEventSubject(CLUSTER, { kind: 'node.health', nodeId: 'node-b', engines: 0, availableBytes: 1, memoryPressure: 'normal', thermalState: 'nominal' });
    const coordinatorSubject = `${eventsPrefix(CLUSTER)}.node.node-b.down`;
    for (const s of [asB, coordinatorSubject, own]) a.publish(s, '{}');
    await a.flush();
    const texts = [`Permissions Violation for Publish to "${asB}"`, `Permissions Violation for Publish to "${coordinatorSubject}"`];
    const all = await reported(refused, texts);
    for (const t of texts) expect(all).toContain(t);
    await watcher.flush();
    await sleep(300);
    expect(seen).toEqual([own]);
  });

  itWith([nats], 'a node cannot read the instances or leader bucket, nor listen to others’ replies; the coordinator can', async () => {
    const c = await as(coordinator);
    const kvm = new Kvm(c);
    for (const what of ['instances', 'leader'] as const) {
      const kv = await kvm.create(bucketName(CLUSTER, what));
      await kv.put('k', 'secret plan');
      expect((await kv.get('k'))?.string()).toBe('secret plan');
    }
    const a = await as(nodeA);
    const refused = violations(a);
    for (const what of ['instances', 'leader'] as const) {
      const read = new Kvm(a).open(bucketName(CLUSTER, what)).then((kv) => kv.get('k'));
      await expect(read, what).rejects.toThrow(/permission|denied|violation|timeout/i);
    }
    a.subscribe(`$KV.${bucketName(CLUSTER, 'instances')}.>`);
    a.subscribe('_INBOX.>');
    await a.flush();
    const texts = [`Permissions Violation for Subscription to "$KV.${bucketName(CLUSTER, 'instances')}.>"`, 'Permissions Violation for Subscription to "_INBOX.>"'];
    const all = await reported(refused, texts);
    for (const t of texts) expect(all).toContain(t);
  });

  itWith([nats], 'a node taken off the list (revoked) is disconnected by the reload and refused afterwards', async () => {
    const b = await as(nodeB);
    const closed = b.closed();
    await server.reload(natsAuthorization(CLUSTER, ['node-a']));
    const why = await Promise.race([closed.then((e) => String(e ?? 'closed')), sleep(5000).then(() => 'still open')]);
    expect(why).not.toBe('still open');
    expect(await attempt(server, natsClientTls(nodeB))).toMatch(/Authorization Violation/);
  });
});

describe('NATS credentials end to end', () => {
  const dir = tempDir('orchard-nats-auth-e2e-', 'all');
  const procs: Proc[] = [];
  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
  });

  itWith([nats], 'the coordinator’s local nats-server admits a joined agent, which publishes its own health with its node certificate; an outsider is refused', async () => {
    const stateDir = join(dir.path, 'coord');
    const env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_COORDINATOR_STATE_DIR: stateDir, ORCHARD_NATS_SERVER: (nats as { value: string }).value };
    const coord = spawnProc('coordinator', [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', stateDir, '--json'], env);
    procs.push(coord);
    const ready = await readyLine(coord);
    const url = String((ready.stateStore as { location: string }).location);
    const clusterId = String(ready.clusterId);
    const outsider = await connect({ servers: url, reconnect: false, timeout: 5000 }).then(
      (nc) => nc.close().then(() => 'connected'),
      (err: unknown) => String(err),
    );
    expect(outsider).not.toBe('connected');
    // The CLI's identity on the coordinator's machine: the coordinator's own role, from the state dir's CA.
    const watcher = await connect({ servers: url, tls: natsClientTls(await new StateDir(stateDir).coordinatorCredentials()), timeout: 5000 });
    const health: { subject: string; source: string; nodeId: string }[] = [];
    watcher.subscribe(`${eventsPrefix(clusterId)}.agent.>`, {
      callback: (_e, m) => {
        const e = parseEvent(m.string());
        if (e?.kind === 'node.health') health.push({ subject: m.subject, source: `${e.source.role}/${e.source.id}`, nodeId: e.nodeId });
      },
    });
    const agent = spawnProc(
      'node alpha',
      [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', 'alpha', '--state-dir', join(dir.path, 'alpha'), '--json', '--join', `127.0.0.1:${String(ready.grpcPort)}`],
      { ...env, ORCHARD_NODE_TOKEN: await joinToken(stateDir, 1) },
    );
    procs.push(agent);
    const nodeId = String((await readyLine(agent)).nodeId);
    const deadline = Date.now() + 30_000;
    while (health.length === 0 && Date.now() < deadline) await sleep(200);
    await watcher.close();
    expect(health[0]).toEqual({ subject: `${eventsPrefix(clusterId)}.agent.${nodeId}.node.health`, source: `agent/${nodeId}`, nodeId });
    // orchard events on the coordinator's machine reads the stream as the admin identity.
    const events = await orchard(['events', '--json', '--since', '10m', '--coordinator', `127.0.0.1:${String(ready.grpcPort)}`], env);
    expect(events.code, events.stderr).toBe(0);
    expect(events.stdout).toContain(`"subject":"${eventsPrefix(clusterId)}.node.${nodeId}.up"`);
    // What the server was told: the node is a user, with its own subject and nothing else.
    const users = await readFile(join(stateDir, 'nats', 'server.conf'), 'utf8');
    expect(users).toContain(`"orchard://node/${nodeId}", permissions: {"publish":{"allow":["${eventsPrefix(clusterId)}.agent.${nodeId}.>"]},"subscribe":{"deny":[">"]}}`);
  }, 120_000);
});

describeWith([nats], 'an external NATS server configured by `orchard coordinator nats-config`: roles, not a per-node list', () => {
  const dir = tempDir('orchard-nats-external-', 'all');
  let server: LocalNats;
  let ca: ClusterCa;
  let state: StateDir;
  const as = connectionsAs(() => server);

  beforeAll(async () => {
    state = new StateDir(join(dir.path, 'coord'));
    ca = (await state.clusterCa()).ca;
    await (await state.revocations()).revoke('node-revoked');
    const out = join(dir.path, 'nats-files');
    const { include, stdout } = await natsConfigFiles(state.dir, out);
    expect(stdout).toBe('');
    for (const f of ['server.key', 'server.crt', 'ca.crt', 'orchard.conf']) expect((await stat(join(out, f))).mode & 0o777, f).toBe(0o600);
    expect(await readFile(include, 'utf8')).not.toContain('PRIVATE KEY');
    server = await testNats((nats as { value: string }).value, { include });
  });
  afterAll(async () => {
    await server?.stop();
  });

  itWith([nats], 'a node certified after the config was written publishes its events; it cannot read the KV; outsiders and revoked nodes get nothing', async () => {
    const trustOnly = { ca: ca.certPem, checkServerIdentity: () => undefined };
    expect(await attempt(server, trustOnly)).toMatch(/certificate|handshake|ECONNRESET|closed/i);
    const c = await as(await state.coordinatorCredentials());
    const kv = await new Kvm(c).create(bucketName(ca.clusterId, 'instances'));
    await kv.put('k', 'secret plan');
    const seen: string[] = [];
    c.subscribe(`${eventsPrefix(ca.clusterId)}.>`, { callback: (_e, m) => void seen.push(m.subject) });
    await c.flush();

    const late = await as(await clientCredentials(ca, 'node', 'node-late'));
    const lateRefused = violations(late);
    const own = `${eventsPrefix(ca.clusterId)}.agent.node-late.node.health`;
    const coordinatorSubject = `${eventsPrefix(ca.clusterId)}.node.node-late.up`;
    late.publish(own, '{}');
    late.publish(coordinatorSubject, '{}');
    await late.flush();
    await expect(new Kvm(late).open(bucketName(ca.clusterId, 'instances')).then((b) => b.get('k'))).rejects.toThrow(/permission|denied|violation|timeout/i);
    expect(await reported(lateRefused, [`Permissions Violation for Publish to "${coordinatorSubject}"`])).toContain(coordinatorSubject);

    const revoked = await as(await clientCredentials(ca, 'node', 'node-revoked'));
    const revokedRefused = violations(revoked);
    const asRevoked = `${eventsPrefix(ca.clusterId)}.agent.node-revoked.node.health`;
    revoked.publish(asRevoked, '{}');
    await revoked.flush();
    expect(await reported(revokedRefused, [`Permissions Violation for Publish to "${asRevoked}"`])).toContain(asRevoked);

    // An operator's bundle under any name is a full user (the role, not the id, is looked up).
    const ops = await as(await clientCredentials(ca, 'admin', 'ops-laptop'));
    expect((await (await new Kvm(ops).open(bucketName(ca.clusterId, 'instances'))).get('k'))?.string()).toBe('secret plan');
    await c.flush();
    await sleep(300);
    expect(seen).toEqual([own]);
  });
});
