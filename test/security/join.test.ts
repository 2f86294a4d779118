import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { connect } from 'node:tls';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { loadOrCreateNodeKey, saveNodeCertificate } from '../../src/shared/pki/store.ts';
import { loadOrCreateIdentity } from '../../src/node/identity.ts';
import { createClusterCa, createKeyAndCsr, issueCertificate } from '../../src/shared/pki/certificates.ts';
import { describeWith, networkNamespaces } from '../helpers/needs.ts';
import { deleteNamespaces, linkNamespaces } from '../helpers/netns.ts';
import { killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * Red team, cluster membership, with real processes: the join token flow end to end (expired
 * and used-up tokens refused with one line), `orchard cluster revoke` (the node is gone within
 * 5 s, its restart is refused, the other agents are sent the list), certificate renewal, and a
 * rogue agent advertising `_orchard._tcp` in a network namespace that records every byte the
 * coordinator sends it. No token, key or private key in any log or `ps` output of the suite.
 */

const execFileP = promisify(execFile);
const dir = tempDir('orchard-join-', 'all');
const procs: Proc[] = [];
/** Every secret the suite handles; none may appear in a log or a process's arguments. */
const secrets = new Set<string>();
const psSeen: string[] = [];

async function snapshotPs(): Promise<void> {
  psSeen.push((await execFileP('ps', ['-eo', 'pid,args'])).stdout);
}

function start(name: string, args: string[], env: NodeJS.ProcessEnv, file = process.execPath): Proc {
  const p = spawnProc(name, args, env, file);
  procs.push(p);
  return p;
}

async function until<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await sleep(100);
  }
}

afterAll(async () => {
  await Promise.all(procs.splice(0).map(killGroup));
});

describe('join with a token, revoke, renew (127.0.0.1)', () => {
  let env: NodeJS.ProcessEnv;
  let coordDir: string;
  let coordAddr: string;
  let coordHttp: string;
  let coordinator: Proc;
  let firstToken: string;
  const nodes = new Map<string, { proc: Proc; nodeId: string }>();

  const status = async () => {
    const r = await orchard(['status', '--json', '--coordinator', coordAddr], env);
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as { nodes: { id: string; name: string; state: string }[] };
  };
  const nodeArgs = (name: string) => [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', name, '--budget', '1GiB', '--state-dir', join(dir.path, name), '--json', '--join', coordAddr, '--renew-check', '1'];

  beforeAll(async () => {
    coordDir = join(dir.path, 'coord');
    env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_COORDINATOR_STATE_DIR: coordDir };
    coordinator = start('coordinator', [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', coordDir, '--json'], env);
    const ready = await readyLine(coordinator);
    coordAddr = `127.0.0.1:${String(ready.grpcPort)}`;
    coordHttp = `http://127.0.0.1:${String(ready.httpPort)}`;
    const t = await orchard(['coordinator', 'token', '--uses', '2', '--ttl', '10m'], env);
    expect(t.code, t.stderr).toBe(0);
    const token = t.stdout.trim();
    firstToken = token;
    secrets.add(token);
    secrets.add(token.split('.')[2]!);
    for (const name of ['alpha', 'bravo']) {
      const proc = start(name, nodeArgs(name), { ...env, ORCHARD_NODE_TOKEN: token });
      nodes.set(name, { proc, nodeId: String((await readyLine(proc)).nodeId) });
      await snapshotPs();
    }
    await until('both nodes up', 30_000, async () => ((await status()).nodes.filter((n) => n.state === 'up').length === 2 ? true : undefined));
    for (const name of ['alpha', 'bravo']) secrets.add((await readFile(join(dir.path, name, 'pki', 'node.key'), 'utf8')).trim());
    secrets.add((await readFile(join(coordDir, 'pki', 'ca.key'), 'utf8')).trim());
    secrets.add((await readFile(join(coordDir, 'admin-key'), 'utf8')).trim());
  }, 120_000);

  it('an expired token and a used-up token are refused with one clear line; nothing is stored', async () => {
    const { token: expired } = await (await new StateDir(coordDir).joinTokens()).create({ ttlMs: 1 });
    secrets.add(expired);
    await sleep(10);
    const tokenFile = join(dir.path, 'expired.token');
    await writeFile(tokenFile, `${expired}\n`, { mode: 0o600 });
    const e = await orchard(['cluster', 'join', coordAddr, '--token-file', tokenFile, '--state-dir', join(dir.path, 'late')], env);
    expect(e.code).toBe(1);
    expect(e.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^orchard: .*join token has expired/)]);
    // The first token had two uses, both spent by alpha and bravo.
    const spent = await orchard(['cluster', 'join', coordAddr, '--state-dir', join(dir.path, 'late')], { ...env, ORCHARD_NODE_TOKEN: firstToken });
    expect(spent.code).toBe(1);
    expect(spent.stderr.trim().split('\n')).toEqual([expect.stringMatching(/join token has no uses left/)]);
    await expect(readFile(join(dir.path, 'late', 'pki', 'node.crt'))).rejects.toThrow();
  });

  it('a revoked node is gone within 5 s, the other agents are sent the list, and it cannot come back', async () => {
    const bravo = nodes.get('bravo')!;
    const alpha = nodes.get('alpha')!;
    const r = await orchard(['cluster', 'revoke', 'bravo', '--json', '--coordinator', coordAddr], env);
    expect(r.code, r.stderr).toBe(0);
    // From the moment the coordinator answered (the CLI's own start-up is not the cluster's time).
    const t0 = Date.now();
    expect(JSON.parse(r.stdout)).toEqual({ nodeId: bravo.nodeId, revoked: true });
    // Watched over HTTP /status (a CLI call costs seconds of start-up on a loaded machine).
    await until('bravo gone from the coordinator', 5000, async () => ((await (await fetch(`${coordHttp}/status`)).text()).includes(bravo.nodeId) ? undefined : true));
    await until('alpha told', 5000 - (Date.now() - t0), async () => (alpha.proc.err.includes('revocation list updated') && alpha.proc.err.includes(bravo.nodeId) ? true : undefined));
    expect(Date.now() - t0).toBeLessThan(5000);
    // bravo, restarted with its certificate, is refused at its announce: one line, exit 1.
    await killGroup(bravo.proc);
    const again = start('bravo again', nodeArgs('bravo'), env);
    await again.exited;
    expect(again.child.exitCode).toBe(1);
    expect(again.err).toMatch(/revoked/);
    expect((await status()).nodes.map((n) => n.name)).toEqual(['alpha']);
  });

  it('a certificate near its end is renewed with itself and served at once (no restart)', async () => {
    // charlie holds a certificate of this cluster that has seconds left (issued here from the CA).
    const charlieDir = join(dir.path, 'charlie');
    const { nodeId } = await loadOrCreateIdentity(charlieDir);
    const { csrPem } = await loadOrCreateNodeKey(charlieDir, nodeId);
    const { ca } = await new StateDir(coordDir).clusterCa();
    const short = await issueCertificate(ca, csrPem, { role: 'node', expectId: nodeId, validityDays: 30 / 86_400 });
    await saveNodeCertificate(charlieDir, short.certPem, ca.certPem);
    const proc = start('charlie', nodeArgs('charlie'), env);
    const ready = await readyLine(proc);
    secrets.add((await readFile(join(charlieDir, 'pki', 'node.key'), 'utf8')).trim());
    const served = await until('a renewed certificate served', 15_000, async () => {
      const c = await servedCertificate(Number(ready.grpcPort));
      return Date.parse(c.validTo) - Date.now() > 20 * 86_400_000 ? c : undefined;
    });
    expect(served.serialNumber).not.toBe(new X509Certificate(short.certPem).serialNumber);
    expect(new X509Certificate(await readFile(join(charlieDir, 'pki', 'node.crt'), 'utf8')).serialNumber).toBe(served.serialNumber);
    await until('charlie up', 10_000, async () => ((await status()).nodes.some((n) => n.name === 'charlie' && n.state === 'up') ? true : undefined));
  });

  it('no token, key or private key in any log or `ps` output of the suite', async () => {
    await snapshotPs();
    const logs = procs.map((p) => `${p.out}\n${p.err}`);
    expect(logs.join('').length).toBeGreaterThan(1000);
    expect(secrets.size).toBeGreaterThanOrEqual(7);
    for (const s of secrets) {
      for (const l of logs) expect(l.includes(s), 'a secret in a log').toBe(false);
      for (const ps of psSeen) expect(ps.includes(s), 'a secret in ps').toBe(false);
    }
    expect(psSeen.join('')).not.toMatch(/orchard1\.[0-9a-f]{12}\./);
  });
});

/** The certificate a TLS server presents (no verification: the test only reads it). */
function servedCertificate(port: number): Promise<X509Certificate> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port, servername: 'orchard', rejectUnauthorized: false, ALPNProtocols: ['h2'] }, () => {
      const raw = s.getPeerCertificate().raw;
      s.destroy();
      resolve(new X509Certificate(raw));
    });
    s.once('error', reject);
  });
}

/*
 * A rogue in its own namespace advertises `_orchard._tcp` twice: a raw TCP listener and a TLS
 * listener with a certificate of another CA, both recording every byte (decrypted, for TLS) they
 * receive. The coordinator in the other namespace dials both (the rogue sees the connections),
 * and the recording holds no token, API key, admin key or bearer header: the coordinator speaks
 * mutual TLS only and stops at the handshake when the peer cannot prove membership.
 */
const netns = networkNamespaces();
const tag = String(process.pid % 10_000);
const NS_COORD = `orj-c-${tag}`;
const NS_ROGUE = `orj-r-${tag}`;
const COORD_IP = '10.79.0.2';
const ROGUE_IP = '10.79.0.3';

const ROGUE_SCRIPT = (root: string, out: string) => `
import { createRequire } from 'node:module';
import { appendFileSync, readFileSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
const require = createRequire(${JSON.stringify(join(root, 'package.json'))});
const { Bonjour } = require('bonjour-service');
const record = (kind) => (sock) => {
  appendFileSync(${JSON.stringify(out)}, JSON.stringify({ kind, event: 'connection' }) + '\\n');
  sock.on('data', (b) => appendFileSync(${JSON.stringify(out)}, JSON.stringify({ kind, hex: b.toString('hex') }) + '\\n'));
  sock.on('error', () => {});
};
const raw = net.createServer(record('raw')).listen(0, ${JSON.stringify(ROGUE_IP)});
const secure = tls.createServer({ key: readFileSync(process.argv[2]), cert: readFileSync(process.argv[3]), requestCert: true, rejectUnauthorized: false }, record('tls')).listen(0, ${JSON.stringify(ROGUE_IP)});
// A TLS connection the client aborts never reaches 'secureConnection': count the TCP accepts too.
secure.on('connection', () => appendFileSync(${JSON.stringify(out)}, JSON.stringify({ kind: 'tls-tcp', event: 'connection' }) + '\\n'));
await Promise.all([raw, secure].map((s) => new Promise((r) => s.once('listening', r))));
const bonjour = new Bonjour({ interface: ${JSON.stringify(ROGUE_IP)}, bind: '0.0.0.0' });
for (const [name, s] of [['rogue-raw', raw], ['rogue-tls', secure]]) {
  bonjour.publish({ name, type: 'orchard', protocol: 'tcp', port: s.address().port, txt: { id: name + '-id', pv: '1', grpc: String(s.address().port) } });
}
process.stdout.write(JSON.stringify({ event: 'ready' }) + '\\n');
`;

describeWith([netns], 'a rogue agent advertising _orchard._tcp in a namespace', () => {
  let created = false;
  // dir.path is set in beforeAll: resolve the path then, not while the suite is declared (it was '' → the repo's cwd)
  const recording = () => join(dir.path, 'rogue.jsonl');

  afterAll(() => {
    if (created) deleteNamespaces(NS_COORD, NS_ROGUE);
  });

  it('is dialled and learns nothing: no token, key or bearer header among the bytes it receives', async () => {
    deleteNamespaces(NS_COORD, NS_ROGUE);
    created = true;
    linkNamespaces({ ns: NS_COORD, veth: `orjc${tag}`, ip: COORD_IP }, { ns: NS_ROGUE, veth: `orjr${tag}`, ip: ROGUE_IP });
    const root = new URL('../..', import.meta.url).pathname;
    const foreign = await createClusterCa('rogue');
    const { keyPem, csrPem } = await createKeyAndCsr('rogue');
    const rogueCert = await issueCertificate(foreign, csrPem, { role: 'node', expectId: 'rogue' });
    await writeFile(join(dir.path, 'rogue.key'), keyPem);
    await writeFile(join(dir.path, 'rogue.crt'), rogueCert.certPem);
    await writeFile(recording(), '');
    await writeFile(join(dir.path, 'rogue.mjs'), ROGUE_SCRIPT(root, recording()));

    const apiKey = `orchard_sk_rogue-test-${tag}-${Date.now()}`;
    const coordDir = join(dir.path, 'coord-ns');
    const token = (await (await new StateDir(coordDir).joinTokens()).create({ uses: 5 })).token;
    const adminKey = await new StateDir(coordDir).localAdminKey();
    const env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_DEBUG: '1', ORCHARD_API_KEY: apiKey };
    const rogue = start('rogue', ['netns', 'exec', NS_ROGUE, process.execPath, join(dir.path, 'rogue.mjs'), join(dir.path, 'rogue.key'), join(dir.path, 'rogue.crt')], env, 'ip');
    await readyLine(rogue, 30_000);
    const coordinator = start('coordinator (ns)', ['netns', 'exec', NS_COORD, process.execPath, ORCHARD_BIN, 'coordinator', '--grpc-port', '0', '--http-port', '0', '--mdns-interface', COORD_IP, '--state-dir', coordDir, '--json'], env, 'ip');
    await readyLine(coordinator);
    await snapshotPs();
    // Both rogue listeners get dialled (mDNS sighting → dial), and re-dialled: wait for two of each.
    let seen = '';
    const lines = await until('the coordinator dials both rogue listeners', 45_000, async () => {
      const l = (await readFile(recording(), 'utf8')).split('\n').filter(Boolean).map((x) => JSON.parse(x) as { kind: string; event?: string; hex?: string });
      const conns = (kind: string) => l.filter((x) => x.kind === kind && x.event === 'connection').length;
      seen = `raw ${conns('raw')}, tls ${conns('tls-tcp')}; ${coordinator.err.split('\n').filter((x) => /mDNS sighting|not reachable/.test(x)).slice(-2).join(' | ').slice(0, 600)}`;
      // the accept is recorded before the first bytes: wait for the raw listener's ClientHello too
      return conns('raw') >= 1 && conns('tls-tcp') >= 1 && l.some((x) => x.kind === 'raw' && x.hex) ? l : undefined;
    }).catch((err: Error) => {
      throw new Error(`${err.message}: ${seen}`);
    });
    const received = Buffer.concat(lines.filter((x) => x.hex).map((x) => Buffer.from(x.hex!, 'hex')));
    expect(received.length).toBeGreaterThan(0); // TLS ClientHellos on the raw listener
    // The TLS listener completes no handshake the coordinator accepts: no application data at all.
    expect(lines.filter((x) => x.kind === 'tls' && x.hex)).toEqual([]);
    const text = received.toString('latin1');
    for (const s of [token, token.split('.')[2]!, apiKey, adminKey]) expect(text.includes(s)).toBe(false);
    expect(text.toLowerCase()).not.toContain('authorization');
    expect(text.toLowerCase()).not.toContain('bearer');
    for (const s of [token, apiKey, adminKey]) {
      expect(coordinator.err.includes(s)).toBe(false);
      for (const ps of psSeen) expect(ps.includes(s)).toBe(false);
    }
  }, 120_000);
});
