import type { HardwareProfile, LiveStats } from '../../shared/hardware.ts';
import { OrchardError } from '../../shared/errors.ts';

/** Options of the hardware probe; every override wins over what the machine reports. */
export interface ProbeOptions {
  /** Stable node id (persisted by the agent's identity module). */
  readonly nodeId: string;
  /** Human name (Bonjour instance name); default: the hostname. */
  readonly name?: string;
  /** Pretend total RAM (for tests and odd hardware). */
  readonly memoryLimitBytes?: number;
  /** Usable model-memory budget, set directly (skips the computation). */
  readonly budgetBytes?: number;
  /** Memory bandwidth override (bytes/s). */
  readonly bandwidthBytesPerSecond?: number;
  /** Engines found by the caller ("llama-rpc", "llama-server", "mlx"). */
  readonly engines?: readonly string[];
}

/** Probe the machine once (macOS or Linux). Never throws because a command is missing. */
export async function probeHardware(_opts: ProbeOptions): Promise<HardwareProfile> {
  // Interim: the real implementation lands in the next commit (issue 3 item 1).
  throw new OrchardError('probeHardware: not implemented yet');
}

/** Cheap live sample: available memory, memory pressure, thermal state. */
export async function readLiveStats(): Promise<LiveStats> {
  throw new OrchardError('readLiveStats: not implemented yet');
}
