import { describe, expect, it } from 'vitest';
import { fromItsAgent } from '../../src/coordinator/nats/agent-bus.ts';
import { natsAuthorization, natsRoleAuthorization, natsTlsBlock, nodePermissions } from '../../src/coordinator/nats/auth.ts';
import { natsConfig } from '../../src/coordinator/nats/server.ts';
import { agentEventSubject, agentOfSubject, agentSubjects, EventBusUrls, eventStreamSubjects, eventSubject, OrchardEvent } from '../../src/shared/events.ts';

const health = { kind: 'node.health' as const, nodeId: 'n1', engines: 2, availableBytes: 1e9, memoryPressure: 'normal', thermalState: 'nominal' };
const stamped = (body: object, source: { role: 'agent' | 'coordinator'; id: string }, cluster = 'c1') => OrchardEvent.parse({ ...body, v: 1, cluster, atMs: 1, source });

describe('NATS users from cluster identities', () => {
  it('coordinator and admin may do everything; each node may publish only under its own agent subject and subscribe to nothing', () => {
    const text = natsAuthorization('c1', ['n2', 'n1', 'n1']);
    expect(text).toBe(
      [
        'authorization {',
        '  users: [',
        '    { user: "orchard://coordinator/coordinator" }',
        '    { user: "orchard://admin/admin" }',
        '    { user: "OU=coordinator,O=Orchard cluster c1" }',
        '    { user: "OU=admin,O=Orchard cluster c1" }',
        '    { user: "orchard://node/n1", permissions: {"publish":{"allow":["orchard.c1.agent.n1.>"]},"subscribe":{"deny":[">"]}} }',
        '    { user: "orchard://node/n2", permissions: {"publish":{"allow":["orchard.c1.agent.n2.>"]},"subscribe":{"deny":[">"]}} }',
        '  ]',
        '}',
      ].join('\n'),
    );
    expect(nodePermissions('c1', 'n1').publish.allow).toEqual([agentSubjects('c1', 'n1')]);
  });

  it('an external server names the node role (nodes joined later need no entry) and each revoked node, with nothing allowed, by its URI', () => {
    const text = natsRoleAuthorization('c1', ['r2', 'r1']);
    expect(text.split('\n').slice(6, -2)).toEqual([
      '    { user: "orchard://node/r1", permissions: {"publish":{"deny":[">"]},"subscribe":{"deny":[">"]}} }',
      '    { user: "orchard://node/r2", permissions: {"publish":{"deny":[">"]},"subscribe":{"deny":[">"]}} }',
      '    { user: "OU=node,O=Orchard cluster c1", permissions: {"publish":{"allow":["orchard.c1.agent.*.>"]},"subscribe":{"deny":[">"]}} }',
    ]);
    // The same full users as the local server's list.
    expect(text.split('\n').slice(0, 6)).toEqual(natsAuthorization('c1', []).split('\n').slice(0, 6));
  });

  it('the server config requires and maps client certificates, with a handshake timeout a loaded machine meets', () => {
    const tls = { certFile: '/s/tls/server.crt', keyFile: '/s/tls/server.key', caFile: '/s/tls/ca.crt' };
    expect(natsTlsBlock(tls)).toBe('tls { cert_file: "/s/tls/server.crt", key_file: "/s/tls/server.key", ca_file: "/s/tls/ca.crt", verify_and_map: true, timeout: 5 }');
    const conf = natsConfig({ stateDir: '/s', binary: 'x', auth: { tls, authorization: natsAuthorization('c1', []) } }, '/s/nats');
    expect(conf).toContain('verify_and_map: true');
    expect(conf).toContain('"orchard://coordinator/coordinator"');
    expect(natsConfig({ stateDir: '/s', binary: 'x' }, '/s/nats')).not.toContain('tls');
  });
});

describe('agent events', () => {
  it('live under orchard.<c>.agent.<node>.<kind>; the stream keeps engine events, not health', () => {
    expect(agentEventSubject('c1', health)).toBe('orchard.c1.agent.n1.node.health');
    expect(eventSubject({ ...health, cluster: 'c1' })).toBe('orchard.c1.agent.n1.node.health');
    const started = { kind: 'engine.started' as const, nodeId: 'n1', engineId: 'e', engineKind: 'rpc-server', pid: 1, port: 2 };
    expect(eventSubject({ ...started, cluster: 'c1', source: { role: 'agent' } })).toBe('orchard.c1.agent.n1.engine.started');
    // The coordinator's relay of the same kind keeps its own subject.
    expect(eventSubject({ ...started, cluster: 'c1', source: { role: 'coordinator' } })).toBe('orchard.c1.engine.n1.started');
    expect(eventStreamSubjects('c1')).toContain('orchard.c1.agent.*.engine.>');
    expect(agentOfSubject('c1', 'orchard.c1.agent.n1.node.health')).toBe('n1');
    expect(agentOfSubject('c1', 'orchard.c1.node.n1.down')).toBeUndefined();
  });

  it('the coordinator accepts an agent event only when subject, node and source are one agent of its cluster', () => {
    const subject = 'orchard.c1.agent.n1.node.health';
    expect(fromItsAgent('c1', subject, stamped(health, { role: 'agent', id: 'n1' }))).toBe(true);
    expect(fromItsAgent('c1', subject, stamped({ ...health, nodeId: 'n2' }, { role: 'agent', id: 'n2' }))).toBe(false);
    expect(fromItsAgent('c1', subject, stamped(health, { role: 'agent', id: 'n2' }))).toBe(false);
    expect(fromItsAgent('c1', subject, stamped(health, { role: 'coordinator', id: 'n1' }))).toBe(false);
    expect(fromItsAgent('c1', subject, stamped(health, { role: 'agent', id: 'n1' }, 'c2'))).toBe(false);
  });

  it('the bus address an agent is sent is a few nats:// or tls:// host:port, nothing more', () => {
    expect(EventBusUrls.safeParse(['nats://127.0.0.1:4222', 'tls://nats.example:4443']).success).toBe(true);
    for (const bad of [[], ['http://x:1'], ['nats://user:secret@x:1'], ['nats://x:1/path'], Array(17).fill('nats://x:1')]) expect(EventBusUrls.safeParse(bad).success, JSON.stringify(bad)).toBe(false);
  });
});
