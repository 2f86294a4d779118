import { execFileSync, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeWith, program } from '../helpers/needs.ts';
import { ORCHARD_BIN } from '../../src/cli/local-cluster.ts';
import { DEMO_SHAPE } from '../../src/cli/demo-model.ts';
import { encodeGgufHeader } from '../../src/shared/gguf/writer.ts';
import { llamaTestModelSpec } from '../../src/shared/testmodel/llama.ts';
import { loadVocab } from '../../src/shared/testmodel/vocab.ts';

/*
 * The CLI as a person sees it: commands run in a real pseudo-terminal (tmux, on a private
 * socket this file owns and kills), the screen captured and checked for layout and exit codes.
 */

/** The tmux socket lives in this file's temp dir, so nothing of it outlives the run. */
const socket = () => join(tmp, 'tmux.sock');
let tmp = '';
let n = 0;
const children: number[] = [];

/** Run `orchard ARGS` in a 160×50 terminal; return the screen text and the exit code. */
async function inPty(args: string[], env: Record<string, string> = {}): Promise<{ screen: string; code: number }> {
  const name = `s${n++}`;
  const envs = Object.entries({ ORCHARD_CONFIG: join(tmp, 'none.json'), ...env }).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(' ');
  const cmd = `env ${envs} ${JSON.stringify(process.execPath)} ${JSON.stringify(ORCHARD_BIN)} ${args.map((a) => JSON.stringify(a)).join(' ')}; echo "EXIT:$?"; sleep 60`;
  execFileSync('tmux', ['-S', socket(), 'new-session', '-d', '-s', name, '-x', '160', '-y', '50', cmd]);
  const t0 = Date.now();
  for (;;) {
    const screen = execFileSync('tmux', ['-S', socket(), 'capture-pane', '-p', '-J', '-S', '-', '-t', name], { encoding: 'utf8' });
    const m = /EXIT:(\d+)/.exec(screen);
    if (m) {
      execFileSync('tmux', ['-S', socket(), 'kill-session', '-t', name]);
      return { screen: screen.slice(0, m.index).trimEnd(), code: Number(m[1]) };
    }
    if (Date.now() - t0 > 30_000) throw new Error(`timed out: ${screen}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describeWith([program('tmux')], 'CLI in a pseudo-terminal', () => {
  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'orchard-pty-'));
    await writeFile(join(tmp, 'none.json'), '{}');
    // A session that lives as long as this file: tmux exits once its last session is killed, and a
    // new-session sent while it exits fails with "server exited unexpectedly" (CI hit that between
    // two tests). With this one open the server stays up until afterAll's kill-server.
    execFileSync('tmux', ['-S', socket(), 'new-session', '-d', '-s', 'keep', 'sleep 3600']);
  });
  afterAll(async () => {
    try {
      execFileSync('tmux', ['-S', socket(), 'kill-server'], { stdio: 'ignore' });
    } catch {}
    for (const pid of children) {
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {}
    }
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('--help lists every command, exit 0', async () => {
    const { screen, code } = await inPty(['--help']);
    expect(code).toBe(0);
    for (const c of ['setup', 'node', 'coordinator', 'status', 'load', 'plan', 'demo', 'up', 'chat']) expect(screen).toMatch(new RegExp(`^\\s+${c}\\b`, 'm'));
    expect(screen).toMatch(/--config <file>/);
  });

  it.each(['demo', 'up', 'chat'])('%s --help shows examples, exit 0', async (c) => {
    const { screen, code } = await inPty([c, '--help']);
    expect(code).toBe(0);
    expect(screen).toMatch(new RegExp(`^Usage: orchard ${c}`, 'm'));
    expect(screen).toMatch(/^Examples:\n\s+\$ orchard /m);
  });

  it('an unknown flag is a usage error: exit 2', async () => {
    const { screen, code } = await inPty(['demo', '--frobnicate']);
    expect(code).toBe(2);
    expect(screen).toMatch(/unknown option '--frobnicate'/);
  });

  it('plan prints an aligned table with human units; a plan that does not fit exits 1', async () => {
    const model = join(tmp, 'demo.gguf');
    await writeFile(model, encodeGgufHeader(llamaTestModelSpec(DEMO_SHAPE, await loadVocab())).headerBytes);
    const nodes = join(tmp, 'nodes.json');
    const GiB = 2 ** 30;
    await writeFile(nodes, JSON.stringify([{ name: 'studio', memoryBytes: 64 * GiB, budgetBytes: 48 * GiB, bandwidthBytesPerSecond: 800e9 }]));
    const ok = await inPty(['plan', model, '--nodes', nodes, '--ctx', '1024']);
    expect(ok.code).toBe(0);
    const rows = ok.screen.split('\n').filter((l) => /^[┌│├└]/.test(l));
    expect(rows.length).toBeGreaterThanOrEqual(5);
    expect(new Set(rows.map((l) => [...l].length)).size).toBe(1);
    expect(ok.screen).toMatch(/│\s+0 │ studio\s+│ head/);
    expect(ok.screen).toMatch(/predicted: \d+\.\d tok\/s/);
    await writeFile(nodes, JSON.stringify([{ name: 'tiny', memoryBytes: GiB, budgetBytes: 100 * 2 ** 20, bandwidthBytesPerSecond: 100e9 }]));
    const no = await inPty(['plan', model, '--nodes', nodes, '--ctx', '1024']);
    expect(no.code).toBe(1);
    expect(no.screen).toMatch(/DOES NOT FIT/);
  });

  it('status shows the node table; an unreachable coordinator is one line and exit 1', async () => {
    const coord = spawn(process.execPath, [ORCHARD_BIN, 'coordinator', '--json', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--no-mdns', '--state-dir', join(tmp, 'c')], {
      stdio: ['ignore', 'pipe', 'ignore'],
      detached: true,
    });
    children.push(coord.pid!);
    const ready = await new Promise<{ grpcPort: number }>((resolve) => {
      coord.stdout.setEncoding('utf8').on('data', (d: string) => resolve(JSON.parse(d.split('\n')[0]!) as { grpcPort: number }));
    });
    // The node joins with a real token (read from a file: never on a command line), then starts.
    const { writeFile } = await import('node:fs/promises');
    const tok = await inPty(['coordinator', 'token', '--uses', '1', '--state-dir', join(tmp, 'c')]);
    expect(tok.code).toBe(0);
    const token = /^orchard1\.\S+$/m.exec(tok.screen)![0];
    await writeFile(join(tmp, 'token'), `${token}\n`, { mode: 0o600 });
    const join_ = await inPty(['cluster', 'join', `127.0.0.1:${ready.grpcPort}`, '--token-file', join(tmp, 'token'), '--state-dir', join(tmp, 'n')]);
    expect(join_.code).toBe(0);
    expect(join_.screen).toMatch(/^joined cluster [0-9a-f-]{36} as node [0-9a-f-]{36}$/m);
    const node = spawn(process.execPath, [ORCHARD_BIN, 'node', '--json', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--no-mdns', '--name', 'pty-node', '--budget', '3GiB', '--state-dir', join(tmp, 'n'), '--join', `127.0.0.1:${ready.grpcPort}`], {
      stdio: ['ignore', 'pipe', 'ignore'],
      detached: true,
    });
    children.push(node.pid!);
    await new Promise<void>((resolve) => {
      node.stdout.setEncoding('utf8').on('data', () => resolve());
    });
    // The agent announces itself right after its ready line.
    await new Promise((r) => setTimeout(r, 1500));
    const st = await inPty(['status', '--coordinator', `127.0.0.1:${ready.grpcPort}`], { ORCHARD_COORDINATOR_STATE_DIR: join(tmp, 'c') });
    expect(st.code).toBe(0);
    expect(st.screen).toMatch(/^cluster [0-9a-f-]{36}$/m);
    const rows = st.screen.split('\n').filter((l) => /^[┌│├└]/.test(l));
    expect(new Set(rows.map((l) => [...l].length)).size).toBe(1);
    expect(st.screen).toMatch(/│ pty-node │ up\s+│ 127\.0\.0\.1:\d+ │.*│ 3\.0 GiB │ [\d.]+ GB\/s │ (?:[\d.]+ GB\/s|-)\s+│ join │/);
    for (const pid of [node.pid!, coord.pid!]) process.kill(pid, 'SIGTERM');
    const down = await inPty(['status', '--coordinator', '127.0.0.1:1'], { ORCHARD_COORDINATOR_STATE_DIR: join(tmp, 'c') });
    expect(down.code).toBe(1);
    expect(down.screen.split('\n').filter(Boolean)).toHaveLength(1);
    expect(down.screen).toMatch(/^orchard: cannot reach the coordinator at 127\.0\.0\.1:1/);
  });
});
