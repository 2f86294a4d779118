import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { promisify } from 'node:util';
import type { Logger } from '../../shared/log.ts';
import { TUNNEL_RELAY_SOURCE, tunnelRelayPath } from '../../node/tunnel/native-forwarder.ts';

const run = promisify(execFile);

export interface TunnelRelaySetupOutput {
  /** The native relay agents use for their tunnels' head side, or null: Go is not installed, agents use the Node relay. */
  readonly binary: string | null;
  readonly source: 'built' | 'cache' | 'no-go';
}

/**
 * The tunnel part of `orchard setup`: build the native tunnel relay (native/tunnel-relay, Go
 * standard library only, nothing fetched) into the cache when Go is installed. Optional by design:
 * without it agents relay in Node, which is slower on loads (bench:tunnel) but equally secure.
 */
export async function setupTunnelRelay(force: boolean, log: Logger): Promise<TunnelRelaySetupOutput> {
  const binary = tunnelRelayPath();
  if (!force && existsSync(binary)) return { binary, source: 'cache' };
  const go = await run('go', ['version']).catch(() => undefined);
  if (!go) return { binary: null, source: 'no-go' };
  log.info({ phase: 'tunnel-relay' }, `building the native tunnel relay with ${go.stdout.trim()}`);
  await run('go', ['build', '-trimpath', '-o', binary, '.'], { cwd: TUNNEL_RELAY_SOURCE, env: { ...process.env, CGO_ENABLED: '0', GOFLAGS: '-mod=mod' }, maxBuffer: 16 << 20 });
  return { binary, source: 'built' };
}

export function describeTunnelRelay(t: TunnelRelaySetupOutput): string {
  if (!t.binary) return 'tunnel relay: Node (Go is not installed; with Go, `orchard setup` builds the faster native relay)\n';
  return `tunnel relay: native (${t.source === 'built' ? 'built' : 'cached'})\n  orchard-tunnel-relay ${t.binary}\n`;
}
