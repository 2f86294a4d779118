import { connect, type NatsConnection } from '@nats-io/transport-node';
import { errorMessage } from '../shared/errors.ts';
import { type AgentEventBody, agentEventSubject, EVENT_SCHEMA_VERSION } from '../shared/events.ts';
import type { LiveStats } from '../shared/hardware.ts';
import type { Logger } from '../shared/log.ts';
import { natsClientTls } from '../shared/pki/nats-tls.ts';
import { pkiPaths } from '../shared/pki/store.ts';
import type { EngineExit, EngineInfo, EngineSupervisor } from './supervisor.ts';

/**
 * The agent's own voice on the cluster's event bus. Once the coordinator says where the bus is
 * (NodeAgent.SetEventBus, after the NATS server admits this node), the agent connects with its
 * node certificate — the files in its state dir, re-read at every reconnect, so a renewal needs
 * nothing here — and publishes on `orchard.<c>.agent.<node id>.…`, the only subjects its
 * certificate may publish on: engine started / exited as the supervisor reports them, and its
 * health every few seconds. Core NATS, fire and forget: a bus that is down costs events, never
 * an engine. The coordinator still relays engine events from Watch on its own subjects (in the
 * order it acted on them); these are the agent's first-hand account.
 */
export interface AgentEventBusOptions {
  readonly stateDir: string;
  readonly nodeId: string;
  /** From the node's CA certificate (never from the wire). */
  readonly clusterId: string;
  readonly supervisor: EngineSupervisor;
  readonly live: () => Promise<LiveStats>;
  readonly log: Logger;
  readonly healthIntervalMs?: number | undefined;
}

export const HEALTH_INTERVAL_MS = 5000;

export class AgentEventBus {
  readonly #o: AgentEventBusOptions;
  #nc: NatsConnection | undefined;
  #servers = '';
  #health: NodeJS.Timeout | undefined;
  #closed = false;
  readonly #onStarted = (info: EngineInfo) => this.publish({ kind: 'engine.started', nodeId: this.#o.nodeId, engineId: info.engineId, engineKind: info.kind, pid: info.pid, port: info.port });
  readonly #onExited = (x: EngineExit) =>
    this.publish({ kind: 'engine.exited', nodeId: this.#o.nodeId, engineId: x.engineId, engineKind: x.kind, exitCode: x.exitCode, signal: x.signal, expected: x.expected });

  constructor(o: AgentEventBusOptions) {
    this.#o = o;
    o.supervisor.on('started', this.#onStarted);
    o.supervisor.on('exited', this.#onExited);
  }

  /** Connect to these servers (again only if they changed); the connection retries in the background. */
  setServers(urls: readonly string[]): void {
    const key = urls.join(',');
    if (this.#closed || key === this.#servers) return;
    this.#servers = key;
    const previous = this.#nc;
    this.#nc = undefined;
    void previous?.close();
    void this.#connect([...urls], key);
  }

  async #connect(servers: string[], key: string): Promise<void> {
    const p = pkiPaths(this.#o.stateDir);
    try {
      const nc = await connect({
        servers,
        name: `orchard-agent-${this.#o.nodeId}`,
        tls: natsClientTls({ keyFile: p.nodeKey, certFile: p.nodeCert, caFile: p.caCert }),
        // The coordinator may still be restarting its server or re-admitting us: keep trying.
        waitOnFirstConnect: true,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 1000,
        ignoreAuthErrorAbort: true,
      });
      if (this.#closed || key !== this.#servers) {
        await nc.close();
        return;
      }
      this.#nc = nc;
      this.#o.log.info({ servers }, 'publishing on the cluster event bus');
      this.#sendHealth();
      clearInterval(this.#health);
      this.#health = setInterval(() => this.#sendHealth(), this.#o.healthIntervalMs ?? HEALTH_INTERVAL_MS);
      this.#health.unref();
    } catch (err) {
      this.#o.log.warn({ servers, err: errorMessage(err) }, 'could not connect to the event bus');
    }
  }

  #sendHealth(): void {
    this.#o.live().then(
      (l) => this.publish({ kind: 'node.health', nodeId: this.#o.nodeId, engines: this.#o.supervisor.list().length, availableBytes: l.availableBytes, memoryPressure: l.memoryPressure, thermalState: l.thermalState }),
      (err: unknown) => this.#o.log.debug({ err: errorMessage(err) }, 'no health sample'),
    );
  }

  /** Stamp and publish one of this agent's events (no-op until connected). */
  publish(body: AgentEventBody): void {
    const nc = this.#nc;
    if (!nc) return;
    const e = { ...body, v: EVENT_SCHEMA_VERSION, cluster: this.#o.clusterId, atMs: Date.now(), source: { role: 'agent', id: this.#o.nodeId } };
    try {
      nc.publish(agentEventSubject(this.#o.clusterId, body), JSON.stringify(e));
    } catch (err) {
      this.#o.log.debug({ kind: body.kind, err: errorMessage(err) }, 'event not published');
    }
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#health);
    this.#o.supervisor.off('started', this.#onStarted);
    this.#o.supervisor.off('exited', this.#onExited);
    const nc = this.#nc;
    this.#nc = undefined;
    await nc?.flush().catch(() => {});
    await nc?.close();
  }
}
