import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ensureDemoModel } from '../../src/cli/demo-model.ts';
import { ORCHARD_BIN } from '../../src/cli/local-cluster.ts';
import { describeWith, itWith, llamaEngines, program, SHARED_CACHE } from '../helpers/needs.ts';
import { pidsWithMarker } from '../helpers/processes.ts';

/*
 * `orchard up` (coordinator + local agent in one process) and `orchard chat` over its OpenAI
 * API: a scripted two-turn chat must send the history (the second answer equals a direct API
 * call with the same messages), and SIGTERM must leave no process behind.
 */

const engines = await llamaEngines();
const tmuxInstalled = program('tmux');
const env: NodeJS.ProcessEnv = { ...process.env };

const marker = `up-${randomUUID()}`;
let tmp = '';
let up: ChildProcess | undefined;
let upExit: Promise<number | null> | undefined;
let url = '';

function run(args: string[], input: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [ORCHARD_BIN, ...args], { env: { ...env, ORCHARD_TEST_MARKER: marker }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    c.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d;
    });
    c.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
    });
    c.stdin.end(input);
    c.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describeWith([engines], 'orchard up + orchard chat', () => {
  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'orchard-up-'));
    Object.assign(env, { HOME: tmp, XDG_STATE_HOME: join(tmp, 'state'), ORCHARD_CACHE_DIR: SHARED_CACHE, ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_RPC_THREADS: '1' });
    up = spawn(process.execPath, [ORCHARD_BIN, 'up', '--json', '--grpc-port', '0', '--http-port', '0', '--agent-port', '0', '--metrics-port', '0', '--no-mdns', '--agent-address', '127.0.0.1', '--budget', '2GiB'], {
      env: { ...env, ORCHARD_TEST_MARKER: marker },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true,
    });
    upExit = new Promise((r) => up!.once('exit', (code) => r(code)));
    const ready = await new Promise<Record<string, unknown>>((resolve, reject) => {
      let buf = '';
      up!.stdout!.setEncoding('utf8').on('data', (d: string) => {
        buf += d;
        const line = buf.split('\n').find((l) => l.includes('"ready"'));
        if (line) resolve(JSON.parse(line) as Record<string, unknown>);
      });
      up!.once('exit', (code) => reject(new Error(`orchard up exited with ${code}`)));
    });
    url = `http://127.0.0.1:${String(ready.httpPort)}`;
    const model = (await ensureDemoModel(env)).path;
    const res = await fetch(`${url}/v1/cluster/models`, { method: 'POST', body: JSON.stringify({ model, name: 'tiny', ctx: 1024 }) });
    expect(res.status, await res.clone().text()).toBe(200);
  });

  afterAll(async () => {
    if (up?.pid && up.exitCode === null) {
      try {
        process.kill(-up.pid, 'SIGKILL');
      } catch {}
    }
    for (const pid of await pidsWithMarker(marker)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {}
    }
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('chat keeps the history across turns and exits on /exit', async () => {
    const r = await run(['chat', '--url', url, '--temperature', '0', '--max-tokens', '8'], 'Hello there\nTell me more\n/exit\nnot sent\n');
    expect(r.code, r.stderr).toBe(0);
    const client = new OpenAI({ baseURL: `${url}/v1`, apiKey: 'none', maxRetries: 0 });
    const first = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hello there' }], max_tokens: 8, temperature: 0 });
    const firstText = first.choices[0]!.message.content!;
    const second = await client.chat.completions.create({
      model: 'tiny',
      messages: [
        { role: 'user', content: 'Hello there' },
        { role: 'assistant', content: firstText },
        { role: 'user', content: 'Tell me more' },
      ],
      max_tokens: 8,
      temperature: 0,
    });
    expect(r.stdout).toBe(`${firstText}\n${second.choices[0]!.message.content}\n`);
  });

  itWith([tmuxInstalled], 'chat in a terminal: prompt, streamed answer, /exit', async () => {
    const socket = join(tmp, 'tmux.sock'); // in the test's temp dir: nothing outlives the run
    const tmux = (...a: string[]) => execFileSync('tmux', ['-S', socket, ...a], { encoding: 'utf8' });
    const screen = () => tmux('capture-pane', '-p', '-J', '-S', '-', '-t', 'c');
    const until = async (re: RegExp) => {
      const t0 = Date.now();
      while (!re.test(screen())) {
        if (Date.now() - t0 > 30_000) throw new Error(`timed out waiting for ${re}: ${screen()}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    const envs = Object.entries({ ORCHARD_TEST_MARKER: marker, HOME: tmp }).map(([k, v]) => `${k}=${v}`).join(' ');
    tmux('new-session', '-d', '-s', 'c', '-x', '120', '-y', '40', `env ${envs} ${process.execPath} ${ORCHARD_BIN} chat --url ${url} --temperature 0 --max-tokens 6; echo EXIT:$?; sleep 30`);
    try {
      await until(/chatting with tiny at http:\/\/127\.0\.0\.1:\d+ — \/exit to leave/);
      await until(/^› $/m);
      tmux('send-keys', '-t', 'c', 'Hello there', 'Enter');
      await until(/^› Hello there\n.+\n\n› $/m);
      tmux('send-keys', '-t', 'c', '/exit', 'Enter');
      await until(/EXIT:0/);
    } finally {
      try {
        tmux('kill-server');
      } catch {}
    }
  });

  it('chat with an unknown model fails with one line and exit 1', async () => {
    const r = await run(['chat', '--url', url, '--model', 'nope'], '');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^orchard: no model named "nope" \(loaded: tiny\)\n$/);
  });

  it('SIGTERM stops the coordinator, the agent and its engines', async () => {
    process.kill(up!.pid!, 'SIGTERM');
    expect(await upExit).toBe(0);
    await new Promise((r) => setTimeout(r, 500));
    expect(await pidsWithMarker(marker)).toEqual([]);
  });
});
