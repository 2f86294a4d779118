import { execFile, spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { cpus } from 'node:os';
import { performance } from 'node:perf_hooks';
import { z } from 'zod';
import { OrchardError } from '../shared/errors.ts';
import { readGgufHeader } from '../shared/gguf/reader.ts';
import { modelProfile } from '../shared/model/profile.ts';
import type { CpuSnapshot } from '../shared/placement/calibration.ts';
import { type LlamaServerOptions, llamaMemoryArgs } from '../shared/placement/llama-args.ts';
import { DEFAULT_PLACEMENT_OPTIONS } from '../shared/placement/types.ts';
import { makeScratchDir } from '../shared/scratch-dir.ts';
import { ssePayloads } from '../shared/sse.ts';
import { findLlamaBinaries, type LlamaBinaries } from './llama/binaries.ts';
import { llamaServerArgs } from './engine-spec.ts';
import { waitEngineReady } from './engine-readiness.ts';
import { type LoopbackTunnel, startLoopbackTunnel } from './calibration-tunnel.ts';
import { rpcServerSocket, unixEndpoint } from './engine-sockets.ts';
import { EnginePortAllocator, engineRangeOf, onceMoreIfPortTaken, portTakenOr } from './ports.ts';
import { EngineWatchdog } from './watchdog.ts';

/**
 * The engine a node measures itself on (calibrate.ts) and `orchard demo` and bench:lan keep up
 * beside a cluster: llama-server started exactly as the agents start a stage, its rates and the
 * CPU counters its windows are judged by.
 */

/** The context every calibration engine runs with. */
export const CALIBRATION_CTX = 1024;

const ratesSchema = z.object({ timings: z.object({ prompt_per_second: z.number().optional(), predicted_per_second: z.number().positive(), predicted_n: z.number().optional() }).loose() }).loose();

/** llama-server's own rates for one request. */
export interface EngineRates {
  readonly prompt: number;
  readonly decode: number;
  readonly decodeTokens: number;
}

/**
 * A llama-server started as the agents start theirs, kept for several requests: the calibration's
 * windows, and `orchard demo`'s, which alternates its windows with the cluster's.
 */
export interface CalibrationEngine {
  /**
   * Its processes (llama-server and, on a CPU-only build, its rpc-server), each its own group; a
   * sentinel ends them if the process that started them dies, SIGKILL included.
   */
  readonly pids: readonly number[];
  /** Their ports, from the engine port range (127.0.0.1), in the order of `pids`. */
  readonly ports: readonly number[];
  readonly model: string;
  readonly threads: number;
  readonly engineBuild: string;
  /** One request (the body as given; streamed or not); the rates llama-server reports for it. */
  request(body: Record<string, unknown>, signal?: AbortSignal): Promise<EngineRates>;
  /** CPU counters now: the machine's busy time and this engine's. */
  cpu(): Promise<CpuSnapshot>;
  /** With `tunnelledStages`: the agents' link probe over this engine's first tunnel (calibration-tunnel.ts). */
  probeRttSeconds?(): Promise<number>;
  stop(): void;
}

/** The rates of a streamed response are in its last event carrying `timings`. */
async function ratesOf(res: Response, streamed: boolean): Promise<EngineRates> {
  let raw: unknown;
  if (streamed && res.body) {
    for await (const data of ssePayloads(res.body)) {
      const event = JSON.parse(data) as { timings?: unknown };
      if (event.timings) raw = event;
    }
  } else raw = await res.json();
  const t = ratesSchema.parse(raw).timings;
  return { prompt: t.prompt_per_second ?? 0, decode: t.predicted_per_second, decodeTokens: t.predicted_n ?? 0 };
}

const HOST = '127.0.0.1';

/**
 * Start `file` on `port` in its own process group (a Ctrl-C on the terminal reaches only the
 * caller, which stops it in order), registered with `watchdog` so it dies with the caller even
 * when that is SIGKILLed; `stop` kills the group.
 */
function startDetached(file: string, argv: readonly string[], port: number, env: NodeJS.ProcessEnv, watchdog: EngineWatchdog) {
  const child = spawn(file, argv, { detached: true, stdio: 'ignore', env: { PATH: env.PATH ?? '' } });
  const pid = child.pid;
  if (pid !== undefined) watchdog.add(pid);
  let exited = false;
  child.once('exit', () => {
    exited = true;
    if (pid !== undefined) watchdog.remove(pid);
  });
  return {
    pid: pid ?? 0,
    port,
    exited: () => exited,
    stop() {
      try {
        if (pid !== undefined && !exited) process.kill(-pid, 'SIGKILL');
      } catch {}
      // Killed: the sentinel must not signal the pid again (it could be recycled by then).
      if (pid !== undefined) watchdog.remove(pid);
    },
  };
}

export interface CalibrationEngineOptions {
  /**
   * Where its ports come from: the node's engine port range, as for the agent's engines (default:
   * this machine's, engine-port-range.ts) — a port 0 answer could be taken by any outgoing
   * connection before the engine binds it.
   */
  readonly ports?: EnginePortAllocator;
  /**
   * Local rpc-servers the layers are split over, evenly, earlier ones taking the remainder
   * (default 1; Linux only): where a split pays its per-token fixed cost (bench/decode-depth.ts).
   */
  readonly rpcServers?: number;
  /**
   * How many of the first stages the head reaches through a loopback engine tunnel (listener and
   * forwarder as two agents run them, calibration-tunnel.ts) instead of the rpc-server's socket
   * (default 0; fewer than `rpcServers`): where a tunnelled boundary pays its per-token cost.
   */
  readonly tunnelledStages?: number;
}

/** Layers per stage of `layers` split evenly over `stages`, earlier stages taking the remainder. */
export function evenLayerSplit(layers: number, stages: number): number[] {
  if (!Number.isInteger(stages) || stages < 1 || stages > layers) throw new OrchardError(`cannot split ${layers} layers over ${stages} stages`);
  return Array.from({ length: stages }, (_, i) => Math.floor(layers / stages) + (i < layers % stages ? 1 : 0));
}

/**
 * Start the engine (default: on the generated calibration model) with `threads` threads, exactly
 * as a stage of a plan runs it: llama-server with the agents' flags (llamaServerArgs,
 * llamaMemoryArgs: flash attention, f16 KV, no CPU repack … — without --no-repack this machine's
 * f16 weights went to AMX kernels the stages never use) and, on a CPU-only build, every layer and
 * the output on a ggml-rpc-server (on a Unix-domain socket, as the agent's), as the coordinator places a CPU head's own layers
 * (instances/llama/layout.ts). Measured alternately on the demo model (1 thread, load average ~4):
 * llama-server's own CPU backend 10.5 ms per token, the same layers behind one local rpc-server
 * 13.8 ms, three rpc-servers (the demo's split, direct) 16.1 ms, the demo's cluster 17.0 ms; the
 * CPU-backend calibration left the ~3 ms every RPC-run stage pays out of every prediction.
 * On macOS the head's stage runs on Metal inside llama-server; this measures the CPU there (-ngl 0).
 * Like the agent's launches, it starts once more on fresh ports when another process took one.
 */
export async function startEngineOn(path: string, threads: number, env: NodeJS.ProcessEnv = process.env, o: CalibrationEngineOptions = {}): Promise<CalibrationEngine> {
  const bins = await findLlamaBinaries(env);
  const ports = o.ports ?? new EnginePortAllocator(engineRangeOf(undefined, env));
  const stages = { rpcServers: o.rpcServers ?? 1, tunnelled: o.tunnelledStages ?? 0 };
  if (!(Number.isInteger(stages.tunnelled) && stages.tunnelled >= 0 && stages.tunnelled < stages.rpcServers)) {
    throw new OrchardError(`a calibration engine tunnels fewer stages than it has rpc-servers (${stages.tunnelled} of ${stages.rpcServers})`);
  }
  return onceMoreIfPortTaken(() => startCalibrationProcesses(bins, path, threads, env, ports, stages));
}

/** llama-server's arguments for `split` layers over local rpc-servers on `rpcPorts`; the last holds the output layer too, as a CPU head's own stage does (layout.ts). */
function localStageArgs(path: string, memory: LlamaServerOptions['memory'], split: readonly number[], rpcPorts: readonly number[], sockets: readonly string[]): string[] {
  const stage = {
    modelPath: path,
    memory,
    rpc: rpcPorts.map((enginePort) => ({ nodeId: 'calibration', enginePort })),
    devices: split.map((_, i) => `RPC${i}`),
    tensorSplit: split.map((n, i) => n + (i === split.length - 1 ? 1 : 0)),
    gpuLayers: split.reduce((a, b) => a + b, 0) + 1,
    debugLog: false,
  };
  return llamaServerArgs(stage, sockets.map(unixEndpoint));
}

/** As the agent waits for its engines (engine-readiness.ts): accepting, and the engine itself. */
function ready(kind: 'rpc-server' | 'llama-server', p: ReturnType<typeof startDetached>, timeoutMs: number, gone: () => boolean, socket?: string) {
  return waitEngineReady({
    kind,
    host: HOST,
    port: p.port,
    pid: p.pid,
    socket,
    deadlineMs: Date.now() + timeoutMs,
    output: null,
    gone: () => (gone() ? new OrchardError(`${kind} exited before it was ready`) : undefined),
    timedOut: () => new OrchardError(`${kind} did not accept connections within ${timeoutMs / 1000} s`),
  });
}

async function startCalibrationProcesses(
  bins: LlamaBinaries,
  path: string,
  threads: number,
  env: NodeJS.ProcessEnv,
  ports: EnginePortAllocator,
  stages: { readonly rpcServers: number; readonly tunnelled: number },
): Promise<CalibrationEngine> {
  const memory = { ...DEFAULT_PLACEMENT_OPTIONS, ctx: CALIBRATION_CTX, parallel: 1 };
  const procs: ReturnType<typeof startDetached>[] = [];
  const held: number[] = [];
  const take = async () => {
    held.push(await ports.take(HOST));
    return held.at(-1)!;
  };
  // The engines' own sentinel (watchdog.ts), as the agent's engines have: 20 calibration engines
  // of killed demos and agents were found still running after one session before it.
  const watchdog = new EngineWatchdog({ graceTicks: 5 });
  // The rpc-servers listen on Unix-domain sockets in a private directory, as the agent's do.
  let socketDir: string | undefined;
  const tunnels: LoopbackTunnel[] = [];
  const stop = () => {
    for (const p of procs) p.stop();
    for (const t of tunnels.splice(0)) t.stop();
    watchdog.close();
    for (const p of held.splice(0)) ports.release(p);
    if (socketDir !== undefined) rmSync(socketDir, { recursive: true, force: true });
  };
  const port = await take();
  const url = `http://${HOST}:${port}`;
  try {
    let argv = ['-m', path, ...llamaMemoryArgs(memory), '-ngl', '0'];
    if (process.platform !== 'darwin') {
      const layers = modelProfile(await readGgufHeader(path)).layerCount;
      const split = evenLayerSplit(layers, stages.rpcServers);
      const rpcPorts: number[] = [];
      const sockets: string[] = [];
      socketDir = await makeScratchDir('orchard-sock-');
      for (let i = 0; i < split.length; i++) {
        rpcPorts.push(await take());
        sockets.push(rpcServerSocket(socketDir, rpcPorts[i]!));
        const rpc = startDetached(bins.rpcServer, ['-H', unixEndpoint(sockets[i]!), '-t', String(threads)], rpcPorts[i]!, env, watchdog);
        procs.push(rpc);
        await ready('rpc-server', rpc, 30_000, rpc.exited, sockets[i]);
      }
      const endpoints = [...sockets];
      for (let i = 0; i < stages.tunnelled; i++) {
        tunnels.push(await startLoopbackTunnel(rpcPorts[i]!, sockets[i]!, socketDir, env));
        endpoints[i] = tunnels[i]!.socket;
      }
      argv = localStageArgs(path, memory, split, rpcPorts, endpoints);
    }
    const server = startDetached(bins.llamaServer, [...argv, '--threads', String(threads), '--host', HOST, '--port', String(port)], port, env, watchdog);
    procs.push(server);
    await ready('llama-server', server, 120_000, () => procs.some((p) => p.exited()));
  } catch (err) {
    const died = procs.filter((p) => p.exited());
    stop();
    // One that died before it was ready, its port bound by another process now: taken.
    for (const p of died) {
      const why = await portTakenOr(err, HOST, p.port);
      if (why !== err) throw why;
    }
    throw err;
  }
  return {
    pids: procs.map((p) => p.pid),
    ports: procs.map((p) => p.port),
    model: path,
    threads,
    engineBuild: bins.build,
    async request(body, signal) {
      const res = await fetch(`${url}/completion`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), ...(signal ? { signal } : {}) });
      if (!res.ok) throw new OrchardError(`calibration request failed: HTTP ${res.status}`);
      return ratesOf(res, body.stream === true);
    },
    cpu: () => cpuSnapshot(procs.map((p) => p.pid)),
    ...(tunnels[0] ? { probeRttSeconds: tunnels[0].probeRttSeconds } : {}),
    stop,
  };
}

/** CPU seconds a process has used: /proc on Linux, ps elsewhere (macOS). */
async function processCpuSeconds(pid: number): Promise<number> {
  try {
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th, in USER_HZ (100 on Linux).
    const fields = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {}
  const out = await new Promise<string>((res) => execFile('ps', ['-o', 'time=', '-p', String(pid)], (_, stdout) => res(String(stdout ?? ''))));
  // [[dd-]hh:]mm:ss[.xx]
  const [days, rest] = out.trim().includes('-') ? out.trim().split('-') : ['0', out.trim()];
  return (rest ?? '').split(':').reduce((t, part) => t * 60 + Number(part), 0) + Number(days) * 86400 || 0;
}

/**
 * Seconds a process's threads have waited, runnable, for a CPU (Linux /proc/<pid>/task/<tid>/schedstat,
 * second field, ns). 0 where there is no schedstat (macOS): the figure is then the plain wall-clock one.
 */
async function processWaitSeconds(pid: number): Promise<number> {
  try {
    const tids = await readdir(`/proc/${pid}/task`);
    const waits = await Promise.all(tids.map((t) => readFile(`/proc/${pid}/task/${t}/schedstat`, 'utf8').then((x) => Number(x.split(' ')[1]) / 1e9, () => 0)));
    return waits.reduce((a, b) => a + (Number.isFinite(b) ? b : 0), 0);
  } catch {
    return 0;
  }
}

async function cpuSnapshot(enginePids: readonly number[]): Promise<CpuSnapshot> {
  const busyMs = cpus().reduce((t, c) => t + c.times.user + c.times.nice + c.times.sys + c.times.irq, 0);
  const [engine, waits] = await Promise.all([Promise.all(enginePids.map(processCpuSeconds)), Promise.all(enginePids.map(processWaitSeconds))]);
  const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  return { wallSeconds: performance.now() / 1000, machineBusySeconds: busyMs / 1000, engineSeconds: sum(engine), engineWaitSeconds: sum(waits) };
}

