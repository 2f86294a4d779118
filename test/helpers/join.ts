import { StateDir } from '../../src/coordinator/state/state-dir.ts';

/**
 * A real join token of the coordinator whose state dir this is (what `orchard coordinator token`
 * makes): nodes started with `--join ADDR` and this in ORCHARD_NODE_TOKEN pin the CA, send a CSR
 * and get their certificate. Short-lived, `uses` joins.
 */
export async function joinToken(coordinatorStateDir: string, uses: number): Promise<string> {
  return (await (await new StateDir(coordinatorStateDir).joinTokens()).create({ uses, ttlMs: 10 * 60_000 })).token;
}
