/**
 * The 127.0.0.1 ports a worker's tunnel listener may forward to: only engines this agent started
 * (rpc-servers, MLX ring ranks) register here (and unregister when they stop), so an authenticated
 * peer still cannot reach an arbitrary local service (sshd, a database, another user's server)
 * through the tunnel.
 */
export class EnginePorts {
  readonly #ports = new Map<number, string>();

  register(port: number, engine: string): void {
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`not a TCP port: ${port}`);
    this.#ports.set(port, engine);
  }

  unregister(port: number): void {
    this.#ports.delete(port);
  }

  /** Drop every port of `engine`. */
  unregisterEngine(engine: string): void {
    for (const [port, e] of this.#ports) if (e === engine) this.#ports.delete(port);
  }

  /** The engine name registered on `port`, or undefined. */
  engine(port: number): string | undefined {
    return this.#ports.get(port);
  }
}
