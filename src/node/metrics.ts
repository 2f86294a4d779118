import { Registry } from 'prom-client';
import type { HardwareProfile, LiveStats } from '../shared/hardware.ts';
import { createNodeMetrics, type NodeMetricSet, recordNodeProfile } from '../shared/metrics/factories.ts';
import type { EngineExit, EngineInfo, EngineSupervisor } from './supervisor.ts';
import type { PeerBytes } from './tunnel/engine-tunnels.ts';

/**
 * The node agent's Prometheus metrics, built from the shared catalogue
 * (src/shared/metrics/catalogue.ts → createNodeMetrics) on their own Registry (never
 * prom-client's global one, so several agents in one test process cannot mix their series).
 * Gauges read the agent's current state at scrape time through `collect`, so they are never
 * stale; counters start at 0 for every engine kind so the first crash is an increase rate() sees.
 * The agent restarts no engine (a crash is an exit with expected="false"); it does relay engine
 * traffic between nodes (its TLS tunnels), counted at scrape time from the tunnels' own counters.
 */
export interface NodeMetricsSource {
  profile(): HardwareProfile;
  live(): LiveStats | undefined;
  engines(): readonly EngineInfo[];
  /** Tunnel payload bytes per peer node (EngineTunnels.bytes); cumulative, so a counter. */
  rpcBytes(): Promise<readonly PeerBytes[]>;
  /** The last good link probe per peer (EngineTunnels.links). */
  links(): readonly LinkResultSample[];
}

type LinkResultSample = { readonly peer: string; readonly sample: { readonly rttSeconds: number; readonly bytesPerSecond: number } };

export class NodeMetrics {
  readonly registry = new Registry();
  readonly metrics: NodeMetricSet;

  constructor(source: NodeMetricsSource) {
    let set: NodeMetricSet | undefined;
    // Every profile-derived gauge runs the same cheap refresh: prom-client collects metrics one
    // by one and any of them can be read alone (getSingleMetricAsString), so none may rely on
    // another's hook having run first.
    const refresh = () => {
      if (set) recordNodeProfile(set, source.profile(), source.live());
    };
    set = createNodeMetrics(this.registry, {
      collect: {
        info: refresh,
        memoryBytes: refresh,
        budgetBytes: refresh,
        availableMemoryBytes: refresh,
        bandwidthBytesPerSecond: refresh,
        wiredLimitBytes: refresh,
        memoryPressure: refresh,
        engineUp() {
          // No port label (a restart on a new port would start a new series): kind and model.
          this.reset();
          for (const e of source.engines()) this.set({ engine: e.kind, model: e.model }, 1);
        },
        linkRttSeconds() {
          this.reset();
          for (const l of source.links()) this.set({ peer: l.peer }, l.sample.rttSeconds);
        },
        linkThroughputBytesPerSecond() {
          this.reset();
          for (const l of source.links()) this.set({ peer: l.peer }, l.sample.bytesPerSecond);
        },
        async rpcBytesTotal() {
          // The tunnels keep the cumulative totals (closed forwarders included): copy them.
          this.reset();
          for (const b of await source.rpcBytes()) {
            this.inc({ peer: b.peer, direction: 'sent' }, b.sent);
            this.inc({ peer: b.peer, direction: 'received' }, b.received);
          }
        },
      },
    });
    this.metrics = set;
  }

  /** Count the supervisor's engine starts and exits (the agent's one wiring, tested as is). */
  follow(supervisor: Pick<EngineSupervisor, 'on'>): void {
    supervisor.on('started', (info) => this.engineStarted(info));
    supervisor.on('exited', (exit) => this.engineExited(exit));
  }

  engineStarted(info: EngineInfo): void {
    this.metrics.engineStartsTotal.inc({ engine: info.kind });
  }

  engineExited(exit: EngineExit): void {
    this.metrics.engineExitsTotal.inc({ engine: exit.kind, expected: String(exit.expected) });
  }
}
