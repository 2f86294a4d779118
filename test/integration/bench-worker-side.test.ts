import { execFileSync, spawn } from 'node:child_process';
import { connect } from 'node:net';
import { createInterface } from 'node:readline';
import { afterAll, expect } from 'vitest';
import { killAll, start } from '../../bench/lib/children.ts';
import { LINK_BITS_PER_SECOND } from '../../bench/lib/links.ts';
import { workerSide } from '../../bench/lib/worker-side.ts';
import { describeWith, itWith, networkNamespaces } from '../helpers/needs.ts';
import { deleteLan } from '../helpers/netns.ts';

/*
 * bench:tunnel --link's worker side (bench/lib/worker-side.ts): what runs there is reached from
 * the head only across the shaped link, the link's counters see the bytes, never faster than the
 * line rate, and nothing is left behind — after close(), and after a SIGINT of the bench.
 */

const needs = [networkNamespaces()];
const BYTES = 25e6;
const WORKER_SIDE = new URL('../../bench/lib/worker-side.ts', import.meta.url).pathname;

const leftovers = (tag: string) => ({
  namespaces: execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' }).split('\n').map((l) => l.split(' ')[0]!).filter((ns) => ns.startsWith(`otun-${tag}-`)),
  links: execFileSync('ip', ['-o', 'link', 'show'], { encoding: 'utf8' }).split('\n').filter((l) => l.includes(`otun${tag}`)),
});

/** What is left after up to 5 s: the kernel tears a namespace (and the veth pair in it) down asynchronously. */
async function leftAfterwards(tag: string): Promise<ReturnType<typeof leftovers>> {
  for (const until = Date.now() + 5000; ; await new Promise((r) => setTimeout(r, 100))) {
    const left = leftovers(tag);
    if ((left.namespaces.length === 0 && left.links.length === 0) || Date.now() > until) return left;
  }
}

/** A server on the worker side that sends BYTES to each connection, then closes it. */
const SENDER = `const s=require('node:net').createServer((c)=>c.end(Buffer.alloc(${BYTES})));s.listen(0,process.argv[1],()=>console.log(s.address().port));`;

describeWith(needs, 'bench:tunnel --link: the worker side behind a shaped link', () => {
  afterAll(() => killAll());

  itWith(needs, 'the head reaches the worker side across the link, at most at its rate, and close() removes it', async () => {
    const tag = String(9000 + (process.pid % 1000));
    const side = workerSide('1gbe', tag);
    try {
      const sender = start(...side.command(process.execPath, ['-e', SENDER, side.engineBind]));
      const port = Number(await new Promise<string>((resolve) => createInterface({ input: sender.proc.stdout! }).once('line', resolve)));
      const before = side.carried()!;
      const t0 = performance.now();
      const got = await new Promise<number>((resolve, reject) => {
        let n = 0;
        const s = connect({ host: side.host, port });
        s.on('data', (d: Buffer) => {
          n += d.length;
        });
        s.once('end', () => resolve(n));
        s.once('error', reject);
      });
      const seconds = (performance.now() - t0) / 1000;
      const after = side.carried()!;
      expect(got).toBe(BYTES);
      // the bytes crossed the shaped qdisc (TCP/IP headers on top) ...
      expect(after.toHead - before.toHead).toBeGreaterThanOrEqual(BYTES);
      // ... and a token bucket lets none through faster than the line rate (plus one burst)
      expect(BYTES / seconds).toBeLessThan((LINK_BITS_PER_SECOND['1gbe'] / 8) * 1.05);
      // the worker's 127.0.0.1 is not the head's: nothing listens on that port here
      const local = await new Promise<boolean>((resolve) => connect({ host: '127.0.0.1', port }).once('connect', () => resolve(true)).once('error', () => resolve(false)));
      expect(local).toBe(false);
    } finally {
      killAll();
      side.close();
    }
    expect(await leftAfterwards(tag)).toEqual({ namespaces: [], links: [] });
  }, 60_000);

  itWith(needs, 'a SIGINT of the bench removes the namespace and the bridge', async () => {
    const tag = String(9000 + ((process.pid + 1) % 1000));
    const script = `import { workerSide } from ${JSON.stringify(WORKER_SIDE)}; workerSide('10gbe', ${JSON.stringify(tag)}); console.log('up'); setInterval(() => {}, 1000);`;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<string>((resolve, reject) => {
        createInterface({ input: child.stdout! }).once('line', resolve);
        child.once('exit', (code) => reject(new Error(`exited ${code} before it was up`)));
      });
      expect(leftovers(tag).namespaces).toEqual([`otun-${tag}-w`]);
      const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
      child.kill('SIGINT');
      expect(await exited).toBe(130);
      expect(await leftAfterwards(tag)).toEqual({ namespaces: [], links: [] });
    } finally {
      child.kill('SIGKILL');
      deleteLan(`otun${tag}`, [`otun-${tag}-w`]);
    }
  }, 60_000);
});
