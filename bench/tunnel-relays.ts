/**
 * bench:tunnel-relays — the relays alone, no engines: what each way of carrying engine bytes
 * across two extra hops costs per decode-sized round trip and per loaded megabyte, and how much
 * CPU its two ends burn doing it. bench:tunnel runs the same relays under llama.cpp, where on a
 * 2-core machine every relay cycle is a cycle the engines wait for; this isolates the relay.
 * Relays (each end its own process, as on a cluster): `node-tls` (the agents' forwarder and
 * listener, TLS 1.3 mTLS), `node-plain` (the same relay code, no TLS), `socat` (native, plain),
 * `stunnel` (native, TLS 1.3 mTLS) and, when Go is installed, `go-tls` (native/tunnel-relay:
 * the agents' own native relay, run bare), against `direct`. A fake engine answers a request of `up`
 * bytes with `down` bytes: decode-shaped round trips (11 KiB up, 128 KiB down, as llama.cpp RPC
 * sends per token) and one load-shaped upload (140 MB in 64 KiB writes).
 * Usage: npm run bench:tunnel-relays -- [--json] [--rounds 3] [--round-trips 300] [--load-mb 140]
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { type Server, type Socket, connect, createServer } from 'node:net';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { EnginePorts } from '../src/node/tunnel/engine-ports.ts';
import { startTunnelForwarder } from '../src/node/tunnel/forwarder.ts';
import { startTunnelListener } from '../src/node/tunnel/listener.ts';
import { relay } from '../src/node/tunnel/relay.ts';
import { createClusterCa, createKeyAndCsr, issueCertificate } from '../src/shared/pki/certificates.ts';
import type { NodeCredentials } from '../src/shared/pki/store.ts';
import { buildGoRelay, type NativeRelay, nativeRelaysInstalled, processCpuSeconds, startGoRelay, startSocatRelay, startStunnelRelay } from './lib/native-relay.ts';
import { median, numberFlag, quantile } from './lib/stats.ts';
import { freePort, killAll, track } from './lib/children.ts';

const argv = process.argv.slice(2);
const num = (name: string, def: number) => numberFlag(argv, `--${name}`, def);
const ROUNDS = num('rounds', 3);
const ROUND_TRIPS = num('round-trips', 300);
const LOAD_BYTES = num('load-mb', 140) * 1e6;
const UP = 11 * 1024;
const DOWN = 128 * 1024;
const round = (x: number, d = 3) => Math.round(x * 10 ** d) / 10 ** d;

type Relay = 'direct' | 'node-plain' | 'node-tls' | 'socat' | 'stunnel' | 'go-tls';

/** The fake engine: per request an 8-byte header (up, down as uint32 BE), `up` bytes in, `down` bytes out. */
function fakeEngine(): Promise<{ server: Server; port: number }> {
  const reply = Buffer.alloc(DOWN, 7);
  const server = createServer({ noDelay: true }, (s) => {
    let header: Buffer | undefined;
    let pending = Buffer.alloc(0);
    let want = 0;
    let down = 0;
    s.on('data', (chunk: Buffer) => {
      let c = chunk;
      while (c.length > 0) {
        if (!header) {
          pending = Buffer.concat([pending, c]);
          if (pending.length < 8) return;
          header = pending.subarray(0, 8);
          [want, down] = [header.readUInt32BE(0), header.readUInt32BE(4)];
          c = pending.subarray(8);
          pending = Buffer.alloc(0);
          continue;
        }
        const take = Math.min(want, c.length);
        want -= take;
        c = c.subarray(take);
        if (want === 0) {
          s.write(down === DOWN ? reply : Buffer.alloc(down, 7));
          header = undefined;
        }
      }
    });
    s.on('error', () => s.destroy());
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, port: (server.address() as { port: number }).port })));
}

/** Send one request and wait for its whole reply. */
function request(s: Socket, up: number, down: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = 0;
    const onData = (c: Buffer) => {
      got += c.length;
      if (got >= down) {
        s.off('data', onData).off('error', reject);
        resolve();
      }
    };
    s.on('data', onData).once('error', reject);
    const header = Buffer.alloc(8);
    header.writeUInt32BE(up, 0);
    header.writeUInt32BE(down, 4);
    s.write(header);
    const chunk = Buffer.alloc(Math.min(up, 64 * 1024), 3);
    for (let sent = 0; sent < up; sent += chunk.length) s.write(sent + chunk.length <= up ? chunk : chunk.subarray(0, up - sent));
  });
}

async function measure(port: number) {
  const s = connect({ host: '127.0.0.1', port, noDelay: true });
  await new Promise<void>((resolve, reject) => s.once('connect', resolve).once('error', reject));
  await request(s, UP, DOWN); // warm-up: the tunnel's handshake and preamble are not a round trip
  const rtts: number[] = [];
  for (let i = 0; i < ROUND_TRIPS; i++) {
    const t0 = performance.now();
    await request(s, UP, DOWN);
    rtts.push(performance.now() - t0);
  }
  const t0 = performance.now();
  await request(s, LOAD_BYTES, 1);
  const loadSeconds = (performance.now() - t0) / 1000;
  s.destroy();
  return { roundTripMsP50: median(rtts), roundTripMsP90: quantile(rtts, 0.9), loadSeconds };
}

/** One tunnel end in its own process (`--end head|worker`), configured over stdin; prints its ports. */
async function nodeEnd(): Promise<void> {
  const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  // tlsTarget: the worker's listener (head end) or the engine (worker end); plainTarget: where the plain relay goes
  const cfg = JSON.parse(String((await lines.next()).value)) as { end: 'head' | 'worker'; credentials: NodeCredentials; tlsTarget: number; enginePort: number; plainTarget: number };
  const plain = createServer({ allowHalfOpen: true, noDelay: true }, (from) => {
    const to = connect({ host: '127.0.0.1', port: cfg.plainTarget, allowHalfOpen: true, noDelay: true });
    to.once('connect', () => void relay(from, to, { toEngine: 0, fromEngine: 0 }));
    to.once('error', () => from.destroy());
  });
  await new Promise<void>((r) => plain.listen(0, '127.0.0.1', () => r()));
  const plainPort = (plain.address() as { port: number }).port;
  let tlsPort: number;
  if (cfg.end === 'worker') {
    const enginePorts = new EnginePorts();
    enginePorts.register(cfg.enginePort, 'ggml-rpc-server');
    tlsPort = (await startTunnelListener({ host: '127.0.0.1', port: 0, credentials: cfg.credentials, enginePorts })).port;
  } else {
    const remote = { host: '127.0.0.1', port: cfg.tlsTarget };
    tlsPort = (await startTunnelForwarder({ remote, enginePort: cfg.enginePort, expectPeer: { id: 'worker' }, credentials: cfg.credentials })).port;
  }
  process.stdout.write(`${JSON.stringify({ tlsPort, plainPort })}\n`);
  for await (const _ of lines) {
    // stdin open = keep serving
  }
  process.exit(0);
}

async function spawnEnd(cfg: object): Promise<{ proc: ChildProcess; tlsPort: number; plainPort: number }> {
  const proc = track(spawn(process.execPath, ['--import', 'tsx', new URL(import.meta.url).pathname, '--end'], { detached: true, stdio: ['pipe', 'pipe', 'inherit'] }));
  proc.stdin?.write(`${JSON.stringify(cfg)}\n`);
  const first = await createInterface({ input: proc.stdout! })[Symbol.asyncIterator]().next();
  return { proc, ...(JSON.parse(String(first.value)) as { tlsPort: number; plainPort: number }) };
}

interface Route {
  readonly port: number;
  readonly pids: readonly number[];
}

async function routes(enginePort: number, work: string): Promise<Record<Relay, Route>> {
  const ca = await createClusterCa('bench-relays');
  const issue = async (id: string) => {
    const { keyPem, csrPem } = await createKeyAndCsr(id);
    return { keyPem, certPem: (await issueCertificate(ca, csrPem, { role: 'node' })).certPem, caCertPem: ca.certPem };
  };
  const creds = { head: await issue('head'), worker: await issue('worker') };
  const worker = await spawnEnd({ end: 'worker', credentials: creds.worker, tlsTarget: enginePort, enginePort, plainTarget: enginePort });
  const head = await spawnEnd({ end: 'head', credentials: creds.head, tlsTarget: worker.tlsPort, enginePort, plainTarget: worker.plainPort });
  const pids = [head.proc.pid ?? 0, worker.proc.pid ?? 0];
  const out: Partial<Record<Relay, Route>> = {
    direct: { port: enginePort, pids: [] },
    'node-tls': { port: head.tlsPort, pids },
    'node-plain': { port: head.plainPort, pids },
  };
  if (nativeRelaysInstalled()) {
    const ports = async (): Promise<[number, number]> => [await freePort(), await freePort()];
    const natives: Record<'socat' | 'stunnel', NativeRelay> = {
      socat: startSocatRelay(enginePort, await ports()),
      stunnel: await startStunnelRelay(enginePort, await ports(), creds, work),
    };
    await new Promise((r) => setTimeout(r, 500)); // both listen within milliseconds; the first measurement connects after
    for (const [name, r] of Object.entries(natives)) out[name as Relay] = { port: r.port, pids: r.ends.map((e) => e.proc.pid ?? 0) };
  }
  const goBinary = buildGoRelay(work);
  if (goBinary) {
    const r = await startGoRelay(enginePort, creds, goBinary);
    out['go-tls'] = { port: r.port, pids: r.ends.map((e) => e.proc.pid ?? 0) };
  }
  return out as Record<Relay, Route>;
}

async function main(): Promise<void> {
  const loadAverage = loadavg();
  const work = await mkdtemp(join(tmpdir(), 'orchard-bench-relays-'));
  const engine = await fakeEngine();
  try {
    const all = await routes(engine.port, work);
    const names = Object.keys(all) as Relay[];
    const results: Record<string, { roundTripMsP50: number[]; roundTripMsP90: number[]; loadSeconds: number[]; relayCpuSeconds: number[] }> = {};
    for (let i = 0; i < ROUNDS; i++) {
      for (const name of i % 2 === 0 ? names : [...names].reverse()) {
        const route = all[name];
        const cpu = () => route.pids.reduce((sum, pid) => sum + processCpuSeconds(pid), 0);
        const cpu0 = cpu();
        const m = await measure(route.port);
        await new Promise((r) => setTimeout(r, 100)); // socat's per-connection child exits and is reaped
        const r = results[name] ?? { roundTripMsP50: [], roundTripMsP90: [], loadSeconds: [], relayCpuSeconds: [] };
        results[name] = r;
        r.roundTripMsP50.push(round(m.roundTripMsP50));
        r.roundTripMsP90.push(round(m.roundTripMsP90));
        r.loadSeconds.push(round(m.loadSeconds));
        r.relayCpuSeconds.push(round(cpu() - cpu0));
      }
    }
    const med = (xs: number[]) => round(median(xs));
    const direct = results.direct;
    const relays = Object.fromEntries(
      Object.entries(results).map(([name, r]) => [
        name,
        {
          roundTripAddedMsP50: direct ? round(med(r.roundTripMsP50) - med(direct.roundTripMsP50)) : undefined,
          loadMBps: round(LOAD_BYTES / 1e6 / med(r.loadSeconds), 1),
          relayCpuSecondsPerRound: med(r.relayCpuSeconds),
          ...r,
        },
      ]),
    );
    const out = {
      bench: 'tunnel-relays',
      setup: { rounds: ROUNDS, roundTrips: ROUND_TRIPS, upBytes: UP, downBytes: DOWN, loadBytes: LOAD_BYTES },
      relays,
      loadAverage1m: { start: round(loadAverage[0] ?? 0, 2), end: round(loadavg()[0] ?? 0, 2) },
      cores: availableParallelism(),
    };
    process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
  } finally {
    killAll();
    engine.server.close();
    await rm(work, { recursive: true, force: true });
  }
}

(argv.includes('--end') ? nodeEnd() : main()).catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  killAll();
  process.exit(1);
});
