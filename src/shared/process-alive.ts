/**
 * Whether a process with this pid exists. EPERM means it exists but belongs to someone else —
 * alive for every caller here (stale-lock takeover, keeper checks), which must never reuse a
 * live process's lock or port.
 */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
