import { copyFile, open } from 'node:fs/promises';
import type { CoordinatorClient } from '../../src/coordinator/api/client.ts';
import { defaultModelHashDir } from '../../src/coordinator/instances/llama/tensor-cache.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { identifyModelFile } from '../../src/shared/model/file-identity.ts';

/**
 * bench:lan's model files. The model is generated once per run; the cold load's file is a copy
 * with every tensor's first element nudged (lowest mantissa bit of an f16/f32 value: still
 * finite), so every tensor hashes differently and no node's tensor cache can serve it — "a file
 * of the same shape the nodes do not hold", for a copy's cost instead of a second generation.
 */
export async function perturbedCopy(src: string, dst: string): Promise<string> {
  await copyFile(src, dst);
  const header = await readGgufHeader(dst);
  const f = await open(dst, 'r+');
  try {
    const b = Buffer.alloc(1);
    for (const t of header.tensors) {
      if (t.type.name !== 'F16' && t.type.name !== 'F32') throw new Error(`perturbedCopy: ${t.name} is ${t.type.name}; only f16/f32 stay finite with a flipped low bit`);
      const at = header.dataOffset + t.offset;
      await f.read(b, 0, 1, at);
      b[0]! ^= 1;
      await f.write(b, 0, 1, at);
    }
  } finally {
    await f.close();
  }
  return dst;
}

/**
 * What the coordinator does once per model file, timed apart from the loads: the content
 * identity it matches nodes' files with (SHA-256, cached by path, size and mtime in the same
 * cache the driver reads) and llama.cpp's own load check of the header (a Plan; cached per
 * file). Without this the first scenario's loads paid both (~15 s under load) and the others not.
 */
export async function firstSight(client: CoordinatorClient, model: string, ctx: number): Promise<number> {
  const t0 = performance.now();
  await identifyModelFile(model, defaultModelHashDir());
  await client.unary('plan', { modelPath: model, options: { ctx, cacheType: 'f16', parallel: 1, pin: [] } }, 300_000);
  return (performance.now() - t0) / 1000;
}
