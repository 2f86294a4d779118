import { spawn } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import { PassThrough } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { PROBING, waitEngineReady } from '../../src/node/engine-readiness.ts';
import { listensOn, pickFreePort } from '../../src/node/ports.ts';

/**
 * The agent probes a starting llama-server on a timer and again when it logs the line it prints
 * as it starts to serve. A poll interval of a minute makes that line the only way these waits
 * can end inside the test's time; the server stands for llama-server's /health.
 */
const servers: Server[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => new Promise((r) => s.close(r))));
});

function serveHealth(port: number): Promise<void> {
  const srv = createServer((_req, res) => res.writeHead(200).end('{"status":"ok"}'));
  servers.push(srv);
  return new Promise((r) => srv.listen(port, '127.0.0.1', () => r()));
}

const minute = 60_000;
const settle = (ms: number) => new Promise((r) => setTimeout(r, ms));

function wait(port: number, gone: () => Error | undefined = () => undefined) {
  const stderr = new PassThrough();
  stderr.setEncoding('utf8');
  // This process stands for the engine: it serves the health endpoint.
  const ready = waitEngineReady({ kind: 'llama-server', host: '127.0.0.1', port, pid: process.pid, deadlineMs: Date.now() + 10 * minute, output: stderr, gone, timedOut: () => new Error('timed out'), pollMs: minute });
  return { stderr, ready };
}

describe('engine readiness', () => {
  it('probes again as soon as llama-server logs that the model is loaded, not at the next tick', async () => {
    const port = await pickFreePort('127.0.0.1');
    const { stderr, ready } = wait(port);
    await settle(100); // the first probe found nothing
    await serveHealth(port);
    stderr.write('srv  llama_server: model loaded\n');
    await expect(ready).resolves.toBeUndefined();
    expect(stderr.listenerCount('data')).toBe(0);
  });

  it('other output does not end the wait; a reason to stop does, at the next probe', async () => {
    const port = await pickFreePort('127.0.0.1');
    let reason: Error | undefined;
    const { stderr, ready } = wait(port, () => reason);
    await settle(100);
    await serveHealth(port);
    stderr.write('load_tensors: loading model tensors, this can take a while...\n');
    let settled = false;
    void ready.then(
      () => (settled = true),
      () => (settled = true),
    );
    await settle(200);
    expect(settled).toBe(false);
    reason = new Error('exited with code 1');
    stderr.write('srv  update_slots: all slots are idle\n');
    await expect(ready).rejects.toThrow('exited with code 1');
  });

  it('a port another process took is not the engine answering: no ready until the engine itself listens there', async () => {
    const port = await pickFreePort('127.0.0.1');
    await serveHealth(port); // the squatter: this process
    const engine = spawn('sleep', ['30'], { stdio: 'ignore' }); // an engine that has not bound its port
    try {
      expect(await listensOn(process.pid, port)).toBe(true);
      expect(await listensOn(engine.pid!, port)).toBe(false);
      expect(await listensOn(engine.pid!)).toBe(false);
      let reason: Error | undefined;
      const ready = waitEngineReady({ kind: 'rpc-server', host: '127.0.0.1', port, pid: engine.pid!, deadlineMs: Date.now() + minute, output: null, gone: () => reason, timedOut: () => new Error('timed out') });
      let settled = false;
      void ready.then(
        () => (settled = true),
        () => (settled = true),
      );
      await settle(300); // ~30 probes found something accepting: not the engine
      expect(settled).toBe(false);
      reason = new Error('the engine exited: its port was taken');
      await expect(ready).rejects.toThrow('its port was taken');
    } finally {
      engine.kill('SIGKILL');
    }
  });

  it('knows the lines this llama.cpp prints as it starts to serve; rpc-servers are polled fast instead', () => {
    const hint = PROBING['llama-server'].hint!;
    expect(['main: model loaded', 'srv  llama_server: listening on http://127.0.0.1:1', 'srv  update_slots: all slots are idle'].every((l) => hint.test(l))).toBe(true);
    expect(hint.test('load_tensors: offloading 12 repeating layers')).toBe(false);
    expect(PROBING['rpc-server'].hint).toBeUndefined();
    expect(PROBING['rpc-server'].pollMs).toBeLessThan(PROBING['llama-server'].pollMs);
  });
});
