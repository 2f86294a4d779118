/**
 * What crosses a llama.cpp RPC link per prompt and per decoded token, and what a relay adds to it
 * (bench:tunnel's accounting). A tap between llama-server and ggml-rpc-server parses the request
 * framing (`| cmd (1 byte) | size (u64 LE) | payload |`, ggml/src/ggml-rpc/ggml-rpc.cpp) and counts
 * commands, bytes each way and round trips (the head waiting for a reply: engine bytes after head
 * bytes). The recorded decode step is then replayed against a fake engine (fake-rpc-engine.ts)
 * straight and through each relay, written as ggml-rpc writes it (cmd, size and payload: three
 * send calls per command, with TCP_NODELAY on every socket — strace on both engines), so the
 * time a relay adds per token is measured with the real traffic, not a made-up size.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { type Server, type Socket, connect, createServer } from 'node:net';
import { createInterface } from 'node:readline';
import { median } from './stats.ts';
import { track } from './children.ts';

/** ggml-rpc's commands by wire byte (enum rpc_cmd in the pinned llama.cpp). */
export const RPC_COMMANDS = [
  'ALLOC_BUFFER',
  'GET_ALIGNMENT',
  'GET_MAX_SIZE',
  'BUFFER_GET_BASE',
  'FREE_BUFFER',
  'BUFFER_CLEAR',
  'SET_TENSOR',
  'SET_TENSOR_HASH',
  'GET_TENSOR',
  'COPY_TENSOR',
  'GRAPH_COMPUTE',
  'GET_DEVICE_MEMORY',
  'INIT_TENSOR',
  'GET_ALLOC_SIZE',
  'HELLO',
  'DEVICE_COUNT',
  'GRAPH_RECOMPUTE',
  'MEMSET_TENSOR',
] as const;
const GET_TENSOR = 8;
const COMPUTES = new Set([10, 16]); // GRAPH_COMPUTE, GRAPH_RECOMPUTE
/** fake-rpc-engine.ts's own command: how long this connection's graph computes spin (u32 LE ms). */
const SET_COMPUTE_MS = 0xff;
/** Payloads are kept for replay up to this size (decode steps are ~11 KB; weights during a load are not kept). */
const KEEP_PAYLOAD_BYTES = 1 << 20;

export interface RpcCommand {
  readonly cmd: number;
  readonly payload: Buffer;
}

/** One graph evaluation as seen on the wire: what the head sent, what came back, how often it waited. */
export interface RpcStep {
  readonly commands: RpcCommand[];
  upBytes: number;
  downBytes: number;
  roundTrips: number;
}

type TapEvent = { kind: 'up'; command: RpcCommand } | { kind: 'down'; bytes: number };

/** Splits the head → engine byte stream into commands. */
function commandParser(onCommand: (c: RpcCommand) => void): (chunk: Buffer) => void {
  let pending = Buffer.alloc(0);
  let header: { cmd: number; size: number } | undefined;
  const parts: Buffer[] = [];
  let got = 0;
  return (chunk) => {
    let c = chunk;
    while (c.length > 0) {
      if (!header) {
        pending = Buffer.concat([pending, c]);
        if (pending.length < 9) return;
        header = { cmd: pending[0]!, size: Number(pending.readBigUInt64LE(1)) };
        c = pending.subarray(9);
        pending = Buffer.alloc(0);
        [parts.length, got] = [0, 0];
      }
      const take = Math.min(header.size - got, c.length);
      if (header.size <= KEEP_PAYLOAD_BYTES) parts.push(c.subarray(0, take));
      got += take;
      c = c.subarray(take);
      if (got === header.size) {
        onCommand({ cmd: header.cmd, payload: header.size <= KEEP_PAYLOAD_BYTES ? Buffer.concat(parts) : Buffer.alloc(0) });
        header = undefined;
      }
    }
  };
}

export interface RpcTap {
  readonly port: number;
  /** Start recording (a request begins): what crossed before is dropped. */
  mark(): void;
  /** The recording so far, cut into steps: a new step starts with the first command after a compute was answered. */
  steps(): RpcStep[];
  close(): void;
}

/** A plain TCP relay (on 127.0.0.1) to `targetHost` that records the ggml-rpc traffic through it (not timed: for counting only). */
export async function startRpcTap(targetPort: number, targetHost = '127.0.0.1'): Promise<RpcTap> {
  let events: TapEvent[] = [];
  let recording = false;
  const sockets = new Set<Socket>();
  const server: Server = createServer({ noDelay: true }, (head) => {
    const engine = connect({ host: targetHost, port: targetPort, noDelay: true });
    for (const s of [head, engine]) {
      sockets.add(s);
      s.on('error', () => {
        head.destroy();
        engine.destroy();
      });
      s.once('close', () => sockets.delete(s));
    }
    const parse = commandParser((command) => {
      if (recording) events.push({ kind: 'up', command });
    });
    head.on('data', (chunk: Buffer) => {
      parse(chunk);
      engine.write(chunk);
    });
    engine.on('data', (chunk: Buffer) => {
      if (recording) events.push({ kind: 'down', bytes: chunk.length });
      head.write(chunk);
    });
    head.once('end', () => engine.end());
    engine.once('end', () => head.end());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return {
    port: (server.address() as { port: number }).port,
    mark: () => {
      [events, recording] = [[], true];
    },
    steps: () => cutSteps(events),
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

function cutSteps(events: readonly TapEvent[]): RpcStep[] {
  const steps: RpcStep[] = [];
  let cur: RpcStep | undefined;
  let computed = false;
  let answered = false;
  let last: 'up' | 'down' | undefined;
  for (const e of events) {
    if (e.kind === 'up') {
      if (!cur || (computed && answered)) {
        cur = { commands: [], upBytes: 0, downBytes: 0, roundTrips: 0 };
        steps.push(cur);
        [computed, answered] = [false, false];
      }
      cur.commands.push(e.command);
      cur.upBytes += 9 + e.command.payload.length;
      computed ||= COMPUTES.has(e.command.cmd);
    } else if (cur) {
      cur.downBytes += e.bytes;
      if (last === 'up') cur.roundTrips += 1;
      answered ||= computed;
    }
    last = e.kind;
  }
  return steps;
}

const round = (x: number, d = 3) => Math.round(x * 10 ** d) / 10 ** d;

function describe(steps: readonly RpcStep[]) {
  const n = Math.max(1, steps.length);
  const sum = (f: (s: RpcStep) => number) => steps.reduce((a, s) => a + f(s), 0) / n;
  const commands: Record<string, number> = {};
  for (const s of steps) for (const c of s.commands) commands[RPC_COMMANDS[c.cmd] ?? `cmd${c.cmd}`] = (commands[RPC_COMMANDS[c.cmd] ?? `cmd${c.cmd}`] ?? 0) + 1 / n;
  return {
    roundTrips: round(sum((s) => s.roundTrips), 2),
    commands: Object.fromEntries(Object.entries(commands).map(([k, v]) => [k, round(v, 2)])),
    /** ggml-rpc sends each command as three writes (cmd byte, size, payload). */
    headWrites: round(sum((s) => s.commands.length * 3), 1),
    upBytes: Math.round(sum((s) => s.upBytes)),
    downBytes: Math.round(sum((s) => s.downBytes)),
  };
}

/** Per prompt (the first step after mark: everything up to the first token) and per decoded token (the rest). */
export function rpcAccounting(steps: readonly RpcStep[]) {
  const [prompt, ...decode] = steps;
  return { perPrompt: describe(prompt ? [prompt] : []), perToken: describe(decode), decodeSteps: decode.length };
}

/** The decode step to replay: the most common shape among the recorded ones (the first decode step sends a new graph). */
export function typicalDecodeStep(steps: readonly RpcStep[]): RpcStep | undefined {
  const decode = steps.slice(1);
  const key = (s: RpcStep) => s.commands.map((c) => `${c.cmd}:${c.payload.length}`).join(',');
  const counts = new Map<string, number>();
  for (const s of decode) counts.set(key(s), (counts.get(key(s)) ?? 0) + 1);
  const best = [...counts.entries()].sort((a, b) => b[1] - a[1])[0]?.[0];
  return decode.find((s) => key(s) === best);
}

/** What the fake engine sends back for a step: GET_TENSOR answers `| size | data |`, the rest nothing. */
export function replyBytes(step: RpcStep): number {
  return step.commands.filter((c) => c.cmd === GET_TENSOR).reduce((a, c) => a + 8 + Number(c.payload.readBigUInt64LE(c.payload.length - 8)), 0);
}

/**
 * The fake engine (fake-rpc-engine.ts) in its own process, as a worker's rpc-server is: bound to
 * `host`, run through `command` (bench:tunnel's worker side: a namespace behind a link).
 */
export async function startFakeEngine(o: { host?: string; command?: (cmd: string, args: readonly string[]) => [string, string[]] } = {}): Promise<{ port: number; proc: ChildProcess }> {
  const path = new URL('./fake-rpc-engine.ts', import.meta.url).pathname;
  const command = o.command ?? ((cmd: string, args: readonly string[]): [string, string[]] => [cmd, [...args]]);
  const [cmd, args] = command(process.execPath, ['--import', 'tsx', path, '--host', o.host ?? '127.0.0.1']);
  const proc = track(spawn(cmd, args, { detached: true, stdio: ['ignore', 'pipe', 'inherit'] }));
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: proc.stdout! }).once('line', resolve);
    proc.once('exit', (code) => reject(new Error(`fake rpc engine exited (${code})`)));
  });
  return { port: (JSON.parse(line) as { port: number }).port, proc };
}

const spin = (ms: number) => {
  const until = performance.now() + ms;
  while (performance.now() < until);
};

/** Where a replay connects: the fake engine itself (`direct`) or a relay in front of it. */
export interface Route {
  readonly host: string;
  readonly port: number;
}

/** How long each side computes per token in a replay: spinning, so its core is busy as an engine's is. */
export interface ReplayPace {
  readonly headMs: number;
  readonly engineMs: number;
}

/**
 * Replay `step` `count` times on one connection to `to`, the head spinning `headMs` before each
 * (llama-server's layers and sampling) and the engine `engineMs` on its compute; returns ms per
 * step from its first write to its last reply byte (the engine's compute included: compare routes,
 * not absolute values).
 */
export async function replaySteps(to: Route, step: RpcStep, count: number, pace: ReplayPace): Promise<number[]> {
  const s = connect({ host: to.host, port: to.port, noDelay: true });
  await new Promise<void>((resolve, reject) => s.once('connect', resolve).once('error', reject));
  const control = Buffer.alloc(13);
  control.writeUInt8(SET_COMPUTE_MS, 0);
  control.writeBigUInt64LE(4n, 1);
  control.writeUInt32LE(Math.round(pace.engineMs), 9);
  s.write(control);
  const want = replyBytes(step);
  const times: number[] = [];
  try {
    for (let i = 0; i < count + 2; i++) {
      spin(pace.headMs);
      const got = new Promise<void>((resolve, reject) => {
        let n = 0;
        const timer = setTimeout(() => reject(new Error(`replay: ${n} of ${want} reply bytes after 10 s`)), 10_000);
        const onData = (c: Buffer) => {
          n += c.length;
          if (n < want) return;
          clearTimeout(timer);
          s.off('data', onData);
          resolve();
        };
        s.on('data', onData);
      });
      const t0 = performance.now();
      for (const c of step.commands) {
        const size = Buffer.alloc(8);
        size.writeBigUInt64LE(BigInt(c.payload.length));
        s.write(Buffer.from([c.cmd]));
        s.write(size);
        s.write(c.payload);
      }
      await got;
      if (i >= 2) times.push(performance.now() - t0); // the first two warm the route (TLS session, buffers)
    }
  } finally {
    s.destroy();
  }
  return times;
}

/**
 * The replay over every route, interleaved round by round (ABC CBA…); per route the median ms per
 * step and what it adds to `direct` per token and per round trip.
 */
export async function transportAdded(routes: Readonly<Record<string, Route>>, step: RpcStep, o: { rounds: number; steps: number; pace: ReplayPace }) {
  const names = Object.keys(routes);
  const times: Record<string, number[]> = {};
  for (let r = 0; r < o.rounds; r++) {
    for (const name of r % 2 === 0 ? names : [...names].reverse()) times[name] = [...(times[name] ?? []), ...(await replaySteps(routes[name]!, step, o.steps, o.pace))];
  }
  const direct = median(times.direct ?? [0]);
  const roundTrips = Math.max(1, step.roundTrips);
  return Object.fromEntries(
    names.map((name) => {
      const added = median(times[name]!) - direct;
      return [name, { stepMsP50: round(median(times[name]!)), addedPerTokenMs: round(added), addedPerRoundTripMs: round(added / roundTrips) }];
    }),
  );
}

/** A mode's decode rate and time to first token, as bench:tunnel's trials measured them. */
export interface MeasuredMode {
  readonly decodeTokensPerSecondMedian: number;
  readonly ttftMsP50: number;
}

/**
 * The relay's cost as the accounting predicts it (round trips × ms it adds per round trip, from the
 * replay at the engines' pace) beside what the trials measured against direct.
 */
export function predictedLoss(perToken: { roundTrips: number }, perPrompt: { roundTrips: number }, addedPerRoundTripMs: number, direct: MeasuredMode, relay: MeasuredMode) {
  const directMs = 1000 / direct.decodeTokensPerSecondMedian;
  const predictedMs = perToken.roundTrips * addedPerRoundTripMs;
  return {
    perTokenLossMs: { predicted: round(predictedMs), measured: round(1000 / relay.decodeTokensPerSecondMedian - directMs) },
    tokensPerSecondRatio: { predicted: round(directMs / (directMs + predictedMs)), measured: round(relay.decodeTokensPerSecondMedian / direct.decodeTokensPerSecondMedian) },
    ttftAddedMs: { predicted: round(perPrompt.roundTrips * addedPerRoundTripMs, 2), measured: round(relay.ttftMsP50 - direct.ttftMsP50, 2) },
  };
}
