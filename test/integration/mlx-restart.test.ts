import { execFile } from 'node:child_process';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureMlxEnv } from '../../src/node/mlx/env.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { JoinedCluster } from '../helpers/joined-cluster.ts';
import { killGroup, orchard, sleep } from '../helpers/processes.ts';
import { mlxSplittingBudgets } from '../helpers/split-model.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * An MLX model split over two agents, across the two ways a process can vanish, real processes:
 *  - the coordinator is SIGKILLed and started again on its state dir: it re-adopts the ranks (the
 *    same processes, nothing reloads) and the instance keeps the parallelism its plan chose from
 *    `auto`, with the reason, as it was before the restart;
 *  - an agent holding a rank is SIGKILLed: its watchdog takes the rank, and nothing of the group
 *    is left in `<state dir>/run` (0700): the rank read its launch files at start-up and they
 *    were removed once it was ready. (A folder of a rank killed before it was ready is swept at
 *    the agent's next start, run-dir.ts: engine-startup-files.test.ts shows that with a head.)
 */

const execFileP = promisify(execFile);
const CTX = 256;

interface Status {
  models: { name: string; state: string; parallelism?: { mode: string; reason: string } }[];
}

async function rankPids(modelDir: string): Promise<number[]> {
  const { stdout } = await execFileP('pgrep', ['-f', `mlx_worker.py --model ${modelDir}`]).catch(() => ({ stdout: '' }));
  return stdout.split('\n').filter(Boolean).map(Number).sort();
}

const workFolders = async (runDir: string) => (await readdir(runDir)).filter((n) => n.startsWith('orchard-mlx-'));

describe('MLX across restarts: parallelism kept by the instance store; a SIGKILLed agent leaves no launch files', () => {
  const dir = tempDir('orchard-mlx-restart-', 'all');
  let cluster: JoinedCluster;
  let model: string;
  let budgets: Record<'alpha' | 'bravo', number>;

  beforeAll(async () => {
    const mlx = await ensureMlxEnv();
    model = join(dir.path, 'm4');
    await writeMlxTestModel(mlx.python, { out: model, arch: 'llama', layers: 4, hidden: 64, heads: 4, seed: 5 });
    budgets = await mlxSplittingBudgets([model], CTX);
    cluster = new JoinedCluster({ dir: dir.path, env: { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_MLX_READY_TIMEOUT: '60' } });
    await cluster.startCoordinator(['--heal', 'off']);
    await cluster.mintToken(2);
    for (const name of ['alpha', 'bravo'] as const) await cluster.startAgent(name, ['--budget', String(budgets[name])]);
    await cluster.waitUp(2);
  }, 300_000);

  afterAll(() => cluster?.stop());

  it('coordinator SIGKILL → restart: same rank processes, same parallelism and reason', async () => {
    const load = await orchard(['load', model, '--ctx', String(CTX), '--name', 'm4', '--pin', 'alpha', 'bravo', '--coordinator', cluster.grpcAddress], cluster.env);
    expect(load.code, load.stderr).toBe(0);
    const before = (await cluster.status<Status>()).models.find((m) => m.name === 'm4');
    expect(before?.parallelism?.mode).toMatch(/^(pipeline|tensor)$/);
    expect(before?.parallelism?.reason).toMatch(/^auto: /);
    const pids = await rankPids(model);
    expect(pids).toHaveLength(2);

    await killGroup(cluster.coordinator!);
    await cluster.startCoordinator(['--heal', 'off']);
    let after: Status['models'][number] | undefined;
    for (const until = Date.now() + 60_000; Date.now() < until; await sleep(300)) {
      after = (await cluster.status<Status>()).models.find((m) => m.name === 'm4');
      if (after?.state === 'ready') break;
    }
    expect(after?.state).toBe('ready');
    expect(after?.parallelism).toEqual(before!.parallelism);
    expect(await rankPids(model), 'the ranks were restarted: that is a reload').toEqual(pids);
    const g = await orchard(['generate', '--model', 'm4', '--prompt', 'Once upon a time', '--max-tokens', '4', '--temperature', '0', '--json', '--coordinator', cluster.grpcAddress], cluster.env);
    expect(g.code, g.stderr).toBe(0);
    expect((JSON.parse(g.stdout) as { tokens: number[] }).tokens.length).toBeGreaterThan(0);
  }, 300_000);

  it('agent SIGKILL with a ready rank leaves no MLX launch files in <state dir>/run', async () => {
    const runDir = join(dir.path, 'bravo', 'run');
    expect((await stat(runDir)).mode & 0o777).toBe(0o700);
    const ranks = await rankPids(model);
    expect(ranks).toHaveLength(2);
    expect(await workFolders(runDir), 'a ready rank keeps no launch files').toEqual([]);
    const bravo = cluster.agents.get('bravo')!;
    // The agent alone, as a crash would take it: its watchdog kills the rank, nobody removes anything.
    process.kill(bravo.proc.child.pid!, 'SIGKILL');
    await bravo.proc.exited;
    for (const until = Date.now() + 30_000; Date.now() < until && (await rankPids(model)).length === ranks.length; ) await sleep(200);
    expect((await rankPids(model)).length).toBeLessThan(ranks.length);
    expect(await workFolders(runDir)).toEqual([]);

    await cluster.startAgent('bravo', ['--budget', String(budgets.bravo)]);
    expect(await workFolders(runDir)).toEqual([]);
    expect((await stat(runDir)).mode & 0o777).toBe(0o700);
  }, 300_000);
});
