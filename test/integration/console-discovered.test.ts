import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Browser, chromium, type Page } from 'playwright-core';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { axeViolations } from '../helpers/axe.ts';
import { chromiumBrowser, describeWith, networkNamespaces } from '../helpers/needs.ts';
import { deleteNamespaces, linkNamespaceToHost } from '../helpers/netns.ts';
import { killGroup, ORCHARD_BIN, orchard, type Proc, readyLine, spawnProc } from '../helpers/processes.ts';

/*
 * A `discovered` agent in the browser console, with real Bonjour: a coordinator browses mDNS on
 * a veth address (10.81.0.1) whose other end is a network namespace this test creates; there an
 * `orchard node` that never joined advertises `_orchard._tcp`. The coordinator dials it over
 * mutual TLS, fails (no certificate of this cluster), and lists it as discovered: the cluster
 * view in a real Chromium shows it apart from the members, with what it claims and why it is not
 * one, the same entry `orchard status --json` prints. When the agent stops, its Bonjour goodbye
 * takes the card away. A statically joined agent on the host shows as the one member.
 */

const chromiumNeed = chromiumBrowser();
const tag = randomBytes(2).toString('hex');
const NS = `orch-cd-${tag}`;
const HOST = { veth: `ocdh${tag}`, ip: '10.81.0.1' };
const STRANGER = { ns: NS, veth: `ocdn${tag}`, ip: '10.81.0.2' };
const API_KEY = 'discovered-console-key';

let tmp = '';
let browser: Browser | undefined;
let page: Page;
let base = '';
let coordAddr = '';
let env: NodeJS.ProcessEnv;
let strangerId = '';
let stranger: Proc | undefined;
const procs: Proc[] = [];

const statusJson = async () => {
  const s = await orchard(['status', '--json', '--coordinator', coordAddr], env);
  expect(s.code, s.stderr).toBe(0);
  return JSON.parse(s.stdout) as { nodes: { name: string; state: string; address: string; id?: string; nodeId?: string }[] };
};

describeWith([networkNamespaces(), chromiumNeed], 'console: an agent discovered over Bonjour but not joined', () => {
  beforeAll(async () => {
    deleteNamespaces(NS);
    linkNamespaceToHost(HOST, STRANGER);
    tmp = await mkdtemp(join(tmpdir(), 'orchard-console-discovered-'));
    const state = join(tmp, 'coord');
    env = { ...process.env, ORCHARD_LOG_FORMAT: 'json', ORCHARD_COORDINATOR_STATE_DIR: state };
    // the admin key in the coordinator's environment, never its arguments (`ps`)
    const coord = spawnProc('coordinator', [ORCHARD_BIN, 'coordinator', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--mdns-interface', HOST.ip, '--state-dir', state, '--no-nats', '--json'], { ...env, ORCHARD_API_KEY: API_KEY });
    procs.push(coord);
    const ready = await readyLine(coord);
    coordAddr = `127.0.0.1:${String(ready.grpcPort)}`;
    base = `http://127.0.0.1:${String(ready.httpPort)}`;
    const token = await orchard(['coordinator', 'token', '--uses', '1', '--ttl', '10m'], env);
    expect(token.code, token.stderr).toBe(0);
    const member = spawnProc('node member', [ORCHARD_BIN, 'node', '--no-mdns', '--grpc-port', '0', '--metrics-port', '0', '--bind', '127.0.0.1', '--name', 'member', '--state-dir', join(tmp, 'member'), '--json', '--join', coordAddr], { ...env, ORCHARD_NODE_TOKEN: token.stdout.trim() });
    procs.push(member);
    await readyLine(member);
    // no token: it serves nothing, but it advertises itself on its namespace's only link
    stranger = spawnProc('node stranger', ['netns', 'exec', NS, process.execPath, ORCHARD_BIN, 'node', '--grpc-port', '0', '--metrics-port', '0', '--bind', STRANGER.ip, '--mdns-interface', STRANGER.ip, '--name', 'stranger', '--state-dir', join(tmp, 'stranger'), '--json'], env, 'ip');
    procs.push(stranger);
    strangerId = String((await readyLine(stranger)).nodeId);
    browser = await chromium.launch({ executablePath: chromiumNeed.ok ? chromiumNeed.value : '', args: ['--no-sandbox'] });
    // axe is injected as a script; the console's CSP (rightly) forbids that, so bypass it here.
    page = await (await browser.newContext({ bypassCSP: true })).newPage();
    await page.goto(base);
    // the first page's keyless session check has answered (401 → the login form) before a key is stored
    await page.waitForSelector('#api-key');
    await page.evaluate((k) => sessionStorage.setItem('orchard.apiKey', k), API_KEY);
    await page.goto(`${base}/?signed-in#cluster`);
    await page.waitForSelector('main[data-view="cluster"][data-ready="true"]');
  }, 120_000);

  afterAll(async () => {
    await browser?.close();
    await Promise.all(procs.splice(0).map(killGroup));
    deleteNamespaces(NS);
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('shows the discovered agent apart from the members, as `orchard status` lists it', async () => {
    const card = `.node-card.discovered[data-node="stranger"]`;
    await page.waitForSelector(card, { timeout: 30_000 });
    await page.waitForSelector('.node-card[data-node="member"][data-state="up"]', { timeout: 10_000 });
    const shown = await page.$eval(card, (e) => ({ ...(e as HTMLElement).dataset, reason: e.querySelector('[data-field=reason]')?.textContent ?? '' }) as Record<string, string>);
    expect(shown.state).toBe('discovered');
    expect(shown.claimedId).toBe(strangerId);
    expect(shown.address).toMatch(new RegExp(`^${STRANGER.ip.replaceAll('.', '\\.')}:\\d+$`));
    expect(Number(shown.memoryBytes)).toBeGreaterThan(0); // as its TXT record claims
    expect(shown.reason).not.toBe('');
    // the member count does not include it, and the plan never sees it
    expect(await page.textContent('#cluster-h')).toContain('1 of 1 node up');
    const status = await statusJson();
    expect(status.nodes.map((n) => [n.name, n.state]).sort()).toEqual([
      ['member', 'up'],
      ['stranger', 'discovered'],
    ]);
    expect(status.nodes.find((n) => n.name === 'stranger')!.address).toBe(shown.address);
    expect(await axeViolations(page), 'axe on the cluster view with a discovered agent').toEqual([]);
  }, 60_000);

  it('its Bonjour goodbye takes it off the page and out of status', async () => {
    const t0 = Date.now();
    stranger!.child.kill('SIGTERM'); // the agent unpublishes: records with TTL 0
    await page.waitForSelector('.node-card.discovered', { state: 'detached', timeout: 10_000 });
    console.log(`discovered card gone ${Date.now() - t0} ms after the agent's SIGTERM`);
    expect((await statusJson()).nodes.map((n) => n.name)).toEqual(['member']);
    expect(await page.locator('.node-card[data-node="member"][data-state="up"]').count()).toBe(1);
  }, 30_000);
});
