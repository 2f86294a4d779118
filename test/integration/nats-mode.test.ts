import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { connect } from '@nats-io/transport-node';
import { afterAll, expect } from 'vitest';
import { StateDir } from '../../src/coordinator/state/state-dir.ts';
import { natsClientTls } from '../../src/shared/pki/nats-tls.ts';
import { testNats } from '../helpers/nats.ts';
import { describeWith, itWith, natsServer } from '../helpers/needs.ts';
import { alive, killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, sleep, spawnProc } from '../helpers/processes.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * The three state modes of `orchard coordinator` (the same flags on `orchard up`), each started
 * the way a user would, and what `orchard status` says about each:
 *   --no-nats     instances.json in the state dir
 *   (default)     a local nats-server -js the coordinator starts on its state dir, and stops with
 *                 it — also when the coordinator is SIGKILLed (its keeper sees the pipe close)
 *   --nats URL    a NATS server someone else runs: left running when the coordinator goes
 */

const nats = natsServer();

interface Mode {
  backend: string;
  location: string;
  localServer: boolean;
}

describeWith([nats], 'coordinator state modes: file, local nats-server, --nats URL', () => {
  const dir = tempDir('orchard-nats-mode-', 'all');
  const procs: Proc[] = [];
  afterAll(async () => {
    await Promise.all(procs.splice(0).map(killGroup));
  });

  const env = (stateDir: string): NodeJS.ProcessEnv => ({ ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_COORDINATOR_STATE_DIR: stateDir });
  const coordinator = async (name: string, stateDir: string, extra: string[]) => {
    const p = spawnProc(name, [ORCHARD_BIN, 'coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--state-dir', stateDir, '--json', ...extra], env(stateDir));
    procs.push(p);
    const ready = await readyLine(p);
    return { p, addr: `127.0.0.1:${String(ready.grpcPort)}`, mode: ready.stateStore as Mode };
  };
  const status = async (addr: string, stateDir: string) => {
    const json = await orchard(['status', '--json', '--coordinator', addr], env(stateDir));
    expect(json.code, json.stderr).toBe(0);
    const table = await orchard(['status', '--coordinator', addr], env(stateDir));
    expect(table.code, table.stderr).toBe(0);
    return { mode: (JSON.parse(json.stdout) as { stateStore: Mode }).stateStore, text: table.stdout };
  };

  itWith([nats], '--no-nats keeps the state in instances.json, and status says so', async () => {
    const stateDir = join(dir.path, 'file');
    const c = await coordinator('coordinator file', stateDir, ['--no-nats']);
    expect(c.mode).toEqual({ backend: 'file', location: join(stateDir, 'instances.json'), localServer: false });
    const s = await status(c.addr, stateDir);
    expect(s.mode).toEqual(c.mode);
    expect(s.text).toContain(`state: file ${join(stateDir, 'instances.json')} (single coordinator, no NATS)`);
    await killGroup(c.p);
  }, 60_000);

  itWith([nats], 'by default starts a local nats-server on the state dir; SIGKILL of the coordinator leaves no nats-server; a restart reuses the store', async () => {
    const stateDir = join(dir.path, 'local');
    const c = await coordinator('coordinator local', stateDir, []);
    expect(c.mode.backend).toBe('nats');
    expect(c.mode.localServer).toBe(true);
    expect(c.mode.location).toMatch(/^nats:\/\/127\.0\.0\.1:\d+$/);
    const s = await status(c.addr, stateDir);
    expect(s.mode).toEqual(c.mode);
    expect(s.text).toContain(`state: NATS JetStream at ${c.mode.location} (local nats-server started by the coordinator)`);
    const pid = Number((await readFile(join(stateDir, 'nats', 'server.pid'), 'utf8')).trim());
    expect(alive(pid)).toBe(true);
    // The server holds the cluster's buckets, on the state dir's store; it admits only cluster
    // certificates (test/security/nats-auth.test.ts), so this reads them as a coordinator would.
    const nc = await connect({ servers: c.mode.location, tls: natsClientTls(await new StateDir(stateDir).coordinatorCredentials()) });
    const buckets = await nc.request('$JS.API.STREAM.NAMES', '{}').then((m) => m.json<{ streams: string[] | null }>());
    await nc.close();
    expect(buckets.streams?.some((s) => /^KV_orchard_.*_instances$/.test(s))).toBe(true);

    await killGroup(c.p); // SIGKILL: no clean-up code in the coordinator runs
    const deadline = Date.now() + 10_000;
    while (alive(pid) && Date.now() < deadline) await sleep(100);
    expect(alive(pid), 'nats-server outlived its coordinator').toBe(false);

    const again = await coordinator('coordinator local 2', stateDir, []);
    expect(again.mode.backend).toBe('nats');
    expect(again.mode.localServer).toBe(true);
    const pid2 = Number((await readFile(join(stateDir, 'nats', 'server.pid'), 'utf8')).trim());
    expect(pid2).not.toBe(pid);
    // SIGTERM: the coordinator stops its server on the way out.
    again.p.child.kill('SIGTERM');
    await again.p.exited;
    const deadline2 = Date.now() + 10_000;
    while (alive(pid2) && Date.now() < deadline2) await sleep(100);
    expect(alive(pid2)).toBe(false);
  }, 90_000);

  itWith([nats], '--nats URL uses that server and leaves it running; an unreachable URL refuses to start', async () => {
    const server = await testNats((nats as { value: string }).value);
    try {
      const stateDir = join(dir.path, 'url');
      const c = await coordinator('coordinator url', stateDir, ['--nats', server.url]);
      expect(c.mode).toEqual({ backend: 'nats', location: server.url, localServer: false });
      const s = await status(c.addr, stateDir);
      expect(s.text).toContain(`state: NATS JetStream at ${server.url}\n`);
      await killGroup(c.p);
      await sleep(500);
      expect(alive(server.pid)).toBe(true);

      const bad = await orchard(['coordinator', '--no-mdns', '--grpc-port', '0', '--http-port', '0', '--state-dir', join(dir.path, 'bad'), '--nats', 'nats://127.0.0.1:1'], env(join(dir.path, 'bad')));
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toContain('cannot reach NATS at nats://127.0.0.1:1');
    } finally {
      await server.stop();
    }
  }, 90_000);
});
