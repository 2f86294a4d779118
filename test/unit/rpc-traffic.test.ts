import { afterAll, expect, it, vi } from 'vitest';
import { killAll } from '../../bench/lib/children.ts';
import { type RpcStep, replaySteps, replyBytes, rpcAccounting, startFakeEngine, startRpcTap, typicalDecodeStep } from '../../bench/lib/rpc-traffic.ts';

/**
 * bench:tunnel's accounting (bench/lib/rpc-traffic.ts) on real sockets: a decode-shaped step
 * replayed through the tap to the fake engine must be counted as llama.cpp RPC sends it — one round
 * trip, three writes per command, the GET_TENSOR reply's bytes back — or the bench's predicted loss
 * is built on wrong counts.
 */
vi.setConfig({ testTimeout: 30_000 });

afterAll(killAll);

const command = (cmd: number, payload: Buffer) => ({ cmd, payload });
/** GET_TENSOR's payload ends with the size it asks for (u64 LE). */
function getTensor(size: number): Buffer {
  const p = Buffer.alloc(312, 1);
  p.writeBigUInt64LE(BigInt(size), 304);
  return p;
}

it('counts a replayed decode step as one round trip with its commands, writes and bytes', async () => {
  const engine = await startFakeEngine();
  const tap = await startRpcTap(engine.port);
  // SET_TENSOR ×2, GRAPH_RECOMPUTE, GET_TENSOR (the logits): a decode step's shape
  const step: RpcStep = {
    commands: [command(6, Buffer.alloc(4401, 2)), command(6, Buffer.alloc(309, 3)), command(16, Buffer.alloc(4)), command(8, getTensor(128_000))],
    upBytes: 0,
    downBytes: 0,
    roundTrips: 1,
  };
  expect(replyBytes(step)).toBe(8 + 128_000);
  tap.mark();
  const times = await replaySteps({ host: '127.0.0.1', port: tap.port }, step, 4, { headMs: 1, engineMs: 2 });
  tap.close();
  expect(times).toHaveLength(4);
  // the engine spun 2 ms per compute: every step took at least that
  for (const t of times) expect(t).toBeGreaterThanOrEqual(2);
  const steps = tap.steps();
  // 2 warm-up steps + 4 measured; the first counts as the prompt
  expect(steps).toHaveLength(6);
  const { perPrompt, perToken, decodeSteps } = rpcAccounting(steps);
  expect(decodeSteps).toBe(5);
  expect(perToken).toEqual({
    roundTrips: 1,
    commands: { SET_TENSOR: 2, GRAPH_RECOMPUTE: 1, GET_TENSOR: 1 },
    headWrites: 12,
    upBytes: 9 * 4 + 4401 + 309 + 4 + 312,
    downBytes: 8 + 128_000,
  });
  // the replay's own control command (SET_COMPUTE_MS, 0xff) opens the first step
  expect(perPrompt.roundTrips).toBe(1);
  expect(perPrompt.commands).toMatchObject({ cmd255: 1, SET_TENSOR: 2 });
  const typical = typicalDecodeStep(steps);
  expect(typical?.commands.map((c) => [c.cmd, c.payload.length])).toEqual(step.commands.map((c) => [c.cmd, c.payload.length]));
});
