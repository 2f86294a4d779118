import { describe, expect, it } from 'vitest';
import { EngineRequestError, engineCommand, engineEnv, engineSpecFromRequest, sameEngineRequest } from '../../src/node/engine-spec.ts';

const bins = { llamaServer: '/b/llama-server', rpcServer: '/b/ggml-rpc-server' };

function refusal(req: unknown): { code: string; message: string } {
  try {
    engineSpecFromRequest(req);
  } catch (err) {
    if (err instanceof EngineRequestError) return { code: err.code, message: err.message };
    throw err;
  }
  throw new Error('accepted');
}

const LLAMA = {
  modelPath: '/m.gguf',
  context: 2048,
  parallel: 1,
  kvUnified: true,
  cacheType: 'f16',
  ubatch: 512,
  flashAttention: true,
  // typed targets: one on this node (no tunnel), one on another node's tunnel
  rpc: [
    { nodeId: 'self', enginePort: 6000 },
    { nodeId: 'worker-2', tunnelHost: '10.0.0.2', tunnelPort: 7000, enginePort: 6001 },
  ],
  devices: ['RPC0', 'RPC1'],
  tensorSplit: [4, 5],
  gpuLayers: 9,
  debugLog: false,
};

describe('StartEngine request → engine spec', () => {
  it('rpc-server: its Unix socket only (no host, no port), defaults for timeout, exact command line, allow-listed environment', () => {
    const spec = engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER' });
    expect(spec).toMatchObject({ kind: 'rpc-server', port: 0, readyTimeoutMs: 30_000 });
    const env = { PATH: '/bin', HOME: '/h', LD_PRELOAD: '/evil.so', DYLD_INSERT_LIBRARIES: '/e', PYTHONPATH: '/p', LLAMA_ARG_LOG_FILE: '/x', LC_ALL: 'C' };
    expect(engineCommand(spec, 50052, bins, env, '/s/rpc-50052.sock')).toEqual({ file: '/b/ggml-rpc-server', argv: ['-H', 'unix:/s/rpc-50052.sock'], env: { PATH: '/bin', HOME: '/h', LC_ALL: 'C' } });
    expect(() => engineCommand(spec, 50052, bins, env)).toThrow(/socket/);
  });

  it('rpc-server with threads, devices and a tensor cache dir', () => {
    const spec = engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', port: 6000, threads: 4, devices: ['MTL0', 'CPU'], cacheDir: '/var/cache/orchard', readyTimeoutSeconds: 2.5 });
    expect(spec.readyTimeoutMs).toBe(2500);
    expect(engineCommand(spec, 6000, bins, {}, '/s/rpc-6000.sock')).toEqual({
      file: '/b/ggml-rpc-server',
      argv: ['-H', 'unix:/s/rpc-6000.sock', '-t', '4', '-d', 'MTL0,CPU', '-c'],
      // rpc-server keeps its cache in $LLAMA_CACHE/rpc/
      env: { LLAMA_CACHE: '/var/cache/orchard' },
    });
  });

  it('llama-server: the agent builds every argument from the typed options, loopback host and port last', () => {
    const parsed = engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: LLAMA, threads: 2 });
    expect(parsed.readyTimeoutMs).toBe(600_000);
    expect(parsed.llama?.rpc).toEqual([
      { nodeId: 'self', enginePort: 6000 },
      { nodeId: 'worker-2', tunnel: { host: '10.0.0.2', port: 7000 }, enginePort: 6001 },
    ]);
    // --rpc carries only the loopback endpoints the agent resolved (the second a forwarder), never a target's address
    const spec = { ...parsed, rpcEndpoints: ['127.0.0.1:6000', '127.0.0.1:6001'] };
    // The RPC client offers weights over 64 KiB by hash (the patched engine's threshold), as the agents pre-seed.
    expect(engineCommand(spec, 8080, bins, {}).env).toEqual({ GGML_RPC_CACHE_MIN_SIZE: String(64 * 1024) });
    expect(engineCommand(spec, 8080, bins, {}).argv).toEqual([
      ...['-m', '/m.gguf', '-c', '2048', '-np', '1', '--kv-unified', '-ctk', 'f16', '-ctv', 'f16', '-ub', '512', '-fa', 'on', '-fit', 'off', '--no-repack', '--cache-ram', '0'],
      ...['--rpc', '127.0.0.1:6000,127.0.0.1:6001', '--device', 'RPC0,RPC1', '--split-mode', 'layer', '-ngl', '9', '--tensor-split', '4,5'],
      ...['--metrics', '--no-webui', '-lv', '4', '--threads', '2', '--host', '127.0.0.1', '--port', '8080'],
    ]);
  });

  it('llama-server: known tensor hashes become the engine file text, only for a head with rpc-servers', () => {
    const tensorHashes = [
      { name: 'blk.0.attn_q.weight', bytes: '2097152', hash: '0123456789abcdef' },
      { name: 'output.weight', bytes: '65536000', hash: 'fedcba9876543210' },
    ];
    const parsed = engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, tensorHashes } });
    const withRpc = engineCommand({ ...parsed, rpcEndpoints: ['127.0.0.1:6000', '127.0.0.1:6001'] }, 8080, bins, {});
    expect(withRpc.knownHashes).toBe('blk.0.attn_q.weight 2097152 0123456789abcdef\noutput.weight 65536000 fedcba9876543210\n');
    // the variable itself is set by spawnEngine with the private file's path, never from the request
    expect(withRpc.env).toEqual({ GGML_RPC_CACHE_MIN_SIZE: String(64 * 1024) });
    const noRpc = engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, rpc: [], devices: [], tensorSplit: [], tensorHashes } });
    expect(engineCommand({ ...noRpc, rpcEndpoints: [] }, 8080, bins, {}).knownHashes).toBeUndefined();
  });

  it.each([
    [{ name: 'blk.0 x', bytes: '1', hash: '0123456789abcdef' }, /tensor_hashes name/],
    [{ name: 'a'.repeat(64), bytes: '1', hash: '0123456789abcdef' }, /tensor_hashes name/],
    [{ name: 'blk.0.w', bytes: '1', hash: '0123456789ABCDEF' }, /16 lowercase hex/],
    [{ name: 'blk.0.w', bytes: '0', hash: '0123456789abcdef' }, /bytes/],
    [{ name: 'blk.0.w', bytes: '1', hash: '0123456789abcdef', path: '/x' }, /path/],
  ])('refuses a malformed known tensor hash %j', (h, re) => {
    expect(() => engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, tensorHashes: [h] } })).toThrow(re);
  });

  it('keeps LLAMA_ARG_*, LD_PRELOAD, DYLD_* and PYTHON* of the agent away from engines', () => {
    expect(engineEnv({ PATH: '/bin', LD_PRELOAD: 'x', DYLD_INSERT_LIBRARIES: 'x', PYTHONSTARTUP: 'x', LLAMA_ARG_LOG_FILE: 'x', TMPDIR: '/t' })).toEqual({ PATH: '/bin', TMPDIR: '/t' });
  });

  it.each([
    [{ kind: 'ENGINE_KIND_UNSPECIFIED' }, /unknown engine kind/],
    [{ kind: 'ENGINE_KIND_BOGUS' }, /unknown engine kind "ENGINE_KIND_BOGUS"/],
    [{}, /unknown engine kind/],
    [{ kind: 'ENGINE_KIND_MLX_RANK' }, /needs the mlx field/],
    [{ kind: 'ENGINE_KIND_MLX_RANK', port: 5, mlx: { modelDir: '/m' } }, /mlx field only/],
    [{ kind: 'ENGINE_KIND_MLX_RANK', env: { MLX_RANK: '1' }, mlx: { modelDir: '/m' } }, /env/],
    [{ kind: 'ENGINE_KIND_MLX_RANK', mlx: { modelDir: 'rel' } }, /absolute path/],
    // no address a rank could listen on: the old free-form hosts are gone, a ring is typed targets only
    [{ kind: 'ENGINE_KIND_MLX_RANK', mlx: { modelDir: '/m', worldSize: 2, rank: 0, backend: 'ring', hosts: [{ endpoints: ['10.0.0.2:5000'] }, { endpoints: ['127.0.0.1:5001'] }] } }, /ring needs 2 ring_ranks/],
    [{ kind: 'ENGINE_KIND_MLX_RANK', mlx: { modelDir: '/m', worldSize: 2, rank: 0, backend: 'ring', ringRanks: [{ nodeId: 'a', enginePort: 5000, host: '0.0.0.0' }, { nodeId: 'b', enginePort: 5001 }] } }, /Unrecognized key/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', port: 70000 }, /port/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', bindHost: '0.0.0.0' }, /bindHost/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', env: { LD_PRELOAD: '/evil.so' } }, /env/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['--log-file', '/etc/passwd'] }, /args/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', env: { LLAMA_ARG_LOG_FILE: '/etc/passwd' }, llama: LLAMA }, /env/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER' }, /needs the llama field/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, modelPath: 'm.gguf' } }, /absolute path/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, logFile: '/x' } }, /logFile/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, rpc: ['evil.example:1'] } }, /llama\.rpc\.0/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, rpc: [{ nodeId: 'n', tunnelHost: 'h;rm -rf', tunnelPort: 1, enginePort: 2 }] } }, /tunnel_host/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, rpc: [{ nodeId: 'n', tunnelHost: '10.0.0.2', enginePort: 2 }] } }, /go together/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, rpc: [{ nodeId: 'n', enginePort: 0 }] } }, /enginePort/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, rpc: [{ nodeId: '../x', enginePort: 1 }] } }, /node id/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, rpc: [{ nodeId: 'n', enginePort: 1, host: '1.2.3.4' }] } }, /host/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, devices: ['RPC0 --log-file /x'] } }, /devices/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, cacheType: 'f16 -x' } }, /cacheType/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, tensorSplit: [1] } }, /one entry per/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', llama: { ...LLAMA, modelPath: '/m\0' } }, /NUL/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', cacheDir: 'rel/dir' }, /absolute path/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', cacheDir: '/c', llama: LLAMA }, /rpc-server only/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', llama: LLAMA }, /LLAMA_SERVER only/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', devices: ['MTL0;rm'] }, /device/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', engineId: '../x' }, /engine_id/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', readyTimeoutSeconds: -1 }, /readyTimeoutSeconds/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', port: 'x' }, /port/],
  ])('refuses %j with INVALID_ARGUMENT', (req, message) => {
    const r = refusal(req);
    expect(r.code).toBe('INVALID_ARGUMENT');
    expect(r.message).toMatch(message);
  });

  it('a retry of the same request matches the running engine; a changed one does not', () => {
    const running = { ...engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2 }), port: 6001 };
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2 }))).toBe(true);
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2, port: 6001 }))).toBe(true);
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 3 }))).toBe(false);
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2, port: 7000 }))).toBe(false);
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2, owner: 'other' }))).toBe(false);
  });
});
