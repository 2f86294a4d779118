import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type * as grpc from '@grpc/grpc-js';
import { OrchardError, errorMessage } from '../shared/errors.ts';
import type { PortRange } from '../shared/engine-port-range.ts';
import type { HardwareProfile, LiveStats } from '../shared/hardware.ts';
import type { Logger } from '../shared/log.ts';
import { NodeAdvertiser } from './advertise.ts';
import type { EngineBinaries } from './engine-spec.ts';
import { type AgentState, serveNodeAgent } from './grpc-server.ts';
import type { ProbeOptions } from './hardware/probe.ts';
import { loadOrCreateIdentity } from './identity.ts';
import { loadNodeTls } from './identity-credentials.ts';
import { caClusterId } from '../shared/pki/certificates.ts';
import { renewServerCredentials, type TlsCredentials } from '../shared/pki/grpc-tls.ts';
import { type MetricsServer, serveMetrics } from '../shared/metrics/http.ts';
import { NodeMetrics } from './metrics.ts';
import { AgentEventBus } from './event-bus.ts';
import { EngineSupervisor } from './supervisor.ts';
import { EnginePortAllocator, engineRangeOf } from './ports.ts';
import { findMlxEnv } from './mlx/env.ts';
import { ModelLibrary } from './model-library.ts';
import { prepareEngineSocketDir } from './engine-sockets.ts';
import { prepareRunDir } from './run-dir.ts';
import { EngineTunnels } from './tunnel/engine-tunnels.ts';
import { findTunnelRelay } from './tunnel/native-forwarder.ts';

/**
 * The node agent's lifecycle: identity → hardware profile → gRPC + metrics servers → Bonjour.
 * Shutdown runs in reverse: goodbye on mDNS first (coordinators stop sending work), then the
 * engines (TERM, KILL after a grace period), then the servers.
 *
 * Every I/O dependency (probe, live stats, engine binaries) is injected so tests can run the
 * agent in-process; the CLI wires in the real ones.
 */
export interface NodeAgentOptions {
  readonly stateDir: string;
  readonly name?: string | undefined;
  /** Address the gRPC and metrics servers listen on (default 0.0.0.0: coordinators are remote). */
  readonly bindHost: string;
  readonly grpcPort: number;
  readonly metricsPort: number;
  readonly memoryLimitBytes?: number | undefined;
  readonly budgetBytes?: number | undefined;
  readonly bandwidthBytesPerSecond?: number | undefined;
  readonly mdns: boolean;
  /** IPv4 address of the interface to advertise on; undefined = the OS default route. */
  readonly mdnsInterface?: string | undefined;
  readonly probe: (opts: ProbeOptions) => Promise<HardwareProfile>;
  readonly readLive: () => Promise<LiveStats>;
  readonly binaries: () => Promise<EngineBinaries>;
  readonly log: Logger;
  /** How often the profile is re-probed to notice changes (wired limit raised, …). 0 = never. */
  readonly profileRefreshMs?: number;
  /** Grace between SIGTERM and SIGKILL for engines (default 5 s). */
  readonly engineStopGraceMs?: number;
  /** Where this node's model files live (`--models-dir`): reported in Describe, used by PrepareCache. */
  readonly modelsDirs?: readonly string[] | undefined;
  /** Port of the tunnel listener on bindHost (`--tunnel-port`; 0 = any free port). Only with credentials. */
  readonly tunnelPort?: number | undefined;
  /** `--engine-ports`: the ports engines get (else ORCHARD_NODE_ENGINE_PORTS, else 20000-32767), less the ephemeral range. */
  readonly enginePorts?: PortRange | undefined;
}

export interface AgentReady {
  readonly nodeId: string;
  readonly name: string;
  readonly grpcPort: number;
  readonly metricsPort: number;
  /** The tunnel listener's port; undefined without cluster credentials. */
  readonly tunnelPort: number | undefined;
  readonly profile: HardwareProfile;
  readonly createdIdentity: boolean;
}

interface AgentEvents {
  profile: [HardwareProfile];
  shutdown: [];
  revocations: [ReadonlySet<string>];
}

export class NodeAgent {
  private readonly events = new EventEmitter<AgentEvents>();
  private currentProfile: HardwareProfile | undefined;
  private liveCache: { at: number; value: Promise<LiveStats> } | undefined;
  private lastLive: LiveStats | undefined;
  private supervisor: EngineSupervisor | undefined;
  private engineTunnels: EngineTunnels | undefined;
  private grpcServer: grpc.Server | undefined;
  private serverCredentials: grpc.ServerCredentials | undefined;
  private tls: TlsCredentials | undefined;
  private revoked: ReadonlySet<string> = new Set();
  private eventBus: AgentEventBus | undefined;
  private metricsServer: MetricsServer | undefined;
  private advertiser: NodeAdvertiser | undefined;
  private refreshTimer: NodeJS.Timeout | undefined;
  private grpcPort = 0;
  private enginePorts: PortRange | undefined;
  private stopping: Promise<void> | undefined;

  constructor(private readonly options: NodeAgentOptions) {
    this.events.setMaxListeners(0); // one listener per Watch stream
  }

  get engines(): EngineSupervisor {
    if (!this.supervisor) throw new Error('agent not started');
    return this.supervisor;
  }

  /** Engine traffic to and from other nodes; `disconnect(peer)` is the revocation hook. */
  get tunnels(): EngineTunnels {
    if (!this.engineTunnels) throw new Error('agent not started');
    return this.engineTunnels;
  }

  profile(): HardwareProfile {
    if (!this.currentProfile) throw new Error('agent not started');
    // The metrics and tunnel ports are the agent's, not the hardware's: added here so Describe,
    // Watch profile events, Bonjour and the coordinator all see them once the servers listen.
    const tunnelPort = this.engineTunnels?.port;
    return {
      ...this.currentProfile,
      ...(this.metricsServer ? { metricsPort: this.metricsServer.port } : {}),
      ...(tunnelPort !== undefined ? { tunnelPort } : {}),
      ...(this.enginePorts ? { enginePorts: this.enginePorts } : {}),
    };
  }

  async start(): Promise<AgentReady> {
    const { options: o, log } = { options: this.options, log: this.options.log };
    const { identity, tls } = await this.loadIdentity();
    this.currentProfile = await this.probe(identity.nodeId);
    this.enginePorts = await engineRangeOf(o.enginePorts);
    log.info({ enginePorts: this.enginePorts }, 'engine port range (127.0.0.1 only)');
    const runDir = await prepareRunDir(o.stateDir, log);
    const { supervisor, tunnels } = this.engineSide(identity.nodeId, tls, runDir, await prepareEngineSocketDir(runDir, log));
    // Only a member can be admitted to the bus: its certificate is its NATS identity.
    if (tls) this.eventBus = new AgentEventBus({ stateDir: o.stateDir, nodeId: identity.nodeId, clusterId: caClusterId(tls.caCertPem), supervisor, live: () => this.live(), log: log.child({ part: 'events' }) });
    const metrics = new NodeMetrics({ profile: () => this.profile(), live: () => this.lastLive, engines: () => supervisor.list(), rpcBytes: () => tunnels.bytes(), links: () => tunnels.links() });
    metrics.follow(supervisor);
    // Sample once so the first scrape has available memory.
    await this.live().catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'live stats failed'));

    try {
      const models = new ModelLibrary({ dirs: o.modelsDirs ?? [], stateDir: o.stateDir, log: log.child({ part: 'models' }) });
      if (models.dirs.length > 0) void models.scan(); // in the background: hashing a multi-GB file must not delay readiness
      const state: AgentState = {
        runId: randomUUID(),
        models,
        roots: { modelsDirs: models.dirs, stateDir: o.stateDir },
        profile: () => this.profile(),
        live: () => this.live(),
        supervisor,
        tunnels,
        onProfileChange: (fn) => {
          this.events.on('profile', fn);
          return () => this.events.off('profile', fn);
        },
        onShutdown: (fn) => {
          this.events.on('shutdown', fn);
          return () => this.events.off('shutdown', fn);
        },
        setRevocations: (ids) => this.setRevocations(ids),
        setEventBus: (urls) => this.eventBus?.setServers(urls),
      };
      await tunnels.start();
      const g = await serveNodeAgent(state, o.bindHost, o.grpcPort, log.child({ part: 'grpc' }), tls);
      this.grpcServer = g.server;
      this.serverCredentials = g.credentials;
      this.grpcPort = g.port;
      const m = await serveMetrics({
        registry: metrics.registry,
        host: o.bindHost,
        port: o.metricsPort,
        health: () => (this.stopping === undefined ? { ok: true } : { ok: false, detail: 'shutting down' }),
      }).catch((err: unknown) => {
        const inUse = (err as NodeJS.ErrnoException).code === 'EADDRINUSE';
        throw new OrchardError(inUse ? `metrics port ${o.metricsPort} on ${o.bindHost} is already in use` : `cannot serve metrics on ${o.bindHost}:${o.metricsPort}: ${errorMessage(err)}`);
      });
      this.metricsServer = m;

      if (o.mdns) {
        if (o.bindHost === '127.0.0.1' || o.bindHost === '::1') {
          log.warn({ bind: o.bindHost }, 'advertising on mDNS while gRPC listens on loopback only: other machines will find this node but cannot reach it');
        }
        this.advertiser = new NodeAdvertiser({ interfaceAddress: o.mdnsInterface, log: log.child({ part: 'mdns' }) });
        this.advertiser.start(this.profile(), this.grpcPort);
      }
      const refreshMs = o.profileRefreshMs ?? 60_000;
      if (refreshMs > 0) {
        this.refreshTimer = setInterval(() => void this.refreshProfile(), refreshMs);
        this.refreshTimer.unref();
      }
      return {
        nodeId: identity.nodeId,
        name: this.profile().name,
        grpcPort: this.grpcPort,
        metricsPort: m.port,
        tunnelPort: tunnels.port,
        profile: this.profile(),
        createdIdentity: identity.created,
      };
    } catch (err) {
      await this.stop();
      throw err;
    }
  }

  /** The supervisor and the tunnels that carry its engines' traffic to other nodes. */
  private engineSide(nodeId: string, tls: TlsCredentials | undefined, runDir: string, socketDir: string): { supervisor: EngineSupervisor; tunnels: EngineTunnels } {
    const { options: o, log } = { options: this.options, log: this.options.log };
    const supervisor = new EngineSupervisor({
      binaries: o.binaries,
      log: log.child({ part: 'supervisor' }),
      stopGraceMs: o.engineStopGraceMs,
      ports: new EnginePortAllocator(this.enginePorts!),
      runDir,
      socketDir,
      mlxPython: async () => {
        const env = await findMlxEnv();
        if (!env) throw new Error('MLX is not set up on this node: run `orchard setup --mlx` (or set ORCHARD_MLX_PYTHON)');
        return env.python;
      },
    });
    const tunnels = new EngineTunnels({
      nodeId,
      credentials: tls,
      host: o.bindHost,
      port: o.tunnelPort ?? 0,
      relayBinary: findTunnelRelay(),
      socketDir,
      log: log.child({ part: 'tunnel' }),
    });
    tunnels.follow(supervisor);
    this.supervisor = supervisor;
    this.engineTunnels = tunnels;
    return { supervisor, tunnels };
  }

  /** The node id and, once it joined, its cluster credentials (the certificate must name that id). */
  private async loadIdentity() {
    const { stateDir } = this.options;
    const log = this.options.log;
    const identity = await loadOrCreateIdentity(stateDir);
    const tls = await loadNodeTls(stateDir, identity.nodeId);
    this.tls = tls;
    log.info({ nodeId: identity.nodeId, stateDir, created: identity.created, mtls: tls !== undefined }, 'node identity');
    if (!tls) log.warn('this node has not joined a cluster: every gRPC call is refused until it holds a node certificate (start it with --token, see `orchard coordinator token`)');
    return { identity, tls };
  }

  /**
   * Nodes the cluster revoked (`orchard cluster revoke`), as the coordinator last sent them: a
   * listener that authenticates peers by their node certificate (the tunnels) refuses these and
   * drops their open connections on `onRevocations`.
   */
  revokedNodes(): ReadonlySet<string> {
    return this.revoked;
  }

  onRevocations(fn: (revoked: ReadonlySet<string>) => void): () => void {
    this.events.on('revocations', fn);
    return () => this.events.off('revocations', fn);
  }

  private setRevocations(ids: readonly string[]): void {
    const next = new Set(ids);
    if (next.size === this.revoked.size && [...next].every((id) => this.revoked.has(id))) return;
    const added = [...next].filter((id) => !this.revoked.has(id));
    this.revoked = next;
    this.options.log.info({ revoked: [...next] }, 'revocation list updated');
    // refused from now on, and open sessions cut: ggml-rpc keeps its connection for hours
    for (const id of added) void this.engineTunnels?.revoke(id);
    this.events.emit('revocations', next);
  }

  /** The cluster credentials the agent serves with (undefined before it joined). */
  credentials(): TlsCredentials | undefined {
    return this.tls;
  }

  /** A renewed certificate (same key, same CA): new connections get it at once, no restart. */
  renewCredentials(tls: TlsCredentials): void {
    if (!this.serverCredentials || !this.tls) throw new Error('agent serves without cluster credentials: restart it to serve mutual TLS');
    renewServerCredentials(this.serverCredentials, tls);
    this.tls = tls;
  }

  private probe(nodeId: string): Promise<HardwareProfile> {
    const o = this.options;
    return o.probe({
      nodeId,
      ...(o.name !== undefined ? { name: o.name } : {}),
      ...(o.memoryLimitBytes !== undefined ? { memoryLimitBytes: o.memoryLimitBytes } : {}),
      ...(o.budgetBytes !== undefined ? { budgetBytes: o.budgetBytes } : {}),
      ...(o.bandwidthBytesPerSecond !== undefined ? { bandwidthBytesPerSecond: o.bandwidthBytesPerSecond } : {}),
    });
  }

  /** Re-probe; when anything changed, tell Watch streams and re-announce on mDNS. */
  async refreshProfile(): Promise<boolean> {
    if (!this.currentProfile || this.stopping) return false;
    let next: HardwareProfile;
    try {
      next = await this.probe(this.currentProfile.nodeId);
    } catch (err) {
      this.options.log.warn({ err: errorMessage(err) }, 'profile refresh failed');
      return false;
    }
    if (JSON.stringify(next) === JSON.stringify(this.currentProfile)) return false;
    this.currentProfile = next;
    this.options.log.info({ profile: next }, 'hardware profile changed');
    this.advertiser?.update(next, this.grpcPort);
    this.events.emit('profile', next);
    return true;
  }

  /** Live stats, sampled at most every 200 ms however many Watch streams ask. */
  live(): Promise<LiveStats> {
    const now = Date.now();
    if (this.liveCache && now - this.liveCache.at < 200) return this.liveCache.value;
    const value = this.options.readLive().then((l) => {
      this.lastLive = l;
      return l;
    });
    value.catch(() => {
      this.liveCache = undefined;
    });
    this.liveCache = { at: now, value };
    return value;
  }

  /** Orderly shutdown; safe to call more than once. */
  stop(): Promise<void> {
    this.stopping ??= this.doStop();
    return this.stopping;
  }

  private async doStop(): Promise<void> {
    const log = this.options.log;
    if (this.refreshTimer) clearInterval(this.refreshTimer);
    await this.advertiser?.stop().catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'mDNS goodbye failed'));
    await this.supervisor?.shutdown();
    // After the engines: their exits are published first.
    await this.eventBus?.close().catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'event bus close failed'));
    await this.engineTunnels?.close();
    // Watch streams end only now, so a watcher sees every engine's (expected) exit first.
    this.events.emit('shutdown');
    const grpcServer = this.grpcServer;
    if (grpcServer) {
      await new Promise<void>((resolve) => {
        const force = setTimeout(() => {
          grpcServer.forceShutdown();
          resolve();
        }, 2000);
        grpcServer.tryShutdown(() => {
          clearTimeout(force);
          resolve();
        });
      });
    }
    await this.metricsServer?.close();
    log.info('node agent stopped');
  }

  /** Second Ctrl-C: no grace, SIGKILL the engines now. */
  killEngines(): void {
    this.supervisor?.killAll();
  }
}
