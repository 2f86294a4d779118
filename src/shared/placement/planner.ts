import { UsageError } from '../errors.ts';
import type { CacheType } from '../memory/kv.ts';
import type { StageBytes } from '../memory/stage.ts';
import type { ModelProfile } from '../model/profile.ts';
import { formatBytes } from '../units.ts';
import { boundarySeconds, headPrefillFlops, linkOf, pipelineSeconds, prefillSeconds, stageWireSeconds } from './cost.ts';
import { type Assignment, type Prepared, overlapsUbatches, prepare, resolveOptions, validate } from './prepared.ts';
import type { Plan, PlacementNode, PlacementOptions, PlanStage } from './types.ts';

/**
 * The placement planner: which node holds which contiguous layer range so that the model fits
 * and a decoded token takes the least predicted time.
 *
 * Cost model (DESIGN "Placement", constants in cost.ts): at batch 1 decode is memory-bandwidth
 * bound, so a token costs
 *   Σ_stages bytes_read(stage) / bandwidth(node) + Σ_boundaries (hop + (activations + inputs) / link) + head overhead,
 * and prefilling a prompt of P tokens in U = ⌈P / ubatch⌉ ubatches costs the workers' chain
 *   A = Σ_workers (P × FLOPs(stage) / compute(node) + graph bytes(stage) / link) + Σ_boundaries (U × hop + (P activations + inputs) / link)
 * and the head's layers c, overlapped as llama.cpp's pipeline parallelism overlaps them:
 * (A + c + (U − 1) · max(A, c)) / U (cost.ts prefillSeconds; A + c for one ubatch), after the
 * prompt-cache save of the previous request's KV on every worker (its layers' bytes / link + round
 * trips; rpc-wire.ts says what llama.cpp sends).
 * The objective is a weighted sum of both (options.objective); every term but that max is a per-node
 * (per node and head, with measured links) linear function of the layer prefix sums, so stage order does not change the sum. Memory of a stage is Σ its layers' (weights + KV)
 * plus a per-stage constant (compute buffer, engine overhead; on the head also the output head,
 * token embeddings and host buffers), so a node's capacity is a bound on a contiguous range.
 * The engine decides those terms (stage-memory.ts): llama.cpp's buffers, or an MLX rank's peak.
 *
 * Algorithm (exact for the cost model, given the node order): for every choice of head node h
 * (the last stage — see memory/stage.ts for why the head is last), a dynamic program over the
 * other nodes in bandwidth order: f[i][k] = least cost to place layers [0, k) on a subset of the
 * first i nodes, each taking one contiguous block or being skipped (the row also carries that
 * path's chain A, so each head split is costed with the overlap: exact for decode, and for TTFT
 * (its cost grows with A) up to its decode tie-break; for `balanced` the workers minimise the sum,
 * which matched exhaustive search in the unit tests but is not proven optimal). The transition over the
 * block start j is a sliding-window minimum (the feasible j for a given k form a window whose
 * left end only moves right), so each node costs O(L) and the whole plan O(N²·L): 64 nodes ×
 * 126 layers is ~0.5 M steps. Fastest-first filling, single-node preference and "add a node only
 * when capacity demands or it lowers the time" all fall out of minimising the same cost; ties go
 * to fewer stages (skips win ties) and to the earlier node in (bandwidth desc, name) order, so
 * the result is deterministic.
 */

export interface PlanInput {
  readonly profile: ModelProfile;
  readonly nodes: readonly PlacementNode[];
  readonly options?: Partial<PlacementOptions>;
}

const EPS = 1e-12;

/** Weighted cost of layers [0, k) on node i as the head (no link to cross), linear in the prefix sums. */
function lin(p: Prepared, i: number, k: number): number {
  return p.wd * (p.readPrefix[k]! * p.invBw[i]! + p.attnPrefix[k]! * p.invAttn[i]!) + p.wt * p.flopPrefix[k]! * p.invFlops[i]!;
}

/**
 * A DP row per k (layers [0, k) placed on workers): `f` the least weighted cost, `chain` that
 * path's prefill seconds (worker compute and boundaries, unweighted: the chain of
 * cost.ts pipelineSeconds).
 */
interface Row {
  readonly f: Float64Array;
  readonly chain: Float64Array;
}

/** A worker's boundary with the head of the plan being costed: weighted cost, its prefill part (seconds), the link. */
interface Edge {
  readonly hop: number;
  readonly hopPrefill: number;
  readonly link: { readonly rttSeconds: number; readonly bytesPerSecond: number };
}

/**
 * One DP step: node i may take one contiguous block [j, k) after layers [0, j) are placed, or be
 * skipped unless pinned. `e` is its boundary with the head; its layers' wire (graph bytes in the
 * chain, prompt-cache save before the prompt: cost.ts layerWire) crosses e.link. Writes the
 * choice per k (-1 skip, -2 unreachable, else j) into `ch`; returns the new row.
 */
function step(p: Prepared, i: number, e: Edge, row: Row, ch: Int32Array, g: Float64Array, deque: Int32Array): Row {
  const { f, chain } = row;
  const L = p.mm.profile.layerCount;
  const { memPrefix, readPrefix, attnPrefix, flopPrefix, chainWirePrefix, saveWirePrefix, saveTripsPrefix } = p;
  const { hop, hopPrefill } = e;
  const cap = p.budgets[i]! - p.workerConst;
  const inv = 1 / e.link.bytesPerSecond;
  // the block's weighted cost is linear in the prefix sums: inlined below, the hot path
  const a = p.wd * p.invBw[i]!;
  const a2 = p.wd * p.invAttn[i]!;
  const b = p.wt * p.invFlops[i]!;
  const c = p.wt * inv;
  const d = p.wt * e.link.rttSeconds;
  const lin = (k: number) => a * readPrefix[k]! + a2 * attnPrefix[k]! + b * flopPrefix[k]! + c * (chainWirePrefix[k]! + saveWirePrefix[k]!) + d * saveTripsPrefix[k]!;
  const mustUse = p.pinned.has(i);
  const nf = new Float64Array(L + 1);
  const nc = new Float64Array(L + 1);
  if (mustUse) {
    nf.fill(Number.POSITIVE_INFINITY);
    ch.fill(-2);
  } else {
    nf.set(f);
    nc.set(chain);
    ch.fill(-1);
  }
  if (cap < 0) return { f: nf, chain: nc };
  for (let k = 0; k <= L; k++) g[k] = f[k]! - lin(k);
  let head = 0;
  let tail = 0;
  let lo = 0;
  for (let k = 1; k <= L; k++) {
    // Candidate block starts j ∈ [lo, k−1] with mem(j..k) ≤ cap; sliding-window minimum of g.
    const j = k - 1;
    const gj = g[j]!;
    if (gj !== Number.POSITIVE_INFINITY) {
      while (tail > head && g[deque[tail - 1]!]! >= gj) tail--;
      deque[tail++] = j;
    }
    const mk = memPrefix[k]!;
    while (lo < k && mk - memPrefix[lo]! > cap) lo++;
    while (tail > head && deque[head]! < lo) head++;
    if (tail > head) {
      const jb = deque[head]!;
      const cost = g[jb]! + lin(k) + hop;
      if (cost < nf[k]! - EPS) {
        nf[k] = cost;
        nc[k] = chain[jb]! + (flopPrefix[k]! - flopPrefix[jb]!) * p.invFlops[i]! + (chainWirePrefix[k]! - chainWirePrefix[jb]!) * inv + hopPrefill;
        ch[k] = jb;
      }
    }
  }
  return { f: nf, chain: nc };
}

/**
 * Weighted cost of a plan whose workers hold layers [0, j) (row value at j) and head h the rest:
 * the DP's sums, with the prefill replaced by the pipelined time when ubatches overlap.
 */
function headedCost(p: Prepared, row: Row, h: number, j: number): number {
  const L = p.mm.profile.layerCount;
  const sum = row.f[j]! + lin(p, h, L) - lin(p, h, j);
  if (!p.pipelined || j === 0) return sum;
  const chain = row.chain[j]!;
  const last = (p.flopPrefix[L]! - p.flopPrefix[j]!) * p.invFlops[h]!;
  return sum + p.wt * (pipelineSeconds(chain, last, p.ubatches) - chain - last);
}

/** Walk positions backwards from the head's first layer `j`, skipping the head's own position `t`. */
function reconstruct(order: readonly number[], t: number, j: number, L: number, choices: (s: number) => Int32Array): Assignment['stages'] {
  const stages: { node: number; first: number; end: number }[] = [{ node: order[t]!, first: j, end: L }];
  let k = j;
  for (let s = order.length - 1; s >= 0 && k > 0; s--) {
    if (s === t) continue;
    const c = choices(s)[k]!;
    if (c === -1) continue;
    if (c === -2) throw new Error(`planner reconstruction hit an unreachable state at layer ${k}`);
    stages.push({ node: order[s]!, first: c, end: k });
    k = c;
  }
  if (k !== 0) throw new Error(`planner reconstruction ended at layer ${k}`);
  return stages.reverse();
}

/** Worker i's boundary when node h heads the plan (its measured link to h, when there is one). */
function edge(p: Prepared, i: number, h?: number): Edge {
  const shared = h === undefined || !p.hopByHead;
  return shared
    ? { hop: p.hopCost[i]!, hopPrefill: p.hopPrefill[i]!, link: p.links[i]! }
    : { hop: p.hopByHead![h]![i]!, hopPrefill: p.hopPrefillByHead![h]![i]!, link: p.linksByHead![h]![i]! };
}

/** The DP. Returns the best assignment or undefined when nothing fits. */
function solve(p: Prepared): Assignment | undefined {
  const L = p.mm.profile.layerCount;
  const N = p.nodes.length;
  const g = new Float64Array(L + 1);
  const deque = new Int32Array(L + 1);
  const order = p.order;
  // Shared prefix: prefixF[t] = costs after the first t nodes of `order` (none excluded);
  // prefixCh[t] = the choices of node order[t] in that prefix. A head at position t starts
  // from prefixF[t] and continues over positions t+1.. — half the work of recomputing.
  const prefixF: Row[] = [];
  const prefixCh: Int32Array[] = [];
  let f0: Row = { f: new Float64Array(L + 1).fill(Number.POSITIVE_INFINITY), chain: new Float64Array(L + 1) };
  f0.f[0] = 0;
  prefixF.push(f0);
  for (let t = 0; t < N; t++) {
    const ch = new Int32Array(L + 1);
    f0 = step(p, order[t]!, edge(p, order[t]!), f0, ch, g, deque);
    prefixCh.push(ch);
    prefixF.push(f0);
  }
  const tailCh: Int32Array[] = Array.from({ length: N }, () => new Int32Array(L + 1));

  let best: Assignment | undefined;
  // Interchangeable nodes (same budget, bandwidth, hop, head fixed cost, pin) give the same cost as head, so only
  // the first of each class is tried: exact, and real clusters repeat SKUs a lot.
  const triedHeads = new Set<string>();
  // Every layer at the cheapest node's rates: part of a lower bound for any head.
  const minInvBw = Math.min(...p.invBw);
  const minInvFlops = Math.min(...p.invFlops);
  const minInvAttn = Math.min(...p.invAttn);
  // Pipelined prefill is ≥ (chain + last)(1 + 1/U)/2 (max ≥ mean), so the bound scales by that.
  const overlap = p.pipelined ? (1 + 1 / p.ubatches) / 2 : 1;
  const L0 = p.wd * (p.readPrefix[L]! * minInvBw + p.attnPrefix[L]! * minInvAttn) + overlap * p.wt * p.flopPrefix[L]! * minInvFlops;
  for (let t = 0; t < N; t++) {
    const h = order[t]!;
    // measured links differ per pair, so no two heads are interchangeable then
    const cls = p.hopByHead ? String(h) : `${p.budgets[h]}|${p.invBw[h]}|${p.invAttn[h]}|${p.invFlops[h]}|${p.hopCost[h]}|${p.headFixed[h]}|${p.pinned.has(h)}`;
    if (triedHeads.has(cls)) continue;
    triedHeads.add(cls);
    // Lower bound for this head: its own work, and every layer at the cheapest rates.
    // A head that cannot beat the best plan so far strictly is skipped (ties keep the earlier one).
    if (best && p.headCost[h]! + L0 >= best.seconds - EPS) continue;
    // j = 0 means the head holds everything alone (no pipeline); j > 0 means workers before it.
    const singleFits = p.memPrefix[L]! + p.headConstSingle <= p.budgets[h]!;
    const headCap = p.budgets[h]! - p.headConst;
    // Smallest j ≥ 1 such that the head can hold layers [j, L) in a multi-stage plan.
    let jMin = 1;
    while (jMin <= L && p.memPrefix[L]! - p.memPrefix[jMin]! > headCap) jMin++;
    if (jMin > L && !singleFits) continue;
    // With measured links every worker's hop depends on the head: no shared prefix (O(N²·L) per head).
    const hops = p.hopByHead?.[h];
    let f: Row = hops ? prefixF[0]! : prefixF[t]!;
    if (hops) for (let s = 0; s < t; s++) f = step(p, order[s]!, edge(p, order[s]!, h), f, tailCh[s]!, g, deque);
    for (let s = t + 1; s < N; s++) f = step(p, order[s]!, edge(p, order[s]!, h), f, tailCh[s]!, g, deque);
    let bestJ = -1;
    let bestCost = Number.POSITIVE_INFINITY;
    // Scan j ascending with strict <: on ties the head keeps more layers (fewer stages).
    const jMax = L - (p.o.headMinLayers ?? 0);
    for (let j = singleFits ? 0 : jMin; j <= jMax; j++) {
      if (j > 0 && j < jMin) continue;
      if (f.f[j] === Number.POSITIVE_INFINITY) continue;
      const cost = headedCost(p, f, h, j);
      if (cost < bestCost - EPS) {
        bestCost = cost;
        bestJ = j;
      }
    }
    if (bestJ < 0) continue;
    const total = bestCost + p.headCost[h]!;
    if (best && total >= best.seconds - EPS) continue;
    const choices = (s: number) => (s > t || hops ? tailCh[s]! : prefixCh[s]!);
    best = { stages: reconstruct(order, t, bestJ, L, choices), seconds: total };
  }
  return best;
}

/** Plan a placement. Pure and deterministic. Throws UsageError on invalid input. */
export function planPlacement(profile: ModelProfile, nodes: readonly PlacementNode[], options?: Partial<PlacementOptions>): Plan {
  const o = resolveOptions(options);
  validate(profile, nodes, o);
  const p = prepare(profile, nodes, o);
  const a = solve(p);
  if (a) return describe(p, a);
  // An MLX rank's peak grows with the rank count (pipeline all_gather): the constants above assume
  // every node holds a stage. Fewer stages need less; a plan of at most r stages planned with the
  // constants of r ranks is within budget.
  for (let r = nodes.length - 1; o.engine === 'mlx' && r >= 1; r--) {
    const q = prepare(profile, nodes, o, r);
    const b = solve(q);
    if (b && b.stages.length <= r) return describe(q, b);
  }
  return noFit(p);
}

/**
 * Equal-cost tie-break: where two neighbouring stages read at the same bandwidth (and the first's
 * hop is the same wherever the boundary is), moving layers between them leaves the predicted
 * time unchanged, so put the boundary where the smaller headroom is largest instead of packing
 * one node to the brim. Workers keep ≥ 1 layer; the original boundary is a candidate, so the
 * result stays within every budget.
 */
function rebalance(p: Prepared, a: Assignment): Assignment {
  const stages = a.stages.map((s) => ({ ...s }));
  const headroom = (i: number, first: number, end: number) =>
    p.budgets[stages[i]!.node]! - p.memory.stage(first, end - 1, i === stages.length - 1, stages.length).total;
  for (let i = 0; i + 1 < stages.length; i++) {
    const x = stages[i]!;
    const y = stages[i + 1]!;
    if (p.invBw[x.node] !== p.invBw[y.node] || p.invAttn[x.node] !== p.invAttn[y.node] || p.invFlops[x.node] !== p.invFlops[y.node]) continue;
    const yIsHead = i + 1 === stages.length - 1;
    let bestK = x.end;
    let bestMin = Math.min(headroom(i, x.first, x.end), headroom(i + 1, y.first, y.end));
    for (let k = x.first + 1; k <= (yIsHead ? y.end - (p.o.headMinLayers ?? 0) : y.end - 1); k++) {
      const m = Math.min(headroom(i, x.first, k), headroom(i + 1, k, y.end));
      if (m > bestMin) {
        bestMin = m;
        bestK = k;
      }
    }
    x.end = bestK;
    y.first = bestK;
  }
  return { stages, seconds: a.seconds };
}

/** The plan of an assignment; `rebalanced` false keeps its boundaries as given (fixed.ts). */
export function describe(p: Prepared, solved: Assignment, rebalanced = true): Plan {
  const profile = p.mm.profile;
  const a = rebalanced ? rebalance(p, solved) : solved;
  const stages: PlanStage[] = a.stages.map((s, idx) => {
    const isHead = idx === a.stages.length - 1;
    const node = p.nodes[s.node]!;
    const bytes = p.memory.stage(s.first, s.end - 1, isHead, a.stages.length);
    const read = p.readPrefix[s.end]! - p.readPrefix[s.first]! + (isHead ? p.headRead : 0);
    const flops = p.flopPrefix[s.end]! - p.flopPrefix[s.first]! + (isHead && p.o.promptTokens > 0 ? headPrefillFlops(profile) : 0);
    const budget = p.budgets[s.node]!;
    return {
      node: node.name,
      firstLayer: s.first,
      lastLayer: s.end - 1,
      role: isHead ? 'head' : 'worker',
      bytes,
      budgetBytes: budget,
      headroomBytes: budget - bytes.total,
      bandwidthBytesPerSecond: node.bandwidthBytesPerSecond,
      readBytesPerToken: read,
      secondsPerToken: read / node.bandwidthBytesPerSecond + (p.attnPrefix[s.end]! - p.attnPrefix[s.first]!) * p.invAttn[s.node]!,
      prefillSeconds: flops * p.invFlops[s.node]!,
    };
  });
  const used = new Set(a.stages.map((s) => s.node));
  const headName = p.nodes[a.stages[a.stages.length - 1]!.node]!.name;
  // A worker's boundary: the per-stage part, plus its layers' graph bytes in the chain; the prompt-cache save comes before the prompt.
  const wires = a.stages.slice(0, -1).map((s) => {
    const range = (x: Float64Array) => x[s.end]! - x[s.first]!;
    const w = { chainBytes: range(p.chainWirePrefix), saveBytes: range(p.saveWirePrefix), saveRoundTrips: range(p.saveTripsPrefix) };
    return stageWireSeconds(w, linkOf(p.nodes[s.node]!, p.o, headName));
  });
  const boundaries = a.stages.slice(0, -1).map((s, i) => {
    const b = boundarySeconds(profile, p.nodes[s.node]!, p.o, headName);
    return { decode: b.decode, prefill: b.prefill + wires[i]!.chain };
  });
  const promptCacheSaveSeconds = wires.reduce((t, w) => t + w.save, 0);
  const hopSeconds = boundaries.reduce((t, b) => t + b.decode, 0);
  const unusedNodes = p.order.filter((i) => !used.has(i)).map((i) => p.nodes[i]!.name);
  const reasons: string[] = [];
  const gib = (b: number) => formatBytes(b);
  if (stages.length === 1) {
    const s = stages[0]!;
    reasons.push(
      `${s.node} holds the whole model (${gib(s.bytes.total)} of ${gib(s.budgetBytes)} budget): one node needs no network hops`,
    );
  } else {
    const fastest = p.nodes[p.order[0]!]!;
    const alone = p.memory.stage(0, profile.layerCount - 1, true, 1).total;
    const roomiest = p.order.reduce((a, i) => (p.budgets[i]! > p.budgets[a]! ? i : a), p.order[0]!);
    reasons.push(
      alone > p.budgets[roomiest]!
        ? `${stages.length} stages: no single node can hold the model (${gib(alone)} alone; largest budget ${gib(p.budgets[roomiest]!)} on ${p.nodes[roomiest]!.name})`
        : `${stages.length} stages: a single node could hold the model (${gib(alone)}), but only slower ones; splitting onto faster nodes is predicted faster`,
    );
    for (const s of stages) {
      const share = (100 * (s.lastLayer - s.firstLayer + 1)) / profile.layerCount;
      const why = s.node === fastest.name ? 'fastest node' : s.role === 'head' ? 'head (output layer, token embeddings)' : 'next-fastest with room';
      reasons.push(
        `${s.node}: layers ${s.firstLayer}–${s.lastLayer} (${share.toFixed(0)}%), ${why}, ${(s.bandwidthBytesPerSecond / 1e9).toFixed(0)} GB/s, headroom ${gib(s.headroomBytes)}`,
      );
    }
  }
  const goal = p.wt > 0 ? (p.o.objective === 'ttft' ? 'time to first token' : 'request time') : 'time per token';
  for (const name of unusedNodes) reasons.push(`${name} unused: adding it would not lower the predicted ${goal}`);
  // a.seconds is the objective; the predictions are recomputed in seconds.
  const headFixed = p.headFixed[a.stages.at(-1)!.node]!;
  const secondsPerToken = stages.reduce((t, s) => t + s.secondsPerToken, 0) + hopSeconds + headFixed;
  const P = p.o.promptTokens;
  const logits = P > 0 ? headPrefillFlops(profile) * p.invFlops[a.stages.at(-1)!.node]! : 0;
  const prefill = P > 0 ? prefillSeconds(stages.map((s) => s.prefillSeconds), boundaries.map((b) => b.prefill), Math.ceil(P / p.o.ubatch), logits, overlapsUbatches(p.o)) : 0;
  const ttftSeconds = P > 0 ? promptCacheSaveSeconds + prefill + headFixed : 0;
  return {
    fits: true,
    stages,
    predicted: { secondsPerToken, tokensPerSecond: 1 / secondsPerToken, hopSeconds, ttftSeconds, promptCacheSaveSeconds, promptTokens: P, objective: p.o.objective },
    reasons,
    unusedNodes,
  };
}

const sumStage = (a: StageBytes, b: StageBytes): StageBytes => ({
  weights: a.weights + b.weights,
  kv: a.kv + b.kv,
  compute: a.compute + b.compute,
  overhead: a.overhead + b.overhead,
  total: a.total + b.total,
});

/** Does it fit with these option changes? (For remedies; reuses the same DP.) */
function fitsWith(p: Prepared, change: Partial<PlacementOptions>): boolean {
  const o = { ...p.o, ...change };
  return solve(prepare(p.mm.profile, p.nodes, o)) !== undefined;
}

function noFit(p: Prepared): Plan {
  const L = p.mm.profile.layerCount;
  const n = p.nodes.length;
  // Demand if every node held a stage: all layers, one head, n−1 workers.
  let need = p.memory.stage(0, L - 1, true, n);
  for (let i = 1; i < n; i++) need = sumStage(need, p.memory.workerFixed);
  const capacity = p.budgets.reduce((t, b) => t + Math.max(0, b), 0);
  const shortfallBytes = need.total - capacity;
  const reasons = [
    `does not fit: needs ${formatBytes(need.total)} (weights ${formatBytes(need.weights)}, KV ${formatBytes(need.kv)}, compute ${formatBytes(need.compute)}, overhead ${formatBytes(need.overhead)}) across ${n} node(s) with ${formatBytes(capacity)} of budget`,
  ];
  if (shortfallBytes <= 0) {
    reasons.push('the total would fit, but no contiguous split does: a node is too small for its share of fixed per-stage costs or a layer');
  }
  const remedies: string[] = [];
  // Largest context that fits (granularity 256, as llama.cpp pads it).
  if (p.o.ctx > 256) {
    let lo = 0;
    let hi = Math.floor((p.o.ctx - 1) / 256);
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (fitsWith(p, { ctx: mid * 256 })) lo = mid;
      else hi = mid - 1;
    }
    if (lo > 0) remedies.push(`shorter context: --ctx ${lo * 256} fits (asked ${p.o.ctx})`);
  }
  const cheaper: CacheType[] = p.o.cacheType === 'f16' || p.o.cacheType === 'f32' || p.o.cacheType === 'bf16' ? ['q8_0', 'q4_0'] : p.o.cacheType === 'q8_0' ? ['q4_0'] : [];
  // A cache type whose block does not divide the K/V rows (a small MLA latent) is no remedy.
  const fitsAs = (t: CacheType) => { try { return fitsWith(p, { cacheType: t }); } catch (err) { if (err instanceof UsageError) return false; throw err; } };
  const cheaperFit = cheaper.find(fitsAs);
  if (cheaperFit) remedies.push(`quantized KV cache: --cache-type ${cheaperFit} fits`);
  if (shortfallBytes > 0) {
    const target = p.mm.profile.fileTensorBytes - shortfallBytes;
    if (target > 0) {
      remedies.push(
        `smaller quant: weights must shrink by ≥ ${formatBytes(shortfallBytes)} — a file of ≤ ${formatBytes(target)} (now ${formatBytes(p.mm.profile.fileTensorBytes)}, ${p.mm.profile.weightType})`,
      );
    }
    remedies.push(`another node with ≥ ${formatBytes(shortfallBytes + p.workerConst)} usable memory`);
  } else {
    remedies.push(`a node with ≥ ${formatBytes(p.headConst + p.memory.layerBytes[0]!)} usable memory to act as head`);
  }
  return {
    fits: false,
    stages: [],
    predicted: { secondsPerToken: Number.POSITIVE_INFINITY, tokensPerSecond: 0, hopSeconds: 0, ttftSeconds: 0, promptCacheSaveSeconds: 0, promptTokens: p.o.promptTokens, objective: p.o.objective },
    reasons,
    shortfall: { need, capacityBytes: capacity, shortfallBytes },
    remedies,
    unusedNodes: p.order.map((i) => p.nodes[i]!.name),
  };
}
