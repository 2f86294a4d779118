import { UsageError } from '../errors.ts';
import { readGgufHeader } from '../gguf/reader.ts';
import { llamaLoadVerdict } from './llama-load-check.ts';
import { type MlxModelProfile, isMlxModelDir, readMlxModelProfile } from './mlx-profile.ts';
import { type ModelProfile, modelProfile } from './profile.ts';

/**
 * The profile of a model on disk, whichever engine family it is for: an MLX model directory
 * (config.json + safetensors) or a GGUF file. Only headers are read, never the weights.
 */
export async function readModelProfile(path: string): Promise<ModelProfile | MlxModelProfile> {
  return (await isMlxModelDir(path)) ? readMlxModelProfile(path) : readGgufProfile(path);
}

/**
 * A GGUF's profile, refused with llama.cpp's own reason when llama.cpp's loader cannot open it
 * (llama-load-check.ts). Orchard's reader goes first: it names unreadable files (a FIFO, a
 * directory, a truncated header) without handing them to native code.
 */
export async function readGgufProfile(path: string): Promise<ModelProfile> {
  const header = await readGgufHeader(path);
  const verdict = await llamaLoadVerdict(path, header);
  if (verdict.checked && verdict.refusal) throw new UsageError(`${path}: ${verdict.refusal}`);
  return modelProfile(header);
}
