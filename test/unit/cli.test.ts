import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it, vi } from 'vitest';
import { runCli } from '../../src/cli/program.ts';

const run = promisify(execFile);
const BIN = new URL('../../bin/orchard.js', import.meta.url).pathname;

async function orchard(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [BIN, ...args]);
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

async function inProcess(...args: string[]): Promise<{ code: number; stdout: string }> {
  let stdout = '';
  const spy = vi.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => {
    stdout += String(chunk);
    return true;
  });
  try {
    return { code: await runCli(args), stdout };
  } finally {
    spy.mockRestore();
  }
}

describe('orchard CLI conventions', () => {
  it('prints help and exits 0', async () => {
    const r = await orchard('--help');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('Usage: orchard');
  });

  it('exits 2 on an unknown command with one line, no stack', async () => {
    const r = await orchard('no-such-command');
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n').length).toBeLessThanOrEqual(2);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  // Each command's help is checked in-process: spawning ~20 CLIs took 120 s at load average 20+
  // on two cores. One spawned `<command> --help` still covers the binary's own path.
  it('every command has --help', async () => {
    const r = await orchard('--help');
    const commands = [...r.stdout.matchAll(/^ {2}(\w[\w-]*)/gm)].map((m) => m[1]!).filter((c) => c !== 'help');
    expect(commands.length).toBeGreaterThan(0);
    const spawned = await orchard(commands[0]!, '--help');
    expect(spawned.code).toBe(0);
    expect(spawned.stdout).toContain(`Usage: orchard ${commands[0]}`);
    for (const c of commands) {
      const h = await inProcess(c, '--help');
      expect(h.code, c).toBe(0);
      expect(h.stdout, c).toContain(`Usage: orchard ${c}`);
    }
  });
});
