import { Counter, Gauge, Registry } from 'prom-client';
import { MEMORY_PRESSURE_LEVELS, NODE_METRICS } from '../shared/metrics/catalogue.ts';
import { collectProcessMetrics } from '../shared/metrics/factories.ts';
import type { HardwareProfile, LiveStats } from '../shared/hardware.ts';
import type { EngineExit, EngineInfo } from './supervisor.ts';

/**
 * The node agent's Prometheus metrics, on their own Registry (never prom-client's global one,
 * so several agents in one test process cannot mix their series). Names and help come from the
 * shared catalogue (src/shared/metrics/catalogue.ts); gauges read the agent's current state at
 * scrape time through `collect`, so they are never stale. orchard_rpc_bytes_total is not
 * exported: this agent does not relay RPC traffic (engines talk to each other directly).
 */
export interface NodeMetricsSource {
  profile(): HardwareProfile;
  live(): LiveStats | undefined;
  engines(): readonly EngineInfo[];
}

export class NodeMetrics {
  readonly registry = new Registry();
  private readonly starts: Counter<'engine'>;
  private readonly restarts: Counter<'engine'>;
  private readonly exits: Counter<'engine' | 'expected'>;

  constructor(source: NodeMetricsSource) {
    const r = this.registry;
    const M = NODE_METRICS;
    // prom-client's process/nodejs metrics minus the *_total gauges promtool rejects.
    collectProcessMetrics(r);
    // Labels: the id/name/chip/os/version (so a scrape alone identifies the node, and a
    // restart with the same state dir shows the same id) plus the catalogue's platform labels.
    // When Prometheus scrapes through the coordinator's HTTP-SD, its `chip` target label wins and
    // this one shows up as `exported_chip` with the same value.
    new Gauge({
      name: M.info.name,
      help: 'Node identity and platform; value is always 1',
      labelNames: ['id', 'name', 'chip', 'os', 'version', ...M.info.labelNames],
      registers: [r],
      collect() {
        const p = source.profile();
        this.reset();
        this.set(
          { id: p.nodeId, name: p.name, chip: p.chip, os: p.os, version: p.agentVersion, os_version: p.osVersion, agent_version: p.agentVersion, protocol_version: p.protocolVersion },
          1,
        );
      },
    });
    const fromProfile = (def: { name: string; help: string }, pick: (p: HardwareProfile) => number) =>
      new Gauge({
        name: def.name,
        help: def.help,
        registers: [r],
        collect() {
          this.set(pick(source.profile()));
        },
      });
    fromProfile(M.memoryBytes, (p) => p.memoryBytes);
    fromProfile(M.usableMemoryBytes, (p) => p.usableBytes);
    fromProfile(M.bandwidthBytesPerSecond, (p) => p.bandwidthBytesPerSecond);
    fromProfile(M.wiredLimitBytes, (p) => p.wiredLimitBytes);
    new Gauge({
      name: M.availableMemoryBytes.name,
      help: M.availableMemoryBytes.help,
      registers: [r],
      collect() {
        const live = source.live();
        if (live) this.set(live.availableBytes);
      },
    });
    new Gauge({
      name: M.memoryPressure.name,
      help: M.memoryPressure.help,
      labelNames: ['level'],
      registers: [r],
      collect() {
        const live = source.live();
        if (!live) return;
        for (const level of MEMORY_PRESSURE_LEVELS) this.set({ level }, level === live.memoryPressure ? 1 : 0);
      },
    });
    new Gauge({
      name: M.engineUp.name,
      help: 'Engines this agent runs: 1 while ready; labels name the kind, the port it serves and its model',
      labelNames: ['engine', 'port', 'model'],
      registers: [r],
      collect() {
        this.reset();
        for (const e of source.engines()) this.set({ engine: e.kind, port: String(e.port), model: e.model }, 1);
      },
    });
    this.starts = new Counter({ name: M.engineStartsTotal.name, help: M.engineStartsTotal.help, labelNames: ['engine'], registers: [r] });
    this.restarts = new Counter({ name: M.engineRestartsTotal.name, help: M.engineRestartsTotal.help, labelNames: ['engine'], registers: [r] });
    this.exits = new Counter({ name: M.engineExitsTotal.name, help: M.engineExitsTotal.help, labelNames: ['engine', 'expected'], registers: [r] });
  }

  engineStarted(info: EngineInfo, isRestart: boolean): void {
    this.starts.inc({ engine: info.kind });
    if (isRestart) this.restarts.inc({ engine: info.kind });
  }

  engineExited(exit: EngineExit): void {
    this.exits.inc({ engine: exit.kind, expected: String(exit.expected) });
  }
}
