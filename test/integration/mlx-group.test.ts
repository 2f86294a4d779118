import { spawn } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ensureMlxEnv, type MlxEnv } from '../../src/node/mlx/env.ts';
import { collect, MlxGroup, MlxGroupError, type MlxGroupOptions } from '../../src/node/mlx/group.ts';
import { rankOfStage } from '../../src/node/mlx/launch.ts';
import { localRingEndpoints } from '../../src/node/mlx/ports.ts';
import { listensOn } from '../../src/node/ports.ts';
import type { MlxRequest } from '../../src/node/mlx/protocol.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { alive } from '../helpers/processes.ts';

/**
 * Real MLX (CPU wheels, project venv) ranks on 127.0.0.1 with fresh ports. The oracle: a
 * pipeline-split run yields exactly the greedy tokens of a single process on the same directory.
 */

let env: MlxEnv;
let dir: string;
let llama: string;
let ministral: string;
const groups: MlxGroup[] = [];


async function start(opts: Omit<MlxGroupOptions, 'python'>): Promise<MlxGroup> {
  const g = await MlxGroup.start({ python: env.python, startupTimeoutMs: 90_000, stallTimeoutMs: 20_000, workRoot: dir, ...opts });
  groups.push(g);
  return g;
}

async function ring(n: number) {
  return { backend: 'ring' as const, endpoints: await localRingEndpoints(n) };
}

// A prompt of bytes, long enough that prefill is a real multi-token step.
const promptA: MlxRequest = { id: 'a', tokens: [...Buffer.from('The orchard has apples and pears.')], maxTokens: 24, ignoreEos: true };
const promptB: MlxRequest = { id: 'b', prompt: 'hello world', maxTokens: 16, ignoreEos: true };
// Chat template applied in the worker; sampling with temperature: same seed → same tokens on every rank.
const promptC: MlxRequest = {
  id: 'c',
  messages: [{ role: 'user', content: 'Which fruit?' }],
  maxTokens: 16,
  temperature: 0.9,
  seed: 1234,
  ignoreEos: true,
};

const reference = new Map<string, number[]>();

beforeAll(async () => {
  env = await ensureMlxEnv();
  dir = await mkdtemp(join(tmpdir(), 'orchard-mlx-test-'));
  llama = join(dir, 'llama');
  ministral = join(dir, 'ministral3');
  await writeMlxTestModel(env.python, { out: llama, arch: 'llama', layers: 4, hidden: 64, seed: 7 });
  await writeMlxTestModel(env.python, { out: ministral, arch: 'ministral3', layers: 4, hidden: 64, seed: 7 });
  const single = await start({ model: llama, mode: 'single' });
  for (const req of [promptA, promptB, promptC]) reference.set(req.id, (await collect(single.generate(req))).tokens);
  await single.close();
}, 600_000);

afterEach(async () => {
  await Promise.all(groups.splice(0).map((g) => g.close()));
});

afterAll(async () => {
  await Promise.all(groups.splice(0).map((g) => g.close()));
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('MLX pipeline split equals a single process', () => {
  it('has a non-trivial reference', () => {
    const a = reference.get('a') ?? [];
    expect(a).toHaveLength(24);
    // A constant stream would make "identical" meaningless.
    expect(new Set(a).size).toBeGreaterThan(8);
    // The sampled chat reference ran to its full length (pipeline runs must match it exactly).
    expect(reference.get('c')).toHaveLength(16);
  });

  it('the text comes from each token’s own bytes (the test vocabulary: token id = byte), a split character held until complete', async () => {
    const g = await start({ model: llama, mode: 'single' });
    const r = await collect(g.generate({ ...promptA, id: 'bytes' }));
    expect(r.tokens).toEqual(reference.get('a'));
    for (const e of r.events) if (e.token < 256) expect(e.bytes).toBe(Buffer.from([e.token]).toString('hex'));
    // The whole text is the UTF-8 of the bytes in order, however the tokens cut the characters.
    const raw = Buffer.concat(r.events.map((e) => Buffer.from(e.bytes ?? '', 'hex')));
    expect(r.text).toBe(new TextDecoder('utf-8', { ignoreBOM: true }).decode(raw));
  });

  it('queued requests run one after another, each stall clock starting on its own turn', async () => {
    const g = await start({ model: llama, mode: 'pipeline', split: [2, 2], launch: await ring(2) });
    // The ranks read the hostfile at start-up: a ready group keeps no launch folder.
    expect((await readdir(dir)).filter((n) => n.startsWith('orchard-mlx-'))).toEqual([]);
    const [a, b] = await Promise.all([collect(g.generate(promptA)), collect(g.generate(promptB))]);
    expect(a.tokens).toEqual(reference.get('a'));
    expect(b.tokens).toEqual(reference.get('b'));
  });

  for (const split of [
    [1, 3],
    [2, 2],
    [1, 2, 1],
  ]) {
    it(`${split.length} ranks, split ${split.join('+')}: identical greedy tokens`, async () => {
      const g = await start({ model: llama, mode: 'pipeline', split, launch: await ring(split.length) });
      // Stage s (first layers first) runs on rank N-1-s; rank 0 holds the last layers.
      let first = 0;
      const ranges = split.map((n) => {
        const range = [first, first + n];
        first += n;
        return range;
      });
      expect(g.ready.map((r) => r.layers)).toEqual(ranges.map((_, r) => ranges[rankOfStage(r, split.length)]));
      for (const req of [promptA, promptB, promptC]) {
        const out = await collect(g.generate(req));
        expect(out.tokens).toEqual(reference.get(req.id));
        expect(out.done.ranks).toBe(split.length);
        expect(out.done.ranks_agree).toBe(true);
        expect(out.done.finish_reason).toBe('length');
      }
    });
  }

  it('ministral3 (an architecture with its own mlx-lm pipeline) splits the same way', async () => {
    const single = await start({ model: ministral, mode: 'single' });
    const want = (await collect(single.generate(promptA))).tokens;
    await single.close();
    const g = await start({ model: ministral, mode: 'pipeline', split: [3, 1], launch: await ring(2) });
    expect((await collect(g.generate(promptA))).tokens).toEqual(want);
  });
});

describe('MLX tensor parallel', () => {
  it('2 ranks agree and their logprobs stay within tolerance of one process', async () => {
    const req: MlxRequest = { ...promptA, id: 'tp', maxTokens: 12, logprobs: 5 };
    const single = await start({ model: llama, mode: 'single' });
    const want = await collect(single.generate(req));
    await single.close();
    const g = await start({ model: llama, mode: 'tensor', launch: await ring(2) });
    const got = await collect(g.generate(req));
    expect(got.done.ranks_agree).toBe(true);
    expect(got.done.ranks).toBe(2);
    // Compare step by step while the sequences agree (an exact tie could legitimately flip).
    let compared = 0;
    for (let i = 0; i < want.events.length; i++) {
      const w = want.events[i];
      const h = got.events[i];
      if (!w || !h) break;
      expect(h.logprob).toBeCloseTo(w.logprob ?? Number.NaN, 3);
      const wTop = new Map(w.top_logprobs?.map(([id, lp]) => [id, lp]));
      for (const [id, lp] of h.top_logprobs ?? []) {
        const ref = wTop.get(id);
        if (ref !== undefined) expect(Math.abs(lp - ref)).toBeLessThan(1e-3);
      }
      compared++;
      if (w.token !== h.token) break;
    }
    expect(compared).toBeGreaterThan(5);
  });
});

describe('MLX group failures', () => {
  it('cancel stops every rank at the same step and the group keeps serving', async () => {
    const g = await start({ model: llama, mode: 'pipeline', split: [2, 2], launch: await ring(2) });
    const ctl = new AbortController();
    const gen = g.generate({ id: 'long', tokens: [1, 2, 3], maxTokens: 100_000, ignoreEos: true }, { signal: ctl.signal });
    let n = 0;
    let done: Awaited<ReturnType<typeof collect>>['done'] | undefined;
    for (;;) {
      const next = await gen.next();
      if (next.done) {
        done = next.value;
        break;
      }
      if (++n === 5) ctl.abort();
    }
    expect(done?.finish_reason).toBe('cancelled');
    expect(n).toBeLessThan(100);
    // Ranks are still in lockstep: the next request is exact.
    expect((await collect(g.generate(promptB))).tokens).toEqual(reference.get('b'));
  });

  it('a bad request is an error for that request only', async () => {
    const g = await start({ model: llama, mode: 'pipeline', split: [2, 2], launch: await ring(2) });
    await expect(collect(g.generate({ id: 'bad', tokens: [999_999], maxTokens: 4 }))).rejects.toThrow(/out of range/);
    expect(g.failure).toBeUndefined();
    expect((await collect(g.generate(promptB))).tokens).toEqual(reference.get('b'));
  });

  it('killing one rank mid-stream fails the request within 5 s and leaves no rank alive', async () => {
    const g = await start({ model: llama, mode: 'pipeline', split: [1, 3], launch: await ring(2) });
    const pids = [...g.pids.values()];
    const gen = g.generate({ id: 'victim', tokens: [5, 6, 7], maxTokens: 100_000, ignoreEos: true });
    for (let i = 0; i < 5; i++) await gen.next();
    const killedAt = Date.now();
    process.kill(g.pids.get(1) ?? -1, 'SIGKILL');
    let error: unknown;
    try {
      for (;;) if ((await gen.next()).done) break;
    } catch (err) {
      error = err;
    }
    const elapsed = Date.now() - killedAt;
    expect(error).toBeInstanceOf(MlxGroupError);
    expect(String(error)).toMatch(/rank (0|1)/);
    expect(elapsed).toBeLessThan(5000);
    await g.close();
    for (const pid of pids) expect(alive(pid)).toBe(false);
  });

  it('a rank that never comes up fails start-up within the watchdog, nothing left running', async () => {
    // Rank 1 of 2 is never started (its node never came): rank 0 waits in accept forever.
    const launch = await ring(2);
    const t0 = Date.now();
    let pids: number[] = [];
    const err = await MlxGroup.start({
      python: env.python,
      model: llama,
      mode: 'pipeline',
      launch,
      localRanks: [0],
      startupTimeoutMs: 12_000,
    }).catch((e: unknown) => e);
    const elapsed = Date.now() - t0;
    expect(err).toBeInstanceOf(MlxGroupError);
    expect(String(err)).toMatch(/did not start within 12 s: rank 0 never reported ready/);
    expect(elapsed).toBeGreaterThanOrEqual(11_500);
    expect(elapsed).toBeLessThan(20_000);
    pids = await workerPids(llama);
    expect(pids).toEqual([]);
  });

  it('a rank that crashes at start-up reports why', async () => {
    const err = await start({ model: join(dir, 'missing'), mode: 'pipeline', launch: await ring(2) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MlxGroupError);
    expect(String(err)).toMatch(/start-up failed|exited/);
    expect(await workerPids(join(dir, 'missing'))).toEqual([]);
  });

  it('ranks die with their parent (stdin EOF / PDEATHSIG), even while blocked in the ring handshake', async () => {
    // A throwaway parent starts rank 0 of a 2-rank ring (blocks in accept), prints its pid, and
    // is SIGKILLed; the worker must go away on its own. Its launch folder, which nobody removes
    // then, goes to this file's folder (as an agent's goes to its run folder), not to /tmp.
    const launch = await ring(2);
    const script = `
      import { MlxGroup } from ${JSON.stringify(join(process.cwd(), 'src/node/mlx/group.ts'))};
      const p = MlxGroup.start({ python: ${JSON.stringify(env.python)}, model: ${JSON.stringify(llama)}, mode: 'pipeline',
        launch: ${JSON.stringify(launch)}, localRanks: [0], startupTimeoutMs: 600000, workRoot: ${JSON.stringify(dir)} });
      setInterval(() => {}, 1000);
      void p;
    `;
    const parent = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    try {
      let worker: number[] = [];
      const deadline = Date.now() + 60_000;
      while (Date.now() < deadline && worker.length === 0) {
        await new Promise((r) => setTimeout(r, 500));
        worker = await childPids(parent.pid ?? -1);
      }
      expect(worker.length).toBe(1);
      // Let it reach the ring handshake (imports done, blocking in accept): it listens.
      const handshake = Date.now() + 60_000;
      while (Date.now() < handshake && !(await listensOn(worker[0]!))) await new Promise((r) => setTimeout(r, 200));
      expect(await listensOn(worker[0]!)).toBe(true);
      process.kill(-(parent.pid ?? 0), 'SIGKILL');
      const gone = Date.now() + 5000;
      while (Date.now() < gone && worker.some(alive)) await new Promise((r) => setTimeout(r, 100));
      expect(worker.filter(alive)).toEqual([]);
    } finally {
      try {
        process.kill(-(parent.pid ?? 0), 'SIGKILL');
      } catch {
        // gone
      }
    }
  });
});

async function childPids(ppid: number): Promise<number[]> {
  const { execFile } = await import('node:child_process');
  return new Promise((resolve) => {
    execFile('pgrep', ['-P', String(ppid), '-f', 'mlx_worker'], (_err, stdout) =>
      resolve(
        stdout
          .split('\n')
          .filter(Boolean)
          .map((s) => Number.parseInt(s, 10)),
      ),
    );
  });
}

async function workerPids(model: string): Promise<number[]> {
  // Any worker process still running on this model would be a leaked rank (tests run one at a
  // time and every earlier group is closed in afterEach).
  const { execFile } = await import('node:child_process');
  return new Promise((resolve) => {
    execFile('pgrep', ['-f', `mlx_worker.py --model ${model}`], (_err, stdout) =>
      resolve(
        stdout
          .split('\n')
          .filter(Boolean)
          .map((s) => Number.parseInt(s, 10)),
      ),
    );
  });
}
