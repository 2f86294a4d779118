import { describe, expect, it } from 'vitest';
import { adoptionProblems, orphanEngines } from '../../src/coordinator/instances/adoption.ts';
import type { EngineInfo } from '../../src/coordinator/membership/wire.ts';
import type { InstanceRecord } from '../../src/coordinator/state/instance-store.ts';
import { sampleRecord } from '../helpers/instance-store-contract.ts';

/** What the agents would report for the sample record when nothing changed. */
function liveOf(rec: InstanceRecord): Map<string, EngineInfo[]> {
  const live = new Map<string, EngineInfo[]>();
  for (const e of rec.engines) {
    const info: EngineInfo = { engineId: e.engineId, kind: e.kind as EngineInfo['kind'], host: '127.0.0.1', port: e.port, pid: e.pid, model: rec.name, startedAtSeconds: 1, argv: e.argv, socket: '' };
    live.set(e.nodeId, [...(live.get(e.nodeId) ?? []), info]);
  }
  return live;
}

function withEngine(live: Map<string, EngineInfo[]>, engineId: string, change: Partial<EngineInfo>): Map<string, EngineInfo[]> {
  return new Map([...live].map(([n, list]) => [n, list.map((e) => (e.engineId === engineId ? { ...e, ...change } : e))]));
}

describe('adoptionProblems: may a restarted coordinator serve a stored instance as is?', () => {
  const rec = sampleRecord('m8');
  const head = rec.engines.find((e) => e.head)!;
  const rpc = rec.engines.find((e) => !e.head)!;

  it('adopts when every engine runs as stored and the head is wired to the workers', () => {
    expect(adoptionProblems(rec, liveOf(rec))).toEqual([]);
  });

  it('refuses an engine that is gone, restarted (new pid), moved (new port) or re-parameterised', () => {
    const live = liveOf(rec);
    const gone = new Map([...live].map(([n, l]) => [n, l.filter((e) => e.engineId !== rpc.engineId)]));
    expect(adoptionProblems(rec, gone).join()).toMatch(/rpc-server .* no longer runs on node n-a/);
    expect(adoptionProblems(rec, withEngine(live, head.engineId, { pid: 999 })).join()).toMatch(/pid 999, stored 202 \(the process was restarted\)/);
    expect(adoptionProblems(rec, withEngine(live, rpc.engineId, { port: 6000 })).join()).toMatch(/port 6000, stored 5001/);
    expect(adoptionProblems(rec, withEngine(live, head.engineId, { argv: ['llama-server', '--rpc', '127.0.0.1:9'] })).join()).toMatch(/command line differs/);
  });

  it('refuses when a node of the record is not connected', () => {
    const live = liveOf(rec);
    live.delete('n-a');
    expect(adoptionProblems(rec, live)).toEqual(['node n-a (rpc-server) is not connected']);
  });

  it('checks the wiring itself: the rpc-servers must listen where the record says', () => {
    // A record stored without command lines (pid/argv unknown) still gets the wiring check.
    const loose: InstanceRecord = { ...rec, engines: rec.engines.map((e) => ({ ...e, pid: 0, argv: [] })) };
    const wrongEndpoints: InstanceRecord = { ...loose, endpoints: ['127.0.0.1:5009', ''] };
    expect(adoptionProblems(wrongEndpoints, liveOf(loose)).join()).toMatch(/rpc-servers listen on 127\.0\.0\.1:5001, the record says 127\.0\.0\.1:5009/);
  });

  it('refuses an engine on a node that is not in the plan, and a record without a head', () => {
    const moved: InstanceRecord = { ...rec, engines: rec.engines.map((e) => (e.head ? { ...e, nodeId: 'n-z' } : e)) };
    expect(adoptionProblems(moved, liveOf(moved)).join()).toMatch(/on node n-z, which is not in the plan/);
    const headless: InstanceRecord = { ...rec, engines: rec.engines.map((e) => ({ ...e, head: false })) };
    expect(adoptionProblems(headless, liveOf(headless))).toContain('the record names no head engine');
  });
});

describe('orphanEngines', () => {
  it('names this cluster’s engines nobody claims, and only those', () => {
    const e = (engineId: string): EngineInfo => ({ engineId, kind: 'ENGINE_KIND_RPC_SERVER', host: '', port: 1, pid: 1, model: '', startedAtSeconds: 0, argv: [], socket: '' });
    const running = [e('oc0ffee00-aa-head'), e('oc0ffee00-bb-head'), e('oother000-cc-head')];
    expect(orphanEngines(running, 'oc0ffee00-', (id) => id === 'oc0ffee00-aa-head').map((x) => x.engineId)).toEqual(['oc0ffee00-bb-head']);
  });
});
