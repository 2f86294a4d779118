import { existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { delimiter, join } from 'node:path';
import { canConnect } from '../../src/node/ports.ts';
import type { BenchProcesses } from '../lib/cluster.ts';
import { sleep } from '../lib/cluster.ts';

/**
 * Toxiproxy (Shopify's TCP proxy with "toxics": latency, stalls, resets) in front of every node,
 * driven over its HTTP API: this kernel has no netem, so added latency comes from here while
 * `tc tbf` limits the rate. Built from the Go module proxy:
 *   GOBIN=/tmp/tp go install github.com/Shopify/toxiproxy/v2/cmd/server@v2.12.0 && mv /tmp/tp/server ~/go/bin/toxiproxy-server
 * (ORCHARD_TOXIPROXY_SERVER names another binary).
 */
export const TOXIPROXY_INSTALL = 'GOBIN=/tmp/tp go install github.com/Shopify/toxiproxy/v2/cmd/server@v2.12.0 && mv /tmp/tp/server ~/go/bin/toxiproxy-server';

export function findToxiproxy(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const candidates = [env.ORCHARD_TOXIPROXY_SERVER, ...(env.PATH ?? '').split(delimiter).map((d) => join(d, 'toxiproxy-server')), join(env.GOPATH ?? join(homedir(), 'go'), 'bin', 'toxiproxy-server')];
  return candidates.find((c): c is string => !!c && existsSync(c));
}

export class Toxiproxy {
  constructor(readonly api: string) {}

  static async start(procs: BenchProcesses, binary: string, port: number): Promise<Toxiproxy> {
    const p = procs.start('toxiproxy', ['-host', '127.0.0.1', '-port', String(port)], process.env, binary);
    for (let i = 0; i < 100 && !(await canConnect('127.0.0.1', port)); i++) {
      if (p.child.exitCode !== null) throw new Error(`toxiproxy-server exited: ${p.err.slice(-500)}`);
      await sleep(100);
    }
    return new Toxiproxy(`http://127.0.0.1:${port}`);
  }

  async #call(method: string, path: string, body?: object): Promise<void> {
    const r = await fetch(`${this.api}${path}`, { method, headers: { 'content-type': 'application/json' }, ...(body ? { body: JSON.stringify(body) } : {}) });
    if (!r.ok) throw new Error(`toxiproxy ${method} ${path}: ${r.status} ${await r.text()}`);
  }

  proxy(name: string, listen: string, upstream: string): Promise<void> {
    return this.#call('POST', '/proxies', { name, listen, upstream, enabled: true });
  }

  /** `ms` more round trip through a proxy: half of it on each direction (as netem on one end would add). */
  async addLatency(proxy: string, ms: number): Promise<void> {
    for (const stream of ['upstream', 'downstream']) {
      await this.#call('POST', `/proxies/${proxy}/toxics`, { name: `latency-${stream}`, type: 'latency', stream, toxicity: 1, attributes: { latency: ms / 2, jitter: 0 } });
    }
  }

  async removeLatency(proxy: string): Promise<void> {
    for (const stream of ['upstream', 'downstream']) await this.#call('DELETE', `/proxies/${proxy}/toxics/latency-${stream}`);
  }
}
