import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeWith, networkNamespaces } from '../helpers/needs.ts';
import { deleteNamespaces, linkNamespaces } from '../helpers/netns.ts';

/*
 * Real mDNS between two network namespaces this test creates and deletes: the node agent runs
 * in one, a Bonjour browser in the other, joined by a veth pair. Nothing is sent on the host's
 * own interfaces: both processes live inside their namespaces and the test process itself does
 * no mDNS at all.
 */

const ROOT = new URL('../..', import.meta.url).pathname;
const BIN = join(ROOT, 'bin/orchard.js');

const netns = networkNamespaces();

const tag = randomBytes(3).toString('hex');
const NS_AGENT = `orch-a-${tag}`;
const NS_BROWSER = `orch-b-${tag}`;
const VETH_AGENT = `oa${tag}`; // interface names are at most 15 bytes
const VETH_BROWSER = `ob${tag}`;
const AGENT_IP = '10.77.0.1';
const BROWSER_IP = '10.77.0.2';

const children: ChildProcess[] = [];
let tmp = '';
let nsCreated = false;

interface Line {
  event: string;
  t: number;
  [k: string]: unknown;
}

/** A process inside a namespace whose stdout is JSON lines, collected as they come. */
function spawnInNs(ns: string, args: string[]): { child: ChildProcess; lines: Line[]; stderr: () => string; exited: Promise<number | null> } {
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, ...args], { cwd: ROOT, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  const lines: Line[] = [];
  let buf = '';
  let err = '';
  child.stdout?.on('data', (b: Buffer) => {
    buf += b.toString();
    let i = buf.indexOf('\n');
    while (i >= 0) {
      const l = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (l.startsWith('{')) lines.push({ t: Date.now(), ...(JSON.parse(l) as object) } as Line);
      i = buf.indexOf('\n');
    }
  });
  child.stderr?.on('data', (b: Buffer) => {
    err += b.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, lines, stderr: () => err, exited };
}

async function waitLine(lines: Line[], pred: (l: Line) => boolean, what: string, timeoutMs: number, stderr: () => string = () => ''): Promise<Line> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const hit = lines.find(pred);
    if (hit) return hit;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}; lines: ${JSON.stringify(lines)}\n${stderr().slice(-2000)}`);
}

// The browser: bonjour-service bound to 0.0.0.0 and sending through the veth address (no default
// route in the namespace), printing every sighting and goodbye with the time it happened; it
// then dials the agent's gRPC at the advertised address to prove discovery leads to control.
const BROWSER_SCRIPT = (root: string) => `
import { createRequire } from 'node:module';
// The script lives in a temp dir: resolve packages from the repository.
const require = createRequire(${JSON.stringify(join(root, 'package.json'))});
const { Bonjour } = require('bonjour-service');
const grpc = require('@grpc/grpc-js');
import { orchardV1 } from ${JSON.stringify(join(root, 'src/shared/proto.ts'))};
const print = (o) => process.stdout.write(JSON.stringify({ ...o, at: Date.now() }) + '\\n');
const bonjour = new Bonjour({ interface: ${JSON.stringify(BROWSER_IP)}, bind: '0.0.0.0' }, (e) => print({ event: 'error', message: String(e) }));
const browser = bonjour.find({ type: 'orchard' });
browser.on('up', (s) => {
  const txt = Object.fromEntries(Object.entries(s.txt ?? {}).map(([k, v]) => [k, String(v)]));
  print({ event: 'up', name: s.name, port: s.port, addresses: s.addresses, txt });
  const Client = orchardV1().NodeAgent;
  const c = new Client((s.addresses.find((a) => a.includes('.')) ?? s.addresses[0]) + ':' + s.port, grpc.credentials.createInsecure());
  c.describe({}, { deadline: Date.now() + 5000 }, (err, res) => {
    print(err ? { event: 'describe-error', message: err.message } : { event: 'described', nodeId: res.profile.nodeId });
    c.close();
  });
});
browser.on('down', (s) => print({ event: 'down', name: s.name }));
print({ event: 'browsing' });
process.on('SIGTERM', () => { browser.stop(); bonjour.destroy(() => process.exit(0)); });
`;

// A bare advertiser (no agent) whose profile changes on SIGUSR2: the re-announce path.
const ADVERTISER_SCRIPT = (root: string) => `
import { NodeAdvertiser } from ${JSON.stringify(join(root, 'src/node/advertise.ts'))};
import { createLogger } from ${JSON.stringify(join(root, 'src/shared/log.ts'))};
const print = (o) => process.stdout.write(JSON.stringify(o) + '\\n');
const profile = { nodeId: 'readvertise-${tag}', name: 'readvertise-${tag}', hostname: 'h', os: 'linux', osVersion: '6', chip: 'test chip',
  performanceCores: 1, efficiencyCores: 0, gpuCores: 0, memoryBytes: 1000, bandwidthBytesPerSecond: 1, wiredLimitBytes: 1000,
  budgetBytes: 111, engines: [], interfaces: [], protocolVersion: '1', agentVersion: '0' };
const adv = new NodeAdvertiser({ interfaceAddress: ${JSON.stringify(AGENT_IP)}, log: createLogger('adv', 'warn') });
adv.start(profile, 4242);
print({ event: 'ready' });
process.on('SIGUSR2', () => print({ event: 'updated', changed: adv.update({ ...profile, budgetBytes: 222 }, 4242), again: adv.update({ ...profile, budgetBytes: 222 }, 4242) }));
process.on('SIGTERM', () => adv.stop().then(() => process.exit(0)));
`;

beforeAll(async () => {
  if (!netns.ok) return;
  tmp = await mkdtemp(join(tmpdir(), 'orchard-mdns-'));
  await writeFile(join(tmp, 'browse.ts'), BROWSER_SCRIPT(ROOT));
  await writeFile(join(tmp, 'advertise.ts'), ADVERTISER_SCRIPT(ROOT));
  nsCreated = true;
  linkNamespaces({ ns: NS_AGENT, veth: VETH_AGENT, ip: AGENT_IP }, { ns: NS_BROWSER, veth: VETH_BROWSER, ip: BROWSER_IP });
});

afterAll(async () => {
  for (const c of children) {
    if (c.pid && c.exitCode === null && c.signalCode === null) {
      try {
        process.kill(-c.pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
  }
  if (nsCreated) deleteNamespaces(NS_AGENT, NS_BROWSER);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describeWith([netns], 'Bonjour advertisement between network namespaces', () => {
  it('a browser in another namespace finds the agent with its TXT within 1 s, reaches its gRPC, and sees the goodbye', async () => {
    const early = spawnInNs(NS_BROWSER, ['--import', 'tsx', join(tmp, 'browse.ts')]);
    await waitLine(early.lines, (l) => l.event === 'browsing', 'browser start', 20_000, early.stderr);

    const agent = spawnInNs(NS_AGENT, [
      BIN,
      'node',
      '--json',
      '--name',
      `mdns-node-${tag}`,
      '--grpc-port',
      '0',
      '--metrics-port',
      '0',
      '--bind',
      '0.0.0.0',
      '--mdns-interface',
      AGENT_IP,
      '--memory-limit',
      '64GiB',
      '--budget',
      '48GiB',
      '--bandwidth',
      '546',
      '--state-dir',
      join(tmp, 'state'),
    ]);
    const ready = await waitLine(agent.lines, (l) => l.event === 'ready', 'agent ready', 30_000, agent.stderr);

    // 1. The browser that was already listening hears the announcement.
    const up = await waitLine(early.lines, (l) => l.event === 'up', 'announcement', 5000, early.stderr);
    const announceMs = up.t - ready.t;
    expect(up.name).toBe(`mdns-node-${tag}`);
    expect(up.port).toBe(ready.grpcPort);
    expect(up.addresses).toContain(AGENT_IP);
    expect(up.txt).toEqual({
      id: ready.nodeId,
      pv: '1',
      chip: expect.any(String),
      ram: String(64 * 2 ** 30),
      bw: '546000000000',
      wired: expect.stringMatching(/^\d+$/),
      budget: String(48 * 2 ** 30),
      grpc: String(ready.grpcPort),
    });
    // …and the advertised address and port lead to the agent's gRPC service.
    // Reachable over the veth, and — not having joined a cluster — serving nobody anything.
    const described = await waitLine(early.lines, (l) => l.event === 'described' || l.event === 'describe-error', 'Describe over the veth', 10_000);
    expect(described.event).toBe('describe-error');
    expect(String(described.message)).toMatch(/UNAUTHENTICATED|has not joined a cluster/);

    // 2. A browser started later finds it by querying.
    const late = spawnInNs(NS_BROWSER, ['--import', 'tsx', join(tmp, 'browse.ts')]);
    const lateStart = await waitLine(late.lines, (l) => l.event === 'browsing', 'late browser start', 20_000, late.stderr);
    const lateUp = await waitLine(late.lines, (l) => l.event === 'up', 'answer to a query', 5000, late.stderr);
    const queryMs = lateUp.t - lateStart.t;
    expect((lateUp.txt as Record<string, string>).id).toBe(ready.nodeId);

    console.info(`mDNS: announced ${announceMs} ms after ready; found by a new browser ${queryMs} ms after it started`);
    expect(announceMs).toBeLessThan(1000);
    expect(queryMs).toBeLessThan(1000);

    // 3. Shutdown sends a goodbye: both browsers drop the node at once (no TTL wait).
    const stopAt = Date.now();
    agent.child.kill('SIGTERM');
    const down = await waitLine(early.lines, (l) => l.event === 'down', 'goodbye', 5000, early.stderr);
    await waitLine(late.lines, (l) => l.event === 'down', 'goodbye (late browser)', 5000, late.stderr);
    expect(await agent.exited).toBe(0);
    console.info(`mDNS: goodbye seen ${down.t - stopAt} ms after SIGTERM`);
    expect(down.t - stopAt).toBeLessThan(2000);

    for (const b of [early, late]) {
      b.child.kill('SIGTERM');
      await b.exited;
    }
  });

  it('a changed profile is re-announced: browsers get the new TXT within 1 s', async () => {
    const browser = spawnInNs(NS_BROWSER, ['--import', 'tsx', join(tmp, 'browse.ts')]);
    await waitLine(browser.lines, (l) => l.event === 'browsing', 'browser start', 20_000, browser.stderr);
    const adv = spawnInNs(NS_AGENT, ['--import', 'tsx', join(tmp, 'advertise.ts')]);
    await waitLine(adv.lines, (l) => l.event === 'ready', 'advertiser ready', 20_000, adv.stderr);
    const budget = (l: Line) => (l.txt as Record<string, string> | undefined)?.budget;
    await waitLine(browser.lines, (l) => l.event === 'up' && budget(l) === '111', 'first announcement', 5000, browser.stderr);
    adv.child.kill('SIGUSR2');
    const updated = await waitLine(adv.lines, (l) => l.event === 'updated', 'update', 5000, adv.stderr);
    // The second identical update is a no-op (nothing changed, nothing sent).
    expect(updated).toMatchObject({ changed: true, again: false });
    const reannounced = await waitLine(browser.lines, (l) => l.event === 'up' && budget(l) === '222', 're-announcement', 5000, browser.stderr);
    console.info(`mDNS: re-announced TXT seen ${reannounced.t - updated.t} ms after the change`);
    expect(reannounced.t - updated.t).toBeLessThan(1000);
    // The service is known once with the new TXT: whatever went down came back up.
    const ups = browser.lines.filter((l) => l.event === 'up').length;
    const downs = browser.lines.filter((l) => l.event === 'down').length;
    expect(ups - downs).toBe(1);
    adv.child.kill('SIGTERM');
    expect(await adv.exited).toBe(0);
    await waitLine(browser.lines, (l) => l.event === 'down' && browser.lines.filter((x) => x.event === 'down').length > downs, 'goodbye', 5000);
    browser.child.kill('SIGTERM');
    await browser.exited;
  });

  it('--no-mdns advertises nothing', async () => {
    const browser = spawnInNs(NS_BROWSER, ['--import', 'tsx', join(tmp, 'browse.ts')]);
    await waitLine(browser.lines, (l) => l.event === 'browsing', 'browser start', 20_000, browser.stderr);
    const agent = spawnInNs(NS_AGENT, [BIN, 'node', '--json', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--state-dir', join(tmp, 'state-quiet')]);
    await waitLine(agent.lines, (l) => l.event === 'ready', 'agent ready', 30_000, agent.stderr);
    // The positive case above is found in well under a second; give this one three.
    await new Promise((r) => setTimeout(r, 3000));
    expect(browser.lines.filter((l) => l.event === 'up')).toEqual([]);
    agent.child.kill('SIGTERM');
    expect(await agent.exited).toBe(0);
    browser.child.kill('SIGTERM');
    await browser.exited;
  });
});
