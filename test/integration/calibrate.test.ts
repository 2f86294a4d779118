import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, expect } from 'vitest';
import { loadCalibration, measureCalibration } from '../../src/node/calibrate.ts';
import { llamaEngines, describeWith, itWith } from '../helpers/needs.ts';
import { AGENT_ENV, startAgent, stopAll, unary } from '../helpers/node-agent.ts';
import { tempDir } from '../helpers/temp-dir.ts';

/**
 * The node measures its own engine: a real llama-server on the generated calibration model, in
 * an empty Orchard cache (model, vocabulary and result all land there), then an agent started on
 * that machine reports the measurement in its profile and its metrics.
 */
const engines = await llamaEngines();

describeWith([engines], 'engine calibration', () => {
  const cache = tempDir('orchard-calibrate-');
  const state = tempDir('orchard-calibrate-state-');
  afterAll(() => stopAll());

  itWith(
    [engines],
    'measures decode bandwidth and prefill FLOP/s, caches them, and the agent reports them',
    async () => {
      const env = { ...AGENT_ENV, ORCHARD_CACHE_DIR: cache.path, ORCHARD_LLAMA_BIN_DIR: engines.ok ? engines.value.binDir : '', ORCHARD_RPC_THREADS: '1' };
      const c = await measureCalibration(1, env);
      expect(c.engine).toBe('llama.cpp');
      expect(c.threads).toBe(1);
      // A ~0.4 GB f16 model on one CPU thread: somewhere between a slow VM and a fast desktop.
      expect(c.effectiveBandwidthBytesPerSecond).toBeGreaterThan(0.2e9);
      expect(c.effectiveBandwidthBytesPerSecond).toBeLessThan(200e9);
      expect(c.prefillFlopsPerSecond).toBeGreaterThan(1e9);
      // Prompt processing is batched: faster per token than decoding.
      expect(c.promptTokensPerSecond).toBeGreaterThan(c.decodeTokensPerSecond);
      const files = await readdir(join(cache.path, 'calibration'));
      expect(files.some((f) => f.endsWith('-t1-v2.json'))).toBe(true);
      expect(await loadCalibration(1, env)).toEqual(c);
      expect(await loadCalibration(2, env)).toBeUndefined(); // measured for 1 thread only

      const agent = await startAgent(state.path, [], env);
      const d = await unary<{ profile: { effectiveBandwidthBytesPerSecond: string; prefillFlopsPerSecond: string } }>(agent, 'describe', {});
      expect(Number(d.profile.effectiveBandwidthBytesPerSecond)).toBe(Math.round(c.effectiveBandwidthBytesPerSecond));
      expect(Number(d.profile.prefillFlopsPerSecond)).toBe(Math.round(c.prefillFlopsPerSecond));
      const metrics = await (await fetch(`http://127.0.0.1:${agent.ready.metricsPort}/metrics`)).text();
      const line = metrics.split('\n').find((l) => l.startsWith('orchard_node_effective_bandwidth_bytes_per_second '));
      expect(Number(line?.split(' ')[1])).toBeCloseTo(Math.round(c.effectiveBandwidthBytesPerSecond), -1);
      expect(JSON.parse(await readFile(join(cache.path, 'calibration', files.find((f) => f.endsWith('-t1-v2.json'))!), 'utf8')).engineBuild).toBe(c.engineBuild);
    },
    600_000,
  );
});
