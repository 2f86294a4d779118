import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ORCHARD_BIN } from '../../src/cli/local-cluster.ts';
import { describeWith, llamaEngines, SHARED_CACHE } from '../helpers/needs.ts';
import { alive, pidsWithMarker } from '../helpers/processes.ts';

/*
 * `orchard demo` end to end through a plain pipe: exit code, the plan table and the streamed
 * text on stdout, and no process left behind. Every process the demo starts inherits a marker
 * in its environment (engines included: agents pass their environment on), so "nothing left"
 * is checked by scanning /proc for the marker — not by trusting the demo's own report.
 */

const engines = await llamaEngines();

let tmp = '';
const started: number[] = [];

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** A process's command line while it lives ('' once gone): a recorded pid is ours only while it matches. */
function cmdline(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8');
  } catch {
    return '';
  }
}

/** The recorded processes still running as recorded, after waiting up to `ms` for them to go. */
async function stillRunning(recorded: readonly { pid: number; cmd: string }[], ms: number): Promise<number[]> {
  const left = () => recorded.filter((p) => cmdline(p.pid) === p.cmd).map((p) => p.pid);
  const deadline = Date.now() + ms;
  while (left().length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  return left();
}

/** What still carries `marker` after waiting up to `ms` for it to go (pid and command line, so a failure names them). */
async function markerLeft(marker: string, ms: number): Promise<string[]> {
  const deadline = Date.now() + ms;
  while ((await pidsWithMarker(marker)).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
  return (await pidsWithMarker(marker)).map((pid) => `${pid} ${cmdline(pid).replaceAll('\0', ' ').trim()}`);
}

/** The calibration engines run detached with an environment of their own (no marker): their pids (the split's behind its tunnel too), from the demo's story. */
function calibrationPids(stderr: string): number[] {
  const m = /calibration engine: pids ([\d, ]+)(?:; split behind a loopback tunnel: ([\d, ]+))?/.exec(stderr);
  return m ? [m[1]!, m[2] ?? ''].flatMap((x) => x.split(', ')).filter((x) => x.trim() !== '').map(Number) : [];
}

function runDemo(args: string[], marker: string, onStderr?: (all: string, kill: (signal: NodeJS.Signals) => void) => void): Promise<Run> {
  const t0 = Date.now();
  const child = spawn(process.execPath, [ORCHARD_BIN, 'demo', ...args], {
    // The engines (and the demo model) come from the cache `orchard setup` filled; the rest is private.
    env: { ...process.env, ORCHARD_CACHE_DIR: SHARED_CACHE, TMPDIR: tmp, ORCHARD_TEST_MARKER: marker },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  started.push(child.pid!);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    stdout += d;
  });
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    onStderr?.(stderr, (signal) => child.kill(signal));
  });
  return new Promise((resolve) => child.once('close', (code) => resolve({ code, stdout, stderr, ms: Date.now() - t0 })));
}

describeWith([engines], 'orchard demo', () => {
  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'orchard-demo-test-'));
  });
  afterAll(async () => {
    // Whatever happened above, nothing carrying a marker of ours survives the file.
    for (const pid of await pidsWithMarker('ORCHARD_TEST_MARKER=demo-')) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {}
    }
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('runs end to end in a pipe: plan, streamed text, exit 0, no process left', async () => {
    const marker = `demo-${randomUUID()}`;
    const r = await runDemo(['--max-tokens', '12'], marker);
    console.log(`orchard demo wall time: ${(r.ms / 1000).toFixed(1)} s (generates the model if the cache has none)`);
    expect(r.code, r.stderr.slice(-2000)).toBe(0);
    // The plan: three stages, one per node, contiguous layers, the head last.
    expect(r.stdout).toMatch(/Plan for .* on 3 nodes/);
    const rows = r.stdout.split('\n').filter((l) => /│\s+\d+ │ node-[abc]/.test(l));
    expect(rows.length).toBeGreaterThanOrEqual(3);
    expect(r.stdout).toMatch(/│\s+2 │ node-a\s+│ head/);
    // Streamed text follows the prompt, then the numbers.
    expect(r.stdout).toMatch(/Once upon a time\S*.+\n\n12 tokens \(finish: length\)/s);
    expect(r.stdout).toMatch(/\d+\.\d tok\/s \(engine\)/);
    // Local rpc-servers and tunnel forwarders are Unix sockets in the agent's private dir (engine-sockets.ts).
    expect(r.stdout).toMatch(/RPC0\[unix:\/\S+\.sock\]/);
    // No ANSI colours in a pipe.
    expect(r.stdout.includes('\u001b[')).toBe(false);
    expect(r.stderr).toMatch(/stopped 4 processes/);
    expect(await pidsWithMarker(marker)).toEqual([]);
    expect(calibrationPids(r.stderr).filter(alive)).toEqual([]);
    // Calibration windows and measurement windows are bounded (12 s + 15 s plus the last window).
  }, 240_000);

  it('--json: one summary object on stdout, the story on stderr', async () => {
    const marker = `demo-${randomUUID()}`;
    const r = await runDemo(['--json', '--max-tokens', '6', '--nodes', '2'], marker);
    expect(r.code, r.stderr.slice(-2000)).toBe(0);
    const s = JSON.parse(r.stdout) as { plan: { stages: unknown[] }; usage: { completion_tokens: number }; finishReason: string; text: string; placement: { verification: { ok: boolean } }; totalSeconds: number };
    expect(s.plan.stages).toHaveLength(2);
    expect(s.usage.completion_tokens).toBe(6);
    expect(s.finishReason).toBe('length');
    expect(s.text.length).toBeGreaterThan(0);
    expect(r.stderr).toContain(s.text);
    expect(s.placement.verification.ok).toBe(true);
    // The two numbers the demo is about lead the object; the prediction rests on a measurement of
    // this engine on this model taken in the same seconds (the 15 % goal is checked by repeated
    // runs, see the README; on a shared 2-core machine under a test suite's load one run is not
    // held to it here, only to a factor of 2).
    const summary = JSON.parse(r.stdout) as Record<string, number>;
    expect(Object.keys(summary).slice(0, 2)).toEqual(['predictedTokensPerSecond', 'measuredTokensPerSecond']);
    // Both are medians of alternating windows: the cluster's and the calibration engine's, taken
    // in the same seconds; the plan's own prediction (priced at planning time) is kept beside them.
    const agreement = (
      JSON.parse(r.stdout) as {
        agreement: { windows: { cluster: number; engine: number; tunnelled?: number }[]; windowTokens: number; measuredTokensPerSecond: number; boundaryOverheadSeconds?: number; probeRttSeconds?: number };
      }
    ).agreement;
    expect(agreement.windows.length).toBeGreaterThanOrEqual(3);
    expect(agreement.windowTokens).toBeGreaterThanOrEqual(16);
    // On Linux the demo model split in two behind a loopback tunnel decodes in every round too:
    // the boundary the plan's worker pays, measured in the same seconds.
    for (const w of agreement.windows) expect(Math.min(w.cluster, w.engine, w.tunnelled ?? 0)).toBeGreaterThan(0);
    expect(agreement.boundaryOverheadSeconds).toBeGreaterThanOrEqual(0);
    expect(agreement.probeRttSeconds).toBeGreaterThan(0);
    expect(agreement.measuredTokensPerSecond).toBe(summary.measuredTokensPerSecond);
    expect(summary.planPredictedTokensPerSecond).toBeGreaterThan(0);
    expect(summary.predictedTokensPerSecond).toBeGreaterThan(0);
    expect(summary.measuredTokensPerSecond).toBeGreaterThan(0);
    expect(Math.abs(Math.log(summary.measuredTokensPerSecond! / summary.predictedTokensPerSecond!))).toBeLessThan(Math.log(2));
    expect(r.stderr).toMatch(/measuring this machine's engine on .*orchard-demo.*\.gguf with \d+ thread/);
    console.log(`orchard demo --nodes 2 (model cached): ${s.totalSeconds.toFixed(1)} s; predicted ${summary.predictedTokensPerSecond!.toFixed(1)}, measured ${summary.measuredTokensPerSecond!.toFixed(1)} tok/s`);
    expect(await pidsWithMarker(marker)).toEqual([]);
    expect(calibrationPids(r.stderr).filter(alive)).toEqual([]);
  }, 240_000);

  it('Ctrl-C during the load stops everything and exits 130', async () => {
    const marker = `demo-${randomUUID()}`;
    let sent = false;
    const r = await runDemo(['--max-tokens', '400'], marker, (all, kill) => {
      if (!sent && /▸ (load|generate)/.test(all)) {
        sent = true;
        kill('SIGINT');
      }
    });
    expect(sent).toBe(true);
    expect(r.code, r.stderr.slice(-2000)).toBe(130);
    expect(r.stderr).toMatch(/SIGINT: stopping the demo cluster/);
    expect(await pidsWithMarker(marker)).toEqual([]);
    expect(calibrationPids(r.stderr).filter(alive)).toEqual([]);
  });

  // Nothing may outlive a demo killed outright (no handler runs): the calibration engine and the
  // local cluster are tied to it by sentinels (node/watchdog.ts), found here by the pids and
  // command lines recorded while they ran.
  it('SIGKILL mid-calibration: the calibration engine goes with the demo within seconds', async () => {
    const marker = `demo-${randomUUID()}`;
    let recorded: { pid: number; cmd: string }[] = [];
    const r = await runDemo(['--max-tokens', '12'], marker, (all, kill) => {
      if (recorded.length === 0 && /calibration engine: pids/.test(all)) {
        recorded = calibrationPids(all).map((pid) => ({ pid, cmd: cmdline(pid) }));
        kill('SIGKILL');
      }
    });
    expect(r.code).toBe(null);
    expect(recorded.length).toBeGreaterThan(0);
    // They were running engines when the demo died.
    for (const p of recorded) expect(p.cmd).toMatch(/llama-server|rpc-server/);
    expect(await stillRunning(recorded, 5000)).toEqual([]);
    // The local cluster may already be up: its sentinel sends SIGTERM, then SIGKILL 3 s later.
    expect(await markerLeft(marker, 10_000)).toEqual([]);
  }, 120_000);

  it('SIGKILL during the load: the cluster, its engines and the calibration engine all go within seconds', async () => {
    const marker = `demo-${randomUUID()}`;
    let recorded: { pid: number; cmd: string }[] = [];
    const r = await runDemo(['--max-tokens', '12'], marker, (all, kill) => {
      if (recorded.length === 0 && /▸ load/.test(all)) {
        recorded = calibrationPids(all).map((pid) => ({ pid, cmd: cmdline(pid) }));
        kill('SIGKILL');
      }
    });
    expect(r.code).toBe(null);
    expect(recorded.length).toBeGreaterThan(0);
    expect(await stillRunning(recorded, 5000)).toEqual([]);
    // The coordinator, the agents, their engines and sentinels: everything that carries the marker.
    expect(await markerLeft(marker, 10_000)).toEqual([]);
  }, 180_000);
});
