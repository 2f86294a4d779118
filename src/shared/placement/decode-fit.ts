/**
 * Decode cost from measurements at several depths: seconds per token = fixed + bytes ÷ bandwidth.
 *
 * A node's engine pays, per decoded token, a part that grows with the bytes it reads (weights and
 * KV: the bandwidth) and a part that does not (llama-server's sampling and HTTP, the graph launch,
 * the RPC round trips to its local rpc-server). One depth cannot tell them apart: bytes ÷ seconds
 * then folds the fixed part into "bandwidth", and every plan deeper than the calibration model is
 * priced too slow (bench/README.md, bench:decode-depth). Two depths or more can: the slope is the
 * bandwidth, the intercept the fixed part. Pure, so the rules are tested apart from the engines.
 */

export interface DecodePoint {
  /** Bytes the planner counts for one decoded token of the measured model (calibrate.ts readBytesPerToken). */
  readonly bytesPerToken: number;
  /** Measured seconds per decoded token (1 ÷ decode tokens/s). */
  readonly secondsPerToken: number;
}

export interface DecodeFit {
  /** Seconds per token that do not grow with the bytes read (the intercept; never negative). */
  readonly fixedSecondsPerToken: number;
  /** Bytes per second the reads add (1 ÷ slope). */
  readonly bandwidthBytesPerSecond: number;
}

/**
 * Least-squares line through the points. A negative intercept is noise around a fixed part of
 * zero (nothing is paid back per token), so it is taken as 0 and the slope refitted through the
 * origin. Fewer than two distinct byte counts, a non-positive or non-finite value, or a slope
 * that does not rise with the bytes is an error: no such fit describes an engine.
 */
export function fitDecodeCost(points: readonly DecodePoint[]): DecodeFit {
  for (const p of points) {
    if (!(p.bytesPerToken > 0 && Number.isFinite(p.bytesPerToken)) || !(p.secondsPerToken > 0 && Number.isFinite(p.secondsPerToken))) {
      throw new Error(`decode fit: every point needs positive, finite bytes and seconds per token (got ${p.bytesPerToken} B, ${p.secondsPerToken} s)`);
    }
  }
  if (new Set(points.map((p) => p.bytesPerToken)).size < 2) throw new Error('decode fit: needs measurements at two depths or more (distinct bytes per token)');
  const n = points.length;
  const mx = points.reduce((t, p) => t + p.bytesPerToken, 0) / n;
  const my = points.reduce((t, p) => t + p.secondsPerToken, 0) / n;
  const sxy = points.reduce((t, p) => t + (p.bytesPerToken - mx) * (p.secondsPerToken - my), 0);
  const sxx = points.reduce((t, p) => t + (p.bytesPerToken - mx) ** 2, 0);
  const slope = sxy / sxx;
  if (!(slope > 0)) throw new Error('decode fit: seconds per token do not grow with the bytes read; the measurements are noise, measure again');
  const intercept = my - slope * mx;
  if (intercept >= 0) return { fixedSecondsPerToken: intercept, bandwidthBytesPerSecond: 1 / slope };
  const throughOrigin = points.reduce((t, p) => t + p.bytesPerToken * p.secondsPerToken, 0) / points.reduce((t, p) => t + p.bytesPerToken ** 2, 0);
  return { fixedSecondsPerToken: 0, bandwidthBytesPerSecond: 1 / throughOrigin };
}

/**
 * What a tunnelled stage boundary costs per decoded token beyond the link probe's round trip: the
 * tunnelled split's seconds per token (the model in two stages, the first behind a loopback
 * engine tunnel) minus the same model's on one rpc-server minus the agents' link probe over that
 * tunnel (the round trip the planner already charges as the link's). Never below 0: a split
 * measured faster than the whole is noise around no overhead.
 */
export function boundaryOverhead(reference: { readonly decodeTokensPerSecond: number }, tunnelled: { readonly decodeTokensPerSecond: number }, probeRttSeconds: number): number {
  return Math.max(0, 1 / tunnelled.decodeTokensPerSecond - 1 / reference.decodeTokensPerSecond - probeRttSeconds);
}

/** Positions a window's decoded tokens attend to on average: `decodeTokens` after a `promptTokens` prompt (cost.ts decodeContextTokens for that request). */
export function windowContextTokens(promptTokens: number, decodeTokens: number): number {
  return promptTokens + (decodeTokens + 1) / 2;
}

/**
 * Decode attention's FLOP/s from one engine at two contexts: the extra seconds per token of the
 * longer context ÷ the extra attention FLOPs per token (cost.ts layerAttentionFlops). Undefined
 * when the longer context did not cost more than the windows' own scatter (half the sum of each
 * side's ±spread around its median, in seconds per token): noise around a cost too small to
 * measure, which the plan then does not price. A GPU engine, whose attention is close to its KV
 * bytes, lands there; pricing its noise as a rate would make every long context look slow.
 */
export function decodeAttentionRate(
  long: { readonly decodeTokensPerSecond: number; readonly attentionFlopsPerToken: number; readonly decodeSpread?: number },
  short: { readonly decodeTokensPerSecond: number; readonly attentionFlopsPerToken: number; readonly decodeSpread?: number },
): number | undefined {
  const flops = long.attentionFlopsPerToken - short.attentionFlopsPerToken;
  const seconds = 1 / long.decodeTokensPerSecond - 1 / short.decodeTokensPerSecond;
  const scatter = ((long.decodeSpread ?? 0) / long.decodeTokensPerSecond + (short.decodeSpread ?? 0) / short.decodeTokensPerSecond) / 2;
  return flops > 0 && seconds > 0 && seconds > scatter ? flops / seconds : undefined;
}
