import Table from 'cli-table3';
import { type Command, Option } from 'commander';
import { addCredentialOptions, type CredentialFlags, coordinatorClient } from '../credentials.ts';
import { formatBandwidth, formatBytes } from '../../shared/units.ts';

type Wire = Record<string, unknown>;
/** Colours only on a terminal: pipes and logs get plain text. */
const tableStyle = () => (process.stdout.isTTY ? {} : { head: [], border: [] });
const num = (v: unknown) => Number(v ?? 0);

/** Proto status → the stable JSON shape of `orchard status --json` (sizes as numbers). */
export function statusJson(s: Wire): Wire {
  const nodes = ((s.nodes ?? []) as Wire[]).map((n) => {
    const p = (n.profile ?? {}) as Wire;
    return {
      id: p.nodeId,
      name: p.name,
      state: String(n.state ?? '').replace('NODE_STATE_', '').toLowerCase(),
      // `orchard node drain`: no new placement on it.
      drained: !!n.drained,
      address: n.address,
      discoveredBy: n.discoveredBy,
      lastSeenSeconds: n.lastSeenSeconds,
      hardware: {
        chip: p.chip,
        os: p.os,
        memoryBytes: num(p.memoryBytes),
        budgetBytes: num(p.budgetBytes),
        bandwidthBytesPerSecond: num(p.bandwidthBytesPerSecond),
        // Measured by the node (orchard node --calibrate); null until then.
        effectiveBandwidthBytesPerSecond: num(p.effectiveBandwidthBytesPerSecond) || null,
        prefillFlopsPerSecond: num(p.prefillFlopsPerSecond) || null,
        decodeFixedSecondsPerToken: num(p.effectiveBandwidthBytesPerSecond) ? num(p.decodeFixedSecondsPerToken) : null,
        boundaryOverheadSeconds: num(p.boundaryOverheadSeconds) || null,
        decodeAttentionFlopsPerSecond: (num(p.effectiveBandwidthBytesPerSecond) && num(p.decodeAttentionFlopsPerSecond)) || null,
        wiredLimitBytes: num(p.wiredLimitBytes),
        engines: p.engines,
      },
      live: n.live ? { availableBytes: num((n.live as Wire).availableBytes), memoryPressure: (n.live as Wire).memoryPressure } : undefined,
    };
  });
  const models = ((s.models ?? []) as Wire[]).map((m) => ({
    name: m.name,
    path: m.path,
    state: m.state,
    engine: m.engine,
    error: m.error || undefined,
    predictedTokensPerSecond: m.predictedTokensPerSecond,
    loadedAtMs: num(m.loadedAtMs) || undefined,
    heal: m.heal || undefined,
    recoveries: num(m.recoveries),
    recovery: m.recovery ?? undefined,
    untunnelledRdma: m.untunnelledRdma === true,
    parallelism: m.parallelism ? { mode: m.parallelism, reason: m.parallelismReason } : undefined,
    stages: ((m.stages ?? []) as Wire[]).map((st) => ({
      nodeId: st.nodeId,
      nodeName: st.nodeName,
      firstLayer: st.firstLayer,
      lastLayer: st.lastLayer,
      endpoint: st.endpoint,
      budgetBytes: num(st.budgetBytes),
      bytes: Object.fromEntries(Object.entries((st.bytes ?? {}) as Wire).map(([k, v]) => [k, num(v)])),
    })),
  }));
  // The link matrix (measured over the agents' tunnels), by node id and by name where known.
  const names = new Map(nodes.map((n) => [String(n.id), String(n.name)]));
  const links = ((s.links ?? []) as Wire[]).map((l) => ({
    from: l.fromNodeId,
    fromName: names.get(String(l.fromNodeId)),
    to: l.toNodeId,
    toName: names.get(String(l.toNodeId)),
    rttSeconds: num(l.rttSeconds) || null,
    bytesPerSecond: num(l.bytesPerSecond) || null,
    measuredAtSeconds: num(l.measuredAtSeconds),
    error: l.error || undefined,
  }));
  const st = (s.stateStore ?? {}) as Wire;
  const stateStore = st.backend ? { backend: st.backend, location: st.location, localServer: !!st.localServer } : undefined;
  const l = s.leader as Wire | undefined;
  const leader = l?.grpc ? { coordinatorId: l.coordinatorId, grpc: l.grpc, http: l.http } : null;
  return { clusterId: s.clusterId, version: s.version, role: s.role || 'single', leader, stateStore, nodes, models, links };
}

/** `--links`: one row per measured direction. */
function linksTable(links: readonly Wire[], nowSeconds: number): string {
  if (links.length === 0) return '(no links measured yet: nodes with a tunnel are probed within seconds of coming up)';
  const t = new Table({ head: ['from', 'to', 'rtt', 'throughput', 'age', 'problem'], style: tableStyle() });
  for (const l of links) {
    const rtt = num(l.rttSeconds);
    const bps = num(l.bytesPerSecond);
    t.push([
      String(l.fromName ?? l.from),
      String(l.toName ?? l.to),
      rtt ? `${(rtt * 1000).toFixed(2)} ms` : '-',
      bps ? `${formatBandwidth(bps)} (${((bps * 8) / 1e9).toFixed(2)} Gbit/s)` : '-',
      `${Math.max(0, Math.round(nowSeconds - num(l.measuredAtSeconds)))} s`,
      String(l.error ?? ''),
    ]);
  }
  return t.toString();
}

/** The line that warns a model's links between nodes bypass the TLS tunnels; undefined when they do not. */
export function linksNote(model: Wire): string | undefined {
  return model.untunnelledRdma ? 'links: untunnelled RDMA (JACCL over Thunderbolt, outside the TLS tunnels; loaded with --allow-untunnelled-rdma)' : undefined;
}

/** Which coordinator answered: the only one, the leader, or a standby relaying to the leader. */
function roleLine(role: unknown, leader: Wire | null): string {
  if (role === 'leader') return 'coordinator: leader\n';
  if (role === 'standby') return `coordinator: standby, ${leader ? `leader at ${String(leader.grpc)} (HTTP ${String(leader.http)})` : 'no leader known yet'}\n`;
  return '';
}

/** Which mode holds the cluster's state: one coordinator with a file, or NATS (several may share it). */
function stateLine(st: Wire | undefined): string {
  if (!st) return '';
  if (st.backend === 'nats') return `state: NATS JetStream at ${String(st.location)}${st.localServer ? ' (local nats-server started by the coordinator)' : ''}\n`;
  return `state: file ${String(st.location)} (single coordinator, no NATS)\n`;
}

/** The node's own measurement: decode bandwidth, its fixed cost per token, its boundary overhead, decode attention, prefill compute, or '-' before `--calibrate`. */
function measured(h: Wire): string {
  const bw = num(h.effectiveBandwidthBytesPerSecond);
  const fixed = num(h.decodeFixedSecondsPerToken);
  const boundary = num(h.boundaryOverheadSeconds);
  const attention = num(h.decodeAttentionFlopsPerSecond);
  const attn = attention ? `, attention ${(attention / 1e9).toFixed(1)} GFLOP/s` : '';
  return bw ? `${formatBandwidth(bw)} + ${(fixed * 1000).toFixed(1)} ms/token (+${(boundary * 1000).toFixed(1)} ms/boundary)${attn}, ${(num(h.prefillFlopsPerSecond) / 1e9).toFixed(0)} GFLOP/s` : '-';
}

export function registerStatus(program: Command): void {
  addCredentialOptions(program.command('status'))
    .description('show the cluster: nodes (state, hardware) and loaded models with their stages')
    .addOption(new Option('--coordinator <host:port>', 'coordinator gRPC address (default 127.0.0.1:7420)').env('ORCHARD_COORDINATOR'))
    .option('--json', 'print JSON on stdout')
    .option('--links', 'show the measured links between nodes (round trip, throughput over the tunnels)')
    .action(async (flags: CredentialFlags & { coordinator?: string; json?: boolean; links?: boolean }) => {
      const client = await coordinatorClient(flags);
      try {
        const s = statusJson(await client.unary('status', {}, 5000));
        if (flags.json) {
          process.stdout.write(`${JSON.stringify(s)}\n`);
          return;
        }
        if (flags.links) {
          process.stdout.write(`cluster ${String(s.clusterId)}\n${linksTable(s.links as Wire[], Date.now() / 1000)}\n`);
          return;
        }
        const nodes = s.nodes as ReturnType<typeof statusJson>[];
        const t = new Table({ head: ['node', 'state', 'address', 'chip', 'memory', 'usable', 'bandwidth', 'measured', 'via'], style: tableStyle() });
        for (const n of nodes as Wire[]) {
          const h = n.hardware as Wire;
          // a discovered agent is not a member: only what its Bonjour record claims is known
          if (n.state === 'discovered') t.push([String(n.name), 'discovered', String(n.address), String(h.chip || '-'), num(h.memoryBytes) ? formatBytes(num(h.memoryBytes)) : '-', '-', '-', '-', String(n.discoveredBy)]);
          else t.push([String(n.name), n.drained ? `${String(n.state)} (drained)` : String(n.state), String(n.address), String(h.chip), formatBytes(num(h.memoryBytes)), formatBytes(num(h.budgetBytes)), formatBandwidth(num(h.bandwidthBytesPerSecond)), measured(h), String(n.discoveredBy)]);
        }
        process.stdout.write(`cluster ${String(s.clusterId)}\n${stateLine(s.stateStore as Wire | undefined)}${roleLine(s.role, s.leader as Wire | null)}${nodes.length ? t.toString() : '(no nodes yet)'}\n`);
        if ((nodes as Wire[]).some((n) => n.state === 'discovered')) {
          process.stdout.write('discovered: announced on Bonjour but not joined (no certificate of this cluster); join it with `orchard node --token …` (`orchard coordinator token` prints one)\n');
        }
        for (const m of s.models as Wire[]) {
          process.stdout.write(`\nmodel ${String(m.name)} [${String(m.state)}] ${String(m.path)}${m.error ? ` — ${String(m.error)}` : ''}\n`);
          const links = linksNote(m);
          if (links) process.stdout.write(`  ${links}\n`);
          const par = m.parallelism as Wire | undefined;
          if (par) process.stdout.write(`  parallelism: ${String(par.mode)} — ${String(par.reason)}\n`);
          const r = m.recovery as Wire | undefined;
          if (r) process.stdout.write(`  ${m.state === 'failed' ? 'gave up healing' : 'recovering'}: attempt ${String(r.attempt)}/${String(r.maxAttempts)}, ${String(r.phase)}${r.message ? ` — ${String(r.message)}` : ''}\n`);
          const mt = new Table({ head: ['stage', 'node', 'layers', 'weights', 'kv', 'total', 'budget', 'endpoint'], style: tableStyle() });
          ((m.stages ?? []) as Wire[]).forEach((st, i) => {
            const b = st.bytes as Wire;
            mt.push([String(i), String(st.nodeName), `${String(st.firstLayer)}-${String(st.lastLayer)}`, formatBytes(num(b.weights)), formatBytes(num(b.kv)), formatBytes(num(b.total)), formatBytes(num(st.budgetBytes)), String(st.endpoint || '-')]);
          });
          process.stdout.write(`${mt.toString()}\n`);
        }
      } finally {
        client.close();
      }
    });
}
