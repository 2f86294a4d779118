import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { errorMessage, OrchardError } from '../../shared/errors.ts';
import { type BuildLog, runCapture, runLogged } from './toolchain.ts';

/*
 * Small changes Orchard carries on top of the llama.cpp source node-llama-cpp bundles, until the
 * same change reaches a release that package ships. Each is a unified diff in ./patches/, applied
 * with `git apply` to the fresh checkout `orchard setup` builds from; their digests are part of
 * the engine cache key (build-config.ts cacheKey), so a build made without a patch, or with an
 * older version of it, is never reused.
 *
 * ggml-rpc-cache-min-size.patch: llama.cpp's RPC client offers a weight to the rpc-server's
 * cache by hash only when it is larger than a fixed 10 MiB (`HASH_THRESHOLD`), so GQA K/V
 * projections of real models always cross the network even when the server was pre-seeded.
 * llama.cpp is making the threshold an environment variable, `GGML_RPC_CACHE_MIN_SIZE` (bytes;
 * unset or invalid → 10 MiB; see the "Cache threshold tuning" section of tools/rpc/README.md and
 * `rpc_cache_min_size()` in ggml/src/ggml-rpc/ggml-rpc.cpp where it has landed). The patch
 * makes the same change to this version's client; Orchard's agent sets the variable for the
 * llama-server it starts (supervisor) and pre-seeds with the same threshold (rpc-cache/plan.ts).
 *
 * The other three are Orchard's own (not upstream): ggml-rpc-hash-hints.patch (the head offers the
 * hashes the seeding agents computed, GGML_RPC_TENSOR_HASHES), ggml-rpc-server-direct-read.patch
 * (a cache hit is read straight into the tensor), and ggml-rpc-set-tensor-hash-deferred.patch: the
 * client waited for the reply to each weight's SET_TENSOR_HASH, so a pre-seeded load was one cache
 * read per round trip and the rpc-servers of a split model read their caches one after the other.
 * With it, while llama.cpp's model loader keeps the weights mapped (mmap, Orchard's only mode), a
 * weight with a known hash is offered without waiting; the replies are read later on each
 * connection (before any other command, beyond 64 outstanding, and before the loader unmaps), and
 * a miss sends the weight then. It touches src/llama-model-loader.cpp too (kept with the source
 * files, llama-source.ts, so the patches' test applies them to the bundled originals).
 *
 * ggml-rpc-unix-socket.patch (Orchard's; upstream has an open PR, ggml-org/llama.cpp#18574, that
 * takes `-H <path>.sock` as llama-server's --host does — both spellings are accepted): an RPC
 * endpoint `unix:<path>` is a Unix-domain socket, for the client (llama-server `--rpc`) and the
 * server (`ggml-rpc-server -H unix:<path>`; a stale socket file is replaced, any other file is left
 * alone and refused; TCP_NODELAY only on TCP; 4 MiB socket buffers, since a Unix stream socket's
 * stay at their small default — 8 KiB on macOS — where loopback TCP's autotune). The agent's rpc-servers listen only there, in its
 * 0700 socket directory (engine-sockets.ts): no local user but the agent's can reach them, and the
 * loopback legs of a tunnel skip the TCP stack (bench:tunnel). Touches ggml-rpc's transport.cpp/.h
 * and tools/rpc/rpc-server.cpp (kept with the source files too).
 */

export interface LlamaPatch {
  readonly name: string;
  readonly path: string;
  /** sha256 of the patch text, hex. */
  readonly sha256: string;
}

const PATCH_DIR = join(dirname(fileURLToPath(import.meta.url)), 'patches');

/** The patches in ./patches/, sorted by name (the order they are applied in). */
export async function llamaPatches(dir = PATCH_DIR): Promise<LlamaPatch[]> {
  const names = (await readdir(dir)).filter((n) => n.endsWith('.patch')).sort();
  return Promise.all(
    names.map(async (name) => {
      const path = join(dir, name);
      const sha256 = createHash('sha256').update(await readFile(path)).digest('hex');
      return { name, path, sha256 };
    }),
  );
}

/**
 * Apply each patch to the checkout at `tree`, skipping one that is already applied (its reverse
 * applies cleanly), so running this twice on the same tree is harmless. A patch that neither
 * applies nor is applied stops the build: the bundled source moved and the patch needs updating.
 */
export async function applyLlamaPatches(git: string, tree: string, patches: readonly LlamaPatch[], log: BuildLog): Promise<string[]> {
  const applied: string[] = [];
  for (const p of patches) {
    if (await gitApplies(git, tree, ['--reverse', '--check', p.path])) continue;
    try {
      await runLogged(git, ['-C', tree, 'apply', '--whitespace=nowarn', p.path], `git apply ${p.name}`, log);
    } catch (err) {
      throw new OrchardError(`${p.name} does not apply to the bundled llama.cpp source (update the patch): ${errorMessage(err)}`);
    }
    applied.push(p.name);
  }
  return applied;
}

async function gitApplies(git: string, tree: string, args: string[]): Promise<boolean> {
  try {
    await runCapture(git, ['-C', tree, 'apply', ...args]);
    return true;
  } catch {
    return false;
  }
}
