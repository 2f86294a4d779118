import type { Readable } from 'node:stream';
import type { EngineKind } from './engine-spec.ts';
import { canConnect, canConnectSocket, listensOn } from './ports.ts';

/**
 * When a llama.cpp engine the agent started can serve: an rpc-server once it accepts
 * connections, llama-server once /health answers 200 (503 while it loads the model). Every load
 * waits for this on each engine, so the poll's tick is paid on every load: an rpc-server is
 * probed every 10 ms (a loopback connect; its banner goes to stdout, block-buffered in a pipe,
 * so there is no line to wait for), llama-server every 100 ms (an HTTP request to a server busy
 * loading) and at once when it logs the line it prints as /health turns 200 (`hint`). What
 * answers must be the engine itself (`listensOn`): another process that took the engine's port
 * before the engine bound it accepts connections there too — the engine then dies of the taken
 * port (`gone`) and the caller starts it again on a fresh one (ports.ts `onceMoreIfPortTaken`).
 */
type LlamaEngineKind = Exclude<EngineKind, 'mlx-rank'>;

export const PROBING: Readonly<Record<LlamaEngineKind, { readonly pollMs: number; readonly hint?: RegExp }>> = {
  'rpc-server': { pollMs: 10 },
  'llama-server': { pollMs: 100, hint: /model loaded|listening on http|all slots are idle/ },
};

export interface ReadinessWait {
  readonly kind: LlamaEngineKind;
  readonly host: string;
  readonly port: number;
  /** The engine's process: the one that must be listening on `port`. */
  readonly pid: number;
  /**
   * An rpc-server's Unix-domain socket: probed instead of the port. It lies in the agent's 0700
   * directory, so only the agent's own engines can be listening there (no `listensOn`).
   */
  readonly socket?: string | undefined;
  readonly deadlineMs: number;
  /** The engine's stderr (utf8 strings): the hint lines are looked for here. */
  readonly output: Readable | null;
  /** A reason to stop waiting (the engine exited, was stopped): thrown as is. */
  readonly gone: () => Error | undefined;
  /** The error for a deadline that passed. */
  readonly timedOut: () => Error;
  /** Longest wait between probes without a hint (default: the kind's `PROBING.pollMs`; the first is half of it). */
  readonly pollMs?: number;
}

export async function waitEngineReady(w: ReadinessWait): Promise<void> {
  let wake: (() => void) | undefined;
  let hinted = false;
  const { hint } = PROBING[w.kind];
  const onOutput = (chunk: string | Buffer) => {
    if (!hint?.test(String(chunk))) return;
    hinted = true;
    wake?.();
  };
  if (hint) w.output?.on('data', onOutput);
  try {
    const poll = w.pollMs ?? PROBING[w.kind].pollMs;
    let delay = poll / 2;
    while (true) {
      const gone = w.gone();
      if (gone) throw gone;
      if (w.socket !== undefined ? await canConnectSocket(w.socket) : (await isAccepting(w.kind, w.host, w.port)) && (await listensOn(w.pid, w.port)) !== false) return;
      if (Date.now() >= w.deadlineMs) throw w.timedOut();
      // after the hint the engine is about to serve: probe again soon rather than on the slow tick
      if (hinted) delay = 10;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(delay, Math.max(0, w.deadlineMs - Date.now())));
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      wake = undefined;
      delay = Math.min(poll, delay * 2);
    }
  } finally {
    w.output?.off('data', onOutput);
  }
}

async function isAccepting(kind: LlamaEngineKind, host: string, port: number): Promise<boolean> {
  if (kind === 'rpc-server') return canConnect(host, port);
  try {
    const res = await fetch(`http://${host}:${port}/health`, { signal: AbortSignal.timeout(2000) });
    await res.body?.cancel();
    return res.status === 200;
  } catch {
    return false;
  }
}
