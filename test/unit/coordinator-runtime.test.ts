import { afterEach, describe, expect, it } from 'vitest';
import { CoordinatorError } from '../../src/coordinator/errors.ts';
import { Membership } from '../../src/coordinator/membership/membership.ts';
import { Runtime, type Planner } from '../../src/coordinator/instances/runtime.ts';
import { UsageError } from '../../src/shared/errors.ts';
import { createLogger } from '../../src/shared/log.ts';

// The runtime's bookkeeping without engines: a real Membership with no agents and planners that
// hang or refuse. (Loading onto real agents is covered by test/integration/cluster-*.test.ts.)
const log = createLogger('test', 'silent');
const memberships: Membership[] = [];

function runtime(planner: Planner): Runtime {
  const m = new Membership({ suspectAfterMs: 2000, downAfterMs: 5000 }, log);
  memberships.push(m);
  return new Runtime({ membership: m, planner, clusterId: 'c0ffee00-0000', log });
}

afterEach(() => {
  for (const m of memberships.splice(0)) m.close();
});

const codeOf = async (p: Promise<unknown>) => {
  const e = await p.then(() => undefined, (err: unknown) => err);
  return e instanceof CoordinatorError ? e.code : e instanceof UsageError ? 'USAGE' : e;
};

describe('Runtime', () => {
  it('refuses a second load of a name that is still loading, and unload cancels the first', async () => {
    let release: () => void = () => {};
    const hang: Planner = () =>
      new Promise((_, reject) => {
        release = () => reject(new CoordinatorError('CANCELLED', 'planner released'));
      });
    const rt = runtime(hang);
    const first = rt.load({ modelPath: '/models/m.gguf', name: 'm' });
    await new Promise((r) => setImmediate(r));
    expect(rt.models().map((m) => [m.name, m.state])).toEqual([['m', 'loading']]);
    const second = rt.load({ modelPath: '/models/m.gguf', name: 'm' });
    await expect(second).rejects.toThrow(/already loading/);
    expect(await codeOf(rt.load({ modelPath: '/models/other.gguf', name: 'm' }))).toBe('ALREADY_EXISTS');
    await rt.unload('m');
    release();
    await expect(first).rejects.toThrow();
    expect(rt.models()).toEqual([]);
  });

  it('a load the planner refuses leaves nothing behind and reports the planner’s reason', async () => {
    const rt = runtime(async () => {
      throw new CoordinatorError('FAILED_PRECONDITION', '/m.gguf does not fit on 0 live node(s); try: --ctx 1024');
    });
    const progress: string[] = [];
    await expect(rt.load({ modelPath: '/m.gguf' }, (p) => progress.push(p.phase))).rejects.toThrow(/does not fit.*--ctx 1024/);
    expect(progress).toEqual(['planning', 'failed']);
    expect(rt.models()).toEqual([]);
    // the name is free again
    await expect(rt.load({ modelPath: '/m.gguf' })).rejects.toThrow(/does not fit/);
  });

  it('the planner sees only live nodes and the resolved options', async () => {
    let seen: unknown;
    const rt = runtime(async (path, nodes, options) => {
      seen = { path, nodes: nodes.length, options };
      throw new CoordinatorError('FAILED_PRECONDITION', 'no');
    });
    await rt.load({ modelPath: '/a/b.gguf', options: { ctx: 8192, cacheType: 'q8_0', parallel: 2 } }).catch(() => {});
    expect(seen).toEqual({ path: '/a/b.gguf', nodes: 0, options: { ctx: 8192, cacheType: 'q8_0', parallel: 2, pin: [], parallelism: 'auto', allowUntunnelledRdma: false } });
  });

  it('bad input is a usage error before anything starts', async () => {
    const rt = runtime(async () => {
      throw new Error('must not be called');
    });
    expect(await codeOf(rt.load({ modelPath: '' }))).toBe('USAGE');
    expect(await codeOf(rt.load({ modelPath: '/m.gguf', name: 'bad name!' }))).toBe('USAGE');
    expect(await codeOf(rt.load({ modelPath: '/m.gguf', options: { cacheType: 'q9' } }))).toBe('USAGE');
    expect(await codeOf(rt.load({ modelPath: '/m.gguf', options: { pin: ['ghost'] } }))).toBe('FAILED_PRECONDITION');
    expect(rt.models()).toEqual([]);
  });

  it('generate and unload name what is missing', async () => {
    const rt = runtime(async () => {
      throw new Error('unused');
    });
    const drain = async (g: AsyncGenerator<unknown>) => {
      for await (const _ of g) {
        // nothing
      }
    };
    expect(await codeOf(drain(rt.generate({ prompt: 'hi', maxTokens: 1, temperature: 0 })))).toBe('FAILED_PRECONDITION');
    expect(await codeOf(drain(rt.generate({ model: 'nope', prompt: 'hi', maxTokens: 1, temperature: 0 })))).toBe('NOT_FOUND');
    expect(await codeOf(rt.unload('nope'))).toBe('NOT_FOUND');
  });
});
