import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type LocalNats, startLocalNats } from '../../src/coordinator/nats/server.ts';

/**
 * A real `nats-server -js` for a test, started by the coordinator's own launcher (config and store
 * in a fresh directory, a free port on 127.0.0.1); `stop` kills it and removes the directory.
 */
export async function testNats(binary: string, o: { serverName?: string; cluster?: { name: string; port: number; routes: string[] }; port?: number } = {}): Promise<LocalNats & { dir: string }> {
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
