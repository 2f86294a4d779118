import { createServer, type Server } from 'node:net';
import { EnginePortAllocator, engineRangeOf } from '../../src/node/ports.ts';

/**
 * The engine port allocator of this machine's engine port range, except that right after it hands
 * out its `nth` port (1-based) a real listener of this process binds that port: what another
 * program does when it takes a port in the moment between the allocator's check and the engine's
 * own bind. Every port it handed out is in `handedOut`; `raced` is the one taken; `close()` ends
 * the listener.
 */
export class RacedPortAllocator extends EnginePortAllocator {
  readonly handedOut: number[] = [];
  raced: number | undefined;
  #listener: Server | undefined;

  constructor(private readonly nth = 1) {
    super(engineRangeOf(undefined));
  }

  override async take(host: string): Promise<number> {
    const port = await super.take(host);
    this.handedOut.push(port);
    if (this.handedOut.length === this.nth) {
      this.#listener = await listen(host, port);
      this.raced = port;
    }
    return port;
  }

  close(): Promise<void> {
    return new Promise((resolve) => (this.#listener ? this.#listener.close(() => resolve()) : resolve()));
  }
}

function listen(host: string, port: number): Promise<Server> {
  return new Promise((resolve, reject) => {
    const s = createServer((sock) => sock.destroy());
    s.once('error', reject);
    s.listen({ host, port, exclusive: true }, () => resolve(s));
  });
}
