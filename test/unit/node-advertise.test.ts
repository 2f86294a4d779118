import { describe, expect, it } from 'vitest';
import { decodeTxt, encodeTxt } from '../../src/node/advertise.ts';
import { type HardwareProfile, PROTOCOL_VERSION } from '../../src/shared/hardware.ts';
import { studioProfile } from '../helpers/profiles.ts';

const profile: HardwareProfile = studioProfile({ nodeId: '0b7c4f1e-1111-4222-8333-444455556666' });

describe('Bonjour TXT record', () => {
  it('round-trips the essentials as decimal strings', () => {
    const txt = encodeTxt(profile, 50151);
    expect(txt).toEqual({
      id: profile.nodeId,
      pv: PROTOCOL_VERSION,
      chip: 'Apple M2 Ultra',
      ram: String(192 * 2 ** 30),
      bw: '800000000000',
      wired: String(144 * 2 ** 30),
      budget: String(140 * 2 ** 30),
      grpc: '50151',
    });
    expect(decodeTxt(txt)).toEqual({
      id: profile.nodeId,
      pv: '1',
      chip: 'Apple M2 Ultra',
      ram: 192 * 2 ** 30,
      bw: 800e9,
      wired: 144 * 2 ** 30,
      budget: 140 * 2 ** 30,
      grpc: 50151,
      tunnel: 0,
      thunderbolt: [],
    });
    // a node with cluster credentials advertises its tunnel port under the one name `tunnel`
    const withTunnel = encodeTxt({ ...profile, tunnelPort: 50152 }, 50151);
    expect(withTunnel.tunnel).toBe('50152');
    expect(decodeTxt(withTunnel)?.tunnel).toBe(50152);
  });

  it('names the Thunderbolt IPv4 addresses so a coordinator can pick the fast link', () => {
    const tbProfile: HardwareProfile = {
      ...profile,
      interfaces: [
        { name: 'en0', addresses: ['192.168.1.20', 'fe80::1'], thunderbolt: false, rdma: false },
        { name: 'bridge0', addresses: ['169.254.10.2', 'fe80::2'], thunderbolt: true, rdma: true },
        { name: 'en5', addresses: ['10.10.0.2'], thunderbolt: true, rdma: false },
      ],
    };
    const txt = encodeTxt(tbProfile, 50151);
    expect(txt.tb).toBe('169.254.10.2,10.10.0.2');
    expect(decodeTxt(txt)?.thunderbolt).toEqual(['169.254.10.2', '10.10.0.2']);
  });

  it('stays small: every string fits a TXT entry and the record is well under one packet', () => {
    const txt = encodeTxt({ ...profile, chip: 'x'.repeat(500) }, 65535);
    for (const [k, v] of Object.entries(txt)) expect(Buffer.byteLength(`${k}=${v}`)).toBeLessThan(256);
    expect(Object.entries(txt).reduce((n, [k, v]) => n + k.length + v.length + 2, 0)).toBeLessThan(400);
  });

  it('decodes Buffer values and rejects records that are not Orchard nodes', () => {
    expect(decodeTxt({ id: Buffer.from('abc'), grpc: Buffer.from('7') })?.grpc).toBe(7);
    expect(decodeTxt({ grpc: '7' })).toBeUndefined();
    expect(decodeTxt({ id: 'a', grpc: 'x' })).toBeUndefined();
    expect(decodeTxt({ id: 'a', grpc: '70000' })).toBeUndefined();
    expect(decodeTxt(null)).toBeUndefined();
    expect(decodeTxt({ id: 'a', grpc: '1', ram: '-5' })?.ram).toBe(0);
    expect(decodeTxt({ id: 'a', grpc: '1', tb: 'x,1.2.3.4' })?.thunderbolt).toEqual(['1.2.3.4']);
  });
});
