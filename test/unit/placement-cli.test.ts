import { execFileSync } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type GgufValue, gv } from '../../src/shared/gguf/types.ts';
import { writeGguf } from '../../src/shared/gguf/writer.ts';
import { readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';
import { parseNodesFile } from '../../src/shared/placement/nodes-file.ts';
import { planPlacement } from '../../src/shared/placement/planner.ts';
import { mlxPlacementOptions } from '../../src/shared/placement/types.ts';
import { writeMlxHeaderOnly } from '../../src/shared/testmodel/mlx.ts';
import { DEFAULT_LLAMA_TEST_SHAPE, llamaTestModelSpec } from '../../src/shared/testmodel/llama.ts';
import { findPreset, presetSpec } from '../../src/shared/testmodel/presets.ts';
import { loadVocab } from '../../src/shared/testmodel/vocab.ts';
import { orchardInProcess as orchard } from '../helpers/cli-in-process.ts';
import { orchard as runOrchard } from '../helpers/processes.ts';

const GiB = 2 ** 30;

let dir: string;
let model70b: string;
let nodesFile: string;

type Meta = [string, GgufValue][];

/** A small real GGUF (weights, SPM vocabulary) with its metadata edited: `orchard plan` args. */
async function tiny(name: string, edit: (m: Meta) => Meta): Promise<string[]> {
  const p = join(dir, name);
  const spec = llamaTestModelSpec({ ...DEFAULT_LLAMA_TEST_SHAPE, layers: 2, dim: 64, ffn: 128, heads: 4, kvHeads: 2 }, await loadVocab());
  await writeGguf(p, { metadata: edit([...spec.metadata].map(([k, v]) => [k, v])), tensors: spec.tensors });
  return ['plan', p, '--nodes', nodesFile];
}

async function headerOnly(path: string, name: string, quant: 'q4_k_m' | 'f16', meta: Record<string, ReturnType<typeof gv.str>> = {}): Promise<void> {
  const spec = presetSpec(findPreset(name), quant);
  const metadata = new Map(spec.metadata);
  for (const [k, v] of Object.entries(meta)) metadata.set(k, v);
  await writeGguf(path, { metadata, tensors: spec.tensors }, { headerOnly: true });
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-plan-cli-'));
  model70b = join(dir, '70b.gguf');
  await headerOnly(model70b, 'llama-3-70b', 'q4_k_m');
  nodesFile = join(dir, 'nodes.json');
  await writeFile(
    nodesFile,
    JSON.stringify([
      { name: 'air', chip: 'Apple M3', memoryBytes: 24 * GiB },
      { name: 'max-1', chip: 'Apple M4 Max', gpuCores: 40, memoryBytes: 128 * GiB },
      { name: 'max-2', chip: 'Apple M4 Max', gpuCores: 40, memoryBytes: 128 * GiB },
      { name: 'ultra', chip: 'Apple M2 Ultra', memoryBytes: 192 * GiB },
    ]),
  );
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('orchard plan', () => {
  // The CLI runs in this process below (see cli-in-process.ts); this test and the first bad input
  // run `orchard` as a process: exit code, stdout and stderr as a shell sees them.
  it('--json prints the issue shape: 70B Q4_K_M at 8k on the Ultra alone', async () => {
    const r = await runOrchard(['plan', model70b, '--nodes', nodesFile, '--ctx', '8192', '--json'], process.env);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const plan = JSON.parse(r.stdout);
    expect(plan.fits).toBe(true);
    expect(plan.stages).toHaveLength(1);
    expect(plan.stages[0]).toMatchObject({ node: 'ultra', firstLayer: 0, lastLayer: 79 });
    for (const k of ['weights', 'kv', 'compute', 'overhead', 'total']) expect(plan.stages[0].bytes[k]).toBeGreaterThan(0);
    expect(plan.stages[0].budgetBytes).toBeGreaterThan(plan.stages[0].bytes.total);
    expect(plan.predicted.tokensPerSecond).toBeGreaterThan(0);
    expect(plan.reasons.length).toBeGreaterThan(0);
  });

  it('--prompt-tokens predicts time to first token; --objective ttft is accepted only with a prompt', async () => {
    const r = await orchard('plan', model70b, '--nodes', nodesFile, '--ctx', '8192', '--prompt-tokens', '4096', '--objective', 'balanced', '--json');
    expect(r.code).toBe(0);
    const plan = JSON.parse(r.stdout);
    expect(plan.predicted).toMatchObject({ promptTokens: 4096, objective: 'balanced' });
    // 4096 tokens × ~2 × 70e9 FLOPs on a Mac GPU: seconds, not milliseconds and not minutes.
    expect(plan.predicted.ttftSeconds).toBeGreaterThan(1);
    expect(plan.predicted.ttftSeconds).toBeLessThan(120);
    const bad = await orchard('plan', model70b, '--nodes', nodesFile, '--objective', 'ttft');
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--prompt-tokens/);
  });

  it('prints a readable table', async () => {
    const r = await orchard('plan', model70b, '--nodes', nodesFile, '--ctx', '8192');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/\(llama, 80 layers, Q4_K\)/);
    expect(r.stdout).toMatch(/ultra/);
    expect(r.stdout).toMatch(/│ +total │/);
    expect(r.stdout).toMatch(/│ +42\.9 GiB │ +136\.8 GiB │/); // total and budget of the one stage, human units
    expect(r.stdout).toMatch(/predicted: [\d.]+ tok\/s/);
  });

  it('does not fit → exit 1 with shortfall and remedies', async () => {
    const big = join(dir, '405b-f16.gguf');
    await headerOnly(big, 'llama-3.1-405b', 'f16');
    const r = await orchard('plan', big, '--nodes', nodesFile, '--json');
    expect(r.code).toBe(1);
    const plan = JSON.parse(r.stdout);
    expect(plan.fits).toBe(false);
    expect(plan.shortfall.shortfallBytes).toBeGreaterThan(0);
    expect(plan.remedies.length).toBeGreaterThan(0);
  });

  it('an architecture llama.cpp loads but Orchard has no exact rules for is planned, its estimates named', async () => {
    // llama-3-8b's tensors under olmo2's name: llama.cpp's loader accepts it (same keys), Orchard estimates.
    const p = join(dir, 'olmo2.gguf');
    const spec = presetSpec(findPreset('llama-3-8b'), 'q4_k_m');
    const metadata = [...spec.metadata].map(([k, v]) => (k === 'general.architecture' ? ([k, gv.str('olmo2')] as const) : ([k.replace(/^llama\./, 'olmo2.'), v] as const)));
    await writeGguf(p, { metadata, tensors: spec.tensors }, { headerOnly: true });
    const r = await orchard('plan', p, '--nodes', nodesFile, '--json');
    expect(r.stderr).toBe('');
    const plan = JSON.parse(r.stdout) as { fits: boolean; estimated: string[] };
    expect(plan.fits).toBe(true);
    expect(plan.estimated.join(' ')).toMatch(/KV cache/);
  });

  it('a header with no tensor data at all (testmodel --header-only, any writer) is planned, not sent to the loader', async () => {
    const p = join(dir, 'bare-header.gguf');
    const spec = llamaTestModelSpec({ ...DEFAULT_LLAMA_TEST_SHAPE, layers: 2, dim: 64, ffn: 128, heads: 4, kvHeads: 2 }, await loadVocab());
    await writeGguf(p, spec, { headerOnly: true });
    const r = await orchard('plan', p, '--nodes', nodesFile, '--json');
    expect(r.stderr).toBe('');
    expect((JSON.parse(r.stdout) as { fits: boolean }).fits).toBe(true);
  });

  it('plans an MLX model directory offline, with the MLX rule (every rank holds embedding and head)', async () => {
    const mlxDir = join(dir, 'llama-3-70b-4bit');
    await writeMlxHeaderOnly(mlxDir, findPreset('llama-3-70b'), { quantization: { bits: 4, groupSize: 64 } });
    const table = await orchard('plan', mlxDir, '--nodes', nodesFile, '--ctx', '8192');
    expect(table.stderr).toBe('');
    expect(table.code).toBe(0);
    expect(table.stdout).toMatch(/llama-3-70b-4bit \(llama, 80 layers, Q4g64\)/);

    // Two 40 GiB nodes: ~37 GiB of 4-bit weights must split, and the worker stage then also
    // holds the embedding, final norm and output head, as the coordinator plans MLX.
    const pair = join(dir, 'pair.json');
    await writeFile(pair, JSON.stringify([0, 1].map((i) => ({ name: `m${i}`, chip: 'Apple M4 Max', gpuCores: 40, memoryBytes: 40 * GiB }))));
    const r = await orchard('plan', mlxDir, '--nodes', pair, '--ctx', '8192', '--json');
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const plan = JSON.parse(r.stdout);
    expect(plan.model).toBe('llama-3-70b-4bit');
    expect(plan.stages).toHaveLength(2);
    const profile = await readMlxModelProfile(mlxDir);
    const expected = planPlacement(profile, parseNodesFile(await readFile(pair, 'utf8'), pair), { ctx: 8192, ...mlxPlacementOptions() });
    expect(plan.stages.map((s: { node: string; firstLayer: number; lastLayer: number }) => [s.node, s.firstLayer, s.lastLayer])).toEqual(
      expected.stages.map((s) => [s.node, s.firstLayer, s.lastLayer]),
    );
    const worker = plan.stages[0];
    const layerWeights = profile.layers.slice(worker.firstLayer, worker.lastLayer + 1).reduce((a, l) => a + l.weightBytes, 0);
    expect(worker.bytes.weights).toBe(layerWeights + profile.tokenEmbdBytes + profile.outputNormBytes + profile.outputBytes);
  });

  const bad: [string, () => Promise<string[]>, RegExp][] = [
    // Without --nodes the coordinator plans (test/integration/cluster-static.test.ts); its flags are checked first.
    ['--hop-ms without --nodes', async () => ['plan', model70b, '--hop-ms', '2', '--coordinator', '127.0.0.1:1'], /--hop-ms applies to --nodes plans only/],
    ['malformed --coordinator', async () => ['plan', model70b, '--coordinator', 'http://127.0.0.1:1'], /invalid coordinator address "http:\/\/127\.0\.0\.1:1"/],
    ['missing model', async () => ['plan', join(dir, 'nope.gguf'), '--nodes', nodesFile], /nope\.gguf/],
    [
      'garbled GGUF',
      async () => {
        const p = join(dir, 'garbage.gguf');
        await writeFile(p, 'this is not a gguf file at all');
        return ['plan', p, '--nodes', nodesFile];
      },
      /garbage\.gguf|magic|GGUF/i,
    ],
    [
      'truncated GGUF',
      async () => {
        const p = join(dir, 'trunc.gguf');
        const bytes = await readFile(model70b);
        await writeFile(p, bytes.subarray(0, 4000));
        return ['plan', p, '--nodes', nodesFile];
      },
      /trunc|end of file|truncated|short/i,
    ],
    [
      'a FIFO instead of a model (fails at once, does not block)',
      async () => {
        const p = join(dir, 'model.fifo');
        execFileSync('mkfifo', [p]);
        return ['plan', p, '--nodes', nodesFile];
      },
      /model\.fifo: not a regular file/,
    ],
    [
      'directory that is no model',
      async () => ['plan', dir, '--nodes', nodesFile],
      /not a regular file/,
    ],
    [
      // llama.cpp's own loader says so (no list of names in Orchard): a real file, its arch renamed.
      'architecture llama.cpp does not know',
      async () => tiny('unknown-arch.gguf', (m) => m.map(([k, v]) => (k === 'general.architecture' ? [k, gv.str('nosuch')] : [k.replace(/^llama\./, 'nosuch.'), v]))),
      /unknown-arch\.gguf: llama.cpp cannot load this file: unknown model architecture: 'nosuch'/,
    ],
    [
      // Orchard's reader parses this; llama.cpp's loader refuses it, in its words.
      'a BPE vocabulary without its merges',
      async () => tiny('no-merges.gguf', (m) => m.map(([k, v]) => (k === 'tokenizer.ggml.model' ? [k, gv.str('gpt2')] : [k, v]))),
      /no-merges\.gguf: llama.cpp cannot load this file: error loading model vocabulary: cannot find tokenizer merges in model file/,
    ],
    [
      // Cut inside its data section: not a header-only planning file, so llama.cpp is asked.
      'a GGUF cut short inside its tensor data',
      async () => {
        const args = await tiny('cut.gguf', (m) => m);
        const p = args[1]!;
        await truncate(p, (await stat(p)).size - 4096);
        return args;
      },
      /cut\.gguf: llama.cpp cannot load this file: .*not within the file bounds/,
    ],
    [
      'empty nodes file',
      async () => {
        const p = join(dir, 'empty.json');
        await writeFile(p, '[]');
        return ['plan', model70b, '--nodes', p];
      },
      /lists no nodes/,
    ],
    [
      'invalid JSON',
      async () => {
        const p = join(dir, 'bad.json');
        await writeFile(p, '{nope');
        return ['plan', model70b, '--nodes', p];
      },
      /not valid JSON/,
    ],
    [
      'negative size',
      async () => {
        const p = join(dir, 'neg.json');
        await writeFile(p, JSON.stringify([{ name: 'a', memoryBytes: -5, bandwidthBytesPerSecond: 1e11 }]));
        return ['plan', model70b, '--nodes', p];
      },
      /at 0\.memoryBytes/,
    ],
    [
      'unknown chip without bandwidth',
      async () => {
        const p = join(dir, 'chip.json');
        await writeFile(p, JSON.stringify([{ name: 'a', memoryBytes: 1e10, chip: 'Pentium 4' }]));
        return ['plan', model70b, '--nodes', p];
      },
      /unknown chip "Pentium 4"/,
    ],
    ['bad --cache-type', async () => ['plan', model70b, '--nodes', nodesFile, '--cache-type', 'q3'], /invalid --cache-type/],
    ['bad --ctx', async () => ['plan', model70b, '--nodes', nodesFile, '--ctx', '-1'], /invalid --ctx/],
    ['bad --hop-ms', async () => ['plan', model70b, '--nodes', nodesFile, '--hop-ms', '-3'], /invalid --hop-ms/],
  ];
  for (const [i, [what, args, msg]] of bad.entries()) {
    it(`bad input (${what}) → one line, exit 2`, async () => {
      const argv = await args();
      const r = i === 0 ? await runOrchard(argv, process.env) : await orchard(...argv);
      expect(r.code).toBe(2);
      expect(r.stdout).toBe('');
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(msg);
    });
  }
});
