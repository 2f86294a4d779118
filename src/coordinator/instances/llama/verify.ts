/**
 * Proof that llama-server did what the plan said: parse its startup log (`-lv 5`) into the
 * per-layer device assignment and per-device buffer sizes, and compare them with the plan.
 * Pure; the runtime feeds it the log lines the head agent returns.
 *
 * Lines used (llama.cpp src/llama.cpp, src/llama-model.cpp, src/llama-kv-cache.cpp, src/llama-context.cpp):
 *   llama_prepare_model_devices: using device RPC1 (127.0.0.1:50063) (unknown id) - 24105 MiB free
 *   load_tensors: layer   3 assigned to device RPC1, is_swa = 0      (DEBUG: needs -lv 5 here)
 *   load_tensors: RPC0[127.0.0.1:50062] model buffer size =   292.60 MiB
 *   llama_kv_cache: RPC0[127.0.0.1:50062] KV buffer size =   104.00 MiB
 *   sched_reserve: RPC0[127.0.0.1:50062] compute buffer size =    46.54 MiB
 * The "layer n_layer" line is the output layer (llama.cpp treats it as one more unit).
 * Device names differ between the two kinds of line: the assignment says the registered device
 * name (RPC devices are numbered across servers in --rpc order: RPC0, RPC1, …) while buffer lines
 * say the buffer type (`RPC<device within its server>[endpoint]`). The "using device" lines tie
 * them together; everything is reported under the buffer-type name (`RPC0[host:port]`, `MTL0`).
 */
export interface EngineReport {
  /** device name per layer index; index n_layer is the output layer. */
  readonly layerDevice: ReadonlyMap<number, string>;
  readonly modelBytes: ReadonlyMap<string, number>;
  readonly kvBytes: ReadonlyMap<string, number>;
  readonly computeBytes: ReadonlyMap<string, number>;
}

const MIB = 2 ** 20;
const LAYER = /load_tensors:\s+layer\s+(\d+) assigned to device (\S+?),/;
/** `llama_prepare_model_devices: using device RPC1 (127.0.0.1:50062) …`: registered name → endpoint. */
const USING = /using device (RPC\d+) \(([^)\s]+)\)/;
const BUFFER = /(load_tensors|llama_kv_cache|sched_reserve|llama_context):\s+(\S+)\s+(model|KV|compute) buffer size =\s+([\d.]+) MiB/;

export function parseEngineLog(lines: readonly string[]): EngineReport {
  const layerDevice = new Map<number, string>();
  const modelBytes = new Map<string, number>();
  const kvBytes = new Map<string, number>();
  const computeBytes = new Map<string, number>();
  const alias = new Map<string, string>();
  for (const line of lines) {
    const u = USING.exec(line);
    if (u) {
      // Layer lines use the registered device name (RPC0, RPC1, … numbered across servers);
      // buffer lines say RPC<index within its server>[endpoint]. One device per server here,
      // so both become RPC0[endpoint].
      alias.set(u[1]!, `RPC0[${u[2]!}]`);
      continue;
    }
    const l = LAYER.exec(line);
    if (l) {
      layerDevice.set(Number(l[1]), l[2]!);
      continue;
    }
    const b = BUFFER.exec(line);
    if (b) {
      const bytes = Math.round(Number(b[4]) * MIB);
      const target = b[3] === 'model' ? modelBytes : b[3] === 'KV' ? kvBytes : computeBytes;
      // Several buffers per device add up (e.g. SWA and non-SWA KV caches).
      target.set(b[2]!, (target.get(b[2]!) ?? 0) + bytes);
    }
  }
  for (const [il, dev] of layerDevice) layerDevice.set(il, alias.get(dev) ?? dev);
  return { layerDevice, modelBytes, kvBytes, computeBytes };
}

/** One planned device: which engine device name should hold which layers. */
export interface PlannedDevice {
  readonly device: string;
  readonly nodeName: string;
  readonly firstLayer: number;
  readonly lastLayer: number;
  readonly holdsOutput: boolean;
  /** What the plan predicts llama.cpp will report for this device (when the planner says). */
  readonly predicted?: { readonly model: number; readonly kv: number; readonly compute: number } | undefined;
  /** The stage's budget; a device whose reported buffers exceed it fails the check. */
  readonly budgetBytes?: number | undefined;
}

export interface DeviceCheck {
  readonly device: string;
  readonly nodeName: string;
  readonly plannedLayers: string;
  readonly actualLayers: string;
  readonly predicted?: { model: number; kv: number; compute: number } | undefined;
  readonly actual: { model: number; kv: number; compute: number };
}

export interface VerifyResult {
  readonly ok: boolean;
  readonly problems: readonly string[];
  readonly devices: readonly DeviceCheck[];
  /**
   * Buffers the engine reported outside the planned devices, summed: host memory of the head's
   * node (llama.cpp keeps token embeddings in `CPU_Mapped`, plus a `CPU` compute buffer). The
   * planner counts the embeddings in the head stage, so metrics add these to the head's node.
   */
  readonly host?: { readonly model: number; readonly kv: number; readonly compute: number } | undefined;
}

/** Weights are known exactly from the GGUF; llama.cpp only pads tensors. */
export const MODEL_TOLERANCE = { relative: 0.02, absolute: MIB };

function ranges(layers: number[]): string {
  if (layers.length === 0) return '-';
  const out: string[] = [];
  let start = layers[0]!;
  let prev = start;
  for (const l of [...layers.slice(1), Number.NaN]) {
    if (l === prev + 1) {
      prev = l;
      continue;
    }
    out.push(start === prev ? `${start}` : `${start}-${prev}`);
    start = l;
    prev = l;
  }
  return out.join(',');
}

/** The engine prints KV sizes in MiB with two decimals: ±0.005 MiB of rounding. */
const KV_ROUNDING = 0.0051 * MIB;

/**
 * Without the DEBUG assignment lines, recover each device's layers from its INFO-level KV buffer
 * size: llama.cpp gives every device one contiguous range, in device order (the split points are
 * monotonic), and each layer's KV bytes are known exactly from the GGUF. Walking the devices in
 * order and taking layers until their KV adds up to what the device reports gives the ranges;
 * a device whose size no whole number of layers matches is reported. The output layer goes to
 * the last device (llama.cpp's rule); the model-buffer check then proves its weights are there.
 * Returns undefined when the sizes do not tile the model.
 */
export function layersFromKv(report: EngineReport, devices: readonly string[], layerKvBytes: readonly number[]): { map: Map<number, string>; problems: string[] } {
  const map = new Map<number, string>();
  const problems: string[] = [];
  let cursor = 0;
  for (const dev of devices) {
    const kv = report.kvBytes.get(dev) ?? 0;
    let sum = 0;
    while (cursor < layerKvBytes.length && sum + layerKvBytes[cursor]! <= kv + KV_ROUNDING) {
      sum += layerKvBytes[cursor]!;
      map.set(cursor, dev);
      cursor++;
    }
    if (Math.abs(sum - kv) > KV_ROUNDING) problems.push(`${dev}: KV buffer ${(kv / MIB).toFixed(2)} MiB is not a whole number of layers`);
  }
  if (cursor !== layerKvBytes.length) problems.push(`the devices' KV buffers cover ${cursor} of ${layerKvBytes.length} layers`);
  if (devices.length > 0) map.set(layerKvBytes.length, devices[devices.length - 1]!);
  return { map, problems };
}

export function verifyEngineReport(report: EngineReport, planned: readonly PlannedDevice[], nLayer: number, layerKvBytes?: readonly number[]): VerifyResult {
  const problems: string[] = [];
  if (report.layerDevice.size === 0 && layerKvBytes && layerKvBytes.length === nLayer) {
    const derived = layersFromKv(report, planned.map((d) => d.device), layerKvBytes);
    problems.push(...derived.problems);
    report = { ...report, layerDevice: derived.map };
  }
  if (report.layerDevice.size === 0) {
    problems.push('the engine log has no layer assignment lines (was llama-server started with -lv 5?) and no per-layer KV sizes to derive them from');
  }
  const wanted = new Map<number, PlannedDevice>();
  for (const d of planned) {
    for (let il = d.firstLayer; il <= d.lastLayer; il++) wanted.set(il, d);
    if (d.holdsOutput) wanted.set(nLayer, d);
  }
  if (report.layerDevice.size > 0) {
    for (let il = 0; il <= nLayer; il++) {
      const want = wanted.get(il);
      const got = report.layerDevice.get(il);
      const what = il === nLayer ? 'output layer' : `layer ${il}`;
      if (!want) problems.push(`plan places no device for ${what}`);
      else if (got === undefined) problems.push(`engine did not report ${what}`);
      else if (got !== want.device) problems.push(`${what}: planned on ${want.device} (${want.nodeName}), engine put it on ${got}`);
    }
  }
  const devices: DeviceCheck[] = planned.map((d) => {
    const actualLayers = [...report.layerDevice].filter(([il, dev]) => dev === d.device && il < nLayer).map(([il]) => il).sort((a, b) => a - b);
    const actual = {
      model: report.modelBytes.get(d.device) ?? 0,
      kv: report.kvBytes.get(d.device) ?? 0,
      compute: report.computeBytes.get(d.device) ?? 0,
    };
    if (!report.modelBytes.has(d.device)) problems.push(`engine reported no model buffer on ${d.device} (${d.nodeName})`);
    if (d.predicted && report.modelBytes.has(d.device)) {
      const diff = Math.abs(actual.model - d.predicted.model);
      if (diff > Math.max(MODEL_TOLERANCE.absolute, MODEL_TOLERANCE.relative * d.predicted.model)) {
        problems.push(`${d.device} (${d.nodeName}): model buffer ${(actual.model / MIB).toFixed(2)} MiB, plan said ${(d.predicted.model / MIB).toFixed(2)} MiB`);
      }
    }
    const total = actual.model + actual.kv + actual.compute;
    if (d.budgetBytes !== undefined && d.budgetBytes > 0 && total > d.budgetBytes) {
      problems.push(`${d.device} (${d.nodeName}): engine buffers ${(total / MIB).toFixed(1)} MiB exceed the stage budget ${(d.budgetBytes / MIB).toFixed(1)} MiB`);
    }
    return {
      device: d.device,
      nodeName: d.nodeName,
      plannedLayers: `${d.firstLayer}-${d.lastLayer}${d.holdsOutput ? '+output' : ''}`,
      actualLayers: ranges(actualLayers) + (report.layerDevice.get(nLayer) === d.device ? '+output' : ''),
      predicted: d.predicted ? { ...d.predicted } : undefined,
      actual,
    };
  });
  const plannedNames = new Set(planned.map((d) => d.device));
  const elsewhere = (m: ReadonlyMap<string, number>) => [...m].filter(([dev]) => !plannedNames.has(dev)).reduce((t, [, v]) => t + v, 0);
  const host = { model: elsewhere(report.modelBytes), kv: elsewhere(report.kvBytes), compute: elsewhere(report.computeBytes) };
  return { ok: problems.length === 0, problems, devices, host };
}
