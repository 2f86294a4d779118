import { readGgufHeader } from '../gguf/reader.ts';
import { type MlxModelProfile, isMlxModelDir, readMlxModelProfile } from './mlx-profile.ts';
import { type ModelProfile, modelProfile } from './profile.ts';

/**
 * The profile of a model on disk, whichever engine family it is for: an MLX model directory
 * (config.json + safetensors) or a GGUF file. Only headers are read, never the weights.
 */
export async function readModelProfile(path: string): Promise<ModelProfile | MlxModelProfile> {
  return (await isMlxModelDir(path)) ? readMlxModelProfile(path) : modelProfile(await readGgufHeader(path));
}
