import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { OrchardError } from '../../shared/errors.ts';
import { writeFileAtomic } from '../../shared/pki/files.ts';
import { IdentityId } from '../../shared/pki/identity.ts';

const RevocationFile = z.object({
  version: z.literal(1),
  nodes: z.array(z.object({ nodeId: IdentityId, revokedAt: z.iso.datetime() })),
});

/**
 * Nodes this cluster no longer accepts (`orchard cluster revoke NODE`), by node id: every
 * certificate ever issued to that id is refused, renewals included, and the id cannot join
 * again with a token — a revoked machine that kept its key must not walk back in. The file
 * (0600) is the truth across restarts; lookups are in memory because they sit on every call.
 */
export class RevocationList {
  #nodes = new Map<string, string>();

  private constructor(readonly path: string) {}

  static async open(path: string): Promise<RevocationList> {
    const list = new RevocationList(path);
    let text: string | undefined;
    try {
      text = await readFile(path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    if (text !== undefined) {
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch {
        throw new OrchardError(`${path} is not valid JSON; fix it (deleting it lets every revoked node back in)`);
      }
      const parsed = RevocationFile.safeParse(json);
      if (!parsed.success) throw new OrchardError(`${path} is malformed: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
      for (const n of parsed.data.nodes) list.#nodes.set(n.nodeId, n.revokedAt);
    }
    return list;
  }

  /** Every revoked node id (what agents are sent). */
  ids(): string[] {
    return [...this.#nodes.keys()];
  }

  isRevoked(nodeId: string): boolean {
    return this.#nodes.has(nodeId);
  }

  /** Revoke a node; false when it already was. */
  async revoke(nodeId: string, now: Date = new Date()): Promise<boolean> {
    const id = IdentityId.parse(nodeId);
    if (this.#nodes.has(id)) return false;
    this.#nodes.set(id, now.toISOString());
    const nodes = [...this.#nodes].map(([n, at]) => ({ nodeId: n, revokedAt: at }));
    await writeFileAtomic(this.path, `${JSON.stringify({ version: 1, nodes }, null, 2)}\n`, 0o600);
    return true;
  }
}
