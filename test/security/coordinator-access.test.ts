import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GRPC_METHOD_SCOPES } from '../../src/coordinator/api/grpc-access.ts';
import { type CoordinatorHandle, startCoordinator } from '../../src/coordinator/coordinator.ts';
import { createKeyAndCsr } from '../../src/shared/pki/certificates.ts';
import { CLUSTER_CHANNEL_OPTIONS, clusterChannelCredentials, type TlsCredentials } from '../../src/shared/pki/grpc-tls.ts';
import { createLogger } from '../../src/shared/log.ts';
import { orchardV1 } from '../../src/shared/proto.ts';
import { clientCredentials } from '../helpers/cluster-pki.ts';
import { killGroup, ORCHARD_BIN, type Proc, readyLine, spawnProc } from '../helpers/processes.ts';

/**
 * Coordinator access, as an attacker on 127.0.0.1 sees it: a real `orchard coordinator` process
 * with an admin key (given in its environment), asked without a key, with a wrong one, with an
 * inference key made by `orchard coordinator keys create`, and after that key is revoked. The
 * routes and gRPC methods come from the code (the router's table, the loaded proto), so one
 * added later is checked without editing this file. No key may appear in the coordinator's logs
 * (debug level) or in the arguments of any process the test starts.
 */

const execFileP = promisify(execFile);
const ADMIN_KEY = `orchard_sk_admin-${process.pid}-${Date.now()}`;
const log = createLogger('test', 'silent');
/** A concrete URL for a route pattern (`:param` and `*` filled in). */
const urlOf = (path: string) => path.replace(/:[^/]+/g, 'x').replace(/\*$/, 'x');

let dir: string;
let stateDir: string;
let coordinator: Proc;
let base: string;
let grpcAddress: string;
let caFingerprint: string;
let caCertPem: string;
let table: CoordinatorHandle;
/** Every key this test saw; none may show up in logs or process arguments. */
const secrets = new Set<string>([ADMIN_KEY]);
/** `ps` snapshots and /proc cmdlines of every process started, checked at the end. */
const argvSeen: string[] = [];

async function recordArgs(pid: number | undefined): Promise<void> {
  if (pid === undefined) return;
  argvSeen.push(await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => ''));
  argvSeen.push((await execFileP('ps', ['-eo', 'pid,args'])).stdout);
}

/** Run `orchard …` with optional stdin; records its arguments while it runs. */
function cli(args: string[], env: NodeJS.ProcessEnv = {}, stdin?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    // Nothing from the environment running the tests: no key, no state dir, no home of its own.
    // A remote CLI: it trusts the coordinator by the CA fingerprint it printed (a pin), nothing else.
    const base: NodeJS.ProcessEnv = { ...process.env, ORCHARD_HOME: join(dir, 'home'), ORCHARD_COORDINATOR_CA_SHA256: caFingerprint };
    for (const k of ['ORCHARD_API_KEY', 'ORCHARD_API_KEY_FILE', 'ORCHARD_COORDINATOR_STATE_DIR', 'ORCHARD_COORDINATOR', 'ORCHARD_CREDENTIALS']) delete base[k];
    const child = spawn(process.execPath, [ORCHARD_BIN, ...args], { env: { ...base, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    const seen = recordArgs(child.pid);
    child.stdin.end(stdin ?? '');
    child.once('error', reject);
    child.once('exit', (code) => seen.then(() => resolve({ code: code ?? 1, stdout, stderr })));
  });
}

const http = (method: string, path: string, key?: string) =>
  fetch(`${base}${path}`, { method, headers: key ? { authorization: `Bearer ${key}` } : {} }).then(async (r) => {
    // Some routes answer with a stream that does not end (SSE): the status is enough.
    const body = r.headers.get('content-type')?.includes('json') ? await r.text() : '';
    await r.body?.cancel().catch(() => undefined);
    return { status: r.status, body };
  });

type Wire = Record<string, unknown>;

/**
 * Call one Coordinator method as a raw gRPC client over TLS to the cluster CA (the attacker
 * knows the CA: it is public); `tls` adds a client certificate. Resolves to the status it ends with.
 */
function grpcCall(method: string, key: string | undefined, req: Wire = {}, tls?: TlsCredentials): Promise<{ code: grpc.status; details: string }> {
  const Ctor = orchardV1().Coordinator!;
  const def = Ctor.service[method]!;
  const client = new Ctor(grpcAddress, clusterChannelCredentials(tls ?? { caCertPem }, { role: 'coordinator' }), CLUSTER_CHANNEL_OPTIONS) as grpc.Client;
  const md = new grpc.Metadata();
  if (key) md.set('authorization', `Bearer ${key}`);
  const deadline = Date.now() + 10_000;
  return new Promise<{ code: grpc.status; details: string }>((resolve) => {
    const done = (code: grpc.status, details: string) => {
      client.close();
      resolve({ code, details });
    };
    const id = <T>(x: T) => x as unknown as Buffer;
    if (def.responseStream) {
      const call = client.makeServerStreamRequest(def.path, id, (b: Buffer) => def.responseDeserialize(b), def.requestSerialize(req) as never, md, { deadline });
      call.on('data', () => undefined);
      call.on('error', (e: grpc.ServiceError) => done(e.code, e.details));
      call.on('status', (s: grpc.StatusObject) => s.code === grpc.status.OK && done(s.code, s.details));
    } else {
      client.makeUnaryRequest(
        def.path,
        id,
        (b: Buffer) => def.responseDeserialize(b),
        def.requestSerialize(req) as never,
        md,
        { deadline },
        (e: grpc.ServiceError | null) => done(e ? e.code : grpc.status.OK, e?.details ?? ''),
      );
    }
  });
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orchard-access-'));
  stateDir = join(dir, 'coordinator');
  // The router table and the proto, from the code: an in-process coordinator without HTTP.
  table = await startCoordinator({ stateDir: join(dir, 'table'), host: '127.0.0.1', grpcPort: 0, mdns: false, api: { apiKey: 'x' }, log });
  coordinator = spawnProc(
    'coordinator',
    [ORCHARD_BIN, 'coordinator', '--json', '--grpc-port', '0', '--http-port', '0', '--host', '127.0.0.1', '--no-mdns', '--state-dir', stateDir],
    // Debug logs: every refused request is logged; none may carry the key.
    { ...process.env, ORCHARD_API_KEY: ADMIN_KEY, ORCHARD_DEBUG: '1', ORCHARD_LOG_FORMAT: 'json' },
  );
  const ready = await readyLine(coordinator, 30_000);
  await recordArgs(coordinator.child.pid);
  base = `http://127.0.0.1:${String(ready.httpPort)}`;
  grpcAddress = `127.0.0.1:${String(ready.grpcPort)}`;
  caFingerprint = String(ready.caFingerprint);
  caCertPem = await readFile(join(stateDir, 'pki', 'ca.crt'), 'utf8');
});

afterAll(async () => {
  await table?.close();
  if (coordinator) await killGroup(coordinator);
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('HTTP: every route of the router table', () => {
  let inferenceKey: string;
  beforeAll(async () => {
    const made = await cli(['coordinator', 'keys', 'create', '--scope', 'inference', '--name', 'reader', '--json', '--state-dir', stateDir]);
    expect(made.code, made.stderr).toBe(0);
    inferenceKey = (JSON.parse(made.stdout) as { key: string }).key;
    secrets.add(inferenceKey);
  });

  it('401 without a key (and with a wrong one) except the public list, which answers without', async () => {
    const routes = table.routes();
    expect(routes.length).toBeGreaterThan(15);
    const publicOnes = routes.filter((r) => r.scope === 'public').map((r) => `${r.method} ${r.path}`);
    // /metrics is not public unless --metrics-public; the console's static files and /healthz are.
    expect(publicOnes).not.toContain('GET /metrics');
    expect(publicOnes).toContain('GET /healthz');
    for (const r of routes) {
      const what = `${r.method} ${r.path}`;
      const without = await http(r.method, urlOf(r.path));
      if (r.scope === 'public') {
        expect(without.status, what).toBe(200);
        continue;
      }
      expect(without.status, what).toBe(401);
      if (r.method !== 'HEAD') expect(JSON.parse(without.body).error.code, what).toBe('missing_api_key');
      expect((await http(r.method, urlOf(r.path), 'orchard_sk_wrong')).status, what).toBe(401);
    }
  });

  it('an inference key: 403 (OpenAI-shaped) on every admin route, neither 401 nor 403 on inference routes', async () => {
    const checked = { admin: 0, inference: 0 };
    for (const r of table.routes()) {
      if (r.scope === 'public') continue;
      const what = `${r.method} ${r.path}`;
      const res = await http(r.method, urlOf(r.path), inferenceKey);
      checked[r.scope]++;
      if (r.scope === 'admin') {
        expect(res.status, what).toBe(403);
        if (r.method !== 'HEAD') expect(JSON.parse(res.body).error, what).toMatchObject({ type: 'permission_error', code: 'insufficient_scope' });
      } else expect([401, 403], what).not.toContain(res.status);
    }
    expect(checked.admin).toBeGreaterThanOrEqual(4);
    expect(checked.inference).toBeGreaterThanOrEqual(4);
    // The generation and model routes by name, so a scope change there cannot pass unnoticed.
    expect((await http('GET', '/v1/models', inferenceKey)).status).toBe(200);
    expect((await http('GET', '/metrics', inferenceKey)).status).toBe(200);
    expect((await http('POST', '/v1/cluster/models', inferenceKey)).status).toBe(403);
    expect((await http('DELETE', '/v1/cluster/models/m', inferenceKey)).status).toBe(403);
  });

  it('/v1/console/session tells the real scope of the key', async () => {
    expect(JSON.parse((await http('GET', '/v1/console/session', inferenceKey)).body).scope).toBe('inference');
    expect(JSON.parse((await http('GET', '/v1/console/session', ADMIN_KEY)).body).scope).toBe('admin');
  });
});

describe('gRPC: every Coordinator method of the proto', () => {
  const methods = Object.keys(orchardV1().Coordinator!.service);

  it('UNAUTHENTICATED without a credential, for every method but Join (which checks its join token)', async () => {
    expect(methods.length).toBeGreaterThanOrEqual(6);
    const { csrPem } = await createKeyAndCsr('intruder');
    for (const m of methods) {
      const r = await grpcCall(m, undefined, m === 'Join' ? { csr: csrPem } : {});
      if (m === 'Join') {
        expect(r.code, m).toBe(grpc.status.PERMISSION_DENIED);
        expect(r.details).toMatch(/a join token is required/);
      } else {
        expect(r.code, `${m}: ${r.details}`).toBe(grpc.status.UNAUTHENTICATED);
        expect((await grpcCall(m, 'orchard_sk_wrong')).code, m).toBe(grpc.status.UNAUTHENTICATED);
      }
    }
  });

  it('plaintext gRPC is not served at all; a node certificate is no admin credential', async () => {
    const Ctor = orchardV1().Coordinator!;
    const plain = new Ctor(grpcAddress, grpc.credentials.createInsecure()) as grpc.Client & Record<string, (...a: unknown[]) => unknown>;
    const code = await new Promise<grpc.status>((resolve) => plain.status!({}, { deadline: Date.now() + 5000 }, (e: grpc.ServiceError | null) => resolve(e ? e.code : grpc.status.OK)));
    plain.close();
    expect(code).toBe(grpc.status.UNAVAILABLE);
    const ca = { clusterId: 'x', certPem: caCertPem, keyPem: await readFile(join(stateDir, 'pki', 'ca.key'), 'utf8') };
    const node = await clientCredentials(ca, 'node', 'some-node');
    for (const m of methods.filter((x) => x !== 'Join')) expect((await grpcCall(m, undefined, {}, node)).code, m).toBe(grpc.status.UNAUTHENTICATED);
  });

  it('an admin certificate from `orchard coordinator credentials` passes every guard (CLI: --credentials)', async () => {
    const bundle = join(dir, 'admin.json');
    const made = await cli(['coordinator', 'credentials', '--out', bundle, '--state-dir', stateDir]);
    expect(made.code, made.stderr).toBe(0);
    expect((await stat(bundle)).mode & 0o777).toBe(0o600);
    const admin = JSON.parse(await readFile(bundle, 'utf8')) as TlsCredentials;
    secrets.add(admin.keyPem.trim());
    // Past the guard: unloading an unknown model is the runtime's NOT_FOUND.
    expect((await grpcCall('Unload', undefined, { name: 'nope' }, admin)).code).toBe(grpc.status.NOT_FOUND);
    const st = await cli(['status', '--json', '--coordinator', grpcAddress, '--credentials', bundle], { ORCHARD_COORDINATOR_CA_SHA256: '' });
    expect(st.code, st.stderr).toBe(0);
  });

  it('an inference key: PERMISSION_DENIED on Load and Unload (and every admin method), through on Status', async () => {
    const made = await cli(['coordinator', 'keys', 'create', '--scope', 'inference', '--json', '--state-dir', stateDir]);
    const key = (JSON.parse(made.stdout) as { key: string }).key;
    secrets.add(key);
    for (const m of methods) {
      const needed = GRPC_METHOD_SCOPES[m] ?? 'admin';
      if (needed !== 'admin') continue;
      expect((await grpcCall(m, key, { name: 'x', modelPath: '/nonexistent.gguf' })).code, m).toBe(grpc.status.PERMISSION_DENIED);
    }
    expect((await grpcCall('Load', key, { modelPath: '/nonexistent.gguf' })).code).toBe(grpc.status.PERMISSION_DENIED);
    expect((await grpcCall('Status', key)).code).toBe(grpc.status.OK);
    // The admin key gets past the guard: Unload of an unknown model is the runtime's answer.
    expect((await grpcCall('Unload', ADMIN_KEY, { name: 'nope' })).code).not.toBe(grpc.status.PERMISSION_DENIED);
    expect((await grpcCall('Unload', ADMIN_KEY, { name: 'nope' })).code).not.toBe(grpc.status.UNAUTHENTICATED);
  });
});

describe('keys through the CLI', () => {
  it('a created key works, a revoked one stops working at the next call; list never shows a secret', async () => {
    const made = await cli(['coordinator', 'keys', 'create', '--scope', 'admin', '--name', 'ops', '--state-dir', stateDir]);
    expect(made.code, made.stderr).toBe(0);
    const key = made.stdout.trim();
    secrets.add(key);
    expect(key).toMatch(/^orchard_sk_/);
    expect(made.stderr).not.toContain(key);
    expect((await stat(join(stateDir, 'api-keys.json'))).mode & 0o777).toBe(0o600);
    expect((await stat(join(stateDir, 'admin-key'))).mode & 0o777).toBe(0o600);
    const stored = await readFile(join(stateDir, 'api-keys.json'), 'utf8');
    expect(stored).not.toContain(key);

    // The key in a file (never on the command line), and on stdin.
    const keyFile = join(dir, 'ops.key');
    await writeFile(keyFile, `${key}\n`, { mode: 0o600 });
    const viaFile = await cli(['status', '--json', '--coordinator', grpcAddress, '--api-key-file', keyFile]);
    expect(viaFile.code, viaFile.stderr).toBe(0);
    expect(JSON.parse(viaFile.stdout).clusterId).toBeTruthy();
    const viaStdin = await cli(['status', '--json', '--coordinator', grpcAddress, '--api-key-file', '-'], {}, `${key}\n`);
    expect(viaStdin.code, viaStdin.stderr).toBe(0);
    expect((await http('POST', '/v1/cluster/models', key)).status).toBe(400);

    const list = await cli(['coordinator', 'keys', 'list', '--json', '--state-dir', stateDir]);
    expect(JSON.parse(list.stdout)).toEqual(expect.arrayContaining([expect.objectContaining({ name: 'ops', scope: 'admin' }), expect.objectContaining({ name: 'reader', scope: 'inference' })]));
    for (const s of secrets) expect(list.stdout).not.toContain(s);

    const revoked = await cli(['coordinator', 'keys', 'revoke', 'ops', '--state-dir', stateDir]);
    expect(revoked.code, revoked.stderr).toBe(0);
    expect((await http('GET', '/v1/models', key)).status).toBe(401);
    expect((await grpcCall('Status', key)).code).toBe(grpc.status.UNAUTHENTICATED);
    const after = await cli(['status', '--coordinator', grpcAddress, '--api-key-file', keyFile]);
    expect(after.code).not.toBe(0);
    expect(after.stderr).toMatch(/refused the credential/);
  });

  it('without a key the CLI on the coordinator machine uses the local admin key; elsewhere it is refused', async () => {
    const local = await cli(['status', '--json', '--coordinator', grpcAddress], { ORCHARD_COORDINATOR_STATE_DIR: stateDir });
    expect(local.code, local.stderr).toBe(0);
    secrets.add((await readFile(join(stateDir, 'admin-key'), 'utf8')).trim());
    const remote = await cli(['status', '--coordinator', grpcAddress], { ORCHARD_HOME: join(dir, 'elsewhere') });
    expect(remote.code).not.toBe(0);
    expect(remote.stderr).toMatch(/missing credential/);
    // No CA to check the server by (no local state dir, no pin, no bundle): the CLI sends nothing.
    const blind = await cli(['status', '--coordinator', grpcAddress, '--api-key-file', join(dir, 'ops.key')], { ORCHARD_HOME: join(dir, 'elsewhere'), ORCHARD_COORDINATOR_CA_SHA256: '' });
    expect(blind.code).toBe(1);
    expect(blind.stderr).toMatch(/cannot verify the coordinator/);
  });

  it('no key in the coordinator logs or in the arguments of any process started', async () => {
    await recordArgs(coordinator.child.pid);
    expect(coordinator.err).toContain('HTTP request refused');
    expect(argvSeen.length).toBeGreaterThan(10);
    for (const s of secrets) {
      expect(coordinator.err, 'coordinator stderr').not.toContain(s);
      expect(coordinator.out, 'coordinator stdout').not.toContain(s);
      for (const a of argvSeen) expect(a).not.toContain(s);
    }
  });
});

describe('--metrics-public', () => {
  it('serves /metrics without a key and nothing else opens', async () => {
    const c = await startCoordinator({ stateDir: join(dir, 'mp'), host: '127.0.0.1', grpcPort: 0, httpPort: 0, mdns: false, api: { apiKey: 'k', metricsPublic: true }, log });
    try {
      const b = `http://127.0.0.1:${c.httpPort}`;
      expect((await fetch(`${b}/metrics`)).status).toBe(200);
      expect(c.routes().filter((r) => r.scope === 'public' && !r.path.startsWith('/console') && r.path !== '/' && !r.path.includes('.')).map((r) => r.path).sort()).toEqual(['/healthz', '/healthz', '/metrics', '/metrics']);
      expect((await fetch(`${b}/status`)).status).toBe(401);
    } finally {
      await c.close();
    }
  });
});
