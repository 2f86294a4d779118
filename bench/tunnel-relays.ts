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
 * sends per token), one load-shaped upload (140 MB in 64 KiB writes) and `--sessions` new
 * connections (a model load opens about a dozen): per relay end, the CPU per loaded MB and per new
 * session — the relay's own cost, which holds still under load where wall times do not.
 * `--go-baseline PATH` adds another build of the Go relay (`go-tls-baseline`, e.g. main's) to
 * compare a change against in the same run.
 * Usage: npm run bench:tunnel-relays -- [--json] [--rounds 3] [--round-trips 300] [--load-mb 140]
 *        [--sessions 100] [--go-baseline PATH]
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
const SESSIONS = num('sessions', 100);
const GO_BASELINE = argv.includes('--go-baseline') ? argv[argv.indexOf('--go-baseline') + 1] : undefined;
const UP = 11 * 1024;
const DOWN = 128 * 1024;
const round = (x: number, d = 3) => Math.round(x * 10 ** d) / 10 ** d;

type Relay = 'direct' | 'node-plain' | 'node-tls' | 'socat' | 'stunnel' | 'go-tls' | 'go-tls-baseline';

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

const open = async (port: number): Promise<Socket> => {
  const s = connect({ host: '127.0.0.1', port, noDelay: true });
  await new Promise<void>((resolve, reject) => s.once('connect', resolve).once('error', reject));
  return s;
};

/** CPU seconds so far of a relay's head end and worker end. */
type Cpu = () => [number, number];
const perEnd = (cpu: Cpu, [h0, w0]: [number, number], per: number) => {
  const [h, w] = cpu();
  return { head: round(((h - h0) * 1000) / per), worker: round(((w - w0) * 1000) / per) };
};

/** New connections, each to its first reply (handshake, preamble, engine dial): ms each, CPU ms per session per end. */
async function sessions(port: number, cpu: Cpu) {
  const cpu0 = cpu();
  const ms: number[] = [];
  for (let i = 0; i < SESSIONS; i++) {
    const t0 = performance.now();
    const s = await open(port);
    await request(s, 1, 1);
    ms.push(performance.now() - t0);
    s.destroy();
  }
  return { sessionMsP50: median(ms), sessionCpuMs: perEnd(cpu, cpu0, SESSIONS) };
}

async function measure(port: number, cpu: Cpu) {
  const setup = await sessions(port, cpu);
  const s = await open(port);
  await request(s, UP, DOWN); // warm-up: the tunnel's handshake and preamble are not a round trip
  const rtts: number[] = [];
  for (let i = 0; i < ROUND_TRIPS; i++) {
    const t0 = performance.now();
    await request(s, UP, DOWN);
    rtts.push(performance.now() - t0);
  }
  const cpu0 = cpu();
  const t0 = performance.now();
  await request(s, LOAD_BYTES, 1);
  const loadSeconds = (performance.now() - t0) / 1000;
  const loadCpuMsPerMB = perEnd(cpu, cpu0, LOAD_BYTES / 1e6);
  s.destroy();
  return { roundTripMsP50: median(rtts), roundTripMsP90: quantile(rtts, 0.9), loadSeconds, loadCpuMsPerMB, ...setup };
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
  /** The relay's head-end and worker-end processes (none for direct). */
  readonly pids: { readonly head?: number; readonly worker?: number };
}

/** A native relay's route: its ends are [worker, head] (bench/lib/native-relay.ts). */
const nativeRoute = (r: NativeRelay): Route => ({ port: r.port, pids: { worker: r.ends[0]?.proc.pid, head: r.ends[1]?.proc.pid } });

async function routes(enginePort: number, work: string): Promise<Record<Relay, Route>> {
  const ca = await createClusterCa('bench-relays');
  const issue = async (id: string) => {
    const { keyPem, csrPem } = await createKeyAndCsr(id);
    return { keyPem, certPem: (await issueCertificate(ca, csrPem, { role: 'node' })).certPem, caCertPem: ca.certPem };
  };
  const creds = { head: await issue('head'), worker: await issue('worker') };
  const worker = await spawnEnd({ end: 'worker', credentials: creds.worker, tlsTarget: enginePort, enginePort, plainTarget: enginePort });
  const head = await spawnEnd({ end: 'head', credentials: creds.head, tlsTarget: worker.tlsPort, enginePort, plainTarget: worker.plainPort });
  const pids = { head: head.proc.pid, worker: worker.proc.pid };
  const out: Partial<Record<Relay, Route>> = {
    direct: { port: enginePort, pids: {} },
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
    for (const [name, r] of Object.entries(natives)) out[name as Relay] = nativeRoute(r);
  }
  const goBinary = buildGoRelay(work);
  if (goBinary) out['go-tls'] = nativeRoute(await startGoRelay(enginePort, creds, goBinary));
  if (GO_BASELINE) out['go-tls-baseline'] = nativeRoute(await startGoRelay(enginePort, creds, GO_BASELINE));
  return out as Record<Relay, Route>;
}

type Measured = Awaited<ReturnType<typeof measure>>;
type Series = { [K in 'roundTripMsP50' | 'roundTripMsP90' | 'loadSeconds' | 'sessionMsP50' | 'relayCpuSeconds']: number[] } & {
  loadCpuMsPerMB: Measured['loadCpuMsPerMB'][];
  sessionCpuMs: Measured['sessionCpuMs'][];
};

/** Every relay, ROUNDS times, in ABC…CBA order. */
async function runRounds(all: Record<Relay, Route>): Promise<Record<string, Series>> {
  const names = Object.keys(all) as Relay[];
  const results: Record<string, Series> = {};
  for (let i = 0; i < ROUNDS; i++) {
    for (const name of i % 2 === 0 ? names : [...names].reverse()) {
      const { port, pids } = all[name];
      const cpu: Cpu = () => [pids.head ? processCpuSeconds(pids.head) : 0, pids.worker ? processCpuSeconds(pids.worker) : 0];
      const [h0, w0] = cpu();
      const m = await measure(port, cpu);
      await new Promise((r) => setTimeout(r, 100)); // socat's per-connection child exits and is reaped
      const [h1, w1] = cpu();
      const r = results[name] ?? { roundTripMsP50: [], roundTripMsP90: [], loadSeconds: [], sessionMsP50: [], relayCpuSeconds: [], loadCpuMsPerMB: [], sessionCpuMs: [] };
      results[name] = r;
      for (const k of ['roundTripMsP50', 'roundTripMsP90', 'loadSeconds', 'sessionMsP50'] as const) r[k].push(round(m[k]));
      r.relayCpuSeconds.push(round(h1 - h0 + w1 - w0));
      r.loadCpuMsPerMB.push(m.loadCpuMsPerMB);
      r.sessionCpuMs.push(m.sessionCpuMs);
    }
  }
  return results;
}

async function main(): Promise<void> {
  const loadAverage = loadavg();
  const work = await mkdtemp(join(tmpdir(), 'orchard-bench-relays-'));
  const engine = await fakeEngine();
  try {
    const results = await runRounds(await routes(engine.port, work));
    const med = (xs: number[]) => round(median(xs));
    const medEnds = (xs: { head: number; worker: number }[]) => ({ head: med(xs.map((x) => x.head)), worker: med(xs.map((x) => x.worker)) });
    const direct = results.direct;
    const relays = Object.fromEntries(
      Object.entries(results).map(([name, { loadCpuMsPerMB, sessionCpuMs, ...r }]) => [
        name,
        {
          roundTripAddedMsP50: direct ? round(med(r.roundTripMsP50) - med(direct.roundTripMsP50)) : undefined,
          loadMBps: round(LOAD_BYTES / 1e6 / med(r.loadSeconds), 1),
          relayCpuSecondsPerRound: med(r.relayCpuSeconds),
          /** CPU ms per MB of the upload, per end (native ends: whole process; socat's forked children once reaped). */
          loadCpuMsPerMB: medEnds(loadCpuMsPerMB),
          sessionAddedMsP50: direct ? round(med(r.sessionMsP50) - med(direct.sessionMsP50)) : undefined,
          sessionCpuMs: medEnds(sessionCpuMs),
          ...r,
          perRound: { loadCpuMsPerMB, sessionCpuMs },
        },
      ]),
    );
    const out = {
      bench: 'tunnel-relays',
      setup: { rounds: ROUNDS, roundTrips: ROUND_TRIPS, upBytes: UP, downBytes: DOWN, loadBytes: LOAD_BYTES, sessions: SESSIONS, ...(GO_BASELINE ? { goBaseline: GO_BASELINE } : {}) },
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
