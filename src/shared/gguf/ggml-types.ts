import { UsageError } from '../errors.ts';

/**
 * The ggml tensor types a GGUF file can name, with the storage geometry llama.cpp uses.
 *
 * Figures are ggml's own `type_traits` (`ggml/src/ggml.c`), read back from the built library
 * (`ggml_blck_size`, `ggml_type_size`) of the llama.cpp release that node-llama-cpp ships, so
 * they are not transcribed by hand. Ids 4, 5, 31–33 and 36–38 were removed from ggml; files
 * using them cannot be loaded by llama.cpp and the reader rejects them.
 */
export interface GgmlType {
  /** Numeric id stored in GGUF tensor infos (`enum ggml_type`). */
  readonly id: number;
  /** Upper-case name as gguf-py and llama.cpp's logs spell it (F16, Q4_K, IQ2_XXS). */
  readonly name: GgmlTypeName;
  /** Elements per block: a row's length must be a multiple of this. */
  readonly blockSize: number;
  /** Bytes one block takes on disk and in memory. */
  readonly bytesPerBlock: number;
  /** True for block-quantised types (everything but the plain float/int types). */
  readonly quantized: boolean;
}

const TABLE = [
  [0, 'F32', 1, 4, false],
  [1, 'F16', 1, 2, false],
  [2, 'Q4_0', 32, 18, true],
  [3, 'Q4_1', 32, 20, true],
  [6, 'Q5_0', 32, 22, true],
  [7, 'Q5_1', 32, 24, true],
  [8, 'Q8_0', 32, 34, true],
  [9, 'Q8_1', 32, 36, true],
  [10, 'Q2_K', 256, 84, true],
  [11, 'Q3_K', 256, 110, true],
  [12, 'Q4_K', 256, 144, true],
  [13, 'Q5_K', 256, 176, true],
  [14, 'Q6_K', 256, 210, true],
  [15, 'Q8_K', 256, 292, true],
  [16, 'IQ2_XXS', 256, 66, true],
  [17, 'IQ2_XS', 256, 74, true],
  [18, 'IQ3_XXS', 256, 98, true],
  [19, 'IQ1_S', 256, 50, true],
  [20, 'IQ4_NL', 32, 18, true],
  [21, 'IQ3_S', 256, 110, true],
  [22, 'IQ2_S', 256, 82, true],
  [23, 'IQ4_XS', 256, 136, true],
  [24, 'I8', 1, 1, false],
  [25, 'I16', 1, 2, false],
  [26, 'I32', 1, 4, false],
  [27, 'I64', 1, 8, false],
  [28, 'F64', 1, 8, false],
  [29, 'IQ1_M', 256, 56, true],
  [30, 'BF16', 1, 2, false],
  [34, 'TQ1_0', 256, 54, true],
  [35, 'TQ2_0', 256, 66, true],
  [39, 'MXFP4', 32, 17, true],
  [40, 'NVFP4', 64, 36, true],
  [41, 'Q1_0', 128, 18, true],
  [42, 'Q2_0', 64, 18, true],
] as const;

export type GgmlTypeName = (typeof TABLE)[number][1];

/** Every type in id order. */
export const GGML_TYPES: readonly GgmlType[] = TABLE.map(([id, name, blockSize, bytesPerBlock, quantized]) =>
  Object.freeze({ id, name, blockSize, bytesPerBlock, quantized }),
);

const BY_ID = new Map<number, GgmlType>(GGML_TYPES.map((t) => [t.id, t]));
const BY_NAME = new Map<string, GgmlType>(GGML_TYPES.map((t) => [t.name.toLowerCase(), t]));

/** Ids that once existed in ggml and were removed (the reader names them as such). */
const REMOVED_IDS: ReadonlyMap<number, string> = new Map([
  [4, 'Q4_2'],
  [5, 'Q4_3'],
  [31, 'Q4_0_4_4'],
  [32, 'Q4_0_4_8'],
  [33, 'Q4_0_8_8'],
  [36, 'IQ4_NL_4_4'],
  [37, 'IQ4_NL_4_8'],
  [38, 'IQ4_NL_8_8'],
]);

export function ggmlTypeById(id: number): GgmlType | undefined {
  return BY_ID.get(id);
}

/** Name of an id ggml dropped (for error messages), if it is one. */
export function removedGgmlTypeName(id: number): string | undefined {
  return REMOVED_IDS.get(id);
}

/** Case-insensitive lookup: `q4_k`, `Q4_K` and `q4_K` (ggml's spelling) all match. */
export function ggmlTypeByName(name: string): GgmlType | undefined {
  return BY_NAME.get(name.toLowerCase());
}

/** The type for a name or id, or a UsageError naming what was asked. */
export function ggmlType(type: GgmlType | GgmlTypeName | number | string): GgmlType {
  if (typeof type === 'object') return type;
  const found = typeof type === 'number' ? ggmlTypeById(type) : ggmlTypeByName(type);
  if (!found) throw new UsageError(`unknown ggml type ${JSON.stringify(type)}`);
  return found;
}

/** Bytes of one row of `n` elements (ggml_row_size); n must be a multiple of the block size. */
export function rowBytes(type: GgmlType | GgmlTypeName | number, n: number): number {
  const t = ggmlType(type);
  if (!Number.isSafeInteger(n) || n < 0) throw new UsageError(`invalid row length ${n}`);
  if (n % t.blockSize !== 0) {
    throw new UsageError(`row length ${n} is not a multiple of ${t.name}'s block size ${t.blockSize}`);
  }
  return (n / t.blockSize) * t.bytesPerBlock;
}

/**
 * Bytes a tensor of shape `dims` (ggml order: dims[0] is the contiguous row length) takes —
 * exactly what llama.cpp allocates for its data, before alignment padding.
 */
export function tensorBytes(type: GgmlType | GgmlTypeName | number, dims: readonly number[]): number {
  const t = ggmlType(type);
  // A tensor with no dimensions is a scalar: one element.
  let bytes = rowBytes(t, dims.length === 0 ? 1 : dims[0]!);
  for (let i = 1; i < dims.length; i++) {
    const d = dims[i]!;
    if (!Number.isSafeInteger(d) || d < 0) throw new UsageError(`invalid tensor dimension ${d}`);
    bytes *= d;
  }
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`tensor of shape [${dims.join(', ')}] is too large`);
  return bytes;
}

/** Number of elements of a tensor of shape `dims`. */
export function elementCount(dims: readonly number[]): number {
  let n = 1;
  for (const d of dims) n *= d;
  return n;
}
