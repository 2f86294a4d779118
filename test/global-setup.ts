import { execFileSync } from 'node:child_process';

/**
 * After the whole suite: no engine, server or agent a test started may still be alive. A leak
 * fails the run (the teardown throws) and names the processes. Processes already running when
 * the suite started (someone else's) are ignored.
 */
const PATTERN =
  '(^|/)(ggml-rpc-server|llama-server|nats-server|prometheus)( |$)|mlx_worker|orchard(\\.js)? (node|coordinator|up|demo)';

function survivors(): Map<number, string> {
  try {
    const out = execFileSync('pgrep', ['-a', '-f', PATTERN], { encoding: 'utf8' });
    const found = new Map<number, string>();
    for (const line of out.split('\n')) {
      const pid = Number.parseInt(line, 10);
      if (line.trim() && !line.includes('pgrep') && pid !== process.pid) found.set(pid, line);
    }
    return found;
  } catch {
    return new Map(); // pgrep exits 1 when nothing matches
  }
}

export function setup(): () => Promise<void> {
  const before = new Set(survivors().keys());
  return async () => {
    const fresh = () => [...survivors()].filter(([pid]) => !before.has(pid)).map(([, line]) => line);
    // Engines get up to 5 s to notice their parent is gone.
    const deadline = Date.now() + 6000;
    let left = fresh();
    while (left.length > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 250));
      left = fresh();
    }
    if (left.length > 0) throw new Error(`processes outlived the test run:\n${left.join('\n')}`);
  };
}
