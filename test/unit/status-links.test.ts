import { describe, expect, it } from 'vitest';
import { linksNote, statusJson } from '../../src/cli/commands/status.ts';
import { modelStatusToWire } from '../../src/coordinator/api/grpc-server.ts';
import type { ModelStatus } from '../../src/coordinator/instances/types.ts';
import { DEFAULT_LOAD_OPTIONS } from '../../src/coordinator/instances/types.ts';
import { orchardV1 } from '../../src/shared/proto.ts';

/** A model as the runtime reports it, through the real proto encoding of StatusResponse, into `orchard status`. */
function throughStatus(m: ModelStatus): Record<string, unknown> {
  const status = orchardV1().Coordinator!.service.Status!;
  const decoded = status.responseDeserialize(status.responseSerialize({ clusterId: 'c', version: 'v', nodes: [], models: [modelStatusToWire(m)] }));
  return (statusJson(decoded as Record<string, unknown>).models as Record<string, unknown>[])[0]!;
}

const model = (untunnelledRdma: boolean | undefined): ModelStatus => ({
  name: 'm',
  path: '/models/m',
  state: 'ready',
  engine: 'mlx',
  stages: [],
  error: '',
  predictedTokensPerSecond: 1,
  options: DEFAULT_LOAD_OPTIONS,
  untunnelledRdma,
});

describe('orchard status: a model whose links bypass the TLS tunnels says so', () => {
  it('untunnelled RDMA (JACCL, allowed at load) survives the wire and prints a links line', () => {
    const m = throughStatus(model(true));
    expect(m.untunnelledRdma).toBe(true);
    expect(linksNote(m)).toMatch(/^links: untunnelled RDMA .*--allow-untunnelled-rdma/);
  });

  it('a tunnelled (or single-node) model prints none', () => {
    for (const u of [false, undefined]) {
      const m = throughStatus(model(u));
      expect(m.untunnelledRdma).toBe(false);
      expect(linksNote(m)).toBeUndefined();
    }
  });
});
