import { describe, expect, it } from 'vitest';
import { nodeEvent, RequestSampler } from '../../src/coordinator/nats/events.ts';
import { eventStreamSubjects, eventSubject, OrchardEvent, parseEvent, subjectToken } from '../../src/shared/events.ts';

const stamp = { v: 1 as const, cluster: 'c0ffee-1', atMs: 1, source: { role: 'coordinator' as const, id: 'h:1' } };

describe('event subjects', () => {
  it('follow the documented layout; model names become one safe token', () => {
    expect(eventSubject({ ...stamp, kind: 'node.down', nodeId: 'n1', name: 'bravo', address: 'a:1', reason: 'x' })).toBe('orchard.c0ffee-1.node.n1.down');
    expect(eventSubject({ ...stamp, kind: 'node.heartbeat', nodeId: 'n1', name: 'bravo', address: 'a:1' })).toBe('orchard.c0ffee-1.heartbeat.n1');
    expect(eventSubject({ ...stamp, kind: 'engine.exited', nodeId: 'n1', engineId: 'e', engineKind: 'k', exitCode: 1, signal: '', expected: false })).toBe('orchard.c0ffee-1.engine.n1.exited');
    expect(eventSubject({ ...stamp, kind: 'instance.state', model: 'llama3.1:70b', state: 'ready', engine: 'llama', nodes: [], error: '', recoveries: 0 })).toBe('orchard.c0ffee-1.instance.llama3_1_70b.state');
    expect(eventSubject({ ...stamp, kind: 'request.outcome', model: '', outcome: 'busy', durationSeconds: 0, represents: 1 })).toBe('orchard.c0ffee-1.request._.outcome');
    expect(subjectToken('a.b*c>d e')).toBe('a_b_c_d_e');
  });

  it('the stream keeps every area but heartbeats and agents’ health', () => {
    expect(eventStreamSubjects('c')).toEqual(['orchard.c.node.>', 'orchard.c.engine.>', 'orchard.c.instance.>', 'orchard.c.request.>', 'orchard.c.agent.*.engine.>']);
  });

  it('parses only events of this schema version', () => {
    const e = { ...stamp, kind: 'instance.recovered', model: 'm', cause: 'node-down', seconds: 2 };
    expect(parseEvent(JSON.stringify(e))).toEqual(OrchardEvent.parse(e));
    expect(parseEvent(JSON.stringify({ ...e, v: 2 }))).toBeUndefined();
    expect(parseEvent('not json')).toBeUndefined();
  });
});

describe('coordinator events', () => {
  it('registry changes map to node events', () => {
    const n = { nodeId: 'n', name: 'a', address: 'x:1' };
    const entry = {} as never;
    expect(nodeEvent({ kind: 'added', node: entry }, n)).toMatchObject({ kind: 'node.up', reason: 'joined' });
    expect(nodeEvent({ kind: 'replaced', node: entry, previous: entry }, n)).toMatchObject({ kind: 'node.up', reason: 'agent restarted' });
    expect(nodeEvent({ kind: 'state', node: entry, from: 'up', to: 'suspect', reason: 'r' }, n)).toMatchObject({ kind: 'node.suspect', reason: 'r' });
    expect(nodeEvent({ kind: 'removed', node: entry, reason: 'revoked' }, n)).toMatchObject({ kind: 'node.removed', reason: 'revoked' });
  });

  it('request outcomes: every failure, one ok per model per second standing for the skipped ones', () => {
    const s = new RequestSampler(1000);
    expect(s.take('m', 'ok', 0)).toBe(1);
    expect(s.take('m', 'ok', 100)).toBe(0);
    expect(s.take('m', 'ok', 200)).toBe(0);
    expect(s.take('m', 'error', 300)).toBe(1);
    expect(s.take('other', 'ok', 300)).toBe(1);
    expect(s.take('m', 'ok', 1000)).toBe(3);
  });
});
