/** The few statistics and flags the benches print and read. */

/** `--name value` from argv, else the default. */
export function flag(argv: readonly string[], name: string, def: string): string {
  const i = argv.indexOf(name);
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : def;
}

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** The p-quantile by rank (no interpolation). */
export function quantile(xs: readonly number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
}

/** `--name N` from argv as a number, else the default. */
export function numberFlag(argv: readonly string[], name: string, def: number): number {
  return Number(flag(argv, name, String(def)));
}

/** Decode tokens/s from token arrival times in ms (the first token is excluded: it carries the prefill). */
export function decodeTokensPerSecond(arrivalsMs: readonly number[]): number {
  return ((arrivalsMs.length - 1) * 1000) / ((arrivalsMs.at(-1) ?? 0) - (arrivalsMs[0] ?? 0));
}
