import { type IncomingMessage, type Server, type ServerResponse, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';

/**
 * `/metrics` and `/healthz` over plain node:http. Two shapes: `metricsRoutes` to mount on a
 * server that already exists (the coordinator's HTTP port), `serveMetrics` for a process that
 * has no HTTP server of its own (the node agent, whose API is gRPC).
 */

export interface Health {
  readonly ok: boolean;
  /** One line for humans and probes, e.g. "ok" or "shutting down". */
  readonly detail?: string;
}

export interface MetricsRoutesOptions {
  readonly registry: Registry;
  /** Health for `/healthz`; default: always ok while the process answers. */
  readonly health?: () => Health;
}

export type RouteHandler = (req: IncomingMessage, res: ServerResponse) => boolean;

/**
 * Returns a handler that answers `/metrics` and `/healthz` and returns true, or returns false
 * without touching the response for any other path (so the caller routes it further).
 */
export function metricsRoutes(options: MetricsRoutesOptions): RouteHandler {
  const { registry } = options;
  const health = options.health ?? ((): Health => ({ ok: true }));
  return (req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/metrics' && path !== '/healthz') return false;
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
      return true;
    }
    if (path === '/healthz') {
      const h = health();
      res.writeHead(h.ok ? 200 : 503, { 'content-type': 'text/plain', 'cache-control': 'no-store' });
      res.end(req.method === 'HEAD' ? undefined : `${h.detail ?? (h.ok ? 'ok' : 'unhealthy')}\n`);
      return true;
    }
    registry.metrics().then(
      (text) => {
        res.writeHead(200, { 'content-type': registry.contentType, 'cache-control': 'no-store' });
        res.end(req.method === 'HEAD' ? undefined : text);
      },
      (err: unknown) => {
        // A failing collect hook must not take the process down; Prometheus records the failed scrape.
        if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
        res.end(`metrics collection failed: ${err instanceof Error ? err.message : String(err)}\n`);
      },
    );
    return true;
  };
}

export interface MetricsServer {
  readonly server: Server;
  readonly host: string;
  readonly port: number;
  /** http://host:port (IPv6 hosts bracketed). */
  readonly url: string;
  close(): Promise<void>;
}

/** Listen on host:port (0 = pick a free port) serving `/metrics` and `/healthz`; 404 elsewhere. */
export async function serveMetrics(options: MetricsRoutesOptions & { readonly host: string; readonly port: number }): Promise<MetricsServer> {
  const routes = metricsRoutes(options);
  const server = createServer((req, res) => {
    if (!routes(req, res)) res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics or /healthz\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: options.host, port: options.port }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  return {
    server,
    host: options.host,
    port,
    url: `http://${hostPort(options.host, port)}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** host:port as URLs and Prometheus targets spell it (`[::1]:9100` for IPv6). */
export function hostPort(host: string, port: number): string {
  return host.includes(':') && !host.startsWith('[') ? `[${host}]:${port}` : `${host}:${port}`;
}
