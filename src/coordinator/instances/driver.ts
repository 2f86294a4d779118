import { randomUUID } from 'node:crypto';
import { errorMessage } from '../../shared/errors.ts';
import { logprobsFromWire } from '../../shared/generation.ts';
import type { Logger } from '../../shared/log.ts';
import { CoordinatorError } from '../errors.ts';
import type { AgentClient, AgentEvent, AgentGenerateRequest } from '../membership/agent-client.ts';
import type { NodeEntry } from '../membership/registry.ts';
import type { VerifyResult } from './llama/verify.ts';
import type { EngineFamily, GenerateEvent, GenerateRequest, LoadOptions, LoadProgress, PlacementResult } from './types.ts';

/**
 * One engine family's way of running a model instance, behind one interface: the runtime keeps
 * what every family shares (names, reservations, slots, states, events) and each family keeps its
 * processes, their arguments, their proof of placement, their request path and their shutdown
 * order in one place (llama/driver.ts: rpc-servers + llama-server; mlx/driver.ts: MLX ranks).
 *
 * The lifecycle of one instance, in the order the runtime drives it:
 *   plan     the shared planner (planner-adapter.ts) serves both families; a driver only narrows
 *            the load options to what it can serve (`fitOptions`)
 *   start    `driver.group(spec).start(load)`: the engines on the plan's nodes, each recorded
 *            before its StartEngine call so that a start that times out is still stopped
 *   verify   `group.verify(load)`: what the engines report against the plan; throws on mismatch
 *   generate `group.generate(request)`: the head engine's token stream
 *   stop     `group.stop()`: every engine, in the order the family needs
 * A group that loses an engine says so through `spec.gone(reason)`; what becomes of the instance
 * is the runtime's call (today it fails it; self-healing will re-place it). Every engine id is
 * `<spec.engineIdPrefix>-<role>`, so engines an agent still runs after a coordinator restart can be
 * traced to their instance and role: what re-adopting them would rebuild a group from.
 */
export interface EngineDriver {
  readonly family: EngineFamily;
  /** How the ready message counts the plan's stages ("stage(s)", "MLX rank(s)"). */
  readonly stageNoun: string;
  /** The options this family can serve (e.g. MLX ranks take one request at a time). */
  fitOptions(options: LoadOptions, model: string): LoadOptions;
  /** A new, empty group of engines for one instance. */
  group(spec: InstanceSpec): EngineGroup;
}

/** What a driver learns about the instance it runs. */
export interface InstanceSpec {
  readonly name: string;
  /** The model file (GGUF) or directory (MLX), as the head node opens it. */
  readonly path: string;
  readonly options: LoadOptions;
  /** Engine ids are `${engineIdPrefix}-<role>` (the runtime's cluster prefix and instance id). */
  readonly engineIdPrefix: string;
  /** Who starts the engines (the cluster id): the agents let only the same owner stop them. */
  readonly owner: string;
  /** An engine of the instance is gone, or the group can no longer serve: the reason names it. */
  gone(reason: string): void;
}

/** One load in progress, as a driver sees it. */
export interface LoadContext {
  readonly plan: PlacementResult;
  /** The registry entries of the plan's stages, in stage order (all up when the start began). */
  readonly nodes: readonly NodeEntry[];
  /** Weight bytes of the whole plan. */
  readonly bytesTotal: number;
  progress(phase: LoadProgress['phase'], message: string, bytesDone?: number): void;
  /** Throws when the load was aborted meanwhile (unload, a node of the plan went down). */
  assertLoading(): void;
  /** Seconds since the load began. */
  elapsedSeconds(): number;
}

/** Request fields every engine of an instance receives; the group adds the engine id. */
export type EngineRequest = Omit<AgentGenerateRequest, 'engineId'>;

/** A runtime request as every engine of the instance receives it; one fresh id per request (MLX ranks compare it). */
export function engineRequest(req: GenerateRequest): EngineRequest {
  return {
    prompt: req.prompt,
    maxTokens: req.maxTokens,
    temperature: req.temperature,
    topP: req.topP ?? 0,
    seed: req.seed ?? 0,
    stop: req.stop ?? [],
    requestId: randomUUID(),
    messagesJson: req.messages?.length ? JSON.stringify(req.messages.map((m) => ({ role: m.role, content: m.content }))) : '',
    logprobs: req.logprobs ?? false,
    topLogprobs: req.logprobs ? (req.topLogprobs ?? 0) : 0,
  };
}

export type EngineExit = Extract<AgentEvent, { kind: 'engine-exited' }>;

/** The engines of one instance. */
export interface EngineGroup {
  /** Every engine started or being started (empty again once stopped). */
  readonly engines: readonly EngineRef[];
  /** The engine that emits tokens (undefined until it is started). */
  readonly head: EngineRef | undefined;
  /** What the engines reported against the plan (llama.cpp's device check), once verified. */
  readonly verification: VerifyResult | undefined;
  /** How stage `i` of the plan is reached ('' when it has no endpoint of its own). */
  endpoint(stage: number): string;
  /** Links between its nodes bypass the agents' TLS tunnels (MLX over JACCL, allowed at load). */
  readonly untunnelledRdma: boolean;
  start(load: LoadContext): Promise<void>;
  verify(load: LoadContext): void;
  /** Opens the head's token stream for one request (after whatever the family needs first). */
  generate(req: EngineRequest): Promise<EngineStream>;
  /** An agent reported an unexpected exit; the group calls `spec.gone` if the engine was its own. */
  engineExited(nodeId: string, ev: EngineExit): void;
  stop(): Promise<void>;
  /**
   * Take over engines a previous coordinator started and verified (re-adoption, adoption.ts
   * checked them against the agents): nothing is started, stopped or reloaded.
   */
  adopt(a: AdoptedEngines): void;
}

/** What a group needs to serve engines it did not start itself. */
export interface AdoptedEngines {
  /** In the order they were recorded; exactly one is the head. */
  readonly engines: readonly (EngineRef & { readonly head: boolean })[];
  /** How each stage of the plan is reached, in stage order. */
  readonly endpoints: readonly string[];
  /** The verification the load did (llama.cpp), as stored. */
  readonly verification?: unknown;
}

/** One engine process an instance owns, as its node agent knows it. */
export interface EngineRef {
  readonly nodeId: string;
  readonly engineId: string;
  /** How messages name it: "rpc-server", "llama-server", "MLX rank 1". */
  readonly label: string;
}

/** What a driver may use of the cluster: the registry, the agents' clients, the log. */
export interface Cluster {
  readonly log: Logger;
  node(nodeId: string): NodeEntry | undefined;
  /** The node's agent client when it is connected. */
  agent(nodeId: string): AgentClient | undefined;
}

/** The agent of a connected node, or UNAVAILABLE naming the node. */
export function clientOf(cluster: Cluster, nodeId: string): AgentClient {
  const c = cluster.agent(nodeId);
  if (!c) throw new CoordinatorError('UNAVAILABLE', `node ${nodeId} is not connected`);
  return c;
}

/** One request's events from the head engine; iteration throws the agent's gRPC error as is. */
export interface EngineStream extends AsyncIterable<GenerateEvent> {
  cancel(): void;
}

/** The head agent's Generate stream, converted at this edge. */
export function headStream(client: AgentClient, engineId: string, req: EngineRequest): EngineStream {
  const call = client.generate({ engineId, ...req });
  return {
    cancel: () => call.cancel(),
    async *[Symbol.asyncIterator]() {
      for await (const m of call as AsyncIterable<Record<string, unknown>>) {
        const ev = generateEventFromWire(m);
        if (ev) yield ev;
      }
    },
  };
}

function generateEventFromWire(m: Record<string, unknown>): GenerateEvent | undefined {
  if (m.event === 'token') {
    const t = (m.token ?? {}) as Record<string, unknown>;
    const logprobs = logprobsFromWire(t.logprobs);
    return { kind: 'token', text: String(t.text ?? ''), tokenIds: Array.isArray(t.tokenIds) ? t.tokenIds.map(Number) : [], ...(logprobs.length > 0 ? { logprobs } : {}) };
  }
  if (m.event === 'done') {
    const d = (m.done ?? {}) as Record<string, unknown>;
    const t = (d.timings ?? {}) as Record<string, unknown>;
    return {
      kind: 'done',
      finishReason: String(d.finishReason ?? ''),
      promptTokens: Number(d.promptTokens ?? 0),
      completionTokens: Number(d.completionTokens ?? 0),
      timings: {
        promptMs: Number(t.promptMs ?? 0),
        predictedMs: Number(t.predictedMs ?? 0),
        promptTokensPerSecond: Number(t.promptTokensPerSecond ?? 0),
        predictedTokensPerSecond: Number(t.predictedTokensPerSecond ?? 0),
        firstTokenMs: Number(t.firstTokenMs ?? 0),
      },
    };
  }
  return undefined;
}

export function grpcMessage(err: unknown): string {
  const e = err as { details?: string; message?: string };
  return e?.details || errorMessage(err);
}

/**
 * The engines a group has started, and what every family does with them alike: record before
 * starting, attribute an exit, stop them all.
 */
export class EngineRoster {
  readonly list: EngineRef[] = [];
  head: EngineRef | undefined;

  constructor(
    private readonly cluster: Cluster,
    private readonly gone: (reason: string) => void,
    private readonly owner: string,
  ) {}

  record(e: EngineRef, isHead = false): void {
    this.list.push(e);
    if (isHead) this.head = e;
  }

  exited(nodeId: string, ev: EngineExit): void {
    const e = this.list.find((x) => x.engineId === ev.engineId && x.nodeId === nodeId);
    if (!e) return;
    const node = this.cluster.node(nodeId);
    const how = ev.signal ? `signal ${ev.signal}` : `exit code ${ev.exitCode}`;
    const last = ev.lastStderrLines.filter((l) => l.trim()).slice(-1)[0];
    this.gone(`${e.label} on node ${node?.profile.name ?? nodeId} (${nodeId}) exited (${how})${last ? `: ${last.trim()}` : ''}`);
  }

  /** Stop every engine: those `first` selects, then the rest (each batch at once). */
  async stop(first: (e: EngineRef) => boolean = () => false): Promise<void> {
    const engines = this.list.splice(0);
    await Promise.all(engines.filter(first).map((e) => this.#stopOne(e)));
    await Promise.all(engines.filter((e) => !first(e)).map((e) => this.#stopOne(e)));
  }

  async #stopOne(e: EngineRef): Promise<void> {
    const node = this.cluster.node(e.nodeId);
    const client = this.cluster.agent(e.nodeId);
    if (!node || !client || node.state === 'down') return; // a dead agent took its engines with it
    try {
      await client.stopEngine(e.engineId, this.owner, 8000);
    } catch (err) {
      this.cluster.log.warn({ engineId: e.engineId, node: node.profile.name, err: grpcMessage(err) }, 'could not stop engine');
    }
  }
}

/**
 * What every family's group shares: the roster of engines it started, the endpoint per stage, and
 * attributing an agent's exit report to its own engine. Families add start/verify/generate/stop.
 */
export abstract class RosterGroup {
  protected readonly roster: EngineRoster;
  protected readonly endpoints: string[] = [];

  constructor(cluster: Cluster, spec: InstanceSpec) {
    this.roster = new EngineRoster(cluster, spec.gone, spec.owner);
  }

  get engines(): readonly EngineRef[] {
    return this.roster.list;
  }

  get head(): EngineRef | undefined {
    return this.roster.head;
  }

  endpoint(stage: number): string {
    return this.endpoints[stage] ?? '';
  }

  /** Every link through a tunnel or on one machine unless a family says otherwise. */
  get untunnelledRdma(): boolean {
    return false;
  }

  engineExited(nodeId: string, ev: EngineExit): void {
    this.roster.exited(nodeId, ev);
  }

  adopt(a: AdoptedEngines): void {
    for (const e of a.engines) this.roster.record({ nodeId: e.nodeId, engineId: e.engineId, label: e.label }, e.head);
    this.endpoints.splice(0, this.endpoints.length, ...a.endpoints);
  }
}
