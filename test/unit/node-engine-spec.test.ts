import { describe, expect, it } from 'vitest';
import { EngineRequestError, engineCommand, engineSpecFromRequest, readinessHost, sameEngineRequest } from '../../src/node/engine-spec.ts';

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

describe('StartEngine request → engine spec', () => {
  it('rpc-server: loopback by default, defaults for timeout, exact command line', () => {
    const spec = engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER' });
    expect(spec).toMatchObject({ kind: 'rpc-server', bindHost: '127.0.0.1', port: 0, readyTimeoutMs: 30_000 });
    expect(engineCommand(spec, 50052, bins)).toEqual({ file: '/b/ggml-rpc-server', argv: ['-H', '127.0.0.1', '-p', '50052'], env: {} });
  });

  it('rpc-server with threads, devices and a tensor cache dir', () => {
    const spec = engineSpecFromRequest({
      kind: 'ENGINE_KIND_RPC_SERVER',
      bindHost: '10.0.0.2',
      port: 6000,
      threads: 4,
      devices: ['MTL0', 'CPU'],
      cacheDir: '/var/cache/orchard',
      env: { GGML_RPC_NO_RDMA: '1' },
      readyTimeoutSeconds: 2.5,
    });
    expect(spec.readyTimeoutMs).toBe(2500);
    expect(engineCommand(spec, 6000, bins)).toEqual({
      file: '/b/ggml-rpc-server',
      argv: ['-H', '10.0.0.2', '-p', '6000', '-t', '4', '-d', 'MTL0,CPU', '-c'],
      // rpc-server keeps its cache in $LLAMA_CACHE/rpc/
      env: { GGML_RPC_NO_RDMA: '1', LLAMA_CACHE: '/var/cache/orchard' },
    });
  });

  it('llama-server: caller args first, then the agent-owned loopback host and port', () => {
    const spec = engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['-m', '/m.gguf', '--rpc', '10.0.0.2:6000', '-ngl', '99'], threads: 2 });
    expect(spec.bindHost).toBe('127.0.0.1');
    expect(spec.readyTimeoutMs).toBe(600_000);
    expect(engineCommand(spec, 8080, bins).argv).toEqual(['-m', '/m.gguf', '--rpc', '10.0.0.2:6000', '-ngl', '99', '--threads', '2', '--host', '127.0.0.1', '--port', '8080']);
    // an explicit -t in args wins over the threads field
    const own = engineSpecFromRequest({ kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['-t', '1'], threads: 2 });
    expect(engineCommand(own, 1, bins).argv).toEqual(['-t', '1', '--host', '127.0.0.1', '--port', '1']);
  });

  it.each([
    [{ kind: 'ENGINE_KIND_UNSPECIFIED' }, 'INVALID_ARGUMENT', /unknown engine kind/],
    [{ kind: 'ENGINE_KIND_BOGUS' }, 'INVALID_ARGUMENT', /unknown engine kind "ENGINE_KIND_BOGUS"/],
    [{}, 'INVALID_ARGUMENT', /unknown engine kind/],
    [{ kind: 'ENGINE_KIND_MLX_RANK' }, 'INVALID_ARGUMENT', /needs the mlx field/],
    [{ kind: 'ENGINE_KIND_MLX_RANK', args: ['-x'], mlx: { modelDir: '/m' } }, 'INVALID_ARGUMENT', /mlx field only/],
    [{ kind: 'ENGINE_KIND_MLX_RANK', env: { MLX_RANK: '1' }, mlx: { modelDir: '/m' } }, 'INVALID_ARGUMENT', /set by the agent/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', port: 70000 }, 'INVALID_ARGUMENT', /invalid port 70000/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', bindHost: 'example.com' }, 'INVALID_ARGUMENT', /give an IP address/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', bindHost: '0.0.0.0' }, 'INVALID_ARGUMENT', /always binds 127.0.0.1/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['--host', '0.0.0.0'] }, 'INVALID_ARGUMENT', /--host is set by the agent/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['--port=9'] }, 'INVALID_ARGUMENT', /--port is set by the agent/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['--log-file', '/etc/passwd'] }, 'INVALID_ARGUMENT', /writes files/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', args: ['--slot-save-path=/tmp'] }, 'INVALID_ARGUMENT', /writes files/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', args: ['-x'] }, 'INVALID_ARGUMENT', /args apply to llama-server only/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', cacheDir: 'rel/dir' }, 'INVALID_ARGUMENT', /absolute path/],
    [{ kind: 'ENGINE_KIND_LLAMA_SERVER', cacheDir: '/c' }, 'INVALID_ARGUMENT', /rpc-server only/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', devices: ['MTL0;rm'] }, 'INVALID_ARGUMENT', /invalid device/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', engineId: '../x' }, 'INVALID_ARGUMENT', /invalid engine_id/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', env: { 'A=B': 'c' } }, 'INVALID_ARGUMENT', /environment variable name/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', readyTimeoutSeconds: -1 }, 'INVALID_ARGUMENT', /ready_timeout_seconds/],
    [{ kind: 'ENGINE_KIND_RPC_SERVER', port: 'x' }, 'INVALID_ARGUMENT', /malformed/],
  ])('refuses %j with %s', (req, code, message) => {
    const r = refusal(req);
    expect(r.code).toBe(code);
    expect(r.message).toMatch(message);
  });

  it('readiness is probed on loopback when the engine binds a wildcard', () => {
    expect(readinessHost('0.0.0.0')).toBe('127.0.0.1');
    expect(readinessHost('::')).toBe('::1');
    expect(readinessHost('10.0.0.2')).toBe('10.0.0.2');
  });

  it('a retry of the same request matches the running engine; a changed one does not', () => {
    const running = { ...engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2 }), port: 6001 };
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2 }))).toBe(true);
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2, port: 6001 }))).toBe(true);
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 3 }))).toBe(false);
    expect(sameEngineRequest(running, engineSpecFromRequest({ kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'w1', threads: 2, port: 7000 }))).toBe(false);
  });
});
