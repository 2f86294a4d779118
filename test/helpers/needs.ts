import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { describe, it } from 'vitest';
import { findNatsServer } from '../../src/coordinator/nats/server.ts';
import { findLlamaBinaries, type LlamaBinaries } from '../../src/node/llama/binaries.ts';
import { cacheRoot } from '../../src/shared/cache-dir.ts';

/*
 * What an integration test needs from the machine, and the one way to skip when it is missing:
 * the reason is recorded on the skipped suite (task meta), test/helpers/skip-report.ts prints one
 * line per reason at the end of the run, and in CI (CI=true) fails the run, because there a
 * skipped integration test is a missing install step, not a pass.
 */

declare module 'vitest' {
  interface TaskMeta {
    /** Why this suite or test did not run (set by describeWith / itWith). */
    skipReason?: string;
  }
}

export type Need<T = true> = { readonly ok: true; readonly value: T } | { readonly ok: false; readonly reason: string };

const met = <T>(value: T): Need<T> => ({ ok: true, value });
const unmet = (reason: string): Need<never> => ({ ok: false, reason });

/**
 * The per-user Orchard cache of the machine running the tests, where `orchard setup` put the
 * engines. Tests that give their children a private HOME or TMPDIR still pass this on as
 * ORCHARD_CACHE_DIR, so nothing builds llama.cpp anew or misses the engines.
 */
export const SHARED_CACHE = cacheRoot(process.env, process.platform, homedir());

/** llama-server and ggml-rpc-server, as `orchard setup` built them (or ORCHARD_LLAMA_BIN_DIR names them). */
export async function llamaEngines(env: NodeJS.ProcessEnv = process.env): Promise<Need<LlamaBinaries>> {
  try {
    return met(await findLlamaBinaries(env));
  } catch (err) {
    return unmet(`llama.cpp engines: ${(err as Error).message}`);
  }
}

/** A program that runs (`name args` exits 0). */
export function program(name: string, args: readonly string[] = ['-V']): Need<string> {
  try {
    execFileSync(name, args, { stdio: 'ignore' });
    return met(name);
  } catch {
    return unmet(`\`${name}\` is not installed (.ci/run installs it)`);
  }
}

/** Debian's Chromium (or ORCHARD_CHROMIUM) for the console tests; playwright-core drives it, no browser download. */
export function chromiumBrowser(): Need<string> {
  const path = [process.env.ORCHARD_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p): p is string => !!p && existsSync(p));
  return path ? met(path) : unmet('no chromium (apt-get install chromium)');
}

/** Network namespaces: root, and an `ip` that can list them. */
export function networkNamespaces(): Need {
  if (process.getuid?.() !== 0) return unmet('network namespaces need root (ip netns needs CAP_SYS_ADMIN)');
  try {
    execFileSync('ip', ['netns', 'list'], { stdio: 'ignore' });
    return met(true);
  } catch {
    return unmet('the `ip` command (iproute2) cannot list network namespaces');
  }
}

function reasons(needs: readonly Need<unknown>[]): string | undefined {
  const missing = needs.flatMap((n) => (n.ok ? [] : [n.reason]));
  return missing.length > 0 ? missing.join('; ') : undefined;
}

/** describe(), or — when a need is unmet — the same suite skipped with the reason recorded. */
export function describeWith(needs: readonly Need<unknown>[], name: string, fn: () => void): void {
  const reason = reasons(needs);
  if (reason === undefined) describe(name, fn);
  else describe(name, { skip: true, meta: { skipReason: reason } }, fn);
}

/** it(), or — when a need is unmet — the same test skipped with the reason recorded. */
export function itWith(needs: readonly Need<unknown>[], name: string, fn: () => Promise<void>, timeout?: number): void {
  const reason = reasons(needs);
  if (reason === undefined) it(name, fn, timeout);
  else it(name, { skip: true, meta: { skipReason: reason } }, fn);
}

/** A `nats-server` binary (PATH, ~/go/bin, $ORCHARD_NATS_SERVER), as the coordinator itself finds it. */
export function natsServer(env: NodeJS.ProcessEnv = process.env): Need<string> {
  const found = findNatsServer(env);
  return found ? met(found) : unmet('`nats-server` is not installed (.ci/run installs it; or `orchard setup --nats`)');
}
