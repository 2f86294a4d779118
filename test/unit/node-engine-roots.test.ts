import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import protobuf from 'protobufjs';
import { afterAll, describe, expect, it } from 'vitest';
import { confineEngineSpec, confinePath } from '../../src/node/engine-roots.ts';
import { engineSpecFromRequest } from '../../src/node/engine-spec.ts';
import { removedStartEngineFields, topLevelFields } from '../../src/node/removed-fields.ts';

const base = mkdtempSync(join(tmpdir(), 'orchard-roots-'));
const models = join(base, 'models');
const state = join(base, 'state');
const outside = join(base, 'outside');
for (const d of [models, state, outside]) mkdirSync(d);
writeFileSync(join(models, 'm.gguf'), 'x'.repeat(100));
symlinkSync(outside, join(models, 'out'));
symlinkSync(join(models, 'm.gguf'), join(state, 'in.gguf'));
const roots = { modelsDirs: [models], stateDir: state, cacheDir: join(base, 'cache-absent') };
afterAll(() => rmSync(base, { recursive: true, force: true }));

describe('paths confined to the agent roots (after symlinks)', () => {
  it('accepts paths inside a root, also ones that do not exist yet, and returns the real path', async () => {
    expect(await confinePath('p', join(models, 'm.gguf'), roots)).toBe(join(models, 'm.gguf'));
    expect(await confinePath('p', join(state, 'cache', 'new', 'dir'), roots)).toBe(join(state, 'cache', 'new', 'dir'));
    expect(await confinePath('p', join(state, 'in.gguf'), roots)).toBe(join(models, 'm.gguf')); // a link between roots
  });

  it.each([
    ['an absolute path elsewhere', () => join(outside, 'x')],
    ['`..` out of a root', () => join(models, '..', 'outside', 'x')],
    ['a symlink out of a root', () => join(models, 'out', 'x')],
    ['a prefix that is not a child', () => `${models}-evil/x`],
    ['the filesystem root', () => '/'],
  ])('refuses %s', async (_what, path) => {
    await expect(confinePath('cache_dir', path(), roots)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringMatching(/outside this node's roots/) });
  });

  it('holds an all-local head model to the budget, not one split over rpc-servers', async () => {
    const llama = { modelPath: join(models, 'm.gguf'), context: 512 };
    const local = engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', llama });
    await expect(confineEngineSpec(local, roots, 50)).rejects.toThrow(/over this node's budget of 50 bytes/);
    expect((await confineEngineSpec(local, roots, 100)).llama?.modelPath).toBe(join(models, 'm.gguf'));
    const split = engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...llama, rpc: [{ nodeId: 'w', enginePort: 1 }] } });
    expect((await confineEngineSpec(split, roots, 50)).llama?.rpc).toEqual([{ nodeId: 'w', enginePort: 1 }]);
  });
});

describe('removed StartEngine fields on the wire', () => {
  const old = protobuf
    .parse('syntax = "proto3"; message Old { int32 kind = 1; string engine_id = 2; string bind_host = 3; repeated string args = 8; map<string, string> env = 11; uint64 big = 20; fixed32 f = 21; double d = 22; }')
    .root.lookupType('Old');
  const bytes = (o: Record<string, unknown>) => old.encode(old.fromObject(o)).finish();

  it('finds env, args and bind_host, and nothing in a request without them', () => {
    expect(removedStartEngineFields(bytes({ kind: 1, env: { LD_PRELOAD: '/x' } }))).toEqual(['env']);
    expect(removedStartEngineFields(bytes({ kind: 2, args: ['--log-file', '/x'], bindHost: '0.0.0.0' })).sort()).toEqual(['args', 'bind_host']);
    expect(removedStartEngineFields(bytes({ kind: 1, engineId: 'w', big: '18446744073709551615', f: 7, d: 1.5 }))).toEqual([]);
    expect([...topLevelFields(bytes({ kind: 1, engineId: 'w', big: '5', f: 7, d: 1.5 }))].sort((a, b) => a - b)).toEqual([1, 2, 20, 21, 22]);
  });
});
