import { timingSafeEqual } from 'node:crypto';
import { type ApiKeyScope, type ApiKeyStore, apiKeyDigest, matchApiKey, scopePermits } from '../state/api-key-store.ts';

/**
 * Who may call the coordinator, decided once for HTTP (guard.ts) and gRPC (grpc-access.ts):
 * a presented key is the operator's `--api-key` or the local admin key (both admin), or one of
 * the keys in the key store (with its scope).
 *
 * Enforcement: on as soon as a credential is configured — an `--api-key`, or any key made with
 * `orchard coordinator keys create` (read from the store at each check, so the first created key
 * locks the API at once). With none, the API stays open as before keys existed (every caller is
 * admin); the local admin key alone does not lock it, so a fresh `orchard up` needs nothing.
 */
export type AccessDecision =
  | { readonly ok: true; readonly scope: ApiKeyScope; readonly keyName: string }
  | { readonly ok: false; readonly why: 'missing' | 'invalid' | 'scope'; readonly scope?: ApiKeyScope };

export interface AccessOptions {
  /** Admin keys given on the command line/environment and the local admin key file's. */
  readonly adminKeys: readonly (string | undefined)[];
  /** Whether the admin keys alone lock the API (an operator's --api-key does; the local key does not). */
  readonly locked: boolean;
  readonly store?: ApiKeyStore | undefined;
}

export class AccessControl {
  readonly #admin: { name: string; digest: Buffer }[];

  constructor(readonly o: AccessOptions) {
    this.#admin = o.adminKeys.flatMap((k, i) => (k ? [{ name: i === 0 ? 'api-key' : 'local-admin', digest: apiKeyDigest(k) }] : []));
  }

  async enforced(): Promise<boolean> {
    return this.o.locked || ((await this.o.store?.current()) ?? []).length > 0;
  }

  /**
   * Decide one call: `presented` is the key the caller sent (undefined: none), `needed` the
   * route's scope. `always`: enforce even while no operator key exists (the gRPC port, which
   * faces the network by default; the CLI on this machine finds the local admin key itself).
   */
  async decide(presented: string | undefined, needed: ApiKeyScope, always = false): Promise<AccessDecision> {
    if (!always && !(await this.enforced())) return { ok: true, scope: 'admin', keyName: 'open' };
    if (presented === undefined || presented === '') return { ok: false, why: 'missing' };
    const granted = await this.#identify(presented);
    if (!granted) return { ok: false, why: 'invalid' };
    if (!scopePermits(granted.scope, needed)) return { ok: false, why: 'scope', scope: granted.scope };
    return { ok: true, ...granted };
  }

  async #identify(presented: string): Promise<{ scope: ApiKeyScope; keyName: string } | undefined> {
    const d = apiKeyDigest(presented);
    let admin: string | undefined;
    for (const a of this.#admin) if (timingSafeEqual(d, a.digest) && admin === undefined) admin = a.name;
    const stored = matchApiKey((await this.o.store?.current()) ?? [], presented);
    if (admin !== undefined) return { scope: 'admin', keyName: admin };
    return stored ? { scope: stored.scope, keyName: stored.name } : undefined;
  }
}

/** The key in an `authorization: Bearer KEY` value (HTTP header or gRPC metadata). */
export function bearerKey(authorization: string | undefined): string | undefined {
  if (!authorization) return undefined;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(authorization);
  return m?.[1];
}
