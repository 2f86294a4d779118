import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { OrchardError } from '../../shared/errors.ts';
import { writeFileAtomic } from '../../shared/pki/files.ts';
import {
  JoinTokenRecord,
  type NewTokenOptions,
  type RedeemResult,
  newClusterJoinToken,
  pruneJoinTokens,
  redeemClusterJoinToken,
  revokeJoinToken,
} from '../membership/join-token.ts';

const TokenFile = z.object({ version: z.literal(1), tokens: z.array(JoinTokenRecord) });

/**
 * The coordinator's join tokens on disk (0600, hashed secrets only). Every change is
 * read-modify-write under one in-process queue, so two nodes joining at once cannot both spend
 * the last use; the file is the truth, so a restart keeps uses and expiry.
 */
export class JoinTokenStore {
  #queue: Promise<unknown> = Promise.resolve();

  constructor(
    readonly path: string,
    readonly caFingerprint: string,
  ) {}

  /** A new token, printed once by the caller; only its hash is stored. */
  create(o: Omit<NewTokenOptions, 'caFingerprint'>): Promise<{ token: string; record: JoinTokenRecord }> {
    return this.#mutate((records) => {
      const made = newClusterJoinToken({ ...o, caFingerprint: this.caFingerprint });
      return { records: [...pruneJoinTokens(records, o.now), made.record], result: made };
    });
  }

  redeem(presented: string, now: Date = new Date()): Promise<RedeemResult> {
    return this.#mutate((records) => {
      const r = redeemClusterJoinToken(records, presented, this.caFingerprint, now);
      return { records: r.ok ? r.records : undefined, result: r };
    });
  }

  revoke(id: string): Promise<boolean> {
    return this.#mutate((records) => {
      const r = revokeJoinToken(records, id);
      return { records: r.found ? r.records : undefined, result: r.found };
    });
  }

  list(): Promise<JoinTokenRecord[]> {
    return this.#mutate((records) => ({ records: undefined, result: records }));
  }

  #mutate<T>(change: (records: JoinTokenRecord[]) => { records: JoinTokenRecord[] | undefined; result: T }): Promise<T> {
    const run = this.#queue.then(async () => {
      const { records, result } = change(await this.#read());
      if (records) await writeFileAtomic(this.path, `${JSON.stringify({ version: 1, tokens: records }, null, 2)}\n`, 0o600);
      return result;
    });
    this.#queue = run.catch(() => undefined);
    return run;
  }

  async #read(): Promise<JoinTokenRecord[]> {
    let text: string;
    try {
      text = await readFile(this.path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      throw new OrchardError(`${this.path} is not valid JSON; fix or delete it (deleting invalidates every join token)`);
    }
    const parsed = TokenFile.safeParse(json);
    if (!parsed.success) throw new OrchardError(`${this.path} is malformed: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
    return parsed.data.tokens;
  }
}
