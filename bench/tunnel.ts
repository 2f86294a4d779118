/**
 * bench:tunnel — what the TLS 1.3 engine tunnel costs llama.cpp RPC. The same 2-stage split
 * (llama-server holds the first layers on its CPU, one ggml-rpc-server holds the last `--ngl`
 * layers), with llama-server's `--rpc` pointing either straight at the rpc-server (direct) or at
 * the head-side forwarder whose TLS session ends at the worker-side listener (tunnel), which
 * forwards to the same rpc-server. Both ends are the ones the agent runs: native/tunnel-relay
 * when `orchard setup` built it (`tunnelRelay: native`), else Node's (ORCHARD_TUNNEL_RELAY=node).
 * The two ends run in two processes, as on a cluster (the head's agent: this process; the
 * worker's agent: a child running only the listener, credentials on its stdin,
 * bench/lib/tunnel-worker.ts), by default over 127.0.0.1 — the network round trip is the same in
 * both modes, so the ratio is the tunnel's, at its worst: CPU is the only bottleneck and the relays
 * take it from the engines. `--link 1gbe|10gbe` puts the worker side (rpc-server, listener) in a
 * network namespace behind a link shaped as bench:lan shapes one (bench/lib/worker-side.ts):
 * direct dials the rpc-server across it, the tunnel's TLS crosses it; the rest is unchanged, and
 * `link` says which and what it carried.
 * A trial is a fresh llama-server: load time (spawn → /health, cold: every weight crosses the
 * route), then greedy completions with the prompt cache off: time to first token and decode
 * tokens/s at the client, token ids compared (bench/lib/llama-trial.ts).
 *
 * Paired, because on a 2-vCPU guest run-to-run noise was as large as the effect (session 8: two
 * idle runs minutes apart gave 0.936/+10.7 ms and 0.899/+6.0 ms, socat as far off): direct and
 * tunnel trials alternate ABBA (D T T D D T …), each pair two adjacent trials, so drift lands on
 * both members; each goal is the median over pairs of the per-pair ratio (tokens/s, load) or
 * difference (TTFT p50 of the pair's requests), with a 90 % percentile-bootstrap interval over
 * pairs (bench/lib/paired.ts) and a verdict: met (the whole interval meets the goal), missed, or
 * undecided. Pairs run until `--pairs` or the `--budget-seconds` for trials is spent (whole ABBA
 * blocks), so a run stays bounded under load and simply gets fewer pairs. What changed against
 * the 4 trials × 4 requests × 6 modes design, and why it measures the same thing:
 * * two modes instead of six: the controls (`plain`: the same two processes and relay code without
 *   TLS; `socat`, `stunnel` and the bare Go relay, bench/lib/native-relay.ts, when installed) and
 *   the pre-seeded loads run only with `--controls` (then in every block, bounded the same way);
 * * 2 requests × 16 tokens per trial instead of 4 × 32: a decode step costs the same at token 3 as
 *   at token 30 (one round trip per token, `accounting`), so the time goes into more pairs instead;
 *   the warm-up request (one-time graph set-up, never counted) decodes 2 tokens instead of 32;
 * * plus 4 one-token requests per trial for TTFT alone (`--ttft-probes`): a TTFT's own noise is
 *   several ms, the goal 2 ms, and a probe costs a prefill (~0.1 s), not a decode;
 * * the rpc-server, the relays, their TLS session cache and the model file are reused across
 *   trials, as before; each trial still starts its own llama-server, so every load is cold;
 * * /health is polled every 5 ms instead of 20 (a 20 ms step is 3 % of a 0.6 s load).
 * Then the accounting (`accounting`, bench/lib/rpc-traffic.ts): a tap counts what crosses per
 * prompt and per decoded token, the recorded decode step is replayed to a fake engine through
 * every mode that ran (`addedPerRoundTripMs`, at the engines' pace and back to back), and
 * `predictedVsMeasured` sets round trips × added ms against the trials.
 * Usage: npm run bench:tunnel -- [--json] [--pairs 60] [--budget-seconds 200] [--requests 2]
 *        [--tokens 16] [--ttft-probes 4] [--layers 8] [--dim 1024] [--ffn 2816] [--ngl 4] [--threads 1]
 *        [--legs unix|tcp] [--controls | --link 1gbe|10gbe]   (--link needs root: namespaces, tc)
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import type { Server } from 'node:net';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { createInterface } from 'node:readline';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { findLlamaBinaries } from '../src/node/llama/binaries.ts';
import { seedTensorCache } from '../src/node/llama/tensor-cache.ts';
import { unixEndpoint } from '../src/node/engine-sockets.ts';
import { type TunnelForwarder, type TunnelForwarderOptions, startTunnelForwarder } from '../src/node/tunnel/forwarder.ts';
import { findTunnelRelay, startNativeForwarder } from '../src/node/tunnel/native-forwarder.ts';
import { createClusterCa, createKeyAndCsr, issueCertificate } from '../src/shared/pki/certificates.ts';
import type { NodeCredentials } from '../src/shared/pki/store.ts';
import { freePort, killAll, start as startChild, track, waitPort } from './lib/children.ts';
import { type HeadRun, type HeadSetup, headTrial } from './lib/llama-trial.ts';
import { cpuSeconds, plainRelay, type TunnelRpc, unixRpcServer, workerListener } from './lib/tunnel-worker.ts';
import { buildGoRelay, type NativeRelay, nativeRelaysInstalled, processCpuSeconds, startGoRelay, startSocatRelay, startStunnelRelay } from './lib/native-relay.ts';
import { abbaOrder, pairedEstimate } from './lib/paired.ts';
import { type MeasuredMode, type Route, type RpcStep, predictedLoss, rpcAccounting, startFakeEngine, startRpcTap, transportAdded, typicalDecodeStep } from './lib/rpc-traffic.ts';
import { flag, median } from './lib/stats.ts';
import { isLinkName, LINK_BITS_PER_SECOND, type LinkName } from './lib/links.ts';
import { type WorkerSide, workerSide } from './lib/worker-side.ts';

/** An rpc-server (TCP transport only: RDMA would bypass the relays under test), its last 20 kB of output kept. */
const start = (cmd: string, args: string[], env: Record<string, string> = {}) => startChild(cmd, args, { env: { GGML_RPC_NO_RDMA: '1', ...env }, logBytes: 20_000 });

const ROOT = new URL('../', import.meta.url).pathname;
const argv = process.argv.slice(2);
const num = (name: string, def: number) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 && argv[i + 1] ? Number(argv[i + 1]) : def;
};
const JSON_OUT = argv.includes('--json');
const MAX_PAIRS = num('pairs', 60);
const BUDGET_SECONDS = num('budget-seconds', 200);
const LAYERS = num('layers', 8);
const DIM = num('dim', 1024);
const FFN = num('ffn', 2816);
const NGL = num('ngl', 4);
const THREADS = num('threads', 1);
const CONTROLS = argv.includes('--controls');
/**
 * `--legs unix|tcp`: the tunnel's plaintext legs (llama-server → head forwarder, worker listener →
 * rpc-server). `unix` (default) is what the agent runs: Unix-domain sockets (engine patch
 * ggml-rpc-unix-socket), the tunnel then has its own rpc-server listening on one; `tcp` is the
 * agent before them (127.0.0.1 ports, the rpc-server direct uses). `direct` is always raw
 * llama.cpp RPC over TCP: upstream's only transport.
 */
const LEGS = flag(argv, '--legs', 'unix');
/** `--link 1gbe|10gbe`: the worker side behind a shaped link (bench/lib/worker-side.ts); loopback without. */
const LINK = flag(argv, '--link', '');
const NATIVE = CONTROLS && nativeRelaysInstalled();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Pre-seeded load pairs (--controls): a side result, not a goal. */
const SEEDED_PAIRS = 4;

type Mode = 'direct' | 'plain' | 'tunnel' | 'socat' | 'stunnel' | 'go';
type NativeMode = 'socat' | 'stunnel' | 'go';
/** The modes besides the paired two, with `--controls`. */
const CONTROL_MODES: Mode[] = !CONTROLS ? [] : NATIVE ? ['plain', 'socat', 'stunnel', 'go'] : ['plain'];
async function issue(ca: Awaited<ReturnType<typeof createClusterCa>>, id: string): Promise<NodeCredentials> {
  const { keyPem, csrPem } = await createKeyAndCsr(id);
  const { certPem } = await issueCertificate(ca, csrPem, { role: 'node' });
  return { keyPem, certPem, caCertPem: ca.certPem };
}

interface Tunnel {
  /** Where the worker's end runs and how the head reaches it: loopback or across a link. */
  readonly side: WorkerSide;
  readonly forwarder: TunnelForwarder;
  /** The endpoint llama-server's `--rpc` names for the tunnel: the forwarder's socket or port. */
  readonly endpoint: string;
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
  readonly replay: Readonly<Partial<Record<Mode, Route>>>;
  /** What to close at the end. */
  readonly closers: (() => unknown)[];
}

/** Worker-side listener (child process on the worker side) + head-side forwarder (here) for one rpc-server. */
async function startTunnel(side: WorkerSide, rpcPort: number, tunnelRpc: TunnelRpc, seededRpcPort: number, replayPort: number, work: string): Promise<Tunnel> {
  const ca = await createClusterCa('bench-tunnel');
  const [cmd, args] = side.command(process.execPath, ['--import', 'tsx', new URL(import.meta.url).pathname, '--worker-listener']);
  const worker = track(spawn(cmd, args, { detached: true, stdio: ['pipe', 'pipe', 'inherit'] }));
  const replies = createInterface({ input: worker.stdout! })[Symbol.asyncIterator]();
  const exited = new Promise<never>((_, reject) => worker.once('exit', (code) => reject(new Error(`tunnel listener exited (${code})`))));
  const next = async <T>(): Promise<T> => JSON.parse(String((await Promise.race([replies.next(), exited])).value)) as T;
  const creds = { worker: await issue(ca, 'worker'), head: await issue(ca, 'head') };
  worker.stdin?.write(`${JSON.stringify({ credentials: creds.worker, host: side.host, rpcPort, tunnelRpc, seededRpcPort, replayPort })}\n`);
  const { port, plainPort, plainReplayPort, relay: workerRelay } = await next<{ port: number; plainPort: number; plainReplayPort: number; relay: 'native' | 'node' }>();
  // the head side the agent runs: the native relay when `orchard setup` built it, else Node's
  const relayBinary = findTunnelRelay();
  const forward = (enginePort: number, localSocket?: string) => {
    const o: TunnelForwarderOptions = {
      remote: { host: side.host, port },
      enginePort,
      expectPeer: { id: 'worker' },
      credentials: creds.head,
      onError: (m) => process.stderr.write(`tunnel: ${m}\n`),
      ...(localSocket !== undefined ? { localSocket } : {}),
    };
    return relayBinary ? startNativeForwarder(relayBinary, o) : startTunnelForwarder(o);
  };
  const headSocket = tunnelRpc.socket !== undefined ? join(dirname(tunnelRpc.socket), 'fwd-bench.sock') : undefined;
  const [forwarder, seededForwarder, replayForwarder] = [await forward(tunnelRpc.port, headSocket), await forward(seededRpcPort), await forward(replayPort)];
  const endpoint = forwarder.socket !== undefined ? unixEndpoint(forwarder.socket) : `127.0.0.1:${forwarder.port}`;
  const workerCpu = async () => {
    worker.stdin?.write('cpu\n');
    return (await next<{ cpuSeconds: number }>()).cpuSeconds;
  };
  const native = NATIVE ? await startNative(rpcPort, creds, work) : undefined;
  const nativeReplay = NATIVE ? await startNative(replayPort, creds, work) : undefined;
  const [atWorker, local] = [(port: number) => ({ host: side.host, port }), (port: number) => ({ host: '127.0.0.1', port })];
  const [plain, plainReplay] = [await plainRelay(atWorker(plainPort)), await plainRelay(atWorker(plainReplayPort))];
  const nativeRoutes = nativeReplay ? { socat: local(nativeReplay.socat.port), stunnel: local(nativeReplay.stunnel.port), go: local(nativeReplay.go.port) } : {};
  const replay = { direct: atWorker(replayPort), tunnel: local(replayForwarder.port), plain: local(plainReplay.port), ...nativeRoutes };
  const closers = [() => replayForwarder.close(), () => plainReplay.server.close(), ...Object.values(nativeReplay ?? {}).map((r) => () => r.close())];
  return { side, forwarder, endpoint, seededForwarder, worker, workerRelay, plain, workerCpu, ...(native ? { native } : {}), replay, closers };
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

const round = (x: number, d = 3) => Math.round(x * 10 ** d) / 10 ** d;

interface Trial extends HeadRun {
  mode: Mode;
  /** CPU seconds during the trial: this process (HTTP client; plus the forwarder when tunnelled), the worker's listener, both native relay ends. */
  cpu: { benchProcess: number; workerListener: number; nativeRelay: number };
}

/** One trial with the CPU both tunnel ends spent during it. */
async function measuredTrial(mode: Mode, rpcPort: number, tunnel: Tunnel, head: HeadSetup): Promise<Trial> {
  const native = mode === 'socat' || mode === 'stunnel' || mode === 'go' ? tunnel.native?.[mode] : undefined;
  // native processes of this mode: a control's two ends, or the tunnel's native head side
  const pids = native ? native.ends.map((e) => e.proc.pid ?? 0) : mode === 'tunnel' && tunnel.forwarder.pid ? [tunnel.forwarder.pid] : [];
  const nativeCpu = () => pids.reduce((sum, pid) => sum + processCpuSeconds(pid), 0);
  const [bench0, worker0, native0] = [cpuSeconds(), await tunnel.workerCpu(), nativeCpu()];
  // direct dials the worker's rpc-server itself (across the link, if any); every relay listens here
  const local = (port: number) => `127.0.0.1:${port}`;
  const endpoint = native ? local(native.port) : { direct: `${tunnel.side.host}:${rpcPort}`, plain: local(tunnel.plain.port), tunnel: tunnel.endpoint }[mode as 'direct' | 'plain' | 'tunnel'];
  const t = await headTrial(endpoint, head);
  if (native) await sleep(100); // socat's per-connection children exit and are reaped after llama-server stops
  const [bench1, worker1, native1] = [cpuSeconds(), await tunnel.workerCpu(), nativeCpu()];
  return { ...t, mode, cpu: { benchProcess: bench1 - bench0, workerListener: worker1 - worker0, nativeRelay: native1 - native0 } };
}

/**
 * Where the tunnel's time goes: the CPU seconds its two ends spent per trial. The forwarder runs
 * in this process next to the HTTP client both modes use, so its share is the tunnel − direct
 * difference; the listener process does nothing but tunnel. With the load average, sampled at
 * every pair: on a saturated machine every extra process hop also waits for a core.
 */
function cpuSummary(trials: readonly Trial[], loadAverages: readonly number[]) {
  const med = (mode: Mode, k: 'benchProcess' | 'workerListener' | 'nativeRelay') => median(trials.filter((t) => t.mode === mode).map((t) => t.cpu[k]));
  return {
    headForwarderSecondsPerTrial: round(med('tunnel', 'benchProcess') - med('direct', 'benchProcess') + med('tunnel', 'nativeRelay')),
    workerListenerSecondsPerTrial: round(med('tunnel', 'workerListener')),
    ...(NATIVE ? { nativeBothEndsSecondsPerTrial: { socat: round(med('socat', 'nativeRelay')), stunnel: round(med('stunnel', 'nativeRelay')), go: round(med('go', 'nativeRelay')) } } : {}),
    loadAverage1m: { start: round(loadAverages[0] ?? 0, 2), end: round(loadavg()[0] ?? 0, 2), max: round(Math.max(...loadAverages, loadavg()[0] ?? 0), 2) },
    cores: availableParallelism(),
  };
}

/** A mode's raw numbers and medians over all its trials (unpaired: what the controls are compared by). */
function modeStats(trials: readonly Trial[], mode: Mode) {
  const ts = trials.filter((t) => t.mode === mode);
  const cs = ts.flatMap((t) => t.completions);
  return {
    loadSeconds: ts.map((t) => round(t.loadSeconds)),
    ttftMs: ts.flatMap((t) => t.ttftMs.map((x) => round(x, 2))),
    decodeTokensPerSecond: cs.map((c) => round(c.decodeTokensPerSecond, 2)),
    loadSecondsMedian: round(median(ts.map((t) => t.loadSeconds))),
    ttftMsP50: round(median(ts.flatMap((t) => t.ttftMs)), 2),
    decodeTokensPerSecondMedian: round(median(cs.map((c) => c.decodeTokensPerSecond)), 2),
  };
}

/**
 * Between head and worker: `loopback`, or the shaped link's profile and rate, and the MB it carried
 * each way so far (setup and trials, both modes; its tbf counters: TLS records, TCP/IP headers and
 * ACKs included) — that the engines' traffic did cross it.
 */
function linkSummary(side: WorkerSide) {
  const carried = side.carried();
  const mb = (bytes: number) => round(bytes / 1e6, 1);
  return {
    profile: side.link,
    bitsPerSecond: side.link === 'loopback' ? null : LINK_BITS_PER_SECOND[side.link],
    carriedMegabytes: carried ? { toWorker: mb(carried.toWorker), toHead: mb(carried.toHead) } : null,
  };
}

/** Per pair: tunnel ÷ direct decode rate and load time, tunnel − direct TTFT p50 (of each trial's requests). */
function perPair(pairs: readonly { direct: Trial; tunnel: Trial }[]) {
  const tps = (t: Trial) => median(t.completions.map((c) => c.decodeTokensPerSecond));
  const ttft = (t: Trial) => median(t.ttftMs);
  return {
    tokensPerSecondRatio: pairs.map((p) => tps(p.tunnel) / tps(p.direct)),
    ttftAddedMs: pairs.map((p) => ttft(p.tunnel) - ttft(p.direct)),
    loadSecondsRatio: pairs.map((p) => p.tunnel.loadSeconds / p.direct.loadSeconds),
  };
}

function summarise(trials: readonly Trial[], pairs: readonly { direct: Trial; tunnel: Trial }[], tunnel: Pick<Tunnel, 'forwarder' | 'workerRelay' | 'side'>, head: HeadSetup, loadAverages: readonly number[]) {
  const per = perPair(pairs);
  const goals = {
    tokensPerSecondRatio: pairedEstimate(per.tokensPerSecondRatio, { op: '>=', value: 0.97 }),
    ttftAddedMs: pairedEstimate(per.ttftAddedMs, { op: '<', value: 2 }, 2),
    loadSecondsRatio: pairedEstimate(per.loadSecondsRatio, { op: '<=', value: 1.1 }),
  };
  const direct = modeStats(trials, 'direct');
  const versusDirect = (m: typeof direct) => ({
    tokensPerSecondRatio: round(m.decodeTokensPerSecondMedian / direct.decodeTokensPerSecondMedian),
    ttftAddedMs: round(m.ttftMsP50 - direct.ttftMsP50, 2),
    loadSecondsRatio: round(m.loadSecondsMedian / direct.loadSecondsMedian),
  });
  const controls = Object.fromEntries(CONTROL_MODES.map((m) => [m, { ...versusDirect(modeStats(trials, m)), raw: modeStats(trials, m) }]));
  const ids = trials.flatMap((t) => t.completions.map((c) => c.tokenIds.join(',')));
  return {
    bench: 'tunnel',
    /** Tunnelled ÷ direct, paired: the median over pairs (goals: ≥ 0.97, < 2 ms, ≤ 1.10). */
    tokensPerSecondRatio: goals.tokensPerSecondRatio.estimate,
    ttftAddedMs: goals.ttftAddedMs.estimate,
    loadSecondsRatio: goals.loadSecondsRatio.estimate,
    /** Each goal's estimate, 90 % bootstrap interval over pairs, and verdict (met / missed / undecided). */
    goals,
    link: linkSummary(tunnel.side),
    tokenIdsIdentical: ids.length > 0 && ids.every((x) => x === ids[0]),
    setup: { pairs: pairs.length, order: 'ABBA', requestsPerTrial: head.requests, tokens: head.tokens, ttftProbesPerTrial: head.ttftProbes, layers: LAYERS, dim: DIM, ffn: FFN, rpcLayers: NGL, threads: THREADS, controls: CONTROL_MODES },
    /** Which relays the agent (and so `tunnel`) runs at each end: native/tunnel-relay when `orchard setup` built it. */
    tunnelRelay: { head: tunnel.forwarder.pid ? 'native' : 'node', worker: tunnel.workerRelay },
    /**
     * The transport of each leg: direct is raw llama.cpp RPC (TCP, upstream's only transport); the
     * tunnel's plaintext legs per `--legs`, its middle TLS over TCP. The pre-seeded loads, the tap
     * and the replay (accounting) keep TCP plaintext legs.
     */
    transports: { direct: 'tcp', tunnel: { headLeg: tunnel.forwarder.socket !== undefined ? 'unix' : 'tcp', tls: 'tcp', workerLeg: LEGS === 'unix' ? 'unix' : 'tcp' } },
    tunnelBytes: { ...tunnel.forwarder.bytes, connections: tunnel.forwarder.connections(), resumedSessions: tunnel.forwarder.resumed() },
    tunnelCpu: cpuSummary(trials, loadAverages),
    /** The raw per-pair values the goals are medians of, in run order. */
    perPair: Object.fromEntries(Object.entries(per).map(([k, v]) => [k, v.map((x) => round(x, 3))])),
    direct,
    tunnel: modeStats(trials, 'tunnel'),
    /** With --controls, unpaired against direct: plain (the same relay without TLS), socat, stunnel, the bare Go relay. */
    ...(CONTROLS ? { controls } : {}),
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
async function seededLoads(seededRpcPort: number, tunnel: Tunnel, head: HeadSetup) {
  const loads: Record<'direct' | 'tunnel', number[]> = { direct: [], tunnel: [] };
  for (const pair of abbaOrder('direct' as const, 'tunnel' as const, SEEDED_PAIRS)) {
    for (const mode of pair) {
      const t = await headTrial(`127.0.0.1:${mode === 'direct' ? seededRpcPort : tunnel.seededForwarder.port}`, head, { loadOnly: true });
      loads[mode].push(round(t.loadSeconds));
    }
  }
  return {
    loadSecondsRatio: round(median(loads.tunnel.map((t, i) => t / loads.direct[i]!))),
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
async function accountTraffic(rpcPort: number, tunnel: Tunnel, head: HeadSetup, measured: Readonly<Partial<Record<Mode, MeasuredMode>>>) {
  const tap = await startRpcTap(rpcPort, tunnel.side.host);
  try {
    await headTrial(`127.0.0.1:${tap.port}`, head, { requests: 1, onWarm: tap.mark });
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
  const routes = Object.fromEntries(Object.entries(tunnel.replay).filter(([mode]) => mode in measured));
  const atPace = await transportAdded(routes, step, { rounds: 3, steps: 30, pace });
  const backToBack = await transportAdded(routes, step, { rounds: 3, steps: 100, pace: { headMs: 0, engineMs: 0 } });
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

/**
 * Direct and tunnel trials in ABBA pairs (with --controls, the control modes follow each block's
 * pair, in reverse every other block), until MAX_PAIRS or the trial budget is spent: whole
 * two-pair blocks, at least one.
 */
async function pairedTrials(rpcPort: number, tunnel: Tunnel, head: HeadSetup) {
  const trials: Trial[] = [];
  const pairs: { direct: Trial; tunnel: Trial }[] = [];
  const loadAverages = [loadavg()[0] ?? 0];
  const t0 = performance.now();
  for (const [first, second] of abbaOrder<Mode>('direct', 'tunnel', MAX_PAIRS)) {
    if (pairs.length % 2 === 0 && pairs.length > 0 && performance.now() - t0 > BUDGET_SECONDS * 1000) break;
    const controls = pairs.length % 4 < 2 ? CONTROL_MODES : [...CONTROL_MODES].reverse();
    const ran: Partial<Record<Mode, Trial>> = {};
    for (const mode of [first, second, ...(pairs.length % 2 === 0 ? controls : [])]) {
      const t = await measuredTrial(mode, rpcPort, tunnel, head);
      trials.push(t);
      ran[mode] = t;
      if (!JSON_OUT) process.stderr.write(`pair ${pairs.length + 1} ${mode}: load ${t.loadSeconds.toFixed(3)} s, ${t.completions.map((c) => `${c.ttftMs.toFixed(1)} ms ${c.decodeTokensPerSecond.toFixed(2)} tok/s`).join(', ')}\n`);
    }
    pairs.push({ direct: ran.direct!, tunnel: ran.tunnel! });
    loadAverages.push(loadavg()[0] ?? 0);
  }
  return { trials, pairs, loadAverages, seconds: round((performance.now() - t0) / 1000, 1) };
}

function report(out: ReturnType<typeof summarise> & { accounting: Awaited<ReturnType<typeof accountTraffic>> }): string {
  const g = (k: keyof typeof out.goals) => {
    const e = out.goals[k];
    return `${e.estimate} [${e.interval90.join(', ')}] ${e.goal}: ${e.verdict}`;
  };
  return (
    `tunnel ÷ direct (${out.link.profile}) over ${out.setup.pairs} ABBA pairs (median, 90 % bootstrap interval, goal, verdict): tokens/s ${g('tokensPerSecondRatio')}; ` +
    `TTFT added ms ${g('ttftAddedMs')}; load ${g('loadSecondsRatio')}; token ids identical: ${out.tokenIdsIdentical}; ` +
    `load average ${JSON.stringify(out.tunnelCpu.loadAverage1m)}\n` +
    `round trips per token ${out.accounting.roundTripsPerToken}, per prompt ${out.accounting.perPrompt.roundTrips}; ms added per round trip ${JSON.stringify(out.accounting.addedPerRoundTripMs)}; ` +
    `predicted vs measured: ${JSON.stringify(out.accounting.predictedVsMeasured)}\n`
  );
}

/** The tunnel's rpc-server: `--legs tcp` direct's own, `--legs unix` a second one on a socket (bench/lib/tunnel-worker.ts). */
async function tunnelRpcServer(side: WorkerSide, rpcServer: string, rpcPort: number, work: string): Promise<TunnelRpc> {
  if (LEGS === 'tcp') return { port: rpcPort };
  if (LEGS !== 'unix') throw new Error(`--legs ${LEGS}: unix or tcp`);
  return unixRpcServer(join(work, 'sockets'), await freePort(), (file, args) => start(...side.command(file, args)), rpcServer, ['-t', String(THREADS)]);
}

/** `--link`, checked: a profile bench:lan shapes to, and no controls (their relays and the pre-seeded rpc-server run next to the head). */
function chosenLink(): LinkName | undefined {
  if (!LINK) return undefined;
  if (!isLinkName(LINK)) throw new Error(`--link ${LINK}: one of ${Object.keys(LINK_BITS_PER_SECOND).join(', ')}`);
  if (CONTROLS) throw new Error('--controls runs on loopback only (without --link)');
  return LINK;
}

async function main(): Promise<void> {
  const link = chosenLink();
  const bins = await findLlamaBinaries();
  const work = await mkdtemp(join(tmpdir(), 'orchard-bench-tunnel-'));
  const model = join(work, 'split.gguf');
  const head: HeadSetup = { model, llamaServer: bins.llamaServer, ngl: NGL, threads: THREADS, tokens: num('tokens', 16), requests: num('requests', 2), ttftProbes: num('ttft-probes', 4) };
  let tunnel: Tunnel | undefined;
  let side: WorkerSide | undefined;
  try {
    side = workerSide(link);
    const gen = ['--out', model, '--layers', String(LAYERS), '--dim', String(DIM), '--ffn', String(FFN), '--type', 'f16'];
    await promisify(execFile)(process.execPath, [join(ROOT, 'bin/orchard.js'), 'testmodel', 'gguf', ...gen]);
    const rpcPort = await freePort();
    const rpc = start(...side.command(bins.rpcServer, ['-H', side.engineBind, '-p', String(rpcPort), '-t', String(THREADS)]));
    await waitPort(rpcPort, rpc.proc, rpc.log, 60_000, side.host);
    // the pre-seeded rpc-server only with --controls; without, its forwarder points at the cold one, unused
    const seededRpcPort = CONTROLS ? await seededRpcServer(model, work, bins.rpcServer) : rpcPort;
    const replayPort = (await startFakeEngine({ host: side.engineBind, command: side.command })).port;
    tunnel = await startTunnel(side, rpcPort, await tunnelRpcServer(side, bins.rpcServer, rpcPort, work), seededRpcPort, replayPort, work);
    const run = await pairedTrials(rpcPort, tunnel, head);
    const summary = { ...summarise(run.trials, run.pairs, tunnel, head, run.loadAverages), trialSeconds: run.seconds };
    const seeded = CONTROLS ? { preseeded: await seededLoads(seededRpcPort, tunnel, head) } : {};
    const measured = Object.fromEntries((['direct', 'tunnel', ...CONTROL_MODES] as Mode[]).map((m) => [m, modeStats(run.trials, m)]));
    const out = { ...summary, ...seeded, accounting: await accountTraffic(rpcPort, tunnel, head, measured) };
    process.stdout.write(JSON_OUT ? `${JSON.stringify(out, null, 2)}\n` : report(out));
  } finally {
    await tunnel?.forwarder.close();
    await tunnel?.seededForwarder.close();
    tunnel?.plain.server.close();
    tunnel?.worker.stdin?.end();
    for (const r of Object.values(tunnel?.native ?? {})) r.close();
    for (const close of tunnel?.closers ?? []) await close();
    killAll();
    side?.close();
    await rm(work, { recursive: true, force: true });
  }
}

(argv.includes('--worker-listener') ? workerListener() : main()).catch((err: unknown) => {
  process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  killAll();
  process.exit(1);
});
