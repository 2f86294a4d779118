import { afterEach, describe, expect, it } from 'vitest';
import { DiscoveredList } from '../../src/coordinator/membership/discovered.ts';
import { Membership } from '../../src/coordinator/membership/membership.ts';
import { DEFAULT_REGISTRY_OPTIONS } from '../../src/coordinator/membership/registry.ts';
import { createLogger } from '../../src/shared/log.ts';
import { clientCredentials, testCa } from '../helpers/cluster-pki.ts';
import { freeListener, waitFor } from '../helpers/node-agent.ts';

const log = createLogger('discovered-test', 'silent');
const MIN = 60_000;

describe('DiscoveredList (pure)', () => {
  it('keeps the first sighting, moves the last, and expires an entry a TTL after its last sighting', () => {
    const list = new DiscoveredList(3 * MIN);
    list.record('10.0.0.5:7421', { nodeId: 'n-5', name: 'studio', chip: 'Apple M2 Ultra', memoryBytes: 2 ** 37 }, 'TLS handshake failed', 1000);
    list.record('10.0.0.6:7421', {}, 'connection refused', 2000);
    expect(list.list().map((d) => d.name)).toEqual(['10.0.0.6:7421', 'studio']); // no name announced: its address
    list.record('10.0.0.5:7421', { nodeId: 'n-5', name: 'studio' }, 'still no certificate', 1000 + 2 * MIN);
    expect(list.list().find((d) => d.name === 'studio')).toMatchObject({ firstSeenMs: 1000, lastSeenMs: 1000 + 2 * MIN, reason: 'still no certificate' });
    // a late failure of an older sighting does not move lastSeen back
    list.record('10.0.0.5:7421', { name: 'studio' }, 'older dial', 1500);
    expect(list.list().find((d) => d.name === 'studio')!.lastSeenMs).toBe(1000 + 2 * MIN);

    expect(list.expire(2000 + 3 * MIN - 1)).toEqual([]);
    expect(list.expire(2000 + 3 * MIN)).toEqual(['10.0.0.6:7421']);
    expect(list.expire(1000 + 5 * MIN - 1)).toEqual([]);
    expect(list.expire(1000 + 5 * MIN)).toEqual(['10.0.0.5:7421']);
    expect(list.list()).toEqual([]);
    list.record('a:1', {}, 'x', 0);
    expect(list.delete('a:1')).toBe(true);
    expect(list.delete('a:1')).toBe(false);
  });
});

describe('Membership: a discovered agent stops being listed and dialled', { timeout: 30_000 }, () => {
  const cleanup: (() => void)[] = [];
  afterEach(() => {
    for (const c of cleanup.splice(0)) c();
  });

  /** A coordinator membership on a clock the test moves; the address answers TCP but never TLS (an agent without credentials stands in). */
  async function setup() {
    let now = 1_000_000;
    const ca = await testCa('discovered');
    const membership = new Membership(DEFAULT_REGISTRY_OPTIONS, log, await clientCredentials(ca, 'coordinator', 'coordinator-1'), () => [], { discoveredTtlMs: 3 * MIN, now: () => now });
    cleanup.push(() => membership.close());
    const plain = await freeListener(); // accepts, then says nothing: the TLS handshake fails
    const dials: number[] = [];
    plain.on('connection', (s) => {
      dials.push(Date.now());
      s.destroy();
    });
    cleanup.push(() => plain.close());
    const address = `127.0.0.1:${(plain.address() as { port: number }).port}`;
    return { membership, address, dials, advance: (ms: number) => (now += ms) };
  }

  it('expires after the TTL without a sighting; a sighting in time keeps it', async () => {
    const { membership, address, dials, advance } = await setup();
    membership.sighted(address, { nodeId: 'claimed', name: 'plain' });
    await waitFor('listed as discovered', () => membership.discovered()[0]);
    expect(membership.discovered()[0]).toMatchObject({ address, name: 'plain', nodeId: 'claimed' });
    advance(2 * MIN);
    membership.sighted(address, { nodeId: 'claimed', name: 'plain' }); // Bonjour's refresh found it again
    await waitFor('the new sighting recorded', () => membership.discovered()[0]?.lastSeenMs === 1_000_000 + 2 * MIN || undefined);
    advance(2 * MIN); // 4 min after the first sighting, 2 after the last: still there
    await new Promise((r) => setTimeout(r, 600));
    expect(membership.discovered().map((d) => d.address)).toEqual([address]);
    expect(membership.addresses()).toEqual([address]);
    advance(MIN); // 3 min after the last sighting
    await waitFor('expired', () => (membership.discovered().length === 0 ? true : undefined), 2000);
    expect(membership.addresses()).toEqual([]);
    // and it is no longer dialled (before, a discovered address was re-dialled every ≤ 2 s forever);
    // a dial already under way when it expired may still arrive (late, on a loaded machine);
    // after that, a window longer than the 2 s re-dial backoff sees none
    await new Promise((r) => setTimeout(r, 2000));
    const n = dials.length;
    expect(n).toBeGreaterThan(1);
    await new Promise((r) => setTimeout(r, 3000));
    expect(dials.length).toBe(n);
  });

  it('goes at once when its advertisement goes away (a Bonjour goodbye)', async () => {
    const { membership, address, dials } = await setup();
    membership.sighted(address, { name: 'plain' });
    await waitFor('listed as discovered', () => membership.discovered()[0]);
    membership.unsighted(address);
    expect(membership.discovered()).toEqual([]);
    expect(membership.addresses()).toEqual([]);
    await new Promise((r) => setTimeout(r, 2000));
    const n = dials.length;
    await new Promise((r) => setTimeout(r, 3000));
    expect(dials.length).toBe(n);
    // a goodbye for an address that is a static join (or unknown) changes nothing
    membership.unsighted('127.0.0.1:1');
    expect(membership.discovered()).toEqual([]);
  });
});
