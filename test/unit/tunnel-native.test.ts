import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { type Server, connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it, vi } from 'vitest';
import { EnginePorts } from '../../src/node/tunnel/engine-ports.ts';
import { type TunnelForwarder, TunnelRefused, dialTunnel } from '../../src/node/tunnel/forwarder.ts';
import { startTunnelListener } from '../../src/node/tunnel/listener.ts';
import { TUNNEL_RELAY_SOURCE, findTunnelRelay, startNativeForwarder, tunnelRelayPath } from '../../src/node/tunnel/native-forwarder.ts';
import { startNativeListener } from '../../src/node/tunnel/native-listener.ts';
import { encodeRequest } from '../../src/node/tunnel/preamble.ts';
import { type ClusterCa, createClusterCa, createKeyAndCsr, issueCertificate } from '../../src/shared/pki/certificates.ts';
import type { Role } from '../../src/shared/pki/identity.ts';
import type { NodeCredentials } from '../../src/shared/pki/store.ts';
import { describeWith, program } from '../helpers/needs.ts';

/**
 * The native head side of a tunnel (native/tunnel-relay, Go) against the agents' Node listener:
 * the same bytes, counters, identity checks, revocation and pending-engine wait as the Node
 * forwarder (test/unit/tunnel.test.ts), and its key never on a command line.
 */
vi.setConfig({ testTimeout: 30_000, hookTimeout: 120_000 });

async function credentials(ca: ClusterCa, id: string, role: Role): Promise<NodeCredentials> {
  const { keyPem, csrPem } = await createKeyAndCsr(id);
  return { keyPem, certPem: (await issueCertificate(ca, csrPem, { role })).certPem, caCertPem: ca.certPem };
}

/** Echoes every byte; on the peer's FIN sends BYE and ends. */
async function echoEngine(socket?: string): Promise<{ server: Server; port: number; accepted: () => number }> {
  let accepted = 0;
  const server = createServer({ allowHalfOpen: true }, (s) => {
    accepted += 1;
    s.pipe(s, { end: false });
    s.on('end', () => s.end('BYE'));
    s.on('error', () => {});
  });
  if (socket !== undefined) {
    // an rpc-server on its Unix socket: the port is only its identity (unbound)
    await new Promise<void>((r) => server.listen(socket, () => r()));
    return { server, port: 20_000 + Math.floor(Math.random() * 10_000), accepted: () => accepted };
  }
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { server, port: (server.address() as { port: number }).port, accepted: () => accepted };
}

function exchange(to: number | string, payload: Buffer): Promise<Buffer> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const s = typeof to === 'string' ? connect({ path: to, allowHalfOpen: true }) : connect({ port: to, host: '127.0.0.1', allowHalfOpen: true });
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('error', () => resolve(Buffer.concat(chunks)));
    s.on('close', () => resolve(Buffer.concat(chunks)));
    s.end(payload);
  });
}

let ca: ClusterCa;
let head: NodeCredentials;
let worker: NodeCredentials;
let dir: string;
let binary: string;
const cleanup: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  ca = await createClusterCa('cluster-n');
  [head, worker] = [await credentials(ca, 'head-1', 'node'), await credentials(ca, 'worker-1', 'node')];
  dir = await mkdtemp(join(tmpdir(), 'orchard-relay-'));
  binary = join(dir, 'orchard-tunnel-relay');
  execFileSync('go', ['build', '-o', binary, '.'], { cwd: TUNNEL_RELAY_SOURCE, env: { ...process.env, CGO_ENABLED: '0' } });
});
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});
afterAll(() => rm(dir, { recursive: true, force: true }));

async function setup(o: { revoked?: string[]; workerCreds?: NodeCredentials; expectId?: string; register?: boolean } = {}) {
  const engine = await echoEngine();
  cleanup.push(() => new Promise((r) => engine.server.close(r)));
  const enginePorts = new EnginePorts();
  if (o.register !== false) enginePorts.register(engine.port, 'rpc-server');
  const refused: string[] = [];
  const listener = await startTunnelListener({
    host: '127.0.0.1',
    port: 0,
    credentials: o.workerCreds ?? worker,
    enginePorts,
    isRevoked: (p) => (o.revoked ?? []).includes(p.id),
    onRefused: (reason) => refused.push(reason),
  });
  cleanup.push(() => listener.close());
  const errors: string[] = [];
  const forwarder = async (waitForEngineMs = 0): Promise<TunnelForwarder> => {
    const remote = { host: '127.0.0.1', port: listener.port };
    const f = await startNativeForwarder(binary, { remote, enginePort: engine.port, expectPeer: { id: o.expectId ?? 'worker-1' }, credentials: head, waitForEngineMs, onError: (m) => errors.push(m) });
    cleanup.push(() => f.close());
    return f;
  };
  return { engine, enginePorts, listener, forwarder, refused, errors };
}

describeWith([program('go', ['version'])], 'native tunnel forwarder (Go) → the agents’ Node listener', () => {
  it('Unix legs: the forwarder listens on a socket (removed at close), the Node listener dials the engine at its registered socket', async () => {
    const socket = join(dir, 'rpc-echo.sock');
    const engine = await echoEngine(socket);
    cleanup.push(() => new Promise((r) => engine.server.close(r)));
    const enginePorts = new EnginePorts();
    enginePorts.register(engine.port, 'rpc-server', socket);
    const listener = await startTunnelListener({ host: '127.0.0.1', port: 0, credentials: worker, enginePorts, isRevoked: () => false });
    cleanup.push(() => listener.close());
    const localSocket = join(dir, 'fwd-test.sock');
    const f = await startNativeForwarder(binary, { remote: { host: '127.0.0.1', port: listener.port }, enginePort: engine.port, expectPeer: { id: 'worker-1' }, credentials: head, localSocket });
    expect(f).toMatchObject({ port: 0, socket: localSocket });
    const payload = randomBytes(3 * 2 ** 20 + 7);
    const data = await exchange(localSocket, payload);
    expect(data.subarray(0, payload.length).equals(payload)).toBe(true);
    expect(data.subarray(payload.length).toString()).toBe('BYE');
    expect(engine.accepted()).toBe(1);
    expect(listener.stats()).toEqual([{ peer: 'head-1', enginePort: engine.port, toEngine: payload.length, fromEngine: payload.length + 3, connections: 1 }]);
    await f.close();
    expect(existsSync(localSocket)).toBe(false);
  });

  it('carries a large random payload exactly both ways, with half-close and exact counters on both ends', async () => {
    const t = await setup();
    const f = await t.forwarder();
    const payload = randomBytes(24 * 2 ** 20 + 13);
    const data = await exchange(f.port, payload);
    expect(data.length).toBe(payload.length + 3);
    expect(data.subarray(0, payload.length).equals(payload)).toBe(true);
    expect(data.subarray(payload.length).toString()).toBe('BYE');
    await vi.waitFor(() => expect(f.bytes).toEqual({ toEngine: payload.length, fromEngine: payload.length + 3 }), { timeout: 2000 });
    expect(t.listener.stats()).toEqual([{ peer: 'head-1', enginePort: t.engine.port, toEngine: payload.length, fromEngine: payload.length + 3, connections: 1 }]);
  });

  it('resumes TLS sessions across connections, counts them together, and a revoked head is refused on a resumed session', async () => {
    const revoked: string[] = [];
    const t = await setup({ revoked });
    const f = await t.forwarder();
    for (const n of [10, 20, 30]) expect((await exchange(f.port, randomBytes(n))).length).toBe(n + 3);
    await vi.waitFor(() => expect(f.connections()).toBe(3), { timeout: 2000 });
    expect(f.resumed()).toBeGreaterThanOrEqual(2);
    revoked.push('head-1');
    expect((await exchange(f.port, Buffer.from('x'))).length).toBe(0);
    expect(t.refused).toEqual(['this identity has been revoked']);
    await vi.waitFor(() => expect(t.errors.join()).toMatch(/revoked/));
    expect(t.engine.accepted()).toBe(3);
  });

  it('refuses a worker that is not the expected node, and one presenting a coordinator certificate', async () => {
    const wrongId = await setup({ expectId: 'worker-2' });
    expect((await exchange((await wrongId.forwarder()).port, Buffer.from('x'))).length).toBe(0);
    await vi.waitFor(() => expect(wrongId.errors.join()).toMatch(/expected node worker-2/));
    expect(wrongId.engine.accepted()).toBe(0);
    const coordinator = await setup({ workerCreds: await credentials(ca, 'worker-1', 'coordinator') });
    expect((await exchange((await coordinator.forwarder()).port, Buffer.from('x'))).length).toBe(0);
    await vi.waitFor(() => expect(coordinator.errors.join()).toMatch(/coordinator worker-1, expected node/));
    expect(coordinator.engine.accepted()).toBe(0);
  });

  it('holds the connection while the engine is not registered yet, then the bytes flow; without a wait it refuses at once', async () => {
    const t = await setup({ register: false });
    expect((await exchange((await t.forwarder()).port, Buffer.from('x'))).length).toBe(0);
    await vi.waitFor(() => expect(t.errors.join()).toMatch(/is not an engine of this node/));
    const f = await t.forwarder(10_000);
    const answer = exchange(f.port, Buffer.from('late'));
    await new Promise((r) => setTimeout(r, 400));
    t.enginePorts.register(t.engine.port, 'rank-1');
    expect((await answer).toString()).toBe('lateBYE');
  });

  it('takes its key on stdin: no key or certificate on its command line; exits when closed', async () => {
    const t = await setup();
    const f = await t.forwarder();
    const pids = execFileSync('pgrep', ['-f', binary], { encoding: 'utf8' }).trim().split('\n').map(Number);
    expect(pids.length).toBe(1);
    const cmdline = readFileSync(`/proc/${pids[0]}/cmdline`, 'utf8');
    expect(cmdline.replaceAll('\0', ' ').trim()).toBe(binary);
    await f.close();
    const alive = (pid: number) => {
      try {
        process.kill(pid, 0);
        return true;
      } catch {
        return false;
      }
    };
    expect(pids.filter(alive)).toEqual([]);
  });
});

describeWith([program('go', ['version'])], 'native tunnel listener (Go): the checks the Node listener makes', () => {
  /** A Go listener with rpc-1's engine port registered, and a Go forwarder in front of it. */
  async function listenWithForwarder() {
    const t = await listen();
    t.enginePorts.register(t.engine.port, 'rpc-1');
    await t.l.settled();
    const f = await startNativeForwarder(binary, { remote: { host: '127.0.0.1', port: t.l.port }, enginePort: t.engine.port, expectPeer: { id: 'worker-1' }, credentials: head, onError: () => {} });
    cleanup.push(() => f.close());
    return { t, f };
  }

  async function listen(o: { revoked?: string[] } = {}) {
    const engine = await echoEngine();
    cleanup.push(() => new Promise((r) => engine.server.close(r)));
    const enginePorts = new EnginePorts();
    const refused: string[] = [];
    const crashes: string[] = [];
    const l = await startNativeListener(binary, {
      host: '127.0.0.1',
      port: 0,
      credentials: worker,
      enginePorts,
      revoked: new Set(o.revoked ?? []),
      onRefused: (reason, peer) => refused.push(`${peer?.id ?? '?'}: ${reason}`),
      onCrash: (m) => crashes.push(m),
    });
    cleanup.push(() => l.close());
    const dial = (credentials: NodeCredentials, port = engine.port) => dialTunnel({ remote: { host: '127.0.0.1', port: l.port }, expectPeer: { id: 'worker-1' }, credentials }, encodeRequest(port));
    const refusal = (credentials: NodeCredentials, port?: number) =>
      dial(credentials, port).then(
        (s) => {
          s.destroy();
          return undefined;
        },
        (err: Error) => err,
      );
    return { engine, enginePorts, l, refused, crashes, dial, refusal };
  }

  it('admits node and coordinator certificates of this cluster to registered engines only; refuses an admin, a foreign cluster, the revoked', async () => {
    const t = await listen({ revoked: ['gone-1'] });
    // not registered yet: a pending refusal (a ring rank about to start), then admitted once registered
    expect(await t.refusal(head)).toMatchObject({ pending: true, message: expect.stringMatching(/is not an engine of this node/) });
    t.enginePorts.register(t.engine.port, 'rpc-1');
    await t.l.settled();
    expect(await t.refusal(head)).toBeUndefined();
    expect(await t.refusal(await credentials(ca, 'coord', 'coordinator'))).toBeUndefined();
    expect(await t.refusal(await credentials(ca, 'op', 'admin'))).toMatchObject({ pending: false, message: expect.stringMatching(/role admin may not open tunnels/) });
    expect(await t.refusal(await credentials(ca, 'gone-1', 'node'))).toMatchObject({ message: expect.stringMatching(/revoked/) });
    const foreign = await createClusterCa('elsewhere');
    expect(await t.refusal(await credentials(foreign, 'head-1', 'node'))).toBeInstanceOf(Error);
    expect(t.engine.accepted()).toBe(2);
    t.enginePorts.unregister(t.engine.port);
    await t.l.settled();
    expect(await t.refusal(head)).toBeInstanceOf(TunnelRefused);
    await vi.waitFor(() => expect(t.refused).toEqual(expect.arrayContaining(['op: role admin may not open tunnels', 'gone-1: this identity has been revoked', '?: TLS handshake failed (no certificate of this cluster)'])));
  });

  it('revoke cuts open sessions and refuses new ones; bytes per peer; a relay that dies is started again on its port with its state', async () => {
    const t = await listen();
    t.enginePorts.register(t.engine.port, 'rpc-1');
    await t.l.settled();
    const s = await t.dial(head);
    // the cut reaches the head as the session's end (it is half-open: 'close' waits for its own end)
    const closed = new Promise<void>((r) => s.once('end', () => r()).once('close', () => r()));
    s.on('error', () => {});
    s.write('hello');
    await new Promise((r) => s.once('data', r).resume());
    await vi.waitFor(() => expect(t.l.stats()).toEqual([{ peer: 'head-1', enginePort: t.engine.port, toEngine: 5, fromEngine: 5, connections: 1 }]), { timeout: 2000 });
    expect(await t.l.revoke('head-1')).toBe(1);
    await closed;
    expect(await t.refusal(head)).toMatchObject({ message: expect.stringMatching(/revoked/) });
    const pid = t.l.pid()!;
    process.kill(pid, 'SIGKILL');
    await vi.waitFor(() => expect(t.l.pid()).not.toBe(pid), { timeout: 5000 });
    expect(t.crashes.join()).toMatch(/exited/);
    await vi.waitFor(async () => expect(await t.refusal(head)).toMatchObject({ message: expect.stringMatching(/revoked/) }), { timeout: 5000 });
    const other = await credentials(ca, 'head-2', 'node');
    expect(await t.refusal(other)).toBeUndefined(); // its registered port survived the restart
    expect(t.l.stats()).toContainEqual({ peer: 'head-1', enginePort: t.engine.port, toEngine: 5, fromEngine: 5, connections: 1 });
  });

  it('dials a registered engine at its Unix socket: registered by command, and again after a restart from its config', async () => {
    const t = await listen();
    const socket = join(dir, 'rpc-unix.sock');
    const engine = await echoEngine(socket);
    cleanup.push(() => new Promise((r) => engine.server.close(r)));
    t.enginePorts.register(engine.port, 'rpc-1', socket);
    await t.l.settled();
    const through = async () => {
      const s = await t.dial(head, engine.port);
      s.end('ping');
      const got: Buffer[] = [];
      for await (const d of s) got.push(d as Buffer);
      return Buffer.concat(got).toString();
    };
    expect(await through()).toBe('pingBYE');
    const pid = t.l.pid()!;
    process.kill(pid, 'SIGKILL');
    await vi.waitFor(() => expect(t.l.pid()).not.toBe(pid), { timeout: 5000 });
    await vi.waitFor(async () => expect(await through()).toBe('pingBYE'), { timeout: 5000 });
    expect(engine.accepted()).toBe(2);
    expect(t.engine.accepted()).toBe(0); // the TCP echo engine on another port was never reached
  });

  it('faces the native forwarder: sessions resume, bytes agree at both ends, a revoked head is refused on a resumed session', async () => {
    const { t, f } = await listenWithForwarder();
    for (const n of [10, 20, 30]) expect((await exchange(f.port, randomBytes(n))).length).toBe(n + 3);
    await vi.waitFor(() => expect(f.connections()).toBe(3), { timeout: 2000 });
    expect(f.resumed()).toBeGreaterThanOrEqual(2);
    await vi.waitFor(() => expect(t.l.stats()).toEqual([{ peer: 'head-1', enginePort: t.engine.port, toEngine: 60, fromEngine: 69, connections: 3 }]), { timeout: 2000 });
    await vi.waitFor(() => expect(f.bytes).toEqual({ toEngine: 60, fromEngine: 69 }), { timeout: 2000 });
    expect(await t.l.revoke('head-1')).toBe(0);
    expect((await exchange(f.port, Buffer.from('x'))).length).toBe(0);
    expect(t.engine.accepted()).toBe(3);
  });

  it('Go at both ends: each message, one byte or many TLS records, crosses whole at once, without waiting for more (records batched per write)', async () => {
    const { f } = await listenWithForwarder();
    const s = connect({ port: f.port, host: '127.0.0.1', noDelay: true });
    s.on('error', () => {});
    let got = Buffer.alloc(0);
    s.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
    });
    let sent = 0;
    // a record holds 16 KiB: one byte, a record and a byte, many records, a batch and a tail
    for (const size of [1, 16 * 1024 + 1, 300_000, 5, 256 * 1024 + 7, 1]) {
      const message = randomBytes(size);
      s.write(message);
      sent += size;
      await vi.waitFor(() => expect(got.length).toBe(sent), { timeout: 2000, interval: 5 });
      expect(got.subarray(sent - size).equals(message)).toBe(true);
    }
    await vi.waitFor(() => expect(f.bytes).toEqual({ toEngine: sent, fromEngine: sent }), { timeout: 2000 });
    s.destroy();
  });

  it('takes its key on stdin, not argv, and exits when closed', async () => {
    const t = await listen();
    const pid = t.l.pid()!;
    expect(readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ').trim()).toBe(binary);
    await t.l.close();
    expect(() => process.kill(pid, 0)).toThrow();
  });
});

it('ORCHARD_TUNNEL_RELAY chooses the relay: `node` is the Node relay, a path is that binary, else the one setup built', () => {
  expect(findTunnelRelay({ ORCHARD_TUNNEL_RELAY: 'node' })).toBeUndefined();
  expect(findTunnelRelay({ ORCHARD_TUNNEL_RELAY: '/opt/relay' })).toBe('/opt/relay');
  expect(findTunnelRelay({ ORCHARD_CACHE_DIR: '/nonexistent-cache' })).toBeUndefined();
  expect(tunnelRelayPath({ ORCHARD_CACHE_DIR: '/c' })).toMatch(/^\/c\/tunnel-relay\/[0-9a-f]{16}\/orchard-tunnel-relay$/);
});
