import { join } from 'node:path';
import { OrchardError } from '../../shared/errors.ts';
import { helpListsRpc, parseServerVersion, RPC_SERVER_NAMES } from './build-config.ts';
import { isExecutable, runCapture } from './toolchain.ts';

/** Engines Orchard did not build: Homebrew's, a manual build (--bin-dir / ORCHARD_LLAMA_BIN_DIR). */

export interface ExternalBinaries {
  readonly llamaServer: string;
  readonly rpcServer: string;
  readonly llamaCppVersion: string;
  readonly binDir: string;
}

/** Locate llama-server and the RPC server in `dir` (executable files), without running them. */
export async function locateInDir(dir: string): Promise<{ llamaServer: string; rpcServer: string }> {
  const llamaServer = join(dir, 'llama-server');
  if (!(await isExecutable(llamaServer))) throw new OrchardError(`${dir} has no executable llama-server`);
  for (const name of RPC_SERVER_NAMES) {
    const rpcServer = join(dir, name);
    if (await isExecutable(rpcServer)) return { llamaServer, rpcServer };
  }
  throw new OrchardError(`${dir} has no executable ${RPC_SERVER_NAMES.join(' or ')} (llama.cpp built without -DGGML_RPC=ON?)`);
}

/** Check that binaries in `dir` run and support RPC; used for --bin-dir / ORCHARD_LLAMA_BIN_DIR. */
export async function checkExternalBinaries(dir: string): Promise<ExternalBinaries> {
  const { llamaServer, rpcServer } = await locateInDir(dir);
  const help = await runCapture(llamaServer, ['--help']);
  if (!helpListsRpc(help)) throw new OrchardError(`${llamaServer} has no --rpc option: it was built without RPC (-DGGML_RPC=ON)`);
  const rpcHelp = await runCapture(rpcServer, ['--help']);
  if (!/--port/.test(rpcHelp)) throw new OrchardError(`${rpcServer} --help does not look like ggml-rpc-server`);
  // The agent's rpc-servers listen only on a Unix-domain socket (engine patch ggml-rpc-unix-socket).
  if (!/unix:/.test(rpcHelp)) throw new OrchardError(`${rpcServer} cannot listen on a Unix-domain socket (-H unix:<path>), where Orchard keeps rpc-servers off the network: build the engines with \`orchard setup\``);
  let version = 'external';
  try {
    version = parseServerVersion(await runCapture(llamaServer, ['--version'])) ?? version;
  } catch {
    // older builds may not know --version; the binaries still work
  }
  return { llamaServer, rpcServer, llamaCppVersion: version, binDir: dir };
}
