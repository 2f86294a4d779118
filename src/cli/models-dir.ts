import { statSync } from 'node:fs';
import { Option } from 'commander';
import { parseModelsDirs } from '../node/model-files.ts';
import { UsageError } from '../shared/errors.ts';

/**
 * `--models-dir` of `orchard node` and `orchard up`: the folders this node's agent may load model
 * files from (engine paths must resolve inside them, its state dir or Orchard's cache), and that it
 * reports so the coordinator can pre-seed rpc-server caches from local copies.
 */
export function modelsDirOption(): Option {
  return new Option(
    '--models-dir <dirs>',
    'where model files live (repeatable, or a path list a:b): the agent loads models only from these folders, and reports them for cache pre-seeding',
  )
    .argParser((v: string, prev: string[] | undefined) => [...(prev ?? []), v])
    .env('ORCHARD_NODE_MODELS_DIR');
}

/** The flag's folders, each checked to be a directory (one clear usage error otherwise). */
export function modelsDirs(flagValues: readonly string[]): string[] {
  const dirs = parseModelsDirs(flagValues, undefined); // the flag or ORCHARD_NODE_MODELS_DIR, via commander
  for (const d of dirs) {
    let ok = false;
    try {
      ok = statSync(d).isDirectory();
    } catch {
      // reported below
    }
    if (!ok) throw new UsageError(`invalid --models-dir "${d}": not a directory`);
  }
  return dirs;
}
