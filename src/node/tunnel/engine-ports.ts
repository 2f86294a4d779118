/**
 * The 127.0.0.1 ports a worker's tunnel listener may forward to: only engines this agent started
 * (rpc-servers, MLX ring ranks) register here (and unregister when they stop), so an authenticated
 * peer still cannot reach an arbitrary local service (sshd, a database, another user's server)
 * through the tunnel. The Node listener asks here per connection; the native one (another
 * process) follows the changes (`onChange`).
 */
export class EnginePorts {
  readonly #ports = new Map<number, string>();
  readonly #observers = new Set<(port: number, engine: string | undefined) => void>();

  register(port: number, engine: string): void {
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`not a TCP port: ${port}`);
    this.#ports.set(port, engine);
    for (const f of this.#observers) f(port, engine);
  }

  unregister(port: number): void {
    if (!this.#ports.delete(port)) return;
    for (const f of this.#observers) f(port, undefined);
  }

  /** Drop every port of `engine`. */
  unregisterEngine(engine: string): void {
    for (const [port, e] of this.#ports) if (e === engine) this.unregister(port);
  }

  /** The engine name registered on `port`, or undefined. */
  engine(port: number): string | undefined {
    return this.#ports.get(port);
  }

  ports(): number[] {
    return [...this.#ports.keys()];
  }

  /** Call `f` on every change (engine undefined: unregistered); returns the unsubscribe. */
  onChange(f: (port: number, engine: string | undefined) => void): () => void {
    this.#observers.add(f);
    return () => this.#observers.delete(f);
  }
}
