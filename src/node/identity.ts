import { randomUUID } from 'node:crypto';
import { link, mkdir, open, readFile, unlink } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { OrchardError, errorMessage } from '../shared/errors.ts';

/**
 * A node's stable identity. The id is created once and persisted in the state dir, so a
 * restarted agent replaces its old registry entry instead of leaving a ghost next to it (the
 * top complaint about exo's random per-start ids).
 */
export interface NodeIdentity {
  readonly nodeId: string;
  readonly createdAt: string;
  /** true when this call created the id (first start with this state dir). */
  readonly created: boolean;
}

export const IDENTITY_FILE = 'identity.json';

const identityFile = z.object({
  nodeId: z.string().regex(/^[0-9a-f-]{8,64}$/),
  createdAt: z.string(),
});

/**
 * Default state dir: `$ORCHARD_NODE_STATE_DIR`, else `$XDG_STATE_HOME/orchard/node` when XDG is
 * in use (Linux), else `~/.orchard/node` (macOS, and Linux without XDG).
 */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env, home: string = homedir()): string {
  if (env.ORCHARD_NODE_STATE_DIR) return env.ORCHARD_NODE_STATE_DIR;
  if (env.XDG_STATE_HOME) return join(env.XDG_STATE_HOME, 'orchard', 'node');
  return join(home, '.orchard', 'node');
}

/** Parse the persisted identity file; a damaged file is an error, never silently replaced. */
export function parseIdentity(text: string, path: string): { nodeId: string; createdAt: string } {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new OrchardError(`node identity file ${path} is not valid JSON; fix or delete it (deleting gives this node a new id)`);
  }
  const parsed = identityFile.safeParse(json);
  if (!parsed.success) {
    throw new OrchardError(`node identity file ${path} has no valid nodeId; fix or delete it (deleting gives this node a new id)`);
  }
  return parsed.data;
}

/** Load the node id from `stateDir`, creating it (atomically) on first use. */
export async function loadOrCreateIdentity(stateDir: string): Promise<NodeIdentity> {
  const path = join(stateDir, IDENTITY_FILE);
  try {
    await mkdir(stateDir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new OrchardError(`cannot create state dir ${stateDir}: ${errorMessage(err)}`);
  }
  const existing = await readIfExists(path);
  if (existing !== undefined) return { ...parseIdentity(existing, path), created: false };

  const fresh = { nodeId: randomUUID(), createdAt: new Date().toISOString() };
  const created = await createFileAtomic(path, `${JSON.stringify(fresh, null, 2)}\n`);
  if (created) return { ...fresh, created: true };
  // Another agent on the same state dir created it first: use its id, not ours.
  return { ...parseIdentity((await readIfExists(path)) ?? '', path), created: false };
}

async function readIfExists(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new OrchardError(`cannot read ${path}: ${errorMessage(err)}`);
  }
}

/**
 * Create `path` with `content` only if it does not exist yet. The content is written to a temp
 * file in the same directory and fsynced, then hard-linked into place: link(2) fails with EEXIST
 * instead of replacing, and a crash leaves either no file or the complete one, never a
 * truncated id. Returns false when the file already existed.
 */
export async function createFileAtomic(path: string, content: string): Promise<boolean> {
  const tmp = `${path}.${process.pid}.${randomUUID().slice(0, 8)}.tmp`;
  try {
    const fh = await open(tmp, 'wx', 0o600);
    try {
      await fh.writeFile(content, 'utf8');
      await fh.sync();
    } finally {
      await fh.close();
    }
    await link(tmp, path);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw new OrchardError(`cannot write ${path}: ${errorMessage(err)}`);
  } finally {
    await unlink(tmp).catch(() => {});
  }
}
