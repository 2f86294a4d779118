import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NATS_INCLUDE_FILE } from '../../src/coordinator/nats/auth.ts';
import { type LocalNats, startLocalNats } from '../../src/coordinator/nats/server.ts';
import { orchard } from './processes.ts';

/**
 * A real `nats-server -js` for a test, started by the coordinator's own launcher (config and store
 * in a fresh directory, a free port on 127.0.0.1); `stop` kills it and removes the directory.
 * `include`: a file its config includes, as a user's server includes `orchard coordinator
 * nats-config`'s orchard.conf (natsConfigFiles).
 */
export async function testNats(binary: string, o: { serverName?: string; cluster?: { name: string; port: number; routes: string[] }; port?: number; include?: string } = {}): Promise<LocalNats & { dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'orchard-nats-'));
  const server = await startLocalNats({ stateDir: dir, binary, ...o });
  return {
    ...server,
    dir,
    async stop() {
      await server.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * `orchard coordinator nats-config --state-dir S --out DIR`, run as a user runs it (the CLI, a
 * child process): the `orchard.conf` a server includes, and what the command printed.
 */
export async function natsConfigFiles(stateDir: string, outDir: string, env: NodeJS.ProcessEnv = process.env): Promise<{ include: string; stdout: string }> {
  const r = await orchard(['coordinator', 'nats-config', '--state-dir', stateDir, '--out', outDir], env);
  if (r.code !== 0) throw new Error(`orchard coordinator nats-config failed: ${r.stderr}`);
  return { include: join(outDir, NATS_INCLUDE_FILE), stdout: r.stdout };
}
