/**
 * How much model memory a node can take: the GPU wired limit, the OS reserve, the usable budget.
 * Pure arithmetic, documented constants; the probe feeds it facts.
 */

const GiB = 2 ** 30;
const MiB = 2 ** 20;

/**
 * macOS's default GPU working-set limit when `iogpu.wired_limit_mb` is 0 — what Metal reports as
 * `MTLDevice.recommendedMaxWorkingSetSize` and what llama.cpp/MLX plan against. Apple does not
 * document the rule. Observed values (llama.cpp's ggml_metal_init log lines, which print MiB):
 * 16 GiB → 10922.67 (2/3; abetlen/llama-cpp-python#687), 32 GiB → 21845.34 (2/3;
 * ggml-org/llama.cpp#2011, ollama/ollama#434), 64 GiB → 49152.00 (3/4; ggml-org/llama.cpp#1870).
 * Hence the rule used here: 2/3 of RAM up to 36 GiB, 3/4 above (the 36 GiB cut-over is between
 * the observed 32 and 64 points, not observed itself). It is APPROXIMATE and conservative on newer
 * macOS: on macOS 26 a 128 GiB M5 Max reports 107.52 GiB (~84%, antirez/ds4#893), more than 3/4.
 * When the sysctl is set, that value wins.
 */
export function defaultWiredLimitBytes(memoryBytes: number): number {
  return Math.floor(memoryBytes <= 36 * GiB ? (memoryBytes * 2) / 3 : (memoryBytes * 3) / 4);
}

/** The effective GPU wired limit: the sysctl setting when non-zero (capped at RAM), else the modelled default. */
export function wiredLimitBytes(memoryBytes: number, settingBytes: number | undefined): number {
  if (settingBytes !== undefined && settingBytes > 0) return Math.min(settingBytes, memoryBytes);
  return defaultWiredLimitBytes(memoryBytes);
}

/**
 * Memory left to macOS/Linux and its daemons (window server, kernel, file cache floor): the
 * larger of 3 GiB and 1/16 of RAM. Why: an idle 8 GB M1 Air uses ~3 GB for the system alone
 * (seeds: "system has ~3 GB free at idle" on 8 GB); on big machines the kernel's own tables and
 * wired pages grow with RAM (1/16 of 512 GiB = 32 GiB), though there the wired limit binds first.
 */
export function osReserveBytes(memoryBytes: number): number {
  return Math.max(3 * GiB, Math.floor(memoryBytes / 16));
}

/** Safety margin taken off the final budget: 5% of the capacity, at least 512 MiB. */
export function safetyMarginBytes(capacityBytes: number): number {
  return Math.max(512 * MiB, Math.floor(capacityBytes * 0.05));
}

/**
 * Other programs' memory is rounded up to 512 MiB steps: conservative, and a re-probe then only
 * changes the advertised budget (and re-announces the node) when usage moves by a real amount,
 * not on every page the browser touches.
 */
export const OTHERS_GRANULARITY = 512 * MiB;

function roundUp(n: number, step: number): number {
  return Math.ceil(n / step) * step;
}

export interface BudgetInput {
  readonly memoryBytes: number;
  readonly wiredLimitBytes: number;
  /** Memory in use when probed (total − available); undefined when unknown or RAM is overridden. */
  readonly inUseBytes?: number;
  readonly reserveBytes?: number;
  readonly marginBytes?: number;
}

export interface Budget {
  readonly budgetBytes: number;
  readonly reserveBytes: number;
  readonly marginBytes: number;
  /** Memory used by other programs beyond the OS reserve, rounded up to 512 MiB (0 when unknown). */
  readonly othersBytes: number;
  /** Which cap decided: the GPU wired limit or the RAM left after the OS and other programs. */
  readonly limitedBy: 'wired-limit' | 'ram';
}

/**
 * usable = min(wired limit, RAM − reserve − others) − margin, never negative.
 *
 * "others" is what is in use beyond the reserve (in use − reserve). It is subtracted from the RAM
 * side only, not from the wired limit too: the wired limit caps GPU allocations, other programs'
 * pages cap physical room; subtracting them from both would double count (64 GiB machine, 10 GiB
 * used by apps: room is 64 − 4 − 10 = 50 GiB, the wired cap 48 GiB still binds, usable ≈ 48 − margin).
 * Note the algebra: once programs use more than the reserve, RAM − reserve − others ≈ RAM − in use
 * = available memory (less the 512 MiB rounding), so the reserve only matters on an idle machine —
 * intended: it is a floor.
 */
export function usableBudget(input: BudgetInput): Budget {
  const reserveBytes = input.reserveBytes ?? osReserveBytes(input.memoryBytes);
  const othersBytes = input.inUseBytes === undefined ? 0 : roundUp(Math.max(0, input.inUseBytes - reserveBytes), OTHERS_GRANULARITY);
  const ramRoom = Math.max(0, input.memoryBytes - reserveBytes - othersBytes);
  const limitedBy = input.wiredLimitBytes <= ramRoom ? 'wired-limit' : 'ram';
  const capacity = Math.min(input.wiredLimitBytes, ramRoom);
  const marginBytes = input.marginBytes ?? safetyMarginBytes(capacity);
  return { budgetBytes: Math.max(0, capacity - marginBytes), reserveBytes, marginBytes, othersBytes, limitedBy };
}
