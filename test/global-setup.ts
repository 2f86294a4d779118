import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { cacheRoot } from '../src/shared/cache-dir.ts';

/**
 * After the whole suite: no engine, server or agent a test started may still be alive. A leak
 * fails the run (the teardown throws) and names the processes.
 *
 * The suite sets ORCHARD_TEST_RUN to a fresh id; every process it starts inherits it (tests pass
 * `...process.env` on), so on Linux only processes carrying this run's id count — another run on
 * the same machine cannot fail this one. Without /proc, any matching process that was not there
 * before the suite counts.
 */
const PATTERN =
  '(^|/)(ggml-rpc-server|llama-server|nats-server|prometheus)( |$)|mlx_worker|orchard(\\.js)? (node|coordinator|up|demo)';
const MARKER = 'ORCHARD_TEST_RUN';

function matching(): Map<number, string> {
  try {
    const out = execFileSync('pgrep', ['-a', '-f', PATTERN], { encoding: 'utf8' });
    const found = new Map<number, string>();
    for (const line of out.split('\n')) {
      const pid = Number.parseInt(line, 10);
      if (line.trim() && !line.includes('pgrep') && pid !== process.pid) found.set(pid, line);
    }
    return found;
  } catch {
    return new Map(); // pgrep exits 1 when nothing matches
  }
}

function carriesRun(pid: number, id: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/environ`, 'latin1').split('\0').includes(`${MARKER}=${id}`);
  } catch {
    return false; // gone, or not ours to read
  }
}

/**
 * The run's shared test models (test/helpers/test-models.ts): a folder of this run under
 * Orchard's cache dir, which every agent accepts as a root, removed when the run ends.
 */
const MODELS = 'ORCHARD_TEST_MODELS';

export function setup(): () => Promise<void> {
  const id = randomUUID();
  process.env[MARKER] = id;
  const models = join(cacheRoot(process.env, process.platform, homedir()), 'test-models', id);
  process.env[MODELS] = models;
  const procfs = existsSync('/proc/self/environ');
  const before = new Set(matching().keys());
  return async () => {
    await rm(models, { recursive: true, force: true });
    const ours = () =>
      [...matching()]
        .filter(([pid]) => (procfs ? carriesRun(pid, id) : !before.has(pid)))
        .map(([, line]) => line);
    // Engines get up to 5 s to notice their parent is gone.
    const deadline = Date.now() + 6000;
    let left = ours();
    while (left.length > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 250));
      left = ours();
    }
    if (left.length > 0) throw new Error(`processes outlived the test run:\n${left.join('\n')}`);
  };
}
