import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { z } from 'zod';
import { OrchardError, UsageError } from '../../shared/errors.ts';
import { readIfExists, writeFileAtomic } from '../../shared/pki/files.ts';

/**
 * API keys of the coordinator's HTTP and gRPC APIs. A key has a scope:
 *   inference  generation and reading (models, completions, the console's live view, Status, Plan)
 *   admin      everything, load and unload included
 * Only a key's SHA-256 is stored (0600, atomic replace); the key itself is printed once when it
 * is made. Keys are 32 random bytes, so a plain hash is enough (no password stretching needed).
 */
export const API_KEY_SCOPES = ['inference', 'admin'] as const;
export type ApiKeyScope = (typeof API_KEY_SCOPES)[number];

export const ApiKeyRecord = z.object({
  name: z.string().min(1),
  scope: z.enum(API_KEY_SCOPES),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  created: z.string(),
});
export type ApiKeyRecord = z.infer<typeof ApiKeyRecord>;

const KeyFile = z.object({ version: z.literal(1), keys: z.array(ApiKeyRecord) });

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** A fresh key: recognisable prefix (secret scanners, logs review), 256 random bits. */
export function newApiKey(): string {
  return `orchard_sk_${randomBytes(32).toString('base64url')}`;
}

export function apiKeyDigest(key: string): Buffer {
  return createHash('sha256').update(key).digest();
}

/** Does `granted` open a route that needs `needed`? admin opens everything. */
export function scopePermits(granted: ApiKeyScope, needed: ApiKeyScope): boolean {
  return granted === 'admin' || needed === 'inference';
}

/**
 * The record whose hash matches, comparing against every record in constant time each (no early
 * exit on the first match, so timing does not tell how many keys there are before it).
 */
export function matchApiKey(records: readonly ApiKeyRecord[], presented: string): ApiKeyRecord | undefined {
  const d = apiKeyDigest(presented);
  let found: ApiKeyRecord | undefined;
  for (const r of records) if (timingSafeEqual(d, Buffer.from(r.sha256, 'hex')) && !found) found = r;
  return found;
}

/**
 * The key file, read by the coordinator on each authentication (re-parsed only when its mtime or
 * size changed, so `keys revoke` on this machine takes effect at the next request) and changed
 * by `orchard coordinator keys` — the file's owner and mode are the authority, like the join
 * tokens next to it.
 */
export class ApiKeyStore {
  #queue: Promise<unknown> = Promise.resolve();
  #cache: { stamp: string; records: ApiKeyRecord[] } | undefined;

  constructor(readonly path: string) {}

  create(o: { scope: ApiKeyScope; name?: string | undefined; now?: Date | undefined }): Promise<{ key: string; record: ApiKeyRecord }> {
    return this.#mutate((records) => {
      const name = o.name ?? `${o.scope}-${randomBytes(3).toString('hex')}`;
      if (!NAME.test(name)) throw new UsageError(`invalid key name "${name}": letters, digits, . _ - (at most 64)`);
      if (records.some((r) => r.name === name)) throw new UsageError(`a key named "${name}" exists; revoke it first or pick another --name`);
      const key = newApiKey();
      const record: ApiKeyRecord = { name, scope: o.scope, sha256: apiKeyDigest(key).toString('hex'), created: (o.now ?? new Date()).toISOString() };
      return { records: [...records, record], result: { key, record } };
    });
  }

  revoke(name: string): Promise<boolean> {
    return this.#mutate((records) => {
      const kept = records.filter((r) => r.name !== name);
      return { records: kept.length === records.length ? undefined : kept, result: kept.length !== records.length };
    });
  }

  list(): Promise<ApiKeyRecord[]> {
    return this.#mutate((records) => ({ records: undefined, result: records }));
  }

  /** The records as they are on disk now (cached by mtime and size): the guard's view. */
  async current(): Promise<ApiKeyRecord[]> {
    let stamp: string;
    try {
      const s = await stat(this.path);
      stamp = `${s.ino}:${s.mtimeMs}:${s.size}`;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    if (this.#cache?.stamp !== stamp) this.#cache = { stamp, records: await this.#read() };
    return this.#cache.records;
  }

  #mutate<T>(change: (records: ApiKeyRecord[]) => { records: ApiKeyRecord[] | undefined; result: T }): Promise<T> {
    const run = this.#queue.then(async () => {
      const { records, result } = change(await this.#read());
      if (records) await writeFileAtomic(this.path, `${JSON.stringify({ version: 1, keys: records }, null, 2)}\n`, 0o600);
      return result;
    });
    this.#queue = run.catch(() => undefined);
    return run;
  }

  async #read(): Promise<ApiKeyRecord[]> {
    const text = await readIfExists(this.path);
    if (text === undefined) return [];
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      throw new OrchardError(`${this.path} is not valid JSON; fix or delete it (deleting revokes every API key)`);
    }
    const parsed = KeyFile.safeParse(json);
    if (!parsed.success) throw new OrchardError(`${this.path} is malformed: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
    return parsed.data.keys;
  }
}

/**
 * The local admin key: written (0600) by the coordinator at first start so that the CLI on the
 * same machine, run by the same user, reaches it without the user copying a secret anywhere.
 */
export async function loadOrCreateLocalAdminKey(path: string): Promise<string> {
  const existing = (await readIfExists(path))?.trim();
  if (existing) return existing;
  const key = newApiKey();
  await writeFileAtomic(path, `${key}\n`, 0o600);
  return key;
}

export async function readLocalAdminKey(path: string): Promise<string | undefined> {
  try {
    return (await readFile(path, 'utf8')).trim() || undefined;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // Another user's coordinator (EACCES) is not ours to use; missing means none on this machine.
    if (code === 'ENOENT' || code === 'EACCES' || code === 'ENOTDIR') return undefined;
    throw err;
  }
}
