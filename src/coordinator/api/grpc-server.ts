import * as grpc from '@grpc/grpc-js';
import { z } from 'zod';
import { errorMessage } from '../../shared/errors.ts';
import { checkGenerateRequest, coordinatorGenerateRequestSchema, logprobsToWire } from '../../shared/generation.ts';
import { liveToWire, profileToWire } from '../../shared/hardware-wire.ts';
import type { Logger } from '../../shared/log.ts';
import { createGrpcServer } from '../../shared/grpc-server.ts';
import { orchardV1 } from '../../shared/proto.ts';
import { CoordinatorError, toServiceError } from '../errors.ts';
import { type TlsCredentials, authenticate, clusterServerCredentials } from '../../shared/pki/grpc-tls.ts';
import type { EnrollRequest, Enrollment } from '../membership/enroll.ts';
import type { DiscoveredAgent, Membership } from '../membership/membership.ts';
import type { NodeEntry } from '../membership/registry.ts';
import type { StateStoreInfo } from '../nats/cluster-state.ts';
import type { GenerateEvent, LoadProgress, ModelStatus, Runtime } from '../instances/runtime.ts';
import type { LinkMeasurement } from '../../shared/placement/links.ts';
import type { Objective } from '../../shared/placement/types.ts';
import { parseParallelism } from '../../shared/placement/parallelism.ts';
import { PlanDoesNotFitError } from '../instances/planner-adapter.ts';
import type { AccessControl } from './access.ts';
import { guardService } from './grpc-access.ts';
import type { RoleView } from '../leader/roles.ts';
import { type GrpcRelay, leaderToWire } from './forwarding.ts';

export function roleToWire(v: RoleView): { role: string; leader: Record<string, string> | undefined } {
  return { role: v.role, leader: leaderToWire(v.leader) };
}

/**
 * `orchard.v1.Coordinator` over gRPC: validates at the edge (zod), delegates to membership and
 * the runtime, maps domain errors to statuses. Join needs a join token or the node's own
 * certificate (enroll.ts); every other method an admin certificate or an API key with its scope
 * (grpc-access.ts, applied to the whole service table). Served over TLS with the coordinator's
 * cluster certificate.
 */
export interface CoordinatorServices {
  readonly membership: Membership;
  readonly runtime: Runtime;
  /** Certify a node (token or node certificate → node certificate). */
  readonly enroll: (req: EnrollRequest) => Promise<Enrollment>;
  /** The coordinator's TLS credentials (cluster CA included). */
  readonly tls: TlsCredentials;
  readonly isRevoked: (nodeId: string) => boolean;
  /** Revoke a node by id or name (`orchard cluster revoke`). */
  readonly revoke: (node: string) => Promise<{ nodeId: string; revoked: boolean }>;
  readonly clusterId: string;
  readonly version: string;
  readonly log: Logger;
  /** Persist a statically joined agent so a restarted coordinator dials it again. */
  readonly rememberAgent: (address: string) => Promise<void>;
  /** The link matrix as measured so far. */
  readonly links?: () => readonly LinkMeasurement[];
  /** Where the coordinator's state lives (file or NATS), for Status. */
  readonly stateStore?: StateStoreInfo | undefined;
  /** This coordinator's role and who leads (leader/roles.ts); undefined = single. */
  readonly roles?: (() => RoleView) | undefined;
  /** Relays calls to the leader while this coordinator is a standby (forwarding.ts). */
  readonly relay?: GrpcRelay | undefined;
}

const ADDRESS = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/;

const joinSchema = z.object({ token: z.string().default(''), agentAddress: z.string().default(''), csr: z.string().max(16_384).default('') });
const planOptionsSchema = z
  .object({
    ctx: z.number().int().nonnegative().default(0),
    cacheType: z.string().default(''),
    parallel: z.number().int().nonnegative().default(0),
    pin: z.array(z.string()).default([]),
    parallelism: z.string().default(''),
    allowUntunnelledRdma: z.boolean().default(false),
  })
  .nullish();
const loadSchema = z.object({ modelPath: z.string().default(''), name: z.string().default(''), options: planOptionsSchema, engine: z.string().default(''), heal: z.string().default('') });
const planSchema = z.object({ modelPath: z.string().default(''), options: planOptionsSchema, promptTokens: z.number().int().nonnegative().default(0), objective: z.string().default('') });
const drainSchema = z.object({ node: z.string().trim().min(1, 'node is required'), undo: z.boolean().default(false) });
const rebalanceSchema = z.object({ dryRun: z.boolean().default(false), minGain: z.number().min(0).max(10).default(0), model: z.string().default('') });

function parse<T>(schema: z.ZodType<T>, raw: unknown, what: string): T {
  const r = schema.safeParse(raw ?? {});
  if (!r.success) throw new CoordinatorError('INVALID_ARGUMENT', `malformed ${what} request: ${r.error.issues[0]?.message ?? 'invalid'}`);
  return r.data;
}

function options(o: z.infer<typeof planOptionsSchema>) {
  return { ctx: o?.ctx ?? 0, cacheType: o?.cacheType ?? '', parallel: o?.parallel ?? 0, pin: o?.pin ?? [], parallelism: parseParallelism(o?.parallelism), allowUntunnelledRdma: o?.allowUntunnelledRdma ?? false };
}

export function nodeStatusToWire(n: NodeEntry, now = Date.now(), drained = false): Record<string, unknown> {
  return {
    profile: profileToWire(n.profile),
    live: n.live ? liveToWire(n.live) : undefined,
    state: `NODE_STATE_${n.state.toUpperCase()}`,
    address: n.address,
    discoveredBy: n.discoveredBy,
    lastSeenSeconds: (now - n.lastSeenMs) / 1000,
    drained,
  };
}

/** A Bonjour sighting that is not a member: what it announced, state DISCOVERED. */
export function discoveredStatusToWire(d: DiscoveredAgent, now = Date.now()): Record<string, unknown> {
  return {
    profile: { nodeId: d.nodeId, name: d.name, chip: d.chip, memoryBytes: String(d.memoryBytes) },
    state: 'NODE_STATE_DISCOVERED',
    address: d.address,
    discoveredBy: 'mdns',
    lastSeenSeconds: (now - d.lastSeenMs) / 1000,
  };
}

/** Members, then agents only discovered: what Status lists. */
export function nodesToWire(m: Membership, now = Date.now(), isDrained: (nodeId: string) => boolean = () => false): Record<string, unknown>[] {
  return [...m.registry.nodes().map((n) => nodeStatusToWire(n, now, isDrained(n.nodeId))), ...m.discovered().map((d) => discoveredStatusToWire(d, now))];
}

export function modelStatusToWire(m: ModelStatus): Record<string, unknown> {
  return {
    name: m.name,
    path: m.path,
    state: m.state,
    engine: m.engine,
    error: m.error,
    predictedTokensPerSecond: m.predictedTokensPerSecond,
    loadedAtMs: String(m.loadedAtMs ?? 0),
    recoveries: m.recoveries ?? 0,
    heal: m.heal ?? '',
    untunnelledRdma: m.untunnelledRdma ?? false,
    parallelism: m.parallelism?.mode ?? '',
    parallelismReason: m.parallelism?.reason ?? '',
    recovery: m.recovery
      ? { cause: m.recovery.cause, attempt: m.recovery.attempt, maxAttempts: m.recovery.maxAttempts, phase: m.recovery.phase, message: m.recovery.message, sinceSeconds: (Date.now() - m.recovery.sinceMs) / 1000 }
      : undefined,
    stages: m.stages.map((s) => ({
      nodeId: s.nodeId,
      nodeName: s.nodeName,
      firstLayer: s.firstLayer,
      lastLayer: s.lastLayer,
      bytes: Object.fromEntries(Object.entries(s.bytes).map(([k, v]) => [k, String(v)])),
      budgetBytes: String(s.budgetBytes),
      endpoint: s.endpoint,
    })),
  };
}

function progressToWire(p: LoadProgress): Record<string, unknown> {
  return {
    phase: p.phase,
    message: p.message,
    bytesDone: String(p.bytesDone),
    bytesTotal: String(p.bytesTotal),
    elapsedSeconds: p.elapsedSeconds,
    model: p.model ? modelStatusToWire(p.model) : undefined,
  };
}

export function generateEventToWire(e: GenerateEvent): Record<string, unknown> {
  if (e.kind === 'token') return { token: { text: e.text, tokenIds: [...e.tokenIds], logprobs: logprobsToWire(e.logprobs ?? []) } };
  return { done: { finishReason: e.finishReason, promptTokens: e.promptTokens, completionTokens: e.completionTokens, timings: e.timings } };
}

type Fail = (err: unknown) => Partial<grpc.ServiceError>;

/** The Coordinator service: membership calls (Join, Status) and model calls (Plan … Generate). */
export function coordinatorHandlers(s: CoordinatorServices): grpc.UntypedServiceImplementation {
  const fail: Fail = (err) => {
    if (!(err instanceof CoordinatorError)) s.log.debug({ err: errorMessage(err) }, 'request failed');
    return toServiceError(err);
  };
  return { ...membershipHandlers(s, fail), ...modelHandlers(s, fail), Generate: generateHandler(s, fail) };
}

function membershipHandlers(s: CoordinatorServices, fail: Fail): grpc.UntypedServiceImplementation {
  return {
    Join(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      join(s, call).then((r) => cb(null, r), (err) => cb(fail(err)));
    },

    Revoke(call: grpc.ServerUnaryCall<{ node?: string }, unknown>, cb: grpc.sendUnaryData<unknown>) {
      s.revoke(String(call.request?.node ?? '').trim()).then((r) => cb(null, r), (err) => cb(fail(err)));
    },

    Status(_call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      const now = Date.now();
      cb(null, {
        nodes: nodesToWire(s.membership, now, (id) => s.runtime.moves.isDrained(id)),
        models: s.runtime.models().map(modelStatusToWire),
        clusterId: s.clusterId,
        version: s.version,
        links: (s.links?.() ?? []).map((l) => ({
          fromNodeId: l.from,
          toNodeId: l.to,
          rttSeconds: l.rttSeconds,
          bytesPerSecond: l.bytesPerSecond,
          measuredAtSeconds: l.measuredAtSeconds,
          error: l.error ?? '',
        })),
        stateStore: s.stateStore,
        ...roleToWire(s.roles?.() ?? { role: 'single', leader: null }),
      });
    },
  };
}

/**
 * Join: certify the CSR (token, or the node certificate the caller presents), then — when the
 * node announces the address its agent serves on — dial that agent and check that it proves the
 * same node id before remembering the address. A presented certificate that is refused (foreign,
 * expired, revoked) is an answer on its own: no token fallback.
 */
async function join(s: CoordinatorServices, call: grpc.ServerUnaryCall<unknown, unknown>): Promise<Record<string, unknown>> {
  const req = parse(joinSchema, call.request, 'Join');
  const presented = call.getAuthContext?.()?.sslPeerCertificate?.raw;
  let peer: EnrollRequest['peer'];
  if (presented && presented.length > 0) {
    const check = authenticate(call, s.tls.caCertPem, ['node'], (p) => s.isRevoked(p.id));
    if (!check.ok) throw new CoordinatorError(check.code === grpc.status.PERMISSION_DENIED ? 'PERMISSION_DENIED' : 'UNAUTHENTICATED', check.details);
    peer = check.peer;
  }
  if (req.agentAddress !== '') {
    if (!peer) throw new CoordinatorError('INVALID_ARGUMENT', 'agent_address is announced with the node certificate: join with the token first, then start the agent');
    if (!ADDRESS.test(req.agentAddress)) throw new CoordinatorError('INVALID_ARGUMENT', `agent_address must be host:port, got "${req.agentAddress}"`);
  }
  const e = await s.enroll({ csrPem: req.csr, token: req.token || undefined, peer });
  s.log.info({ nodeId: e.nodeId, renewal: e.renewal, peer: call.getPeer() }, e.renewal ? 'node certificate renewed' : 'node joined');
  if (req.agentAddress !== '') {
    let node: NodeEntry;
    try {
      node = await s.membership.add(req.agentAddress, 'join');
    } catch (err) {
      throw new CoordinatorError('UNAVAILABLE', `cannot reach the node agent at ${req.agentAddress}: ${(err as { details?: string }).details || errorMessage(err)}`);
    }
    if (node.nodeId !== e.nodeId) throw new CoordinatorError('PERMISSION_DENIED', `the agent at ${req.agentAddress} is node ${node.nodeId}, not ${e.nodeId}`);
    await s.rememberAgent(req.agentAddress);
  }
  return { nodeId: e.nodeId, clusterId: s.clusterId, certificate: e.certPem, caCertificate: e.caCertPem };
}

function modelHandlers(s: CoordinatorServices, fail: Fail): grpc.UntypedServiceImplementation {
  return {
    Plan(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      (async () => {
        const req = parse(planSchema, call.request, 'Plan');
        try {
          const plan = await s.runtime.plan(req.modelPath, { ...options(req.options), promptTokens: req.promptTokens, ...(req.objective ? { objective: req.objective as Objective } : {}) });
          return { planJson: JSON.stringify(plan.raw) };
        } catch (err) {
          // "Does not fit" is an answer to Plan (fits: false, shortfall, remedies), not a failure.
          if (err instanceof PlanDoesNotFitError) return { planJson: JSON.stringify(err.plan) };
          throw err;
        }
      })().then((r) => cb(null, r), (err) => cb(fail(err)));
    },

    Load(call: grpc.ServerWritableStream<unknown, unknown>) {
      (async () => {
        const req = parse(loadSchema, call.request, 'Load');
        await s.runtime.load({ modelPath: req.modelPath, name: req.name, options: options(req.options), engine: req.engine, heal: req.heal || undefined }, (p) => {
          if (!call.cancelled) call.write(progressToWire(p));
        });
      })().then(
        () => call.end(),
        (err) => call.emit('error', fail(err)),
      );
    },

    Unload(call: grpc.ServerUnaryCall<{ name?: string }, unknown>, cb: grpc.sendUnaryData<unknown>) {
      s.runtime.unload(String(call.request?.name ?? '')).then((unloaded) => cb(null, { unloaded }), (err) => cb(fail(err)));
    },

    Drain(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      (async () => {
        const req = parse(drainSchema, call.request, 'Drain');
        if (req.undo) return { ...s.runtime.moves.undrain(req.node), moved: [] };
        return s.runtime.moves.drain(req.node);
      })().then((r) => cb(null, r), (err) => cb(fail(err)));
    },

    Rebalance(call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) {
      (async () => {
        const req = parse(rebalanceSchema, call.request, 'Rebalance');
        const reports = await s.runtime.moves.rebalance({ dryRun: req.dryRun, minGain: req.minGain, model: req.model || undefined });
        return {
          models: reports.map((r) => ({
            outcome: { model: r.model, outcome: r.outcome, message: r.message },
            apply: r.decision.apply,
            gain: r.decision.gain,
            gainNow: r.decision.gainNow ?? 0,
            fitsNow: r.decision.gainNow !== undefined,
            currentTokensPerSecond: r.currentTokensPerSecond,
            plannedTokensPerSecond: r.plannedTokensPerSecond,
          })),
        };
      })().then((r) => cb(null, r), (err) => cb(fail(err)));
    },
  };
}

/** Coordinator.Generate: validated like NodeAgent.Generate (src/shared/generation.ts), streamed with back-pressure. */
function generateHandler(s: CoordinatorServices, fail: Fail) {
  return (call: grpc.ServerWritableStream<unknown, unknown>) => {
    const ac = new AbortController();
    call.on('cancelled', () => ac.abort());
    (async () => {
      const checked = checkGenerateRequest(coordinatorGenerateRequestSchema, call.request);
      if (!checked.ok) throw new CoordinatorError('INVALID_ARGUMENT', checked.problem);
      const req = checked.request;
      for await (const ev of s.runtime.generate(
        { model: req.model || undefined, prompt: req.prompt, maxTokens: req.maxTokens, temperature: req.temperature, topP: req.topP, seed: req.seed, stop: req.stop, logprobs: req.logprobs, topLogprobs: req.topLogprobs },
        ac.signal,
      )) {
        if (call.cancelled) break;
        // Respect back-pressure: a slow client slows the relay instead of buffering unboundedly.
        if (!call.write(generateEventToWire(ev))) await new Promise((r) => call.once('drain', r));
      }
    })().then(
      () => call.end(),
      (err) => {
        if (!call.cancelled) call.emit('error', fail(err));
      },
    );
  };
}

export async function startCoordinatorGrpc(s: CoordinatorServices, access: AccessControl, host: string, port: number): Promise<{ server: grpc.Server; port: number }> {
  const server = createGrpcServer();
  const service = orchardV1().Coordinator!.service;
  const handlers = s.relay ? s.relay.wrap(service, coordinatorHandlers(s)) : coordinatorHandlers(s);
  server.addService(service, guardService(service, handlers, access, s.tls.caCertPem));
  const bound = await new Promise<number>((resolve, reject) =>
    server.bindAsync(`${host.includes(':') ? `[${host}]` : host}:${port}`, clusterServerCredentials(s.tls), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { server, port: bound };
}
