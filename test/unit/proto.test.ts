import { describe, expect, it } from 'vitest';
import { orchardV1 } from '../../src/shared/proto.ts';

describe('proto contracts', () => {
  it('load with proto-loader and expose both services', () => {
    const v1 = orchardV1();
    expect(Object.keys(v1.NodeAgent!.service)).toEqual(
      expect.arrayContaining(['Describe', 'Watch', 'StartEngine', 'StopEngine', 'Generate']),
    );
    expect(Object.keys(v1.Coordinator!.service)).toEqual(
      expect.arrayContaining(['Join', 'Status', 'Plan', 'Load', 'Unload', 'Generate']),
    );
    expect(v1.NodeAgent!.service.Watch!.responseStream).toBe(true);
  });
});
