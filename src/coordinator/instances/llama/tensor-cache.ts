import { homedir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '../../../shared/log.ts';
import { errorMessage } from '../../../shared/errors.ts';
import type { CacheStage } from '../../../shared/rpc-cache/plan.ts';
import { identifyModelFile } from '../../../shared/model/file-identity.ts';
import type { AgentClient, PrepareCacheDone } from '../../membership/agent-client.ts';

/**
 * Coordinator side of "no weight bytes over the network when nodes have the file": before a
 * stage's rpc-server starts, ask its agent to pre-seed the rpc-server tensor cache from the
 * node's own copy of the model (PrepareCache), then start the rpc-server with that cache.
 *
 * Best effort by design: the cache only saves transfer, so any failure here (node without the
 * file, older agent, disk full) logs and falls back to a plain load where llama-server sends the
 * bytes. The model file's identity (size + SHA-256) is computed on the coordinator only when
 * some worker reports a file of the same size, and cached by path + size + mtime.
 */

export function defaultModelHashDir(env: NodeJS.ProcessEnv = process.env): string {
  return join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'orchard');
}

export class ModelIdentity {
  #id: Promise<{ sizeBytes: number; sha256: string }> | undefined;

  constructor(
    readonly modelPath: string,
    private readonly hashDir: string,
  ) {}

  get(): Promise<{ sizeBytes: number; sha256: string }> {
    this.#id ??= identifyModelFile(this.modelPath, this.hashDir);
    return this.#id;
  }
}

export interface SeedStageOptions {
  readonly client: AgentClient;
  readonly nodeName: string;
  readonly model: ModelIdentity;
  readonly modelSizeBytes: number;
  readonly stage: CacheStage;
  readonly log: Logger;
  readonly onProgress?: (message: string) => void;
  readonly timeoutMs?: number;
}

/** The LLAMA_CACHE dir to give the stage's rpc-server, or undefined to start it without a cache. */
export async function seedStageCache(o: SeedStageOptions): Promise<PrepareCacheDone | undefined> {
  try {
    const { modelFiles } = await o.client.describe(5000);
    if (!modelFiles.some((f) => f.sizeBytes === o.modelSizeBytes)) {
      o.log.debug({ node: o.nodeName }, 'node holds no model file of this size: weights go over the network');
      return undefined;
    }
    const id = await o.model.get();
    const match = modelFiles.find((f) => f.sizeBytes === id.sizeBytes && f.sha256 === id.sha256);
    if (!match) {
      o.log.info({ node: o.nodeName }, 'node holds a different file of the same size: weights go over the network');
      return undefined;
    }
    const done = await o.client.prepareCache(
      { modelSha256: id.sha256, modelSizeBytes: id.sizeBytes, firstLayer: o.stage.firstLayer, lastLayer: o.stage.lastLayer, holdsOutput: o.stage.holdsOutput },
      (p) => o.onProgress?.(`${o.nodeName}: seeding tensor cache ${Math.round((100 * p.bytesDone) / Math.max(1, p.bytesTotal))} % (${p.tensorsDone}/${p.tensorsTotal} tensors)`),
      o.timeoutMs ?? 3_600_000,
    );
    o.log.info(
      { node: o.nodeName, file: done.modelPath, entries: done.entries, cachedBytes: done.cachedBytes, written: done.bytesWritten, stillSent: done.sentBytes, seconds: done.seconds },
      'rpc-server tensor cache pre-seeded from the node’s own copy',
    );
    return done;
  } catch (err) {
    o.log.warn({ node: o.nodeName, err: errorMessage(err) }, 'tensor cache pre-seeding failed: weights go over the network');
    return undefined;
  }
}
