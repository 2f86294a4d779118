import { type IncomingMessage, type Server, type ServerResponse, createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';

/**
 * `/metrics` and `/healthz` over plain node:http. `sendMetrics` and `sendHealth` answer one
 * request (the coordinator mounts them on its router); `metricsRoutes` answers both paths for a
 * server of one's own, and `serveMetrics` is that server, for a process that has no HTTP server
 * otherwise (the node agent, whose API is gRPC).
 *
 * `/healthz` is the one health route of every Orchard process, with one body:
 * `{"ok": true, "detail": "ok"}` (200) or `{"ok": false, "detail": "shutting down"}` (503).
 * `detail` is one line for humans; probes read the status.
 */

export interface Health {
  readonly ok: boolean;
  /** One line for humans and probes, e.g. "ok" or "shutting down"; default "ok" / "unhealthy". */
  readonly detail?: string;
}

/** The `/healthz` body every process sends. */
export interface HealthBody {
  readonly ok: boolean;
  readonly detail: string;
}

export function healthBody(h: Health): HealthBody {
  return { ok: h.ok, detail: h.detail ?? (h.ok ? 'ok' : 'unhealthy') };
}

/** Answer a GET or HEAD `/healthz`. */
export function sendHealth(req: IncomingMessage, res: ServerResponse, h: Health): void {
  const body = JSON.stringify(healthBody(h));
  res.writeHead(h.ok ? 200 : 503, { 'content-type': 'application/json', 'cache-control': 'no-store', 'content-length': String(Buffer.byteLength(body)) });
  res.end(req.method === 'HEAD' ? undefined : body);
}

/** Answer a GET or HEAD `/metrics` from a registry; a failing collect hook is a 500, never a crash. */
export function sendMetrics(req: IncomingMessage, res: ServerResponse, registry: Registry): void {
  registry.metrics().then(
    (text) => {
      res.writeHead(200, { 'content-type': registry.contentType, 'cache-control': 'no-store' });
      res.end(req.method === 'HEAD' ? undefined : text);
    },
    (err: unknown) => {
      // Prometheus records the failed scrape; the process goes on.
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(`metrics collection failed: ${err instanceof Error ? err.message : String(err)}\n`);
    },
  );
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
    if (path === '/healthz') sendHealth(req, res, health());
    else sendMetrics(req, res, registry);
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
