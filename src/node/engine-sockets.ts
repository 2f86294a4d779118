import { createHash } from 'node:crypto';
import { chmod, lstat, mkdir, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { OrchardError } from '../shared/errors.ts';
import type { Logger } from '../shared/log.ts';

/*
 * The Unix-domain sockets of the agent's llama.cpp RPC legs: every rpc-server it starts listens on
 * `<dir>/rpc-<engine port>.sock` (engine patch ggml-rpc-unix-socket, endpoint `unix:<path>`) and
 * nowhere else, and a head's tunnel forwarders listen on `<dir>/fwd-<id>.sock`. The directory is
 * the agent's alone (0700), so no other local user can reach an rpc-server — on 127.0.0.1 any
 * could — and the loopback legs skip the TCP stack (bench:tunnel). The engine port stays the
 * engine's identity (registration, preamble, metrics); its socket path is derived from it here.
 * MLX ring ranks stay on TCP: MLX needs host:port.
 */

/** sun_path's size (bytes, NUL included): 104 on macOS and the BSDs, 108 on Linux. */
export function sunPathBytes(platform: NodeJS.Platform): number {
  return platform === 'linux' ? 108 : 104;
}

/** The longest socket name put in the directory (`fwd-` + 8 hex + `.sock`; `rpc-65535.sock` is shorter). */
const LONGEST_NAME = 'fwd-00000000.sock'.length;

/**
 * Characters a socket path may hold: llama.cpp splits `--rpc` at commas and names its devices in
 * log lines the coordinator parses at whitespace and parentheses (`using device RPC0 (<endpoint>)`),
 * so a path with any of those (macOS's "Application Support") is not used.
 */
const SAFE_PATH = /^\/[A-Za-z0-9._/-]*$/;

/**
 * Pure: the agent's socket directory. `<run dir>/sockets` when every socket path in it fits
 * sun_path (with its NUL) and holds only safe characters; else a short private directory in the
 * system temp dir, `orchard-<uid>-<hash of the run dir>` (one per agent state dir, stable across
 * restarts so the next start sweeps it).
 */
export function engineSocketDirFor(runDir: string, o: { platform: NodeJS.Platform; uid: number; tmp: string }): string {
  const preferred = join(runDir, 'sockets');
  if (fits(preferred, o.platform)) return preferred;
  const hash = createHash('sha256').update(runDir).digest('hex').slice(0, 12);
  const fallback = join(o.tmp, `orchard-${o.uid}-${hash}`);
  if (fits(fallback, o.platform)) return fallback;
  throw new OrchardError(`no directory for the engines' Unix sockets: ${preferred} and ${fallback} are too long for a socket path (${sunPathBytes(o.platform) - 1} bytes) or hold characters llama.cpp cannot take (only A-Z a-z 0-9 . _ / -)`);
}

function fits(dir: string, platform: NodeJS.Platform): boolean {
  return SAFE_PATH.test(dir) && Buffer.byteLength(dir) + 1 + LONGEST_NAME + 1 <= sunPathBytes(platform);
}

/** Pure: the socket an agent's rpc-server on engine port `port` listens on. */
export function rpcServerSocket(dir: string, port: number): string {
  return join(dir, `rpc-${port}.sock`);
}

/** Pure: llama.cpp's RPC endpoint for a socket path (engine patch ggml-rpc-unix-socket). */
export const unixEndpoint = (path: string): string => `unix:${path}`;

const isOurSocket = (name: string) => /^(rpc|fwd)-[0-9a-z]+\.sock$/.test(name);

/**
 * Create (0700) or take over the socket directory, refusing one another user owns, a symlink, or
 * one whose mode lets others in that chmod cannot fix; remove the sockets a previous run left
 * behind (an agent SIGKILLed while its engines ran: the watchdog killed them, nothing unlinked).
 */
export async function prepareEngineSocketDir(runDir: string, log: Logger, o = { platform: process.platform, uid: process.getuid?.() ?? 0, tmp: tmpdir() }): Promise<string> {
  const dir = engineSocketDirFor(runDir, o);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const st = await lstat(dir);
  if (!st.isDirectory() || (process.getuid && st.uid !== process.getuid())) {
    throw new OrchardError(`${dir} is not a directory this user owns: it cannot hold the engines' sockets (remove it)`);
  }
  await chmod(dir, 0o700); // mkdir leaves an existing folder's mode alone
  const stale = (await readdir(dir)).filter(isOurSocket);
  await Promise.all(stale.map((n) => rm(join(dir, n), { force: true })));
  if (stale.length > 0) log.info({ dir, removed: stale }, 'removed engine sockets a previous run left behind');
  return dir;
}
