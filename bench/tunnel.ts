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
 * Then the accounting (`accounting`, bench/lib/rpc-traffic.ts): a tap counts what crosses per
 * prompt and per decoded token (round trips, commands, writes, bytes each way), the recorded decode
 * step is replayed to a fake engine through every mode (`addedPerRoundTripMs`, at the engines' pace
 * and back to back), and `predictedVsMeasured` sets round trips × added ms against the trials.
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
import { freePort, killAll, start as startChild, stop, track, waitPort } from './lib/children.ts';
import { buildGoRelay, type NativeRelay, nativeRelaysInstalled, processCpuSeconds, startGoRelay, startSocatRelay, startStunnelRelay } from './lib/native-relay.ts';
import { type MeasuredMode, type RpcStep, predictedLoss, rpcAccounting, startFakeEngine, startRpcTap, transportAdded, typicalDecodeStep } from './lib/rpc-traffic.ts';
import { median } from './lib/stats.ts';

/** An engine (TCP transport only: RDMA would bypass the relays under test), its last 20 kB of output kept. */
const start = (cmd: string, args: string[], env: Record<string, string> = {}) => startChild(cmd, args, { env: { GGML_RPC_NO_RDMA: '1', ...env }, logBytes: 20_000 });

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
  const { credentials, rpcPort, seededRpcPort, replayPort } = JSON.parse(String(first.value)) as { credentials: NodeCredentials; rpcPort: number; seededRpcPort: number; replayPort: number };
  const enginePorts = new EnginePorts();
  for (const port of [rpcPort, seededRpcPort, replayPort]) enginePorts.register(port, 'ggml-rpc-server');
  const relayBinary = findTunnelRelay();
  const options = { host: '127.0.0.1', port: 0, credentials, enginePorts };
  const listener = relayBinary ? await startNativeListener(relayBinary, { ...options, revoked: new Set() }) : await startTunnelListener(options);
  const relayCpu = () => ('pid' in listener ? processCpuSeconds(listener.pid() ?? 0) : 0);
  const [plain, plainReplay] = [await plainRelay(rpcPort), await plainRelay(replayPort)];
  process.stdout.write(`${JSON.stringify({ port: listener.port, plainPort: plain.port, plainReplayPort: plainReplay.port, relay: relayBinary ? 'native' : 'node' })}\n`);
  for (let line = await lines.next(); !line.done; line = await lines.next()) process.stdout.write(`${JSON.stringify({ cpuSeconds: cpuSeconds() + relayCpu() })}\n`);
  await listener.close();
  plain.server.close();
  plainReplay.server.close();
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
  /** Every mode's route to the fake engine the transport replay talks to (rpc-traffic.ts). */
  readonly replay: Readonly<Partial<Record<Mode, number>>>;
  /** What to close at the end. */
  readonly closers: (() => unknown)[];
}

/** Worker-side listener (child process) + head-side forwarder (here) for one rpc-server. */
async function startTunnel(rpcPort: number, seededRpcPort: number, replayPort: number, work: string): Promise<Tunnel> {
  const ca = await createClusterCa('bench-tunnel');
  const worker = track(spawn(process.execPath, ['--import', 'tsx', new URL(import.meta.url).pathname, '--worker-listener'], { detached: true, stdio: ['pipe', 'pipe', 'inherit'] }));
  const replies = createInterface({ input: worker.stdout! })[Symbol.asyncIterator]();
  const exited = new Promise<never>((_, reject) => worker.once('exit', (code) => reject(new Error(`tunnel listener exited (${code})`))));
  const next = async <T>(): Promise<T> => JSON.parse(String((await Promise.race([replies.next(), exited])).value)) as T;
  const creds = { worker: await issue(ca, 'worker'), head: await issue(ca, 'head') };
  worker.stdin?.write(`${JSON.stringify({ credentials: creds.worker, rpcPort, seededRpcPort, replayPort })}\n`);
  const { port, plainPort, plainReplayPort, relay: workerRelay } = await next<{ port: number; plainPort: number; plainReplayPort: number; relay: 'native' | 'node' }>();
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
  const [forwarder, seededForwarder, replayForwarder] = [await forward(rpcPort), await forward(seededRpcPort), await forward(replayPort)];
  const workerCpu = async () => {
    worker.stdin?.write('cpu\n');
    return (await next<{ cpuSeconds: number }>()).cpuSeconds;
  };
  const native = NATIVE ? await startNative(rpcPort, creds, work) : undefined;
  const nativeReplay = NATIVE ? await startNative(replayPort, creds, work) : undefined;
  const [plain, plainReplay] = [await plainRelay(plainPort), await plainRelay(plainReplayPort)];
  const replay = { direct: replayPort, tunnel: replayForwarder.port, plain: plainReplay.port, ...(nativeReplay ? { socat: nativeReplay.socat.port, stunnel: nativeReplay.stunnel.port, go: nativeReplay.go.port } : {}) };
  const closers = [() => replayForwarder.close(), () => plainReplay.server.close(), ...Object.values(nativeReplay ?? {}).map((r) => () => r.close())];
  return { forwarder, seededForwarder, worker, workerRelay, plain, workerCpu, ...(native ? { native } : {}), replay, closers };
}

async function startNative(rpcPort: number, creds: { head: NodeCredentials; worker: NodeCredentials }, work: string) {
  const ports = async (): Promise<[number, number]> => [await freePort(), await freePort()];
  const socat = startSocatRelay(rpcPort, await ports());
  const stunnel = await startStunnelRelay(rpcPort, await ports(), creds, work);
  const binary = buildGoRelay(work);
  if (!binary) throw new Error('--native needs Go for the Go relay (native/tunnel-relay); --no-native skips the native controls');
  const go = await startGoRelay(rpcPort, creds, binary);
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
async function trial(mode: Mode, rpcPort: number, model: string, llamaServer: string, o: { loadOnly?: boolean; requests?: number; onWarm?: () => void } = {}): Promise<Trial> {
  const loadOnly = o.loadOnly ?? false;
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
    o.onWarm?.();
    const completions: Completion[] = [];
    for (let i = 0; i < (o.requests ?? REQUESTS); i++) completions.push(await complete(httpPort));
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
      const t = await trial(mode, mode === 'direct' ? seededRpcPort : tunnel.seededForwarder.port, model, llamaServer, { loadOnly: true });
      loads[mode].push(round(t.loadSeconds));
    }
  }
  return {
    loadSecondsRatio: round(median(loads.tunnel) / median(loads.direct)),
    loadSeconds: loads,
    tunnelBytesToEngine: tunnel.seededForwarder.bytes.toEngine,
  };
}

/**
 * Why a relay costs what it costs: what crosses per prompt and per token (a tap between
 * llama-server and the rpc-server, one request), what each mode adds per round trip (the recorded
 * decode step replayed to a fake engine through every mode, at the engines' pace — each side
 * spinning half the direct per-token time, so relays sleep between tokens as they do under
 * llama.cpp — and back to back), and the loss that predicts beside the one the trials measured.
 */
async function accountTraffic(rpcPort: number, tunnel: Tunnel, model: string, llamaServer: string, measured: Readonly<Partial<Record<Mode, MeasuredMode>>>) {
  const tap = await startRpcTap(rpcPort);
  try {
    await trial('direct', tap.port, model, llamaServer, { requests: 1, onWarm: tap.mark });
  } finally {
    tap.close();
  }
  const steps = tap.steps();
  const step: RpcStep | undefined = typicalDecodeStep(steps);
  const direct = measured.direct;
  if (!step || !direct) throw new Error('the tap saw no decode step');
  const { perPrompt, perToken, decodeSteps } = rpcAccounting(steps);
  const directMs = 1000 / direct.decodeTokensPerSecondMedian;
  const pace = { headMs: round(directMs / 2, 2), engineMs: round(directMs / 2, 2) };
  const atPace = await transportAdded(tunnel.replay, step, { rounds: 3, steps: 30, pace });
  const backToBack = await transportAdded(tunnel.replay, step, { rounds: 3, steps: 100, pace: { headMs: 0, engineMs: 0 } });
  const predicted = Object.entries(atPace).flatMap(([mode, a]) => {
    const m = measured[mode as Mode];
    return mode === 'direct' || !m ? [] : [[mode, predictedLoss(perToken, perPrompt, a.addedPerRoundTripMs, direct, m)]];
  });
  return {
    perPrompt,
    perToken,
    decodeSteps,
    roundTripsPerToken: perToken.roundTrips,
    addedPerRoundTripMs: Object.fromEntries(Object.entries(atPace).map(([mode, a]) => [mode, a.addedPerRoundTripMs])),
    replay: { pace, atPace, backToBack },
    predictedVsMeasured: Object.fromEntries(predicted),
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
    tunnel = await startTunnel(rpcPort, seededRpcPort, (await startFakeEngine()).port, work);
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
    const summary = summarise(trials, tunnel, loadAverage);
    const measured = Object.fromEntries(MODES.map((m) => [m, (summary as Partial<Record<Mode, MeasuredMode>>)[m]]));
    const out = { ...summary, preseeded: seeded, accounting: await accountTraffic(rpcPort, tunnel, model, bins.llamaServer, measured) };
    if (JSON_OUT) process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
    else {
      const { direct: d, tunnel: t } = out;
      process.stdout.write(
        `tunnel ÷ direct: tokens/s ${out.tokensPerSecondRatio} (${t.decodeTokensPerSecondMedian} vs ${d.decodeTokensPerSecondMedian}), ` +
          `TTFT +${out.ttftAddedMs} ms p50 (${t.ttftMsP50} vs ${d.ttftMsP50}), load ${out.loadSecondsRatio} (${t.loadSecondsMedian} s vs ${d.loadSecondsMedian} s), ` +
          `token ids identical: ${out.tokenIdsIdentical}; plain relay (no TLS) ÷ direct: ${JSON.stringify(out.plainRelay)}\n` +
          `round trips per token ${out.accounting.roundTripsPerToken}, per prompt ${out.accounting.perPrompt.roundTrips}; ms added per round trip ${JSON.stringify(out.accounting.addedPerRoundTripMs)}; ` +
          `predicted vs measured: ${JSON.stringify(out.accounting.predictedVsMeasured)}\n`,
      );
    }
  } finally {
    await tunnel?.forwarder.close();
    await tunnel?.seededForwarder.close();
    tunnel?.plain.server.close();
    tunnel?.worker.stdin?.end();
    for (const r of Object.values(tunnel?.native ?? {})) r.close();
    for (const close of tunnel?.closers ?? []) await close();
    killAll();
    await rm(work, { recursive: true, force: true });
  }
}

(argv.includes('--worker-listener') ? workerListener() : main()).catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  killAll();
  process.exit(1);
});
