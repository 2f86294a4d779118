import { randomBytes } from 'node:crypto';
import { type Server, type Socket, connect, createServer } from 'node:net';
import { PassThrough } from 'node:stream';
import { connect as tlsConnect } from 'node:tls';
import { afterEach, beforeAll, describe, expect, it, vi } from 'vitest';

vi.setConfig({ testTimeout: 20_000, hookTimeout: 20_000 });
import { type ClusterCa, createClusterCa, createKeyAndCsr, issueCertificate } from '../../src/shared/pki/certificates.ts';
import type { Role } from '../../src/shared/pki/identity.ts';
import type { NodeCredentials } from '../../src/shared/pki/store.ts';
import { EnginePorts } from '../../src/node/tunnel/engine-ports.ts';
import { type TunnelForwarder, TunnelRefused, retryWhilePending, startTunnelForwarder } from '../../src/node/tunnel/forwarder.ts';
import { type TunnelListener, startTunnelListener } from '../../src/node/tunnel/listener.ts';
import { MAX_LINE_BYTES, PreambleError, encodeReply, encodeRequest, parseReply, parseRequest, readLine } from '../../src/node/tunnel/preamble.ts';

async function credentials(ca: ClusterCa, id: string, role: Role, trust: ClusterCa = ca): Promise<NodeCredentials> {
  const { keyPem, csrPem } = await createKeyAndCsr(id);
  const { certPem } = await issueCertificate(ca, csrPem, { role });
  return { keyPem, certPem, caCertPem: trust.certPem };
}

/** An engine stand-in: echoes every byte, and on the peer's FIN sends a trailer then ends. */
interface Engine {
  server: Server;
  port: number;
  received: () => number;
  accepted: () => number;
}
async function echoEngine(trailer = 'BYE'): Promise<Engine> {
  let received = 0;
  let accepted = 0;
  const server = createServer({ allowHalfOpen: true }, (s) => {
    accepted += 1;
    s.on('data', (d: Buffer) => {
      received += d.length;
    });
    s.pipe(s, { end: false });
    s.on('end', () => s.end(trailer));
    s.on('error', () => {});
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { server, port: (server.address() as { port: number }).port, received: () => received, accepted: () => accepted };
}

/** Send `payload`, half-close, collect everything until the other side ends. */
function exchange(port: number, payload: Buffer): Promise<{ data: Buffer; error?: Error }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const s = connect({ port, host: '127.0.0.1', allowHalfOpen: true });
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('error', (error) => resolve({ data: Buffer.concat(chunks), error }));
    s.on('close', () => resolve({ data: Buffer.concat(chunks) }));
    s.end(payload);
  });
}

let ca: ClusterCa;
let foreignCa: ClusterCa;
let worker: NodeCredentials;
let head: NodeCredentials;
const cleanup: (() => Promise<void>)[] = [];
beforeAll(async () => {
  ca = await createClusterCa('cluster-t');
  foreignCa = await createClusterCa('cluster-x');
  worker = await credentials(ca, 'worker-1', 'node');
  head = await credentials(ca, 'head-1', 'node');
});
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

async function setup(opts: { revoked?: string[]; headCreds?: NodeCredentials; expectId?: string; workerCreds?: NodeCredentials } = {}) {
  const engine = await echoEngine();
  cleanup.push(() => new Promise((r) => engine.server.close(() => r())));
  const enginePorts = new EnginePorts();
  enginePorts.register(engine.port, 'rpc-server');
  const refused: string[] = [];
  const listener: TunnelListener = await startTunnelListener({
    host: '127.0.0.1',
    port: 0,
    credentials: opts.workerCreds ?? worker,
    enginePorts,
    isRevoked: (p) => (opts.revoked ?? []).includes(p.id),
    onRefused: (reason) => refused.push(reason),
  });
  cleanup.push(() => listener.close());
  const errors: string[] = [];
  const forwarder = async (enginePort = engine.port, creds = opts.headCreds ?? head): Promise<TunnelForwarder> => {
    const f = await startTunnelForwarder({
      remote: { host: '127.0.0.1', port: listener.port },
      enginePort,
      expectPeer: { id: opts.expectId ?? 'worker-1' },
      credentials: creds,
      onError: (m) => errors.push(m),
    });
    cleanup.push(() => f.close());
    return f;
  };
  return { engine, enginePorts, listener, forwarder, refused, errors };
}

describe('TLS tunnel: bytes', () => {
  it('carries a large random payload exactly, both directions, with exact counters and half-close', async () => {
    const t = await setup();
    const f = await t.forwarder();
    const payload = randomBytes(24 * 2 ** 20 + 13);
    const { data, error } = await exchange(f.port, payload);
    expect(error).toBeUndefined();
    expect(data.length).toBe(payload.length + 3);
    expect(data.subarray(0, payload.length).equals(payload)).toBe(true);
    expect(data.subarray(payload.length).toString()).toBe('BYE');
    expect(t.engine.received()).toBe(payload.length);
    expect(f.bytes).toEqual({ toEngine: payload.length, fromEngine: payload.length + 3 });
    expect(t.listener.stats()).toEqual([{ peer: 'head-1', enginePort: t.engine.port, toEngine: payload.length, fromEngine: payload.length + 3, connections: 1 }]);
  });

  it('counts several connections of one tunnel together', async () => {
    const t = await setup();
    const f = await t.forwarder();
    const sizes = [1, 1000, 70_000, 5];
    const results = await Promise.all(sizes.map((n) => exchange(f.port, randomBytes(n))));
    expect(results.map((r) => r.data.length)).toEqual(sizes.map((n) => n + 3));
    const total = sizes.reduce((a, b) => a + b, 0);
    expect(f.bytes).toEqual({ toEngine: total, fromEngine: total + 3 * sizes.length });
    expect(f.connections()).toBe(sizes.length);
    expect(t.listener.stats()[0]).toMatchObject({ connections: sizes.length, toEngine: total });
  });

  it('later connections resume the TLS session, and a resumed session is still checked for revocation', async () => {
    const revoked: string[] = [];
    const t = await setup({ revoked });
    const f = await t.forwarder();
    for (const n of [10, 20, 30]) expect((await exchange(f.port, randomBytes(n))).data.length).toBe(n + 3);
    expect(f.connections()).toBe(3);
    expect(f.resumed()).toBeGreaterThanOrEqual(2);
    revoked.push('head-1');
    expect((await exchange(f.port, Buffer.from('x'))).data.length).toBe(0);
    expect(t.refused).toEqual(['this identity has been revoked']);
    expect(t.engine.accepted()).toBe(3);
  });

  it('an engine that goes away ends the head side too, after what it already sent', async () => {
    const t = await setup();
    const f = await t.forwarder();
    t.engine.server.on('connection', (s: Socket) => setTimeout(() => s.destroy(), 100));
    const s = connect(f.port, '127.0.0.1');
    let got = '';
    s.on('data', (d: Buffer) => {
      got += d.toString();
    });
    s.on('error', () => {});
    s.write('hello');
    await new Promise<void>((r) => s.once('close', () => r()));
    expect(got).toBe('hello');
    await vi.waitFor(() => expect(t.listener.stats()[0]).toMatchObject({ toEngine: 5, fromEngine: 5 }));
  });

  it('a head that disconnects abruptly takes its engine connection down', async () => {
    const t = await setup();
    const f = await t.forwarder();
    const engineSide = new Promise<Socket>((r) => t.engine.server.once('connection', r));
    const s = connect(f.port, '127.0.0.1');
    s.write('x');
    const e = await engineSide;
    const closed = new Promise<void>((r) => e.once('close', () => r()));
    s.resetAndDestroy();
    await closed;
    expect(e.destroyed).toBe(true);
  });
});

describe('TLS tunnel: who gets in', () => {
  it('refuses a client whose certificate comes from another CA; the engine sees nothing', async () => {
    const t = await setup();
    const foreign = await credentials(foreignCa, 'head-1', 'node', ca);
    const f = await t.forwarder(undefined, foreign);
    const { data } = await exchange(f.port, Buffer.from('x'));
    expect(data.length).toBe(0);
    expect(t.engine.accepted()).toBe(0);
    expect(t.refused.join()).toMatch(/handshake/);
    expect(f.bytes).toEqual({ toEngine: 0, fromEngine: 0 });
  });

  it('refuses a TLS client without a certificate, and plain TCP', async () => {
    const t = await setup();
    const noCert = tlsConnect({ host: '127.0.0.1', port: t.listener.port, ca: [ca.certPem], minVersion: 'TLSv1.3', checkServerIdentity: () => undefined });
    const outcome = await new Promise<string>((resolve) => {
      noCert.on('secureConnect', () => noCert.write(encodeRequest(t.engine.port)));
      noCert.on('data', (d: Buffer) => resolve(`data:${d.toString()}`));
      noCert.on('error', (e) => resolve(`error:${e.message}`));
      noCert.on('close', () => resolve('closed'));
    });
    expect(outcome).not.toMatch(/^data/);
    const plain = await exchange(t.listener.port, Buffer.from(encodeRequest(t.engine.port)));
    expect(plain.data.toString()).not.toContain('"ok":true');
    expect(t.engine.accepted()).toBe(0);
  });

  it('refuses a revoked node and an admin certificate of the right cluster', async () => {
    const t = await setup({ revoked: ['head-1'] });
    const revoked = await t.forwarder();
    expect((await exchange(revoked.port, Buffer.from('x'))).data.length).toBe(0);
    const admin = await t.forwarder(undefined, await credentials(ca, 'ops', 'admin'));
    expect((await exchange(admin.port, Buffer.from('x'))).data.length).toBe(0);
    expect(t.engine.accepted()).toBe(0);
    expect(t.refused).toEqual(['this identity has been revoked', 'role admin may not open tunnels']);
    expect(t.errors.join('\n')).toMatch(/refused: this identity has been revoked/);
  });

  it('disconnect(peer) cuts that peer’s open sessions at once, and only its own', async () => {
    const revoked: string[] = [];
    const t = await setup({ revoked });
    const f = await t.forwarder();
    const g = await t.forwarder(undefined, await credentials(ca, 'coord', 'coordinator'));
    const open = (port: number) => {
      const s = connect(port, '127.0.0.1');
      s.on('error', () => {});
      s.resume();
      s.write('x');
      return s;
    };
    const a = open(f.port);
    const b = open(g.port);
    await vi.waitFor(() => expect(t.listener.stats().map((x) => x.fromEngine)).toEqual([1, 1]));
    revoked.push('head-1');
    expect(t.listener.disconnect('head-1')).toBe(1);
    await new Promise<void>((r) => a.once('close', () => r()));
    expect(b.destroyed).toBe(false);
    expect(t.listener.disconnect('nobody')).toBe(0);
    b.destroy();
  });

  it('lets the coordinator role through', async () => {
    const t = await setup();
    const f = await t.forwarder(undefined, await credentials(ca, 'coord', 'coordinator'));
    expect((await exchange(f.port, Buffer.from('abc'))).data.toString()).toBe('abcBYE');
  });

  it('forwards only to registered engine ports', async () => {
    const t = await setup();
    const other = await echoEngine();
    cleanup.push(() => new Promise((r) => other.server.close(() => r())));
    const f = await t.forwarder(other.port);
    expect((await exchange(f.port, Buffer.from('x'))).data.length).toBe(0);
    expect(other.accepted()).toBe(0);
    expect(t.refused).toEqual([`port ${other.port} is not an engine of this node`]);
    t.enginePorts.unregister(t.engine.port);
    const g = await t.forwarder();
    expect((await exchange(g.port, Buffer.from('x'))).data.length).toBe(0);
    expect(t.engine.accepted()).toBe(0);
  });

  it('a registered port with no engine behind it is refused, not hung', async () => {
    const t = await setup();
    const gone = await echoEngine();
    await new Promise<void>((r) => gone.server.close(() => r()));
    t.enginePorts.register(gone.port, 'stopped');
    const f = await t.forwarder(gone.port);
    expect((await exchange(f.port, Buffer.from('x'))).data.length).toBe(0);
    expect(t.refused.join()).toMatch(/not accepting/);
  });

  it('the head refuses a worker that is not the expected node', async () => {
    const wrongId = await setup({ expectId: 'worker-2' });
    const f = await wrongId.forwarder();
    expect((await exchange(f.port, Buffer.from('x'))).data.length).toBe(0);
    expect(wrongId.errors.join()).toMatch(/expected worker-2/);
    expect(wrongId.engine.accepted()).toBe(0);
  });

  it('the head refuses a listener presenting a coordinator certificate', async () => {
    const t = await setup({ workerCreds: await credentials(ca, 'worker-1', 'coordinator') });
    const f = await t.forwarder();
    expect((await exchange(f.port, Buffer.from('x'))).data.length).toBe(0);
    expect(t.errors.join()).toMatch(/coordinator, not a node/);
  });

  it('a malformed preamble from a valid peer is answered and closed', async () => {
    const t = await setup();
    const s = tlsConnect({ host: '127.0.0.1', port: t.listener.port, key: head.keyPem, cert: head.certPem, ca: [ca.certPem], checkServerIdentity: () => undefined });
    const reply = await new Promise<string>((resolve) => {
      let got = '';
      s.on('secureConnect', () => s.write('{"v":1,"port":1,"host":"10.0.0.1"}\n'));
      s.on('data', (d: Buffer) => {
        got += d.toString();
      });
      s.on('close', () => resolve(got));
      s.on('error', () => {});
    });
    expect(parseReply(reply.trim())).toEqual({ ok: false, error: 'malformed preamble' });
  });
});

describe('a remote engine that is not listening yet (MLX ring ranks start in parallel)', () => {
  it('retries only pending refusals, 50 ms doubling to 1 s, never past the bound', async () => {
    let t = 0;
    const waits: number[] = [];
    const clock = {
      now: () => t,
      sleep: async (ms: number) => {
        waits.push(ms);
        t += ms;
      },
    };
    let calls = 0;
    const pending = () => {
      calls++;
      return Promise.reject(new TunnelRefused('not an engine yet', true));
    };
    await expect(retryWhilePending(pending, 5000, clock)).rejects.toThrow('not an engine yet');
    expect(waits).toEqual([50, 100, 200, 400, 800, 1000, 1000, 1000]);
    expect(waits.reduce((a, b) => a + b)).toBeLessThanOrEqual(5000);
    expect(calls).toBe(waits.length + 1);
    // a final refusal, or any other error, is not retried
    for (const err of [new TunnelRefused('revoked', false), new Error('handshake timed out')]) {
      waits.length = 0;
      await expect(retryWhilePending(() => Promise.reject(err), 5000, clock)).rejects.toBe(err);
      expect(waits).toEqual([]);
    }
    // success on the third dial; nothing retried without a bound
    let n = 0;
    expect(await retryWhilePending(() => (++n < 3 ? pending() : Promise.resolve('up')), 5000, clock)).toBe('up');
    await expect(retryWhilePending(pending, 0, clock)).rejects.toBeInstanceOf(TunnelRefused);
    // a cancelled wait (the local side went away) stops at once
    waits.length = 0;
    await expect(retryWhilePending(pending, 5000, { ...clock, cancelled: () => true })).rejects.toBeInstanceOf(TunnelRefused);
    expect(waits).toEqual([]);
  });

  it('a forwarder holds the connection until the worker registers the engine, and the bytes then flow', async () => {
    const t = await setup();
    const late = await echoEngine();
    cleanup.push(() => new Promise((r) => late.server.close(() => r())));
    const f = await startTunnelForwarder({ remote: { host: '127.0.0.1', port: t.listener.port }, enginePort: late.port, expectPeer: { id: 'worker-1' }, credentials: head, waitForEngineMs: 10_000 });
    cleanup.push(() => f.close());
    const payload = randomBytes(64 * 1024);
    const answer = exchange(f.port, payload);
    await new Promise((r) => setTimeout(r, 400));
    expect(t.refused.length).toBeGreaterThan(0); // dialled and refused while not registered
    expect(t.refused.every((r) => r === `port ${late.port} is not an engine of this node`)).toBe(true);
    t.enginePorts.register(late.port, 'rank-1');
    const got = await answer;
    expect(got.error).toBeUndefined();
    expect(Buffer.compare(got.data.subarray(0, payload.length), payload)).toBe(0);
    expect(f.connections()).toBe(1);
  });

  it('the listener marks "not (yet) an engine" and "not accepting" as pending, every other refusal as final', () => {
    expect(parseReply(encodeReply({ ok: false, error: 'x', pending: true }).trim())).toEqual({ ok: false, error: 'x', pending: true });
    expect(parseReply('{"ok":false,"error":"x","pending":false}')).toBeUndefined();
  });
});

describe('tunnel preamble', () => {
  it('accepts only {v:1, port} with a real port, and well-formed replies', () => {
    expect(parseRequest(encodeRequest(8080).trim())).toEqual({ v: 1, port: 8080 });
    for (const bad of ['{"v":1,"port":0}', '{"v":2,"port":80}', '{"v":1,"port":70000}', '{"v":1,"port":"80"}', '{"v":1,"port":80,"host":"x"}', 'nope']) {
      expect(parseRequest(bad)).toBeUndefined();
    }
    expect(() => encodeRequest(0)).toThrow();
    expect(parseReply(encodeReply({ ok: true }).trim())).toEqual({ ok: true });
    expect(parseReply('{"ok":false}')).toBeUndefined();
  });

  it('readLine returns the line and pushes later bytes back; refuses long lines, early end and silence', async () => {
    const s = new PassThrough();
    const line = readLine(s, 1000);
    s.write('{"v":1,"port":5}\nTAIL');
    expect(await line).toBe('{"v":1,"port":5}');
    expect(s.read()?.toString()).toBe('TAIL');
    const long = new PassThrough();
    const l2 = readLine(long, 1000);
    long.write('x'.repeat(MAX_LINE_BYTES + 1));
    await expect(l2).rejects.toThrow(PreambleError);
    const ended = new PassThrough();
    const l3 = readLine(ended, 1000);
    ended.end('partial');
    await expect(l3).rejects.toThrow(/closed before/);
    await expect(readLine(new PassThrough(), 20)).rejects.toThrow(/timed out/);
  });

  it('EnginePorts holds only valid ports', () => {
    const p = new EnginePorts();
    expect(() => p.register(0, 'x')).toThrow(RangeError);
    p.register(50052, 'rpc');
    expect(p.engine(50052)).toBe('rpc');
    p.unregister(50052);
    expect(p.engine(50052)).toBeUndefined();
  });
});


