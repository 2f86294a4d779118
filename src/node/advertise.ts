import { Bonjour, type Service } from 'bonjour-service';
import { errorMessage } from '../shared/errors.ts';
import { type HardwareProfile, PROTOCOL_VERSION } from '../shared/hardware.ts';
import type { Logger } from '../shared/log.ts';

/**
 * Bonjour advertisement of a node: service type `_orchard._tcp`, instance name = node name,
 * port = the agent's gRPC port. The TXT record carries only what a coordinator needs to decide
 * whether to talk to the node at all; the full profile comes from NodeAgent.Describe.
 *
 * TXT keys (all values decimal strings, bytes and bytes/second):
 *   id     stable node id            pv    protocol version (PROTOCOL_VERSION)
 *   chip   chip name                 ram   total RAM bytes
 *   bw     memory bandwidth B/s      wired GPU wired-memory limit bytes
 *   grpc   gRPC port (same as SRV)   model-memory budget bytes
 *   tunnel TLS tunnel port for engine traffic (HardwareProfile.tunnelPort; absent without credentials)
 *   tb     comma-separated IPv4 addresses on Thunderbolt interfaces (absent when none): the
 *          addresses a coordinator should prefer for the engines' data path (RPC, MLX ring/RDMA)
 *
 * mDNS goes out on the OS's default multicast interface unless `--mdns-interface` names one;
 * the A/AAAA records list every non-loopback address of the node, so a coordinator can reach it
 * on whichever network it shares, and `tb` tells it which of those is the fast link.
 */
export const SERVICE_TYPE = 'orchard';

export interface NodeTxt {
  readonly id: string;
  readonly pv: string;
  readonly chip: string;
  readonly ram: number;
  readonly bw: number;
  readonly wired: number;
  readonly budget: number;
  readonly grpc: number;
  /** 0 when the node runs no tunnel. */
  readonly tunnel: number;
  readonly thunderbolt: readonly string[];
}

export function encodeTxt(profile: HardwareProfile, grpcPort: number): Record<string, string> {
  const tb = profile.interfaces
    .filter((i) => i.thunderbolt)
    .flatMap((i) => i.addresses.filter((a) => /^\d+\.\d+\.\d+\.\d+$/.test(a)))
    .join(',')
    .slice(0, 200);
  return {
    ...(tb !== '' ? { tb } : {}),
    id: profile.nodeId,
    pv: PROTOCOL_VERSION,
    // One TXT string is at most 255 bytes; chip names are short, but never let one break the record.
    chip: profile.chip.slice(0, 100),
    ram: String(profile.memoryBytes),
    bw: String(profile.bandwidthBytesPerSecond),
    wired: String(profile.wiredLimitBytes),
    budget: String(profile.budgetBytes),
    grpc: String(grpcPort),
    ...(profile.tunnelPort !== undefined ? { tunnel: String(profile.tunnelPort) } : {}),
  };
}

/**
 * Read a TXT record found by a browser (values may arrive as strings or Buffers). Returns
 * undefined when it is not an Orchard node record (missing id or port), so discovery can skip it.
 */
export function decodeTxt(txt: unknown): NodeTxt | undefined {
  if (typeof txt !== 'object' || txt === null) return undefined;
  const raw = txt as Record<string, unknown>;
  const str = (k: string): string => {
    const v = raw[k];
    if (typeof v === 'string') return v;
    if (v instanceof Uint8Array) return Buffer.from(v).toString('utf8');
    return '';
  };
  const num = (k: string): number => {
    const s = str(k);
    return /^\d+$/.test(s) ? Number(s) : 0;
  };
  const id = str('id');
  const grpc = num('grpc');
  if (id === '' || grpc === 0 || grpc > 65535) return undefined;
  const thunderbolt = str('tb')
    .split(',')
    .filter((a) => /^\d+\.\d+\.\d+\.\d+$/.test(a));
  const tunnel = num('tunnel') <= 65535 ? num('tunnel') : 0;
  return { id, pv: str('pv'), chip: str('chip'), ram: num('ram'), bw: num('bw'), wired: num('wired'), budget: num('budget'), grpc, tunnel, thunderbolt };
}

export interface AdvertiserOptions {
  /**
   * Send and listen on this interface address only. Bonjour then binds 0.0.0.0 and uses the
   * address as the multicast interface: binding the unicast address itself would never see
   * multicast (checked in notes/bonjour.md). Undefined = the OS default multicast route.
   */
  readonly interfaceAddress?: string;
  readonly log: Logger;
}

/** Publishes one node; `update` re-announces with a new TXT, `stop` sends the goodbye. */
export class NodeAdvertiser {
  private bonjour: Bonjour | undefined;
  private service: Service | undefined;
  private lastTxt = '';

  constructor(private readonly options: AdvertiserOptions) {}

  start(profile: HardwareProfile, grpcPort: number): void {
    const opts = this.options.interfaceAddress ? { interface: this.options.interfaceAddress, bind: '0.0.0.0' } : {};
    // bonjour-service's error callback defaults to throwing inside a socket handler; log instead
    // (mDNS failing must not take down the agent: static join still works).
    this.bonjour = new Bonjour(opts as never, (err: unknown) => this.options.log.warn({ err: errorMessage(err) }, 'mDNS error'));
    // No name probing: bonjour-service probes for ~1 s before announcing and on a clash only
    // console.logs to stdout (our machine-readable channel) and gives up. Instance names default
    // to the hostname, which is unique on a LAN, and coordinators key nodes on the TXT id.
    this.publish(profile, grpcPort);
  }

  /** Re-announce when what the TXT says has changed (e.g. the wired limit was raised). */
  update(profile: HardwareProfile, grpcPort: number): boolean {
    if (!this.bonjour) return false;
    const txt = JSON.stringify(encodeTxt(profile, grpcPort));
    if (txt === this.lastTxt) return false;
    // bonjour-service cannot replace a TXT record in place: withdraw the old records (goodbye,
    // TTL 0) and announce new ones. Browsers see a short down/up with the same stable id.
    const old = this.service;
    old?.stop?.(() => {});
    this.publish(profile, grpcPort);
    return true;
  }

  private publish(profile: HardwareProfile, grpcPort: number): void {
    const txt = encodeTxt(profile, grpcPort);
    this.lastTxt = JSON.stringify(txt);
    this.service = this.bonjour!.publish({ name: profile.name, type: SERVICE_TYPE, port: grpcPort, txt, probe: false });
    this.service.on('error', (err: unknown) => this.options.log.warn({ err: errorMessage(err) }, 'mDNS publish error'));
    this.service.once('up', () => this.options.log.info({ name: profile.name, port: grpcPort }, 'advertised on mDNS as _orchard._tcp'));
  }

  /** Goodbye (records with TTL 0) so browsers drop the node at once, then close the sockets. */
  async stop(): Promise<void> {
    const bonjour = this.bonjour;
    if (!bonjour) return;
    this.bonjour = undefined;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, 1000); // never let a stuck socket hold up shutdown
      bonjour.unpublishAll(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    await new Promise<void>((resolve) => bonjour.destroy(() => resolve()));
  }
}
