import { spawn } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { generateKeyPairSync } from 'node:crypto';
import { SecretAudit } from '../helpers/secret-audit.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * The audit the other security files end with must be able to fail: a secret on a command line
 * while a process runs, a key line in a log and a token-shaped argument are each found.
 */
describe('SecretAudit finds what it is meant to find', () => {
  const dir = tempDir('orchard-audit-', 'each');

  it('a clean run has no findings; a secret in argv, a key line in a log, a token shape are each reported', async () => {
    await mkdir(join(dir.path, 'node', 'pki'), { recursive: true });
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const pem = privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    await writeFile(join(dir.path, 'node', 'pki', 'node.key'), pem, { mode: 0o600 });
    const token = `orchard1.0123456789ab.${'s'.repeat(32)}.${'c'.repeat(64)}`;
    const audit = new SecretAudit();
    audit.secret('join token', token);
    expect(await audit.keysUnder(dir.path)).toBe(1);
    const clean = { out: 'node ready\n', err: '' };
    audit.log('clean', clean);
    await audit.sample();
    expect(audit.findings().leaks).toEqual([]);

    const leaky = { out: '', err: `loaded key ${pem.split('\n')[1]}\n` };
    audit.log('leaky', leaky);
    const child = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 20000)', token], { stdio: 'ignore' });
    try {
      audit.start(100);
      await new Promise((r) => setTimeout(r, 600));
      await audit.stop();
    } finally {
      child.kill('SIGKILL');
    }
    const { leaks } = audit.findings();
    expect(leaks).toContainEqual({ secret: `${join(dir.path, 'node', 'pki', 'node.key')} (a line)`, where: 'log of leaky' });
    expect(leaks.some((l) => l.secret === 'join token' && l.where.startsWith('ps snapshot'))).toBe(true);
    expect(leaks.some((l) => l.secret === 'join token (secret part)')).toBe(true);
    expect(leaks.some((l) => l.secret === 'a join token')).toBe(true);
  });
});
