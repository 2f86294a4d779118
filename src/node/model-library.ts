import { isAbsolute, join } from 'node:path';
import type { Logger } from '../shared/log.ts';
import { errorMessage } from '../shared/errors.ts';
import { FileMemo } from '../shared/file-memo.ts';
import { readTensorLayout, type SeedProgress, type SeedResult, seedTensorCache } from './llama/tensor-cache.ts';
import type { ModelFile } from '../shared/model/file-identity.ts';
import { findModelFile, scanModelFiles } from './model-files.ts';

/**
 * The node's model files (from `--models-dir` / ORCHARD_NODE_MODELS_DIR) and the PrepareCache
 * operation over them. The first scan runs in the background at start (hashing a new multi-GB
 * file takes seconds; the agent must be reachable meanwhile); Describe reports what is
 * identified so far. A PrepareCache for a file not (yet) known triggers a re-scan, which is
 * cheap for files already hashed (cache by path + size + mtime).
 */
export interface PrepareCacheRequest {
  readonly modelSha256: string;
  readonly modelSizeBytes: number;
  readonly firstLayer: number;
  readonly lastLayer: number;
  readonly holdsOutput: boolean;
  /** LLAMA_CACHE dir to seed (the same must go to StartEngine cache_dir); '' = the agent's default. */
  readonly cacheDir: string;
}

export interface PrepareCacheResult extends SeedResult {
  readonly llamaCacheDir: string;
  readonly modelPath: string;
}

export class PrepareCacheError extends Error {
  constructor(
    readonly code: 'NOT_FOUND' | 'INVALID_ARGUMENT',
    message: string,
  ) {
    super(message);
  }
}

export class ModelLibrary {
  private known: ModelFile[] = [];
  private scanning: Promise<ModelFile[]> | undefined;
  /** One seeding per cache dir at a time: two loads seeding the same dir would race on entries. */
  private readonly seeding = new Map<string, Promise<unknown>>();
  /** Each model file's tensor layout, so a repeated PrepareCache does not parse the GGUF header again. */
  private readonly layouts = new FileMemo(readTensorLayout);

  constructor(
    private readonly o: { readonly dirs: readonly string[]; readonly stateDir: string; readonly log: Logger },
  ) {}

  get dirs(): readonly string[] {
    return this.o.dirs;
  }

  /** Where rpc-servers' tensor caches live unless the coordinator names one. */
  get defaultCacheDir(): string {
    return join(this.o.stateDir, 'llama-cache');
  }

  files(): readonly ModelFile[] {
    return this.known;
  }

  scan(): Promise<ModelFile[]> {
    this.scanning ??= scanModelFiles(this.o.dirs, this.o.stateDir)
      .then((files) => {
        this.known = files;
        this.o.log.info({ files: files.map((f) => ({ path: f.path, bytes: f.sizeBytes })) }, 'model files identified');
        return files;
      })
      .catch((err: unknown) => {
        this.o.log.warn({ err: errorMessage(err) }, 'model scan failed');
        return this.known;
      })
      .finally(() => {
        this.scanning = undefined;
      });
    return this.scanning;
  }

  async find(sizeBytes: number, sha256: string): Promise<ModelFile | undefined> {
    return findModelFile(this.known, sizeBytes, sha256) ?? findModelFile(await this.scan(), sizeBytes, sha256);
  }

  async prepareCache(req: PrepareCacheRequest, onProgress: (p: SeedProgress) => void, signal?: AbortSignal): Promise<PrepareCacheResult> {
    if (!/^[0-9a-f]{64}$/.test(req.modelSha256)) throw new PrepareCacheError('INVALID_ARGUMENT', 'model_sha256 must be 64 lowercase hex digits');
    if (!(req.modelSizeBytes > 0)) throw new PrepareCacheError('INVALID_ARGUMENT', 'model_size_bytes is required');
    if (req.lastLayer < req.firstLayer - 1) throw new PrepareCacheError('INVALID_ARGUMENT', `bad layer range ${req.firstLayer}..${req.lastLayer}`);
    if (req.cacheDir !== '' && !isAbsolute(req.cacheDir)) throw new PrepareCacheError('INVALID_ARGUMENT', `cache_dir must be absolute, got "${req.cacheDir}"`);
    const file = await this.find(req.modelSizeBytes, req.modelSha256);
    if (!file) {
      const where = this.o.dirs.length > 0 ? this.o.dirs.join(', ') : 'no --models-dir given';
      throw new PrepareCacheError('NOT_FOUND', `this node holds no model file with sha256 ${req.modelSha256.slice(0, 12)}… (${req.modelSizeBytes} bytes) in ${where}`);
    }
    const llamaCacheDir = req.cacheDir !== '' ? req.cacheDir : this.defaultCacheDir;
    const before = this.seeding.get(llamaCacheDir);
    const run = (async () => {
      await before?.catch(() => {});
      return seedTensorCache({
        modelPath: file.path,
        llamaCacheDir,
        stage: { firstLayer: req.firstLayer, lastLayer: req.lastLayer, holdsOutput: req.holdsOutput },
        onProgress,
        layouts: this.layouts,
        ...(signal ? { signal } : {}),
      });
    })();
    this.seeding.set(llamaCacheDir, run);
    try {
      const r = await run;
      this.o.log.info(
        { model: file.path, layers: `${req.firstLayer}..${req.lastLayer}`, entries: r.tensorsTotal, written: r.bytesWritten, seconds: r.seconds },
        'rpc tensor cache prepared',
      );
      return { ...r, llamaCacheDir, modelPath: file.path };
    } finally {
      if (this.seeding.get(llamaCacheDir) === run) this.seeding.delete(llamaCacheDir);
    }
  }
}
