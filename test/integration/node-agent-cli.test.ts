import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NodeAgent } from '../../src/node/agent.ts';
import { probeHardware, readLiveStats } from '../../src/node/hardware/probe.ts';
import { findLlamaBinaries } from '../../src/node/llama/binaries.ts';
import { createLogger } from '../../src/shared/log.ts';
import { enrollNode } from '../helpers/cluster-pki.ts';
import { AGENT_ENV, agentCa, agentClient, alive, freeListener, generate, grpcError, metricsText, runCli, startAgent, stopAll, track, unary, waitFor } from '../helpers/node-agent.ts';

/*
 * The node agent without engines: its CLI (argument errors, a port in use, an agent that never joined,
 * a stable id across restarts), profile changes pushed to Watch, and the watchdog that ends
 * engines when the agent is SIGKILLed. The engine half is node-agent-engines.test.ts.
 */

const ROOT = new URL('../..', import.meta.url).pathname;
let tmp = '';

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'orchard-node-agent-'));
});

afterAll(async () => {
  stopAll();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('orchard node CLI', () => {
  it('rejects invalid sizes, bandwidths and ports with one line and exit 2', async () => {
    for (const args of [
      ['--memory-limit', '12XB'],
      ['--budget', 'lots'],
      ['--bandwidth', '-3'],
      ['--grpc-port', '70000'],
      ['--bind', 'not-an-ip'],
    ]) {
      const r = await runCli(['node', '--no-mdns', '--state-dir', join(tmp, 'cli-bad'), ...args]);
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(r.stderr).toMatch(/^orchard: invalid/);
    }
  });

  it('a gRPC port in use is a one-line failure with exit 1', async () => {
    const taken = await freeListener();
    try {
      const port = (taken.address() as { port: number }).port;
      const r = await runCli(['node', '--no-mdns', '--bind', '127.0.0.1', '--grpc-port', String(port), '--metrics-port', '0', '--state-dir', join(tmp, 'cli-port')]);
      expect(r.code).toBe(1);
      // stderr carries pino JSON log lines plus exactly one human line: the error.
      const human = r.stderr.split('\n').filter((l) => l.trim() !== '' && !l.startsWith('{'));
      expect(human).toEqual([`orchard: gRPC port ${port} on 127.0.0.1 is already in use`]);
    } finally {
      taken.close();
    }
  });

  it('an agent that never joined serves nothing: every call UNAUTHENTICATED; a malformed token is a usage error', async () => {
    const agent = await startAgent(join(tmp, 'unjoined'), [], AGENT_ENV, { joined: false });
    try {
      const denied = await grpcError(unary(agent, 'describe', {}));
      expect(denied.code).toBe(grpc.status.UNAUTHENTICATED);
      expect(denied.details).toMatch(/has not joined a cluster/);
      const streamDenied = await grpcError(generate(agent, { engineId: 'x', prompt: 'x' }));
      expect(streamDenied.code).toBe(grpc.status.UNAUTHENTICATED);
    } finally {
      agent.client.close();
      agent.child.kill('SIGTERM');
      await agent.exited;
    }
    const bad = await runCli(['node', '--no-mdns', '--join', '127.0.0.1:1', '--state-dir', join(tmp, 'bad-token')], { ...AGENT_ENV, ORCHARD_NODE_TOKEN: 'orchard-test-token-0123456789' });
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/not an orchard1 join token/);
    const badHost = await runCli(['node', '--no-mdns', '--advertise-host', 'mac-2.local', '--state-dir', join(tmp, 'bad-host')]);
    expect(badHost.code).toBe(2);
    expect(badHost.stderr).toMatch(/invalid --advertise-host "mac-2.local"/);
  });

  it('a restart with the same state dir keeps the node id (seen in orchard_node_info)', async () => {
    const dir = join(tmp, 'restart');
    const ids: string[] = [];
    for (let i = 0; i < 2; i++) {
      const agent = await startAgent(dir, ['--name', 'restart-node', '--memory-limit', '8GiB', '--budget', '6GiB', '--bandwidth', '100']);
      const text = await metricsText(agent);
      const m = /^orchard_node_info\{id="([^"]+)",name="restart-node",chip="[^"]*",os="(linux|macos)",version="[^"]+"/m.exec(text);
      expect(m, text.slice(0, 2000)).not.toBeNull();
      ids.push(m![1]!);
      expect(m![1]).toBe(agent.ready.nodeId);
      // the overrides reach the profile and the gauges
      expect(text).toMatch(/^orchard_node_memory_bytes 8589934592$/m);
      expect(text).toMatch(/^orchard_node_budget_bytes 6442450944$/m);
      expect(text).toMatch(/^orchard_node_bandwidth_bytes_per_second 100000000000$/m);
      expect(text).toMatch(/^orchard_node_available_memory_bytes \d+/m);
      expect(text).toMatch(/^process_cpu_seconds_total /m);
      expect((await fetch(`http://127.0.0.1:${agent.ready.metricsPort}/healthz`)).status).toBe(200);
      agent.child.kill('SIGTERM');
      expect(await agent.exited).toEqual({ code: 0, signal: null });
      expect(agent.stdout).toContain('{"event":"stopped"');
    }
    expect(ids[0]).toBe(ids[1]);
    const other = await startAgent(join(tmp, 'restart-other'));
    expect(other.ready.nodeId).not.toBe(ids[0]);
    other.child.kill('SIGTERM');
    await other.exited;
  });
});

describe('profile changes (agent in-process)', () => {
  it('a re-probe that finds a change is pushed to Watch streams and metrics; shutdown ends the streams', async () => {
    // Hardware cannot change under a test, so the probe is the real one plus a mutable override.
    let budget = 6 * 2 ** 30;
    await enrollNode(join(tmp, 'inproc'), await agentCa());
    const agent = new NodeAgent({
      stateDir: join(tmp, 'inproc'),
      name: 'inproc',
      bindHost: '127.0.0.1',
      grpcPort: 0,
      metricsPort: 0,
      mdns: false,
      probe: (o) => probeHardware({ ...o, budgetBytes: budget }),
      readLive: readLiveStats,
      binaries: () => findLlamaBinaries(AGENT_ENV),
      log: createLogger('test', 'warn'),
      profileRefreshMs: 0,
    });
    const ready = await agent.start();
    const client = await agentClient(`127.0.0.1:${ready.grpcPort}`);
    try {
      const events: { event: string; profileChanged?: { budgetBytes: string } }[] = [];
      const watch = client.watch!({ intervalSeconds: 0.1 }) as grpc.ClientReadableStream<{ event: string }>;
      const ended = new Promise<void>((resolve) => watch.on('end', () => resolve()));
      watch.on('error', () => {});
      watch.on('data', (e: { event: string }) => events.push(e));
      await waitFor('first stats', () => events.length > 0 || undefined);
      expect(await agent.refreshProfile()).toBe(false); // nothing changed: no event
      budget = 5 * 2 ** 30;
      expect(await agent.refreshProfile()).toBe(true);
      const changed = await waitFor('profileChanged', () => events.find((e) => e.event === 'profileChanged'));
      expect(changed.profileChanged!.budgetBytes).toBe(String(5 * 2 ** 30));
      const text = await (await fetch(`http://127.0.0.1:${ready.metricsPort}/metrics`)).text();
      expect(text).toMatch(/^orchard_node_budget_bytes 5368709120$/m);
      await agent.stop();
      await ended; // the stream ends cleanly instead of erroring out
    } finally {
      client.close();
      await agent.stop();
    }
  });
});

describe('engine watchdog (the SIGKILL guarantee, without engines)', () => {
  it('kills registered processes when its owner is SIGKILLed: TERM first, KILL for those that ignore it', async () => {
    const script = join(tmp, 'watchdog-owner.ts');
    await writeFile(
      script,
      [
        `import { EngineWatchdog } from ${JSON.stringify(join(ROOT, 'src/node/watchdog.ts'))};`,
        'const [keep, ...pids] = process.argv.slice(2).map(Number);',
        'const w = new EngineWatchdog();',
        'w.add(keep!);',
        'w.remove(keep!);',
        'for (const p of pids) w.add(p);',
        "process.stdout.write('ready ' + w.pid + '\\n');",
        'setInterval(() => {}, 1000);',
      ].join('\n'),
    );
    // Stand-ins for engines, not children of the owner (so nothing but the watchdog can end them).
    const spawnSleeper = (cmd: string) => {
      const c = spawn('/bin/sh', ['-c', cmd], { detached: true, stdio: 'ignore' });
      track(c);
      return c.pid!;
    };
    const polite = spawnSleeper('exec sleep 300');
    const stubborn = spawnSleeper('trap "" TERM; exec sleep 300');
    const unrelated = spawnSleeper('exec sleep 300');
    const owner = spawn(process.execPath, ['--import', 'tsx', script, String(unrelated), String(polite), String(stubborn)], {
      cwd: ROOT,
      detached: true,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    track(owner);
    const line = await new Promise<string>((resolve) => owner.stdout!.on('data', (b: Buffer) => resolve(b.toString())));
    const watchdogPid = Number(/ready (\d+)/.exec(line)![1]);
    expect(alive(watchdogPid)).toBe(true);
    process.kill(owner.pid!, 'SIGKILL');
    const t0 = Date.now();
    await waitFor('polite engine gone', () => !alive(polite) || undefined, 5000);
    const politeMs = Date.now() - t0;
    // SIGTERM reached both; the one that ignores it is still there until the grace period ends.
    expect(alive(stubborn)).toBe(true);
    await waitFor('stubborn engine gone', () => !alive(stubborn) || undefined, 5000);
    const stubbornMs = Date.now() - t0;
    console.info(`watchdog: TERM-abiding process gone after ${politeMs} ms, TERM-ignoring after ${stubbornMs} ms`);
    // a pid that was deregistered (its engine exited; the pid could be recycled) is left alone
    expect(alive(unrelated)).toBe(true);
    await waitFor('watchdog exits', () => !alive(watchdogPid) || undefined, 5000);
    process.kill(unrelated, 'SIGKILL');
  });
});
