/**
 * The 127.0.0.1 ports a worker's tunnel listener may forward to: only engines this agent started
 * (rpc-servers, MLX ring ranks) register here (and unregister when they stop), so an authenticated
 * peer still cannot reach an arbitrary local service (sshd, a database, another user's server)
 * through the tunnel. The Node listener asks here per connection; the native one (another
 * process) follows the changes (`onChange`). An engine that listens on a Unix-domain socket (an
 * rpc-server, engine-sockets.ts) registers its path with its port: the port stays its identity
 * on the wire, the path is where the listener dials it.
 */
export interface EnginePortEntry {
  readonly engine: string;
  /** The engine's Unix-domain socket; absent = 127.0.0.1:<port> (MLX ring ranks). */
  readonly socket?: string | undefined;
}

export class EnginePorts {
  readonly #ports = new Map<number, EnginePortEntry>();
  readonly #observers = new Set<(port: number, entry: EnginePortEntry | undefined) => void>();

  register(port: number, engine: string, socket?: string): void {
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`not a TCP port: ${port}`);
    const entry = socket === undefined ? { engine } : { engine, socket };
    this.#ports.set(port, entry);
    for (const f of this.#observers) f(port, entry);
  }

  unregister(port: number): void {
    if (!this.#ports.delete(port)) return;
    for (const f of this.#observers) f(port, undefined);
  }

  /** Drop every port of `engine`. */
  unregisterEngine(engine: string): void {
    for (const [port, e] of this.#ports) if (e.engine === engine) this.unregister(port);
  }

  /** The engine name registered on `port`, or undefined. */
  engine(port: number): string | undefined {
    return this.#ports.get(port)?.engine;
  }

  /** The Unix-domain socket of the engine on `port`, or undefined (TCP, or not registered). */
  socket(port: number): string | undefined {
    return this.#ports.get(port)?.socket;
  }

  ports(): number[] {
    return [...this.#ports.keys()];
  }

  /** The registered ports whose engine listens on a socket: port → path. */
  sockets(): Record<number, string> {
    return Object.fromEntries([...this.#ports].flatMap(([port, e]) => (e.socket === undefined ? [] : [[port, e.socket]])));
  }

  /** Call `f` on every change (entry undefined: unregistered); returns the unsubscribe. */
  onChange(f: (port: number, entry: EnginePortEntry | undefined) => void): () => void {
    this.#observers.add(f);
    return () => this.#observers.delete(f);
  }
}
