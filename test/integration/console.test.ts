import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { type Browser, type BrowserContext, chromium, type Page } from 'playwright-core';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { DEMO_CTX, demoBudgets, ensureDemoModel } from '../../src/cli/demo-model.ts';
import { type LocalCluster, startLocalCluster } from '../../src/cli/local-cluster.ts';
import { chromiumBrowser, describeWith, llamaEngines } from '../helpers/needs.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { orchard } from '../helpers/processes.ts';
import { axeViolations } from '../helpers/axe.ts';

/*
 * The cluster console in a real Chromium (Debian's package, driven by playwright-core; no
 * browser download) against a real cluster: a coordinator with an API key and three `orchard
 * node` agents whose budgets force a three-stage llama.cpp RPC split of a generated GGUF. Every
 * figure the page shows is checked against the CLI's answer for the same cluster; axe-core
 * (injected into the page) must find no serious or critical violation on any view. Screenshots
 * go to test-artifacts/console/ (gitignored). Timings are printed, never asserted.
 */

const env: NodeJS.ProcessEnv = { ...process.env };
const engines = await llamaEngines(env);
const chromiumNeed = chromiumBrowser();
const CHROMIUM = chromiumNeed.ok ? chromiumNeed.value : '';

const API_KEY = 'console-key-0123';
const MODEL = 'tiny';
const ARTIFACTS = new URL('../../test-artifacts/console/', import.meta.url).pathname;

let tmp = '';
let modelPath = '';
let cluster: LocalCluster | undefined;
let browser: Browser | undefined;
let context: BrowserContext;
let page: Page;
let base = '';

// The CLI authenticates like an operator's shell would: the key in the environment.
// It trusts the coordinator's TLS certificate through the coordinator's state dir (its CA), as on that Mac.
const cli = (args: string[]) =>
  orchard([...args, '--coordinator', cluster!.grpcAddress], { ...env, ORCHARD_API_KEY: API_KEY, ORCHARD_COORDINATOR_STATE_DIR: join(tmp, 'state', 'coordinator') });

async function cliJson(args: string[]): Promise<Record<string, unknown>> {
  const r = await cli([...args, '--json']);
  expect(r.stdout, r.stderr).not.toBe('');
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

async function show(view: string): Promise<void> {
  await page.goto(`${base}/#${view}`);
  await page.waitForSelector(`main[data-view="${view}"][data-ready="true"]`);
}

async function checkView(name: string): Promise<void> {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
  expect(await axeViolations(page), `axe on the ${name} view`).toEqual([]);
}

/** Bytes transferred by the page load and the time until `selector` is in the DOM (ms from navigation start). */
async function measureLoad(p: Page, url: string, selector: string): Promise<{ bytes: number; interactiveMs: number; files: number }> {
  await p.goto(url);
  await p.waitForSelector(selector);
  return p.evaluate(() => {
    const entries = [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')] as PerformanceResourceTiming[];
    return { bytes: entries.reduce((t, e) => t + e.transferSize, 0), interactiveMs: performance.now(), files: entries.length };
  });
}

describeWith([engines, chromiumNeed], 'cluster console in Chromium on a 3-node cluster', () => {
  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'orchard-console-'));
    await mkdir(ARTIFACTS, { recursive: true });
    // The model goes to this test's directory; the agents find the engines in the usual cache.
    modelPath = (await ensureDemoModel({ ...env, ORCHARD_CACHE_DIR: join(tmp, 'cache') })).path;
    const profile = modelProfile(await readGgufHeader(modelPath));
    cluster = await startLocalCluster({
      nodes: demoBudgets(profile, 3, { ctx: DEMO_CTX, cacheType: 'f16' }),
      stateRoot: join(tmp, 'state'),
      // The agents may only point engines inside their roots: the model's folder is one.
      env: { ...env, ORCHARD_RPC_THREADS: '1', ORCHARD_LLAMA_SERVER_EXTRA_ARGS: '-t 1', ORCHARD_NODE_MODELS_DIR: dirname(modelPath) },
      // Default liveness thresholds: a SIGKILLed agent is down as soon as re-dialling it is
      // refused (not after the 5 s silence clock), and the page follows the registry at once.
      // The admin key travels in the coordinator's environment, never its arguments (`ps`).
      apiKey: API_KEY,
    });
    base = cluster.httpUrl;
    for (let i = 0; i < 100; i++) {
      const s = await cliJson(['status']);
      if ((s.nodes as { state: string }[]).filter((n) => n.state === 'up').length === 3) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    // axe is injected as a script; the console's CSP (rightly) forbids that, so bypass it here.
    context = await browser.newContext({ bypassCSP: true, viewport: { width: 1280, height: 900 } });
    page = await context.newPage();
  }, 240_000);

  afterAll(async () => {
    await browser?.close();
    await cluster?.stop();
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('without a key the page shows only the login, and the data routes refuse; first load is small', async () => {
    // Each load in a fresh context (empty cache); the first one also pays for Chromium's start-up
    // and is not counted.
    const times: number[] = [];
    let m = { bytes: 0, interactiveMs: 0, files: 0 };
    for (let i = 0; i < 4; i++) {
      const ctx = await browser!.newContext({ bypassCSP: true });
      m = await measureLoad(await ctx.newPage(), base, '#api-key');
      if (i > 0) times.push(m.interactiveMs);
      await ctx.close();
    }
    const median = [...times].sort((a, b) => a - b)[1]!;
    console.log(`console first load (login, empty cache): ${m.files} files, ${(m.bytes / 1024).toFixed(1)} KiB transferred, interactive at ${times.map((t) => t.toFixed(0)).join('/')} ms (median ${median.toFixed(0)})`);
    const fresh = await browser!.newContext({ bypassCSP: true });
    const p = await fresh.newPage();
    await p.goto(base);
    await p.waitForSelector('#api-key');
    expect(m.bytes).toBeGreaterThan(0);
    expect(await p.locator('nav').count()).toBe(0);
    expect(await p.locator('.node-card').count()).toBe(0);
    await p.screenshot({ path: join(ARTIFACTS, 'login.png') });
    expect(await axeViolations(p), 'axe on the login').toEqual([]);
    await fresh.close();
    // A key stored while the keyless check's 401 is still on its way was never tried: it is kept.
    const racing = await browser!.newContext({ bypassCSP: true });
    const rp = await racing.newPage();
    let release = () => {};
    const held = new Promise<void>((r) => {
      release = r;
    });
    let intercepted = () => {};
    const sent = new Promise<void>((r) => {
      intercepted = r;
    });
    await rp.route('**/v1/console/session', async (route) => {
      intercepted();
      await held;
      await route.continue();
    });
    await rp.goto(base);
    // Store the key only once the keyless check is on its way (held here): stored before the page
    // sent it, the check would carry the key and the race would not happen (CI once saw that order).
    await sent;
    await rp.evaluate((k) => sessionStorage.setItem('orchard.apiKey', k), API_KEY);
    release();
    await rp.waitForSelector('#api-key');
    await rp.unroute('**/v1/console/session');
    await rp.goto(`${base}/?after-the-race#cluster`);
    await rp.waitForSelector('main[data-view="cluster"][data-ready="true"]', { timeout: 10_000 });
    await racing.close();
    for (const path of ['/v1/console/stream', '/v1/console/session', '/v1/cluster']) expect((await fetch(`${base}${path}`)).status, path).toBe(401);
    expect((await fetch(`${base}/v1/console/plan`, { method: 'POST', body: '{}' })).status).toBe(401);
  });

  it('signs in; the cluster view shows 3 nodes with the memory figures of `orchard status --json`', async () => {
    await page.goto(base);
    await page.fill('#api-key', API_KEY);
    await page.click('button[type=submit]');
    await page.waitForSelector('main[data-view="cluster"][data-ready="true"]');
    await page.waitForFunction(() => document.querySelectorAll('.node-card[data-state="up"]').length === 3);
    const status = await cliJson(['status']);
    const cards = await page.$$eval('.node-card', (els) => els.map((e) => ({ ...(e as HTMLElement).dataset })));
    expect(cards).toHaveLength(3);
    for (const n of status.nodes as { name: string; state: string; hardware: Record<string, number> }[]) {
      const card = cards.find((c) => c.node === n.name);
      expect(card, n.name).toBeDefined();
      expect(card!.state).toBe(n.state);
      expect(Number(card!.memoryBytes)).toBe(n.hardware.memoryBytes);
      expect(Number(card!.budgetBytes)).toBe(n.hardware.budgetBytes);
      expect(Number(card!.wiredLimitBytes)).toBe(n.hardware.wiredLimitBytes);
      expect(Number(card!.bandwidth)).toBe(n.hardware.bandwidthBytesPerSecond);
      expect(Number(card!.usedBytes)).toBe(0);
    }
    await checkView('cluster');
    // Reload with the key in this tab's session: navigation start → the cluster drawn from the
    // live feed (cached modules revalidated with 304s).
    const m = await measureLoad(page, `${base}/?reload`, 'main[data-ready="true"] .node-card');
    console.log(`console reload with a key: ${m.files} files, ${(m.bytes / 1024).toFixed(1)} KiB transferred, cluster drawn at ${m.interactiveMs.toFixed(0)} ms`);
  });

  it('previews the plan `orchard plan` prints (and a no-fit with remedies), then loads the model', async () => {
    await show('load');
    await page.fill('input[name=model]', modelPath);
    await page.fill('input[name=name]', MODEL);
    await page.fill('input[name=ctx]', '1000000');
    await page.click('button[type=submit]');
    await page.waitForSelector('.plan[data-fits="false"] .remedies li');
    const noFit = await cli(['plan', modelPath, '--ctx', '1000000', '--json']);
    expect(noFit.code).toBe(1);
    const remedies = (JSON.parse(noFit.stdout) as { remedies: string[] }).remedies;
    expect(await page.$$eval('.remedies li', (els) => els.map((e) => e.textContent))).toEqual(remedies);

    await page.fill('input[name=ctx]', String(DEMO_CTX));
    await page.click('button[type=submit]');
    await page.waitForSelector('.plan[data-fits="true"] tbody tr');
    const rows = await page.$$eval('.plan tbody tr', (els) => els.map((e) => ({ ...(e as HTMLElement).dataset })));
    const plan = (await cliJson(['plan', modelPath, '--ctx', String(DEMO_CTX)])) as { stages: { node: string; firstLayer: number; lastLayer: number; bytes: { total: number } }[] };
    expect(plan.stages).toHaveLength(3);
    expect(rows.map((r) => ({ node: r.node, first: Number(r.first), last: Number(r.last), total: Number(r.total) }))).toEqual(
      plan.stages.map((s) => ({ node: s.node, first: s.firstLayer, last: s.lastLayer, total: s.bytes.total })),
    );
    await checkView('load');

    await page.click('button.primary:has-text("Load")');
    await page.waitForSelector('.progress progress');
    const outcome = page.locator('section[aria-labelledby="load-h"] > p[role=status]');
    await outcome.filter({ hasText: /./ }).waitFor({ timeout: 120_000 });
    expect(await outcome.textContent()).toBe(`${MODEL} is ready`);
  }, 180_000);

  it('the models view draws the placement bar of the loaded stages', async () => {
    await show('models');
    await page.waitForSelector(`.model-card[data-model="${MODEL}"][data-state="ready"]`);
    const status = await cliJson(['status']);
    const m = (status.models as { name: string; stages: { nodeName: string; firstLayer: number; lastLayer: number }[] }[]).find((x) => x.name === MODEL)!;
    const segments = await page.$$eval(`.model-card[data-model="${MODEL}"] .segment`, (els) => els.map((e) => ({ ...(e as HTMLElement).dataset })));
    expect(segments.map((s) => ({ node: s.node, first: Number(s.first), last: Number(s.last) }))).toEqual(m.stages.map((s) => ({ node: s.nodeName, first: s.firstLayer, last: s.lastLayer })));
    await checkView('models');
    // The cluster view now counts each stage's planned bytes as used on its node.
    await show('cluster');
    const full = (status.models as { name: string; stages: { nodeName: string; bytes: { total: number } }[] }[]).find((x) => x.name === MODEL)!;
    await page.waitForFunction(() => [...document.querySelectorAll('.node-card')].every((e) => Number((e as HTMLElement).dataset.usedBytes) > 0));
    const used = await page.$$eval('.node-card', (els) => els.map((e) => [(e as HTMLElement).dataset.node, Number((e as HTMLElement).dataset.usedBytes)]));
    expect(Object.fromEntries(used)).toEqual(Object.fromEntries(full.stages.map((s) => [s.nodeName, s.bytes.total])));
    await page.screenshot({ path: join(ARTIFACTS, 'cluster-loaded.png'), fullPage: true });
  });

  it('the chat streams a reply token by token whose text equals the API answer to the same greedy request', async () => {
    const prompt = 'Tell me about orchards.';
    await show('chat');
    await page.fill('textarea[name=prompt]', prompt);
    await page.fill('input[name=max_tokens]', '24');
    await page.fill('input[name=temperature]', '0');
    // Count the reply's updates: a reply drawn once at the end was not streamed.
    await page.evaluate(() => {
      const w = window as unknown as { replyUpdates: number };
      w.replyUpdates = 0;
      new MutationObserver(() => w.replyUpdates++).observe(document.querySelector('.reply')!, { childList: true, characterData: true, subtree: true });
    });
    await page.click('button[type=submit]');
    await page.waitForSelector('.reply[data-state="done"]', { timeout: 60_000 });
    const reply = (await page.textContent('.reply')) ?? '';
    const updates = await page.evaluate(() => (window as unknown as { replyUpdates: number }).replyUpdates);
    const res = await fetch(`${base}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: prompt }], max_tokens: 24, temperature: 0 }),
    });
    const api = (await res.json()) as { choices: { message: { content: string } }[]; usage: { completion_tokens: number } };
    expect(reply).toBe(api.choices[0]!.message.content);
    expect(reply.length).toBeGreaterThan(0);
    expect(updates).toBeGreaterThan(1);
    console.log(`chat: ${api.usage.completion_tokens} tokens in ${updates} reply updates; TTFT ${await page.textContent('[data-field=ttft]')}, ${await page.textContent('[data-field=tps]')}`);
    await checkView('chat');
    // Stop: the stream ends at once and the slot is free again (the engine was cancelled).
    await page.fill('input[name=max_tokens]', '600');
    await page.click('button[type=submit]');
    await page.waitForFunction(() => (document.querySelector('.reply')?.textContent ?? '').length > 0);
    await page.click('button:has-text("Stop")');
    await page.waitForSelector('.reply[data-state="stopped"]');
    // The models view now shows what the coordinator measured for those requests.
    await show('models');
    await page.waitForFunction(() => !['—', ''].includes(document.querySelector('[data-field=measured]')?.textContent ?? ''));
    expect(await page.textContent('[data-field=ttft-p50]')).toMatch(/\d+ (ms|s)$/);
    await page.waitForSelector(`.model-card[data-model="${MODEL}"] [data-field=running]:text-is("0")`, { timeout: 5000 });
    await page.screenshot({ path: join(ARTIFACTS, 'models-serving.png'), fullPage: true });
  }, 90_000);

  it('an inference key (made with `orchard coordinator keys create`) sees no load or unload controls, and the API refuses it a load', async () => {
    const made = await orchard(['coordinator', 'keys', 'create', '--scope', 'inference', '--json', '--state-dir', join(tmp, 'state', 'coordinator')], env);
    expect(made.stderr).toBe('');
    const inferenceKey = (JSON.parse(made.stdout) as { key: string }).key;
    // A new query string makes each goto a full page load (the session is asked again).
    const open = async (query: string, view: string, expected = view) => {
      await page.goto(`${base}/?${query}#${view}`);
      await page.waitForSelector(`main[data-view="${expected}"][data-ready="true"]`);
    };
    const signInWith = (key: string) => page.evaluate((k) => sessionStorage.setItem('orchard.apiKey', k), key);
    await signInWith(inferenceKey);
    await open('as-inference', 'models');
    expect(await page.evaluate(() => fetch('/v1/console/session', { headers: { authorization: `Bearer ${sessionStorage.getItem('orchard.apiKey')}` } }).then((r) => r.json()))).toMatchObject({ scope: 'inference' });
    await page.waitForSelector(`.model-card[data-model="${MODEL}"]`);
    expect(await page.locator('nav a[href="#load"]').count()).toBe(0);
    expect(await page.locator('.model-card button').count()).toBe(0);
    await open('as-inference-2', 'load', 'cluster');
    // The buttons are absent, and the API would refuse them anyway.
    const refused = await fetch(`${base}/v1/cluster/models`, {
      method: 'POST',
      headers: { authorization: `Bearer ${inferenceKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: modelPath, name: 'not-allowed' }),
    });
    expect(refused.status).toBe(403);
    expect(((await refused.json()) as { error: { code: string } }).error.code).toBe('insufficient_scope');
    expect((await fetch(`${base}/v1/cluster/models/${MODEL}`, { method: 'DELETE', headers: { authorization: `Bearer ${inferenceKey}` } })).status).toBe(403);
    await signInWith(API_KEY);
    await open('as-admin', 'models');
    await page.waitForSelector(`.model-card[data-model="${MODEL}"] button:has-text("Unload")`);
    expect(await page.locator('nav a[href="#load"]').count()).toBe(1);
  });

  it('a SIGKILLed agent turns its card down within 3 s and the model shows failed with the reason', async () => {
    await show('cluster');
    const victim = cluster!.nodes[1]!;
    const t0 = Date.now();
    process.kill(victim.pid, 'SIGKILL');
    await page.waitForSelector(`.node-card[data-node="${victim.name}"][data-state="down"]`, { timeout: 3000 });
    console.log(`console: ${victim.name} shown down ${Date.now() - t0} ms after SIGKILL`);
    await show('models');
    const card = page.locator(`.model-card[data-model="${MODEL}"]`);
    await page.waitForSelector(`.model-card[data-model="${MODEL}"]:is([data-state="failed"], [data-state="recovering"])`, { timeout: 3000 });
    expect(await card.locator('[data-field=reason]').textContent()).toContain(victim.name);
    await show('events');
    await page.waitForSelector(`.event:is([data-kind="model-failed"], [data-kind="model-recovering"])`);
    expect(await page.textContent('.events')).toContain(`${victim.name} up → `);
    await checkView('events');
  });
});
