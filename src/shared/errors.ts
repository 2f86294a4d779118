/**
 * Errors a user may see. The CLI prints `message` as one line and exits with `exitCode`;
 * anything that is not an OrchardError is a bug and is printed with its stack only under --debug.
 */
export class OrchardError extends Error {
  readonly exitCode: number = 1;
  override readonly name: string = 'OrchardError';
}

/** Bad flags, arguments or input files: exit code 2, nothing changed. */
export class UsageError extends OrchardError {
  override readonly exitCode: number = 2;
  override readonly name: string = 'UsageError';
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
