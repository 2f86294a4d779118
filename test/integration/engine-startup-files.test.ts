import { existsSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { TENSOR_HASHES_ENV } from '../../src/shared/rpc-cache/known-hashes.ts';
import { AGENT_ENV, alive, type EngineInfo, generate, killGroup, startAgent, startEngine, stopAll, unary, waitFor } from '../helpers/node-agent.ts';
import { describeWith, llamaEngines } from '../helpers/needs.ts';
import { tempDir } from '../helpers/temp-dir.ts';
import { testGguf } from '../helpers/test-models.ts';

/*
 * A head's known tensor hashes (GGML_RPC_TENSOR_HASHES) are a start-up file: written for the
 * engine into the agent's run folder (`<state dir>/run`, run-dir.ts), read while it loads, removed
 * once it is ready. Real `orchard node` processes and real llama.cpp engines: a ready head keeps
 * no file, and an agent SIGKILLed while its head loads — the one moment the file exists — leaves
 * it behind only until its next start, which sweeps it. Nothing goes to /tmp.
 */

const engines = await llamaEngines(AGENT_ENV);
const tmp = tempDir('orchard-startup-files-', 'all');
let model = '';

beforeAll(async () => {
  if (engines.ok) model = await testGguf(['--layers', '2', '--dim', '128', '--ffn', '384', '--heads', '4', '--kv-heads', '2', '--ctx', '1024']);
});
afterAll(() => stopAll());

/** Two hints (right format; whether they match a cache entry does not matter here). */
const HINTS = [
  { name: 'blk.0.attn_q.weight', bytes: '32768', hash: '0123456789abcdef' },
  { name: 'blk.1.ffn_up.weight', bytes: '98304', hash: 'fedcba9876543210' },
];

/** A head with every layer on the agent's own rpc-server on `rpcPort`, offered HINTS. */
function headRequest(nodeId: string, rpcPort: number, engineId: string): Record<string, unknown> {
  const llama = { modelPath: model, context: 1024, parallel: 1, kvUnified: true, cacheType: 'f16', ubatch: 512, flashAttention: true, gpuLayers: 99, rpc: [{ nodeId, enginePort: rpcPort }], devices: ['RPC0'], tensorHashes: HINTS };
  return { kind: 'ENGINE_KIND_LLAMA_SERVER', engineId, llama, threads: 1, model: 'tiny' };
}

const startupFolders = async (stateDir: string) => (await readdir(join(stateDir, 'run'))).filter((n) => n.startsWith('orchard-engine-') || n.startsWith('orchard-mlx-'));

/** The pid of the llama-server whose hints file lies in `folder` (from /proc), if one runs. */
async function headUsing(folder: string): Promise<number | undefined> {
  for (const pid of (await readdir('/proc')).filter((p) => /^\d+$/.test(p))) {
    const env = await readFile(`/proc/${pid}/environ`, 'utf8').catch(() => '');
    if (env.split('\0').some((kv) => kv.startsWith(`${TENSOR_HASHES_ENV}=${folder}/`))) return Number(pid);
  }
  return undefined;
}

describeWith([engines], 'engine start-up files: a head’s known tensor hashes', () => {
  it('a ready head keeps no hints file, having read it (its own count in the start-up log), and serves', async () => {
    const stateDir = join(tmp.path, 'ready');
    const agent = await startAgent(stateDir);
    try {
      const rpc = await startEngine(agent, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'worker', threads: 1, model: 'tiny' });
      const head = await unary<{ engine: EngineInfo; startupLog: string[] }>(agent, 'startEngine', headRequest(agent.ready.nodeId, rpc.port, 'head'));
      const env = (await readFile(`/proc/${head.engine.pid}/environ`, 'utf8')).split('\0');
      const hints = env.find((kv) => kv.startsWith(`${TENSOR_HASHES_ENV}=`))?.slice(TENSOR_HASHES_ENV.length + 1) ?? '';
      expect(hints.startsWith(join(stateDir, 'run', 'orchard-engine-')), hints).toBe(true);
      expect(existsSync(hints), 'the hints file outlived the start-up').toBe(false);
      expect(await startupFolders(stateDir)).toEqual([]);
      expect(head.startupLog.join('\n')).toMatch(/GGML_RPC_TENSOR_HASHES: 2 known tensor hashes/);
      expect(agent.stderr).toMatch(/"knownHashes":"[^"]*GGML_RPC_TENSOR_HASHES: 2 known tensor hashes/);
      const out = await generate(agent, { engineId: 'head', prompt: 'Once upon a time', maxTokens: 4, temperature: 0 });
      expect(out.tokens).toHaveLength(4);
    } finally {
      agent.client.close();
      killGroup(agent.child);
    }
  });

  it('an agent SIGKILLed while its head loads leaves the hints in its run folder only until its next start', async () => {
    const stateDir = join(tmp.path, 'victim');
    const victim = await startAgent(stateDir);
    let headPid: number | undefined;
    try {
      const rpc = await startEngine(victim, { kind: 'ENGINE_KIND_RPC_SERVER', engineId: 'worker', threads: 1, model: 'tiny' });
      // A stopped rpc-server's socket still accepts (the kernel's backlog) but never answers: the head stays loading.
      process.kill(rpc.pid, 'SIGSTOP');
      const starting = unary(victim, 'startEngine', headRequest(victim.ready.nodeId, rpc.port, 'head'), 60_000).catch((err: unknown) => err);
      const [folder] = await waitFor('the head’s start-up folder', async () => ((await startupFolders(stateDir)).length > 0 ? startupFolders(stateDir) : undefined));
      headPid = await waitFor('the head process', () => headUsing(join(stateDir, 'run', folder!)));
      // The agent alone, as a crash takes it: its watchdog ends the engines, nobody removes the folder.
      process.kill(victim.ready.pid, 'SIGKILL');
      await victim.exited;
      await starting;
      await waitFor('the engines gone', () => (!alive(rpc.pid) && !alive(headPid!)) || undefined, 15_000);
      expect(await startupFolders(stateDir)).toEqual([folder]);

      const again = await startAgent(stateDir);
      try {
        expect(await startupFolders(stateDir)).toEqual([]);
        expect(again.stderr).toMatch(/removed engine start-up folders a previous run left behind/);
      } finally {
        again.client.close();
        killGroup(again.child);
      }
    } finally {
      victim.client.close();
      killGroup(victim.child);
      if (headPid !== undefined && alive(headPid)) process.kill(headPid, 'SIGKILL');
    }
  });
});
