/**
 * bench:tunnel — what the TLS 1.3 engine tunnel costs llama.cpp RPC. The same 2-stage split
 * (llama-server holds the first layers on its CPU, one ggml-rpc-server holds the last `--ngl`
 * layers), with llama-server's `--rpc` pointing either straight at the rpc-server (direct) or at
 * the head-side forwarder whose TLS session ends at the worker-side listener (tunnel), which
 * forwards to the same rpc-server. Both ends are the ones the agent runs: native/tunnel-relay
 * when `orchard setup` built it (`tunnelRelay: native`), else Node's (ORCHARD_TUNNEL_RELAY=node).
 * A third mode, `plain`, relays through the same two processes
 * with the same relay code but no TLS: the hop's own cost, so what remains is TLS's. Modes
 * alternate trial by trial (ABC CBA…), each trial a fresh
 * llama-server: load time (spawn → /health), then greedy completions with the prompt cache off:
 * time to first token and decode tokens/s measured at the client, token ids compared.
 * The two tunnel ends run in two processes, as on a cluster (the head's agent: this process;
 * the worker's agent: a child running only the listener — itself in the native relay when built —
 * credentials on its stdin), over
 * 127.0.0.1 — the network round trip is the same in both modes, so the ratio is the tunnel's.
 * Prints tunnelled ÷ direct: tokensPerSecondRatio (goal ≥ 0.97), ttftAddedMs p50 (goal < 2),
 * loadSecondsRatio (goal ≤ 1.10), the same three for the plain relay, with every raw number.
 * When socat and stunnel are installed (and not `--no-native`), two native controls run too
 * (bench/lib/native-relay.ts): the same two hops relayed by socat (plain) and by stunnel (TLS 1.3,
 * mutual cluster certificates) and by the agents' native relay run bare, outside any agent (native/tunnel-relay,
 * needs Go) — whether the gap is Node's relay or the hops themselves.
 * Usage: npm run bench:tunnel -- [--json] [--trials 4] [--requests 4] [--tokens 32] [--layers 8]
 *        [--dim 1024] [--ffn 2816] [--ngl 4] [--threads 1] [--no-native]
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { type Server, connect, createServer } from 'node:net';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { seedTensorCache } from '../src/node/llama/tensor-cache.ts';
import { EnginePorts } from '../src/node/tunnel/engine-ports.ts';
import { type TunnelForwarder, type TunnelForwarderOptions, startTunnelForwarder } from '../src/node/tunnel/forwarder.ts';
import { findTunnelRelay, startNativeForwarder } from '../src/node/tunnel/native-forwarder.ts';
import { startTunnelListener } from '../src/node/tunnel/listener.ts';
import { startNativeListener } from '../src/node/tunnel/native-listener.ts';
import { relay } from '../src/node/tunnel/relay.ts';
import { createClusterCa, createKeyAndCsr, issueCertificate } from '../src/shared/pki/certificates.ts';
import type { NodeCredentials } from '../src/shared/pki/store.ts';
import { rpcCacheMinSizeEnv } from '../src/shared/rpc-cache/plan.ts';
import { ssePayloads } from '../src/shared/sse.ts';
import { buildGoRelay, type NativeRelay, nativeRelaysInstalled, processCpuSeconds, startGoRelay, startSocatRelay, startStunnelRelay } from './lib/native-relay.ts';
import { median } from './lib/stats.ts';
import { freePort } from './llama-run.ts';

const ROOT = new URL('../', import.meta.url).pathname;
const argv = process.argv.slice(2);
const num = (name: string, def: number) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 && argv[i + 1] ? Number(argv[i + 1]) : def;
};
const JSON_OUT = argv.includes('--json');
const TRIALS = num('trials', 4);
const REQUESTS = num('requests', 4);
const TOKENS = num('tokens', 32);
const LAYERS = num('layers', 8);
const DIM = num('dim', 1024);
const FFN = num('ffn', 2816);
const NGL = num('ngl', 4);
const THREADS = num('threads', 1);
const NATIVE = !argv.includes('--no-native') && nativeRelaysInstalled();
const PROMPT = 'The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, there lived';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

type Mode = 'direct' | 'plain' | 'tunnel' | 'socat' | 'stunnel' | 'go';
type NativeMode = 'socat' | 'stunnel' | 'go';
const MODES: Mode[] = NATIVE ? ['direct', 'plain', 'tunnel', 'socat', 'stunnel', 'go'] : ['direct', 'plain', 'tunnel'];
const procs = new Set<ChildProcess>();
function killAll(): void {
  for (const c of procs) {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  procs.clear();
}
process.on('exit', killAll);
process.on('SIGINT', () => {
  killAll();
  process.exit(130);
});

function start(cmd: string, args: string[], env: Record<string, string> = {}): { proc: ChildProcess; log: () => string } {
  const proc = spawn(cmd, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, GGML_RPC_NO_RDMA: '1', ...env } });
  procs.add(proc);
  proc.once('exit', () => procs.delete(proc));
  let log = '';
  const keep = (d: Buffer) => {
    log = (log + d.toString()).slice(-20_000);
  };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
  return { proc, log: () => log };
}

async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null || !proc.pid) return;
  const gone = new Promise<void>((r) => proc.once('exit', () => r()));
  process.kill(-proc.pid, 'SIGKILL');
  await gone;
}

/** ggml-rpc-server's stdout is block-buffered when piped, so readiness = the port accepts. */
async function waitPort(port: number, proc: ChildProcess, log: () => string): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${proc.spawnfile} exited: ${log().slice(-2000)}`);
    const ok = await new Promise<boolean>((r) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        r(true);
      });
      s.once('error', () => r(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`${proc.spawnfile} not listening on ${port}`);
    await sleep(50);
  }
}

async function issue(ca: Awaited<ReturnType<typeof createClusterCa>>, id: string): Promise<NodeCredentials> {
  const { keyPem, csrPem } = await createKeyAndCsr(id);
  const { certPem } = await issueCertificate(ca, csrPem, { role: 'node' });
  return { keyPem, certPem, caCertPem: ca.certPem };
}

/**
 * The control mode's hop: a 127.0.0.1 listener whose connections are relayed to `targetPort`
 * with the tunnel's own relay code, minus TLS.
 */
async function plainRelay(targetPort: number): Promise<{ server: Server; port: number }> {
  const server = createServer({ allowHalfOpen: true, noDelay: true }, (from) => {
    const to = connect({ host: '127.0.0.1', port: targetPort, allowHalfOpen: true, noDelay: true });
    to.once('connect', () => void relay(from, to, { toEngine: 0, fromEngine: 0 }));
    to.once('error', () => from.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const address = server.address();
  return { server, port: typeof address === 'object' && address ? address.port : 0 };
}

/**
 * The worker agent's half, run as `bench/tunnel.ts --worker-listener`: reads its credentials and
 * the engine port from stdin (never argv: `ps` shows that), starts the listener the agent would
 * (the native relay when built), prints its port, then answers each further stdin line with the
 * CPU time of the worker's end of the tunnel (this process and the native relay), and exits when
 * stdin ends.
 */
async function workerListener(): Promise<void> {
  const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const first = await lines.next();
  const { credentials, rpcPort, seededRpcPort } = JSON.parse(String(first.value)) as { credentials: NodeCredentials; rpcPort: number; seededRpcPort: number };
  const enginePorts = new EnginePorts();
  enginePorts.register(rpcPort, 'ggml-rpc-server');
  enginePorts.register(seededRpcPort, 'ggml-rpc-server');
  const relayBinary = findTunnelRelay();
  const options = { host: '127.0.0.1', port: 0, credentials, enginePorts };
  const listener = relayBinary ? await startNativeListener(relayBinary, { ...options, revoked: new Set() }) : await startTunnelListener(options);
  const relayCpu = () => ('pid' in listener ? processCpuSeconds(listener.pid() ?? 0) : 0);
  const plain = await plainRelay(rpcPort);
  process.stdout.write(`${JSON.stringify({ port: listener.port, plainPort: plain.port, relay: relayBinary ? 'native' : 'node' })}\n`);
  for (let line = await lines.next(); !line.done; line = await lines.next()) process.stdout.write(`${JSON.stringify({ cpuSeconds: cpuSeconds() + relayCpu() })}\n`);
  await listener.close();
  plain.server.close();
}

const cpuSeconds = (): number => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

interface Tunnel {
  readonly forwarder: TunnelForwarder;
  /** The same tunnel to the pre-seeded rpc-server. */
  readonly seededForwarder: TunnelForwarder;
  readonly worker: ChildProcess;
  /** Which listener the worker process runs. */
  readonly workerRelay: 'native' | 'node';
  /** Head-side end of the plain (no TLS) relay through the worker process. */
  readonly plain: { server: Server; port: number };
  /** The worker process's CPU seconds so far. */
  workerCpu(): Promise<number>;
  /** The native controls, when installed. */
  readonly native?: Readonly<Record<NativeMode, NativeRelay>>;
}

/** Worker-side listener (child process) + head-side forwarder (here) for one rpc-server. */
async function startTunnel(rpcPort: number, seededRpcPort: number, work: string): Promise<Tunnel> {
  const ca = await createClusterCa('bench-tunnel');
  const worker = spawn(process.execPath, ['--import', 'tsx', new URL(import.meta.url).pathname, '--worker-listener'], { detached: true, stdio: ['pipe', 'pipe', 'inherit'] });
  procs.add(worker);
  const replies = createInterface({ input: worker.stdout! })[Symbol.asyncIterator]();
  const exited = new Promise<never>((_, reject) => worker.once('exit', (code) => reject(new Error(`tunnel listener exited (${code})`))));
  const next = async <T>(): Promise<T> => JSON.parse(String((await Promise.race([replies.next(), exited])).value)) as T;
  const creds = { worker: await issue(ca, 'worker'), head: await issue(ca, 'head') };
  worker.stdin?.write(`${JSON.stringify({ credentials: creds.worker, rpcPort, seededRpcPort })}\n`);
  const { port, plainPort, relay: workerRelay } = await next<{ port: number; plainPort: number; relay: 'native' | 'node' }>();
  // the head side the agent runs: the native relay when `orchard setup` built it, else Node's
  const relayBinary = findTunnelRelay();
  const forward = (enginePort: number) => {
    const o: TunnelForwarderOptions = {
      remote: { host: '127.0.0.1', port },
      enginePort,
      expectPeer: { id: 'worker' },
      credentials: creds.head,
      onError: (m) => process.stderr.write(`tunnel: ${m}\n`),
    };
    return relayBinary ? startNativeForwarder(relayBinary, o) : startTunnelForwarder(o);
  };
  const [forwarder, seededForwarder] = [await forward(rpcPort), await forward(seededRpcPort)];
  const workerCpu = async () => {
    worker.stdin?.write('cpu\n');
    return (await next<{ cpuSeconds: number }>()).cpuSeconds;
  };
  const native = NATIVE ? await startNative(rpcPort, creds, work) : undefined;
  return { forwarder, seededForwarder, worker, workerRelay, plain: await plainRelay(plainPort), workerCpu, ...(native ? { native } : {}) };
}

async function startNative(rpcPort: number, creds: { head: NodeCredentials; worker: NodeCredentials }, work: string) {
  const ports = async (): Promise<[number, number]> => [await freePort(), await freePort()];
  const socat = startSocatRelay(rpcPort, await ports(), procs);
  const stunnel = await startStunnelRelay(rpcPort, await ports(), creds, work, procs);
  const binary = buildGoRelay(work);
  if (!binary) throw new Error('--native needs Go for the Go relay (native/tunnel-relay); --no-native skips the native controls');
  const go = await startGoRelay(rpcPort, creds, binary, procs);
  for (const { port, proc } of [...socat.ends, ...stunnel.ends]) await waitPort(port, proc, () => 'see stderr');
  return { socat, stunnel, go };
}

interface Completion {
  ttftMs: number;
  decodeTokensPerSecond: number;
  tokenIds: number[];
}

/** One greedy streamed completion, timed at the client; the prompt cache is off so every request prefills. */
async function complete(httpPort: number): Promise<Completion> {
  const t0 = performance.now();
  const res = await fetch(`http://127.0.0.1:${httpPort}/completion`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: PROMPT, stream: true, return_tokens: true, n_predict: TOKENS, temperature: 0, top_k: 1, cache_prompt: false, ignore_eos: true }),
  });
  if (!res.ok || !res.body) throw new Error(`/completion answered ${res.status}`);
  const tokenIds: number[] = [];
  let first = 0;
  let last = 0;
  for await (const payload of ssePayloads(res.body)) {
    const chunk = JSON.parse(payload) as { tokens?: number[] };
    if (!chunk.tokens?.length) continue;
    last = performance.now();
    if (tokenIds.length === 0) first = last;
    tokenIds.push(...chunk.tokens);
  }
  if (tokenIds.length < 2) throw new Error(`only ${tokenIds.length} tokens generated`);
  return { ttftMs: first - t0, decodeTokensPerSecond: ((tokenIds.length - 1) * 1000) / (last - first), tokenIds };
}

interface Trial {
  mode: Mode;
  loadSeconds: number;
  completions: Completion[];
  /** CPU seconds during the trial: this process (HTTP client; plus the forwarder when tunnelled), the worker's listener, both native relay ends. */
  cpu?: { benchProcess: number; workerListener: number; nativeRelay: number };
}

/**
 * A fresh head llama-server against `rpcPort` (the rpc-server itself or the forwarder). `loadOnly`:
 * the pre-seeded loads, stopped once up; their head gets the agent's cache threshold, as the agent
 * starts it, so tensors above it are offered by hash (cold trials keep the stock threshold, as in
 * every earlier run of this bench).
 */
async function trial(mode: Mode, rpcPort: number, model: string, llamaServer: string, loadOnly = false): Promise<Trial> {
  const httpPort = await freePort();
  const t0 = performance.now();
  const head = start(
    llamaServer,
    [
      ...['-m', model, '--rpc', `127.0.0.1:${rpcPort}`, '-ngl', String(NGL), '-c', '1024', '-t', String(THREADS)],
      ...['--no-warmup', '--host', '127.0.0.1', '--port', String(httpPort)],
    ],
    loadOnly ? rpcCacheMinSizeEnv() : {},
  );
  try {
    const deadline = Date.now() + 300_000;
    for (;;) {
      if (head.proc.exitCode !== null) throw new Error(`llama-server exited: ${head.log().slice(-2000)}`);
      const ok = await fetch(`http://127.0.0.1:${httpPort}/health`).then(
        (r) => r.status === 200,
        () => false,
      );
      if (ok) break;
      if (Date.now() > deadline) throw new Error(`llama-server not ready: ${head.log().slice(-2000)}`);
      await sleep(20);
    }
    const loadSeconds = (performance.now() - t0) / 1000;
    if (loadOnly) return { mode, loadSeconds, completions: [] };
    await complete(httpPort); // first request pays one-time graph/buffer set-up: not counted
    const completions: Completion[] = [];
    for (let i = 0; i < REQUESTS; i++) completions.push(await complete(httpPort));
    return { mode, loadSeconds, completions };
  } finally {
    await stop(head.proc);
  }
}

const round = (x: number, d = 3) => Math.round(x * 10 ** d) / 10 ** d;

/** One trial with the CPU both tunnel ends spent during it. */
async function measuredTrial(mode: Mode, rpcPort: number, tunnel: Tunnel, model: string, llamaServer: string): Promise<Trial> {
  const native = mode === 'socat' || mode === 'stunnel' || mode === 'go' ? tunnel.native?.[mode] : undefined;
  // native processes of this mode: a control's two ends, or the tunnel's native head side
  const pids = native ? native.ends.map((e) => e.proc.pid ?? 0) : mode === 'tunnel' && tunnel.forwarder.pid ? [tunnel.forwarder.pid] : [];
  const nativeCpu = () => pids.reduce((sum, pid) => sum + processCpuSeconds(pid), 0);
  const [bench0, worker0, native0] = [cpuSeconds(), await tunnel.workerCpu(), nativeCpu()];
  const port = native ? native.port : { direct: rpcPort, plain: tunnel.plain.port, tunnel: tunnel.forwarder.port }[mode as 'direct' | 'plain' | 'tunnel'];
  const t = await trial(mode, port, model, llamaServer);
  if (native) await sleep(100); // socat's per-connection children exit and are reaped after llama-server stops
  const [bench1, worker1, native1] = [cpuSeconds(), await tunnel.workerCpu(), nativeCpu()];
  return { ...t, cpu: { benchProcess: bench1 - bench0, workerListener: worker1 - worker0, nativeRelay: native1 - native0 } };
}

/**
 * Where the tunnel's time goes: the CPU seconds its two ends spent per trial. The forwarder runs
 * in this process next to the HTTP client both modes use, so its share is the tunnel − direct
 * difference; the listener process does nothing but tunnel. With the load average: on a
 * saturated machine every extra process hop also waits for a core.
 */
function cpuSummary(trials: readonly Trial[], loadAverage: number[]) {
  const med = (mode: Mode, k: 'benchProcess' | 'workerListener' | 'nativeRelay') => median(trials.filter((t) => t.mode === mode).map((t) => t.cpu?.[k] ?? 0));
  return {
    headForwarderSecondsPerTrial: round(med('tunnel', 'benchProcess') - med('direct', 'benchProcess') + med('tunnel', 'nativeRelay')),
    workerListenerSecondsPerTrial: round(med('tunnel', 'workerListener')),
    ...(NATIVE ? { nativeBothEndsSecondsPerTrial: { socat: round(med('socat', 'nativeRelay')), stunnel: round(med('stunnel', 'nativeRelay')), go: round(med('go', 'nativeRelay')) } } : {}),
    loadAverage1m: { start: round(loadAverage[0] ?? 0, 2), end: round(loadavg()[0] ?? 0, 2) },
    cores: availableParallelism(),
  };
}

function summarise(trials: readonly Trial[], tunnel: Pick<Tunnel, 'forwarder' | 'workerRelay'>, loadAverage: number[]) {
  const of = (mode: Mode) => trials.filter((t) => t.mode === mode);
  const stats = (mode: Mode) => {
    const ts = of(mode);
    const cs = ts.flatMap((t) => t.completions);
    return {
      loadSeconds: ts.map((t) => round(t.loadSeconds)),
      ttftMs: cs.map((c) => round(c.ttftMs, 2)),
      decodeTokensPerSecond: cs.map((c) => round(c.decodeTokensPerSecond, 2)),
      loadSecondsMedian: round(median(ts.map((t) => t.loadSeconds))),
      ttftMsP50: round(median(cs.map((c) => c.ttftMs)), 2),
      decodeTokensPerSecondMedian: round(median(cs.map((c) => c.decodeTokensPerSecond)), 2),
    };
  };
  const direct = stats('direct');
  const tunnelled = stats('tunnel');
  const plain = stats('plain');
  const versusDirect = (m: typeof direct) => ({
    tokensPerSecondRatio: round(m.decodeTokensPerSecondMedian / direct.decodeTokensPerSecondMedian),
    ttftAddedMs: round(m.ttftMsP50 - direct.ttftMsP50, 2),
    loadSecondsRatio: round(m.loadSecondsMedian / direct.loadSecondsMedian),
  });
  const ids = trials.flatMap((t) => t.completions.map((c) => c.tokenIds.join(',')));
  return {
    bench: 'tunnel',
    ...versusDirect(tunnelled),
    /** The same ratios for the two relay hops without TLS: the part of the tunnel's cost that is not TLS. */
    plainRelay: versusDirect(plain),
    /** The same two hops relayed natively: socat (plain), stunnel (TLS 1.3 mTLS), the agents' Go relay run bare (TLS 1.3 mTLS, the agents' checks). */
    nativeRelays: NATIVE ? { socat: versusDirect(stats('socat')), stunnel: versusDirect(stats('stunnel')), go: versusDirect(stats('go')) } : 'skipped (--no-native, or socat, stunnel or go not installed)',
    tokenIdsIdentical: ids.length > 0 && ids.every((x) => x === ids[0]),
    goals: { tokensPerSecondRatio: '>= 0.97', ttftAddedMs: '< 2 (p50)', loadSecondsRatio: '<= 1.10' },
    setup: { trials: TRIALS, requestsPerTrial: REQUESTS, tokens: TOKENS, layers: LAYERS, dim: DIM, ffn: FFN, rpcLayers: NGL, threads: THREADS },
    /** Which relays the agent (and so `tunnel`) runs at each end: native/tunnel-relay when `orchard setup` built it. */
    tunnelRelay: { head: tunnel.forwarder.pid ? 'native' : 'node', worker: tunnel.workerRelay },
    tunnelBytes: { ...tunnel.forwarder.bytes, connections: tunnel.forwarder.connections(), resumedSessions: tunnel.forwarder.resumed() },
    tunnelCpu: cpuSummary(trials, loadAverage),
    direct,
    plain,
    tunnel: tunnelled,
    ...(NATIVE ? { socat: stats('socat'), stunnel: stats('stunnel'), go: stats('go') } : {}),
  };
}

/**
 * The worker's rpc-server as the product starts it when the worker holds the model file too:
 * `-c` on a tensor cache the agent pre-seeded from its own copy (PrepareCache), so a load sends
 * hashes for the tensors over the threshold instead of their bytes.
 */
async function seededRpcServer(model: string, work: string, rpcServer: string): Promise<number> {
  const llamaCacheDir = join(work, 'seeded-cache');
  await seedTensorCache({ modelPath: model, llamaCacheDir, stage: { firstLayer: LAYERS - NGL, lastLayer: LAYERS - 1, holdsOutput: true } });
  const port = await freePort();
  const rpc = start(rpcServer, ['-H', '127.0.0.1', '-p', String(port), '-t', String(THREADS), '-c'], { LLAMA_CACHE: llamaCacheDir });
  await waitPort(port, rpc.proc, rpc.log);
  return port;
}

/**
 * Pre-seeded loads, direct and tunnelled alternating: the product's load path when every worker
 * holds the model. Reported beside the cold ratio (weights over the wire), never instead of it:
 * a worker without the file still loads cold.
 */
async function seededLoads(seededRpcPort: number, tunnel: Tunnel, model: string, llamaServer: string) {
  const loads: Record<'direct' | 'tunnel', number[]> = { direct: [], tunnel: [] };
  for (let i = 0; i < TRIALS; i++) {
    for (const mode of i % 2 === 0 ? (['direct', 'tunnel'] as const) : (['tunnel', 'direct'] as const)) {
      const t = await trial(mode, mode === 'direct' ? seededRpcPort : tunnel.seededForwarder.port, model, llamaServer, true);
      loads[mode].push(round(t.loadSeconds));
    }
  }
  return {
    loadSecondsRatio: round(median(loads.tunnel) / median(loads.direct)),
    loadSeconds: loads,
    tunnelBytesToEngine: tunnel.seededForwarder.bytes.toEngine,
  };
}

async function main(): Promise<void> {
  const bins = await findLlamaBinaries();
  const work = await mkdtemp(join(tmpdir(), 'orchard-bench-tunnel-'));
  const model = join(work, 'split.gguf');
  let tunnel: Tunnel | undefined;
  const loadAverage = loadavg();
  try {
    const gen = ['--out', model, '--layers', String(LAYERS), '--dim', String(DIM), '--ffn', String(FFN), '--type', 'f16'];
    await promisify(execFile)(process.execPath, [join(ROOT, 'bin/orchard.js'), 'testmodel', 'gguf', ...gen]);
    const rpcPort = await freePort();
    const rpc = start(bins.rpcServer, ['-H', '127.0.0.1', '-p', String(rpcPort), '-t', String(THREADS)]);
    await waitPort(rpcPort, rpc.proc, rpc.log);
    const seededRpcPort = await seededRpcServer(model, work, bins.rpcServer);
    tunnel = await startTunnel(rpcPort, seededRpcPort, work);
    const trials: Trial[] = [];
    for (let i = 0; i < TRIALS; i++) {
      // ABC CBA order: drift (page cache, thermal, neighbours) lands on every mode alike
      const order = i % 2 === 0 ? MODES : [...MODES].reverse();
      for (const mode of order) {
        trials.push(await measuredTrial(mode, rpcPort, tunnel, model, bins.llamaServer));
        if (!JSON_OUT) process.stderr.write(`trial ${i + 1}/${TRIALS} ${mode}: load ${trials.at(-1)?.loadSeconds.toFixed(2)} s\n`);
      }
    }
    const seeded = await seededLoads(seededRpcPort, tunnel, model, bins.llamaServer);
    const out = { ...summarise(trials, tunnel, loadAverage), preseeded: seeded };
    if (JSON_OUT) process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
    else {
      const { direct: d, tunnel: t } = out;
      process.stdout.write(
        `tunnel ÷ direct: tokens/s ${out.tokensPerSecondRatio} (${t.decodeTokensPerSecondMedian} vs ${d.decodeTokensPerSecondMedian}), ` +
          `TTFT +${out.ttftAddedMs} ms p50 (${t.ttftMsP50} vs ${d.ttftMsP50}), load ${out.loadSecondsRatio} (${t.loadSecondsMedian} s vs ${d.loadSecondsMedian} s), ` +
          `token ids identical: ${out.tokenIdsIdentical}; plain relay (no TLS) ÷ direct: ${JSON.stringify(out.plainRelay)}\n`,
      );
    }
  } finally {
    await tunnel?.forwarder.close();
    await tunnel?.seededForwarder.close();
    tunnel?.plain.server.close();
    tunnel?.worker.stdin?.end();
    for (const r of Object.values(tunnel?.native ?? {})) r.close();
    killAll();
    await rm(work, { recursive: true, force: true });
  }
}

(argv.includes('--worker-listener') ? workerListener() : main()).catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  killAll();
  process.exit(1);
});
