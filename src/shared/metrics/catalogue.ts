/**
 * Every Orchard metric, declared once: name, type, help, labels, unit, buckets and who exports
 * it. The node agent and the coordinator create their prom-client metrics from these
 * declarations (see `factories.ts`), docs/metrics.md documents them, the dashboards may only
 * query them (the Prometheus integration test enforces it), and the unit tests hold the naming
 * rules. Adding a metric anywhere else is a bug: add it here.
 *
 * Label rules (why): Prometheus keeps one series per label combination, so labels are bounded
 * enumerations or cluster-sized sets (nodes, models, engines) — never request ids, prompts or
 * user text. Metrics a node exports never carry `node`, `node_id` or `role`: those are target
 * labels Prometheus attaches from the coordinator's HTTP-SD answer, and a metric label with the
 * same name would be renamed to `exported_<name>` at scrape time. One deliberate exception:
 * `orchard_node_info` carries the node's identity (id, name, chip, os, version) so a bare scrape
 * of an agent, without SD, still says which machine it is. Its `chip` equals the SD target label
 * `chip` (both come from the same hardware profile); deploy/prometheus.yml scrapes with
 * `honor_labels: true`, so the series keeps one `chip` label (without it Prometheus would add an
 * `exported_chip` with the same value — harmless, just noise). `id`/`name` are not target label
 * names, so they never collide.
 * Coordinator-exported metrics may carry `node` (the coordinator's own target has no `node`
 * label, see prometheus-sd.ts), which is how per-node placement series are told apart.
 */

export type MetricType = 'gauge' | 'counter' | 'histogram';
export type Exporter = 'node' | 'coordinator';

export interface MetricDef<L extends string = string> {
  readonly name: string;
  readonly type: MetricType;
  readonly help: string;
  readonly labelNames: readonly L[];
  /** Unit of the value: bytes, seconds, bytes/s, 1 (info/state), count. */
  readonly unit: string;
  readonly exportedBy: Exporter;
  /** Histogram bucket upper bounds (ascending). */
  readonly buckets?: readonly number[];
  /** Documented values of enumerated labels (keeps cardinality visible and reviewable). */
  readonly labelValues?: Readonly<Partial<Record<L, readonly string[]>>>;
}

export interface GaugeDef<L extends string = string> extends MetricDef<L> {
  readonly type: 'gauge';
}
export interface CounterDef<L extends string = string> extends MetricDef<L> {
  readonly type: 'counter';
}
export interface HistogramDef<L extends string = string> extends MetricDef<L> {
  readonly type: 'histogram';
  readonly buckets: readonly number[];
}
export type AnyMetricDef = GaugeDef<string> | CounterDef<string> | HistogramDef<string>;

type DefInput<L extends string> = Omit<MetricDef<L>, 'type' | 'labelNames'> & { readonly labelNames?: readonly L[] };

const gauge = <L extends string = never>(d: DefInput<L>): GaugeDef<L> => ({ ...d, labelNames: d.labelNames ?? [], type: 'gauge' });
const counter = <L extends string = never>(d: DefInput<L>): CounterDef<L> => ({ ...d, labelNames: d.labelNames ?? [], type: 'counter' });
const histogram = <L extends string = never>(d: DefInput<L> & { readonly buckets: readonly number[] }): HistogramDef<L> => ({
  ...d,
  labelNames: d.labelNames ?? [],
  type: 'histogram',
});

/** Engine kinds as the node agent names them (src/node/engine-spec.ts) plus MLX ranks. */
export const ENGINE_KINDS = ['llama-server', 'rpc-server', 'mlx-rank'] as const;
/** orchard_rpc_bytes_total: `sent` toward the peer node, `received` from it. */
export const RPC_DIRECTIONS = ['sent', 'received'] as const;
/** Memory categories of a stage, the same split the planner predicts and the engine reports. */
export const STAGE_MEMORY_KINDS = ['weights', 'kv', 'compute', 'overhead'] as const;
/**
 * How a generation request ended. `rejected`: the runtime refused it before generation (busy
 * queue, model not ready, the engine refusing the prompt). The HTTP edge's own refusals, before a
 * request reaches the runtime, say why: `invalid` (400: not JSON, bad fields, over the context),
 * `unauthorized` (401), `not_found` (404: unknown model), `too_large` (413: body over the limit).
 */
export const REQUEST_OUTCOMES = ['ok', 'error', 'cancelled', 'rejected', 'invalid', 'unauthorized', 'not_found', 'too_large'] as const;
export const NODE_STATES = ['up', 'suspect', 'down'] as const;
/** Membership changes as the coordinator's registry reports them. */
export const DISCOVERY_EVENT_KINDS = ['added', 'replaced', 'state', 'removed'] as const;
/** Why a model instance had to heal (the coordinator's instances/healing.ts). */
export const RECOVERY_CAUSES = ['node-down', 'node-restarted', 'node-left', 'engine-exit', 'drain'] as const;
/** Seconds from losing an engine to serving again: a reload of a few seconds to minutes. */
export const RECOVERY_BUCKETS_SECONDS = [1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640] as const;
export const MEMORY_PRESSURE_LEVELS = ['normal', 'warn', 'critical', 'unknown'] as const;

/**
 * Time to first token: prefill on a multi-node pipeline ranges from tens of milliseconds (short
 * prompt, one Mac) to tens of seconds (long prompt over Ethernet), so the buckets are roughly
 * logarithmic over that span.
 */
export const TTFT_BUCKETS_SECONDS = [0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 20, 40] as const;
/**
 * Inter-token latency: decode on Apple Silicon runs ~5–150 tokens/s, i.e. ~7–200 ms per token;
 * the buckets are dense there (where p50/p95 are read) and sparse beyond (stalls).
 */
export const ITL_BUCKETS_SECONDS = [0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5] as const;
/** Whole-request duration (queue + prefill + decode). */
export const REQUEST_DURATION_BUCKETS_SECONDS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320] as const;

/** Metrics the node agent exports on its own `/metrics` (one target per node). */
export const NODE_METRICS = {
  info: gauge({
    name: 'orchard_node_info',
    help: 'Node identity, platform and agent version; value is always 1',
    labelNames: ['id', 'name', 'chip', 'os', 'version', 'os_version', 'protocol_version'],
    unit: '1',
    exportedBy: 'node',
  }),
  memoryBytes: gauge({
    name: 'orchard_node_memory_bytes',
    help: 'Total RAM of the node (or the configured memory-limit override)',
    unit: 'bytes',
    exportedBy: 'node',
  }),
  budgetBytes: gauge({
    name: 'orchard_node_budget_bytes',
    help: 'Model-memory budget the planner may use on this node: min(wired limit, RAM - OS reserve) minus margin',
    unit: 'bytes',
    exportedBy: 'node',
  }),
  availableMemoryBytes: gauge({
    name: 'orchard_node_available_memory_bytes',
    help: 'Memory available to new allocations now, as the OS reports it',
    unit: 'bytes',
    exportedBy: 'node',
  }),
  bandwidthBytesPerSecond: gauge({
    name: 'orchard_node_bandwidth_bytes_per_second',
    help: 'Spec memory bandwidth of this node (chip table or override); the planner uses it × the engine efficiency until the node is calibrated',
    unit: 'bytes/s',
    exportedBy: 'node',
  }),
  effectiveBandwidthBytesPerSecond: gauge({
    name: 'orchard_node_effective_bandwidth_bytes_per_second',
    help: 'Decode read bandwidth this node measured of its engine (orchard node --calibrate); absent until measured',
    unit: 'bytes/s',
    exportedBy: 'node',
  }),
  decodeFixedSecondsPerToken: gauge({
    name: 'orchard_node_decode_fixed_seconds',
    help: 'Seconds per decoded token this node measured its engine to pay as the head whatever the bytes it reads (orchard node --calibrate, two depths); absent until measured',
    unit: 'seconds',
    exportedBy: 'node',
  }),
  boundaryOverheadSeconds: gauge({
    name: 'orchard_node_boundary_overhead_seconds',
    help: 'Seconds a stage boundary with this node as the worker costs per round trip beyond the link probe (orchard node --calibrate, through a loopback engine tunnel); absent until measured',
    unit: 'seconds',
    exportedBy: 'node',
  }),
  decodeAttentionFlopsPerSecond: gauge({
    name: 'orchard_node_decode_attention_flops_per_second',
    help: 'FLOP/s of attention in decode this node measured of its engine (orchard node --calibrate, two prompt lengths); absent until measured',
    unit: 'FLOP/s',
    exportedBy: 'node',
  }),
  prefillFlopsPerSecond: gauge({
    name: 'orchard_node_prefill_flops_per_second',
    help: 'Prompt-processing FLOP/s this node measured of its engine (orchard node --calibrate); absent until measured',
    unit: 'FLOP/s',
    exportedBy: 'node',
  }),
  wiredLimitBytes: gauge({
    name: 'orchard_node_wired_limit_bytes',
    help: 'GPU wired-memory limit (iogpu.wired_limit_mb, or the modelled macOS default when unset)',
    unit: 'bytes',
    exportedBy: 'node',
  }),
  memoryPressure: gauge({
    name: 'orchard_node_memory_pressure',
    help: 'Memory pressure as a state set: 1 for the current level, 0 for the others',
    labelNames: ['level'],
    labelValues: { level: MEMORY_PRESSURE_LEVELS },
    unit: '1',
    exportedBy: 'node',
  }),
  engineUp: gauge({
    name: 'orchard_engine_up',
    help: 'Engines this agent runs: 1 while ready, 0 while starting or restarting',
    labelNames: ['engine', 'model'],
    labelValues: { engine: ENGINE_KINDS },
    unit: '1',
    exportedBy: 'node',
  }),
  engineStartsTotal: counter({
    name: 'orchard_engine_starts_total',
    help: 'Engines started and ready',
    labelNames: ['engine'],
    labelValues: { engine: ENGINE_KINDS },
    unit: 'count',
    exportedBy: 'node',
  }),
  engineExitsTotal: counter({
    name: 'orchard_engine_exits_total',
    help: 'Engine exits; expected="false" are crashes or kills the agent did not ask for',
    labelNames: ['engine', 'expected'],
    labelValues: { engine: ENGINE_KINDS, expected: ['true', 'false'] },
    unit: 'count',
    exportedBy: 'node',
  }),
  rpcBytesTotal: counter({
    name: 'orchard_rpc_bytes_total',
    help: 'Engine payload bytes through this agent\'s TLS tunnels (head forwarders and worker listener), by peer node id and direction from this node\'s view',
    labelNames: ['peer', 'direction'],
    labelValues: { direction: RPC_DIRECTIONS },
    unit: 'bytes',
    exportedBy: 'node',
  }),
  linkRttSeconds: gauge({
    name: 'orchard_link_rtt_seconds',
    help: 'Round trip to a peer node over the TLS tunnel path engines use (median of small frames), as this agent last measured it for the coordinator',
    labelNames: ['peer'],
    unit: 'seconds',
    exportedBy: 'node',
  }),
  linkThroughputBytesPerSecond: gauge({
    name: 'orchard_link_throughput_bytes_per_second',
    help: 'Payload throughput toward a peer node over the TLS tunnel path engines use, as this agent last measured it for the coordinator',
    labelNames: ['peer'],
    unit: 'bytes/s',
    exportedBy: 'node',
  }),
} as const;

/** Metrics the coordinator exports on its HTTP port's `/metrics` (one target per cluster). */
export const COORDINATOR_METRICS = {
  buildInfo: gauge({
    name: 'orchard_coordinator_build_info',
    help: 'Coordinator version; value is always 1',
    labelNames: ['version', 'nodejs_version'],
    unit: '1',
    exportedBy: 'coordinator',
  }),
  nodes: gauge({
    name: 'orchard_nodes',
    help: 'Registered nodes by liveness state',
    labelNames: ['state'],
    labelValues: { state: NODE_STATES },
    unit: 'count',
    exportedBy: 'coordinator',
  }),
  discoveryEventsTotal: counter({
    name: 'orchard_discovery_events_total',
    help: 'Membership changes: nodes added, replaced (agent restarted), changing state, removed',
    labelNames: ['kind'],
    labelValues: { kind: DISCOVERY_EVENT_KINDS },
    unit: 'count',
    exportedBy: 'coordinator',
  }),
  modelLoaded: gauge({
    name: 'orchard_model_loaded',
    help: 'Models the coordinator has placed and started: 1 while serving, 0 while loading',
    labelNames: ['model', 'engine'],
    labelValues: { engine: ['llama.cpp', 'mlx'] },
    unit: '1',
    exportedBy: 'coordinator',
  }),
  stageLayers: gauge({
    name: 'orchard_stage_layers',
    help: 'Layers of the model a stage holds on a node (the placement plan)',
    labelNames: ['model', 'node'],
    unit: 'count',
    exportedBy: 'coordinator',
  }),
  stagePredictedBytes: gauge({
    name: 'orchard_stage_predicted_bytes',
    help: 'Memory the planner predicted for a stage, by kind',
    labelNames: ['model', 'node', 'kind'],
    labelValues: { kind: STAGE_MEMORY_KINDS },
    unit: 'bytes',
    exportedBy: 'coordinator',
  }),
  stageActualBytes: gauge({
    name: 'orchard_stage_actual_bytes',
    help: 'Memory the engine reported for a stage once loaded, by kind (compare with orchard_stage_predicted_bytes)',
    labelNames: ['model', 'node', 'kind'],
    labelValues: { kind: STAGE_MEMORY_KINDS },
    unit: 'bytes',
    exportedBy: 'coordinator',
  }),
  modelPredictedTokensPerSecond: gauge({
    name: 'orchard_model_predicted_tokens_per_second',
    help: 'Decode speed the planner predicted for the model placement',
    labelNames: ['model'],
    unit: 'tokens/s',
    exportedBy: 'coordinator',
  }),
  requestsTotal: counter({
    name: 'orchard_requests_total',
    help: 'Generation requests by how they ended',
    labelNames: ['model', 'outcome'],
    labelValues: { outcome: REQUEST_OUTCOMES },
    unit: 'count',
    exportedBy: 'coordinator',
  }),
  promptTokensTotal: counter({
    name: 'orchard_prompt_tokens_total',
    help: 'Prompt tokens processed (as counted in the usage of each response)',
    labelNames: ['model'],
    unit: 'tokens',
    exportedBy: 'coordinator',
  }),
  generatedTokensTotal: counter({
    name: 'orchard_generated_tokens_total',
    help: 'Tokens generated and sent to clients',
    labelNames: ['model'],
    unit: 'tokens',
    exportedBy: 'coordinator',
  }),
  timeToFirstTokenSeconds: histogram({
    name: 'orchard_time_to_first_token_seconds',
    help: 'Time from request arrival to the first generated token (queue + prefill)',
    labelNames: ['model'],
    buckets: TTFT_BUCKETS_SECONDS,
    unit: 'seconds',
    exportedBy: 'coordinator',
  }),
  interTokenLatencySeconds: histogram({
    name: 'orchard_inter_token_latency_seconds',
    help: 'Time between consecutive generated tokens of one request',
    labelNames: ['model'],
    buckets: ITL_BUCKETS_SECONDS,
    unit: 'seconds',
    exportedBy: 'coordinator',
  }),
  requestDurationSeconds: histogram({
    name: 'orchard_request_duration_seconds',
    help: 'Time from request arrival to the end of the response',
    labelNames: ['model'],
    buckets: REQUEST_DURATION_BUCKETS_SECONDS,
    unit: 'seconds',
    exportedBy: 'coordinator',
  }),
  instanceRecoveriesTotal: counter({
    name: 'orchard_instance_recoveries_total',
    help: 'Model instances that lost an engine and were re-placed and serving again, by cause',
    labelNames: ['model', 'cause'],
    labelValues: { cause: RECOVERY_CAUSES },
    unit: 'count',
    exportedBy: 'coordinator',
  }),
  instanceRecoverySeconds: histogram({
    name: 'orchard_instance_recovery_seconds',
    help: 'Time from an instance losing an engine to serving again (re-plan + reload)',
    labelNames: ['model'],
    buckets: RECOVERY_BUCKETS_SECONDS,
    unit: 'seconds',
    exportedBy: 'coordinator',
  }),
  streamsResumedTotal: counter({
    name: 'orchard_streams_resumed_total',
    help: 'In-flight streams continued on a healed instance (prompt + delivered tokens resubmitted) instead of failing',
    labelNames: ['model'],
    unit: 'count',
    exportedBy: 'coordinator',
  }),
  queueDepth: gauge({
    name: 'orchard_queue_depth',
    help: 'Requests waiting for a model slot',
    labelNames: ['model'],
    unit: 'count',
    exportedBy: 'coordinator',
  }),
  requestsInFlight: gauge({
    name: 'orchard_requests_in_flight',
    help: 'Requests generating now',
    labelNames: ['model'],
    unit: 'count',
    exportedBy: 'coordinator',
  }),
} as const;

/** The whole catalogue as a list (docs, tests and dashboard checks iterate it). */
export const CATALOGUE: readonly AnyMetricDef[] = [...Object.values(NODE_METRICS), ...Object.values(COORDINATOR_METRICS)];

/** Labels Prometheus attaches to every series of a target from the HTTP-SD answer. */
export const TARGET_LABELS = ['node', 'node_id', 'chip', 'role'] as const;

/**
 * Target labels a node metric may still carry, by metric: the info metric's `chip` (same value
 * as the target label; see the label rules at the top).
 */
export const TARGET_LABELS_ALLOWED: Readonly<Record<string, readonly string[]>> = { orchard_node_info: ['chip'] };

/**
 * Series names a metric produces in the exposition: histograms add _bucket, _sum and _count.
 * Used to map a name found in a PromQL expression back to its declaration.
 */
export function seriesNames(def: MetricDef): string[] {
  if (def.type === 'histogram') return [`${def.name}_bucket`, `${def.name}_sum`, `${def.name}_count`];
  return [def.name];
}

/** The declaration a series name belongs to, or undefined when the catalogue does not declare it. */
export function findMetric(seriesName: string, catalogue: readonly MetricDef[] = CATALOGUE): MetricDef | undefined {
  return catalogue.find((d) => seriesNames(d).includes(seriesName));
}
