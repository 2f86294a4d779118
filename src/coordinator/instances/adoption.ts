import { type EngineInfo, engineEndpoint } from '../membership/wire.ts';
import type { InstanceRecord, StoredEngine } from '../state/instance-store.ts';

/**
 * Re-adoption, the pure part: does what the agents run now still match what the coordinator
 * stored when the instance became ready? Only then may a restarted coordinator serve it without
 * reloading. The record was verified against the plan at load (the engine's own report), so
 * "the same processes, with the same command lines, wired to each other the same way" carries that
 * proof over. Anything else — an engine gone, restarted (new pid), re-parameterised, or workers
 * no longer listening where the record says — is a mismatch, and the caller
 * stops whatever is left of the instance.
 */

/** The engines each node's agent reports (Describe), by node id. */
export type LiveEngines = ReadonlyMap<string, readonly EngineInfo[]>;

/** Why the instance cannot be adopted as stored; empty = adopt. */
export function adoptionProblems(rec: InstanceRecord, live: LiveEngines): string[] {
  const problems: string[] = [];
  const planNodes = new Set(rec.stages.map((s) => s.nodeId));
  const found = new Map<string, EngineInfo>();
  for (const e of rec.engines) {
    if (!planNodes.has(e.nodeId)) problems.push(`${e.label} ${e.engineId} is on node ${e.nodeId}, which is not in the plan`);
    const running = live.get(e.nodeId);
    if (!running) {
      problems.push(`node ${e.nodeId} (${e.label}) is not connected`);
      continue;
    }
    const now = running.find((x) => x.engineId === e.engineId);
    if (!now) {
      problems.push(`${e.label} ${e.engineId} no longer runs on node ${e.nodeId}`);
      continue;
    }
    const diff = engineDifference(e, now);
    if (diff) problems.push(`${e.label} ${e.engineId}: ${diff}`);
    else found.set(e.engineId, now);
  }
  if (!rec.engines.some((e) => e.head)) problems.push('the record names no head engine');
  if (problems.length === 0 && rec.family === 'llama') problems.push(...rpcWiringProblems(rec, found));
  return problems;
}

function engineDifference(stored: StoredEngine, now: EngineInfo): string | undefined {
  if (stored.kind && now.kind !== stored.kind) return `kind ${now.kind}, stored ${stored.kind}`;
  if (stored.pid > 0 && now.pid !== stored.pid) return `pid ${now.pid}, stored ${stored.pid} (the process was restarted)`;
  if (stored.port > 0 && now.port !== stored.port) return `port ${now.port}, stored ${stored.port}`;
  if (stored.argv.length > 0 && !sameList(stored.argv, now.argv)) return 'its command line differs from the one verified at load';
  return undefined;
}

/**
 * llama.cpp: the rpc-servers must listen where the record says, in stage order. The head's own
 * `--rpc` is not compared with them: across nodes it names the local end of its agent's tunnel
 * forwarder, not the worker's port; its whole command line is compared with the one stored instead.
 */
function rpcWiringProblems(rec: InstanceRecord, found: ReadonlyMap<string, EngineInfo>): string[] {
  // Started in parallel, recorded in any order: the stage is in the id (`…-s<stage>-rpc`).
  const workers = rec.engines.filter((e) => !e.head && e.kind === 'ENGINE_KIND_RPC_SERVER').sort((a, b) => stageOf(a.engineId) - stageOf(b.engineId));
  const endpoints = workers.map((w) => engineEndpoint(found.get(w.engineId)!));
  const expected = rec.endpoints.filter(Boolean);
  return sameList(endpoints, expected) ? [] : [`the rpc-servers listen on ${endpoints.join(',') || 'nothing'}, the record says ${expected.join(',') || 'nothing'}`];
}

function stageOf(engineId: string): number {
  return Number(/-s(\d+)-rpc$/.exec(engineId)?.[1] ?? Number.MAX_SAFE_INTEGER);
}

function sameList(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/**
 * Engines of this cluster (by engine-id prefix) that neither a live instance nor a record still
 * waiting for adoption claims: left by a crashed load, a record that did not match, or a store
 * that was lost. They are stopped.
 */
export function orphanEngines(running: readonly EngineInfo[], prefix: string, claimed: (engineId: string) => boolean): EngineInfo[] {
  return running.filter((e) => e.engineId.startsWith(prefix) && !claimed(e.engineId));
}
