import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FileInstanceStore } from '../../src/coordinator/state/instance-store.ts';
import { checkStoreContract, sampleRecord } from '../helpers/instance-store-contract.ts';
import { tempDir } from '../helpers/temp-dir.ts';

describe('FileInstanceStore (the embedded default: instances.json in the state dir)', () => {
  const dir = tempDir('orchard-store-');

  it('keeps the store contract: round trip, compare-and-set on revision, deletes, nodes', async () => {
    await checkStoreContract(new FileInstanceStore(dir.path), async () => new FileInstanceStore(dir.path));
  });

  it('writes atomically (no temporary file left), 0600, and concurrent writes of one process all land', async () => {
    const store = new FileInstanceStore(dir.path);
    await Promise.all(['a', 'b', 'c', 'd'].map((n) => store.putInstance(sampleRecord(n), 0)));
    expect((await readdir(dir.path)).sort()).toEqual(['instances.json']);
    expect((await stat(join(dir.path, 'instances.json'))).mode & 0o777).toBe(0o600);
    expect((await new FileInstanceStore(dir.path).instances()).map((v) => v.value.name).sort()).toEqual(['a', 'b', 'c', 'd']);
  });

  it('skips a record that no longer parses, naming it, and keeps the others', async () => {
    await new FileInstanceStore(dir.path).putInstance(sampleRecord('good'), 0);
    const path = join(dir.path, 'instances.json');
    const file = JSON.parse(await readFile(path, 'utf8')) as { instances: Record<string, unknown> };
    file.instances.bad = { revision: 1, value: { name: 'bad', engines: [] } };
    await writeFile(path, JSON.stringify(file));
    const invalid: string[] = [];
    const got = await new FileInstanceStore(dir.path, (key) => invalid.push(key)).instances();
    expect(got.map((v) => v.value.name)).toEqual(['good']);
    expect(invalid).toEqual(['instances/bad']);
  });

  it('refuses a file that is not JSON with one line saying what to do', async () => {
    await writeFile(join(dir.path, 'instances.json'), '{"version":1,');
    await expect(new FileInstanceStore(dir.path).instances()).rejects.toThrow(/instances\.json is not valid JSON .*move it away/);
  });
});
