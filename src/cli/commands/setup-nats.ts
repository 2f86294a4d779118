import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { findNatsServer } from '../../coordinator/nats/server.ts';
import { cacheRoot } from '../../shared/cache-dir.ts';
import { OrchardError } from '../../shared/errors.ts';
import type { Logger } from '../../shared/log.ts';

const run = promisify(execFile);

/** The nats-server release `orchard setup --nats` builds (JetStream KV, the 2.x client protocol). */
export const NATS_SERVER_MODULE = 'github.com/nats-io/nats-server/v2@v2.15.2';

export interface NatsSetupOutput {
  readonly binary: string;
  readonly version: string;
  /** built: `go install` now; found: already installed (PATH, Homebrew, Debian, ~/go/bin, the cache). */
  readonly source: 'built' | 'found';
  readonly seconds: number;
}

/**
 * The NATS part of `orchard setup`: with --nats, find a nats-server or build one with Go into
 * Orchard's cache `bin/` (where the coordinator looks); without it, only report one. Go fetches
 * the module through its own proxy and checksum database, so the build is what the tag says.
 */
export async function setupNats(create: boolean, force: boolean, log: Logger): Promise<NatsSetupOutput | null> {
  const t0 = Date.now();
  const existing = force ? undefined : findNatsServer();
  if (existing) return { binary: existing, version: await natsVersion(existing), source: 'found', seconds: 0 };
  if (!create) return null;
  const go = await run('go', ['version']).catch(() => undefined);
  if (!go) throw new OrchardError('`orchard setup --nats` builds nats-server with Go, which is not installed: install Go (https://go.dev/dl), or `brew install nats-server` on macOS, `apt install nats-server` on Debian');
  const bin = join(cacheRoot(process.env, process.platform, homedir()), 'bin');
  await mkdir(bin, { recursive: true });
  log.info({ phase: 'nats', module: NATS_SERVER_MODULE }, `building nats-server with ${go.stdout.trim()}`);
  await run('go', ['install', NATS_SERVER_MODULE], { env: { ...process.env, GOBIN: bin, CGO_ENABLED: '0' }, maxBuffer: 16 << 20 });
  const binary = join(bin, 'nats-server');
  return { binary, version: await natsVersion(binary), source: 'built', seconds: (Date.now() - t0) / 1000 };
}

async function natsVersion(binary: string): Promise<string> {
  const out = await run(binary, ['--version']).catch(() => undefined);
  return /v?(\d+\.\d+\.\d+)/.exec(out?.stdout ?? '')?.[1] ?? 'unknown';
}

export function describeNats(n: NatsSetupOutput | null): string {
  if (!n) return 'NATS: no nats-server (coordinators keep their state in the state dir; `orchard setup --nats` builds one)\n';
  const how = n.source === 'built' ? `built in ${n.seconds.toFixed(1)}s` : 'installed';
  return `nats-server ${n.version} (${how})\n  nats-server      ${n.binary}\n`;
}
