import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureMlxEnv, type MlxEnv, mlxProcessEnv } from '../../src/node/mlx/env.ts';
import { writeMlxTestModel } from '../../src/node/mlx/testmodel.ts';
import { readMlxModelProfile } from '../../src/shared/model/mlx-profile.ts';

const run = promisify(execFile);
let env: MlxEnv;
let dir: string;

beforeAll(async () => {
  env = await ensureMlxEnv();
  dir = await mkdtemp(join(tmpdir(), 'orchard-mlx-tm-'));
}, 600_000);

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('MLX test models', () => {
  it('same arguments → same bytes; another seed → other weights', async () => {
    const a = await writeMlxTestModel(env.python, { out: join(dir, 'a'), layers: 3, hidden: 32, seed: 5 });
    const b = await writeMlxTestModel(env.python, { out: join(dir, 'b'), layers: 3, hidden: 32, seed: 5 });
    const c = await writeMlxTestModel(env.python, { out: join(dir, 'c'), layers: 3, hidden: 32, seed: 6 });
    expect(Object.keys(a.files)).toEqual([
      'config.json',
      'model.safetensors',
      'model.safetensors.index.json',
      'tokenizer.json',
      'tokenizer_config.json',
    ]);
    expect(b.files).toEqual(a.files);
    expect(c.files['model.safetensors']).not.toBe(a.files['model.safetensors']);
    expect(c.files['tokenizer.json']).toBe(a.files['tokenizer.json']);
    const config = JSON.parse(await readFile(join(dir, 'a', 'config.json'), 'utf8'));
    expect(config).toMatchObject({ model_type: 'llama', num_hidden_layers: 3, hidden_size: 32, vocab_size: 258, eos_token_id: 257 });
  });

  it('`orchard testmodel mlx` writes the same bytes as the API and refuses bad flags with exit 2', async () => {
    const cli = join(process.cwd(), 'bin', 'orchard.js');
    const { stdout } = await run(process.execPath, [cli, 'testmodel', 'mlx', '--out', join(dir, 'cli'), '--layers', '3', '--hidden', '32', '--seed', '5', '--json']);
    const viaCli = JSON.parse(stdout.trim());
    const viaApi = await writeMlxTestModel(env.python, { out: join(dir, 'api'), layers: 3, hidden: 32, seed: 5 });
    expect(viaCli.files).toEqual(viaApi.files);
    const bad = await run(process.execPath, [cli, 'testmodel', 'mlx', '--out', join(dir, 'bad'), '--hidden', '30', '--heads', '4']).catch(
      (e: { code?: number; stderr?: string }) => e,
    );
    expect((bad as { code?: number }).code).toBe(2);
    expect((bad as { stderr?: string }).stderr).toMatch(/divisible/);
  });

  it('the tokenizer is byte-level: every byte round-trips through transformers offline', async () => {
    const model = join(dir, 'a');
    const script = [
      'import sys, json',
      'from mlx_lm.utils import load_tokenizer',
      'from pathlib import Path',
      't = load_tokenizer(Path(sys.argv[1]))',
      's = "héllo, wörld 🍐\\n\\t"',
      'ids = t.encode(s, add_special_tokens=False)',
      'print(json.dumps({"ids": ids, "back": t.decode(ids), "eos": sorted(t.eos_token_ids), "n": len(t.get_vocab())}))',
    ].join('\n');
    const { stdout } = await run(env.python, ['-c', script, model], { env: { ...process.env, ...mlxProcessEnv() } });
    const out = JSON.parse(stdout.trim().split('\n').pop() ?? '{}');
    expect(out.ids).toEqual([...Buffer.from('héllo, wörld 🍐\n\t')]);
    expect(out.back).toBe('héllo, wörld 🍐\n\t');
    expect(out.eos).toEqual([257]);
    expect(out.n).toBe(258);
  });

  it('the profile (headers only) matches the bytes MLX itself holds per layer', async () => {
    const model = join(dir, 'q');
    await writeMlxTestModel(env.python, { out: model, arch: 'ministral3', layers: 4, hidden: 64, kvHeads: 2, seed: 1 });
    const profile = await readMlxModelProfile(model);
    const script = [
      'import sys, json, re, mlx.core as mx',
      'w = mx.load(sys.argv[1] + "/model.safetensors")',
      'per = {}',
      'other = 0',
      'for k, v in w.items():',
      '    m = re.search(r"layers\\.(\\d+)\\.", k)',
      '    if m: per[int(m.group(1))] = per.get(int(m.group(1)), 0) + v.nbytes',
      '    else: other += v.nbytes',
      'print(json.dumps({"layers": [per[i] for i in sorted(per)], "other": other}))',
    ].join('\n');
    const { stdout } = await run(env.python, ['-c', script, model], { env: { ...process.env, ...mlxProcessEnv() } });
    const real = JSON.parse(stdout.trim().split('\n').pop() ?? '{}');
    expect(profile.layers.map((l) => l.weightBytes)).toEqual(real.layers);
    expect(profile.tokenEmbdBytes + profile.outputBytes + profile.outputNormBytes + profile.otherBytes).toBe(real.other);
    expect(profile).toMatchObject({ arch: 'llama', layerCount: 4, heads: 4, vocab: 258, format: 'mlx' });
    expect(profile.kvHeads).toEqual([2, 2, 2, 2]);
    expect(profile.layers[0]?.kEmbdGqa).toBe(2 * 16);
    expect(profile.mlx.modelType).toBe('ministral3');
  });
});
