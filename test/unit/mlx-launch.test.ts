import { describe, expect, it } from 'vitest';
import { UsageError } from '../../src/shared/errors.ts';
import { evenSplit, jacclDevicesFile, launchFiles, rankEnv, ringHostfile, splitFromRanges, workerArgs } from '../../src/node/mlx/launch.ts';
import { mlxPins, mlxProcessEnv, mlxVenvDir } from '../../src/node/mlx/env.ts';
import { cacheRoot } from '../../src/shared/cache-dir.ts';

describe('ring hostfile', () => {
  it('is a JSON array of ip:port arrays in rank order', () => {
    const text = ringHostfile([['127.0.0.1:41000'], ['127.0.0.1:41001'], ['10.0.0.2:5000', '10.0.1.2:5000']]);
    expect(JSON.parse(text)).toEqual([['127.0.0.1:41000'], ['127.0.0.1:41001'], ['10.0.0.2:5000', '10.0.1.2:5000']]);
  });
  it.each([
    [[['127.0.0.1:41000']], /at least 2/],
    [[['localhost:41000'], ['127.0.0.1:41001']], /literal IPv4/],
    [[['[::1]:41000'], ['127.0.0.1:41001']], /literal IPv4/],
    [[['127.0.0.1:0'], ['127.0.0.1:41001']], /bad port/],
    [[['127.0.0.1:70000'], ['127.0.0.1:41001']], /bad port/],
    [[['127.0.0.1'], ['127.0.0.1:41001']], /literal IPv4/],
    [[['127.0.0.1:41000'], []], /no endpoint/],
    [[['127.0.0.1:41000'], ['127.0.0.1:41000']], /used twice/],
  ])('rejects %j', (eps, msg) => {
    expect(() => ringHostfile(eps)).toThrow(UsageError);
    expect(() => ringHostfile(eps)).toThrow(msg);
  });
});

describe('JACCL device matrix', () => {
  const m = [
    [null, 'rdma_en3', 'rdma_en4'],
    ['rdma_en3', null, 'rdma_en5'],
    ['rdma_en4', 'rdma_en5', null],
  ];
  it('round-trips an N×N matrix with a null diagonal', () => {
    expect(JSON.parse(jacclDevicesFile(m))).toEqual(m);
  });
  it('rejects a non-null diagonal, a missing device and a ragged row', () => {
    expect(() => jacclDevicesFile([['x', 'a'], ['a', null]])).toThrow(/diagonal/);
    expect(() => jacclDevicesFile([[null, null], ['a', null]])).toThrow(/\[0\]\[1\]/);
    expect(() => jacclDevicesFile([[null, 'a'], ['a']])).toThrow(/row 1/);
    expect(() => jacclDevicesFile([[null]])).toThrow(/at least 2/);
  });
});

describe('rank environment', () => {
  it('ring: MLX_RANK and MLX_HOSTFILE only', () => {
    const launch = { backend: 'ring' as const, endpoints: [['127.0.0.1:1'], ['127.0.0.1:2']] };
    expect(rankEnv(launch, 1, '/tmp/h.json')).toEqual({ MLX_RANK: '1', MLX_HOSTFILE: '/tmp/h.json' });
    expect(launchFiles(launch).name).toBe('MLX_HOSTFILE');
  });
  it('jaccl: rank, device matrix, coordinator, optional ring flag', () => {
    const launch = { backend: 'jaccl' as const, devices: [[null, 'rdma_en3'], ['rdma_en3', null]], coordinator: '192.168.7.1:52100' };
    expect(rankEnv(launch, 0, '/tmp/d.json')).toEqual({
      MLX_RANK: '0',
      MLX_IBV_DEVICES: '/tmp/d.json',
      MLX_JACCL_COORDINATOR: '192.168.7.1:52100',
    });
    expect(rankEnv({ ...launch, ring: true }, 1, '/tmp/d.json').MLX_JACCL_RING).toBe('1');
    expect(() => rankEnv({ ...launch, coordinator: 'mac1.local:52100' }, 0, '/tmp/d.json')).toThrow(/IPv4/);
    expect(launchFiles(launch)).toEqual({ name: 'MLX_IBV_DEVICES', content: `${JSON.stringify(launch.devices)}\n` });
  });
  it('single process: no distributed variables at all', () => {
    expect(rankEnv(undefined, 0)).toEqual({});
    expect(() => rankEnv(undefined, 1)).toThrow(UsageError);
  });
  it('rejects ranks outside the group and a missing file path', () => {
    const launch = { backend: 'ring' as const, endpoints: [['127.0.0.1:1'], ['127.0.0.1:2']] };
    expect(() => rankEnv(launch, 2, '/h')).toThrow(/outside 0..1/);
    expect(() => rankEnv(launch, -1, '/h')).toThrow(/outside/);
    expect(() => rankEnv(launch, 0)).toThrow(/launch file/);
  });
});

describe('layer splits', () => {
  it('even split gives the remainder to low ranks', () => {
    expect(evenSplit(4, 2)).toEqual([2, 2]);
    expect(evenSplit(7, 3)).toEqual([3, 2, 2]);
    expect(evenSplit(3, 3)).toEqual([1, 1, 1]);
    expect(() => evenSplit(2, 3)).toThrow(UsageError);
  });
  it('plan ranges become per-rank counts; gaps, overlaps and short covers are refused', () => {
    expect(splitFromRanges([{ start: 0, end: 10 }, { start: 10, end: 32 }], 32)).toEqual([10, 22]);
    expect(() => splitFromRanges([{ start: 0, end: 10 }, { start: 11, end: 32 }], 32)).toThrow(/continue at layer 10/);
    expect(() => splitFromRanges([{ start: 0, end: 10 }, { start: 10, end: 10 }], 10)).toThrow(UsageError);
    expect(() => splitFromRanges([{ start: 0, end: 10 }], 32)).toThrow(/10 of 32/);
  });
  it('worker arguments carry the split only for pipeline mode', () => {
    expect(workerArgs({ model: '/m', mode: 'pipeline', split: [1, 3], backend: 'ring' })).toEqual([
      '--model', '/m', '--mode', 'pipeline', '--split', '1,3', '--backend', 'ring',
    ]);
    expect(workerArgs({ model: '/m', mode: 'tensor', split: [1, 3] })).toEqual(['--model', '/m', '--mode', 'tensor']);
  });
});

describe('MLX venv location and environment', () => {
  it('pins cpu extras on Linux and Metal wheels on macOS', () => {
    expect(mlxPins('linux')).toEqual(['mlx[cpu]==0.32.4', 'mlx-lm[cpu]==0.32.2']);
    expect(mlxPins('darwin')).toEqual(['mlx==0.32.4', 'mlx-lm==0.32.2']);
  });
  it('lives under the Orchard cache root, named by a hash of the pins', () => {
    expect(cacheRoot({ ORCHARD_CACHE_DIR: '/c' }, 'linux', '/home/u')).toBe('/c');
    expect(cacheRoot({ XDG_CACHE_HOME: '/x' }, 'linux', '/home/u')).toBe('/x/orchard');
    expect(cacheRoot({}, 'linux', '/home/u')).toBe('/home/u/.cache/orchard');
    expect(cacheRoot({}, 'darwin', '/Users/u')).toBe('/Users/u/Library/Caches/orchard');
    const linux = mlxVenvDir({ ORCHARD_CACHE_DIR: '/c' }, 'linux');
    const mac = mlxVenvDir({ ORCHARD_CACHE_DIR: '/c' }, 'darwin');
    expect(linux).toMatch(/^\/c\/mlx-venv-[0-9a-f]{12}$/);
    expect(mac).not.toBe(linux);
  });
  it('disables the CPU JIT and thread oversubscription on Linux only', () => {
    expect(mlxProcessEnv('linux')).toMatchObject({ MLX_DISABLE_COMPILE: '1', OMP_NUM_THREADS: '1', HF_HUB_OFFLINE: '1' });
    expect(mlxProcessEnv('darwin').MLX_DISABLE_COMPILE).toBeUndefined();
    expect(mlxProcessEnv('darwin').HF_HUB_OFFLINE).toBe('1');
  });
});
