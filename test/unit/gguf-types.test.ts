import { GgmlType as NlcGgmlType } from 'node-llama-cpp';
import { describe, expect, it } from 'vitest';
import { UsageError } from '../../src/shared/errors.ts';
import {
  GGML_TYPES,
  ggmlType,
  ggmlTypeById,
  ggmlTypeByName,
  removedGgmlTypeName,
  rowBytes,
  tensorBytes,
} from '../../src/shared/gguf/ggml-types.ts';

describe('ggml type table', () => {
  it('ids and names agree with node-llama-cpp’s GgmlType enum', () => {
    for (const t of GGML_TYPES) expect(NlcGgmlType[t.id as NlcGgmlType], t.name).toBe(t.name);
    // Every id node-llama-cpp knows is either in the table or a type ggml removed.
    for (const [key, id] of Object.entries(NlcGgmlType)) {
      if (typeof id !== 'number') continue;
      expect(ggmlTypeById(id)?.name ?? removedGgmlTypeName(id), key).toBe(key);
    }
  });

  it('block geometry matches the C structs of ggml-common.h', () => {
    // sizeof(block_q4_0) = fp16 scale + 16 nibble bytes; block_q4_K = 2 fp16 + 12 scales + 128.
    expect(ggmlType('Q4_0')).toMatchObject({ blockSize: 32, bytesPerBlock: 2 + 16 });
    expect(ggmlType('Q8_0')).toMatchObject({ blockSize: 32, bytesPerBlock: 2 + 32 });
    expect(ggmlType('Q4_K')).toMatchObject({ blockSize: 256, bytesPerBlock: 4 + 12 + 128 });
    expect(ggmlType('Q6_K')).toMatchObject({ blockSize: 256, bytesPerBlock: 128 + 64 + 16 + 2 });
    expect(ggmlType('Q5_K')).toMatchObject({ blockSize: 256, bytesPerBlock: 4 + 12 + 32 + 128 });
    expect(ggmlType('MXFP4')).toMatchObject({ blockSize: 32, bytesPerBlock: 1 + 16 });
  });

  it('looks names up case-insensitively and rejects unknown ones', () => {
    expect(ggmlTypeByName('q4_K')?.id).toBe(12);
    expect(ggmlTypeByName('iq2_xxs')?.id).toBe(16);
    expect(ggmlTypeByName('Q4_2')).toBeUndefined();
    expect(() => ggmlType('nope')).toThrow(UsageError);
    expect(() => ggmlType(4)).toThrow(UsageError);
  });

  it('computes tensor bytes like ggml_nbytes for contiguous tensors', () => {
    expect(tensorBytes('F32', [4096])).toBe(16384);
    expect(tensorBytes('F16', [4096, 14336])).toBe(4096 * 14336 * 2);
    expect(tensorBytes('Q4_K', [4096, 4096])).toBe((4096 / 256) * 144 * 4096);
    expect(tensorBytes('Q8_0', [4096, 128256])).toBe((4096 / 32) * 34 * 128256);
    expect(tensorBytes('Q6_K', [14336, 4096])).toBe((14336 / 256) * 210 * 4096);
    expect(tensorBytes(12, [256, 2, 3])).toBe(144 * 6);
    expect(tensorBytes('F32', [])).toBe(4);
    expect(rowBytes('Q4_0', 64)).toBe(36);
  });

  it('refuses rows that are not whole blocks and absurd shapes', () => {
    expect(() => tensorBytes('Q4_K', [100, 4])).toThrow(/block size 256/);
    expect(() => tensorBytes('F32', [2 ** 30, 2 ** 30, 2 ** 30])).toThrow(UsageError);
    expect(() => tensorBytes('F32', [4, -1])).toThrow(UsageError);
  });
});
