import { vi } from 'vitest';
import { runCli } from '../../src/cli/program.ts';

/**
 * The CLI in this process: the same code path as bin/orchard.js minus process startup (about a
 * second of CPU per run on the 2-core CI machine), stdout and stderr captured. For tests of what
 * a command prints and its exit code; a file keeps at least one run through a real process too.
 * process.exitCode is the CLI's way to exit 1 (e.g. `orchard plan` when nothing fits): it is
 * cleared after each run, or the next run — and the test worker — would inherit it.
 */
export async function orchardInProcess(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const out = vi.spyOn(process.stdout, 'write').mockImplementation((chunk) => {
    stdout += String(chunk);
    return true;
  });
  const err = vi.spyOn(process.stderr, 'write').mockImplementation((chunk) => {
    stderr += String(chunk);
    return true;
  });
  try {
    const code = await runCli(args);
    return { code, stdout, stderr };
  } finally {
    out.mockRestore();
    err.mockRestore();
    process.exitCode = undefined;
  }
}
