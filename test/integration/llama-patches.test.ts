import { createWriteStream } from 'node:fs';
import { copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { expect, it } from 'vitest';
import { applyLlamaPatches, llamaPatches } from '../../src/node/llama/patches.ts';
import type { BuildLog } from '../../src/node/llama/toolchain.ts';
import { llamaSourceFile } from '../../src/shared/llama-source.ts';
import { describeWith, program } from '../helpers/needs.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/*
 * Orchard's llama.cpp patches against the very source node-llama-cpp bundles (the kept, unpatched
 * ggml-rpc.cpp), with the real git: they apply, applying again changes nothing, and a source they
 * no longer fit stops the build with a message naming the patch.
 */
const RPC = 'ggml/src/ggml-rpc/ggml-rpc.cpp' as const;
const LOADER = 'src/llama-model-loader.cpp' as const;
const TRANSPORT = 'ggml/src/ggml-rpc/transport.cpp' as const;
const RPC_SERVER = 'tools/rpc/rpc-server.cpp' as const;
const dir = tempDir('orchard-llama-patches-');

async function tree(): Promise<string> {
  const root = join(dir.path, 'src');
  for (const f of [RPC, LOADER, TRANSPORT, 'ggml/src/ggml-rpc/transport.h', RPC_SERVER] as const) {
    await mkdir(dirname(join(root, f)), { recursive: true });
    await copyFile(await llamaSourceFile(f), join(root, f));
  }
  return root;
}

function buildLog(): BuildLog {
  const path = join(dir.path, 'build.log');
  return { stream: createWriteStream(path), path, running: {} };
}

describeWith([program('git', ['--version'])], 'llama.cpp patches', () => {
  it('the patches (cache threshold, known hashes, direct read, deferred hash replies, Unix sockets) apply to the bundled source once, and a second run is a no-op', async () => {
    const patches = await llamaPatches();
    expect(patches.map((p) => p.name)).toContain('ggml-rpc-cache-min-size.patch');
    const root = await tree();
    const before = await readFile(join(root, RPC), 'utf8');
    expect(before).toContain('size > HASH_THRESHOLD &&');

    expect(await applyLlamaPatches('git', root, patches, buildLog())).toEqual(patches.map((p) => p.name));
    const after = await readFile(join(root, RPC), 'utf8');
    expect(after).toContain('getenv("GGML_RPC_CACHE_MIN_SIZE")');
    expect(after).toContain('size > rpc_cache_min_size() &&');
    // known tensor hashes replace the client's hashing; a cache hit is read straight into a host tensor
    expect(after).toContain('getenv("GGML_RPC_TENSOR_HASHES")');
    expect(after.match(/request->hash = rpc_weight_hash\(tensor, data, offset, size\);/g)).toHaveLength(3);
    expect(after).toContain('ifs.read((char *) tensor->data + request.offset, size);');
    // known-hash offers do not wait for their replies while the loader keeps the mapped weights
    expect(after).toContain('ctx->dispatcher->send_hash_deferred(request, data, size);');
    const loader = await readFile(join(root, LOADER), 'utf8');
    expect(loader).toContain('"ggml_backend_rpc_defer_hash_replies"');
    expect(loader).toContain('llama_rpc_hash_replies rpc_hash_replies(use_mmap);');
    // unix:<path> endpoints: the client dials and the server listens on a Unix-domain socket
    expect(after).toContain('socket_t::connect_unix(unix_path)');
    expect(after).toContain('socket_t::create_server_unix(unix_path)');
    const transport = await readFile(join(root, TRANSPORT), 'utf8');
    expect(transport).toContain('socket(AF_UNIX, SOCK_STREAM, 0)');
    expect(transport).toContain('!unix_socket && !set_no_delay(client_socket_fd)');
    expect(transport.match(/set_unix_buffers\((client_socket_fd|sockfd)\);/g)).toHaveLength(2);
    expect(await readFile(join(root, RPC_SERVER), 'utf8')).toContain('unix_socket ? params.host :');

    expect(await applyLlamaPatches('git', root, patches, buildLog())).toEqual([]);
    expect(await readFile(join(root, RPC), 'utf8')).toBe(after);
    expect(await readFile(join(root, LOADER), 'utf8')).toBe(loader);
    expect(await readFile(join(root, TRANSPORT), 'utf8')).toBe(transport);
  });

  it('a source the patch does not fit fails with the patch name', async () => {
    const root = await tree();
    const text = await readFile(join(root, RPC), 'utf8');
    await writeFile(join(root, RPC), text.replace('size > HASH_THRESHOLD &&', 'size >= SOMETHING_ELSE &&'));
    await expect(applyLlamaPatches('git', root, await llamaPatches(), buildLog())).rejects.toThrow(/ggml-rpc-cache-min-size\.patch does not apply/);
  });
});
