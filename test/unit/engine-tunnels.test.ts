import { execFileSync } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { type Server, connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { EngineRequestError } from '../../src/node/engine-spec.ts';
import type { EngineExit, EngineInfo, SupervisorEvents } from '../../src/node/supervisor.ts';
import { EngineTunnels, type EngineTunnelsOptions, rpcRoute } from '../../src/node/tunnel/engine-tunnels.ts';
import { TUNNEL_RELAY_SOURCE } from '../../src/node/tunnel/native-forwarder.ts';
import { createLogger } from '../../src/shared/log.ts';
import { type ClusterCa, createClusterCa, createKeyAndCsr, issueCertificate } from '../../src/shared/pki/certificates.ts';
import type { NodeCredentials } from '../../src/shared/pki/store.ts';
import { describeWith, program } from '../helpers/needs.ts';

vi.setConfig({ testTimeout: 20_000, hookTimeout: 20_000 });

const log = createLogger('test', 'silent');

async function nodeCredentials(ca: ClusterCa, id: string): Promise<NodeCredentials> {
  const { keyPem, csrPem } = await createKeyAndCsr(id);
  const { certPem } = await issueCertificate(ca, csrPem, { role: 'node', expectId: id });
  return { keyPem, certPem, caCertPem: ca.certPem };
}

/** An rpc-server stand-in on 127.0.0.1 that echoes. */
async function echo(): Promise<{ server: Server; port: number }> {
  const server = createServer((s) => {
    s.pipe(s);
    s.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { server, port: (server.address() as { port: number }).port };
}

/** One round trip through `port`; the bytes back, or undefined when the connection was cut. */
function roundTrip(to: number | string, payload: Buffer): Promise<Buffer | undefined> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const s = typeof to === 'string' ? connect({ path: to }) : connect({ port: to, host: '127.0.0.1' });
    s.on('data', (d: Buffer) => {
      chunks.push(d);
      if (Buffer.concat(chunks).length >= payload.length) {
        s.end();
        resolve(Buffer.concat(chunks));
      }
    });
    s.on('error', () => resolve(undefined));
    s.on('close', () => resolve(chunks.length > 0 ? Buffer.concat(chunks) : undefined));
    s.write(payload);
  });
}

const info = (engineId: string, kind: EngineInfo['kind'], port: number): EngineInfo => ({ engineId, kind, host: '127.0.0.1', port, pid: 1, model: 'm', startedAtSeconds: 0, argv: [] });
const exit = (engineId: string, kind: EngineInfo['kind'], port: number): EngineExit => ({ engineId, kind, port, exitCode: 0, signal: '', expected: true, lastStderrLines: [] });

let ca: ClusterCa;
let workerCreds: NodeCredentials;
let headCreds: NodeCredentials;
const cleanup: (() => Promise<void> | void)[] = [];

beforeAll(async () => {
  ca = await createClusterCa('tunnels');
  workerCreds = await nodeCredentials(ca, 'worker-1');
  headCreds = await nodeCredentials(ca, 'head-1');
});

afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

describe('rpcRoute (pure)', () => {
  const self = { nodeId: 'head-1', hasCredentials: true };
  const tunnel = { host: '10.0.0.2', port: 7000 };
  it('same node: loopback directly, even when the target names a tunnel', () => {
    expect(rpcRoute({ nodeId: 'head-1', tunnel, enginePort: 5000 }, self)).toEqual({ kind: 'direct', port: 5000 });
  });
  it('another node: through its tunnel, expecting that node', () => {
    expect(rpcRoute({ nodeId: 'worker-1', tunnel, enginePort: 5000 }, self)).toEqual({ kind: 'tunnel', target: { nodeId: 'worker-1', tunnel, enginePort: 5000 } });
  });
  it('another node without a tunnel (no credentials) is refused, never dialled on this loopback', () => {
    expect(() => rpcRoute({ nodeId: 'worker-1', enginePort: 5000 }, self)).toThrow(/worker-1 runs no tunnel listener/);
  });
  it('a head without credentials cannot tunnel', () => {
    expect(() => rpcRoute({ nodeId: 'worker-1', tunnel, enginePort: 5000 }, { nodeId: 'head-1', hasCredentials: false })).toThrow(EngineRequestError);
  });
});

/**
 * Every EngineTunnels behaviour, once per relay an agent may run: Node at both ends (the fallback,
 * ORCHARD_TUNNEL_RELAY=node), native/tunnel-relay at both ends (what `orchard setup` gives), and
 * the native listener facing a Node forwarder (the wire between the two implementations).
 */
function suites(relays: { worker: () => string | undefined; head: () => string | undefined }) {
  const tunnels = (o: Omit<EngineTunnelsOptions, 'relayBinary'>) => new EngineTunnels({ ...o, relayBinary: o.nodeId.startsWith('worker') ? relays.worker() : relays.head() });
  describe('a head and a worker agent', () => {
    async function pair() {
      const workerEngines = new EventEmitter<SupervisorEvents>();
      const worker = tunnels({ nodeId: 'worker-1', credentials: workerCreds, host: '127.0.0.1', port: 0, log });
      worker.follow(workerEngines);
      const head = tunnels({ nodeId: 'head-1', credentials: headCreds, host: '127.0.0.1', port: 0, log });
      await worker.start();
      await head.start();
      cleanup.push(() => worker.close(), () => head.close());
      const engine = await echo();
      cleanup.push(() => new Promise<void>((r) => engine.server.close(() => r())));
      return { worker, head, workerEngines, engine };
    }

    it('forwards a head to a registered rpc-server of the named node; bytes agree on both ends', async () => {
      const { worker, head, workerEngines, engine } = await pair();
      workerEngines.emit('started', info('rpc-1', 'rpc-server', engine.port));
      await worker.settled(); // as StartEngine does before it answers
      const target = { nodeId: 'worker-1', tunnel: { host: '127.0.0.1', port: worker.port! }, enginePort: engine.port };
      const [endpoint] = await head.endpoints('head-engine', [target]);
      expect(endpoint).toMatch(/^127\.0\.0\.1:\d+$/);
      expect(endpoint).not.toBe(`127.0.0.1:${engine.port}`);
      // idempotent per engine id: a StartEngine retry reuses the forwarder
      expect(await head.endpoints('head-engine', [target])).toEqual([endpoint]);
      const payload = Buffer.from('ggml-rpc hello'.repeat(1000));
      expect(await roundTrip(Number(endpoint!.split(':')[1]), payload)).toEqual(payload);
      await vi.waitFor(async () => {
        expect(await head.bytes()).toEqual([{ peer: 'worker-1', sent: payload.length, received: payload.length }]);
        expect(await worker.bytes()).toEqual([{ peer: 'head-1', sent: payload.length, received: payload.length }]);
      });
      // the head engine exits: its forwarder closes, the counted bytes remain
      await head.release('head-engine');
      expect(await roundTrip(Number(endpoint!.split(':')[1]), payload)).toBeUndefined();
      expect(await head.bytes()).toEqual([{ peer: 'worker-1', sent: payload.length, received: payload.length }]);
    });

    it('Unix legs: a head with a socket dir gets unix: endpoints — its own rpc-server socket, a forwarder socket there — and the worker dials the registered socket', async () => {
      const dirs = await mkdtemp(join(tmpdir(), 'orchard-tunnel-sock-'));
      cleanup.push(() => rm(dirs, { recursive: true, force: true }));
      const workerEngines = new EventEmitter<SupervisorEvents>();
      const worker = tunnels({ nodeId: 'worker-1', credentials: workerCreds, host: '127.0.0.1', port: 0, socketDir: join(dirs, 'w'), log });
      worker.follow(workerEngines);
      const head = tunnels({ nodeId: 'head-1', credentials: headCreds, host: '127.0.0.1', port: 0, socketDir: join(dirs, 'h'), log });
      await worker.start();
      await head.start();
      cleanup.push(() => worker.close(), () => head.close());
      // the worker's rpc-server stand-in on its socket; its port (unbound) is its identity
      const socket = join(dirs, 'rpc-20001.sock');
      const engine = createServer((c) => c.pipe(c).on('error', () => {}));
      await new Promise<void>((r) => engine.listen(socket, () => r()));
      cleanup.push(() => new Promise<void>((r) => engine.close(() => r())));
      workerEngines.emit('started', { ...info('rpc-1', 'rpc-server', 20001), socket });
      await worker.settled();
      await mkdir(join(dirs, 'h'), { mode: 0o700 });
      const remote = { nodeId: 'worker-1', tunnel: { host: '127.0.0.1', port: worker.port! }, enginePort: 20001 };
      const [viaTunnel, own] = await head.endpoints('head-engine', [remote, { nodeId: 'head-1', enginePort: 20002 }]);
      expect(own).toBe(`unix:${join(dirs, 'h', 'rpc-20002.sock')}`);
      expect(viaTunnel).toMatch(new RegExp(`^unix:${join(dirs, 'h')}/fwd-[0-9a-f]{8}\\.sock$`));
      const payload = Buffer.from('ggml-rpc over sockets'.repeat(500));
      expect(await roundTrip(viaTunnel!.slice('unix:'.length), payload)).toEqual(payload);
      await head.release('head-engine');
      expect(existsSync(viaTunnel!.slice('unix:'.length))).toBe(false);
      // an MLX ring rank stays on TCP even with a socket dir (MLX needs host:port)
      const ring = await head.ringEndpoints('rank-0', 0, [{ nodeId: 'head-1', enginePort: 20003 }, remote]);
      expect(ring[0]).toBe('127.0.0.1:20003');
      expect(ring[1]).toMatch(/^127\.0\.0\.1:\d+$/);
    });

    it('refuses an engine port the worker did not register, or one that exited', async () => {
      const { worker, head, workerEngines, engine } = await pair();
      const target = { nodeId: 'worker-1', tunnel: { host: '127.0.0.1', port: worker.port! }, enginePort: engine.port };
      const [never] = await head.endpoints('h1', [target]);
      expect(await roundTrip(Number(never!.split(':')[1]), Buffer.from('x'))).toBeUndefined();
      workerEngines.emit('started', info('rpc-1', 'rpc-server', engine.port));
      workerEngines.emit('exited', exit('rpc-1', 'rpc-server', engine.port));
      const [gone] = await head.endpoints('h2', [target]);
      expect(await roundTrip(Number(gone!.split(':')[1]), Buffer.from('x'))).toBeUndefined();
      // a llama-server is never reachable through the tunnel
      workerEngines.emit('started', info('head-x', 'llama-server', engine.port));
      const [llama] = await head.endpoints('h3', [target]);
      expect(await roundTrip(Number(llama!.split(':')[1]), Buffer.from('x'))).toBeUndefined();
    });

    it('the worker must be the node the target names', async () => {
      const { worker, head, workerEngines, engine } = await pair();
      workerEngines.emit('started', info('rpc-1', 'rpc-server', engine.port));
      await worker.settled();
      const [ep] = await head.endpoints('h', [{ nodeId: 'worker-2', tunnel: { host: '127.0.0.1', port: worker.port! }, enginePort: engine.port }]);
      expect(await roundTrip(Number(ep!.split(':')[1]), Buffer.from('x'))).toBeUndefined();
    });

    it('disconnect(peer) cuts live sessions only; revoke(peer) cuts them and refuses new ones', async () => {
      const { worker, head, workerEngines, engine } = await pair();
      workerEngines.emit('started', info('rpc-1', 'rpc-server', engine.port));
      await worker.settled();
      const [ep] = await head.endpoints('h', [{ nodeId: 'worker-1', tunnel: { host: '127.0.0.1', port: worker.port! }, enginePort: engine.port }]);
      const port = Number(ep!.split(':')[1]);
      const session = async () => {
        const live = connect({ port, host: '127.0.0.1' });
        const closed = new Promise<void>((r) => live.on('close', () => r()));
        live.on('error', () => {});
        live.write('x');
        await new Promise<void>((r) => live.once('data', () => r()));
        return { closed };
      };
      const first = await session();
      expect(await worker.disconnect('head-1')).toBe(1);
      await first.closed;
      const second = await session(); // a disconnect refuses nothing
      expect(await worker.revoke('head-1')).toBe(1);
      await second.closed;
      expect(await roundTrip(port, Buffer.from('y'))).toBeUndefined();
      expect(await worker.disconnect('head-1')).toBe(0);
    });

    it('a node without credentials runs no listener, reaches its own engines only, and reaches no other node', async () => {
      const plain = new EngineTunnels({ nodeId: 'n', credentials: undefined, host: '127.0.0.1', port: 0, log });
      expect(await plain.start()).toBeUndefined();
      expect(await plain.endpoints('h', [{ nodeId: 'n', enginePort: 1234 }])).toEqual(['127.0.0.1:1234']);
      await expect(plain.endpoints('h1', [{ nodeId: 'other', enginePort: 1234 }])).rejects.toThrow(/no cluster credentials/);
      await expect(plain.endpoints('h2', [{ nodeId: 'other', tunnel: { host: '10.0.0.2', port: 1 }, enginePort: 1 }])).rejects.toThrow(/no cluster credentials/);
    });
  });

  describe('MLX ring ranks', () => {
    it('a rank registers its own ring port, reaches same-node ranks directly and other nodes through a forwarder; release closes the door', async () => {
      const worker = tunnels({ nodeId: 'worker-1', credentials: workerCreds, host: '127.0.0.1', port: 0, log });
      // a short wait for a rank that is not listening yet, so the "gone" case below ends quickly
      const head = tunnels({ nodeId: 'head-1', credentials: headCreds, host: '127.0.0.1', port: 0, ringWaitMs: 2000, log });
      await worker.start();
      await head.start();
      cleanup.push(() => worker.close(), () => head.close());
      const rank1 = await echo(); // rank 1's ring socket on worker-1
      cleanup.push(() => new Promise<void>((r) => rank1.server.close(() => r())));
      // rank 0 on head-1, ranks 1 and 2 on worker-1
      const ring = [
        { nodeId: 'head-1', tunnel: { host: '127.0.0.1', port: head.port! }, enginePort: 41000 },
        { nodeId: 'worker-1', tunnel: { host: '127.0.0.1', port: worker.port! }, enginePort: rank1.port },
        { nodeId: 'worker-1', tunnel: { host: '127.0.0.1', port: worker.port! }, enginePort: 41002 },
      ];
      const r0 = await head.ringEndpoints('r0', 0, ring);
      expect(r0[0]).toBe('127.0.0.1:41000');
      const toRank1 = Number(r0[1]!.split(':')[1]);
      expect(toRank1).not.toBe(rank1.port);
      // rank 0 dials before rank 1's agent registered its port: the forwarder holds the connection
      // and dials again until rank 1 is there (ranks of one ring start in parallel)
      const early = roundTrip(toRank1, Buffer.from('early'));
      await new Promise((r) => setTimeout(r, 300));

      const r1 = await worker.ringEndpoints('r1', 1, ring);
      expect(r1[1]).toBe(`127.0.0.1:${rank1.port}`); // its own bind address
      expect(r1[2]).toBe('127.0.0.1:41002'); // same node: direct
      expect(r1[0]).toMatch(/^127\.0\.0\.1:\d+$/); // head-1: a forwarder
      expect(r1[0]).not.toBe('127.0.0.1:41000');
      expect(await worker.ringEndpoints('r1', 1, ring)).toEqual(r1); // idempotent (the "wait for ready" repeat)
      expect(await early).toEqual(Buffer.from('early'));
      const payload = Buffer.from('ring all_gather'.repeat(500));
      expect(await roundTrip(toRank1, payload)).toEqual(payload);
      await vi.waitFor(async () => {
        const n = payload.length + 'early'.length;
        expect(await head.bytes()).toEqual([{ peer: 'worker-1', sent: n, received: n }]);
        expect(await worker.bytes()).toEqual([{ peer: 'head-1', sent: n, received: n }]);
      });

      // another engine cannot claim rank 1's port; a rank must run on the node its entry names
      await expect(worker.ringEndpoints('other', 1, ring)).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
      await expect(worker.ringEndpoints('r0-here', 0, ring)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/names node head-1/) });

      // the rank is gone: its port is no engine of worker-1 any more, and the wait for it is bounded
      await worker.release('r1');
      const t0 = Date.now();
      expect(await roundTrip(toRank1, Buffer.from('x'))).toBeUndefined();
      expect(Date.now() - t0).toBeGreaterThanOrEqual(1000);
      expect(Date.now() - t0).toBeLessThan(5000);
    });
  });

  describe('link probes over the tunnel', () => {
    it('measures round trip and throughput to a peer through its listener, reaching no engine; a wrong peer id is an error result', async () => {
      const worker = tunnels({ nodeId: 'worker-1', credentials: workerCreds, host: '127.0.0.1', port: 0, log });
      const head = tunnels({ nodeId: 'head-1', credentials: headCreds, host: '127.0.0.1', port: 0, log });
      await worker.start();
      cleanup.push(() => worker.close(), () => head.close());
      const tunnel = { host: '127.0.0.1', port: worker.port! };
      const results = await head.measureLinks([
        { nodeId: 'worker-1', tunnel },
        { nodeId: 'head-1', tunnel }, // itself: skipped
        { nodeId: 'someone-else', tunnel }, // the listener's certificate names worker-1
      ]);
      expect(results.map((r) => r.peer)).toEqual(['worker-1', 'someone-else']);
      const [good, wrong] = results;
      if (!good || !('sample' in good)) throw new Error(`probe failed: ${JSON.stringify(good)}`);
      // loopback TLS on a busy 2-core machine: well under 50 ms, and at least 10 MB/s
      expect(good.sample.rttSeconds).toBeGreaterThan(0);
      expect(good.sample.rttSeconds).toBeLessThan(0.05);
      expect(good.sample.bytesPerSecond).toBeGreaterThan(10e6);
      expect(wrong).toMatchObject({ error: expect.stringContaining('expected someone-else') });
      expect(head.links().map((l) => l.peer)).toEqual(['worker-1']);
      // a probe is no engine session: nothing counted as engine bytes on either side
      expect(await worker.bytes()).toEqual([]);
    });
  });
}

describe('EngineTunnels with the Node relays', () => suites({ worker: () => undefined, head: () => undefined }));

describeWith([program('go', ['version'])], 'EngineTunnels with the native relay (Go)', () => {
  let dir: string;
  let binary: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'orchard-relay-'));
    binary = join(dir, 'orchard-tunnel-relay');
    execFileSync('go', ['build', '-o', binary, '.'], { cwd: TUNNEL_RELAY_SOURCE, env: { ...process.env, CGO_ENABLED: '0' } });
  }, 120_000);
  afterAll(() => rm(dir, { recursive: true, force: true }));
  describe('at both ends', () => suites({ worker: () => binary, head: () => binary }));
  describe('listener, facing a Node forwarder', () => suites({ worker: () => binary, head: () => undefined }));
});

describe('link probes without credentials', () => {
  it('needs credentials: a node that has not joined has no tunnel to measure', () => {
    const bare = new EngineTunnels({ nodeId: 'n', credentials: undefined, host: '127.0.0.1', port: 0, log });
    expect(() => bare.measureLinks([])).toThrow(EngineRequestError);
  });
});
