import { readFile } from 'node:fs/promises';
import type { NodeAgent } from '../node/agent.ts';
import { loadNodeTls } from '../node/identity-credentials.ts';
import { JoinRefused, findCoordinator, nodeRenewalStep, joinWithToken, renewAndAnnounce } from '../node/join.ts';
import { UsageError, errorMessage } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';
import { certificateFingerprint } from '../shared/pki/certificates.ts';
import type { TlsCredentials } from '../shared/pki/grpc-tls.ts';
import { parseClusterJoinToken } from '../shared/pki/join-token-text.ts';

/**
 * `orchard node`'s membership: join with the token when the node holds no certificate yet, then
 * (static join) announce the agent's address, and renew the certificate before it expires — all
 * with the same Join RPC (src/node/join.ts). Secrets: the token comes from ORCHARD_NODE_TOKEN or
 * --token-file; a --token on the command line is accepted but scrubbed from `ps` (see scrubArgv).
 */

/** The join token from --token-file (first line) or --token / ORCHARD_NODE_TOKEN. */
export async function readJoinToken(flags: { token?: string | undefined; tokenFile?: string | undefined }): Promise<string | undefined> {
  let text = flags.token;
  if (flags.tokenFile !== undefined) {
    text = await readFile(flags.tokenFile, 'utf8').catch((err: NodeJS.ErrnoException) => {
      throw new UsageError(`cannot read --token-file ${flags.tokenFile}: ${err.code ?? err.message}`);
    });
    text = text.split(/\r?\n/)[0];
  }
  if (text === undefined || text.trim() === '') return undefined;
  parseClusterJoinToken(text); // a usage error now, not a refusal later
  return text.trim();
}

/**
 * A secret given as `--token T` is visible to every user in `ps` for as long as the process runs.
 * Node's process.title rewrites the argv area the kernel shows (/proc/PID/cmdline on Linux,
 * `ps` on macOS), so after this the token is gone from `ps` — it was visible for the few
 * milliseconds before, which is why the README says: use ORCHARD_NODE_TOKEN or --token-file.
 */
export function scrubArgv(argv: readonly string[] = process.argv): void {
  if (argv.some((a) => a === '--token' || a.startsWith('--token='))) process.title = 'orchard node';
}

const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });

export interface JoinPlan {
  readonly stateDir: string;
  readonly nodeId: string;
  readonly token: string | undefined;
  /** --join HOST:PORT; undefined = find the coordinator over Bonjour. */
  readonly coordinator: string | undefined;
  readonly mdns: boolean;
  readonly mdnsInterface?: string | undefined;
  readonly signal: AbortSignal;
  readonly log: Logger;
}

/** Where the coordinator is: the static address, or the Bonjour answer for this token's CA. */
async function coordinatorFor(p: JoinPlan, caFingerprint: string): Promise<string> {
  if (p.coordinator) return p.coordinator;
  if (!p.mdns) throw new UsageError('--no-mdns needs --join HOST:PORT (the coordinator cannot be found without Bonjour)');
  p.log.info('looking for the coordinator over Bonjour (_orchard-coord._tcp)');
  return findCoordinator(caFingerprint, { interface: p.mdnsInterface, signal: p.signal, log: p.log });
}

/**
 * The node's credentials before the agent starts: the stored ones, or — with a token — a join
 * retried until the coordinator answers (it may start later). A refusal (expired or used-up
 * token, revoked node, another cluster) is final and thrown as its one line. Undefined: no
 * credentials and no token; the agent then serves nothing.
 */
export async function ensureJoined(p: JoinPlan): Promise<TlsCredentials | undefined> {
  const stored = await loadNodeTls(p.stateDir, p.nodeId);
  if (stored) {
    if (p.token) p.log.info('this node already holds a cluster certificate; the join token is not used');
    return stored;
  }
  if (!p.token) return undefined;
  const { caFingerprint } = parseClusterJoinToken(p.token);
  let delay = 500;
  for (;;) {
    const coordinator = await coordinatorFor(p, caFingerprint);
    try {
      const tls = await joinWithToken({ stateDir: p.stateDir, nodeId: p.nodeId, coordinator, token: p.token });
      p.log.info({ coordinator }, 'joined the cluster: node certificate stored');
      return tls;
    } catch (err) {
      if (err instanceof JoinRefused || p.signal.aborted) throw err;
      p.log.warn({ coordinator, err: errorMessage(err) }, 'join failed; retrying');
      await sleep(delay, p.signal);
      delay = Math.min(5000, delay * 2);
    }
  }
}

/**
 * While the agent runs: announce its address once (static join: the coordinator dials it and
 * remembers it), and check the certificate every `checkMs` — or sooner, when it falls due before
 * then (renewalStep); once it is due (last third of its life) renew it with the current one and
 * swap it into the running server. `now` is the clock (injectable for tests).
 */
export async function keepMembership(
  p: JoinPlan & { agent: NodeAgent; agentAddress: string | undefined; checkMs: number; onRefused: (message: string) => void; now?: () => Date },
): Promise<void> {
  const now = p.now ?? (() => new Date());
  let announced = p.agentAddress === undefined;
  let delay = 500;
  while (!p.signal.aborted) {
    const tls = p.agent.credentials();
    if (!tls) return;
    const step = nodeRenewalStep(tls, now(), p.checkMs);
    const due = step.renew;
    if (announced && !step.renew) {
      await sleep(step.waitMs, p.signal);
      continue;
    }
    try {
      const coordinator = await coordinatorFor(p, certificateFingerprint(tls.caCertPem));
      const renewed = await renewAndAnnounce({ stateDir: p.stateDir, nodeId: p.nodeId, coordinator, tls, agentAddress: announced ? undefined : p.agentAddress });
      p.agent.renewCredentials(renewed);
      p.log.info({ coordinator, announced: !announced, renewed: due }, announced ? 'node certificate renewed' : 'agent address announced to the coordinator');
      announced = true;
      delay = 500;
    } catch (err) {
      if (err instanceof JoinRefused) {
        p.onRefused(err.message);
        return;
      }
      p.log.warn({ err: errorMessage(err) }, 'coordinator not reachable for announce/renewal; retrying');
      await sleep(delay, p.signal);
      delay = Math.min(5000, delay * 2);
    }
  }
}
