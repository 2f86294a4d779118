import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { fileURLToPath } from 'node:url';

/**
 * The console's static files: the page and its modules from ./static, Preact, its hooks and htm
 * from node_modules (installed by `npm ci`, so nothing is fetched at run time and no copy of a
 * library is kept in the repo). The page maps the bare imports to these URLs with an import map;
 * no bundler, no build step.
 *
 * Caching: every file is served with a strong ETag and `no-cache`, so a browser revalidates and
 * gets a 304 — a coordinator upgrade is never hidden by a stale module, and on a LAN the
 * revalidation costs one round trip per file. The import map is the page's only inline script;
 * the CSP allows it by hash and nothing else inline.
 */

export const CONSOLE_PREFIX = '/console/';

const STATIC_DIR = new URL('./static/', import.meta.url);

const CONTENT_TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
};

const OWN_FILES = ['index.html', 'app.js', 'api.js', 'html.js', 'format.js', 'cluster.js', 'models.js', 'load.js', 'chat.js', 'events.js', 'style.css'];
const VENDOR = { 'vendor/preact.mjs': 'preact', 'vendor/hooks.mjs': 'preact/hooks', 'vendor/htm.mjs': 'htm' } as const;
const urlOf = (file: string) => (file === 'index.html' ? '/' : `${CONSOLE_PREFIX}${file}`);

/**
 * Every URL path the console serves, listed one by one (no wildcard): they are the router's
 * public routes, and anything else under /console/ is an unknown path like any other.
 */
export const CONSOLE_ASSET_PATHS: readonly string[] = [...OWN_FILES, ...Object.keys(VENDOR)].map(urlOf);

/** URL path → file on disk. The page's own modules, then the libraries. */
function assetFiles(): Map<string, string> {
  const files = new Map(OWN_FILES.map((f) => [urlOf(f), fileURLToPath(new URL(f, STATIC_DIR))]));
  for (const [file, specifier] of Object.entries(VENDOR)) files.set(urlOf(file), fileURLToPath(import.meta.resolve(specifier)));
  return files;
}

interface Asset {
  readonly body: Buffer;
  readonly etag: string;
  readonly type: string;
}

/** The import map inside index.html, for the CSP hash. */
function inlineScriptHashes(html: string): string[] {
  return [...html.matchAll(/<script type="importmap">([\s\S]*?)<\/script>/g)].map((m) => `'sha256-${createHash('sha256').update(m[1] ?? '').digest('base64')}'`);
}

export class ConsoleAssets {
  #loaded: Promise<Map<string, Asset>> | undefined;
  #csp = "default-src 'self'";

  /** Read every file once (they are small); a missing file is a packaging error, said at once. */
  load(): Promise<Map<string, Asset>> {
    this.#loaded ??= (async () => {
      const out = new Map<string, Asset>();
      for (const [path, file] of assetFiles()) {
        const body = await readFile(file);
        const ext = file.slice(file.lastIndexOf('.'));
        out.set(path, { body, etag: `"${createHash('sha256').update(body).digest('base64url').slice(0, 27)}"`, type: CONTENT_TYPES[ext] ?? 'application/octet-stream' });
        if (path === '/') {
          const hashes = inlineScriptHashes(body.toString('utf8')).join(' ');
          this.#csp = `default-src 'self'; script-src 'self' ${hashes}; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'`;
        }
      }
      return out;
    })();
    return this.#loaded;
  }

  /** Serve one asset (GET or HEAD), with 304 for a matching If-None-Match. */
  async serve(req: IncomingMessage, res: ServerResponse, path: string): Promise<void> {
    const asset = (await this.load()).get(path);
    if (!asset) {
      res.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' });
      res.end('not found');
      return;
    }
    const headers: Record<string, string> = {
      'content-type': asset.type,
      etag: asset.etag,
      'cache-control': 'no-cache',
      'x-content-type-options': 'nosniff',
      'referrer-policy': 'no-referrer',
    };
    if (path === '/') headers['content-security-policy'] = this.#csp;
    if (req.headers['if-none-match'] === asset.etag) {
      res.writeHead(304, headers);
      res.end();
      return;
    }
    res.writeHead(200, { ...headers, 'content-length': String(asset.body.length) });
    res.end(req.method === 'HEAD' ? undefined : asset.body);
  }
}
