import { describe, expect, it } from 'vitest';
import { Registry, type RegistryChange } from '../../src/coordinator/membership/registry.ts';
import type { HardwareProfile } from '../../src/shared/hardware.ts';
import { studioProfile } from '../helpers/profiles.ts';

function profile(nodeId: string, name = nodeId): HardwareProfile {
  // The registry reads ids, names and addresses; the hardware is the fixture's.
  return studioProfile({ nodeId, name, hostname: name });
}

const opts = { suspectAfterMs: 2000, downAfterMs: 5000, forgetAfterMs: 60_000 };

function join(r: Registry, id: string, addr: string, session: string, now: number): RegistryChange[] {
  return r.connected({ profile: profile(id), address: addr, discoveredBy: 'join', session }, now);
}

const kinds = (c: RegistryChange[]) => c.map((x) => (x.kind === 'state' ? `${x.node.nodeId}:${x.from}->${x.to}` : `${x.kind}:${x.node.nodeId}`));

describe('Registry', () => {
  it('a node’s own bus events keep an up node from turning suspect for silence, but never revive a suspect one', () => {
    const r = new Registry(opts);
    join(r, 'a', '10.0.0.1:1', 's1', 0);
    r.busSeen('a', 1500);
    expect(r.tick(3000)).toEqual([]);
    expect(kinds(r.tick(3600))).toEqual(['a:up->suspect']);
    r.busSeen('a', 3700);
    expect(r.get('a')?.state).toBe('suspect');
    expect(r.get('a')?.lastSeenMs).toBe(1500);
    r.busSeen('unknown', 3700);
    expect(r.get('unknown')).toBeUndefined();
  });

  it('adds a node as up and reports it once', () => {
    const r = new Registry(opts);
    expect(kinds(join(r, 'a', '10.0.0.1:1', 's1', 0))).toEqual(['added:a']);
    expect(r.get('a')?.state).toBe('up');
    expect(r.upNodes().map((n) => n.nodeId)).toEqual(['a']);
    // the same session connecting again changes nothing
    expect(join(r, 'a', '10.0.0.1:1', 's1', 10)).toEqual([]);
  });

  it('up → suspect → down on silence, with the configured timeouts and not before', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 1000);
    expect(r.tick(1000 + 1999)).toEqual([]);
    expect(kinds(r.tick(1000 + 2000))).toEqual(['a:up->suspect']);
    expect(r.tick(1000 + 4999)).toEqual([]);
    expect(kinds(r.tick(1000 + 5000))).toEqual(['a:suspect->down']);
    expect(r.get('a')?.state).toBe('down');
    expect(r.upNodes()).toEqual([]);
    // idempotent: no repeated transitions
    expect(r.tick(1000 + 6000)).toEqual([]);
  });

  it('jumps straight to down when the clock skips past both timeouts', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    expect(kinds(r.tick(9000))).toEqual(['a:up->down']);
  });

  it('events keep a node up and revive a suspect or down node of the same session', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    expect(r.seen('a', 's1', 1500)).toEqual([]);
    expect(r.tick(3000)).toEqual([]); // 1500 ms of silence only
    r.tick(3600);
    expect(r.get('a')?.state).toBe('suspect');
    expect(kinds(r.seen('a', 's1', 3700))).toEqual(['a:suspect->up']);
    r.tick(20_000);
    expect(r.get('a')?.state).toBe('down');
    expect(kinds(r.seen('a', 's1', 20_001))).toEqual(['a:down->up']);
  });

  it('keeps live stats from events', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    const live = { availableBytes: 5, memoryPressure: 'normal', thermalState: 'nominal', timestampSeconds: 1 } as const;
    r.seen('a', 's1', 10, live);
    expect(r.get('a')?.live).toEqual(live);
  });

  it('a broken stream makes the node suspect at once, then down on the clock', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    expect(kinds(r.disconnected('a', 's1', 100))).toEqual(['a:up->suspect']);
    expect(r.disconnected('a', 's1', 200)).toEqual([]); // already suspect
    expect(r.tick(4999)).toEqual([]);
    expect(kinds(r.tick(5000))).toEqual(['a:suspect->down']);
  });

  it('a refused re-dial after a broken stream is a death: down at once, with the reason', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    expect(r.refused('a', 50, 'refused')).toEqual([]); // an up node is not judged by one refused dial
    r.disconnected('a', 's1', 100);
    const c = r.refused('a', 150, 'agent not running at x:1 (connection refused)');
    expect(kinds(c)).toEqual(['a:suspect->down']);
    expect((c[0] as Extract<RegistryChange, { kind: 'state' }>).reason).toMatch(/connection refused/);
    expect(r.refused('a', 200, 'again')).toEqual([]); // already down
    expect(kinds(r.connected({ profile: profile('a'), address: 'x:1', discoveredBy: 'mdns', session: 's2' }, 300))).toContain('replaced:a');
  });

  it('ignores events and disconnects from a stale session', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    join(r, 'a', 'x:1', 's2', 100);
    expect(r.disconnected('a', 's1', 200)).toEqual([]);
    expect(r.get('a')?.state).toBe('up');
    r.tick(2200);
    expect(r.get('a')?.state).toBe('suspect');
    expect(r.seen('a', 's1', 2300)).toEqual([]); // the old stream cannot revive it
    expect(r.get('a')?.state).toBe('suspect');
    expect(r.seen('a', 'unknown-node', 2300)).toEqual([]);
    expect(r.seen('zz', 's1', 2300)).toEqual([]);
  });

  it('a restarted node (new session, same id) replaces its entry: one entry, no ghost', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    r.disconnected('a', 's1', 10);
    r.tick(6000);
    expect(r.get('a')?.state).toBe('down');
    const c = r.connected({ profile: profile('a'), address: 'x:2', discoveredBy: 'mdns', session: 's2' }, 7000);
    expect(kinds(c)).toEqual(['replaced:a']);
    const rep = c[0] as Extract<RegistryChange, { kind: 'replaced' }>;
    expect(rep.previous.state).toBe('down');
    expect(rep.previous.address).toBe('x:1');
    expect(r.nodes()).toHaveLength(1);
    const n = r.get('a')!;
    expect(n).toMatchObject({ state: 'up', address: 'x:2', session: 's2', joinedAtMs: 0, stateSinceMs: 7000 });
    expect(n.discoveredBy).toBe('join'); // joined explicitly first
  });

  it('a different id at the same address evicts the old entry (identity reset is not a second node)', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    join(r, 'b', 'y:1', 's1', 0);
    const c = join(r, 'c', 'x:1', 's9', 100);
    expect(kinds(c)).toEqual(['removed:a', 'added:c']);
    expect(r.nodes().map((n) => n.nodeId)).toEqual(['b', 'c']);
    expect(r.byAddress('x:1')?.nodeId).toBe('c');
  });

  it('reconnecting with the same session after suspect reports up', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    r.disconnected('a', 's1', 10);
    expect(kinds(join(r, 'a', 'x:1', 's1', 20))).toEqual(['a:suspect->up']);
  });

  it('forgets down nodes after forgetAfterMs, and keeps them when unset', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    r.tick(5000);
    expect(r.tick(59_999)).toEqual([]);
    expect(kinds(r.tick(60_000))).toEqual(['removed:a']);
    expect(r.nodes()).toEqual([]);

    const keep = new Registry({ suspectAfterMs: 2000, downAfterMs: 5000 });
    join(keep, 'a', 'x:1', 's1', 0);
    keep.tick(5000);
    expect(keep.tick(10 ** 9)).toEqual([]);
    expect(keep.get('a')?.state).toBe('down');
  });

  it('tracks several nodes independently, sorted by name', () => {
    const r = new Registry(opts);
    r.connected({ profile: profile('id2', 'beta'), address: 'b:1', discoveredBy: 'mdns', session: 's' }, 0);
    r.connected({ profile: profile('id1', 'alpha'), address: 'a:1', discoveredBy: 'mdns', session: 's' }, 0);
    r.seen('id2', 's', 1900);
    expect(kinds(r.tick(2500))).toEqual(['id1:up->suspect']);
    expect(r.nodes().map((n) => n.profile.name)).toEqual(['alpha', 'beta']);
    expect(r.upNodes().map((n) => n.profile.name)).toEqual(['beta']);
  });

  it('explicit removal', () => {
    const r = new Registry(opts);
    join(r, 'a', 'x:1', 's1', 0);
    expect(kinds(r.remove('a'))).toEqual(['removed:a']);
    expect(r.remove('a')).toEqual([]);
  });

  it('rejects nonsense options and nodes without an id', () => {
    expect(() => new Registry({ suspectAfterMs: 0, downAfterMs: 5 })).toThrow(RangeError);
    expect(() => new Registry({ suspectAfterMs: 5, downAfterMs: 5 })).toThrow(RangeError);
    expect(() => new Registry({ suspectAfterMs: 1, downAfterMs: 5, forgetAfterMs: 5 })).toThrow(RangeError);
    const r = new Registry(opts);
    expect(() => join(r, '', 'x:1', 's', 0)).toThrow(RangeError);
  });
});

describe('Registry: agent runs (a reconnect is not a restart)', () => {
  const conn = (r: Registry, session: string, runId: string, now: number) => r.connected({ profile: profile('a'), address: 'x:1', discoveredBy: 'join', session, runId }, now);

  it('the same run re-dialled on a new stream is the same agent: up again, not replaced', () => {
    const r = new Registry(opts);
    conn(r, 's1', 'run1', 0);
    r.disconnected('a', 's1', 100);
    expect(kinds(conn(r, 's2', 'run1', 300))).toEqual(['a:suspect->up']);
    expect(r.get('a')).toMatchObject({ state: 'up', session: 's2', runId: 'run1' });
    // even from down (a link cut past the grace): its engines may still run, it is the same agent
    r.tick(20_000);
    expect(r.get('a')?.state).toBe('down');
    expect(kinds(conn(r, 's3', 'run1', 20_100))).toEqual(['a:down->up']);
  });

  it('a new run of the same node id is a restart, whatever the state', () => {
    const r = new Registry(opts);
    conn(r, 's1', 'run1', 0);
    expect(kinds(conn(r, 's2', 'run2', 50))).toEqual(['replaced:a']);
  });

  it('a late stats sample costs nothing while heartbeats arrive: liveness is any event', () => {
    const r = new Registry(opts);
    conn(r, 's1', 'run1', 0);
    for (let t = 500; t <= 30_000; t += 500) {
      r.seen('a', 's1', t); // heartbeats only, no stats
      expect(r.tick(t + 10)).toEqual([]);
    }
    expect(r.get('a')?.live).toBeUndefined();
  });
});
