/**
 * One model load through a ggml-rpc-server with a byte-counting TCP proxy in front of it: how many
 * bytes llama-server sends to the rpc-server until /health is ready, and how long that takes.
 * Shared by `bench/rpc-cache.ts` and `test/integration/rpc-cache.test.ts`.
 *
 * Layout (CPU-only build here): llama-server's only offload device is the RPC device, so every
 * layer and the output layer live on the one rpc-server — the stage is "all layers + output".
 * `--no-warmup` so the count is the load (weights + buffer set-up), not a warm-up decode.
 * Every process is started in its own process group and killed (group) before returning.
 */
import { type Server, type Socket, connect, createServer } from 'node:net';
import { pickFreePort } from '../src/node/ports.ts';
import { rpcCacheMinSizeEnv } from '../src/shared/rpc-cache/plan.ts';
import { killGroup, type Proc, sleep, spawnProc } from '../test/helpers/processes.ts';
import { waitForPort } from './lib/cluster.ts';

export interface RpcLoadOptions {
  readonly rpcServer: string;
  readonly llamaServer: string;
  readonly model: string;
  /** LLAMA_CACHE for the rpc-server (`-c`); entries in `<dir>/rpc/`. */
  readonly llamaCacheDir: string;
  readonly threads?: number;
  readonly timeoutMs?: number;
  /** Extra environment for llama-server only (e.g. another GGML_RPC_CACHE_MIN_SIZE). */
  readonly headEnv?: Readonly<Record<string, string>>;
  /** After the load, greedy tokens for this prompt (checks the weights the load left on the server). */
  readonly generate?: { readonly prompt: string; readonly nPredict: number };
}

export interface RpcLoadResult {
  /** Bytes llama-server sent to the rpc-server (head → worker) until ready. */
  readonly bytesToServer: number;
  readonly bytesFromServer: number;
  /** From spawning llama-server until /health answers 200. */
  readonly loadSeconds: number;
  /** Greedy token ids for `generate`, when asked. */
  readonly tokens?: number[];
}

/** A TCP proxy that counts bytes each way. */
async function countingProxy(target: number): Promise<{ port: number; up: () => number; down: () => number; close: () => Promise<void> }> {
  let up = 0;
  let down = 0;
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    const upstream = connect(target, '127.0.0.1');
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    sockets.add(client);
    sockets.add(upstream);
    client.on('data', (d: Buffer) => {
      up += d.length;
    });
    upstream.on('data', (d: Buffer) => {
      down += d.length;
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const end = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const a = server.address();
  const port = typeof a === 'object' && a ? a.port : 0;
  return {
    port,
    up: () => up,
    down: () => down,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

export async function measureRpcLoad(o: RpcLoadOptions): Promise<RpcLoadResult> {
  const threads = String(o.threads ?? 1);
  const deadline = Date.now() + (o.timeoutMs ?? 300_000);
  const children: Proc[] = [];
  let proxy: Awaited<ReturnType<typeof countingProxy>> | undefined;
  try {
    const rpcPort = await pickFreePort('127.0.0.1');
    const rpcEnv = { ...process.env, LLAMA_CACHE: o.llamaCacheDir, GGML_RPC_NO_RDMA: '1' };
    const rpc = spawnProc('ggml-rpc-server', ['-H', '127.0.0.1', '-p', String(rpcPort), '-t', threads, '-c'], rpcEnv, o.rpcServer);
    children.push(rpc);
    await waitForPort('127.0.0.1', rpcPort, deadline - Date.now(), 'ggml-rpc-server', () => rpc.child.exitCode === null).catch((err: Error) => {
      throw new Error(`${err.message}: ${(rpc.out + rpc.err).slice(-2000)}`);
    });
    proxy = await countingProxy(rpcPort);
    const httpPort = await pickFreePort('127.0.0.1');
    const t0 = performance.now();
    const headArgs = ['-m', o.model, '--rpc', `127.0.0.1:${proxy.port}`, '-ngl', '99', '-c', '512', '-t', threads, '--no-warmup', '--host', '127.0.0.1', '--port', String(httpPort)];
    // The head's hash threshold as the agent sets it (engine-spec.ts); headEnv may override it.
    const headEnv = { ...process.env, GGML_RPC_NO_RDMA: '1', ...rpcCacheMinSizeEnv(), ...(o.headEnv ?? {}) };
    const head = spawnProc('llama-server', headArgs, headEnv, o.llamaServer);
    children.push(head);
    for (;;) {
      if (head.child.exitCode !== null) throw new Error(`llama-server exited (${head.child.exitCode}): ${head.err.slice(-2000)}`);
      if (await fetch(`http://127.0.0.1:${httpPort}/health`).then((r) => r.status === 200, () => false)) break;
      if (Date.now() > deadline) throw new Error(`llama-server not ready: ${head.err.slice(-2000)}`);
      await sleep(50);
    }
    const loadSeconds = (performance.now() - t0) / 1000;
    const bytes = { bytesToServer: proxy.up(), bytesFromServer: proxy.down(), loadSeconds };
    if (!o.generate) return bytes;
    const res = await fetch(`http://127.0.0.1:${httpPort}/completion`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: o.generate.prompt, n_predict: o.generate.nPredict, temperature: 0, return_tokens: true, cache_prompt: false }),
    });
    return { ...bytes, tokens: ((await res.json()) as { tokens: number[] }).tokens };
  } finally {
    for (const c of children.reverse()) await killGroup(c);
    await proxy?.close();
  }
}
