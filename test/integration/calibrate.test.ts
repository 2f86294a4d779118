import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, expect } from 'vitest';
import { findLlamaBinaries } from '../../src/node/llama/binaries.ts';
import { readGgufHeader } from '../../src/shared/gguf/reader.ts';
import { modelProfile } from '../../src/shared/model/profile.ts';
import { layerAttentionFlops } from '../../src/shared/placement/cost.ts';
import { BOUNDARY_LAYERS, loadCalibration, measureCalibration, SECOND_DEPTH_LAYERS, SHORT_PROMPT_TOKENS, startCalibrationEngine } from '../../src/node/calibrate.ts';
import { llamaEngines, describeWith, itWith } from '../helpers/needs.ts';
import { AGENT_ENV, killGroup, startAgent, stopAll, unary } from '../helpers/node-agent.ts';
import { RacedPortAllocator } from '../helpers/raced-ports.ts';
import { tempDir } from '../helpers/temp-dir.ts';
import { testGguf } from '../helpers/test-models.ts';

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
      // Windows of about a second, their median, and what else ran meanwhile.
      expect(c.windows).toBeGreaterThanOrEqual(3);
      expect(c.decodeTokensPerWindow).toBeGreaterThanOrEqual(16);
      expect(c.competingCores).toBeGreaterThanOrEqual(0);
      // The rates are without the engine's waits for a core (Linux schedstat), capped as calibration.ts caps them.
      expect(c.waitedFraction).toBeGreaterThanOrEqual(0);
      expect(c.waitedFraction).toBeLessThanOrEqual(0.9);
      // Two depths of the calibration shape, the 12-layer model's first; the line through them
      // reproduces both (decode-fit.ts: two points, so the fit is exact unless the intercept
      // came out negative and was taken as 0).
      expect(c.depths.map((d) => d.layers)).toEqual([12, SECOND_DEPTH_LAYERS]);
      expect(c.depths[0]!.decodeTokensPerSecond).toBe(c.decodeTokensPerSecond);
      expect(c.depths[1]!.readBytesPerToken).toBeGreaterThan(c.depths[0]!.readBytesPerToken);
      expect(c.decodeFixedSecondsPerToken).toBeGreaterThanOrEqual(0);
      // Decode attention from the 12-layer model's two prompt lengths: its short-context windows decode
      // faster (fewer positions to attend to), and the rate is their difference's FLOPs per second.
      expect(c.shortContext?.promptTokens).toBe(SHORT_PROMPT_TOKENS);
      if (c.decodeAttentionFlopsPerSecond !== undefined) {
        expect(c.shortContext!.decodeTokensPerSecond).toBeGreaterThan(c.decodeTokensPerSecond);
        expect(c.decodeContextTokens).toBe(c.depths[0]!.decodeContextTokens);
      }
      // The line through the depths, each without the attention its windows paid, reproduces both
      // (two points: exact unless the intercept came out negative and was taken as 0).
      const profileAt = async (layers: number) => modelProfile(await readGgufHeader(join(cache.path, 'calibration', (await readdir(join(cache.path, 'calibration'))).find((f) => f.startsWith(`calibration-l${layers}-`))!)));
      if (c.decodeFixedSecondsPerToken > 0) {
        for (const d of c.depths) {
          const attention = c.decodeAttentionFlopsPerSecond ? layerAttentionFlops(await profileAt(d.layers), d.decodeContextTokens!).reduce((a, b) => a + b, 0) / c.decodeAttentionFlopsPerSecond : 0;
          expect(c.decodeFixedSecondsPerToken + d.readBytesPerToken / c.effectiveBandwidthBytesPerSecond + attention).toBeCloseTo(1 / d.decodeTokensPerSecond, 9);
        }
      }
      // Beside them, a shallow model whole and split in two with its first stage behind a loopback
      // engine tunnel: the boundary overhead is the split's step over the whole less the probe's round trip.
      expect(c.boundary?.layers).toBe(BOUNDARY_LAYERS);
      // A shallower model decodes faster than the record's.
      expect(c.boundary!.decodeTokensPerSecond).toBeGreaterThan(c.depths[0]!.decodeTokensPerSecond);
      expect(c.boundary!.waitedFraction).toBeGreaterThanOrEqual(0);
      expect(c.boundary!.tunnelledWaitedFraction).toBeGreaterThanOrEqual(0);
      expect(c.boundary!.probeRttSeconds).toBeGreaterThan(0);
      expect(c.boundaryOverheadSeconds).toBeCloseTo(Math.max(0, 1 / c.boundary!.tunnelledDecodeTokensPerSecond - 1 / c.boundary!.decodeTokensPerSecond - c.boundary!.probeRttSeconds), 12);
      const files = await readdir(join(cache.path, 'calibration'));
      // Keyed by the engines' build (binaries.ts `build`), so a rebuilt or re-patched engine is measured again.
      expect(c.engineBuild).toBe((await findLlamaBinaries(env)).build);
      expect(c.engineBuild).toMatch(/^external-[0-9a-f]{12}$/);
      const name = files.find((f) => f.endsWith('-t1-v8.json'));
      expect(name).toBe(`${c.engineBuild}-t1-v8.json`);
      const file = join(cache.path, 'calibration', name!);
      expect(await loadCalibration(1, env)).toEqual(c);
      expect(await loadCalibration(2, env)).toBeUndefined(); // measured for 1 thread only

      // A figure taken on a quiet machine is used as cached (a marked bandwidth shows it is this one).
      const quiet = { ...c, competingCores: 0, effectiveBandwidthBytesPerSecond: 1.234e9, decodeFixedSecondsPerToken: 0.00375, boundaryOverheadSeconds: 0.00125 };
      await writeFile(file, JSON.stringify(quiet));
      const agent = await startAgent(state.path, [], env);
      const d = await unary<{ profile: { effectiveBandwidthBytesPerSecond: string; prefillFlopsPerSecond: string; decodeFixedSecondsPerToken: number; boundaryOverheadSeconds: number } }>(agent, 'describe', {});
      expect(Number(d.profile.effectiveBandwidthBytesPerSecond)).toBe(1.234e9);
      expect(Number(d.profile.prefillFlopsPerSecond)).toBe(Math.round(c.prefillFlopsPerSecond));
      expect(d.profile.decodeFixedSecondsPerToken).toBe(quiet.decodeFixedSecondsPerToken);
      expect(d.profile.boundaryOverheadSeconds).toBe(quiet.boundaryOverheadSeconds);
      const metrics = await (await fetch(`http://127.0.0.1:${agent.ready.metricsPort}/metrics`)).text();
      const line = metrics.split('\n').find((l) => l.startsWith('orchard_node_effective_bandwidth_bytes_per_second '));
      expect(Number(line?.split(' ')[1])).toBe(1.234e9);
      const fixed = metrics.split('\n').find((l) => l.startsWith('orchard_node_decode_fixed_seconds '));
      expect(Number(fixed?.split(' ')[1])).toBe(0.00375);
      const boundary = metrics.split('\n').find((l) => l.startsWith('orchard_node_boundary_overhead_seconds '));
      expect(Number(boundary?.split(' ')[1])).toBe(0.00125);
      killGroup(agent.child);
      await agent.exited;

      // One taken while other processes held the engine's cores is measured again at start-up, its
      // engines on ports of the node's --engine-ports range, as the agent's own engines.
      await writeFile(file, JSON.stringify({ ...quiet, competingCores: c.cores + 1 }));
      const seen = new Set<number>();
      const watching = watchCalibrationPorts(cache.path, seen);
      const again = await startAgent(state.path, ['--engine-ports', '21000-21999'], env, { readyTimeoutMs: 120_000 }).finally(() => watching.stop());
      expect(seen.size, 'the calibration engines were seen').toBeGreaterThanOrEqual(process.platform === 'darwin' ? 1 : 2);
      for (const port of seen) expect(port >= 21000 && port <= 21999, `port ${port}`).toBe(true);
      const fresh = JSON.parse(await readFile(file, 'utf8')) as typeof c;
      expect(fresh.competingCores).toBeLessThanOrEqual(c.cores);
      expect(fresh.effectiveBandwidthBytesPerSecond).not.toBe(1.234e9);
      expect(fresh.engineBuild).toBe(c.engineBuild);
      const d2 = await unary<{ profile: { effectiveBandwidthBytesPerSecond: string } }>(again, 'describe', {});
      expect(Number(d2.profile.effectiveBandwidthBytesPerSecond)).toBe(Math.round(fresh.effectiveBandwidthBytesPerSecond));
    },
    600_000,
  );

  for (const [nth, which] of [
    [1, 'llama-server'],
    [2, 'rpc-server'],
  ] as const) {
    itWith([engines], `a calibration engine whose ${which} port another process took starts (once more on fresh ports of the range if it binds one)`, async () => {
      const env = { ...AGENT_ENV, ORCHARD_CACHE_DIR: cache.path, ORCHARD_LLAMA_BIN_DIR: engines.ok ? engines.value.binDir : '' };
      const model = await testGguf(['--layers', '2', '--dim', '128', '--ffn', '384', '--heads', '4', '--kv-heads', '2', '--ctx', '1024']);
      const ports = new RacedPortAllocator(nth);
      const range = await ports.range();
      try {
        const engine = await startCalibrationEngine(1, env, { model, ports });
        try {
          expect(ports.raced).toBe(ports.handedOut[nth - 1]);
          if (which === 'llama-server') {
            // The first pair (llama-server's port, then rpc-server's) lost one; the second pair runs.
            expect(ports.handedOut).toHaveLength(4);
            expect(engine.ports).toEqual(ports.handedOut.slice(2).reverse());
          } else {
            // The rpc-server binds no port (its Unix socket only): the taken one is only its identity.
            expect(ports.handedOut).toHaveLength(2);
            expect(engine.ports).toEqual([...ports.handedOut].reverse());
          }
          for (const p of ports.handedOut) expect(p >= range[0] && p <= range[1]).toBe(true);
          const rates = await engine.request({ prompt: 'Once upon a time', n_predict: 4, temperature: 0 });
          expect(rates.decodeTokens).toBe(4);
        } finally {
          engine.stop();
        }
      } finally {
        await ports.close();
      }
    });
  }
});

/**
 * Ports of the calibration engines in `cacheDir` (from /proc every 100 ms until stopped): the
 * llama-server running the calibration model there, its --port and its rpc-server's (named in --rpc).
 */
function watchCalibrationPorts(cacheDir: string, into: Set<number>): { stop(): void } {
  let on = true;
  void (async () => {
    while (on) {
      for (const pid of (await readdir('/proc')).filter((p) => /^\d+$/.test(p))) {
        const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
        if (!argv[0]?.endsWith('llama-server') || !argv[argv.indexOf('-m') + 1]?.startsWith(join(cacheDir, 'calibration'))) continue;
        into.add(Number(argv[argv.indexOf('--port') + 1]));
        // its rpc-server's socket is named after its engine port: unix:<dir>/rpc-<port>.sock
        if (argv.includes('--rpc')) into.add(Number(/rpc-(\d+)\.sock$/.exec(argv[argv.indexOf('--rpc') + 1]!)?.[1]));
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  return { stop: () => (on = false) };
}
