import { Bonjour, type Browser, type Service, type ServiceConfig } from 'bonjour-service';
import type { Logger } from '../../shared/log.ts';
import { COORDINATOR_SERVICE_TYPE } from '../../shared/service-types.ts';

export const ORCHARD_SERVICE_TYPE = 'orchard';

export interface DiscoveryOptions {
  /**
   * IPv4 address of the interface to browse on. When set, the socket binds 0.0.0.0 and sends
   * via this interface (binding the unicast address never sees multicast; see notes/bonjour.md).
   */
  readonly interface?: string | undefined;
  /** An advertisement went away (a goodbye): its address. */
  readonly onGone?: ((address: string) => void) | undefined;
  /** How often to browse afresh, so every agent still announced is reported again (default DISCOVERY_REFRESH_MS). */
  readonly refreshMs?: number | undefined;
}

/**
 * bonjour-service reports a record once, and keeps it until a goodbye or its 8-hour PTR TTL. A
 * fresh browser every minute reports again whoever answers now, which is what lets a discovered
 * agent that vanished silently age out (DISCOVERED_TTL_MS is three of these).
 */
export const DISCOVERY_REFRESH_MS = 60_000;

/**
 * Which address of a Bonjour sighting to dial: the address the answer came from when the
 * service lists it (that path demonstrably works), else the first IPv4, else the first any.
 * Pure, so the choice is tested without multicast.
 */
export function pickServiceAddress(s: { addresses?: readonly string[] | undefined; referer?: { address: string } | undefined; port: number }): string | undefined {
  const addrs = s.addresses ?? [];
  const ref = s.referer?.address;
  let host: string | undefined;
  if (ref && addrs.includes(ref)) host = ref;
  else host = addrs.find((a) => /^\d+\.\d+\.\d+\.\d+$/.test(a)) ?? addrs[0] ?? ref;
  if (!host || !(s.port > 0)) return undefined;
  return host.includes(':') ? `[${host}]:${s.port}` : `${host}:${s.port}`;
}

/** Browse `_orchard._tcp` and report every agent address seen (repeated sightings included) and every goodbye. */
export class Discovery {
  readonly #bonjour: Bonjour;
  #browser: Browser;
  readonly #browse: () => Browser;
  readonly #timer: NodeJS.Timeout;

  constructor(onAgent: (address: string, txt: Record<string, string>, name: string) => void, log: Logger, options: DiscoveryOptions = {}) {
    // bonjour-service passes these through to multicast-dns, whose options its types omit.
    const mdnsOptions = (options.interface ? { interface: options.interface, bind: '0.0.0.0' } : {}) as Partial<ServiceConfig>;
    this.#bonjour = new Bonjour(mdnsOptions, (err: unknown) =>
      log.warn({ err: String(err) }, 'mDNS error'),
    );
    const seen = (s: Service) => {
      const address = pickServiceAddress(s);
      if (!address) return;
      const txt: Record<string, string> = {};
      for (const [k, v] of Object.entries((s.txt ?? {}) as Record<string, unknown>)) txt[k] = String(v);
      log.debug({ name: s.name, address, txt }, 'mDNS sighting');
      onAgent(address, txt, s.name);
    };
    const gone = (s: Service) => {
      const address = pickServiceAddress(s);
      log.debug({ name: s.name, address }, 'mDNS goodbye');
      if (address) options.onGone?.(address);
    };
    this.#browse = () => {
      const b = this.#bonjour.find({ type: ORCHARD_SERVICE_TYPE, protocol: 'tcp' }, seen);
      b.on('srv-update', seen);
      b.on('down', gone);
      return b;
    };
    this.#browser = this.#browse();
    this.#timer = setInterval(() => this.refresh(), options.refreshMs ?? DISCOVERY_REFRESH_MS);
    this.#timer.unref();
  }

  /** Browse afresh: every agent that answers is reported again (agents that came up since too). */
  refresh(): void {
    const old = this.#browser;
    this.#browser = this.#browse();
    old.stop();
  }

  close(): Promise<void> {
    clearInterval(this.#timer);
    this.#browser.stop();
    return new Promise((resolve) => this.#bonjour.destroy(() => resolve()));
  }
}

/**
 * The coordinator on Bonjour (`_orchard-coord._tcp`): its gRPC port, cluster id and CA
 * fingerprint (public). Nodes started with a join token browse for it; they trust nothing the
 * record says until the TLS chain matches the token's fingerprint (src/shared/pki/pin.ts).
 */
export class CoordinatorAdvertiser {
  readonly #bonjour: Bonjour;

  constructor(o: { port: number; clusterId: string; caFingerprint: string; interface?: string | undefined }, log: Logger) {
    const mdnsOptions = (o.interface ? { interface: o.interface, bind: '0.0.0.0' } : {}) as Partial<ServiceConfig>;
    this.#bonjour = new Bonjour(mdnsOptions, (err: unknown) => log.warn({ err: String(err) }, 'mDNS error'));
    this.#bonjour.publish({
      name: `orchard coordinator ${o.clusterId.slice(0, 8)}`,
      type: COORDINATOR_SERVICE_TYPE,
      protocol: 'tcp',
      port: o.port,
      txt: { cluster: o.clusterId, ca: o.caFingerprint },
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => this.#bonjour.unpublishAll(() => this.#bonjour.destroy(() => resolve())));
  }
}
